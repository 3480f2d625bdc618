"""LoRA layers in PyTorch: HF PEFT's module layout, so state-dict keys match."""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from edgepeft.registry import AdapterLayer
from edgepeft.tuners.targets import adapter_dtype, in_out_features, innermost, made


class LoraLinear(AdapterLayer):
    """Wraps a Linear or GPT-2 Conv1D: ``y = base(x) + B(A(dropout(x))) * scaling``.

    Parameters are named as in HF PEFT (``base_layer``, ``lora_A.<adapter>``,
    ``lora_B.<adapter>``) so saved keys are byte-compatible.
    A: (r, in) as nn.Linear(in, r); B: (out, r) as nn.Linear(r, out).
    """

    adapter_dicts = ("lora_A", "lora_B", "lora_dropout")  # ModuleDicts holding one entry per adapter
    adapter_values = ("scaling",)

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_out_features(base_layer)
        self.fan_in_fan_out = isinstance(innermost(base_layer), Conv1D)  # Conv1D weight: (in, out)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def add(self, adapter_name: str, r: int, scaling: float, dropout: float, init=True) -> None:
        """``init``: HF PEFT's ``init_lora_weights`` (True, False, "gaussian", "orthogonal", "eva")."""
        weight = innermost(self.base_layer).weight
        dtype = adapter_dtype(weight)
        linear = lambda i, o: nn.Linear(i, o, bias=False).to(weight.device, dtype)  # noqa: E731
        self.lora_A[adapter_name], self.lora_B[adapter_name] = made(
            lambda: (linear(self.in_features, r), linear(r, self.out_features)), r, max(self.in_features, self.out_features),
            f"r {r}: a LoRA of that rank on a {self.in_features} x {self.out_features} layer", "use a rank below the layer's widths")
        self.lora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[adapter_name] = scaling
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        with torch.no_grad():
            if init == "orthogonal":  # A's rows and B's columns from two disjoint halves of one orthogonal basis: B @ A = 0
                basis = torch.linalg.qr(torch.randn(r, r))[0]
                a.copy_((torch.randn(self.in_features, r // 2) @ basis[0::2]).T / 10)
                b.copy_(torch.randn(r // 2, self.out_features).T @ basis[1::2] / 10)  # as HF PEFT draws it
            elif init is not False:  # B zero: the adapter starts as a no-op
                if init == "gaussian":
                    nn.init.normal_(a, std=1 / r)
                else:  # True (PEFT's default) and "eva" before its data-driven step: A Kaiming-uniform
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(b)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """B @ A * scaling in the base layer's weight layout."""
        delta = self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight * self.scaling[adapter_name]  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x, *args, **kwargs):
        result = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if name is None or name not in self.lora_A:
            return result
        a, b = self.lora_A[name], self.lora_B[name]
        x = x.to(a.weight.dtype)
        return (result + b(a(self.lora_dropout[name](x))) * self.scaling[name]).to(result.dtype)
