"""PyTorch-side details where edgepeft must do what HF PEFT does (found by probing, each failed before its fix).

Which adapter trains after ``add_adapter``/``set_adapter``; adapters on a bfloat16 base
(float32 weights, the base's dtype out, prefix tuning running); ``token_type_ids`` with
prompt learning (dropped except for sequence classification).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from peft_refs import randomize_adapter
from tiny import load_reference_base, sample_batch

import edgepeft


def trainable_adapters(model) -> set:
    """Adapter names whose weights have requires_grad (names taken from HF PEFT's key layout)."""
    names = set()
    for key, p in model.named_parameters():
        if p.requires_grad:
            for part in key.split("."):
                if part in ("default", "other"):
                    names.add(part)
    return names


def test_only_the_active_adapter_trains_as_in_peft(tiny_base):
    import peft

    both = {}
    for lib in (peft, edgepeft):
        model = lib.get_peft_model(load_reference_base(tiny_base("llama"), "causal-lm"),
                                   lib.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
        model.add_adapter("other", lib.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
        after_add = trainable_adapters(model)
        model.set_adapter("other")
        both[lib.__name__] = (after_add, trainable_adapters(model))
    assert both["edgepeft"] == both["peft"] == ({"default"}, {"other"})


def test_load_adapter_is_trainable_as_in_peft(tiny_base, tmp_path):
    """load_adapter(is_trainable=True) makes the loaded adapter trainable at once, the others keep their state."""
    import peft

    hf = peft.get_peft_model(load_reference_base(tiny_base("llama"), "causal-lm"),
                             peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    hf.save_pretrained(tmp_path / "a")
    both = {}
    for lib in (peft, edgepeft):
        model = lib.PeftModel.from_pretrained(load_reference_base(tiny_base("llama"), "causal-lm"), str(tmp_path / "a"))
        states = [trainable_adapters(model)]
        model.load_adapter(str(tmp_path / "a"), "other", is_trainable=True)
        states.append(trainable_adapters(model))
        model.set_adapter("other")
        states.append(trainable_adapters(model))
        both[lib.__name__] = states
    assert both["edgepeft"] == both["peft"] == [set(), {"other"}, {"other"}]


@pytest.mark.parametrize("method", ["lora", "ia3", "prefix"])
def test_adapters_on_a_bfloat16_base_match_peft(tiny_base, tmp_path, method):
    """HF PEFT keeps adapter weights in float32 on a bfloat16 base (autocast_adapter_dtype) and returns the base's dtype."""
    import peft

    make = {"lora": lambda lib: lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
            "ia3": lambda lib: lib.IA3Config(task_type="CAUSAL_LM"),
            "prefix": lambda lib: lib.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")}[method]
    base = lambda: load_reference_base(tiny_base("llama"), "causal-lm").to(torch.bfloat16)  # noqa: E731
    hf = peft.get_peft_model(base(), make(peft))
    randomize_adapter(hf, 3)
    hf.save_pretrained(tmp_path / "a")
    ours = edgepeft.PeftModel.from_pretrained(base(), str(tmp_path / "a"), is_trainable=True)
    dtypes = lambda m: {p.dtype for p in m.parameters() if p.requires_grad}  # noqa: E731
    assert dtypes(ours) == dtypes(hf) == {torch.float32}
    ids, mask = (torch.from_numpy(a) for a in sample_batch())
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    assert got.dtype == want.dtype == torch.bfloat16
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=0, atol=2e-2)


@pytest.mark.parametrize("arch, task, kind", [("bert", "feature-extraction", "prompt"), ("bert", "seq-cls", "prompt"),
                                              ("gpt2", "causal-lm", "prompt"), ("gpt2", "causal-lm", "prefix")])
def test_token_type_ids_with_prompt_learning_as_in_peft(tiny_base, tmp_path, arch, task, kind):
    import peft

    from tiny import TASK_TYPES

    config = lambda lib: (lib.PromptTuningConfig if kind == "prompt" else lib.PrefixTuningConfig)(  # noqa: E731
        num_virtual_tokens=3, task_type=TASK_TYPES[task])
    hf = peft.get_peft_model(load_reference_base(tiny_base(arch), task, num_labels=3 if task == "seq-cls" else None),
                             config(peft))
    randomize_adapter(hf, 5)
    hf.save_pretrained(tmp_path / "a")
    ours = edgepeft.PeftModel.from_pretrained(
        load_reference_base(tiny_base(arch), task, num_labels=3 if task == "seq-cls" else None), str(tmp_path / "a"))
    ids, mask = (torch.from_numpy(a) for a in sample_batch())
    types = torch.ones_like(ids)
    field = {"feature-extraction": "last_hidden_state"}.get(task, "logits")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both warn that they ignore token_type_ids
        want = getattr(hf.eval()(input_ids=ids, attention_mask=mask, token_type_ids=types), field)
        got = getattr(ours.eval()(input_ids=ids, attention_mask=mask, token_type_ids=types), field)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_an_hf_adapter_on_lm_head_loads_and_exports(tiny_base, tmp_path):
    """HF PEFT also saves lm_head's base weight (save_embedding_layers="auto"): redundant when unchanged, refused
    when it would change the frozen base."""
    import peft
    from safetensors.torch import load_file, save_file

    from edgepeft.errors import AdapterBaseMismatchError
    from edgepeft.exporters import export
    from edgepeft.runtimes import Runtime

    base = tiny_base("llama")
    hf = peft.get_peft_model(load_reference_base(base, "causal-lm"),
                             peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM"))
    randomize_adapter(hf, 9)
    hf.peft_config["default"].base_model_name_or_path = base
    hf.save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    saved = load_file(weights)
    assert "base_model.model.lm_head.base_layer.weight" in saved  # what HF PEFT writes
    ours = edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / "a"))
    ids, mask = (torch.from_numpy(a) for a in sample_batch())
    with torch.no_grad():
        want = hf.eval()(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(ours.eval()(input_ids=ids, attention_mask=mask).logits, want, rtol=0, atol=1e-6)
    report = export([str(tmp_path / "a")], str(tmp_path / "out"))
    assert max(c["max_abs_diff"] for c in report["checks"]) < 1e-4
    valid = mask.bool().numpy()
    got = Runtime(str(tmp_path / "out")).forward(ids.numpy(), mask.numpy(), adapter="a")["logits"]
    assert abs(got[valid] - want.numpy()[valid]).max() < 1e-4
    saved["base_model.model.lm_head.base_layer.weight"] = saved["base_model.model.lm_head.base_layer.weight"] + 1
    save_file(saved, str(weights))
    with pytest.raises(AdapterBaseMismatchError, match="carries its own lm_head weights"):
        edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / "a"))


def test_an_hf_lm_head_adapter_trained_on_a_bfloat16_copy_loads_on_the_float32_base(tiny_base, tmp_path):
    import peft

    base = tiny_base("llama")
    hf = peft.get_peft_model(load_reference_base(base, "causal-lm").to(torch.bfloat16),
                             peft.LoraConfig(r=2, target_modules=["lm_head"], task_type="CAUSAL_LM"))
    hf.save_pretrained(tmp_path / "a")  # lm_head's base weight saved in bfloat16
    model = edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / "a"))
    assert any("lm_head.lora_A" in k for k, _ in model.named_parameters())


@pytest.mark.parametrize("make, error, words", [
    (lambda: edgepeft.LoraConfig(init_lora_weights="pissa"), "UnsupportedMethodError", "change the base weights"),
    (lambda: edgepeft.LoraConfig(init_lora_weights="bogus"), "UnsupportedMethodError", "not supported"),
    (lambda: edgepeft.LoraConfig(lora_dropout=1.5), "ConfigError", "lora_dropout"),
    (lambda: edgepeft.LoraConfig(task_type="FOO"), "UnsupportedMethodError", "task_type 'FOO'"),
    (lambda: edgepeft.LoraConfig(task_type="TOKEN_CLS"), "UnsupportedMethodError", "task_type 'TOKEN_CLS'"),
    (lambda: edgepeft.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"]), "ConfigError", "subset"),
    (lambda: edgepeft.LoraConfig.from_dict({"peft_type": "LORA", "alora_invocation_tokens": [5, 6]}),
     "UnsupportedMethodError", "alora_invocation_tokens"),
], ids=["pissa", "bogus-init", "dropout", "task-foo", "task-token-cls", "ia3-ff-not-target", "alora"])
def test_configs_hf_peft_refuses_or_edgepeft_cannot_run_are_refused(make, error, words):
    from edgepeft import errors

    with pytest.raises(getattr(errors, error), match=words):
        make()


def test_hf_lora_variants_that_need_no_base_change_still_load():
    for init in (True, False, "gaussian", "eva", "orthogonal"):
        assert edgepeft.LoraConfig(init_lora_weights=init).init_lora_weights == init


def test_all_linear_ignores_case_and_merge_names_unknown_adapters(tiny_base):
    from edgepeft.errors import ConfigError

    model = edgepeft.get_peft_model(load_reference_base(tiny_base("llama"), "causal-lm"),
                                    edgepeft.LoraConfig(r=2, target_modules="ALL-LINEAR", task_type="CAUSAL_LM"))
    assert any(k.endswith("mlp.down_proj.lora_A.default.weight") for k, _ in model.named_parameters())
    with pytest.raises(ConfigError, match="no adapter named 'nope'"):
        model.merge_and_unload("nope")


def test_text_init_with_an_unnamed_tokenizer_object_cannot_be_saved(tiny_base, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from edgepeft.errors import ConfigError

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, 100)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")  # in memory: no name_or_path
    config = edgepeft.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="w1 w2",
                                         tokenizer_name_or_path=fast, task_type="CAUSAL_LM")
    model = edgepeft.get_peft_model(load_reference_base(tiny_base("llama"), "causal-lm"),
                                    edgepeft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.add_adapter("other", config)  # the bad config is the second one: nothing may be written for the first
    with pytest.raises(ConfigError, match="save the tokenizer and pass its folder"):
        model.save_pretrained(str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()  # nothing half-written
