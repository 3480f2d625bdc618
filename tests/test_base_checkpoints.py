"""Base checkpoints as they arrive from people and the hub: folders that ask to run their own code, weights files
cut short or left as Git LFS pointers, a checkpoint of another task. Each is refused in one line naming the fix,
and no folder's code ever runs."""
from __future__ import annotations

import json
import re
import os
import shutil

import pytest
import torch

from file_checks import edit_json, lfs_pointer
from peft_refs import lora_adapter
from tiny import tiny_config
from word_tokenizer import build_tokenizer

from edgepeft.errors import ArtifactNotFoundError, ConfigError, UnsupportedModelError
from edgepeft.exporters import export
from edgepeft.models import load_base, load_tokenizer

CODE = "open({marker!r}, 'a').write(__name__ + '\\n')\nfrom transformers import {base}\nclass {cls}({base}):\n{body}"


def _with_own_code(base, folder, model_type):
    """A copy of ``base`` whose config.json (and tokenizer_config.json) ask for Python files in the folder; each
    file, once run, appends to the folder's RAN file."""
    shutil.copytree(base, folder)
    marker = os.path.join(folder, "RAN")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_x.XConfig",
                                                   "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    files = {"config.json": json.dumps(config),
             "tokenizer_config.json": json.dumps({"tokenizer_class": "XTokenizerFast",
                                                  "auto_map": {"AutoTokenizer": [None, "tokenization_x.XTokenizerFast"]}}),
             "configuration_x.py": CODE.format(marker=marker, base="LlamaConfig", cls="XConfig",
                                               body=f"    model_type = {model_type!r}\n"),
             "modeling_x.py": CODE.format(marker=marker, base="LlamaForCausalLM", cls="XForCausalLM", body="    pass\n"),
             "tokenization_x.py": CODE.format(marker=marker, base="PreTrainedTokenizerFast", cls="XTokenizerFast",
                                              body="    pass\n")}
    for name, text in files.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    return str(folder), marker


def test_a_base_that_needs_its_own_code_is_refused_without_running_it(tiny_base, tmp_path, monkeypatch):
    """transformers asked "run the custom code? [y/N]" on the terminal, and ran the folder's files on "y"."""
    monkeypatch.setattr("builtins.input", lambda *a: "y")  # what answering the prompt would do
    folder, marker = _with_own_code(tiny_base("llama"), tmp_path / "own-code", "xllama")
    adapter = lora_adapter(tmp_path / "adapter", tiny_base("llama"), "causal-lm", 1, r=2, target_modules=["q_proj"])
    with pytest.raises(UnsupportedModelError, match=r"own-code: its config.json needs the model's own Python code "
                       r"\(auto_map\), which edgepeft never runs; edgepeft supports bert, gpt2, llama, qwen2"):
        export([adapter], str(tmp_path / "out"), base=folder)
    with pytest.raises(UnsupportedModelError, match="never runs"):
        load_base(folder, "causal-lm", flag="--model")
    assert not os.path.exists(marker) and not os.path.exists(tmp_path / "out")


def test_a_tokenizer_that_needs_its_own_code_is_never_run(tiny_base, tmp_path, monkeypatch):
    """A plain Llama whose tokenizer_config.json asks for its own class: the export copies the files as they are,
    training says it has no usable tokenizer; neither runs tokenization_x.py."""
    monkeypatch.setattr("builtins.input", lambda *a: "y")
    folder, marker = _with_own_code(tiny_base("llama"), tmp_path / "own-tokenizer", "llama")
    adapter = lora_adapter(tmp_path / "adapter", folder, "causal-lm", 1, r=2, target_modules=["q_proj"])
    export([adapter], str(tmp_path / "out"))
    assert os.path.isfile(tmp_path / "out" / "base" / "tokenizer_config.json")
    with pytest.raises(ConfigError, match="own-tokenizer: no usable tokenizer"):
        load_tokenizer(folder)
    from types import SimpleNamespace

    from edgepeft.tuners.prompt.layer import _tokenizer  # prompt_tuning_init="TEXT"'s, even when its kwargs ask
    with pytest.raises(ConfigError, match="own-tokenizer: cannot load the tokenizer for prompt_tuning_init='TEXT'"):
        _tokenizer(SimpleNamespace(tokenizer_name_or_path=folder, tokenizer_kwargs={"trust_remote_code": True}))
    assert not os.path.exists(marker)


@pytest.mark.parametrize("damage", ["lfs-pointer", "cut-short", "bin-cut-short"])
def test_a_weights_file_cut_short_or_left_as_a_pointer_is_named(tiny_base, tmp_path, damage):
    """A clone without Git LFS, or an interrupted download: safetensors' and torch's own errors came as tracebacks."""
    import transformers

    folder = tmp_path / damage
    shutil.copytree(tiny_base("llama"), folder)
    weights = folder / "model.safetensors"
    if damage == "bin-cut-short":  # the older format: a torch zip archive
        import torch

        torch.save(transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict(), folder / "pytorch_model.bin")
        os.unlink(weights)
        weights = folder / "pytorch_model.bin"
    if damage == "lfs-pointer":
        lfs_pointer(weights)
    else:
        data = weights.read_bytes()
        weights.write_bytes(data[:len(data) // 2])
    with pytest.raises(ArtifactNotFoundError, match=rf"{damage}: cannot load the base model \(.*\); its weights files may "
                       r"be missing or incomplete \(a Git LFS pointer, an interrupted download\): download them again, "
                       r"or pass --model a complete model folder"):
        load_base(str(folder), "causal-lm", flag="--model")


def test_training_on_a_checkpoint_without_a_language_model_head_names_the_training_flags(tiny_base, tmp_path):
    """The advice named export's --base and adapter_config.json, which training has neither of."""
    import transformers

    folder = str(tmp_path / "classifier")
    transformers.AutoModelForSequenceClassification.from_pretrained(tiny_base("llama"), num_labels=2).save_pretrained(folder)
    with pytest.raises(UnsupportedModelError, match=r"classifier: holds no weights for its language-model head .*; pass "
                       r"--model a causal-LM checkpoint, or train for another --task \(seq-cls, feature-extraction\)"):
        load_base(folder, "causal-lm", flag="--model")


@pytest.mark.parametrize("config, error, message", [
    ('{"model_type": "llama", "hidden_si', ArtifactNotFoundError,
     r"cut: cannot load the base model's config \(.*\); its config.json is damaged: save the model again "
     r"\(save_pretrained\), or pass --model another folder"),
    ('{"model_type": "foo"}', UnsupportedModelError, r"cut: model type 'foo' is not supported; edgepeft supports"),
], ids=["cut-short", "unknown-type"])
def test_a_config_json_that_cannot_be_read_is_named_as_such(tmp_path, config, error, message):
    """The advice was to pass a local model folder with config.json, which it was."""
    from edgepeft.models import load_model_config

    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "config.json").write_text(config)
    with pytest.raises(error, match=message):
        load_model_config(str(tmp_path / "cut"), "--model")


@pytest.mark.parametrize("task, labels", [("causal-lm", None), ("seq-cls", ["no", "yes"])])
def test_a_config_json_that_does_not_fit_its_weights_is_refused(tiny_base, tmp_path, task, labels):
    """transformers raised (a traceback) for a size that differs, or, with labels to size a new head (training a
    classifier), started the body's weight from random values in silence."""
    folder = tmp_path / "edited"
    shutil.copytree(tiny_base("llama"), folder)
    with open(folder / "config.json") as f:
        size = json.load(f)["intermediate_size"]
    edit_json(folder / "config.json", intermediate_size=size * 2, pad_token_id=0)
    with pytest.raises(ConfigError, match=r"edited: config.json does not fit the weights saved with it \(model.layers"
                       r"\.\d+\.mlp\.\w+_proj\.weight is \[\d+, \d+\] there, \[\d+, \d+\] by config.json; \d+ such "
                       r"weight\(s\)\); use the config.json saved with these weights"):
        load_base(str(folder), task, labels=labels)


@pytest.mark.parametrize("field, value", [("cache_implementation", "foo"), ("max_new_tokens", "x")])
def test_a_generation_config_json_transformers_refuses_is_named_not_the_weights(tiny_base, tmp_path, field, value):
    """A chat hunt: a generation_config.json transformers refuses at loading (its ValueError: an unknown
    cache_implementation; a TypeError: a value of another type) was told "its weights files may be missing ...
    download them again", or was a traceback. Named now; followed (the file removed), the model loads."""
    base = shutil.copytree(tiny_base("llama"), tmp_path / "base")
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, field: value}))
    with pytest.raises(ConfigError, match=f"^{base}: transformers refuses its generation_config.json \\(.+\\); correct "
                                          "or remove the file there, or pass --model a copy without it$"):
        load_base(str(base), "causal-lm", flag="--model")
    os.remove(base / "generation_config.json")
    load_base(str(base), "causal-lm", flag="--model")


def test_a_weights_file_linked_to_a_blob_that_is_gone_is_told_to_download_again(tiny_base, tmp_path):
    """A review: an HF cache snapshot whose weights blob is gone (the file a link to nothing) was told "create or mount
    it, or remove the link" once a link to nothing was named so: removing it loads nothing; downloading again does."""
    base = shutil.copytree(tiny_base("bert"), tmp_path / "snapshot")
    os.remove(base / "model.safetensors")
    os.symlink("../../blobs/0123abcd", base / "model.safetensors")
    with pytest.raises(ArtifactNotFoundError, match=r"cannot load the base model .*download them again"):
        load_base(str(base), "seq-cls", labels=["a", "b"])


def test_a_tokenizer_file_linked_to_a_blob_that_is_gone_is_named_before_an_export_without_it(tiny_base, tmp_path):
    """A paths hunt: the export went on without tokenizer.json (exit 0, its note saying the files "are copied as they
    are"), and every text call of the export failed."""
    from edgepeft.runtimes import Runtime

    base = shutil.copytree(tiny_base("llama"), tmp_path / "snapshot")
    build_tokenizer().save(str(tmp_path / "tokenizer.json"))
    os.symlink("../blobs/0123abcd", base / "tokenizer.json")
    adapter = lora_adapter(tmp_path / "adapter", str(base), "causal-lm", 2, r=2, target_modules=["q_proj"])
    with pytest.raises(ArtifactNotFoundError, match=re.escape(f"{base}/tokenizer.json: is a link to ../blobs/0123abcd, "
                                                              "which does not exist (a download cut short")):
        export([adapter], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    os.remove(base / "tokenizer.json")
    shutil.copy(tmp_path / "tokenizer.json", base / "tokenizer.json")  # the fix: the file put there
    export([adapter], str(tmp_path / "out"))
    assert Runtime(str(tmp_path / "out")).tokenizer is not None


@pytest.mark.parametrize("arch, edit, said", [
    ("llama", "drop one weight", "its weights files lack 1 of the model's weights (e.g. model.layers.1.mlp.down_proj."
                                 "weight), which transformers would start from random values"),
    ("llama", "config: one layer more", "config.json's num_hidden_layers is 3, and its weights hold 2 layers (none for "
                                        "model.layers.2."),
    ("llama", "config: one layer fewer", "config.json's num_hidden_layers is 1, and its weights hold more layers (e.g. "
                                         "model.layers.1."),
    ("bert", "keys saved by a wrapper", "its weights are saved under other names (e.g. module."),
    ("llama", "biases config.json turns off", "its weights hold model.layers.0.self_attn.q_proj.bias, which the model "
                                              "config.json describes has no place for (model_type 'llama'; biases"),
    ("llama", "another type's norms", "its weights hold model.layers.0.self_attn.q_norm.weight, which the model"),
    ("bert", "its own code's weights", "its weights do not fit transformers' BertModel (none for embeddings.position_"
                                       "embeddings.weight): config.json's auto_map names the model's own Python code")])
def test_weights_a_checkpoint_lacks_are_named_not_made_random(tiny_base, tmp_path, arch, edit, said):
    """A hunt: transformers starts the weights a checkpoint lacks from random values, and drops the layers config.json
    does not count; its load report silenced, train and export ran on them and said ok (the export's check compared
    with the same random model): a DDP-saved MiniLM's embeddings were 0.92 alike for unrelated texts. Another hunt:
    weights config.json gives no place (biases attention_bias turns off, a Qwen3's norms relabelled llama) were dropped
    (logits 4.3 off); buffers older versions saved (GPT-2's masked_bias) and another task's head still load."""
    from safetensors.torch import load_file, save_file

    base = str(shutil.copytree(tiny_base(arch), tmp_path / "base"))
    weights = os.path.join(base, "model.safetensors")
    saved = load_file(weights)
    if edit == "drop one weight":
        saved.pop("model.layers.1.mlp.down_proj.weight")
    elif edit == "keys saved by a wrapper":
        saved = {f"module.{k}": v for k, v in saved.items()}
    elif edit == "biases config.json turns off":
        saved["model.layers.0.self_attn.q_proj.bias"] = torch.ones(saved["model.layers.0.self_attn.q_proj.weight"].shape[0])
    elif edit == "another type's norms":
        saved["model.layers.0.self_attn.q_norm.weight"] = torch.ones(4)
    elif edit == "its own code's weights":  # jina-embeddings-v2: "bert" with ALiBi, no position embeddings
        saved.pop("embeddings.position_embeddings.weight")
        edit_json(os.path.join(base, "config.json"), auto_map={"AutoModel": "modeling_bert.JinaBertModel"})
    else:
        edit_json(os.path.join(base, "config.json"), num_hidden_layers=3 if "more" in edit else 1)
    save_file(saved, weights, metadata={"format": "pt"})
    task = "causal-lm" if arch == "llama" else "feature-extraction"
    with pytest.raises(ConfigError, match="^" + re.escape(f"{base}: {said}")):
        load_base(base, task)
    shutil.copy(os.path.join(tiny_base(arch), "config.json"), base)  # the fixes: the checkpoint as saved
    save_file(load_file(os.path.join(tiny_base(arch), "model.safetensors")), weights, metadata={"format": "pt"})
    load_base(base, task)


def test_a_quantized_checkpoint_and_a_pickled_one_are_one_line_each(tiny_base, tmp_path):
    """A hunt: a bitsandbytes/GPTQ/AWQ checkpoint (config.json's quantization_config) gave transformers' ImportError
    or optimum's NameError, and a pytorch_model.bin holding a pickled object torch's UnpicklingError: tracebacks
    from train and export. The pickled one's fix is followed here."""
    import argparse

    import torch
    from safetensors.torch import load_file, save_file

    base = str(shutil.copytree(tiny_base("llama"), tmp_path / "base"))
    edit_json(os.path.join(base, "config.json"), quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(UnsupportedModelError, match=r"config.json's quantization_config \(gptq\) marks a quantized "
                                                    "checkpoint, which edgepeft does not load"):
        load_base(base, "causal-lm")
    shutil.copy(os.path.join(tiny_base("llama"), "config.json"), base)
    state = load_file(os.path.join(base, "model.safetensors"))
    os.remove(os.path.join(base, "model.safetensors"))
    torch.save({**state, "args": argparse.Namespace(lr=1.0)}, os.path.join(base, "pytorch_model.bin"))
    with pytest.raises(ConfigError, match="its pytorch_model.bin holds more than tensors"):
        load_base(base, "causal-lm")
    kept = torch.load(os.path.join(base, "pytorch_model.bin"), weights_only=False)  # the fix, as it says
    save_file({k: v for k, v in kept.items() if isinstance(v, torch.Tensor)}, os.path.join(base, "model.safetensors"))
    os.remove(os.path.join(base, "pytorch_model.bin"))
    load_base(base, "causal-lm")


def test_a_tied_checkpoint_whose_config_forgets_the_tying_is_told_to_set_it(tiny_base, tmp_path):
    """A hunt: the message named this case ("saved with tied embeddings whose config.json says ... false") with no
    fix for it, and said "false" where the key was absent."""
    import transformers as tf

    from tiny import tiny_config

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tied")  # no lm_head.weight saved
    with open(tmp_path / "tied" / "config.json") as f:
        fields = json.load(f)
    fields.pop("tie_word_embeddings")
    with open(tmp_path / "tied" / "config.json", "w") as f:
        json.dump(fields, f)
    with pytest.raises(UnsupportedModelError, match=r"whose config.json does not say tie_word_embeddings: true \(then "
                                                    r"set it so\)"):
        load_base(str(tmp_path / "tied"), "causal-lm")
    edit_json(str(tmp_path / "tied" / "config.json"), tie_word_embeddings=True)  # as it says
    load_base(str(tmp_path / "tied"), "causal-lm")


def test_buffers_older_versions_saved_and_another_tasks_head_still_load(tiny_base, tmp_path):
    """Keys transformers reports as unexpected that are not the model's weights: GPT-2's masked_bias (a buffer older
    versions saved), BERT's masked-LM head (cls.*) under a classifier or an embedder, another classifier's head."""
    from safetensors.torch import load_file, save_file

    for arch, key, task in (("gpt2", "transformer.h.0.attn.masked_bias", "causal-lm"),
                            ("bert", "cls.predictions.transform.dense.weight", "seq-cls")):
        base = str(shutil.copytree(tiny_base(arch), tmp_path / arch))
        weights = os.path.join(base, "model.safetensors")
        saved = load_file(weights)
        saved[key] = torch.ones(2, 2)
        save_file(saved, weights, metadata={"format": "pt"})
        load_base(base, task, **({"labels": ["a", "b"]} if task == "seq-cls" else {}))
    import transformers as tf  # a review: a token classifier's head (score with a bias) under a sequence classifier

    config = tiny_config("llama")
    config.num_labels = 2
    tf.AutoModelForTokenClassification.from_config(config).save_pretrained(tmp_path / "tokens")
    load_base(str(tmp_path / "tokens"), "seq-cls", labels=["a", "b"])
