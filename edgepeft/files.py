"""Atomic writes: a failed write leaves what was there untouched."""
from __future__ import annotations

import os
import shutil
import tempfile


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
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def staging_dir(parent: str, label: str) -> str:
    """A fresh hidden folder under ``parent`` to build into before ``replace_dir``."""
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".staging-{label}-", dir=parent)


def replace_dir(staged: str, target: str) -> None:
    """Move a fully written ``staged`` folder to ``target``, replacing any old one.

    The old folder is renamed aside first and removed only after the new one is in
    place, so at every moment ``target`` is either the old or the new folder.
    """
    old = None
    if os.path.exists(target):
        old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(os.path.abspath(target)))
        os.rmdir(old)
        os.replace(target, old)
    os.replace(staged, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)
