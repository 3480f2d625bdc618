"""The contract between exporter and runtime: file names, slot names, manifest JSON.

Layout of an export folder ``OUT``::

    OUT/base/model.onnx          frozen base graph, one graph input per adapter slot
    OUT/base/edgepeft.json       base manifest (see ``read_base_manifest``)
    OUT/base/tokenizer.json ...  tokenizer files when the base has them
    OUT/adapters/<name>/adapter.onnx   no inputs, one output per slot it fills
    OUT/adapters/<name>/adapter.json   adapter manifest (see ``read_adapter_manifest``)

A slot is a named graph input of the base graph. Its shape mixes fixed sizes and symbolic axes (strings) such as a
LoRA rank, so an adapter of any rank binds without re-export. Its ``neutral`` value makes the slot a no-op:

    "empty"  a zero-length symbolic axis (rank-0 LoRA): the graph's default initializer
    "base"   the base model's own tensor (a task head): the graph's default initializer
    "ones"   a vector of ones (IA3 scaling): the graph's default initializer
    "zeros"  a vector of zeros (an added bias): the graph's default initializer

Each is stored as an initializer named as the input: a slot left unbound runs the base model exactly.

Virtual tokens (prompt and prefix tuning) are declared by three optional fields:

    phase "prefill"    bound at the first step of a call only (decode steps get the neutral value); it
                       adds virtual tokens, so it comes with a virtual_axis
    target NAME        not a graph input: its value starts the graph input NAME (a past_key_values.*
                       cache input), repeated over the batch
    virtual_axis K     axis K of the value counts virtual tokens; the runtime puts that many ones
                       before the attention mask and counts them in the positions

A slot with a ``target`` adds its tokens as past (positions start after them); a graph input with a ``virtual_axis``
adds them before the input tokens (outputs include them). One more declares virtual tokens the graph adds itself:

    position_axis K    axis K of the value counts tokens the graph puts before the input's keys
                       (an encoder's prefix); the graph starts the input's positions after them,
                       so the runtime counts them against max_positions (mask and positions unchanged)

Rows with different adapters in one graph run (mixed batches, weighted adapters) are declared by three more fields:

    stack_axis K     adapters' values of this slot concatenate along axis K into one bound tensor
    selector NAME    the selector slot that picks each row's share of that stack, or "output":
                     each row reads its own columns of the task output (a head per row)
    selects KIND     on a selector slot (no adapter fills it; the runtime binds it per call):
                     "columns" (rows, 1, width): a weight per stacked column (LoRA: 0 off, 1 on,
                     or the adapter's weight), "adapters" (rows, stacked adapters): a weight per
                     stacked adapter (IA3: 1 for the row's own)

Slots without a ``stack_axis`` do not mix: rows of such an adapter run in a graph run of their own. Neutral selector
values (ones) make the single-adapter path bind nothing more.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from shlex import quote

from .access import (ADAPTER_MANIFEST, STOPPED, adapter_dirs, aside_elsewhere, check_readable, folder_name,
                     link_to_nothing, listed, moved_aside, present, read_json, saved_under_names, sha256_bytes,
                     unexpanded_tilde)
from .base_checks import TOKEN_TYPES, base_value_errors
from .commands import (ADAPTERS_DIR, REEXPORT_BASE, adapter_export_command, adapter_files_fix, export_command,
                       export_name_problem, exported_as, exported_name, fresh_out, hf_peft_folder_fix, unexportable)
from .errors import STOPS, ArtifactNotFoundError, ConfigError, CorruptArtifactError
from .slot_checks import slot_table_errors
from .values import is_kind

FORMAT_VERSION = 4  # 2: fused groups, KV-cache I/O; 3: stackable slots and selectors (mixed batches); 4: token types
LAYOUT_VERSION = 3  # what an adapter, and a base without a token_type_ids input, writes: their layout is format 3's
CLASSIFIER_NAMES = ["classifier", "score"]  # a sequence classifier's head: the only layer whose columns are the output
BASE_DIR = "base"


def stacks_as_output(task: str, module: str) -> bool:
    """A saved layer whose adapters' copies sit side by side in a mixed batch, each row reading its own output
    columns: a classifier's head only (an lm_head, a pooler feed on)."""
    return task == "seq-cls" and module.rpartition(".")[2] in CLASSIFIER_NAMES


def enclosing_export(path: str) -> str | None:
    """The export whose base/ or adapters/ folder holds ``path`` at any depth (folders exports replace), else None."""
    path = os.path.abspath(path)
    while os.path.dirname(path) != path:
        parent = os.path.dirname(path)
        if os.path.basename(path) in (BASE_DIR, ADAPTERS_DIR) and os.path.isfile(os.path.join(parent, BASE_DIR,
                                                                                                BASE_MANIFEST)):
            return parent
        path = parent
    return None


BASE_MANIFEST = "edgepeft.json"
BASE_GRAPH = "model.onnx"
ADAPTER_GRAPH = "adapter.onnx"
WEB_GRAPH = "model.web.onnx"  # the base graph for JavaScript: every slot a required input (exporters/web_graph.py)
NEUTRAL_GRAPH = "neutral.onnx"  # no inputs; the neutral value of every slot model.web.onnx requires
ORT_ADAPTER = "adapter.onnx_adapter"  # the same tensors in ONNX Runtime's own adapter format, where it applies

# Output names follow transformers' ModelOutput field names.
TASK_OUTPUTS = {"causal-lm": "logits", "seq-cls": "logits", "feature-extraction": "last_hidden_state"}


# KV-cache I/O of decoder graphs, named as optimum names them (%d: layer index).
PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"
# Decoder graphs' int64 scalar input: logits for the last N positions only (0: all), as transformers'
# ``logits_to_keep``. Generation binds 1; its default (0) keeps a plain forward's full logits.
LOGITS_TO_KEEP = "logits_to_keep"


def cache_names(cache: dict, direction: str) -> list[str]:
    """Flat cache names for ``direction`` "past" (in) or "present" (out): layer 0 key, layer 0 value, layer 1 key, ..."""
    key, value = cache[f"{direction}_key"], cache[f"{direction}_value"]
    return [name % layer for layer in range(cache["num_layers"]) for name in (key, value)]


def slot_name(method: str, role: str, module: str) -> str:
    """The graph-input name of one slot: ``lora_A.model.layers.0.self_attn.q_proj``.

    The only place slot names are made; exporter and runtime both call it.
    """
    return f"{method}_{role}.{module}"


def slot_axis(method: str, role: str, module: str) -> str:
    """The symbolic axis name of a slot's variable dimension (``lora_r.<module>``)."""
    return f"{method}_{role}.{module}"


@dataclass(frozen=True)
class Slot:
    """One adaptable place in the base graph."""

    name: str  # graph input name, from slot_name()
    method: str  # "lora", "head", ...
    role: str  # "A", "B", "weight", "bias", ...
    module: str  # dotted module path in the task model
    shape: tuple  # ints and symbolic axis names
    dtype: str  # numpy dtype name, e.g. "float32"
    neutral: str  # "empty", "base", "ones" or "zeros" (see module docstring)
    members: tuple = ()  # a slot of a fused group: the member modules, in output order
    phase: str = "every"  # "every" step, or "prefill" (first step) only
    target: str = ""  # the graph input this slot's value starts (a cache input); "" = its own input
    virtual_axis: int | None = None  # axis counting virtual tokens the runtime adds to mask and positions
    position_axis: int | None = None  # axis counting virtual tokens the graph adds itself (they take positions)
    stack_axis: int | None = None  # axis adapters' values concatenate along in a mixed batch
    selector: str = ""  # the selector slot choosing each row's share of the stack, or "output"
    selects: str = ""  # on a selector slot: "columns" or "adapters"

    def to_json(self) -> dict:
        d = {
            "name": self.name,
            "method": self.method,
            "role": self.role,
            "module": self.module,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "neutral": self.neutral,
        }
        if self.members:
            d["members"] = list(self.members)
        if self.phase != "every":  # written only when set, so older slot tables keep their fingerprints
            d["phase"] = self.phase
        for key in ("target", "virtual_axis", "position_axis", "stack_axis", "selector", "selects"):  # in this order
            if (value := getattr(self, key)) not in ("", None):  # an axis 0 is written
                d[key] = value
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Slot":
        return cls(
            name=d["name"],
            method=d["method"],
            role=d["role"],
            module=d["module"],
            shape=tuple(d["shape"]),
            dtype=d["dtype"],
            neutral=d["neutral"],
            members=tuple(d["members"]) if isinstance(d.get("members"), list) else d.get("members", ()),
            phase=d.get("phase", "every"),
            target=d.get("target", ""),
            virtual_axis=d.get("virtual_axis"),
            position_axis=d.get("position_axis"),
            stack_axis=d.get("stack_axis"),
            selector=d.get("selector", ""),
            selects=d.get("selects", ""),
        )


def _check_format(data: dict, path: str, form: str, required: tuple, fix: str) -> None:
    if data.get("format") != form:
        raise CorruptArtifactError(f"{path}: not an edgepeft {form} manifest; {fix}")
    version = data.get("format_version")
    if not (is_kind(version, int) and 1 <= version <= FORMAT_VERSION):  # "3", 3.0, -5: no version (nor is a bool)
        raise CorruptArtifactError(f"{path}: format version {version!r:.40} " + (
            f"is newer than this edgepeft reads ({FORMAT_VERSION}); upgrade edgepeft or re-export with this version"
            if is_kind(version, int) and version > 0 else f"is not a version (a whole number from 1); {fix}"))
    missing = [k for k in required if k not in data]
    if missing:
        raise CorruptArtifactError(f"{path}: manifest lacks {', '.join(missing)}; {fix}")
    for key, (kinds, what) in _FIELD_TYPES.items():
        if key in data and not is_kind(data[key], kinds):
            raise CorruptArtifactError(f"{path}: field {key!r} must be {what}, got {data[key]!r:.60}; {fix}")
    for key in ("file_bytes", "text_files"):  # inspect's sizes, the text files a copy must have
        if any(not isinstance(f, str) or os.path.basename(f) != f or f in ("", ".", "..") for f in data.get(key) or ()):
            raise CorruptArtifactError(f"{path}: field {key!r} must name files in the same folder; {fix}")
    if "graph" in required and (os.path.basename(data["graph"]) != data["graph"] or data["graph"] in ("", ".", "..")):
        raise CorruptArtifactError(f"{path}: field 'graph' must be a file name in the same folder; {fix}")
    if "outputs" in required and not data["outputs"]:
        raise CorruptArtifactError(f"{path}: field 'outputs' names no output; {fix}")
    for key in ("labels", "methods"):  # the element type, which the table does not say
        if isinstance(data.get(key), list) and not all(isinstance(x, str) for x in data[key]):
            raise CorruptArtifactError(f"{path}: field {key!r} must list strings; {fix}")


# Manifest fields that must have these types where present (required ones are checked present first).
_FIELD_TYPES = {
    "model_type": (str, "a string"), "task": (str, "a string"), "inputs": (dict, "an object"),
    "outputs": (dict, "an object"), "vocab_size": (int, "a whole number"),
    "type_vocab_size": ((int, type(None)), "a whole number"), "max_positions": ((int, type(None)), "a whole number"),
    "cache": ((dict, type(None)), "an object"), "generation": (dict, "an object"), "merged_adapter": ((str, type(None)), "a name"),
    "revision": ((str, type(None)), "a hub revision"), "file_bytes": (dict, "an object of file sizes"),
    "file_sha256": (dict, "an object of SHA-256 digests"), "text_files": (list, "a list of file names"),
    "methods": (list, "a list of method names"), "labels": ((list, type(None)), "a list of names"),
    "parameter_bytes": (int, "a whole number"), "problem_type": ((str, type(None)), "a string"),
    **{key: ((int, float, type(None)), "a number") for key in ("rank", "alpha", "qtol")},
    "fingerprint_counts_heads": (bool, "true or false"), "eos_token_id": ((list, type(None)), "a list of token ids"),
    "pad_token_id": ((int, type(None)), "a token id"), "fused_groups": (list, "a list"), "inert_slots": (list, "a list"),
    "quantization": ((str, type(None)), "a string"), "ops": (str, "a string"), "weights_fingerprint": ((str, type(None)), "a string"),
    "source": ((str, type(None)), "a path or hub name"), "peft_config": ((dict, type(None)), "an object"),
    **{key: (str, "a string") for key in ("name", "fingerprint", "base_fingerprint", "graph", "sha256")},
}

_BASE_KEYS = ("model_type", "task", "fingerprint", "inputs", "outputs", "slots", "vocab_size", "graph")
_ADAPTER_KEYS = ("name", "methods", "base_fingerprint", "slots", "graph", "sha256")


def not_an_export(path: str, then=lambda out, name: f"open {out} and pick adapter {name!r}") -> ArtifactNotFoundError:
    """What to do with a folder that holds no export: an adapter folder gets the export command that fits it, and
    ``then(OUT, name)``: what serves the adapter after it (not "use OUT": that runs the base model alone)."""
    if not path:  # an empty argument: "export there first" would advise --out ''
        return ArtifactNotFoundError("'': an empty path; give the folder `edgepeft export --out` wrote")
    if os.path.isfile(path):  # a file of an export (OUT/base/model.onnx), or any file
        out = enclosing_export(os.path.abspath(path))
        return ArtifactNotFoundError(f"{path}: is a file of the export {out}; give {out} itself" if out else
                                     f"{path}: is a file, not an export; give the folder `edgepeft export --out` wrote")
    if problem := unexportable(path):  # "export it first" would be refused
        return problem
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        out, made = fresh_out(path), exported_as(folder_name(path)) if export_name_problem(folder_name(path)) else \
            folder_name(path)  # the name the advised export gave it ("topic_v2"; the next one's: "topic_v2_2")
        if present(os.path.join(out, ADAPTERS_DIR, made, ADAPTER_MANIFEST)):  # made: no second "export it first"
            return ArtifactNotFoundError(  # (refused: the name is taken)
                f"{path}: is an adapter folder (HF PEFT format), not an export; {out} holds its export: {then(out, made)}"
                f" (trained again since: {export_command(path, out, '--name', quote(made), '--overwrite')})")
        return ArtifactNotFoundError(f"{path}: is an adapter folder (HF PEFT format), not an export; export it first "
                                     f"with {adapter_export_command(path, out)}, then {then(out, exported_name(path, out))}")
    if named := saved_under_names(path):  # save_pretrained(selected_adapters=...): "export into it" (a hfsaves hunt)
        sub, out = os.path.join(path, named[0]), fresh_out(path)
        return ArtifactNotFoundError(f"{path}: holds HF PEFT adapters saved under their names ({', '.join(named)}), not "
                                     f"an export; export them first, e.g. {adapter_export_command(sub, out)}, then "
                                     f"{then(out, exported_name(sub, out))}")
    if os.path.isfile(os.path.join(path, "adapter.json")):
        out, name = os.path.dirname(os.path.dirname(os.path.abspath(path))), os.path.basename(os.path.normpath(path))
        return ArtifactNotFoundError(f"{path}: is one adapter of the export {out}; open {out} and pick adapter {name!r}")
    if (out := enclosing_export(path)) or os.path.isfile(os.path.join(path, BASE_MANIFEST)):  # OUT/base, OUT/adapters
        out, part = out or os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.normpath(path))
        return ArtifactNotFoundError(f"{path}: is the {part} folder of the export {out}; open {out} itself")
    if os.path.isfile(os.path.join(path, "config.json")):  # a model folder: its export goes elsewhere
        out = fresh_out(path)
        return ArtifactNotFoundError(f"{path}: is a model folder, not an export; export an adapter trained on it "
                                     f"with {export_command('DIR', out)}, then use {out}")
    if problem := link_to_nothing(path) or link_to_nothing(os.path.join(path, BASE_DIR)):  # "run export first" failed
        return ArtifactNotFoundError(problem)
    if not os.path.lexists(path):  # a typo: say so before what an export there would need
        return ArtifactNotFoundError(unexpanded_tilde(path, "it") or f"{path}: no such folder; give the folder "
                                     f"`edgepeft export --out` wrote, or export there first: {export_command('DIR', path)}")
    if aside := moved_aside(path).get(BASE_DIR):  # "no base here" hid where it was
        return ArtifactNotFoundError(f"{os.path.join(path, BASE_DIR)}: moved aside to {aside} {STOPPED.format(path)}")
    if elsewhere := aside_elsewhere(path, BASE_DIR):
        return ArtifactNotFoundError(f"{os.path.join(path, BASE_DIR)}: missing; {elsewhere}")
    base = os.path.join(path, BASE_DIR)
    if os.path.isdir(base) and listed(base):  # its manifest gone: an export into this OUT refuses files it did not write
        return ArtifactNotFoundError(f"{os.path.join(base, BASE_MANIFEST)}: missing, beside other files (an export's "
                                     f"base whose manifest was removed, or not an export); {REEXPORT_BASE}")
    return ArtifactNotFoundError(f"{base}: a file where the export has a folder; remove it and export again" if  # as
                                 os.path.isfile(base) else  # the JS runtime's: an export there refused the file
                                 f"{base}: no exported base here; run {export_command('DIR', path)} first")


def read_base_manifest(base_dir: str) -> dict:
    """Read and check ``base_dir/edgepeft.json``; slots come back as ``Slot`` objects."""
    path, fix = os.path.join(base_dir, BASE_MANIFEST), REEXPORT_BASE
    data = read_json(path, "base manifest", fix)
    _check_format(data, path, "edgepeft-base", _BASE_KEYS, fix)
    if errors := base_value_errors(data):
        raise CorruptArtifactError(f"{path}: {errors[0]}; {fix}")
    try:
        data["slots"] = [Slot.from_json(s) for s in data["slots"]]
    except (KeyError, TypeError, AttributeError) as e:
        raise CorruptArtifactError(f"{path}: malformed slot table ({e}); {fix}") from None
    errors = slot_table_errors(data["slots"], cache_names(data["cache"], "past") if data.get("cache") else ())
    if errors:  # a hand-edited table: what the runtime would index, hash or hand numpy
        raise CorruptArtifactError(f"{path}: malformed {errors[0]}; {fix}")
    # an encoder's prefix before position_axis: the text at the prefix's positions, not after them
    if older := next((s.name for s in data["slots"] if s.method == "prefix" and not s.target
                      and s.position_axis is None), None):
        raise ConfigError(f"{path}: was written by an older edgepeft (its slot {older} puts the text at the prefix's "
                          "positions, where HF PEFT puts it after them); export every adapter into a fresh --out folder")
    if data["task"] in TASK_OUTPUTS and next(iter(data["outputs"])) != TASK_OUTPUTS[data["task"]]:  # the one returned
        raise CorruptArtifactError(f"{path}: field 'outputs' must list {TASK_OUTPUTS[data['task']]!r} first, a "
                                   f"{data['task']} graph's; {fix}")
    if data["task"] == "causal-lm" and not data.get("cache"):
        raise CorruptArtifactError(f"{path}: a causal-lm base needs its cache table ('cache'); {fix}")
    if not all(is_kind(size, int) for size in data.get("file_bytes", {}).values()):
        raise CorruptArtifactError(f"{path}: field 'file_bytes' must give each file's size in bytes; {fix}")
    return data


def base_file_errors(base_dir: str, manifest: dict, names=None) -> list:
    """The errors of the base's files whose sizes the export recorded (``file_bytes``), and of its text files
    (``text_files``: a copy without tokenizer_config.json cut no text, silently), that are missing or not as long as
    written: a copy to a device cut short. ``names``: of those only."""
    fix, errors = REEXPORT_BASE, []
    for name, size in {**dict.fromkeys(manifest.get("text_files") or ()), **(manifest.get("file_bytes") or {})}.items():
        if names is not None and name not in names:
            continue
        path = os.path.join(base_dir, name)
        if not present(path):  # the JavaScript graphs may be left out of a Python deployment (deploy.md)
            if name not in (manifest.get("web_graph"), manifest.get("neutral_graph")):
                check_readable(path)  # a link into a folder this user may not enter looks missing
                errors.append(ArtifactNotFoundError(f"{path}: missing; {fix}"))
        elif size is not None and os.path.getsize(path) != size:  # a text file may be edited (a chat template)
            errors.append(CorruptArtifactError(f"{path}: {os.path.getsize(path)} bytes where the export wrote {size} "
                                               f"(a copy cut short?); {fix}"))
    return errors


_ADAPTER_FIX = f"re-export the adapter under its folder's name with {export_command('DIR', 'OUT', '--name', 'NAME', '--overwrite')}"


def read_adapter_manifest(adapter_dir: str) -> dict:
    """Read and check ``adapter_dir/adapter.json``."""
    path = os.path.join(adapter_dir, ADAPTER_MANIFEST)
    if not os.path.isfile(path) and os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise ArtifactNotFoundError(f"{adapter_dir}: is an adapter folder in HF PEFT format, not an exported one; "
                                    f"{hf_peft_folder_fix(adapter_dir)}")
    if not os.path.isfile(path) and not os.path.isfile(os.path.join(adapter_dir, ADAPTER_GRAPH)):
        if problem := link_to_nothing(adapter_dir):  # a disk not mounted: not a stray folder to remove
            raise ArtifactNotFoundError(problem)
        check_readable(adapter_dir)  # a folder one may not list looks empty: "remove it" below would be wrong
        raise ArtifactNotFoundError(f"{adapter_dir}: not an exported adapter (no {ADAPTER_MANIFEST}, no {ADAPTER_GRAPH}); "
                                    "remove it if it is a stray folder, or pass a folder of OUT/adapters/ made by "
                                    "`edgepeft export`")
    fix = f"copy {adapter_dir} again from its export, or {_ADAPTER_FIX}"  # a device's copy: no torch to re-export with
    return _checked_adapter_manifest(read_json(path, "adapter manifest", fix), path, fix)


def check_adapter_manifest(data: bytes, label: str) -> dict:
    """Parse and check the bytes of an ``adapter.json`` (an adapter loaded from bytes); ``label`` names it."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, a 5,000-digit number; nested 100,000 deep
        raise CorruptArtifactError(f"{label}: adapter.json is not valid JSON ({e}); {_ADAPTER_FIX}") from None
    if not isinstance(manifest, dict):
        raise CorruptArtifactError(f"{label}: adapter.json is not a JSON object; {_ADAPTER_FIX}")
    return _checked_adapter_manifest(manifest, f"{label}: adapter.json")


def _checked_adapter_manifest(data: dict, path: str, fix: str = _ADAPTER_FIX) -> dict:
    _check_format(data, path, "edgepeft-adapter", _ADAPTER_KEYS, fix)
    if not isinstance(data["slots"], dict):
        raise CorruptArtifactError(f"{path}: 'slots' must map slot names to shapes; {fix}")
    return data


def check_adapter_graph(adapter_dir: str, manifest: dict, most: int, base: dict | None = None) -> bytes:
    """An adapter graph's bytes, read once: the bytes its sha256 was checked on are the bytes that run. Raises the
    error the file has: missing, past ``most`` bytes (``adapter_bound``), or not the file its sha256 names (Raised,
    not returned: a caller's local holding it keeps that frame, and the Runtime, alive). ``base``: OUT's manifest."""
    graph, fix = os.path.join(adapter_dir, manifest["graph"]), lambda: adapter_files_fix(adapter_dir, manifest, base)
    if not present(graph):  # fix(): made on a failure only (a restage under a budget reads the graph every call)
        check_readable(graph)
        raise ArtifactNotFoundError(f"{graph}: adapter graph missing; {fix()}")
    try:
        with open(graph, "rb") as f:
            data = f.read(most + 1)  # no further: a sparse file, or a link to a large one
    except OSError as e:  # a read the disk refuses (EIO, a link to a file that cannot be read so)
        if isinstance(e, STOPS):
            raise
        check_readable(graph)
        raise CorruptArtifactError(f"{graph}: cannot be read ({e.strerror or e}); {fix()}") from None
    if len(data) > most:
        raise CorruptArtifactError(f"{graph}: more than an adapter of this base can take ({most} bytes); {fix()}")
    if sha256_bytes(data) != manifest["sha256"]:
        raise CorruptArtifactError(f"{graph}: checksum does not match adapter.json (truncated or modified file); {fix()}")
    return data
