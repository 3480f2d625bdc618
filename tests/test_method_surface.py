"""The PyTorch surface of each method against its contract: bottleneck configs survive save/load
(activation and placement included), PeftModel.generate is HF PEFT's for LoRA and IA3 on a
left-padded batch, and prompt tuning's RANDOM init is HF PEFT's random init."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from peft_refs import hf_generate, ia3_adapter, randomize_bottleneck
from tiny import load_reference_base, max_diff_valid, sample_batch, torch_outputs

import edgepeft

NEW = 10  # new tokens per greedy run
PAD = 0


# ---------------------------------------------------------------- 1. bottleneck save/load
@pytest.mark.parametrize("arch,placement,non_linearity", [("llama", "houlsby", "gelu"), ("gpt2", "pfeiffer", "tanh")])
def test_bottleneck_round_trip_keeps_non_linearity_and_placement(arch, placement, non_linearity, tiny_base, tmp_path):
    """A saved bottleneck adapter reloads to the same outputs: its non-default non_linearity and its
    placement are written to adapter_config.json and used again (the activation changes the outputs)."""
    base = tiny_base(arch)
    config = edgepeft.BottleneckConfig(bottleneck_size=6, placement=placement, non_linearity=non_linearity,
                                       task_type="CAUSAL_LM")
    model = edgepeft.get_peft_model(load_reference_base(base, "causal-lm"), config)
    randomize_bottleneck(model, seed=17, scale=0.3)
    ids, mask = sample_batch()
    ours = torch_outputs(model.eval(), ids, mask, "logits")
    plain = torch_outputs(load_reference_base(base, "causal-lm"), ids, mask, "logits")
    assert max_diff_valid(ours, plain, mask) > 1e-3  # not the identity
    model.save_pretrained(tmp_path / "saved")
    saved = json.load(open(tmp_path / "saved" / "adapter_config.json"))
    assert saved["peft_type"] == "BOTTLENECK"
    assert (saved["non_linearity"], saved["placement"], saved["bottleneck_size"]) == (non_linearity, placement, 6)
    loaded = edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / "saved")).eval()
    assert loaded.peft_config["default"].non_linearity == non_linearity
    assert loaded.peft_config["default"].placement == placement
    assert max_diff_valid(torch_outputs(loaded, ids, mask, "logits"), ours, mask) <= 1e-6
    # the field matters: the same weights with the default activation compute something else
    shutil.copytree(tmp_path / "saved", tmp_path / "relu")
    saved["non_linearity"] = "relu"
    json.dump(saved, open(tmp_path / "relu" / "adapter_config.json", "w"))
    relu = edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / "relu")).eval()
    assert max_diff_valid(torch_outputs(relu, ids, mask, "logits"), ours, mask) > 1e-3
    # and so does the placement: houlsby adapts two layers per block, pfeiffer one
    adapted = {n.rsplit(".adapter_down", 1)[0] for n, _ in loaded.named_parameters() if ".adapter_down." in n}
    per_block = 2 if placement == "houlsby" else 1
    assert len(adapted) == per_block * 2  # two layers in the tiny models


# ---------------------------------------------------------------- 2. generate against HF PEFT
def _generate(model, ids, mask):
    model.generation_config.eos_token_id = None  # never stop early
    out, _ = hf_generate(model, ids, mask, max_new_tokens=NEW, pad_token_id=PAD)
    assert out.shape == (ids.shape[0], ids.shape[1] + NEW), "stopped early: eos was not disabled"
    return out


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_generate_matches_peft_generate_on_a_left_padded_batch(method, tiny_base, peft_adapter, hf_reference, tmp_path):
    """edgepeft's PeftModel.generate gives HF PEFT's greedy ids for the same LoRA / IA3 adapter
    (left-padded batch of two, cached decoding), and the adapter changes them."""
    base = tiny_base("llama")
    if method == "lora":
        adapter = peft_adapter("llama", "all-for-generate", seed=23, r=4, lora_alpha=8, target_modules="all-linear")
    else:
        adapter = ia3_adapter(tmp_path / "ia3", base, seed=24)
    ids, mask = sample_batch(batch=2, seq=7, seed=11)
    assert mask[1, 0] == 0 and ids[1, 0] == PAD  # row 1 is left-padded
    expected = _generate(hf_reference("llama", adapter), ids, mask)
    ours = edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), adapter).eval()
    np.testing.assert_array_equal(_generate(ours, ids, mask), expected)
    plain = _generate(load_reference_base(base, "causal-lm"), ids, mask)
    assert (plain[:, ids.shape[1]:] != expected[:, ids.shape[1]:]).any()  # the adapter is used while generating


# ---------------------------------------------------------------- 3. prompt tuning RANDOM init
def test_prompt_tuning_random_init_is_peft_random_init(tiny_base):
    """prompt_tuning_init="RANDOM" draws the prompt as HF PEFT does (nn.Embedding's N(0, 1)), not zeros:
    with the same torch seed the two prompts are equal."""
    import peft

    base = tiny_base("llama")
    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=16, prompt_tuning_init="RANDOM")
    model = load_reference_base(base, "causal-lm")
    torch.manual_seed(2024)
    ours = edgepeft.get_peft_model(model, edgepeft.PromptTuningConfig(**kw)).get_adapter_state_dict()["prompt_embeddings"]
    model = load_reference_base(base, "causal-lm")
    torch.manual_seed(2024)
    theirs = peft.get_peft_model(model, peft.PromptTuningConfig(**kw)).get_prompt_embedding_to_save("default")
    assert ours.shape == theirs.shape == (16, 32)
    assert ours.abs().min() > 0 and 0.8 < float(ours.std()) < 1.2 and abs(float(ours.mean())) < 0.2  # N(0, 1)
    assert abs(float(ours.std()) - float(theirs.std())) < 0.1
    assert torch.equal(ours, theirs)


def test_module_targets_finds_modules_of_any_type_as_hf_peft_selects_them(tiny_base):
    """targets.module_targets, the helper adding-a-method.md names for a method whose targets are not linear
    layers (norms): matched as HF PEFT matches, less exclude_modules and modules saved whole; none matched is an
    error naming the model, and linear_targets points to it for a norm."""
    from edgepeft.errors import ConfigError
    from edgepeft.tuners import targets

    model = load_reference_base(tiny_base("llama"), "causal-lm")
    config = edgepeft.LoraConfig(target_modules=["post_attention_layernorm", "input_layernorm"],
                                 exclude_modules=["model.layers.0.input_layernorm"])
    found = targets.module_targets(model, config, {})
    layers = len(model.model.layers)
    assert len(found) == 2 * layers - 1 and "model.layers.0.input_layernorm" not in found
    assert all(type(model.get_submodule(k)).__name__ == "LlamaRMSNorm" for k in found)
    with pytest.raises(ConfigError, match="matches no module of this llama model; its layers are named .*down_proj, "
                                          "embed_tokens, .*input_layernorm, .*lm_head"):  # a newcomer hunt: none named
        targets.module_targets(model, edgepeft.LoraConfig(target_modules=["no_such"]), {})
    with pytest.raises(ConfigError, match="leave it out of target_modules and train again .*see module_targets"):
        targets.linear_targets(model, config, {})


def test_every_built_in_config_is_a_star_import():
    """`from edgepeft import *` gives each built-in method's config (they left __all__ when found by name)."""
    from edgepeft.tuners import methods

    names = {}
    exec("from edgepeft import *", names)  # noqa: S102
    built_in = {m.config_cls.__name__ for m in methods() if m.config_cls.__module__.startswith("edgepeft.")}
    assert built_in == set(edgepeft.BUILT_IN_CONFIGS) and all(names[n] is getattr(edgepeft, n) for n in built_in)


def test_the_lora_fields_left_out_of_the_options_are_those_refused_when_set():
    """An unknown --option lists the options train takes, leaving out LoraConfig.refused_when_set: each of those is
    refused when set (one list kept beside __post_init__'s checks, held true here)."""
    from edgepeft.errors import UnsupportedMethodError
    from edgepeft.tuners.lora.config import LoraConfig

    set_values = {"use_dora": True, "lora_bias": True, "bias": "all", "layers_to_transform": [0],
                  "layers_pattern": "layers", "target_parameters": ["mlp.experts"], "trainable_token_indices": [1]}
    assert set(LoraConfig.refused_when_set) == set(set_values)
    for name, value in set_values.items():
        with pytest.raises(UnsupportedMethodError):
            LoraConfig(task_type="CAUSAL_LM", **{name: value})


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prompt_learning_sizes_of_the_model_are_no_training_options(method):
    """A hunt: --option num_layers=1 at training was blamed on an adapter_config.json ("save the adapter again from
    its model"), which did not exist yet; num_attention_heads was replaced silently."""
    from edgepeft.errors import ConfigError
    from edgepeft.training import method_config

    for field in ("num_layers", "token_dim", "num_attention_heads", "num_transformer_submodules"):
        with pytest.raises(ConfigError, match=f"^{field} is the model's size, which training fills in from it; leave "
                                              f"{field} out of the options$"):
            method_config(method, "causal-lm", {field: 1})
    with pytest.raises(ConfigError) as e:
        method_config(method, "causal-lm", {"bogus": 1})
    assert "its options are" in str(e.value) and "num_layers" not in str(e.value)
