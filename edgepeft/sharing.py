"""Folders several processes use: one export or training run writes a folder at a time (``one_at_a_time``), and a
folder is replaced in one step where the system can (``exchanged``): a Runtime opened meanwhile found no base; one
that cannot be replaced (a mount point) is refused before the work (``check_replaceable``)."""
from __future__ import annotations

import ctypes
import os
import re
import sys
from contextlib import contextmanager

from edgepeft.runtimes.access import folder_identity


def exchanged(a, b) -> bool:
    """Whether the folders ``a`` and ``b`` were swapped in one step (Linux's renameat2 RENAME_EXCHANGE, macOS's
    renamex_np RENAME_SWAP); False, nothing moved, wherever it did not happen (Windows, an old kernel or C library,
    a file system or a sandbox that refuses it, a path no call takes): the two renames then say why, if they fail."""
    paths = [os.fsencode(a), os.fsencode(b)]
    if os.name != "posix" or any(b"\0" in p for p in paths):  # a NUL: os.replace's ValueError, not a cut path
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform == "darwin":
            return libc.renamex_np(*paths, 2) == 0
        return libc.renameat2(-100, paths[0], -100, paths[1], 2) == 0  # AT_FDCWD, RENAME_EXCHANGE
    except (OSError, AttributeError):  # no C library to load, or no such call in it (musl)
        return False


@contextmanager
def one_at_a_time(folder: str, waiting, who: str = "export"):
    """Hold ``folder`` for one export at a time: an advisory lock on the folder itself, so no file is left behind.
    Two exports into one OUT each read its base and adapters first, and the later commit dropped what the other
    had added. ``waiting(message)`` is told when another holds it; this one then waits its turn. A folder removed
    or replaced meanwhile (a failed first export into a new OUT removes it) is made and locked again. Where the
    system has no such locks (Windows, or a filesystem that refuses them), exports are not serialised. Yields
    whether it holds the lock (without it, another export's files may be in flight)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    while True:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting(f"note: another {who} into {folder} is running; waiting for it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no locks on this filesystem
            os.close(fd)
            fd = None
            break
        held = os.fstat(fd)
        if folder_identity(folder) == (held.st_dev, held.st_ino):
            break
        os.close(fd)  # the folder locked is gone: lock the one at that path now
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def check_replaceable(folder: str, fix: str) -> None:
    """Refuse, before any work, a folder an export replaces by renaming a new one into its place that is a mount point
    (a container's volume mounted at OUT/base): the rename failed after the work, "Device or resource busy" (a faults
    hunt). ``fix``: what works instead."""
    from edgepeft.errors import StorageError

    if os.path.isdir(folder) and mount_point(folder):
        raise StorageError(f"{folder}: is a mount point, which an export cannot replace (it renames the new folder into "
                           f"its place); {fix}")


def mount_point(path: str) -> bool:
    """Whether ``path`` is a mount point, a bind mount of a folder of the same file system too (os.path.ismount
    compares devices: Linux lists those in /proc/self/mountinfo, its fifth field, octal escapes for spaces)."""
    if os.path.islink(path):  # the swap renames the link, not where it leads (a review)
        return False
    if os.path.ismount(path):
        return True
    absolute = os.path.abspath(path)  # its folder's links resolved, as mountinfo lists it
    real = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            points = [line.split()[4] for line in f if len(line.split()) > 4]
    except OSError:  # not Linux
        return False
    return real in {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), p) for p in points}
