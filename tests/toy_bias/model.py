from __future__ import annotations

import torch
from torch import nn

from edgepeft.registry import AdapterLayer, Tuner, model_modules
from edgepeft.tuners.targets import adapter_layer, in_out_features, innermost, linear_targets, replace_module, unwrapped

DEFAULT_TARGETS = {"bert": ["output.dense"], "llama": ["down_proj"]}


class BiasLinear(AdapterLayer):
    """``base(x) + toy_bias[adapter]``; parameters ``toy_bias.<adapter>`` of shape (out,)."""

    adapter_dicts = ("toy_bias",)

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.toy_bias = nn.ParameterDict()

    def add(self, adapter_name: str) -> None:
        out = in_out_features(self.base_layer)[1]
        self.toy_bias[adapter_name] = nn.Parameter(torch.zeros(out))

    def forward(self, x, *args, **kwargs):
        y = self.base_layer(x, *args, **kwargs)
        return y + self.toy_bias[self.active_adapter] if self.active_adapter in self.toy_bias else y


class ToyBiasTuner(Tuner):
    def inject(self, model: nn.Module, config, adapter_name: str) -> list[str]:
        keys = linear_targets(unwrapped(model), config, DEFAULT_TARGETS)
        for key in keys:
            adapter_layer(model, key, BiasLinear, BiasLinear).add(adapter_name)
        return keys

    def layers(self, model: nn.Module):
        return [(k, m) for k, m in model_modules(model) if isinstance(m, BiasLinear)]

    @torch.no_grad()
    def merge(self, model: nn.Module, adapter_name: str) -> None:
        for key, layer in self.layers(model):
            base = innermost(layer)
            if adapter_name in layer.toy_bias:
                if base.bias is None:
                    base.bias = nn.Parameter(torch.zeros_like(layer.toy_bias[adapter_name]))
                base.bias += layer.toy_bias[adapter_name]
            replace_module(model, key, layer.base_layer)
