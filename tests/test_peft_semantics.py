"""PyTorch-side details where edgepeft must do what HF PEFT does (found by probing, each failed before its fix).

Which adapter trains after ``add_adapter``/``set_adapter``; adapters on a bfloat16 base
(float32 weights, the base's dtype out, prefix tuning running); ``token_type_ids`` with
prompt learning (dropped except for sequence classification).
"""
from __future__ import annotations

import collections
import functools
import shlex
import shutil
import warnings

import pytest
import torch

from peft_refs import randomize_adapter
from tiny import load_reference_base, sample_batch

import edgepeft
from edgepeft.flags import method_options
from edgepeft.training import method_config


def trainable_adapters(model, adapters=("default", "other")) -> set:
    """Adapter names whose weights have requires_grad (names taken from HF PEFT's key layout)."""
    names = set()
    for key, p in model.named_parameters():
        if p.requires_grad:
            for part in key.split("."):
                if part in adapters:
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


def test_load_adapter_and_set_adapter_train_as_in_peft(tiny_base, tmp_path):
    """load_adapter(is_trainable=True) makes the loaded adapter trainable at once, the others keep their state;
    set_adapter makes the active one train unless inference_mode (a frozen-loaded one stayed frozen: a training
    loop written for HF PEFT trained nothing)."""
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
        model.set_adapter("default")
        states.append(trainable_adapters(model))
        model.set_adapter("default", inference_mode=True)
        states.append(trainable_adapters(model))
        both[lib.__name__] = states
    assert both["edgepeft"] == both["peft"] == [set(), {"other"}, {"other"}, {"default"}, set()]


def test_a_loaded_adapter_runs_without_dropout_as_in_peft(tiny_base, tmp_path):
    """Loaded for inference, lora_dropout 0.1 stayed on (its Dropout modules start in training mode): two forwards
    of one input differed, and greedy ids changed from run to run."""
    import peft

    hf = peft.get_peft_model(load_reference_base(tiny_base("llama"), "causal-lm"),
                             peft.LoraConfig(r=4, lora_dropout=0.3, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    randomize_adapter(hf, 5)
    hf.save_pretrained(tmp_path / "a")
    ids, mask = sample_batch()
    outs = {}
    for lib in (peft, edgepeft):
        model = lib.PeftModel.from_pretrained(load_reference_base(tiny_base("llama"), "causal-lm").eval(),
                                              str(tmp_path / "a"))
        with torch.no_grad():
            outs[lib.__name__] = [model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
                                  for _ in range(2)]
    torch.testing.assert_close(outs["edgepeft"][0], outs["edgepeft"][1], rtol=0, atol=0)
    torch.testing.assert_close(outs["edgepeft"][0], outs["peft"][0], rtol=0, atol=1e-5)


def test_a_failed_load_leaves_no_adapter_behind_and_adapters_delete_and_disable_as_in_peft(tiny_base, tmp_path):
    """A damaged weights file left its name registered (the retry: 'already exists'); delete_adapter and
    disable_adapter fell through to transformers (a false 'PEFT >= 0.22' error, an AttributeError)."""
    import peft

    from edgepeft.errors import ConfigError, CorruptArtifactError

    hf = peft.get_peft_model(load_reference_base(tiny_base("llama"), "causal-lm"),
                             peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    randomize_adapter(hf, 6)
    hf.save_pretrained(tmp_path / "good")
    shutil.copytree(tmp_path / "good", tmp_path / "bad")
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"cut short")
    base = load_reference_base(tiny_base("llama"), "causal-lm").eval()
    ids = torch.from_numpy(sample_batch()[0])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    model = edgepeft.PeftModel.from_pretrained(base, str(tmp_path / "good"))
    with pytest.raises(CorruptArtifactError):
        model.load_adapter(str(tmp_path / "bad"), "x")
    assert sorted(model.peft_config) == ["default"] and "x" not in str(dict(model.named_parameters()).keys())
    model.load_adapter(str(tmp_path / "good"), "x")  # the retry
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0, atol=0)
        torch.testing.assert_close(model(input_ids=ids).logits, tuned, rtol=0, atol=0)
    trainable = model.get_nb_trainable_parameters()
    with pytest.raises(Exception):  # fails part way through injection (orthogonal init needs an even rank)
        model.add_adapter("y", edgepeft.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights="orthogonal",
                                                   target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 3}))
    assert model.get_nb_trainable_parameters() == trainable and sorted(model.peft_config) == ["default", "x"]
    assert not any(".y." in key for key in dict(model.named_parameters()))  # the layers wrapped before it failed
    assert model.get_base_model() is base
    with pytest.raises(ConfigError, match=r"save_pretrained: no adapter named 'zzz'; have \['default', 'x'\]"):
        model.save_pretrained(tmp_path / "saved", selected_adapters=["zzz"])
    model.save_pretrained(tmp_path / "none", selected_adapters=[])  # no adapter (HF PEFT writes only a README.md)
    assert not (tmp_path / "none").exists()
    both = {}
    for lib in (peft, edgepeft):  # deleting the active one: the first left by name becomes active and trains
        model = lib.PeftModel.from_pretrained(load_reference_base(tiny_base("llama"), "causal-lm"), str(tmp_path / "good"))
        for name in ("b", "a"):
            model.load_adapter(str(tmp_path / "good"), name)
        model.delete_adapter("default")
        both[lib.__name__] = (sorted(model.peft_config), model.active_adapter, trainable_adapters(model, ("a", "b")))
    assert both["edgepeft"] == both["peft"] == (["a", "b"], "a", {"a"})


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
    if method != "prefix":  # merged as HF PEFT merges: the float32 change added to the bfloat16 weight, rounded once
        theirs, merged = dict(hf.merge_and_unload().named_parameters()), dict(ours.merge_and_unload().named_parameters())
        assert theirs.keys() == merged.keys() and all(torch.equal(merged[k], v) for k, v in theirs.items())


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


@pytest.mark.parametrize("make, error, words", [
    (lambda: edgepeft.LoraConfig(init_lora_weights="pissa"), "UnsupportedMethodError", "change the base weights"),
    (lambda: edgepeft.LoraConfig(init_lora_weights="bogus"), "UnsupportedMethodError", "not supported"),
    (lambda: edgepeft.LoraConfig(lora_dropout=1.5), "ConfigError", "lora_dropout"),
    (lambda: edgepeft.LoraConfig(task_type="FOO"), "UnsupportedMethodError", "task_type 'FOO'"),
    (lambda: edgepeft.LoraConfig(task_type="TOKEN_CLS"), "UnsupportedMethodError", "task_type 'TOKEN_CLS'"),
    (lambda: edgepeft.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"]), "ConfigError", "subset"),
    (lambda: edgepeft.LoraConfig.from_dict({"peft_type": "LORA", "alora_invocation_tokens": [5, 6]}),
     "UnsupportedMethodError", "alora_invocation_tokens"),
    # without layers_to_transform it selects nothing, and HF PEFT cannot load an adapter that records it
    (lambda: edgepeft.LoraConfig(layers_pattern="layers"), "UnsupportedMethodError", "train without layers_pattern"),
    (lambda: method_config("lora", "causal-lm", {"layers_pattern": ["layers"]}), "UnsupportedMethodError", "layers_pattern"),
    # a hunt: trained with a RANDOM init, and HF PEFT could not load it
    (lambda: method_config("prompt", "causal-lm", {"tokenizer_kwargs": {"add_bos_token": False}}), "ConfigError",
     "tokenizer_kwargs are read only with prompt_tuning_init='TEXT' .this one is 'RANDOM'., and HF PEFT refuses"),
], ids=["pissa", "bogus-init", "dropout", "task-foo", "task-token-cls", "ia3-ff-not-target", "alora", "layers-pattern",
        "layers-pattern-train", "prompt-tokenizer-kwargs"])
def test_configs_hf_peft_refuses_or_edgepeft_cannot_run_are_refused(make, error, words):
    from edgepeft import errors

    with pytest.raises(getattr(errors, error), match=words):
        make()


def test_hf_lora_variants_that_need_no_base_change_still_load():
    for init in (True, False, "gaussian", "eva", "orthogonal", "mica"):
        assert edgepeft.LoraConfig(init_lora_weights=init).init_lora_weights == init
    assert edgepeft.LoraConfig(layers_pattern=None).layers_pattern is None  # HF PEFT writes null
    # a hunt: HF PEFT reads "Gaussian" as "gaussian" (its adapter was told to convert, as PiSSA's); a typo or "True"
    # was told PiSSA and LoftQ change the base weights
    assert [edgepeft.LoraConfig(init_lora_weights=v).init_lora_weights for v in ("Gaussian", "MiCA")] == ["gaussian", "mica"]
    from edgepeft.errors import UnsupportedMethodError

    with pytest.raises(UnsupportedMethodError, match=r"^init_lora_weights='True' is not supported; pass one of True, "):
        edgepeft.LoraConfig(init_lora_weights="True")
    for base_changing in ("pissa_niter_4", "OLoRA", "lora_ga", "corda"):
        with pytest.raises(UnsupportedMethodError, match="change the base weights; train with the default init, or "):
            edgepeft.LoraConfig(init_lora_weights=base_changing)
    with pytest.raises(UnsupportedMethodError, match="its quantized copy of the base.*; train with the default init$"):
        edgepeft.LoraConfig(init_lora_weights="loftq")  # a variants hunt: told to convert it, which HF PEFT does not
    for typo in ("PISSA", "LoftQ"):  # HF PEFT matches these as written: unknown to it (a review)
        with pytest.raises(UnsupportedMethodError, match="is not supported; pass one of True, "):
            edgepeft.LoraConfig(init_lora_weights=typo)


def test_eva_adapters_load_but_training_with_eva_is_refused(tiny_base, tmp_path):
    """EVA starts A from the SVD of activations on training data (HF PEFT's initialize_lora_eva_weights), which
    edgepeft does not run: training would silently start from the default init. A trained EVA adapter is plain LoRA."""
    import json

    from edgepeft.errors import UnsupportedMethodError
    from tiny import max_diff_valid, torch_outputs

    base = tiny_base("llama")
    options = dict(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    with pytest.raises(UnsupportedMethodError, match="init_lora_weights='eva'.*does not train them"):
        edgepeft.get_peft_model(load_reference_base(base, "causal-lm"), edgepeft.LoraConfig(init_lora_weights="eva", **options))
    model = edgepeft.get_peft_model(load_reference_base(base, "causal-lm"), edgepeft.LoraConfig(**options))
    randomize_adapter(model, 5)
    model.eval().save_pretrained(tmp_path / "eva")
    config = json.loads((tmp_path / "eva" / "adapter_config.json").read_text())
    (tmp_path / "eva" / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "eva"}))
    loaded = edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / "eva")).eval()
    ids, mask = sample_batch()
    assert max_diff_valid(torch_outputs(loaded, ids, mask, "logits"), torch_outputs(model, ids, mask, "logits")) == 0


def test_lora_inits_start_as_hf_peft_starts(tiny_base):
    """init_lora_weights trains from HF PEFT's start: gaussian A ~ N(0, 1/r), B zero; orthogonal: A and B non-zero
    with B @ A = 0 (an even rank); MiCA (plain LoRA when run) loads, but its training (B frozen) is refused."""
    from edgepeft.errors import ConfigError, UnsupportedMethodError

    def start(init, r=16):
        torch.manual_seed(0)
        model = edgepeft.get_peft_model(load_reference_base(tiny_base("llama"), "causal-lm"), edgepeft.LoraConfig(
            r=r, target_modules=["gate_proj"], init_lora_weights=init, task_type="CAUSAL_LM"))
        layer = model.get_submodule("base_model.model.model.layers.0.mlp.gate_proj")
        return layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()

    a, b = start("gaussian")
    assert abs(float(a.std()) - 1 / 16) < 0.01 and not b.any()
    a, b = start(True)
    assert abs(float(a.std()) - 1 / 16) > 0.02 and not b.any()  # Kaiming-uniform: another spread
    a, b = start("orthogonal")
    assert a.abs().min() > 0 and b.abs().max() > 0.01 and float((b @ a).abs().max()) < 1e-6
    import peft  # found by a hunt: B came from the same draws laid out transposed (0.46 off HF PEFT's, same seed)

    torch.manual_seed(0)
    hf = peft.get_peft_model(load_reference_base(tiny_base("llama"), "causal-lm"), peft.LoraConfig(
        r=16, target_modules=["gate_proj"], init_lora_weights="orthogonal", task_type="CAUSAL_LM"))
    layer = hf.get_submodule("base_model.model.model.layers.0.mlp.gate_proj")
    torch.testing.assert_close((a, b), (layer.lora_A["default"].weight, layer.lora_B["default"].weight), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="'orthogonal' needs an even rank"):
        start("orthogonal", r=3)
    with pytest.raises(UnsupportedMethodError, match="does not train them"):
        start("mica")


def test_modules_to_save_match_as_in_hf_peft(tiny_base, tmp_path):
    """HF PEFT saves every module whose name ends with a listed name ("head": lm_head) and puts no LoRA inside a
    module saved whole; edgepeft reads and exports such adapters with HF PEFT's outputs. The adapter's own name may
    end with a listed name: what LoRA layers hold is never saved whole."""
    import peft

    from edgepeft.exporters import export
    from edgepeft.runtimes import Runtime
    from tiny import max_diff_valid, torch_outputs

    base = tiny_base("llama")
    cases = {"ends-with-head": dict(target_modules=["q_proj"], modules_to_save=["head"]),
             "lora-inside-saved": dict(target_modules=["q_proj", "o_proj"], modules_to_save=["layers.1.self_attn.o_proj"])}
    ids, mask = sample_batch(batch=2, seq=6)
    for name, options in cases.items():
        pm = peft.get_peft_model(load_reference_base(base, "causal-lm"), peft.LoraConfig(task_type="CAUSAL_LM", r=4, **options))
        randomize_adapter(pm, 5)
        pm.peft_config["default"].base_model_name_or_path = base
        pm.save_pretrained(tmp_path / name)
        ref = torch_outputs(pm.eval(), ids, mask, "logits")
        ours = edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / name)).eval()
        assert max_diff_valid(torch_outputs(ours, ids, mask, "logits"), ref, mask) < 1e-5, name
        export([str(tmp_path / name)], str(tmp_path / f"out-{name}"), names=["mts_head"])  # an adapter name ending "head"
        logits = Runtime(str(tmp_path / f"out-{name}")).forward(ids, mask, adapter="mts_head")["logits"]
        assert max_diff_valid(logits, ref, mask) < 1e-4, name


def test_all_linear_ignores_case_and_merge_names_unknown_adapters(tiny_base):
    from edgepeft.errors import ConfigError

    model = edgepeft.get_peft_model(load_reference_base(tiny_base("llama"), "causal-lm"),
                                    edgepeft.LoraConfig(r=2, target_modules="ALL-LINEAR", task_type="CAUSAL_LM"))
    assert any(k.endswith("mlp.down_proj.lora_A.default.weight") for k, _ in model.named_parameters())
    with pytest.raises(ConfigError, match="no adapter named 'nope'"):
        model.merge_and_unload("nope")


@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_lora_records_the_targets_its_defaults_resolved_to_as_hf_peft(tiny_base, tmp_path, targets):
    """adapter_config.json says which modules the adapter adapts, as HF PEFT writes it (it said null or "all-linear",
    which leaves the choice to whichever loader's defaults): the model type's names (full names would match the
    first layers only on a deeper model of that type), or the modules all-linear chose."""
    import json

    import peft

    folder = tiny_base("llama")
    for name, lib, load in (("ours", edgepeft, load_reference_base), ("hf", peft, load_reference_base)):
        lib.get_peft_model(load(folder, "causal-lm"), lib.LoraConfig(r=2, target_modules=targets, task_type="CAUSAL_LM")
                           ).save_pretrained(str(tmp_path / name))
    ours, hf = (json.loads((tmp_path / n / "adapter_config.json").read_text())["target_modules"] for n in ("ours", "hf"))
    assert ours == sorted(hf) and len(ours) == (2 if targets is None else 14)  # q_proj, v_proj; or every module's name


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


def test_an_adapter_the_export_cannot_take_is_named(tiny_base, tmp_path):
    """A module saved whole that is no Linear head (a whole MLP): refused naming the adapter's config file."""
    import peft

    from edgepeft.errors import UnsupportedModelError
    from edgepeft.exporters import export

    base = tiny_base("llama")
    pm = peft.get_peft_model(load_reference_base(base, "causal-lm"), peft.LoraConfig(
        task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "gate_proj"], modules_to_save=["mlp"]))
    pm.peft_config["default"].base_model_name_or_path = base
    pm.save_pretrained(tmp_path / "whole-mlp")
    with pytest.raises(UnsupportedModelError) as e:
        export([str(tmp_path / "whole-mlp")], str(tmp_path / "out"))
    assert str(e.value).startswith(f"{tmp_path / 'whole-mlp' / 'adapter_config.json'}: modules_to_save ")
    assert "Linear heads only" in str(e.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ia3_records_the_model_types_default_targets_as_hf_peft(tiny_base, tmp_path, arch):
    """It recorded every module's full name (the first layers only, on a deeper model of that type)."""
    import json

    import peft

    folder = tiny_base(arch)
    for name, lib in (("ours", edgepeft), ("hf", peft)):
        lib.get_peft_model(load_reference_base(folder, "causal-lm"), lib.IA3Config(task_type="CAUSAL_LM")
                           ).save_pretrained(str(tmp_path / name))
    ours, hf = (json.loads((tmp_path / n / "adapter_config.json").read_text()) for n in ("ours", "hf"))
    for key in ("target_modules", "feedforward_modules"):
        assert ours[key] == sorted(hf[key]), key
    # targets chosen without their feedforward layer: HF PEFT records the model type's list, which neither library
    # then loads ("must be a subset of target_modules"); the targets it marks are recorded, for the same layers
    chosen = {"llama": ["q_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"]}[arch]
    model = edgepeft.get_peft_model(load_reference_base(folder, "causal-lm"), edgepeft.IA3Config(target_modules=chosen[:1]))
    model.save_pretrained(str(tmp_path / "attention"))
    assert json.loads((tmp_path / "attention" / "adapter_config.json").read_text())["feedforward_modules"] == []
    model = edgepeft.get_peft_model(load_reference_base(folder, "causal-lm"), edgepeft.IA3Config(target_modules=chosen))
    marked = sorted(k for k, m in model.named_modules() if getattr(m, "is_feedforward", False))
    model.save_pretrained(str(tmp_path / "both"))
    for lib in (edgepeft, peft):
        again = lib.PeftModel.from_pretrained(load_reference_base(folder, "causal-lm"), str(tmp_path / "both"))
        assert sorted(k for k, m in again.named_modules() if getattr(m, "is_feedforward", False)) == marked, lib
    assert marked
    # feedforward_modules without targets: HF PEFT trains it beside the defaults, then neither library loads it;
    # refused before training, and the named targets train an adapter both load
    with pytest.raises(edgepeft.errors.ConfigError, match="name all the targets in target_modules") as e:
        edgepeft.get_peft_model(load_reference_base(folder, "causal-lm"), edgepeft.IA3Config(feedforward_modules=["mlp.c_fc"
                                if arch == "gpt2" else "up_proj"]))
    named = str(e.value).rpartition(": ")[2].split(",")
    edgepeft.get_peft_model(load_reference_base(folder, "causal-lm"), edgepeft.IA3Config(
        target_modules=named, feedforward_modules=named[-1:])).save_pretrained(str(tmp_path / "named"))
    for lib in (edgepeft, peft):
        lib.PeftModel.from_pretrained(load_reference_base(folder, "causal-lm"), str(tmp_path / "named"))


def test_refusals_of_hf_peft_layouts_name_a_fix_that_works(tiny_base, tmp_path):
    """Each message gave a fix that did not work: a folder of named adapters ('pass a folder saved by save_pretrained',
    which it was); target_modules as one name (its own layer listed as one it could match); an embedding trained
    whole (no fix). (Two IA3 adapters scaling a layer's two sides: test_export_order.py.)"""
    import peft

    from edgepeft.errors import ArtifactNotFoundError, ConfigError, UnsupportedModelError
    from edgepeft.exporters import export

    base = tiny_base("llama")
    pm = peft.get_peft_model(load_reference_base(base, "causal-lm"),
                             peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]), adapter_name="mine")
    pm.save_pretrained(str(tmp_path / "named"))  # HF PEFT: named/mine/
    with pytest.raises(ArtifactNotFoundError, match=rf"named/adapter_config.json: not found; it holds adapters saved "
                       rf"under their names: pass {tmp_path}/named/mine$"):
        export([str(tmp_path / "named")], str(tmp_path / "out"))
    export([str(tmp_path / "named" / "mine")], str(tmp_path / "out"))  # the advice works
    model = load_reference_base(base, "causal-lm")
    with pytest.raises(ConfigError, match=r"a string is a regular expression for the whole module name: give a list "
                       r"\(\['q_proj'\]; at the command line --target-modules q_proj\) or '\.\*q_proj'"):
        edgepeft.get_peft_model(model, edgepeft.LoraConfig(target_modules="q_proj"))
    # a hunt: names with commas in one string (--option target_modules=q_proj,v_proj), a regular expression in a list
    # (--target-modules '.*q_proj'): no hint
    with pytest.raises(ConfigError, match=r"give a list \(\['q_proj', 'v_proj'\]; at the command line --target-modules "
                                          r"q_proj,v_proj\)$"):
        edgepeft.get_peft_model(model, edgepeft.LoraConfig(target_modules="q_proj,v_proj"))
    with pytest.raises(ConfigError, match=r"give one regular expression as a string \(at the command line --option "
                                          r"'target_modules=\".\*q_proj\|.\*v_proj\"': JSON, each backslash written twice\)$"):
        edgepeft.get_peft_model(model, edgepeft.LoraConfig(target_modules=[".*q_proj", ".*v_proj"]))  # each (a review)
    # a variants hunt: the option given for a regular expression with "\." failed as JSON and went on as text, its
    # quotes kept (it matched nothing); it is JSON now, and JSON that fails is said
    with pytest.raises(ConfigError, match="give one regular expression") as told:
        edgepeft.get_peft_model(model, edgepeft.LoraConfig(target_modules=[r".*layers\.1\.self_attn\.q_proj"]))
    option = shlex.split(told.value.args[0].split("at the command line ")[1].split(": JSON")[0])
    assert option[0] == "--option" and method_options("lora", None, None, None, option[1:]) == {
        "target_modules": r".*layers\.1\.self_attn\.q_proj"}
    with pytest.raises(ConfigError, match=r"""^--option 'target_modules=".\*layers\\.1"': the value is not valid JSON""") as e:
        method_options("lora", None, None, None, ['target_modules=".*layers\\.1"'])
    fix = shlex.split(str(e.value).split("): --option ")[1].split(", or the text")[0])  # the form it gives works
    assert method_options("lora", None, None, None, fix) == {"target_modules": r".*layers\.1"}
    assert method_options("lora", None, None, None, ["target_modules=[qv]_proj"]) == {"target_modules": "[qv]_proj"}
    adapted = edgepeft.get_peft_model(load_reference_base(base, "causal-lm"), edgepeft.LoraConfig(target_modules=".*q_proj|.*v_proj"))
    assert {k.rpartition(".")[2] for k, m in adapted.named_modules() if hasattr(m, "lora_A")} == {"q_proj", "v_proj"}
    with pytest.raises(ConfigError, match="exclude_modules \\['q_proj'\\] leaves none of its matches"):
        edgepeft.get_peft_model(model, edgepeft.LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))
    with pytest.warns(edgepeft.EdgePeftWarning, match=r"exclude_modules \['layer.0.mlp.down_proj'\] names no module of "
                      "this model, so it leaves nothing out"):  # a variants hunt: a typo trained every layer, silently
        edgepeft.get_peft_model(load_reference_base(base, "causal-lm"), edgepeft.LoraConfig(
            target_modules="all-linear", exclude_modules=["layer.0.mlp.down_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one that leaves something out says nothing
        edgepeft.get_peft_model(load_reference_base(base, "causal-lm"), edgepeft.LoraConfig(
            target_modules="all-linear", exclude_modules=["layers.0.mlp.down_proj"]))
    import peft  # edgepeft's get_peft_model refuses it (test_training_checks): HF PEFT's makes it

    embed = peft.get_peft_model(load_reference_base(base, "causal-lm"), peft.LoraConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    embed.peft_config["default"].base_model_name_or_path = base
    embed.save_pretrained(str(tmp_path / "embed"))
    with pytest.raises(UnsupportedModelError, match="embed_tokens' is no Linear layer \\(Embedding\\); edgepeft exports Linear heads only "
                       ".* use an adapter trained without it"):
        export([str(tmp_path / "embed")], str(tmp_path / "out-embed"))



def test_loading_and_switching_cost_the_same_whatever_number_of_adapters_is_loaded(tiny_base, tmp_path, monkeypatch):
    """load_adapter and set_adapter walked every module of every adapter loaded (torch's recursive parameters() per
    adapter entry, eval() of the whole model), so one export of N adapters cost N\u00b2: 100 adapters took 71 s in one
    call against 33 s now. The recursive walks of a load and a switch no longer grow with the adapters loaded, and a
    model in training mode is still put in eval mode, as HF PEFT's load_adapter does."""
    import peft

    hf = peft.get_peft_model(load_reference_base(tiny_base("llama"), "causal-lm"),
                             peft.LoraConfig(r=2, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM"))
    hf.save_pretrained(tmp_path / "a")
    calls = collections.Counter()
    for method in ("train", "parameters", "named_parameters"):
        original = getattr(torch.nn.Module, method)
        monkeypatch.setattr(torch.nn.Module, method, functools.partialmethod(counted, original, calls, method))
    walk = torch.nn.Module.named_modules

    def walked(self, *args, **kwargs):  # counts the modules a walk yields
        for item in walk(self, *args, **kwargs):
            calls["walked"] += 1
            yield item
    monkeypatch.setattr(torch.nn.Module, "named_modules", walked)

    def cost(model, name):
        calls.clear()
        model.load_adapter(str(tmp_path / "a"), name)
        model.set_adapter(name, inference_mode=True)
        return dict(calls)

    model = edgepeft.PeftModel.from_pretrained(load_reference_base(tiny_base("llama"), "causal-lm"), str(tmp_path / "a"))
    second = cost(model, "b")
    for i in range(6):
        model.load_adapter(str(tmp_path / "a"), f"c{i}")
    assert cost(model, "d") == second
    model.train()
    model.load_adapter(str(tmp_path / "a"), "e")
    assert not any(m.training for m in model.modules())
    model.delete_adapter("e")  # as HF PEFT's other_param_names: its scaling goes too (a review found it kept)
    from edgepeft.tuners.lora.layer import LoraLinear

    assert [m.scaling for m in model.modules() if isinstance(m, LoraLinear)][0].keys() == \
        {"default", "b", *(f"c{i}" for i in range(6)), "d"}


def counted(self, original, calls, method, *args, **kwargs):
    calls[method] += 1
    return original(self, *args, **kwargs)
