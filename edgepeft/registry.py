"""The seam every method plugs in through: what the trainer, the exporter and the loader ask of a method.

A method is one folder under ``edgepeft/tuners/`` (or anywhere: a test registers a toy one)
holding a config class, a ``Tuner`` (PyTorch side) and a ``SlotSpec`` (export side), and one
``register_method(Method(...))`` call. ``PeftModel`` calls the tuner's hooks, the exporter the
spec's, and the runtime binds slots by the fields they declare (the few reads of a method by its
name: docs/architecture.md). This module is a leaf: it imports no method. ``edgepeft.tuners``
imports the built-in methods and hands out the lookups (``method_for``, ``methods``, ``spec_for``).

Slot specs that no PEFT type owns (task heads: ``modules_to_save``) register with
``register_spec(spec, every_adapter=True)``: they add their slots to every adapter.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from edgepeft.config import register_config
from edgepeft.errors import ConfigError, UnsupportedMethodError


class AdapterLayer(nn.Module):
    """A layer that holds adapters around a frozen module.

    ``adapter_dicts``: the names of its per-adapter ``ModuleDict``/``ParameterDict``s (saved by
    ``PeftModel`` under ``<module>.<dict>.<adapter param>``, HF PEFT's keys); ``adapter_values``: its plain dicts of
    one value per adapter (not saved; HF PEFT's ``other_param_names``); ``frozen_attr``: the
    attribute holding the module it wraps ("": mixed into the module itself; None: wraps nothing, a module of the
    model's own that a merged or unloaded copy drops); ``active_adapter``: the adapter calls use (None: none).
    A layer whose saved state is not its parameters (virtual tokens) sets ``own_state`` and
    implements the three ``*_tensors``/``adapter_parameters`` hooks.
    """

    adapter_dicts: tuple = ()
    adapter_values: tuple = ()
    frozen_attr: str | None = "base_layer"
    own_state: bool = False
    active_adapter = None

    def merged_module(self, adapter_name: str):
        """The plain module that computes what this layer does with ``adapter_name`` active, or None when
        it cannot be folded into one (``merge_and_unload``); by default the wrapped module when the layer
        holds nothing of ``adapter_name``."""
        if any(adapter_name in getattr(self, d) for d in self.adapter_dicts):
            return None
        return getattr(self, self.frozen_attr)

    def unloaded_module(self):
        """The module this layer leaves when its adapters are taken out, nothing merged (``unload``): by default the
        module it wraps."""
        return getattr(self, self.frozen_attr)

    def holds_adapters(self) -> bool:
        """Whether a layer mixed into a module (``frozen_attr`` "") still serves an adapter of its method."""
        raise NotImplementedError

    def take_out(self) -> None:
        """A layer mixed into a module (``frozen_attr`` ""): the module's own class back, in place (``unload``, a
        merged copy, and the last adapter of its method deleted)."""
        raise NotImplementedError

    def adapter_parameters(self, adapter_name: str) -> dict:
        """{name: parameter} that train for ``adapter_name`` (``own_state`` layers only)."""
        raise NotImplementedError

    def saved_tensors(self, adapter_name: str) -> dict:
        """{saved key: tensor} written to ``adapter_model.safetensors`` (``own_state`` layers only)."""
        raise NotImplementedError

    def load_saved_tensors(self, adapter_name: str, state: dict, path: str) -> None:
        """Put what ``saved_tensors`` wrote back (``own_state`` layers only)."""
        raise NotImplementedError


def model_modules(model: nn.Module):
    """(name, module) for ``model`` and every module in it but what adapter layers hold per adapter (their
    ``adapter_dicts``): the model's own modules and the adapter layers, in ``named_modules``' order. Its length does
    not grow with the number of adapters loaded, as a walk of ``named_modules`` does (a whole-model walk per
    ``load_adapter``/``set_adapter`` made loading N adapters cost N²)."""
    seen, todo = set(), [("", model)]
    while todo:
        key, module = todo.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield key, module
        held = module.adapter_dicts if isinstance(module, AdapterLayer) else ()
        todo.extend(reversed([(f"{key}.{name}" if key else name, child) for name, child in module._modules.items()
                              if child is not None and name not in held]))


def model_parameters(model: nn.Module):
    """The parameters of ``model_modules``' modules (the model's own, and what adapter layers hold outside their
    dicts), each once."""
    seen = set()
    for _, module in model_modules(model):
        for p in module._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                yield p


def held_entries(model: nn.Module):
    """(adapter name, entry) for every entry of every adapter layer's dicts in ``model``."""
    for _, module in model_modules(model):
        for dict_name in module.adapter_dicts if isinstance(module, AdapterLayer) else ():
            yield from getattr(module, dict_name).items()


def any_training(model: nn.Module) -> bool:
    """Whether a module of ``model`` is in training mode, adapters' entries included: a leaf entry's flag read
    directly (``modules()`` walks every adapter's)."""
    return any(m.training for _, m in model_modules(model)) or any(
        any(m.training for m in entry.modules()) if entry._modules else entry.training
        for _, entry in held_entries(model) if isinstance(entry, nn.Module))


def entry_parameters(entry) -> list:
    """The parameters of an adapter dict's entry; a leaf module's read directly (``set_adapter`` reads every
    adapter's entries, and torch's recursive walk of each cost more than the rest of the call)."""
    if isinstance(entry, nn.Parameter):
        return [entry]
    if entry._modules:
        return list(entry.parameters())
    return [p for p in entry._parameters.values() if p is not None]


class Tuner:
    """The PyTorch side of a method: puts its layers into a transformers model and takes them out.

    ``forward``/``generate`` run a call with ``adapter_name`` active; a method that rewrites a
    call's inputs (virtual tokens) overrides them. ``saved_model_prefix``: how the method's files
    name the model (HF PEFT's prompt learning saves ``base_model.<module>``; None: ``base_model.model.``).
    """

    saved_model_prefix: str | None = None
    unmergeable: str | None = None  # why merge refuses every adapter of the method (export --merge: before loading)
    unfoldable: str | None = None  # why merge leaves the method's layers in place (merge_and_unload refuses them)

    def inject(self, model: nn.Module, config, adapter_name: str) -> list[str]:
        """Add ``adapter_name``'s layers (wrapping each target once); returns the module names it adapts."""
        raise NotImplementedError

    def merge(self, model: nn.Module, adapter_name: str) -> None:
        """Fold ``adapter_name`` into the frozen weights of ``model`` (a copy) and put each folded layer's frozen
        module back in its place (``targets.replace_module``): a layer left in place keeps adding its adapter, as
        one that cannot be folded must. Or raise UnsupportedMethodError (this default: a newcomer hunt's plugin
        without merge ended --merge in a bare NotImplementedError)."""
        raise UnsupportedMethodError(f"{type(self).__name__} has no merge: this method's adapters do not merge "
                                     "(export --merge, merge_and_unload); export without --merge")

    def layers(self, model: nn.Module) -> list:
        """[(module name, AdapterLayer)] of this method in ``model``: the built-in tuners' own helper (for their
        merge); edgepeft calls it nowhere else, so a method need not have it."""
        raise NotImplementedError

    def forward(self, model: nn.Module, config, adapter_name: str, *args, **kwargs):
        return model(*args, **kwargs)

    def generate(self, model: nn.Module, config, adapter_name: str, *args, **kwargs):
        return model.generate(*args, **kwargs)


class SlotSpec:
    """The export side of a method: which graph inputs (slots) it needs, how they enter the traced graph,
    and what one adapter puts in them. See ``edgepeft.runtimes.manifest.Slot`` for the slot fields."""

    name: str = ""  # the slots' ``method`` field and name prefix ("lora" -> "lora_A.<module>")

    def slot_table(self, model: nn.Module, config, groups=()) -> list:
        """The slots ``config`` needs on the plain ``model``; ``groups`` are its fused layer groups."""
        raise NotImplementedError

    def install(self, model: nn.Module, slots: list, fused: dict) -> tuple[dict, dict]:
        """Put slot modules into ``model`` (the copy being traced; ``fused``: {group key: FusedProjection}).

        Returns ({slot name: (module, role)}: the module reads its input as ``module.feed[role]``,
        {slot name: neutral value}: what makes the slot a no-op).
        """
        raise NotImplementedError

    def values(self, peft_model, adapter_name: str, slots: list) -> dict:
        """{slot name: array or ``Assembled``} of ``adapter_name`` (slots it leaves out keep their neutral value)."""
        raise NotImplementedError

    def sample(self, slots: list, neutral: dict) -> dict:
        """{slot name: tensor} to trace with: non-neutral, and sizes of 2+ so symbolic axes stay symbolic."""
        raise NotImplementedError

    def describe(self, config) -> dict:
        """Fields for the adapter manifest (``rank``, ``alpha``, ``targets``, ...)."""
        return {}

    def unfused(self, model: nn.Module, config) -> list[str]:
        """Layers that must stay out of fused groups (e.g. a layer whose own input is scaled)."""
        return []

    def output_axis(self, slots: list) -> str | None:
        """The symbolic axis these slots give the task output's last dim (a head's label count), or None."""
        return None


def check_hook(spec: SlotSpec, hook: str, slots: list, values: dict, every: bool) -> None:
    """What a slot spec's ``hook`` (``install``'s neutral values, ``values``) gave for ``slots``, checked where it is
    called: a value for a slot of another name, of another rank or fixed size, or (``every``) a slot left without
    one is the method's mistake, named so (a newcomer hunt: each was told as a damaged export, "re-export")."""
    shapes = {s.name: s.shape for s in slots}
    given = {name: tuple(getattr(v, "shape", None) or np.shape(v)) for name, v in values.items()}  # a float: ()
    wrong = next((f"gives {name!r}, which is none of its slots ({', '.join(sorted(shapes))})" for name in given
                  if name not in shapes), None) or next((
        f"gives {name!r} the shape {list(shape)}, where its slot is {list(shapes[name])} (sizes, or names for any size)"
        for name, shape in given.items() if len(shape) != len(shapes[name]) or any(
            isinstance(d, int) and d != int(n) for d, n in zip(shapes[name], shape))), None)
    if every and not wrong and (left := [n for n in shapes if n not in values]):
        wrong = f"gives no value for {left[0]!r}"
    if wrong:
        raise ConfigError(f"{type(spec).__name__}.{hook} {wrong}; mend the method's {hook} (docs/adding-a-method.md)")


@dataclass(frozen=True)
class Method:
    name: str  # short name; also the prefix of its parameters ("lora_") and slots ("lora_A.")
    config_cls: type  # a PeftConfig subclass with peft_type_name set
    tuner: Tuner
    slots: SlotSpec

    @property
    def peft_type(self) -> str:
        return self.config_cls.peft_type_name


_METHODS: dict[str, Method] = {}
_EVERY_ADAPTER: list[SlotSpec] = []
_SPECS: dict[str, SlotSpec] = {}


def register_method(method: Method) -> Method:
    """Make ``method`` known to training, loading and export (its name names its slots: ``slots.name``)."""
    if method.slots.name != method.name:
        raise ConfigError(f"{type(method.slots).__name__}.name is {method.slots.name!r}; set it to the method's name "
                          f"{method.name!r} (the slots' ``method`` field and name prefix)")
    if not getattr(method.config_cls, "peft_type_name", None):
        raise ConfigError(f"{method.config_cls.__name__} has no peft_type_name; set it to the peft_type written to "
                          "adapter_config.json")
    missing = [f"{type(part).__name__}.{hook}" for part, base, hooks in (
        (method.tuner, Tuner, ("inject",)), (method.slots, SlotSpec, ("slot_table", "install", "values", "sample")))
        for hook in hooks if getattr(type(part), hook) is getattr(base, hook)]
    if missing:  # a newcomer hunt: a spec without sample ended an export in a bare NotImplementedError
        raise ConfigError(f"{', '.join(missing)} not implemented: a method's tuner implements inject, its slot spec "
                          "slot_table, install, values and sample (docs/adding-a-method.md)")
    _check_new(method)
    register_config(method.config_cls)
    _METHODS[method.peft_type] = method
    _SPECS[method.slots.name] = method.slots
    return method


def registering_module(method: Method) -> str | None:
    """A module whose import registers ``method`` (its config class's: importing it runs its package first), where
    edgepeft's own imports do not (a plugin's; the ``edgepeft`` command knows the built-ins only, so a command given
    for it imports that first); else None (edgepeft's, or a script's own)."""
    module = method.config_cls.__module__
    return None if module.split(".")[0] in ("edgepeft", "__main__") else module


def names_of(method: Method) -> tuple:
    """What ``--method`` takes for ``method``: its name, then HF PEFT's peft_type lower-cased and that type's first
    word (prefix_tuning, prefix): names first, so a method may take no other's."""
    kind = method.peft_type.lower()
    return method.name, kind, kind.split("_")[0]


def _check_new(method: Method) -> None:
    """Refuse a method named as another, or as a slot spec (a plugin's "ia3" exported every IA3 adapter with its
    slots; its peft_type "LORA" loaded every LoRA folder as its config). The same class registered again (a module
    reloaded) is no clash."""
    def again(taken: Method) -> bool:
        return (taken.config_cls.__module__, taken.config_cls.__qualname__) == (method.config_cls.__module__,
                                                                                method.config_cls.__qualname__)
    for taken in _METHODS.values():
        for what, mine, theirs in (("name", method.name, names_of(taken)),  # --method prompt_tuning: a name goes first
                                   (f"{method.config_cls.__name__}.peft_type_name", method.peft_type, (taken.peft_type,))):
            if mine in theirs and not again(taken):
                raise ConfigError(f"{what} {mine!r} is the {taken.name} method's ({taken.config_cls.__name__}); give "
                                  "this method another (a method's name and peft_type are its own)")
    if method.name in _SPECS and method.name not in {m.name for m in _METHODS.values()}:  # a spec's own: "head"
        raise ConfigError(f"name {method.name!r} is the slot spec {type(_SPECS[method.name]).__name__}'s; give the "
                          "method another")


def register_spec(spec: SlotSpec, every_adapter: bool = True) -> SlotSpec:
    """A slot spec no PEFT type owns; ``every_adapter``: it adds its slots to every adapter (task heads)."""
    if spec.name in {m.name for m in _METHODS.values()}:  # its slots would be read as the method's
        raise ConfigError(f"name {spec.name!r} is the {spec.name} method's; give the slot spec another")
    _SPECS[spec.name] = spec
    if every_adapter and spec not in _EVERY_ADAPTER:
        _EVERY_ADAPTER.append(spec)
    return spec


def method_for(config) -> Method:
    method = _METHODS.get(config.peft_type)
    if method is None:
        raise UnsupportedMethodError(f"peft_type {config.peft_type!r} is not supported; use one of {', '.join(sorted(_METHODS))}")
    return method


def methods() -> list[Method]:
    return list(_METHODS.values())


def specs_for(config) -> list[SlotSpec]:
    """The slot specs an adapter with ``config`` fills: its method's, then those every adapter has (heads)."""
    return [method_for(config).slots, *_EVERY_ADAPTER]


def spec_for(name: str) -> SlotSpec:
    """The spec whose slots carry ``method`` field ``name``."""
    spec = _SPECS.get(name)
    if spec is None:  # an export made with a method this process has not registered (a plugin)
        raise UnsupportedMethodError(f"slots of method {name!r}, which this edgepeft does not have (it has "
                                     f"{', '.join(sorted(_SPECS))}); register that method first, or export into a new --out")
    return spec
