"""Files another user owns (an export copied as root, a service that runs as its own user): named as such, with the
fix that works, instead of "missing" (with "remove it if it is a stray folder"), "not valid JSON" or "damaged: download
it again".

The files are made unreadable with chmod 000, which stops their owner too. Root reads them anyway, so as root the
calls run as another user (os.seteuid), in a world-readable scratch folder, with the modules they use loaded first.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import tempfile
from contextlib import contextmanager

import pytest

from file_checks import tree_hashes
from edgepeft.errors import StorageError
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime

DENIED = "permission denied for this user"
pytestmark = pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")


@contextmanager
def as_another_user():
    """Root: run the block as uid/gid 65534 (file access follows the effective ids); others: as they are."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def scratch():
    """A folder every user may enter and write to (tmp_path lies under a folder only its owner may enter)."""
    folder = tempfile.mkdtemp(prefix="edgepeft-perm-")
    os.chmod(folder, 0o777)
    yield folder
    for root, dirs, files in os.walk(folder):  # chmod 000 folders: removable again
        for d in dirs:
            os.chmod(os.path.join(root, d), stat.S_IRWXU)
    shutil.rmtree(folder)


def _lock(path: str) -> None:
    os.chmod(path, 0)


def _copy(src: str, dst: str) -> str:
    """A copy every user may read (transformers writes model.safetensors 0600)."""
    shutil.copytree(src, dst)
    for root, dirs, files in os.walk(dst):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    return dst


@pytest.mark.parametrize("part", ["", "adapters/qv", "adapters", "base", "base/edgepeft.json", "adapters/qv/adapter.onnx",
                                  "linked data"])
def test_an_export_another_user_owns_is_named_so(shared_export, scratch, part):
    """OUT itself: "no exported base here; run edgepeft export"; its weights linked into a folder the user may not
    enter: "missing"."""
    out = _copy(shared_export("llama")[0], os.path.join(scratch, "out"))
    Runtime(out).load_adapter(os.path.join(out, "adapters", "qv"), name="again")  # the modules it uses, loaded
    if part == "linked data":
        part = "private"
        os.mkdir(os.path.join(scratch, part))
        data = os.path.join(out, "base", "model.onnx.data")
        os.replace(data, os.path.join(scratch, part, "model.onnx.data"))
        os.symlink(os.path.join(scratch, part, "model.onnx.data"), data)
        locked = os.path.join(scratch, part)
    else:
        locked = os.path.normpath(os.path.join(out, part))
    _lock(locked)
    with as_another_user(), pytest.raises(StorageError) as e:
        rt = Runtime(out)
        rt.load_adapter(os.path.join(out, "adapters", "qv"), name="again")  # adapter.onnx is read when staged
    assert str(e.value).startswith(f"{locked}: {DENIED}")


def test_adapter_and_base_files_another_user_owns_are_named_at_export(shared_export, tiny_base, scratch):
    adapter = _copy(shared_export("llama")[1]["qv"], os.path.join(scratch, "qv"))
    base = _copy(tiny_base("llama"), os.path.join(scratch, "base"))
    export([adapter], os.path.join(scratch, "first"), base=base)  # the modules it uses, loaded
    _lock(os.path.join(adapter, "adapter_model.safetensors"))  # safetensors said "No such file": download it again
    with as_another_user(), pytest.raises(StorageError, match=f"adapter_model.safetensors: {DENIED}"):
        export([adapter], os.path.join(scratch, "a"), base=base)
    os.chmod(os.path.join(adapter, "adapter_model.safetensors"), 0o644)
    _lock(os.path.join(base, "model.safetensors"))
    with as_another_user(), pytest.raises(StorageError, match=f"model.safetensors: {DENIED}"):
        export([adapter], os.path.join(scratch, "b"), base=base)
    assert not os.path.exists(os.path.join(scratch, "a")) and not os.path.exists(os.path.join(scratch, "b"))


def test_a_base_folder_one_may_enter_but_not_list_is_named_and_other_files_are_not_blamed(tiny_base, scratch):
    """transformers lists the folder: os.listdir's PermissionError came out as a traceback; a locked file transformers
    never reads (a trainer's log) was blamed for damaged weights."""
    from edgepeft.errors import ArtifactNotFoundError
    from edgepeft.models import load_base

    base = _copy(tiny_base("llama"), os.path.join(scratch, "base"))
    with open(os.path.join(base, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    with open(os.path.join(base, "trainer_state.json"), "w") as f:
        f.write("{}")
    _lock(os.path.join(base, "trainer_state.json"))
    load_base(tiny_base("llama"), "causal-lm")  # the modules it uses, loaded
    with as_another_user(), pytest.raises(ArtifactNotFoundError, match="cannot load the base model"):
        load_base(base, "causal-lm")
    os.chmod(base, 0o711)
    with as_another_user(), pytest.raises(StorageError, match=f"base: {DENIED}"):
        load_base(base, "causal-lm")


def test_overwriting_an_adapter_folder_another_user_owns_is_refused_before_any_work(shared_export, tiny_base, scratch):
    """Renamed aside, its files could not be removed: a hidden .old-qv-* copy stayed forever after "ok"."""
    out = _copy(shared_export("llama")[0], os.path.join(scratch, "out"))
    qv = os.path.join(out, "adapters", "qv")
    adapter = _copy(shared_export("llama")[1]["qv"], os.path.join(scratch, "qv"))
    base = _copy(tiny_base("llama"), os.path.join(scratch, "base"))
    if os.geteuid() == 0:  # OUT is the other user's, but for adapters/qv
        for root, dirs, files in os.walk(out):
            for name in [root, *(os.path.join(root, f) for f in files)]:
                os.chown(name, 65534, 65534)
        os.chown(qv, 0, 0)
    else:
        os.chmod(qv, 0o555)  # its files cannot be removed
    before = tree_hashes(out)
    with as_another_user(), pytest.raises(StorageError, match="adapters/qv: cannot replace it \\(permission denied"):
        export([adapter], out, base=base, names=["qv"], overwrite=True)
    assert tree_hashes(out) == before


@pytest.mark.parametrize("part", ["base/model.onnx", "base/model.onnx.data", "adapters"])
def test_inspect_names_a_base_file_it_may_not_read(shared_export, scratch, part):
    """Its sizes were right, so `edgepeft inspect` said nothing and exited 0 where Runtime(OUT) refuses to open. A hunt:
    adapters/ it may not list was "Permission denied; check the path, its permissions and free space"."""
    from click.testing import CliRunner

    from edgepeft.cli import cli

    out = _copy(shared_export("llama")[0], os.path.join(scratch, "out"))
    assert CliRunner().invoke(cli, ["inspect", out]).exit_code == 0  # the modules it uses, loaded
    _lock(os.path.join(out, part))
    with as_another_user():
        result = CliRunner().invoke(cli, ["inspect", out])
    assert f"{os.path.join(out, part)}: {DENIED}" in str(result.exception)  # main() prints it as one line, exit 1


@pytest.mark.parametrize("leads", ["nowhere", "to itself"])
def test_a_link_to_nothing_in_out_adapters_is_named_not_left_out(shared_export, tmp_path, leads):
    """A paths hunt: OUT/adapters/ghost, a link to a disk not mounted: Runtime(OUT) and inspect left it out unsaid, the
    JS runtime's fix (export --name ghost --overwrite) failed after all its work naming its own staging folder, and an
    export making OUT a new base called it a stray folder to remove."""
    from edgepeft.errors import ArtifactNotFoundError, ConfigError
    from edgepeft.runtimes.describe import describe_export

    out = shutil.copytree(shared_export("bert")[0], tmp_path / "out")
    adapter = next(iter(shared_export("bert")[1].values()))
    ghost = os.path.join(out, "adapters", "ghost")
    os.symlink(tmp_path / "not-mounted" if leads == "nowhere" else ghost, ghost)
    said = f"{ghost}: is a link to {os.readlink(ghost)}, which " + (
        "does not exist; create or mount it, or remove the link" if leads == "nowhere" else
        "leads back to itself (a loop of links); remove the link, or make it lead to a folder")  # the JS runtime's words
    with pytest.raises(ArtifactNotFoundError) as e:
        Runtime(str(out))
    assert str(e.value) == said and describe_export(str(out))["problems"] == [said]
    before = tree_hashes(out / "base"), sorted(os.listdir(out / "adapters"))
    with pytest.raises(ConfigError) as e:
        export([adapter], str(out), names=["ghost"], overwrite=True)
    assert str(e.value) == said + ", or pass --name (e.g. --name ghost_2)"
    assert (tree_hashes(out / "base"), sorted(os.listdir(out / "adapters"))) == before
    os.unlink(ghost)
    export([adapter], str(out), names=["ghost"])
    assert "ghost" in Runtime(str(out)).adapter_names
    for link in (os.path.join(out, "adapters"), str(out)):  # OUT/adapters, or OUT itself, so: its adapters were left
        shutil.rmtree(os.path.realpath(link))  # out unsaid, or "run export first", which fails
        os.symlink(tmp_path / "not-mounted" if leads == "nowhere" else link, link)
        said = f"{link}: is a link to {os.readlink(link)}, which " + said.split(", which ", 1)[1]
        with pytest.raises(ArtifactNotFoundError, match=re.escape(said) + "$"):
            Runtime(str(out))


def test_a_weights_file_linked_out_of_the_base_folder_is_named_with_a_fix_that_works(shared_export, tmp_path):
    """An ORT-deployment hunt: base/model.onnx.data a link to a file elsewhere (weights shared by two copies, a DVC or
    git-annex checkout), which ONNX Runtime 1.24+ does not read: Runtime called the copy damaged, to be copied again
    (`cp -r` keeps the link), and inspect passed it. A Hugging Face cache's layout (both files links into one blobs/
    folder) opens."""
    import subprocess

    import numpy as np
    from click.testing import CliRunner

    from edgepeft.cli import cli

    out = shutil.copytree(shared_export("llama")[0], tmp_path / "out")
    data, store = out / "base" / "model.onnx.data", tmp_path / "store"
    want = Runtime(str(out)).forward(np.array([[5, 6, 7]]))["logits"]
    os.makedirs(store)
    shutil.move(data, store / "model.onnx.data")
    os.symlink(store / "model.onnx.data", data)
    with pytest.raises(StorageError) as e:
        Runtime(str(out))
    said = str(e.value)
    assert said.startswith(f"{data}: is a link to {store / 'model.onnx.data'}, outside the graph's folder"), said
    result = CliRunner().invoke(cli, ["inspect", str(out)])
    assert result.exit_code == 1 and said in str(result.exception)
    subprocess.run(said.split("; put the file in its place: ")[1], shell=True, check=True)  # as written
    assert not os.path.islink(data) and CliRunner().invoke(cli, ["inspect", str(out)]).exit_code == 0
    np.testing.assert_array_equal(Runtime(str(out)).forward(np.array([[5, 6, 7]]))["logits"], want)
    blobs, graph = tmp_path / "blobs", out / "base" / "model.onnx"
    os.makedirs(blobs)
    for f, blob in ((graph, "9f4b"), (data, "b879")):  # the hub cache's snapshot: links into blobs/, by hash
        shutil.move(f, blobs / blob)
        os.symlink(blobs / blob, f)
    np.testing.assert_array_equal(Runtime(str(out)).forward(np.array([[5, 6, 7]]))["logits"], want)
    assert CliRunner().invoke(cli, ["inspect", str(out)]).exit_code == 0


def _may_mount() -> bool:
    import subprocess

    return os.geteuid() == 0 and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not hasattr(os, "geteuid") or not _may_mount(), reason="bind mounts: root in a mount namespace")
def test_a_mount_point_an_export_would_replace_is_refused_before_the_trace(peft_adapter, tmp_path):
    """A faults hunt: OUT/base a mount point (a container's volume): an export needing a new base traced and validated,
    then failed at its rename, "Device or resource busy; check the path, its permissions and free space". Refused now
    before the trace, naming the mount point and a fix that works; a bind mount of the same file system too (which
    os.path.ismount does not see), and an adapter's folder that --overwrite would replace."""
    import subprocess
    import sys

    from peft_refs import spec_adapter

    out = str(tmp_path / "out")
    qv, mlp = (spec_adapter(peft_adapter, "llama", name) for name in ("qv", "mlp"))
    export([qv], out)
    before = tree_hashes(out)
    cli = f"{shlex.quote(sys.executable)} -m edgepeft export --out {shlex.quote(out)} --adapter"
    for folder, args, fix in ((os.path.join(out, "base"), shlex.quote(mlp), "or export into another --out"),
                              (os.path.join(out, "adapters", "qv"), f"{shlex.quote(qv)} --overwrite",
                               "or export this one under another --name")):
        done = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {shlex.quote(folder)} {shlex.quote(folder)}"
                               f" && {cli} {args}"], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.splitlines()[-1] == (f"error: {folder}: is a mount point, which an export cannot replace (it "
                                                f"renames the new folder into its place); mount {out} itself"
                                                f"{' (the folder holding base/ and adapters/)' * folder.endswith('base')}"
                                                f", {fix}"), done.stderr
        assert "validated" not in done.stdout + done.stderr  # before the trace
    assert tree_hashes(out) == before


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="Linux's /proc")
def test_a_link_to_a_mount_point_is_no_mount_point_the_export_cannot_replace(tmp_path):
    """A review: OUT/base a link to a mount point was refused, though the swap renames the link, not the mount."""
    from edgepeft.sharing import mount_point

    os.symlink("/proc", tmp_path / "base")
    assert mount_point("/proc") and not mount_point(str(tmp_path / "base")) and not mount_point(str(tmp_path))
