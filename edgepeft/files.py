"""Atomic writes: a failed write leaves what was there untouched."""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager

from edgepeft.interrupts import deferred_interrupts
from edgepeft.sharing import exchanged
from edgepeft.runtimes.access import (inside, left_by_a_stopped_process, moved_aside_for_nothing, this_host,
                                      unexpanded_tilde)

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path`` and rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{_owner()}-", dir=directory)  # a killed write's: remove_abandoned
    except OSError as e:  # named as the file asked for, not the temp file beside it
        raise OSError(e.errno, e.strerror, path) from None
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
    """``data`` as indented JSON (numpy's numbers as numbers, other values JSON cannot hold as their str()), written
    atomically (a rank_pattern's numpy 2 was saved "2": no library loaded the adapter again)."""
    write_bytes_atomic(path, json_text(data, sort_keys).encode())


def json_text(data, sort_keys: bool = False) -> str:
    """``data`` as indented JSON with its closing newline, as ``write_json_atomic`` writes it."""
    return json.dumps(data, indent=2, sort_keys=sort_keys, default=_as_json) + "\n"


def plain(value):
    """``value`` with numpy's scalars (np.int64(2), np.float32, np.bool_) as their Python values, in lists, tuples
    and mappings too: what JSON holds, and what a config's checks take as numbers."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):  # a tuple's kind (a namedtuple takes no iterable) kept as a plain tuple
        return (list if isinstance(value, list) else tuple)(map(plain, value))
    item = getattr(value, "item", None)
    return item() if callable(item) and getattr(value, "shape", None) == () else value


def _as_json(value):
    value = plain(value)
    return value if isinstance(value, (bool, int)) or (isinstance(value, float) and math.isfinite(value)) else str(value)


def usual_permissions(path: str) -> None:
    """What a plain open() / mkdir would have given ``path`` under this process's umask.

    tempfile's mkstemp / mkdtemp make 0600 files and 0700 folders; an export or adapter
    renamed into place from one must stay readable to whoever may read OUT (an app
    running as another user).
    """
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_UMASK)


FULL_DISK = (errno.ENOSPC, errno.EDQUOT)  # a write that failed for want of space, or of quota
NO_WRITE = (*FULL_DISK, errno.EFBIG)  # ... or past the largest file the file system (FAT32: 4 GiB) or ulimit -f allows


@contextmanager
def reporting_full_disk(folder: str, flag: str, loading: bool = False):
    """A write under ``folder`` that fails for want of space (or quota) becomes a StorageError naming the folder and
    the fix: torch.onnx's, onnx's and ONNX Runtime's writers fail with an OSError naming no file. An error naming no
    file is blamed on ``folder``, or with ``loading`` (what loads the base: a hub download) on the hub's cache."""
    from edgepeft.errors import StorageError

    try:
        yield
    except OSError as e:
        if e.errno not in NO_WRITE:
            raise
        root, path = os.path.abspath(folder), os.path.abspath(e.filename) if isinstance(e.filename, str) else None
        big = e.errno == errno.EFBIG  # "File too large; check the path, its permissions and free space", of no file
        why = "a file larger than its file system (FAT32: 4 GiB) or ulimit -f allows" if big else "no space left on its disk"
        if path and not inside(path, root):  # elsewhere: the hub's cache, say
            raise StorageError(f"{path}: {why}; {'raise the limit' if big else 'free some'}") from None
        if loading and not path:
            raise StorageError(f"{why.replace('its', 'a')} while loading the base model (a download goes to the hub's "
                               f"cache, HF_HOME); {'raise the limit' if big else 'free some'}, or set HF_HOME to a "
                               "folder on another disk") from None
        if big:
            raise StorageError(f"{root}: {os.path.basename(path) if path else 'a file'} is larger than its file system "
                               f"(FAT32: 4 GiB) or ulimit -f allows; give {flag} a folder on another file system, or "
                               "raise the limit") from None
        raise StorageError(f"{root}: no space left on its disk; free some, or give {flag} a folder on another disk") from None


def missing_folders(path: str) -> list[str]:
    """``path`` and the folders above it that do not exist yet, outermost first: what making it makes, for
    ``remove_empty`` to take back after a failure."""
    missing = []
    path = os.path.join(os.getcwd(), path)  # not normalised: makedirs("n1/../n2") makes n1 too
    while os.path.dirname(path) != path:
        if os.path.basename(path) not in ("", ".", "..") and not os.path.exists(os.path.normpath(path)) \
                and not os.path.exists(path):
            missing.insert(0, path)
        path = os.path.dirname(path)
    return missing


def remove_empty(made: list) -> None:
    """The folders of ``missing_folders`` that are there and empty, innermost first."""
    for d in reversed(made):
        try:
            if not os.listdir(d):
                os.rmdir(d)
        except (FileNotFoundError, NotADirectoryError):  # another process (torchrun's) removed it first
            pass


def check_output_file(path: str, flag: str) -> None:
    """``check_output_dir`` for a file path: its folder, and the path a regular file or nothing yet (the write
    replaces what is there: a FIFO, a device such as /dev/null, a link to nothing)."""
    from edgepeft.errors import ConfigError

    if not path:
        raise ConfigError(f"{flag} '': an empty path; give {flag} a file path")
    if problem := unexpanded_tilde(path, flag):  # bench --json=~/r.json
        raise ConfigError(problem)
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise ConfigError(f"{path}: is a folder; give {flag} a file path")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise ConfigError(f"{path}: is not a regular file (a device, a pipe, a link to nothing); give {flag} a file path")
    check_output_dir(os.path.dirname(os.path.abspath(path)), flag, "a file path in a folder")


def check_output_files(paths: dict) -> list:
    """``check_output_file`` for each flag's path given ({flag: path or None}), no two the same file; the paths as
    written to (a link's target, which the write would replace), None where not given."""
    from edgepeft.errors import ConfigError

    seen = {}
    for flag, path in paths.items():
        if path is not None:
            check_output_file(path, flag)
            if (other := seen.setdefault(os.path.realpath(path), flag)) != flag:
                raise ConfigError(f"{path}: given to {other} and {flag}; give each its own file")
    return [None if path is None else os.path.realpath(path) for path in paths.values()]


def check_output_dir(path: str, flag: str, wants: str = "a folder path") -> None:
    """Refuse, before any work, an output folder that is a file or lies where nothing can be written: a temp file is
    made and removed in the nearest folder of the path there (os.access calls /proc or a read-only mount writable:
    the write failed after the work).

    ``wants``: what ``flag`` takes, for the message ("a folder path", "a file path in a folder").
    """
    from edgepeft.errors import ConfigError

    if not os.fspath(path):  # abspath('') is the working folder: makedirs('') failed after the checks
        raise ConfigError(f"{flag} '': an empty path; give {flag} {wants}")
    if problem := unexpanded_tilde(path, flag):
        raise ConfigError(problem)
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        if os.path.islink(probe):  # a link to what is not there (an unmounted disk): "File exists" from makedirs
            raise ConfigError(f"{probe}: is a link to {os.readlink(probe)}, which does not exist; create or mount "
                              f"it, or give {flag} another folder")
        probe = os.path.dirname(probe)  # the nearest part of the path that exists
    if not os.path.isdir(probe):
        raise ConfigError(f"{probe}: is a file, not a folder; give {flag} {wants}")
    if not os.access(probe, os.W_OK | os.X_OK):  # chmod cannot mend a read-only file system (a mount, a snapshot)
        read_only = hasattr(os, "statvfs") and os.statvfs(probe).f_flag & os.ST_RDONLY  # none on Windows
        why = "a read-only file system" if read_only else "permission denied"
        raise ConfigError(f"{probe}: cannot write here ({why}); give {flag} another folder"
                          + " or fix its permissions" * (why == "permission denied"))
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        raise ConfigError(f"{probe}: cannot write here ({e.strerror}); give {flag} another folder") from None


def _owner() -> str:
    """This process in a hidden folder's name (``p<pid>h<host>``): a later export can tell a dead process's
    leftovers (``remove_abandoned``) from a running export's folders."""
    return f"p{os.getpid()}h{this_host()}"


def remove_abandoned(parent: str, who: str = "an export") -> list[str]:
    """Mend what an export (or training run: ``who``) killed midway (kill -9, the out-of-memory killer) left under
    ``parent``, made by a process of this host that no longer runs: its staging folders and half-written temp files
    are removed; a folder
    ``replace_dir`` had moved aside is put back when nothing took its place (killed between the two renames), else
    removed. Folders of running processes, of other hosts (a shared drive) and of other names stay.
    Returns one line per folder, saying what was done."""
    done = []
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        m, path = left_by_a_stopped_process(name), os.path.join(parent, name)
        if m is None:
            continue
        if m["kind"] is None:  # a temp file a killed write left (a folder or link of that name is not ours)
            if os.path.isfile(path) and not os.path.islink(path):
                os.unlink(path)
                done.append(f"removed {path} (a file half-written by {who} that was stopped midway)")
            continue
        if not (os.path.isdir(path) or os.path.islink(path)):  # a file of that name is not ours
            continue
        target = moved_aside_for_nothing(parent, m)
        if target is not None:
            if os.path.islink(target):  # a link to nothing, which a folder cannot replace: it holds nothing
                os.unlink(target)
            os.replace(path, target)
            done.append(f"put {target} back ({who} was stopped while replacing it)")
        else:
            _remove(path)
            if not os.path.lexists(path):  # only what is gone is said to be
                done.append(f"removed {path} (left by {who} that was stopped midway)")
    return done


def staging_dir(parent: str, label: str) -> str:
    """A fresh hidden folder under ``parent`` to build into before ``replace_dir``."""
    os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix=f".staging-{label}-{_owner()}-", dir=parent)
    usual_permissions(path)
    return path


def replace_dir(staged: str, target: str) -> None:
    """Move a fully written ``staged`` folder to ``target``, replacing any old one.

    The two are exchanged in one step where the system can (``exchanged``), else the old folder is renamed aside
    first; it is removed only after the new one is in place.
    """
    old = None
    try:
        with deferred_interrupts():  # Ctrl-C between the two renames would leave no target at all
            old = swap_dir(staged, target)
    finally:  # also when the deferred Ctrl-C is raised: the old folder is not left behind
        remove_moved_aside(old)


def swap_dir(staged: str, target: str) -> str | None:
    """``staged`` renamed to ``target``; the folder that was there is renamed aside first (hold Ctrl-C off around
    it): returns that one's path, for ``remove_moved_aside`` once whatever belongs with the new folder is in place."""
    old = None
    sync_tree(staged)  # on the disk before the old folder goes: a power cut after its removal left a truncated base
    parent, name = os.path.split(os.path.abspath(target))
    if os.path.exists(target):
        # made now, and empty until the old folder moves in: it tells a Runtime a commit is running (committing)
        old = tempfile.mkdtemp(prefix=f".old-{name}-{_owner()}-", dir=parent)
        if exchanged(staged, target):  # never without target: a Runtime opened between two renames found no base
            try:
                os.replace(staged, old)  # over the empty one: the name remove_moved_aside (or a later export) knows
            except OSError:  # the new one is in: the commit goes on, the old removed from where it is
                os.rmdir(old)
                old = staged
            _sync_dir(parent)
            return old
        os.rmdir(old)
        os.replace(target, old)
    try:
        os.replace(staged, target)
    except BaseException:
        if old:
            os.replace(old, target)
        raise
    _sync_dir(parent)  # the renames themselves
    return old


def sync_tree(folder: str) -> None:
    """Every file under ``folder`` and the folders themselves flushed to the disk (``fsync``): a rename is on the
    disk before the data it names unless the data was synced first (ext4, FAT on an SD card)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if not os.path.islink(path := os.path.join(root, name)):  # Windows syncs no file opened read-only (EBADF)
                _sync(path, os.O_RDWR) or _sync(path, os.O_RDONLY)  # a file its owner may not write
        _sync_dir(root)


def _sync_dir(folder: str) -> None:
    _sync(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _sync(path: str, flags: int) -> bool:
    """``path`` flushed; where the system cannot open it so (False) or sync it (folders on Windows, a file system
    without fsync), skipped: a write error (EIO) is raised."""
    try:
        fd = os.open(path, flags)
    except OSError:
        return False
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EPERM, errno.EACCES, errno.EROFS):
            raise OSError(e.errno, e.strerror, path) from None  # the CLI names the file (EIO: a failing disk)
    finally:
        os.close(fd)
    return True


def remove_moved_aside(*olds) -> None:
    for old in olds:
        if old and os.path.lexists(old):
            _remove(old)


def names_in(folder: str) -> set | None:
    """The names ``folder`` holds (none where it is not there), None where it cannot be listed."""
    try:
        return set(os.listdir(folder))
    except FileNotFoundError:
        return set()
    except OSError:  # not a folder, or not readable
        return None


def remove_new(folder: str, there: set | None, names) -> None:
    """Removes what a failed run wrote in ``folder``: each of ``names`` (and hidden staging files) it holds now and
    did not hold when ``there`` was taken (``names_in``; None: nothing is taken back)."""
    now = names_in(folder)
    for name in now - there if now is not None and there is not None else ():
        if name not in names and not name.startswith("."):  # another's file, made meanwhile
            continue
        path = os.path.join(folder, name)
        _remove(path) if os.path.isdir(path) else os.remove(path)  # _remove unlinks a link


def _remove(path: str) -> None:
    """A folder, or a link moved aside in its place (OUT/base linked to another disk: rmtree leaves links, silently)."""
    if os.path.islink(path):
        os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


class Staging:
    """Folders built under hidden names and renamed into place by ``commit``; on leaving the ``with`` block,
    whatever was not committed is removed (a failure leaves the targets as they were)."""

    def __init__(self):
        self.folders: list[str] = []

    def new(self, parent: str, label: str) -> str:
        folder = staging_dir(parent, label)
        self.folders.append(folder)
        return folder

    def swap(self, staged: str, target: str) -> str | None:
        """``swap_dir``: returns the folder moved aside, for the caller to remove."""
        old = swap_dir(staged, target)
        self.folders.remove(staged)
        return old

    def put(self, staged: str, target: str) -> str | None:
        """``staged`` in ``target``'s place: a folder swapped in (``swap``: returns the one moved aside), a file
        renamed over it (None)."""
        if os.path.isdir(staged):
            return self.swap(staged, target)
        os.replace(staged, target)
        return None

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> None:
        with deferred_interrupts():  # a Ctrl-C (or a second one) cut the removal short, leaving half a folder in OUT
            for folder in self.folders:
                shutil.rmtree(folder, ignore_errors=True)
