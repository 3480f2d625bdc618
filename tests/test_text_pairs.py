"""Text pairs (a cross-encoder's query and passage, NLI's premise and hypothesis): BERT's second segment.

A seq-cls BERT's graph takes ``token_type_ids``; classify takes pairs as transformers' pipeline
(``{"text", "text_pair"}``) and sentence-transformers' CrossEncoder (``(text, text_pair)``) take them, against
HF PEFT's models (edgepeft's for a BERT prefix, which HF PEFT cannot run for SEQ_CLS) given transformers' pair
encoding. Before, a pair could only be written as one text: every token of type 0.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from peft_refs import randomize_adapter

import edgepeft
from edgepeft.exporters import export
from edgepeft.runtimes import ConfigError, EdgePeftError, InvalidInputError, Runtime
from edgepeft.errors import ConfigError as TrainingConfigError
from edgepeft.runtimes.errors import CorruptArtifactError

MINILM = edgepeft.minilm_path()  # its BERT tokenizer: [CLS] a [SEP] b [SEP], the second text's types 1
PAIRS = [("how tall is everest", "mount everest is 8,849 metres high"),
         ("how tall is everest", "the river flows into the sea"),
         ("who wrote hamlet", "hamlet is a tragedy by william shakespeare")]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    """(OUT with LoRA, prompt and prefix adapters on a tiny BERT cross-encoder of one output, {name: PyTorch model},
    the base folder). Its token type embeddings are large, so a pair read as one segment scores otherwise."""
    import peft
    import transformers as tf

    root = tmp_path_factory.mktemp("pairs")
    base = str(root / "base")
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, num_labels=1)
    model = tf.BertForSequenceClassification(config)
    with torch.no_grad():
        model.bert.embeddings.token_type_embeddings.weight.normal_(0, 1.0)
    model.save_pretrained(base)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(MINILM, name), base)
    configs = {"lora": (peft, peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])),
               "prompt": (peft, peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)),
               # HF PEFT's prefix tuning refuses BERT on transformers 5 (docs/methods.md): edgepeft's is the reference
               "prefix": (edgepeft, peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))}
    models = {}
    for i, (name, (library, peft_config)) in enumerate(configs.items()):
        pm = library.get_peft_model(tf.BertForSequenceClassification.from_pretrained(base), peft_config)
        randomize_adapter(pm, 10 + i)
        pm.peft_config["default"].base_model_name_or_path = base
        pm.save_pretrained(str(root / name))
        models[name] = pm.eval()
    out = str(root / "out")
    export([str(root / n) for n in configs], out, names=list(configs))
    return out, models, base


def _reference(model, base, rows) -> np.ndarray:
    """The PyTorch model's logits for each row alone, encoded by transformers' tokenizer (pairs with text_pair)."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(base)
    out = []
    for text, pair in rows:
        enc = tok(text, text_pair=pair, return_tensors="pt")
        with torch.no_grad():
            out.append(model(**enc).logits[0].numpy())
    return np.stack(out)


def test_pairs_classify_as_their_pytorch_models(reranker):
    out, models, base = reranker
    rt = Runtime(out)
    assert rt.manifest["inputs"]["token_type_ids"] == {"axes": {"0": "batch", "1": "sequence"}, "dtype": "int64"}
    assert rt.manifest["type_vocab_size"] == 2
    rows = PAIRS + [("a text alone", None)]
    given = [{"text": PAIRS[0][0], "text_pair": PAIRS[0][1]}, PAIRS[1], list(PAIRS[2]), "a text alone"]
    for name, model in models.items():
        want = 1 / (1 + np.exp(-_reference(model, base, rows)[:, 0]))  # one output: a sigmoid, as the pipeline
        got = [r["score"] for r in rt.classify(given, adapter=name)]
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)
        one = rt.classify({"text": PAIRS[1][0], "text_pair": PAIRS[1][1]}, adapter=name)  # one pair: one dict
        assert one["score"] == pytest.approx(want[1], abs=1e-5)
        # the same pair as one text (every token of type 0) scores otherwise, well past the float32 noise (1e-7): the
        # types reach the graph (the random adapters dominate these scores, and a prompt's head reads a virtual token)
        alone = rt.classify(f"{PAIRS[0][0]} [SEP] {PAIRS[0][1]}", adapter=name)["score"]
        assert abs(alone - want[0]) > 5e-5, name


def test_pairs_in_forward_and_the_tokenizer(reranker):
    import transformers as tf

    out, models, base = reranker
    rt = Runtime(out)
    texts, pairs = zip(*PAIRS)
    ids, mask, types = rt.tokenizer.encode_pairs(list(texts), list(pairs))
    want = tf.AutoTokenizer.from_pretrained(base)(list(texts), text_pair=list(pairs), padding=True)
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
    np.testing.assert_array_equal(types, want["token_type_ids"])
    with torch.no_grad():
        ref = models["lora"](input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                             token_type_ids=torch.tensor(types)).logits.numpy()
    got = rt.forward(ids, mask, adapter="lora", token_type_ids=types)["logits"]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # no types given: every token of type 0, as transformers' forward without them
    with torch.no_grad():
        ref0 = models["lora"](input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(rt.forward(ids, mask, adapter="lora")["logits"], ref0, atol=1e-5)
    # a mixed batch binds each row's types with its rows
    mixed = rt.forward(ids, mask, adapter=["lora", "prompt", "lora"], token_type_ids=types)["logits"]
    np.testing.assert_allclose(mixed[[0, 2]], got[[0, 2]], atol=1e-5)
    np.testing.assert_allclose(mixed[1], rt.forward(ids[1:2], mask[1:2], adapter="prompt",
                                                    token_type_ids=types[1:2])["logits"][0], atol=1e-5)


def test_bad_token_types_and_pairs_are_refused(reranker, tmp_path, monkeypatch):
    out, _, _ = reranker
    rt = Runtime(out)
    ids, mask, types = rt.tokenizer.encode_pairs(["a b"], ["c"])
    for bad, match in [(types[:, 1:], r"token_type_ids has shape \[1, 5\] but input_ids has \[1, 6\]"),
                       (types * 0.5, "token_type_ids must be integers"),
                       (types * 2, r"token type 2 is outside the model's \[0, 2\)")]:
        with pytest.raises(InvalidInputError, match=match):
            rt.forward(ids, mask, token_type_ids=bad)
    for bad in [{"text": "a", "pair": "b"}, [("a", "b", "c")], [("a", 3)], [None]]:
        with pytest.raises(InvalidInputError, match=r"give a text, a text pair \(\{'text': \.\.\., 'text_pair'"):
            rt.classify(bad)
    with pytest.raises(InvalidInputError, match="encode_pairs takes one pair"):
        rt.tokenizer.encode_pairs(["a", "b"], ["c"])
    # an export written before pairs were served: its graph takes no types, its manifest has no type_vocab_size
    from edgepeft.exporters import graph

    monkeypatch.setattr(graph, "reads_token_types", lambda config, task: False)
    old = tmp_path / "old"
    export([os.path.join(os.path.dirname(out), "lora")], str(old), names=["lora"])
    path = old / "base" / "edgepeft.json"
    manifest = json.loads(path.read_text())
    assert "token_type_ids" not in manifest["inputs"]
    del manifest["type_vocab_size"]
    path.write_text(json.dumps(manifest))
    rt = Runtime(str(old))
    assert rt.classify("a b", adapter="lora")["score"] == pytest.approx(  # texts are served as before
        Runtime(out).classify("a b", adapter="lora")["score"], abs=1e-6)
    with pytest.raises(InvalidInputError, match="this export takes no token_type_ids"):
        rt.forward(ids, mask, token_type_ids=types)
    np.testing.assert_array_equal(rt.forward(ids, mask, token_type_ids=types * 0)["logits"], rt.forward(ids, mask)["logits"])
    with pytest.raises(ConfigError, match="exported before edgepeft served text pairs .*; export an adapter into it again"):
        rt.classify([("a", "b")])
    merged = tmp_path / "merged"  # an earlier --merge export: written again with --merge --overwrite
    export([os.path.join(os.path.dirname(out), "lora")], str(merged), merge=True)
    edit = json.loads((merged / "base" / "edgepeft.json").read_text())
    del edit["type_vocab_size"]
    (merged / "base" / "edgepeft.json").write_text(json.dumps(edit))
    for call in (lambda m: m.classify([("a", "b")]), lambda m: m.forward(ids, mask, token_type_ids=types)):
        with pytest.raises(EdgePeftError, match=r"served text pairs.*[,;] export it again with --merge --overwrite \(its "
                                                r"base is then written with token types\)"):
            call(Runtime(str(merged)))
    assert manifest["format_version"] == 3  # as every export before; with the types input, 4: an older runtime would
    assert json.loads(open(os.path.join(out, "base", "edgepeft.json")).read())["format_version"] == 4  # bind none
    # another adapter exported into it: the base is written again with the input, the adapter there taken along
    monkeypatch.undo()
    export([os.path.join(os.path.dirname(out), "lora")], str(merged), merge=True, overwrite=True)
    assert Runtime(str(merged)).classify([PAIRS[0]])[0]["score"] == pytest.approx(
        Runtime(out).classify([PAIRS[0]], adapter="lora")[0]["score"], abs=1e-6)
    export([os.path.join(os.path.dirname(out), "prompt")], str(old), names=["prompt"])
    again = Runtime(str(old))
    assert again.type_vocab_size == 2 and again.adapter_names == ["lora", "prompt"]
    for name in ("lora", "prompt"):
        assert again.classify([PAIRS[0]], adapter=name)[0]["score"] == pytest.approx(
            Runtime(out).classify([PAIRS[0]], adapter=name)[0]["score"], abs=1e-6)
    # a manifest that leaves out an input the graph takes: refused at open, not ONNX Runtime's error at the call
    manifest = json.loads(open(os.path.join(out, "base", "edgepeft.json")).read())
    del manifest["inputs"]["token_type_ids"]
    shutil.copytree(out, tmp_path / "unlisted")
    (tmp_path / "unlisted" / "base" / "edgepeft.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptArtifactError, match="the graph takes 'token_type_ids', which field 'inputs' does not list"):
        Runtime(str(tmp_path / "unlisted"))


def test_pairs_train_and_serve(reranker, tmp_path):
    """seq-cls rows with "text_pair" train on the tokenizer's pair encoding (types batched, padded with 0), and the
    export classifies the pairs as the trained PeftModel does given transformers' encoding."""
    import transformers as tf

    from edgepeft.models import load_base
    from edgepeft.training import train
    from edgepeft.training.data import Encoder, read_jsonl

    _, _, reranker_base = reranker
    base = str(tmp_path / "base")  # a trained classifier of two labels, its head large: the types move the loss
    shutil.copytree(reranker_base, base)
    config = tf.AutoConfig.from_pretrained(base)
    config.id2label, config.label2id = {0: "no", 1: "yes"}, {"no": 0, "yes": 1}
    model = tf.BertForSequenceClassification(config)
    model.bert.load_state_dict(tf.BertForSequenceClassification.from_pretrained(reranker_base).bert.state_dict())
    with torch.no_grad():
        model.classifier.weight.normal_(0, 3.0)
    model.save_pretrained(base)
    rows = [{"text": q, "text_pair": p, "label": "yes" if i % 2 else "no"}
            for i, (q, p) in enumerate(PAIRS * 4)] + [{"text": "a text alone", "label": "no"}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = tf.AutoTokenizer.from_pretrained(base)
    checked = read_jsonl(str(data), "seq-cls")
    encoder = Encoder(tok, "seq-cls", 64, ["no", "yes"], types=True)
    batch = encoder.collate(encoder.encode(checked[:3], str(data)))
    want = tok([r["text"] for r in rows[:3]], text_pair=[r["text_pair"] for r in rows[:3]], padding=True)
    for field in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(batch[field].numpy(), want[field], err_msg=field)
    out = str(tmp_path / "adapter")
    log = train(model=base, task="seq-cls", method="lora", data=str(data), eval_data=str(data), out=out, epochs=2,
                lr=1e-2, batch_size=4, options={"r": 2, "target_modules": ["query", "value"]}, progress=False)
    # the loss before training (LoRA's B is 0) is the base's on the pairs' encoding: the types reached the model
    start = load_base(base, "seq-cls", labels=log["labels"]).eval()
    with torch.no_grad():
        logits = torch.tensor(_reference(start, base, [(r["text"], r.get("text_pair")) for r in rows]))
    targets = torch.tensor([log["labels"].index(r["label"]) for r in rows])
    loss = torch.nn.functional.cross_entropy(logits, targets).item()
    assert log["evals"][0]["loss"] == pytest.approx(loss, abs=1e-5)
    export([out], str(tmp_path / "out"), names=["pairs"])
    rt = Runtime(str(tmp_path / "out"))
    model = edgepeft.PeftModel.from_pretrained(load_base(base, "seq-cls", labels=log["labels"]), out).eval()
    rows = [(r["text"], r.get("text_pair")) for r in rows[:3] + rows[-1:]]
    logits = _reference(model, base, rows)
    want = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    got = rt.classify(rows, adapter="pairs")
    np.testing.assert_allclose([[r["scores"][k] for k in log["labels"]] for r in got], want, atol=1e-5)


def test_run_classifies_a_pair(reranker, shared_export, capsys):
    from training_helpers import cli_error, cli_ok

    out, _, _ = reranker
    want = Runtime(out).classify({"text": PAIRS[0][0], "text_pair": PAIRS[0][1]}, adapter="lora")["score"]
    printed = cli_ok(capsys, "run", out, PAIRS[0][0], "--text-pair", PAIRS[0][1], "--adapter", "lora")
    assert printed == f"0\t{want:.4f}\n"
    alone = cli_ok(capsys, "run", out, PAIRS[0][0], "--adapter", "lora")
    assert alone != printed
    encoder = shared_export("bert")[0]  # a feature-extraction export
    assert cli_error(capsys, "run", encoder, "q", "--text-pair", "p") == \
        f"error: {encoder}: a feature-extraction export does not classify; drop --text-pair (a classifier's)"
    assert cli_error(capsys, "run", encoder, "q", "--text-pair", "p", "--truncation") == \
        f"error: {encoder}: a feature-extraction export does not classify; drop --text-pair and --truncation (a classifier's)"
    long = " ".join(["the mountain is very high"] * 30)  # past the model's 64 positions: cut as classify(truncation=True)
    want = Runtime(out).classify({"text": PAIRS[0][0], "text_pair": long}, adapter="lora", truncation=True)["score"]
    assert cli_ok(capsys, "run", out, PAIRS[0][0], "--text-pair", long, "--adapter", "lora", "--truncation") == \
        f"0\t{want:.4f}\n"
    assert cli_error(capsys, "run", out, PAIRS[0][0], "--text-pair", long, "--adapter", "lora").endswith(
        "exceeds the model's 64 positions; shorten it, or pass --truncation to cut it as transformers' pipeline does")


def test_inspect_says_what_classify_takes(reranker, capsys, tmp_path):
    from training_helpers import cli_ok

    out, _, _ = reranker
    assert "\n  classify: texts and text pairs (by token types)\n" in cli_ok(capsys, "inspect", out)
    old = tmp_path / "old"  # an earlier edgepeft's export: no type_vocab_size
    shutil.copytree(out, old)
    manifest = json.loads((old / "base" / "edgepeft.json").read_text())
    del manifest["type_vocab_size"], manifest["inputs"]["token_type_ids"]
    (old / "base" / "edgepeft.json").write_text(json.dumps(manifest))
    assert "\n  classify: texts only (an earlier edgepeft's export; for text pairs, export an adapter into it again (its " \
        "base is then written with token types), or every adapter into a fresh --out folder)\n" in \
        cli_ok(capsys, "inspect", str(old))
    manifest = json.loads(open(os.path.join(out, "base", "edgepeft.json")).read())
    for value, match in [(0, r"field 'type_vocab_size' must be at least 1 \(or null\), got 0"),
                         (None, r"field 'inputs' lists 'token_type_ids'; field 'type_vocab_size' must give its token types")]:
        (old / "base" / "edgepeft.json").write_text(json.dumps({**manifest, "type_vocab_size": value}))  # hand-edited
        with pytest.raises(CorruptArtifactError, match=match):
            Runtime(str(old))


@pytest.fixture(scope="module")
def decoder_classifier(text_model, tmp_path_factory):
    """(OUT, base, the PEFT model): a tiny Llama classifier of 3 labels with a LoRA adapter "lora", its tokenizer
    given Llama's pair template (<s> a </s> b)."""
    import peft
    import transformers as tf
    from tokenizers import Tokenizer, processors

    root = tmp_path_factory.mktemp("decoder-pairs")
    base = str(root / "base")
    shutil.copytree(text_model("llama"), base)
    tok = Tokenizer.from_file(os.path.join(base, "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A </s> $B:1",
                                                       special_tokens=[("<s>", 1), ("</s>", 2)])
    tok.save(os.path.join(base, "tokenizer.json"))
    torch.manual_seed(5)
    pm = peft.get_peft_model(tf.AutoModelForSequenceClassification.from_pretrained(base, num_labels=3),
                             peft.LoraConfig(task_type="SEQ_CLS", r=2))
    randomize_adapter(pm, 6)
    pm.peft_config["default"].base_model_name_or_path = base
    pm.save_pretrained(str(root / "lora"))
    export([str(root / "lora")], str(root / "out"), names=["lora"])
    return str(root / "out"), base, pm


def test_a_decoder_classifier_joins_a_pair_by_the_template(decoder_classifier):
    """A decoder has no token types: the pair template alone joins the two texts, as transformers' pipeline does."""
    import transformers as tf

    out, base, pm = decoder_classifier
    rt = Runtime(out)
    assert rt.type_vocab_size is None and rt.manifest["type_vocab_size"] is None
    hf = tf.AutoTokenizer.from_pretrained(base)
    hf.model_input_names = ["input_ids", "attention_mask"]  # as Llama's tokenizer: no token types
    pipe = tf.pipeline("text-classification", model=pm.merge_and_unload().eval(), tokenizer=hf, top_k=None,
                       device="cpu")
    pairs = [("set an alarm", "for seven"), ("play some jazz", "please")]
    for (text, pair), ours in zip(pairs, rt.classify(pairs, adapter="lora")):
        theirs = {r["label"].removeprefix("LABEL_"): r["score"] for r in pipe({"text": text, "text_pair": pair})}
        assert ours["scores"] == pytest.approx(theirs, abs=1e-5)
        joined = rt.classify(text + pair, adapter="lora")["scores"]  # without the template's </s>: other scores
        assert max(abs(joined[k] - v) for k, v in theirs.items()) > 1e-4


def test_pair_edges_follow_their_references(reranker, decoder_classifier, tmp_path):
    """Found by a hunt: a bare (text, text_pair) tuple was two texts (one pair to CrossEncoder.predict), an empty
    pair in the pipeline's form was kept (the pipeline's tokenizer drops it), --max-length counted a single text's
    special tokens for pairs (3 trained [CLS] [SEP] [SEP]), a row's "text_pair": null and encode_pairs(texts, None)
    were refused (transformers reads both as no pair), and an earlier edgepeft's decoder export refused pairs it can
    serve (its template joins them; only a BERT's graph lacked the token types). A review: "text_pair": "" was refused
    in training while classify's dict form reads it as no pair, and encode(text, text_pair=...) was a TypeError."""
    import transformers as tf

    from edgepeft.training.data import Encoder, read_jsonl

    out, _, base = reranker
    rt = Runtime(out)
    with pytest.raises(InvalidInputError, match=r"is ambiguous: one pair to sentence-transformers' CrossEncoder, two "
                                                r"texts to the pipeline; pass \[\(text, text_pair\)\] for a pair"):
        rt.classify(PAIRS[0], adapter="lora")
    def score(given):
        return rt.classify(given, adapter="lora")["score"]

    assert rt.classify(["a b", "c"], adapter="lora")[1]["score"] == pytest.approx(score("c"), abs=1e-6)  # two texts
    assert score({"text": "where is it", "text_pair": ""}) == score("where is it")  # the pipeline's: [CLS] a [SEP]
    for falsy in (0, False, []):  # a hunt: scored as the text alone; transformers' tokenizer refuses them
        with pytest.raises(InvalidInputError, match=r"^give a text, a text pair"):
            score({"text": "where is it", "text_pair": falsy})
    assert rt.classify([("where is it", "")], adapter="lora")[0]["score"] != score("where is it")  # [CLS] a [SEP] [SEP]
    ids, _, types = rt.tokenizer.encode_pairs(["a b", "c"], None)
    np.testing.assert_array_equal(ids, rt.tokenizer.encode(["a b", "c"])[0])
    tok = tf.AutoTokenizer.from_pretrained(base)  # a hunt: one text's empty pair is none (the batched call keeps it)
    assert rt.tokenizer.encode_pairs("where is it", "")[0][0].tolist() == tok("where is it", text_pair="")["input_ids"]
    assert rt.tokenizer.encode_pairs(["where is it"], [""])[0][0].tolist() == \
        tok(["where is it"], text_pair=[""])["input_ids"][0] != tok("where is it")["input_ids"]
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "a", "text_pair": None, "label": 1}) + "\n" +
                    json.dumps({"text": "b", "text_pair": "c d", "label": 0}) + "\n" +
                    json.dumps({"text": "e", "text_pair": "", "label": 0}) + "\n")
    rows = read_jsonl(str(data), "seq-cls")
    assert "text_pair" not in rows[0] and rows[1]["text_pair"] == "c d" and "text_pair" not in rows[2]
    with pytest.raises(ConfigError, match=r"^encode takes no text_pair; encode text pairs with encode_pairs\(texts, "
                                          r"text_pairs\), which returns their token_type_ids too$"):
        rt.tokenizer.encode("q", text_pair="p")  # transformers' spelling: a TypeError
    with pytest.raises(TrainingConfigError, match=r"--max-length 3 leaves no token of text: the tokenizer adds 3 "
                                                  r"special tokens to each pair; pass --max-length 4 or more"):
        Encoder(tok, "seq-cls", 3, ["0", "1"], types=True).encode(rows, str(data))
    old = tmp_path / "old"  # an earlier edgepeft's decoder classifier: no type_vocab_size, pairs by the template
    decoder_out = decoder_classifier[0]
    shutil.copytree(decoder_out, old)
    manifest = json.loads((old / "base" / "edgepeft.json").read_text())
    del manifest["type_vocab_size"]
    (old / "base" / "edgepeft.json").write_text(json.dumps(manifest))
    assert Runtime(str(old)).classify([("set an alarm", "for seven")], adapter="lora") == \
        Runtime(decoder_out).classify([("set an alarm", "for seven")], adapter="lora")


def test_a_rerankers_one_output_head_trains_on_relevance(reranker, tmp_path):
    """A cross-encoder reranker (a head of one output: config.json's num_labels 1) fine-tuned on pairs labelled 0 and 1
    keeps its head and trains it with binary cross-entropy, as sentence-transformers' CrossEncoder does: a head of 2
    classes trained from scratch replaced it, the reranker's scoring lost without a word."""
    from edgepeft.models import load_base

    base, out = _scoring_reranker(reranker, tmp_path), str(tmp_path / "adapter")
    rows = [{"text": q, "text_pair": p, "label": i % 2} for i, (q, p) in enumerate(PAIRS * 4)]
    log = _train_scores(base, rows, out, tmp_path)
    _check_first_eval(log, base, rows)
    assert log["labels"] is None and not os.path.exists(os.path.join(out, "labels.json"))  # the head's own name
    export([out], str(tmp_path / "out"), names=["relevance"])
    rt = Runtime(str(tmp_path / "out"))
    model = edgepeft.PeftModel.from_pretrained(load_base(base, "seq-cls"), out).eval()
    want = 1 / (1 + np.exp(-_reference(model, base, PAIRS)[:, 0]))  # one score per pair: a sigmoid, as the pipeline
    got = rt.classify(PAIRS, adapter="relevance")
    assert [list(r["scores"]) for r in got] == [["0"]] * len(PAIRS)
    np.testing.assert_allclose([r["score"] for r in got], want, atol=1e-5)


def _scoring_reranker(reranker, tmp_path) -> str:
    """A copy of the reranker's base, its head of one output made large: it scores before training."""
    import transformers as tf

    base = str(tmp_path / "base")
    shutil.copytree(reranker[2], base)
    model = tf.BertForSequenceClassification.from_pretrained(base)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 3.0)
    model.save_pretrained(base)
    return base


def _train_scores(base, rows, out, tmp_path, eval_rows=None) -> dict:
    from edgepeft.training import train

    data, evals = tmp_path / "relevance.jsonl", tmp_path / "relevance-eval.jsonl"
    for path, some in ((data, rows), (evals, eval_rows or rows)):
        path.write_text("".join(json.dumps(r) + "\n" for r in some))
    return train(model=base, task="seq-cls", method="lora", data=str(data), eval_data=str(evals), out=out, epochs=2,
                 lr=1e-2, batch_size=4, options={"r": 2, "target_modules": ["query", "value"]}, progress=False)


def _check_first_eval(log, base, rows) -> None:
    """The first evaluation is the base's binary cross-entropy on the labels as targets, and the share of scores on
    their label's side of 0.5."""
    from edgepeft.models import load_base

    start = load_base(base, "seq-cls").eval()  # the head as saved
    logits = torch.tensor(_reference(start, base, [(r["text"], r["text_pair"]) for r in rows])[:, 0])
    targets = torch.tensor([float(r["label"]) for r in rows])
    before = log["evals"][0]
    assert before["loss"] == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(logits, targets).item(), abs=1e-5)
    assert before["accuracy"] == pytest.approx(float(((logits > 0) == (targets > 0.5)).float().mean()))
    assert 0 < before["accuracy"] < 1


def test_a_reranker_trains_on_relevance_scores(reranker, tmp_path):
    """Scores from 0 to 1 (a teacher reranker's, which sentence-transformers' CrossEncoder distils with its binary
    cross-entropy) train a reranker's one output on those soft targets. Before, a label 0.7 was refused. Scores on a
    model of more outputs, a score past 1, and an evaluation row labelled 2 are refused, naming the file."""
    from edgepeft.errors import DataError
    from file_checks import edited_json

    base = _scoring_reranker(reranker, tmp_path)
    rows = [{"text": q, "text_pair": p, "label": [0.9, 0.15, 0.6, 1, 0, 0.35][i % 6]}
            for i, (q, p) in enumerate(PAIRS * 4)]
    out = str(tmp_path / "adapter")
    log = _train_scores(base, rows, out, tmp_path)
    _check_first_eval(log, base, rows)
    assert log["evals"][-1]["loss"] < log["evals"][0]["loss"] and log["labels"] is None
    with pytest.raises(DataError, match=r"relevance-eval.jsonl:2: label 2 is not a relevance score; the training rows "
                                        "score relevance from 0 to 1"):
        _train_scores(base, rows, str(tmp_path / "a2"), tmp_path, eval_rows=[rows[0], dict(rows[1], label=2)])
    with pytest.raises(DataError, match=r"relevance.jsonl:1: \"label\" must be a string of more than whitespace, an integer or a "
                                        "relevance score from 0 to 1, got 1.5"):
        _train_scores(base, [dict(rows[0], label=1.5)] + rows, str(tmp_path / "a3"), tmp_path)
    for other in ("yes", 2):  # a review: beside scores, named at its line (the fix said num_labels 1, which it is)
        with pytest.raises(DataError, match=rf"relevance.jsonl:1: label {other!r} is not a relevance score"):
            _train_scores(base, [dict(rows[0], label=other)] + rows, str(tmp_path / "a6"), tmp_path)
    with edited_json(os.path.join(base, "config.json")) as config:  # a head of two classes
        config["id2label"], config["label2id"] = {"0": "no", "1": "yes"}, {"no": 0, "yes": 1}
    scores = r"labels such as 0.(9|15|6|35) are relevance scores, which train a head of one output \(a cross-encoder "
    with pytest.raises(DataError, match=r"relevance.jsonl: " + scores + r"reranker's\).* a --model of one output "
                                        r"\(config.json's \"num_labels\": 1, no problem_type"):
        _train_scores(base, rows, str(tmp_path / "a4"), tmp_path)
    with edited_json(os.path.join(base, "config.json")) as config:  # the fix the message names
        del config["id2label"], config["label2id"]
        config["num_labels"] = 1
    assert _train_scores(base, rows, str(tmp_path / "a5"), tmp_path)["labels"] is None
    # a pairs hunt: a reranker transformers' Trainer fine-tuned on floats saves problem_type "regression"; told to set
    # "num_labels": 1 (which it has), or for labels 0 and 1 problem_type "single_label_classification" (which
    # transformers refuses for one output). Without problem_type, as both messages say now, it trains.
    with edited_json(os.path.join(base, "config.json")) as config:
        config["problem_type"] = "regression"
    with pytest.raises(DataError, match=scores):
        _train_scores(base, rows, str(tmp_path / "a7"), tmp_path)
    with pytest.raises(ConfigError, match=r"config.json's problem_type is 'regression'; edgepeft trains single-label "
                                          r"classification \(one label per row\), and a reranker's score \(one output\); "
                                          r"use a copy of the model without problem_type in its config.json$"):
        _train_scores(base, [dict(r, label=i % 2) for i, r in enumerate(rows)], str(tmp_path / "a8"), tmp_path)
    with edited_json(os.path.join(base, "config.json")) as config:
        del config["problem_type"]
    assert _train_scores(base, rows, str(tmp_path / "a9"), tmp_path)["labels"] is None


def test_a_rerankers_head_replaced_or_resumed_across_versions_is_said(reranker, tmp_path, capsys):
    """A review: labels other than the integers 0 and 1 on a one-output model still train a head of their classes in
    its place: a note says so and how to keep it; a checkpoint an earlier edgepeft made of such a run (2 classes)
    blamed the data."""
    from edgepeft.training import TrainingArguments, method_config
    from edgepeft.training.checkpoint import check_same_data
    from edgepeft.training.trainer import Trainer

    _, _, base = reranker
    data = tmp_path / "named.jsonl"
    data.write_text("".join(json.dumps({"text": q, "text_pair": p, "label": "yes" if i % 2 else "no"}) + "\n"
                            for i, (q, p) in enumerate(PAIRS)))
    args = TrainingArguments(model=base, task="seq-cls", method="lora", data=str(data), out=str(tmp_path / "o"),
                             progress=False)
    trainer = Trainer(args)
    trainer._data(method_config(args.method, args.task, dict(args.options)))
    assert f"note: {base}: its head gives one score (a reranker's); labels no, yes train a head of 2 classes from " \
        "scratch in its place; label the rows 0 and 1, or with scores from 0 to 1, to keep and fine-tune its score" in \
        capsys.readouterr().err
    with pytest.raises(TrainingConfigError, match="was made by an earlier edgepeft, which trained a head of 2 classes "
                                                  "in place of this model's one-output head"):
        check_same_data({"log": {"labels": ["0", "1"]}}, "CKPT", None, "DATA", {})
    # a pairs hunt: "0" and "1" as strings (a CSV's) were told to label the rows 0 and 1, which they seemed to be
    from edgepeft.training.data import replaced_head_note
    from edgepeft.training.labels import ClassNames
    from types import SimpleNamespace

    config = SimpleNamespace(num_labels=1, problem_type=None)
    assert "label the rows 0 and 1 (numbers, not strings), or" in replaced_head_note(config, ClassNames("01", ints=False),
                                                                                     "M", False)
    for labels in (ClassNames("012", ints=True), ClassNames(["no", "yes"], ints=False)):
        assert "label the rows 0 and 1, or" in replaced_head_note(config, labels, "M", False)


def test_a_pair_template_naming_a_token_its_file_lacks(reranker, text_export, tmp_path):
    """Found by a hunt: every pair's encode panicked in the Rust library (a BaseException, with its backtrace) where
    the pair template names a special token the file lacks. A classifier's tokenizer is refused when opened; another
    export never encodes a pair, and keeps its tokenizer (a review: refusing it stopped generate)."""
    from file_checks import edited_json

    for source, name in ((reranker[0], "classifier"), (text_export[0], "generator")):
        out = tmp_path / name
        shutil.copytree(source, out)
        with edited_json(str(out / "base" / "tokenizer.json")) as t:
            t["post_processor"]["pair"].append({"SpecialToken": {"id": "<zz>", "type_id": 1}})
        rt = Runtime(str(out))
        if name == "generator":
            assert rt.generate_text("hello", adapter="tok", max_new_tokens=2) is not None
            continue
        with pytest.raises(CorruptArtifactError, match=r"tokenizer.json: the `tokenizers` package cannot encode with it "
                                                       r"\(no entry found for key\)"):
            rt.classify([PAIRS[0]], adapter="lora")


def test_long_pairs_are_cut_as_transformers_cuts_them(reranker):
    """classify(truncation=True), as the pipeline's, cuts a pair longest first (the Rust library's rule: the shorter
    text kept where it fits in half the room) to the model's positions, less a prompt's virtual tokens; encode_pairs'
    max_length cuts as transformers' tokenizer(truncation=True, max_length=...). A review: a reranker's long
    passage could only be refused (CrossEncoder cuts it)."""
    import itertools

    import transformers as tf

    out, models, base = reranker
    rt = Runtime(out)
    tok = tf.AutoTokenizer.from_pretrained(base)
    words = "one two three four five six seven eight nine ten eleven".split()
    for la, lb, m, special in itertools.product(range(1, 11, 3), range(1, 11, 2), (3, 4, 6, 9, 14, 30, None),
                                                (True, False)):  # without special tokens: the texts' own, typed
        a, b = " ".join(words[:la]), " ".join(words[:lb])
        ids, _, types = rt.tokenizer.encode_pairs([a], [b], max_length=m, add_special_tokens=special)
        want = tok(a, b, truncation=m is not None, max_length=m, add_special_tokens=special)
        assert ids[0].tolist() == want["input_ids"] and types[0].tolist() == want["token_type_ids"], (la, lb, m)
        if not special:
            alone = rt.tokenizer.encode([a], max_length=m, add_special_tokens=False)[0]
            assert alone[0].tolist() == tok(a, truncation=m is not None, max_length=m, add_special_tokens=False)[
                "input_ids"]
    query, passage = "how tall is everest", " ".join(["the mountain is very high"] * 30)  # 150 words: past 64
    with pytest.raises(InvalidInputError, match=r"exceeds the model's 64 positions; shorten it, or pass truncation=True "
                                                 r"to cut it as transformers' pipeline does$"):
        rt.classify([(query, passage)], adapter="lora")  # a hunt: the fix that works was not named
    near = " ".join(["high"] * 60)  # 62 tokens: room on lora's rows, not beside a prompt's 3 (a review: each row counts)
    both = rt.classify([near, "short"], adapter=["lora", "prompt"])
    assert both == [rt.classify(near, adapter="lora"), rt.classify("short", adapter="prompt")]
    for name, room in (("lora", 64), ("prompt", 61)):  # a prompt's 3 virtual tokens take positions too
        enc = tok(query, passage, truncation=True, max_length=room, return_tensors="pt")
        with torch.no_grad():
            want = torch.sigmoid(models[name](**enc).logits[0, 0]).item()
        assert rt.classify([(query, passage)], adapter=name, truncation=True)[0]["score"] == pytest.approx(want, abs=1e-5)
    # each row cut for its own adapter, as alone: a lora row was cut to the room beside the prompt's (61, not 64)
    mixed = rt.classify([(query, passage), (query, passage)], adapter=["lora", "prompt"], truncation=True)
    assert [m["score"] for m in mixed] == pytest.approx([rt.classify([(query, passage)], adapter=name, truncation=True)[
        0]["score"] for name in ("lora", "prompt")], abs=1e-6)
    with pytest.raises(ConfigError, match="truncation must be True or False, got 'yes'"):
        rt.classify("a", truncation="yes")
