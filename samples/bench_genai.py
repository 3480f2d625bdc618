"""edgepeft's runtime against onnxruntime-genai on the same export: greedy tokens/s, with and without an adapter.

    .venv-device/bin/python samples/bench_genai.py --export bench-out/generate/slots [--adapter lora] [--rounds 10]

Runs in the device environment (edgepeft[cpu] + onnxruntime-genai; genai brings the CPU onnxruntime, which must
not share an environment with onnxruntime-gpu). Both load the same files: genai reads OUT/base/genai_config.json
and the adapter's .onnx_adapter; edgepeft its manifests. Batch 1, a prompt of 16 random ids, --new-tokens greedy
tokens, the end of sequence held back in both (min_new_tokens, genai's min_length): both make every token. Peers go
in a new seeded random order each round; each peer's first round is dropped; medians.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import numpy as np

from edgepeft.runtimes import Runtime
from sample_folder import genai as genai_module, positive, run

og = genai_module(".venv-device")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", default="bench-out/generate/slots")
    ap.add_argument("--adapter", default="lora")
    ap.add_argument("--rounds", type=positive, default=10)
    ap.add_argument("--new-tokens", type=positive, default=64)
    args = ap.parse_args()

    rt = Runtime(args.export)
    if rt.task != "causal-lm":  # genai generates text: it opens no encoder
        sys.exit(f"{args.export}: a {rt.task} export; onnxruntime-genai runs decoders: give an export of a causal-lm "
                 "model (as bench-out/generate/slots)")
    ort_adapter = os.path.join(args.export, "adapters", args.adapter, "adapter.onnx_adapter")
    if not os.path.isfile(ort_adapter):  # genai's own error names no file
        sys.exit(f"{ort_adapter}: missing; name an adapter of {args.export} ({', '.join(rt.adapter_names)}), exported "
                 "with --ort-adapter (a quantized base writes none by default)")
    prompt = np.random.default_rng(0).integers(3, rt.vocab_size, size=(1, 16), dtype=np.int64)
    length = prompt.shape[1] + args.new_tokens
    if rt.max_positions and length > rt.max_positions:  # genai's RuntimeError traceback, or max_new_tokens named
        sys.exit(f"error: --new-tokens {args.new_tokens}: the model's {rt.max_positions} positions leave room for "
                 f"{rt.max_positions - prompt.shape[1]} after its {prompt.shape[1]}-token prompt; pass at most that")
    model = og.Model(os.path.join(args.export, "base"))
    adapters = og.Adapters(model)
    adapters.load(ort_adapter, args.adapter)

    def genai(adapter):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=length, min_length=length)  # no stop at its eos
        generator = og.Generator(model, params)
        if adapter:
            generator.set_active_adapter(adapters, adapter)
        generator.append_tokens(prompt.astype(np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        return list(generator.get_sequence(0))

    def ours(adapter):
        return rt.generate(prompt, adapter=adapter, max_new_tokens=args.new_tokens,  # the model's eos held back, as
                           min_new_tokens=args.new_tokens,  # genai's min_length holds back its own
                           do_sample=False)[0].tolist()  # greedy as genai's loop, where the model's config samples

    peers = {f"{who} {adapter or 'no adapter'}": (fn, adapter) for who, fn in (("edgepeft", ours), ("genai", genai))
             for adapter in (None, args.adapter)}
    times = {k: [] for k in peers}
    ids = {}
    order = random.Random(0)
    for round_ in range(args.rounds + 1):
        for name in order.sample(list(peers), len(peers)):
            fn, adapter = peers[name]
            t = time.perf_counter()
            ids[name] = fn(adapter)
            if round_:  # the first round warms every session up
                times[name].append((len(ids[name]) - prompt.shape[1]) / (time.perf_counter() - t))
    speed = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.export}: batch 1, 16 prompt + {args.new_tokens} new tokens, {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs, onnxruntime-genai {og.__version__}")
    print("| adapter | edgepeft tokens/s | genai tokens/s | edgepeft / genai | greedy ids identical |")
    print("| --- | --- | --- | --- | --- |")
    for adapter in ("no adapter", args.adapter):
        a, b = speed[f"edgepeft {adapter}"], speed[f"genai {adapter}"]
        same = ids[f"edgepeft {adapter}"] == ids[f"genai {adapter}"]
        print(f"| {adapter} | {a:.1f} | {b:.1f} | {a / b:.2f} | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    run(main)
