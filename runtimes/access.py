"""Reading an export's files: JSON and checksums, and files and folders this process may not read (another user's,
on a device or a shared machine), named as such with the fix that works rather than as missing or damaged files to
re-export or remove."""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import pathlib
import re
import shlex
import socket
import stat

from .errors import STOPS, ArtifactNotFoundError, ConfigError, CorruptArtifactError, EdgePeftError, StorageError
from .values import half_character


# What an export stopped midway leaves in OUT (edgepeft/files.py names and mends them; inspect and the runtime's
# fixes name them): staging_dir's .staging-<label>-<owner>-<random>, replace_dir's .old-<target's name>-<owner>-
# <random>, write_bytes_atomic's .tmp-<owner>-<random> (owner: p<pid>h<host>); and an adapter's manifest re-pointed
# to a new base, beside its own until the export commits
LEFT_BEHIND = re.compile(r"\.(?:(?P<kind>staging|old)-(?P<target>.+)-|tmp-)p(?P<pid>\d+)h(?P<host>[0-9a-f]{8})-[^-]+")
ADAPTER_MANIFEST = "adapter.json"  # manifest.py's name for it (imported from here)
REPOINTED = f".{ADAPTER_MANIFEST}.new"
ADAPTERS_DIR = "adapters"  # OUT/adapters/<name>: one folder per adapter


@functools.cache  # the same for the process's life (a fork shares its namespace and boot)
def this_host() -> str:
    """This machine and PID namespace: the host name, the boot and the namespace's id where Linux gives them (a
    container sharing the host's name, or a second machine of that name on a shared drive, gets another)."""
    parts = [socket.gethostname()]
    for probe in (lambda: pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                  lambda: str(os.stat("/proc/self/ns/pid").st_ino)):
        try:
            parts.append(probe())
        except OSError:
            pass
    return hashlib.sha1("/".join(parts).encode()).hexdigest()[:8]


def _process_state(m) -> str | None:
    """"running" or "stopped" for the process a LEFT_BEHIND match ``m`` names, where it is one of this host's (os.kill
    (pid, 0) asks "is it there?" on POSIX only); None for another host's (a shared drive) or a pid no process has."""
    if os.name != "posix" or m["host"] != this_host():
        return None
    try:
        os.kill(int(m["pid"]), 0)
    except ProcessLookupError:
        return "stopped"
    except OverflowError:
        return None
    except OSError:  # another user's process
        pass
    return "running"


def left_by_a_stopped_process(name: str):
    """``name``'s LEFT_BEHIND match where a process of this host that no longer runs left it, else None: a running
    export's folders and another host's (a shared drive) are not a stopped export's."""
    m = LEFT_BEHIND.fullmatch(name)
    return m if m is not None and _process_state(m) == "stopped" else None


def committing(out: str) -> bool:
    """Whether an export of this host that still runs is moving OUT's base aside (``files.swap_dir``): it is
    committing, and renames its adapters' manifests for the new base (REPOINTED) in next. A folder it cannot list is
    no export's (False)."""
    try:
        entries = os.listdir(out)
    except OSError:
        return False
    return any((m := LEFT_BEHIND.fullmatch(e)) and (m["kind"], m["target"]) == ("old", "base") and
               _process_state(m) == "running" for e in entries)


def moved_aside_for_nothing(parent: str, m) -> str | None:
    """Where a folder that a stopped process had moved aside (``m``: its LEFT_BEHIND match, kind "old") was being
    replaced and nothing usable took its place (nothing there, or a link to nothing: killed between replace_dir's
    two renames), that path, else None. ``remove_abandoned`` puts such a folder back; ``inspect`` names it."""
    target = os.path.join(parent, m["target"])
    return target if m["kind"] == "old" and not os.path.exists(target) else None


def moved_aside(parent: str) -> dict:
    """{name: the folder a stopped export moved ``parent/name`` into to replace it} where nothing usable took its
    place (inspect lists them; a Runtime names one asked for; the next export puts them back)."""
    return {m["target"]: os.path.join(parent, e) for e in listed(parent) if (m := left_by_a_stopped_process(e))
            and moved_aside_for_nothing(parent, m)} if os.path.isdir(parent) else {}


def aside_elsewhere(parent: str, name: str) -> str:
    """Where ``parent/name`` is missing and a run into ``parent`` (an export, a training run) moved it aside but this
    process cannot tell that run stopped (another machine's, on a shared drive; this machine's before a restart, or
    in another container: process ids start again there), the fix that puts it back, else "" (the fixes given
    otherwise, a fresh --out, --overwrite, removing OUT/adapters, lose the folder's work)."""
    target = os.path.join(parent, name)
    for entry in listed(parent) if os.path.isdir(parent) and not os.path.lexists(target) else []:
        m = LEFT_BEHIND.fullmatch(entry)
        if m and m["kind"] == "old" and m["target"] == name and m["host"] != this_host():
            return (f"{os.path.join(parent, entry)} holds it, moved aside by a run into {parent} on another machine, in "
                    f"another container or before a restart; once that run is over, put it back: "
                    f"`mv {shlex.quote(os.path.join(parent, entry))} {shlex.quote(target)}`")
    return ""


def listed(folder: str) -> list:
    """The names in ``folder``, sorted; one this process may not list named so (StorageError)."""
    try:
        return sorted(os.listdir(folder))
    except OSError:
        check_readable(folder)
        raise


STOPPED = "by an export into {} that was stopped; run that export again (it puts the folder back first)"


def folder_identity(path: str) -> tuple | None:
    """The folder's (device, inode): another once it is replaced (an export renames a new base in), None where gone."""
    try:
        found = os.stat(path)
    except STOPS:
        raise
    except OSError:
        return None
    return found.st_dev, found.st_ino


def unchanged_while(folder: str, read, tries: int = 3):
    """``read()``'s result, where ``folder`` stayed the same folder from before it began until it ended; read again
    where an export renamed a new one in meanwhile (a Runtime opened then paired the old manifest with the new graph,
    or ran a graph whose weights came from both). An error raised while it changed is read again too."""
    for _ in range(tries):
        seen = folder_identity(folder)
        try:
            result = read()
        except EdgePeftError:  # whatever it says, of files that changed while it read them (sess_options' too)
            if folder_identity(folder) == seen:
                raise
            continue
        if folder_identity(folder) == seen:
            return result
    raise StorageError(f"{folder}: replaced {tries} times while it was read (exports into it, one after another); "
                       "open it again once they are done")


def present(path: str, folder: bool = False) -> bool:
    """``os.path.isfile`` (``isdir``: ``folder``), but an app's STOPS raised while it looks come through."""
    try:
        mode = os.stat(path).st_mode
    except STOPS:
        raise
    except (OSError, ValueError):
        return False
    return stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode)


def files_digest(folder: str, names: tuple) -> str:
    """sha256 of the files ``names`` of ``folder`` (those missing or unreadable counted as such)."""
    parts = []
    for name in names:
        try:
            parts.append(f"{name}: {sha256_file(os.path.join(folder, name))}")
        except STOPS:
            raise
        except OSError as e:
            parts.append(f"{name}: errno {e.errno}")
    return sha256_bytes("\n".join(parts).encode())


def check_text_files(base_dir: str, names: tuple, identity: tuple, digest: str) -> None:
    """Before the first text call reads them: ``base_dir`` the folder it was (``folder_identity``), or one whose text
    files ``names`` are the same (an export into OUT renames a new base in, its tokenizer the same), else named."""
    now = folder_identity(base_dir)
    if now is None:
        raise ArtifactNotFoundError(f"{base_dir}: moved or removed since this Runtime opened it, whose tokenizer is read "
                                    "at the first text call; open a new Runtime on the export")
    if now != identity and files_digest(base_dir, names) != digest:
        raise CorruptArtifactError(f"{base_dir}: replaced since this Runtime opened it, by an export of another tokenizer "
                                   "or settings (read at the first text call); open a new Runtime on the export")


def located(path: str) -> str:
    """``path`` made absolute where the system finds it: os.path.abspath drops 'LINK/..' by its text, where the
    system goes up from the link's target (another folder). Where the two differ, the real path (every link
    resolved); else os.path.abspath's (links kept as given). A path whose names are not UTF-8 (Python reads those
    bytes as lone surrogates) is refused: ONNX Runtime and PyTorch's ONNX exporter take none (a TypeError, which
    read as a damaged file)."""
    path = os.fspath(path)
    if not isinstance(path, str):  # an os.PathLike of bytes: '\0' in it was a TypeError
        raise ConfigError(f"{path!r}: a path must be text (a string), not bytes; give os.fsdecode(path)")
    if "\0" in path:  # the system's ValueError ("embedded null byte")
        raise ConfigError(f"{path!r}: a path cannot hold a NUL character (\\x00); give the folder's path without it")
    if half_character(path):
        raise ConfigError(f"{os.path.abspath(path)!r}: a name in this path is not UTF-8 (bytes of another encoding), "
                          "and ONNX Runtime, safetensors and tokenizers open UTF-8 paths only; rename it")
    absolute = os.path.abspath(path)
    if ".." in path.replace("\\", "/").split("/") and os.path.realpath(path) != os.path.realpath(absolute):
        return os.path.realpath(path)
    return absolute


def as_read(path: str) -> str:
    """``path`` as given, or where the system reads it (``located``) where the two differ ('LINK/..')."""
    where = located(path)
    return path if where == os.path.abspath(path) else where


def folder_name(path: str) -> str:
    """The name of the folder ``path`` leads to where the system finds it (``located``): 'LINK/..' names the link
    target's parent, not the folder the text goes up to; '.' the folder's own."""
    return os.path.basename(located(path))


def link_to_nothing(path: str) -> str | None:
    """What to say of ``path`` where it is a link that leads nowhere (a disk not mounted) or back to itself."""
    try:
        os.stat(path)
    except OSError as e:  # not one this process may not follow (permission: check_readable's)
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP) and os.path.islink(path):  # the JS runtime's words
            return f"{path}: is a link to {os.readlink(path)}, which " + (
                "leads back to itself (a loop of links); remove the link, or make it lead to a folder"
                if e.errno == errno.ELOOP else "does not exist; create or mount it, or remove the link")
    return None


def weights_out_of_reach(graph: str) -> str | None:
    """What to say where ``graph``'s weights file is a link leading out of the graph's folder (weights shared by two
    copies, a DVC or git-annex checkout): ONNX Runtime 1.24+ reads a graph's external data only within its folder, or
    within its real file's folder (a Hugging Face cache's blobs/), and called such a copy damaged."""
    data = f"{graph}.data"
    real = os.path.realpath(data)
    if not os.path.islink(data) or inside(real, os.path.realpath(os.path.dirname(graph))) or \
            inside(real, os.path.dirname(os.path.realpath(graph))):
        return None
    link, file = shlex.quote(data), shlex.quote(real)
    return (f"{data}: is a link to {real}, outside the graph's folder, and ONNX Runtime 1.24 and later read no "
            f"weights there; put the file in its place: rm {link} && cp {file} {link}")


def unexpanded_tilde(path, flag: str) -> str | None:
    """What to say of a path that starts with a '~' no shell expanded (quoted, after `--out=`, or from Python), where
    no folder of that name is there: transformers took --model ~/m for a hub id, --out=~/x made a folder named ~."""
    if str(path).startswith("~") and not os.path.lexists(str(path).split(os.sep)[0]):
        return f"{path}: '~' is not expanded here; give {flag} the full path, {shlex.quote(os.path.expanduser(path))}"
    return None


def saved_under_names(folder: str) -> list[str]:
    """The subfolders of ``folder`` holding an HF PEFT adapter (adapter_config.json): save_pretrained's layout for
    adapters other than "default" (``selected_adapters``), sorted."""
    return [d for d in listed(folder) if not d.startswith(".")  # sorted; hidden ones none: .ipynb_checkpoints
            and os.path.isfile(os.path.join(folder, d, "adapter_config.json"))] if os.path.isdir(folder) else []


def adapter_dirs(out_dir: str) -> dict:
    """{name: folder} of the adapters in ``out_dir/adapters``, sorted (a link leading nowhere too, for the read to
    name); hidden (staging) entries left out. OUT/adapters a link to nothing is named (its adapters left out unsaid)."""
    adapters_dir = os.path.join(out_dir, ADAPTERS_DIR)
    if problem := link_to_nothing(adapters_dir):
        raise ArtifactNotFoundError(problem)
    if not os.path.isdir(adapters_dir):
        return {}
    return {name: os.path.join(adapters_dir, name) for name in listed(adapters_dir)
            if not name.startswith(".") and (os.path.isdir(path := os.path.join(adapters_dir, name))
                                             or link_to_nothing(path))}


def check_readable(path: str) -> None:
    """StorageError where ``path`` (a file, or a folder to list) or a folder above it is there but this process may
    not read it; nothing where it is readable or missing (the caller says what is missing). Called where a read
    failed or found nothing: os.access can say no where a read would succeed (capabilities, ACLs)."""
    real = os.path.realpath(path)
    if real != os.path.abspath(path):  # a link: where it leads is read too
        check_readable(real)
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


def inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies under it (absolute or relative; on Windows, another drive is elsewhere)."""
    try:
        return os.path.commonpath([os.path.abspath(path), os.path.abspath(folder)]) == os.path.abspath(folder)
    except ValueError:  # Windows: on another drive
        return False


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


JSON_MOST = 16 << 20  # a manifest or config edgepeft reads: kB; parsed, JSON takes ~20x its bytes (a list of lists)


def read_json(path: str, what: str, fix: str, kind: type = dict, optional: bool = False) -> dict:
    """The JSON object (``kind`` list: the list) in ``path``; a missing or damaged file names itself and ``fix``
    (``optional``: a missing one reads as empty)."""
    if optional and not present(path):
        return kind()
    if not present(path):
        check_readable(path)  # inside a folder one may not enter, a file looks missing
        raise ArtifactNotFoundError(f"{path}: {what} not found; {fix}")
    try:
        if os.path.getsize(path) > JSON_MOST:  # before it is read: parsed, "[[],..." takes ~20x its bytes
            raise CorruptArtifactError(f"{path}: {what} is {os.path.getsize(path)} bytes, more than any edgepeft reads "
                                       f"({JSON_MOST}); {fix}")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except STOPS:
        raise
    except FileNotFoundError:  # removed since it was found (an export renaming a new folder in): not "not valid JSON"
        if optional:
            return kind()
        raise ArtifactNotFoundError(f"{path}: {what} not found; {fix}") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8 or JSON, a 5,000-digit number
        check_readable(path)
        raise CorruptArtifactError(f"{path}: {what} is not valid JSON ({e}); {fix}") from None
    if not isinstance(data, kind):
        raise CorruptArtifactError(f"{path}: {what} is not a JSON {'object' if kind is dict else 'list'}; {fix}")
    return data


def read_text(path: str, fix: str) -> str:
    """The UTF-8 text in ``path`` (a chat template); a file that cannot be read names itself and ``fix``."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except STOPS:
        raise
    except (OSError, UnicodeDecodeError) as e:
        check_readable(path)
        raise CorruptArtifactError(f"{path}: cannot read it ({e}); {fix}") from None


OLDER_RECORDS = {  # per task, the record a call reads that an earlier edgepeft's manifest may lack, and what follows from it
    "causal-lm": ("generation", "the model's generation_config.json, which generate follows"),
    "seq-cls": ("problem_type", "the model config's, by which scores are softmax, sigmoid or none"),
    "feature-extraction": ("problem_type", "written before edgepeft copied the model's sentence-transformers settings, "
                           "by which embed pools"),  # which came before every task's manifest recorded problem_type
}


def older_export(base_dir: str, manifest: dict, field: str, what: str) -> None:
    """ConfigError where ``manifest`` predates ``field`` (an earlier edgepeft recorded none; ``what``: what follows from
    it), read as if it held a default: a call would answer otherwise than the model does (a hunt of earlier exports:
    generate ignored generation_config.json, a multi-label classifier was scored by softmax), unsaid."""
    if field not in manifest:
        raise ConfigError(f"{base_dir}: was written by an earlier edgepeft, whose manifest records no {field} ({what}); "
                          f"export every adapter into a fresh --out folder")
