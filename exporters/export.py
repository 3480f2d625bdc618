"""``edgepeft export``: base once, each adapter as its own small graph, all validated.

    adapter dirs --> resolve: the base, the task, a PeftModel holding every adapter (the PyTorch reference)
                 --> plan slots: the union of the adapters' slot tables (OUT's base reused when it has them)
                 --> trace base (base_graph.py)  --> write adapters (adapter_graph.py)
                 --> validate each against PyTorch (validate.py), then the quantized base
                 --> commit: rename the staged folders into place
    (resolve.py holds the first step; this module the rest, in that order)

Everything is written into hidden staging folders under OUT and renamed into place
only after validation passes, so a failed export leaves OUT as it was.
"""
from __future__ import annotations

import os

from edgepeft.errors import AdapterBaseMismatchError, ConfigError, EdgePeftError, StorageError, noted, printed
from edgepeft.exporters import ort_adapter as ort_format
from edgepeft.exporters.adapter_graph import read_labels, set_labels, write_adapter
from edgepeft.exporters.base_graph import (note_adapter_tokenizers, quantize_stage, side_difference, take_made_heads,
                                           trace_base, write_side_files)
from edgepeft.exporters.generation_settings import generation_fields
from edgepeft.exporters.contrib_ops import check_ops, effective_ops
from edgepeft.exporters.fingerprint import made_heads, weights_fingerprint
from edgepeft.exporters.leftovers import abandoned, finish_repointing
from edgepeft.exporters.merged import check_mergeable, export_merged
from edgepeft.exporters.quantize import check_quantize, note_contrib_matmuls
from edgepeft.exporters.resolve import (ExportPlan, adapter_slots, export_arguments, path_arguments, resolve,
                                       usable_slots)
from edgepeft.exporters.validate import (BaseOutputs, check_head_widths, check_tolerances, compare_siblings, log_check,
                                         validate)
from edgepeft.files import (Staging, check_output_dir, missing_folders, remove_empty, remove_moved_aside,
                            reporting_full_disk)
from edgepeft.interrupts import written_whole
from edgepeft.sharing import check_replaceable, one_at_a_time
from edgepeft.models import model_label, reads_token_types
from edgepeft.runtimes.access import as_read, aside_elsewhere, may_replace
from edgepeft.runtimes.commands import QTOL
from edgepeft.runtimes.manifest import (ADAPTER_MANIFEST, ADAPTERS_DIR, BASE_DIR, FORMAT_VERSION, LAYOUT_VERSION,
                                        TASK_OUTPUTS, TOKEN_TYPES, adapter_dirs, read_adapter_manifest, read_base_manifest)
from edgepeft.runtimes.slot_checks import uncounted_heads
from edgepeft.runtimes.runtime import Runtime
from edgepeft.tuners.layout import group_key


def export(adapters, out, base=None, names=None, merge=False, atol=1e-4, verbose=False, quantize=None,
           qtol=QTOL, ort_adapter=None, overwrite=False, ops="contrib") -> dict:
    """Export adapters (HF PEFT or edgepeft dirs) and their base into ``out``.

    Returns a report: the base (exported or reused), each adapter's size, and the
    max difference against PyTorch for the base and every adapter. ``quantize="int8"``
    or ``"int4"`` stores the base's weights so (adapters stay float32): the float32 graph is
    validated first, then the quantized one by relative RMS error (<= ``qtol``).
    ``ort_adapter``: also write each adapter in ONNX Runtime's ``.onnx_adapter`` format
    where that format can hold it (see ``exporters/ort_adapter.py``); None, the default: on a
    float base (what onnxruntime-genai and ONNX Runtime's LoraAdapter load). An adapter already in
    ``out`` under the same name is replaced only with ``overwrite``. ``ops="contrib"`` (the default) builds
    Llama/Qwen2/GPT-2 causal LMs on ONNX Runtime's fused kernels, ``"standard"`` with plain ONNX ops (``contrib_ops.py``).
    A failed export leaves ``out`` as it was: folders it made are removed again.
    """
    out, merge, overwrite, verbose, ort_adapter = export_arguments(out, merge, overwrite, verbose, ort_adapter)
    out = as_read(out)  # LINK/..: where the system finds it; a name not UTF-8 refused (ONNX Runtime reads it)
    adapters, base, names = path_arguments(adapters, base, names)  # one folder, or several; one name, not its letters
    if not adapters:
        raise ConfigError("give at least one --adapter folder")
    check_mergeable(adapters, merge)  # before minutes of loading
    check_tolerances(atol, qtol)
    check_quantize(quantize)
    check_ops(ops)
    check_output_dir(out, "--out")  # OUT itself takes the staging folders (resolve checks its base/ and adapters/)
    log = printed if verbose else noted  # notes as EdgePeftWarning where nothing is printed
    made = missing_folders(os.path.join(out, ADAPTERS_DIR))
    try:
        with one_at_a_time(out, log) as locked:  # makes OUT; says so when another export holds it
            try:
                return _export(adapters, out, base, names, merge, atol, quantize, qtol, ort_adapter, overwrite, ops, log,
                               locked)
            except BaseException:
                remove_empty(made)  # with OUT still held: an export waiting for it then finds it gone, and remakes it
                raise
    except BaseException:
        remove_empty(made)
        raise


def _export(adapters, out, base, names, merge, atol, quantize, qtol, ort_adapter, overwrite, ops, log,
            locked: bool) -> dict:
    """``export`` with OUT held: one export into OUT at a time."""
    mended = finish_repointing(out) if locked else []  # unlocked, another export's may be in flight
    for line in abandoned(out) + mended:
        log(f"note: {line}")
    with reporting_full_disk(out, "--out", loading=True):
        plan = resolve(adapters, out, base, names, atol=atol, qtol=qtol, quantize=quantize, ort_adapter=ort_adapter,
                       overwrite=overwrite, ops=ops, log=log)
    note_adapter_tokenizers(plan.sources, plan.source, plan.revision, log)
    note_contrib_matmuls(quantize, ops if plan.task == "causal-lm" else "standard", log)  # an encoder's: standard ops
    with reporting_full_disk(out, "--out"):  # the writes into OUT
        report = export_merged(plan) if merge else _export_slots(plan, quantize)
    plan.log(f"wrote {out}")
    return report


def _export_slots(plan, quantize) -> dict:
    """The base with its slots and each adapter's graph, staged, validated, then committed into OUT."""
    slots, reuse = plan_slots(plan)
    if not reuse:  # before the trace: a new base is renamed into OUT/base's place
        check_replaceable(plan.base_dir, f"mount {plan.out} itself (the folder holding base/ and adapters/), or export "
                          "into another --out")
    if reuse and made_heads(plan.model):  # OUT's graph holds the heads its own export made (of its num_labels)
        take_made_heads(plan.model, plan.base_dir)
    with Staging() as staging:
        base_stage, base_manifest = stage_base(plan, slots, reuse, staging)
        adapter_stages = stage_adapters(plan, base_manifest, staging)
        report = validate_float(plan, base_stage, adapter_stages, reuse, len(slots))
        if quantize and not reuse:
            report["checks"] += quantize_and_validate(plan, base_stage, adapter_stages)
        if not reuse:  # the adapters already in OUT, taken along to the new base
            report["checks"] += compare_siblings(plan, base_stage)
        commit(plan, staging, base_stage, adapter_stages, reuse)
    return report


# ---------------------------------------------------------------- plan slots
def plan_slots(plan: ExportPlan) -> tuple[list, bool]:
    """The base's slot table (OUT's and the new adapters', sorted) and whether OUT's base already serves it."""
    configs = [plan.config(s) for s in plan.sources]
    existing = plan.existing
    others = sorted(set(adapter_dirs(plan.out)) - {s.name for s in plan.sources})
    if not existing and others:  # nothing to check them against: a new base would be made without them
        raise ConfigError(f"{os.path.join(plan.out, ADAPTERS_DIR)}: holds {', '.join(others)} but {plan.base_dir} holds "
                          "no base (removed, or an export stopped); " + (aside_elsewhere(plan.out, BASE_DIR) or "export "
                          f"every adapter into a fresh --out folder, or remove {os.path.join(plan.out, ADAPTERS_DIR)}"))
    if existing:
        _check_existing_base(plan, configs)
        plan.groups = _keep_layout(plan.groups, existing, plan.base_dir, [s.name for s in plan.sources])
    for src in plan.sources:
        target = os.path.join(plan.out, ADAPTERS_DIR, src.name)
        if os.path.exists(target) and not plan.overwrite:
            raise ConfigError(f"{target}: {plan.out} holds an adapter named {src.name!r} already; pass --overwrite "
                              "to replace it, or --name to export this one under another name")
        if os.path.isdir(target) and not may_replace(target):  # moved aside, it would stay there
            raise StorageError(f"{target}: cannot replace it (permission denied: another user's?); remove it as its "
                               "owner, or export this one under another --name")
        check_replaceable(target, f"mount {plan.out} itself, or export this one under another --name")
    needed = slot_union(*[adapter_slots(plan.model, c, plan.groups, s.path) for c, s in zip(configs, plan.sources)])
    have = {s.name: s for s in existing["slots"]} if existing else {}
    older = next((s for s in needed if s.name in have and have[s.name].to_json() != s.to_json()), None)
    if older is not None:  # e.g. a BERT prefix slot before its positions started after the prefix (position_axis)
        raise ConfigError(f"{plan.base_dir}: was written by an older edgepeft (its slot {older.name} reads otherwise "
                          "than this edgepeft's graph); export every adapter into a fresh --out folder")
    slots = slot_union(existing["slots"] if existing else [], needed)
    reuse = existing is not None and (
        {s.name for s in needed} - set(existing.get("inert_slots", [])) <= {s.name for s in existing["slots"]})
    # a base an earlier edgepeft wrote without BERT's token types: written again (its adapters taken along) for pairs
    reuse = reuse and (TOKEN_TYPES in existing["inputs"] or not reads_token_types(plan.model.config, plan.task))
    return slots, reuse


def slot_union(*tables) -> list:
    """The slots of every table, each once, sorted by name: the base graph's inputs do not depend on the
    order adapters were given in."""
    first: dict = {}
    for table in tables:
        for s in table:
            first.setdefault(s.name, s)
    return sorted(first.values(), key=lambda s: s.name)


def _check_existing_base(plan: ExportPlan, configs) -> None:
    existing, base_dir = plan.existing, plan.base_dir
    if existing.get("merged_adapter"):
        raise ConfigError(f"{base_dir}: holds a --merge export; export slot adapters into another --out folder")
    writes = FORMAT_VERSION if reads_token_types(plan.model.config, plan.task) else LAYOUT_VERSION
    another = existing.get("task") != plan.task or existing.get("model_type") != plan.model.config.model_type
    if existing.get("format_version") not in {writes, LAYOUT_VERSION} and not another:  # 3: written again; another: below
        raise ConfigError(f"{base_dir}: was written with another graph layout (export format "
                          f"{existing.get('format_version')}; this edgepeft writes {writes}); "
                          "export into a fresh --out folder")
    theirs = generation_fields(plan.model, plan.task)  # generate's defaults, from generation_config.json
    if missing := [k for k in theirs if k not in existing]:  # not another base: it was called one, the same folder
        raise ConfigError(f"{base_dir}: was written by an older edgepeft (its manifest records no {missing[0]}); "
                          "export every adapter into a fresh --out folder")
    recorded = existing.get("weights_fingerprint")
    ours = plan.weights_fp
    if recorded != ours and existing["task"] == plan.task:
        _check_older_fingerprint(plan, recorded)
    source = model_label(plan.source, plan.revision)
    if recorded != ours or existing["task"] != plan.task:
        was = model_label(existing.get("source"), existing.get("revision"))
        changed = existing["task"] == plan.task and was == source  # the same folder: changed since
        raise AdapterBaseMismatchError(f"{base_dir}: was exported from {was} " + (
            "whose weights or config.json have changed since" if changed else
            f"({existing['task']}); these adapters need {source} ({plan.task})") + "; export them into another --out folder")
    if existing.get("quantization") != plan.quantize:
        have, want = existing.get("quantization") or "float32", plan.quantize or "float32"
        same = f"--quantize {have}" if have != "float32" else "no --quantize"
        raise ConfigError(f"{base_dir}: holds {'an' if have.startswith('int') else 'a'} {have} base, this export asks for "
                          f"{want} (--quantize); export with {same} to add to it, or into another --out folder")
    have, want = existing.get("ops", "standard"), effective_ops(plan.model.config, plan.task, plan.ops)
    if have != want:
        raise ConfigError(f"{base_dir}: holds a base built with {have} ops, this export asks for {want} (--ops); "
                          f"export with --ops {have}, or into another --out folder")
    key = next((k for k, v in theirs.items() if existing.get(k) != v), None)
    differs = key and (f"{key} ({existing.get(key)!r} here, {theirs[key]!r} in its generation_config.json, or its "
                       "config.json where it has none)")
    if not differs:
        with Staging() as staging:  # the files the graph runs with: another tokenizer would serve one side's adapters
            new = staging.new(plan.out, "side-files")
            write_side_files(plan.source, new, plan.task, plan.revision)
            differs = side_difference(base_dir, new, plan.task, existing.get("max_positions"))
    if differs:
        raise AdapterBaseMismatchError(
            f"{base_dir}: differs from {source}, these adapters' base (the same weights), in its {differs}; the "
            "adapters of one --out folder share one base: export these into another --out folder")


def _check_older_fingerprint(plan: ExportPlan, recorded: str) -> None:
    """An older edgepeft left the base's own heads (slots) out of its fingerprint: an OUT it wrote from this base
    is named as such, not as another base's, and refused (it cannot tell bases differing only there apart)."""
    heads = uncounted_heads(plan.existing, made_heads(plan.model))  # none in a newer OUT: no hashing then
    if heads and recorded == weights_fingerprint(plan.model, skip_modules=heads + sorted(made_heads(plan.model))):
        raise ConfigError(f"{plan.base_dir}: was written by an older edgepeft (its base fingerprint leaves out "
                          f"{', '.join(heads)}, so adapters made for a base with another {heads[0]} would load on it); "
                          "export every adapter into a fresh --out folder")


def _keep_layout(groups: list, existing: dict, base_dir: str, names: list) -> list:
    """The fusion layout of the base already in OUT, which its adapters' slots depend on.

    New adapters may need fewer fused groups (one that scales a member's own input keeps it apart):
    fine when OUT's base already keeps those layers apart (an earlier adapter needed it too), or when no
    adapter there has a slot on the group (the new base splits it); else its adapters would need new slots,
    so the export is refused with the way out.
    """
    have = existing.get("fused_groups", [])
    allowed = {group_key(g): g for g in groups}
    used = {s.module for s in existing["slots"]}
    if used & (set(allowed) - set(have)):  # slots on groups it says it lacks
        raise ConfigError(f"{base_dir}: was written with another graph layout (its slot table and fused groups "
                          "disagree); export into a fresh --out folder")
    apart = [k for k in have if k not in allowed and k in used]  # a group no adapter there reads: split it
    if apart:
        raise ConfigError(
            f"{base_dir}: fuses {', '.join(apart)} into one MatMul for the adapters already there, but "
            f"{', '.join(names)} needs {'them' if len(apart) > 1 else 'it'} apart (a method that changes one of them alone, e.g. IA3 on a layer's input); "
            f"export into a fresh --out folder: {', '.join(names)} first, then the adapters already in OUT (or every "
            "adapter together: edgepeft export --adapter A --adapter B ...)")
    return [allowed[k] for k in have if k in allowed]


# ---------------------------------------------------------------- stage
def _sibling(folder: str, replaced: bool) -> dict | None:
    """The manifest of an adapter in OUT; None for an unreadable one that --overwrite replaces: it cannot be re-pointed
    to the new base (an export stopped midway leaves it damaged, as it was)."""
    try:
        return read_adapter_manifest(folder)
    except EdgePeftError:
        if replaced:
            return None
        raise


def stage_base(plan: ExportPlan, slots: list, reuse: bool, staging: Staging) -> tuple[str, dict]:
    """OUT's base when it serves every slot, else a new base traced into a staging folder."""
    if reuse:
        plan.log(f"reusing {plan.base_dir} (has every slot these adapters need)")
        return plan.base_dir, plan.existing
    # a new base re-points the adapters already there (those made for OUT's base: one copied in for another base
    # stays refused), those --overwrite replaces too: an export killed after the base moved in and before (or while)
    # one is replaced leaves it fitting the base, not a refused OUT; one unreadable stops it, unless it is replaced
    made_for = plan.existing and plan.existing["fingerprint"]  # None: OUT holds no base (removed) to re-point from
    replaced = {s.name for s in plan.sources}
    found = {d: _sibling(d, name in replaced) for name, d in adapter_dirs(plan.out).items()} if made_for else {}
    plan.siblings = {d: m for d, m in found.items() if m is not None and m["base_fingerprint"] == made_for}
    for d in plan.siblings:  # each gets its manifest rewritten after the base is replaced: writable, checked now
        if not os.path.islink(d):  # a link's is only read: a copy takes its place (staged_repointing)
            check_output_dir(d, "--out")
    stage = staging.new(plan.out, "base")
    plan.log(f"exporting base with {len(slots)} slots to {plan.base_dir}")
    trace_base(plan.model, slots, plan.task, stage, plan.source, plan.weights_fp,
               plan.groups, ops=effective_ops(plan.model.config, plan.task, plan.ops, plan.log), revision=plan.revision,
               log=plan.log, digests=not plan.quantize)  # a quantized base's files: hashed once quantized
    manifest = read_base_manifest(stage)
    if manifest["inert_slots"]:
        plan.log(f"note: {len(manifest['inert_slots'])} slots cannot change {TASK_OUTPUTS[plan.task]} "
                 f"(e.g. {manifest['inert_slots'][0]}); adapter weights there are left out")
    return stage, manifest


def stage_adapters(plan: ExportPlan, base_manifest: dict, staging: Staging) -> dict:
    """{name: staging folder} with each adapter's graph and manifest, filling the slots the base has."""
    usable = {s.name for s in base_manifest["slots"]}  # inert slots reach no output
    ort_adapter = plan.ort_adapter
    if ort_adapter is None:
        ort_adapter = not (plan.quantize or base_manifest.get("quantization"))
    stages = {}
    for src in plan.sources:
        stages[src.name] = staging.new(os.path.join(plan.out, ADAPTERS_DIR), src.name)
        slots = usable_slots(plan, src, usable, TASK_OUTPUTS[plan.task])
        if plan.ort_adapter and not ort_format.applies(slots):  # asked for, not written: say so
            plan.log(f"note: {src.name}: no .onnx_adapter written; ONNX Runtime's adapter format holds only "
                     "tensors the graph adds to its inputs (a prompt or prefix also changes the mask and positions)")
        write_adapter(plan.peft, src, slots, base_manifest, stages[src.name], ort_adapter)
    return stages


# ---------------------------------------------------------------- validate
def validate_float(plan: ExportPlan, base_stage: str, adapter_stages: dict, reuse: bool, n_slots: int) -> dict:
    """The base alone, then each adapter, against PyTorch (a reused quantized base: by relative error)."""
    rt = Runtime.from_base_dir(base_stage)
    check_head_widths(plan, rt.slots, adapter_stages)
    qtol = plan.qtol if rt.manifest.get("quantization") else None
    base = BaseOutputs(rt, plan.model, plan.task)
    report = {"out": plan.out, "base": {"reused": reuse, "path": plan.base_dir, "slots": n_slots}, "adapters": [],
              "checks": [validate("base (no adapter)", rt, None, plan.model, plan.task, plan.atol, plan.base_dir, qtol=qtol,
                                  base=base)]}
    log_check(plan.log, report["checks"][0], "base (no adapter)")  # the ok line's largest difference may be its
    for src in plan.sources:
        stage = adapter_stages[src.name]
        rt.load_adapter(stage, name=src.name)
        plan.peft.set_adapter(src.name, inference_mode=True)
        check = validate(f"adapter {src.name}", rt, src.name, plan.peft, plan.task, plan.atol, src.path, qtol=qtol,
                         base=base)
        if plan.task == "seq-cls":
            set_labels(os.path.join(stage, ADAPTER_MANIFEST), read_labels(src, check["output_width"], plan.model.config))
        report["checks"].append(check)
        size = read_adapter_manifest(stage)["parameter_bytes"]
        report["adapters"].append({"name": src.name, "path": os.path.join(plan.out, ADAPTERS_DIR, src.name),
                                   "parameter_bytes": size, "max_abs_diff": check["max_abs_diff"]})
        log_check(plan.log, check, src.name)
    return report


def quantize_and_validate(plan: ExportPlan, base_stage: str, adapter_stages: dict) -> list:
    """Every float32 check passed: quantize the staged base, then check it and each adapter on it again."""
    quantize_stage(base_stage, plan.quantize, plan.qtol, plan.log)
    rt = Runtime.from_base_dir(base_stage)
    base = BaseOutputs(rt, plan.model, plan.task)
    checks = [validate(f"base (no adapter), {plan.quantize}", rt, None, plan.model, plan.task, plan.atol, plan.base_dir,
                       qtol=plan.qtol, base=base)]
    log_check(plan.log, checks[0], f"base (no adapter) ({plan.quantize})")
    for src in plan.sources:
        rt.load_adapter(adapter_stages[src.name], name=src.name)
        plan.peft.set_adapter(src.name, inference_mode=True)
        checks.append(validate(f"adapter {src.name}, {plan.quantize}", rt, src.name, plan.peft, plan.task, plan.atol,
                               src.path, qtol=plan.qtol, base=base))
        log_check(plan.log, checks[-1], f"{src.name} ({plan.quantize})")
    return checks


# ---------------------------------------------------------------- commit
def commit(plan: ExportPlan, staging: Staging, base_stage: str, adapter_stages: dict, reuse: bool) -> None:
    """Base first, the adapters already there re-pointed to it in the same breath, then the new adapters, the
    folders they replace removed last, all with Ctrl-C held off: OUT never holds a new base with its adapters still
    pointing at the old one (the old base's removal came between them), nor some adapters replaced and others not
    (a Ctrl-C between them said "aborted"). A Ctrl-C meanwhile is raised once the export is whole, saying so.

    The re-pointed manifests are written beside the old ones first, then renamed into place.
    """
    moves, olds = [], []
    try:
        for d, manifest in (plan.taken_along(read_base_manifest(base_stage)) if not reuse else {}).items():
            moves.append(plan.staged_repointing(d, manifest, staging))
        with written_whole(plan.out):
            if not reuse:
                olds.append(staging.swap(base_stage, plan.base_dir))
                for staged, target in moves:  # a manifest beside the adapter's own, or a copy in a link's place
                    olds.append(staging.put(staged, target))
            for name, stage in adapter_stages.items():
                olds.append(staging.swap(stage, os.path.join(plan.out, ADAPTERS_DIR, name)))
            remove_moved_aside(*olds)
    finally:
        remove_moved_aside(*olds)  # a failure midway: what was replaced stays replaced, and its old copy goes
        for staged, _ in moves:
            if os.path.isfile(staged):  # a copy's staging folder: Staging's
                os.unlink(staged)
