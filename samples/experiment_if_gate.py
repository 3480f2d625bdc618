"""Experiment (issue 4): the whole slotted graph behind one ONNX ``If``, so a call with no adapter runs a plain graph.

Unbound slots of every kind cost 11-19% of a MiniLM call (issue 4 asks for <= 5%);
gating each slot with an ``If`` costs about as much as the ops it skips. This builds
the other extreme and measures what it would cost:

    gated.onnx        If(use_slots): then = the slotted graph, else = the plain graph;
                      their weights are outer-scope initializers, shared by content
    gated_plain.onnx  the plain graph in both branches: the cost of the If alone

Both branches are first put through ONNX Runtime's basic (portable) optimizations,
which it would not otherwise apply inside an ``If`` (its duplicate-node elimination
does not enter subgraphs). Then single calls are timed (medians, peers in a new seeded
random order each round) and each graph's session memory is read in a process of its
own. Not part of edgepeft: no export writes gated graphs (see README, Measured).

    python samples/bench_lora.py --rounds 2 --calls 2      # makes bench-out/all-kinds and bench-out/merged
    python samples/experiment_if_gate.py [--slots bench-out/all-kinds] [--plain bench-out/merged] [--rounds 20]
Timings are reported, never asserted.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import statistics
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from edgepeft.runtimes.bench import interleaved, rss_bytes
from edgepeft.runtimes.manifest import read_base_manifest
from edgepeft.runtimes.sessions import session_options

FLAG = "use_slots"


def basic_optimized(src: str, dst: str) -> str:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = dst
    so.log_severity_level = 3
    ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return dst


def branch(model, prefix: str, shared: dict, outer: set) -> onnx.GraphProto:
    """``model``'s nodes as an If branch: names prefixed, weights (>= 4 KiB) moved to ``shared`` by content."""
    renamed, local = {}, []
    for t in model.graph.initializer:
        if t.name in outer:  # a slot's neutral default stays with its graph input
            continue
        if len(t.raw_data) < 4096:  # small constants stay in the branch, where ONNX Runtime folds them
            local.append(t)
            continue
        key = hashlib.sha256(t.raw_data).hexdigest() + str(list(t.dims)) + str(t.data_type)
        if key not in shared:
            shared[key] = onnx.TensorProto()
            shared[key].CopyFrom(t)
            shared[key].name = f"weight.{len(shared)}"
        renamed[t.name] = shared[key].name
    local_names = {t.name for t in local}

    def name(n):
        return renamed.get(n, prefix + n if n and (n in local_names or n not in outer) else n)

    nodes = []
    for node in model.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.ClearField("input")
        copy.ClearField("output")
        copy.input.extend(name(n) for n in node.input)
        copy.output.extend(name(n) for n in node.output)
        nodes.append(copy)
    for t in local:
        t.name = prefix + t.name
    outputs = [helper.make_tensor_value_info(name(o.name), o.type.tensor_type.elem_type, None) for o in model.graph.output]
    return helper.make_graph(nodes, prefix + "branch", [], outputs, initializer=local)


def gate(slots_path: str, plain_path: str, dst: str) -> None:
    slots, plain = onnx.load(slots_path), onnx.load(plain_path)
    outer = {i.name for i in slots.graph.input}
    shared: dict = {}
    then_branch, else_branch = branch(slots, "s/", shared, outer), branch(plain, "p/", shared, outer)
    defaults = [t for t in slots.graph.initializer if t.name in outer]
    node = helper.make_node("If", [FLAG], [o.name for o in slots.graph.output], then_branch=then_branch,
                            else_branch=else_branch)
    graph = helper.make_graph([node], "gated", [helper.make_tensor_value_info(FLAG, TensorProto.BOOL, []),
                                                *slots.graph.input], list(slots.graph.output),
                              initializer=[*shared.values(), *defaults])
    model = helper.make_model(graph, opset_imports=slots.opset_import, producer_name="experiment")
    model.ir_version = slots.ir_version
    onnx.save(model, dst)


def feeds(seq: int, vocab: int, gated: bool | None) -> dict:
    ids = np.random.default_rng(0).integers(min(1000, vocab // 2), vocab, size=(1, seq), dtype=np.int64)
    f = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return f if gated is None else {**f, FLAG: np.array(gated)}


def rss_mib() -> float:
    return rss_bytes() / 2**20


def session_rss(path: str, gated: bool | None, seq: int, vocab: int) -> float:
    """Run in a child process: resident memory a session adds, after a few calls."""
    before = rss_mib()
    s = ort.InferenceSession(path, session_options(), providers=["CPUExecutionProvider"])
    f = feeds(seq, vocab, gated)
    for _ in range(5):
        s.run(None, f)
    return rss_mib() - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", default="bench-out/all-kinds", help="an export with slots (default %(default)s)")
    ap.add_argument("--plain", default="bench-out/merged", help="a --merge export of the same model (default %(default)s)")
    ap.add_argument("--work", default="bench-out/if-gate", help="where the gated graphs go (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds, 20 calls per peer each (default 20)")
    ap.add_argument("--seq", type=int, default=32, help="tokens per call (default 32)")
    ap.add_argument("--rss", nargs=3, help=argparse.SUPPRESS)  # child process: GRAPH FLAG VOCAB
    args = ap.parse_args()
    if args.rss:
        print(session_rss(args.rss[0], None if args.rss[1] == "none" else args.rss[1] == "1", args.seq, int(args.rss[2])))
        return
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    os.makedirs(args.work, exist_ok=True)
    vocab = int(read_base_manifest(os.path.join(args.slots, "base"))["vocab_size"])
    w = lambda name: os.path.join(args.work, name)  # noqa: E731
    slots = basic_optimized(os.path.join(args.slots, "base", "model.onnx"), w("slots_basic.onnx"))
    plain = basic_optimized(os.path.join(args.plain, "base", "model.onnx"), w("plain_basic.onnx"))
    gate(slots, plain, w("gated.onnx"))
    gate(plain, plain, w("gated_plain.onnx"))
    graphs = {"plain": (plain, None), "slots, no adapter": (slots, None), "gated, use_slots false": (w("gated.onnx"), False),
              "gated, use_slots true": (w("gated.onnx"), True), "If around the plain graph": (w("gated_plain.onnx"), False)}
    sessions = {p: ort.InferenceSession(p, session_options(), providers=["CPUExecutionProvider"]) for p, _ in graphs.values()}
    inputs = {g: feeds(args.seq, vocab, g) for g in (None, False, True)}  # made once, not inside the timed calls
    calls = {k: (lambda p=p, g=g: sessions[p].run(None, inputs[g])) for k, (p, g) in graphs.items()}
    a, b = calls["slots, no adapter"]()[0], calls["gated, use_slots true"]()[0]
    assert np.array_equal(a, b), "the gated graph's slotted branch differs from the slotted graph"
    times = interleaved(calls, args.rounds, 20, warmup=10)
    med = {k: statistics.median(dt for dt, _ in v) * 1e3 for k, v in times.items()}
    rss = {}
    for k, (p, g) in graphs.items():
        if k == "gated, use_slots true":
            continue
        child = [sys.executable, __file__, "--rss", p, "none" if g is None else str(int(g)), str(vocab), "--seq", str(args.seq)]
        rss[k] = float(subprocess.run(child, capture_output=True, text=True, check=True).stdout.strip())
    print(f"\n{args.slots} vs {args.plain}, CPU, batch 1, {args.seq} tokens, median of {20 * args.rounds} calls each\n")
    print("| graph | ms per call | / plain | session memory (MiB) |")
    print("| --- | --- | --- | --- |")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {v / med['plain']:.3f} | {rss[k]:.0f} |" if k in rss else
              f"| {k} | {v:.3f} | {v / med['plain']:.3f} | (same session) |")


if __name__ == "__main__":
    main()
