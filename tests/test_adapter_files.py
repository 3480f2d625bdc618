"""Adapter folders as HF PEFT writes them, against HF PEFT's loading (each test failed before its fix): base weights
saved beside the adapter (an adapted lm_head, embeddings saved whole, a half-precision copy), key spellings
(``lora_A.default.weight``), and weights or configs that do not fit the base (another size of model, a config that
disagrees with its own base or weights, patterns that are no regular expressions) named with a fix that works.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from file_checks import edit_json
from peft_refs import randomize_adapter, randomize_ia3
from tiny import load_reference_base, sample_batch

import edgepeft


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


def test_lora_and_ia3_on_lm_head_export_together(tiny_base, tmp_path):
    """Both save lm_head's base weight; loaded together, the second's wrapper sits over the first's, whose base layer
    holds the weight: the key was read as a layer the model lacks ("remove those keys"), though each exported alone."""
    import peft

    from edgepeft.exporters import export
    from edgepeft.runtimes import Runtime

    base = tiny_base("llama")
    configs = {"lora": peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM"),
               "ia3": peft.IA3Config(target_modules=["q_proj", "lm_head", "down_proj"], feedforward_modules=["down_proj"],
                                     task_type="CAUSAL_LM")}
    ids, mask = (torch.from_numpy(a) for a in sample_batch())
    want = {}
    for seed, (name, config) in enumerate(configs.items()):
        hf = peft.get_peft_model(load_reference_base(base, "causal-lm"), config)
        randomize_adapter(hf, 20 + seed)
        if name == "ia3":
            randomize_ia3(hf, seed)
        hf.peft_config["default"].base_model_name_or_path = base
        hf.save_pretrained(tmp_path / name)
        with torch.no_grad():
            want[name] = hf.eval()(input_ids=ids, attention_mask=mask).logits.numpy()
    export([str(tmp_path / "lora"), str(tmp_path / "ia3")], str(tmp_path / "out"))
    rt, valid = Runtime(str(tmp_path / "out")), mask.bool().numpy()
    for name in configs:
        got = rt.forward(ids.numpy(), mask.numpy(), adapter=name)["logits"]
        assert abs(got[valid] - want[name][valid]).max() < 1e-4, name


def test_embedding_layers_saved_whole_by_hf_peft_are_dropped_when_unchanged(tiny_base, tmp_path):
    """save_pretrained(save_embedding_layers=True) writes the embedding and output layers' plain base weights:
    refused as 'weights for modules this model lacks' (advising the base it was trained on, which it was)."""
    import peft
    from safetensors.torch import load_file, save_file

    from edgepeft.errors import AdapterBaseMismatchError

    base = tiny_base("llama")
    hf = peft.get_peft_model(load_reference_base(base, "causal-lm"),
                             peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    randomize_adapter(hf, 4)
    hf.save_pretrained(tmp_path / "a", save_embedding_layers=True)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    saved = load_file(weights)
    assert {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"} <= set(saved)
    ours = edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / "a"))
    ids, mask = (torch.from_numpy(a) for a in sample_batch())
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(input_ids=ids, attention_mask=mask).logits,
                                   hf.eval()(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-6)
    embeddings = saved["base_model.model.model.embed_tokens.weight"]
    edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm").to(torch.bfloat16), str(tmp_path / "a"))
    save_file({**saved, "base_model.model.model.embed_tokens.weight": embeddings.half()}, str(weights))
    edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / "a"))  # the base, rounded
    trained = embeddings.clone()
    trained[3:40] += 9e-4  # trained rows in a half-precision file: a tolerance for rounding let them by, in silence
    for changed, why in ((trained.half(), "carries its own model.embed_tokens weights"),  # ... and a resized vocabulary
                         (torch.cat([embeddings] * 2), "its model.embed_tokens has 256 rows .* resized to 256 tokens")):
        save_file({**saved, "base_model.model.model.embed_tokens.weight": changed}, str(weights))
        with pytest.raises(AdapterBaseMismatchError, match=why):
            edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / "a"))


def test_a_head_trained_whole_and_saved_with_the_embedding_layers_loads_as_hf_peft_loads_it(tiny_base, tmp_path):
    """An hfsaves hunt: modules_to_save=["lm_head"] saved with save_embedding_layers=True writes the trained head
    twice (lm_head.weight, lm_head.modules_to_save.weight) and the base's (original_module): refused as "weights for
    modules this model lacks", and "save the adapter again" wrote the same file."""
    import peft

    base = tiny_base("llama")
    hf = peft.get_peft_model(load_reference_base(base, "causal-lm"), peft.LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    randomize_adapter(hf, 5)
    hf.save_pretrained(tmp_path / "a", save_embedding_layers=True)
    ours = edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / "a"))
    ids, mask = (torch.from_numpy(a) for a in sample_batch())
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(input_ids=ids, attention_mask=mask).logits,
                                   hf.eval()(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-6)


def test_tied_embeddings_trained_whole_or_adapted_are_refused_with_a_fix(tiny_base, tmp_path):
    """ensure_weight_tying with modules_to_save=["lm_head"] trains GPT-2's tied embeddings whole: it was blamed on
    another base ("needs the adapter on the unchanged base it was trained on", which it was); LoRA on an embedding
    named one of edgepeft's functions instead of a fix."""
    import peft

    from edgepeft.errors import AdapterBaseMismatchError, ConfigError

    for arch, name, config, error, fix in (
            ("gpt2", "tied", peft.LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"],
                                             ensure_weight_tying=True, task_type="CAUSAL_LM"),
             AdapterBaseMismatchError, "carries its own .*ensure_weight_tying.*; train the adapter without them"),
            ("llama", "embedding", peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], task_type="CAUSAL_LM"),
             ConfigError, "'model.embed_tokens' \\(Embedding\\) is a layer this method does not adapt.*leave it out of target_modules and train again"),
            ("gpt2", "tied-lora", peft.LoraConfig(r=2, target_modules=["c_attn", "lm_head"], ensure_weight_tying=True,
                                                  task_type="CAUSAL_LM"),  # a hunt: its fix named a module never listed
             ConfigError, "'transformer.wte' \\(Embedding\\) is there by ensure_weight_tying .*; train with "
                          "ensure_weight_tying false \\(its default\\): lm_head's LoRA alone exports$")):
        hf = peft.get_peft_model(load_reference_base(tiny_base(arch), "causal-lm"), config)
        randomize_adapter(hf, 5)
        for module in hf.modules():  # what training does to a layer saved whole
            if isinstance(module, torch.nn.Embedding) and any(p.requires_grad for p in module.parameters()):
                torch.nn.init.normal_(module.weight)
        hf.save_pretrained(tmp_path / name)
        with pytest.raises(error, match=fix):
            edgepeft.PeftModel.from_pretrained(load_reference_base(tiny_base(arch), "causal-lm"), str(tmp_path / name))
    import warnings

    from edgepeft.errors import EdgePeftWarning

    with warnings.catch_warnings():  # read, not noted as ignored (a review)
        warnings.simplefilter("error", EdgePeftWarning)
        assert edgepeft.load_config(str(tmp_path / "tied-lora")).ties_embeddings


def test_adapter_files_named_as_state_dict_names_load_as_in_peft(tiny_base, tmp_path):
    """Keys with the adapter's name (``lora_A.default.weight``, as state_dict() names them) load in HF PEFT with the
    same numbers; edgepeft refused them, advising the base they were already on. A Git LFS pointer is named."""
    import peft
    from safetensors.torch import load_file, save_file

    from edgepeft.errors import AdapterBaseMismatchError, CorruptArtifactError

    base = tiny_base("llama")
    hf = peft.get_peft_model(load_reference_base(base, "causal-lm"),
                             peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    randomize_adapter(hf, 8)
    hf.save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    save_file({k.replace(".weight", ".default.weight"): v for k, v in load_file(weights).items()}, str(weights))
    ours = edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / "a"))
    ids = torch.from_numpy(sample_batch()[0])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, hf.eval()(input_ids=ids).logits, rtol=0, atol=1e-6)
        want = hf(input_ids=ids).logits.numpy()
    from edgepeft.exporters import export
    from edgepeft.runtimes import Runtime

    export([str(tmp_path / "a")], str(tmp_path / "out"))  # loaded as 'a', not 'default': it was refused
    assert float(abs(Runtime(str(tmp_path / "out")).forward(ids.numpy(), adapter="a")["logits"] - want).max()) <= 1e-4
    named = load_file(weights)
    save_file({**named, **{k.replace(".default.", ".a."): v + 1 for k, v in named.items()}}, str(weights))
    with pytest.raises(AdapterBaseMismatchError, match=r"lacks \(e.g. .*lora_A.default.weight\)"):
        export([str(tmp_path / "a")], str(tmp_path / "out2"))  # both names: one set was loaded over the other
    save_file(named, str(weights))
    from edgepeft.adapter_weights import named_as_expected  # an adapter named as a key's last part is no own name

    assert named_as_expected({"m.lora_A.default.weight": 1}, {"m.lora_A.weight"}, "weight") == {"m.lora_A.weight": 1}
    # another adapter's keys beside them: the last one's values were loaded, in silence
    save_file({**named, **{k.replace(".default.", ".other."): v + 1 for k, v in named.items()}}, str(weights))
    with pytest.raises(AdapterBaseMismatchError, match=r"lacks \(e.g. .*lora_A.other.weight\)"):
        edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / "a"))
    extra = {**named, "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32)}
    save_file(extra, str(weights))  # a key for a module this base lacks: the advice named the base already in use
    with pytest.raises(AdapterBaseMismatchError, match=r"lacks \(e.g. base_model.model.model.layers.9.self_attn.q_proj"
                                                       r".lora_A.weight\); it names this base: remove those keys"):
        edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / "a"))
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 1234\n")
    with pytest.raises(CorruptArtifactError, match=r"adapter_model.safetensors: is a Git LFS pointer, not the weights; "
                                                   r"fetch them \(git lfs pull\)"):
        edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / "a"))


def test_an_hf_lm_head_adapter_trained_on_a_bfloat16_copy_loads_on_the_float32_base(tiny_base, tmp_path):
    import peft

    base = tiny_base("llama")
    hf = peft.get_peft_model(load_reference_base(base, "causal-lm").to(torch.bfloat16),
                             peft.LoraConfig(r=2, target_modules=["lm_head"], task_type="CAUSAL_LM"))
    hf.save_pretrained(tmp_path / "a")  # lm_head's base weight saved in bfloat16
    model = edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / "a"))
    assert any("lm_head.lora_A" in k for k, _ in model.named_parameters())


def test_an_adapter_trained_on_another_size_of_model_is_refused_naming_its_file(tiny_base, tmp_path):
    """A deeper or wider base than the adapter's: refused as a base mismatch naming the adapter's file (before,
    an IndexError, a torch RuntimeError, or advice to re-save or re-export that could not help)."""
    import json

    import peft
    import transformers as tf

    from edgepeft.errors import AdapterBaseMismatchError
    from tiny import tiny_config

    def sized(**change):
        config = tiny_config("llama")
        for key, value in change.items():
            setattr(config, key, value)
        return tf.AutoModelForCausalLM.from_config(config)

    deeper, wider = dict(num_hidden_layers=3), dict(hidden_size=64, head_dim=32)  # wider keys and values too
    configs = {"prefix": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
               "prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
               "lora": peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"])}
    for method, config in configs.items():
        pm = peft.get_peft_model(load_reference_base(tiny_base("llama"), "causal-lm"), config)
        pm.save_pretrained(tmp_path / method)
        for other, words in ((deeper, "layers"), (wider, "hidden size")):
            if method == "lora" and other is wider:
                continue  # LoRA's shapes say it: covered by the shape check
            with pytest.raises(AdapterBaseMismatchError) as e:
                edgepeft.PeftModel.from_pretrained(sized(**other), str(tmp_path / method))
            assert str(tmp_path / method) in str(e.value) and "trained on another base" in str(e.value), (method, words)
            assert words in str(e.value) or method == "lora", str(e.value)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # weights missing elsewhere than past the adapter's last layer: a damaged file, not another base
    from safetensors.torch import load_file, save_file

    from edgepeft.errors import CorruptArtifactError

    weights = tmp_path / "lora" / "adapter_model.safetensors"
    state = load_file(weights)
    for drop in ([k for k in state if ".layers.0." in k][:1], list(state)):
        save_file({k: v for k, v in state.items() if k not in drop}, weights)
        with pytest.raises(CorruptArtifactError, match="lacks adapter weights"):
            edgepeft.PeftModel.from_pretrained(load_reference_base(tiny_base("llama"), "causal-lm"), str(tmp_path / "lora"))


def test_a_config_that_disagrees_with_its_own_base_or_weights_says_so(tiny_base, tmp_path):
    """The advice named the base already in use ('trained on another base (<this one>); use that one'), or said to
    remove every weight from the file ('remove those keys')."""
    import json

    import peft

    from peft_refs import peft_virtual_adapter

    from edgepeft.errors import AdapterBaseMismatchError

    base = tiny_base("llama")
    prefix = peft_virtual_adapter(tmp_path / "prefix", base, "prefix", seed=3, num_virtual_tokens=2)
    lora = tmp_path / "lora"
    peft.get_peft_model(load_reference_base(base, "causal-lm"), peft.LoraConfig(
        r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(lora)
    gpt2 = tiny_base("gpt2")  # no key/value heads: HF PEFT shapes the prefix by the saved head count (a raw error)
    gpt2_prefix = peft_virtual_adapter(tmp_path / "gpt2-prefix", gpt2, "prefix", seed=3, num_virtual_tokens=2)
    for folder, edit, said in (
            (prefix, {"num_layers": 5}, "num_layers is 5, the model has 2 layers: adapter_config.json disagrees with "
                                        "the base it names: save the adapter again from its model"),
            (lora, {"peft_type": "IA3", "target_modules": ["q_proj"], "feedforward_modules": []},
             "it names this base, and its adapter_config.json describes other weights (it lacks e.g. "),
            (gpt2_prefix, {"num_attention_heads": 1}, "num_attention_heads is 1, the model has 2 attention heads: ")):
        config = os.path.join(folder, "adapter_config.json")
        with open(config) as f:
            data = {k: v for k, v in json.load(f).items() if edit.get("peft_type") != "IA3" or k in (
                "base_model_name_or_path", "task_type", "revision")}
        with open(config, "w") as f:
            json.dump({**data, **edit}, f)
        with pytest.raises(AdapterBaseMismatchError, match=re.escape(said)):
            edgepeft.PeftModel.from_pretrained(load_reference_base(gpt2 if folder == gpt2_prefix else base, "causal-lm"),
                                               str(folder))


@pytest.mark.parametrize("field, value", [("target_modules", "(q_proj"), ("exclude_modules", "["),
                                          ("rank_pattern", {"(q_proj": 2}), ("alpha_pattern", {"q_proj)": 2}),
                                          ("rank_pattern", {"(?i)q_proj": 2})])  # compiles alone, not as matched
def test_a_pattern_that_is_no_regular_expression_is_named(peft_adapter, tmp_path, capsys, field, value):
    """HF PEFT reads these as regular expressions: a re.error traceback came out of export at the first match."""
    import shutil

    from file_checks import edit_json
    from peft_refs import spec_adapter
    from training_helpers import cli_error

    adapter = shutil.copytree(spec_adapter(peft_adapter, "llama", "qv"), tmp_path / "adapter")
    config = os.path.join(adapter, "adapter_config.json")
    edit_json(config, **{field: value})
    line = cli_error(capsys, "export", "--adapter", adapter, "--out", tmp_path / "out")
    pattern = value if isinstance(value, str) else next(iter(value))
    assert line.startswith(f"error: {config}: {field}: {pattern!r} is not a regular expression (")
    assert line.endswith("); correct it as Python's re reads it, as HF PEFT does")
    assert not os.path.exists(tmp_path / "out")


def test_a_non_finite_value_in_a_free_form_field_is_named_not_written_as_nan(peft_adapter, tmp_path, capsys):
    """A hunt: a NaN in a field edgepeft copies whole (HF PEFT's auto_mapping) went into adapter.json as the token
    NaN, which JSON.parse refuses: the JavaScript runtime said "not readable JSON; re-export it", which wrote it again."""
    import shutil

    from peft_refs import spec_adapter
    from training_helpers import cli_error

    adapter = shutil.copytree(spec_adapter(peft_adapter, "llama", "qv"), tmp_path / "adapter")
    config = os.path.join(adapter, "adapter_config.json")
    edit_json(config, auto_mapping={"base_model_class": "LlamaForCausalLM", "score": [1.0, float("-inf")]})
    line = cli_error(capsys, "export", "--adapter", adapter, "--out", tmp_path / "out")
    assert line == (f"error: {config}: field 'auto_mapping.score.1' holds NaN or infinity, which JSON does not hold (a "
                    "JavaScript runtime cannot read it); set it to a number or null")
    assert not os.path.exists(tmp_path / "out")


def test_weights_of_another_rank_than_the_config_on_the_base_it_names_advise_a_re_save(tiny_base, tmp_path):
    """adapter_config.json's r disagreeing with the weights, on the very base it names, advised "the adapter was
    trained on another base", which no base mends."""
    import peft

    from edgepeft.errors import AdapterBaseMismatchError

    base = tiny_base("llama")
    hf = peft.get_peft_model(load_reference_base(base, "causal-lm"), peft.LoraConfig(
        r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    hf.peft_config["default"].base_model_name_or_path = base
    hf.save_pretrained(tmp_path / "lora")
    edit_json(tmp_path / "lora" / "adapter_config.json", r=8)
    with pytest.raises(AdapterBaseMismatchError, match=re.escape(
            "the model expects [8, 32]; it names this base, and its adapter_config.json describes other weights (r, "
            "rank_pattern, feedforward_modules, ...): save the adapter again from its model")):
        edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / "lora"))


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_a_task_type_edited_to_another_task_is_named_with_its_fix(arch, peft_adapter, tiny_base, tmp_path):
    """An adapter whose adapter_config.json names another task than it was trained for: the advice was to re-save
    the adapter (its weights file blamed), where task_type is what to mend."""
    import shutil

    from edgepeft.errors import AdapterBaseMismatchError

    trained = {"feature-extraction": peft_adapter(arch, "task-fe", r=2),
               "seq-cls": peft_adapter(arch, "task-cls", task="seq-cls", num_labels=3, r=2)}
    if arch == "llama":
        trained["causal-lm"] = peft_adapter(arch, "task-lm", task="causal-lm", r=2)
    for task, folder in trained.items():
        for other in {"feature-extraction", "seq-cls"} - {task}:
            edited = shutil.copytree(folder, tmp_path / f"{task}-as-{other}")
            edit_json(os.path.join(edited, "adapter_config.json"),
                      task_type={"feature-extraction": "FEATURE_EXTRACTION", "seq-cls": "SEQ_CLS"}[other])
            with pytest.raises(AdapterBaseMismatchError) as e:
                edgepeft.PeftModel.from_pretrained(load_reference_base(tiny_base(arch), other, 3), str(edited))
            where = re.escape(os.path.join(str(edited), "adapter_config.json"))
            assert re.fullmatch(f"{where}: task_type (FEATURE_EXTRACTION|SEQ_CLS) does not fit the weights of "
                                r"adapter_model.safetensors \(.*\), another task's; set task_type to the task it was "
                                "trained for", str(e.value)), str(e.value)
    model = load_reference_base(tiny_base(arch), "seq-cls", 3)  # as it was trained, it loads
    edgepeft.PeftModel.from_pretrained(model, trained["seq-cls"])


@pytest.mark.parametrize("saved", ["lm_head trained whole", "tables saved by HF PEFT", "lm_head's LoRA alone"])
def test_an_adapter_trained_on_its_base_resized_names_the_resized_model_as_its_base(tiny_base, tmp_path, saved):
    """Tokens added and the model resized, then trained. Its lm_head trained whole (save_embedding_layers=False) was
    loaded at the file's 131 rows: exported without a word, 131 logits on 128 embeddings, generate a raw ONNX Runtime
    error; the resized tables HF PEFT saves were told "train the adapter without them", losing the tokens. The fix
    given, followed here, exports it as HF PEFT runs it on the resized model."""
    import peft

    from edgepeft.errors import AdapterBaseMismatchError
    from edgepeft.exporters import export
    from edgepeft.runtimes import Runtime

    base, adapter = tiny_base("llama"), str(tmp_path / "a")
    resized = load_reference_base(base, "causal-lm")
    resized.resize_token_embeddings(resized.config.vocab_size + 3)
    resized.save_pretrained(tmp_path / "resized")  # for the fix below
    whole = saved == "lm_head trained whole"
    hf = peft.get_peft_model(resized, peft.LoraConfig(r=2, target_modules=["q_proj"] + ([] if whole else ["lm_head"]),
                                                      modules_to_save=["lm_head"] if whole else None, task_type="CAUSAL_LM"))
    randomize_adapter(hf, 5)
    hf.peft_config["default"].base_model_name_or_path = base  # as HF PEFT records it: the base before resizing
    hf.save_pretrained(adapter, save_embedding_layers=saved == "tables saved by HF PEFT")
    with pytest.raises(AdapterBaseMismatchError, match=r"lm_head has 131 rows where the base's vocabulary has 128: it "
                       r"was trained on the base resized to 131 tokens; save that resized model .* set "
                       r"base_model_name_or_path in .*adapter_config.json to that folder"):
        export([adapter], str(tmp_path / "refused"))
    assert not os.path.exists(tmp_path / "refused" / "base")  # the fix, as it says:
    edit_json(os.path.join(adapter, "adapter_config.json"), base_model_name_or_path=str(tmp_path / "resized"))
    export([adapter], str(tmp_path / "out"))
    ids, mask = sample_batch()
    with torch.no_grad():
        want = hf.eval()(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    got = Runtime(str(tmp_path / "out")).forward(ids, mask, adapter="a")["logits"]
    assert got.shape == want.shape and abs(got - want)[mask.astype(bool)].max() < 1e-4


def test_an_adapter_graph_keeps_a_scalar_slots_value_a_scalar(tmp_path):
    """A newcomer hunt: a plugin's slot of shape () (a learned scalar per layer) was written as [1]
    (np.ascontiguousarray gives one axis at least), and the export refused its own adapter, "re-export the adapter"."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from edgepeft.exporters.adapter_graph import write_adapter_graph

    path = str(tmp_path / "adapter.onnx")
    write_adapter_graph({"scale.layer0": torch.tensor(0.4), "bias.layer0": np.arange(3, dtype=np.float64)}, path)
    outputs = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in onnx.load(path).graph.output}
    assert outputs == {"scale.layer0": [], "bias.layer0": [3]}
    scale, bias = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(["scale.layer0", "bias.layer0"], {})
    assert scale.shape == () and scale == np.float32(0.4) and bias.tolist() == [0, 1, 2]
