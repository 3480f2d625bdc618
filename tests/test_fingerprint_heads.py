"""The base fingerprint covers the base's own heads (the graph uses them wherever an adapter leaves the head slot
empty) and leaves out only a classifier load_base made for a checkpoint without one."""
from __future__ import annotations

import json
import os

import pytest
import torch

from file_checks import edit_json, lfs_pointer
from peft_refs import lora_adapter
from tiny import load_reference_base

from edgepeft.errors import AdapterBaseMismatchError, ArtifactNotFoundError, ConfigError
from edgepeft.exporters import export
from edgepeft.exporters.fingerprint import made_heads, weights_fingerprint
from edgepeft.models import load_base
from edgepeft.runtimes import Runtime
from edgepeft.runtimes.manifest import BASE_MANIFEST


def _base_manifest(out) -> dict:
    with open(os.path.join(out, "base", BASE_MANIFEST)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def two_outs(tiny_base, tmp_path_factory):
    """(folder, [OUT A, OUT B]): llama bases differing only in lm_head, each OUT with an adapter saving lm_head
    ("head-a"/"head-b" in folder) and a plain one ("plain-a"/"plain-b")."""
    root, base = tmp_path_factory.mktemp("fp-heads"), tiny_base("llama")
    model = load_reference_base(base, "causal-lm")
    with torch.no_grad():
        model.lm_head.weight.add_(0.5)
    other = str(root / "base-other-head")
    model.save_pretrained(other)
    outs = []
    for b, tag in ((base, "a"), (other, "b")):
        head = lora_adapter(root / f"head-{tag}", b, "causal-lm", 1, r=2, target_modules=["q_proj"],
                            modules_to_save=["lm_head"])
        plain = lora_adapter(root / f"plain-{tag}", b, "causal-lm", 2, r=2, target_modules=["q_proj"])
        outs.append(str(root / f"out-{tag}"))
        export([head, plain], outs[-1], names=["head", "plain"])
    return root, outs


def test_an_adapter_for_a_base_with_another_lm_head_is_refused(two_outs):
    """lm_head, a head slot once an adapter saves it, was left out of the fingerprint: OUT A loaded B's plain
    adapter and ran it on A's lm_head (logits off by ~12)."""
    out_a, out_b = two_outs[1]
    assert _base_manifest(out_a)["fingerprint"] != _base_manifest(out_b)["fingerprint"]
    with pytest.raises(AdapterBaseMismatchError, match="was exported for base"):
        Runtime(out_a, load_adapters=False).load_adapter(os.path.join(out_b, "adapters", "plain"))


def test_an_out_whose_fingerprint_left_the_head_out_is_named_older(two_outs, tmp_path):
    """An OUT written before heads counted is refused as an older edgepeft's, not as another base's."""
    root, out = two_outs[0], str(tmp_path / "older")
    export([str(root / "head-a")], out, names=["head"])
    older = weights_fingerprint(load_base(_base_manifest(out)["source"], "causal-lm"), skip_modules=["lm_head"])
    edit_json(os.path.join(out, "base", BASE_MANIFEST), weights_fingerprint=older, fingerprint="0" * 64,
              fingerprint_counts_heads=False)  # as the older edgepeft wrote it
    with pytest.raises(ConfigError, match=r"base: was written by an older edgepeft \(its base fingerprint leaves "
                                          r"out lm_head.*export every adapter into a fresh --out folder"):
        export([str(root / "plain-a")], out, names=["plain"])
    # the runtime says the same of an adapter exported from this base since (it advised exporting into this OUT)
    with pytest.raises(AdapterBaseMismatchError, match=r"exported from .* by an edgepeft whose base fingerprint counts "
                                                       r"lm_head; .*older one .*export every adapter into a fresh --out"):
        Runtime(out, load_adapters=False).load_adapter(os.path.join(two_outs[1][0], "adapters", "plain"))


def test_a_classifier_made_at_load_stays_out_and_re_exports_keep_the_fingerprint(tiny_base, tmp_path):
    """A seq-cls base without a classifier: its made head is no base weight; a later export into the same OUT
    (a new base for new slots) keeps the fingerprint, and the adapter already there still loads."""
    base = tiny_base("bert")
    model = load_base(base, "seq-cls")
    assert made_heads(model) == {"classifier"}
    fp = weights_fingerprint(model, skip_modules=made_heads(model))
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    assert weights_fingerprint(model, skip_modules=made_heads(model)) == fp
    out = str(tmp_path / "out")
    export([lora_adapter(tmp_path / "q", base, "seq-cls", 3, num_labels=3, r=2, target_modules=["query"])], out,
           names=["q"])
    first = _base_manifest(out)["weights_fingerprint"]
    assert first == fp
    export([lora_adapter(tmp_path / "v", base, "seq-cls", 4, num_labels=3, r=2, target_modules=["value"])], out,
           names=["v"])
    assert _base_manifest(out)["weights_fingerprint"] == first
    Runtime(out)  # loads q (re-pointed to the new base) and v
    # an OUT written before heads counted, with only such a made head: an adapter of another OUT gets the usual
    # advice (export it into this OUT works), not the older-export one
    other = str(tmp_path / "other")
    dense = lora_adapter(tmp_path / "k", base, "seq-cls", 5, num_labels=3, r=2, target_modules=["intermediate.dense"])
    export([dense], other, names=["k"])
    edit_json(os.path.join(out, "base", BASE_MANIFEST), fingerprint_counts_heads=False)
    with pytest.raises(AdapterBaseMismatchError, match=r"export the adapter into this OUT with `edgepeft export"):
        Runtime(out, load_adapters=False).load_adapter(os.path.join(other, "adapters", "k"))


def test_a_head_made_at_load_takes_its_seed_and_leaves_the_callers_stream_alone(tiny_base):
    """A reproducibility hunt: load_base seeded torch's global generator for the head it makes and left it so: the
    caller's seed was lost (a sweep's seeds all got one LoRA initialisation in training.md's own loop, and every
    draw after an export() was the same whatever the caller had seeded). from_pretrained seeds nothing."""
    heads, base = [], tiny_base("bert")
    for caller in (1, 2):
        torch.manual_seed(caller)
        heads.append(load_base(base, "seq-cls", seed=7).classifier.weight.detach().clone())
        drawn = torch.rand(4)
        torch.manual_seed(caller)
        assert torch.equal(drawn, torch.rand(4)), caller  # the caller's stream, as if nothing was loaded
    assert torch.equal(*heads)  # the head: from seed=7 whatever the caller's


def test_base_given_refuses_an_adapter_trained_with_another_head_unless_it_carries_its_own(tiny_base, two_outs,
                                                                                            tmp_path):
    """--base: the check against each adapter's recorded base left out every head any adapter of the export
    saves, so B's plain adapter went onto A's lm_head when a head adapter came with it. An adapter that carries
    its own lm_head may move: the base's is never used with it."""
    root, base = two_outs[0], tiny_base("llama")
    with pytest.raises(AdapterBaseMismatchError, match=r"plain-b: was trained on .*whose weights differ from --base"):
        export([str(root / "head-a"), str(root / "plain-b")], str(tmp_path / "mixed"), base=base, names=["h", "p"])
    export([str(root / "head-b")], str(tmp_path / "carried"), base=base, names=["h"])


def test_base_given_loads_a_base_several_adapters_record_once(two_outs, tmp_path, monkeypatch):
    """--base: each adapter's recorded base is loaded to compare its weights; two adapters recording one folder
    load it once."""
    import shutil
    import sys

    resolve = sys.modules["edgepeft.exporters.resolve"]
    root, loads = two_outs[0], []
    real = resolve.load_base
    monkeypatch.setattr(resolve, "load_base",
                        lambda path, *a, **k: loads.append(os.path.realpath(path)) or real(path, *a, **k))
    copy = str(tmp_path / "same-weights")
    shutil.copytree(root / "base-other-head", copy)
    export([str(root / "head-b"), str(root / "plain-b")], str(tmp_path / "out"), base=copy, names=["h", "p"])
    assert loads.count(os.path.realpath(root / "base-other-head")) == 1, loads


def test_base_given_with_the_same_weights_and_another_config_names_the_keys(two_outs, tmp_path):
    """A config.json key that differs (here one transformers does not know) was called "weights differ"."""
    import shutil

    root = two_outs[0]
    copy = str(tmp_path / "same-weights")
    shutil.copytree(root / "base-other-head", copy)
    edit_json(os.path.join(copy, "config.json"), my_custom_key=1)
    with pytest.raises(AdapterBaseMismatchError, match=r"plain-b: was trained on .*base-other-head, whose config.json "
                       r"differs from --base .*same-weights's in my_custom_key \(the weights are the same\); make the "
                       r"two config.json files agree"):
        export([str(root / "plain-b")], str(tmp_path / "out"), base=copy)


def test_base_given_and_the_recorded_base_cannot_load_names_the_adapters_record(two_outs, tmp_path):
    """The recorded base's load error advised passing --base a complete model folder, which was given."""
    import shutil

    root = two_outs[0]
    recorded = str(tmp_path / "recorded")
    shutil.copytree(root / "base-other-head", recorded)
    adapter = lora_adapter(tmp_path / "adapter", recorded, "causal-lm", 2, r=2, target_modules=["q_proj"])
    lfs_pointer(os.path.join(recorded, "model.safetensors"))
    with pytest.raises(ArtifactNotFoundError, match=r"adapter: records the base .*recorded, which --base .* is compared "
                       r"with: .*recorded: cannot load the base model .* or pass base_model_name_or_path in "
                       r".*adapter's adapter_config.json a complete model folder"):
        export([adapter], str(tmp_path / "out"), base=str(root / "base-other-head"))


def test_base_given_holds_one_recorded_base_at_a_time(two_outs, tmp_path, monkeypatch):
    """Adapters recording several other folders: each recorded base is let go before the next loads (a cache of
    them held every one, float32, at once)."""
    import gc
    import shutil
    import sys
    import weakref

    resolve, root, alive = sys.modules["edgepeft.exporters.resolve"], two_outs[0], []
    real, held = resolve.load_base, []

    def load(path, *a, **k):
        gc.collect()
        held.append(sum(r() is not None for r in alive))
        model = real(path, *a, **k)
        alive.append(weakref.ref(model))
        return model

    dirs = []
    for n in ("one", "two"):
        shutil.copytree(root / "base-other-head", tmp_path / n)
        dirs.append(lora_adapter(tmp_path / f"adapter-{n}", str(tmp_path / n), "causal-lm", 2, r=2,
                                 target_modules=["q_proj"]))
    source = str(root / "base-other-head")
    model = real(source, "causal-lm")
    monkeypatch.setattr(resolve, "load_base", load)
    resolve._check_recorded_bases(resolve._read_sources(dirs, ["one", "two"], str(tmp_path / "out")), source, model,
                                  "causal-lm")
    assert held == [0, 0], held  # when "two" loads, "one" is gone


def test_a_copy_setting_another_num_labels_shares_the_base(tiny_base, tmp_path):
    """A made head is no base weight: a copy of the base whose config.json sets num_labels 1 (a reranker's,
    training.md) reuses OUT's base; the base alone was checked against this load's made head, 1 wide, not the 2
    wide one OUT's graph holds ("the export's output has shape [2, 2], PyTorch's [2, 1]"). Either order."""
    import shutil

    import peft

    from tiny import sample_batch, torch_outputs

    base, copy = tiny_base("bert"), str(tmp_path / "base-1label")
    shutil.copytree(base, copy)
    edit_json(os.path.join(copy, "config.json"), num_labels=1)
    pair = lora_adapter(tmp_path / "pair", base, "seq-cls", 1, r=2, target_modules=["query"])
    rerank = lora_adapter(tmp_path / "rerank", copy, "seq-cls", 2, r=2, target_modules=["query"])
    ids, mask = sample_batch()
    for order in ((pair, base, "pair"), (rerank, copy, "rerank")), ((rerank, copy, "rerank"), (pair, base, "pair")):
        out = str(tmp_path / f"out-{order[0][2]}")
        for i, (adapter, _, name) in enumerate(order):
            assert export([adapter], out, names=[name])["base"]["reused"] == (i == 1)
        rt = Runtime(out)
        for adapter, source, name in order:
            ref = peft.PeftModel.from_pretrained(load_base(source, "seq-cls"), adapter).eval()
            want = torch_outputs(ref, ids, mask, "logits")
            got = rt.forward(ids, mask, adapter=name)["logits"]
            assert got.shape == want.shape == (2, 1 if name == "rerank" else 2)
            assert abs(got - want).max() < 1e-4


def test_an_adapter_of_another_task_is_to_be_removed_or_served_by_its_export(shared_export, peft_adapter, tmp_path):
    """Found by a fixes hunt: a BERT adapter folder copied into a Llama export's OUT/adapters was to be "re-exported
    into this OUT" (inspect, Runtime(OUT), load_adapter, the JS runtime), which export refuses: another model."""
    import re
    import shutil

    from edgepeft.runtimes.describe import describe_export

    bert_out, bert_dirs, _ = shared_export("bert")
    name = sorted(bert_dirs)[0]
    out = str(shutil.copytree(shared_export("llama")[0], tmp_path / "out"))
    foreign = os.path.join(out, "adapters", "from_bert")
    shutil.copytree(os.path.join(bert_out, "adapters", name), foreign)
    other = r"it was made for a feature-extraction export \(of .*\), not this causal-lm one: load it on the export it " \
            r"was made for"
    with pytest.raises(AdapterBaseMismatchError, match=rf"; remove {re.escape(foreign)}: {other}$"):
        Runtime(out)
    assert any(re.search(rf"; remove {re.escape(foreign)}: {other}$", p) for p in describe_export(out)["problems"])
    with pytest.raises(AdapterBaseMismatchError, match=rf"; {other}$"):
        Runtime(shared_export("llama")[0]).load_adapter(os.path.join(bert_out, "adapters", name))
    export([peft_adapter("bert", "cls", task="seq-cls", num_labels=2)], str(tmp_path / "cls"), names=["cls"])
    with pytest.raises(AdapterBaseMismatchError, match=r"; it was made for a seq-cls export \(of .*\), not this "  # a review:
                                                       r"feature-extraction one: load it on the export it was made for$"):
        Runtime(bert_out).load_adapter(str(tmp_path / "cls" / "adapters" / "cls"))  # the same model, not "or copy it again"
    shutil.rmtree(foreign)  # made from another folder, for the same task: export takes it where that is this model
    moved = os.path.join(out, "adapters", "moved")
    shutil.copytree(os.path.join(out, "adapters", "qv"), moved)
    edit_json(os.path.join(moved, "adapter.json"), base_fingerprint="0" * 64, base_source="/elsewhere/llama")
    with open(os.path.join(out, "base", BASE_MANIFEST)) as f:
        source = json.load(f)["source"]
    with pytest.raises(AdapterBaseMismatchError, match=rf"; remove {re.escape(moved)}, or, where /elsewhere/llama is the "
                                                       rf"model of {re.escape(source)}, re-export its adapter into this OUT"):
        Runtime(out)
