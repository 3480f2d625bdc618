"""IA3 in the exported base graph: one scaling-vector slot per target module or fused group.

    output scaling:   x --> layer --> (* l_out) --> y        l_out: (out,)   slot ia3_out.<module>
    input scaling:    x --> (* l_in) --> layer --> y         l_in:  (in,)    slot ia3_in.<module>

The neutral value is a vector of ones (the base model). Output-scaled targets inside
a fused group (k/v of q/k/v) share one vector for the group's whole output, ones
where a member is not targeted. Input-scaled (feed-forward) targets keep their own
layer: they are left out of fusion (``unfused``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgepeft.registry import SlotSpec
from edgepeft.runtimes.manifest import Slot, slot_name
from edgepeft.tuners.ia3.layer import IA3Linear
from edgepeft.tuners.layout import group_key
from edgepeft.tuners.ia3.model import ia3_targets
from edgepeft.tuners.targets import in_out_features, replace_module, wrapper_of


class IA3SlotLinear(nn.Module):
    """A frozen layer whose input or output is scaled by a vector fed as a graph input."""

    def __init__(self, base_layer: nn.Module, role: str):
        super().__init__()
        self.base_layer = base_layer
        self.role = role
        self.feed = {}

    def forward(self, x):  # x: (B, T, in)
        if self.role == "in":
            return self.base_layer(x * self.feed["in"])
        return self.base_layer(x) * self.feed["out"]  # (B, T, out) * (out,)


class IA3GroupScale(nn.Module):
    """The output scale of a fused group: a (sum of outputs,) vector fed as a graph input."""

    def __init__(self):
        super().__init__()
        self.feed = {}

    def forward(self):
        return self.feed["out"]


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
            slots.append(Slot(slot_name("ia3", role, module), "ia3", role, module, (n_in if feedforward else n_out,),
                              "float32", "ones", members))
        return slots

    def install(self, model: nn.Module, slots: list[Slot], fused: dict):
        feeds, neutral = {}, {}
        for s in slots:
            if s.members:
                module = IA3GroupScale()
                fused[s.module].scales.append(module)
            else:
                module = IA3SlotLinear(model.get_submodule(s.module), s.role)
                replace_module(model, s.module, module)
            feeds[s.name] = (module, s.role)
            neutral[s.name] = np.ones(s.shape, dtype=s.dtype)
        return feeds, neutral

    def values(self, peft_model, adapter_name: str, slots: list[Slot]) -> dict:
        out = {}
        for s in slots:
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
                out[s.name] = np.ascontiguousarray(np.concatenate(parts))
        return out

    def sample(self, slots: list[Slot], neutral: dict) -> dict:
        g = torch.Generator().manual_seed(0)
        return {s.name: 1 + 0.1 * torch.randn(s.shape, generator=g) for s in slots}

    def describe(self, config) -> dict:
        return {"rank": None, "alpha": None, "targets": config.target_modules,
                "feedforward_modules": config.feedforward_modules}
