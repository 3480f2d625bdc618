"""Put LoRA layers into a model and fold them back into its weights."""
from __future__ import annotations

import torch
from torch import nn

from edgepeft.tuners.lora.layer import LoraLinear
from edgepeft.tuners.targets import linear_targets, replace_module


class LoraTuner:
    layer_cls = LoraLinear

    def inject(self, model: nn.Module, config, adapter_name: str) -> list[str]:
        """Wrap each target module (once) and add ``adapter_name``'s A/B to it."""
        keys = []
        for key in linear_targets(_unwrapped(model), config):
            module = model.get_submodule(key)
            if not isinstance(module, LoraLinear):
                module = LoraLinear(module)
                replace_module(model, key, module)
            if module.fan_in_fan_out:
                config.fan_in_fan_out = True  # as HF PEFT records for GPT-2's Conv1D
            r = config.rank_for(key)
            module.add(adapter_name, r, config.scaling_for(key, r), config.lora_dropout, init=config.init_lora_weights is not False)
            keys.append(key)
        return keys

    def layers(self, model: nn.Module):
        return [(k, m) for k, m in model.named_modules() if isinstance(m, LoraLinear)]

    @torch.no_grad()
    def merge(self, model: nn.Module, adapter_name: str) -> None:
        """Fold ``adapter_name`` into the base weights and put the plain layers back."""
        for key, module in self.layers(model):
            base = module.base_layer
            if adapter_name in module.lora_A:
                base.weight += module.delta_weight(adapter_name).to(base.weight.dtype)
            replace_module(model, key, base)


def _unwrapped(model: nn.Module) -> nn.Module:
    """Targets are matched on the model as it was, ignoring layers already wrapped."""
    return _TargetView(model)


class _TargetView(nn.Module):
    """Read-only view that names LoRA-wrapped layers by their original names."""

    def __init__(self, model):
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "config", getattr(model, "config", None))

    def named_modules(self, *args, **kwargs):
        for key, m in self._model.named_modules():
            if ".base_layer" in key or ".lora_" in key or ".original_module" in key or ".modules_to_save" in key:
                continue
            if isinstance(m, LoraLinear):
                m = m.base_layer
            yield key, m

    def get_output_embeddings(self):
        get = getattr(self._model, "get_output_embeddings", None)
        return get() if get else None
