"""``--quantize int8|int4``: quantized base weights, float32 adapter slots, checked by relative error."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch

from peft_refs import spec_adapter
from tiny import sample_batch
from edgepeft.errors import ConfigError, ExportValidationError
from edgepeft.exporters import export
from edgepeft.exporters.quantize import relative_error
from edgepeft.runtimes import Runtime


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


# quantization -> (its weight op, the largest relative error against PyTorch the tiny Llama may show)
# tiny Llama, measured: int8 0.0014-0.0024 (AVX2 CPU; 0.008-0.033 there before the export took 7-bit weights), int4 0.010-0.016
KINDS = {"int8": ("MatMulInteger", 0.01), "int4": ("MatMulNBits", 0.05)}


@pytest.fixture(scope="module")
def quantized_llama(workdir, peft_adapter):
    dirs = [spec_adapter(peft_adapter, "llama", "qv"), spec_adapter(peft_adapter, "llama", "all")]
    made = {}

    def get(kind):
        if kind not in made:
            out = str(workdir / f"{kind}-llama")
            made[kind] = out, dirs, export(dirs, out, quantize=kind)
        return made[kind]

    return get


@pytest.fixture(scope="module")
def int8_llama(quantized_llama):
    return quantized_llama("int8")


@pytest.mark.parametrize("kind", list(KINDS))
def test_quantized_export_quantizes_base_weights_and_keeps_every_slot(kind, quantized_llama, shared_export):
    out, _, report = quantized_llama(kind)
    op, bound = KINDS[kind]
    graph = onnx.load(os.path.join(out, "base", "model.onnx"), load_external_data=False)
    initializers = {i.name for i in graph.graph.initializer}
    slot_inputs = {i.name for i in graph.graph.input} & initializers
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count(op) == 2 * 4 + 1  # per layer: fused q/k/v, o, fused gate/up, down; plus lm_head
    float_weights = [n.name for n in graph.graph.node if n.op_type == "MatMul" and n.input[1] in initializers - slot_inputs]
    assert float_weights == []  # no frozen weight left in float32
    slot_matmuls = [n for n in graph.graph.node if n.op_type == "MatMul" and slot_inputs.intersection(n.input)]
    assert slot_matmuls  # the LoRA products stay float32 MatMuls on the slot inputs
    rt = Runtime(out)
    assert rt.manifest["quantization"] == kind
    from edgepeft.runtimes.access import sha256_file  # inspect's digests: of the quantized files, hashed once

    assert rt.manifest["file_sha256"] == {n: sha256_file(os.path.join(out, "base", n)) for n in rt.manifest["file_bytes"]}
    fp32 = Runtime(shared_export("llama")[0])
    assert {s.name for s in rt.manifest["slots"]} >= {n for n in fp32.slots if n.startswith("lora_")} & set(rt.slots)
    quantized_checks = [c for c in report["checks"] if "relative_error" in c]
    assert len(quantized_checks) == 3 and all(c["relative_error"] <= bound for c in quantized_checks), quantized_checks
    assert all(c["effect_error"] <= 10 * bound for c in quantized_checks[1:]), quantized_checks  # the adapters' effect
    assert all(c["max_abs_diff"] <= 1e-4 * 10 for c in report["checks"] if "relative_error" not in c)  # float32 first


@pytest.mark.parametrize("kind", list(KINDS))
def test_quantized_adapters_still_switch_and_stay_close_to_float32(kind, quantized_llama, shared_export):
    out, _, _ = quantized_llama(kind)
    bound = KINDS[kind][1]
    rt, fp32 = Runtime(out), Runtime(shared_export("llama")[0])
    ids, mask = sample_batch()
    valid = mask.astype(bool)
    outputs, errors = {}, {}
    for adapter in (None, "qv", "all"):
        q = rt.forward(ids, mask, adapter=adapter)["logits"]
        f = fp32.forward(ids, mask, adapter=adapter)["logits"]
        errors[adapter] = relative_error(q[valid], f[valid])
        assert errors[adapter] < bound, (adapter, errors)
        outputs[adapter] = q
    # the adapters still act: their effect is well above the quantization error
    for adapter in ("qv", "all"):
        effect = relative_error(outputs[adapter][valid], outputs[None][valid])
        assert effect > max(0.1, 2 * max(errors.values())), (adapter, effect, errors)
    generated = rt.generate(ids, mask, adapter="all", max_new_tokens=8)
    assert generated.shape == (2, ids.shape[1] + 8)


def test_a_tied_output_layer_reads_the_embedding_table_stored_once(shared_export, workdir, peft_adapter):
    """GPT-2 ties lm_head to wte: the trace stored the table and a transposed copy of it (GPT-2: 154 MB of 500)."""
    import numpy as np
    from onnx import numpy_helper
    from tiny import tiny_config

    graph = onnx.load(os.path.join(shared_export("gpt2")[0], "base", "model.onnx")).graph
    table = next(numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith("wte.weight"))
    copies = [i.name for i in graph.initializer if i.dims == list(table.shape[::-1])
              and np.array_equal(numpy_helper.to_array(i), table.T)]
    assert copies == [] and any(n.op_type == "Transpose" for n in graph.node)
    # an adapter that trains lm_head whole: the head slot's default equals wte.T and must stay the slot's (it was
    # dropped, and the graph read Transpose(wte): every adapter's head ignored, validation off by 3.9)
    head = peft_adapter("gpt2", "tied-head", target_modules=["c_attn"], modules_to_save=["lm_head"])
    report = export([head], str(workdir / "gpt2-tied-head"))
    assert max(c["max_abs_diff"] for c in report["checks"]) < 1e-4
    out = str(workdir / "int4-gpt2-tied")  # quantized: lm_head still a quantized MatMul of its own
    export([spec_adapter(peft_adapter, "gpt2", "attn")], out, quantize="int4")
    graph = onnx.load(os.path.join(out, "base", "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert "Transpose" not in ops and ops.count("MatMulNBits") == 4 * tiny_config("gpt2").n_layer + 1  # lm_head too


def test_int8_gpt2_quantizes_every_conv1d(workdir, peft_adapter):
    """GPT-2's Conv1D layers outside the adapter's slots (c_proj, c_fc) are frozen MatMuls too: all int8."""
    from tiny import tiny_config

    out = str(workdir / "int8-gpt2")
    report = export([spec_adapter(peft_adapter, "gpt2", "attn")], out, quantize="int8")
    graph = onnx.load(os.path.join(out, "base", "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulInteger") == 4 * tiny_config("gpt2").n_layer + 1 and "Gemm" not in ops  # c_attn, attn c_proj, c_fc, mlp c_proj; lm_head
    quantized_checks = [c for c in report["checks"] if "relative_error" in c]  # the base alone and with the adapter
    assert len(quantized_checks) == 2 and all(c["relative_error"] < KINDS["int8"][1] for c in quantized_checks), quantized_checks


def test_reusing_an_int8_base_validates_new_adapters_by_relative_error(int8_llama, peft_adapter, tmp_path):
    import shutil

    out, dirs, _ = int8_llama
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    report = export([peft_adapter("llama", "qv-r2", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])], copy,
                    quantize="int8")
    assert report["base"]["reused"]
    assert all("relative_error" in c for c in report["checks"])
    assert "qv-r2" in Runtime(copy).adapter_names
    for folder in (out, copy):  # ONNX Runtime's adapter files are written by default for float bases only
        for name in os.listdir(os.path.join(folder, "adapters")):
            assert not os.path.exists(os.path.join(folder, "adapters", name, "adapter.onnx_adapter")), (folder, name)


def test_a_float32_export_into_an_int8_folder_is_refused_and_changes_nothing(int8_llama, peft_adapter):
    out, dirs, _ = int8_llama
    before = {p: os.path.getmtime(os.path.join(out, p)) for p in _tree(out)}
    with pytest.raises(ConfigError, match="int8 base.*float32.*export with --quantize int8 to add to it, or into another"):
        export([dirs[0]], out)
    assert {p: os.path.getmtime(os.path.join(out, p)) for p in _tree(out)} == before


def test_bad_quantize_options(peft_adapter, tmp_path):
    with pytest.raises(ConfigError, match="int3.*int8, int4"):
        export([spec_adapter(peft_adapter, "llama", "qv")], str(tmp_path / "a"), quantize="int3")
    with pytest.raises(ConfigError, match="qtol"):
        export([spec_adapter(peft_adapter, "llama", "qv")], str(tmp_path / "b"), quantize="int8", qtol=0)
    # Python callers: no TypeError; an int no float holds was an OverflowError after the whole export
    for arg, value in [("qtol", "0.1"), ("atol", "1e-4"), ("qtol", None), ("atol", True), ("qtol", 10 ** 400),
                       ("atol", 10 ** 400)]:
        with pytest.raises(ConfigError, match=f"--{arg} must be a number"):
            export([spec_adapter(peft_adapter, "llama", "qv")], str(tmp_path / "c"), quantize="int8", **{arg: value})
    assert not os.path.exists(tmp_path / "c")


def test_a_quantized_graph_outside_tolerance_writes_nothing(peft_adapter, tmp_path):
    out = tmp_path / "strict"
    with pytest.raises(ExportValidationError, match="relative RMS error.*Loosen --qtol if this model tolerates it, or "
                       "export without --quantize \\(into another --out when OUT holds a quantized base\\)"):
        export([spec_adapter(peft_adapter, "llama", "qv")], str(out), quantize="int8", qtol=1e-9)
    assert not os.path.exists(out / "base") and not os.path.exists(out / "adapters" / "qv")
    assert [p for p in _tree(out) if ".staging" in p] == []


def test_a_quantized_graph_no_closer_than_zeros_fails_whatever_qtol():
    """Found by a hunt: below 1 the relative error is the RMS error itself, so a graph of zeros on logits of RMS 0.114
    passed the default --qtol 0.2."""
    from edgepeft.errors import ExportValidationError
    from edgepeft.exporters.validate import compare_outputs

    ref = np.random.default_rng(0).normal(0, 0.114, (2, 8)).astype(np.float32)
    with pytest.raises(ExportValidationError, match=r"^OUT: logits is no closer to PyTorch's than zeros are \(RMS error "
                                                    r"0\.1.*\): the quantized graph is broken; nothing was written"):
        compare_outputs("logits", np.zeros_like(ref), ref, None, "seq-cls", 1e-4, "OUT", qtol=0.2)
    close = ref + np.random.default_rng(1).normal(0, 0.01, ref.shape).astype(np.float32)  # a quantized graph's noise
    assert compare_outputs("logits", close, ref, None, "seq-cls", 1e-4, "OUT", qtol=0.2)["relative_error"] < 0.02


def test_a_quantized_graph_that_lost_its_adapter_slots_is_refused(peft_adapter, tmp_path, monkeypatch):
    """What quantize.py guards against: the quantized graph reads each slot's neutral value, not the input. The adapter
    then changed nothing, and passed --qtol 0.2 (0.16 relative error: its whole effect)."""
    import sys

    export_module = sys.modules["edgepeft.exporters.base_graph"]  # quantize_stage's
    real = export_module.quantize_graph

    def quantize_and_cut_slots(path, quantize):
        info = real(path, quantize)
        m = onnx.load(path)
        slots = {i.name for i in m.graph.input} & {i.name for i in m.graph.initializer}
        for init in [i for i in m.graph.initializer if i.name in slots]:
            baked = onnx.TensorProto()
            baked.CopyFrom(init)
            baked.name += ".baked"
            m.graph.initializer.append(baked)
        for node in m.graph.node:
            node.input[:] = [x + ".baked" if x in slots else x for x in node.input]
        os.unlink(path + ".data")
        onnx.save_model(m, path, save_as_external_data=True, location="model.onnx.data")
        return info

    monkeypatch.setattr(export_module, "quantize_graph", quantize_and_cut_slots)
    out = tmp_path / "cut"
    with pytest.raises(ExportValidationError, match=r"adapter all, int8 changes the quantized graph's output by 0 RMS "
                       r"where it changes PyTorch's by .* \(1.00 of its effect lost or wrong"):
        export([spec_adapter(peft_adapter, "llama", "all")], str(out), quantize="int8")
    assert not os.path.exists(out)


@pytest.mark.parametrize("kind", list(KINDS))
def test_quantized_with_external_weights_and_merge(kind, peft_adapter, tmp_path):
    out = str(tmp_path / "ext")
    export([spec_adapter(peft_adapter, "qwen2", "qv")], out, quantize=kind)
    assert _tree(os.path.join(out, "base")).count("model.onnx.data") == 1
    assert not [p for p in _tree(out) if ".quantized" in p]
    assert Runtime(out).manifest["quantization"] == kind
    merged = str(tmp_path / "merged")
    report = export([spec_adapter(peft_adapter, "qwen2", "qv")], merged, merge=True, quantize=kind)
    assert [("relative_error" in c) for c in report["checks"]] == [False, True]
    ids, mask = sample_batch()
    ours, ref = Runtime(merged).forward(ids, mask)["logits"], Runtime(out).forward(ids, mask, adapter="qv")["logits"]
    assert relative_error(ours, ref) < 2 * KINDS[kind][1]


def test_cli_export_quantize(peft_adapter, tmp_path):
    from click.testing import CliRunner

    from edgepeft.cli import cli

    for kind in KINDS:
        out = str(tmp_path / f"cli-{kind}")
        result = CliRunner().invoke(cli, ["export", "--adapter", spec_adapter(peft_adapter, "gpt2", "attn"), "--out", out, "--quantize", kind])
        assert result.exit_code == 0, result.output
        assert f"{kind} graph: max relative error" in result.output
        result = CliRunner().invoke(cli, ["inspect", out])
        assert f"{kind} weights" in result.output


def test_exports_keep_the_usual_permissions(quantized_llama, shared_export):
    """Staged in mkdtemp/mkstemp (0700/0600) and renamed into place: OUT stays readable as a plain write would be."""
    import stat

    umask = os.umask(0)
    os.umask(umask)
    for out in (shared_export("llama")[0], quantized_llama("int8")[0], quantized_llama("int4")[0]):
        for root, dirs, files in os.walk(out):
            for name, usual in [(d, 0o777) for d in dirs] + [(f, 0o666) for f in files]:
                mode = stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode)
                assert mode == usual & ~umask, (os.path.join(root, name), oct(mode))


def test_int4_leaves_the_process_logging_alone(peft_adapter, tmp_path, capfd):
    """ONNX Runtime's 4-bit quantizer configures the root logger at INFO when imported and logs every weight."""
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    export([spec_adapter(peft_adapter, "qwen2", "qv")], str(tmp_path / "out"), quantize="int4")
    assert (root.level, root.handlers) == (level, handlers)
    assert "[INFO]" not in capfd.readouterr().err


@pytest.mark.parametrize("kind, share", [("int8", 0.4), ("int4", 0.25)])
def test_embedding_tables_are_quantized_too(kind, share, tmp_path):
    """A Llama whose word embeddings are most of its weights: the table is quantized (int8 rows, for int4 bases
    too), the graph shrinks to its share of float32, and the export still validates against PyTorch."""
    import peft
    import torch
    import transformers as tf

    from peft_refs import randomize_adapter
    from tiny import load_reference_base
    from edgepeft.runtimes.describe import folder_bytes

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=8192, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    base = str(tmp_path / "base")
    tf.LlamaForCausalLM(config).save_pretrained(base)
    model = peft.get_peft_model(load_reference_base(base, "causal-lm"),
                                peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapter(model, 3)
    model.peft_config["default"].base_model_name_or_path = base
    model.save_pretrained(tmp_path / "a")
    sizes = {}
    for q in (None, kind):
        out = str(tmp_path / f"out-{q}")
        report = export([str(tmp_path / "a")], out, quantize=q)
        sizes[q] = folder_bytes(os.path.join(out, "base"))
    assert report["checks"][-1]["relative_error"] < 0.05
    graph = onnx.load(os.path.join(out, "base", "model.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert "Cast" in ops and not any(i.name.endswith("embed_tokens.weight") for i in graph.graph.initializer)
    assert Runtime(out).manifest["quantized_tables"] == 1
    assert sizes[kind] <= share * sizes[None], sizes


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_frozen_weight_product_is_quantized_gemms_too(kind, peft_adapter, tmp_path):
    """BERT's pooler is a Gemm: int8's quantizer takes it, int4's takes MatMul only, so the int4 export rewrites
    it as MatMul + Add first. Either way no MatMul or Gemm with a frozen float32 weight is left."""
    adapter = peft_adapter("bert", "cls-q", task="seq-cls", num_labels=3, r=4, target_modules=["query", "value"])
    out = str(tmp_path / kind)
    export([adapter], out, quantize=kind)
    graph = onnx.load(os.path.join(out, "base", "model.onnx"), load_external_data=False).graph
    frozen = {t.name for t in graph.initializer} - {i.name for i in graph.input}  # slots are inputs
    left = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in frozen]
    assert left == []
    assert any("pooler" in n.name for n in graph.node if n.op_type == KINDS[kind][0]) or kind == "int8"


def test_gemms_sharing_a_weight_share_its_transpose():
    """Two transB Gemms on one weight (tied heads): one transposed initializer, the same outputs, the old weight
    gone once nothing reads it untransposed."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgepeft.exporters.quantize import _gemms_as_matmuls

    rng = np.random.default_rng(0)
    w, c = rng.random((4, 3), dtype=np.float32), rng.random(4, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "c"], ["y1"], transB=1), helper.make_node("Gemm", ["x", "W"], ["y2"], transB=1)],
        "tied", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [2, 4]) for y in ("y1", "y2")],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(c, "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    x = rng.random((2, 3), dtype=np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    _gemms_as_matmuls(model.graph, set())
    assert sorted(t.name for t in model.graph.initializer) == ["W.T", "c"]
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add", "MatMul"]
    for ours, ref in zip(ort.InferenceSession(model.SerializeToString()).run(None, {"x": x}), want):
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_the_base_outputs_are_computed_once_for_every_adapters_effect(peft_adapter, tmp_path, monkeypatch):
    """Each adapter's effect on a quantized base is judged against the base's outputs: one PyTorch run of the base
    per base graph (its own check), not one more per adapter."""
    import sys

    validate_module = sys.modules["edgepeft.exporters.validate"]
    real, models = validate_module.reference_output, []

    def counted(model, *args):
        models.append(type(model).__name__)
        return real(model, *args)

    monkeypatch.setattr(validate_module, "reference_output", counted)
    dirs = [spec_adapter(peft_adapter, "llama", "qv"), spec_adapter(peft_adapter, "llama", "all")]
    report = export(dirs, str(tmp_path / "out"), quantize="int8")
    assert all(c["effect_error"] is not None for c in report["checks"][-2:]), report["checks"]
    # the float32 graph and the int8 one: the base once each, each adapter once each
    assert models.count("PeftModel") == 4 and len(models) == 6, models


def test_a_quantized_adapters_effect_is_measured_against_the_base_on_its_own_sample(monkeypatch):
    """The base's outputs were kept per seed: an adapter checked on fewer tokens (a prompt on a model with few
    positions: sample_shape) had its effect measured against the base's outputs for other ids."""
    from edgepeft.exporters import validate

    class Rt:
        type_vocab_size = None  # a graph without BERT's segments

        def forward(self, ids, mask, token_type_ids=None):
            return {"logits": ids[..., None].astype(np.float32)}

    monkeypatch.setattr(validate, "reference_output", lambda model, ids, mask, task, types: ids[..., None].float().numpy())
    base = validate.BaseOutputs(Rt(), None, "causal-lm")
    for length in (7, 4, 7):
        ids = torch.randint(0, 99, (16, length), generator=torch.Generator().manual_seed(length))
        ours, ref = base.outputs(1, ids, torch.ones_like(ids))
        assert np.array_equal(ours[..., 0], ids.numpy()) and np.array_equal(ref[..., 0], ids.numpy())


def test_int4_rows_of_a_mixed_batch_stay_within_rounding_of_the_row_alone(quantized_llama):
    """python-api.md: ONNX Runtime's 4-bit MatMul rounds its inputs to int8 (accuracy level 4), where batching's
    float noise (1e-7) can flip a rounding: a row stays within a few 1e-3 of itself alone (3e-3 on a tiny Qwen2 in
    a bug hunt), not the float32 base's 1e-5."""
    rt = Runtime(quantized_llama("int4")[0])
    specs = [None, *rt.adapter_names] * 2
    ids = np.random.default_rng(3).integers(3, 128, size=(len(specs), 9)).astype(np.int64)
    mask = np.ones_like(ids)
    for r in range(len(specs)):  # left padding, a different length per row
        ids[r, :r], mask[r, :r] = 0, 0
    batch = rt.forward(ids, mask, adapter=specs)["logits"]
    worst = max(float(np.abs(batch[r, r:] - rt.forward(ids[r:r + 1, r:], adapter=spec)["logits"][0]).max())
                for r, spec in enumerate(specs))
    assert worst <= 1e-2


@pytest.mark.parametrize("arch, ops", [("llama", "standard"), ("bert", "contrib")])  # an encoder's: standard ops always
def test_int4_with_standard_ops_says_its_matmuls_are_onnx_runtimes_own(peft_adapter, tmp_path, arch, ops):
    """A hunt: `--ops standard --quantize int4` was described as standard ops (inspect: "standard ops"), its every
    quantized MatMul a com.microsoft MatMulNBits; a runtime without ONNX Runtime's own ops could not run it. So was
    any int4 BERT, exported on standard ops whatever --ops says (a later hunt)."""
    import warnings

    from edgepeft.runtimes import EdgePeftWarning

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        export([spec_adapter(peft_adapter, arch, "qv")], str(tmp_path / "out"), quantize="int4", ops=ops)
    notes = [str(w.message) for w in said if issubclass(w.category, EdgePeftWarning)]
    assert any(n.startswith("--quantize int4 stores the weights for ONNX Runtime's MatMulNBits, a com.microsoft op, "
                            "whatever --ops says") for n in notes), notes
    graph = onnx.load(str(tmp_path / "out" / "base" / "model.onnx"), load_external_data=False).graph
    assert any(n.op_type == "MatMulNBits" and n.domain == "com.microsoft" for n in graph.node)
    from click.testing import CliRunner  # inspect said "int4 weights opset 18 standard ops" (a later hunt)

    from edgepeft.cli import cli
    said = CliRunner().invoke(cli, ["inspect", str(tmp_path / "out")])
    assert " int4 weights (com.microsoft MatMulNBits) opset 18 standard ops" in said.output, said.output
