"""Which modules a config targets, matched exactly as HF PEFT matches them."""
from __future__ import annotations

import json
import re
import shlex
import warnings

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from edgepeft.errors import ConfigError, EdgePeftWarning, first_line
from edgepeft.registry import AdapterLayer, model_modules

LINEAR_TYPES = (nn.Linear, Conv1D)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear, an adapter layer wrapping one (any method's), or a GPT-2 Conv1D (weight stored (in, out))."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    module = innermost(module)  # a wrapper that does not say: the frozen layer it wraps
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)


def made(build, size: int, room: int, what: str, fix: str):
    """``build()``, where a ``size`` past ``room`` that no memory holds (torch's allocator refused it: 1e12, or its 64-bit
    sizes did: 1e20) is refused in a line naming ``what`` and the ``fix``; within ``room``, memory that is full is raised
    as it is."""
    try:
        return build()
    except (RuntimeError, TypeError, OverflowError) as e:
        if size <= room:
            raise
        raise ConfigError(f"{what} cannot be made ({first_line(e)}); {fix}") from None


def wrapper_of(module: nn.Module, cls: type):
    """The ``cls`` adapter layer in a chain of wrappers (another method's layer may sit on top), or None."""
    while module is not None:
        if isinstance(module, cls):
            return module
        module = getattr(module, module.frozen_attr, None) if isinstance(module, AdapterLayer) and module.frozen_attr else None
    return None


def adapter_layer(model: nn.Module, key: str, cls: type, make) -> nn.Module:
    """The ``cls`` adapter layer of module ``key``: the one already in its chain of wrappers, else ``make(module)``
    put in the module's place.

    One layer per method and module holds all of that method's adapters, whatever other
    methods wrapped the module since: a second LoRA adapter added after an IA3 one joins
    the first LoRA layer instead of wrapping the IA3 layer in another LoRA layer (whose
    adapters the exporter would not find).
    """
    module = model.get_submodule(key)
    layer = wrapper_of(module, cls)
    if layer is None:
        layer = make(module)
        replace_module(model, key, layer)
    return layer


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """HF PEFT's ``autocast_adapter_dtype``: adapters on a float16/bfloat16 base train in float32."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def innermost(module: nn.Module) -> nn.Module:
    """The frozen layer under any adapter wrappers (``base_layer`` chains)."""
    while isinstance(module, AdapterLayer) and module.frozen_attr:
        module = getattr(module, module.frozen_attr)
    return module


def untied(model: nn.Module, layer: nn.Module) -> nn.Module:
    """``layer`` with a weight of its own, for an adapter to be folded into: a tied output layer (GPT-2, SmolLM2,
    small Qwen2.5) shares the input embedding table, and folding into it changed every token's embedding too
    (HF PEFT does so, with a warning). ``model`` (the copy being merged) is untied for good."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is layer.weight:
        layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad)
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            config.tie_word_embeddings = False  # save_pretrained and tie_weights would tie them again
    return layer


def untie_adapted_output(model: nn.Module, adapter_name: str) -> None:
    """Before any method folds ``adapter_name`` into the copy ``model``: its tied output layer ``untied`` where the
    adapter adapts it, so a method's merge need not know of ties (a plugin's that folded into GPT-2's lm_head changed
    every token's embedding too)."""
    layer, chain = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None, []
    while isinstance(layer, AdapterLayer) and layer.frozen_attr:
        chain.append(layer)
        layer = getattr(layer, layer.frozen_attr)
    if any(adapter_name in getattr(wrapper, d) for wrapper in chain for d in wrapper.adapter_dicts):
        untied(model, layer)


def saved_whole(names, key: str) -> bool:
    """HF PEFT's ``modules_to_save`` match: the module's full name ends with a listed name (``head``: ``lm_head``)."""
    return any(key.endswith(name) for name in names or [])


def within_saved(names, key: str) -> bool:
    """HF PEFT: a layer that is, or lies inside, a module named in ``modules_to_save`` gets no adapter layer."""
    return any(re.match(rf"(^|.*\.){re.escape(name)}($|\..*)", key) for name in names or [])


def name_matches(patterns, key: str) -> bool:
    """PEFT semantics: a string is a full-match regex; a list matches by name or dotted suffix."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, key) is not None
    return any(key == p or key.endswith("." + p) for p in patterns)


def output_layer_name(model: nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    out = get() if get else None
    if out is None:
        return None
    return next((n for n, m in model.named_modules() if m is out), None)


def configured_targets(model: nn.Module, config, defaults: dict):
    """``config.target_modules``, or the method's default for the model type (``defaults``: {model type: targets})."""
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in defaults:
        raise ConfigError(f"target_modules is required for model type {model_type!r}")
    return defaults[model_type]


def selected_modules(model: nn.Module, config, selects) -> list[str]:
    """Full names of the modules ``selects(key, module)`` picks, less those inside ``modules_to_save`` and those
    ``exclude_modules`` names, as HF PEFT leaves them out."""
    saved, exclude = list(config.modules_to_save or []), getattr(config, "exclude_modules", None)
    names, excluded = [], False
    for key, module in model.named_modules():  # one walk: the names, and whether exclude_modules names any
        if name_matches(exclude, key):
            excluded = excluded or bool(key)
        elif selects(key, module) and not within_saved(saved, key):
            names.append(key)
    if exclude and not excluded:  # a variants hunt: a typo trained every layer it meant to leave out
        warnings.warn(f"exclude_modules {exclude!r} names no module of this model, so it leaves nothing out (HF PEFT "
                      "warns so too); check its names (a string is a regular expression for the whole module name, "
                      "a list's names match a name's end)", EdgePeftWarning, stacklevel=2)
    return names


def module_targets(model: nn.Module, config, defaults: dict) -> list[str]:
    """Full names of the modules of any type ``config.target_modules`` selects (norms, embeddings): for a method
    whose targets are not linear layers. ``defaults``: as for ``linear_targets``."""
    targets = configured_targets(model, config, defaults)
    names = selected_modules(model, config, lambda key, module: name_matches(targets, key))
    if not names:
        model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        leaves = sorted({k.rpartition(".")[2] for k, m in model.named_modules() if k and not any(m.children())})
        raise ConfigError(f"target_modules {targets!r} matches no module of this {model_type} model; its layers "
                          f"are named {', '.join(leaves)}")  # as linear_targets lists them (a newcomer hunt)
    return names


def linear_targets(model: nn.Module, config, defaults: dict) -> list[str]:
    """Full names of the linear modules ``config.target_modules`` selects in ``model``.

    ``"all-linear"`` selects every Linear/Conv1D except the output layer and the
    modules saved whole (``modules_to_save``), as HF PEFT does. ``defaults``: the method's
    targets per model type, for a config that names none.
    """
    targets = configured_targets(model, config, defaults)
    if isinstance(targets, str) and targets.lower() == "all-linear":  # HF PEFT ignores its case
        skip = output_layer_name(model)
        names = selected_modules(model, config, lambda key, module: isinstance(module, LINEAR_TYPES) and key != skip)
    else:
        names = selected_modules(model, config, lambda key, module: name_matches(targets, key))
        for key in names:
            module = model.get_submodule(key)
            if isinstance(module, nn.Embedding) and getattr(config, "ties_embeddings", False):
                raise ConfigError(f"target module {key!r} (Embedding) is there by ensure_weight_tying (HF PEFT adds "
                                  "the embedding a targeted lm_head is tied to), and edgepeft does not adapt "
                                  "embeddings; train with ensure_weight_tying false (its default): lm_head's LoRA "
                                  "alone exports")
            if not isinstance(module, LINEAR_TYPES):
                raise ConfigError(f"target module {key!r} ({type(module).__name__}) is a layer this method does "
                                  "not adapt (nn.Linear and Conv1D layers only); leave it out of target_modules and "
                                  "train again (a method of your own adapting other layers: see module_targets)")
    exclude = getattr(config, "exclude_modules", None)
    if not names:
        model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        have = sorted({k.rpartition(".")[2] for k, m in model.named_modules() if isinstance(m, LINEAR_TYPES)})
        parts = targets.split(",") if isinstance(targets, str) else []  # a name, or names with commas (--option)
        hint = (f"; a string is a regular expression for the whole module name: give a list ({parts}; at the "
                f"command line --target-modules {targets}){f' or {chr(39)}.*{targets}{chr(39)}' if len(parts) == 1 else ''}"
                if parts and all(p in have for p in parts) else "")
        regex = lambda t: bool(set(t) & set("*[]()|^$\\?+"))  # noqa: E731  a name written as a regular expression
        if isinstance(targets, list) and any(map(regex, targets)):
            pattern = "|".join(t if regex(t) else f".*{t}" for t in targets)  # all of them, one
            hint = ("; a list's names match the end of a module's name, not as regular expressions: give one regular "
                    f"expression as a string (at the command line --option "
                    f"{shlex.quote('target_modules=' + json.dumps(pattern))}: JSON, each backslash written twice)")
        if exclude and any(name_matches(exclude, n) for n in have):
            hint += f"; exclude_modules {exclude!r} leaves none of its matches"
        raise ConfigError(f"target_modules {targets!r} matches no linear layer of this {model_type} model; its linear "
                          f"layers are {', '.join(have) or 'none'} (or use all-linear){hint}")
    return names


def replace_module(model: nn.Module, key: str, new: nn.Module) -> None:
    parent_name, _, child = key.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def remove_module(model: nn.Module, key: str) -> None:
    parent_name, _, child = key.rpartition(".")
    delattr(model.get_submodule(parent_name) if parent_name else model, child)


def unwrapped(model: nn.Module) -> nn.Module:
    """A read-only view of ``model`` naming adapter-wrapped layers by their original names.

    Targets are matched on the model as it was, so adding a second adapter finds
    the same layers as the first.
    """
    return _TargetView(model)


class _TargetView(nn.Module):
    def __init__(self, model):
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "config", getattr(model, "config", None))

    def named_modules(self, *args, **kwargs):
        """The model's modules by their original names: each adapter layer stands for the module it wraps,
        and what adapter layers hold (the wrapped module, per-adapter dicts) is left out."""
        held = set()  # names of what adapter layers hold
        for key, m in model_modules(self._model):
            parts = key.split(".")
            if any(".".join(parts[:i]) in held for i in range(1, len(parts) + 1)):
                continue
            if isinstance(m, AdapterLayer):
                if m.frozen_attr is None:  # a module the adapters added (virtual tokens): not the model's
                    held.add(key)
                    continue
                held |= {f"{key}.{d}" if key else d for d in (*m.adapter_dicts, m.frozen_attr) if d}
            yield key, innermost(m)

    def get_submodule(self, target):
        return innermost(self._model.get_submodule(target))

    def get_output_embeddings(self):
        get = getattr(self._model, "get_output_embeddings", None)
        return get() if get else None
