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


def _exchanges() -> bool:
    """Whether the test's file system exchanges two folders in one step (not NFS, nor ZFS before 2.2)."""
    import tempfile

    from edgepeft.sharing import exchanged

    with tempfile.TemporaryDirectory() as d:
        os.mkdir(os.path.join(d, "a")), os.mkdir(os.path.join(d, "b"))
        return exchanged(os.path.join(d, "a"), os.path.join(d, "b"))


exchanges = pytest.mark.skipif(not _exchanges(), reason="the file system cannot exchange two folders in one step")


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


def _base_replaced_at(monkeypatch, module, name: str, out, other: str) -> list:
    """``module.name`` replaced by one that first renames ``other``'s base in as OUT's (once), as an export's commit
    does while a reader is at that step; the list it appends to when it does."""
    real, swapped = getattr(module, name), []

    def replacing(*args, **kwargs):
        if not swapped:
            swapped.append(os.rename(out / "base", out.parent / "replaced-base"))
            shutil.copytree(os.path.join(other, "base"), out / "base")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, replacing)
    return swapped


def test_a_base_replaced_while_a_runtime_opens_it_is_read_again_whole(two_merged, tmp_path, monkeypatch):
    """A Runtime opened while `export --merge --overwrite` renamed a new base in read the old manifest (its labels,
    its merged adapter's name) and ran the new graph, or a graph whose weights came from both, without an error."""
    from edgepeft.runtimes import runtime as runtime_module

    first, second = two_merged
    out = shutil.copytree(first, tmp_path / "out")
    swapped = _base_replaced_at(monkeypatch, runtime_module, "open_base_session", out, second)  # the manifest read
    rt = Runtime(str(out))
    assert swapped and rt.labels(None) == ["alarm", "timer"]
    assert rt.classify(TEXTS) == Runtime(second).classify(TEXTS)


@exchanges
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


@exchanges
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
    export running, and inspect said so too. They read the manifest the running export renames in next."""
    import numpy as np

    from edgepeft.runtimes.describe import describe_export

    out, ids = str(tmp_path / "out"), np.array([[1, 2, 3]])
    export([llama[1]["qv"]], out)
    import edgepeft.files as files

    real, real_exchanged, opened = os.replace, files.exchanged, []

    def open_now():
        try:
            opened.append(Runtime(out).forward(ids, adapter="qv")["logits"])
        except Exception as e:  # noqa: BLE001 (the test's finding, not the export's)
            opened.append(e)
        problems = describe_export(out)["problems"]  # inspect, as a deploy script runs it
        opened.append(problems or None)

    def replace(src, dst):  # the new base is in; qv's manifest for it is about to move in
        if dst == os.path.join(out, "adapters", "qv", "adapter.json"):
            open_now()
        return real(src, dst)

    def exchanged(staged, target):  # the moment the new base is exchanged in, before the old is renamed aside
        done = real_exchanged(staged, target)
        if os.path.basename(target) == "base":
            open_now()
        return done

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(files, "exchanged", exchanged)
    export([llama[1]["mlp"]], out)  # new slots: a new base, qv re-pointed to it
    monkeypatch.undo()
    assert len(opened) in (2, 4) and all(o is None for o in opened[1::2]), opened  # 2: no exchange here
    for logits in opened[::2]:
        np.testing.assert_allclose(logits, Runtime(out).forward(ids, adapter="qv")["logits"], atol=1e-6)


def test_an_adapter_replaced_while_it_loads_is_read_again_whole(llama, tmp_path, monkeypatch):
    """`export --overwrite` renamed a new adapter folder in between its manifest being read and its graph: "checksum
    does not match adapter.json (truncated or modified file); re-export the adapter", of a whole adapter."""
    from edgepeft.runtimes import adapter_source
    from edgepeft.runtimes.describe import describe_export

    out = str(tmp_path / "out")
    export([llama[1]["qv"]], out)
    export([llama[1]["all"]], str(tmp_path / "other"), names=["qv"])
    export([llama[1]["all"]], out, names=["all"])  # its slots in OUT's base
    real, swapped = adapter_source.check_adapter_graph, []

    def check(path, manifest, most, base=None):  # qv's manifest read: the other adapter renamed in now
        if not swapped and os.path.basename(path) == "qv":
            swapped.append(os.rename(path, tmp_path / f"old-qv-{len(os.listdir(tmp_path))}"))
            shutil.copytree(tmp_path / "other" / "adapters" / "qv", path)
        return real(path, manifest, most, base)

    monkeypatch.setattr(adapter_source, "check_adapter_graph", check)
    rt = Runtime(out, load_adapters=False)
    rt.load_adapter(os.path.join(out, "adapters", "qv"))
    assert swapped and rt.adapter_info("qv")["methods"] == Runtime(out).adapter_info("all")["methods"]
    swapped.clear()  # inspect reads it as a Runtime does: it said "checksum does not match", exit 1
    assert describe_export(out)["problems"] == [] and swapped


def test_inspect_while_an_export_replaces_the_base_describes_one_base(two_merged, tmp_path, monkeypatch):
    """`edgepeft inspect` while `export --merge --overwrite` renamed a new base in hashed the new files against the
    old manifest's digests: "not what the export wrote (damaged in a copy?)", exit 1 (a deploy script stopped). A
    manifest removed between being found and being read was "not valid JSON ([Errno 2] ...)"."""
    from edgepeft.errors import ArtifactNotFoundError
    from edgepeft.runtimes import access, describe

    first, second = two_merged
    out = shutil.copytree(first, tmp_path / "out")
    swapped = _base_replaced_at(monkeypatch, describe, "_damaged", out, second)  # the manifest read, the files hashed
    described = describe.describe_export(str(out))
    assert swapped and described["problems"] == []
    assert described["base"]["fingerprint"] == Runtime(second).manifest["fingerprint"] != Runtime(first).manifest["fingerprint"]
    monkeypatch.setattr(access, "present", lambda path, folder=False: True)  # found, then gone
    with pytest.raises(ArtifactNotFoundError, match="manifest not found"):
        access.read_json(str(tmp_path / "gone.json"), "manifest", "fix")


def test_reading_again_takes_any_error_of_a_changed_folder_and_exchanging_takes_any_path(tmp_path):
    """A review: an error other than a missing or damaged file (sess_options' "cannot load ... with the sess_options
    given") while the folder changed was not read again; exchanged() took no Path (ctypes' ArgumentError) and cut a
    path at a NUL, swapping another folder."""
    from pathlib import Path

    from edgepeft.errors import ConfigError
    from edgepeft.runtimes.access import unchanged_while
    from edgepeft.sharing import exchanged

    folder, tries = tmp_path / "base", []
    folder.mkdir()

    def read():
        tries.append(1)
        if len(tries) == 1:  # replaced while read
            os.rename(folder, tmp_path / "old")
            folder.mkdir()
            raise ConfigError("cannot load it with the sess_options given")
        return "whole"

    assert unchanged_while(str(folder), read) == "whole" and len(tries) == 2
    (tmp_path / "a").mkdir()
    assert not exchanged(str(tmp_path / "a") + "\0x", str(folder)) and (tmp_path / "a").is_dir()
    assert exchanged(Path(tmp_path / "a"), Path(folder)) is _exchanges()


def test_a_stray_labels_file_of_a_decoder_adapter_is_not_read(llama, tmp_path):
    """A review: labels.json, read with the weights since a08fdc6, was read for every task: another tool's file in a
    causal-LM adapter's folder stopped its export ("cannot read the label names"), where only classifiers have any."""
    adapter = shutil.copytree(llama[1]["qv"], tmp_path / "qv")
    (adapter / "labels.json").write_text("not labels")
    export([str(adapter)], str(tmp_path / "out"))


def test_an_out_holding_two_names_differing_in_case_takes_either_again(llama, tmp_path):
    """A review: an OUT an earlier edgepeft wrote with 'qv' and 'QV' refused --name qv --overwrite, naming 'QV'
    --overwrite, which was refused naming 'qv'."""
    out = tmp_path / "out"
    export([llama[1]["qv"]], str(out))
    shutil.copytree(out / "adapters" / "qv", out / "adapters" / "QV")
    export([llama[1]["qv"]], str(out), names=["qv"], overwrite=True)


def test_a_base_replaced_while_a_runtime_loads_its_adapters_is_opened_again_with_them(llama, tmp_path, monkeypatch):
    """A second concurrency hunt: Runtime(OUT) opened the base, then an export renamed a new one in and re-pointed
    the adapters to it before they were loaded: "re-exported since this Runtime opened it; open a new Runtime", of
    the Runtime being opened. The base and its adapters are read again together."""
    out, grown = tmp_path / "out", tmp_path / "grown"
    export([llama[1]["qv"]], str(out))
    shutil.copytree(out, grown)
    export([llama[1]["mlp"]], str(grown))  # new slots: a new base, qv re-pointed to it
    real, replaced = Runtime.load_adapter, []

    def load_adapter(self, source, name=None):  # the base opened: the grown export's renamed in now
        if not replaced:
            replaced.append(os.rename(out, tmp_path / "old-out"))
            shutil.copytree(grown, out)
        return real(self, source, name)

    monkeypatch.setattr(Runtime, "load_adapter", load_adapter)
    rt = Runtime(str(out))
    assert replaced and rt.adapter_names == ["mlp", "qv"]
