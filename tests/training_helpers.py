"""Helpers shared by the training error-contract tests."""
from __future__ import annotations

import os

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


