"""``edgepeft export``: base once, each adapter as its own small graph, all validated.

    adapter dirs --> PeftModel (PyTorch reference, HF PEFT semantics)
         |                 |
         |   slot table    |  slot values (scaling folded, graph layout)
         v                 v
    OUT/base (reused when it has every slot)   OUT/adapters/<name>/adapter.onnx
         \________ validate: Runtime vs PyTorch, max |diff| ________/
                             |
                 rename staged folders into place

Everything is written into hidden staging folders under OUT and renamed into place
only after validation passes, so a failed export leaves OUT as it was.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from edgepeft.config import CONFIG_NAME, LABELS_NAME, load_config
from edgepeft.errors import AdapterBaseMismatchError, ConfigError, CorruptArtifactError, ExportValidationError
from edgepeft.exporters.fingerprint import base_fingerprint, weights_fingerprint
from edgepeft.exporters.fusion import fuse_groups, group_key, shared_input_groups, trace_conv1d_as_matmul
from edgepeft.exporters.graph import OPSET, SlotGraph, export_graph, write_adapter_graph
from edgepeft.exporters import ort_adapter as ort_format
from edgepeft.exporters.quantize import check_quantize, quantize_graph, relative_error
from edgepeft.files import check_output_dir, replace_dir, staging_dir, write_json_atomic
from edgepeft.models import (
    cache_layout,
    call_kwargs,
    check_exportable,
    default_task,
    eos_token_ids,
    load_base,
    load_model_config,
    max_positions,
    sample_inputs,
)
from edgepeft.peft_model import PeftModel
from edgepeft.registry import method_for, methods
from edgepeft.runtimes.manifest import (
    ADAPTER_GRAPH,
    ADAPTER_MANIFEST,
    ADAPTERS_DIR,
    adapter_dirs,
    BASE_DIR,
    BASE_GRAPH,
    BASE_MANIFEST,
    FORMAT_VERSION,
    ORT_ADAPTER,
    TASK_OUTPUTS,
    read_adapter_manifest,
    read_base_manifest,
    sha256_file,
)
from edgepeft.runtimes.runtime import Runtime
from edgepeft.tuners.heads import CLASSIFIER_NAMES, HeadSlots

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json",
)
HEADS = HeadSlots()


@dataclass
class AdapterSource:
    name: str
    path: str
    config: object


def _read_sources(adapters, names) -> list[AdapterSource]:
    adapters = [str(a) for a in adapters]
    names = list(names or [])
    if len(names) > len(adapters):
        raise ConfigError(f"got {len(names)} --name values for {len(adapters)} --adapter folders; give one name per adapter")
    sources = []
    for i, path in enumerate(adapters):
        name = names[i] if i < len(names) else os.path.basename(os.path.normpath(path))
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ConfigError(f"{path}: adapter name {name!r} must be letters, digits, '_', '.', '-'; pass --name")
        if any(s.name == name for s in sources):
            raise ConfigError(f"{path}: two adapters are both named {name!r}; pass --name to tell them apart")
        sources.append(AdapterSource(name, path, load_config(path)))
    return sources


def _resolve_base(sources, base) -> str:
    if base:
        return str(base)
    wanted = {s.config.base_model_name_or_path for s in sources}
    if None in wanted or "" in wanted:
        missing = next(s for s in sources if not s.config.base_model_name_or_path)
        raise ConfigError(f"{missing.path}: adapter_config.json names no base_model_name_or_path; pass --base MODEL")
    if len(wanted) > 1:
        raise ConfigError(f"the adapters name different bases ({', '.join(sorted(wanted))}); export them into separate --out folders or pass --base")
    return wanted.pop()


def _resolve_task(sources, model_type: str) -> str:
    tasks = {s.config.task or default_task(model_type) for s in sources}
    if len(tasks) > 1:
        raise ConfigError(
            f"the adapters are for different tasks ({', '.join(sorted(tasks))}); one export folder serves one task, "
            "so export them into separate --out folders"
        )
    return tasks.pop()


def _adapter_slots(model, config, groups) -> list:
    return method_for(config).slots.slot_table(model, config, groups) + HEADS.slot_table(model, config)


def _check_recorded_bases(sources, source: str, model, task: str) -> None:
    """``--base`` given: refuse an adapter whose recorded base (a local folder) has other weights than ``source``."""
    heads = {m for src in sources for m in HEADS.saved_modules(model, src.config)}
    ours = None
    for src in sources:
        recorded = src.config.base_model_name_or_path
        if not recorded or not os.path.isdir(recorded) or os.path.realpath(recorded) == os.path.realpath(source):
            continue  # a hub id this machine may not have, or the same folder
        ours = ours or weights_fingerprint(model, skip_modules=heads)
        if weights_fingerprint(load_base(recorded, task), skip_modules=heads) != ours:
            raise AdapterBaseMismatchError(
                f"{src.path}: was trained on {recorded}, whose weights differ from --base {source}; export it with the "
                "base it was trained on (drop --base), or train it again on this base")


def _fusion_groups(model, task: str, configs) -> list[list[str]]:
    """Layers reading the same input (q/k/v, gate/up), except task heads trained whole."""
    ids, mask = sample_inputs(model.config)
    groups = shared_input_groups(model, lambda: model(input_ids=ids, attention_mask=mask, **call_kwargs(model.config)))
    keep_apart = {m for c in configs for m in HEADS.saved_modules(model, c)}
    keep_apart |= {m for c in configs for m in method_for(c).slots.unfused(model, c)}
    return [g for g in groups if not keep_apart.intersection(g)]


def _keep_layout(groups: list, existing: dict, base_dir: str, names: list) -> list:
    """The fusion layout of the base already in OUT, which its adapters' slots depend on.

    New adapters may need fewer fused groups (one that scales a member's own input keeps it apart):
    fine when OUT's base already keeps those layers apart (an earlier adapter needed it too); when it
    fuses them, its adapters would need new slots, so the export is refused with the way out.
    """
    have = existing.get("fused_groups", [])
    allowed = {group_key(g): g for g in groups}
    if {s.module for s in existing["slots"]} & (set(allowed) - set(have)):  # slots on groups it says it lacks
        raise ConfigError(f"{base_dir}: was written with another graph layout (its slot table and fused groups "
                          "disagree); export into a fresh --out folder")
    apart = [k for k in have if k not in allowed]
    if apart:
        raise ConfigError(
            f"{base_dir}: fuses {', '.join(apart)} into one MatMul for the adapters already there, but "
            f"{', '.join(names)} needs {'them' if len(apart) > 1 else 'it'} apart (IA3 scaling a layer's own input); "
            "export every adapter together into a fresh --out folder (edgepeft export --adapter A --adapter B ...)")
    return [allowed[k] for k in have]


def slot_union(*tables) -> list:
    """The slots of every table, each once, sorted by name: the base graph's inputs do not depend on the
    order adapters were given in."""
    first: dict = {}
    for table in tables:
        for s in table:
            first.setdefault(s.name, s)
    return sorted(first.values(), key=lambda s: s.name)


def _reference(model, ids, mask, task) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, return_dict=True, **call_kwargs(model.config))
    return getattr(out, TASK_OUTPUTS[task]).float().numpy()


def _valid(ours: np.ndarray, ref: np.ndarray, mask, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Both outputs at the positions that carry meaning (real tokens, not padding)."""
    if ours.shape != ref.shape:
        raise ExportValidationError(f"the export's output has shape {list(ours.shape)}, PyTorch's {list(ref.shape)}")
    if task == "seq-cls" or mask is None:
        return ours, ref
    virtual = ours.shape[1] - mask.shape[1]  # a prompt's virtual tokens come first in the output
    mask = np.concatenate([np.ones((mask.shape[0], virtual), mask.dtype), mask], axis=1)
    valid = mask.astype(bool)
    return ours[valid], ref[valid]


def _check(label: str, ours, ref, mask, task, atol, where, qtol=None) -> dict:
    ours, ref = _valid(ours, ref, mask, task)
    diff = float(np.abs(ours - ref).max())
    if qtol is not None:  # a quantized graph: relative RMS error
        rel = relative_error(ours, ref)
        if not rel <= qtol:
            raise ExportValidationError(
                f"{where}: {label} differs from PyTorch by {rel:.3g} relative RMS error (tolerance {qtol:g}); nothing "
                "was written. Export without --quantize, or loosen --qtol if this model tolerates it"
            )
        return {"what": label, "max_abs_diff": diff, "relative_error": rel, "tolerance": qtol}
    tol = atol * max(1.0, float(np.abs(ref).max()))
    if not diff <= tol:  # also catches NaN
        raise ExportValidationError(
            f"{where}: {label} differs from PyTorch by {diff:.3g} (tolerance {tol:.1g}); nothing was written. "
            "Report this model with `edgepeft inspect`, or loosen --atol if the difference is expected"
        )
    return {"what": label, "max_abs_diff": diff, "tolerance": tol}


def _decode_steps(rt, adapter, model, ids, mask, steps: int = 3):
    """Prefill then ``steps`` cached decode steps, teacher-forced with PyTorch's greedy tokens.

    Returns the last-position logits of every step, (steps + 1, B, V), from the
    runtime and from PyTorch run on the whole sequence so far with positions from the
    attention mask, as transformers' generate makes them (a PeftModel with virtual
    tokens shifts or drops them as HF PEFT does).
    """
    from edgepeft.tuners.virtual import mask_positions

    ours, ref = [], []
    with rt._using(adapter) as plan, torch.no_grad():
        runtime_steps = rt._steps(plan, ids.numpy(), mask.numpy())
        logits = next(runtime_steps)
        for step in range(steps + 1):
            out = model(input_ids=ids, attention_mask=mask, position_ids=mask_positions(mask))
            ours.append(logits)
            ref.append(out.logits[:, -1].float().numpy())
            token = torch.from_numpy(ref[-1].argmax(-1)).long()  # (B,)
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
            if step < steps:
                logits = runtime_steps.send(token.numpy())
    return np.stack(ours), np.stack(ref)


def _validate(label: str, rt, adapter, model, task: str, atol: float, where: str, seed: int = 1, qtol=None) -> dict:
    """The runtime vs PyTorch on a left-padded batch: forward, and for decoders prefill + decode steps.

    ``qtol``: the graph is quantized; check relative RMS error against it instead of ``atol``.
    """
    ids, mask = sample_inputs(model.config, seed=seed)
    ours = rt.forward(ids.numpy(), mask.numpy(), adapter=adapter)[TASK_OUTPUTS[task]]
    check = _check(label, ours, _reference(model, ids, mask, task), mask.numpy(), task, atol, where, qtol)
    if rt.cache:
        step = _check(f"{label}, cached decode", *_decode_steps(rt, adapter, model, ids, mask), None, task, atol, where, qtol)
        check["decode_max_abs_diff"] = step["max_abs_diff"]
        check["max_abs_diff"] = max(check["max_abs_diff"], step["max_abs_diff"])
        if qtol is not None:
            check["relative_error"] = max(check["relative_error"], step["relative_error"])
    return check


def _quantize_stage(stage: str, quantize: str, log) -> dict:
    """Quantize a staged, float32-validated base graph in place and record it in its manifest."""
    log(f"quantizing the base's weights to {quantize}")
    path = os.path.join(stage, BASE_MANIFEST)
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)  # as written (read_base_manifest parses the slot table)
    manifest.update(quantize_graph(os.path.join(stage, BASE_GRAPH), quantize))
    write_json_atomic(path, manifest, sort_keys=True)
    return read_base_manifest(stage)


def _log_check(log, check: dict, name: str) -> None:
    if "relative_error" in check:
        log(f"validated {name}: relative error vs PyTorch = {check['relative_error']:.2e} "
            f"(tolerance {check['tolerance']:g}), max |diff| {check['max_abs_diff']:.2e}")
    else:
        log(f"validated {name}: max |diff| vs PyTorch = {check['max_abs_diff']:.2e} (tolerance {check['tolerance']:.0e})")


def _export_base(model, slots, task, stage, source, weights_fp, groups, merged_adapter=None, labels=None) -> dict:
    """Trace ``model`` (its ``groups`` fused) with ``slots`` as inputs into ``stage``; returns the manifest."""
    graph_model = copy.deepcopy(model)
    fused = fuse_groups(graph_model, groups)
    trace_conv1d_as_matmul(graph_model)
    feeds, neutral, samples = {}, {}, {}
    by_method: dict = {}
    for s in slots:
        by_method.setdefault(s.method, []).append(s)
    for method_name, group in by_method.items():
        spec = _slot_providers()[method_name]
        f, n = spec.install(graph_model, group, fused)
        feeds.update(f)
        neutral.update(n)
        samples.update(spec.sample(group, n))
    graph = SlotGraph(graph_model, feeds, task, cache=cache_layout(model.config, task))
    io = export_graph(graph, graph.sample_inputs(model.config, samples), slots, neutral, os.path.join(stage, BASE_GRAPH), task)
    slots = [s for s in slots if s.name not in io["inert_slots"]]
    manifest = {
        "format": "edgepeft-base",
        "format_version": FORMAT_VERSION,
        "model_type": model.config.model_type,
        "task": task,
        "source": source,
        "graph": BASE_GRAPH,
        "fingerprint": base_fingerprint(weights_fp, slots, OPSET),
        "weights_fingerprint": weights_fp,
        "opset": OPSET,
        "dtype": "float32",
        "quantization": None,
        "merged_adapter": merged_adapter,
        "labels": labels,  # a merged classifier's class names
        "vocab_size": model.config.vocab_size,
        "max_positions": max_positions(model.config),
        "pad_token_id": model.config.pad_token_id,
        "eos_token_id": eos_token_ids(model),
        "slots": [s.to_json() for s in slots],
        "fused_groups": list(fused),
        **io,
    }
    if os.path.isdir(source):
        for f in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source, f)):
                shutil.copy2(os.path.join(source, f), os.path.join(stage, f))
    write_json_atomic(os.path.join(stage, BASE_MANIFEST), manifest, sort_keys=True)
    return manifest


def _slot_providers() -> dict:
    """Slot method name -> the object that installs and fills those slots."""
    return {m.name: m.slots for m in methods()} | {HEADS.name: HEADS}


def _labels(src: AdapterSource, widths: set) -> list | None:
    """Class names saved beside a classifier adapter (``labels.json``, written by ``edgepeft train``).

    ``widths``: the classifier's possible output counts; the file must name one of them.
    """
    path = os.path.join(src.path, LABELS_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            labels = json.load(f)["labels"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CorruptArtifactError(f"{path}: cannot read the label names ({e}); fix or delete the file") from None
    if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise CorruptArtifactError(f"{path}: 'labels' must be a list of strings; fix or delete the file")
    if widths and len(labels) not in widths:
        raise CorruptArtifactError(f"{path}: names {len(labels)} labels but the adapter's classifier has "
                                   f"{sorted(widths)[0]} outputs; fix or delete the file")
    return labels


def _write_adapter(model, peft, src: AdapterSource, base_manifest, stage, groups, ort_adapter: bool = False) -> dict:
    config = peft.peft_config[src.name]
    method = method_for(config)
    usable = {s.name for s in base_manifest["slots"]}
    slots = [s for s in _adapter_slots(model, config, groups) if s.name in usable]  # inert slots reach no output
    own = [s for s in slots if s.method == method.name]
    heads = [s for s in slots if s.method == HEADS.name]
    head_values = HEADS.values(peft, src.name, heads)
    values = {**method.slots.values(peft, src.name, own), **head_values}
    graph = os.path.join(stage, ADAPTER_GRAPH)
    write_adapter_graph(values, graph)
    ort_file = None
    if ort_adapter and ort_format.applies(slots):
        ort_file = ORT_ADAPTER
        ort_format.write_ort_adapter(graph, os.path.join(stage, ORT_ADAPTER))
    manifest = {
        "format": "edgepeft-adapter",
        "format_version": FORMAT_VERSION,
        "name": src.name,
        "methods": [method.name] + (["head"] if heads else []),
        "peft_type": config.peft_type,
        "task": base_manifest["task"],
        "base_fingerprint": base_manifest["fingerprint"],
        "base_source": base_manifest["source"],
        **method.slots.describe(config),
        "modules_to_save": config.modules_to_save,
        "slots": {k: list(v.shape) for k, v in sorted(values.items())},
        "parameter_bytes": int(sum(v.nbytes for v in values.values())),
        "graph": ADAPTER_GRAPH,
        "sha256": sha256_file(graph),
        "ort_adapter": ort_file,
        "peft_config": config.to_dict(),
        "source": os.path.abspath(src.path),
        # a classifier weight as bound: (hidden, num_labels)
        "labels": _labels(src, {v.shape[1] for v in head_values.values() if v.ndim == 2}) if heads else None,
    }
    write_json_atomic(os.path.join(stage, ADAPTER_MANIFEST), manifest, sort_keys=True)
    return manifest


def export(adapters, out, base=None, names=None, merge=False, atol=1e-4, verbose=False, quantize=None,
           qtol=0.2, ort_adapter=False, overwrite=False) -> dict:
    """Export adapters (HF PEFT or edgepeft dirs) and their base into ``out``.

    Returns a report: the base (exported or reused), each adapter's size, and the
    max difference against PyTorch for the base and every adapter. ``quantize="int8"``
    or ``"int4"`` stores the base's weights so (adapters stay float32): the float32 graph is
    validated first, then the quantized one by relative RMS error (<= ``qtol``).
    ``ort_adapter``: also write each adapter in ONNX Runtime's ``.onnx_adapter`` format
    where that format can hold it (see ``exporters/ort_adapter.py``). An adapter already in
    ``out`` under the same name is replaced only with ``overwrite``.
    A failed export leaves ``out`` as it was: folders it made are removed again.
    """
    out = str(out)
    made = [d for d in (out, os.path.join(out, ADAPTERS_DIR)) if not os.path.exists(d)]
    try:
        return _export(adapters, out, base, names, merge, atol, verbose, quantize, qtol, ort_adapter, overwrite)
    except BaseException:
        for d in reversed(made):  # the staging folders are gone already: only folders left empty are removed
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
        raise


def _refuse_adapter_folder(out: str) -> None:
    if os.path.isfile(os.path.join(out, CONFIG_NAME)):
        raise ConfigError(f"{out}: is an adapter folder (it has {CONFIG_NAME}); give --out a new folder for the export, "
                          f"e.g. --out {os.path.normpath(out)}-onnx")


def _refuse_replacing(out: str, sources, overwrite: bool) -> None:
    """An export never replaces an adapter silently: one of the same name in OUT needs ``overwrite``."""
    if overwrite:
        return
    for src in sources:
        target = os.path.join(out, ADAPTERS_DIR, src.name)
        if os.path.exists(target):
            raise ConfigError(f"{target}: {out} holds an adapter named {src.name!r} already; pass --overwrite to "
                              "replace it, or --name to export this one under another name")


def _export(adapters, out, base, names, merge, atol, verbose, quantize, qtol, ort_adapter, overwrite) -> dict:
    log = print if verbose else (lambda *a, **k: None)
    if not adapters:
        raise ConfigError("give at least one --adapter folder")
    if not atol >= 0:
        raise ConfigError(f"--atol must be >= 0, got {atol}")
    check_quantize(quantize)
    if not qtol > 0:
        raise ConfigError(f"--qtol must be > 0, got {qtol}")
    for sub in (BASE_DIR, ADAPTERS_DIR):  # a file in the way, or no write access: say so before any work
        check_output_dir(os.path.join(out, sub), "--out")
    sources = _read_sources(adapters, names)
    _refuse_adapter_folder(out)
    source = _resolve_base(sources, base)
    config = load_model_config(source)
    model_type = config.model_type
    task = _resolve_task(sources, model_type)
    check_exportable(config, source)
    log(f"loading base {source} ({model_type}, {task})")
    model = load_base(source, task)
    if base:
        _check_recorded_bases(sources, source, model, task)

    peft = PeftModel(copy.deepcopy(model))
    for src in sources:
        peft.load_adapter(src.path, src.name)
    peft.eval()

    base_dir = os.path.join(out, BASE_DIR)
    existing = read_base_manifest(base_dir) if os.path.exists(os.path.join(base_dir, BASE_MANIFEST)) else None
    groups = _fusion_groups(model, task, [peft.peft_config[s.name] for s in sources])
    if merge:
        return _export_merged(model, peft, sources, source, task, out, existing, atol, log, groups, quantize, qtol,
                              overwrite)
    heads = {s.module for s in (existing["slots"] if existing else []) if s.method == "head"}
    heads |= {s.module for src in sources for s in HEADS.slot_table(model, peft.peft_config[src.name])}
    weights_fp = weights_fingerprint(model, skip_modules=heads)  # the frozen weights, task heads left out
    if existing:
        if existing.get("merged_adapter"):
            raise ConfigError(f"{base_dir}: holds a --merge export; export slot adapters into another --out folder")
        if existing.get("weights_fingerprint") != weights_fp or existing["task"] != task:
            raise AdapterBaseMismatchError(
                f"{base_dir}: was exported from {existing.get('source')} ({existing['task']}); these adapters need "
                f"{source} ({task}); export them into another --out folder"
            )
        if existing.get("quantization") != quantize:
            have, want = existing.get("quantization") or "float32", quantize or "float32"
            raise ConfigError(f"{base_dir}: holds a {have} base, this export asks for {want} (--quantize); "
                              "export into another --out folder")
        if existing.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"{base_dir}: was written with another graph layout (export format "
                              f"{existing.get('format_version')}; this edgepeft writes {FORMAT_VERSION}); "
                              "export into a fresh --out folder")
        groups = _keep_layout(groups, existing, base_dir, [s.name for s in sources])  # its adapters' slots need it

    _refuse_replacing(out, sources, overwrite)
    needed = slot_union(*[_adapter_slots(model, peft.peft_config[s.name], groups) for s in sources])
    slots = slot_union(existing["slots"] if existing else [], needed)
    reuse = existing is not None and (
        {s.name for s in needed} - set(existing.get("inert_slots", [])) <= {s.name for s in existing["slots"]}
    )
    # a new base re-points the adapters already there: one that cannot be read stops the export now, OUT untouched
    siblings = {} if reuse else _sibling_adapters(out, skip={s.name for s in sources})

    staged = []
    try:
        if reuse:
            base_stage, base_manifest = base_dir, existing
            log(f"reusing {base_dir} (has every slot these adapters need)")
        else:
            base_stage = staging_dir(out, "base")
            staged.append(base_stage)
            log(f"exporting base with {len(slots)} slots to {base_dir}")
            _export_base(model, slots, task, base_stage, source, weights_fp, groups)
            base_manifest = read_base_manifest(base_stage)
            if base_manifest["inert_slots"]:
                log(f"note: {len(base_manifest['inert_slots'])} slots cannot change {TASK_OUTPUTS[task]} "
                    f"(e.g. {base_manifest['inert_slots'][0]}); adapter weights there are left out")
        rt = Runtime.from_base_dir(base_stage)
        report = {"out": out, "base": {"reused": reuse, "path": base_dir, "slots": len(slots)}, "adapters": [], "checks": []}
        qtol_now = qtol if base_manifest.get("quantization") else None  # a reused quantized base
        report["checks"].append(_validate("base (no adapter)", rt, None, model, task, atol, base_dir, qtol=qtol_now))

        adapter_stages = {}
        for src in sources:
            stage = staging_dir(os.path.join(out, ADAPTERS_DIR), src.name)
            staged.append(stage)
            adapter_stages[src.name] = stage
            manifest = _write_adapter(model, peft, src, base_manifest, stage, groups, ort_adapter)
            rt.load_adapter(stage, name=src.name)
            peft.set_adapter(src.name)
            check = _validate(f"adapter {src.name}", rt, src.name, peft, task, atol, src.path, qtol=qtol_now)
            report["checks"].append(check)
            report["adapters"].append({"name": src.name, "path": os.path.join(out, ADAPTERS_DIR, src.name),
                                       "parameter_bytes": manifest["parameter_bytes"], "max_abs_diff": check["max_abs_diff"]})
            _log_check(log, check, src.name)

        if quantize and not reuse:  # every float32 check passed: now the quantized graph
            base_manifest = _quantize_stage(base_stage, quantize, log)
            rt = Runtime.from_base_dir(base_stage)
            report["checks"].append(_validate(f"base (no adapter), {quantize}", rt, None, model, task, atol, base_dir, qtol=qtol))
            for src in sources:
                rt.load_adapter(adapter_stages[src.name], name=src.name)
                peft.set_adapter(src.name)
                check = _validate(f"adapter {src.name}, {quantize}", rt, src.name, peft, task, atol, src.path, qtol=qtol)
                report["checks"].append(check)
                _log_check(log, check, f"{src.name} ({quantize})")

        # Commit: base first (then re-point the adapters already there), then the new adapters.
        if not reuse:
            replace_dir(base_stage, base_dir)
            staged.remove(base_stage)
            _repoint_adapters(siblings, base_manifest)
        for name, stage in adapter_stages.items():
            replace_dir(stage, os.path.join(out, ADAPTERS_DIR, name))
            staged.remove(stage)
    finally:
        for d in staged:
            shutil.rmtree(d, ignore_errors=True)
    log(f"wrote {out}")
    return report


def _sibling_adapters(out: str, skip: set) -> dict:
    """The manifests of the adapters already in OUT (but ``skip``), by folder.

    Read before anything is exported, so that one which cannot be read (a stray
    folder, a corrupt adapter.json) stops the export while OUT is untouched, not after
    the base was replaced.
    """
    return {d: read_adapter_manifest(d) for name, d in adapter_dirs(out).items() if name not in skip}


def _repoint_adapters(siblings: dict, base_manifest: dict) -> None:
    """After the base gained slots, adapters already in OUT still fit: record the new fingerprint."""
    slot_names = {s.name for s in base_manifest["slots"]}
    for d, manifest in siblings.items():
        if set(manifest["slots"]) <= slot_names:
            write_json_atomic(os.path.join(d, ADAPTER_MANIFEST), {**manifest, "base_fingerprint": base_manifest["fingerprint"]},
                              sort_keys=True)


def _export_merged(model, peft, sources, source, task, out, existing, atol, log, groups, quantize=None, qtol=0.2,
                   overwrite=False) -> dict:
    """``--merge``: one adapter folded into the weights, a plain graph with no slots."""
    if len(sources) != 1:
        raise ConfigError(f"--merge folds exactly one adapter into the base; got {len(sources)}")
    src = sources[0]
    base_dir = os.path.join(out, BASE_DIR)
    if existing and not existing.get("merged_adapter"):
        raise ConfigError(f"{base_dir}: holds a slot base with adapters; write the --merge export to another --out folder")
    if existing and not overwrite:
        raise ConfigError(f"{base_dir}: holds adapter {existing['merged_adapter']!r} merged into the base already; "
                          "pass --overwrite to replace it, or give another --out")
    merged = peft.merge_and_unload(src.name).eval()
    weights_fp = weights_fingerprint(merged)
    stage = staging_dir(out, "merged")
    try:
        log(f"exporting {src.name} merged into the base to {base_dir}")
        widths = {m.out_features for n, m in merged.named_modules() if n.rpartition(".")[2] in CLASSIFIER_NAMES
                  and hasattr(m, "out_features")}  # the trained head's width (the config may still say 2)
        labels = _labels(src, widths) if task == "seq-cls" else None
        _export_base(merged, [], task, stage, source, weights_fp, groups, merged_adapter=src.name, labels=labels)
        rt = Runtime.from_base_dir(stage)
        peft.set_adapter(src.name)
        checks = [_validate(f"merged {src.name}", rt, None, peft, task, atol, src.path)]
        _log_check(log, checks[-1], f"merged {src.name}")
        if quantize:
            _quantize_stage(stage, quantize, log)
            rt = Runtime.from_base_dir(stage)
            checks.append(_validate(f"merged {src.name}, {quantize}", rt, None, peft, task, atol, src.path, qtol=qtol))
            _log_check(log, checks[-1], f"merged {src.name} ({quantize})")
        replace_dir(stage, base_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {"out": out, "base": {"reused": False, "path": base_dir, "slots": 0, "merged_adapter": src.name},
            "adapters": [], "checks": checks}
