"""Where an adapter is loaded from: its folder in OUT/adapters, or the bytes of a zip of that folder (an app
that downloads adapters), each checked against its manifest before anything is staged."""
from __future__ import annotations

import io
import os
import zipfile
import zlib

from .access import JSON_MOST, REPOINTED, committing, inside, link_to_nothing, located, sha256_bytes, unchanged_while
from .errors import AdapterBaseMismatchError, ArtifactNotFoundError, ConfigError, CorruptArtifactError, EdgePeftError
from .commands import ADAPTERS_DIR, base_flags, copied_base_fix, export_command, folder_fix, made_elsewhere, other_task
from .manifest import (
    ADAPTER_GRAPH, ADAPTER_MANIFEST, BASE_DIR, BASE_MANIFEST, CLASSIFIER_NAMES, check_adapter_graph, check_adapter_manifest,
    enclosing_export, read_adapter_manifest, read_base_manifest,
)
from .slot_checks import uncounted_heads


def _unpacked(archive: zipfile.ZipFile, info: zipfile.ZipInfo, most: int) -> bytes:
    """A member's bytes, unpacked no further than ``most`` bytes or the size it declares, whichever is less (a zip
    bomb, declared or lying about its size, is refused before it unpacks further)."""
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):  # bzip2 and LZMA unpack whole chunks
        raise CorruptArtifactError(f"adapter bytes: {info.filename} is compressed otherwise than a zip of an adapter "
                                   "folder is (stored or deflated); zip it with shutil.make_archive")
    with archive.open(info) as f:
        data = f.read(min(most, info.file_size) + 1)
    if len(data) > most or info.file_size > most:
        raise CorruptArtifactError(f"adapter bytes: {info.filename} unpacks to more than an adapter of this base can "
                                   f"take ({most} bytes); zip an adapter folder from OUT/adapters/")
    return data


def read_adapter_source(source, most: int, base: dict | None = None) -> tuple[str | None, dict, dict]:
    """(folder, {adapter.onnx: bytes}, manifest) for a folder, its graph checked against the manifest's sha256;
    (None, {file: bytes}, manifest) for the bytes of a zip of one, whose files may unpack to ``most`` bytes each (a
    zip bomb is refused by the sizes it declares, before it unpacks). ``base``: the base's manifest (``_manifest``).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        try:
            with zipfile.ZipFile(io.BytesIO(bytes(source))) as archive:
                # the file's own name, whatever its folders (Windows' zips separate them with backslashes)
                members = [i for i in archive.infolist() if _file_name(i.filename) in (ADAPTER_MANIFEST, ADAPTER_GRAPH)]
                if len(members) > len({_file_name(i.filename) for i in members}):
                    raise CorruptArtifactError("adapter bytes: the zip holds more than one adapter folder; zip one "
                                               "folder of OUT/adapters/ per adapter")
                files = {_file_name(i.filename): _unpacked(archive, i, most if _file_name(i.filename) == ADAPTER_GRAPH
                                                           else JSON_MOST) for i in members}  # its manifest: kB
        except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError) as e:
            raise CorruptArtifactError(f"adapter bytes: not a readable zip archive of an adapter folder ({e}); pass the "
                                       "bytes of shutil.make_archive(..., 'zip', 'OUT/adapters/<name>')") from None
        if set(files) != {ADAPTER_MANIFEST, ADAPTER_GRAPH}:
            raise CorruptArtifactError(f"adapter bytes: the zip needs {ADAPTER_MANIFEST} and {ADAPTER_GRAPH}; "
                                       "zip an adapter folder from OUT/adapters/")
        manifest = check_adapter_manifest(files[ADAPTER_MANIFEST], "adapter bytes")
        if manifest["graph"] != ADAPTER_GRAPH or sha256_bytes(files[ADAPTER_GRAPH]) != manifest["sha256"]:
            raise CorruptArtifactError("adapter bytes: adapter.onnx does not match the checksum in adapter.json; "
                                       "zip the adapter folder again")
        return None, files, manifest
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"load_adapter takes an adapter folder (a path) or the bytes of a zip of one, got "
                          f"{type(source).__name__}")
    if not os.fspath(source):  # '' read as the app's directory, and its advice named that for removal
        raise ArtifactNotFoundError("'': an empty path; pass a folder from OUT/adapters/ made by `edgepeft export`")
    path = located(source)  # restaged after an eviction from where it was loaded, whatever the directory then
    if problem := link_to_nothing(path):  # an unmounted disk: Runtime(OUT) left it out, unsaid
        raise ArtifactNotFoundError(problem)
    if not os.path.isdir(path):  # a zip's path, or a file of the folder: "no such adapter folder" named neither
        zipped = os.path.isfile(path) and zipfile.is_zipfile(path)
        raise ArtifactNotFoundError(f"{path}: {'is a file, not an' if os.path.isfile(path) else 'no such'} adapter folder; "
                                    + ("a zip of one loads from its bytes: rt.load_adapter(open(path, 'rb').read())"
                                       if zipped else "pass a folder from OUT/adapters/ made by `edgepeft export`"))
    if not os.path.isfile(os.path.join(path, ADAPTER_MANIFEST)) and (out := _export_of(path)):  # not "remove it"
        what = "an export" if out == path else f"the {os.path.basename(path)} folder of the export {out}"
        raise ArtifactNotFoundError(f"{path}: is {what}, not an adapter's folder; pass one of the folders in "
                                    f"{os.path.join(out, ADAPTERS_DIR)}")
    def read():  # one export's manifest and graph: an --overwrite renaming a new folder in read the old's manifest
        manifest = _manifest(path, base and base["fingerprint"])  # and the new graph ("checksum does not match")
        return path, {ADAPTER_GRAPH: check_adapter_graph(path, manifest, most, base)}, manifest
    return unchanged_while(path, read)


def _manifest(path: str, base: str | None) -> dict:
    """The folder's manifest; while an export committing into OUT has renamed its new base in (``committing``) and
    not yet this folder's manifest for it, that one (REPOINTED), which it renames in next: the adapter was said to
    be "made for another base; an export was stopped", of an export running."""
    manifest = read_adapter_manifest(path)
    waiting = os.path.join(path, REPOINTED)
    parent = os.path.dirname(path)
    if base is None or manifest["base_fingerprint"] == base or os.path.basename(parent) != ADAPTERS_DIR or \
            not committing(os.path.dirname(parent)):
        return manifest
    try:
        with open(waiting, "rb") as f:
            new = check_adapter_manifest(f.read(), path)
    except (OSError, CorruptArtifactError):  # renamed in meanwhile: it is the manifest now
        return read_adapter_manifest(path)
    return new if new["base_fingerprint"] == base else manifest


def _export_of(folder: str) -> str | None:
    """The export OUT that ``folder`` is, or whose base/ or adapters/ folder it is, else None (a stray folder in
    OUT/adapters is one to name as such)."""
    if os.path.isfile(os.path.join(folder, BASE_DIR, BASE_MANIFEST)):
        return folder
    out = enclosing_export(folder)  # OUT/adapters/base, a stray folder, is held by OUT but is not its base
    return out if out == os.path.dirname(folder) else None


def adapter_bound(base_dir: str, base: dict) -> int:
    """The most bytes an adapter of this base may hold (its graph, or one of its tensors unpacked): 4x the base (a
    float32 head beside an int4 base is about that), and 64 MiB more."""
    graph = os.path.join(base_dir, base["graph"])
    return 4 * sum(os.path.getsize(f) for f in (graph, graph + ".data") if os.path.isfile(f)) + (64 << 20)


def _file_name(member: str) -> str:
    return member.replace("\\", "/").rpartition("/")[2]


def base_mismatch(label: str, manifest: dict, path: str | None, base: dict, base_dir: str, out: str
                  ) -> AdapterBaseMismatchError:
    """An adapter exported for another base: made for the base OUT holds now (re-exported since this Runtime
    opened it, as exporting another adapter into OUT does), or for another one."""
    try:
        on_disk = read_base_manifest(base_dir)["fingerprint"]
    except EdgePeftError:
        on_disk = None
    if on_disk == manifest["base_fingerprint"]:
        return AdapterBaseMismatchError(
            f"{label}: adapter {manifest['name']!r} was exported for the base {base_dir} holds now "
            f"({on_disk[:12]}), re-exported since this Runtime opened it ({base['fingerprint'][:12]}); "
            f"open a new Runtime({out!r}) to serve it")
    # OUT's own folder (every Runtime(OUT) loads it): removed or exported into, not another --name
    own = folder_fix(out, path, base, manifest) if path and inside(path, os.path.join(out, ADAPTERS_DIR)) else None
    if merged := base.get("merged_adapter"):  # no export into a --merge export can serve an adapter
        return AdapterBaseMismatchError(f"{label}: {base_dir} holds a --merge export ({merged!r}), which "
                                        f"takes no adapters; {own or 'load it on the export it was made for'}")
    heads = uncounted_heads(base, CLASSIFIER_NAMES if base.get("head_initialised") else ())
    if heads and manifest.get("base_source") == base.get("source"):
        return AdapterBaseMismatchError(  # an export into this OUT is refused alike (export._check_older_fingerprint)
            f"{label}: adapter {manifest['name']!r} was exported from {base.get('source')} by an edgepeft whose "
            f"base fingerprint counts {', '.join(heads)}; {base_dir} was written by an older one that left them "
            "out; export every adapter into a fresh --out folder")
    flags, fix = base_flags(base), own or other_task(manifest, base)  # another task: no export into OUT
    where, held = made_elsewhere(manifest, base), os.path.isdir(os.path.join(out, ADAPTERS_DIR, manifest["name"]))
    if not fix:  # named apart where OUT holds its name; from another folder: where that is OUT's model, else its own export
        fix = (f"{where}export the adapter into this OUT with {export_command('DIR', out, *(('--name', 'NAME') * held), *flags)}"
               + f" (OUT holds an adapter named {manifest['name']!r}; --overwrite would replace it)" * held
               + "; else load it on the export it was made for" * bool(where))
    return AdapterBaseMismatchError(
        f"{label}: adapter {manifest['name']!r} was exported for base {manifest['base_fingerprint'][:12]} "
        f"({manifest.get('base_source')}), but {base_dir} is base {base['fingerprint'][:12]} "
        f"({base.get('source')}); {fix}{copied_base_fix(manifest, base, path)}")
