"""A disk that fills up while exporting or training: one line naming the folder and the fix, nothing left half-written.

torch.onnx's, onnx's and ONNX Runtime's writers fail with an OSError naming no file ("error: No space left on
device" was all the CLI said), torch.save and ORT's adapter writer with a RuntimeError (a traceback). A tmpfs to fill
needs root, so the writers are made to fail here as a full disk makes them fail (checked by hand on a tmpfs).
"""
from __future__ import annotations

import errno
import os
import re
import shutil

import pytest

from file_checks import tree_hashes, write_lines
from training_helpers import cli_error, seq_cls_rows
from edgepeft.errors import StorageError

FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as onnx.save_model raises it: no file named


def test_a_full_disk_during_an_export_names_out_and_leaves_it_as_it_was(shared_export, tmp_path, monkeypatch, capsys):
    import onnx

    out, dirs, _ = shared_export("llama")
    copy = str(tmp_path / "out")
    shutil.copytree(out, copy)
    before = tree_hashes(copy)

    def full(*args, **kwargs):
        raise FULL

    monkeypatch.setattr(onnx, "save_model", full)  # the adapter graph's writer
    line = cli_error(capsys, "export", "--adapter", dirs["qv"], "--out", copy, "--name", "again")
    assert line == f"error: {copy}: no space left on its disk; free some, or give --out a folder on another disk"
    assert tree_hashes(copy) == before


def test_a_full_disk_elsewhere_is_named_there(tmp_path):
    from edgepeft.files import reporting_full_disk

    cache = str(tmp_path / "hub-cache" / "model.safetensors")  # not under OUT: OUT's disk is not the one to blame
    with pytest.raises(StorageError, match=f"^{cache}: no space left on its disk; free some$"):
        with reporting_full_disk(str(tmp_path / "out"), "--out"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), cache)


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(text_model, tmp_path, monkeypatch, capsys):
    """torch.save wrote the checkpoint itself: its RuntimeError ("unexpected pos") was a traceback."""
    from edgepeft.training import checkpoint

    real = checkpoint.write_bytes_atomic

    def full(path, data):
        if path.endswith(checkpoint.STATE):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(path, data)

    monkeypatch.setattr(checkpoint, "write_bytes_atomic", full)
    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows(8))
    out = str(tmp_path / "o")
    line = cli_error(capsys, "train", "--model", text_model("bert"), "--task", "seq-cls", "--data", data, "--out", out,
                     "--epochs", "1", "--quiet")
    assert line == f"error: {out}: no space left on its disk; free some, or give --out a folder on another disk"
    # a hunt: the adapter saved before it stayed, with no checkpoint; the same command (the fix) and --resume refused
    assert not os.path.exists(out)  # the run made OUT: nothing of it left
    keep = tmp_path / "mine"
    keep.mkdir()
    write_lines(keep / "notes.jsonl", [{"keep": 1}])  # an OUT that held a file: only what the run wrote goes
    cli_error(capsys, "train", "--model", text_model("bert"), "--task", "seq-cls", "--data", data, "--out", str(keep),
              "--epochs", "1", "--quiet")
    assert os.listdir(keep) == ["notes.jsonl"]
    monkeypatch.setattr(checkpoint, "write_bytes_atomic", real)  # space freed: the same command trains
    from edgepeft.cli import main

    main(["train", "--model", text_model("bert"), "--task", "seq-cls", "--data", str(data), "--out", out, "--epochs", "1",
          "--quiet"])
    assert os.path.isfile(os.path.join(out, "checkpoint", checkpoint.STATE))


@pytest.mark.parametrize("lacking", ["ENOSPC", "EDQUOT", "EFBIG", "free space"])
def test_ort_adapter_writes_that_fail_on_a_full_disk_say_so(shared_export, tmp_path, monkeypatch, lacking):
    """ONNX Runtime's adapter writer says "Failed to write N bytes" in a RuntimeError; where a file that large cannot
    be made there, that is a full disk or a spent quota (which leaves the disk's free space as it is)."""
    from edgepeft.exporters import ort_adapter

    graph = os.path.join(shared_export("llama")[0], "adapters", "qv", "adapter.onnx")
    taken = str(tmp_path / "a-folder")  # ORT cannot write a file where a folder is: its RuntimeError, room or not
    os.mkdir(taken)
    with pytest.raises(RuntimeError):
        ort_adapter.write_ort_adapter(graph, taken)
    code = errno.ENOSPC if lacking == "free space" else getattr(errno, lacking)
    if lacking == "free space":  # a platform without posix_fallocate
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    else:
        monkeypatch.setattr(os, "posix_fallocate", lambda fd, offset, size: (_ for _ in ()).throw(OSError(code, "")))
    with pytest.raises(OSError) as e:
        ort_adapter.write_ort_adapter(graph, taken)
    assert e.value.errno == code and e.value.filename == taken
    assert os.listdir(tmp_path) == ["a-folder"]  # the probe is gone


def test_a_full_disk_while_loading_is_not_blamed_on_out(shared_export, tmp_path, monkeypatch):
    """Loading the base may download it (the hub's cache, elsewhere): an OSError naming no file there is not OUT's
    (a bare OSError, which the Python API let through)."""
    import importlib

    export_module = importlib.import_module("edgepeft.exporters.export")  # the package's name is the function

    def loading(*args, **kwargs):
        raise FULL

    monkeypatch.setattr(export_module, "resolve", loading)
    with pytest.raises(StorageError, match="^no space left on a disk while loading the base model .*set HF_HOME"):
        export_module.export([shared_export("llama")[1]["qv"]], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_put_back_survives_a_run_that_fails_before_its_own(text_model, tmp_path, capsys):
    """A review: the take-back of a failed run's files (above) took a checkpoint the run had just put back (a run
    killed between its renames moves it aside) for its own, and removed it; the refusal named --resume."""
    import subprocess
    import sys

    from edgepeft.cli import main
    from edgepeft.runtimes.access import this_host

    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows(8))
    out = str(tmp_path / "o")
    argv = ["train", "--model", text_model("bert"), "--task", "seq-cls", "--data", data, "--out", out, "--epochs", "1",
            "--quiet"]
    main(argv)
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    os.replace(os.path.join(out, "checkpoint"), os.path.join(out, f".old-checkpoint-p{gone.pid}h{this_host()}-abc"))
    line = cli_error(capsys, *argv)  # put back, then refused: it holds a run's checkpoint
    assert "pass --resume" in line and os.path.isdir(os.path.join(out, "checkpoint"))


def test_a_file_past_the_file_size_limit_names_out_and_the_fix(shared_export, tmp_path):
    """Found by a hunt: a write past ulimit -f (or FAT32's 4 GiB, an SD card's) said "error: File too large; check
    the path, its permissions and free space", of no file, and an .onnx_adapter past it was ONNX Runtime's traceback."""
    import resource
    import subprocess
    import sys

    out, dirs, _ = shared_export("llama")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))  # noqa: E731
    done = subprocess.run([sys.executable, "-m", "edgepeft", "export", "--adapter", dirs["qv"], "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, preexec_fn=limit, timeout=600)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {tmp_path / 'out'}: ") and line.endswith(
        " is larger than its file system (FAT32: 4 GiB) or ulimit -f allows; give --out a folder on another file "
        "system, or raise the limit"), line
    assert not os.path.exists(tmp_path / "out")
    from edgepeft.files import reporting_full_disk  # past the limit elsewhere: the hub's cache, not OUT

    cache = str(tmp_path / "hub" / "blob")
    with pytest.raises(StorageError, match=f"^{re.escape(cache)}: a file larger than its file system .*; raise the "
                                           "limit$"):
        with reporting_full_disk(str(tmp_path / "out"), "--out", loading=True):
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), cache)


def test_an_overwrite_run_failing_before_its_checkpoint_leaves_no_mix_of_two_runs(text_model, tmp_path, monkeypatch,
                                                                                   capsys):
    """Found by a hunt: train --overwrite that failed before its first checkpoint (a full disk, a file-size limit)
    left its epoch-1 adapter and log beside the earlier run's checkpoint (the earlier adapter replaced without a
    word; export then took the failed run's). The earlier run's files go at the first save: neither run's is left."""
    from edgepeft.cli import main
    from edgepeft.training import checkpoint

    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows(8))
    out = tmp_path / "o"
    argv = ["train", "--model", text_model("bert"), "--task", "seq-cls", "--data", data, "--out", str(out), "--epochs",
            "1", "--quiet"]
    main([*argv, "--r", "4"])
    write_lines(out / "notes.jsonl", [{"keep": 1}])  # the user's own: stays
    real = checkpoint.write_bytes_atomic
    monkeypatch.setattr(checkpoint, "write_bytes_atomic", lambda path, data: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)) if path.endswith(checkpoint.STATE) else real(path, data))
    line = cli_error(capsys, *argv, "--r", "2", "--overwrite")
    assert line.startswith(f"error: {out}: no space left on its disk")
    assert sorted(os.listdir(out)) == ["notes.jsonl"]  # not r 2's adapter beside r 4's checkpoint


def test_a_checkpoint_aside_from_another_container_is_named_with_the_mv_not_overwrite(text_model, tmp_path, capsys):
    """Found by a hunt: a run killed in a container (or before a reboot) between its checkpoint's renames left it aside;
    --resume then said "start over with --overwrite", which discards the saved epochs."""
    import shlex

    from edgepeft.cli import main

    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows(8))
    out = str(tmp_path / "o")
    argv = ["train", "--model", text_model("bert"), "--task", "seq-cls", "--data", data, "--out", out, "--epochs", "1",
            "--quiet"]
    main(argv)
    aside = os.path.join(out, ".old-checkpoint-p1h0123abcd-x1")
    os.replace(os.path.join(out, "checkpoint"), aside)
    line = cli_error(capsys, *argv, "--resume")
    assert f"no checkpoint to resume from; {aside} holds it" in line and "--overwrite" not in line
    os.replace(*shlex.split(line.split("`")[1])[1:])
    assert os.path.isdir(os.path.join(out, "checkpoint"))


@pytest.mark.parametrize("tmp_disk", ["small", "out's"])
def test_a_full_temp_folder_during_int8_quantization_is_named_not_out(shared_export, tmp_path, monkeypatch, capsys,
                                                                     tmp_disk):
    """ONNX Runtime's int8 quantizer saves a copy of the float base in TMPDIR (a small tmpfs on many devices): its
    full disk was blamed on OUT ("give --out a folder on another disk", which fails for every OUT). Where TMPDIR is
    on OUT's disk, OUT's message stands."""
    import onnx

    from edgepeft.exporters import quantize

    _, dirs, _ = shared_export("llama")
    real, temp = onnx.save_model, os.path.realpath(quantize.tempfile.gettempdir())

    def save(model, path, *args, **kwargs):
        if "ort.quant." in str(path):  # the quantizer's copy, as a full tmpfs fails it
            raise FULL
        return real(model, path, *args, **kwargs)

    monkeypatch.setattr(onnx, "save_model", save)
    room = quantize.disk_room
    monkeypatch.setattr(quantize, "disk_room", lambda folder: (-1, 4096) if tmp_disk == "small" and
                        os.path.realpath(folder) == temp else room(folder))
    out = str(tmp_path / "out")
    line = cli_error(capsys, "export", "--adapter", dirs["qv"], "--out", out, "--quantize", "int8")
    if tmp_disk == "small":
        assert re.fullmatch(rf"error: {re.escape(temp)}: no room for the copy of the float base \([\d.]+ MiB, 0\.0 MiB "
                            r"free\) that ONNX Runtime's int8 quantizer writes to the temp folder; free some, or set "
                            r"TMPDIR to a folder on a disk with room", line), line
    else:
        assert line == f"error: {out}: no space left on its disk; free some, or give --out a folder on another disk"
    assert not os.path.exists(out)
