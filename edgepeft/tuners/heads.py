"""Whole modules trained per task (``modules_to_save``), e.g. a classifier head.

In a mixed batch the runtime binds every row's head side by side (weights along the output
axis) and gives each row its own columns of the output.

In PyTorch a ``ModulesToSaveWrapper`` keeps the original module and one trained
copy per adapter, as HF PEFT does (same parameter names). In the exported base a
Linear head becomes two slots, ``head_weight.<module>`` (in, out) and
``head_bias.<module>`` (out,), whose output axis is symbolic, so tasks with
different label counts share one base graph.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from edgepeft.errors import ConfigError, UnsupportedModelError
from edgepeft.registry import AdapterLayer, SlotSpec, model_modules, register_spec
from edgepeft.runtimes.manifest import CLASSIFIER_NAMES, Slot, slot_axis, slot_name, stacks_as_output
from edgepeft.tuners.targets import replace_module, saved_whole


class ModulesToSaveWrapper(AdapterLayer):
    adapter_dicts = ("modules_to_save",)  # one trained copy of the module per adapter
    frozen_attr = "original_module"  # HF PEFT's name for the module it wraps

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()

    def add(self, adapter_name: str) -> None:
        trained = copy.deepcopy(self.original_module)
        for p in trained.parameters():
            p.requires_grad_(True)
        self.modules_to_save[adapter_name] = trained

    def resize_like(self, adapter_name: str, state: dict) -> None:
        """Give a Linear head the saved shape (a task's own label count)."""
        module = self.modules_to_save[adapter_name]
        weight = state.get("weight")
        if isinstance(module, nn.Linear) and weight is not None and tuple(weight.shape) != tuple(module.weight.shape):
            if weight.dim() != 2:
                raise ConfigError(f"the saved head's weight has shape {list(weight.shape)}, a Linear head's is "
                                  f"[labels, {module.in_features}]")
            out_features, in_features = weight.shape
            if in_features != module.in_features:
                raise ConfigError(f"saved head has {in_features} inputs, the model's has {module.in_features}")
            new = nn.Linear(in_features, out_features, bias="bias" in state)
            self.modules_to_save[adapter_name] = new.to(module.weight.dtype)

    def merged_module(self, adapter_name: str):
        """The adapter's trained copy (or the original module): a head trained whole is its own merge."""
        return self.modules_to_save[adapter_name] if adapter_name in self.modules_to_save else self.original_module

    def unloaded_module(self):
        """The active adapter's trained copy, as HF PEFT's unload keeps it (the original where it has none)."""
        return self.merged_module(self.active_adapter)

    def forward(self, *args, **kwargs):
        if self.active_adapter in self.modules_to_save:
            return self.modules_to_save[self.active_adapter](*args, **kwargs)
        return self.original_module(*args, **kwargs)


def wrap_modules_to_save(model: nn.Module, names, adapter_name: str) -> list[str]:
    """Wrap every module matching ``names`` and add a trained copy for ``adapter_name``."""
    wrapped = []
    # what another method's layers hold (``q_proj.lora_A.<adapter name>``) is never saved whole, whatever its name ends with
    held = tuple(key + "." for key, module in model_modules(model)
                 if isinstance(module, AdapterLayer) and not isinstance(module, ModulesToSaveWrapper))
    for key, module in list(model_modules(model)):
        if held and key.startswith(held):
            continue
        if saved_whole(names, key) and isinstance(module, AdapterLayer) and not isinstance(module, ModulesToSaveWrapper):
            raise _saved_whole_and_adapted(key)  # another adapter's layer
        if isinstance(module, ModulesToSaveWrapper):
            if saved_whole(names, key):
                module.add(adapter_name)
                wrapped.append(key)
            continue
        if ".original_module" in key or ".modules_to_save." in key:
            continue
        if saved_whole(names, key):
            wrapper = ModulesToSaveWrapper(module)
            wrapper.add(adapter_name)
            replace_module(model, key, wrapper)
            wrapped.append(key)
    return wrapped


def check_saved_whole_apart(model: nn.Module) -> None:
    """Refuse a module one adapter trains whole (modules_to_save) while another puts its layers on it: the two
    wrap each other and neither adapter's tensors can be told apart (each alone exports, into the same OUT)."""
    for key, layer in model_modules(model):
        if not isinstance(layer, AdapterLayer):
            continue
        whole = isinstance(layer, ModulesToSaveWrapper)
        if any(isinstance(m, AdapterLayer) and isinstance(m, ModulesToSaveWrapper) != whole
               for _, m in model_modules(layer) if m is not layer):
            raise _saved_whole_and_adapted(key)


def _saved_whole_and_adapted(key: str) -> ConfigError:
    return ConfigError(f"{key}: one adapter trains it whole (modules_to_save) and another puts its own layers on it, "
                       "which one export cannot build together; export them one at a time into the same --out folder, "
                       "the one that trains it whole first (into separate --out folders where it is a head of another "
                       "label count than the base's)")


def saved_module_names(model: nn.Module, config) -> list[str]:
    """Full names of the modules that ``config.modules_to_save`` selects in a plain model."""
    names = config.modules_to_save or []
    return [k for k, _ in model.named_modules() if saved_whole(names, k)]


# ---------------------------------------------------------------- export slots
class HeadSlotLinear(nn.Module):
    """A Linear head whose weight and bias are graph inputs: ``x @ W + b``."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.feed = {}
        self.has_bias = base.bias is not None

    def forward(self, x):  # x: (..., in)
        out = x @ self.feed["weight"]  # (..., out); weight: (in, out)
        if self.has_bias:
            out = out + self.feed["bias"]
        return out


class HeadSlots(SlotSpec):
    name = "head"

    def unfused(self, model: nn.Module, config) -> list[str]:
        return saved_module_names(model, config)  # trained whole: no fused group may hold it

    def slot_table(self, model: nn.Module, config, groups=()) -> list[Slot]:
        slots = []
        for key in saved_module_names(model, config):
            module = model.get_submodule(key)
            if not isinstance(module, nn.Linear):
                raise UnsupportedModelError(
                    f"modules_to_save {key!r} is no Linear layer ({type(module).__name__}); edgepeft exports Linear heads only "
                    "(a head's weight and bias are the adapter's slots): use an adapter trained without it"
                )
            out_axis = slot_axis("head", "out", key)
            # mixed batches: every row's classifier side by side, each row reading its own output columns. Only
            # a classifier's columns are the output; another saved layer (an lm_head, a pooler) feeds on, so its
            # adapter's rows run apart
            stack = stacks_as_output("seq-cls" if config.task_type == "SEQ_CLS" else "", key)
            weight, bias = (dict(stack_axis=1, selector="output"), dict(stack_axis=0, selector="output")) if stack \
                else ({}, {})
            slots.append(Slot(slot_name("head", "weight", key), "head", "weight", key, (module.in_features, out_axis),
                              "float32", "base", **weight))
            if module.bias is not None:
                slots.append(Slot(slot_name("head", "bias", key), "head", "bias", key, (out_axis,), "float32", "base",
                                  **bias))
        return slots

    def install(self, model: nn.Module, slots: list[Slot], fused: dict) -> tuple[dict, dict]:
        """Swap heads for slot modules; returns ({slot name: (module, role)}, neutral values: the base head's)."""
        feeds, neutral = {}, {}
        for s in slots:
            module = model.get_submodule(s.module)
            if not isinstance(module, HeadSlotLinear):
                base = module
                module = HeadSlotLinear(base)
                replace_module(model, s.module, module)
                neutral[slot_name("head", "weight", s.module)] = base.weight.detach().T.contiguous().numpy()
                if base.bias is not None:
                    neutral[slot_name("head", "bias", s.module)] = base.bias.detach().numpy().copy()
            feeds[s.name] = (module, s.role)
        return feeds, {k: v for k, v in neutral.items() if k in {s.name for s in slots}}

    def values(self, peft_model, adapter_name: str, slots: list[Slot]) -> dict:
        out = {}
        for s in slots:
            wrapper = peft_model.base_model.model.get_submodule(s.module)
            trained = wrapper.modules_to_save[adapter_name]
            t = trained.weight.T if s.role == "weight" else trained.bias
            out[s.name] = np.ascontiguousarray(t.detach().float().numpy())
        return out

    def sample(self, slots: list[Slot], neutral: dict) -> dict:
        return {s.name: torch.from_numpy(neutral[s.name]) for s in slots}

    def output_axis(self, slots: list[Slot]) -> str | None:
        """A classifier's label count: its weight's output axis (tasks with other label counts share one base)."""
        return next((s.shape[-1] for s in slots if s.role == "weight"), None)


HEADS = register_spec(HeadSlots(), every_adapter=True)
