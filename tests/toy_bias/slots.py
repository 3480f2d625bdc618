from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgepeft.registry import SlotSpec
from edgepeft.runtimes.manifest import Slot, slot_name
from edgepeft.tuners.targets import in_out_features, linear_targets, replace_module, wrapper_of

from .model import DEFAULT_TARGETS, BiasLinear


class BiasSlot(nn.Module):
    """The traced layer: ``base(x) + feed["bias"]``, the bias a graph input (zeros: the plain base)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.feed = {}

    def forward(self, x):  # x: (B, T, in) -> (B, T, out)
        return self.base_layer(x) + self.feed["bias"]


class ToyBiasSlots(SlotSpec):
    name = "toybias"

    def slot_table(self, model: nn.Module, config, groups=()) -> list[Slot]:
        return [Slot(slot_name("toybias", "bias", key), "toybias", "bias", key,
                     (in_out_features(model.get_submodule(key))[1],), "float32", "zeros")
                for key in linear_targets(model, config, DEFAULT_TARGETS)]

    def install(self, model: nn.Module, slots: list[Slot], fused: dict):
        feeds, neutral = {}, {}
        for s in slots:
            layer = BiasSlot(model.get_submodule(s.module))
            replace_module(model, s.module, layer)
            feeds[s.name] = (layer, "bias")
            neutral[s.name] = np.zeros(s.shape, dtype=np.float32)
        return feeds, neutral

    def values(self, peft_model, adapter_name: str, slots: list[Slot]) -> dict:
        out = {}
        for s in slots:
            layer = wrapper_of(peft_model.base_model.model.get_submodule(s.module), BiasLinear)
            if layer is not None and adapter_name in layer.toy_bias:
                out[s.name] = layer.toy_bias[adapter_name].detach().float().numpy().copy()
        return out

    def sample(self, slots: list[Slot], neutral: dict) -> dict:
        g = torch.Generator().manual_seed(0)
        return {s.name: torch.randn(s.shape, generator=g) * 0.1 for s in slots}

    def describe(self, config) -> dict:
        return {"rank": None, "alpha": None, "targets": config.target_modules}
