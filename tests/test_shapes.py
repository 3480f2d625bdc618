"""The export's shape pass (exporters/shapes.py): traced shape arithmetic becomes constants only where the
graph's symbolic dims prove it, and the graph computes the same for every size of its dynamic axes."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from edgepeft.exporters.shapes import simplify_shapes


class _Attention(torch.nn.Module):
    """The shape idioms of transformers' attention: view from the input's sizes, repeat_kv, rotate_half."""

    def forward(self, x, kv):  # x (B, T, 32), kv (B, 2 kv heads, P, 8)
        b, t = x.shape[:2]
        q = x.view(b, t, 4, 8).transpose(1, 2)  # (B, 4, T, 8)
        k = kv[:, :, None].expand(b, 2, 2, kv.shape[2], 8).reshape(b, 4, kv.shape[2], 8)
        half = q.shape[-1] // 2
        q = torch.cat([-q[..., half:], q[..., :half]], dim=-1)
        scores = (q @ k.transpose(-1, -2)).softmax(-1)
        return (scores @ k).transpose(1, 2).reshape(b, t, -1)


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_traced_shape_arithmetic_becomes_constants_and_computes_the_same(tmp_path):
    path = str(tmp_path / "attention.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Attention(), (torch.randn(2, 3, 32), torch.randn(2, 2, 4, 8)), path, input_names=["x", "kv"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch", 1: "sequence"}, "kv": {0: "batch", 2: "past"}},
                          opset_version=18, dynamo=False)
    traced = onnx.load(path)
    simplified = onnx.load(path)
    assert simplify_shapes(simplified) >= 4  # the view, the expand, its reshape and the two rotate_half slices
    def count(m, op):
        return sum(n.op_type == op for n in m.graph.node)
    assert count(traced, "Shape") > 0 and count(simplified, "Shape") < count(traced, "Shape")
    assert len(simplified.graph.node) < len(traced.graph.node)
    onnx.checker.check_model(simplified)
    rng = np.random.default_rng(0)
    for b, t, p in [(1, 1, 1), (2, 3, 4), (3, 5, 2), (1, 7, 9)]:
        feeds = {"x": rng.standard_normal((b, t, 32)).astype(np.float32), "kv": rng.standard_normal((b, 2, p, 8)).astype(np.float32)}
        np.testing.assert_array_equal(_run(simplified, feeds), _run(traced, feeds))
        expected = _Attention()(*(torch.from_numpy(v) for v in feeds.values())).numpy()
        np.testing.assert_allclose(_run(simplified, feeds), expected, rtol=1e-5, atol=1e-6)
    assert simplify_shapes(simplified) == 0  # nothing left that the dims prove


def test_a_shape_the_dims_do_not_prove_is_left_computed():
    """Reshape(x, Shape(y)) is only right when y's sizes fit x's: nothing in the graph says they do."""
    nodes = [helper.make_node("Shape", ["y"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["a", "b"]),
                                           helper.make_tensor_value_info("y", TensorProto.FLOAT, ["c", "d"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    before = model.SerializeToString()
    assert simplify_shapes(model) == 0
    assert model.SerializeToString() == before
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    for shape in [(2, 6), (6, 2), (4, 3)]:
        np.testing.assert_array_equal(_run(model, {"x": x, "y": np.zeros(shape, np.float32)}), x.reshape(shape))
