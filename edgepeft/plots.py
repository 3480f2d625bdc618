"""PNG charts: the training curve (``edgepeft train``) and the switch-cost chart (``edgepeft bench --plot``)."""
from __future__ import annotations

import importlib.util
import io

from edgepeft.files import write_bytes_atomic


def missing_matplotlib() -> str | None:
    """A note where matplotlib is not installed (``training_curve`` then draws nothing), else None."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed, so no training_curve.png is drawn; pip install matplotlib for it"
    return None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    return matplotlib, plt


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")  # a legend below the axes stays whole
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def training_curve(log: dict, path: str) -> None:
    """Loss per step (with eval loss per epoch) and the eval metric per epoch; nothing without matplotlib (the
    training run said so at its start)."""
    if missing_matplotlib():
        return
    matplotlib, plt = _pyplot()
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
        if metric == "perplexity":  # it falls by orders of magnitude early on
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    _save(fig, path)


def bench_chart(result: dict, path: str) -> None:
    """Latency per adapter when it serves every call and when every call switches task."""
    _, plt = _pyplot()
    names = list(result["adapters"])
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names) + 2), 4))
    x = range(len(names))
    if names:  # none (--adapter none, a --merge export): the base's line alone, no empty bars in the legend
        ax.bar([i - 0.2 for i in x], [result["adapters"][n]["stay_ms"] for n in names], 0.4, label="same adapter every call")
        ax.bar([i + 0.2 for i in x], [result["adapters"][n]["switching_ms"] for n in names], 0.4, label="switching every call")
    merged = result.get("merged_adapter")  # a --merge export's base is its adapter folded in, as the table says
    ax.axhline(result["none_ms"], color="gray", linestyle="--",
               label=f"{merged} (merged into the base)" if merged else "base model, no adapter")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("median latency per call (ms)")
    s = result["setup"]
    ax.set_title(f"batch {s['batch']} x {s['seq']} tokens, {s['providers'][0]}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
