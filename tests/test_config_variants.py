"""config.json fields the tiny test models leave at their defaults, which changed what the export traced or checked:
BERT's chunked feed-forward, a model with few positions, an encoder made a causal decoder."""
from __future__ import annotations

import importlib
import os
import shutil

import numpy as np
import pytest
import torch

from tiny import load_reference_base, max_diff_valid, tiny_config
from edgepeft.errors import ConfigError, UnsupportedModelError
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime
from edgepeft.training import Trainer, TrainingArguments


def _base(tmp_path, arch: str, **fields) -> str:
    import transformers as tf

    config = tiny_config(arch)
    for key, value in fields.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    (tf.BertModel if arch == "bert" else tf.AutoModelForCausalLM.from_config)(config).save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


def _lora(tmp_path, base: str, task: str, targets: list) -> str:
    import peft

    from peft_refs import randomize_adapter
    from tiny import TASK_TYPES

    pm = peft.get_peft_model(load_reference_base(base, task), peft.LoraConfig(task_type=TASK_TYPES[task], r=2,
                                                                              target_modules=targets))
    randomize_adapter(pm, 3)
    pm.save_pretrained(str(tmp_path / "lora"))
    return str(tmp_path / "lora")


def test_a_chunked_feed_forward_runs_at_every_length(tmp_path):
    """chunk_size_feed_forward fixed the chunk count at the traced length: other lengths failed in ONNX Runtime."""
    base = _base(tmp_path, "bert", chunk_size_feed_forward=4)
    export([_lora(tmp_path, base, "feature-extraction", ["query", "value", "dense"])], str(tmp_path / "out"),
           names=["lora"])
    rt, model = Runtime(str(tmp_path / "out")), load_reference_base(base, "feature-extraction")
    for length in (5, 12):
        ids = np.random.default_rng(length).integers(3, 128, (2, length))
        mask = np.ones_like(ids)
        with torch.no_grad():  # the feed-forward works position by position: chunks change nothing
            want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
        assert max_diff_valid(rt.forward(ids, mask)["last_hidden_state"], want.numpy(), mask) < 1e-4


def test_a_model_with_ten_positions_exports(tmp_path):
    """The export's own checks took 8 tokens + 3 decode steps: 'prompt of 8 tokens ... exceeds the model's 10
    positions; shorten the prompt', where the user gave no prompt."""
    base = _base(tmp_path, "llama", max_position_embeddings=10)
    report = export([_lora(tmp_path, base, "causal-lm", ["q_proj"])], str(tmp_path / "out"))
    assert all(c["max_abs_diff"] < 1e-4 for c in report["checks"])


def test_an_activation_the_onnx_exporter_cannot_write_is_one_line(tmp_path):
    """Found by a hunt: hidden_act "xielu" (0-dim parameters, expm1) was a traceback from the weights' fingerprint (a
    0-dim tensor cannot be viewed as bytes), and past it from torch's ONNX exporter."""
    base = _base(tmp_path, "llama", hidden_act="xielu")
    with pytest.raises(UnsupportedModelError, match=r"base: the model runs aten::expm1, which torch's ONNX exporter "
                                                    r"cannot write \(opset 18\); use a model without it"):
        export([_lora(tmp_path, base, "causal-lm", ["q_proj"])], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_a_model_with_fewer_positions_than_the_trace_takes_is_refused(tmp_path, arch):
    """7 positions, or 9 for a prompt adapter: tracing stopped with an IndexError (the rotary table, the position
    embeddings) or a RuntimeError; 10 exports with a prompt adapter."""
    from peft_refs import peft_virtual_adapter

    task = "feature-extraction" if arch == "bert" else "causal-lm"
    targets = ["query"] if arch == "bert" else ["c_attn"] if arch == "gpt2" else ["q_proj"]
    for positions, kind, need in ((7, "lora", "8 the export traces it with"),
                                  (9, "prompt", r"10 the export traces it with \(8 tokens and 2 virtual ones\)")):
        folder = tmp_path / kind
        base = _base(folder, arch, **{"n_positions" if arch == "gpt2" else "max_position_embeddings": positions})
        adapter = (_lora(folder, base, task, targets) if kind == "lora" else
                   peft_virtual_adapter(folder / "prompt", base, "prompt", seed=5, task=task, num_virtual_tokens=3))
        with pytest.raises(ConfigError, match=f"^{base}: the model has {positions} positions \\(config.json\\), fewer than "
                                              f"the {need}; export a model of {need.split()[0]} positions or more$"):
            export([adapter], str(folder / "out"))
        # training such an adapter is refused alike, before anything is written (it trained one its export refused)
        (folder / "d.jsonl").write_text('{"text": "a b", "positive": "c d"}\n' * 4 if task == "feature-extraction" else
                                        '{"text": "a b"}\n' * 4)
        args = TrainingArguments(model=base, task=task, method=kind, data=str(folder / "d.jsonl"), out=str(folder / "t"),
                                 options={"num_virtual_tokens": 2} if kind == "prompt" else {}, progress=False)
        with pytest.raises(ConfigError, match=f"^{base}: the model has {positions} positions \\(config.json\\), fewer than "
                                              f"the {need}; train a model of {need.split()[0]} positions or more$"):
            Trainer(args).train()
        assert not os.path.exists(folder / "t")
    base = _base(tmp_path / "ten", arch, **{"n_positions" if arch == "gpt2" else "max_position_embeddings": 10})
    export([peft_virtual_adapter(tmp_path / "ten" / "prompt", base, "prompt", seed=5, task=task, num_virtual_tokens=3)],
           str(tmp_path / "ten" / "out"))


def test_a_prefix_nearly_as_long_as_the_positions_is_checked_in_what_is_left(tmp_path):
    """A 5-token prefix on 10 positions: the check's prompt of 4 + 3 decode steps did not fit, nor did the 8 tokens
    the adapters already in OUT were checked with when a new adapter rebuilt the base; too long a prefix for any
    check names num_virtual_tokens."""
    from peft_refs import peft_virtual_adapter

    base = _base(tmp_path, "llama", max_position_embeddings=10)
    prefix = peft_virtual_adapter(tmp_path / "prefix", base, "prefix", seed=5, task="causal-lm", num_virtual_tokens=5)
    out = str(tmp_path / "out")
    export([prefix], out, names=["prefix"])
    report = export([_lora(tmp_path, base, "causal-lm", ["gate_proj"])], out, names=["lora"])  # a new base: prefix is
    assert any("already in OUT" in c["what"] for c in report["checks"])                       # checked on it
    longer = peft_virtual_adapter(tmp_path / "long", base, "prefix", seed=6, task="causal-lm", num_virtual_tokens=7)
    exporting = importlib.import_module("edgepeft.exporters.export")  # the module (the package names its function)

    def traced(*args, **kwargs):
        raise AssertionError("refused after tracing the base, not before")
    with pytest.MonkeyPatch.context() as m, pytest.raises(
            ConfigError, match=f"^{longer}: the adapter's 7 virtual tokens leave 3 of the model's 10 positions for text, "
                               "fewer than the 4 an export needs; train it with 6 or fewer num_virtual_tokens"):
        m.setattr(exporting, "stage_base", traced)
        export([longer], out, names=["long"])
    assert sorted(os.listdir(os.path.join(out, "adapters"))) == ["lora", "prefix"]


def test_an_encoder_made_a_decoder_is_refused_naming_the_field(tmp_path, text_model, capsys):
    """At export, and at training (which trained an adapter on causal attention that no export could serve)."""
    import shutil

    from file_checks import edit_json, write_lines
    from training_helpers import cli_error, seq_cls_rows, train_argv

    base = _base(tmp_path, "bert", is_decoder=True)
    with pytest.raises(UnsupportedModelError, match="config.json sets is_decoder: true"):
        export([_lora(tmp_path, base, "feature-extraction", ["query"])], str(tmp_path / "out"))
    model = shutil.copytree(text_model("bert"), tmp_path / "text-bert")
    edit_json(model / "config.json", is_decoder=True)
    data = write_lines(tmp_path / "train.jsonl", seq_cls_rows())
    line = cli_error(capsys, *train_argv(str(model), data, tmp_path / "adapter"))
    assert "config.json sets is_decoder: true" in line and "train adapters on it so" in line
    assert not (tmp_path / "adapter").exists()


def test_a_decoder_classifier_without_a_padding_id_is_told_which_id_to_set(tmp_path):
    """'set it and retry' named no value; GPT-2 has no padding token, and its end-of-sequence id is the usual one."""
    from edgepeft.models import load_base

    base = _base(tmp_path, "gpt2", pad_token_id=None, eos_token_id=7)
    with pytest.raises(UnsupportedModelError, match=r"needs pad_token_id in config.json .*set it and retry \(a model "
                       r"without a padding token: its end-of-sequence id, 7\)$"):
        load_base(base, "seq-cls")


@pytest.mark.parametrize("field, value", [("output_attentions", True), ("_attn_implementation", "flash_attention_2"),
                                          ("return_dict", False)])
def test_config_fields_the_traced_model_runs_without_are_set_as_it_runs(tmp_path, field, value):
    """Fields some checkpoints carry: transformers refuses attention weights with sdpa, loads the file's flash
    attention over attn_implementation (an ImportError without flash-attn), and returns tuples: each was a raw
    traceback from export (and training)."""
    from file_checks import edit_json

    base = _base(tmp_path, "llama")
    lora = _lora(tmp_path, base, "causal-lm", ["q_proj"])
    edit_json(os.path.join(base, "config.json"), **{field: value})
    report = export([lora], str(tmp_path / "out"))
    assert report["checks"] and all(c["max_abs_diff"] < 1e-4 for c in report["checks"])


def test_a_config_field_transformers_refuses_is_named_with_the_file_to_correct(tmp_path, capsys):
    """use_return_dict (a read-only property) in config.json: transformers' AttributeError was a raw traceback; then
    told "damaged: save the model again", as was a field of a readable file transformers refuses (a pairs hunt:
    problem_type single_label_classification with one output), which saving again does not mend."""
    from file_checks import edit_json, edited_json
    from training_helpers import cli_error

    base = _base(tmp_path, "llama")
    lora = _lora(tmp_path, base, "causal-lm", ["q_proj"])
    edit_json(os.path.join(base, "config.json"), use_return_dict=False)
    line = cli_error(capsys, "export", "--adapter", lora, "--base", base, "--out", str(tmp_path / "out"))
    assert "cannot load the base model's config (property 'use_return_dict'" in line
    assert line.endswith(f"; correct it in {base}/config.json, or pass --base another folder")
    with edited_json(os.path.join(base, "config.json")) as config:
        del config["use_return_dict"]
        config.update(id2label={"0": "LABEL_0"}, problem_type="single_label_classification")
    line = cli_error(capsys, "export", "--adapter", lora, "--base", base, "--out", str(tmp_path / "out"))
    assert "requires `num_labels > 1`" in line and line.endswith(f"; correct it in {base}/config.json, or pass --base "
                                                                 "another folder")


@pytest.mark.parametrize("kind", ["relative_key", "relative_key_query"])
def test_bert_relative_position_embeddings_are_refused_naming_the_field(tmp_path, kind):
    """transformers 5 no longer computes them and runs absolute positions instead: a checkpoint trained with them
    exported "ok" with outputs it was never trained to give."""
    base = _base(tmp_path, "bert", position_embedding_type=kind)
    with pytest.raises(UnsupportedModelError, match=f"position_embedding_type is {kind}, which transformers 5 no "
                                                    "longer computes"):
        export([_lora(tmp_path, base, "feature-extraction", ["query"])], str(tmp_path / "out"))


def test_models_of_other_kinds_are_refused_naming_what_is_supported():
    """Found by a hunt: T5's task_type said to use CAUSAL_LM, SEQ_CLS or FEATURE_EXTRACTION (then its model type was
    refused), and RoBERTa's refusal named "BERT-family encoders" as supported."""
    import edgepeft
    from edgepeft.errors import UnsupportedMethodError
    from edgepeft.models import check_supported

    with pytest.raises(UnsupportedMethodError, match=r"^task_type 'SEQ_2_SEQ_LM' is not supported; edgepeft exports "
                                                     r"adapters of the tasks CAUSAL_LM, .* on Llama, Qwen2, GPT-2 and "
                                                     r"BERT models: train one of those$"):
        edgepeft.LoraConfig(r=2, target_modules=["q"], task_type="SEQ_2_SEQ_LM").task  # noqa: B018
    with pytest.raises(UnsupportedModelError, match=r"model type 'roberta' is not supported; .*\(Llama, Qwen2, GPT-2, "
                                                    r"and BERT: model_type bert, such as MiniLM\)$"):
        check_supported("roberta", "seq-cls", "m")


def test_a_copy_of_the_base_set_as_its_refusal_says_exports_as_base_and_no_other_difference(tmp_path):
    """Found by a hunt: a decoder classifier's base without pad_token_id is refused ("set it"); a copy with it set,
    given as --base, was refused alike (the recorded base loaded with the export's checks). A review: a pad id that
    differs from one the recorded base has still counts."""
    import json
    import shutil

    from edgepeft.errors import AdapterBaseMismatchError

    import peft
    import transformers as tf

    for recorded, copied, refused in ((None, 2, False), (0, 5, True)):
        root = tmp_path / f"pad-{recorded}"
        base = _base(root, "llama", pad_token_id=recorded)
        model = tf.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)  # as HF PEFT trains it
        lora = str(root / "lora")
        peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["q_proj"])).save_pretrained(lora)
        copy = shutil.copytree(base, root / "copy")
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, "pad_token_id": copied}))
        if refused:
            with pytest.raises(AdapterBaseMismatchError, match=r"whose config.json differs from --base .* in "
                                                               r"pad_token_id \(the weights are the same\)"):
                export([lora], str(root / "out"), base=str(copy))
        else:
            export([lora], str(root / "out"), base=str(copy))


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_a_pad_id_past_the_vocabulary_is_named_with_a_fix_that_loads(tmp_path, capsys, arch):
    """A pad added to the tokenizer and set in config.json without resizing: transformers' nn.Embedding asserted,
    an AssertionError traceback from train and export."""
    from file_checks import edit_json
    from training_helpers import cli_error

    from edgepeft.models import load_base

    task = "causal-lm" if arch == "llama" else "feature-extraction"
    base = _base(tmp_path, arch)
    lora = _lora(tmp_path, base, task, ["q_proj" if arch == "llama" else "query"])
    size = tiny_config(arch).vocab_size
    edit_json(os.path.join(base, "config.json"), pad_token_id=size, eos_token_id=2)
    line = cli_error(capsys, "export", "--adapter", lora, "--base", base, "--out", str(tmp_path / "out"))
    assert line.endswith(f"config.json's pad_token_id is {size}, past the model's vocabulary (vocab_size {size}), "
                         f"which its embeddings cannot hold; set pad_token_id to an id below {size} (its eos_token_id, "
                         "2), or resize the embeddings (resize_token_embeddings) and save the model again")
    copy = shutil.copytree(base, tmp_path / "copy")  # a review: a base shared read-only, mended on a copy as said and
    edit_json(os.path.join(copy, "config.json"), pad_token_id=2)  # given as --base, was refused for the one recorded
    export([lora], str(tmp_path / "out-copy"), base=str(copy))
    edit_json(os.path.join(base, "config.json"), pad_token_id=2)  # as it says
    load_base(base, task)


@pytest.mark.parametrize("arch, field, value, said, fixed", [
    ("llama", "rms_norm_eps", 1, "Field 'rms_norm_eps' expected float, got int (value: 1)", 1.0),
    ("llama", "rope_parameters", {"rope_type": "linear", "rope_theta": 1e4}, "Missing required keys in `rope_parameters`",
     {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
    ("llama", "hidden_act", "gelu_tanh", "transformers cannot build the model its config.json describes ('gelu_tanh': "
     "a value it does not know)", "gelu"),
    ("gpt2", "n_head", 3, "`embed_dim` must be divisible by num_heads", 4)])
def test_config_values_transformers_refuses_are_named_in_one_line(tmp_path, capsys, arch, field, value, said, fixed):
    """A hunt: transformers 5 checks config fields (huggingface_hub's errors, no ValueError) and builds layers from
    them (a KeyError for an unknown activation): tracebacks from export and train, or "its weights files may be
    missing ... download them again" where config.json was at fault."""
    from file_checks import edit_json
    from training_helpers import cli_error

    from edgepeft.models import load_base

    base = _base(tmp_path, arch)
    lora = _lora(tmp_path, base, "causal-lm", ["q_proj" if arch == "llama" else "c_attn"])
    edit_json(os.path.join(base, "config.json"), **{field: value})
    line = cli_error(capsys, "export", "--adapter", lora, "--base", base, "--out", str(tmp_path / "out"))
    assert said in line and line.endswith(("correct it there, or pass --base another folder",
                                           f"correct it in {os.path.join(base, 'config.json')}, or pass --base another "
                                           "folder")), line
    edit_json(os.path.join(base, "config.json"), **{field: fixed})  # as it says
    load_base(base, "causal-lm")


def test_a_classifier_whose_config_names_other_labels_than_its_head_is_refused_at_export(tmp_path):
    """A hunt: id2label edited to three labels on a two-label classifier: transformers refuses it, edgepeft exported
    it with a random three-label head for adapter=None (its trained head dropped, the export's check passed)."""
    from file_checks import edit_json

    from edgepeft.models import load_base

    base = _base(tmp_path, "bert")
    import transformers as tf

    tf.BertForSequenceClassification.from_pretrained(base, num_labels=2).save_pretrained(base)
    edit_json(os.path.join(base, "config.json"), id2label={"0": "a", "1": "b", "2": "c"}, label2id={"a": 0, "b": 1, "c": 2})
    with pytest.raises(ConfigError, match=r"classifier.bias is \[2\] there, \[3\] by config.json; 2 such weight\(s\)\); "
                                          r"make its id2label and label2id name 2 labels, as the saved head has"):
        load_base(base, "seq-cls")
    load_base(base, "seq-cls", labels=["x", "y", "z"])  # training sizes the head for its labels
    edit_json(os.path.join(base, "config.json"), id2label={"0": "a", "1": "b"}, label2id={"a": 0, "b": 1})  # the fix
    assert load_base(base, "seq-cls").classifier.out_features == 2
