"""Prefill cost with logits for every prompt position vs the last one only (``logits_to_keep``).

A decoder export takes ``logits_to_keep`` (transformers' name): generation binds 1, so
a prefill projects one position onto the vocabulary; 0 (the default, and what every
prefill computed before the input existed) projects them all. This times one prefill
(batch 1, no adapter, empty cache) at several prompt lengths both ways, interleaved in
a new seeded random order each round, and reports medians, the ratio and the size of
the logits output.

    python samples/bench_generate.py --rounds 2 --new-tokens 8     # makes bench-out/generate/slots
    python samples/bench_prefill.py [--export bench-out/generate/slots] [--rounds 20]
Timings are reported, never asserted.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys

import numpy as np

from edgepeft.runtimes import Runtime
from edgepeft.runtimes.bench import interleaved
from edgepeft.runtimes.manifest import LOGITS_TO_KEEP, cache_names
from sample_folder import positive, run


def prefill_feeds(rt: Runtime, length: int, keep: int) -> dict:
    ids = np.random.default_rng(length).integers(3, rt.vocab_size, size=(1, length), dtype=np.int64)
    c = rt.cache
    empty = np.zeros((1, c["num_kv_heads"], 0, c["head_dim"]), np.float32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(length)[None, :],
            LOGITS_TO_KEEP: np.array(keep, dtype=np.int64), **{n: empty for n in cache_names(c, "past")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", default="bench-out/generate/slots", help="a causal-lm export (default %(default)s)")
    ap.add_argument("--lengths", default="16,64,256,496", type=lambda text: [positive(n) for n in text.split(",")],
                    help="prompt lengths, comma-separated (default %(default)s)")
    ap.add_argument("--rounds", type=positive, default=20, help="interleaved rounds, 3 calls per peer each (default 20)")
    args = ap.parse_args()
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    rt = Runtime(args.export, load_adapters=False)
    if not rt.cache:
        sys.exit(f"error: {args.export}: a {rt.task} export; give a causal-lm export (a decoder's prefill)")
    if LOGITS_TO_KEEP not in rt.manifest["inputs"]:
        sys.exit(f"error: {args.export}: this export has no {LOGITS_TO_KEEP} input; re-export it")
    lengths = args.lengths
    if rt.max_positions and max(lengths) > rt.max_positions:
        sys.exit(f"error: --lengths {max(lengths)}: the model has {rt.max_positions} positions; give shorter prompts")
    feeds = {(n, keep): prefill_feeds(rt, n, keep) for n in lengths for keep in (0, 1)}
    sizes = {key: rt.session.run(["logits"], f)[0].nbytes for key, f in feeds.items()}
    times = interleaved({key: (lambda f=f: rt.session.run(["logits"], f)) for key, f in feeds.items()}, args.rounds, 3)
    med = {key: statistics.median(dt for dt, _ in v) * 1e3 for key, v in times.items()}
    print(f"\n{args.export}, vocab {rt.vocab_size}, CPU, batch 1, median of {3 * args.rounds} prefills each\n")
    print("| prompt tokens | every position (ms) | last position (ms) | every / last | logits KiB, every / last |")
    print("| --- | --- | --- | --- | --- |")
    for n in lengths:
        every, last = med[(n, 0)], med[(n, 1)]
        print(f"| {n} | {every:.2f} | {last:.2f} | {every / last:.2f}x | "
              f"{sizes[(n, 0)] / 1024:.1f} / {sizes[(n, 1)] / 1024:.1f} |")


if __name__ == "__main__":
    run(main)
