"""An adapter's graph: what it may hold, read from its bytes before ONNX Runtime runs it once for its tensors (the
JavaScript runtime's ``graph.js`` reads the same).

Loading runs the adapter's graph, and its checksum finds damage, not forgery: one node (ConstantOfShape, Expand, a
Loop) could take memory or time without bound. Exports write Identity, Concat and Pad nodes over the graph's own
tensors (``exporters/adapter_graph.py``), in order, so a graph may hold only those: no inputs, functions, subgraphs
or sparse tensors, each name defined once, and every tensor's shape, worked out from its tensors' dims before
anything runs, within what an adapter of this base can take. ONNX's protobuf is read field by field (the runtime
imports no ``onnx``).
"""
from __future__ import annotations

import math
import os
import struct

from .errors import CorruptArtifactError
from .sessions import ort, session_options

NODES = ("Identity", "Concat", "Pad")
_FLOAT, _INT64 = 1, 7  # TensorProto's data types: exports write float32 tensors, and a Pad's widths in int64
_SIZES = {_FLOAT: 4, _INT64: 8}
# ModelProto.graph, .functions; GraphProto.node, .initializer, .input, .sparse_initializer; NodeProto.input, .output,
# .op_type, .attribute, .domain; AttributeProto.name, .i, .g, .graphs; TensorProto.dims, .data_type, .int64_data,
# .name, .raw_data
_GRAPH, _FUNCTIONS, _NODE, _INIT, _INPUT, _SPARSE = 7, 25, 1, 5, 11, 15


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


def _tensor(data: bytes, span) -> tuple[str, list, int | None, list | None]:
    """(name, dims, data_type, values of an int64 tensor else None) of a TensorProto, its fields in any order."""
    name, dims, kind, raw, values = "", [], None, None, []
    for field, value in _fields(data, *span):
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
    if kind != _INT64:
        return name, dims, kind, None
    raw = data[raw[0]:raw[1]] if raw else b""
    return name, dims, kind, values + list(struct.unpack(f"<{len(raw) // 8}q", raw[:len(raw) // 8 * 8]))


def _node(data: bytes, span) -> tuple[str, str, list, list, int, bool]:
    """(op_type, domain, inputs, outputs, its axis attribute, whether an attribute holds a graph) of a NodeProto."""
    op, domain, inputs, outputs, axis, sub = "", "", [], [], 0, False
    for field, value in _fields(data, *span):
        if field == 4:
            op = _text(data, value)
        elif field == 7:
            domain = _text(data, value)
        elif field == 1:
            inputs.append(_text(data, value))
        elif field == 2:
            outputs.append(_text(data, value))
        elif field == 5:  # a field given twice counts as ONNX Runtime reads it, as protobuf does: the last one
            attribute = list(_fields(data, *value))
            sub = sub or any(f in (6, 11) for f, _ in attribute)
            names = [_text(data, v) for f, v in attribute if f == 1]
            if names and names[-1] == "axis":  # i, a single int64: a varint (protobuf skips one written as bytes)
                axis = ([0] + [v if isinstance(v, int) else _refused("axis written as bytes") for f, v in attribute
                               if f == 3])[-1]
    return op, domain, inputs, outputs, axis, sub


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


def adapter_graph_problem(data: bytes, most: int) -> str | None:
    """What an adapter graph's bytes hold that an export never writes, else None; ``most``: the bytes an adapter
    of this base may take (its tensors and what its nodes compute)."""
    try:
        model = list(_fields(data))
        graphs = [v for f, v in model if f == _GRAPH]
        if any(f == _FUNCTIONS for f, _ in model) or len(graphs) != 1:
            return "it is not one graph of its own (functions, or no graph)"
        graph = list(_fields(data, *graphs[0]))
        if any(f in (_INPUT, _SPARSE) for f, _ in graph):
            return "it has inputs or sparse tensors (exports write neither)"
        shapes, kinds, ints = {}, {}, {}
        for name, dims, kind, values in (_tensor(data, v) for f, v in graph if f == _INIT):
            if name in shapes or min(dims, default=0) < 0 or kind not in _SIZES:
                return f"its tensor {name!r} is defined twice, has a negative size, or is not float32 or int64"
            shapes[name], kinds[name] = dims, kind
            if values is not None:
                ints[name] = values
        for op, domain, inputs, outputs, axis, sub in (_node(data, v) for f, v in graph if f == _NODE):
            if op not in NODES or domain not in ("", "ai.onnx") or sub or len(outputs) != 1:
                return f"it holds a {domain + '.' if domain else ''}{op} node (exports write {', '.join(NODES)} only)"
            if outputs[0] in shapes:
                return f"its tensor {outputs[0]!r} is defined twice"
            shapes[outputs[0]] = _shape(op, inputs, axis, shapes, ints)
            kinds[outputs[0]] = kinds[inputs[0]]  # each node's output is of its (first) input's type
        total = sum(math.prod(shape) * _SIZES[kinds[name]] for name, shape in shapes.items())
        if total > most:
            return f"its nodes would make {total} bytes of tensors, more than an adapter of this base can take ({most})"
    except (ValueError, IndexError, KeyError, TypeError, UnicodeDecodeError, struct.error) as e:
        return f"it is not a graph an export writes ({e})"
    return None


NO_FOLDER = os.path.join(os.sep, "edgepeft: adapter graphs hold their tensors inside")


def run_adapter_graph(graph, label: str = "", most: int = 1 << 62) -> dict:
    """{slot name: array}: an adapter graph's outputs (it has no inputs), run once on the CPU (a path or bytes).

    Its tensors are inside it (exports write no external data for adapters): external data is looked for in a
    folder that does not exist, so a graph naming a file fails instead of reading it (from bytes: from the app's
    directory). The JavaScript runtime does the same (checks.js)."""
    options = session_options(1)
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", NO_FOLDER)
    where = graph if isinstance(graph, str) else f"{label}: adapter.onnx"
    if isinstance(graph, str):
        with open(graph, "rb") as f:
            graph = f.read()
    if problem := adapter_graph_problem(graph, most):  # before it runs: a forged node could take any memory or time
        raise CorruptArtifactError(f"{where}: {problem}; re-export the adapter")
    try:
        sess = ort.InferenceSession(graph, sess_options=options, providers=["CPUExecutionProvider"])
        outputs = sess.run(None, {})
    except Exception as e:
        raise CorruptArtifactError(
            f"{where}: ONNX Runtime cannot run the adapter graph ({str(e).splitlines()[0]}); re-export the adapter"
        ) from None
    return {o.name: v for o, v in zip(sess.get_outputs(), outputs)}
