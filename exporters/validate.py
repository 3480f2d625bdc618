"""Every export is checked against PyTorch before anything is committed.

    sample batch (one row left-padded) --> Runtime.forward(adapter)  vs  PyTorch model  -> max |diff| <= atol
    decoders:  prefill + 3 cached steps --> Runtime.step_logits      vs  PyTorch on the whole sequence so far

Float graphs are held to an absolute tolerance (scaled by the output's size when above 1);
quantized ones to a relative RMS error, and an adapter on a quantized base also by its effect
(its output less the base's) against PyTorch's: an adapter is often a few percent of the output,
so a graph that lost its slots stays within the output's tolerance. The runtime is driven through
its public calls only.
"""
from __future__ import annotations

import numpy as np
import torch

from edgepeft.errors import ConfigError, ExportValidationError
from edgepeft.model_checks import TEXT_ROOM
from edgepeft.exporters.graph import sample_token_types
from edgepeft.exporters.quantize import no_closer_than_zeros, relative_error, rms
from edgepeft.models import call_kwargs, sample_inputs
from edgepeft.runtimes.manifest import TASK_OUTPUTS
from edgepeft.runtimes.values import is_number
from edgepeft.training.pooling import padding_warning_left_out


QUANTIZED_SAMPLE = (16, 16)  # rows x tokens of the quantized checks' batch
DECODE_STEPS = 3  # cached decode steps checked after the prefill
# An adapter's effect on a quantized graph: judged where it is EFFECT_NOISE x the base's own error or more (below, the
# two cannot be told apart), and refused when it is off PyTorch's by more than EFFECT_TOL of itself. Independent errors
# on base and adapter outputs give sqrt(2) / EFFECT_NOISE = 0.35 at worst; a graph that ignores the adapter gives 1.
EFFECT_NOISE, EFFECT_TOL = 4.0, 0.5


def reference_output(model, ids, mask, task, types=None) -> np.ndarray:
    kwargs = {} if types is None else {"token_type_ids": types}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad(), padding_warning_left_out(base):
        out = model(input_ids=ids, attention_mask=mask, return_dict=True, **call_kwargs(model.config), **kwargs)
    return getattr(out, TASK_OUTPUTS[task]).float().numpy()


def meaningful_positions(ours: np.ndarray, ref: np.ndarray, mask, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Both outputs at the positions that carry meaning (real tokens, not padding)."""
    if ours.shape != ref.shape:
        raise ExportValidationError(f"the export's output has shape {list(ours.shape)}, PyTorch's {list(ref.shape)}")
    if task == "seq-cls" or mask is None:
        return ours, ref
    virtual = ours.shape[1] - mask.shape[1]  # a prompt's virtual tokens come first in the output
    mask = np.concatenate([np.ones((mask.shape[0], virtual), mask.dtype), mask], axis=1)
    valid = mask.astype(bool)
    return ours[valid], ref[valid]


def compare_outputs(label: str, ours, ref, mask, task, atol, where, qtol=None) -> dict:
    """One check: raises ExportValidationError naming ``where`` when ``ours`` is out of tolerance."""
    ours, ref = meaningful_positions(ours, ref, mask, task)
    if not np.isfinite(ref).all():  # no tolerance helps: the model computes NaN or inf itself
        raise ExportValidationError(
            f"{where}: {label}: PyTorch's own outputs hold NaN or inf, so nothing can be checked; nothing was "
            "written. Look for non-finite values in the weights (the base model's, or the adapter's "
            "adapter_model.safetensors or adapter_model.bin) and retrain or fix them"
        )
    diff = float(np.abs(ours - ref).max())
    if qtol is not None:  # a quantized graph: relative RMS error
        rel = relative_error(ours, ref)
        if no_closer_than_zeros(ours, ref):  # whatever --qtol: its RMS error is the outputs' own
            raise ExportValidationError(
                f"{where}: {label} is no closer to PyTorch's than zeros are (RMS error {rel:.6g}, as large as the outputs): "
                "the quantized graph is broken; nothing was written. Export without --quantize (into another --out when "
                "OUT holds a quantized base), and report this model (config.json and this command)")
        if not rel <= qtol:
            raise ExportValidationError(
                f"{where}: {label} differs from PyTorch by {rel:.6g} relative RMS error (tolerance {qtol:g}); nothing "
                "was written. Loosen --qtol if this model tolerates it, or export without --quantize (into another --out "
                "when OUT holds a quantized base)"
            )
        return {"what": label, "max_abs_diff": diff, "relative_error": rel, "tolerance": qtol}
    tol = atol * max(1.0, float(np.abs(ref).max()))
    if not diff <= tol:  # also catches NaN
        raise ExportValidationError(
            f"{where}: {label} differs from PyTorch by {diff:.3g} (tolerance {tol:.1g}); nothing was written. "
            "Report this model (its config.json and this command), or loosen --atol if the difference is expected"
        )
    return {"what": label, "max_abs_diff": diff, "tolerance": tol}


def compare_effects(label: str, ours, ref, base_ours, base_ref, mask, task, where) -> float | None:
    """The adapter's effect on a quantized graph (its output less the base's) against PyTorch's; returns its relative
    error (None: too small to judge against the base's error), raising ExportValidationError past EFFECT_TOL."""
    if ours.ndim == 3 and ours.shape[1] != base_ours.shape[1]:  # a prompt's virtual positions come first
        ours, ref = ours[:, -base_ours.shape[1]:], ref[:, -base_ours.shape[1]:]
    if ours.shape != base_ours.shape:  # a classifier head of its own with other labels: no common output
        return None
    (ours, ref), (base_ours, base_ref) = (meaningful_positions(a, b, mask, task) for a, b in ((ours, ref),
                                                                                               (base_ours, base_ref)))
    effect, noise = rms(ref - base_ref), rms(base_ours - base_ref)
    if not effect >= EFFECT_NOISE * noise or effect == 0:
        return None
    rel = rms((ours - base_ours) - (ref - base_ref)) / effect
    if not rel <= EFFECT_TOL:
        raise ExportValidationError(
            f"{where}: {label} changes the quantized graph's output by {rms(ours - base_ours):.3g} RMS where it changes "
            f"PyTorch's by {effect:.3g} ({rel:.2f} of its effect lost or wrong, tolerance {EFFECT_TOL}); nothing was "
            "written. Report this model and adapter (config.json, adapter_config.json and this command), or export "
            "without --quantize (into another --out when OUT holds a quantized base)")
    return rel


def decode_steps(rt, adapter, model, ids, mask, steps: int = DECODE_STEPS):
    """Prefill then ``steps`` cached decode steps, teacher-forced with PyTorch's greedy tokens.

    Returns the last-position logits of every step, (steps + 1, B, V), from the
    runtime and from PyTorch run on the whole sequence so far with positions from the
    attention mask, as transformers' generate makes them (a PeftModel with virtual
    tokens shifts or drops them as HF PEFT does).
    """
    from edgepeft.tuners.virtual import mask_positions

    ours, ref = [], []
    runtime_steps = rt.step_logits(ids.numpy(), mask.numpy(), adapter=adapter)
    with torch.no_grad():
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
    runtime_steps.close()
    return np.stack(ours), np.stack(ref)


class BaseOutputs:
    """The base's own outputs on a quantized check's batch, the runtime's (no adapter) and PyTorch's: each adapter's
    effect is measured against them, so they are computed once (or kept from the base's own check), not per adapter."""

    def __init__(self, rt, model, task: str):
        self.rt, self.model, self.task, self.kept = rt, model, task, {}

    def keep(self, seed: int, ids, ours, ref) -> None:
        """The base's outputs on the batch of ``seed`` and ``ids``' shape (an adapter's check may be shorter)."""
        self.kept[seed, tuple(ids.shape)] = ours, ref

    def outputs(self, seed: int, ids, mask) -> tuple:
        if (seed, tuple(ids.shape)) not in self.kept:
            types = sample_types(self.rt, mask)
            self.keep(seed, ids, self.rt.forward(ids.numpy(), mask.numpy(), token_type_ids=types)[TASK_OUTPUTS[self.task]],
                      reference_output(self.model, ids, mask, self.task, types))
        return self.kept[seed, tuple(ids.shape)]


def validate(label: str, rt, adapter, model, task: str, atol: float, where: str, seed: int = 1, qtol=None,
             base: BaseOutputs | None = None) -> dict:
    """The runtime vs PyTorch on a left-padded batch: forward, and for decoders prefill + decode steps.

    ``qtol``: the graph is quantized; check relative RMS error against it instead of ``atol``, on a
    larger batch (16 x 16 tokens): on 2 x 8 random tokens a trained classifier's relative error swung
    from 0.16 to 0.41, while held-out text gave 0.16. The check records ``output_width``, the
    output's last dim (a classifier's label count). ``base``: with ``qtol``, the base's outputs (the base's own check
    keeps them); an adapter's effect is checked against them too (``compare_effects``).
    """
    batch, length = QUANTIZED_SAMPLE if qtol is not None else (2, 6)  # not the trace's length (8; 4 + 3 cached)
    length, steps = sample_shape(rt, adapter, batch, length, where)
    ids, mask = sample_inputs(model.config, batch=batch, seq=length, seed=seed)
    types = sample_types(rt, mask)  # a text pair's, where the graph takes token types
    ours = rt.forward(ids.numpy(), mask.numpy(), adapter=adapter, token_type_ids=types)[TASK_OUTPUTS[task]]
    ref = reference_output(model, ids, mask, task, types)
    effects = qtol is not None and base is not None and adapter is not None  # first: an effect lost says more
    effect = compare_effects(label, ours, ref, *base.outputs(seed, ids, mask), mask.numpy(), task, where) if effects \
        else None
    check = compare_outputs(label, ours, ref, mask.numpy(), task, atol, where, qtol)
    check["output_width"] = int(ours.shape[-1])
    if qtol is not None and base is not None:
        if adapter is None:
            base.keep(seed, ids, ours, ref)
        else:
            check["effect_error"] = effect
    if rt.cache:
        step = compare_outputs(f"{label}, cached decode", *decode_steps(rt, adapter, model, ids, mask, steps), None,
                               task, atol, where, qtol)
        check["decode_max_abs_diff"] = step["max_abs_diff"]
        if step["max_abs_diff"] > check["max_abs_diff"]:  # with its own tolerance (--atol scales with the outputs)
            check["max_abs_diff"], check["tolerance"] = step["max_abs_diff"], step["tolerance"]
        if qtol is not None:
            check["relative_error"] = max(check["relative_error"], step["relative_error"])
    return check


def sample_types(rt, mask):
    """A sample batch's token types, a pair's (``graph.sample_token_types``), where the graph takes them; else None."""
    return None if rt.type_vocab_size is None else sample_token_types(mask)


def check_room(positions: int | None, virtual: int, where: str) -> int | None:
    """The model's positions left beside an adapter's ``virtual`` tokens; ConfigError where fewer than a check's
    sample needs (TEXT_ROOM, which training asks for too). ``resolve`` asks it first, before any tracing."""
    if not positions:
        return None
    room = positions - virtual
    if room < TEXT_ROOM:
        raise ConfigError(f"{where}: the adapter's {virtual} virtual tokens leave {max(room, 0)} of the model's "
                          f"{positions} positions for text, fewer than the {TEXT_ROOM} an export needs; train it with "
                          f"{positions - TEXT_ROOM} or fewer num_virtual_tokens")
    return room


def sample_shape(rt, adapter, batch: int, length: int, where: str) -> tuple[int, int]:
    """A check's sample length and decode steps: ``length`` and DECODE_STEPS where the model's positions hold them
    beside the adapter's virtual tokens, else as many as fit (a model with few positions, a prefix nearly as long),
    the steps given up before the length drops below 4 (a row left-padded by 3 keeps a token)."""
    steps = DECODE_STEPS if rt.cache else 0
    if not rt.max_positions:
        return length, steps
    virtual = rt.virtual_positions(adapter, batch)
    room = check_room(rt.max_positions, virtual, where)
    length = min(length, max(4, room - steps))
    return length, min(steps, room - length)


def check_head_widths(plan, slots: dict, adapter_stages: dict) -> None:
    """Each adapter the new base serves (those exported now and those already in OUT) fits it: a head of other
    outputs than the base's beside an adapter on that layer's outputs was ONNX Runtime's broadcast error."""
    import os

    from edgepeft.runtimes.manifest import read_adapter_manifest

    served = {**plan.siblings, **{s.path: read_adapter_manifest(adapter_stages[s.name]) for s in plan.sources}}
    for where, manifest in served.items():
        if misfit := head_misfit(manifest["slots"], slots):
            raise ConfigError(f"{where}: {misfit}; export the two into separate --out folders")


def head_misfit(shapes: dict, slots: dict) -> str | None:
    """Why an adapter of these slot ``shapes`` (a head of other outputs than the base's) cannot run on a base of these
    ``slots`` where another adapter adapts that layer's outputs (a LoRA's B sized to the base head's labels). None
    where it can."""
    for name, shape in shapes.items():
        if not name.startswith("head_weight."):
            continue
        module, (fan_in, width) = name.removeprefix("head_weight."), shape
        for slot in slots.values():  # on the layer's output side: a last size of its own, not the layer's input
            last = slot.shape[-1] if slot.shape and slot.module == module and slot.method != "head" else None
            if isinstance(last, int) and last not in (fan_in, width):
                return (f"its head has {width} outputs, and the base's slot {slot.name} (another adapter's "
                        f"{slot.method} on that layer) is sized to the base head's {last}: one base serves both only "
                        f"with heads of {last} outputs")
    return None


def compare_siblings(plan, base_stage: str) -> list:
    """Each adapter already in OUT that a new base takes along (``plan.siblings``), run on OUT's base as it is and on
    the new one: the same outputs (quantized: within --qtol), else ExportValidationError before anything moves.

        adapter.onnx --zip, its manifest re-pointed--> new base  vs  OUT's base <-- adapter folder
    """
    import io
    import json
    import os
    import zipfile

    from edgepeft.runtimes import Runtime
    from edgepeft.runtimes.manifest import ADAPTER_GRAPH, ADAPTER_MANIFEST

    replaced = {s.name for s in plan.sources}  # re-pointed only for an export stopped before they are replaced
    if not {f for f in plan.siblings if os.path.basename(f) not in replaced}:
        return []  # before two Runtimes are opened for nothing
    old, new = Runtime(plan.out, load_adapters=False), Runtime.from_base_dir(base_stage)
    quantized = new.manifest.get("quantization")
    checks = []
    for folder, manifest in plan.taken_along(new.manifest).items():  # as commit will re-point them
        if os.path.basename(folder) in replaced:
            continue
        name = old.load_adapter(folder)
        length = sample_shape(old, name, 2, 8, folder)[0]
        ids, mask = (t.numpy() for t in sample_inputs(plan.model.config, batch=2, seq=length, seed=3))
        zipped = io.BytesIO()
        with zipfile.ZipFile(zipped, "w") as z:
            z.writestr(ADAPTER_MANIFEST, json.dumps(manifest))
            z.write(os.path.join(folder, ADAPTER_GRAPH), ADAPTER_GRAPH)
        new.load_adapter(zipped.getvalue(), name=name)
        want, got = (rt.forward(ids, mask, adapter=name)[TASK_OUTPUTS[plan.task]] for rt in (old, new))
        diff, rel = float(np.abs(got - want).max()), relative_error(got, want)
        tol = plan.qtol if quantized else plan.atol * max(1.0, float(np.abs(want).max()))
        if not (rel if quantized else diff) <= tol:
            apart = f"relative error {rel:.3g}, --qtol {tol:g}" if quantized else f"{diff:.3g} apart, tolerance {tol:.3g}"
            raise ExportValidationError(
                f"{folder}: gives other outputs on the new base than on OUT's ({apart}); nothing was written. "
                "Report this (both exports' edgepeft.json), or export the new adapters into another --out")
        # judged against OUT's base, not PyTorch: the report keeps them apart
        checks.append({"what": f"adapter {name} (already in OUT) on the new base", "against": "OUT's base",
                       "max_abs_diff": diff, "tolerance": tol, **({"relative_error": rel} if quantized else {})})
    return checks


def check_tolerances(atol, qtol) -> None:
    """export's --atol (>= 0) and --qtol (> 0)."""
    if not (is_number(atol) and atol >= 0):
        raise ConfigError(f"--atol must be a number >= 0, got {atol!r:.40}")
    if not (is_number(qtol) and qtol > 0):
        raise ConfigError(f"--qtol must be a number > 0, got {qtol!r:.40}")


def log_check(log, check: dict, name: str) -> None:
    if "relative_error" in check:
        effect = "" if check.get("effect_error") is None else f", its effect's {check['effect_error']:.2e}"
        log(f"validated {name}: relative error vs PyTorch = {check['relative_error']:.2e} "
            f"(tolerance {check['tolerance']:g}){effect}, max |diff| {check['max_abs_diff']:.2e}")
    else:
        log(f"validated {name}: max |diff| vs PyTorch = {check['max_abs_diff']:.2e} (tolerance {check['tolerance']:.0e})")
