"""What an interrupted export leaves, found by bug hunts: a Ctrl-C during the commit is held off until OUT is whole
(the base, the adapters re-pointed to it, the new adapters; the folders they replace removed last) and raised then,
saying so; a folder a killed export moved aside is put back by the next export, whatever stands in its place; a
damaged adapter is replaced and a damaged base named with the fix that works."""
from __future__ import annotations

import json
import re
import os
import signal

import pytest

from error_contract import llama  # noqa: F401  (fixture)
from file_checks import hidden_entries

from edgepeft.exporters import export
from edgepeft.runtimes import Runtime


def test_ctrl_c_during_the_commit_leaves_a_base_that_its_adapters_fit(llama, tmp_path, monkeypatch, two_renames,
                                                                     sigint_raises, capsys):
    """SIGINT between the new base's rename and its adapters' new manifests left every adapter of OUT 'made for
    another base', and a second export did not mend it (the base was then reused). The commit now finishes first."""
    from edgepeft.cli import main

    out = str(tmp_path / "out")
    export([llama[1]["qv"]], out)
    slots_before = len(Runtime(out, load_adapters=False).manifest["slots"])
    real, sent = os.replace, []

    def replace(src, dst):
        if os.path.basename(dst) == "base" and not sent:  # Ctrl-C just as the new base moves in
            sent.append(dst)
            signal.raise_signal(signal.SIGINT)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SystemExit) as e:  # the command line says what was written
        main(["export", "--adapter", llama[1]["mlp"], "--out", out])
    assert e.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1] == f"interrupted once {out} was written whole (Ctrl-C waits for that)"
    monkeypatch.setattr(os, "replace", real)
    assert sent
    rt = Runtime(out)  # every adapter of OUT fits the base OUT holds
    assert rt.adapter_names == ["mlp", "qv"] and len(rt.manifest["slots"]) > slots_before  # the new base, mlp's slots in
    assert not hidden_entries(out)


def test_a_commit_holds_ctrl_c_off_and_removes_what_it_replaced_last(llama, tmp_path, monkeypatch, sigint_raises, two_renames):
    """Found by a hunt: the old base was removed (seconds, for a large one) before the adapters already in OUT were
    re-pointed to the new one, and a Runtime opened meanwhile was told an export 'was stopped'; a Ctrl-C between
    two adapters' renames said "aborted" with one replaced and the other not, or left a hidden copy of the old."""
    import edgepeft.files as files

    out = str(tmp_path / "out")
    export([llama[1]["qv"]], out)
    seen, real_remove = [], files._remove

    def remove(path):
        if os.path.basename(path).startswith(".old-base-"):  # each adapter in OUT then points at the new base
            with open(os.path.join(out, "base", "edgepeft.json")) as f:
                new = json.load(f)["fingerprint"]
            with open(os.path.join(out, "adapters", "qv", "adapter.json")) as f:
                seen.append(json.load(f)["base_fingerprint"] == new)
        return real_remove(path)

    monkeypatch.setattr(files, "_remove", remove)
    export([llama[1]["mlp"]], out)  # new slots: a new base, qv re-pointed
    assert seen == [True]
    before = {n: os.stat(os.path.join(out, "adapters", n)).st_ino for n in ("qv", "mlp")}
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == "qv" and os.path.basename(os.path.dirname(dst)) == "adapters":
            signal.raise_signal(signal.SIGINT)  # Ctrl-C as the first adapter moves in
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt, match=f"^interrupted once {out} was written whole"):
        export([llama[1]["qv"], llama[1]["mlp"]], out, overwrite=True)  # the base is reused
    assert all(os.stat(os.path.join(out, "adapters", n)).st_ino != before[n] for n in before)  # both replaced
    assert hidden_entries(out) == []


def test_ctrl_c_as_a_merged_export_moves_in_says_it_is_whole(llama, tmp_path, monkeypatch, sigint_raises):
    """Found by a review: a merged export's Ctrl-C came as a bare KeyboardInterrupt ("aborted") with OUT written."""
    out, real = str(tmp_path / "merged"), os.replace

    def replace(src, dst):
        if os.path.basename(dst) == "base":
            signal.raise_signal(signal.SIGINT)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt, match=f"^interrupted once {out} was written whole"):
        export([llama[1]["qv"]], out, merge=True)
    monkeypatch.setattr(os, "replace", real)
    assert Runtime(out).manifest["merged_adapter"] == "qv" and hidden_entries(out) == []


def test_an_adapter_moved_aside_with_a_link_to_nothing_in_its_place_is_named_and_put_back(tmp_path):
    """inspect and the next export read "nothing took its place" alike: a link to nothing there was fine to inspect
    (os.path.lexists), and the export's os.replace of the folder onto the link stopped with NotADirectoryError."""
    import subprocess

    from edgepeft.files import remove_abandoned
    from edgepeft.runtimes.access import this_host
    from edgepeft.runtimes.describe import _moved_aside

    done = subprocess.Popen(["true"])
    done.wait()  # a process of this host that no longer runs
    adapters = tmp_path / "out" / "adapters"
    aside = adapters / f".old-qv-p{done.pid}h{this_host()}-abc"
    aside.mkdir(parents=True)
    (aside / "adapter.json").write_text("{}")
    os.symlink(tmp_path / "gone", adapters / "qv")
    assert [line.split(":")[0] for line in _moved_aside(str(tmp_path / "out"))] == [str(aside)]
    assert remove_abandoned(str(adapters)) == [f"put {adapters / 'qv'} back (an export was stopped while replacing it)"]
    assert os.listdir(adapters) == ["qv"] and (adapters / "qv" / "adapter.json").read_text() == "{}"
    from edgepeft.runtimes.access import left_by_a_stopped_process  # a pid no process has (os.kill's OverflowError)
    assert left_by_a_stopped_process(f".old-x-p99999999999h{this_host()}-y") is None


def test_overwriting_an_adapter_whose_manifest_is_damaged_goes_through_on_a_new_base(llama, tmp_path):
    """A hunt: with OUT's qv/adapter.json damaged, --overwrite of qv by an adapter needing a new base read every
    adapter's manifest to re-point it, qv's too, and was refused naming the command that had just failed."""
    import numpy as np

    from tiny import sample_batch

    out = str(tmp_path / "out")
    export([llama[1]["qv"]], out)
    with open(os.path.join(out, "adapters", "qv", "adapter.json"), "w") as f:
        f.write("{bad")
    export([llama[1]["mlp"]], out, names=["qv"], overwrite=True)  # mlp's slots: the base is written again
    want = Runtime(llama[0])
    ids, mask = sample_batch()
    np.testing.assert_allclose(Runtime(out).forward(ids, mask, adapter="qv")["logits"],
                               want.forward(ids, mask, adapter="mlp")["logits"], rtol=0, atol=1e-5)


def test_a_base_graph_gone_names_a_fresh_out_folder(llama, tmp_path):
    """A hunt: "base graph missing; re-run `edgepeft export`", which into that OUT fails alike, every time."""
    from edgepeft.errors import ArtifactNotFoundError

    out = str(tmp_path / "out")
    export([llama[1]["qv"]], out)
    os.unlink(os.path.join(out, "base", "model.onnx"))
    for attempt in (lambda: Runtime(out), lambda: export([llama[1]["mlp"]], out)):
        with pytest.raises(ArtifactNotFoundError, match=r"model.onnx: base graph missing; copy the export's base folder again, or re-run `edgepeft export` into "
                                                        "a fresh --out folder$"):
            attempt()
    export([llama[1]["qv"]], str(tmp_path / "fresh"))
    assert Runtime(str(tmp_path / "fresh")).adapter_names == ["qv"]


def test_a_ctrl_c_held_off_through_a_commit_goes_to_the_handler_the_process_had():
    """Found by a hunt: an export run with SIGINT ignored (a background job) exited 130 "interrupted" for a Ctrl-C
    in its commit, and an app's own SIGINT handler never heard one there: export raised KeyboardInterrupt instead.
    Python's default handler still gets the line saying OUT was written whole."""
    from edgepeft.interrupts import written_whole

    heard, previous = [], signal.getsignal(signal.SIGINT)
    try:
        for handler in (lambda *a: heard.append(a), signal.SIG_IGN):
            signal.signal(signal.SIGINT, handler)
            with written_whole("OUT"):
                signal.raise_signal(signal.SIGINT)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with pytest.raises(KeyboardInterrupt, match="interrupted once OUT was written whole"):
            with written_whole("OUT"):
                signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(heard) == 1


def test_a_folder_moved_aside_before_a_restart_or_in_another_container_is_named_with_the_mv_that_puts_it_back(
        shared_export, tmp_path):
    """Found by a hunt: an export (or training run) killed outright in a container (the next one starts process ids
    again) or before a reboot left OUT/base or the checkpoint aside, which no later run puts back (it cannot tell that
    run stopped); the fixes given then were to export into a fresh OUT, remove OUT/adapters or start over with
    --overwrite, each losing work. They name the folder aside and the `mv` that puts it back."""
    import shlex
    import shutil

    from edgepeft.errors import ArtifactNotFoundError, ConfigError

    out, dirs, _ = shared_export("llama")
    out = str(shutil.copytree(out, tmp_path / "out"))
    aside = os.path.join(out, ".old-base-p1h0123abcd-x1")  # another host's tag: PID 1 of another container, say
    os.replace(os.path.join(out, "base"), aside)
    with pytest.raises(ArtifactNotFoundError) as e:
        Runtime(out)
    said = str(e.value)
    assert said.startswith(f"{out}/base: missing; {aside} holds it, moved aside by a run into {out} on another "
                           "machine, in another container or before a restart; once that run is over, put it back: ")
    with pytest.raises(ConfigError, match=re.escape(f"`mv {aside} {out}/base`")):
        export([dirs["qv"]], out, names=["again"])
    os.replace(*shlex.split(said.split("`")[1])[1:])  # the mv it names
    assert Runtime(out).adapter_names


SIGTERM_AT = {  # where the export gets a SIGTERM: as ONNX Runtime's int8 quantizer has written its copy of the float
    # base to TMPDIR, and as the new base moves into OUT (held off, as Ctrl-C is, until OUT is whole)
    "int8 temp copy": "import onnx\nreal = onnx.save_model\ndef hook(model, path, *a, **k):\n"
                      "    real(model, path, *a, **k)\n    if 'ort.quant.' in str(path): signal.raise_signal(signal.SIGTERM)\n"
                      "onnx.save_model = hook\n",
    "commit": "import edgepeft.files as files\nreal = files.exchanged\ndef hook(staged, target):\n"
              "    if os.path.basename(target) == 'base' and not SENT:\n"
              "        SENT.append(target); signal.raise_signal(signal.SIGTERM)\n    return real(staged, target)\n"
              "files.exchanged = hook\n",
}


@pytest.mark.parametrize("where", SIGTERM_AT)
def test_a_sigterm_is_answered_as_ctrl_c(llama, tmp_path, where):
    """A resources hunt: `kill` (or `timeout`, `docker stop`, a scheduler's preemption) ended an export where it
    stood: an int8 export left ONNX Runtime's copy of the float base in TMPDIR (GBs, on a small tmpfs), a commit could
    stop half done. It is answered as Ctrl-C: what was staged removed, a commit finished first, exit 143."""
    import subprocess
    import sys

    out, temp = tmp_path / "out", tmp_path / "tmp"
    temp.mkdir()
    if where == "commit":
        export([llama[1]["qv"]], str(out))
    script = ("import os, signal, sys\nSENT = []\n" + SIGTERM_AT[where] + "from edgepeft.cli import main\n"
              "main(sys.argv[1:])\n")
    args = ["export", "--adapter", llama[1]["mlp"], "--out", str(out)] + (["--quantize", "int8"] if "int8" in where else [])
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env={**os.environ, "TMPDIR": str(temp)},
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's job
    assert done.returncode == 143 and "Traceback" not in done.stderr, (done.returncode, done.stderr)
    assert not [e for e in os.listdir(temp) if e.startswith("ort.quant.")] and not hidden_entries(str(out))
    if where == "commit":
        assert done.stderr.splitlines()[-1] == f"interrupted once {out} was written whole (a SIGTERM waits for that)"
        assert Runtime(str(out)).adapter_names == ["mlp", "qv"]
    else:
        assert done.stderr.splitlines()[-1] == "aborted" and not out.exists()
