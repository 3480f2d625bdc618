"""IA3 layers in PyTorch: HF PEFT's module layout, so state-dict keys match."""
from __future__ import annotations

import torch
from torch import nn

from edgepeft.registry import AdapterLayer
from edgepeft.tuners.targets import adapter_dtype, in_out_features, innermost


class IA3Linear(AdapterLayer):
    """Wraps a Linear or GPT-2 Conv1D.

    ``y = base(x) * l`` with ``l``: (out, 1), or for a feed-forward layer
    ``y = base(x * l)`` with ``l``: (1, in). Parameters are named as in HF PEFT
    (``base_layer``, ``ia3_l.<adapter>``).
    """

    adapter_dicts = ("ia3_l",)  # dicts holding one entry per adapter

    def __init__(self, base_layer: nn.Module, is_feedforward: bool):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_out_features(base_layer)
        self.is_feedforward = is_feedforward
        self.ia3_l = nn.ParameterDict()

    def add(self, adapter_name: str, init: bool = True) -> None:
        weight = innermost(self.base_layer).weight
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        value = torch.ones(shape) if init else torch.randn(shape)
        self.ia3_l[adapter_name] = nn.Parameter(value.to(weight.device, adapter_dtype(weight)))

    def forward(self, x, *args, **kwargs):
        name = self.active_adapter
        if name is None or name not in self.ia3_l:
            return self.base_layer(x, *args, **kwargs)
        scale = self.ia3_l[name].flatten()  # (in,) or (out,)
        if self.is_feedforward:  # as HF PEFT: scaled in the adapter's dtype, fed in the base weight's
            return self.base_layer((x.to(scale.dtype) * scale).to(innermost(self.base_layer).weight.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scale).to(result.dtype)
