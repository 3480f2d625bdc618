"""Many tasks at once, measured: mixed batches, generation, restaging, memory over switches and load/unload cycles.

    python samples/bench_many.py [--out bench-out/many] [--rounds 20]

Models: the real MiniLM-L6 (sequence classification, 4 LoRA r 8 classifiers, 3 labels each) and the benchmark
Llama of bench_generate.py (25.8M, 4 LoRA r 16 all-linear adapters), HF PEFT adapters with random B, exported
into one base each. Batch 8 x 32 tokens, the 4 adapters 2 rows each ("mixed") against the same batch with one
adapter ("one"), the same batch run per adapter as 4 calls of 2 rows ("split"), and HF PEFT eager PyTorch's own
mixed batch (``adapter_names=``, which splits the batch per adapter in Python). Peers take turns in a new seeded
random order each round; each peer's first round is dropped; medians. Then: greedy generation of 4 prompts with
4 adapters in one mixed batch against 4 single-adapter generations one after another; restaging an evicted
adapter (a zero budget); resident memory after 10,000 calls switching adapter and 1,000 load/unload cycles.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402

import edgepeft  # noqa: E402
from edgepeft.exporters import export  # noqa: E402
from edgepeft.models import load_base  # noqa: E402
from edgepeft.runtimes import Runtime  # noqa: E402
from edgepeft.runtimes.bench import rss_bytes  # noqa: E402
from sample_folder import fresh_folder, positive, run  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_generate import build_base  # noqa: E402

ADAPTERS = ["a", "b", "c", "d"]


def make_adapters(base, task, out, targets, r, num_labels=None):
    """HF PEFT LoRA adapters with lora_B ~ N(0, 0.02), saved under out/<name>; returns {name: dir}."""
    dirs = {}
    for i, name in enumerate(ADAPTERS):
        model = load_base(base, task, labels=[str(k) for k in range(num_labels)] if num_labels else None)
        config = peft.LoraConfig(task_type="SEQ_CLS" if task == "seq-cls" else "CAUSAL_LM", r=r, lora_alpha=2 * r,
                                 target_modules=targets)
        pm = peft.get_peft_model(model, config)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n or "modules_to_save" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        pm.peft_config["default"].base_model_name_or_path = base
        pm.save_pretrained(os.path.join(out, name))
        dirs[name] = os.path.join(out, name)
    return dirs


def hf_mixed(base, task, dirs, num_labels=None):
    model = load_base(base, task, labels=[str(k) for k in range(num_labels)] if num_labels else None)
    pm = peft.PeftModel.from_pretrained(model, dirs["a"], adapter_name="a")
    for name in ADAPTERS[1:]:
        pm.load_adapter(dirs[name], adapter_name=name)
    return pm.eval()


def timed(peers: dict, rounds: int) -> dict:
    times = {k: [] for k in peers}
    order = random.Random(0)
    for round_ in range(rounds + 1):
        for name in order.sample(list(peers), len(peers)):
            t = time.perf_counter()
            peers[name]()
            if round_:
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def batch_peers(rt, hf, ids, mask, task):
    rows = [ADAPTERS[i // 2] for i in range(len(ids))]  # 2 rows per adapter
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    extra = {"use_cache": False} if task == "causal-lm" else {}

    def hf_call():
        with torch.no_grad():
            hf(input_ids=t_ids, attention_mask=t_mask, adapter_names=rows, **extra)

    return {
        "one": lambda: rt.forward(ids, mask, adapter="a"),
        "mixed": lambda: rt.forward(ids, mask, adapter=rows),
        "split": lambda: [rt.forward(ids[2 * k:2 * k + 2], mask[2 * k:2 * k + 2], adapter=n) for k, n in enumerate(ADAPTERS)],
        "hf_peft_mixed": hf_call,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out/many", help="emptied first where a sample made it")
    ap.add_argument("--rounds", type=positive, default=20)
    args = ap.parse_args()
    fresh_folder(args.out, ap.get_default("out"))
    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 8000, size=(8, 32), dtype=np.int64)
    mask = np.ones_like(ids)
    print(f"batch 8 x 32 tokens, 4 LoRA adapters x 2 rows, {args.rounds} rounds, {os.cpu_count()} CPUs; tokens/s (ratio to 'one')")
    print("| model | one adapter | mixed, one graph run | split, 4 runs | HF PEFT adapter_names= | mixed / one | mixed / HF PEFT |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    setups = {
        "MiniLM-L6 seq-cls": (edgepeft.minilm_path(), "seq-cls", ["query", "key", "value", "dense"], 8, 3),
        "benchmark Llama": (None, "causal-lm", "all-linear", 16, None),
    }
    runtimes = {}
    for label, (base, task, targets, r, labels) in setups.items():
        if base is None:
            base = os.path.join(args.out, "llama-base")
            build_base(base)
        dirs = make_adapters(base, task, os.path.join(args.out, label.split()[0]), targets, r, labels)
        out = os.path.join(args.out, label.split()[0] + "-export")
        export(list(dirs.values()), out, names=list(dirs))
        rt = Runtime(out)
        runtimes[label] = rt
        speed = {k: ids.size / v for k, v in timed(batch_peers(rt, hf_mixed(base, task, dirs, labels), ids, mask, task),
                                                   args.rounds).items()}
        print(f"| {label} | {speed['one']:.0f} | {speed['mixed']:.0f} | {speed['split']:.0f} | "
              f"{speed['hf_peft_mixed']:.0f} | {speed['mixed'] / speed['one']:.2f} | {speed['mixed'] / speed['hf_peft_mixed']:.2f} |")

    rt = runtimes["benchmark Llama"]
    prompts = rng.integers(1000, 8000, size=(4, 16), dtype=np.int64)
    new = 32
    gen = timed({"mixed": lambda: rt.generate(prompts, adapter=ADAPTERS, max_new_tokens=new, eos_token_id=[]),
                 "sequential": lambda: [rt.generate(prompts[k:k + 1], adapter=n, max_new_tokens=new, eos_token_id=[])
                                        for k, n in enumerate(ADAPTERS)]}, max(3, args.rounds // 4))
    same = all(np.array_equal(rt.generate(prompts, adapter=ADAPTERS, max_new_tokens=8, eos_token_id=[])[k],
                              rt.generate(prompts[k:k + 1], adapter=n, max_new_tokens=8, eos_token_id=[])[0])
               for k, n in enumerate(ADAPTERS))
    print(f"\ngeneration, benchmark Llama, 4 prompts x {new} new tokens, 4 adapters: mixed batch "
          f"{4 * new / gen['mixed']:.0f} tokens/s, 4 sequential generations {4 * new / gen['sequential']:.0f} tokens/s "
          f"({gen['sequential'] / gen['mixed']:.2f}x); ids identical: {'yes' if same else 'no'}")

    cold = Runtime(rt.path, adapter_budget_bytes=0)  # every call restages its adapter
    warm = Runtime(rt.path)
    one = ids[:1]
    restage = timed({"cold": lambda: cold.forward(one, adapter="a"), "warm": lambda: warm.forward(one, adapter="a")},
                    args.rounds)
    size = sum(v.numpy().nbytes for v in warm.adapter_tensors("a").values())
    print(f"restaging an evicted adapter ({size / 2**20:.1f} MiB of r 16 tensors): a call that restages "
          f"{restage['cold'] * 1e3:.1f} ms, a call with it staged {restage['warm'] * 1e3:.1f} ms "
          f"(restage {1e3 * (restage['cold'] - restage['warm']):.1f} ms)")

    small = runtimes["MiniLM-L6 seq-cls"]
    x, m = ids[:1], mask[:1]
    for _ in range(200):
        small.forward(x, m, adapter=ADAPTERS[_ % 4])
    before = rss_bytes()
    for k in range(10_000):
        small.forward(x, m, adapter=ADAPTERS[k % 4])
    after_switches = rss_bytes()
    folder = small.adapter_dir("a")
    for k in range(1000):
        small.load_adapter(folder, name="cycled")
        small.forward(x, m, adapter="cycled")
        small.unload_adapter("cycled")
    after_cycles = rss_bytes()
    mib = 2 ** 20
    print(f"resident memory, MiniLM runtime: {before / mib:.1f} MiB after warm-up, {after_switches / mib:.1f} MiB after "
          f"10,000 calls switching among 4 adapters, {after_cycles / mib:.1f} MiB after 1,000 load/unload cycles")


if __name__ == "__main__":
    run(main)
