"""Prompt tuning: HF PEFT parity in PyTorch (both ways, TEXT init), export + runtime parity
(forward with virtual positions, greedy generation, every decode step), training, errors."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from peft_refs import VIRTUAL_ARCHS, greedy_reference, peft_virtual_adapter, randomize_prompt_encoder, runtime_step_logits
from tiny import load_reference_base, max_diff_valid, sample_batch, torch_outputs, train_steps

import edgepeft
from edgepeft.errors import EdgePeftError, InvalidInputError
from edgepeft.runtimes import Runtime


def virtual_mask(mask, n):
    """The mask of outputs that include n virtual positions first (always valid)."""
    return np.concatenate([np.ones((mask.shape[0], n), mask.dtype), mask], axis=1)


@pytest.mark.parametrize("arch", VIRTUAL_ARCHS)
def test_prompt_tuning_matches_peft_both_ways(arch, tiny_base, tmp_path):
    import peft

    ids, mask = sample_batch()
    model = edgepeft.get_peft_model(load_reference_base(tiny_base(arch), "causal-lm"),
                                    edgepeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        next(n for n, _ in model.named_parameters() if "prompt_encoder" in n)]
    randomize_prompt_encoder(model, seed=4)
    model.eval().save_pretrained(tmp_path / "ours")
    state = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert list(state) == ["prompt_embeddings"] and tuple(state["prompt_embeddings"].shape) == (5, 32)
    assert json.load(open(tmp_path / "ours" / "adapter_config.json"))["peft_type"] == "PROMPT_TUNING"
    ours = torch_outputs(model, ids, mask, "logits")
    assert ours.shape == (2, 5 + 9, 128)  # virtual positions first, as HF PEFT returns them
    hf = peft.PeftModel.from_pretrained(load_reference_base(tiny_base(arch), "causal-lm"), str(tmp_path / "ours")).eval()
    assert max_diff_valid(torch_outputs(hf, ids, mask, "logits"), ours, virtual_mask(mask, 5)) <= 1e-5
    hf.save_pretrained(tmp_path / "theirs")
    back = edgepeft.PeftModel.from_pretrained(load_reference_base(tiny_base(arch), "causal-lm"), str(tmp_path / "theirs")).eval()
    assert max_diff_valid(torch_outputs(back, ids, mask, "logits"), ours, virtual_mask(mask, 5)) <= 1e-5
    base = torch_outputs(load_reference_base(tiny_base(arch), "causal-lm"), ids, mask, "logits")
    assert max_diff_valid(ours[:, 5:], base, mask) > 1e-2  # the prompt changes the outputs
    # edgepeft's generate: greedy ids as HF PEFT's forward computes them
    prompt, pmask = sample_batch(batch=2, seq=6)
    with torch.no_grad():
        got = model.generate(input_ids=torch.from_numpy(prompt), attention_mask=torch.from_numpy(pmask), max_new_tokens=8,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(got.numpy(), greedy_reference(hf, prompt, pmask, 8)[0])


def _word_tokenizer(path):
    """A local word-level tokenizer over the tiny models' 128-token vocabulary (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(path))
    return fast


def test_text_init_matches_peft_from_a_local_tokenizer(tiny_base, tmp_path):
    import peft

    from transformers import AutoTokenizer

    _word_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = "w5 w9 w17"
    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text=text)
    base = tiny_base("llama")
    theirs = peft.get_peft_model(load_reference_base(base, "causal-lm"),
                                 peft.PromptTuningConfig(tokenizer_name_or_path=str(tmp_path / "tok"), **kw))
    expected = theirs.prompt_encoder["default"].embedding.weight.detach()
    for source in (str(tmp_path / "tok"), tok):  # a path, or the tokenizer object itself
        model = edgepeft.get_peft_model(load_reference_base(base, "causal-lm"),
                                        edgepeft.PromptTuningConfig(tokenizer_name_or_path=source, **kw))
        got = model.get_adapter_state_dict()["prompt_embeddings"]
        assert torch.equal(got, expected)
    words = model.base_model.model.get_input_embeddings().weight.detach()
    assert torch.equal(got[:3], words[[5, 9, 17]]) and torch.equal(got[3:6], words[[5, 9, 17]])  # repeated, cut to 7
    model.save_pretrained(tmp_path / "saved")  # the object's source folder is recorded
    assert json.load(open(tmp_path / "saved" / "adapter_config.json"))["tokenizer_name_or_path"] == str(tmp_path / "tok")
    with pytest.raises(EdgePeftError, match="prompt_tuning_init_text"):
        edgepeft.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", tokenizer_name_or_path="x")


@pytest.mark.parametrize("arch", VIRTUAL_ARCHS)
def test_exported_prompt_matches_peft_forward_generation_and_steps(arch, virtual_export, hf_reference):
    out, dirs, report = virtual_export(arch)
    check = next(c for c in report["checks"] if c["what"] == "adapter prompt")
    assert check["max_abs_diff"] <= 1e-4 and check["decode_max_abs_diff"] <= 1e-4
    rt = Runtime(out)
    hf = hf_reference(arch, dirs["prompt"])
    ids, mask = sample_batch(batch=2, seq=9)
    ours = rt.forward(ids, mask, adapter="prompt")["logits"]
    ref = torch_outputs(hf, ids, mask, "logits")
    assert ours.shape == ref.shape == (2, 4 + 9, 128)
    assert max_diff_valid(ours, ref, virtual_mask(mask, 4)) <= 1e-4
    prompt, pmask = sample_batch(batch=2, seq=6, seed=5)
    expected_ids, expected_steps = greedy_reference(hf, prompt, pmask, 16)
    np.testing.assert_array_equal(rt.generate(prompt, pmask, adapter="prompt", max_new_tokens=16, eos_token_id=[]), expected_ids)
    # prefill and every decode step, teacher-forced with the reference ids
    assert float(np.abs(runtime_step_logits(rt, "prompt", prompt, pmask, expected_ids) - expected_steps).max()) <= 1e-4


def test_prompt_training_reduces_the_loss(tiny_base):
    model = edgepeft.get_peft_model(load_reference_base(tiny_base("llama"), "causal-lm"),
                                    edgepeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].shape == (8, 32)
    losses = train_steps(model, lr=0.1)
    assert losses[-1] < losses[0] - 0.05


def test_prompt_longer_than_the_positions_is_refused(virtual_export):
    rt = Runtime(virtual_export("llama")[0])
    ids = np.full((1, 62), 5, dtype=np.int64)  # 62 tokens + 4 virtual > 64 positions
    rt.forward(ids)  # fits without the adapter
    with pytest.raises(InvalidInputError, match="4 virtual tokens"):
        rt.forward(ids, adapter="prompt")
    with pytest.raises(InvalidInputError, match="virtual tokens"):
        rt.generate(ids[:, :58], adapter="prompt", max_new_tokens=4)
    with pytest.raises(InvalidInputError, match="3 virtual tokens"):
        rt.forward(ids, adapter="prefix")


@pytest.mark.parametrize("task", ["feature-extraction", "seq-cls"])
def test_bert_prompt_matches_peft_in_pytorch_and_exported(task, tiny_base, workdir, tmp_path):
    """Encoders: the prompt goes before the token embeddings (positions count it), outputs include it."""
    import peft

    from peft_refs import peft_virtual_adapter
    from tiny import TASK_TYPES
    from edgepeft.exporters import export

    field = "last_hidden_state" if task == "feature-extraction" else "logits"
    path = peft_virtual_adapter(workdir / "bert-prompt" / task, tiny_base("bert"), "prompt", seed=12, task=task,
                                num_virtual_tokens=3)
    theirs = peft.PeftModel.from_pretrained(load_reference_base(tiny_base("bert"), task), path).eval()
    ours = edgepeft.PeftModel.from_pretrained(load_reference_base(tiny_base("bert"), task), path).eval()
    ours.save_pretrained(tmp_path / "ours")  # heads saved under HF PEFT's prompt-learning keys (base_model.<module>)
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(load_file(f"{path}/adapter_model.safetensors"))
    ids, mask = sample_batch(batch=2)
    ref = torch_outputs(theirs, ids, mask, field)
    valid = virtual_mask(mask, 3) if field == "last_hidden_state" else None
    assert max_diff_valid(torch_outputs(ours, ids, mask, field), ref, valid) <= 1e-5
    out = str(workdir / f"out-bert-prompt-{task}")
    export([path], out, names=["prompt"])
    # the mask holds the prompt's n ones too: named like the ids' length, the shape pass could take them as equal
    rt = Runtime(out)
    axes = {name: io["axes"]["1"] for name, io in {**rt.manifest["inputs"], **rt.manifest["outputs"]}.items() if "1" in io["axes"]}
    assert axes["attention_mask"] != axes["input_ids"]
    assert field != "last_hidden_state" or axes[field] == axes["attention_mask"]  # outputs hold the n virtual rows too
    got = rt.forward(ids, mask, adapter="prompt")[field]
    assert got.shape == ref.shape and max_diff_valid(got, ref, valid) <= 1e-4
    assert TASK_TYPES[task] == ours.peft_config["default"].task_type


def test_the_prompt_slot_goes_before_ids_of_any_length_even_none():
    from edgepeft.tuners.prompt.slots import PromptSlotEmbedding

    layer = PromptSlotEmbedding(torch.nn.Embedding(10, 4))
    layer.feed["embeddings"] = torch.randn(3, 4)
    for length in (0, 1, 5):
        out = layer(torch.ones(2, length, dtype=torch.long))
        assert out.shape == (2, 3 + length, 4) and torch.equal(out[:, :3], layer.feed["embeddings"].expand(2, 3, 4))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decoder_classifier_base_with_a_prompt_slot_pools_right_padded_rows_as_hf(arch, tiny_base, peft_adapter, tmp_path):
    """A decoder seq-cls base with a prompt slot is traced with inputs_embeds, where transformers cannot see
    padding: the graph must still pool each row's last non-pad token for the base and LoRA (as transformers),
    and the last position for the prompt adapter (as HF PEFT)."""
    import peft

    from edgepeft.exporters import export

    base = tiny_base(arch)
    lora = peft_adapter(arch, "cls-lora-3", task="seq-cls", num_labels=3, r=4, lora_alpha=8)
    prompt = peft_virtual_adapter(tmp_path / "prompt", base, "prompt", seed=4, task="seq-cls", num_virtual_tokens=3)
    out = str(tmp_path / "out")
    export([lora, prompt], out, names=["lora", "prompt"])
    rt = Runtime(out)
    ids = np.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]], dtype=np.int64)  # row 0 right-padded (pad id 0)
    mask = (ids != 0).astype(np.int64)
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        want = {
            None: load_reference_base(base, "seq-cls")(input_ids=t_ids, attention_mask=t_mask).logits,
            "lora": peft.PeftModel.from_pretrained(load_reference_base(base, "seq-cls", 3), lora)(
                input_ids=t_ids, attention_mask=t_mask).logits,
            "prompt": peft.PeftModel.from_pretrained(load_reference_base(base, "seq-cls"), prompt)(
                input_ids=t_ids, attention_mask=t_mask).logits,
        }
    for name, logits in want.items():
        np.testing.assert_allclose(rt.forward(ids, mask, adapter=name)["logits"], logits.numpy(), rtol=0, atol=1e-4,
                                   err_msg=str(name))


def test_two_sets_of_virtual_tokens_are_refused_with_a_fix():
    """Found by a hunt: HF PEFT runs num_transformer_submodules 2 on a decoder (the virtual tokens twice); the refusal
    blamed an encoder-decoder model and named no fix."""
    from tiny import tiny_config

    from edgepeft.errors import UnsupportedMethodError

    config = edgepeft.PromptTuningConfig(num_virtual_tokens=4, num_transformer_submodules=2, task_type="CAUSAL_LM")
    with pytest.raises(UnsupportedMethodError, match=r"^num_transformer_submodules is 2; edgepeft runs 1 set of virtual "
                                                     r"tokens .*: train the adapter again without it \(1\)$"):
        config.fill_from(tiny_config("llama"))


def test_exporting_a_prompt_tuned_decoder_classifier_leaves_out_transformers_padding_warning(tiny_base, tmp_path, capfd):
    """A hunt: the export's PyTorch check fed inputs_embeds to a Llama classifier, whose "will not detect padding
    tokens in inputs_embeds. Results may be unexpected" reached the user, of an export that checked out (training
    leaves it out already: it pools each row's last real token, as the export's check and the runtime do)."""
    import logging

    import transformers.utils.logging  # noqa: F401  it gives Logger its warning_once

    from edgepeft.exporters import export

    adapter = peft_virtual_adapter(tmp_path / "prompt", tiny_base("llama"), "prompt", 3, task="seq-cls",
                                   num_virtual_tokens=2)
    logging.Logger.warning_once.cache_clear()  # transformers says it once a process: an earlier test's said it
    capfd.readouterr()
    report = export([adapter], str(tmp_path / "out"), verbose=True)
    assert max(c["max_abs_diff"] for c in report["checks"]) < 1e-4
    assert "will not detect padding tokens" not in "".join(capfd.readouterr())


def test_an_init_text_token_past_the_embeddings_names_the_tokenizer_and_a_fix(text_model, tmp_path):
    """A hunt: "the init text's token id 400 is outside the model's vocabulary (400); use the base model's
    tokenizer", where tokenizer_name_or_path was the base model's (a token added to its tokenizer, not the model)."""
    import shutil

    import transformers as tf

    from edgepeft.errors import ConfigError

    base = str(tmp_path / "base")
    shutil.copytree(text_model("llama"), base)
    tok = tf.AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": ["<|go|>"]})
    tok.save_pretrained(base)

    def config(text):
        return edgepeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init="TEXT",
                                           prompt_tuning_init_text=text, tokenizer_name_or_path=base)

    with pytest.raises(ConfigError, match="^" + re.escape(f"{base}: its tokenizer gives prompt_tuning_init_text's token "
                                                          "'<|go|>' the id 400, past the model's 400 embeddings; leave "
                                                          "that token out of the text")):
        edgepeft.get_peft_model(load_reference_base(base, "causal-lm"), config("<|go|> good day"))
    edgepeft.get_peft_model(load_reference_base(base, "causal-lm"), config("good day"))  # as it says
