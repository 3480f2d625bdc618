"""``--quantize int8|int4``: the frozen base's weights quantized, the adapter slots untouched.

int8: ONNX Runtime's dynamic quantization rewrites every MatMul whose weight is a
frozen initializer into MatMulInteger (weights int8 per output channel in 7 bits, activations
quantized per call), which ONNX Runtime fuses into DynamicQuantizeMatMul on the CPU.
int4: ONNX Runtime's MatMulNBits quantizer stores those weights as 4-bit integers,
symmetric, with one float scale per block of 32 input rows (block_size 32), computed
with int8 activations on the CPU (accuracy_level 4). Either way nodes that
read a slot input are left in float32: slots carry initializers (their neutral values),
so without the exclusion the quantizer would bake the neutral value in and cut the slot
off. Adapters stay float32 and bind exactly as on a float32 base of the same weights,
so the base fingerprint (frozen weights + slot table) does not change.

Embedding tables (a Gather from a frozen initializer: the word embeddings, often half of
a small model) are quantized too, for int8 and int4 alike: int8 per row (Gather -> Cast ->
Mul by the row's gathered scale, standard ops, as fast as the float32 Gather). 4-bit
tables (ONNX Runtime's GatherBlockQuantized, blocks of 32) raised a trained MiniLM
classifier's relative error on the export check from 0.16 to 0.22, past the default
tolerance, for 6 MB more saved; with 8-bit tables an int4 MiniLM is 0.2x float32.

Quantized outputs cannot match PyTorch to 1e-4; the export checks them by relative
RMS error instead (``relative_error``, default tolerance 0.2), after the float32 graph has passed
the usual check; a broken graph, whose error is of the order of the output itself, is refused
whatever the tolerance (``no_closer_than_zeros``: below an RMS of 1 the relative error is absolute).
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile

import numpy as np

from edgepeft.errors import ConfigError
from edgepeft.exporters.tied import fold_tied_tables, is_shared_table
from edgepeft.files import usual_permissions

QUANTIZATIONS = ("int8", "int4")
INT4_BLOCK = 32  # input rows per scale (ONNX Runtime's default 128: relative error 0.148 vs 0.125, 5% faster decode)
INT4_ACCURACY = 4  # MatMulNBits computes with int8 activations (the fastest CPU path)


def check_quantize(quantize) -> None:
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ConfigError(f"--quantize {quantize!r} is not supported; use one of {', '.join(QUANTIZATIONS)}")
    if quantize == "int4":  # before anything is exported: older quantizers take other arguments (a TypeError)
        from edgepeft.runtimes.sessions import needs_ort

        needs_ort((1, 24), "--quantize int4 (ONNX Runtime's MatMulNBits quantizer)")


def note_contrib_matmuls(quantize, ops: str, log) -> None:
    """int4 on standard ops: its MatMuls are ONNX Runtime's own (inspect said "standard ops" of them)."""
    if quantize == "int4" and ops == "standard":
        log("note: --quantize int4 stores the weights for ONNX Runtime's MatMulNBits, a com.microsoft op, whatever "
            "--ops says; for a runtime without ONNX Runtime's own ops, export with --quantize int8 (standard ops) or none")


def quantize_graph(path: str, quantize: str) -> dict:
    """Rewrite the graph at ``path`` in place; returns what changed (for the manifest)."""
    import onnx

    check_quantize(quantize)
    model = onnx.load(path, load_external_data=False)
    external = any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
    if any(is_shared_table(n) for n in model.graph.node):  # tied.py's: the
        # quantizers take constant MatMul weights only
        model = onnx.load(path)
        if fold_tied_tables(model):  # a tied output layer's table: its own (quantized) copy again
            if os.path.exists(path + ".data"):  # onnx appends to an existing data file
                os.unlink(path + ".data")
            onnx.save_model(model, path, save_as_external_data=external, all_tensors_to_one_file=True,
                            location=os.path.basename(path) + ".data")
    initializers = {i.name for i in model.graph.initializer}
    slot_inputs = {i.name for i in model.graph.input if i.name in initializers}
    keep_float = [n.name for n in model.graph.node if slot_inputs.intersection(n.input)]
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".quantized-", suffix=".onnx", dir=directory)
    os.close(fd)
    try:
        if quantize == "int8":
            with _temp_copy_blamed(path, directory):
                _int8(path, tmp, keep_float, external)
        else:
            _int4(path, tmp, keep_float, external)
        quantized = onnx.load(tmp, load_external_data=False)
        if [i.name for i in quantized.graph.input] != [i.name for i in model.graph.input]:
            raise RuntimeError("the quantizer changed the graph inputs")  # a bug, not a user error
        count = sum(n.op_type in ("MatMulInteger", "MatMulNBits") for n in quantized.graph.node)
        quantized = onnx.load(tmp)  # with its weights: the tables are rewritten below
        tables = quantize_embedding_tables(quantized, slot_inputs)
        if os.path.exists(path + ".data"):  # onnx appends to an existing data file
            os.unlink(path + ".data")
        # (the quantization runs on a staged base: the data file is the graph's own, model.onnx.data)
        onnx.save_model(quantized, tmp, save_as_external_data=external, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + ".data")
        usual_permissions(tmp)  # mkstemp made it 0600
        if external:
            usual_permissions(path + ".data")  # and onnx writes the data file 0600
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp + ".data"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return {"quantization": quantize, "quantized_matmuls": count, "quantized_tables": tables}


TABLE_MIN_ELEMENTS = 1 << 16  # smaller tables (token types, GPT-2's 1024 positions x 32) are not worth a node each


def quantize_embedding_tables(model, slot_inputs: set) -> int:
    """Rewrite each Gather from a float 2D initializer (an embedding table) to read an int8 table; returns how many.

        Gather(table (V, H), ids) -> Gather(table_q int8, ids) -> Cast -> Mul(Gather(row scales (V, 1), ids))

    Symmetric, one scale per row. A table something else also reads is left as it is; a tied output layer no longer
    reads it here (``tied.fold_tied_tables`` gave that layer a copy of its own, quantized as its MatMul's weights).
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    count = 0
    for node in list(graph.node):
        table = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        if (table is None or table.name in slot_inputs or len(table.dims) != 2 or table.data_type != TensorProto.FLOAT
                or table.dims[0] * table.dims[1] < TABLE_MIN_ELEMENTS or len(readers[table.name]) != 1
                or dict((a.name, a.i) for a in node.attribute).get("axis", 0) != 0):
            continue
        weights = numpy_helper.to_array(table).astype(np.float32)  # (V, H)
        scale = np.maximum(np.abs(weights).max(axis=1, keepdims=True), 1e-12) / 127.0  # (V, 1)
        q = np.clip(np.round(weights / scale), -127, 127).astype(np.int8)
        base, ids, out = table.name, node.input[1], node.output[0]
        nodes = [helper.make_node("Gather", [f"{base}.int8", ids], [f"{out}.int8"], axis=0),
                 helper.make_node("Cast", [f"{out}.int8"], [f"{out}.float"], to=TensorProto.FLOAT),
                 helper.make_node("Gather", [f"{base}.scale", ids], [f"{out}.scale"], axis=0),
                 helper.make_node("Mul", [f"{out}.float", f"{out}.scale"], [out])]
        position = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new in enumerate(nodes):
            graph.node.insert(position + offset, new)
        graph.initializer.remove(table)
        graph.initializer.extend([numpy_helper.from_array(q, f"{base}.int8"),
                                  numpy_helper.from_array(scale.astype(np.float32), f"{base}.scale")])
        count += 1
    return count


@contextlib.contextmanager
def _quiet_quantizer_logs():
    """ONNX Runtime's quantization modules configure the root logger on import (basicConfig(level=INFO)) and
    log advice meant for image models ("Please consider to run pre-processing"): undo and drop both, so the
    host process's logging stays as it was."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    advice = logging.Filter()
    advice.filter = lambda record: "pre-processing before quantization" not in record.getMessage()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)
        root.setLevel(level)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)


def _int8(path: str, dest: str, keep_float: list, external: bool) -> None:
    import onnx

    with _quiet_quantizer_logs():
        from onnxruntime.quantization import QuantType, quantize_dynamic

    # reduce_range: 7-bit weights, so that uint8 x int8 pair sums fit the int16 lanes of x86 CPUs without VNNI
    # (AVX2, or AVX-512 without VNNI): with 8 bits they saturate there (tiny Llama: relative error 0.008-0.033 on
    # an AVX2 CPU, 0.0014-0.0024 with reduce_range; 0.0009-0.0026 with 8 bits on an AVX-512 VNNI CPU).
        quantize_dynamic(path, dest, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         nodes_to_exclude=keep_float, op_types_to_quantize=["MatMul"], use_external_data_format=external,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # past contrib ops' outputs


@contextlib.contextmanager
def _temp_copy_blamed(path: str, out_folder: str):
    """ONNX Runtime's int8 quantizer saves a copy of the float graph, weights and all, in tempfile's folder (TMPDIR;
    /tmp is often a small tmpfs on a device) with an OSError naming no file: blamed on OUT, whose disk had room,
    "give --out a folder on another disk" failed for every OUT. Where TMPDIR is on another disk and has less room
    than the copy takes, it is named with the fix."""
    try:
        yield
    except OSError as e:
        from edgepeft.files import FULL_DISK

        if e.errno not in FULL_DISK or e.filename is not None:
            raise
        tmp = tempfile.gettempdir()
        need = sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.exists(p))
        device, free = disk_room(tmp)
        if device == disk_room(out_folder)[0] or free >= need:
            raise  # OUT's disk: the caller names it
        from edgepeft.errors import StorageError

        raise StorageError(f"{tmp}: no room for the copy of the float base ({need / 2**20:.1f} MiB, "
                           f"{free / 2**20:.1f} MiB free) that ONNX Runtime's int8 quantizer writes to the temp folder; "
                           "free some, or set TMPDIR to a folder on a disk with room") from None


def disk_room(folder: str) -> tuple:
    """(the device ``folder`` is on, the bytes free there)."""
    import shutil

    return os.stat(folder).st_dev, shutil.disk_usage(folder).free


def _int4(path: str, dest: str, keep_float: list, external: bool) -> None:
    import onnx

    with _quiet_quantizer_logs():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer, logger

        quiet = logger.level
        logger.setLevel(logging.WARNING)  # one INFO line per weight otherwise
        try:
            model = onnx.load(path)
            _gemms_as_matmuls(model.graph, set(keep_float))
            quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=INT4_BLOCK, is_symmetric=True,
                                             accuracy_level=INT4_ACCURACY, nodes_to_exclude=keep_float,
                                             op_types_to_quantize=("MatMul",))
            quantizer.process()
            quantizer.model.save_model_to_file(dest, use_external_data_format=external)
        finally:
            logger.setLevel(quiet)


def _gemms_as_matmuls(graph, keep_float: set) -> None:
    """Rewrite each plain Gemm with a frozen weight as MatMul + Add, which the 4-bit quantizer takes (it quantizes
    MatMul only; int8's quantizer takes Gemm too): BERT's pooler, a merged classifier's head.

        x (B, in) --Gemm(W, c, transB=1)--> y (B, out)
        x (B, in) --MatMul(W.T: (in, out), a new initializer, one per W)--> --Add(c)--> y (B, out)
    """
    from onnx import helper, numpy_helper

    weights = {t.name: t for t in graph.initializer}
    readers: dict = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    transposed: dict = {}  # W -> W.T's name: Gemms sharing a weight share its transpose
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.name in keep_float or node.input[1] not in weights or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            if weight not in transposed:
                transposed[weight] = f"{weight}.T"
                array = np.ascontiguousarray(numpy_helper.to_array(weights[weight]).T)  # (out, in) -> (in, out)
                graph.initializer.append(numpy_helper.from_array(array, transposed[weight]))
            readers[weight] -= 1
            weight = transposed[weight]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        out = node.output[0]
        product = f"{out}.matmul" if bias else out
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=f"{out}.matmul"))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [out], name=f"{out}.bias"))
    for t in [t for t in graph.initializer if readers.get(t.name, 1) == 0]:  # a weight now read transposed only
        graph.initializer.remove(t)
    del graph.node[:]
    graph.node.extend(nodes)


def rms(x: np.ndarray) -> float:
    """The root mean square of ``x`` (float64 sums)."""
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """RMS of the difference over RMS of the reference, or over 1 when that is smaller (0 = equal).

    The floor keeps tiny outputs (an untrained classifier's logits) from inflating the
    ratio, as ``--atol`` scales with the output only above 1: below 1 it is the RMS error itself.
    """
    return rms(ours - ref) / max(rms(ref), 1.0)


def no_closer_than_zeros(ours: np.ndarray, ref: np.ndarray) -> bool:
    """Whether ``ours`` is as far from ``ref`` as zeros are: a broken graph, which the floor above let pass for outputs
    below 1 (a graph of zeros was 0.114 on a tiny Llama's logits, within the default --qtol)."""
    return rms(ours - ref) >= rms(ref) > 0
