"""Two float32 LoRA layouts edgepeft did not adopt, measured inside a real decode step of an exported slot graph.

``bench_lora_kernels.py`` times the LoRA work of a step on its own; there the adapter
tensors stay in the caches. This edits an export's base graph into each layout and times
whole decode steps (batch 1, 16 positions in the cache, one adapter), so the base weights
pass through the caches between the LoRA products as they do in generation:

    edgepeft              ((x @ A_group) * rows) @ B_group: a fused group's B is block diagonal
    B per member          the rank columns split per member, one B product each, concatenated (no zeros)
    no row Mul            the row-weight Mul dropped (a graph that could serve one adapter per call only)
    B per member, no row Mul
    no adapter            the slot graph with every slot at rank 0, for the LoRA work's own cost

Each peer binds its inputs once, as generation does: the slot tensors, the step's token,
mask and position, the logits buffer, and on GroupQueryAttention graphs one cache buffer
per layer input bound as past and present (``runtimes/kv_cache.py``). Peers take turns in
blocks of calls in a new seeded order each round; each block's first calls are dropped.
Every layout's logits are compared with edgepeft's.

    python samples/bench_generate.py --rounds 2 --new-tokens 8     # makes bench-out/generate/slots-int4
    python samples/bench_lora_layouts.py [--export bench-out/generate/slots-int4] [--adapter lora] [--rounds 30]
                                         [--out bench-out/lora-layouts/<the export's folder name>]
Timings are reported, never asserted.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgepeft.runtimes.adapter_graph import run_adapter_graph
from edgepeft.runtimes.bench import interleaved
from edgepeft.runtimes.kv_cache import RESERVE
from edgepeft.runtimes.manifest import LOGITS_TO_KEEP, adapter_dirs, cache_names
from edgepeft.runtimes.sessions import session_options
from sample_folder import claim_folder, positive, run

LAYOUTS = {"edgepeft": (False, False), "B per member": (True, False), "no row Mul": (False, True),
           "B per member, no row Mul": (True, True)}
CALLS, DROPPED, PROMPT = 24, 6, 16
KEEP_LAST = {LOGITS_TO_KEEP: np.array(1, np.int64)}


def member_blocks(b: np.ndarray) -> list[tuple[slice, slice]]:
    """(rank rows, output columns) of each member in a block-diagonal B, read off its nonzeros."""
    rows = np.abs(b) > 0
    spans = [(int(np.argmax(r)), len(r) - int(np.argmax(r[::-1]))) if r.any() else None for r in rows]
    blocks, start = [], 0
    for i in range(1, len(spans) + 1):
        if i == len(spans) or spans[i] != spans[start]:
            if spans[start] is None:
                raise SystemExit("a rank row of B is all zeros: use an adapter with trained (non-zero) B")
            blocks.append((slice(start, i), slice(*spans[start])))
            start = i
    if blocks[0][1].start != 0 or blocks[-1][1].stop != b.shape[1] or any(
            a[1].stop != n[1].start for a, n in zip(blocks, blocks[1:])):
        raise SystemExit("B per member needs every member of a fused group targeted (an all-linear adapter)")
    return blocks


def edit(model: onnx.ModelProto, slots: dict, rows_name: str, per_member: bool, no_rows: bool):
    """A copy of the base graph in one layout: (model, {extra input: array}, slot inputs it no longer reads)."""
    m = copy.deepcopy(model)
    g, feeds, replaced, nodes, renamed = m.graph, {}, set(), [], {}
    for n in g.node:
        if no_rows and n.op_type == "Mul" and rows_name in n.input:
            renamed[n.output[0]] = next(i for i in n.input if i != rows_name)
            continue
        nodes.append(n)
    for n in nodes:
        n.input[:] = [renamed.get(i, i) for i in n.input]
    out = []
    for n in nodes:
        b_name = next((i for i in n.input if i in slots and i.startswith("lora_B.") and "+" in i), None)
        if not (per_member and n.op_type == "MatMul" and b_name):
            out.append(n)
            continue
        replaced.add(b_name)
        blocks = member_blocks(slots[b_name])
        parts = [f"{b_name}.u{i}" for i in range(len(blocks))]
        ranks = np.array([r.stop - r.start for r, _ in blocks], np.int64)
        g.initializer.append(numpy_helper.from_array(ranks, f"{b_name}.ranks"))
        out.append(helper.make_node("Split", [n.input[0], f"{b_name}.ranks"], parts, axis=-1))
        for i, (r, c) in enumerate(blocks):
            b = feeds[f"{b_name}.{i}"] = np.ascontiguousarray(slots[b_name][r, c])
            g.input.append(helper.make_tensor_value_info(f"{b_name}.{i}", TensorProto.FLOAT, b.shape))
            out.append(helper.make_node("MatMul", [parts[i], f"{b_name}.{i}"], [f"{b_name}.d{i}"]))
        out.append(helper.make_node("Concat", [f"{b_name}.d{i}" for i in range(len(blocks))], list(n.output), axis=-1))
    del g.node[:]
    g.node.extend(out)
    return m, feeds, replaced


def decode_step(session, manifest: dict, slots: dict) -> tuple[dict, dict]:
    """A decode step after a PROMPT-token prefill with the adapter: its token, mask and position inputs, and the
    prefill's presents by cache input name."""
    c = manifest["cache"]
    ids = np.random.default_rng(0).integers(3, manifest["vocab_size"], size=(1, PROMPT), dtype=np.int64)
    empty = np.zeros((1, c["num_kv_heads"], 0, c["head_dim"]), np.float32)
    first = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                               "position_ids": np.arange(PROMPT)[None], **KEEP_LAST,
                               **{n: empty for n in cache_names(c, "past")}, **slots})
    outputs = [o.name for o in session.get_outputs()]
    past = {p: first[outputs.index(n)] for p, n in zip(cache_names(c, "past"), cache_names(c, "present"))}
    return {"input_ids": first[0][:, -1:].argmax(-1), "attention_mask": np.ones((1, PROMPT + 1), np.int64),
            "position_ids": np.array([[PROMPT]]), **KEEP_LAST}, past


def bound_step(session, manifest: dict, inputs: dict, past: dict):
    """A call running the step with everything bound once; and one reading the logits it wrote."""
    c, binding = manifest["cache"], session.io_binding()
    for name, array in inputs.items():  # np.array, not np.ascontiguousarray: a 0-d array stays 0-d
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.array(array, order="C")))
    logits = ort.OrtValue.ortvalue_from_shape_and_type((1, 1, manifest["vocab_size"]), np.float32)
    binding.bind_ortvalue_output("logits", logits)
    for name, present in zip(cache_names(c, "past"), cache_names(c, "present")):
        if manifest.get("ops") == "contrib":  # past_present_share_buffer: the step writes its position in place
            buffer = np.zeros((*past[name].shape[:2], PROMPT + RESERVE, past[name].shape[3]), np.float32)
            buffer[:, :, :PROMPT] = past[name]
            value = ort.OrtValue.ortvalue_from_numpy(buffer)
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(present, value)
        else:
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(past[name]))
            binding.bind_output(present)
    return (lambda: session.run_with_iobinding(binding)), (lambda: logits.numpy().copy())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", default="bench-out/generate/slots-int4", help="a causal-lm export (%(default)s)")
    ap.add_argument("--adapter", default="lora", help="the adapter under OUT/adapters to bind (%(default)s)")
    ap.add_argument("--rounds", type=positive, default=30, help=f"rounds of {CALLS} calls per peer (%(default)s)")
    ap.add_argument("--out", help="where bench.md goes (bench-out/lora-layouts/<the export's folder name>)")
    args = ap.parse_args()
    out = args.out or os.path.join("bench-out", "lora-layouts", os.path.basename(os.path.normpath(args.export)))
    claim_folder(out, out if args.out is None else "bench-out/lora-layouts")  # one's own bench.md is refused
    command = shlex.join([sys.executable, *sys.argv])
    print(f"command: {command}")
    manifest_path = os.path.join(args.export, "base", "edgepeft.json")
    if not os.path.isfile(manifest_path):
        sys.exit(f"error: {manifest_path}: missing; give --export an edgepeft export of a decoder (`make bench` writes it)")
    with open(manifest_path) as f:
        manifest = json.load(f)
    if manifest.get("task") != "causal-lm":
        sys.exit(f"error: {args.export}: a {manifest.get('task')} export; give a causal-lm export (a decoder's step)")
    if LOGITS_TO_KEEP not in manifest["inputs"]:
        sys.exit(f"error: {args.export}: this export has no {LOGITS_TO_KEEP} input; re-export it")
    graph = os.path.join(args.export, "adapters", args.adapter, "adapter.onnx")
    if not os.path.isfile(graph):
        held = sorted(adapter_dirs(args.export))
        sys.exit(f"error: {graph}: missing; give --adapter one of {', '.join(held) or 'none (export one first)'}")
    with open(graph, "rb") as f:
        slots = run_adapter_graph(f.read(), f.name)
    rows_name = next((s["selector"] for s in manifest["slots"] if s["method"] == "lora"), None)
    if rows_name is None:  # an IA3-only export: a StopIteration traceback
        sys.exit(f"error: {args.export}: this export has no LoRA slots (its adapters use no LoRA); give an export of "
                 "a LoRA adapter")
    base = onnx.load(os.path.join(args.export, "base", manifest["graph"]))
    so = session_options()
    so.log_severity_level = 3  # not a warning per slot input that has a default (rank 0) value
    peers, read, nodes = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (per_member, no_rows)) in enumerate(LAYOUTS.items()):
            model, extra, replaced = edit(base, slots, rows_name, per_member, no_rows)
            nodes[name] = len(model.graph.node)
            onnx.save(model, os.path.join(tmp, f"{i}.onnx"), save_as_external_data=True, location=f"{i}.data")
            session = ort.InferenceSession(os.path.join(tmp, f"{i}.onnx"), so, providers=["CPUExecutionProvider"])
            if name == "edgepeft":
                step, past = decode_step(session, manifest, slots)
                peers["no adapter"], read["no adapter"] = bound_step(session, manifest, step, past)
                nodes["no adapter"] = nodes[name]
            inputs = {**step, **{k: v for k, v in slots.items() if k not in replaced}, **extra}
            peers[name], read[name] = bound_step(session, manifest, inputs, past)
        times = interleaved(peers, args.rounds, CALLS)
        for run in peers.values():
            run()
        diffs = {k: float(np.abs(r() - read["edgepeft"]()).max()) for k, r in read.items()}
    med = {k: statistics.median(dt for i, (dt, _) in enumerate(v) if i % CALLS >= DROPPED) * 1e3
           for k, v in times.items()}
    rank0 = med["no adapter"]
    lines = [f"command: {command}", "",
             f"{args.export} + {args.adapter} ({len(slots)} slots), CPU ({platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores), onnxruntime {ort.__version__}, one decode step at past length {PROMPT}, "
             f"median of {args.rounds} x {CALLS - DROPPED} calls per peer", "",
             "| layout | ms per step | LoRA work (ms) | step / edgepeft's | max abs logit diff | nodes |",
             "| --- | --- | --- | --- | --- | --- |"]
    for k in [*LAYOUTS, "no adapter"]:
        work = f"{med[k] - rank0:.3f}" if k != "no adapter" else ""
        lines.append(f"| {k} | {med[k]:.3f} | {work} | {med[k] / med['edgepeft']:.3f} | {diffs[k]:.2e} | {nodes[k]} |")
    lines += ["", f"LoRA work in edgepeft's layout: {med['edgepeft'] - rank0:.3f} ms, "
                  f"{(med['edgepeft'] - rank0) / rank0:.0%} of the rank-0 step"]
    print("\n".join(lines[1:]))
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"\nwrote {os.path.join(out, 'bench.md')}")


if __name__ == "__main__":
    run(main)
