"""Exports an earlier edgepeft wrote (a hunt across versions): a manifest without a record the runtimes now read is
named, with the fix, where reading it as a default would answer otherwise than the model (generate without the
model's generation_config.json, a multi-label classifier scored by softmax, embeddings pooled by the mean)."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from file_checks import edited_json
from peft_refs import lora_adapter

from edgepeft.errors import ConfigError
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime


def _older(out, field) -> str:
    with edited_json(os.path.join(out, "base", "edgepeft.json")) as data:
        del data[field]  # as that edgepeft wrote it
    return f"^{os.path.join(out, 'base')}: was written by an earlier edgepeft, whose manifest records no {field} \\(.*\\); " \
           "export every adapter into a fresh --out folder$"


def test_an_export_without_a_record_the_call_reads_is_named_not_read_as_a_default(shared_export, text_model, tmp_path):
    out = shutil.copytree(shared_export("llama")[0], tmp_path / "gen")
    said = _older(out, "generation")
    rt = Runtime(str(out))
    ids = np.array([[5, 6, 7]])
    assert rt.forward(ids)["logits"].shape[-1] == 128  # what needs no such record still runs
    for call in (lambda: rt.generate(ids, max_new_tokens=2), lambda: next(rt.stream(ids, max_new_tokens=2))):
        with pytest.raises(ConfigError, match=said):
            call()
    for task, field, call in (("seq-cls", "problem_type", lambda rt: rt.classify("w10 w20")),
                              ("feature-extraction", "problem_type", lambda rt: rt.embed("w10 w20"))):
        out = str(tmp_path / task)
        export([lora_adapter(tmp_path / f"{task}-a", text_model("bert"), task, 3, r=2, target_modules=["query"],
                             **({"num_labels": 2} if task == "seq-cls" else {}))], out, names=["a"])
        call(Runtime(out))  # as exported now
        said = _older(out, field)
        with pytest.raises(ConfigError, match=said):
            call(Runtime(out))
    from edgepeft.runtimes.describe import describe_export  # inspect names each as a problem (it exits 1)

    for out in (tmp_path / "gen", tmp_path / "seq-cls", tmp_path / "feature-extraction"):
        assert [p for p in describe_export(str(out))["problems"] if "was written by an earlier edgepeft" in p], out


def test_the_text_pair_fix_for_an_earlier_export_is_one_that_works():
    """A hunt across versions: "export an adapter into it again" was the first fix for a BERT classifier of an earlier
    edgepeft (format 2, or no generation record), which export then refused: only a fresh --out folder works."""
    from edgepeft.runtimes.commands import pairs_fix

    fresh = "export every adapter into a fresh --out folder (an earlier edgepeft's export takes no new adapter)"
    assert pairs_fix({"format_version": 2, "generation": {}}) == pairs_fix({"format_version": 3}) == fresh
    for version in (3, 4):  # export adds to both (4: a base with token types, 3: without, written again with them)
        assert pairs_fix({"format_version": version, "generation": {}}).startswith("export an adapter into it again")
