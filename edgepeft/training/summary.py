"""How a run went, judged from its log alone (its evals, no model): which epoch is best, whether training beat the
adapter it started from, and the flags to try when it did not learn."""
from __future__ import annotations

HARDLY_MOVED = 0.97  # eval loss at its best within this share of the untrained adapter's, either way: hardly moved


def rank(evaluation: dict) -> tuple:
    """Higher is better: accuracy, ties broken by the lower eval loss; or the eval loss alone."""
    if "accuracy" in evaluation:
        return evaluation["accuracy"], -evaluation["loss"]
    return (-evaluation["loss"],)


def shown(evaluation: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in evaluation.items() if k not in ("epoch", "step"))


def beat_untrained(log: dict) -> bool | None:
    """Whether the best epoch beat the adapter training started from (None: no eval before training, or none since)."""
    untrained = next((e for e in log["evals"] if e["epoch"] == 0), None)
    if untrained is None or not log["best"]:
        return None
    best = next(e for e in log["evals"] if e["epoch"] == log["best"]["epoch"])
    return rank(best) > rank(untrained)


def hint(log: dict, lr: float, epochs: int) -> str | None:
    """One line with the flags to try when training did not learn (None: it did).

    The eval loss rose (by more than 3%): the rate is probably too high. It hardly moved (within 3%) and the metric
    did not improve either: too low, or too few epochs.
    """
    evals = log["evals"]
    if len(evals) < 2 or evals[0]["epoch"] != 0:
        return None
    before, best = evals[0]["loss"], min(e["loss"] for e in evals[1:])
    if best > before * (2 - HARDLY_MOVED):  # past the band of "hardly moved", 3% either way
        return f"eval loss rose ({before:.4f} -> {best:.4f} at best); try a lower rate, e.g. --lr {lr / 3:.2g}"
    metric = next((k for k in ("accuracy", "perplexity") if k in evals[0]), None)
    if metric == "accuracy" and max(e["accuracy"] for e in evals[1:]) > evals[0]["accuracy"] + 0.05:
        return None  # a clear gain in accuracy: a small loss change (ln 2 to start with) says nothing more
    if best < HARDLY_MOVED * before:
        return None
    return (f"eval loss hardly moved ({before:.4f} -> {best:.4f} at best); try a higher rate, e.g. "
            f"--lr {lr * 3:.2g}, or more --epochs (now {epochs})")
