"""Runtime.classify scores as transformers' text-classification pipeline does, by the base config's problem_type:
softmax gave 1.0 to a head of one output (rerankers, scores) and probabilities summing to 1 to multi-label heads."""
from __future__ import annotations

import os

import numpy as np
import pytest

from peft_refs import bert_lora_classifier

from edgepeft.errors import AdapterInUseError
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime

TEXTS = ["w1 w2 w3", "w7 w3"]


def _classifier(text_model, root, labels: int, problem_type=None) -> tuple:
    """(OUT with a LoRA classifier "c", the PEFT model merged) on a tiny BERT whose config says ``problem_type``."""
    base, adapter, pm = bert_lora_classifier(text_model("bert"), root, {i: f"L{i}" for i in range(labels)}, seed=4,
                                             problem_type=problem_type)
    out = str(root / "out")
    export([adapter], out, names=["c"])
    return out, base, pm.merge_and_unload().eval()


@pytest.mark.parametrize("labels, problem_type", [(1, None), (3, "multi_label_classification"), (1, "regression"),
                                                  (3, None)])
def test_classify_scores_as_the_pipeline(labels, problem_type, text_model, tmp_path):
    import transformers as tf

    out, base, merged = _classifier(text_model, tmp_path, labels, problem_type)
    pipe = tf.pipeline("text-classification", model=merged, tokenizer=tf.AutoTokenizer.from_pretrained(base),
                       top_k=None, device="cpu")
    rt = Runtime(out)
    assert rt.manifest["problem_type"] == problem_type
    for text, theirs in zip(TEXTS, pipe(TEXTS)):
        ours = rt.classify(text, adapter="c")
        want = {r["label"]: r["score"] for r in theirs}
        assert ours["scores"].keys() == want.keys()
        np.testing.assert_allclose([ours["scores"][k] for k in want], list(want.values()), atol=1e-5)
        assert ours["label"] == theirs[0]["label"] and ours["score"] == pytest.approx(theirs[0]["score"], abs=1e-5)


def test_classify_holds_the_adapter_until_its_labels_are_read(text_model, tmp_path, monkeypatch):
    """An adapter reloaded under the same name between the forward pass and reading its label names gave the old
    adapter's scores under the new one's names."""
    out, _, _ = _classifier(text_model, tmp_path, 3)
    rt = Runtime(out)
    forward = rt.forward
    tried = []

    def then_unload(*args, **kwargs):  # another thread, right after the forward pass
        result = forward(*args, **kwargs)
        with pytest.raises(AdapterInUseError):
            rt.unload_adapter("c")
        tried.append(True)
        return result

    monkeypatch.setattr(rt, "forward", then_unload)
    assert rt.classify(TEXTS[0], adapter="c")["label"] in ("L0", "L1", "L2") and tried
    monkeypatch.undo()
    encode, starts = rt.tokenizer.encode_pairs, []

    def between(*args, **kwargs):  # each batch of 32's start, before the batch holds the adapter itself
        starts.append(True)
        if len(starts) > 1:
            with pytest.raises(AdapterInUseError):
                rt.unload_adapter("c")
        return encode(*args, **kwargs)

    monkeypatch.setattr(rt.tokenizer, "encode_pairs", between)
    assert len(rt.classify(TEXTS * 20, adapter="c")) == 40 and len(starts) == 3  # held across the batches too
    monkeypatch.undo()
    rt.unload_adapter("c")  # released once classify returns


def test_a_weighted_row_is_named_by_the_adapter_whose_head_runs(text_model, tmp_path):
    """{"H": 1, "N": 0.5}: H brings the head that runs, N (a LoRA without task_type) keeps the base's. The names came
    from whichever was listed first: N first named H's scores by the base's labels (or, for another label count,
    called the export corrupt)."""
    import json

    import peft
    import transformers as tf

    from peft_refs import randomize_adapter

    base, head, _ = bert_lora_classifier(text_model("bert"), tmp_path, {0: "neg", 1: "pos", 2: "mixed"})
    with open(os.path.join(head, "labels.json"), "w") as f:
        json.dump({"labels": ["spam", "ham", "eggs"]}, f)
    keeps = peft.get_peft_model(tf.BertForSequenceClassification.from_pretrained(base),
                                peft.LoraConfig(r=2, target_modules=["value"]))
    randomize_adapter(keeps, 2)
    keeps.peft_config["default"].base_model_name_or_path = base
    keeps.save_pretrained(str(tmp_path / "keeps"))
    out = str(tmp_path / "out")
    export([head, str(tmp_path / "keeps")], out, names=["H", "N"])
    rt = Runtime(out)
    first, second = (rt.classify(TEXTS[0], adapter=mix) for mix in ({"H": 1.0, "N": 0.5}, {"N": 0.5, "H": 1.0}))
    assert first == second and set(first["scores"]) == {"spam", "ham", "eggs"}
    assert set(rt.classify(TEXTS[0], adapter={"N": 0.5})["scores"]) == {"neg", "pos", "mixed"}  # the base's head
    merged = str(tmp_path / "merged")  # a merged adapter's name at weight 1 is the base (classify raised)
    export([head], merged, names=["H"], merge=True)
    assert set(Runtime(merged).classify(TEXTS[0], adapter={"H": 1.0})["scores"]) == {"spam", "ham", "eggs"}


@pytest.mark.parametrize("arch, pad", [("llama", -1), ("llama", 0), ("gpt2", 400)])
def test_a_decoder_classifier_scores_each_text_of_a_batch_as_alone(text_model, tmp_path, arch, pad):
    """Its head reads each row's last position where the model's padding id is no token (pad_token_id -1, older
    Llama conversions; past the vocabulary, which GPT-2 takes) or a prompt adapter passes embeddings: a shorter
    text of a batch was read at a pad (0.008 off the pipeline, which classifies one text at a time). Rows of each
    length now run apart. A text of no tokens ("": this tokenizer adds none) got a label in a batch."""
    import shutil

    import peft
    import torch
    import transformers as tf

    from file_checks import edit_json
    from peft_refs import randomize_adapter, randomize_prompt_encoder

    texts = ["set an alarm for seven tomorrow morning", "hi", "the battery died", "hi"]
    base = str(tmp_path / "base")
    shutil.copytree(text_model(arch), base)
    edit_json(os.path.join(base, "config.json"), pad_token_id=pad)
    adapters = {}
    for name, config in (("lora", peft.LoraConfig(task_type="SEQ_CLS", r=2)),
                         ("prompt", peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))):
        torch.manual_seed(5)
        pm = peft.get_peft_model(tf.AutoModelForSequenceClassification.from_pretrained(base, num_labels=3), config)
        (randomize_adapter if name == "lora" else randomize_prompt_encoder)(pm, 6)
        pm.peft_config["default"].base_model_name_or_path = base
        adapters[name] = str(tmp_path / name)
        pm.save_pretrained(adapters[name])
    out = str(tmp_path / "out")
    export(list(adapters.values()), out, names=list(adapters))
    rt = Runtime(out)
    for spec in ("lora", "prompt", ["lora", "prompt", "prompt", "lora"]):
        batch = rt.classify(texts, adapter=spec)
        alone = [rt.classify(t, adapter=spec if isinstance(spec, str) else spec[i]) for i, t in enumerate(texts)]
        for ours, want in zip(batch, alone):
            np.testing.assert_allclose(list(ours["scores"].values()), list(want["scores"].values()), atol=1e-6)
    from edgepeft.runtimes import InvalidInputError

    for wrong in (["prompt"] * 5, ["prompt"]):  # the split indexed the list: extra entries ignored, or an IndexError
        with pytest.raises(InvalidInputError, match=f"adapter lists {len(wrong)} entries for 4 rows"):
            rt.classify(texts, adapter=wrong)
    for empty in ("", ["", "hi"]):
        with pytest.raises(InvalidInputError, match="^text '' has no tokens .*; give text the vocabulary holds$"):
            rt.classify(empty, adapter="lora")


def test_long_lists_run_in_batches_of_like_lengths_each_text_as_alone(text_model, tmp_path, monkeypatch):
    """Found by a hunt: classify and embed ran a whole list as one batch padded to its longest text: 200 texts, one
    long, took 9 GB (memory by rows x the longest row squared). They run 32 at a time, sorted by length, as
    sentence-transformers' encode and predict; each text's answer is its answer alone, in the caller's order."""
    out, _, _ = _classifier(text_model, tmp_path, 3)
    rt = Runtime(out)
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{k}" for k in rng.integers(1, 99, size=n)) for n in rng.integers(1, 40, size=70)]
    shapes, forward = [], rt.forward
    monkeypatch.setattr(rt, "forward", lambda ids, *a, **k: shapes.append(ids.shape) or forward(ids, *a, **k))
    spec = ["c", None] * 35
    batch = rt.classify(texts, adapter=spec, truncation=np.bool_(False))  # numpy's bool: a switch (a hunt)
    assert max(rows for rows, _ in shapes) <= 32 and sum(rows * width for rows, width in shapes) < 70 * max(
        width for _, width in shapes) * 0.8  # like lengths together: far less padding than one batch
    for ours, text, name in zip(batch, texts, spec):
        np.testing.assert_allclose(list(ours["scores"].values()),
                                   list(rt.classify(text, adapter=name)["scores"].values()), atol=1e-6)


@pytest.mark.parametrize("merge", [False, True])
def test_labels_are_read_with_the_classifier_s_weights(text_model, tmp_path, monkeypatch, merge):
    """A concurrency hunt: export read labels.json after tracing and validating (minutes on a real model), so a
    training run into the adapter's folder meanwhile named the first run's classifier with its own labels, "ok"."""
    import importlib
    import json

    _, head, _ = bert_lora_classifier(text_model("bert"), tmp_path, {0: "neg", 1: "pos"})
    with open(os.path.join(head, "labels.json"), "w") as f:
        json.dump({"labels": ["negative", "positive"]}, f)
    real = importlib.import_module("edgepeft.exporters.export").trace_base

    def trace_then_retrain(*args, **kwargs):  # another run writes the folder once the export has read it
        with open(os.path.join(head, "labels.json"), "w") as f:
            json.dump({"labels": ["alarm", "timer"]}, f)
        return real(*args, **kwargs)

    for module in ("edgepeft.exporters.export", "edgepeft.exporters.merged"):
        monkeypatch.setattr(importlib.import_module(module), "trace_base", trace_then_retrain)
    out = str(tmp_path / "out")
    export([head], out, names=["c"], merge=merge)
    assert Runtime(out).labels(None if merge else "c") == ["negative", "positive"]
