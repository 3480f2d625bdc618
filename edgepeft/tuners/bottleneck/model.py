"""Put bottleneck adapters after the layers that end a block."""
from __future__ import annotations

from torch import nn

from edgepeft.registry import Tuner, model_modules
from edgepeft.tuners.bottleneck.layer import BottleneckLinear
from edgepeft.tuners.targets import adapter_layer, linear_targets, unwrapped


def bottleneck_targets(model: nn.Module, config) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    defaults = {model_type: config.default_targets(model_type)} if config.default_targets(model_type) else {}
    return linear_targets(model, config, defaults=defaults)


class BottleneckTuner(Tuner):
    def inject(self, model: nn.Module, config, adapter_name: str) -> list[str]:
        keys = bottleneck_targets(unwrapped(model), config)
        if config.target_modules is None:
            config.target_modules = keys  # record where the placement put them
        for key in keys:
            module = adapter_layer(model, key, BottleneckLinear, BottleneckLinear)
            module.add(adapter_name, config.bottleneck_size, config.non_linearity, init=config.init_bottleneck_weights)
        return keys

    def layers(self, model: nn.Module):
        return [(k, m) for k, m in model_modules(model) if isinstance(m, BottleneckLinear)]

    unfoldable = "a bottleneck is not linear"

    def merge(self, model: nn.Module, adapter_name: str) -> None:
        """A bottleneck is non-linear and cannot be folded into the weights: its layers stay (``unfoldable``).

        ``export --merge`` keeps the layers that hold ``adapter_name`` in its graph and unwraps the rest;
        ``PeftModel.merge_and_unload`` refuses such an adapter.
        """
