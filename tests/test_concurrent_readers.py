"""A runtime opened while an export replaces what it reads (found by a hunt of processes sharing OUT): it reads one
export whole, or says an export is running; never one export's manifest with another's graph or weights."""
from __future__ import annotations

import os
import shutil

import pytest

from error_contract import llama  # noqa: F401  (fixture)
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


def test_a_folder_is_replaced_with_no_moment_without_it(tmp_path, monkeypatch):
    """The old folder was renamed aside, then the new one in: a Runtime opened between the two found no base ("no
    exported base here; run export first"), or OUT without the adapter being replaced, and no error. Where the system
    can, the two are exchanged in one step (Linux, macOS); the old one then goes as before."""
    from edgepeft import files

    target, staged = tmp_path / "base", files.staging_dir(str(tmp_path), "base")
    target.mkdir()
    (target / "old").write_text("old")
    (tmp_path / staged / "new").write_text("new")
    real, seen = os.replace, []
    monkeypatch.setattr(os, "replace", lambda src, dst: (seen.append(target.is_dir()), real(src, dst)))
    files.replace_dir(staged, str(target))
    assert seen and all(seen) and os.listdir(target) == ["new"] and os.listdir(tmp_path) == ["base"]
    staged = files.staging_dir(str(tmp_path), "base")  # the old folder cannot be renamed aside: the new one is in
    (tmp_path / staged / "newer").write_text("newer")

    def refused(src, dst):
        if os.path.basename(dst).startswith(".old-"):
            raise OSError(5, "Input/output error", dst)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", refused)
    files.replace_dir(staged, str(target))
    assert os.listdir(target) == ["newer"] and os.listdir(tmp_path) == ["base"]


_KILLED_AFTER_THE_EXCHANGE = """
import os, signal, sys
import edgepeft.files as files
from edgepeft.exporters import export
out, adapter = sys.argv[1:]
real = files.exchanged
def exchanged(staged, target):  # kill -9 once the new adapter is in, before the old one is renamed aside
    done = real(staged, target)
    if os.path.basename(target) == "qv":
        os.kill(os.getpid(), signal.SIGKILL)
    return done
files.exchanged = exchanged
export([adapter], out, names=["qv"], overwrite=True)
"""


def test_an_export_killed_after_an_exchange_leaves_the_new_folder_and_the_next_removes_the_old(llama, tmp_path):
    import signal
    import subprocess
    import sys

    import numpy as np

    from file_checks import hidden_entries

    out, fresh = str(tmp_path / "out"), str(tmp_path / "fresh")
    export([llama[1]["qv"]], out)
    export([llama[1]["mlp"]], fresh, names=["qv"])
    killed = subprocess.run([sys.executable, "-c", _KILLED_AFTER_THE_EXCHANGE, out, llama[1]["mlp"]])
    assert killed.returncode == -signal.SIGKILL and hidden_entries(out)  # the old qv, where the new one was staged
    ids = np.array([[1, 2, 3]])
    want = Runtime(fresh).forward(ids, adapter="qv")["logits"]
    np.testing.assert_allclose(Runtime(out).forward(ids, adapter="qv")["logits"], want, atol=1e-5)
    export([llama[1]["all"]], out, names=["other"])
    assert not hidden_entries(out)
    np.testing.assert_allclose(Runtime(out).forward(ids, adapter="qv")["logits"], want, atol=1e-5)


def test_a_runtime_opened_while_an_export_re_points_the_adapters_loads_them(llama, tmp_path, monkeypatch):
    """Between a new base moving in and the adapters' manifests for it (renamed in one by one), a Runtime opened was
    told each adapter was "made for another base; an export into OUT was stopped ... run that export again", of an
    export running. It reads the manifest the running export renames in next."""
    import numpy as np

    out, ids = str(tmp_path / "out"), np.array([[1, 2, 3]])
    export([llama[1]["qv"]], out)
    real, opened = os.replace, []

    def replace(src, dst):  # the new base is in; qv's manifest for it is about to move in
        if dst == os.path.join(out, "adapters", "qv", "adapter.json") and not opened:
            try:
                opened.append(Runtime(out).forward(ids, adapter="qv")["logits"])
            except Exception as e:  # noqa: BLE001 (the test's finding, not the export's)
                opened.append(e)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    export([llama[1]["mlp"]], out)  # new slots: a new base, qv re-pointed to it
    monkeypatch.undo()
    assert len(opened) == 1 and isinstance(opened[0], np.ndarray), opened
    np.testing.assert_allclose(opened[0], Runtime(out).forward(ids, adapter="qv")["logits"], atol=1e-6)


def test_an_adapter_replaced_while_it_loads_is_read_again_whole(llama, tmp_path, monkeypatch):
    """`export --overwrite` renamed a new adapter folder in between its manifest being read and its graph: "checksum
    does not match adapter.json (truncated or modified file); re-export the adapter", of a whole adapter."""
    from edgepeft.runtimes import adapter_source

    out = str(tmp_path / "out")
    export([llama[1]["qv"]], out)
    export([llama[1]["all"]], str(tmp_path / "other"), names=["qv"])
    export([llama[1]["all"]], out, names=["all"])  # its slots in OUT's base
    real, swapped = adapter_source.check_adapter_graph, []

    def check(path, manifest, most):  # the manifest read: the other adapter renamed in now
        if not swapped:
            swapped.append(os.rename(path, tmp_path / "old-qv"))
            shutil.copytree(tmp_path / "other" / "adapters" / "qv", path)
        return real(path, manifest, most)

    monkeypatch.setattr(adapter_source, "check_adapter_graph", check)
    rt = Runtime(out, load_adapters=False)
    rt.load_adapter(os.path.join(out, "adapters", "qv"))
    assert swapped and rt.adapter_info("qv")["methods"] == Runtime(out).adapter_info("all")["methods"]


def test_inspect_while_an_export_replaces_the_base_describes_one_base(two_merged, tmp_path, monkeypatch):
    """`edgepeft inspect` while `export --merge --overwrite` renamed a new base in hashed the new files against the
    old manifest's digests: "not what the export wrote (damaged in a copy?)", exit 1 (a deploy script stopped). A
    manifest removed between being found and being read was "not valid JSON ([Errno 2] ...)"."""
    from edgepeft.errors import ArtifactNotFoundError
    from edgepeft.runtimes import access, describe

    first, second = two_merged
    out = shutil.copytree(first, tmp_path / "out")
    real, swapped = describe._damaged, []

    def damaged(base_dir, base):  # the manifest read: the other export's base renamed in now
        if not swapped:
            swapped.append(os.rename(out / "base", tmp_path / "old-base"))
            shutil.copytree(os.path.join(second, "base"), out / "base")
        return real(base_dir, base)

    monkeypatch.setattr(describe, "_damaged", damaged)
    described = describe.describe_export(str(out))
    assert swapped and described["problems"] == []
    assert described["base"]["fingerprint"] == Runtime(second).manifest["fingerprint"] != Runtime(first).manifest["fingerprint"]
    monkeypatch.setattr(access, "present", lambda path, folder=False: True)  # found, then gone
    with pytest.raises(ArtifactNotFoundError, match="manifest not found"):
        access.read_json(str(tmp_path / "gone.json"), "manifest", "fix")
