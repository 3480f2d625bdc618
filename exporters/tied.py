"""Tied embeddings stored once: a model whose output layer is its token embedding (``tie_word_embeddings``: GPT-2,
SmolLM2, small Qwen2.5) traces to a Gather on the table and a MatMul on a constant-folded transposed copy of it,
which doubled the table on disk (GPT-2: 154 MB of its 500 MB).

    traced:  ids --Gather(table (V, H))-->  ...  h --MatMul(table.T (H, V), a second initializer)--> logits
    shared:  ids --Gather(table)-->         ...  h --MatMul(Transpose(table))--> logits

ONNX Runtime folds the Transpose when it loads the graph (the copy lives in memory only, as before). The int8/int4
quantizers quantize constant MatMul weights only: ``fold_tied_tables`` gives the quantized graph its copy back.
"""
from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper


def share_tied_tables(model) -> int:
    """Point each MatMul whose weight is a Gather table's transpose at a Transpose of that table, and drop the copy.
    Returns the number of copies dropped."""
    graph = model.graph
    inputs = {i.name for i in graph.input}  # a slot's default (a head slot's lm_head weight) stays the slot's
    inits = {t.name: t for t in graph.initializer if t.name not in inputs}
    tables = {n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in inits}
    by_shape = {tuple(inits[t].dims[::-1]): t for t in tables if len(inits[t].dims) == 2}
    readers: dict = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    dropped, outputs = [], {o for n in graph.node for o in n.output}
    for name, tensor in inits.items():
        table = by_shape.get(tuple(tensor.dims))
        users = readers.get(name, [])
        if table is None or name in tables or not users or any(u.op_type != "MatMul" or u.input[1] != name
                                                               for u in users):
            continue
        if not np.array_equal(numpy_helper.to_array(tensor), numpy_helper.to_array(inits[table]).T):
            continue
        transposed = f"{table}.T"
        if transposed not in outputs:
            graph.node.insert(0, helper.make_node("Transpose", [table], [transposed], name=transposed, perm=[1, 0]))
            outputs.add(transposed)
        for user in users:
            user.input[1] = transposed
        dropped.append(tensor)
    for tensor in dropped:
        graph.initializer.remove(tensor)
    return len(dropped)


def is_shared_table(node) -> bool:
    """A Transpose ``share_tied_tables`` wrote (named after its table)."""
    return node.op_type == "Transpose" and node.name == f"{node.input[0]}.T"


def fold_tied_tables(model) -> int:
    """The reverse, for the quantizers: each Transpose of an initializer becomes an initializer again (the MatMul's
    constant weight). Returns the number folded."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    folded = [n for n in graph.node if is_shared_table(n) and n.input[0] in inits]
    for node in folded:
        array = np.ascontiguousarray(numpy_helper.to_array(inits[node.input[0]]).T)
        graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        graph.node.remove(node)
    return len(folded)
