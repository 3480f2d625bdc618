"""The commands that error messages tell a user to run, spelled once: the same placeholders as docs/cli.md (DIR,
OUT), real paths quoted for a shell, names as export takes them, so a message's command can be pasted and works."""
from __future__ import annotations

import json
import os
import re
from shlex import quote

from .access import ADAPTERS_DIR, REPOINTED, folder_name
from .base_checks import EXPORTED
from .errors import UnsupportedModelError


def export_command(adapter: str = "DIR", out: str = "OUT", *flags: str) -> str:
    """The command in backquotes: `edgepeft export --adapter ADAPTER --out OUT FLAGS...`; ``flags`` as given (quote
    a path among them)."""
    return "`" + " ".join(["edgepeft export --adapter", quote(adapter), "--out", quote(out), *flags]) + "`"


def fresh_out(path: str) -> str:
    """A folder beside ``path`` for a suggested --out: absolute (``.`` would give ``.-onnx``, a hidden folder), its
    name cut to fit a file name's 255 bytes ("File name too long" for a folder of 251 bytes and more)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, name.encode("utf-8", "surrogateescape")[:250].decode("utf-8", "ignore") + "-onnx")


# a damaged base (a device's copy, or the export): no export into OUT mends it
REEXPORT_BASE = "copy the export's base folder again, or re-run `edgepeft export` into a fresh --out folder"
NAME_LENGTH = 100  # OUT/adapters/<name>, and the export's staging folder beside it, within a file name's 255 bytes


def name_problem(name, folder: bool = False) -> str | None:
    """Why a loaded adapter cannot go by ``name`` (load_adapter's, a folder's of OUT/adapters, a zip's), else None:
    any text but a blank one or 'none' (which `edgepeft run --adapter none` reads as the base model); a ``folder``'s
    name also not what the JS runtime's loadAdapter refuses (fixes.js adapterName: both serve one set of folders)."""
    if not isinstance(name, str):
        return "must be a string"
    if not name.strip():
        return "must not be blank"
    if name.lower() == "none":  # a folder named None ran the base model at `edgepeft run --adapter None`
        return "means the base model at the command line (--adapter none)"
    if folder and (name != name.strip() or name.startswith(".") or re.search(r"[/\\\x00-\x1f\x7f-\x9f\ufeff]", name)):
        return "must be a folder's name that is not hidden (no '.' first), with no '/' or '\\', control character " \
               "or spaces at its ends"
    return None


def folder_name_problem(folder: str, name: str) -> str | None:
    """Why Runtime(OUT) (and inspect) refuse the adapter ``folder`` of OUT/adapters by its ``name``, else None."""
    if problem := name_problem(name, folder=True):
        return f"{folder}: the adapter name {name!r:.80} (the folder's) {problem}; rename the folder"
    return None


WINDOWS_DEVICES = re.compile(r"con|prn|aux|nul|com[0-9]|lpt[0-9]", re.IGNORECASE)  # no folder takes these there


def export_name_problem(name: str) -> str | None:
    """Why export cannot write an adapter as ``name`` (``OUT/adapters/<name>``), else None: stricter than a load's."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", name):  # no '.': PyTorch's module names hold the name
        return "must be letters, digits, '_', '-'"
    if not re.match(r"[A-Za-z0-9]", name):  # '-x' reads as an option, '_x' as hidden
        return "must start with a letter or digit"
    if len(name) > NAME_LENGTH:
        return f"is longer than {NAME_LENGTH} characters"
    if WINDOWS_DEVICES.fullmatch(name):  # OUT copied to a Windows device lost that folder (deploy.md's targets)
        return "is a device's name on Windows, where no folder can take it"
    return name_problem(name)


def export_name_suggestion(name: str) -> str | None:
    """A name like ``name`` that export takes (None: none is near), for the message that refuses ``name``."""
    mended = re.sub(r"[^A-Za-z0-9_-]", "_", name).lstrip("_-")[:NAME_LENGTH]
    mended += "_adapter" * bool(WINDOWS_DEVICES.fullmatch(mended))  # aux: aux_adapter
    return mended if mended and not export_name_problem(mended) else None


def exported_as(name: str) -> str:
    """``name`` as export takes it: itself, else a name like it (NAME where none is near)."""
    return name if not export_name_problem(name) else export_name_suggestion(name) or "NAME"


def unused_name(out: str, name: str, taken=frozenset()) -> str:
    """``name``, else ``name_2``, ``name_3``...: the first no folder of OUT/adapters has (nor ``taken``, casefolded
    names), for a suggested --name (a taken one fails, pasted, with "exists; pass --overwrite", which would replace
    another adapter)."""
    candidate, k = name, 1
    while name != "NAME" and (os.path.lexists(os.path.join(out, ADAPTERS_DIR, candidate)) or candidate.casefold() in taken):
        k += 1
        candidate = f"{name[:NAME_LENGTH - len(str(k)) - 1]}_{k}"
    return candidate


def exported_name(folder: str, out: str) -> str:
    """The name the adapter ``folder`` goes by in ``out`` after ``adapter_export_command(folder, out)``: its folder's
    (export's default; for '.', the folder's own), else the --name that command passes."""
    name = folder_name(folder)
    return unused_name(out, exported_as(name)) if export_name_problem(name) else name


def adapter_export_command(folder: str, out: str, *flags: str) -> str:
    """``export_command`` for the adapter ``folder``, with the --name export needs where it refuses the folder's."""
    if export_name_problem(folder_name(folder)):
        flags = ("--name", quote(exported_name(folder, out)), *flags)
    return export_command(folder, out, *flags)


QTOL = 0.2  # export's default --qtol (edgepeft.exporters: export, resolve; edgepeft.cli spells it)


def base_flags(base: dict) -> tuple:
    """The flags an export into OUT repeats, from its base manifest ``base``: export refuses an OUT whose base was
    built otherwise (--quantize, a decoder's --ops standard), and checks a quantized base again by --qtol (another than
    the default: the one it was exported with, which it may pass only by)."""
    qtol = base.get("qtol") if base.get("quantization") else None
    quantized = ("--quantize", base["quantization"]) if base.get("quantization") else ()
    quantized += ("--qtol", repr(float(qtol))) if qtol not in (None, QTOL) else ()  # as given: :g rounded it
    standard = base.get("ops", "standard") == "standard"  # a manifest before the field: standard, as export reads it
    return quantized + (("--ops", "standard") if standard and base.get("task") == "causal-lm" else ())


def other_task(adapter: dict, base: dict) -> str:
    """Where the adapter (its manifest) was made for another task than OUT's base, which no export into this OUT
    takes ("re-export it into this OUT" was refused): what serves it; else ""."""
    if adapter.get("task") in (None, base.get("task")):
        return ""
    return (f"it was made for a {adapter['task']} export (of {adapter.get('base_source')}), not this {base.get('task')} "
            "one: load it on the export it was made for")


def made_elsewhere(adapter: dict, base: dict) -> str:
    """"where X is the model of Y, ": the condition an export into this OUT takes the adapter on, where it was made from
    another folder than OUT's base (export refuses another model's); else ""."""
    made, source = adapter.get("base_source"), base.get("source")
    return f"where {made} is the model of {source}, " if made and source and made != source else ""


def folder_fix(out: str, folder: str, base: dict, adapter: dict | None = None) -> str:
    """What mends a folder of OUT/adapters made for another base (every Runtime(OUT) refuses it): removing it, or on
    a slot base re-exporting its adapter into it (``base``: OUT's base manifest, whose flags the export repeats);
    where an export stopped before re-pointing it, running that again. ``adapter``: its manifest, where read: one made
    for another task (``other_task``) or from another folder is said so."""
    if base.get("merged_adapter"):
        return f"remove it from {os.path.dirname(os.path.normpath(folder))}, or export it into another --out"
    if other := other_task(adapter or {}, base):
        return f"remove {folder}: {other}"
    name, flags = os.path.basename(os.path.normpath(folder)), base_flags(base)
    where = made_elsewhere(adapter or {}, base)
    then = ", " if where else " "  # "remove X, or, where ..., re-export"
    if export_name_problem(name):  # export cannot write that folder: it goes, its adapter comes back by another name
        return f"remove {folder}, then{then}{where}re-export its adapter into this OUT: " \
               f"{export_command('DIR', out, '--name', quote(unused_name(out, exported_as(name))), *flags)}"
    again = f"{where}{reexport_into(out, name, base)}"
    if os.path.isfile(os.path.join(folder, REPOINTED)):  # its manifest for the new base waits beside it: not to remove
        return (f"an export into {out} was stopped before it re-pointed it; run that export again (where OUT can be "
                f"locked, not on Windows, it finishes that first), or{then}{again}")
    return f"remove {folder}, or{then}{again}"


def reexport_into(out: str, name: str, base: dict, source: str = "DIR", *more: str) -> str:
    """The re-export that mends OUT's adapter folder ``name`` (``base``: OUT's base manifest, whose flags it repeats;
    ``source``: the adapter's folder, where known; ``more``: flags besides)."""
    flags = ("--name", quote(name), "--overwrite", *base_flags(base), *more)
    return f"re-export its adapter into this OUT: {export_command(source, out, *flags)}"


def export_folder_of(folder: str) -> str | None:
    """The export OUT whose adapters/ holds ``folder``, else None (a folder of adapters kept elsewhere)."""
    parent = os.path.dirname(os.path.abspath(folder))
    out = os.path.dirname(parent)
    return out if os.path.basename(parent) == ADAPTERS_DIR and os.path.isfile(os.path.join(out, "base", "edgepeft.json")) \
        else None


def adapter_files_fix(folder: str, manifest: dict, base: dict | None) -> str:
    """What mends an exported adapter's missing or damaged file: its folder copied again (a device's copy cut short),
    or its adapter (the manifest's ``source``) re-exported into its OUT (``base``: its base manifest, where known; its
    ``source`` as --base where the adapter records another, as an export with --base made it)."""
    if (out := export_folder_of(folder)) is None:  # a folder loaded from elsewhere: no OUT to re-export into
        return f"copy {folder} again from the export it came from"
    source = manifest.get("source") if isinstance(manifest.get("source"), str) else "DIR"
    given, recorded = (base or {}).get("source"), (manifest.get("peft_config") or {}).get("base_model_name_or_path")
    more = ("--base", quote(given)) if isinstance(given, str) and given and given != recorded else ()
    name = os.path.basename(os.path.normpath(folder))
    return f"copy {folder} again from its export, or {reexport_into(out, name, base or {}, source, *more)}"


def hf_peft_folder_fix(folder: str) -> str:
    """What mends an HF PEFT adapter folder where an exported one is looked for: exported first; one copied into an
    OUT's adapters/ (which every Runtime of that OUT refuses, and which export refuses as --adapter) moved out first,
    then exported into that OUT with the flags its base was built with."""
    if (out := export_folder_of(folder)) is None:
        return f"export it first with {export_command(folder)}, then load its folder in OUT/adapters/"
    parent = os.path.dirname(os.path.abspath(folder))
    try:
        with open(os.path.join(out, "base", "edgepeft.json"), encoding="utf-8") as f:
            flags = base_flags(json.load(f))
    except (OSError, ValueError, TypeError, AttributeError, KeyError):  # no base, or not its manifest: none named
        flags = ()
    return f"move it out of {parent} (mv {quote(folder)} DIR), then export it into this OUT with " \
           f"{export_command('DIR', out, *flags)}"


def copied_base_fix(adapter: dict, base: dict, folder: str | None) -> str:
    """The other fix for an adapter of this base's model made for another export of it: where OUT is a copy (a device
    with the runtime alone cannot export), the newer export's files (an adapter needing new slots, another method or
    targets, brought a new base; the export re-pointed the other adapters to it). Empty where an export into OUT
    stopped before re-pointing ``folder`` (folder_fix says to run it again)."""
    if adapter.get("base_source") in (None, "") or adapter.get("base_source") != base.get("source") or (
            folder and os.path.isfile(os.path.join(folder, REPOINTED))) or other_task(adapter, base):
        return ""
    return "; or, where this OUT is a copy, copy the export it came from again: its base folder and every adapter"


def pairs_fix(manifest: dict) -> str:
    """What serves text pairs from a BERT classifier an earlier edgepeft exported (its graph took no token types)."""
    if manifest.get("merged_adapter"):  # no slot adapter goes into it: the merge itself is written again
        return "export it again with --merge --overwrite (its base is then written with token types)"
    if not manifest.get("format_version", 0) >= 3 or "generation" not in manifest:  # export refuses to add to it
        return "export every adapter into a fresh --out folder (an earlier edgepeft's export takes no new adapter)"
    return ("export an adapter into it again (its base is then written with token types), or every adapter into a "
            "fresh --out folder")


def unexportable(folder: str) -> UnsupportedModelError | None:
    """The refusal an export of ``folder`` would end in, where it is a model folder (or an adapter folder recording
    one here) of a model type edgepeft does not export: "export it first" led there (an archs hunt)."""
    config = os.path.join(folder, "config.json")
    try:
        if not os.path.isfile(config):  # an adapter folder: its recorded base, where that is a folder here
            with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as f:
                config = os.path.join(json.load(f)["base_model_name_or_path"], "config.json")
        with open(config, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, TypeError, AttributeError, KeyError):  # no such file, not JSON, a hub id: not known
        return None
    if not isinstance(model_type, str) or model_type in EXPORTED:
        return None
    return UnsupportedModelError(f"{folder}: is not an export, and {config}'s model type {model_type!r} is one edgepeft "
                                 f"does not export; it exports {', '.join(EXPORTED)} models: train "
                                 "on one of those")
