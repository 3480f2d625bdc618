"""The export's shape pass (exporters/shapes.py): traced shape arithmetic becomes constants only where the
graph's symbolic dims prove it, and the graph computes the same for every size of its dynamic axes."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper
from tiny import ARCHS

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


def _trace_attention(tmp_path) -> str:
    path = str(tmp_path / "attention.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Attention(), (torch.randn(2, 3, 32), torch.randn(2, 2, 4, 8)), path, input_names=["x", "kv"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch", 1: "sequence"}, "kv": {0: "batch", 2: "past"}},
                          opset_version=18, dynamo=False)
    return path


def test_traced_shape_arithmetic_becomes_constants_and_computes_the_same(tmp_path):
    path = _trace_attention(tmp_path)
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


def test_a_failure_inside_the_pass_leaves_the_graph_as_traced(tmp_path, monkeypatch):
    import edgepeft.exporters.shapes as shapes

    model = onnx.load(_trace_attention(tmp_path))
    traced = model.SerializeToString()
    real = shapes._rewrite_once  # private: the pass must fail midway, which no real graph makes it do

    def rewrite_then_fail(m):
        assert real(m) > 0  # the graph is already rewritten when the pass fails
        raise RuntimeError("a bug in the pass")

    monkeypatch.setattr(shapes, "_rewrite_once", rewrite_then_fail)
    assert simplify_shapes(model) == 0
    assert model.SerializeToString() == traced


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


def _graph(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def _tensor(name, dims, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, dims)


def _ints(name, values, dtype=np.int64):
    return onnx.numpy_helper.from_array(np.array(values, dtype=dtype), name)


def _same_where_the_original_runs(model, feeds_list) -> int:
    """Simplify a copy; every feed the original runs gives identical outputs (and the copy runs it)."""
    simplified = onnx.ModelProto()
    simplified.CopyFrom(model)
    rewritten = simplify_shapes(simplified)
    ran = 0
    for feeds in feeds_list:
        try:
            expected = _run(model, feeds)
        except Exception:  # noqa: BLE001 - sizes the original graph cannot run: nothing to keep
            continue
        np.testing.assert_array_equal(_run(simplified, feeds), expected)
        ran += 1
    assert ran, "the original graph ran none of the feeds"
    return rewritten


def _floats(*shape):
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def test_an_initializer_a_caller_can_override_is_not_a_constant():
    """Like ``logits_to_keep``: a graph input whose initializer is only its default."""
    nodes = [helper.make_node("Unsqueeze", ["keep", "axes"], ["start"]), helper.make_node("Slice", ["x", "start", "end", "axis"], ["y"])]
    model = _graph(nodes, [_tensor("x", ["a", "b"]), _tensor("keep", [], TensorProto.INT64)], [_tensor("y", None)],
                   [_ints("keep", 0), _ints("axes", [0]), _ints("end", [1000]), _ints("axis", [1])])
    assert _same_where_the_original_runs(model, [{"x": _floats(2, 6)}, {"x": _floats(2, 6), "keep": np.array(4)}]) == 0


def test_declared_output_dims_are_not_taken_as_proven():
    """An output declared with x's batch name, built from x and y: nothing checks the declaration."""
    nodes = [helper.make_node("Concat", ["x", "y"], ["z"], axis=0), helper.make_node("Shape", ["x"], ["sx"], end=1),
             helper.make_node("Concat", ["sx", "minus_one"], ["target"], axis=0), helper.make_node("Reshape", ["z", "target"], ["w"])]
    model = _graph(nodes, [_tensor("x", ["a", 2]), _tensor("y", ["b", 2])], [_tensor("w", None), _tensor("z", ["a", 2])],
                   [_ints("minus_one", [-1])])
    _same_where_the_original_runs(model, [{"x": _floats(a, 2), "y": _floats(b, 2)} for a, b in [(1, 1), (2, 2), (1, 3)]])


def test_casts_to_floats_or_narrower_ints_are_not_followed():
    """7 / 2 * 2 is 7.0 in float32 (not 6), and 300 is 44 in uint8: neither may be baked as a slice end."""
    float_nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "one"], ["b"]),
                   helper.make_node("Cast", ["b"], ["f"], to=TensorProto.FLOAT), helper.make_node("Cast", ["two"], ["f2"], to=TensorProto.FLOAT),
                   helper.make_node("Div", ["f", "f2"], ["half"]), helper.make_node("Mul", ["half", "f2"], ["back"]),
                   helper.make_node("Cast", ["back"], ["scalar_end"], to=TensorProto.INT64),
                   helper.make_node("Unsqueeze", ["scalar_end", "zero"], ["end"]), helper.make_node("Slice", ["x", "zero", "end", "axis"], ["y"])]
    inits = [_ints("zero", [0]), _ints("axis", [1]), _ints("one", 1), _ints("two", 2)]
    model = _graph(float_nodes, [_tensor("x", [2, 7])], [_tensor("y", None)], inits)
    _same_where_the_original_runs(model, [{"x": _floats(2, 7)}])
    narrow_nodes = [helper.make_node("Shape", ["x"], ["s"], start=1), helper.make_node("Cast", ["s"], ["u"], to=TensorProto.UINT8),
                    helper.make_node("Cast", ["u"], ["end"], to=TensorProto.INT64), helper.make_node("Slice", ["x", "zero", "end", "axis"], ["y"])]
    model = _graph(narrow_nodes, [_tensor("x", [2, 300])], [_tensor("y", None)], inits[:2])
    _same_where_the_original_runs(model, [{"x": _floats(2, 300)}])


def test_int32_slice_indices_stay_int32():
    nodes = [helper.make_node("Shape", ["x"], ["s"], start=1, end=2), helper.make_node("Cast", ["s"], ["start"], to=TensorProto.INT32),
             helper.make_node("Slice", ["x", "start", "end", "axis"], ["y"])]
    model = _graph(nodes, [_tensor("x", ["a", 3])], [_tensor("y", None)],
                   [_ints("end", [1000], np.int32), _ints("axis", [0], np.int32)])
    assert _same_where_the_original_runs(model, [{"x": _floats(5, 3)}, {"x": _floats(2, 3)}]) == 1


def test_two_dimensional_int_tensors_are_not_read_as_sizes():
    """Concat along axis 1 of (2, 1) constants, flattened: [2, 3, 4, 1], not [2, 4, 3, 1]."""
    nodes = [helper.make_node("Concat", ["left", "right"], ["grid"], axis=1), helper.make_node("Reshape", ["grid", "flat"], ["target"]),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    model = _graph(nodes, [_tensor("x", [24])], [_tensor("y", None)],
                   [_ints("left", [[2], [4]]), _ints("right", [[3], [1]]), _ints("flat", [-1])])
    _same_where_the_original_runs(model, [{"x": _floats(24)}])


class _Flatten(torch.nn.Module):
    def forward(self, ids):  # GPT-2's first step: input_ids.view(-1, input_shape[-1])
        return ids.view(-1, ids.shape[-1]) * 2


def test_a_minus_one_beside_the_inputs_own_dims_is_the_inputs_dim(tmp_path):
    """view(-1, length) of a (batch, length) input is (batch, length): [0, 0] names the batch for the rest of the graph."""
    path = str(tmp_path / "flatten.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Flatten(), (torch.randn(2, 3),), path, input_names=["ids"], output_names=["y"],
                          dynamic_axes={"ids": {0: "batch", 1: "sequence"}}, opset_version=18, dynamo=False)
    traced = onnx.load(path)
    assert any(n.op_type == "Shape" for n in traced.graph.node)
    feeds = [{"ids": _floats(b, t)} for b, t in [(1, 1), (2, 3), (4, 1), (0, 3), (2, 0)]]
    assert _same_where_the_original_runs(traced, feeds) == 1
    simplified = onnx.load(path)
    simplify_shapes(simplified)
    assert not any(n.op_type == "Shape" for n in simplified.graph.node)
    target = next(t for t in simplified.graph.initializer if t.name.endswith("__const"))
    assert onnx.numpy_helper.to_array(target).tolist() == [0, 0]
    # a -1 beside a dim that is not the input's own stays: (batch, 6) -> (-1, 3) is not (batch, 3)
    nodes = [helper.make_node("Concat", ["minus_one", "three"], ["target"], axis=0), helper.make_node("Reshape", ["x", "target"], ["y"])]
    model = _graph(nodes, [_tensor("x", ["batch", 6])], [_tensor("y", None)], [_ints("minus_one", [-1]), _ints("three", [3])])
    _same_where_the_original_runs(model, [{"x": _floats(b, 6)} for b in (0, 1, 4)])
    simplify_shapes(model)
    target = next(t for t in model.graph.initializer if t.name.endswith("__const"))
    assert onnx.numpy_helper.to_array(target).tolist() == [-1, 3]


class _RepeatKV(torch.nn.Module):
    def forward(self, kv):  # (B, 2, P, 8) -> (B, 4, P, 8): no -1 in the traced target
        return kv[:, :, None].expand(kv.shape[0], 2, 2, kv.shape[2], 8).reshape(kv.shape[0], 4, kv.shape[2], 8) * 2


def test_no_new_minus_one_beside_a_dim_that_may_be_zero(tmp_path):
    """[batch, 4, past, 8] may not become [0, 4, -1, 8] when nothing stops batch from being 0 (the original runs then)."""
    path = str(tmp_path / "repeat.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_RepeatKV(), (torch.randn(2, 2, 3, 8),), path, input_names=["kv"], output_names=["y"],
                          dynamic_axes={"kv": {0: "batch", 2: "past"}}, opset_version=18, dynamo=False)
    feeds = [{"kv": _floats(b, 2, p, 8)} for b, p in [(1, 1), (2, 3), (0, 3)]]
    assert _run(onnx.load(path), feeds[-1]).shape == (0, 4, 3, 8)  # the traced graph runs batch 0: so must the rewrite
    _same_where_the_original_runs(onnx.load(path), feeds)


# --------------------------------------------------------------- the graph's own masks and positions
@pytest.mark.parametrize("past, new, embeds", [(0, 5, False), (4, 1, False), (4, 3, False), (3, 4, True)])
def test_the_export_causal_mask_is_transformers_mask(past, new, embeds):
    """SlotGraph builds the 4D mask itself (exporters/graph.causal_mask); it must be the one transformers' SDPA
    path builds from the 2D padding mask: causal from the past on, padded keys off (a padded row sees nothing)."""
    import transformers
    from transformers.masking_utils import create_causal_mask

    from tiny import tiny_config
    from edgepeft.exporters.graph import causal_mask

    config = tiny_config("llama")
    config._attn_implementation = "sdpa"
    batch, g = 3, torch.Generator().manual_seed(past + new)
    mask = torch.ones(batch, past + new, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    mask[2, : past + new - 1] = 0  # only the last position is real
    cache = transformers.DynamicCache(config=config)
    if past:
        for layer in range(config.num_hidden_layers):
            cache.update(torch.randn(batch, 2, past, 8, generator=g), torch.randn(batch, 2, past, 8, generator=g), layer)
    hidden = torch.randn(batch, new, 32, generator=g)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    expected = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=mask, cache=cache,
                                  position_ids=position_ids, allow_is_causal_skip=False)
    tokens = hidden if embeds else torch.randint(3, 128, (batch, new), generator=g)
    ours = causal_mask(mask, tokens)
    assert ours.dtype == torch.bool and ours.shape == (batch, 1, new, past + new)
    assert torch.equal(ours, expected.expand_as(ours))


@pytest.mark.parametrize("embeds", [False, True])
def test_the_export_encoder_mask_and_positions_are_transformers_own(embeds):
    """For an encoder SlotGraph passes the 4D mask, position ids and token types itself (exporters/graph): they must be
    the ones transformers builds when given none (a padded key is seen by no query; positions 0 .. T-1; type 0)."""
    import transformers
    from transformers.masking_utils import create_bidirectional_mask

    from tiny import tiny_config
    from edgepeft.exporters.graph import encoder_positions, padding_mask

    config = tiny_config("bert")
    config._attn_implementation = "sdpa"
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding
    mask[2, :5] = 0
    hidden = torch.randn(3, 6, 32, generator=g)
    expected = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask, allow_is_bidirectional_skip=False)
    tokens = hidden if embeds else ids
    ours = padding_mask(mask, tokens)
    assert ours.dtype == torch.bool and ours.shape == (3, 1, 6, 6) and torch.equal(ours, expected.expand_as(ours))
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():
        default = model.embeddings(input_ids=ids)
        given = model.embeddings(input_ids=ids, **encoder_positions(tokens))
    assert torch.equal(given, default)


@pytest.mark.parametrize("arch", ARCHS)
def test_an_export_computes_no_shape_inside_its_layers(arch, shared_export, peft_adapter, tmp_path):
    """With the mask (and BERT's positions) built from the inputs and position_ids named like input_ids, every
    reshape and expand in the attention is a constant: no Shape node is left in any layer (the benchmark Llama
    had 5 per layer before, MiniLM 6). GPT-2's Conv1D layers trace as MatMuls on (B, T, in), not a Gemm between
    two computed Reshapes."""
    import os

    from peft_refs import spec_adapter
    from tiny import layer_nodes
    from edgepeft.exporters import export
    from edgepeft.runtimes.manifest import read_base_manifest

    if arch == "gpt2":  # LoRA on c_attn only: the other Conv1D layers stay frozen layers of the base
        out = str(tmp_path / "gpt2-attn-only")
        export([spec_adapter(peft_adapter, "gpt2", "attn")], out)
    else:
        out = shared_export(arch)[0]
    if arch != "bert":  # no prompt slot here: positions are as long as the ids, and named so
        inputs = read_base_manifest(os.path.join(out, "base"))["inputs"]
        axes = {name: inputs[name]["axes"]["1"] for name in ("position_ids", "input_ids", "attention_mask")}
        assert axes["position_ids"] == axes["input_ids"] != axes["attention_mask"]
    in_layers, nodes = layer_nodes(out, ("Shape", "Gemm"))
    assert in_layers == []
    assert sum(n.op_type == "Shape" for n in nodes) <= 6
