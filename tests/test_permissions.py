"""Files another user owns (an export copied as root, a service that runs as its own user): named as such, with the
fix that works, instead of "missing" (with "remove it if it is a stray folder"), "not valid JSON" or "damaged: download
it again".

Tests run as root here, whom no mode stops, so ``os.access`` answers as it would for another user; the unreadable
paths were checked by hand as uid 65534 (setpriv) too.
"""
from __future__ import annotations

import os
import shutil

import pytest

from file_checks import copy_adapter, tree_hashes
from edgepeft.errors import ConfigError, StorageError
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime

DENIED = "permission denied for this user"


@pytest.fixture
def deny(monkeypatch):
    """deny(path, ...): os.access says no for those paths, as for a user they are not readable to."""
    real = os.access
    denied = set()

    def access(path, mode, *args, **kwargs):
        return os.path.abspath(path) not in denied and real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    return lambda *paths: denied.update(os.path.abspath(str(p)) for p in paths)


@pytest.mark.parametrize("part", ["adapters/qv", "adapters", "base", "base/edgepeft.json", "adapters/qv/adapter.onnx"])
def test_an_export_another_user_owns_is_named_so(shared_export, tmp_path, deny, part):
    out = str(tmp_path / "out")
    shutil.copytree(shared_export("llama")[0], out)
    deny(os.path.join(out, part))
    with pytest.raises(StorageError) as e:
        rt = Runtime(out)
        rt.load_adapter(os.path.join(out, "adapters", "qv"), name="again")  # adapter.onnx is read when staged
    assert str(e.value).startswith(f"{os.path.join(out, part)}: {DENIED}")


def test_adapter_and_base_files_another_user_owns_are_named_at_export(shared_export, tiny_base, tmp_path, deny):
    adapter = copy_adapter(shared_export("llama")[1]["qv"], tmp_path / "qv")
    deny(os.path.join(adapter, "adapter_model.safetensors"))  # safetensors said "No such file": download it again
    with pytest.raises(StorageError, match=f"adapter_model.safetensors: {DENIED}"):
        export([adapter], str(tmp_path / "a"))
    base = str(tmp_path / "base")
    shutil.copytree(tiny_base("llama"), base)
    deny(os.path.join(base, "model.safetensors"))
    with pytest.raises(StorageError, match=f"model.safetensors: {DENIED}"):
        export([shared_export("llama")[1]["qv"]], str(tmp_path / "b"), base=base)
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_overwriting_an_adapter_folder_another_user_owns_is_refused_before_any_work(shared_export, tmp_path, deny):
    """Renamed aside, its files could not be removed: a hidden .old-qv-* copy stayed forever after "ok"."""
    out = str(tmp_path / "out")
    shutil.copytree(shared_export("llama")[0], out)
    before = tree_hashes(out)
    deny(os.path.join(out, "adapters", "qv"))
    with pytest.raises(ConfigError, match="adapters/qv: cannot replace it \\(permission denied"):
        export([shared_export("llama")[1]["qv"]], out, names=["qv"], overwrite=True)
    assert tree_hashes(out) == before
