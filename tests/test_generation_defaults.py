"""What ``generate`` takes from the model when a call leaves it unset, as transformers' generate does.

A model laid out as Qwen2.5-Instruct is: config.json has no padding id, generation_config.json
sets the padding id, two eos ids and sampling settings. transformers samples with them by
default and pads finished rows with that padding id; so must the runtime, the CLI and the
export's genai_config.json. Without an attention_mask, transformers tells left padding by
the padding id; so does the runtime.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from file_checks import edit_json, edited_json
from peft_refs import randomize_adapter
from tiny import load_reference_base
from edgepeft.runtimes import EdgePeftWarning, InvalidInputError, Runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATION = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05}
PAD, EOS = 0, [5, 2]


@pytest.fixture(scope="module")
def sampling_model(tmp_path_factory, text_export):
    """(OUT, HF PEFT model): text_export's tokenized llama with a generation_config.json that samples, LoRA 'lora'."""
    import peft

    root = tmp_path_factory.mktemp("generation-defaults")
    base = str(root / "base")
    shutil.copytree(text_export[2], base)
    edit_json(os.path.join(base, "config.json"), pad_token_id=None)  # the padding id lives in generation_config.json
    with open(os.path.join(base, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "pad_token_id": PAD, "eos_token_id": EOS, **GENERATION}, f)
    pm = peft.get_peft_model(load_reference_base(base, "causal-lm"),
                             peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapter(pm, 3)
    pm.peft_config["default"].base_model_name_or_path = base
    pm.save_pretrained(str(root / "adapter"))
    from edgepeft.exporters import export

    out = str(root / "out")
    export([str(root / "adapter")], out, names=["lora"])
    return out, peft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(root / "adapter")).eval()


def test_unset_settings_come_from_generation_config(sampling_model):
    out, hf = sampling_model
    rt = Runtime(out)
    assert rt.manifest["generation"] == GENERATION
    cfg = rt.generation_config()
    for key in GENERATION:
        assert getattr(cfg, key) == getattr(hf.generation_config, key), key
    assert (cfg.pad_token_id, cfg.eos_token_id) == (hf.generation_config.pad_token_id, EOS) == (PAD, EOS)
    assert rt.generation_config(do_sample=False, top_k=3).do_sample is False  # a call's value wins
    assert rt.generation_config(do_sample=False, top_k=3).top_k == 3
    with open(os.path.join(out, "base", "genai_config.json")) as f:
        search = json.load(f)["search"]
    assert {key: search[key] for key in GENERATION} == GENERATION
    assert json.load(open(os.path.join(out, "base", "genai_config.json")))["model"]["pad_token_id"] == PAD
    # Sampling by default: the model's settings, the same draws as when they are given
    ids, mask = rt.tokenizer.encode(["w10 w20 w30", "w40"])
    drawn = rt.generate(ids, mask, adapter="lora", max_new_tokens=8, seed=5, eos_token_id=[])
    np.testing.assert_array_equal(drawn, rt.generate(ids, mask, adapter="lora", max_new_tokens=8, seed=5,
                                                     eos_token_id=[], **GENERATION))
    assert not np.array_equal(drawn, rt.generate(ids, mask, adapter="lora", max_new_tokens=8, seed=5, eos_token_id=[],
                                                 **{**GENERATION, "temperature": 1.0, "top_k": 50, "top_p": 1.0}))


def test_finished_rows_get_the_generation_configs_padding_as_in_transformers(sampling_model):
    """Greedy on request; a row that ends early is filled with generation_config.json's padding id (0), not an eos."""
    out, hf = sampling_model
    rt = Runtime(out)
    ids, mask = rt.tokenizer.encode(["w10 w20 w30", "w40"])
    free = rt.generate(ids, mask, adapter="lora", max_new_tokens=6, do_sample=False, eos_token_id=[])
    eos = int(free[0, ids.shape[1] + 1])  # row 0's second new token ends it
    ours = rt.generate(ids, mask, adapter="lora", max_new_tokens=6, do_sample=False, eos_token_id=[eos])
    with torch.no_grad():
        want = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=6,
                           do_sample=False, eos_token_id=[eos]).numpy()
    want = np.pad(want, ((0, 0), (0, ours.shape[1] - want.shape[1])), constant_values=PAD)  # HF stops when all end
    np.testing.assert_array_equal(ours, want)
    assert (ours[0, ids.shape[1] + 2:] == PAD).all()


def test_without_a_mask_left_padding_is_told_by_the_padding_id(sampling_model):
    """As transformers' generate: no attention_mask, the padding id (not an eos) in the batch: its positions are
    padding. The padding id after a token cannot be left padding: refused, asking for the mask."""
    out, hf = sampling_model
    rt = Runtime(out)
    ids, mask = rt.tokenizer.encode(["w10 w20 w30 w40", "w50"])
    assert (ids == PAD).any() and (mask == 0).any()
    with_mask = rt.generate(ids, mask, adapter="lora", max_new_tokens=5, do_sample=False, eos_token_id=[])
    np.testing.assert_array_equal(rt.generate(ids, adapter="lora", max_new_tokens=5, do_sample=False, eos_token_id=[]),
                                  with_mask)
    with torch.no_grad():
        want = hf.generate(input_ids=torch.from_numpy(ids), max_new_tokens=5, do_sample=False, eos_token_id=None,
                           pad_token_id=PAD).numpy()
    np.testing.assert_array_equal(with_mask, want)
    steps = rt.step_logits(ids, adapter="lora")
    np.testing.assert_allclose(next(steps), next(rt.step_logits(ids, mask, adapter="lora")), rtol=0, atol=1e-6)
    steps.close()
    holes = ids.copy()
    holes[0, -2] = PAD
    with pytest.raises(InvalidInputError, match=f"row 0 holds the padding id {PAD} after a token and no attention_mask"):
        rt.generate(holes, adapter="lora", max_new_tokens=2)
    ones = rt.generate(holes, np.ones_like(holes), adapter="lora", max_new_tokens=2)  # the advice: real tokens, ones
    assert ones.shape == (2, holes.shape[1] + 2)
    # the padding id is an eos: it may be a real token, so every position counts, as in transformers
    as_eos = rt.generate(ids, adapter="lora", max_new_tokens=5, do_sample=False, eos_token_id=[PAD])
    assert not np.array_equal(as_eos[:, :ids.shape[1] + 1], with_mask[:, :ids.shape[1] + 1])
    # a model that names no padding id: no id tells padding (0 is a real token), even where finished rows get one
    rt.manifest["pad_token_id"] = None
    for row in ([[PAD, 7, 8]], [[7, 8, PAD]]):
        np.testing.assert_array_equal(rt.generate(row, adapter="lora", max_new_tokens=3, do_sample=False, eos_token_id=[]),
                                      rt.generate(row, np.ones((1, 3), np.int64), adapter="lora", max_new_tokens=3,
                                                  do_sample=False, eos_token_id=[]))


def test_cli_run_follows_the_model_unless_told(sampling_model):
    out, _ = sampling_model
    rt = Runtime(out)
    prompt = "w10 w20 w30"

    def run(*flags):
        proc = subprocess.run([sys.executable, "-m", "edgepeft", "run", out, prompt, "--adapter", "lora",
                               "--max-new-tokens", "6", *flags], capture_output=True, text=True, cwd=REPO, timeout=240)
        assert proc.returncode == 0, proc.stderr
        return proc

    greedy = run("--greedy")
    assert greedy.stdout == rt.generate_text(prompt, adapter="lora", max_new_tokens=6, do_sample=False) + "\n"
    sampled = run("--seed", "4")  # the model samples: no note that --seed needs --do-sample
    assert sampled.stdout == rt.generate_text(prompt, adapter="lora", max_new_tokens=6, seed=4) + "\n"
    assert "note:" not in sampled.stderr
    assert "note: --seed only applies with --do-sample" in run("--greedy", "--seed", "4").stderr
    # no --max-new-tokens: Runtime.generate's default (the model's, else 32), not a second rule of the CLI's own
    proc = subprocess.run([sys.executable, "-m", "edgepeft", "run", out, prompt, "--adapter", "lora", "--greedy"],
                          capture_output=True, text=True, cwd=REPO, timeout=240)
    assert proc.stdout == rt.generate_text(prompt, adapter="lora", do_sample=False) + "\n"


@pytest.fixture(scope="module")
def length_model(tmp_path_factory, text_export):
    """(OUT, HF PEFT model, export notes (EdgePeftWarning), eos): a generation_config.json that bans repeated bigrams, holds eos back for
    3 new tokens, stops at 7, sets stop strings, and asks for beam search (which the runtime does not do)."""
    import contextlib
    import io

    import peft

    root = tmp_path_factory.mktemp("generation-lengths")
    base = str(root / "base")
    shutil.copytree(text_export[2], base)
    pm = peft.get_peft_model(load_reference_base(base, "causal-lm"),
                             peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapter(pm, 5)
    ids, mask = _length_prompts()
    with torch.no_grad():  # the token greedy decoding gives second: made the eos, min_new_tokens holds it back
        eos = int(pm.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=2,
                              do_sample=False, eos_token_id=None, pad_token_id=PAD)[0, ids.shape[1] + 1])
    with open(os.path.join(base, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "pad_token_id": PAD, "eos_token_id": eos, "no_repeat_ngram_size": 2,
                   "min_new_tokens": 3, "max_new_tokens": 7, "stop_strings": ["zz"], "num_beams": 2}, f)
    pm.peft_config["default"].base_model_name_or_path = base
    pm.save_pretrained(str(root / "adapter"))
    from edgepeft.exporters import export

    out, log = str(root / "out"), io.StringIO()
    with contextlib.redirect_stdout(log), warnings.catch_warnings(record=True) as noted:  # Python's export: warnings
        warnings.simplefilter("always")
        export([str(root / "adapter")], out, names=["lora"])
    assert log.getvalue() == ""  # the notes were printed only with verbose=True (the CLI's), else dropped
    log = "\n".join(str(w.message) for w in noted if issubclass(w.category, EdgePeftWarning))
    hf = peft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(root / "adapter")).eval()
    hf.generation_config.stop_strings = None  # transformers cannot read the test's word tokenizer; no word has zz
    return out, hf, log, eos


def _length_prompts():
    ids = np.array([[PAD, PAD, 11, 12, 13], [14, 15, 16, 17, 18]], dtype=np.int64)
    return ids, (ids != PAD).astype(np.int64)


def test_length_and_ngram_settings_of_generation_config_apply_as_in_transformers(length_model):
    """Only five sampling settings were recorded: no_repeat_ngram_size, min_new_tokens and max_new_tokens of the
    model's generation_config.json were dropped without a word (tokens the model forbids, 32 of them)."""
    out, hf, log, eos = length_model
    rt = Runtime(out)
    assert rt.manifest["generation"] == {"no_repeat_ngram_size": 2, "min_new_tokens": 3, "max_new_tokens": 7,
                                         "stop": ["zz"]}
    assert "generation_config.json sets num_beams=2, which edgepeft's generate does not apply" in log
    with open(os.path.join(out, "base", "genai_config.json")) as f:  # genai bans the bigrams too (it repeated them)
        assert json.load(f)["search"]["no_repeat_ngram_size"] == 2
    assert "sets min_new_tokens, which onnxruntime-genai cannot express" in log
    ids, mask = _length_prompts()
    ours = rt.generate(ids, mask, adapter="lora")
    with torch.no_grad():  # beam search is what the runtime does not do: one beam
        want = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), num_beams=1).numpy()
    want = np.pad(want, ((0, 0), (0, ours.shape[1] - want.shape[1])), constant_values=PAD)  # HF stops when all end
    np.testing.assert_array_equal(ours, want)
    assert ours.shape[1] == ids.shape[1] + 7
    unbanned = rt.generate(ids, mask, adapter="lora", no_repeat_ngram_size=0, min_new_tokens=0)
    assert not np.array_equal(unbanned, ours)  # the settings changed the tokens
    for kwargs in ({"min_p": 0.3, "do_sample": True, "seed": 1}, {"min_length": 9}, {"max_length": 8}):
        with torch.no_grad():  # a call's settings: as transformers' (model's max_new_tokens wins over max_length)
            want = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), num_beams=1,
                               **{k: v for k, v in kwargs.items() if k != "seed"}).numpy()
        got = rt.generate(ids, mask, adapter="lora", **kwargs)
        assert got.shape[1] >= want.shape[1]
        if "min_p" not in kwargs:  # sampling: another random stream
            np.testing.assert_array_equal(got[:, :want.shape[1]], want)


def test_max_length_counts_the_prompt_when_max_new_tokens_is_unset(length_model):
    out, _, _, _ = length_model
    rt = Runtime(out)
    ids, mask = _length_prompts()
    rt.manifest["generation"] = {"max_length": 8}  # as a model that sets max_length only (Llama-2-chat: 4096)
    assert rt.generation_config().max_new_tokens is None
    assert rt.generate(ids, mask, adapter="lora", eos_token_id=[]).shape == (2, 8)
    assert rt.generate(ids, mask, adapter="lora", eos_token_id=[], max_new_tokens=2).shape == (2, 7)
    from edgepeft.runtimes import ConfigError

    with pytest.raises(ConfigError, match="max_length 5 .* leaves no new token after a 5-token prompt; pass "
                                          "max_new_tokens"):
        rt.generate(ids, mask, adapter="lora", max_length=5)
    rt.manifest["generation"] = {"max_length": 10_000}  # past the positions: as the default, what they leave (a
    assert rt.generate(ids, mask, adapter="lora", eos_token_id=[]).shape == (2, rt.max_positions)  # call's: refused
    with pytest.raises(InvalidInputError, match=r"\+ max_new_tokens 9995 \(max_length 10000 less the prompt\) - 1 .* exceeds "
                                                rf".*; pass max_length {rt.max_positions + 1} or less$"):  # a hunt: "shorten the
        rt.generate(ids, mask, adapter="lora", max_length=10_000)  # prompt or lower max_new_tokens", neither of which helped
    assert rt.generate(ids, mask, adapter="lora", max_length=rt.max_positions + 1, eos_token_id=[]).shape == (2, rt.max_positions + 1)
    rt.manifest["generation"] = {}
    assert rt.generate(ids, mask, adapter="lora", eos_token_id=[]).shape == (2, 5 + 32)  # transformers gives 20


def test_the_default_length_stops_at_the_models_positions_as_in_transformers(length_model):
    """transformers caps its default length at max_position_embeddings: a 50-token prompt on 64 positions gets 14
    new tokens there, and was refused here ("max_new_tokens 32 (the default) ... exceeds the model's 64 positions")."""
    import copy

    from transformers import GenerationConfig

    out, hf, _, _ = length_model
    rt = Runtime(out)
    rt.manifest["generation"] = {}  # a model that sets no length
    ids = np.arange(10, 10 + rt.max_positions - 14, dtype=np.int64)[None]
    hf = copy.deepcopy(hf)
    hf.generation_config = GenerationConfig(pad_token_id=PAD, eos_token_id=None)
    with torch.no_grad():
        want = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids))).numpy()
    assert want.shape == (1, rt.max_positions)
    np.testing.assert_array_equal(rt.generate(ids, adapter="lora", eos_token_id=[]), want)
    assert rt.generate(ids[:, :-13], adapter="lora", eos_token_id=[]).shape == (1, rt.max_positions)  # 27 < 32
    full = np.arange(1, 1 + rt.max_positions, dtype=np.int64)[None]  # no room left: one token, as transformers
    assert rt.generate(full, adapter="lora", eos_token_id=[]).shape == (1, rt.max_positions + 1)
    with pytest.raises(InvalidInputError, match=r"\+ max_new_tokens 20 - 1 .* exceeds"):  # a call's length is kept
        rt.generate(ids, adapter="lora", max_new_tokens=20)


def test_without_a_padding_id_an_eos_outside_the_vocabulary_does_not_pad(length_model):
    """With no padding id, the first eos pads finished rows: -1 or 200 (never produced, as transformers takes them)
    was refused as "pad_token_id must be a token id", a setting the call never gave; the first eos in the
    vocabulary pads now."""
    out, _, _, _ = length_model
    rt = Runtime(out)
    rt.manifest["pad_token_id"], rt.manifest["generation"] = None, {}
    ids, mask = _length_prompts()
    free = rt.generate(ids, mask, adapter="lora", max_new_tokens=4, eos_token_id=[])
    for eos in (-1, 200, [-1, rt.vocab_size]):
        np.testing.assert_array_equal(rt.generate(ids, mask, adapter="lora", max_new_tokens=4, eos_token_id=eos), free)
    ends = int(free[0, ids.shape[1]])  # row 0's first new token ends it; its later places get the padding
    got = rt.generate(ids, mask, adapter="lora", max_new_tokens=4, eos_token_id=[200, ends])
    assert got.shape[1] > ids.shape[1] + 1 and set(got[0, ids.shape[1]:].tolist()) == {ends}


def test_numpy_integer_settings_act_as_python_ints(length_model):
    """A numpy uint8 max_new_tokens wrapped in the length check (5 + 255 -> 4) and generated past the positions;
    numpy top_k, min_new_tokens and seed overflowed in sums alike."""
    out, _, _, _ = length_model
    rt = Runtime(out)
    ids, mask = _length_prompts()
    with pytest.raises(InvalidInputError, match="exceeds"):
        rt.generate(ids, mask, adapter="lora", max_new_tokens=np.uint8(255))
    want = rt.generate(ids, mask, adapter="lora", max_new_tokens=3, min_new_tokens=2, top_k=5, do_sample=True, seed=1)
    got = rt.generate(ids, mask, adapter="lora", max_new_tokens=np.uint8(3), min_new_tokens=np.uint8(2),
                      top_k=np.uint64(5), do_sample=True, seed=np.int8(1))
    np.testing.assert_array_equal(got, want)


def test_genai_config_takes_min_length_and_says_when_genai_stops_otherwise():
    """min_length was written as 0 (genai ended 14 tokens early); no eos id meant a silent stop at id 0 in genai; the
    model's max_length was not written, and its max_new_tokens not said."""
    from types import SimpleNamespace

    from edgepeft.exporters.genai_config import genai_config, genai_notes

    config = SimpleNamespace(model_type="llama", bos_token_id=1, num_attention_heads=2, hidden_size=8)
    manifest = {"cache": {"head_dim": 4, "num_kv_heads": 1, "num_layers": 1}, "generation": {"min_length": 14},
                "eos_token_id": [2], "pad_token_id": 0, "max_positions": 64, "vocab_size": 10, "graph": "model.onnx"}
    assert genai_config(SimpleNamespace(config=config), manifest)["search"]["min_length"] == 14
    assert genai_notes(manifest) == []
    limited = {**manifest, "generation": {"max_length": 20}}  # the model's: genai ran to the context (64)
    assert genai_config(SimpleNamespace(config=config), limited)["search"]["max_length"] == 20
    assert genai_config(SimpleNamespace(config=config), manifest)["search"]["max_length"] == 64
    assert genai_notes({**manifest, "generation": {"max_new_tokens": 2048}}) == [  # Qwen2.5's: no note said so
        "generation_config.json sets max_new_tokens, which onnxruntime-genai cannot express (max_length counts the "
        "prompt too): pass max_length to genai for each prompt"]
    assert genai_notes({**manifest, "eos_token_id": []}) == [
        "this model has no end-of-sequence id: edgepeft generates to the length asked; onnxruntime-genai, which needs "
        "one, stops at id 0 (genai_config.json's eos_token_id)"]
    # found by a hunt: genai 0.18 has neither (edgepeft stopped at the string, genai ran on to max_length), unsaid
    assert genai_notes({**manifest, "generation": {"stop": ["w55"], "min_p": 0.05}}) == [
        "generation_config.json sets stop_strings, which onnxruntime-genai does not apply: it generates past them; "
        "stop on the decoded text in your loop",
        "generation_config.json sets min_p, which onnxruntime-genai does not apply: its sampling keeps the unlikely "
        "tokens min_p drops"]


def test_a_generation_config_naming_no_eos_stops_at_none(text_export, tmp_path):
    """Found by a hunt: generation_config.json without an eos (config.json with one) is generate's whole say, as
    transformers reads it: no eos, every new token made. The export had taken config.json's and stopped rows there."""
    import peft
    import transformers as tf

    from edgepeft.exporters import export

    base = str(tmp_path / "base")
    shutil.copytree(text_export[2], base)
    ids = np.array([[5, 9, 13, 17, 21, 25]], dtype=np.int64)
    free = tf.AutoModelForCausalLM.from_pretrained(base).generate(
        input_ids=torch.from_numpy(ids), max_new_tokens=8, do_sample=False, eos_token_id=None).numpy()
    edit_json(os.path.join(base, "config.json"), eos_token_id=int(free[0, ids.shape[1] + 2]))  # a token it makes
    with open(os.path.join(base, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "pad_token_id": PAD, "do_sample": False}, f)
    hf = tf.AutoModelForCausalLM.from_pretrained(base).eval()
    pm = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    pm.peft_config["default"].base_model_name_or_path = base
    pm.save_pretrained(str(tmp_path / "adapter"))
    export([str(tmp_path / "adapter")], str(tmp_path / "out"), names=["lora"])
    rt = Runtime(str(tmp_path / "out"))
    assert rt.generation_config().eos_token_id == [] and tf.AutoModelForCausalLM.from_pretrained(
        base).generation_config.eos_token_id is None
    with torch.no_grad():
        want = tf.AutoModelForCausalLM.from_pretrained(base).eval().generate(
            input_ids=torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)), max_new_tokens=8)
    np.testing.assert_array_equal(rt.generate(ids, max_new_tokens=8), want.numpy())
    assert rt.generate(ids, max_new_tokens=8).shape[1] == ids.shape[1] + 8


@pytest.mark.parametrize("source, setting, said", [
    ("generation_config.json", {"repetition_penalty": 0.0}, "'repetition_penalty' must be > 0, got 0.0"),
    ("config.json", {"repetition_penalty": 0.0}, "'repetition_penalty' must be > 0, got 0.0"),
    ("generation_config.json", {"stop_strings": [""]}, "'stop_strings' must hold no empty string, got ['']")])
def test_a_generation_default_every_call_refuses_is_named_in_the_models_file(text_export, tmp_path, capsys, source,
                                                                            setting, said):
    """A hunt: repetition_penalty 0 in generation_config.json (transformers' generate refuses it too) failed the
    export naming the staged manifest, deleted after, with "a fresh --out", which failed the same way. A review:
    without generation_config.json, transformers makes the settings from config.json, which is named then."""
    import peft
    import transformers as tf

    from training_helpers import cli_error

    base = str(tmp_path / "base")
    shutil.copytree(text_export[2], base)
    if source == "config.json" and os.path.exists(os.path.join(base, "generation_config.json")):
        os.remove(os.path.join(base, "generation_config.json"))
    edit_json(os.path.join(base, source), **setting)
    pm = peft.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(base),
                             peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    pm.peft_config["default"].base_model_name_or_path = base
    pm.save_pretrained(str(tmp_path / "adapter"))
    line = cli_error(capsys, "export", "--adapter", tmp_path / "adapter", "--out", tmp_path / "out")
    assert line == (f"error: {os.path.join(base, source)}: {said}; correct it there, or remove it (transformers' "
                    "generate refuses it too)")
    assert not os.path.exists(tmp_path / "out")


def test_encoder_penalties_of_a_decoders_generation_config_get_a_note():
    """Found by a hunt: encoder_repetition_penalty and encoder_no_repeat_ngram_size, which transformers applies to a
    decoder's prompt (its "encoder input") and which change greedy ids, were dropped at export without the note
    other settings the runtime does not apply get."""
    from types import SimpleNamespace

    import transformers

    from edgepeft.exporters.generation_settings import ignored_generation

    gen = transformers.GenerationConfig(encoder_repetition_penalty=3.0, encoder_no_repeat_ngram_size=1,
                                        token_healing=True)  # a hunt: token_healing went without the note
    assert ignored_generation(SimpleNamespace(generation_config=gen)) == ["token_healing=True",
                                                                           "encoder_repetition_penalty=3.0",
                                                                           "encoder_no_repeat_ngram_size=1"]
    assert ignored_generation(SimpleNamespace(generation_config=transformers.GenerationConfig())) == []
    # a review: a stop string holding U+FFFD, which generate refuses, broke the export after the base was built
    from edgepeft.exporters.generation_settings import generation_defaults

    model = SimpleNamespace(generation_config=transformers.GenerationConfig(stop_strings=["\ufffd", "###"]))
    assert generation_defaults(model)["stop"] == ["###"] and ignored_generation(model) == [
        "stop_strings=['\ufffd'] (U+FFFD matches bytes that are no character)"]


def test_an_earlier_exports_stop_string_holding_u_fffd_is_dropped_not_fatal(text_export, tmp_path):
    """A review: an export made before generate refused U+FFFD stop strings recorded one; it would not open."""
    out = str(tmp_path / "out")
    shutil.copytree(text_export[0], out)
    with edited_json(os.path.join(out, "base", "edgepeft.json")) as manifest:
        manifest["generation"] = {**manifest.get("generation", {}), "stop": ["\ufffd", "w99"]}
    assert Runtime(out).generation_config().stop == ["w99"]


@pytest.mark.parametrize("adapter", ["prefix", "prompt"])
def test_a_models_max_length_of_its_context_leaves_a_virtual_adapter_the_room(virtual_export, adapter):
    """Llama-2 sets max_length to its context: every default call of a prefix or prompt adapter was refused ("+
    max_new_tokens N (generation_config.json's) ... shorten the prompt", which never fits: N grows as the prompt
    shrinks). As the default 32, the model's max_length gives what the positions leave; a call's is refused."""
    rt = Runtime(virtual_export("llama")[0])
    rt.manifest["generation"] = {"max_length": rt.max_positions}
    ids = np.arange(10, 20, dtype=np.int64)[None]
    room = rt.max_positions - ids.shape[1] - rt.virtual_positions(adapter, 1)
    np.testing.assert_array_equal(rt.generate(ids, adapter=adapter, eos_token_id=[]),
                                  rt.generate(ids, adapter=adapter, eos_token_id=[], max_new_tokens=room))
    fits = rt.max_positions - rt.virtual_positions(adapter, 1) + 1
    with pytest.raises(InvalidInputError, match=rf"exceeds the model's \d+ positions; pass max_length {fits} or less$"):
        rt.generate(ids, adapter=adapter, max_length=rt.max_positions)
    assert rt.generate(ids, adapter=adapter, max_length=fits, eos_token_id=[]).shape == (1, fits)  # as it says


def test_the_models_stop_strings_on_an_export_without_a_tokenizer_are_noted_and_named_with_stop_off(tiny_base,
                                                                                                     tmp_path):
    """A hunt: generate on ids failed as "tokenizer.json: missing ... or pass token ids" (it was given ids), naming
    neither the model's stop strings nor stop=[]; the export said nothing. typical_p's note said the tokens differ,
    where a model decoding greedily gives transformers' tokens."""
    import peft

    from edgepeft.errors import ArtifactNotFoundError
    from edgepeft.exporters import export

    base = str(tmp_path / "base")
    shutil.copytree(tiny_base("llama"), base)  # no tokenizer files
    with open(os.path.join(base, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": 2, "stop_strings": ["<|end|>"], "typical_p": 0.5}, f)
    pm = peft.get_peft_model(load_reference_base(base, "causal-lm"),
                             peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path / "adapter"))
    with warnings.catch_warnings(record=True) as noted:
        warnings.simplefilter("always")
        export([str(tmp_path / "adapter")], str(tmp_path / "out"))
    notes = [str(w.message) for w in noted if issubclass(w.category, EdgePeftWarning)]
    assert any("sets typical_p=0.5, which edgepeft's generate does not apply" in n and
               n.endswith("differ from transformers' generate there (typical_p: when sampling)") for n in notes), notes
    assert any("sets stop_strings, which are matched in decoded text, and the export has no tokenizer: generate on "
               "token ids with stop=[] (without them)" in n for n in notes), notes
    rt, ids = Runtime(str(tmp_path / "out")), np.array([[5, 6, 7]], dtype=np.int64)
    with pytest.raises(ArtifactNotFoundError, match=r"tokenizer.json: missing, and the model's generation_config.json "
                                                    r"sets stop_strings \['<\|end\|>'\], which are matched in decoded "
                                                    r"text: pass stop=\[\] to generate without them"):
        rt.generate(ids, max_new_tokens=3)
    assert rt.generate(ids, max_new_tokens=3, stop=[]).shape == (1, 6)  # as it says
