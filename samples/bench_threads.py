"""ONNX Runtime thread-pool settings for edgepeft's sessions, measured on one decoder export.

Why edgepeft's sessions spin only during a call (``runtimes.sessions.session_options``):
four sessions of the same base graph stay alive, as in an app with several runtimes,
and one cached decode step (batch 1, past length 40) is timed three ways:

    no spin       session.intra_op.allow_spinning 0: every parallel op wakes a sleeping thread
    spin          allow_spinning 1: threads keep spinning after the call, on other sessions' cores
    spin, stop    allow_spinning 1 + session.force_spinning_stop 1 (edgepeft's default)

each with every call on one session, and with calls going round the four sessions.
Each setting runs in a process of its own: pools that spin on after their calls would
otherwise slow the next setting's measurement too.

    python samples/bench_generate.py --rounds 2 --new-tokens 8     # makes bench-out/generate/merged
    python samples/bench_threads.py [--export bench-out/generate/merged] [--rounds 15]
Timings are reported, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort

from edgepeft.runtimes import Runtime
from edgepeft.runtimes.manifest import cache_names, read_base_manifest
from sample_folder import positive, run

SETTINGS = {"no spin": {"session.intra_op.allow_spinning": "0"},
            "spin": {"session.intra_op.allow_spinning": "1"},
            "spin, stop": {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"}}
PAST = 40


def decode_feeds(cache: dict) -> dict:
    """One token after PAST cached ones; slots are left to their neutral defaults."""
    rng = np.random.default_rng(0)
    feeds = {"input_ids": np.full((1, 1), 5, np.int64), "attention_mask": np.ones((1, PAST + 1), np.int64),
             "position_ids": np.full((1, 1), PAST, np.int64)}
    for name in cache_names(cache, "past"):
        feeds[name] = rng.standard_normal((1, cache["num_kv_heads"], PAST, cache["head_dim"])).astype(np.float32)
    return feeds


def measure(base: str, cache: dict, setting: str, rounds: int) -> dict:
    """Median decode-step ms for one setting: {"one session": ..., "round the four": ...}."""
    sessions = []
    for _ in range(4):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        for key, value in SETTINGS[setting].items():
            so.add_session_config_entry(key, value)
        sessions.append(ort.InferenceSession(os.path.join(base, "model.onnx"), so, providers=["CPUExecutionProvider"]))
    feeds = decode_feeds(cache)
    for s in sessions:
        for _ in range(5):
            s.run(None, feeds)
    times = {"one session": [], "round the four": []}
    for _ in range(rounds):
        for pattern, runs in times.items():
            t = time.perf_counter()
            for k in range(20):
                (sessions[0] if pattern == "one session" else sessions[k % 4]).run(None, feeds)
            runs.append((time.perf_counter() - t) / 20 * 1e3)
    return {pattern: statistics.median(runs) for pattern, runs in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", default="bench-out/generate/merged", help="a decoder export folder (OUT)")
    ap.add_argument("--rounds", type=positive, default=15, help="rounds of 20 calls per pattern (default 15)")
    ap.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)  # the child process's one setting
    args = ap.parse_args()
    base = os.path.join(args.export, "base")
    if args.setting:
        print(json.dumps(measure(base, read_base_manifest(base)["cache"], args.setting, args.rounds)))
        return
    rt = Runtime(args.export, load_adapters=False)  # its checks: a folder that is no export, a file missing, ...
    if not rt.manifest.get("cache"):
        sys.exit(f"error: {args.export}: not a decoder export with a KV cache; see this script's docstring")
    if rt.max_positions and PAST + 1 > rt.max_positions:  # the step at position PAST
        sys.exit(f"error: {args.export}: the model has {rt.max_positions} positions, and this benchmark's step comes "
                 f"after {PAST} cached ones; export a model with more than {PAST} positions")
    del rt  # its session would take a core's share beside the children's
    print(f"decode step (ms), median of {args.rounds} rounds x 20 calls, {os.cpu_count()} CPUs, {args.export}")
    print("| setting | one session | calls round four sessions |\n| --- | --- | --- |")
    for setting in SETTINGS:
        child = subprocess.run([sys.executable, __file__, "--export", args.export, "--rounds", str(args.rounds),
                                "--setting", setting], capture_output=True, text=True)
        if child.returncode:  # its own error line (a traceback's last), not a CalledProcessError's
            said = (child.stderr.strip().splitlines() or ["no message"])[-1].removeprefix("error: ")
            sys.exit(f"error: the {setting!r} measurement failed: {said}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"| {setting} | {result['one session']:.3f} | {result['round the four']:.3f} |")


if __name__ == "__main__":
    run(main)
