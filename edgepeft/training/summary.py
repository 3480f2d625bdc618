"""How a run went, judged from its log alone (its evals, no model): which epoch is best, whether training beat the
adapter it started from, and the flags to try when it did not learn."""
from __future__ import annotations

import math
import os

from edgepeft.config import CONFIG_NAME
from edgepeft.errors import ConfigError
from edgepeft.training.checkpoint import CHECKPOINT, STATE

HARDLY_MOVED = 0.97  # eval loss at its best within this share of the untrained adapter's, either way: hardly moved


def diverged(args, step: int, epoch: int, what: str) -> ConfigError:
    """The error that stops a run whose logged training loss is no longer a number (checked where it is logged: every
    ``logging_steps`` steps and at each epoch's end, before that epoch's adapter is saved). Where OUT keeps a
    checkpoint, the same command with a lower --lr is refused (a run into OUT, or one resumed with other settings):
    the fix says start over."""
    kept = f"{args.out} keeps the adapter saved before" if os.path.isfile(os.path.join(args.out, CONFIG_NAME)) \
        else "no adapter was saved"
    over = "" if args.overwrite or not os.path.isfile(os.path.join(args.out, CHECKPOINT, STATE)) else \
        ", and start over with --overwrite" + (" instead of --resume (or another --out without it)" if args.resume
                                               else " (or another --out)")
    return ConfigError(f"training diverged at step {step} (epoch {epoch + 1}): {what}; lower --lr (now {args.lr:g}) or "
                       f"check the data{over}; {kept}")


def rank(evaluation: dict) -> tuple:
    """Higher is better: accuracy, ties broken by the lower eval loss; or the eval loss alone. An eval of no number
    (a NaN loss) is below every other: never the best."""
    if not math.isfinite(evaluation["loss"]):
        return (-math.inf,) * (2 if "accuracy" in evaluation else 1)
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


# the same command run again is refused (OUT holds this run's adapter and checkpoint; a resume keeps its settings)
AGAIN = ", with --overwrite (OUT holds this run)"


def hint(log: dict, lr: float, epochs: int) -> str | None:
    """One line with the flags to try when training did not learn (None: it did).

    The eval loss rose (by more than 3%): the rate is probably too high. It hardly moved (within 3%) and the metric
    did not improve either: too low, or too few epochs.
    """
    evals = [e for e in log["evals"] if math.isfinite(e["loss"])]  # a NaN eval tells nothing (nor is it the best)
    if len(evals) < 2 or evals[0]["epoch"] != 0:
        return None
    before, best = evals[0]["loss"], min(e["loss"] for e in evals[1:])
    if best > before * (2 - HARDLY_MOVED):  # past the band of "hardly moved", 3% either way
        return f"eval loss rose ({before:.4f} -> {best:.4f} at best); try a lower rate, e.g. --lr {lr / 3:.2g}{AGAIN}"
    if log.get("history") and not any(h["lr"] for h in log["history"]):  # one step, the warm-up's first: rate 0
        return ("every logged step ran at rate 0 (a warm-up's first step: this run has too few steps to warm up); pass "
                f"--warmup-ratio 0, or take more steps (more --epochs, a smaller --batch-size){AGAIN}")
    metric = next((k for k in ("accuracy", "perplexity") if k in evals[0]), None)
    if metric == "accuracy" and max(e["accuracy"] for e in evals[1:]) >= evals[0]["accuracy"] + 0.05 - 1e-9:
        return None  # a clear gain in accuracy: a small loss change (ln 2 to start with) says nothing more
    if best < HARDLY_MOVED * before:
        return None
    return (f"eval loss hardly moved ({before:.4f} -> {best:.4f} at best); try a higher rate, e.g. "
            f"--lr {lr * 3:.2g}, or more --epochs (now {epochs}){AGAIN}")
