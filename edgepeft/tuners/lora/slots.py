"""LoRA in the exported base graph: two slots per target module.

    x --> MatMul(W: in x out) -------------(+)--(+ bias)--> y
     \--> MatMul(A: in x r) --> MatMul(B: r x out) --/

``A = lora_A.weight.T`` and ``B = (lora_B.weight * scaling).T``: scaling is folded
into B and both are stored in the layout the graph consumes (no transposes per
call). The rank axis ``lora_r.<module>`` is symbolic; rank 0 (the graph's default)
adds exactly zero, so unbound slots run the base model.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgepeft.runtimes.manifest import Slot, slot_axis, slot_name
from edgepeft.tuners.lora.layer import LoraLinear
from edgepeft.tuners.targets import linear_targets, replace_module


class LoraSlotLinear(nn.Module):
    """A frozen layer plus a LoRA delta whose A and B are graph inputs."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.feed = {}

    def forward(self, x):  # x: (B, T, in)
        base = self.base_layer
        delta = (x @ self.feed["A"]) @ self.feed["B"]  # (B, T, r) @ (r, out) -> (B, T, out)
        weight = base.weight.T if isinstance(base, nn.Linear) else base.weight  # (in, out)
        out = x @ weight + delta
        # The bias comes last so ONNX Runtime still fuses it with what follows (BiasGelu).
        return out if base.bias is None else out + base.bias


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)  # Conv1D weight: (in, out)


class LoraSlots:
    name = "lora"

    def slot_table(self, model: nn.Module, config) -> list[Slot]:
        slots = []
        for key in linear_targets(model, config):
            n_in, n_out = _in_out(model.get_submodule(key))
            rank = slot_axis("lora", "r", key)
            slots.append(Slot(slot_name("lora", "A", key), "lora", "A", key, (n_in, rank), "float32", "empty"))
            slots.append(Slot(slot_name("lora", "B", key), "lora", "B", key, (rank, n_out), "float32", "empty"))
        return slots

    def install(self, model: nn.Module, slots: list[Slot]):
        """Swap target layers for slot layers; returns ({slot: (module, role)}, neutral values)."""
        feeds, neutral = {}, {}
        for s in slots:
            module = model.get_submodule(s.module)
            if not isinstance(module, LoraSlotLinear):
                module = LoraSlotLinear(module)
                replace_module(model, s.module, module)
            feeds[s.name] = (module, s.role)
            shape = [0 if isinstance(d, str) else d for d in s.shape]  # rank 0
            neutral[s.name] = np.zeros(shape, dtype=s.dtype)
        return feeds, neutral

    def values(self, peft_model, adapter_name: str, slots: list[Slot]) -> dict:
        out = {}
        for s in slots:
            layer = peft_model.base_model.model.get_submodule(s.module)
            assert isinstance(layer, LoraLinear)
            if s.role == "A":
                t = layer.lora_A[adapter_name].weight.T  # (in, r)
            else:
                t = (layer.lora_B[adapter_name].weight * layer.scaling[adapter_name]).T  # (r, out)
            out[s.name] = np.ascontiguousarray(t.detach().float().numpy())
        return out

    def sample(self, slots: list[Slot], neutral: dict) -> dict:
        """Rank-2 random tensors to trace with (a traced size of 0 or 1 cannot stay symbolic)."""
        g = torch.Generator().manual_seed(0)
        return {s.name: torch.randn([2 if isinstance(d, str) else d for d in s.shape], generator=g) * 0.01 for s in slots}

    def describe(self, config) -> dict:
        return {"rank": config.r, "alpha": config.lora_alpha, "targets": config.target_modules}
