"""Benchmark edgepeft LoRA on the real MiniLM-L6 weights (CPU, batch 1, 32 tokens).

What it does
  1. Builds two HF PEFT LoRA adapters on MiniLM-L6 (BertModel, feature extraction):
     a1 = r 8 on query/value, a2 = r 16 on query/key/value/dense. lora_B is drawn
     from N(0, 0.02) with a fixed seed so neither adapter is a no-op. Saved to OUT/peft/.
  2. Exports both into OUT (one slot base + OUT/adapters/{a1,a2}) and a1 merged into
     the weights into OUT/merged (a plain graph, no slots).
  3. Times single forward calls. All peers stay alive for the whole run (the app case;
     edgepeft sessions spin only during a call, so they do not starve each other) and are run
     round by round, in a new seeded random order each round, so drift (thermal, other
     load) and the peer that ran just before hit all alike:
       slots_a1   Runtime(OUT).forward(adapter="a1")
       slots_a2   Runtime(OUT).forward(adapter="a2")
       alternate  Runtime(OUT).forward(adapter=a1, a2, a1, ...) (switch every call)
       merged     Runtime(OUT/merged).forward()          (a1 folded into the weights)
       merged_again  a second Runtime(OUT/merged): the same graph in another session, so
                  merged_again / merged is this run's floor (two sessions of one graph
                  differ by a few percent, probably where their weights sit in memory)
       int8_a1, int4_a1  a1's slots on a base exported with --quantize int8 / int4
       hf_eager   peft.PeftModel(BertModel) + a1, torch.no_grad, default threads
       all_kinds_none  a base with LoRA (a1), IA3, bottleneck, prefix and prompt slots (OUT/all-kinds), no adapter
       only_KIND_none  a base with one kind's slots (OUT/KIND-only; LoRA's is OUT/a1-only), no adapter:
                  each kind's share of what unused slots cost
       all_kinds_KIND, switch_lora_KIND  an adapter of each kind on OUT/all-kinds, every call or
                  alternating with the LoRA adapter (the switch cost per method)
     Latency is the median of all per-call times of a peer. The switch ratio compares
     the alternating calls with staying on the same adapter, per adapter (a2 is
     bigger than a1, so "alternate vs a1 only" would charge a2's extra work to the
     switch): (alt_a1 + alt_a2) / (stay_a1 + stay_a2) over medians.
  4. Reports disk sizes, the median time of load_adapter (staging an adapter's
     OrtValues; a switch itself only changes which OrtValues are bound), and writes
     a markdown table plus raw numbers to OUT/bench.md and OUT/bench.json.

    python samples/bench_lora.py [--out bench-out] [--rounds 100] [--calls 6]
    python samples/bench_lora.py --rounds 5 --calls 5      # smoke check
Timings are reported, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
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

import edgepeft  # noqa: E402
from edgepeft.exporters import export  # noqa: E402
from edgepeft.runtimes import Runtime, use_shared_thread_pool  # noqa: E402
from edgepeft.runtimes.bench import alternating, interleaved  # noqa: E402
from sample_folder import claim_folder, positive, run  # noqa: E402

MINILM = edgepeft.minilm_path()
ADAPTERS = {
    "a1": dict(r=8, lora_alpha=16, target_modules=["query", "value"]),
    "a2": dict(r=16, lora_alpha=32, target_modules=["query", "key", "value", "dense"]),
}


def load_bert():
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers.BertModel.from_pretrained(MINILM, dtype=torch.float32).eval()


def make_adapter(name: str, out: str, seed: int) -> tuple[str, int]:
    """Save an HF PEFT LoRA dir with random lora_B; returns (dir, LoRA parameter bytes)."""
    model = peft.get_peft_model(load_bert(), peft.LoraConfig(task_type="FEATURE_EXTRACTION", **ADAPTERS[name]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.peft_config["default"].base_model_name_or_path = MINILM
    path = os.path.join(out, "peft", name)
    model.save_pretrained(path)
    return path, sum(p.nbytes for k, p in model.named_parameters() if "lora_" in k)


OTHER_KINDS = ["ia3", "bottleneck", "prefix", "prompt"]
VIRTUAL_TOKENS = 16  # the prefix and prompt adapters': they take positions beside --seq


def make_other_kinds(out: str) -> list[str]:
    """IA3 (HF PEFT), bottleneck, prefix and prompt (edgepeft) adapters on MiniLM, for the all-kinds base."""
    import edgepeft

    task = "FEATURE_EXTRACTION"
    models = {
        "ia3": peft.get_peft_model(load_bert(), peft.IA3Config(task_type=task)),
        "bottleneck": edgepeft.get_peft_model(load_bert(), edgepeft.BottleneckConfig(bottleneck_size=32, task_type=task)),
        "prefix": edgepeft.get_peft_model(load_bert(), edgepeft.PrefixTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS, task_type=task)),
        "prompt": edgepeft.get_peft_model(load_bert(), edgepeft.PromptTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS, task_type=task)),
    }
    g = torch.Generator().manual_seed(7)
    paths = []
    for name, model in models.items():
        with torch.no_grad():
            for key, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        model.peft_config["default"].base_model_name_or_path = MINILM
        paths.append(os.path.join(out, "peft", name))
        model.save_pretrained(paths[-1])
    return paths


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out", help="work and export folder (default ./bench-out)")
    ap.add_argument("--rounds", type=positive, default=100, help="interleaved rounds (default 100)")
    ap.add_argument("--calls", type=positive, default=6, help="timed calls per peer per round (default 6; fewer calls"
                    " in more rounds keep the host's drift out of the ratios)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed calls per peer first (default 10)")
    ap.add_argument("--seq", type=positive, default=32, help="tokens per call (default 32)")
    ap.add_argument("--shared-threads", action="store_true",
                    help="opt in to one process-wide spinning ONNX Runtime pool (edgepeft.runtimes.use_shared_thread_pool)")
    args = ap.parse_args()
    room = transformers.AutoConfig.from_pretrained(MINILM).max_position_embeddings - VIRTUAL_TOKENS
    if args.seq > room:  # torch's traceback after minutes of exports
        ap.error(f"--seq {args.seq}: MiniLM has room for {room} tokens beside the prompt adapter's {VIRTUAL_TOKENS}")
    if args.warmup < 0:
        ap.error(f"--warmup {args.warmup}: give 0 or more untimed calls")
    if args.rounds * args.calls < 2:  # the alternating peers take turns between two adapters, call by call
        ap.error("--rounds x --calls must be at least 2: a switching peer's calls alternate two adapters")
    claim_folder(args.out, ap.get_default("out"))  # its exports are replaced, in a folder a sample made
    if args.shared_threads:
        use_shared_thread_pool()
    command = shlex.join([sys.executable, *sys.argv])
    print(f"command: {command}")
    t_start = time.perf_counter()
    out, merged_out = args.out, os.path.join(args.out, "merged")

    # 1-2. adapters (HF PEFT) and the two exports
    sources = {name: make_adapter(name, out, seed=i) for i, name in enumerate(ADAPTERS)}
    stale_dirs = ("base", "adapters", "merged", "a1-only", "all-kinds", "int8", "int4", *(f"{kind}-only" for kind in OTHER_KINDS))
    for stale in stale_dirs:  # always measure exports made by this code
        shutil.rmtree(os.path.join(out, stale), ignore_errors=True)
    t0 = time.perf_counter()
    rep = export([sources["a1"][0], sources["a2"][0]], out)
    rep_merged = export([sources["a1"][0]], merged_out, merge=True)
    export([sources["a1"][0]], os.path.join(out, "a1-only"))  # a base with just a1's 12 slot modules
    export([sources["a1"][0]], os.path.join(out, "int8"), quantize="int8")  # a1's slots on an int8 base
    export([sources["a1"][0]], os.path.join(out, "int4"), quantize="int4")  # and on an int4 base
    # a base with slots of every kind: LoRA (a1), IA3, bottleneck, prefix, prompt
    kinds = make_other_kinds(out)
    export([sources["a1"][0], *kinds], os.path.join(out, "all-kinds"), names=["lora", *OTHER_KINDS])
    for kind, path in zip(OTHER_KINDS, kinds):  # and a base with one kind's slots, per kind (a1-only is LoRA's)
        export([path], os.path.join(out, f"{kind}-only"), names=[kind])
    export_s = time.perf_counter() - t0
    checks = {c["what"]: c["max_abs_diff"] for c in rep["checks"] + rep_merged["checks"]}
    print(f"exported in {export_s:.1f}s; max |diff| vs PyTorch: {checks}")

    # 3. peers, all alive for the whole measurement
    rt, rt_merged, rt_a1 = Runtime(out), Runtime(merged_out), Runtime(os.path.join(out, "a1-only"))
    rt_merged_again = Runtime(merged_out)
    rt_kinds = Runtime(os.path.join(out, "all-kinds"))
    rt_only = {"lora": rt_a1, **{kind: Runtime(os.path.join(out, f"{kind}-only")) for kind in OTHER_KINDS}}
    rt_int8, rt_int4 = Runtime(os.path.join(out, "int8")), Runtime(os.path.join(out, "int4"))
    hf = peft.PeftModel.from_pretrained(load_bert(), sources["a1"][0]).eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, rt.vocab_size, size=(1, args.seq), dtype=np.int64)  # skip [PAD]/[unused]/special ids
    mask = np.ones_like(ids)
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    ref = hf(input_ids=t_ids, attention_mask=t_mask).last_hidden_state.detach().numpy()
    checks["hf_eager vs slots_a1 (bench input)"] = float(np.abs(rt.forward(ids, mask, adapter="a1")["last_hidden_state"] - ref).max())

    def hf_call():
        with torch.no_grad():
            hf(input_ids=t_ids, attention_mask=t_mask)

    peers = {
        "slots_a1": lambda: rt.forward(ids, mask, adapter="a1"),
        "slots_a2": lambda: rt.forward(ids, mask, adapter="a2"),
        "alternate": alternating(rt, ids, mask, ["a1", "a2"]),
        "merged": lambda: rt_merged.forward(ids, mask),
        "merged_again": lambda: rt_merged_again.forward(ids, mask),
        "a1_only_base": lambda: rt_a1.forward(ids, mask, adapter="a1"),
        "int8_a1": lambda: rt_int8.forward(ids, mask, adapter="a1"),
        "int4_a1": lambda: rt_int4.forward(ids, mask, adapter="a1"),
        "all_kinds_none": lambda: rt_kinds.forward(ids, mask),
        **{f"only_{kind}_none": (lambda r=r: r.forward(ids, mask)) for kind, r in rt_only.items()},
        "all_kinds_lora": lambda: rt_kinds.forward(ids, mask, adapter="lora"),
        **{f"all_kinds_{kind}": (lambda kind=kind: rt_kinds.forward(ids, mask, adapter=kind)) for kind in OTHER_KINDS},
        **{f"switch_lora_{kind}": alternating(rt_kinds, ids, mask, ["lora", kind]) for kind in OTHER_KINDS},
        "hf_eager": hf_call,
    }
    load_before = os.getloadavg()[0]
    runs = interleaved(peers, args.rounds, args.calls, warmup=args.warmup)  # no peer always follows the same one
    times = {k: [dt for dt, _ in v] for k, v in runs.items()}
    for k in ["alternate", *(f"switch_lora_{kind}" for kind in OTHER_KINDS)]:  # the alternating calls, per adapter
        for dt, ran in runs[k]:
            times.setdefault(f"{k}_{ran}", []).append(dt)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}  # ms

    # 3e. staging cost of an adapter (for info); the switch itself is a different binding
    a2_dir = os.path.join(out, "adapters", "a2")
    load_ms = []
    for _ in range(10):
        load_ms.append(timed(lambda: rt.load_adapter(a2_dir, name="staged")) * 1e3)
        rt.unload_adapter("staged")

    # 3d. disk
    disk = {
        "base": dir_bytes(os.path.join(out, "base")),
        **{f"adapter_{n}": dir_bytes(os.path.join(out, "adapters", n)) for n in ADAPTERS},
        **{f"params_{n}": int(b) for n, (_, b) in sources.items()},
        "merged_a1": dir_bytes(os.path.join(merged_out, "base")),
    }

    ratio_merge = med["slots_a1"] / med["merged"]
    ratio_switch = (med["alternate_a1"] + med["alternate_a2"]) / (med["slots_a1"] + med["slots_a2"])
    speedup = med["hf_eager"] / med["slots_a1"]
    mb, kb = 1 / 2**20, 1 / 2**10
    rows = [
        ("unmerged a1 (shared base, a1+a2 slots) / merged a1", f"{ratio_merge:.3f}", "<= 1.10"),
        ("unmerged a1 (base with a1's slots only) / merged a1", f"{med['a1_only_base'] / med['merged']:.3f}", "<= 1.10"),
        ("switching every call / staying (a1+a2)", f"{ratio_switch:.3f}", "<= 1.03"),
        ("plain graph (merged a1), a second session / the first: this run's floor", f"{med['merged_again'] / med['merged']:.3f}",
         "info (1 up to noise)"),
        ("base with LoRA+IA3+bottleneck+prefix+prompt slots, no adapter / plain graph (merged a1)",
         f"{med['all_kinds_none'] / med['merged']:.3f}", "<= 1.05 (issue 4)"),
        ("the same / the plain graph's second session", f"{med['all_kinds_none'] / med['merged_again']:.3f}", "info"),
        *[(f"base with {kind} slots only, no adapter / plain graph", f"{med[f'only_{kind}_none'] / med['merged']:.3f}",
           "info (issue 4: each kind's share)") for kind in rt_only],
        *[(f"all-kinds base: {kind} adapter when every call alternates lora/{kind} / {kind} every call",
           f"{med[f'switch_lora_{kind}_{kind}'] / med[f'all_kinds_{kind}']:.3f}", "switch cost (issue 4)")
          for kind in OTHER_KINDS],
        ("speedup vs HF PEFT eager PyTorch (a1)", f"{speedup:.2f}x", ">= 2.2x"),
        ("speedup vs HF PEFT eager PyTorch (a1), edgepeft with --quantize int8", f"{med['hf_eager'] / med['int8_a1']:.2f}x",
         "info (int8 base weights)"),
        ("speedup vs HF PEFT eager PyTorch (a1), edgepeft with --quantize int4", f"{med['hf_eager'] / med['int4_a1']:.2f}x",
         "info (int4 base weights)"),
        *[(f"median latency {k} (ms)", f"{v:.3f}", "") for k, v in med.items()],
        ("load_adapter a2, median of 10 (ms)", f"{statistics.median(load_ms):.2f}", "info"),
        ("disk OUT/base (MiB)", f"{disk['base'] * mb:.2f}", ""),
        *[(f"disk OUT/adapters/{n} (KiB) / LoRA params (KiB)",
           f"{disk[f'adapter_{n}'] * kb:.1f} / {disk[f'params_{n}'] * kb:.1f}", "") for n in ADAPTERS],
        ("disk merged a1 export (MiB)", f"{disk['merged_a1'] * mb:.2f}", ""),
    ]
    total_s = time.perf_counter() - t_start
    rows.append(("total run time (s)", f"{total_s:.1f}", ""))
    table = "\n".join(["| metric | value | target |", "| --- | --- | --- |"] + [f"| {a} | {b} | {c} |" for a, b, c in rows])
    setup = (f"MiniLM-L6 ({MINILM}), CPU, batch 1, {args.seq} tokens, {args.rounds} rounds x {args.calls} calls "
             f"per peer after {args.warmup} warm-up calls; {len(rt.slots)} LoRA slots in OUT/base; onnxruntime {rt.session.get_providers()[0]} "
             f"({'one shared spinning thread pool' if args.shared_threads else 'per-session pools spinning only during a call'}), "
             f"torch {torch.__version__} with {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
             f"load average {load_before:.2f} before / {os.getloadavg()[0]:.2f} after (other processes skew hf_eager most)")
    print(f"\n{setup}\n\n{table}\n")
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write(f"# edgepeft LoRA benchmark\n\n`{command}`\n\n{setup}\n\n{table}\n")
    raw = {"command": command, "setup": setup, "args": vars(args), "median_ms": med, "ratios": {
        "unmerged_over_merged": ratio_merge, "a1_only_base_over_merged": med["a1_only_base"] / med["merged"], "switch_over_stay": ratio_switch,
        "switch_over_stay_a1": med["alternate_a1"] / med["slots_a1"],
        "switch_over_stay_a2": med["alternate_a2"] / med["slots_a2"], "speedup_vs_hf_eager": speedup,
        "merged_again_over_merged": med["merged_again"] / med["merged"],
        "all_kinds_none_over_merged": med["all_kinds_none"] / med["merged"],
        "all_kinds_none_over_merged_again": med["all_kinds_none"] / med["merged_again"]},
        "disk_bytes": disk, "load_adapter_ms": load_ms, "export_s": export_s, "max_abs_diff": checks,
        "total_s": total_s, "per_call_s": times, "table": table}
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(raw, f, indent=1)
    print(f"wrote {os.path.join(out, 'bench.md')} and bench.json")


if __name__ == "__main__":
    run(main)
