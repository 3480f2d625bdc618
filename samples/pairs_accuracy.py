"""A cross-encoder on real weights: MiniLM-L6 trained on text pairs, and the same pairs read as one segment.

    HF_HUB_OFFLINE=1 python samples/pairs_accuracy.py [--work pairs-out] [--epochs 3]

The intent sample set as pairs: each request with a short description of its intent ("yes") and of another intent
("no"). A LoRA classifier is trained twice with edgepeft's defaults: on "text_pair" rows (BERT's second segment,
token types 1), and on the same rows joined into one text by the pair's own [SEP] (every token of type 0: what a
pair was before edgepeft served them). Each is exported and, for every held-out request, ``classify`` scores it
against the six descriptions; the best-scoring description is its predicted intent (a reranker's top-1).
"""
import argparse
import json
import os
import random

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import edgepeft  # noqa: E402
from edgepeft.exporters import export  # noqa: E402
from edgepeft.runtimes import Runtime  # noqa: E402
from edgepeft.training.data import read_jsonl  # noqa: E402
from sample_folder import fresh_folder, positive, run  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DESCRIPTIONS = {
    "alarm": "set, change or cancel an alarm that wakes you",
    "music": "play, pause or pick songs and music",
    "shopping_list": "add or remove items on the shopping list",
    "smalltalk": "chat, greet or ask how the assistant is",
    "timer": "start or stop a countdown timer",
    "weather": "ask about the weather forecast, rain or temperature",
}


def pair_rows(split: str, seed: int = 0) -> list:
    """Each request with its intent's description ("yes") and another intent's ("no")."""
    rng = random.Random(seed)
    rows = []
    for r in read_jsonl(os.path.join(DATA, f"intent_{split}.jsonl"), "seq-cls"):
        other = rng.choice([k for k in DESCRIPTIONS if k != r["label"]])
        rows += [{"text": r["text"], "text_pair": DESCRIPTIONS[r["label"]], "label": "yes"},
                 {"text": r["text"], "text_pair": DESCRIPTIONS[other], "label": "no"}]
    return rows


def write(path: str, rows: list) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def top1(rt, adapter: str, joined: bool) -> float:
    """Held-out requests whose best-scoring description is their intent's."""
    rows = read_jsonl(os.path.join(DATA, "intent_eval.jsonl"), "seq-cls")
    names = list(DESCRIPTIONS)
    hits = 0
    for r in rows:
        given = [f"{r['text']} [SEP] {DESCRIPTIONS[n]}" if joined else (r["text"], DESCRIPTIONS[n]) for n in names]
        yes = [s["scores"]["yes"] for s in rt.classify(given, adapter=adapter)]
        hits += names[int(np.argmax(yes))] == r["label"]
    return hits / len(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="pairs-out", help="emptied first where a sample made it (default %(default)s)")
    ap.add_argument("--epochs", type=positive, default=3)
    args = ap.parse_args()
    fresh_folder(args.work, ap.get_default("work"))
    train, held = pair_rows("train"), pair_rows("eval", seed=1)
    results = {}
    for mode in ("pair", "joined"):
        def shaped(rows):
            return rows if mode == "pair" else [{"text": f"{r['text']} [SEP] {r['text_pair']}", "label": r["label"]}
                                                for r in rows]
        data = write(os.path.join(args.work, f"{mode}_train.jsonl"), shaped(train))
        held_out = write(os.path.join(args.work, f"{mode}_eval.jsonl"), shaped(held))
        adapter = os.path.join(args.work, mode)
        log = edgepeft.train(model=edgepeft.minilm_path(), task="seq-cls", method="lora", data=data, eval_data=held_out,
                             out=adapter, epochs=args.epochs, progress=False)
        out = os.path.join(args.work, f"export-{mode}")
        export([adapter], out, names=[mode])
        rt = Runtime(out)
        results[mode] = (log["evals"][0]["accuracy"], log["best"]["value"], top1(rt, mode, mode == "joined"))
    print(f"MiniLM-L6, LoRA (edgepeft's defaults, {args.epochs} epochs), {len(train)} training pairs, {len(held)} "
          "held-out pairs, 120 held-out requests ranked against 6 intent descriptions")
    print("| rows | pair accuracy before training | pair accuracy, best epoch | intent top-1 by classify |")
    print("| --- | --- | --- | --- |")
    for mode, (before, best, ranked) in results.items():
        what = "text pairs (second segment, types 1)" if mode == "pair" else "joined by [SEP] (one segment, types 0)"
        print(f"| {what} | {before:.3f} | {best:.3f} | {ranked:.3f} |")


if __name__ == "__main__":
    run(main)
