"""What a hand-edited, damaged or hostile export cannot get past: the base's slot table, an adapter's tensors.

The runtime indexes shapes by a slot's axes, binds its name as a graph input and stacks, selects or repeats its
values as its fields say (manifest.py's docstring): a field out of range was a TypeError or IndexError deep in a
call, and an adapter filling a selector slot, or half of a LoRA pair, a silent no-op or an ONNX Runtime crash.
The JavaScript runtime checks the same (runtimes/js/src/checks.js).
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from .base_checks import graph_declaration_errors
from .commands import REEXPORT_BASE, export_command
from .errors import AdapterBaseMismatchError, CorruptArtifactError
from .values import is_whole

DTYPES = ("bool", "float16", "float32", "int32", "int64")
NEUTRALS = ("empty", "base", "ones", "zeros")
PHASES = ("every", "prefill")
SELECTS = ("", "columns", "adapters")


def slot_table_errors(slots: list, past_names) -> list[str]:
    """What is wrong with a base manifest's slots (``Slot`` objects); ``past_names``: the graph's cache inputs."""
    errors, names = [], Counter(s.name for s in slots if isinstance(s.name, str))
    past, selectors = set(past_names), {s.name: s.selects for s in slots if isinstance(s.selects, str) and s.selects}
    for slot in slots:
        if not (all(isinstance(v, str) for v in (slot.name, slot.method, slot.role, slot.module, slot.neutral,
                                                 slot.phase, slot.target, slot.selector, slot.selects))
                and slot.dtype in DTYPES and all(is_whole(n) or isinstance(n, str) for n in slot.shape)):
            errors.append(f"slot {slot.name!r} (names are strings, dtype one of {', '.join(DTYPES)}, shape sizes or "
                          "axis names)")
            continue
        wrong = []
        if names[slot.name] > 1:
            wrong.append("its name is listed twice")
        if slot.neutral not in NEUTRALS:
            wrong.append(f"neutral must be one of {', '.join(NEUTRALS)}")
        if slot.phase not in PHASES:
            wrong.append(f"phase must be one of {', '.join(PHASES)}")
        if any(is_whole(n) and n < 0 for n in slot.shape):  # numpy's "negative dimensions" at open
            wrong.append("its shape's sizes must be 0 or more")
        for key in ("virtual_axis", "position_axis", "stack_axis"):
            axis = getattr(slot, key)
            if axis is not None and not (is_whole(axis) and 0 <= axis < len(slot.shape)):
                wrong.append(f"{key} must be an axis of its shape (0 to {len(slot.shape) - 1})")
            elif key == "virtual_axis" and axis is not None and not isinstance(slot.shape[axis], str):
                wrong.append("virtual_axis must be a named axis (an adapter's count of virtual tokens)")  # a size
                # there was allocated at open: 116 TiB for 10**12
        if slot.target and slot.target not in past:
            wrong.append("target must name a cache input (past_key_values.*)")
        if slot.selects not in SELECTS:
            wrong.append("selects must be columns or adapters")
        if slot.selector and slot.selector != "output" and slot.selector not in selectors:
            wrong.append("selector must name a selector slot (one with selects) or be output")
        if not (isinstance(slot.members, tuple) and all(isinstance(m, str) for m in slot.members)):
            wrong.append("members must be module names")
        if (slot.stack_axis is None) != (not slot.selector):
            wrong.append("stack_axis and selector come together (a slot that stacks is selected per row)")
        if selectors.get(slot.selector) == "adapters" and slot.neutral not in ("ones", "zeros"):  # a newcomer hunt
            wrong.append("a slot whose selector selects adapters is neutral ones or zeros (a row without the adapter "
                         "reads that value in a mixed batch)")
        if (slot.virtual_axis is not None or slot.target) and slot.phase != "prefill":
            wrong.append("virtual tokens (virtual_axis, target) are bound at prefill only (phase prefill)")
        if slot.phase == "prefill" and slot.virtual_axis is None:  # a prompt's without it: RotaryEmbedding's error
            wrong.append("a slot bound at prefill adds virtual tokens and counts them (virtual_axis)")
        errors += [f"slot {slot.name!r}: {w}" for w in wrong]
    phases: dict = {}  # slots that share a symbolic axis are bound together (a LoRA pair, a prefix's layers)
    for slot in slots if not errors else ():
        for axis in (a for a in slot.shape if isinstance(a, str)):
            other = phases.setdefault(axis, slot)
            if other.phase != slot.phase:
                errors.append(f"slot {slot.name!r}: phase {slot.phase} differs from {other.name}'s, which shares its "
                              f"axis {axis}")
    return errors


def adapters_axis(slot, slots: dict) -> str | None:
    """The axis along which a slot stacks whole adapters (IA3's: one entry per adapter), else None."""
    selector = slots.get(slot.selector)
    if slot.stack_axis is None or selector is None or selector.selects != "adapters":
        return None
    return slot.shape[slot.stack_axis]


def axis_sharing(slots: dict) -> dict:
    """{symbolic axis: names of the slots whose shape has it} (selector slots left out): made once per base."""
    sharing: dict[str, list] = {}
    for slot in slots.values():
        for axis in {a for a in slot.shape if isinstance(a, str)} if not slot.selects else ():
            sharing.setdefault(axis, []).append(slot.name)
    return sharing


def check_adapter_tensors(label: str, manifest: dict, arrays: dict, slots: dict, sharing: dict, base_dir: str,
                          out: tuple) -> None:
    """Every output must be a slot of this base with the slot's fixed sizes and dtype, share its symbolic sizes with
    the adapter's other outputs, and fill every slot that shares one (``sharing``: ``axis_sharing(slots)``; ``out``:
    OUT and the flags an export into it repeats)."""
    fix = "re-export the adapter"
    axes: dict[str, int] = {}
    for slot_name, arr in arrays.items():
        slot = slots.get(slot_name)
        if slot is None:
            raise AdapterBaseMismatchError(
                f"{label}: adapter fills slot {slot_name!r} that {base_dir} lacks; "
                f"re-export with {export_command('DIR', *out)} to add it")
        if slot.selects:
            raise CorruptArtifactError(f"{label}: adapter fills the selector slot {slot_name!r}, which the runtime "
                                       f"binds per call; {fix}")
        if arr.dtype != np.dtype(slot.dtype) or arr.ndim != len(slot.shape):
            raise CorruptArtifactError(f"{label}: slot {slot_name} is {arr.dtype}{list(arr.shape)}, base expects "
                                       f"{slot.dtype}{list(slot.shape)}; {fix}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():  # NaN logits: argmax picks token 0
            raise CorruptArtifactError(f"{label}: slot {slot_name} holds values that are not finite (NaN or "
                                       f"infinity), which no export writes; {fix}")
        stacked = adapters_axis(slot, slots)
        for size, want in zip(arr.shape, slot.shape):
            if size == 0 and want == f"head_out.{slot.module}":  # (manifest.slot_axis's) a head of no classes
                raise CorruptArtifactError(f"{label}: slot {slot_name} is a head of no outputs; {fix}")
            if want == stacked and size != 1:
                raise CorruptArtifactError(f"{label}: slot {slot_name} stacks {size} adapters along {want}; an "
                                           f"adapter gives 1; {fix}")
            if isinstance(want, str):
                if axes.setdefault(want, size) != size:
                    raise CorruptArtifactError(f"{label}: axis {want} is {size} in {slot_name} but {axes[want]} "
                                               f"elsewhere; {fix}")
            elif size != want:
                raise CorruptArtifactError(f"{label}: slot {slot_name} has shape {list(arr.shape)}, base expects "
                                           f"{list(slot.shape)}; re-export the adapter for this base")
    for slot_name in arrays:
        slot = slots[slot_name]
        for axis in {a for a in slot.shape if isinstance(a, str)} - {adapters_axis(slot, slots)}:
            unfilled = [n for n in sharing[axis] if n not in arrays]
            if unfilled:
                raise CorruptArtifactError(f"{label}: adapter fills {slot_name} but not {min(unfilled)}, which shares "
                                           f"its axis {axis}; {fix}")
    if set(manifest["slots"]) != set(arrays):
        raise CorruptArtifactError(f"{label}: adapter.json and adapter.onnx disagree on the slots; {fix}")


def check_graph_inputs(session, manifest: dict, manifest_path: str, graph: str) -> None:
    """Every slot bound as a graph input (all but those starting a cache input) is one of the base graph's, and the
    inputs, outputs and cache sizes the manifest declares are the graph's (``graph_declaration_errors``)."""
    takes = {i.name for i in session.get_inputs() + session.get_overridable_initializers()}  # slots have defaults
    absent = sorted(s.name for s in manifest["slots"] if not s.target and s.name not in takes)
    errors = [f"slot {absent[0]!r} is not an input of {graph}"] if absent else graph_declaration_errors(session, manifest)
    if errors:
        raise CorruptArtifactError(f"{manifest_path}: {errors[0]}; {REEXPORT_BASE}")


def uncounted_heads(base: dict, made=()) -> list:
    """The base's own heads (slots it fills itself) an OUT written before ``fingerprint_counts_heads`` left out of
    its fingerprint; none for a newer OUT. ``made``: heads made at load, which never count."""
    counted = base.get("fingerprint_counts_heads")
    return [] if counted else sorted({s.module for s in base["slots"] if s.neutral == "base"} - set(made))
