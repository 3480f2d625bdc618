"""Put IA3 layers into a model and fold them back into its weights."""
from __future__ import annotations

import torch
from torch import nn

from edgepeft.errors import ConfigError
from edgepeft.registry import Tuner, model_modules
from edgepeft.tuners.ia3.config import DEFAULT_IA3_FEEDFORWARD, DEFAULT_IA3_TARGETS
from edgepeft.tuners.ia3.layer import IA3Linear
from edgepeft.tuners.targets import (
    adapter_layer, configured_targets, innermost, linear_targets, name_matches, replace_module, untied, unwrapped,
)


def ia3_targets(model: nn.Module, config) -> list[tuple[str, bool]]:
    """[(module name, is_feedforward)] for the config's targets, as HF PEFT resolves them."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    feedforward = config.feedforward_modules
    if feedforward is None:
        feedforward = DEFAULT_IA3_FEEDFORWARD.get(model_type, [])
    keys = linear_targets(model, config, defaults=DEFAULT_IA3_TARGETS)
    return [(k, is_feedforward(feedforward, k)) for k in keys]


def is_feedforward(feedforward, key: str) -> bool:
    """HF PEFT's rule, looser than target_modules': a string is a full-match regex, a list entry any end of the
    name ("proj" marks "mlp.up_proj")."""
    if isinstance(feedforward, str):
        return name_matches(feedforward, key)
    return any(key.endswith(p) for p in feedforward)


class IA3Tuner(Tuner):
    def inject(self, model: nn.Module, config, adapter_name: str) -> list[str]:
        keys = []
        inner = unwrapped(model)
        targets = ia3_targets(inner, config)
        if config.target_modules is None:  # record the model type's defaults, as HF PEFT does
            defaults = sorted(configured_targets(inner, config, DEFAULT_IA3_TARGETS))
            config.check_feedforward(defaults, defaults_of=inner.config.model_type)
            config.target_modules = defaults
        if config.feedforward_modules is None:  # HF PEFT records the model type's list, which it cannot load beside
            chosen = config.target_modules  # targets lacking it: the targets it marks, the same layers
            defaults = DEFAULT_IA3_FEEDFORWARD.get(getattr(getattr(inner, "config", None), "model_type", None), [])
            config.feedforward_modules = sorted(defaults) if isinstance(chosen, str) else sorted(
                t for t in chosen if is_feedforward(defaults, t))
        for key, feedforward in targets:
            module = adapter_layer(model, key, IA3Linear, lambda m, ff=feedforward: IA3Linear(m, ff))
            if module.is_feedforward != feedforward:  # one layer scales either its input or its output
                theirs, ours = ("output", "input") if feedforward else ("input", "output")
                raise ConfigError(f"{key}: another IA3 adapter of this model scales this layer's {theirs}, "
                                  f"{adapter_name!r} its {ours}, which one model cannot build together; export them "
                                  "one at a time into the same --out folder")
            if not isinstance(innermost(module), nn.Linear):  # GPT-2's Conv1D
                config.fan_in_fan_out = True  # as HF PEFT records for GPT-2's Conv1D
            module.add(adapter_name, init=config.init_ia3_weights)
            keys.append(key)
        return keys

    def layers(self, model: nn.Module):
        return [(k, m) for k, m in model_modules(model) if isinstance(m, IA3Linear)]

    @torch.no_grad()
    def merge(self, model: nn.Module, adapter_name: str) -> None:
        """Fold the scaling vectors into the weights (and, for output scaling, the bias)."""
        for key, module in self.layers(model):
            if adapter_name in module.ia3_l:
                base = untied(model, innermost(module))
                scale = module.ia3_l[adapter_name].flatten()
                linear = isinstance(base, nn.Linear)  # Linear weight (out, in); Conv1D weight (in, out)
                if module.is_feedforward:
                    base.weight.mul_(scale[None, :] if linear else scale[:, None])
                else:
                    base.weight.mul_(scale[:, None] if linear else scale[None, :])
                    if base.bias is not None:
                        base.bias.mul_(scale)
            replace_module(model, key, module.base_layer)
