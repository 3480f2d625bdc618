"""The command line under torchrun, whose processes run the same command: one report from them, each process's error
in torchrun's failure report, and the process group ended with the command (``edgepeft.train`` leaves it to the
script that called it, whose next run trains in it); and standard input's bytes as the text a command reads."""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager

import click


def first() -> bool:
    """Whether this is the first (or only) process: the one that reports."""
    return int(os.environ.get("RANK", "0")) == 0


def stdin_text(data: bytes) -> str:
    """Standard input's bytes as text: UTF-16 where a byte-order mark says so (PowerShell 5 writes files so), else
    UTF-8 whatever the locale (Windows decoded a pipe as cp1252), its mark dropped (Windows' editors: 3 tokens more).
    Bytes not of UTF-8 are kept as an argument's are (lone surrogates), which the text checks name in a line."""
    import codecs

    for mark, encoding in ((codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")):
        if data.startswith(mark):
            try:
                return data[len(mark):].decode(encoding)
            except UnicodeDecodeError as e:
                from edgepeft.errors import ConfigError

                raise ConfigError(f"standard input: starts with {encoding.upper()}'s byte-order mark, but byte "
                                  f"{e.start + len(mark)} on is no {encoding.upper()} text ({e.reason}); save the "
                                  "prompt as UTF-8") from None
    return data.removeprefix(codecs.BOM_UTF8).decode("utf-8", errors="surrogateescape")


def say(line: str) -> None:
    """A one-line message on stderr, from the first process; under torchrun each process also writes its own into
    the error file torchrun reads, so that its failure report names the process that failed first ("Root Cause"),
    an error of another process's own included (a path only the first node has)."""
    if first():
        click.echo(line, err=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w", encoding="utf-8") as f:
                json.dump({"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
        except OSError:  # the line is on stderr (first process) or in torchrun's "exitcode 1" already
            pass


@contextmanager
def notes_once():
    """edgepeft's own warnings (``EdgePeftWarning``: an adapter_config.json's fields it ignores) as one ``note:`` line
    each, once, from the first process, while a command runs: Python printed each with its source line, once per file
    that read the config. Other warnings show as they would."""
    import warnings

    from edgepeft.errors import EdgePeftWarning

    shown, said = warnings.showwarning, set()
    for stream in (sys.stdout, sys.stderr):  # a label or generated text this stream's encoding lacks (cp1252: Windows'
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):  # output to a file) is
            stream.reconfigure(errors="backslashreplace")  # escaped, not a UnicodeEncodeError traceback

    def note(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, EdgePeftWarning):
            return shown(message, category, filename, lineno, file, line)
        if first() and str(message) not in said:
            said.add(str(message))
            click.echo(f"note: {message}", err=True)

    warnings.showwarning = note
    try:
        yield
    finally:
        warnings.showwarning = shown


def _group():
    """torch.distributed where a process group is up (torch imported already: a runtime-only install has none)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def peer_stopped(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed in a process other than the first, under a process group: another
    process stopped (its error, said by the first process or in torchrun's report, names why); this one says no more
    than that, where it printed gloo's traceback ("Connection closed by peer"). A process's own error (out of memory)
    is not one."""
    return not first() and peer_gone(error)


def peer_gone(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed under a process group, another process gone (killed: out of
    memory; or stopped by its own error): in the first process, the trainer's cue to say so with its --resume."""
    if not isinstance(error, RuntimeError) or (dist := _group()) is None:
        return False
    return isinstance(error, dist.DistError) or any(s in str(error) for s in PEER_GONE)


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "/gloo/transport/")  # gloo's RuntimeErrors


def end_group() -> None:
    """After a finished run: end the process group (every process has passed the run's last barrier)."""
    if (dist := _group()) is not None:
        dist.destroy_process_group()


def leave(code: int):
    """Exit with ``code``. With a process group still up (a run stopped by an error or Ctrl-C), skip the teardown:
    it joins gloo's worker threads holding the GIL, which one of them may need to let go of a tensor Python made (a
    hang; see ``checkpoint.replica_checksums``), and the other processes are stopping anyway."""
    if _group() is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
