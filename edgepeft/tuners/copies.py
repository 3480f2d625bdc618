"""Plain copies of a model holding adapters, for ``PeftModel.merge_and_unload`` and ``unload``: the transformers model
deep-copied, each adapter layer put back as the module it wraps (the adapter folded into it, or not), and modules that
wrap nothing (virtual tokens) dropped. The PeftModel itself stays as it was."""
from __future__ import annotations

import copy

import torch
from torch import nn

from edgepeft.errors import ConfigError, UnsupportedMethodError
from edgepeft.registry import AdapterLayer
from edgepeft.tuners.targets import remove_module, replace_module, untie_adapted_output


def merged_copy(model: nn.Module, tuner, name: str, safe_merge: bool = False, keep_layers: bool = False) -> nn.Module:
    """``model`` with adapter ``name`` folded into its weights (``tuner``: its method's); ``safe_merge``: refused
    where that gives weights that are not finite, as HF PEFT refuses; ``keep_layers``: layers that cannot be folded
    (a bottleneck's) stay and run ``name`` (export --merge traces them), else such an adapter is refused."""
    model = copy.deepcopy(model)
    for module in model.modules():  # layers that cannot be folded (bottleneck) keep running `name`
        if isinstance(module, AdapterLayer):
            module.active_adapter = name
    untie_adapted_output(model, name)
    tuner.merge(model, name)
    for key, module in list(model.named_modules()):  # outermost first: a wrapper goes before what it holds
        if isinstance(module, AdapterLayer) and module.frozen_attr is None:  # virtual tokens (merge refuses
            remove_module(model, key)  # their own adapters)
        if not isinstance(module, AdapterLayer) or not module.frozen_attr:
            continue
        try:
            still_there = model.get_submodule(key) is module
        except AttributeError:  # inside a wrapper replaced above
            still_there = False
        plain = module.merged_module(name) if still_there else None
        if plain is not None:  # None: it cannot be folded (a bottleneck): it stays, active
            replace_module(model, key, plain)
        elif still_there and not keep_layers:  # saved, the copy was no transformers model: reloaded, those were random
            raise unfoldable(name, f"its {type(module).__name__} layers stay")
    take_out_mixed(model)
    broken = [k for k, p in model.named_parameters() if not torch.isfinite(p).all()] if safe_merge else []
    if broken:
        raise ConfigError(f"merging adapter {name!r} gives weights that are not finite (NaN or inf: {broken[0]}); "
                          "the adapter is broken: train it again")
    return model


def unfoldable(name: str, why: str) -> UnsupportedMethodError:
    """merge_and_unload's refusal of an adapter whose layers cannot be folded into the weights."""
    return UnsupportedMethodError(
        f"merge_and_unload(): adapter {name!r} cannot be folded into the weights ({why}; a copy holding its layers "
        "saves as no transformers model: from_pretrained starts them at random); export it with `edgepeft export` "
        "(--merge keeps its layers in the graph), or keep the PeftModel")


def unloaded_copy(model: nn.Module) -> nn.Module:
    """``model`` with every adapter layer taken out, nothing merged (HF PEFT's ``unload``: a layer trained whole keeps
    the active adapter's copy)."""
    if any(isinstance(m, AdapterLayer) and m.frozen_attr == "" and m.holds_adapters() for m in model.modules()):
        raise UnsupportedMethodError("unload(): prefix tuning is part of the attention modules, not a layer to "
                                     "take out; run the base with `with model.disable_adapter():`")
    model = copy.deepcopy(model)
    take_out_mixed(model)
    while (layer := next(((k, m) for k, m in model.named_modules() if isinstance(m, AdapterLayer)), None)):
        key, module = layer  # outermost first
        if module.frozen_attr is None:  # wraps nothing: dropped
            remove_module(model, key)
        else:
            replace_module(model, key, module.unloaded_module())
    return model


def take_out_mixed(model: nn.Module, unused_only: bool = False) -> None:
    """The layers mixed into modules (prefix tuning's attention) taken out; ``unused_only``: those serving none."""
    for module in model.modules():
        if isinstance(module, AdapterLayer) and module.frozen_attr == "" and not (unused_only and module.holds_adapters()):
            module.take_out()
