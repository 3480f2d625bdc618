"""Bottleneck adapters in the exported base graph: four slots per adapted layer.

    x --> layer --> y --+----------------------------------------------(+)--> out
                        \\--> MatMul(D: out x w) (+ d) --> act --> MatMul(U: w x out) (+ u) --/

The width axis ``bottleneck_<act>_w.<module>`` is symbolic; width 0 with zero
biases (the graph's default) adds exactly zero. The non-linearity is part of the
graph, so each one an export needs gets its own slots (``bottleneck_relu_down.*``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgepeft.registry import SlotSpec
from edgepeft.runtimes.manifest import Slot, slot_axis, slot_name
from edgepeft.tuners.bottleneck.layer import ACTIVATIONS, BottleneckLinear
from edgepeft.tuners.bottleneck.model import bottleneck_targets
from edgepeft.tuners.targets import in_out_features, replace_module, wrapper_of

ROLES = ("down", "down_bias", "up", "up_bias")


class BottleneckSlotLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, non_linearity: str):
        super().__init__()
        self.base_layer = base_layer
        self.act = ACTIVATIONS[non_linearity]
        self.feed = {}

    def forward(self, x):
        y = self.base_layer(x)  # (B, T, out)
        h = self.act(y @ self.feed["down"] + self.feed["down_bias"])  # (B, T, w)
        return y + (h @ self.feed["up"] + self.feed["up_bias"])  # (B, T, out)


class BottleneckSlots(SlotSpec):
    name = "bottleneck"

    def unfused(self, model: nn.Module, config) -> list[str]:
        return bottleneck_targets(model, config)  # each adapts its own layer's output

    def slot_table(self, model: nn.Module, config, groups=()) -> list[Slot]:
        act = config.non_linearity
        slots = []
        for key in bottleneck_targets(model, config):
            out = in_out_features(model.get_submodule(key))[1]
            width = slot_axis("bottleneck", f"{act}_w", key)
            shapes = {"down": (out, width), "down_bias": (width,), "up": (width, out), "up_bias": (out,)}
            for role in ROLES:
                slots.append(Slot(slot_name("bottleneck", f"{act}_{role}", key), "bottleneck", f"{act}_{role}", key,
                                  shapes[role], "float32", "empty"))
        return slots

    def install(self, model: nn.Module, slots: list[Slot], fused: dict):
        feeds, neutral, layers = {}, {}, {}
        for s in slots:
            act, role = s.role.split("_", 1)
            key = (s.module, act)
            if key not in layers:
                layers[key] = BottleneckSlotLinear(model.get_submodule(s.module), act)
                replace_module(model, s.module, layers[key])
            feeds[s.name] = (layers[key], role)
            neutral[s.name] = np.zeros([0 if isinstance(d, str) else d for d in s.shape], dtype=s.dtype)
        return feeds, neutral

    def values(self, peft_model, adapter_name: str, slots: list[Slot]) -> dict:
        out = {}
        for s in slots:
            layer = wrapper_of(peft_model.base_model.model.get_submodule(s.module), BottleneckLinear)
            if layer is None or adapter_name not in layer.adapter_down:
                continue
            role = s.role.split("_", 1)[1]
            down, up = layer.adapter_down[adapter_name], layer.adapter_up[adapter_name]
            t = {"down": down.weight.T, "down_bias": down.bias, "up": up.weight.T, "up_bias": up.bias}[role]
            out[s.name] = np.ascontiguousarray(t.detach().float().numpy())
        return out

    def sample(self, slots: list[Slot], neutral: dict) -> dict:
        g = torch.Generator().manual_seed(0)
        return {s.name: torch.randn([2 if isinstance(d, str) else d for d in s.shape], generator=g) * 0.01 for s in slots}

    def describe(self, config) -> dict:
        return {"rank": None, "alpha": None, "bottleneck_size": config.bottleneck_size, "targets": config.target_modules,
                "placement": config.placement, "non_linearity": config.non_linearity}
