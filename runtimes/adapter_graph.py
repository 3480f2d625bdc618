"""An adapter's graph: what it may hold, read from its bytes before ONNX Runtime runs it once for its tensors (the
JavaScript runtime's ``graph.js`` reads the same).

Loading runs the adapter's graph, and its checksum finds damage, not forgery: one node (ConstantOfShape, Expand, a
Loop) could take memory or time without bound. Exports write Identity, Concat and Pad nodes over the graph's own
tensors (``exporters/adapter_graph.py``), in order, so a graph may hold only those: each message only the fields
exports write (no inputs, functions, subgraphs, sparse tensors or attribute tensors), each name defined once, and
every tensor's shape, worked out from its tensors' dims before anything runs, within what an adapter of this base
can take. ONNX's protobuf is read field by field, as protobuf reads it (the runtime imports no ``onnx``).
"""
from __future__ import annotations

import math
import os
import struct

from .errors import STOPS, CorruptArtifactError, first_line
from .sessions import ORT_ERRORS, ort, session_options, shared_pool

NODES = ("Identity", "Concat", "Pad")
_FLOAT, _INT64 = 1, 7  # TensorProto's data types: exports write float32 tensors, and a Pad's widths in int64
_SIZES = {_FLOAT: 4, _INT64: 8}
_GRAPH, _NODE, _INIT, _OUTPUT = 7, 1, 5, 12  # ModelProto.graph; GraphProto.node, .initializer, .output


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        value, i, shift = value | (byte & 0x7F) << shift, i + 1, shift + 7
        if byte < 0x80:
            return value, i
        if shift > 63:
            raise ValueError("a number longer than 10 bytes")


def _fields(data: bytes, start: int = 0, end: int | None = None):
    """(field number, value) of one protobuf message: a varint's number, else the (start, end) of its bytes."""
    i, end = start, len(data) if end is None else end
    while i < end:
        key, j = _varint(data, i)
        if j - i > 5 or key >= 1 << 32 or not 0 < key >> 3 < 1 << 29:  # protobuf reads a key in 32 bits: a longer
            raise ValueError("a field key out of protobuf's range")  # one was another field to ONNX Runtime
        field, wire, i = key >> 3, key & 7, j
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = (i, i + size), i + size
        elif wire in (1, 5):
            value, i = None, i + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"wire type {wire}")
        if i > end:
            raise ValueError("a field runs past its message")
        yield field, value


def _refused(why: str):
    raise ValueError(why)


def _text(data: bytes, span) -> str:
    return data[span[0]:span[1]].decode("utf-8")


def _ints(data: bytes, value) -> list:
    """A repeated int64 field's numbers: packed (the bytes of many varints) or one varint, signed."""
    out, i = ([], value[0]) if isinstance(value, tuple) else ([value], 0)
    while isinstance(value, tuple) and i < value[1]:
        number, i = _varint(data, i)
        out.append(number)
    return [v - (1 << 64) if v >= 1 << 63 else v for v in out]


# the fields each message may hold: what exports write, and names and docs (ONNX Runtime builds an object for every
# entry of a repeated field while it parses, before it checks anything: 2 bytes of an empty attribute tensor took 400)
_ALLOWED = {"model": {1, 2, 3, 4, 5, 6, 7, 8}, "opset": {1, 2}, "graph": {1, 2, 5, 10, 12}, "node": {1, 2, 3, 4, 5, 6, 7},
            "attribute": {1, 3, 20}, "tensor": {1, 2, 7, 8, 9, 12}, "output": {1, 2, 3}, "type": {1},
            "tensor type": {1, 2}, "shape": {1}, "dim": {1, 2}}
_MOST_DIMS = 8  # of a tensor or an output's shape: slots have at most 4
# nodes and tensors a graph may hold per slot of its base: exports write an output per slot they fill, an Identity
# over a tensor, or a Concat over parts each Padded (a LoRA B on fused q/k/v: 4 nodes and 6 tensors; 2.5 tensors a
# slot of the base at most in every fixture); an ``Assembled`` value of a method of one's own (adding-a-method.md)
# fits up to 7 padded parts. ONNX Runtime's load time grows faster than the count (100,000 Identity nodes: minutes)
NODES_PER_SLOT = 16


def _read(data: bytes, span, what: str) -> list:
    """The fields of one ``what`` message, refused where it holds one exports never write."""
    fields = list(_fields(data, *span))
    if what == "tensor" and any(f in (13, 14) for f, _ in fields):  # external_data, data_location
        raise ValueError("it reads tensors from another file (external data), where adapter graphs hold them inside")
    if odd := next((f for f, _ in fields if f not in _ALLOWED[what]), None):
        raise ValueError(f"its {what} holds field {odd}, which exports never write")
    return fields


def _output(data: bytes, span) -> str:
    """An output's name (a ValueInfoProto), its declared type read only to see it holds what exports write."""
    name = ""
    for field, value in _read(data, span, "output"):
        if field == 1:
            name = _text(data, value)
        elif field == 2:
            for _, tensor_type in _read(data, value, "type"):
                for f, shape in _read(data, tensor_type, "tensor type"):
                    dims = _read(data, shape, "shape") if f == 2 else []
                    if len(dims) > _MOST_DIMS:
                        raise ValueError(f"an output's shape has {len(dims)} dims")
                    for _, dim in dims:
                        _read(data, dim, "dim")
    return name


def _tensor(data: bytes, span) -> tuple[str, list, int | None, list | None]:
    """(name, dims, data_type, values of an int64 tensor else None) of a TensorProto, its fields in any order."""
    name, dims, kind, raw, values = "", [], None, None, []
    for field, value in _read(data, span, "tensor"):
        if field == 8:
            name = _text(data, value)
        elif field == 1:
            dims += _ints(data, value)
        elif field == 2:
            kind = value
        elif field == 9:
            raw = value
        elif field == 7:
            values += _ints(data, value)
    if len(dims) > _MOST_DIMS or len(values) > 2 * _MOST_DIMS:  # int64_data: a Pad's widths, two per axis
        raise ValueError(f"its tensor {name!r} has {len(dims)} dims and {len(values)} int64 values")
    if kind != _INT64:
        return name, dims, kind, None
    raw = data[raw[0]:raw[1]] if raw else b""
    return name, dims, kind, values + list(struct.unpack(f"<{len(raw) // 8}q", raw[:len(raw) // 8 * 8]))


def _node(data: bytes, span) -> tuple[str, str, list, list, int]:
    """(op_type, domain, inputs, outputs, its axis attribute) of a NodeProto."""
    op, domain, inputs, outputs, axis = "", "", [], [], 0
    for field, value in _read(data, span, "node"):
        if field == 4:
            op = _text(data, value)
        elif field == 7:
            domain = _text(data, value)
        elif field == 1:
            inputs.append(_text(data, value))
        elif field == 2:
            outputs.append(_text(data, value))
        elif field == 5:  # a field given twice counts as ONNX Runtime reads it, as protobuf does: the last one
            attribute = _read(data, value, "attribute")
            names = [_text(data, v) for f, v in attribute if f == 1]
            if names and names[-1] == "axis":  # i, a single int64: a varint (protobuf skips one written as bytes)
                axis = ([0] + [v if isinstance(v, int) else _refused("axis written as bytes") for f, v in attribute
                               if f == 3])[-1]
                axis = axis - (1 << 64) if axis >= 1 << 63 else axis  # -1 is written as 2**64 - 1
    return op, domain, inputs, outputs, axis


def _shape(op: str, inputs: list, axis: int, shapes: dict, ints: dict) -> list:
    """The output's shape of an exported node from its inputs' (ValueError where it is not one exports write)."""
    if any(name not in shapes for name in inputs[:1 if op == "Pad" else None]):
        raise ValueError(f"a {op} reads a tensor not defined before it")
    first = shapes[inputs[0]]
    if op == "Identity":
        return first
    if op == "Pad":  # widths: an int64 tensor of the graph's own, two per axis, none negative; no axes input
        pads = ints.get(inputs[1]) if len(inputs) in (2, 3) else None
        if pads is None or not first or len(pads) != 2 * len(first) or min(pads) < 0:
            raise ValueError(f"a Pad's widths are not two per axis of a tensor of the graph's own ({pads})")
        return [n + pads[k] + pads[k + len(first)] for k, n in enumerate(first)]
    k = axis + len(first) if axis < 0 else axis  # Concat
    if not 0 <= k < len(first) or any(len(shapes[n]) != len(first) or [d for j, d in enumerate(shapes[n]) if j != k]
                                      != [d for j, d in enumerate(first) if j != k] for n in inputs):
        raise ValueError("a Concat of tensors whose shapes do not fit")
    return [sum(shapes[n][k] for n in inputs) if j == k else d for j, d in enumerate(first)]


def adapter_graph_problem(data: bytes, most: int, slots: int | None = None) -> str | None:
    """What an adapter graph's bytes hold that an export never writes, else None; ``most``: the bytes an adapter
    of this base may take (its tensors, what its nodes compute, and its outputs, which JavaScript copies); ``slots``:
    how many the base has (None: no bound on the count of outputs, nodes and tensors)."""
    try:
        model = _read(data, (0, len(data)), "model")
        graphs = [v for f, v in model if f == _GRAPH]
        if len(graphs) != 1 or sum(f == 8 for f, _ in model) > _MOST_DIMS:
            return "it is not one graph of its own"
        for _, opset in (x for x in model if x[0] == 8):
            _read(data, opset, "opset")
        graph = _read(data, graphs[0], "graph")
        count = {field: sum(f == field for f, _ in graph) for field in (_NODE, _INIT, _OUTPUT)}
        if slots is not None and (count[_OUTPUT] > slots or max(count[_NODE], count[_INIT]) > NODES_PER_SLOT * slots):
            return (f"it holds {count[_OUTPUT]} outputs, {count[_NODE]} nodes and {count[_INIT]} tensors, where an "
                    f"export writes an output per slot of its base ({slots} here) and at most {NODES_PER_SLOT} nodes "
                    "and tensors a slot")
        shapes, kinds, ints = {}, {}, {}
        for name, dims, kind, values in (_tensor(data, v) for f, v in graph if f == _INIT):
            if name in shapes or min(dims, default=0) < 0 or kind not in _SIZES:
                return f"its tensor {name!r} is defined twice, has a negative size, or is not float32 or int64"
            shapes[name], kinds[name] = dims, kind
            if values is not None:
                ints[name] = values
        for op, domain, inputs, outputs, axis in (_node(data, v) for f, v in graph if f == _NODE):
            if op not in NODES or domain not in ("", "ai.onnx") or len(outputs) != 1:
                return f"it holds a {domain + '.' if domain else ''}{op} node (exports write {', '.join(NODES)} only)"
            if outputs[0] in shapes:
                return f"its tensor {outputs[0]!r} is defined twice"
            shapes[outputs[0]] = _shape(op, inputs, axis, shapes, ints)
            kinds[outputs[0]] = kinds[inputs[0]]  # each node's output is of its (first) input's type
        outputs = [_output(data, v) for f, v in graph if f == _OUTPUT]
        if len(set(outputs)) < len(outputs) or not set(outputs) <= set(shapes):
            return "its outputs name a tensor twice, or one it does not define"
        total = sum(math.prod(shapes[n]) * _SIZES[kinds[n]] for n in [*shapes, *outputs])
        if total > most:
            return f"its nodes would make {total} bytes of tensors, more than an adapter of this base can take ({most})"
    except (ValueError, IndexError, KeyError, TypeError, UnicodeDecodeError, struct.error) as e:
        return f"it is not a graph an export writes ({e})"
    return None


NO_FOLDER = os.path.join(os.sep, "edgepeft: adapter graphs hold their tensors inside")


def run_adapter_graph(graph: bytes, where: str, most: int = 1 << 62, slots: int | None = None) -> dict:
    """{slot name: array}: an adapter graph's outputs (it has no inputs), run once on the CPU from its bytes (the
    ones checked against adapter.json's sha256); ``where`` names it in errors; ``most``, ``slots``: the bounds of
    ``adapter_graph_problem``.

    Its tensors are inside it (exports write no external data for adapters): external data is looked for in a
    folder that does not exist, so a graph naming a file fails instead of reading it (from bytes: from the app's
    directory). The JavaScript runtime does the same (checks.js)."""
    options = session_options(0 if shared_pool() else 1)  # one thread, or the process's shared pool
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", NO_FOLDER)
    if problem := adapter_graph_problem(graph, most, slots):  # before it runs: a forged node could take any memory or time
        raise CorruptArtifactError(f"{where}: {problem}; re-export the adapter")
    try:
        sess = ort.InferenceSession(graph, sess_options=options, providers=["CPUExecutionProvider"])
        outputs = sess.run(None, {})
    except STOPS:
        raise
    except ORT_ERRORS as e:
        raise CorruptArtifactError(
            f"{where}: ONNX Runtime cannot run the adapter graph ({first_line(e)}); re-export the adapter"
        ) from None
    return {o.name: v for o, v in zip(sess.get_outputs(), outputs)}
