"""Bottleneck adapter layers in PyTorch."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from edgepeft.registry import AdapterLayer
from edgepeft.tuners.targets import adapter_dtype, in_out_features, innermost, made

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class BottleneckLinear(AdapterLayer):
    """Wraps the layer that ends a block: ``y = base(x); y + up(act(down(y)))``.

    down: nn.Linear(out, size); up: nn.Linear(size, out), zero-initialised so a new
    adapter starts as the identity. Parameters: ``adapter_down.<adapter>``,
    ``adapter_up.<adapter>``.
    """

    adapter_dicts = ("adapter_down", "adapter_up")
    adapter_values = ("non_linearity",)

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_out_features(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.non_linearity: dict[str, str] = {}

    def add(self, adapter_name: str, size: int, non_linearity: str, init: bool = True) -> None:
        weight = innermost(self.base_layer).weight
        dtype = adapter_dtype(weight)
        self.adapter_down[adapter_name], self.adapter_up[adapter_name] = made(
            lambda: (nn.Linear(self.out_features, size).to(weight.device, dtype),
                     nn.Linear(size, self.out_features).to(weight.device, dtype)), size, self.out_features,
            f"bottleneck_size {size}: an adapter of that size on a layer of width {self.out_features}",
            "use a size below the layer's width")
        self.non_linearity[adapter_name] = non_linearity
        if init:
            nn.init.zeros_(self.adapter_up[adapter_name].weight)
            nn.init.zeros_(self.adapter_up[adapter_name].bias)

    def forward(self, x, *args, **kwargs):
        y = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if name is None or name not in self.adapter_down:
            return y
        act = ACTIVATIONS[self.non_linearity[name]]
        h = y.to(self.adapter_down[name].weight.dtype)
        return (h + self.adapter_up[name](act(self.adapter_down[name](h)))).to(y.dtype)
