"""HF PEFT's PeftModel calls a ported script makes, on edgepeft's PeftModel: each does what HF PEFT's does, or is
refused with an EdgePeftError that names what to call instead (a bug hunt found each one failing before its fix:
ignored, a wrong answer, a raw TypeError/AttributeError, or a false "use PEFT >= 0.22" from transformers)."""
from __future__ import annotations

import pytest
import torch

from peft_refs import randomize_adapter
from tiny import load_reference_base, sample_batch

import edgepeft
from edgepeft.errors import ConfigError, UnsupportedMethodError


def _llama(tiny_base):
    return load_reference_base(tiny_base("llama"), "causal-lm").eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_inference_mode_configs_and_hf_peft_configs_are_taken_as_hf_peft_takes_them(tiny_base):
    import peft

    for lib in (peft, edgepeft):  # inference_mode=True: nothing trains (edgepeft trained the adapter)
        config = lib.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], inference_mode=True)
        assert lib.get_peft_model(_llama(tiny_base), config).get_nb_trainable_parameters()[0] == 0
    # a ported script's HF PEFT config (an AttributeError from inside the tuner): read as its saved file would be
    kw = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules={"q_proj", "v_proj"}, use_rslora=True)
    theirs = edgepeft.get_peft_model(_llama(tiny_base), peft.LoraConfig(**kw))
    ours = edgepeft.get_peft_model(_llama(tiny_base), edgepeft.LoraConfig(**kw))
    assert theirs.peft_config["default"].to_dict() == ours.peft_config["default"].to_dict()
    with pytest.raises(UnsupportedMethodError, match="HF PEFT's LoraConfig: .*use_dora"):
        edgepeft.get_peft_model(_llama(tiny_base), peft.LoraConfig(task_type="CAUSAL_LM", use_dora=True))
    with pytest.raises(UnsupportedMethodError, match="layer_replication changes what the adapter computes, and edgepeft "
                                                     "does not support it: use an adapter trained without it$"):
        edgepeft.get_peft_model(_llama(tiny_base), peft.LoraConfig(task_type="CAUSAL_LM", layer_replication=[[0, 1]]))
    with pytest.raises(ConfigError, match="config must be a PEFT config such as edgepeft.LoraConfig.*got dict"):
        edgepeft.get_peft_model(_llama(tiny_base), {"r": 4})


def test_disable_adapter_and_the_active_adapter_as_in_hf_peft(tiny_base):
    """Inside the block active_adapter stays (edgepeft said None); an adapter set_adapter makes active there runs
    once the block ends (edgepeft ran it inside, then went back to the old one); merging inside works."""
    import peft

    ids = torch.from_numpy(sample_batch()[0])
    plain = _logits(_llama(tiny_base), ids)
    seen = {}
    for lib in (peft, edgepeft):
        model = lib.get_peft_model(_llama(tiny_base), lib.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
        model.add_adapter("b", lib.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
        randomize_adapter(model, 3)
        with model.disable_adapter():
            inside = (model.active_adapter, list(model.active_adapters))
            model.set_adapter("b")
            torch.testing.assert_close(_logits(model, ids), plain, rtol=0, atol=0)
            merged = model.merge_and_unload()
        b = _logits(model, ids)
        assert not torch.equal(b, plain)
        torch.testing.assert_close(_logits(merged, ids), b, rtol=1e-4, atol=1e-5)
        seen[lib.__name__] = (inside, model.active_adapter, model.active_adapters, model.peft_type == "LORA")
    assert seen["edgepeft"] == seen["peft"] == (("default", ["default"]), "b", ["b"], True)


def test_hf_peft_keywords_of_save_load_merge_and_unload(tiny_base, tmp_path):
    ids = torch.from_numpy(sample_batch()[0])
    model = edgepeft.get_peft_model(_llama(tiny_base), edgepeft.LoraConfig(task_type="CAUSAL_LM", r=2,
                                                                          target_modules=["q_proj", "v_proj"]))
    randomize_adapter(model, 4)
    tuned = _logits(model, ids)
    model.save_pretrained(save_directory=tmp_path / "a")
    model.save_pretrained(tmp_path / "b", is_main_process=False)  # another process of a run: writes nothing
    assert not (tmp_path / "b").exists()
    (tmp_path / "file").write_text("x")
    for kwargs, words in (({"safe_serialization": False}, "writes adapter_model.safetensors only"),
                          ({"save_embedding_layers": True}, "no base embedding layers")):
        with pytest.raises(ConfigError, match=words):
            model.save_pretrained(tmp_path / "c", **kwargs)
    with pytest.raises(ConfigError, match="file: is a file, not a folder; give save_pretrained a folder"):  # FileExistsError
        model.save_pretrained(tmp_path / "file")
    loaded = edgepeft.PeftModel.from_pretrained(_llama(tiny_base), model_id=str(tmp_path / "a"))
    loaded.load_adapter(model_id=str(tmp_path / "a"), adapter_name="again")
    torch.testing.assert_close(_logits(loaded, ids), tuned, rtol=0, atol=0)
    for merged in (model.merge_and_unload(progressbar=True, safe_merge=True, adapter_names=["default"]),
                   model.merge_and_unload(True), model.merge_and_unload(adapter_names={"default"})):  # HF PEFT's forms
        torch.testing.assert_close(_logits(merged, ids), tuned, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="merges one adapter per copy"):
        loaded.merge_and_unload(adapter_names=["default", "again"])
    unloaded = model.unload()  # nothing merged, no adapter layer left
    torch.testing.assert_close(_logits(unloaded, ids), _logits(_llama(tiny_base), ids), rtol=0, atol=0)
    assert type(unloaded.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    for name, fix in (("merge_adapter", "merge_and_unload"), ("disable_adapters", "disable_adapter"),
                      ("enable_adapter_layers", "disable_adapter"), ("add_weighted_adapter", "adapter=\\{'a'")):
        for owner in (model, model.base_model):  # HF PEFT's LoraModel has them too (an AttributeError naming transformers')
            with pytest.raises(ConfigError, match=rf"{name}\(\) \(HF PEFT's\) is not in edgepeft's PeftModel; use .*{fix}"):
                getattr(owner, name)(["default", "again"], [0.5, 0.5], "mix")
    for name in ("merge_and_unload", "unload", "delete_adapter", "set_adapter"):  # found by hunts: torch's AttributeError
        with pytest.raises(ConfigError, match=rf"^base_model.{name} \(HF PEFT's\): edgepeft's base_model holds the "
                                              rf"transformers model only; use the PeftModel's {name}$"):
            getattr(model.base_model, name)()
    with pytest.raises(AttributeError, match=r"^base_model.peft_config \(HF PEFT's\): .* use the PeftModel's peft_config"):
        model.base_model.peft_config
    with pytest.raises(ConfigError, match=r"set_adapter takes one adapter's name, got \['default', 'again'\]; .* to the runtime"):
        loaded.set_adapter(["default", "again"])  # HF PEFT's LoraModel's way to activate several: a TypeError
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(ConfigError, match="gives weights that are not finite"):
        model.merge_and_unload(safe_merge=True)


def test_virtual_tokens_leave_the_input_embeddings_as_they_are(tiny_base, tmp_path):
    """Prompt tuning wrapped the input embeddings: get_input_embeddings().weight and resize_token_embeddings failed,
    and a save of the base named the embeddings ...embed_tokens.base_layer.weight, which transformers then left
    random (HF PEFT keeps its encoders outside the model)."""
    from transformers import AutoModelForCausalLM

    ids = torch.from_numpy(sample_batch()[0])
    base = _llama(tiny_base)
    words = base.get_input_embeddings().weight.detach().clone()
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = edgepeft.get_peft_model(base, edgepeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert torch.equal(model.get_input_embeddings().weight, words)
    prompted = _logits(model, ids)
    model.get_base_model().save_pretrained(tmp_path / "base")  # every weight reloads as it was
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    assert reloaded.keys() == weights.keys() and all(torch.equal(reloaded[k], v) for k, v in weights.items())
    model.add_adapter("lora", edgepeft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    assert not any("virtual_tokens" in k for k in model.merge_and_unload("lora").state_dict())
    with pytest.raises(UnsupportedMethodError, match="prompt tuning adds tokens"):
        model.merge_and_unload("default")
    assert not any("virtual_tokens" in k for k in model.unload().state_dict())
    model.resize_token_embeddings(words.shape[0] + 8)
    assert model.get_input_embeddings().weight.shape[0] == words.shape[0] + 8
    torch.testing.assert_close(_logits(model, ids)[..., :words.shape[0]], prompted, rtol=1e-5, atol=1e-6)


def test_unload_keeps_the_active_adapters_copy_of_a_layer_trained_whole(tiny_base, tmp_path):
    """HF PEFT's unload leaves a classifier's trained head (modules_to_save) in place: edgepeft put the base's
    untrained head back (0.71 off HF PEFT's unload)."""
    import peft

    ids = torch.from_numpy(sample_batch()[0])
    hf = peft.get_peft_model(load_reference_base(tiny_base("bert"), "seq-cls", num_labels=3),
                             peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    randomize_adapter(hf, 5)
    hf.save_pretrained(tmp_path / "cls")
    ours = edgepeft.PeftModel.from_pretrained(load_reference_base(tiny_base("bert"), "seq-cls", num_labels=3),
                                              str(tmp_path / "cls"))
    unloaded = hf.eval().unload()
    torch.testing.assert_close(_logits(ours.unload(), ids), _logits(unloaded, ids), rtol=1e-5, atol=1e-6)


def test_a_bert_prefix_model_pickles_and_its_attention_is_plain_again_without_a_prefix_adapter(tiny_base):
    """Found by a hunt: torch.save of a BERT prefix-tuning model failed (its attention's class was made at run time),
    and the class stayed after the prefix adapter was deleted: unload() still refused, and merge_and_unload()'s
    "plain" BertModel kept it (and failed to save)."""
    import io

    from transformers.models.bert.modeling_bert import BertSelfAttention

    ids = torch.from_numpy(sample_batch()[0])
    model = edgepeft.get_peft_model(load_reference_base(tiny_base("bert"), "feature-extraction"),
                                    edgepeft.LoraConfig(task_type="FEATURE_EXTRACTION", r=2, target_modules=["query"]))
    model.add_adapter("p", edgepeft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3))
    model.set_adapter("p")
    model.eval()
    want = model(input_ids=ids).last_hidden_state
    saved = io.BytesIO()
    torch.save(model, saved)
    saved.seek(0)
    again = torch.load(saved, weights_only=False).eval()
    torch.testing.assert_close(again(input_ids=ids).last_hidden_state, want, rtol=0, atol=0)
    with pytest.raises(UnsupportedMethodError, match="unload"):
        model.unload()
    model.delete_adapter("p")
    attention = [m for m in model.modules() if isinstance(m, BertSelfAttention)]
    assert attention and all(type(m) is BertSelfAttention for m in attention)  # no prefix class left
    for copy_ in (model.unload(), model.merge_and_unload()):
        assert all(type(m) is BertSelfAttention for m in copy_.modules() if isinstance(m, BertSelfAttention))
        torch.save(copy_, io.BytesIO())


def test_hf_peft_argument_names_and_order_and_misused_names_are_taken_or_named(tiny_base, tmp_path):
    """Found by a hunt: HF PEFT's peft_config=, subfolder=, config=, save_pretrained's and merge_and_unload's
    positional order were TypeErrors (save_pretrained(d, True) read True as selected_adapters), a keyword edgepeft
    does not take was Python's TypeError, selected_adapters="default" named its letters, a name with '.' was torch's
    KeyError, and an unknown attribute named LlamaForCausalLM."""
    ids = torch.from_numpy(sample_batch()[0])
    lora = edgepeft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"])
    model = edgepeft.get_peft_model(_llama(tiny_base), peft_config=lora)
    model.add_adapter("b", peft_config=lora)
    randomize_adapter(model, 3)
    model.save_pretrained(str(tmp_path / "saved"), True)  # HF PEFT's second: safe_serialization
    model.set_adapter("b")
    want = _logits(model, ids)
    for loaded in (edgepeft.PeftModel.from_pretrained(_llama(tiny_base), str(tmp_path / "saved"), subfolder="b"),
                   edgepeft.PeftModel.from_pretrained(_llama(tiny_base), str(tmp_path / "saved" / "b"), config=lora)):
        torch.testing.assert_close(_logits(loaded, ids), want, rtol=0, atol=0)
    loaded.load_adapter(str(tmp_path / "saved"), "again", subfolder="b")
    torch.testing.assert_close(_logits(model.merge_and_unload(True, True), ids), want, rtol=1e-4, atol=1e-5)
    for call, said in ((lambda: edgepeft.get_peft_model(_llama(tiny_base), lora, autocast_adapter_dtype=False),
                        r"^get_peft_model\(autocast_adapter_dtype=...\): HF PEFT's, not taken by edgepeft's get_peft_model; leave it out$"),
                       (lambda: loaded.load_adapter(str(tmp_path / "saved"), "x", torch_device="cpu"), "load_adapter"),
                       (lambda: model.save_pretrained(str(tmp_path / "s"), selected_adapters="default"),
                        r"^selected_adapters takes a list of adapter names, got 'default'; pass \['default'\]$"),
                       (lambda: model.add_adapter("task.v2", lora), r"^adapter name 'task.v2': give a non-empty text"),
                       (lambda: model.add_adapter("", lora), "adapter name ''")):
        with pytest.raises(ConfigError, match=said):
            call()
    assert model.active_peft_config is model.peft_config["b"]
    with pytest.raises(AttributeError, match="^edgepeft's PeftModel has no attribute 'get_model_status', nor has its LlamaForCausalLM$"):
        model.get_model_status()
    assert not hasattr(model, "get_model_status")


def test_config_given_and_the_older_save_order_are_named(tiny_base, tmp_path):
    """Found by a review: with config= given, a mismatch blamed the folder's adapter_config.json and said to re-save
    it; save_pretrained(d, ["b"]) (edgepeft's older order) read ["b"] as safe_serialization and saved every adapter;
    active_peft_config with no adapter active was a KeyError."""
    lora = edgepeft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"])
    model = edgepeft.get_peft_model(_llama(tiny_base), lora)
    model.add_adapter("b", lora)
    with pytest.raises(ConfigError, match=r"^save_pretrained's second argument is safe_serialization .*, got \['b'\]"):
        model.save_pretrained(str(tmp_path / "s"), ["b"])
    assert not (tmp_path / "s").exists()
    model.save_pretrained(str(tmp_path / "saved"))
    wide = edgepeft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"])
    with pytest.raises(edgepeft.errors.AdapterBaseMismatchError,
                       match=r"adapter_model.safetensors: does not fit the config= given \(.*\); pass the config it was "
                             r"trained with, or leave config out$"):
        edgepeft.PeftModel.from_pretrained(_llama(tiny_base), str(tmp_path / "saved"), config=wide)
    with pytest.raises(ConfigError, match=r"^from_pretrained\(revision=...\): HF PEFT's"):
        edgepeft.PeftModel.from_pretrained(_llama(tiny_base), str(tmp_path / "saved"), revision="main")
    model.delete_adapter("default")
    model.delete_adapter("b")
    assert model.active_peft_config is None and model.peft_type is None


def test_load_adapter_into_a_loaded_name_replaces_its_weights_as_in_peft(tiny_base, tmp_path):
    """HF PEFT loads the folder's weights into the adapter of that name (its config and trainability kept; a
    Trainer's best checkpoint is loaded so); edgepeft refused. Weights that do not fit change nothing."""
    import peft

    ids = torch.from_numpy(sample_batch()[0])
    got = {}
    for lib in (peft, edgepeft):
        model = lib.get_peft_model(_llama(tiny_base), lib.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
        for seed, name in ((3, "a"), (4, "b")):
            randomize_adapter(model, seed)
            model.save_pretrained(str(tmp_path / lib.__name__ / name))
        model = lib.PeftModel.from_pretrained(_llama(tiny_base), str(tmp_path / lib.__name__ / "a"), is_trainable=True)
        model.load_adapter(str(tmp_path / lib.__name__ / "b"), "default")
        fresh = lib.PeftModel.from_pretrained(_llama(tiny_base), str(tmp_path / lib.__name__ / "b"))
        torch.testing.assert_close(_logits(model, ids), _logits(fresh, ids), rtol=0, atol=0)
        got[lib.__name__] = [n for n, p in model.named_parameters() if p.requires_grad], model.training
    assert got["edgepeft"] == got["peft"] and got["peft"][0] and not got["peft"][1]
    want = _logits(model, ids)
    edgepeft.get_peft_model(_llama(tiny_base), edgepeft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]))\
        .save_pretrained(str(tmp_path / "r4"))
    edgepeft.get_peft_model(_llama(tiny_base), edgepeft.IA3Config(task_type="CAUSAL_LM", target_modules=["q_proj"],
                                                                  feedforward_modules=[])).save_pretrained(str(tmp_path / "ia3"))
    for folder, error, said in (
            ("r4", edgepeft.errors.AdapterBaseMismatchError,
             r"adapter_model.safetensors: does not fit adapter 'default' as loaded \(.*\); load it under another "
             r"adapter_name, or delete_adapter\('default'\) first$"),
            ("ia3", ConfigError, r"ia3: holds a IA3 adapter, and adapter 'default' is a loaded LORA one; load it under")):
        with pytest.raises(error, match=said):
            model.load_adapter(str(tmp_path / folder), "default")
        torch.testing.assert_close(_logits(model, ids), want, rtol=0, atol=0)
        assert list(model.peft_config) == ["default"]


def test_a_reload_only_loads_weights(tiny_base, tmp_path):
    """Found by a review: the spare adapter a reload reads into was initialised as the loaded one's config says: a
    text-initialised prompt loaded its tokenizer again (refused once that folder was gone), and the random numbers
    HF PEFT leaves to the app were drawn."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, 100)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(tmp_path / "tok"))
    config = edgepeft.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="w1 w2",
                                         tokenizer_name_or_path=str(tmp_path / "tok"), task_type="CAUSAL_LM")
    edgepeft.get_peft_model(_llama(tiny_base), config).save_pretrained(str(tmp_path / "a"))
    model = edgepeft.PeftModel.from_pretrained(_llama(tiny_base), str(tmp_path / "a"), is_trainable=True)
    shutil.rmtree(tmp_path / "tok")
    torch.manual_seed(0)
    model.load_adapter(str(tmp_path / "a"), "default", is_trainable=True)
    drawn = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(1))
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("arch, task, task_type", [("llama", "causal-lm", "CAUSAL_LM"), ("bert", "seq-cls", "SEQ_CLS")])
def test_forward_takes_arguments_by_position_in_hf_pefts_order(tiny_base, arch, task, task_type):
    """Found by a hunt: model(ids, mask, None, labels), HF PEFT's order (input_ids, attention_mask, inputs_embeds,
    labels), went to the transformers model, whose third and fourth are others: an AttributeError on Llama, and on
    BERT a tensor there would be read as token_type_ids without a word."""
    import peft

    ids, mask = (torch.from_numpy(a) for a in sample_batch())
    labels = ids if task == "causal-lm" else torch.zeros(len(ids), dtype=torch.long)
    losses = []
    for lib in (peft, edgepeft):
        torch.manual_seed(0)
        model = lib.get_peft_model(load_reference_base(tiny_base(arch), task),
                                   lib.LoraConfig(r=4, task_type=task_type)).eval()
        with torch.no_grad():
            losses.append(model(ids, mask, None, labels).loss)
            assert torch.equal(losses[-1], model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    torch.testing.assert_close(losses[0], losses[1])
    with pytest.raises(ConfigError, match="forward got attention_mask by position and by name; pass it once"):
        model(ids, mask, attention_mask=mask)
    model.delete_adapter("default")  # none left (a review: the lookup of no adapter's task type was a KeyError)
    assert model.active_adapter is None and model(ids, mask).logits.shape[0] == len(ids)


def test_add_adapter_refuses_an_embedding_trained_whole_as_get_peft_model_does(tiny_base):
    """Found by a review: get_peft_model refused modules_to_save=["embed_tokens"] (the export cannot take it), while
    add_adapter took it (trained, then the export refused it). A classifier head another adapter saves whole is a
    Linear inside its wrapper: a second classifier adapter still adds."""
    model = edgepeft.get_peft_model(_llama(tiny_base), edgepeft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="^modules_to_save 'model.embed_tokens' is no Linear layer"):
        model.add_adapter("second", edgepeft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    assert list(model.peft_config) == ["default"] and not any(".second" in n for n, _ in model.named_parameters())
    classifier = edgepeft.get_peft_model(load_reference_base(tiny_base("llama"), "seq-cls", num_labels=2),
                                         edgepeft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["q_proj"]))
    classifier.add_adapter("other", edgepeft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["v_proj"]))
    assert any("score.modules_to_save.other" in n for n, _ in classifier.named_parameters())
