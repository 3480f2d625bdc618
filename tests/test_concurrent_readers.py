"""A runtime opened while an export replaces what it reads (found by a hunt of processes sharing OUT): it reads one
export whole, or says an export is running; never one export's manifest with another's graph or weights."""
from __future__ import annotations

import os
import shutil

import pytest

from peft_refs import bert_lora_classifier

from edgepeft.exporters import export
from edgepeft.runtimes import Runtime

TEXTS = ["w1 w2 w3", "w7 w3"]


@pytest.fixture(scope="module")
def two_merged(text_model, tmp_path_factory):
    """Two --merge exports of classifiers on one tiny BERT, other labels and weights, the same file sizes."""
    outs = []
    for seed, labels in ((3, {0: "neg", 1: "pos"}), (5, {0: "alarm", 1: "timer"})):
        root = tmp_path_factory.mktemp(f"merged{seed}")
        _, adapter, _ = bert_lora_classifier(text_model("bert"), root, labels, seed=seed)
        export([adapter], str(root / "out"), names=["c"], merge=True)
        outs.append(str(root / "out"))
    return outs


def test_a_base_replaced_while_a_runtime_opens_it_is_read_again_whole(two_merged, tmp_path, monkeypatch):
    """A Runtime opened while `export --merge --overwrite` renamed a new base in read the old manifest (its labels,
    its merged adapter's name) and ran the new graph, or a graph whose weights came from both, without an error."""
    from edgepeft.runtimes import runtime as runtime_module

    first, second = two_merged
    out = shutil.copytree(first, tmp_path / "out")
    real, swapped = runtime_module.open_base_session, []

    def open_session(graph, *args):  # the manifest read: the other export's base renamed in now
        if not swapped:
            swapped.append(os.rename(out / "base", tmp_path / "old-base"))
            shutil.copytree(os.path.join(second, "base"), out / "base")
        return real(graph, *args)

    monkeypatch.setattr(runtime_module, "open_base_session", open_session)
    rt = Runtime(str(out))
    assert swapped and rt.labels(None) == ["alarm", "timer"]
    assert rt.classify(TEXTS) == Runtime(second).classify(TEXTS)
