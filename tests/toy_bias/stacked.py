"""The toy's bias, stackable in a mixed batch (one adapter per row) as IA3's vectors are: per target a slot
(adapters, out) stacked along axis 0, and one selector slot (rows, adapters) that picks each row's share; its neutral
is zeros (an added bias), where IA3's is ones (a scale). Registered as "toystack" on import."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgepeft.registry import Method, register_method
from edgepeft.runtimes.manifest import Slot, slot_axis, slot_name
from edgepeft.tuners.layout import RowWeights
from edgepeft.tuners.targets import in_out_features, linear_targets, replace_module

from .config import ToyBiasConfig
from .model import DEFAULT_TARGETS, ToyBiasTuner
from .slots import ToyBiasSlots

ROWS, STACK = slot_name("toystack", "rows", "batch"), slot_axis("toystack", "n", "stack")


@dataclass
class ToyStackConfig(ToyBiasConfig):
    peft_type_name = "TOY_STACK"


class StackedBiasSlot(nn.Module):
    """``base(x) + rows @ stack``: each row adds its share of the stacked biases (its adapter's, or none)."""

    def __init__(self, base_layer: nn.Module, rows: RowWeights):
        super().__init__()
        self.base_layer, self.feed = base_layer, {}
        rows.share_with(self)

    def forward(self, x):  # x: (B, T, in); rows: (B or 1, adapters); bias: (adapters, out)
        return self.base_layer(x) + (self.rows.feed["rows"] @ self.feed["bias"]).unsqueeze(1)


class ToyStackSlots(ToyBiasSlots):
    name = "toystack"

    def slot_table(self, model: nn.Module, config, groups=()) -> list[Slot]:
        return [Slot(slot_name("toystack", "bias", key), "toystack", "bias", key,
                     (STACK, in_out_features(model.get_submodule(key))[1]), "float32", "zeros", stack_axis=0,
                     selector=ROWS) for key in linear_targets(model, config, DEFAULT_TARGETS)] + [
            Slot(ROWS, "toystack", "rows", "batch", ("batch", STACK), "float32", "ones", selects="adapters")]

    def install(self, model: nn.Module, slots: list[Slot], fused: dict):
        feeds, neutral, rows = {}, {}, RowWeights()
        for s in slots:
            if s.selects:  # one weight, 1: the single adapter bound (or the zeros of none)
                feeds[s.name], neutral[s.name] = (rows, "rows"), np.ones((1, 1), np.float32)
                continue
            layer = StackedBiasSlot(model.get_submodule(s.module), rows)
            replace_module(model, s.module, layer)
            feeds[s.name], neutral[s.name] = (layer, "bias"), np.zeros((1, s.shape[1]), np.float32)
        return feeds, neutral

    def values(self, peft_model, adapter_name: str, slots: list[Slot]) -> dict:
        biases = super().values(peft_model, adapter_name, [s for s in slots if not s.selects])
        return {name: value[None, :] for name, value in biases.items()}

    def sample(self, slots: list[Slot], neutral: dict) -> dict:  # the trace's example values: two adapters stacked
        g = torch.Generator().manual_seed(0)
        return {s.name: torch.randn([2 if isinstance(d, str) else d for d in s.shape], generator=g) * 0.1 for s in slots}


TOY_STACK = register_method(Method(name="toystack", config_cls=ToyStackConfig, tuner=ToyBiasTuner(), slots=ToyStackSlots()))
