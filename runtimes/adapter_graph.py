"""An adapter's graph: what it may hold, read from its bytes before ONNX Runtime runs it once for its tensors (the
JavaScript runtime's ``checks.js`` reads the same).

Loading runs the adapter's graph, and its checksum finds damage, not forgery: one node (ConstantOfShape, Expand, a
Loop) could take memory or time without bound. Exports write Identity, Concat and Pad nodes over the graph's own
tensors (``exporters/adapter_graph.py``), so a graph may hold only those: no functions, no subgraphs, each tensor
read once (a Concat of one tensor a thousand times), and no Pad wider than the base's widest slot. ONNX's protobuf
is read here field by field (the runtime imports no ``onnx``).
"""
from __future__ import annotations

import os
import struct

from .errors import CorruptArtifactError
from .sessions import ort, session_options

NODES = ("Identity", "Concat", "Pad")
_INT64 = 7  # TensorProto.INT64


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
        key, i = _varint(data, i)
        field, wire = key >> 3, key & 7
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


def _text(data: bytes, span) -> str:
    return data[span[0]:span[1]].decode("utf-8")


def _int64s(data: bytes, span) -> tuple[str, list | None]:
    """(name, values) of an int64 TensorProto (raw_data, or int64_data packed or not); values None for other types."""
    name, kind, raw, values = "", None, b"", []
    for field, value in _fields(data, *span):  # in any order: a forger need not write them as protobuf does
        if field == 8:
            name = _text(data, value)
        elif field == 2:
            kind = value
        elif field == 9:
            raw = data[value[0]:value[1]]
        elif field == 7:  # packed (the bytes of many varints), or one varint
            values += [v - (1 << 64) if v >= 1 << 63 else v for v in
                       (_packed(data, value) if isinstance(value, tuple) else [value])]
    if kind != _INT64:
        return name, None
    return name, values + list(struct.unpack(f"<{len(raw) // 8}q", raw[:len(raw) // 8 * 8]))


def _packed(data: bytes, span) -> list:
    out, i = [], span[0]
    while i < span[1]:
        value, i = _varint(data, i)
        out.append(value)
    return out


def adapter_graph_problem(data: bytes, widest: int | None) -> str | None:
    """What an adapter graph's bytes hold that an export never writes, else None; ``widest``: the base's widest
    slot (None: pads unchecked)."""
    try:
        model = list(_fields(data))
        graphs = [v for f, v in model if f == 7]
        if any(f == 25 for f, _ in model) or len(graphs) != 1:
            return "it is not one graph of its own (functions, or no graph)"
        nodes, ints = [], {}
        for field, value in _fields(data, *graphs[0]):
            if field == 1:
                nodes.append(value)
            elif field == 5:
                name, values = _int64s(data, value)
                if values is not None:
                    ints[name] = values
        read = []
        for span in nodes:
            op, domain, inputs, sub = "", "", [], False
            for field, value in _fields(data, *span):
                if field == 4:
                    op = _text(data, value)
                elif field == 7:
                    domain = _text(data, value)
                elif field == 1:
                    inputs.append(_text(data, value))
                elif field == 5:
                    sub = sub or any(f in (6, 11) for f, _ in _fields(data, *value))  # an attribute's graph(s)
            if op not in NODES or domain not in ("", "ai.onnx") or sub:
                return f"it holds a {domain + '.' if domain else ''}{op} node (exports write {', '.join(NODES)} only)"
            if op == "Pad" and widest is not None:  # its widths: an int64 tensor of the graph's own, each in bounds
                pads = ints.get(inputs[1]) if len(inputs) > 1 else None
                if pads is None or any(p < 0 or p > widest for p in pads):
                    return f"a Pad's widths ({pads}) are not the graph's own, from 0 to the base's widest slot ({widest})"
            read += [name for name in inputs if name]  # "": an optional input left out
        if len(read) != len(set(read)):
            return "it reads one tensor twice (exports read each once)"
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
        return f"it is not a readable ONNX graph ({e})"
    return None


NO_FOLDER = os.path.join(os.sep, "edgepeft: adapter graphs hold their tensors inside")


def run_adapter_graph(graph, label: str = "", widest: int | None = None) -> dict:
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
    if problem := adapter_graph_problem(graph, widest):  # before it runs: a forged node could take any memory or time
        raise CorruptArtifactError(f"{where}: {problem}; re-export the adapter")
    try:
        sess = ort.InferenceSession(graph, sess_options=options, providers=["CPUExecutionProvider"])
        outputs = sess.run(None, {})
    except Exception as e:
        raise CorruptArtifactError(
            f"{where}: ONNX Runtime cannot run the adapter graph ({str(e).splitlines()[0]}); re-export the adapter"
        ) from None
    return {o.name: v for o, v in zip(sess.get_outputs(), outputs)}
