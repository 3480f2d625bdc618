"""Round trips with HF PEFT on transformers 5 as the reference: BERT prefix tuning (the tokens' positions start
after the prefix, in PyTorch, the export and the runtime's length check; adapters both ways), the base revision an
adapter records (export and training, from an offline fake hub cache), and HF PEFT's pickled adapter_model.bin.
Tiny models from configs; nothing is downloaded."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from file_checks import fake_hub, write_lines
from peft_refs import randomize_adapter, randomize_prompt_encoder
from tiny import load_reference_base, max_diff_valid, sample_batch, tiny_config, torch_outputs
from training_helpers import seq_cls_rows, train_argv
from word_tokenizer import build_tokenizer

import edgepeft
from edgepeft.errors import ConfigError, CorruptArtifactError, InvalidInputError, UnsupportedMethodError
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime

FE = "feature-extraction"


# ---------------------------------------------------------------- BERT prefix tuning
@pytest.mark.parametrize("projection", [False, True])
def test_bert_prefix_matches_hf_peft_in_torch_and_onnx_both_ways(projection, tiny_base, tmp_path):
    """HF PEFT runs a FEATURE_EXTRACTION prefix on BERT from the cache, so BertEmbeddings starts the tokens'
    positions at n: edgepeft's PyTorch module and its export give HF PEFT's outputs, and HF PEFT gives an adapter
    edgepeft saved the outputs edgepeft gives it."""
    import peft

    base = tiny_base("bert")
    ids, mask = sample_batch(batch=3)
    kw = dict(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3, prefix_projection=projection,
              encoder_hidden_size=24 if projection else None)
    theirs = peft.get_peft_model(load_reference_base(base, FE), peft.PrefixTuningConfig(**kw)).eval()
    randomize_prompt_encoder(theirs, seed=5, scale=0.5)
    theirs.peft_config["default"].base_model_name_or_path = base
    theirs.save_pretrained(tmp_path / "theirs")
    want = torch_outputs(theirs, ids, mask, "last_hidden_state")
    assert max_diff_valid(want, torch_outputs(load_reference_base(base, FE), ids, mask, "last_hidden_state"), mask) > 1e-2

    ours = edgepeft.PeftModel.from_pretrained(load_reference_base(base, FE), str(tmp_path / "theirs")).eval()
    assert max_diff_valid(torch_outputs(ours, ids, mask, "last_hidden_state"), want, mask) <= 1e-5
    export([tmp_path / "theirs"], tmp_path / "out", names=["prefix"])
    got = Runtime(str(tmp_path / "out")).forward(ids, mask, adapter="prefix")["last_hidden_state"]
    assert max_diff_valid(got, want, mask) <= 1e-4

    made = edgepeft.get_peft_model(load_reference_base(base, FE), edgepeft.PrefixTuningConfig(**kw))
    randomize_prompt_encoder(made, seed=6, scale=0.5)
    made.eval().save_pretrained(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(load_reference_base(base, FE), str(tmp_path / "ours")).eval()
    assert max_diff_valid(torch_outputs(loaded, ids, mask, "last_hidden_state"),
                          torch_outputs(made, ids, mask, "last_hidden_state"), mask) <= 1e-5


def test_bert_prefix_positions_follow_one_convention_and_count_against_max_positions(tiny_base, tmp_path):
    """A seq-cls prefix (HF PEFT cannot run one on BERT) takes positions n..n+T-1 as feature extraction does, and
    the runtime counts the n virtual tokens against the model's 64 positions, as training does."""
    n, limit = 4, tiny_config("bert").max_position_embeddings
    model = edgepeft.get_peft_model(load_reference_base(tiny_base("bert"), "seq-cls", num_labels=3),
                                    edgepeft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=n))
    randomize_prompt_encoder(model, seed=7, scale=0.5)
    model.eval().save_pretrained(tmp_path / "prefix")
    seen = []
    embeddings = model.get_submodule("base_model.model.bert.embeddings")
    hook = embeddings.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True)
    ids, mask = sample_batch(batch=2, seq=limit - n)  # the longest text that fits
    want = torch_outputs(model, ids, mask, "logits")
    hook.remove()
    assert seen[0].tolist() == [list(range(n, limit))] * 2

    export([tmp_path / "prefix"], tmp_path / "out", names=["prefix"])
    rt = Runtime(str(tmp_path / "out"))
    assert max_diff_valid(rt.forward(ids, mask, adapter="prefix")["logits"], want) <= 1e-4
    longer, longer_mask = sample_batch(batch=2, seq=limit - n + 1)
    with pytest.raises(InvalidInputError, match=f"{limit - n + 1} tokens \\+ the adapter's {n} virtual tokens"):
        rt.forward(longer, longer_mask, adapter="prefix")
    rt.forward(longer, longer_mask)  # the base alone takes them


# ---------------------------------------------------------------- the base revision an adapter records
def _hub_adapter(path, revision):
    """An HF PEFT LoRA adapter on acme/tiny-llama at ``revision``, recording it as HF PEFT does; with its outputs."""
    import peft
    import transformers as tf

    base = tf.AutoModelForCausalLM.from_pretrained("acme/tiny-llama", revision=revision, dtype=torch.float32)
    pm = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "v_proj"],
                                                   revision=revision))
    randomize_adapter(pm, 3)
    pm.peft_config["default"].base_model_name_or_path = "acme/tiny-llama"
    pm.save_pretrained(path)
    ids, mask = sample_batch()
    return str(path), torch_outputs(pm.eval(), ids, mask, "logits")


def test_export_loads_the_base_revision_the_adapter_records(tiny_base, tmp_path, monkeypatch, capsys):
    import transformers as tf

    torch.manual_seed(77)
    tf.AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(tmp_path / "v1")
    build_tokenizer().save(str(tmp_path / "v1" / "tokenizer.json"))  # only v1 has a tokenizer: the export takes it
    (tmp_path / "v1" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                        "bos_token": "<s>", "eos_token": "</s>"}))
    fake_hub(tmp_path / "hub", monkeypatch, "acme/tiny-llama", {"main": tiny_base("llama"), "v1": tmp_path / "v1"})
    v1, want = _hub_adapter(tmp_path / "on-v1", "v1")
    assert json.loads((tmp_path / "on-v1" / "adapter_config.json").read_text())["revision"] == "v1"
    export([v1], tmp_path / "out", names=["v1"])
    ids, mask = sample_batch()
    rt = Runtime(str(tmp_path / "out"))
    assert max_diff_valid(rt.forward(ids, mask, adapter="v1")["logits"], want, mask) <= 1e-4
    assert rt.tokenizer.encode("w10 w20")[0].tolist() == [[1, 10, 20]]  # a hub base's tokenizer, at its revision
    assert (tmp_path / "out" / "base" / "generation_config.json").is_file()  # as a folder's (a paths hunt: left out)
    from edgepeft.cli import main

    assert rt.manifest["revision"] == "v1"  # recorded: inspect shows it
    main(["inspect", str(tmp_path / "out")])
    assert "from acme/tiny-llama (revision v1)" in capsys.readouterr().out

    on_main, _ = _hub_adapter(tmp_path / "on-main", None)
    with pytest.raises(ConfigError, match=r"different revisions of acme/tiny-llama .*on-v1: v1.*on-main: main"):
        export([v1, on_main], tmp_path / "both")


def test_an_adapter_recording_a_cached_hub_base_is_compared_with_another_base(tiny_base, tmp_path, monkeypatch):
    """A paths hunt: an adapter recording a hub id (in this machine's cache) exported with --base a folder of other
    weights was not compared (only a recorded folder was): 0.49 from HF PEFT on its own base, exit 0."""
    import transformers as tf

    from edgepeft.errors import AdapterBaseMismatchError

    fake_hub(tmp_path / "hub", monkeypatch, "acme/tiny-llama", {"main": tiny_base("llama")})
    adapter, _ = _hub_adapter(tmp_path / "on-main", None)
    torch.manual_seed(78)
    tf.AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(tmp_path / "other")
    with pytest.raises(AdapterBaseMismatchError, match=f"was trained on acme/tiny-llama, whose weights differ from "
                                                       f"--base {tmp_path}/other"):
        export([adapter], tmp_path / "out", base=str(tmp_path / "other"))
    export([adapter], tmp_path / "out", base=tiny_base("llama"))  # a copy of it: the same weights


def test_adapters_of_one_local_folder_export_together_whatever_revision_they_record(tiny_base, tmp_path):
    """An hfsaves hunt: two adapters of one local folder, one recording a hub revision (which transformers and HF
    PEFT ignore for a folder), were refused together as "different revisions", and accepted one after the other."""
    from peft_refs import lora_adapter

    dirs = [lora_adapter(tmp_path / name, tiny_base("llama"), "causal-lm", seed, r=2, target_modules=["q_proj"])
            for seed, name in enumerate(("unset", "tagged"))]
    config = json.loads((tmp_path / "tagged" / "adapter_config.json").read_text())
    (tmp_path / "tagged" / "adapter_config.json").write_text(json.dumps({**config, "revision": "v1.0"}))
    export(dirs, tmp_path / "out")
    assert Runtime(str(tmp_path / "out")).manifest.get("revision") is None


def test_training_loads_the_revision_it_records(text_model, tmp_path, monkeypatch):
    """`--option revision=v1` trains on that revision (the hub cache holds no other) and records it."""
    from edgepeft.cli import main

    fake_hub(tmp_path / "hub", monkeypatch, "acme/tiny-bert", {"v1": text_model("bert")})
    data = write_lines(tmp_path / "train.jsonl", seq_cls_rows(8))
    main(train_argv("acme/tiny-bert", data, str(tmp_path / "out"), "--option", "revision=v1"))
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("acme/tiny-bert", "v1")


# ---------------------------------------------------------------- HF PEFT's pickled weights
def test_adapter_model_bin_loads_and_exports_as_hf_peft_reads_it(tiny_base, tmp_path):
    import peft

    base = tiny_base("llama")
    pm = peft.get_peft_model(load_reference_base(base, "causal-lm"),
                             peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapter(pm, 4)
    pm.peft_config["default"].base_model_name_or_path = base
    path = tmp_path / "pickled"
    pm.save_pretrained(path, safe_serialization=False)
    assert "adapter_model.bin" in os.listdir(path) and "adapter_model.safetensors" not in os.listdir(path)
    ids, mask = sample_batch()
    want = torch_outputs(pm.eval(), ids, mask, "logits")
    ours = edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(path)).eval()
    assert max_diff_valid(torch_outputs(ours, ids, mask, "logits"), want, mask) <= 1e-5
    export([path], tmp_path / "out", names=["pickled"])
    got = Runtime(str(tmp_path / "out")).forward(ids, mask, adapter="pickled")["logits"]
    assert max_diff_valid(got, want, mask) <= 1e-4

    (path / "adapter_model.bin").write_bytes(np.arange(64, dtype=np.uint8).tobytes())
    with pytest.raises(CorruptArtifactError, match=r"adapter_model\.bin: cannot read adapter weights.*save_pretrained"):
        edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(path))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_peft_bias_all_exports_where_the_model_has_no_biases_and_is_refused_where_it_saved_them(arch, tiny_base,
                                                                                                   tmp_path):
    """A variants hunt: bias="all" on a Llama (whose layers have no bias: HF PEFT saves none, the adapter is plain
    LoRA) was refused, "train without them". It exports now, HF PEFT's outputs; GPT-2's saved biases are refused."""
    import peft

    from peft_refs import lora_adapter

    base = tiny_base(arch)
    path = lora_adapter(tmp_path / "biased", base, "causal-lm", 5, r=2, bias="all")
    if arch == "gpt2":
        with pytest.raises(UnsupportedMethodError, match="adapter_config.json: LoRA option.s. bias"):
            export([path], tmp_path / "out", base=base)
        return
    ids, mask = sample_batch()
    want = torch_outputs(peft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), path).eval(), ids, mask,
                         "logits")
    export([path], tmp_path / "out", base=base)
    assert max_diff_valid(Runtime(str(tmp_path / "out")).forward(ids, mask, adapter="biased")["logits"], want, mask) <= 1e-4


# ---------------------------------------------------------------- adapters saved without task_type
def test_an_adapter_without_task_type_exports_for_the_class_hf_peft_loads(tmp_path):
    """HF PEFT records the model class (auto_mapping) and AutoPeftModel loads it: a LoRA on a Llama classifier
    saved without task_type exported as a causal LM, its lm_head random (transformers made one, no word), logits
    (B, T, vocab) where HF PEFT gives (B, labels). A causal-LM export of a checkpoint without its head is refused."""
    import peft
    import transformers

    cfg = tiny_config("llama")
    cfg.num_labels, cfg.pad_token_id = 3, 0
    base = str(tmp_path / "llama-cls")
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(base)
    pm = peft.get_peft_model(transformers.AutoModelForSequenceClassification.from_pretrained(base),
                             peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # no task_type
    randomize_adapter(pm, 1)
    pm.save_pretrained(str(tmp_path / "adapter"))
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        saved = json.load(f)
    assert saved["task_type"] is None and saved["auto_mapping"]["base_model_class"] == "LlamaForSequenceClassification"
    export([str(tmp_path / "adapter")], str(tmp_path / "out"), names=["cls"])
    rt = Runtime(tmp_path / "out")
    assert rt.task == "seq-cls"
    ids, mask = sample_batch(batch=2, seq=6)
    ids[ids == 0] = 5  # no padding id inside the tokens (the classifier reads the last non-pad token)
    hf = peft.AutoPeftModel.from_pretrained(str(tmp_path / "adapter")).eval()
    want = torch_outputs(hf, ids, np.ones_like(mask), "logits")
    np.testing.assert_allclose(rt.forward(ids, np.ones_like(mask), adapter="cls")["logits"], want, atol=1e-5)
    with open(tmp_path / "adapter" / "adapter_config.json", "w") as f:
        json.dump({**saved, "task_type": "CAUSAL_LM"}, f)  # told causal-lm: the checkpoint has no lm_head
    with pytest.raises(edgepeft.errors.UnsupportedModelError, match="llama-cls: holds no weights for its language-model head .* "
                       "set the task the adapter was trained for \\(task_type in its adapter_config.json\\)"):
        export([str(tmp_path / "adapter")], str(tmp_path / "out2"))
    assert not os.path.exists(tmp_path / "out2")


def test_a_module_trained_whole_by_one_adapter_and_adapted_by_another_is_refused_naming_it(tiny_base, tmp_path):
    """One adapter saves pooler.dense whole, another puts LoRA on it (all-linear): exported together, a traceback
    (AttributeError) in one order and 'weights for modules this model lacks' in the other. Each alone exports."""
    import peft

    base = tiny_base("bert")
    dirs = []
    for name, config in (("whole", peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"],
                                                   modules_to_save=["pooler.dense"])),
                         ("all", peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules="all-linear"))):
        pm = peft.get_peft_model(load_reference_base(base, "seq-cls", num_labels=3), config)
        randomize_adapter(pm, len(dirs))
        pm.peft_config["default"].base_model_name_or_path = base
        pm.save_pretrained(str(tmp_path / name))
        dirs.append(str(tmp_path / name))
    for order in (dirs, dirs[::-1]):
        with pytest.raises(ConfigError, match=rf"{order[1]}/adapter_config.json: bert.pooler.dense: one adapter trains "
                           "it whole \\(modules_to_save\\) and another puts its own layers on it, .* export them one at "
                           "a time into the same --out folder"):
            export(order, str(tmp_path / "out"))
    for d in dirs:  # the advice works
        export([d], str(tmp_path / "out"))
    assert Runtime(tmp_path / "out").adapter_names == ["all", "whole"]


def test_a_classifiers_adapter_saved_without_its_head_is_told_the_fix_that_exports_it(tiny_base, tmp_path):
    """An hfsaves hunt: transformers' own add_adapter + save_pretrained on a classifier writes task_type and
    auto_mapping null, its head the checkpoint's own; export took the decoder's usual task (refused: "no weights for
    its language-model head"), and its fix, task_type SEQ_CLS, was refused in turn ("set task_type"): a loop. The
    class that saved a base does not tell (a regress hunt: an adapter trained for causal-lm on a tied classifier
    checkpoint), so the SEQ_CLS refusal names what HF PEFT loads it with: auto_mapping."""
    import peft
    import transformers as tf

    from edgepeft.errors import AdapterBaseMismatchError

    torch.manual_seed(5)
    config = tiny_config("llama")
    config.num_labels = 3
    tf.AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "classifier")
    pm = peft.get_peft_model(tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "classifier"),
                             peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapter(pm, 9)
    pm.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    settings = {**json.loads(path.read_text()), "auto_mapping": None, "task_type": "SEQ_CLS"}  # the first fix given
    path.write_text(json.dumps(settings))
    with pytest.raises(AdapterBaseMismatchError, match='loads in HF PEFT with task_type null and auto_mapping '
                                                       '{"base_model_class": "LlamaForSequenceClassification"}') as e:
        export([str(tmp_path / "adapter")], tmp_path / "out")
    assert not (tmp_path / "out").exists(), str(e.value)
    path.write_text(json.dumps({**settings, "task_type": None,
                                "auto_mapping": {"base_model_class": "LlamaForSequenceClassification"}}))
    ids, mask = sample_batch()
    want = torch_outputs(pm.eval(), ids, mask, "logits")
    export([str(tmp_path / "adapter")], tmp_path / "out")
    rt = Runtime(str(tmp_path / "out"))
    assert rt.manifest["task"] == "seq-cls"
    assert np.abs(rt.forward(ids, mask, adapter="adapter")["logits"] - want).max() <= 1e-4
    torch.manual_seed(6)  # the class that saved a base is not the adapter's (GPT2DoubleHeadsModel: causal)
    tf.GPT2DoubleHeadsModel(tiny_config("gpt2")).save_pretrained(tmp_path / "double")
    pm = peft.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "double"),
                             peft.LoraConfig(r=2, target_modules=["c_attn"]))
    pm.save_pretrained(tmp_path / "causal")
    config = json.loads((tmp_path / "causal" / "adapter_config.json").read_text())
    (tmp_path / "causal" / "adapter_config.json").write_text(json.dumps({**config, "auto_mapping": None}))
    export([str(tmp_path / "causal")], tmp_path / "out-causal")
    assert Runtime(str(tmp_path / "out-causal")).manifest["task"] == "causal-lm"
