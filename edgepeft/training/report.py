"""The training curve: loss per step (with eval loss per epoch) and the eval metric per epoch, as a PNG."""
from __future__ import annotations

import io

from edgepeft.files import write_bytes_atomic


def plot(log: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    history, evals = log["history"], log["evals"]
    metric = next((k for k in ("accuracy", "perplexity") if evals and k in evals[0]), None)
    fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(10 if metric else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", linewidth=1)
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"{log['args']['method']} on {log['args']['task']}")
    ax.legend()
    ax.grid(alpha=0.3)
    if metric:
        ax = axes[0][1]
        ax.plot([e["epoch"] for e in evals], [e[metric] for e in evals], "o-", color="tab:green")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"eval {metric}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
