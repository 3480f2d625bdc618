"""Resolve an export: the adapters, their base and task, and a PeftModel holding every adapter (the PyTorch
reference), checked against OUT before anything is written (export.py's first step)."""
from __future__ import annotations

import copy
import functools
import os
import shlex
import shutil
from dataclasses import dataclass, field

from edgepeft.config import CONFIG_NAME, naming_config
from edgepeft.errors import AdapterBaseMismatchError, ArtifactNotFoundError, ConfigError, EdgePeftError
from edgepeft.exporters.adapter_graph import saved_labels
from edgepeft.exporters.fingerprint import config_differences, made_heads, weights_fingerprint
from edgepeft.exporters.fusion import shared_input_groups
from edgepeft.exporters.validate import check_room
from edgepeft.files import check_output_dir, write_json_atomic
from edgepeft.hub import cached_folder
from edgepeft.model_checks import check_traceable, sliding_layers
from edgepeft.models import (call_kwargs, check_supported, default_task, load_base, load_model_config, max_positions,
                             model_label, sample_inputs, sentence_transformers_folder)
from edgepeft.peft_model import PeftModel
from edgepeft.runtimes.access import REPOINTED, link_to_nothing, located
from edgepeft.runtimes.commands import QTOL, export_name_problem, export_name_suggestion, fresh_out, unused_name
from edgepeft.runtimes.sentence import has_sentence_transformers_files, sentence_transformers_settings
from edgepeft.runtimes.values import switch
from edgepeft.runtimes.manifest import (
    ADAPTER_MANIFEST, ADAPTERS_DIR, BASE_DIR, BASE_MANIFEST, adapter_dirs, enclosing_export, read_base_manifest,
)
from edgepeft.training.checkpoint import check_outside_checkpoints
from edgepeft.tuners import load_config, specs_for


@dataclass
class AdapterSource:
    name: str
    path: str
    config: object
    labels: list | None = None  # labels.json's, read with the weights (``saved_labels``)


@dataclass
class ExportPlan:
    """What one export works from: resolved before anything is written."""

    out: str
    sources: list  # AdapterSource, in the order given
    source: str  # the base model: a folder or hub id
    task: str
    model: object  # the plain base (float32, eval)
    peft: PeftModel  # every adapter on a copy of the base: the PyTorch reference
    existing: dict | None  # OUT's base manifest, when there is one
    groups: list  # fused layer groups (q|k|v, gate|up)
    atol: float = 1e-4
    qtol: float = QTOL
    quantize: str | None = None
    ops: str = "contrib"  # contrib_ops.py: ONNX Runtime's fused kernels where the model allows
    ort_adapter: bool | None = None  # None: where the base is float
    overwrite: bool = False
    log: object = field(default=lambda *a, **k: None)
    siblings: dict = field(default_factory=dict)  # {folder: manifest} of adapters already in OUT, when the base changes
    revision: str | None = None  # the hub revision of ``source`` the adapters record (None: the default branch)

    @property
    def base_dir(self) -> str:
        return os.path.join(self.out, BASE_DIR)

    def config(self, src: AdapterSource):
        return self.peft.peft_config[src.name]

    def taken_along(self, base: dict) -> dict:
        """{folder: its manifest re-pointed to ``base`` (a new base manifest)} of the adapters already in OUT that the
        new base serves (every slot they read is in it); the others stay as they are, refused by the new base."""
        slots = {s.name for s in base["slots"]}
        return {folder: {**manifest, "base_fingerprint": base["fingerprint"]}
                for folder, manifest in self.siblings.items() if set(manifest["slots"]) <= slots}

    def staged_repointing(self, folder: str, manifest: dict, staging) -> tuple[str, str]:
        """(staged, target) for ``commit``: ``manifest`` (an adapter of OUT re-pointed to a new base) written beside
        the folder's own, to rename in; where OUT/adapters holds a link (another export's adapter, shared), a copy of
        what it leads to with that manifest, to take the link's place: a manifest written through the link gave the
        other export's adapter this export's new base, and that export refused it."""
        if not os.path.islink(folder):
            write_json_atomic(staged := os.path.join(folder, REPOINTED), manifest, sort_keys=True)
            return staged, os.path.join(folder, ADAPTER_MANIFEST)
        stage = staging.new(os.path.dirname(folder), os.path.basename(folder))
        shutil.copytree(folder, stage, ignore=lambda _, names: [n for n in names if n.startswith(".")],
                        dirs_exist_ok=True)
        write_json_atomic(os.path.join(stage, ADAPTER_MANIFEST), manifest, sort_keys=True)
        self.log(f"note: {folder} was a link to {os.path.realpath(folder)}, an adapter made for OUT's old base: OUT "
                 "now holds a copy of it for the new base, and what the link led to stays as it was")
        return stage, folder

    @functools.cached_property
    def weights_fp(self) -> str:
        """The base weights' fingerprint (a hash of every tensor: computed once). A head made at load is no base
        weight; the base's own heads count (the graph uses them where no adapter fills their slot)."""
        return weights_fingerprint(self.model, skip_modules=made_heads(self.model))


def path_arguments(adapters, base, names) -> tuple:
    """export's adapters (one folder, or several) and base as strings, its names a list of strings (None: none), else
    ConfigError: an os.PathLike other than pathlib's was "<Where object at 0x...>: not found", bytes iterated into
    numbers ("47/adapter_config.json: not found"), a name not a string a TypeError."""
    def text(value, what: str, kind: str = "folder paths (strings, or os.PathLike)") -> str:
        value = os.fspath(value) if kind != "strings" and isinstance(value, os.PathLike) else value
        if not isinstance(value, str):
            raise ConfigError(f"export's {what} must be {kind}, got {type(value).__name__}; e.g. "
                              "export(['adapters/intent'], 'OUT', names=['intent'])")
        return value

    adapters = [adapters] if isinstance(adapters, (str, bytes, os.PathLike)) else list(adapters)  # a generator too
    names = [names] if isinstance(names, str) else None if names is None else list(names)  # one name, not its letters
    return ([text(a, "adapters") for a in adapters],
            None if base is None else text(base, "base", "a model folder or hub id (a string, or os.PathLike)"),
            None if names is None else [text(n, "names", "strings") for n in names])


def export_arguments(out, merge, overwrite, verbose, ort_adapter) -> tuple:
    """export's OUT as a string and its switches as bools, else ConfigError: OUT None was a folder named None, and
    merge="no" merged (read by truthiness)."""
    if not isinstance(out, (str, os.PathLike)):
        raise ConfigError(f"export's out must be a folder path (a string), got {type(out).__name__}; give the folder "
                          "to export into, e.g. export(adapters, 'OUT')")
    return (os.fspath(out), *(switch(v, n) for v, n in ((merge, "merge"), (overwrite, "overwrite"), (verbose, "verbose"))),
            None if ort_adapter is None else switch(ort_adapter, "ort_adapter", " (None: where the format holds it)"))


def resolve(adapters, out, base, names, **options) -> ExportPlan:
    """Read the adapters, find their base and task, load both, and check OUT can take them."""
    for sub in (BASE_DIR, ADAPTERS_DIR):  # a file in the way, or no write access: say so before any work
        check_output_dir(os.path.join(out, sub), "--out")
    check_outside_checkpoints(out)  # a training run's next save replaced the export, unsaid
    sources = _read_sources(adapters, names, out)
    if (export := enclosing_export(os.path.realpath(out))) is not None:  # through a link too
        raise ConfigError(f"{out}: lies inside the export {export}; give --out {shlex.quote(export)} to add the adapter "
                          "to that export")
    if os.path.isfile(os.path.join(out, CONFIG_NAME)):
        raise ConfigError(f"{out}: is an adapter folder (it has {CONFIG_NAME}); give --out a new folder for the export, "
                          f"e.g. --out {shlex.quote(fresh_out(out))}")
    source = _base_of(sources, base)
    revision = _revision_of(sources, source)
    _check_out_replaces_nothing_of_the_users(out, sources, source)
    try:
        model_config = load_model_config(source, revision=revision)
    except ArtifactNotFoundError as e:  # a folder the adapter records, moved since: say where the path came from
        if base is not None:
            raise
        raise ArtifactNotFoundError(f"{e} (base_model_name_or_path in {os.path.join(sources[0].path, CONFIG_NAME)})") from None
    task = _task_of(sources, model_config.model_type)
    try:
        check_supported(model_config.model_type, task, source)
    except EdgePeftError as e:  # --base of another kind ("use seq-cls": export takes no task): the adapter's own base
        recorded = base is not None and sources[0].config.base_model_name_or_path
        if not recorded or _same(recorded) == _same(source):
            raise
        raise type(e)(f"{str(e).rsplit('; ', 1)[0]}; {sources[0].path} was trained on {recorded}: drop --base to "
                      "export it with that base") from None
    options["log"](f"loading base {model_label(source, revision)} ({model_config.model_type}, {task})")
    model = load_base(source, task, revision=revision, config=model_config)
    if base:
        _check_recorded_bases(sources, source, model, task, revision)
    peft = PeftModel(copy.deepcopy(model))
    for src in sources:
        peft.load_adapter(src.path, src.name)
        src.labels = saved_labels(src.path) if task == "seq-cls" else None  # with its weights: a later run's are its own
        check_room(max_positions(model_config), getattr(peft.peft_config[src.name], "num_virtual_tokens", None) or 0,
                   src.path)  # before the base is traced, not after
    check_traceable(max_positions(model_config), any(getattr(c, "num_virtual_tokens", None) for c in peft.peft_config.values()),
                    source)
    peft.eval()
    manifest = os.path.join(out, BASE_DIR, BASE_MANIFEST)
    existing = read_base_manifest(os.path.dirname(manifest)) if os.path.exists(manifest) else None
    groups = _fusion_groups(model, [peft.peft_config[s.name] for s in sources])
    return ExportPlan(out, sources, source, task, model, peft, existing, groups, revision=revision, **options)


def _check_out_replaces_nothing_of_the_users(out, sources, source) -> None:
    """Before any work: OUT's base and adapter folders are replaced by exports only, never a model or an input."""
    base_dir = os.path.join(out, BASE_DIR)
    if os.path.isdir(base_dir) and os.listdir(base_dir) and not os.path.isfile(os.path.join(base_dir, BASE_MANIFEST)):
        raise ConfigError(f"{base_dir}: holds files but no {BASE_MANIFEST} (not an edgepeft export), and the export "
                          f"would replace it; give --out a new folder, e.g. --out {shlex.quote(fresh_out(out))}")
    owned = [os.path.realpath(os.path.join(out, sub)) for sub in (BASE_DIR, ADAPTERS_DIR)]
    for what, path in [("--base", source), *(("--adapter", s.path) for s in sources)]:
        real = os.path.realpath(path)
        if os.path.exists(path) and any(real == o or real.startswith(o + os.sep) for o in owned):
            raise ConfigError(f"{path}: this {what} folder lies inside {out}'s base/ or adapters/, which the export "
                              "replaces; move it out of the --out folder first")
    held = adapter_dirs(out)
    for src in sources:  # a copy of OUT to a device (or OUT on one) would hold one folder for the two
        if src.name not in held and (other := next((n for n in held if n.casefold() == src.name.casefold()), None)):
            def flags(name):  # every adapter's, in order: "--name X" alone went to the first --adapter
                return name_flags(name if s is src else s.name for s in sources)
            another = unused_name(out, src.name, {s.name.casefold() for s in sources})
            raise ConfigError(f"{src.path}: {out} holds an adapter named {other!r}, one folder with {src.name!r} on macOS "
                              f"and Windows; pass {flags(other)} --overwrite to replace it, or another name "
                              f"({flags(another)}){', in --adapter order' * (len(sources) > 1)}")
    trained = [n for n, d in held.items()  # a training run's output (./adapters/<name>, as the README's)
               if os.path.isfile(os.path.join(d, CONFIG_NAME)) and not os.path.isfile(os.path.join(d, ADAPTER_MANIFEST))]
    if trained:
        raise ConfigError(f"{os.path.join(out, ADAPTERS_DIR)}: holds {', '.join(trained)}: HF PEFT adapter folders, not "
                          "exported ones, which the export would take for its own; give --out a folder of its own, e.g. "
                          f"--out {shlex.quote(fresh_out(out))}")


def _name_flags(out: str, sources: list, name: str | None) -> str:
    """" (e.g. --name ...)" naming the adapters read so far as they are and the next one like ``name``, a name neither
    they nor OUT/adapters hold (`unused_name`); "" where none is near. --name values go to the --adapter folders in
    order: "--name X" alone, pasted, renamed the first adapter."""
    if name is None:
        return ""
    flags = name_flags([*(s.name for s in sources), unused_name(out, name, {s.name.casefold() for s in sources})])
    return f" (e.g. {flags}{', in --adapter order' * bool(sources)})"


def name_flags(names) -> str:
    """``--name A --name B ...``: one per --adapter folder, in their order (as export gives names to them)."""
    return " ".join(f"--name {shlex.quote(n)}" for n in names)


def _read_sources(adapters, names, out: str) -> list[AdapterSource]:
    adapters = [str(a) for a in adapters]
    names = list(names or [])
    if len(names) > len(adapters):
        raise ConfigError(f"got {len(names)} --name values for {len(adapters)} --adapter folders; give one name per adapter")
    sources = []
    for i, path in enumerate(adapters):
        if not path:
            raise ConfigError("--adapter '': an empty path; give --adapter an adapter folder (save_pretrained's)")
        where = located(path)  # a name not UTF-8 refused: safetensors reads none ("download the adapter again" did not
        config = load_config(path)  # mend); a folder that is not there is named so, before a name taken from it
        name = names[i] if i < len(names) else os.path.basename(where)  # 'LINK/..' where the system goes, '.' its own
        problem = export_name_problem(name)
        if problem:
            mended = export_name_suggestion(name)
            given = "choose another --name" if i < len(names) else "pass --name"
            shown = repr(name if len(name) <= 80 else name[:77] + "...")
            raise ConfigError(f"{path}: adapter name {shown} {problem}; {given}{_name_flags(out, sources, mended)}")
        if problem := link_to_nothing(os.path.join(out, ADAPTERS_DIR, name)):  # a folder cannot be renamed onto it
            raise ConfigError(f"{problem}, or pass --name{_name_flags(out, sources, name)}")
        if other := next((s.name for s in sources if s.name.casefold() == name.casefold()), None):
            both = f"both named {name!r}" if other == name else f"named {other!r} and {name!r}, one folder on macOS " \
                "and Windows"  # a copy to such a device keeps one of the two
            raise ConfigError(f"{path}: two adapters are {both}; pass --name to tell them apart"
                              + _name_flags(out, sources, name))
        sources.append(AdapterSource(name, path, config))
    return sources


def _base_of(sources, base) -> str:
    if base is None:
        named = [s.config.base_model_name_or_path for s in sources]
        if None in named or "" in named:
            missing = next(s for s in sources if not s.config.base_model_name_or_path)
            raise ConfigError(f"{missing.path}: adapter_config.json names no base_model_name_or_path; pass --base MODEL")
        if len({_same(n) for n in named}) > 1:
            raise ConfigError(f"the adapters name different bases ({', '.join(sorted(set(named)))}); export them into "
                              "separate --out folders or pass --base")
        base = named[0]
    # '' too: check_model_source refuses it; a folder recorded absolute (a paths hunt: inspect showed it as a hub id)
    return located(base) if os.path.isdir(base) else str(base)


def _same(source: str) -> str:
    """A base as one model: a folder by its real path (one adapter may name it relative, another absolute)."""
    return os.path.realpath(source) if os.path.isdir(source) else source


def _revision_of(sources, source: str) -> str | None:
    """The hub revision the adapters record for ``source`` (HF PEFT's AutoPeftModel loads it); None: the default
    branch, a folder, or another model than they record (``--base``). One export serves one revision."""
    if os.path.isdir(source):  # a folder has no revisions: transformers and HF PEFT ignore one
        return None
    recorded = [s for s in sources if _same(s.config.base_model_name_or_path or "") == _same(source)]
    revisions = {s.config.revision or "main" for s in recorded}  # unset is the default branch, as HF loads it
    if len(revisions) > 1:
        named = ", ".join(f"{s.path}: {s.config.revision or 'main (unset)'}" for s in recorded)
        raise ConfigError(f"the adapters name different revisions of {source} ({named}); one export folder holds one "
                          "base, so export them into separate --out folders")
    revision = revisions.pop() if revisions else None
    return None if revision == "main" else revision


def _task_of(sources, model_type: str) -> str:
    tasks = set()
    for s in sources:  # task_type, else the model class HF PEFT recorded, else the model type's usual task (not the
        try:  # class that saved the base: an adapter for another task than the checkpoint's is trained on it too)
            tasks.add(s.config.task or s.config.recorded_task or default_task(model_type))
        except EdgePeftError as e:
            raise naming_config(e, s.path) from None
    if len(tasks) > 1:
        raise ConfigError(f"the adapters are for different tasks ({', '.join(sorted(tasks))}); one export folder serves "
                          "one task, so export them into separate --out folders")
    return tasks.pop()


def adapter_slots(model, config, groups=(), path: str | None = None) -> list:
    """Every slot an adapter with ``config`` fills: its method's and those every adapter has (task heads). A config
    the model cannot take is refused naming the adapter's folder ``path``."""
    try:
        return [s for spec in specs_for(config) for s in spec.slot_table(model, config, groups)]
    except EdgePeftError as e:
        if path is None:
            raise
        raise naming_config(e, path) from None


def usable_slots(plan, src, usable: set, task_output: str) -> list:
    """The slots of ``src`` the base graph has (``usable``: its inert ones, which reach no output, left out); none at
    all is refused: an adapter graph of no output fails in ONNX Runtime, named as a damaged staging file."""
    found = adapter_slots(plan.model, plan.config(src), plan.groups)
    if not (slots := [s for s in found if s.name in usable]) and found:
        modules = ", ".join(sorted({s.module for s in found} & dict(plan.model.named_modules()).keys())[:3])
        raise ConfigError(f"{src.path}: none of the adapter's modules ({modules}) reaches {task_output}, this "
                          "export's output: it would change nothing here (HF PEFT's output is the base's); train it "
                          "on modules the output reads (target_modules), or leave it out")
    return slots


def copy_fixes(config) -> set:
    """The config keys a copy of the base ``config`` was told to set by that base's refusal (model_checks.check_exportable,
    load_base), passed as --base: sliding-window layers turned to full attention (transformers drops the window), a
    missing pad_token_id set. Only those the base has as its refusal names them: another difference still counts."""
    return ({"use_sliding_window", "sliding_window", "layer_types"} if sliding_layers(config) else set()) | (
        {"pad_token_id"} if getattr(config, "pad_token_id", 0) is None else set())


def _check_recorded_bases(sources, source: str, model, task: str, revision: str | None = None) -> None:
    """``--base`` given: refuse an adapter whose recorded base (a folder, or a hub id this machine's cache holds: its
    snapshot, read without the network) has other weights than ``source``,
    apart from the heads the adapter carries itself (modules it trains whole) and heads made at load."""
    own = {}  # per adapter: the base modules it replaces with its own (its slots whose neutral value is the base's)
    for src in sources:
        try:
            own[src.name] = {s.module for s in adapter_slots(model, src.config, path=src.path) if s.neutral == "base"}
        except EdgePeftError as e:  # an adapter this model cannot take: most likely made for the base it records
            recorded = src.config.base_model_name_or_path
            if not recorded or _same(recorded) == _same(source):
                raise
            raise type(e)(f"{e}; it was trained on {recorded}: drop --base to export it with that base") from None
    by_base = {}  # each recorded folder loaded once however many adapters name it, and let go before the next
    ours = cached_folder(source, revision) or source  # a hub id: its snapshot in this machine's cache
    for src in sources:
        recorded = src.config.base_model_name_or_path
        if (folder := recorded and cached_folder(recorded, src.config.revision)) and _same(folder) != _same(ours):
            by_base.setdefault(_same(folder), []).append((src, folder))
    for pairs in by_base.values():
        (first, folder), recorded = pairs[0], pairs[0][0].config.base_model_name_or_path
        try:  # the fix to name: the adapter's record of it, not --base (given already)
            theirs = load_base(folder, task, flag=f"base_model_name_or_path in {first.path}'s adapter_config.json",
                               checked=False)  # its weights compared: a copy set as its refusal says is --base
        except EdgePeftError as e:
            if folder != recorded:  # a snapshot the cache holds in part (a shard gone): not compared, as before
                continue
            raise type(e)(f"{first.path}: records the base {recorded}, which --base {source} is compared with: {e}; "
                          f"where --base is that model, set base_model_name_or_path to it in {first.path}'s "
                          "adapter_config.json") from None
        settings = task == "feature-extraction" and [  # None: not known (the files not in a snapshot here), not compared
            folder if os.path.isdir(recorded) or has_sentence_transformers_files(folder) else None,
            source if os.path.isdir(source) else sentence_transformers_folder(source, revision)]  # as export reads it
        for src, _ in pairs:
            _compare_recorded(src, recorded, source, theirs, model, own[src.name], settings)
        del theirs


def _compare_recorded(src, recorded: str, source: str, theirs, model, own: set, settings: list | None) -> None:
    """Refuse ``src`` when its recorded base ``theirs`` has other weights, config or sentence-transformers settings
    (read from ``settings``' two folders: an embed hunt found a CLS-trained adapter served mean-pooled) than --base's
    ``model``, apart from the heads the adapter carries itself (``own``) and heads made at load. Another tokenizer is
    --base's to give (cli.md: an adapter saved with its own tokenizer is exported with a --base folder holding it)."""
    ours_skip, their_skip = (own | made_heads(m) for m in (model, theirs))
    if weights_fingerprint(theirs, their_skip, config=False) == weights_fingerprint(model, ours_skip, config=False):
        differ = [k for k in config_differences(theirs, model) if k not in copy_fixes(theirs.config)]
        positions = max_positions(model.config)
        theirs_st, ours_st = settings or (None, None)
        if not differ and theirs_st and ours_st and \
                sentence_transformers_settings(theirs_st, positions) != sentence_transformers_settings(ours_st, positions):
            raise AdapterBaseMismatchError(
                f"{src.path}: was trained on {recorded}, whose sentence-transformers settings (pooling, length: "
                f"modules.json, 1_Pooling/, sentence_bert_config.json) differ from --base {source}'s (the weights are "
                "the same); make them agree, or export it with the base it was trained on (drop --base)")
        if not differ:
            return
        raise AdapterBaseMismatchError(
            f"{src.path}: was trained on {recorded}, whose config.json differs from --base {source}'s in "
            f"{', '.join(differ)} (the weights are the same); make the two "
            "config.json files agree, or export it with the base it was trained on (drop --base)")
    raise AdapterBaseMismatchError(
        f"{src.path}: was trained on {recorded}, whose weights differ from --base {source}; export it with the "
        "base it was trained on (drop --base), or train it again on this base")


def _fusion_groups(model, configs) -> list[list[str]]:
    """Layers reading the same input (q/k/v, gate/up), except those a spec keeps apart (heads trained whole, ...)."""
    ids, mask = sample_inputs(model.config)
    groups = shared_input_groups(model, lambda: model(input_ids=ids, attention_mask=mask, **call_kwargs(model.config)))
    keep_apart = {m for c in configs for spec in specs_for(c) for m in spec.unfused(model, c)}
    return [g for g in groups if not keep_apart.intersection(g)]
