"""--ops contrib against --ops standard on the benchmark decoders: greedy tokens/s with a switchable LoRA.

The benchmark Llama of ``bench_generate.py`` and a GPT-2 of the same size (6 layers, hidden 512, 8 heads, head
size 64, vocab 8192, seeded random weights), each with an r 16 all-linear LoRA, exported four ways (fp32 and
int4 bases, fused kernels or plain ONNX ops). Batch 1, 16 prompt ids, 64 new greedy tokens, peers in a new
seeded order each round, the first round dropped, medians; greedy ids compared between the two fp32 builds.

    python samples/bench_ops.py [--rounds 10] [--out bench-out/ops]
Timings are reported, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from bench_generate import CONFIG, PROMPT_LEN, RANK, build_base, check_new_tokens, make_adapter, paired  # noqa: E402
from edgepeft.exporters import export  # noqa: E402
from edgepeft.runtimes import Runtime  # noqa: E402
from edgepeft.runtimes.base_checks import OPS  # noqa: E402
from sample_folder import claim_folder, positive, run  # noqa: E402

GPT2 = dict(n_embd=CONFIG["hidden_size"], n_layer=CONFIG["num_hidden_layers"], n_head=CONFIG["num_attention_heads"],
            n_positions=CONFIG["max_position_embeddings"], vocab_size=CONFIG["vocab_size"])


def gpt2_adapter(out: str) -> str:
    """A seeded random GPT-2 and the benchmark's LoRA on it; the adapter's folder."""
    base = os.path.join(out, "gpt2-base")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).eval().save_pretrained(base)
    return make_adapter(base, out, name="gpt2-lora",
                        load=lambda path: transformers.GPT2LMHeadModel.from_pretrained(path).eval())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=positive, default=10)
    ap.add_argument("--new-tokens", type=positive, default=64)
    ap.add_argument("--out", default="bench-out/ops")
    args = ap.parse_args()
    check_new_tokens(ap, args.new_tokens)
    claim_folder(args.out, ap.get_default("out"))  # a folder of one's own files (a bench.md) is refused
    llama_base = os.path.join(args.out, "llama-base")
    build_base(llama_base)
    adapters = {"llama": make_adapter(llama_base, args.out), "gpt2": gpt2_adapter(args.out)}
    runtimes = {}
    for arch, adapter in adapters.items():
        for quantize in (None, "int4"):
            for ops in OPS:
                name = f"{arch} {quantize or 'fp32'} {ops}"
                out = os.path.join(args.out, name.replace(" ", "-"))
                export([adapter], out, names=["lora"], quantize=quantize, ops=ops, overwrite=True)
                runtimes[name] = Runtime(out)
    prompt = np.random.default_rng(0).integers(3, CONFIG["vocab_size"], size=(1, PROMPT_LEN), dtype=np.int64)
    peers = {name: (lambda rt=rt: rt.generate(prompt, adapter="lora", max_new_tokens=args.new_tokens,
                                             eos_token_id=[])[0].tolist(), None) for name, rt in runtimes.items()}
    speed, ids = paired(peers, args.rounds, args.new_tokens)
    head = (f"LoRA r {RANK} all-linear, batch 1, {PROMPT_LEN} prompt + {args.new_tokens} new greedy tokens, "
            f"{args.rounds} paired rounds, {os.cpu_count()} CPUs ({platform.machine()}); "
            f"`python samples/bench_ops.py --rounds {args.rounds}`")
    lines = [head, "", "| model | base | contrib tokens/s | standard tokens/s | contrib / standard |",
             "| --- | --- | --- | --- | --- |"]
    for arch in adapters:
        for precision in ("fp32", "int4"):
            c, s = speed[f"{arch} {precision} contrib"], speed[f"{arch} {precision} standard"]
            lines.append(f"| {arch} | {precision} | {c:.0f} | {s:.0f} | {c / s:.2f} |")
    same = {arch: ids[f"{arch} fp32 contrib"] == ids[f"{arch} fp32 standard"] for arch in adapters}
    lines += ["", "greedy ids equal between the fp32 builds: " + ", ".join(f"{a} {'yes' if v else 'no'}"
                                                                          for a, v in same.items())]
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"header": head, "tokens_per_s": speed, "same_ids_fp32": same}, f, indent=1)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run(main)
