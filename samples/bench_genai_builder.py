"""edgepeft against onnxruntime-genai's own pipeline (its model builder's graphs + its C++ loop), CPU, batch 1.

    .venv-genai/bin/python samples/bench_genai_builder.py [--out bench-out/genai-builder] [--rounds 20]

Runs in its own environment, which ``make bench`` sets up (.venv-genai: edgepeft[train,cpu], peft and
onnxruntime-genai): genai's builder needs torch and transformers beside genai, and genai brings the CPU
onnxruntime, which must not share an environment with onnxruntime-gpu.
  1. The benchmark Llama of bench_generate.py (25.8M, seeded) with a word-level tokenizer (the builder
     wants one) and its r16 all-linear LoRA adapter (lora_B ~ N(0, 0.02)), made here when missing.
  2. genai's builder (``python -m onnxruntime_genai.models.builder -e cpu``): fp32 and int4, each plain and with
     the adapter baked in (``--extra_options adapter_path=...``; not switchable).
  3. edgepeft exports of that adapter: slots (fp32, --quantize int4), merged (fp32, int4), with --ops contrib
     (the default) and, for comparison, --ops standard.
  4. Decode: 16 prompt + --new-tokens greedy tokens (genai: min_length = max_length, edgepeft: end of
     sequence off), tokens/s. Prefill: a --prefill-tokens prompt and its first token's logits (genai:
     append_tokens; edgepeft: step_logits' prefill), prompt tokens/s. Every peer goes once per round, in a new
     seeded random order each round; each peer's first round is dropped; medians.
Prints markdown tables and writes OUT/bench.md and OUT/bench.json. Timings are reported, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from bench_generate import CONFIG, PROMPT_LEN, build_base, make_adapter, paired  # noqa: E402
from edgepeft.exporters import export  # noqa: E402
from edgepeft.runtimes import Runtime  # noqa: E402
from sample_folder import claim_folder, genai, positive, run  # noqa: E402

og = genai(".venv-genai")


def write_tokenizer(path: str) -> None:
    """A word-level tokenizer over the model's vocabulary (ids only are benchmarked; the builder needs one)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, CONFIG["vocab_size"])}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                  pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(path)


def genai_build(base: str, out: str, precision: str, adapter: str | None) -> str:
    if os.path.isfile(os.path.join(out, "genai_config.json")):
        return out
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", base, "-o", out, "-p", precision,
           "-e", "cpu", "-c", out + ".cache"]
    if adapter:
        cmd += ["--extra_options", f"adapter_path={adapter}"]
    print("$", shlex.join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)  # its progress bars: shown only when it fails
    if done.returncode:
        sys.exit(f"genai's builder failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return out


def edgepeft_export(adapter: str, out: str, **options) -> str:
    if not os.path.isfile(os.path.join(out, "base", "edgepeft.json")):
        export([adapter], out, **options)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out/genai-builder")
    ap.add_argument("--rounds", type=positive, default=20)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill-tokens", type=int, default=256)
    args = ap.parse_args()
    out = claim_folder(args.out, ap.get_default("out"))  # a folder of one's own files (a bench.md) is refused
    base = os.path.join(out, "base-model")
    if not os.path.isfile(os.path.join(base, "tokenizer.json")):
        build_base(base)
        write_tokenizer(base)
    lora = os.path.join(out, "peft", "lora")
    if not os.path.isdir(lora):
        make_adapter(base, out)

    genai_dirs = {(p, a): genai_build(base, os.path.join(out, f"genai-{p}{'-lora' if a else ''}"), p, lora if a else None)
                  for p in ("fp32", "int4") for a in (False, True)}
    ours = {
        "slots fp32": edgepeft_export(lora, os.path.join(out, "slots")),
        "merged fp32": edgepeft_export(lora, os.path.join(out, "merged"), merge=True),
        "slots int4": edgepeft_export(lora, os.path.join(out, "slots-int4"), quantize="int4"),
        "merged int4": edgepeft_export(lora, os.path.join(out, "merged-int4"), merge=True, quantize="int4"),
        "slots fp32 standard": edgepeft_export(lora, os.path.join(out, "slots-standard"), ops="standard"),
        "slots int4 standard": edgepeft_export(lora, os.path.join(out, "slots-int4-standard"), quantize="int4",
                                               ops="standard"),
    }
    runtimes = {k: Runtime(v) for k, v in ours.items()}
    models = {k: og.Model(v) for k, v in genai_dirs.items()}
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, CONFIG["vocab_size"], size=(1, PROMPT_LEN), dtype=np.int64)
    long_prompt = rng.integers(3, CONFIG["vocab_size"], size=(1, args.prefill_tokens), dtype=np.int64)

    def genai_decode(model):
        params = og.GeneratorParams(model)
        length = PROMPT_LEN + args.new_tokens
        params.set_search_options(do_sample=False, max_length=length, min_length=length)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt.astype(np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        return list(generator.get_sequence(0))[PROMPT_LEN:]

    def genai_prefill(model):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=args.prefill_tokens + 1)
        og.Generator(model, params).append_tokens(long_prompt.astype(np.int32))

    def ours_decode(rt, adapter):
        return rt.generate(prompt, adapter=adapter, max_new_tokens=args.new_tokens, eos_token_id=[])[0, PROMPT_LEN:].tolist()

    def ours_prefill(rt, adapter):
        steps = rt.step_logits(long_prompt, adapter=adapter)
        next(steps)
        steps.close()

    decode = {  # label: (call, kind)
        "genai fp32": (lambda: genai_decode(models["fp32", False]), "fp32"),
        "genai fp32 + LoRA (baked)": (lambda: genai_decode(models["fp32", True]), "fp32 lora"),
        "genai int4": (lambda: genai_decode(models["int4", False]), "int4"),
        "genai int4 + LoRA (baked)": (lambda: genai_decode(models["int4", True]), "int4 lora"),
    }
    for name, rt in runtimes.items():
        precision = "int4" if "int4" in name else "fp32"
        if name.startswith("merged"):
            decode[f"edgepeft {name}"] = (lambda rt=rt: ours_decode(rt, None), f"{precision} lora")
            continue
        decode[f"edgepeft {name}, no adapter"] = (lambda rt=rt: ours_decode(rt, None), precision)
        decode[f"edgepeft {name}, LoRA (switchable)"] = (lambda rt=rt: ours_decode(rt, "lora"), f"{precision} lora")
    prefill = {
        "genai fp32": lambda: genai_prefill(models["fp32", False]),
        "genai int4": lambda: genai_prefill(models["int4", False]),
        "edgepeft slots fp32, no adapter": lambda: ours_prefill(runtimes["slots fp32"], None),
        "edgepeft slots int4, no adapter": lambda: ours_prefill(runtimes["slots int4"], None),
        "edgepeft slots fp32, LoRA": lambda: ours_prefill(runtimes["slots fp32"], "lora"),
        "edgepeft slots int4, LoRA": lambda: ours_prefill(runtimes["slots int4"], "lora"),
    }
    speed, ids = paired(decode, args.rounds, args.new_tokens)
    prefill_speed, _ = paired({k: (v, None) for k, v in prefill.items()}, args.rounds, args.prefill_tokens)
    report(args, out, speed, prefill_speed, ids, decode)


def report(args, out, speed, prefill_speed, ids, decode) -> None:
    import platform

    def ratio(a, b):
        return speed[a] / speed[b]

    same = {kind: len({tuple(ids[k]) for k, (_, kd) in decode.items() if kd == kind}) <= 1
            for kind in ("fp32", "fp32 lora")}
    lines = [f"Benchmark Llama 25.8M, batch 1, {PROMPT_LEN} prompt + {args.new_tokens} new greedy tokens, "
             f"{args.rounds} paired rounds, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
             f"onnxruntime-genai {og.__version__}; `{shlex.join([os.path.relpath(sys.executable), *sys.argv])}`", "",
             "| peer | tokens/s |", "| --- | --- |"]
    lines += [f"| {k} | {v:.0f} |" for k, v in speed.items()]
    targets = [
        ("int4, no adapter: edgepeft / genai (target >= 1.0)", ratio("edgepeft slots int4, no adapter", "genai int4")),
        ("fp32, no adapter: edgepeft / genai (target >= 1.1)", ratio("edgepeft slots fp32, no adapter", "genai fp32")),
        ("int4 + LoRA: edgepeft switchable / genai baked (target >= 1.2)",
         ratio("edgepeft slots int4, LoRA (switchable)", "genai int4 + LoRA (baked)")),
        ("fp32 + LoRA: edgepeft switchable / genai baked",
         ratio("edgepeft slots fp32, LoRA (switchable)", "genai fp32 + LoRA (baked)")),
        ("int4: switchable LoRA time / merged time (target <= 1.15)",
         ratio("edgepeft merged int4", "edgepeft slots int4, LoRA (switchable)")),
        ("fp32: switchable LoRA time / merged time (target <= 1.05)",
         ratio("edgepeft merged fp32", "edgepeft slots fp32, LoRA (switchable)")),
        ("contrib / standard ops, fp32 LoRA", ratio("edgepeft slots fp32, LoRA (switchable)",
                                                   "edgepeft slots fp32 standard, LoRA (switchable)")),
        ("contrib / standard ops, int4 LoRA", ratio("edgepeft slots int4, LoRA (switchable)",
                                                   "edgepeft slots int4 standard, LoRA (switchable)")),
    ]
    lines += ["", "| ratio (median tokens/s, this run) | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in targets]
    lines += ["", f"Prefill, a {args.prefill_tokens}-token prompt (prompt tokens/s):", "", "| peer | tokens/s |",
              "| --- | --- |"]
    lines += [f"| {k} | {v:.0f} |" for k, v in prefill_speed.items()]
    lines += ["", f"greedy ids identical across fp32 peers: no adapter {'yes' if same['fp32'] else 'no'}, "
                  f"LoRA {'yes' if same['fp32 lora'] else 'no'}"]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump({"decode_tokens_per_s": speed, "prefill_tokens_per_s": prefill_speed,
                   "ratios": dict(targets), "ids_identical": same}, f, indent=1)


if __name__ == "__main__":
    run(main)
