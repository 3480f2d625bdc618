"""The commands that error messages tell a user to run, spelled once: the same placeholders as docs/cli.md (DIR,
OUT), real paths quoted for a shell, so a message's command can be pasted as it is."""
from __future__ import annotations

import os
from shlex import quote


def export_command(adapter: str = "DIR", out: str = "OUT", *flags: str) -> str:
    """The command in backquotes: `edgepeft export --adapter ADAPTER --out OUT FLAGS...`; ``flags`` as given (quote
    a path among them)."""
    return "`" + " ".join(["edgepeft export --adapter", quote(adapter), "--out", quote(out), *flags]) + "`"


def fresh_out(path: str) -> str:
    """A folder beside ``path`` for a suggested --out: absolute (``.`` would give ``.-onnx``, a hidden folder)."""
    return os.path.abspath(path) + "-onnx"
