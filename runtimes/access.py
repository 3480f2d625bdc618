"""Files and folders this process may not read (another user's, on a device or a shared machine): named as such,
with the fix that works, rather than as missing or damaged files to re-export or remove."""
from __future__ import annotations

import os

from .errors import StorageError


def check_readable(path: str) -> None:
    """StorageError where ``path`` (a file, or a folder to list) or a folder above it is there but this process may
    not read it; nothing where it is readable or missing (the caller says what is missing). Called where a read
    failed or found nothing: os.access can say no where a read would succeed (capabilities, ACLs)."""
    path = os.path.abspath(path)
    folders = []
    probe = os.path.dirname(path)
    while os.path.dirname(probe) != probe:
        folders.insert(0, probe)
        probe = os.path.dirname(probe)
    for folder in folders:  # outermost first: a folder one cannot enter hides what is inside it
        if not os.path.isdir(folder):
            return
        if not _may(folder, os.X_OK):
            raise _denied(folder)
    if os.path.isdir(path) and not _may(path, os.R_OK | os.X_OK) or \
            os.path.isfile(path) and not _may(path, os.R_OK):
        raise _denied(path)


def may_replace(folder: str) -> bool:
    """Whether this process may empty ``folder`` (remove the files in it)."""
    return _may(folder, os.W_OK | os.X_OK)


def _may(path: str, mode: int) -> bool:
    """os.access as this process's effective user, where the platform can tell (a setuid app's own files)."""
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def _denied(path: str) -> StorageError:
    user = f" (uid {os.geteuid()})" if hasattr(os, "geteuid") else ""
    return StorageError(f"{path}: permission denied for this user{user}; make it readable (chmod, chown), or run as "
                        "a user who may read it")
