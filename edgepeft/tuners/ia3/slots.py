"""IA3 in the exported base graph: one scaling-vector slot per target module or fused group.

    output scaling:   x --> layer --> (* l_out) --> y        l_out: (1, out)   slot ia3_out.<module>
    input scaling:    x --> (* l_in) --> layer --> y         l_in:  (1, in)    slot ia3_in.<module>

Each slot is a stack of vectors, one adapter's (1, size). Rows of a batch pick theirs with
one row-weight input shared by every IA3 slot: the scale is ``row_weights @ stack``,
(rows, N) @ (N, size) -> (rows, 1, size), so rows with different IA3 adapters (and rows with
none: a stacked vector of ones) share one graph run. The neutral values are ones: the stack
(1, size) and the row weights (1, 1), so one adapter binds its vector and nothing more. Output-scaled targets inside
a fused group (k/v of q/k/v) share one vector for the group's whole output, ones
where a member is not targeted. Input-scaled (feed-forward) targets keep their own
layer: they are left out of fusion (``unfused``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgepeft.registry import SlotSpec
from edgepeft.runtimes.manifest import Slot, slot_axis, slot_name
from edgepeft.tuners.ia3.layer import IA3Linear
from edgepeft.tuners.layout import RowWeights, group_key
from edgepeft.tuners.ia3.model import ia3_targets
from edgepeft.tuners.targets import in_out_features, replace_module, wrapper_of


ROWS = slot_name("ia3", "rows", "batch")  # the one row-weight input every IA3 scale reads
STACK = slot_axis("ia3", "n", "stack")  # the stacked vectors' axis, one length for every slot


def row_scale(stack, rows: RowWeights, dims: int = 3):
    """(rows, N) @ (N, size) -> (rows, 1, size): each row's scaling vector, broadcast over T ((rows, size) for
    a ``dims`` 2 tensor, a pooler's (B, size))."""
    scale = rows.feed["rows"] @ stack
    return scale.unsqueeze(1) if dims == 3 else scale


class IA3SlotLinear(nn.Module):
    """A frozen layer whose input or output is scaled by a vector fed as a graph input."""

    def __init__(self, base_layer: nn.Module, role: str, rows: RowWeights):
        super().__init__()
        self.base_layer = base_layer
        self.role = role
        self.feed = {}
        rows.share_with(self)

    def forward(self, x):  # x: (B, T, in)
        if self.role == "in":
            return self.base_layer(x * row_scale(self.feed["in"], self.rows, x.dim()))
        return self.base_layer(x) * row_scale(self.feed["out"], self.rows, x.dim())  # (B, T, out) * (rows, 1, out)


class IA3GroupScale(nn.Module):
    """The output scale of a fused group: a (rows, 1, sum of outputs) scale from a graph input."""

    def __init__(self, rows: RowWeights):
        super().__init__()
        self.feed = {}
        rows.share_with(self)

    def forward(self):
        return row_scale(self.feed["out"], self.rows)


class IA3Slots(SlotSpec):
    name = "ia3"

    def unfused(self, model: nn.Module, config) -> list[str]:
        """Input-scaled layers scale their own input, so they cannot share a fused MatMul."""
        return [k for k, feedforward in ia3_targets(model, config) if feedforward]

    def slot_table(self, model: nn.Module, config, groups=()) -> list[Slot]:
        group_of = {m: tuple(g) for g in groups for m in g}
        slots, seen = [], set()
        for key, feedforward in ia3_targets(model, config):
            members = () if feedforward else group_of.get(key, ())
            module = group_key(list(members)) if members else key
            if module in seen:
                continue
            seen.add(module)
            n_in, n_out = in_out_features(model.get_submodule(key))
            if members:
                n_out = sum(in_out_features(model.get_submodule(m))[1] for m in members)
            role = "in" if feedforward else "out"
            slots.append(Slot(slot_name("ia3", role, module), "ia3", role, module, (STACK, n_in if feedforward else n_out),
                              "float32", "ones", members, stack_axis=0, selector=ROWS))
        # rows: 1 or the batch, declared as the batch so the shape pass still proves every reshape after the scale
        slots.append(Slot(ROWS, "ia3", "rows", "batch", ("batch", STACK), "float32", "ones",
                          selects="adapters"))
        return slots

    def install(self, model: nn.Module, slots: list[Slot], fused: dict):
        feeds, neutral = {}, {}
        rows = RowWeights()
        for s in slots:
            neutral[s.name] = np.ones([1 if isinstance(d, str) else d for d in s.shape], dtype=s.dtype)
            if s.selects:
                feeds[s.name] = (rows, "rows")
                continue
            if s.members:
                module = IA3GroupScale(rows)
                fused[s.module].scales.append(module)
            else:
                module = IA3SlotLinear(model.get_submodule(s.module), s.role, rows)
                replace_module(model, s.module, module)
            feeds[s.name] = (module, s.role)
        return feeds, neutral

    def values(self, peft_model, adapter_name: str, slots: list[Slot]) -> dict:
        out = {}
        for s in slots:
            if s.selects:
                continue  # the row weights are the runtime's, per call
            parts, filled = [], False
            for m in s.members or (s.module,):
                layer = peft_model.base_model.model.get_submodule(m)
                ia3 = wrapper_of(layer, IA3Linear)
                if ia3 is not None and adapter_name in ia3.ia3_l:
                    parts.append(ia3.ia3_l[adapter_name].detach().float().flatten().numpy())
                    filled = True
                else:
                    parts.append(np.ones(in_out_features(layer)[1], dtype=np.float32))
            if filled:
                out[s.name] = np.ascontiguousarray(np.concatenate(parts)[None, :])  # (1, size): one stacked vector
        return out

    def sample(self, slots: list[Slot], neutral: dict) -> dict:
        g = torch.Generator().manual_seed(0)  # two stacked vectors, two rows: both axes stay symbolic
        return {s.name: 1 + 0.1 * torch.randn([2 if isinstance(d, str) else d for d in s.shape], generator=g)
                for s in slots}

    def describe(self, config) -> dict:
        return {"rank": None, "alpha": None, "targets": config.target_modules,
                "feedforward_modules": config.feedforward_modules}
