"""--ops contrib (the default for Llama/Qwen2/GPT-2 causal LMs) against --ops standard: the fused kernels are in
the graph, both builds answer as PyTorch and HF PEFT do (every other decoder test runs on the contrib build: the
tiny Llama, Qwen2 and GPT-2 have head size 16), and one OUT never mixes the two."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch

from peft_refs import greedy_reference
from tiny import DECODER_ARCHS, sample_batch, tiny_config, torch_outputs
from edgepeft.errors import AdapterBaseMismatchError, ConfigError
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime

FUSED = {"GroupQueryAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization"}
FUSED_GPT2 = {"GroupQueryAttention", "SkipLayerNormalization"}  # no rotary; LayerNorm with a bias


def _ops(out: str) -> set:
    graph = onnx.load(os.path.join(out, "base", "model.onnx"), load_external_data=False).graph
    return {n.op_type for n in graph.node}


def _optimized_ops(out: str) -> set:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = os.path.join(out, "optimized.onnx")
    ort.InferenceSession(os.path.join(out, "base", "model.onnx"), options, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node}


def _manifest(out: str) -> dict:
    with open(os.path.join(out, "base", "edgepeft.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_contrib_and_standard_builds_both_match_hf_peft_prefill_and_decode(arch, peft_adapter, hf_reference, tmp_path):
    adapter = peft_adapter(arch, "all-linear", r=4, target_modules="all-linear")
    ref = hf_reference(arch, adapter)
    ids, mask = sample_batch(batch=3)
    expected = torch_outputs(ref, ids, mask, "logits")
    greedy, steps = greedy_reference(ref, ids, mask, 6)  # each decode step's logits too
    for ops in ("contrib", "standard"):
        out = str(tmp_path / ops)
        report = export([adapter], out, ops=ops)  # validated against PyTorch: prefill and 3 cached decode steps
        assert _manifest(out)["ops"] == ops
        with open(os.path.join(out, "base", "genai_config.json")) as f:  # genai appends in place on GQA graphs only
            assert json.load(f)["search"]["past_present_share_buffer"] is (ops == "contrib")
        kinds, fused = _ops(out), FUSED_GPT2 if arch == "gpt2" else FUSED
        onnx.checker.check_model(os.path.join(out, "base", "model.onnx"), full_check=True)  # ops ONNX defines
        if ops == "contrib":  # the first norm (after no add) plain, fused by ONNX Runtime: no norm left unfused
            assert fused <= kinds and "Softmax" not in kinds and "ReduceMean" not in _optimized_ops(out)
        else:
            assert not (FUSED | FUSED_GPT2) & kinds and "Softmax" in kinds
        assert max(c["max_abs_diff"] for c in report["checks"]) <= 1e-4
        rt = Runtime(out)
        logits = rt.forward(ids, mask, adapter="all-linear")["logits"]
        valid = mask.astype(bool)
        assert np.abs(logits[valid] - expected[valid]).max() <= 1e-4
        np.testing.assert_array_equal(rt.generate(ids, mask, adapter="all-linear", max_new_tokens=6, eos_token_id=[]),
                                      greedy)
        ours = rt.step_logits(ids, mask, adapter="all-linear")
        logits = [next(ours)] + [ours.send(greedy[:, ids.shape[1] + i]) for i in range(5)]
        assert np.abs(np.stack(logits) - np.stack(steps)).max() <= 1e-4


def test_a_head_size_the_kernel_cannot_take_falls_back_to_standard_ops(tmp_path, capsys):
    import peft
    import transformers as tf

    config = tiny_config("llama")
    config.head_dim = 8  # GroupQueryAttention's CPU kernel needs multiples of 16
    torch.manual_seed(0)
    base = str(tmp_path / "base")
    tf.LlamaForCausalLM(config).save_pretrained(base)
    pm = peft.get_peft_model(tf.LlamaForCausalLM.from_pretrained(base), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    pm.peft_config["default"].base_model_name_or_path = base
    pm.save_pretrained(str(tmp_path / "lora"))
    export([str(tmp_path / "lora")], str(tmp_path / "out"), verbose=True)
    assert "head size 8 is not a multiple of 16" in capsys.readouterr().err  # a note
    assert _manifest(str(tmp_path / "out"))["ops"] == "standard" and not FUSED & _ops(str(tmp_path / "out"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_model_with_one_attention_head_exports_fused(arch, tmp_path):
    """One head (and one kv head): the fused graph traces (a reshape by heads * size once broke torch.onnx on
    the traced "* 1") and passes the export's checks against PyTorch and HF PEFT."""
    import peft
    import transformers as tf

    config = tiny_config(arch)
    if arch == "gpt2":
        config.n_head = 1
    else:
        config.num_attention_heads = config.num_key_value_heads = 1
    torch.manual_seed(0)
    base = str(tmp_path / "base")
    model_class = tf.GPT2LMHeadModel if arch == "gpt2" else tf.LlamaForCausalLM
    model_class(config).save_pretrained(base)
    target = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    pm = peft.get_peft_model(model_class.from_pretrained(base), peft.LoraConfig(r=2, target_modules=target))
    pm.peft_config["default"].base_model_name_or_path = base
    pm.save_pretrained(str(tmp_path / "lora"))
    report = export([str(tmp_path / "lora")], str(tmp_path / "out"))
    assert _manifest(str(tmp_path / "out"))["ops"] == "contrib" and "GroupQueryAttention" in _ops(str(tmp_path / "out"))
    assert all(c["max_abs_diff"] <= 1e-4 for c in report["checks"])


def test_dynamic_rope_scaling_and_other_models_get_standard_ops():
    from edgepeft.exporters.contrib_ops import effective_ops

    notes = []
    config = tiny_config("llama")
    assert effective_ops(config, "causal-lm", "contrib") == "contrib"
    assert effective_ops(config, "seq-cls", "contrib") == effective_ops(config, "causal-lm", "standard") == "standard"
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    assert effective_ops(config, "causal-lm", "contrib", notes.append) == "standard"
    assert notes == ["note: dynamic rope scaling changes the rotary tables with the length: standard ops"]
    gpt2 = tiny_config("gpt2")
    assert effective_ops(gpt2, "causal-lm", "contrib") == "contrib"
    gpt2.n_head = 4  # head size 8
    assert effective_ops(gpt2, "causal-lm", "contrib") == "standard"


def test_an_out_built_with_other_ops_is_refused_and_left_as_it_was(peft_adapter, tmp_path):
    first = peft_adapter("llama", "qv-ops", r=2, target_modules=["q_proj", "v_proj"])
    second = peft_adapter("llama", "mlp-ops", r=2, target_modules=["gate_proj", "down_proj"])
    out = str(tmp_path / "out")
    export([first], out, ops="standard")
    before = sorted(os.listdir(os.path.join(out, "base")))
    with pytest.raises(ConfigError, match="built with standard ops, this export asks for contrib") as e:
        export([second], out)
    assert "--ops standard" in str(e.value)
    assert sorted(os.listdir(os.path.join(out, "base"))) == before and _manifest(out)["ops"] == "standard"
    assert os.listdir(os.path.join(out, "adapters")) == ["qv-ops"]
    export([second], out, ops="standard")  # the message's fix
    assert sorted(os.listdir(os.path.join(out, "adapters"))) == ["mlp-ops", "qv-ops"]


def test_the_fix_for_an_adapter_of_another_base_repeats_the_outs_flags(peft_adapter, shared_export, tmp_path):
    """Found by a hunt: an adapter folder made for another base named the fix `edgepeft export --adapter DIR --out OUT
    --name X --overwrite`, which an OUT of standard ops refuses (and a quantized one): the OUT's flags are repeated."""
    import shlex
    import shutil

    from click.testing import CliRunner

    from edgepeft.cli import cli
    from edgepeft.runtimes.commands import base_flags

    out = str(tmp_path / "out")
    export([peft_adapter("llama", "qv-ops", r=2, target_modules=["q_proj", "v_proj"])], out, ops="standard")
    shared, dirs, _ = shared_export("llama")  # its adapters were exported for a base of contrib ops
    shutil.copytree(os.path.join(shared, "adapters", "qv"), os.path.join(out, "adapters", "foreign"))
    said = CliRunner().invoke(cli, ["inspect", out])
    assert said.exit_code == 1 and " opset 18 standard ops" in said.output  # which --ops the OUT was built with
    fix = str(said.exception).split("re-export its adapter into this OUT: `")[1].split("`")[0]
    assert fix == f"edgepeft export --adapter DIR --out {shlex.quote(out)} --name foreign --overwrite --ops standard"
    done = CliRunner().invoke(cli, shlex.split(fix.replace("DIR", shlex.quote(dirs["qv"])))[1:])
    assert done.exit_code == 0, done.output
    assert CliRunner().invoke(cli, ["inspect", out]).exit_code == 0
    with pytest.raises(AdapterBaseMismatchError, match=r"; export the adapter into this OUT with `edgepeft export "
                                                       r"--adapter DIR --out \S+ --ops standard`; or, where this OUT is a copy, "):
        Runtime(out).load_adapter(os.path.join(shared, "adapters", "mlp"))  # another OUT's, loaded as it is
    assert base_flags({"quantization": "int4", "ops": "contrib", "task": "causal-lm"}) == ("--quantize", "int4")
    assert base_flags({"ops": "standard", "task": "seq-cls"}) == ()  # contrib asked of a classifier builds standard
    assert base_flags({"task": "causal-lm"}) == ("--ops", "standard")  # a manifest before "ops": standard (a review)


def test_unknown_ops_value_is_refused(peft_adapter, tmp_path):
    with pytest.raises(ConfigError, match="--ops 'fused' is not supported; use one of contrib, standard"):
        export([peft_adapter("llama", "qv-ops", r=2, target_modules=["q_proj", "v_proj"])], str(tmp_path / "o"),
               ops="fused")
    assert not os.path.exists(tmp_path / "o")


def test_gpt2_exports_say_contrib_ops_and_bert_standard(shared_export):
    for arch, ops in (("gpt2", "contrib"), ("bert", "standard")):
        out, _, _ = shared_export(arch)
        assert _manifest(out)["ops"] == ops


def test_decode_steps_share_one_growing_cache_buffer_on_contrib_graphs(peft_adapter, hf_reference, tmp_path,
                                                                        monkeypatch):
    """GroupQueryAttention graphs decode into one buffer per cache input (past and present alike), which doubles
    when full; the standard graph keeps the growing cache. Both give HF PEFT's greedy ids."""
    from edgepeft.runtimes import kv_cache as fixed_cache

    adapter = peft_adapter("llama", "all-linear", r=4, target_modules="all-linear")
    ids, mask = sample_batch(batch=2)
    greedy, _ = greedy_reference(hf_reference("llama", adapter), ids, mask, 7)
    sizes = []
    allocate = fixed_cache.FixedCache._allocate
    monkeypatch.setattr(fixed_cache, "RESERVE", 1)  # grows at the second step, then doubles
    monkeypatch.setattr(fixed_cache.FixedCache, "_allocate",
                        lambda self, arrays, capacity: (sizes.append(capacity), allocate(self, arrays, capacity)))
    for ops, expected in (("contrib", [10, 20]), ("standard", [])):
        out = str(tmp_path / ops)
        export([adapter], out, ops=ops)  # its decode checks use the buffers too
        sizes.clear()
        np.testing.assert_array_equal(Runtime(out).generate(ids, mask, adapter="all-linear", max_new_tokens=7,
                                                            eos_token_id=[]), greedy)
        assert sizes == expected  # 9 prompt positions + 1, then doubled past 10 (7 new tokens: 15 filled)
    rt = Runtime(str(tmp_path / "contrib"))
    rt.max_positions = 15  # growth stops at the model's positions
    sizes.clear()
    np.testing.assert_array_equal(rt.generate(ids, mask, adapter="all-linear", max_new_tokens=6, eos_token_id=[]),
                                  greedy[:, :15])
    assert sizes == [10, 15]


def test_a_gpt2_with_cross_attention_layers_exports_both_ways(tmp_path):
    """transformers wraps such a GPT-2's cache in an EncoderDecoderCache (unused without encoder states): both
    builds still export, validated against PyTorch."""
    import peft
    import transformers as tf

    config = tiny_config("gpt2")
    config.add_cross_attention = True
    torch.manual_seed(0)
    base = str(tmp_path / "base")
    tf.GPT2LMHeadModel(config).save_pretrained(base)
    pm = peft.get_peft_model(tf.GPT2LMHeadModel.from_pretrained(base),
                             peft.LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM"))
    pm.peft_config["default"].base_model_name_or_path = base
    pm.save_pretrained(str(tmp_path / "lora"))
    for ops in ("contrib", "standard"):
        report = export([str(tmp_path / "lora")], str(tmp_path / ops), ops=ops)
        assert _manifest(str(tmp_path / ops))["ops"] == ops
        assert max(c["max_abs_diff"] for c in report["checks"]) <= 1e-4


def test_a_prefix_batch_prefill_runs_row_by_row_and_keeps_the_last_logits_only(virtual_export, hf_reference,
                                                                               monkeypatch):
    """GroupQueryAttention's CPU kernel takes one row when several new tokens meet a cache (a prefix adapter's
    prefill): generation runs such a batch row by row, each row binding logits_to_keep 1 as a whole batch does,
    and still gives HF PEFT's greedy ids."""
    from edgepeft.runtimes import runtime as runtime_module

    out, dirs, _ = virtual_export("llama")
    rt = Runtime(out)
    assert rt.contrib
    shapes = []
    rows_apart = runtime_module.run_rows_apart
    monkeypatch.setattr(runtime_module, "run_rows_apart",
                        lambda *a: (lambda outputs: (shapes.append(outputs[0].shape()), outputs)[1])(rows_apart(*a)))
    prompt, pmask = sample_batch(batch=2, seq=6, seed=7)
    expected, _ = greedy_reference(hf_reference("llama", dirs["prefix"]), prompt, pmask, 5)
    np.testing.assert_array_equal(rt.generate(prompt, pmask, adapter="prefix", max_new_tokens=5, eos_token_id=[]),
                                  expected)
    assert shapes == [[2, 1, rt.vocab_size]]  # the prefill only; without logits_to_keep: [2, 6, vocab]
    assert rt.forward(prompt, pmask, adapter="prefix")["logits"].shape == (2, 6, rt.vocab_size)  # forward: all


def _sharpened(model, seed: int = 7) -> None:
    """Weights that make attention sharp, as a trained model's: with the default init (std 0.02) attention is near
    uniform, and a wrong rotary table moved the logits by 1e-7, which no parity check could see."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2:  # norms: not all ones
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
                continue
            sharp = 2.5 if any(k in name for k in ("q_proj", "k_proj")) else 1.0
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in name else sharp * p.shape[1] ** -0.5))


ROPE = {"llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16, "rope_theta": 500000.0},
        "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0},
        "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}


@pytest.mark.parametrize("rope", sorted(ROPE))
def test_rope_scaling_matches_hf_peft_past_the_original_positions(rope, tmp_path):
    """Llama 3's scaling, yarn and linear, on both builds: prefill and decode steps to position 28, past the 16
    the scaling starts from. The sharpened weights let the test fail: HF with plain rope differs by far more."""
    import peft
    import transformers as tf

    from peft_refs import randomize_adapter

    config = tiny_config("llama")
    config.rope_parameters = ROPE[rope]
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    _sharpened(model)
    base, lora = str(tmp_path / "base"), str(tmp_path / "lora")
    model.save_pretrained(base)
    pm = peft.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(base),
                             peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
    randomize_adapter(pm, 3)
    pm.peft_config["default"].base_model_name_or_path = base
    pm.save_pretrained(lora)
    ids, mask = sample_batch(batch=3, seq=20)
    greedy, steps = greedy_reference(peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), lora)
                                     .eval(), ids, mask, 8)
    plain = tf.AutoModelForCausalLM.from_config(tiny_config("llama"))
    plain.load_state_dict(model.state_dict())
    _, unscaled = greedy_reference(peft.PeftModel.from_pretrained(plain, lora).eval(), greedy[:, :-1], np.pad(
        mask, ((0, 0), (0, 7)), constant_values=1), 1)
    assert np.abs(unscaled[0] - steps[-1]).max() > 0.1, "the scaling matters at the last step"
    for ops in ("contrib", "standard"):
        export([lora], str(tmp_path / ops), ops=ops)
        ours = Runtime(str(tmp_path / ops)).step_logits(ids, mask, adapter="lora")
        logits = [next(ours)] + [ours.send(greedy[:, ids.shape[1] + i]) for i in range(7)]
        assert np.abs(np.stack(logits) - steps).max() <= 1e-4, ops


@pytest.mark.parametrize("arch,norm,fields", [("llama", "post_attention_layernorm", ("weight", "variance_epsilon")),
                                              ("gpt2", "ln_2", ("weight", "bias", "eps"))])
def test_a_module_in_a_norms_place_without_what_the_fused_body_reads_is_named(arch, norm, fields):
    """Found by a hunt: a method's slot module replacing a norm (or its layer kept by --merge) without the norm's
    weight and epsilon ended the default export in torch's AttributeError traceback; adding-a-method.md says such
    adapters export with --ops standard, and now the refusal says so (what the fused bodies read of each norm)."""
    import transformers as tf

    from edgepeft.errors import UnsupportedMethodError
    from edgepeft.exporters.contrib_ops import _read

    model = tf.AutoModelForCausalLM.from_config(tiny_config(arch))
    layer = getattr(model.model.layers[0] if arch == "llama" else model.transformer.h[0], norm)
    *tensors, eps = _read(layer, *fields)
    assert all(t is getattr(layer, f) for t, f in zip(tensors, fields)) and eps == float(getattr(layer, fields[-1]))
    with pytest.raises(UnsupportedMethodError, match=f"^Identity, in a norm's place, has no {' or '.join(fields)}, "
                                                     "which the fused decoder of --ops contrib reads .*; export with "
                                                     "--ops standard$"):
        _read(torch.nn.Identity(), *fields)
