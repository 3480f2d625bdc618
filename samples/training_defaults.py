"""Measure the default learning rates: every method on every sample task, 3 epochs, seed 0, one markdown table.

    HF_HUB_OFFLINE=1 python samples/training_defaults.py --lr-scale 0.33 1 3 --json defaults.json

Each run trains with ``edgepeft.train`` at the method's ``default_lr`` (or ``--lr METHOD=RATE``) times
each ``--lr-scale``, task heads at ``--head-lr`` (default: the trainer's HEAD_LR), and reports the
held-out metric before training -> at the best epoch: accuracy for seq-cls, retrieval accuracy for
feature-extraction (does each text rank its own positive first among all held-out positives),
perplexity for causal-lm (lower is better; the sample decoder has random weights), and the eval loss.
"""
import argparse
import itertools
import json
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import edgepeft  # noqa: E402
from edgepeft.training.arguments import find_method  # noqa: E402
from edgepeft.errors import TrainingInterrupted  # noqa: E402
from sample_folder import run as run_sample  # noqa: E402
from train_generative import DATA, jsonl, rows, small_decoder  # noqa: E402  (samples/ is on sys.path as a script)

METHODS = ["lora", "ia3", "bottleneck", "prefix", "prompt"]
TASKS = {"seq-cls": ["intent", "sentiment"], "feature-extraction": ["intent"], "causal-lm": ["intent"]}  # data sets


def pairs(name, split, path, seed=0):
    """{"text", "positive"} rows: per label, the shuffled texts' first half each paired with one of the second half.

    No text is both an anchor and a positive, so retrieval must find another text of the same label.
    """
    by_label = {}
    for r in rows(name, split):
        by_label.setdefault(r["label"], []).append(r["text"])
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for texts in by_label.values():
            rng.shuffle(texts)
            half = len(texts) // 2
            for a, b in zip(texts[:half], texts[half:]):
                f.write(json.dumps({"text": a, "positive": b}) + "\n")
    return path


def prepare(task, name, work):
    """(model, train file, eval file) for one task and data set, written under ``work``."""
    if task == "seq-cls":
        return edgepeft.minilm_path(), *(os.path.join(DATA, f"{name}_{s}.jsonl") for s in ("train", "eval"))
    if task == "feature-extraction":
        return edgepeft.minilm_path(), *(pairs(name, s, os.path.join(work, f"{name}-pairs-{s}.jsonl")) for s in ("train", "eval"))
    decoder = os.path.join(work, "small-llama")
    if not os.path.isdir(decoder):
        small_decoder(decoder)
    return decoder, *(jsonl(name, s) for s in ("train", "eval"))


def run(method, task, files, lr, head_lr, options, out):
    """One 3-epoch training run: the metric before and at its best epoch, the eval loss likewise, or the error."""
    model, data, eval_data = files
    t0 = time.perf_counter()
    try:
        log = edgepeft.train(model=model, task=task, method=method, data=data, eval_data=eval_data, out=out, epochs=3,
                             seed=0, lr=lr, head_lr=head_lr, options=options, overwrite=True, progress=False)
    except TrainingInterrupted:  # Ctrl-C stops the sweep (it was a row's "error", and the next run began)
        raise
    except Exception as e:  # noqa: BLE001  a failed run is a result too
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}
    metric = "perplexity" if task == "causal-lm" else "accuracy"
    trained = [e for e in log["evals"] if e["epoch"] > 0]
    best = min if metric == "perplexity" else max
    return {"metric": metric, "before": log["evals"][0][metric], "best": best(e[metric] for e in trained),
            "per_epoch": [e[metric] for e in trained], "loss_before": log["evals"][0]["loss"],
            "loss_best": min(e["loss"] for e in trained), "head_lr": log["args"]["head_lr"], "hint": log.get("hint"),
            "seconds": time.perf_counter() - t0}


def row(r):
    """One markdown table row."""
    label = r["method"] + (f" (n={r['options']['num_virtual_tokens']})" if r["options"] else "")
    head = f"{r['head_lr']:g}" if r["task"] == "seq-cls" and "head_lr" in r else ""
    measured = ([r["metric"], f"{r['before']:.3f} -> {r['best']:.3f}", " ".join(f"{v:.3f}" for v in r["per_epoch"]),
                f"{r['loss_before']:.3f} -> {r['loss_best']:.3f}"] if "error" not in r
                else ["error", r["error"].splitlines()[0], "", ""])
    cells = [label, r["task"], r["data"], f"{r['lr']:.3g}", head, *measured, f"{r['seconds']:.0f}"]
    return "| " + " | ".join(cells) + " |"


def method_rate(text: str) -> tuple:
    """--lr's METHOD=RATE, e.g. lora=0.01."""
    method, _, rate = text.partition("=")
    try:
        if method in METHODS:
            return method, float(rate)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: give METHOD=RATE with METHOD one of {', '.join(METHODS)}, e.g. lora=0.01")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lr-scale", type=float, nargs="+", default=[1.0], help="multiples of each method's rate")
    p.add_argument("--lr", nargs="+", default=[], type=method_rate, metavar="METHOD=RATE",
                   help="a method's rate, not its default_lr")
    p.add_argument("--head-lr", type=float, nargs="+", default=[None], help="seq-cls head rates (default: HEAD_LR)")
    p.add_argument("--virtual-tokens", type=int, nargs="+", default=[None], help="num_virtual_tokens for prefix/prompt")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--data", nargs="+", default=None, choices=sorted({n for names in TASKS.values() for n in names}),
                   help="only these data sets")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--work", default="training-defaults-work", help="scratch folder (data, decoder, adapters)")
    args = p.parse_args()
    if not args.work:  # a bare "No such file or directory"
        p.error("--work '': an empty path; give --work a folder")
    if unknown := sorted(set(args.data or []) - {n for t in args.tasks for n in TASKS[t]}):  # an empty table, exit 0
        p.error(f"--data {' '.join(unknown)}: no data set of --tasks {' '.join(args.tasks)} is named so")
    rates = {m: find_method(m).config_cls.default_lr for m in args.methods}
    rates.update(dict(args.lr))
    os.makedirs(args.work, exist_ok=True)
    inputs = {(t, n): prepare(t, n, args.work) for t in args.tasks for n in TASKS[t] if n in (args.data or [n])}
    print("| method | task | data | lr | head lr | metric | before -> best | per epoch | eval loss | s |\n"
          "|---|---|---|---|---|---|---|---|---|---|", flush=True)
    results = []
    for (task, name), files in inputs.items():
        for method in args.methods:
            heads = args.head_lr if task == "seq-cls" else [None]
            tokens = args.virtual_tokens if method in ("prefix", "prompt") else [None]
            for scale, head_lr, n in itertools.product(args.lr_scale, heads, tokens):
                options = {} if n is None else {"num_virtual_tokens": n}
                out = os.path.join(args.work, "runs", f"{method}-{task}-{name}")  # each run replaces the last one's
                r = {"method": method, "task": task, "data": name, "lr": rates[method] * scale, "options": options,
                     **run(method, task, files, rates[method] * scale, head_lr, options, out)}
                results.append(r)
                print(row(r), flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(results, f, indent=1)


if __name__ == "__main__":
    run_sample(main)  # Ctrl-C, and a refused --work or --json, in one line
