"""The LoRA work of one decode step on ONNX Runtime's CPU kernels, layout by layout and precision by precision.

Why edgepeft's LoRA slots stay float32 MatMuls (issue 18's "adapters cheap on quantized
bases"). The graph holds only the LoRA deltas of the benchmark Llama (6 layers, r16 on
every linear layer, fused groups as edgepeft exports them: q|k|v 512 -> 48 -> 1024, o
512 -> 16 -> 512, gate|up 512 -> 32 -> 2752, down 1376 -> 16 -> 512) for one token, each
added to a stand-in base output and split into its members as in the real graph:

    fp32 inputs (edgepeft)        ((x @ A) * rows) @ B_block, A and B graph inputs, B block diagonal
    fp32 inputs, no row Mul       the same without the row-weight Mul (a single-adapter-only graph)
    fp32 inputs, B per member     the rank columns split per member, one B product per member (no zeros)
    fp32 constants                A and B as initializers (what a graph with the adapter baked in gets)
    fp16 inputs + Cast            A and B stored as float16, cast to float32 in the graph
    int8 inputs                   DynamicQuantizeMatMul, 7-bit int8 A and B with per-column scales
    int4 inputs / int4 constants  MatMulNBits (blocks of 16, int8 activations), as genai bakes its LoRA

Sessions take turns in blocks of calls and each block's first calls are dropped. The
deltas are L2/L3-resident here, so these are lower bounds of what they cost between the
base weights of a real step. Max error is against the float32 layout, relative to the
largest delta.

    python samples/bench_lora_kernels.py [--blocks 15] [--out bench-out/lora-kernels]
Timings are reported, never asserted.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgepeft.exporters.quantize import _quiet_quantizer_logs
from sample_folder import claim_folder, positive, run

LAYERS, RANK = 6, 16
GROUPS = {"qkv": (512, [512, 256, 256]), "o": (512, [512]), "gate_up": (512, [1376, 1376]), "down": (1376, [512])}
CALLS, DROPPED = 40, 8


def weights(rng) -> dict:
    """{(layer, group): (A (in, r * members), [B per member (r, out)])}, PEFT-like scales (B small)."""
    out = {}
    for layer in range(LAYERS):
        for g, (n_in, sizes) in GROUPS.items():
            a = (rng.standard_normal((n_in, RANK * len(sizes))) / np.sqrt(n_in)).astype(np.float32)
            out[layer, g] = (a, [rng.standard_normal((RANK, n)).astype(np.float32) * 0.05 for n in sizes])
    return out


def block_diagonal(parts: list) -> np.ndarray:
    out = np.zeros((RANK * len(parts), sum(p.shape[1] for p in parts)), np.float32)
    col = 0
    for i, p in enumerate(parts):
        out[i * RANK:(i + 1) * RANK, col:col + p.shape[1]] = p
        col += p.shape[1]
    return out


def build(w: dict, variant: str) -> tuple[bytes, dict]:
    """The deltas graph of one variant and its feeds."""
    rng = np.random.default_rng(1)
    feeds = {f"x{n}": rng.standard_normal((1, 1, n)).astype(np.float32) for n in {v[0] for v in GROUPS.values()}}
    feeds.update({f"base_{g}": rng.standard_normal((1, 1, sum(s))).astype(np.float32) for g, (_, s) in GROUPS.items()})
    feeds["rows"] = np.ones((1, 1, 1), np.float32)
    nodes, inits, outputs = [], [], []

    def weight(name, array):
        if variant == "fp32 constants":
            inits.append(numpy_helper.from_array(array, name))
            return name
        if variant == "fp16 inputs + Cast":
            feeds[name] = array.astype(np.float16)
            nodes.append(helper.make_node("Cast", [name], [name + ".f32"], to=TensorProto.FLOAT))
            return name + ".f32"
        if variant.startswith("int4"):  # constants here: the quantizer rewrites them (inputs afterwards)
            inits.append(numpy_helper.from_array(array, name))
            return name
        feeds[name] = array
        return name

    def matmul(x, name, array, out):
        if variant == "int8 inputs":
            # 7-bit weights, as the int8 base (exporters/quantize.py, reduce_range): x86 CPUs without VNNI sum
            # uint8 x int8 pairs in int16 lanes, which 8-bit weights overflow (0.078 max error on an AVX2 EPYC)
            scale = np.maximum(np.abs(array).max(axis=0), 1e-12) / 63
            feeds[name] = np.round(array / scale).astype(np.int8)
            feeds[name + ".scale"] = scale.astype(np.float32)
            nodes.append(helper.make_node("DynamicQuantizeMatMul", [x, name, name + ".scale"], [out],
                                          domain="com.microsoft"))
        else:
            nodes.append(helper.make_node("MatMul", [x, weight(name, array)], [out]))

    for (layer, g), (a, bs) in w.items():
        n_in, sizes = GROUPS[g]
        p = f"l{layer}.{g}"
        matmul(f"x{n_in}", f"{p}.A", a, f"{p}.a")
        scaled = f"{p}.a"
        if variant != "fp32 inputs, no row Mul":
            nodes.append(helper.make_node("Mul", [f"{p}.a", "rows"], [f"{p}.ar"]))
            scaled = f"{p}.ar"
        names = [f"{p}.out{i}" for i in range(len(sizes))]
        outputs += names
        if variant == "fp32 inputs, B per member" and len(sizes) > 1:
            split_a = [f"{p}.a{i}" for i in range(len(sizes))]
            split_b = [f"{p}.base{i}" for i in range(len(sizes))]
            nodes.append(helper.make_node("Split", [scaled, _const(inits, f"{p}.rs", [RANK] * len(sizes))], split_a, axis=-1))
            nodes.append(helper.make_node("Split", [f"base_{g}", _const(inits, f"{p}.bs", sizes)], split_b, axis=-1))
            for i, b in enumerate(bs):
                matmul(split_a[i], f"{p}.B{i}", b, f"{p}.d{i}")
                nodes.append(helper.make_node("Add", [split_b[i], f"{p}.d{i}"], [names[i]]))
            continue
        matmul(scaled, f"{p}.B", block_diagonal(bs), f"{p}.d")
        if len(sizes) == 1:
            nodes.append(helper.make_node("Add", [f"base_{g}", f"{p}.d"], names))
        else:
            nodes.append(helper.make_node("Add", [f"base_{g}", f"{p}.d"], [f"{p}.sum"]))
            nodes.append(helper.make_node("Split", [f"{p}.sum", _const(inits, f"{p}.bs", sizes)], names, axis=-1))
    inputs = [helper.make_tensor_value_info(k, _onnx_type(v), v.shape) for k, v in feeds.items()]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs]
    model = helper.make_model(helper.make_graph(nodes, "lora_deltas", inputs, outs, initializer=inits),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    if variant.startswith("int4"):
        model = _int4(model, feeds, as_inputs=variant == "int4 inputs")
    return model.SerializeToString(), feeds


def _const(inits: list, name: str, values: list) -> str:
    if not any(i.name == name for i in inits):
        inits.append(numpy_helper.from_array(np.array(values, np.int64), name))
    return name


def _onnx_type(array: np.ndarray) -> int:
    return {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.int8: TensorProto.INT8,
            np.uint8: TensorProto.UINT8}[array.dtype.type]


def _int4(model, feeds: dict, as_inputs: bool):
    """MatMulNBits on every A and B (blocks of 16: the smallest rank axis is 16); as_inputs moves them to inputs."""
    with _quiet_quantizer_logs():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer, logger

        logger.setLevel(logging.WARNING)  # one INFO line per weight otherwise
        q = MatMulNBitsQuantizer(model, bits=4, block_size=16, is_symmetric=True, accuracy_level=4)
        q.process()
    model = q.model.model
    if as_inputs:
        quantized = {name for n in model.graph.node if n.op_type == "MatMulNBits" for name in n.input[1:3]}
        for init in [i for i in model.graph.initializer if i.name in quantized]:
            feeds[init.name] = numpy_helper.to_array(init)
            model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, init.dims))
            model.graph.initializer.remove(init)
    return model


class Peer:
    """One session with its inputs and outputs bound once."""

    def __init__(self, blob: bytes, feeds: dict):
        self.nodes = len(onnx.load_from_string(blob).graph.node)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
        so.add_session_config_entry("session.force_spinning_stop", "1")
        self.session = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
        self.binding = self.session.io_binding()
        self.values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
        for k, v in self.values.items():
            self.binding.bind_ortvalue_input(k, v)
        for o in self.session.get_outputs():
            self.binding.bind_output(o.name)
        self.session.run_with_iobinding(self.binding)
        self.outputs = [o.numpy() for o in self.binding.get_outputs()]
        self.times = []

    def block(self):
        for i in range(CALLS):
            t = time.perf_counter()
            self.session.run_with_iobinding(self.binding)
            if i >= DROPPED:
                self.times.append(time.perf_counter() - t)


VARIANTS = ["fp32 inputs (edgepeft)", "fp32 inputs, no row Mul", "fp32 inputs, B per member", "fp32 constants",
            "fp16 inputs + Cast", "int8 inputs", "int4 inputs", "int4 constants"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=positive, default=15)
    ap.add_argument("--out", default="bench-out/lora-kernels")
    args = ap.parse_args()
    claim_folder(args.out, ap.get_default("out"))  # a folder of one's own files (a bench.md) is refused
    w = weights(np.random.default_rng(0))
    peers = {v: Peer(*build(w, v)) for v in VARIANTS}
    ref = peers[VARIANTS[0]].outputs
    scale = max(float(np.abs(o).max()) for o in ref)
    for _ in range(args.blocks):
        for p in peers.values():
            p.block()
    base_us = statistics.median(peers[VARIANTS[0]].times) * 1e6
    rows = []
    for v, p in peers.items():
        us = statistics.median(p.times) * 1e6
        err = max(float(np.abs(a - b).max()) for a, b in zip(p.outputs, ref)) / scale
        rows.append({"variant": v, "us_per_step": round(us, 1), "vs_edgepeft": round(us / base_us, 2),
                     "max_rel_error": float(f"{err:.2g}"), "nodes": p.nodes})
    head = (f"LoRA deltas of one decode step, benchmark Llama r16 all-linear ({LAYERS} layers), {args.blocks} blocks "
            f"of {CALLS} calls ({DROPPED} dropped), {os.cpu_count()} CPUs ({platform.machine()}), onnxruntime "
            f"{ort.__version__}; `python samples/bench_lora_kernels.py`")
    lines = [head, "", "| variant | nodes | µs per step | / edgepeft's | max error (relative) |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['variant']} | {r['nodes']} | {r['us_per_step']} | {r['vs_edgepeft']} | {r['max_rel_error']} |"
              for r in rows]
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"header": head, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run(main)
