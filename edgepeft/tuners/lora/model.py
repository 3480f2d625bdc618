"""Put LoRA layers into a model and fold them back into its weights."""
from __future__ import annotations

import torch
from torch import nn

from edgepeft.errors import ConfigError, UnsupportedMethodError
from edgepeft.registry import Tuner, model_modules
from edgepeft.tuners.lora.config import DEFAULT_LORA_TARGETS
from edgepeft.tuners.lora.layer import LoraLinear
from edgepeft.tuners.targets import (
    adapter_layer, configured_targets, innermost, linear_targets, replace_module, untied, unwrapped,
)


class LoraTuner(Tuner):
    def inject(self, model: nn.Module, config, adapter_name: str) -> list[str]:
        """Wrap each target module (once) and add ``adapter_name``'s A/B to it."""
        if config.init_lora_weights == "mica" and not config.inference_mode:  # a MiCA adapter runs as plain LoRA
            raise UnsupportedMethodError("init_lora_weights='mica' trains A alone from B's SVD init; edgepeft loads and "
                                         "exports MiCA adapters but does not train them: train with the default init")
        if config.init_lora_weights == "eva" and not config.inference_mode:  # an EVA adapter runs as plain LoRA
            raise UnsupportedMethodError(
                "init_lora_weights='eva' starts A from the SVD of the layers' activations on training data (HF PEFT's "
                "initialize_lora_eva_weights), which edgepeft does not run; edgepeft loads and exports EVA adapters but "
                "does not train them: train with the default init, or initialise and train with HF PEFT")
        keys = []
        targets = linear_targets(unwrapped(model), config, DEFAULT_LORA_TARGETS)
        # record what they resolved to, as HF PEFT does: the model type's names, or all-linear's modules
        if config.target_modules is None:
            config.target_modules = sorted(configured_targets(unwrapped(model), config, DEFAULT_LORA_TARGETS))
        elif str(config.target_modules).lower() == "all-linear":
            config.target_modules = sorted(targets)
        for key in targets:
            module = adapter_layer(model, key, LoraLinear, LoraLinear)
            if module.fan_in_fan_out:
                config.fan_in_fan_out = True  # as HF PEFT records for GPT-2's Conv1D
            r = config.rank_for(key)
            if config.init_lora_weights == "orthogonal" and r % 2:
                raise ConfigError(f"init_lora_weights='orthogonal' needs an even rank; {key} has r={r}")
            module.add(adapter_name, r, config.scaling_for(key, r), config.lora_dropout, init=config.init_lora_weights)
            keys.append(key)
        return keys

    def layers(self, model: nn.Module):
        return [(k, m) for k, m in model_modules(model) if isinstance(m, LoraLinear)]

    @torch.no_grad()
    def merge(self, model: nn.Module, adapter_name: str) -> None:
        """Fold ``adapter_name`` into the base weights and put the plain layers back."""
        for key, module in self.layers(model):
            if adapter_name in module.lora_A:
                base = untied(model, innermost(module))
                base.weight += module.delta_weight(adapter_name)  # float32 added in place: rounded once, as HF PEFT
            replace_module(model, key, module.base_layer)
