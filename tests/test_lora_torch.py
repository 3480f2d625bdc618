"""PyTorch LoRA: edgepeft <-> HF PEFT in both directions, on every supported architecture.

Torch only (no ONNX Runtime).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from peft_refs import randomize_adapter, randomize_ia3
from tiny import ARCHS, TASK_TYPES, default_task, load_reference_base, sample_batch, torch_outputs

import edgepeft
from edgepeft.errors import ConfigError, UnsupportedMethodError

FIELD = {"causal-lm": "logits", "seq-cls": "logits", "feature-extraction": "last_hidden_state"}


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_adapter_loads_in_edgepeft_with_identical_outputs(arch, tiny_base, peft_adapter, hf_reference):
    adapter = peft_adapter(arch, "all-rslora", target_modules="all-linear", r=4, lora_alpha=8, use_rslora=True, seed=11)
    task = default_task(arch)
    ref = hf_reference(arch, adapter)
    ours = edgepeft.PeftModel.from_pretrained(load_reference_base(tiny_base(arch), task), adapter).eval()
    ids, mask = sample_batch(seq=7)
    a = torch_outputs(ours, ids, mask, FIELD[task])
    b = torch_outputs(ref, ids, mask, FIELD[task])
    base = torch_outputs(load_reference_base(tiny_base(arch), task), ids, mask, FIELD[task])
    assert abs(a - b).max() <= 1e-5
    assert abs(a - base).max() > 1e-3  # the adapter really changes the output


@pytest.mark.parametrize("arch", ARCHS)
def test_edgepeft_adapter_loads_in_peft_with_identical_outputs(arch, tiny_base, tmp_path):
    import peft

    task = default_task(arch)
    targets = {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": ["k_proj", "o_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value", "dense"]}[arch]
    model = edgepeft.get_peft_model(
        load_reference_base(tiny_base(arch), task),
        edgepeft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, task_type=TASK_TYPES[task]),
    )
    randomize_adapter(model, seed=5)
    model.save_pretrained(tmp_path / "ad")
    ref = peft.PeftModel.from_pretrained(load_reference_base(tiny_base(arch), task), str(tmp_path / "ad")).eval()
    ids, mask = sample_batch(seq=6)
    a = torch_outputs(model.eval(), ids, mask, FIELD[task])
    b = torch_outputs(ref, ids, mask, FIELD[task])
    assert abs(a - b).max() <= 1e-5

    # Same keys as PEFT writes for the same config, and PEFT reads our config fields.
    peft_model = peft.get_peft_model(
        load_reference_base(tiny_base(arch), task),
        peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, task_type=TASK_TYPES[task]),
    )
    peft_model.save_pretrained(tmp_path / "peft")
    ours_keys = set(load_file(tmp_path / "ad" / "adapter_model.safetensors"))
    assert ours_keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    ours_cfg = json.load(open(tmp_path / "ad" / "adapter_config.json"))
    assert ours_cfg["peft_type"] == "LORA" and ours_cfg["base_model_name_or_path"] == tiny_base(arch)


def test_seq_cls_head_is_saved_and_loaded_like_peft(tiny_base, tmp_path):
    import peft

    base = tiny_base("bert")
    model = edgepeft.get_peft_model(
        load_reference_base(base, "seq-cls", num_labels=3),
        edgepeft.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"),
    )
    assert model.peft_config["default"].modules_to_save == ["classifier", "score"]
    randomize_adapter(model, seed=2)
    model.save_pretrained(tmp_path / "cls")
    keys = set(load_file(tmp_path / "cls" / "adapter_model.safetensors"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    ref = peft.PeftModel.from_pretrained(load_reference_base(base, "seq-cls", num_labels=3), str(tmp_path / "cls")).eval()
    ids, mask = sample_batch()
    assert abs(torch_outputs(model.eval(), ids, mask, "logits") - torch_outputs(ref, ids, mask, "logits")).max() <= 1e-5
    # edgepeft also loads it on a base whose head has another label count.
    other = edgepeft.PeftModel.from_pretrained(load_reference_base(base, "seq-cls"), tmp_path / "cls").eval()
    assert torch_outputs(other, ids, mask, "logits").shape == (2, 3)
    from safetensors.torch import save_file

    from edgepeft.errors import AdapterBaseMismatchError

    saved = load_file(tmp_path / "cls" / "adapter_model.safetensors")
    for weight, wrong in ((saved["base_model.model.classifier.weight"].flatten(), "has shape \\[96\\], a Linear head's"),
                          (torch.zeros(3, 48), "has 48 inputs, the model's has 32")):  # a ValueError traceback; no file
        save_file({**saved, "base_model.model.classifier.weight": weight}, str(tmp_path / "cls" / "adapter_model.safetensors"))
        with pytest.raises(AdapterBaseMismatchError, match=f"adapter_model.safetensors: base_model.model.classifier: .*{wrong}"):
            edgepeft.PeftModel.from_pretrained(load_reference_base(base, "seq-cls"), tmp_path / "cls")


def test_only_adapter_parameters_train_and_gradients_flow(tiny_base):
    model = edgepeft.get_peft_model(
        load_reference_base(tiny_base("llama"), "causal-lm"), edgepeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    ids = torch.randint(3, 128, (2, 6))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_add_and_set_adapter_switch_outputs_and_merge_matches(tiny_base, tmp_path):
    base = tiny_base("gpt2")
    model = edgepeft.get_peft_model(load_reference_base(base, "causal-lm"), edgepeft.LoraConfig(r=2, target_modules=["c_attn"]))
    model.add_adapter("second", edgepeft.LoraConfig(r=3, target_modules=["c_fc"]))
    randomize_adapter(model, seed=9)
    ids, mask = sample_batch()
    model.eval()
    first = torch_outputs(model, ids, mask, "logits")
    model.set_adapter("second")
    second = torch_outputs(model, ids, mask, "logits")
    assert abs(first - second).max() > 1e-3
    merged = model.merge_and_unload("second")
    assert abs(torch_outputs(merged, ids, mask, "logits") - second).max() <= 1e-5
    # merge_and_unload works on a copy: the PeftModel still switches.
    model.set_adapter("default")
    assert abs(torch_outputs(model, ids, mask, "logits") - first).max() <= 1e-6
    model.save_pretrained(tmp_path / "multi")
    assert os.path.isfile(tmp_path / "multi" / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "multi" / "second" / "adapter_model.safetensors")


@pytest.mark.parametrize("config", [edgepeft.LoraConfig(r=2, target_modules=["lm_head"]),
                                    edgepeft.IA3Config(target_modules=["lm_head"], feedforward_modules=[]),
                                    edgepeft.IA3Config(target_modules=["lm_head"], feedforward_modules=["lm_head"])],
                         ids=["lora", "ia3-out", "ia3-in"])
def test_merging_into_a_tied_output_layer_leaves_the_embeddings(config, tiny_base, tmp_path):
    """GPT-2's lm_head is its token embedding table: merge folded the adapter into the shared table, so the merged
    model embedded every token differently (logits off by ~40; `export --merge` refused it, advising --atol)."""
    base = load_reference_base(tiny_base("gpt2"), "causal-lm")
    assert base.lm_head.weight is base.get_input_embeddings().weight
    table = base.get_input_embeddings().weight.detach().clone()
    model = edgepeft.get_peft_model(base, config)
    randomize_adapter(model, seed=4)
    randomize_ia3(model, seed=4)
    model.eval()
    ids, mask = sample_batch()
    want = torch_outputs(model, ids, mask, "logits")
    merged = model.merge_and_unload()
    assert abs(torch_outputs(merged, ids, mask, "logits") - want).max() <= 1e-4
    assert torch.equal(merged.get_input_embeddings().weight, table)
    assert not merged.config.tie_word_embeddings
    merged.save_pretrained(tmp_path / "merged")  # saved and loaded as transformers does: the head stays its own
    again = load_reference_base(str(tmp_path / "merged"), "causal-lm")
    assert abs(torch_outputs(again, ids, mask, "logits") - want).max() <= 1e-4
    model.add_adapter("attn", edgepeft.LoraConfig(r=2, target_modules=["c_attn"]))
    other = model.merge_and_unload("attn")  # an adapter off the head: the model stays tied
    assert other.lm_head.weight is other.get_input_embeddings().weight and other.config.tie_word_embeddings


def test_a_method_whose_merge_knows_no_ties_leaves_the_embeddings(tiny_base, monkeypatch):
    """Found by a hunt: the merge contract (adding-a-method.md) never named tied output layers, and a plugin's merge
    written to it, folding into GPT-2's lm_head, changed every token's embedding (0.52 off, no word): merge_and_unload
    unties an output layer the adapter adapts before any method's merge (IA3's own untying left out here)."""
    import edgepeft.tuners.ia3.model as ia3_model

    monkeypatch.setattr(ia3_model, "untied", lambda model, layer: layer)  # as a plugin's merge, which knows no ties
    base = load_reference_base(tiny_base("gpt2"), "causal-lm")
    table = base.get_input_embeddings().weight.detach().clone()
    model = edgepeft.get_peft_model(base, edgepeft.IA3Config(target_modules=["lm_head"], feedforward_modules=[]))
    randomize_ia3(model, seed=5)
    ids, mask = sample_batch()
    want = torch_outputs(model.eval(), ids, mask, "logits")
    merged = model.merge_and_unload()
    assert torch.equal(merged.get_input_embeddings().weight, table)
    assert abs(torch_outputs(merged, ids, mask, "logits") - want).max() <= 1e-4


def test_adapter_names_per_row_is_refused_not_dropped(tiny_base):
    """HF PEFT's adapter_names= went to transformers: forward ran the active adapter on every row (row 1 off by
    0.74 from HF PEFT), generate raised transformers' own error."""
    model = edgepeft.get_peft_model(load_reference_base(tiny_base("llama"), "causal-lm"),
                                    edgepeft.LoraConfig(r=2, target_modules=["q_proj"]))
    ids, mask = sample_batch()
    for call in (model, model.generate):
        with pytest.raises(ConfigError, match=r"adapter_names= \(an adapter per row\) is not in edgepeft's PyTorch"):
            call(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), adapter_names=["default", "x"])
    model.eval()  # None, as HF PEFT takes it: the active adapter on every row
    np.testing.assert_array_equal(torch_outputs(model, ids, mask, "logits"), model(
        input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), adapter_names=None).logits.detach().numpy())


def test_config_from_newer_peft_loads_with_warning_and_unsupported_options_fail(tmp_path):
    (tmp_path / "a").mkdir()
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "shiny_new_option": {"x": 1}}
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="shiny_new_option"):
        config = edgepeft.load_config(str(tmp_path / "a"))
    assert config.r == 4
    with pytest.raises(UnsupportedMethodError, match="use_dora"):
        edgepeft.LoraConfig(use_dora=True)
    with pytest.raises(ConfigError, match="matches no linear layer"):
        edgepeft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), edgepeft.LoraConfig(target_modules=["nothing"]))


def test_overlapping_alpha_patterns_keep_their_order_through_save_and_load(tiny_base, tmp_path):
    """The first rank/alpha pattern that matches a module wins (HF PEFT's rule): adapter_config.json keeps the
    patterns in their order (its fields stay sorted), so the reloaded adapter scales as the trained one."""
    import peft

    config = edgepeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM",
                                 alpha_pattern={"q_proj": 2, "layers.0.self_attn.q_proj": 32},
                                 rank_pattern={"q_proj": 2, "layers.0.self_attn.q_proj": 3})
    model = edgepeft.get_peft_model(load_reference_base(tiny_base("llama"), "causal-lm"), config)
    randomize_adapter(model, seed=5)
    model.save_pretrained(tmp_path / "ad")
    saved = json.load(open(tmp_path / "ad" / "adapter_config.json"))
    assert list(saved["alpha_pattern"]) == ["q_proj", "layers.0.self_attn.q_proj"] and list(saved) == sorted(saved)
    ids, mask = sample_batch(seq=6)
    want = torch_outputs(model.eval(), ids, mask, "logits")
    for loaded in (edgepeft.PeftModel.from_pretrained(load_reference_base(tiny_base("llama"), "causal-lm"),
                                                      str(tmp_path / "ad")),
                   peft.PeftModel.from_pretrained(load_reference_base(tiny_base("llama"), "causal-lm"),
                                                  str(tmp_path / "ad"))):
        assert abs(torch_outputs(loaded.eval(), ids, mask, "logits") - want).max() <= 1e-5
