"""LoRA in the exported base graph: an A and a B slot per target module or fused group.

    x --> MatMul(W: in x out) -------------(+)--(+ bias)--> y
     \\--> MatMul(A: in x r) --> MatMul(B: r x out) --/

``A = lora_A.weight.T`` and ``B = (lora_B.weight * scaling).T``: scaling is folded
into B and both are stored in the layout the graph consumes (no transposes per
call). The rank axis ``lora_r.<module>`` is symbolic; rank 0 (the graph's default)
adds exactly zero, so unbound slots run the base model.

Targets inside a fused group (q/k/v, gate/up: layers that read the same input, see
``edgepeft.exporters.fusion``) share one slot pair for the whole group:

    A_group = [A_q | A_v]                   (in, r_q + r_v)        one A-projection
    B_group = [[B_q, 0, 0], [0, 0, B_v]]    (r_q + r_v, q + k + v) block diagonal

so a group costs two MatMuls and one Add whatever subset of it an adapter targets.
The adapter graph stores the compact A and B of each module and assembles the group
tensors once, at load.

Rows with different LoRA adapters (or weighted sums of them) share one graph run: the
runtime binds every adapter's A side by side along the rank axis (B stacked alike), and
one row-weight input scales each row's rank columns before the B product:

    delta = ((x @ A_stack) * row_weights) @ B_stack     row_weights: (rows, 1, R), 0 or the adapter's weight

Its neutral value, (1, 1, 1) of ones, leaves a single adapter's delta as it is.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from edgepeft.registry import SlotSpec
from edgepeft.runtimes.manifest import Slot, slot_axis, slot_name
from edgepeft.tuners.layout import Assembled, RowWeights, group_key
from edgepeft.tuners.lora.config import DEFAULT_LORA_TARGETS
from edgepeft.tuners.lora.layer import LoraLinear
from edgepeft.tuners.targets import in_out_features, linear_targets, replace_module, wrapper_of


ROWS = slot_name("lora", "rows", "batch")  # the one row-weight input every LoRA delta reads


def lora_delta(x, feed: dict, rows: RowWeights):
    """((x @ A) * row weights) @ B: (B, T, in) -> (B, T, r) -> (B, T, out); a (B, in) input (a pooler) alike."""
    weights = rows.feed["rows"]  # (rows, 1, r), broadcast over T
    return ((x @ feed["A"]) * (weights if x.dim() == 3 else weights[:, 0])) @ feed["B"]


class LoraSlotLinear(nn.Module):
    """A frozen layer plus a LoRA delta whose A and B are graph inputs."""

    def __init__(self, base_layer: nn.Module, rows: RowWeights):
        super().__init__()
        self.base_layer = base_layer
        self.feed = {}
        rows.share_with(self)

    def forward(self, x):  # x: (B, T, in)
        base = self.base_layer
        delta = lora_delta(x, self.feed, self.rows)  # (B, T, out)
        if not isinstance(base, (nn.Linear, Conv1D)):  # another method's slot layer (one adapter is active at a time)
            return base(x) + delta
        weight = base.weight.T if isinstance(base, nn.Linear) else base.weight  # (in, out)
        out = x @ weight + delta
        # The bias comes last so ONNX Runtime still fuses it with what follows (BiasGelu).
        return out if base.bias is None else out + base.bias


class LoraGroupDelta(nn.Module):
    """The LoRA delta of a fused group: ``(x @ A_group) @ B_group``, added before the bias."""

    def __init__(self, rows: RowWeights):
        super().__init__()
        self.feed = {}
        rows.share_with(self)

    def forward(self, x):  # x: (B, T, in) -> (B, T, sum of member outputs)
        return lora_delta(x, self.feed, self.rows)


class LoraSlots(SlotSpec):
    name = "lora"  # a LoRA delta joins a fused group (see the module docstring): nothing kept apart

    def slot_table(self, model: nn.Module, config, groups=()) -> list[Slot]:
        """Slots for ``config``'s targets; ``groups`` are the fused groups (lists of member names)."""
        group_of = {m: tuple(g) for g in groups for m in g}
        slots, seen = [], set()
        for key in linear_targets(model, config, DEFAULT_LORA_TARGETS):
            members = group_of.get(key, ())
            module = group_key(list(members)) if members else key
            if module in seen:
                continue
            seen.add(module)
            n_in = in_out_features(model.get_submodule(key))[0]
            n_out = sum(in_out_features(model.get_submodule(m))[1] for m in members) if members else in_out_features(model.get_submodule(key))[1]
            rank = slot_axis("lora", "r", module)
            slots.append(Slot(slot_name("lora", "A", module), "lora", "A", module, (n_in, rank), "float32", "empty", members,
                              stack_axis=1, selector=ROWS))
            slots.append(Slot(slot_name("lora", "B", module), "lora", "B", module, (rank, n_out), "float32", "empty", members,
                              stack_axis=0, selector=ROWS))
        # rows: 1 or the batch, declared as the batch so the shape pass still proves every reshape after the delta
        slots.append(Slot(ROWS, "lora", "rows", "batch", ("batch", 1, slot_axis("lora", "r", "rows")),
                          "float32", "ones", selects="columns"))
        return slots

    def install(self, model: nn.Module, slots: list[Slot], fused: dict):
        """Put slot layers in (group deltas on fused projections); returns ({slot: (module, role)}, neutral values)."""
        feeds, neutral, deltas = {}, {}, {}
        rows = RowWeights()
        for s in slots:
            if s.selects:
                feeds[s.name] = (rows, "rows")
                neutral[s.name] = np.ones((1, 1, 1), dtype=s.dtype)
                continue
            if s.members:
                if s.module not in deltas:
                    deltas[s.module] = LoraGroupDelta(rows)
                    fused[s.module].deltas.append(deltas[s.module])
                module = deltas[s.module]
            else:
                module = model.get_submodule(s.module)
                if not isinstance(module, LoraSlotLinear):
                    module = LoraSlotLinear(module, rows)
                    replace_module(model, s.module, module)
            feeds[s.name] = (module, s.role)
            shape = [0 if isinstance(d, str) else d for d in s.shape]  # rank 0
            neutral[s.name] = np.zeros(shape, dtype=s.dtype)
        return feeds, neutral

    def values(self, peft_model, adapter_name: str, slots: list[Slot]) -> dict:
        """Slot tensors for one adapter: arrays, or ``Assembled`` parts for fused groups."""
        out = {}
        for s in slots:
            if s.selects:
                continue  # the row weights are the runtime's, per call
            members = s.members or (s.module,)
            parts, pads, sizes = [], [], []
            for m in members:
                layer = peft_model.base_model.model.get_submodule(m)
                sizes.append(in_out_features(layer)[1])
                layer = wrapper_of(layer, LoraLinear)
                if layer is None or adapter_name not in layer.lora_A:
                    parts.append(None)
                    continue
                if s.role == "A":
                    parts.append(_np(layer.lora_A[adapter_name].weight.T))  # (in, r)
                else:
                    parts.append(_np((layer.lora_B[adapter_name].weight * layer.scaling[adapter_name]).T))  # (r, out)
            if s.role == "B":  # block diagonal: each member's rows padded to the group's columns
                offsets = np.cumsum([0, *sizes])
                pads = [(int(offsets[i]), int(offsets[-1] - offsets[i + 1])) for i in range(len(members))]
                pads = [p for p, part in zip(pads, parts) if part is not None]
            parts = [p for p in parts if p is not None]
            if not parts:
                continue  # the adapter targets no member of this group: the slot keeps its neutral value
            if len(parts) == 1 and not any(left or right for left, right in pads):
                out[s.name] = parts[0]
            else:
                out[s.name] = Assembled(parts, axis=1 if s.role == "A" else 0, pads=pads or None)
        return out

    def sample(self, slots: list[Slot], neutral: dict) -> dict:
        """Rank-2 random tensors to trace with (a traced size of 0 or 1 cannot stay symbolic)."""
        g = torch.Generator().manual_seed(0)
        sizes = {s.name: [2 if isinstance(d, str) else d for d in s.shape] for s in slots}
        return {s.name: (1 + 0.1 * torch.randn(sizes[s.name], generator=g)) if s.selects
                else torch.randn(sizes[s.name], generator=g) * 0.01 for s in slots}

    def describe(self, config) -> dict:
        return {"rank": config.r, "alpha": config.lora_alpha, "targets": config.target_modules}


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().numpy())
