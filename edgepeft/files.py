"""Atomic writes: a failed write leaves what was there untouched."""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager


_UMASK = os.umask(0)
os.umask(_UMASK)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path`` and rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        usual_permissions(tmp)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, data, sort_keys: bool = False) -> None:
    """``data`` as indented JSON (values JSON cannot hold as their str()), written atomically."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=sort_keys, default=str) + "\n").encode())


def usual_permissions(path: str) -> None:
    """What a plain open() / mkdir would have given ``path`` under this process's umask.

    tempfile's mkstemp / mkdtemp make 0600 files and 0700 folders; an export or adapter
    renamed into place from one must stay readable to whoever may read OUT (an app
    running as another user).
    """
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_UMASK)


def check_output_dir(path: str, flag: str, wants: str = "a folder path") -> None:
    """Refuse, before any work, an output folder that is a file or lies where nothing can be written.

    ``wants``: what ``flag`` takes, for the message ("a folder path", "a file path in a folder").
    """
    from edgepeft.errors import ConfigError

    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)  # the nearest part of the path that exists
    if not os.path.isdir(probe):
        raise ConfigError(f"{probe}: is a file, not a folder; give {flag} {wants}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{probe}: cannot write here (permission denied); give {flag} another folder or fix its permissions")


def staging_dir(parent: str, label: str) -> str:
    """A fresh hidden folder under ``parent`` to build into before ``replace_dir``."""
    os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix=f".staging-{label}-", dir=parent)
    usual_permissions(path)
    return path


def replace_dir(staged: str, target: str) -> None:
    """Move a fully written ``staged`` folder to ``target``, replacing any old one.

    The old folder is renamed aside first and removed only after the new one is in
    place, so at every moment ``target`` is either the old or the new folder.
    """
    old = None
    try:
        with deferred_interrupts():  # Ctrl-C between the two renames would leave no target at all
            if os.path.exists(target):
                old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(os.path.abspath(target)))
                os.rmdir(old)
                os.replace(target, old)
            try:
                os.replace(staged, target)
            except BaseException:
                if old:
                    os.replace(old, target)
                raise
    finally:  # also when the deferred Ctrl-C is raised: the old folder is not left behind
        if old and os.path.exists(old):
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def deferred_interrupts():
    """Ctrl-C (SIGINT) waits until the block is done: renames that belong together all happen, then it is raised.
    Outside the main thread (where no signal handler can be set) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        previous(*caught[0]) if callable(previous) else signal.raise_signal(signal.SIGINT)


class Staging:
    """Folders built under hidden names and renamed into place by ``commit``; on leaving the ``with`` block,
    whatever was not committed is removed (a failure leaves the targets as they were)."""

    def __init__(self):
        self.folders: list[str] = []

    def new(self, parent: str, label: str) -> str:
        folder = staging_dir(parent, label)
        self.folders.append(folder)
        return folder

    def commit(self, staged: str, target: str) -> None:
        replace_dir(staged, target)
        self.folders.remove(staged)

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> None:
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)
