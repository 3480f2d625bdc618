"""A later export into an OUT that holds adapters: which adapters a new base takes along, and that OUT is never
left half-committed (Ctrl-C during the commit, a rename that fails)."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal

import numpy as np
import pytest

from error_contract import llama, other_llama_base  # noqa: F401  (fixtures)
from file_checks import copy_adapter, edit_json, edited_json, hidden_entries, tree_hashes
from peft_refs import lora_adapter, spec_adapter

from edgepeft.errors import (AdapterBaseMismatchError, ArtifactNotFoundError, ConfigError, ExportValidationError,
                             UnknownAdapterError)
from edgepeft.exporters import export
from edgepeft.files import replace_dir
from edgepeft.runtimes import Runtime


def _fingerprint(folder) -> str:
    with open(os.path.join(folder, "adapter.json")) as f:
        return json.load(f)["base_fingerprint"]


def test_an_adapter_made_for_another_base_stays_refused_when_the_base_grows(llama, other_llama_base, tmp_path):
    """deploy.md: copy adapters into OUT later, a Runtime refuses one made for another base. A later export that
    grew the base re-pointed it to the new base: it loaded, and ran its weights on the wrong base."""
    out = str(tmp_path / "out")
    export([llama[1]["qv"]], out)
    other = copy_adapter(llama[1]["qv"], tmp_path / "other-qv")
    edit_json(os.path.join(other, "adapter_config.json"), base_model_name_or_path=other_llama_base)
    export([other], str(tmp_path / "other-out"), names=["foreign"])
    foreign = os.path.join(out, "adapters", "foreign")
    shutil.copytree(os.path.join(tmp_path, "other-out", "adapters", "foreign"), foreign)
    made_for = _fingerprint(foreign)
    export([llama[1]["mlp"]], out)  # new slots: a new base, the adapters made for the old one re-pointed
    rt = Runtime(out, load_adapters=False)
    assert rt.manifest["fingerprint"] == _fingerprint(os.path.join(out, "adapters", "qv")) != made_for
    assert _fingerprint(foreign) == made_for
    rt.load_adapter(os.path.join(out, "adapters", "qv"))
    with pytest.raises(AdapterBaseMismatchError, match="was exported for base"):
        rt.load_adapter(foreign)
    # Runtime(OUT) and inspect say so, with a fix that works (it said: export it under another --name, which left
    # the folder that every Runtime(OUT) refuses where it was)
    fix = f"remove {foreign}, or, where {other_llama_base} is the model of {rt.manifest['source']}, re-export its adapter " \
          f"into this OUT: `edgepeft export --adapter DIR --out {out} --name foreign --overwrite`"  # made from another
    with pytest.raises(AdapterBaseMismatchError, match=re.escape(fix) + "$"):
        Runtime(out)
    from edgepeft.runtimes.describe import describe_export
    assert any(p.startswith(f"{foreign}: exported for another base") and p.endswith("--name foreign --overwrite`")
               for p in describe_export(out)["problems"])
    export([llama[1]["qv"]], out, names=["foreign"], overwrite=True)  # an adapter trained on this OUT's base
    assert Runtime(out).adapter_names == ["foreign", "mlp", "qv"]


def test_a_head_adapter_after_a_plain_one_grows_the_base_as_both_together(tiny_base, tmp_path):
    """A LoRA adapter saving lm_head exported after a plain one was refused ('exported from BASE; these adapters
    need BASE'); in one export, or in the other order, it worked. Any order writes the same base."""
    base = tiny_base("llama")
    plain = lora_adapter(tmp_path / "plain", base, "causal-lm", 5, r=2, target_modules=["q_proj"])
    head = lora_adapter(tmp_path / "head", base, "causal-lm", 6, r=2, target_modules=["v_proj"], modules_to_save=["lm_head"])
    apart, together = str(tmp_path / "apart"), str(tmp_path / "together")
    export([plain], apart, names=["plain"])
    export([head], apart, names=["head"])
    export([plain, head], together, names=["plain", "head"])
    manifests = [Runtime(o, load_adapters=False).manifest for o in (apart, together)]
    assert manifests[0]["fingerprint"] == manifests[1]["fingerprint"]
    ids = np.array([[5, 6, 7, 8]])
    for name in ("plain", "head"):
        np.testing.assert_array_equal(Runtime(apart).forward(ids, adapter=name)["logits"],
                                      Runtime(together).forward(ids, adapter=name)["logits"])


def test_adapters_without_a_base_are_refused_not_left_stale(llama, tmp_path):
    """OUT/base removed (or an export stopped): the new base was made without them, and every Runtime(OUT)
    then failed on the old adapters, the one just exported included."""
    out = str(tmp_path / "out")
    export([llama[1]["qv"]], out)
    shutil.rmtree(os.path.join(out, "base"))
    with pytest.raises(ConfigError, match=r"adapters: holds qv but .*base holds no base \(removed, or an export "
                       r"stopped\); export every adapter into a fresh --out folder"):
        export([llama[1]["mlp"]], out)
    assert sorted(os.listdir(out)) == ["adapters"]


def _old_and_new(root):
    """target/file saying "old", .staged/file saying "new": what replace_dir swaps."""
    target, staged = root / "target", root / ".staged"
    for folder, text in ((target, "old"), (staged, "new")):
        folder.mkdir()
        (folder / "file").write_text(text)
    return target, staged


def test_replace_dir_puts_the_old_folder_back_when_the_new_one_cannot_move_in(tmp_path, monkeypatch, two_renames):
    """Its docstring: target is at every moment the old or the new folder. A failing second rename left neither."""
    target, staged = _old_and_new(tmp_path)
    real = os.replace

    def replace(src, dst):
        if str(src) == str(staged):
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"):
        replace_dir(str(staged), str(target))
    assert (target / "file").read_text() == "old" and (staged / "file").read_text() == "new"


def test_an_export_is_on_the_disk_before_the_old_base_is_removed(llama, tmp_path, monkeypatch, two_renames):
    """A power cut (a device unplugged) right after an export: its files were renamed into place and the old base
    removed with the new files' data still in the page cache: a truncated base, the old one gone. Every file and
    folder of what moves in is synced before the first rename, and OUT's entries after the base's."""
    out = str(tmp_path / "out")
    export([llama[1]["qv"]], out)
    real_fsync, real_replace, events = os.fsync, os.replace, []
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("sync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("move", str(src), str(dst))),
                                                         real_replace(src, dst))[1])
    export([llama[1]["mlp"]], out)  # a new base: both slots
    staged, base = next((e[1], e[2]) for e in events if e[0] == "move" and e[2] == os.path.join(out, "base"))
    first_move = next(i for i, e in enumerate(events) if e[0] == "move" and e[2] in (os.path.join(out, "base"),
                                                                                     staged))
    synced = {os.path.relpath(e[1], staged) for e in events[:first_move] if e[0] == "sync" and
              (e[1] + "/").startswith(staged + "/")}
    on_disk = {os.path.relpath(os.path.join(root, n), base) for root, dirs, files in os.walk(base)
               for n in files + dirs} | {"."}
    assert on_disk <= synced
    base_moved = events.index(("move", staged, base))
    assert ("sync", out) in events[base_moved:]



@pytest.mark.parametrize("refused", [errno.EBADF, errno.EINVAL, errno.EIO])
def test_a_system_that_syncs_no_file_still_commits_and_a_write_error_is_raised(tmp_path, monkeypatch, refused):
    """A review: Windows syncs no file opened read-only (EBADF), some file systems none at all (EINVAL): every export
    and checkpoint failed, "Bad file descriptor", naming no file. A write error (EIO) still stops the commit."""
    import fcntl

    target, staged = _old_and_new(tmp_path)
    real, synced = os.fsync, []

    def fsync(fd):  # EBADF as Windows: for a handle opened read-only; the others for every one
        if refused != errno.EBADF or fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(refused, os.strerror(refused))
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    if refused == errno.EIO:  # named: the CLI said "Input/output error; check the path", of no path
        with pytest.raises(OSError, match=os.strerror(errno.EIO)) as e:
            replace_dir(str(staged), str(target))
        assert e.value.filename == str(staged / "file") and (target / "file").read_text() == "old"
    else:
        replace_dir(str(staged), str(target))
        assert (target / "file").read_text() == "new" and not staged.exists()
        assert synced == ([str(staged / "file")] if refused == errno.EBADF else [])  # a file, opened for writing


def test_a_read_only_out_is_refused_before_any_work(llama, tmp_path, monkeypatch):
    """OUT takes the staging folders: the error named a hidden staging path that did not exist, after loading.
    (Read-only as this process sees it: root writes anywhere, so os.access says so for OUT.)"""
    out = str(tmp_path / "out")
    export([llama[1]["qv"]], out)
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: real(path, mode) and os.path.abspath(path) != out)
    with pytest.raises(ConfigError, match=rf"{out}: cannot write here \(permission denied\)"):
        export([llama[1]["mlp"]], out)
    monkeypatch.setattr(os, "statvfs", lambda path: type("Mount", (), {"f_flag": os.ST_RDONLY}))  # chmod cannot mend
    with pytest.raises(ConfigError, match=rf"{out}: cannot write here \(a read-only file system\); give --out another folder$"):
        export([llama[1]["mlp"]], out)


def test_ctrl_c_during_replace_dir_moves_the_new_folder_in_and_leaves_no_old_copy(tmp_path, monkeypatch, sigint_raises,
                                                                                  two_renames):
    """The deferred Ctrl-C was raised before the old folder's removal: a hidden full copy stayed behind."""
    target, staged = _old_and_new(tmp_path)
    real = os.replace

    def replace(src, dst):
        if str(dst) == str(target):
            signal.raise_signal(signal.SIGINT)  # Ctrl-C between the two renames
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(str(staged), str(target))
    assert (target / "file").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["target"]


def test_ctrl_c_while_staging_folders_are_removed_removes_them_all(tmp_path, monkeypatch, sigint_raises):
    """A Ctrl-C (or a second one) during the removal of what an export staged cut it short: half a folder in OUT."""
    from edgepeft.files import Staging

    real, folders = shutil.rmtree, []

    def rmtree(path, **kwargs):
        real(path, **kwargs)
        signal.raise_signal(signal.SIGINT)  # Ctrl-C after the first folder

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(KeyboardInterrupt):
        with Staging() as staging:
            folders = [staging.new(str(tmp_path), label) for label in ("base", "adapter")]
    assert folders and not os.listdir(tmp_path)


def test_a_base_whose_slot_reads_otherwise_than_this_edgepeft_is_not_reused(tiny_base, tmp_path):
    """A BERT prefix base written before positions started after the prefix has the same slot names: it was reused
    and the new adapter failed validation by 2.9 ('loosen --atol'). The runtimes refuse it too."""
    from file_checks import edit_json as edit
    from peft_refs import peft_virtual_adapter

    bert = tiny_base("bert")
    first, second = (peft_virtual_adapter(tmp_path / f"p{i}", bert, "prefix", seed=i, task="feature-extraction",
                                          num_virtual_tokens=2) for i in (1, 2))
    out = str(tmp_path / "out")
    export([first], out, names=["p1"])
    manifest = os.path.join(out, "base", "edgepeft.json")
    with open(manifest) as f:
        slots = json.load(f)["slots"]
    for slot in slots:
        slot.pop("position_axis", None)  # as the older edgepeft wrote them
    edit(manifest, slots=slots)
    older = (r"base/edgepeft.json: was written by an older edgepeft \(its slot prefix_\w+\.\S+ puts the text at the "
             r"prefix's positions, where HF PEFT puts it after them\); export every adapter into a fresh --out folder$")
    with pytest.raises(ConfigError, match=older):
        export([second], out, names=["p2"])
    # the runtimes served it as it was (3.2 off HF PEFT), inspect said nothing
    from edgepeft.runtimes import Runtime
    from edgepeft.runtimes.describe import describe_export

    for call in (Runtime, describe_export):
        with pytest.raises(ConfigError, match=older):
            call(out)


def test_an_out_written_before_the_generation_defaults_is_named_older_not_another_base(tiny_base, peft_adapter,
                                                                                     tmp_path):
    """Its manifest has no "generation": adding an adapter from the same base folder was refused as 'differs from
    <that folder> ... in its generation (None here, {} in its generation_config.json)'."""
    bert = [peft_adapter("bert", f"older-{i}", seed=i, r=2) for i in (1, 2)]
    out = str(tmp_path / "out")
    export(bert[:1], out, names=["first"])
    manifest = os.path.join(out, "base", "edgepeft.json")
    with edited_json(manifest) as data:
        del data["generation"]  # as that edgepeft wrote it
    before = tree_hashes(out)
    with pytest.raises(ConfigError, match=r"base: was written by an older edgepeft \(its manifest records no "
                       r"generation\); export every adapter into a fresh --out folder$"):
        export(bert[1:], out, names=["second"])
    assert tree_hashes(out) == before
    export(bert, str(tmp_path / "fresh"), names=["first", "second"])


_KILLED_MIDWAY = """
import os, signal, sys
import edgepeft.files
from edgepeft.files import replace_dir, staging_dir
edgepeft.files.exchanged = lambda a, b: False  # two renames, as where the system cannot exchange folders
parent, target = sys.argv[1], sys.argv[2]
staged = staging_dir(parent, os.path.basename(target))
open(os.path.join(staged, "adapter.json"), "w").write("half")  # a staged adapter, not yet validated
real = os.replace
os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL) if dst == target else real(src, dst)
replace_dir(staged, target)  # killed (kill -9, the out-of-memory killer) between its two renames
"""


def test_a_later_export_mends_what_an_export_killed_midway_left(llama, tmp_path, capsys):
    """kill -9 cannot be deferred: between replace_dir's two renames it left no adapter, its old folder hidden
    beside it (the user's only copy), and a staging folder as large as what was being exported; no later export
    cleaned them up. Folders of a running process, or of another host, are not this export's to touch. inspect
    said nothing of the hidden adapter (exit 0), and a re-pointed manifest's temp file inside an adapter's folder
    stayed through every later export."""
    import subprocess
    import sys

    from edgepeft.files import _owner
    from edgepeft.runtimes.describe import describe_export

    out = str(tmp_path / "out")
    export([llama[1]["qv"]], out)
    adapters = os.path.join(out, "adapters")
    before = Runtime(out).forward(np.array([[1, 2, 3]]), adapter="qv")["logits"]
    killed = subprocess.run([sys.executable, "-c", _KILLED_MIDWAY, adapters, os.path.join(adapters, "qv")])
    assert killed.returncode == -signal.SIGKILL
    left = sorted(os.listdir(adapters))  # and no qv
    assert len(left) == 2 and left[0].startswith(".old-qv-p") and left[1].startswith(".staging-qv-p")
    dead = left[0].split("-")[2]  # p<the killed process's pid>h<this host>
    running = os.path.join(out, f".staging-base-{_owner()}-abc")  # this process is running
    elsewhere = os.path.join(out, f".staging-base-{dead[:dead.index('h')]}h00000000-abc")  # that pid on another host
    live = os.path.join(adapters, f".old-x-{_owner()}-abc")  # a running export's, moved aside: not a problem
    os.makedirs(running), os.makedirs(elsewhere), os.makedirs(live)
    stopped = f"by an export into {out} that was stopped; run that export again (it puts the folder back first)"
    assert describe_export(out)["problems"] == [f"{os.path.join(adapters, left[0])}: adapter 'qv', moved aside {stopped}"]
    with pytest.raises(UnknownAdapterError) as e:  # it said "not loaded", as of a name never exported
        Runtime(out).forward(np.array([[1, 2, 3]]), adapter="qv")
    assert str(e.value) == f"adapter 'qv' is not loaded: moved aside to {os.path.join(adapters, left[0])} {stopped}"
    aside = os.path.join(out, f".old-base-{dead}-abc")
    os.replace(os.path.join(out, "base"), aside)  # as one killed while replacing the base leaves it
    with pytest.raises(ArtifactNotFoundError) as e:  # it said "no exported base here"
        Runtime(out)
    assert str(e.value) == f"{os.path.join(out, 'base')}: moved aside to {aside} {stopped}"
    with open(os.path.join(adapters, left[0], f".tmp-{dead}-abc"), "w") as f:  # a killed write's, inside qv
        f.write("half")
    export([llama[1]["mlp"]], out, verbose=True)
    printed = "".join(capsys.readouterr())  # notes on stderr
    assert f"removed {os.path.join(adapters, 'qv', f'.tmp-{dead}-abc')} (a file half-written" in printed
    assert f"note: put {os.path.join(adapters, 'qv')} back (an export was stopped while replacing it)" in printed
    assert "removed " in printed and "left by an export that was stopped midway" in printed
    assert sorted(hidden_entries(out)) == sorted([running, elsewhere, live])
    rt = Runtime(out)
    assert rt.adapter_names == ["mlp", "qv"]
    np.testing.assert_array_equal(rt.forward(np.array([[1, 2, 3]]), adapter="qv")["logits"], before)


def test_adapters_taken_along_to_a_new_base_are_run_on_it_first(tiny_base, tmp_path, monkeypatch):
    """A new base re-pointed the adapters already in OUT without running them on it: a base that read one of their
    slots otherwise (here: two layers' LoRA A swapped) passed its own checks and served them wrong."""
    import sys

    import onnx

    base = tiny_base("llama")
    qv = lora_adapter(tmp_path / "qv", base, "causal-lm", 5, r=2, target_modules=["q_proj", "v_proj"])
    mlp = lora_adapter(tmp_path / "mlp", base, "causal-lm", 6, r=2, target_modules=["down_proj"])
    out = str(tmp_path / "out")
    export([qv], out, names=["qv"])
    report = export([mlp], out, names=["mlp"])
    assert [c["what"] for c in report["checks"]][-1] == "adapter qv (already in OUT) on the new base"
    assert report["checks"][-1]["max_abs_diff"] <= report["checks"][-1]["tolerance"]
    shutil.rmtree(os.path.join(out, "adapters", "mlp"))
    shutil.rmtree(os.path.join(out, "base"))
    export([qv], out, names=["qv"], overwrite=True)  # OUT as before: qv on a base of its own slots
    module = sys.modules["edgepeft.exporters.export"]
    real = module.trace_base

    def swapping(*args, **kwargs):  # the new base reads layer 1's LoRA A in layer 0, and back
        manifest = real(*args, **kwargs)
        path = os.path.join(args[3], "model.onnx")
        model = onnx.load(path, load_external_data=False)
        a, b = (f"lora_A.model.layers.{i}.self_attn.q_proj+k_proj+v_proj" for i in (0, 1))
        for node in model.graph.node:
            node.input[:] = [{a: b, b: a}.get(x, x) for x in node.input]
        onnx.save_model(model, path)
        return manifest

    monkeypatch.setattr(module, "trace_base", swapping)
    before = Runtime(out).forward(np.array([[5, 6, 7]]), adapter="qv")["logits"]
    with pytest.raises(ExportValidationError, match=r"adapters/qv: gives other outputs on the new base than on OUT's"):
        export([mlp], out, names=["mlp"])
    np.testing.assert_array_equal(Runtime(out).forward(np.array([[5, 6, 7]]), adapter="qv")["logits"], before)


def test_a_merge_export_takes_no_adapters(peft_adapter, tmp_path):
    """--merge into an OUT whose slot base was removed but whose adapters stayed succeeded, and left an export no
    Runtime opens; an adapter copied into a --merge export was told to be exported into it, which is refused."""
    qv, other = spec_adapter(peft_adapter, "llama", "qv"), spec_adapter(peft_adapter, "llama", "all")
    out = str(tmp_path / "out")
    export([qv], out, names=["qv"])
    shutil.rmtree(os.path.join(out, "base"))
    before = tree_hashes(out)
    with pytest.raises(ConfigError, match=r"adapters: holds qv; a --merge export takes no adapters: give another --out"):
        export([other], out, names=["m"], merge=True)
    assert tree_hashes(out) == before
    slots = str(tmp_path / "slots")  # found by a hunt: a slot base of no adapters was said to hold some
    export([qv], slots, names=["qv"])
    shutil.rmtree(os.path.join(slots, "adapters"))
    with pytest.raises(ConfigError, match=r"base: holds a slot base \(an export without --merge\); write the --merge "):
        export([other], slots, names=["m"], merge=True, overwrite=True)
    merged = str(tmp_path / "merged")
    export([other], merged, names=["m"], merge=True)
    shutil.copytree(os.path.join(out, "adapters", "qv"),
                    os.path.join(merged, "adapters", "qv"))
    with pytest.raises(AdapterBaseMismatchError, match=r"holds a --merge export \('m'\), which takes no adapters; "
                                                       r"remove it from .*, or export it into another --out"):
        Runtime(merged)
    with pytest.raises(AdapterBaseMismatchError, match=r"which takes no adapters; load it on the export it was made for"):
        Runtime(merged, load_adapters=False).load_adapter(os.path.join(out, "adapters", "qv"))


def test_exports_into_one_out_take_turns(peft_adapter, tmp_path, monkeypatch):
    """Two exports into one OUT at once each read its base and adapters first; the later commit dropped the adapter
    the other had added and its slots: both said ok, and no Runtime opened OUT. The second now waits its turn."""
    import importlib
    import threading

    module = importlib.import_module("edgepeft.exporters.export")

    out = str(tmp_path / "out")
    export([spec_adapter(peft_adapter, "llama", "qv")], out, names=["qv"])
    order, told = [], threading.Event()
    resolve, commit = module.resolve, module.commit
    monkeypatch.setattr(module, "resolve", lambda *a, **k: order.append(("resolve", threading.current_thread().name))
                        or resolve(*a, **k))

    def first_commits_once_the_other_waits(*args, **kwargs):
        if threading.current_thread().name == "first":
            told.wait(120)  # B is told to wait at once; without the lock it never is (and resolves meanwhile)
        order.append(("commit", threading.current_thread().name))
        return commit(*args, **kwargs)

    monkeypatch.setattr(module, "commit", first_commits_once_the_other_waits)
    lock = module.one_at_a_time  # the export says when it waits: the test hears it too
    monkeypatch.setattr(module, "one_at_a_time", lambda out, waiting: lock(out, lambda m: (waiting(m), told.set())))
    errors = []

    def run(adapter, name):
        try:
            export([spec_adapter(peft_adapter, "llama", adapter)], out, names=[name])
        except Exception as e:  # noqa: BLE001  reported below
            errors.append(e)

    first = threading.Thread(target=run, args=("all", "all"), name="first")
    first.start()
    while not order and first.is_alive():  # the first holds OUT once it resolves
        first.join(0.05)
    assert order, errors
    second = threading.Thread(target=run, args=("mlp", "mlp"), name="second")
    second.start()
    first.join()
    second.join()
    assert errors == [] and order == [("resolve", "first"), ("commit", "first"), ("resolve", "second"),
                                      ("commit", "second")]
    assert Runtime(out).adapter_names == ["all", "mlp", "qv"]


def test_an_export_waiting_for_a_new_out_that_fails_holds_the_out_made_again(tmp_path, monkeypatch):
    """The first export into a new OUT fails and removes the folder it made; the one waiting for it held a lock on
    the removed folder, and a third export could run beside it."""
    import fcntl
    import importlib
    import threading

    module = importlib.import_module("edgepeft.exporters.export")
    out, told, seen = str(tmp_path / "out"), threading.Event(), {}

    def fake_export(adapters, out_, *args):
        if threading.current_thread().name == "first":
            told.wait(120)
            raise ConfigError("the first export fails")
        fd = os.open(out_, os.O_RDONLY)  # a third export, now
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen["third locked OUT"] = True
        except BlockingIOError:
            seen["third locked OUT"] = False
        finally:
            os.close(fd)
        return {}

    monkeypatch.setattr(module, "_export", fake_export)
    lock = module.one_at_a_time  # the export says when it waits: the test hears it too
    monkeypatch.setattr(module, "one_at_a_time", lambda out, waiting: lock(out, lambda m: (waiting(m), told.set())))
    threads = [threading.Thread(target=lambda: module.export(["a"], out) if threading.current_thread().name ==
                                "second" else pytest.raises(ConfigError, module.export, ["a"], out), name=n)
               for n in ("first", "second")]
    threads[0].start()
    while not os.path.isdir(out) and threads[0].is_alive():
        threads[0].join(0.01)
    threads[1].start()
    for t in threads:
        t.join()
    assert seen == {"third locked OUT": False}


def test_a_base_folder_linked_to_another_disk_is_replaced_without_a_stale_link(tmp_path):
    """OUT/base as a link to another disk: the re-export moved the link aside and rmtree left it (it takes no links),
    and every later export said it had removed it."""
    from edgepeft.files import remove_abandoned, replace_dir

    (tmp_path / "disk").mkdir()
    (tmp_path / "disk" / "old.txt").write_text("old")
    (tmp_path / "out").mkdir()
    os.symlink(tmp_path / "disk", tmp_path / "out" / "base")
    staged = tmp_path / "out" / ".stage"
    staged.mkdir()
    (staged / "new.txt").write_text("new")
    replace_dir(str(staged), str(tmp_path / "out" / "base"))
    assert sorted(os.listdir(tmp_path / "out")) == ["base"] and (tmp_path / "out" / "base" / "new.txt").is_file()
    assert remove_abandoned(str(tmp_path / "out")) == []


@pytest.mark.parametrize("killed", ["after the base", "before the base"])
def test_an_export_killed_while_re_pointing_is_finished_by_the_next(llama, tmp_path, capsys, killed):
    """kill -9 between renaming a new base into OUT and the adapters' re-pointed manifests (.adapter.json.new) over
    theirs: every Runtime(OUT) refused qv ('exported for another base'), and the next export removed the old base
    and said ok, leaving OUT so. The next export now renames them in (or, killed before the base moved, drops them)."""
    ids = np.array([[1, 2, 3]])
    done, out = str(tmp_path / "done"), str(tmp_path / "out")
    export([llama[1]["qv"]], done)
    shutil.copytree(done, out)
    export([llama[1]["mlp"]], done)  # new slots: a new base, qv re-pointed to it
    want = Runtime(done).forward(ids, adapter="qv")["logits"]
    shutil.copy(os.path.join(done, "adapters", "qv", "adapter.json"), os.path.join(out, "adapters", "qv", ".adapter.json.new"))
    if killed == "after the base":  # the fix said to remove qv, which the next export mends
        shutil.rmtree(os.path.join(out, "base"))
        shutil.copytree(os.path.join(done, "base"), os.path.join(out, "base"))
        with pytest.raises(AdapterBaseMismatchError, match=f"an export into {out} was stopped before it re-pointed "
                                                           "it; run that export again \\(where OUT can be locked, not "
                                                           "on Windows, it finishes that first\\), or re-export its "
                                                           "adapter into this OUT: .* --overwrite`$"):
            Runtime(out)
    export([llama[1]["mlp"]], out, verbose=True)
    printed = "".join(capsys.readouterr())  # notes on stderr
    line = "re-pointed {} to the base OUT holds" if killed == "after the base" else "removed {}/.adapter.json.new"
    assert line.format(os.path.join(out, "adapters", "qv")) in printed
    assert not hidden_entries(out)
    np.testing.assert_allclose(Runtime(out).forward(ids, adapter="qv")["logits"], want, atol=1e-5)


_KILLED_OVERWRITING = """
import os, signal, sys
import edgepeft.files
from edgepeft.exporters import export
edgepeft.files.exchanged = lambda a, b: False  # two renames, as where the system cannot exchange folders
out, adapter, when = sys.argv[1:]
target, real = os.path.join(out, "adapters", "qv"), os.replace
def replace(src, dst):  # kill -9 as the old qv moves aside, or between that and the new one moving in
    if (src if when == "before" else dst) == target:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
os.replace = replace
export([adapter], out, names=["qv"], overwrite=True)
"""


@pytest.mark.parametrize("when", ["before", "between"])
def test_an_overwrite_killed_after_its_new_base_moved_in_leaves_the_old_adapter_fitting_it(llama, tmp_path, when):
    """--overwrite of an adapter whose replacement needs a new base: killed after the base moved in, the old adapter
    (never re-pointed) was made for a base that is gone, and every Runtime(OUT) refused OUT; a later export put it
    back, said ok, and left OUT refused. The adapter being replaced is re-pointed with the others now."""
    import subprocess
    import sys

    ids = np.array([[1, 2, 3]])
    out = str(tmp_path / "out")
    export([llama[1]["qv"]], out)
    want = Runtime(out).forward(ids, adapter="qv")["logits"]
    killed = subprocess.run([sys.executable, "-c", _KILLED_OVERWRITING, out, llama[1]["mlp"], when])
    assert killed.returncode == -signal.SIGKILL
    if when == "between":  # qv hidden aside: the next export puts it back
        export([llama[1]["all"]], out, names=["other"])
    np.testing.assert_allclose(Runtime(out).forward(ids, adapter="qv")["logits"], want, atol=1e-5)


def test_an_adapter_being_replaced_is_not_checked_on_the_new_base(llama, tmp_path):
    """Re-pointed for an export stopped midway (above), the adapter --overwrite replaces was also run on both bases
    and reported "already in OUT": time spent, and a quantized base could refuse the export for an adapter it drops."""
    out = str(tmp_path / "out")
    export([llama[1]["qv"]], out)
    report = export([llama[1]["mlp"]], out, names=["qv"], overwrite=True)  # new slots: a new base
    assert not [c["what"] for c in report["checks"] if "already in OUT" in c["what"]]


def test_a_damaged_tokenizer_in_out_names_a_fix_that_works(text_export, tmp_path, capsys):
    """OUT/base/tokenizer.json cut short: the fix said "re-export the base with its tokenizer files", and an export
    into that OUT (with or without --overwrite) was refused with the same message; a fresh --out is what works."""
    from training_helpers import cli_error, cli_ok

    out, adapter = str(tmp_path / "out"), os.path.join(os.path.dirname(text_export[0]), "adapter-tok")
    shutil.copytree(text_export[0], out)
    with open(os.path.join(out, "base", "tokenizer.json"), "r+") as f:
        f.truncate(100)
    fix = ", or re-run `edgepeft export` into a fresh --out folder"
    for argv in (["run", out, "hello", "--max-new-tokens", "1"], ["export", "--adapter", adapter, "--out", out,
                                                                  "--name", "tok", "--overwrite"]):
        line = cli_error(capsys, *argv)
        assert line.startswith(f"error: {out}/base/tokenizer.json: not a tokenizer") and line.endswith(fix), argv
    cli_ok(capsys, "export", "--adapter", adapter, "--out", str(tmp_path / "fresh"))
    cli_ok(capsys, "run", str(tmp_path / "fresh"), "hello", "--max-new-tokens", "1")


def test_an_adapter_linked_from_another_export_is_copied_in_not_re_pointed_there(llama, tmp_path, capsys, monkeypatch):
    """A paths hunt: OUT/adapters/shared linked to another export's adapter (one base, two exports); an export that
    made OUT a new base wrote the re-pointed manifest through the link: that export refused its own adapter."""
    one, two, real = str(tmp_path / "one"), str(tmp_path / "two"), os.access
    export([llama[1]["qv"]], one)
    export([llama[1]["qv"]], two)
    os.symlink(os.path.join(one, "adapters", "qv"), os.path.join(two, "adapters", "shared"))
    before = tree_hashes(one)
    monkeypatch.setattr(os, "access", lambda path, mode: real(path, mode) and not os.path.realpath(path).startswith(one))
    export([llama[1]["mlp"]], two, verbose=True)  # new slots: a new base for `two`
    assert tree_hashes(one) == before and Runtime(one).adapter_names == ["qv"]
    shared = os.path.join(two, "adapters", "shared")
    assert not os.path.islink(shared) and sorted(os.listdir(shared)) == sorted(os.listdir(one + "/adapters/qv"))
    assert f"note: {shared} was a link to {os.path.realpath(one)}/adapters/qv" in "".join(capsys.readouterr())
    rt = Runtime(two)
    ids, mask = np.array([[5, 6, 7]]), np.ones((1, 3), np.int64)
    assert np.array_equal(rt.forward(ids, mask, adapter="shared")["logits"], rt.forward(ids, mask, adapter="qv")["logits"])
    assert not hidden_entries(two)
