"""Helpers shared by the training error-contract tests."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import pytest

from edgepeft.cli import main


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- helpers
def seq_cls_rows(n=16):
    return [{"text": f"sample number {i} sounds {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"}
            for i in range(n)]


def cli_error(capsys, *argv) -> str:
    """Run ``edgepeft`` in-process; assert exit 1, no traceback, exactly one ``error:`` line (the last on stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert exc.value.code == 1, (exc.value.code, out, err)
    assert "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err
    return errors[0]


def cli_ok(capsys, *argv) -> str:
    capsys.readouterr()
    main([str(a) for a in argv])  # success returns (standalone_mode=False)
    return capsys.readouterr().out


def train_argv(model, data, out, *extra):
    """The CLI arguments of the shared tiny run (and of the runs that try to reuse its --out)."""
    return ["train", "--model", model, "--task", "seq-cls", "--data", data, "--out", out, "--epochs", "1",
            "--batch-size", "8", "--max-length", "32", "--r", "2", "--target-modules", "query,value", "--quiet", *extra]


class WordTokenizer:
    """A deterministic stand-in tokenizer: one id per distinct word (from 10), BOS=1 with special tokens."""

    def __init__(self, pad=5, eos=2):
        self.pad_token_id, self.eos_token_id, self.vocab = pad, eos, {}

    def __call__(self, text, add_special_tokens=True, truncation=False, max_length=None, verbose=True):
        ids = [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]
        ids = ([1] if add_special_tokens else []) + ids
        return {"input_ids": ids[:max_length] if truncation else ids}


def finished(cmd, env, timeout, marker):
    """``cmd`` run to its end; if it hangs, the test fails with where each of its processes waits (the ones whose
    command line holds ``marker``: torchrun starts its workers in sessions of their own, and one may outlive it).
    SIGABRT makes faulthandler print every thread's stack; SIGKILL then ends what is left."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        ours = [pid for pid in _pids() if marker in _cmdline(pid)]
        for sig in (signal.SIGABRT, signal.SIGKILL):
            for pid in ours:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(5 if sig == signal.SIGABRT else 0)  # faulthandler writes the stacks
        stdout, stderr = proc.communicate()
        pytest.fail(f"no end in {timeout} s; stdout: {stdout[-1000:]}\nstacks:\n{stderr[-12000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # gone meanwhile
        return ""
