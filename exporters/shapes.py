"""Replace the shape arithmetic a traced graph computes at run time by constants, where its symbolic dims prove them.

The tracer writes ``q.view(batch, length, heads, head_dim)`` as Shape -> Gather -> Unsqueeze
-> Concat -> Reshape, and ``expand``/slices the same way, in every layer. ONNX Runtime cannot
fold these (batch and length are dynamic), so a decode step runs hundreds of tiny ops that
only recompute what the graph's inputs already say. This pass rewrites the shape inputs:

    Reshape   a target dim that is the input's own dim at the same position (same symbolic
              name) becomes 0 (ONNX: copy it); one unknown becomes -1, but beside a copied
              dim only when the graph already fails with that dim at 0 (ONNX Runtime cannot
              infer a -1 next to a 0); a -1 whose every other dim is the input's own, in a
              target of the input's rank, becomes 0 too (GPT-2's ``view(-1, length)``)
    Expand    a target dim equal to the input's aligned dim becomes 1 (broadcast keeps it)
    Slice     starts/ends computed from fixed sizes become constants (of their own int type)

and drops the nodes nothing reads any more. Dims are compared by name after ONNX's own
shape inference from the graph inputs, whose names denote the same size wherever they
appear; a dim it cannot name is never matched. What inference sees leaves out anything
that is not proven: the exporter's value_info and output shapes, and the values of
initializers that are also inputs (a caller may override them, as ``logits_to_keep``).
Sizes are followed through integer ops only (a cast to float or to a narrower int ends
them). Every rewritten graph computes the same as the traced one for every input size
it runs with (``tests/test_shapes.py``).
Measured on the benchmark Llama (``samples/bench_generate.py``): a decode step ran 712 nodes
after ONNX Runtime's optimizations, 442 after this pass, and 323 once the graph built its own
causal mask (``graph.causal_mask``: transformers' mask has dims inference cannot name, which
hid the attention's reshapes); see README, Measured.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

_INTS = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
_SMALL = 64  # elements: the shape-sized int tensors this pass reads


def _shape_sized(t: onnx.TensorProto) -> bool:
    return t.data_type in _INTS and len(t.dims) <= 1 and int(np.prod(t.dims)) <= _SMALL


def _inference_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """What shape inference sees: no weights data, no value_info, and no output shapes (the exporter's
    annotations, which nothing checks); initializers that a caller may override are inputs only."""
    g = model.graph
    declared = {i.name for i in g.input}
    small = [t for t in g.initializer if _shape_sized(t) and t.name not in declared]
    kept = {t.name for t in small} | declared
    big_inputs = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer if t.name not in kept]
    outputs = [helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, None) for o in g.output]
    graph = helper.make_graph(list(g.node), g.name, [*g.input, *big_inputs], outputs, small)
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def _dims(model: onnx.ModelProto) -> tuple[dict, dict]:
    """({tensor: [fixed size (int) | symbolic name (str) | None]}, {tensor: element type}) from ONNX shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_inference_model(model), data_prop=True)
    except Exception:  # an optimization only: a graph ONNX cannot infer is left as it is
        return {}, {}
    dims, types = {}, {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        t = vi.type.tensor_type
        types[vi.name] = t.elem_type
        if t.HasField("shape"):
            dims[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return dims, types


def _constants(graph) -> dict:
    """Scalar and 1-D int constants (an initializer that is also a graph input can be overridden: not one)."""
    declared = {i.name for i in graph.input}
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer if _shape_sized(t) and t.name not in declared}
    for n in graph.node:
        if n.op_type == "Constant":
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            if value is not None and _shape_sized(value):
                arrays[n.output[0]] = numpy_helper.to_array(value)
    return {k: ("scalar", int(v)) if v.ndim == 0 else [int(x) for x in v.reshape(-1)] for k, v in arrays.items()}


def _equal(a, b):
    """Whether two dims are equal: True/False when known, None when not (a size is never negative)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, str) and a == b:
        return True
    if (isinstance(a, str) and isinstance(b, int) and b < 0) or (isinstance(b, str) and isinstance(a, int) and a < 0):
        return False
    return None


def _scalar_op(op: str, a, b):
    if not (isinstance(a, int) and isinstance(b, int)):
        return None
    if op == "Div":
        return a // b if b > 0 and a >= 0 else None
    return {"Mul": a * b, "Add": a + b, "Sub": a - b}[op]


def _values(graph, dims: dict, types: dict, constants: dict) -> dict:
    """What each small int tensor holds, element by element: an int, a dim's name, or None.

    Vectors (1-D) are lists, scalars ("scalar", element); ``constants`` (``_constants``) seed
    them. Only ops that move dims around are followed, on integer tensors, along axis 0.
    """
    val = dict(constants)

    def vector(name):
        v = val.get(name)
        return v if isinstance(v, list) else None

    def scalar(name):
        v = val.get(name)
        return v[1] if isinstance(v, tuple) else None

    for n in graph.node:
        i, op, out = n.input, n.op_type, n.output[0] if n.output else None
        attrs = {a.name: a for a in n.attribute}
        axis = attrs["axis"].i if "axis" in attrs else 0
        axes = val.get(i[1]) if len(i) > 1 and i[1] else ([*attrs["axes"].ints] if "axes" in attrs else None)
        if out is None or types.get(out) not in (*_INTS, *((onnx.TensorProto.BOOL,) if op == "Equal" else ())):
            continue  # a float, bool or unknown result: not a size (Equal's bools feed Where)
        if op == "Shape" and i[0] in dims:
            attrs = {a.name: a.i for a in n.attribute}
            d = [x if (isinstance(x, int) and x > 0) or isinstance(x, str) else None for x in dims[i[0]]]
            val[out] = d[attrs.get("start", 0):attrs.get("end", len(d))]
        elif op == "Gather" and axis == 0 and vector(i[0]) is not None and i[1] in val:
            v, index = vector(i[0]), val[i[1]]
            if all(isinstance(k, int) and -len(v) <= k < len(v) for k in ([index[1]] if isinstance(index, tuple) else index)):
                val[out] = ("scalar", v[index[1]]) if isinstance(index, tuple) else [v[k] for k in index]
        elif op == "Unsqueeze" and i[0] in val and isinstance(val[i[0]], tuple) and axes in ([0], [-1]):
            val[out] = [scalar(i[0])]
        elif op == "Squeeze" and vector(i[0]) is not None and len(vector(i[0])) == 1 and axes in (None, [0], [-1]):
            val[out] = ("scalar", vector(i[0])[0])
        elif op == "Concat" and axis in (0, -1) and all(vector(x) is not None for x in i):
            val[out] = [e for x in i for e in vector(x)]
        elif op == "Identity" and i[0] in val:
            val[out] = val[i[0]]
        elif op == "Cast" and i[0] in val and types.get(i[0]) in _INTS:
            v = val[i[0]]
            elements = [v[1]] if isinstance(v, tuple) else v
            if types[out] == onnx.TensorProto.INT64 or all(isinstance(e, str) or e is None or -2**31 <= e < 2**31
                                                           for e in elements):
                val[out] = v  # a size survives a cast to int64, and to int32 when it fits
        elif op == "Reshape" and vector(i[0]) is not None and vector(i[1]) in ([-1], [len(vector(i[0]))]):
            val[out] = vector(i[0])
        elif op == "ConstantOfShape" and vector(i[0]) is not None and len(vector(i[0])) == 1 and isinstance(vector(i[0])[0], int):
            fill = next((a.t for a in n.attribute if a.name == "value"), None)
            if fill is None or fill.data_type in _INTS:
                val[out] = [int(numpy_helper.to_array(fill).reshape(-1)[0]) if fill is not None else 0] * vector(i[0])[0]
        elif op == "Mul" and vector(i[0]) is not None and isinstance(scalar(i[1]), int):
            val[out] = [e * scalar(i[1]) if isinstance(e, int) else None for e in vector(i[0])]
        elif op == "Equal" and vector(i[0]) is not None and vector(i[1]) is not None and len(vector(i[0])) == len(vector(i[1])):
            val[out] = [_equal(a, b) for a, b in zip(vector(i[0]), vector(i[1]))]
        elif op == "Where" and all(vector(x) is not None for x in i) and len({len(vector(x)) for x in i}) == 1:
            val[out] = [None if c is None else (a if c else b) for c, a, b in zip(*(vector(x) for x in i))]
        elif op in ("Div", "Mul", "Add", "Sub") and all(x in val and isinstance(val[x], tuple) for x in i):
            val[out] = ("scalar", _scalar_op(op, scalar(i[0]), scalar(i[1])))
    return val


def _nonzero_dims(graph, dims: dict, val: dict) -> set:
    """Dim names the graph cannot run with at size 0.

    A Reshape whose target holds -1 and, at a position k, the input's own dim k (by name)
    fails when that dim is 0: 0 then copies a 0 and ONNX Runtime cannot infer the -1.
    Every node of a graph without subgraphs that is read runs, so the whole graph fails.
    """
    names = set()
    for n in graph.node:
        if n.op_type != "Reshape" or _allowzero(n):
            continue
        target, x = val.get(n.input[1]), dims.get(n.input[0])
        if isinstance(target, list) and x is not None and -1 in target:
            for k, e in enumerate(target[:len(x)]):
                if isinstance(x[k], str) and (e == x[k] or e == 0):
                    names.add(x[k])
    return names


def _allowzero(node) -> bool:
    """A Reshape whose 0 means size 0, not "copy the input's dim": left alone."""
    return any(a.name == "allowzero" and a.i for a in node.attribute)


def _reshape_target(target: list, x: list, nonzero: set) -> list | None:
    out, unknown = [], 0
    for k, e in enumerate(target):
        if isinstance(e, int) and e != 0:
            out.append(e)  # a fixed size, or -1
        elif k < len(x) and _equal(e, x[k]) and not isinstance(e, int):
            out.append(0)  # the input's own dim at this position
        else:
            out.append(None)
            unknown += 1
    if unknown > 1 or (unknown == 1 and -1 in out):
        return None
    if unknown == 0 and out.count(-1) == 1 and len(out) == len(x) and all(
            e == 0 or (isinstance(x[k], int) and e == x[k]) for k, e in enumerate(out) if e != -1):
        # every other dim is the input's own: the -1 is the input's dim too (where the graph runs, none is 0)
        return [0 if e == -1 else e for e in out]
    if unknown == 1 and any(e == 0 and x[k] not in nonzero for k, e in enumerate(out)):
        return None  # a new -1 beside a copied dim that may be 0: ONNX Runtime cannot infer it then
    return [-1 if e is None else e for e in out]


def _expand_target(target: list, x: list) -> list | None:
    if len(target) < len(x):
        return None
    out, offset = [], len(target) - len(x)
    for k, e in enumerate(target):
        own = x[k - offset] if k >= offset else 1
        if isinstance(e, int) and e > 0:
            out.append(e)
        elif isinstance(e, str) and own == e:
            out.append(1)  # broadcasting keeps the input's dim
        else:
            return None
    return out


def _rewrite_once(model: onnx.ModelProto) -> int:
    g = model.graph
    dims, types = _dims(model)
    constants = _constants(g)
    val = _values(g, dims, types, constants)
    nonzero = _nonzero_dims(g, dims, val)
    constant = set(constants)
    names = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    added, rewritten = [], 0

    def bind(node, position, values):
        nonlocal rewritten
        name = f"{node.input[position]}__const"
        while name in names:
            name += "_"
        names.add(name)
        dtype = np.int32 if types.get(node.input[position]) == onnx.TensorProto.INT32 else np.int64
        added.append(numpy_helper.from_array(np.array(values, dtype=dtype), name))
        node.input[position] = name
        rewritten += 1

    for n in g.node:
        if n.op_type in ("Reshape", "Expand") and len(n.input) > 1 and n.input[1] not in constant:
            target, x = val.get(n.input[1]), dims.get(n.input[0])
            if not isinstance(target, list) or x is None:
                continue
            if n.op_type == "Reshape" and _allowzero(n):
                continue
            new = _reshape_target(target, x, nonzero) if n.op_type == "Reshape" else _expand_target(target, x)
            if new is not None:
                bind(n, 1, new)
        elif n.op_type == "Slice":
            for position in (1, 2):  # starts, ends
                source = n.input[position] if len(n.input) > position else ""
                v = val.get(source)
                if source and source not in constant and isinstance(v, list) and all(isinstance(e, int) for e in v):
                    bind(n, position, v)
    g.initializer.extend(added)
    return rewritten


def _drop_unread_nodes(graph) -> None:
    while True:
        read = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
        alive = [n for n in graph.node if any(o in read for o in n.output)]
        if len(alive) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(alive)


def _drop_unread_initializers(graph) -> None:
    keep = {x for n in graph.node for x in n.input} | {i.name for i in graph.input}
    kept = [t for t in graph.initializer if t.name in keep]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def simplify_shapes(model: onnx.ModelProto, rounds: int = 8) -> int:
    """Rewrite ``model`` in place; returns how many shape inputs became constants.

    Each round's rewrites give shape inference more to name, so it runs until nothing
    changes. Graphs with subgraphs (If/Loop/Scan) are left alone: an outer name read
    only inside a subgraph would look unread here.
    """
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return 0
    nodes, initializers = [onnx.NodeProto.FromString(n.SerializeToString()) for n in g.node], len(g.initializer)
    total = 0
    try:
        _drop_unread_nodes(g)  # a node nothing reads never runs: it cannot show which sizes fail
        for _ in range(rounds):
            changed = _rewrite_once(model)  # appends its constants; nothing is removed before the end
            _drop_unread_nodes(g)
            total += changed
            if not changed:
                break
    except Exception:  # noqa: BLE001 - an optimization only: a failure in it leaves the traced graph as it was
        del g.node[:]
        g.node.extend(nodes)
        del g.initializer[initializers:]
        return 0
    _drop_unread_initializers(g)
    return total
