"""What a stopped or refused run says about OUT's checkpoint: each message names the change to undo, or a command that
works (found by a hunt of reproducibility and resuming)."""
from __future__ import annotations

import math
import os
import re

import pytest

from edgepeft.errors import ConfigError
from edgepeft.training.checkpoint import check_resumable
from file_checks import tree_hashes, write_lines
from training_helpers import cli_error, cli_ok, seq_cls_rows


def argv(model, data, out, *extra):
    """A tiny run with the method's own defaults (train_argv gives --r and --target-modules, which IA3 refuses)."""
    return ["train", "--model", model, "--task", "seq-cls", "--data", data, "--out", out, "--epochs", "1",
            "--batch-size", "8", "--max-length", "32", "--quiet", *extra]


def test_a_resume_refusal_names_the_setting_changed_and_a_default_typed_out_resumes(text_model, tmp_path, capsys):
    """--method ia3 was refused as "made with --lr 0.005, this run has --lr 0.03" (the rate follows from the method,
    and lr sorts first); adding that --lr was then refused for the method. --r 8, LoRA's default, was refused as
    "made with --r none", which cannot be typed."""
    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows())
    out = str(tmp_path / "out")
    cli_ok(capsys, *argv(text_model("bert"), data, out))
    before = tree_hashes(out)
    ckpt = os.path.join(out, "checkpoint")
    line = cli_error(capsys, *argv(text_model("bert"), data, out, "--method", "ia3", "--resume"))
    assert line == (f"error: {ckpt}: was made with --method lora, this run has --method ia3; resume with the same "
                    "settings or start over with --overwrite")
    line = cli_error(capsys, *argv(text_model("bert"), data, out, "--r", "4", "--resume"))
    assert line.endswith("checkpoint: was made with --r 8, this run has --r 4; resume with the same settings or start "
                         "over with --overwrite")  # the default as it resolved, which --r takes
    assert tree_hashes(out) == before
    assert cli_ok(capsys, *argv(text_model("bert"), data, out, "--r", "8", "--option", "lora_dropout=0.0",
                                "--resume")).startswith("ok:")  # defaults typed out: the same run, finished


def test_a_resume_refusal_names_the_task_before_its_cut_and_a_setting_not_given_as_none_typed():
    made = {"task": "seq-cls", "method": "lora", "max_length": 256, "lr": 0.005, "eval_data": None, "options": {}}
    with pytest.raises(ConfigError, match=r"^ck: was made with task='seq-cls', this run has task='feature-extraction'"):
        check_resumable({"args": made}, "ck", dict(made, task="feature-extraction", max_length=None), 1)
    with pytest.raises(ConfigError, match=r"^ck: was made with no eval_data, this run has eval_data='e.jsonl'; "):
        check_resumable({"args": made}, "ck", dict(made, eval_data="e.jsonl"), 1)
    with pytest.raises(ConfigError, match=r"^ck: was made with lora_alpha=8, this run has lora_alpha=16"):
        check_resumable({"args": made}, "ck", dict(made, options={"r": 8, "lora_alpha": 16}), 1)
    check_resumable({"args": made}, "ck", dict(made, options={"r": 8, "lora_alpha": 8.0}), 1)  # LoRA's defaults
    check_resumable({"args": dict(made, method="prompt")}, "ck",
                    dict(made, method="prompt", options={"num_virtual_tokens": 8}), 1)  # training's default


def test_a_project_moved_or_copied_whole_resumes_and_a_model_moved_alone_is_named(tmp_path):
    """A hunt: the resume command printed at Ctrl-C, pasted in a project moved (mv proj, an rsync to a GPU machine),
    was refused for --data and --model given at their new paths, "resume with the same settings": they are gone.
    The rows are compared by their digests; a model as far from OUT as it was is the project's, moved with it."""
    made = {"task": "seq-cls", "method": "lora", "options": {}, "eval_data": None, "model": "/old/proj/bert",
            "data": "/old/proj/d.jsonl", "out": "/old/proj/out"}
    moved = {k: v.replace("/old/", "/new/") if isinstance(v, str) else v for k, v in made.items()}
    check_resumable({"args": made, "log": {"data_sha256": "abc"}}, "ck", moved, 1)
    with pytest.raises(ConfigError, match=r"^ck: was made with data='/old/proj/d.jsonl', this run has data="):
        check_resumable({"args": made, "log": {}}, "ck", moved, 1)  # a checkpoint from before the digests
    with pytest.raises(ConfigError, match=re.escape("ck: was made with model='/old/proj/bert', this run has model="
                                                    "'/elsewhere/bert'; resume with the same settings (a model folder "
                                                    "moved since: put it back there, or link that path to it) or")):
        check_resumable({"args": made, "log": {"data_sha256": "abc"}}, "ck", dict(moved, model="/elsewhere/bert"), 1)
    # a hunt across versions: a setting an earlier edgepeft did not record was "made with no --head-lr", which no
    # flag gives, and --head-lr 0.01 typed out was refused the same
    with pytest.raises(ConfigError, match=r"^ck: was made by an earlier edgepeft, which recorded no head_lr; start over "
                                          r"with --overwrite$"):
        check_resumable({"args": made, "log": {"data_sha256": "abc"}}, "ck", dict(moved, head_lr=0.01), 1)


def test_a_model_on_another_windows_drive_than_out_resumes_where_nothing_moved(monkeypatch):
    """A review: os.path.relpath raises ValueError on Windows across drives: a resume that worked ended in it."""
    def across_drives(path, start):
        raise ValueError("path is on mount 'D:', start on mount 'C:'")

    monkeypatch.setattr(os.path, "relpath", across_drives)
    made = {"task": "seq-cls", "method": "lora", "options": {}, "model": "/d/bert", "out": "/c/out"}
    check_resumable({"args": made, "log": {}}, "ck", dict(made), 1)  # nothing moved
    with pytest.raises(ConfigError, match=r"^ck: was made with model='/d/bert', this run has model='/e/bert'"):
        check_resumable({"args": made, "log": {}}, "ck", dict(made, model="/e/bert"), 1)


def test_a_run_that_diverged_after_a_checkpoint_says_start_over(text_model, tmp_path, capsys, monkeypatch):
    """"lower --lr" alone was refused once OUT held a checkpoint (a run into it), and so was --resume with that rate:
    the fix names --overwrite (instead of --resume), which works. A divergence before any checkpoint takes its files
    back, and "lower --lr" alone works there."""
    from edgepeft.training.trainer import Trainer

    real = Trainer._loss

    def nan_after_a_checkpoint(self, model, batch):  # private: no data makes the loss NaN on demand
        loss, logits = real(self, model, batch)
        return loss * (math.nan if self._checkpointed else 1), logits

    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows())
    out = str(tmp_path / "out")
    run = argv(text_model("bert"), data, out, "--epochs", "2")
    monkeypatch.setattr(Trainer, "_loss", nan_after_a_checkpoint)
    line = cli_error(capsys, *run)
    assert line == ("error: training diverged at step 4 (epoch 2): the loss is nan; lower --lr (now 0.005) or check "
                    f"the data, and start over with --overwrite (or another --out); {out} keeps the adapter saved "
                    "before")
    line = cli_error(capsys, *run, "--resume")  # as deterministic as the run it continues
    assert line.endswith("check the data, and start over with --overwrite instead of --resume (or another --out "
                         f"without it); {out} keeps the adapter saved before")
    monkeypatch.undo()
    assert cli_ok(capsys, *run, "--lr", "1e-3", "--overwrite").startswith("ok:")


def test_ctrl_c_while_a_resumed_run_loads_gives_the_command_that_resumes_it(text_model, tmp_path, monkeypatch):
    """It said "interrupted before training began; nothing saved in OUT" while OUT held the checkpoint: read as the
    earlier epochs lost, and a user may start over. docs/training.md: Ctrl-C after the first epoch prints the
    checkpoint and the command that resumes it."""
    import edgepeft.models
    from edgepeft.errors import TrainingInterrupted
    from edgepeft.training import train, trainer as trainer_module

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows(8))
    out = str(tmp_path / "out")
    run = dict(model=text_model("bert"), task="seq-cls", data=data, out=out, epochs=2, batch_size=8, progress=False)
    end = trainer_module.Trainer._end_epoch
    monkeypatch.setattr(trainer_module.Trainer, "_end_epoch", lambda *a: (end(*a), ctrl_c()))
    with pytest.raises(TrainingInterrupted) as after_epoch:  # the later handler's line, inside the first epoch's end
        train(**run)
    assert str(after_epoch.value).startswith(f"interrupted; {os.path.join(out, 'checkpoint')} holds the run after "
                                             "epoch 1 of 2; continue with: edgepeft train ")
    monkeypatch.undo()
    before = tree_hashes(out)
    monkeypatch.setattr(edgepeft.models, "load_base", ctrl_c)  # loading the base, the checkpoint read
    with pytest.raises(TrainingInterrupted) as loading:
        train(**run, resume=True)
    assert str(loading.value) == str(after_epoch.value)
    monkeypatch.setattr(trainer_module, "read_checkpoint", ctrl_c)  # reading it: its epoch is not known yet
    with pytest.raises(TrainingInterrupted) as reading:
        train(**run, resume=True)
    assert str(reading.value) == str(after_epoch.value).replace("holds the run after epoch 1 of 2", "is kept")
    assert tree_hashes(out) == before
    monkeypatch.undo()
    assert train(**run, resume=True)["history"][-1]["epoch"] == 2  # as printed: it finishes


def test_a_sigterm_during_training_keeps_the_checkpoint_and_prints_the_resume_command(text_model, tmp_path):
    """A resources hunt: `kill` (a scheduler's preemption, `timeout`, `docker stop`) ended a run where it stood,
    without the --resume command Ctrl-C prints. It is answered as Ctrl-C (exit 143): the command resumes the run."""
    import shlex
    import signal
    import subprocess
    import sys

    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows())
    out = str(tmp_path / "out")
    script = ("import signal, sys\nfrom edgepeft.training.trainer import Trainer\nreal = Trainer._epoch\n"
              "def epoch(self, *a):\n    if a[7] == 1: signal.raise_signal(signal.SIGTERM)\n    return real(self, *a)\n"
              "Trainer._epoch = epoch\nfrom edgepeft.cli import main\nmain(sys.argv[1:])\n")  # in epoch 2 of 2
    done = subprocess.run([sys.executable, "-c", script, *argv(text_model("bert"), data, out, "--epochs", "2")],
                          capture_output=True, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's job
    assert done.returncode == 143 and "Traceback" not in done.stderr, (done.returncode, done.stderr)
    line = done.stderr.splitlines()[-1]
    assert "holds the run after epoch 1 of 2; continue with: " in line, line
    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[:2] == ["edgepeft", "train"] and command[-1] == "--resume"


@pytest.mark.parametrize("seen_by", ["gloo", "torchrun"])
def test_another_process_killed_under_torchrun_is_said_by_the_first_with_its_resume(text_model, tmp_path, seen_by):
    """A hunt: a process other than the first killed mid-run (the out-of-memory killer's SIGKILL) left the first, whose
    output the user reads, printing gloo's 54-line traceback ("Connection closed by peer"), no edgepeft line, though
    the checkpoint of epoch 1 was whole. It says so now, with the command that resumes, whichever tells it first: gloo
    (a collective with the process gone) or torchrun's agent, which looks every 0.1 s and stops the others with
    SIGTERM (that ended the first process printing nothing: the test failed about 1 run in 7). The first process
    waits for the agent in ``torchrun``, and the agent looks only every 10 s in ``gloo``."""
    import json
    import shlex
    import sys

    from training_helpers import finished

    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows(24))
    kill = tmp_path / "kill.py"  # rank 1 killed at its first training batch of epoch 2
    kill.write_text("import os, signal, sys, time\nfrom edgepeft.training.trainer import Trainer\nend, ended = "
                    "Trainer._end_epoch, []\n\ndef killed(self, *args):\n    end(self, *args)\n    if os.environ['RANK'] "
                    f"== '1':\n        os.kill(os.getpid(), signal.SIGKILL)\n    elif {seen_by == 'torchrun'}:\n"
                    "        time.sleep(120)\n\nTrainer._end_epoch = killed\nfrom edgepeft.cli import main\nmain(sys.argv[1:])\n")
    out = str(tmp_path / "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "--monitor-interval", "10" if seen_by == "gloo" else "0.1", str(kill),
           *argv(text_model("bert"), data, out, "--epochs", "2", "--batch-size", "4", "--rank", "2")]
    stopped = finished(run, env, timeout=240, marker=out)
    said = {"gloo": "another process stopped (torchrun's report names which, and why)",
            "torchrun": "torchrun stopped the processes (its report names why)"}[seen_by]
    ours = [line for line in stopped.stderr.splitlines() if line.startswith((said[:8], "error:", "[rank0]"))]
    assert stopped.returncode != 0 and len(ours) == 1, stopped.stderr[-3000:]
    assert ours[0].startswith(f"{said}; {out}/checkpoint holds the run after epoch 1 of 2; continue with: torchrun "
                              "--nproc-per-node 2 -m edgepeft train "), ours[0]
    command = shlex.split(ours[0].split("continue with: ")[1])  # which, followed, finishes the run
    assert command[0] == "torchrun" and command[-1] == "--resume"
    if seen_by == "torchrun":  # one resumed run is enough
        resumed = finished([sys.executable, "-m", "torch.distributed.run", "--standalone", *command[1:]], env, 240, out)
        assert resumed.returncode == 0 and json.load(open(os.path.join(out, "training_log.json")))["world_size"] == 2


def test_overwrite_removes_an_hf_peft_folders_pickled_weights(text_model, tmp_path, capsys):
    """A hunt: --overwrite on an HF PEFT folder saved with safe_serialization=False kept its adapter_model.bin (r 4)
    beside the new adapter_model.safetensors (r 8): loaders take the safetensors, but a copy or an upload carried both."""
    import torch
    from safetensors.torch import load_file

    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows())
    out = tmp_path / "out"
    cli_ok(capsys, *argv(text_model("bert"), data, str(out), "--r", "4"))
    torch.save(load_file(str(out / "adapter_model.safetensors")), out / "adapter_model.bin")  # as HF PEFT pickles it
    os.remove(out / "adapter_model.safetensors")
    write_lines(out / "notes.jsonl", [{"keep": 1}])  # the user's own: stays
    cli_ok(capsys, *argv(text_model("bert"), data, str(out), "--r", "8", "--overwrite"))
    assert not os.path.exists(out / "adapter_model.bin") and os.path.exists(out / "notes.jsonl")
    assert load_file(str(out / "adapter_model.safetensors"))  # the new run's, alone


def test_under_torchrun_a_sigterm_is_answered_once_and_not_while_the_command_says_why_it_stops(monkeypatch,
                                                                                             sigint_raises):
    """A review: the agent's SIGTERM was passed over inside any `except RuntimeError` a library ran (the run went on
    until the agent's SIGKILL, saying nothing), and answered while the line saying why the run stopped was printed
    (cutting it into a KeyboardInterrupt traceback). A command that is stopping says so (``stopping``)."""
    import signal

    from edgepeft.interrupts import stopping, terminated_as_interrupts

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    with terminated_as_interrupts():
        try:
            raise RuntimeError("a library's fallback")
        except RuntimeError:
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGTERM)  # answered as Ctrl-C there too
        signal.raise_signal(signal.SIGTERM)  # once: the agent's stop is answered, not each of its signals
    with terminated_as_interrupts():
        stopping()  # training's except block, on Ctrl-C or gloo's word of another process's end
        signal.raise_signal(signal.SIGTERM)  # passed over: the line saying why is on its way
