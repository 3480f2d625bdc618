"""Benchmark edgepeft text generation with a LoRA adapter against HF PEFT (CPU, batch 1).

What it does
  1. Builds a ~26M-parameter Llama from a config (hidden 512, 6 layers, 8 heads / 4 KV
     heads, MLP 1376, vocab 8192; seeded init) and saves it to OUT/base-model.
  2. Makes an HF PEFT LoRA adapter (r 16, alpha 32, all-linear) with lora_B drawn from
     N(0, 0.02) with a fixed seed, so it is not a no-op; saved to OUT/peft/lora. Two more
     on the same targets at r 1 and r 8 (OUT/peft/lora-r1, lora-r8) show how the cost of
     the LoRA work grows with the rank.
  3. Exports them: all three into one slots export (OUT/slots); the r 16 one also merged into
     the weights (OUT/merged), and quantized (OUT/slots-int8, OUT/merged-int8, OUT/slots-int4).
  4. Generates greedily from one prompt of 16 random ids, --new-tokens tokens, end of
     sequence disabled, so every call makes exactly that many tokens. Peers stay alive for
     the whole run and go once per round, in a new seeded random order each round (a
     fixed rotation would always run the same peer right after HF PEFT, whose torch
     threads and cache footprint slow whoever comes next); numbers are medians:
       slots_generate  Runtime(OUT/slots).generate(adapter="lora")      tokens/s
       slots_stream    Runtime(OUT/slots).stream(adapter="lora")        first token, end
       merged_stream   Runtime(OUT/merged).stream(adapter=None)         first token, end
       slots_base      Runtime(OUT/slots).stream(adapter=None): every slot unbound (rank 0),
                       so slots_stream / slots_base is the cost of the LoRA work alone
       slots_stream_r1, slots_stream_r8
                       Runtime(OUT/slots).stream(adapter="lora-r1" / "lora-r8")
       int8_slots_stream, int8_merged_stream, int4_slots_stream
                       the same on bases exported with --quantize int8 / int4
       hf_peft         PeftModel(LlamaForCausalLM).generate, torch.no_grad, default
                       threads; a streamer stamps the first new token
     Time to first token (TTFT) is prefill + one token pick; the decode cost per step is
     (end - TTFT) / (new_tokens - 1) per call. Generated ids are compared across peers.
  5. Decode steps in lockstep, for the ratios per decode step: each of --rounds rounds opens one stream
     per edgepeft peer (the stream peers above), takes each one's first token (untimed),
     then times every stream's next step in a new random order for every step. Peers
     compared this way are milliseconds apart, so the host's drift (a merged step took
     4-7 ms within one run here) cancels out of their ratios; medians over every step.
  6. Prints and writes a markdown table and raw numbers to OUT/bench.md and OUT/bench.json.

    python samples/bench_generate.py [--out bench-out/generate] [--rounds 10] [--new-tokens 64]
    python samples/bench_generate.py --rounds 2 --new-tokens 8      # smoke check
Timings are reported, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from edgepeft.exporters import export  # noqa: E402
from edgepeft.runtimes import Runtime, use_shared_thread_pool  # noqa: E402
from sample_folder import claim_folder, positive, run  # noqa: E402

CONFIG = dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
              intermediate_size=1376, vocab_size=8192, max_position_embeddings=512,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
PROMPT_LEN = 16


def check_new_tokens(ap, n: int) -> None:
    """--new-tokens within the positions the benchmark model leaves after its prompt, before minutes of exports (the
    refusal came after them, naming max_new_tokens and a prompt the command line cannot shorten)."""
    room = CONFIG["max_position_embeddings"] - PROMPT_LEN + 1  # the last new token is never fed back
    if n > room:
        ap.error(f"--new-tokens {n}: the benchmark model's {CONFIG['max_position_embeddings']} positions leave room for "
                 f"{room} after its {PROMPT_LEN}-token prompt; pass at most {room}")
RANK = 16  # the benchmark adapter's
LOWER_RANKS = (1, 8)  # adapters besides it, on the same slots export
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def build_base(path: str, seed: int = 0) -> int:
    """Save a seeded random Llama to ``path``; returns its parameter count."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def load_llama(path: str):
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def make_adapter(base: str, out: str, seed: int = 1, r: int = RANK, name: str = "lora", load=load_llama) -> str:
    """An r ``r`` all-linear LoRA on ``load(base)`` with random B (a real delta), saved to out/peft/<name>."""
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM")
    model = peft.get_peft_model(load(base), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.peft_config["default"].base_model_name_or_path = base
    path = os.path.join(out, "peft", name)
    model.save_pretrained(path)
    return path


class FirstToken(BaseStreamer):
    """Stamps the first new token: generate() puts the prompt first, then each new token."""

    def __init__(self, t0: float):
        self.t0, self.puts, self.first = t0, 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter() - self.t0

    def end(self):
        pass


def paired(peers: dict, rounds: int, tokens: int) -> tuple[dict, dict]:
    """Median tokens/s of each peer over ``rounds`` (after one dropped round), peers in a new order each round."""
    times = {k: [] for k in peers}
    ids = {}
    order = random.Random(0)
    for round_ in range(rounds + 1):
        for name in order.sample(list(peers), len(peers)):
            t = time.perf_counter()
            ids[name] = peers[name][0]()
            if round_:
                times[name].append(tokens / (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in times.items()}, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out/generate", help="work and export folder (default ./bench-out/generate)")
    ap.add_argument("--rounds", type=positive, default=10, help="interleaved rounds, one call per peer each (default 10)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per call (default 64)")
    ap.add_argument("--warmup", type=positive, default=2, help="untimed calls per peer first (default 2; at least 1: "
                    "they give the ids every timed call must repeat)")
    ap.add_argument("--shared-threads", action="store_true",
                    help="opt in to one process-wide spinning ONNX Runtime pool (edgepeft.runtimes.use_shared_thread_pool)")
    args = ap.parse_args()
    if args.shared_threads:
        use_shared_thread_pool()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (the decode cost needs a step after the first token)")
    check_new_tokens(ap, args.new_tokens)
    claim_folder(args.out, ap.get_default("out"))  # its exports are replaced, in a folder a sample made
    command = shlex.join([sys.executable, *sys.argv])
    print(f"command: {command}")
    t_start = time.perf_counter()
    out, n = args.out, args.new_tokens

    # 1-3. base, adapters, exports
    base = os.path.abspath(os.path.join(out, "base-model"))
    n_params = build_base(base)
    print(f"base model: {n_params / 1e6:.2f}M parameters in {base}")
    lora = make_adapter(base, out)
    lower = [make_adapter(base, out, seed=1 + r, r=r, name=f"lora-r{r}") for r in LOWER_RANKS]
    for stale in ("slots", "merged", "slots-int8", "merged-int8", "slots-int4"):  # always measure exports made by this code
        shutil.rmtree(os.path.join(out, stale), ignore_errors=True)
    t0 = time.perf_counter()
    rep = export([lora, *lower], os.path.join(out, "slots"))
    rep_merged = export([lora], os.path.join(out, "merged"), merge=True)
    reps_int8 = [export([lora], os.path.join(out, "slots-int8"), quantize="int8"),
                 export([lora], os.path.join(out, "merged-int8"), merge=True, quantize="int8"),
                 export([lora], os.path.join(out, "slots-int4"), quantize="int4")]
    export_s = time.perf_counter() - t0
    checks = {c["what"]: c.get("relative_error", c["max_abs_diff"])
              for r in (rep, rep_merged, *reps_int8) for c in r["checks"]}
    print(f"exported in {export_s:.1f}s; max |diff| vs PyTorch: {checks}")

    # 4. peers, all alive for the whole measurement
    rt, rt_merged = Runtime(os.path.join(out, "slots")), Runtime(os.path.join(out, "merged"))
    rt_int8, rt_merged_int8 = Runtime(os.path.join(out, "slots-int8")), Runtime(os.path.join(out, "merged-int8"))
    rt_int4 = Runtime(os.path.join(out, "slots-int4"))
    hf = peft.PeftModel.from_pretrained(load_llama(base), lora).eval()
    ids = np.random.default_rng(0).integers(3, CONFIG["vocab_size"], size=(1, PROMPT_LEN), dtype=np.int64)
    t_ids, t_mask = torch.from_numpy(ids), torch.ones(1, PROMPT_LEN, dtype=torch.long)
    hf_gen = transformers.GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None,
                                           pad_token_id=CONFIG["pad_token_id"], bos_token_id=CONFIG["bos_token_id"])

    def slots_generate():
        t = time.perf_counter()
        seq = rt.generate(ids, adapter="lora", max_new_tokens=n, eos_token_id=[])
        return {"end": time.perf_counter() - t, "ids": seq[0, PROMPT_LEN:].tolist()}

    def stream(runtime, adapter):
        t, first, toks = time.perf_counter(), None, []
        for tok in runtime.stream(ids, adapter=adapter, max_new_tokens=n, eos_token_id=[]):
            first = first if first is not None else time.perf_counter() - t
            toks.append(int(tok[0]))
        return {"end": time.perf_counter() - t, "first": first, "ids": toks}

    def hf_peft():
        t = time.perf_counter()
        streamer = FirstToken(t)
        with torch.no_grad():
            seq = hf.generate(input_ids=t_ids, attention_mask=t_mask, generation_config=hf_gen, streamer=streamer)
        return {"end": time.perf_counter() - t, "first": streamer.first, "ids": seq[0, PROMPT_LEN:].tolist()}

    peers = {
        "slots_generate": slots_generate,
        "slots_stream": lambda: stream(rt, "lora"),
        "merged_stream": lambda: stream(rt_merged, None),
        "slots_base": lambda: stream(rt, None),
        **{f"slots_stream_r{r}": (lambda r=r: stream(rt, f"lora-r{r}")) for r in LOWER_RANKS},
        "int8_slots_stream": lambda: stream(rt_int8, "lora"),
        "int8_merged_stream": lambda: stream(rt_merged_int8, None),
        "int4_slots_stream": lambda: stream(rt_int4, "lora"),
        "hf_peft": hf_peft,
    }
    tokens = {}
    for k, fn in peers.items():
        for _ in range(args.warmup):
            tokens[k] = fn()["ids"]
        if len(tokens[k]) != n:
            raise SystemExit(f"{k} made {len(tokens[k])} tokens, expected {n}: end of sequence was not disabled")
    runs = {k: [] for k in peers}
    order, shuffle = list(peers), random.Random(0)
    load_before = os.getloadavg()[0]
    for _round in range(args.rounds):
        for k in shuffle.sample(order, len(order)):  # no peer always follows the same one
            res = peers[k]()
            if res["ids"] != tokens[k]:
                raise SystemExit(f"{k}: greedy ids changed between calls")
            runs[k].append({key: v for key, v in res.items() if key != "ids"})

    # 5. decode steps in lockstep
    lock_peers = {"merged_stream": (rt_merged, None), "slots_stream": (rt, "lora"), "slots_base": (rt, None),
                  **{f"slots_stream_r{r}": (rt, f"lora-r{r}") for r in LOWER_RANKS},
                  "int8_slots_stream": (rt_int8, "lora"), "int8_merged_stream": (rt_merged_int8, None),
                  "int4_slots_stream": (rt_int4, "lora")}
    lock = {k: [] for k in lock_peers}
    for _round in range(args.rounds):
        streams = {k: runtime.stream(ids, adapter=a, max_new_tokens=n, eos_token_id=[]) for k, (runtime, a) in lock_peers.items()}
        made = {k: [int(next(s)[0])] for k, s in streams.items()}  # prefill and the first token: untimed
        for _step in range(n - 1):
            for k in shuffle.sample(list(streams), len(streams)):
                t = time.perf_counter()
                tok = next(streams[k])
                lock[k].append(time.perf_counter() - t)
                made[k].append(int(tok[0]))
        for k, s in streams.items():
            s.close()  # lets the stream release its adapter and cache now
            if made[k] != tokens[k]:
                raise SystemExit(f"{k}: greedy ids in lockstep differ from its calls'")
    lock_step = {k: statistics.median(v) for k, v in lock.items()}

    end = {k: statistics.median(x["end"] for x in v) for k, v in runs.items()}
    ttft = {k: statistics.median(x["first"] for x in v) for k, v in runs.items() if k != "slots_generate"}
    step = {k: statistics.median((x["end"] - x["first"]) / (n - 1) for x in runs[k]) for k in ttft}
    tps = {k: n / v for k, v in end.items()}
    speedup = tps["slots_generate"] / tps["hf_peft"]
    decode_ratio = lock_step["slots_stream"] / lock_step["merged_stream"]
    lora_ratio = lock_step["slots_stream"] / lock_step["slots_base"]
    ranks = {0: "slots_base", **{r: f"slots_stream_r{r}" for r in LOWER_RANKS}, RANK: "slots_stream"}
    pairs = {"slots vs HF PEFT": ("slots_generate", "hf_peft"), "slots generate vs stream": ("slots_generate", "slots_stream"),
             "merged vs slots": ("merged_stream", "slots_generate"),
             "int8 slots vs float32 slots": ("int8_slots_stream", "slots_generate"),
             "int4 slots vs float32 slots": ("int4_slots_stream", "slots_generate")}  # all made exactly n tokens
    first_diff = {k: next((i for i, (a, b) in enumerate(zip(tokens[p], tokens[q])) if a != b), None) for k, (p, q) in pairs.items()}
    same = {k: v is None for k, v in first_diff.items()}

    rows = [
        ("speedup: edgepeft slots generate / HF PEFT (tokens/s)", f"{speedup:.2f}x", ">= 3x"),
        ("speedup: edgepeft --quantize int8 slots stream / HF PEFT float32 (tokens/s)",
         f"{tps['int8_slots_stream'] / tps['hf_peft']:.2f}x", "info (int8 base weights)"),
        ("speedup: edgepeft --quantize int4 slots stream / HF PEFT float32 (tokens/s)",
         f"{tps['int4_slots_stream'] / tps['hf_peft']:.2f}x", "info (int4 base weights)"),
        ("decode step in lockstep: slots / merged", f"{decode_ratio:.3f}", "<= 1.10"),
        ("decode step in lockstep, int8: slots / merged",
         f"{lock_step['int8_slots_stream'] / lock_step['int8_merged_stream']:.3f}", "info"),
        ("decode step in lockstep: slots / same export with no adapter bound", f"{lora_ratio:.3f}", "info"),
        (f"decode step in lockstep / merged, by LoRA rank {' / '.join(map(str, ranks))} (0: no adapter bound)",
         " / ".join(f"{lock_step[k] / lock_step['merged_stream']:.3f}" for k in ranks.values()), "info"),
        ("decode step per call (end - first token): slots / merged", f"{step['slots_stream'] / step['merged_stream']:.3f}", "info"),
        *[(f"tokens/s {k}", f"{v:.1f}", "") for k, v in tps.items()],
        *[(f"time to first token {k} (ms)", f"{v * 1e3:.2f}", "") for k, v in ttft.items()],
        *[(f"decode per step {k} (ms), per call", f"{v * 1e3:.3f}", "") for k, v in step.items()],
        *[(f"decode per step {k} (ms), in lockstep", f"{v * 1e3:.3f}", "") for k, v in lock_step.items()],
        *[(f"greedy ids identical: {k}", "yes" if v else f"no (first differs at token {first_diff[k]})",
           "yes" if k in ("slots vs HF PEFT", "slots generate vs stream") else "info") for k, v in same.items()],
    ]
    total_s = time.perf_counter() - t_start
    rows.append(("total run time (s)", f"{total_s:.1f}", ""))  # everything above: build, export, warm-up, rounds
    table = "\n".join(["| metric | value | target |", "| --- | --- | --- |"] + [f"| {a} | {b} | {c} |" for a, b, c in rows])
    setup = (f"Llama {n_params / 1e6:.2f}M parameters (seeded random, {CONFIG['num_hidden_layers']} layers, hidden "
             f"{CONFIG['hidden_size']}, {CONFIG['num_attention_heads']}/{CONFIG['num_key_value_heads']} heads, vocab "
             f"{CONFIG['vocab_size']}), LoRA r {RANK} all-linear ({len(rt.slots)} slots; r "
             f"{' and r '.join(map(str, LOWER_RANKS))} adapters on the same targets), CPU, batch 1, prompt {PROMPT_LEN} "
             f"ids, {n} new tokens greedy, no eos; {args.rounds} rounds x 1 call per peer after {args.warmup} warm-up "
             f"calls, then {args.rounds} lockstep rounds x {n - 1} steps per stream peer; onnxruntime {rt.session.get_providers()[0]} "
             f"({'one shared spinning thread pool' if args.shared_threads else 'per-session pools spinning only during a call'}), torch "
             f"{torch.__version__} with {torch.get_num_threads()} threads, transformers {transformers.__version__}, "
             f"peft {peft.__version__}, {os.cpu_count()} CPUs, load average {load_before:.2f} before / "
             f"{os.getloadavg()[0]:.2f} after")
    print(f"\n{setup}\n\n{table}\n")
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write(f"# edgepeft generation benchmark\n\n`{command}`\n\n{setup}\n\n{table}\n")
    raw = {"command": command, "setup": setup, "args": vars(args), "parameters": n_params,
           "tokens_per_s": tps, "median_end_s": end, "median_ttft_s": ttft, "median_decode_step_per_call_s": step,
           "ratios": {"speedup_vs_hf_peft": speedup, "decode_step_lockstep_slots_over_merged": decode_ratio,
                      "decode_step_lockstep_slots_over_slots_base": lora_ratio,
                      "decode_step_lockstep_int8_slots_over_merged": lock_step["int8_slots_stream"] / lock_step["int8_merged_stream"],
                      "decode_step_lockstep_over_merged_by_rank": {r: lock_step[k] / lock_step["merged_stream"] for r, k in ranks.items()},
                      "decode_step_per_call_slots_over_merged": step["slots_stream"] / step["merged_stream"]},
           "median_lockstep_decode_step_s": lock_step, "lockstep_step_s": lock,
           "ids_identical": same, "first_difference": first_diff, "ids": tokens, "prompt": ids[0].tolist(),
           "export_s": export_s, "max_abs_diff": checks, "total_s": total_s, "per_call_s": runs, "table": table}
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(raw, f, indent=1)
    print(f"wrote {os.path.join(out, 'bench.md')} and bench.json")


if __name__ == "__main__":
    run(main)
