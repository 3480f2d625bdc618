"""Files and folders this process may not read (another user's, on a device or a shared machine): named as such,
with the fix that works, rather than as missing or damaged files to re-export or remove."""
from __future__ import annotations

import os

from .errors import StorageError


def check_readable(path: str) -> None:
    """StorageError where ``path`` (a file, or a folder to list) or a folder above it is there but this process may
    not read it; nothing where it is readable or missing (the caller says what is missing)."""
    path = os.path.abspath(path)
    folders = []
    probe = os.path.dirname(path)
    while os.path.dirname(probe) != probe:
        folders.insert(0, probe)
        probe = os.path.dirname(probe)
    for folder in folders:  # outermost first: a folder one cannot enter hides what is inside it
        if not os.path.isdir(folder):
            return
        if not os.access(folder, os.X_OK):
            raise _denied(folder)
    if os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK) or \
            os.path.isfile(path) and not os.access(path, os.R_OK):
        raise _denied(path)


def _denied(path: str) -> StorageError:
    user = f" (uid {os.getuid()})" if hasattr(os, "getuid") else ""
    return StorageError(f"{path}: permission denied for this user{user}; make it readable (chmod, chown), or run as "
                        "a user who may read it")
