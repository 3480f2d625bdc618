"""PeftModel: an HF model with one or more adapters, saved in HF PEFT's format.

    PeftModel
      `-- base_model (TunedModel)
            `-- model: the transformers model, target layers wrapped in place
                  ...q_proj = LoraLinear(base_layer, lora_A[name], lora_B[name])
                  ...classifier = ModulesToSaveWrapper(original_module, modules_to_save[name])

Parameter names match HF PEFT, so ``adapter_model.safetensors`` keys are the same (``base_model.model.<module>.
lora_A.weight``; a saved head as ``base_model.model.classifier.weight``). Every adapter-holding layer names its
per-adapter ``ModuleDict``s in ``adapter_dicts``; saving and loading walk those, never the method's name. A layer
whose saved state is not its parameters (the virtual-token encoder of prompt/prefix tuning) implements
``adapter_parameters``, ``saved_tensors`` and ``load_saved_tensors`` instead, and a method whose tuner has
``forward``/``generate`` hooks rewrites a call's inputs (virtual tokens).
"""
from __future__ import annotations

import os
from contextlib import contextmanager

from safetensors.torch import save
from torch import nn

from edgepeft.adapter_weights import load_state, read_adapter_weights, reload_state
from edgepeft.config import WEIGHTS_NAME, checked_copy, load_config, naming_config
from edgepeft.errors import AdapterBaseMismatchError, ConfigError, EdgePeftError, first_line
from edgepeft.files import write_bytes_atomic
from edgepeft.hf_calls import (check_adapter_name, check_new_model, check_one_adapter, check_save_options, elsewhere,
                               elsewhere_or, merged_name, PEFT_MODEL_ONLY, named_arguments, not_taken, on_peft_model,
                               refuse_adapter_names, taken_model, check_saved_whole_linear)
from edgepeft.registry import AdapterLayer, any_training, entry_parameters, held_entries, model_modules, model_parameters
from edgepeft.tuners import method_for
from edgepeft.tuners.copies import merged_copy, take_out_mixed, unfoldable, unloaded_copy
from edgepeft.tuners.heads import CLASSIFIER_NAMES, check_saved_whole_apart, wrap_modules_to_save


class TunedModel(nn.Module):
    """Holds the transformers model as ``.model`` (so keys start ``base_model.model.``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = taken_model(model)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name):  # HF PEFT's LoraModel has merge_adapter and the like too
        try:
            return super().__getattr__(name)
        except AttributeError as e:
            if name in PEFT_MODEL_ONLY:  # HF PEFT's LoraModel has these too: here the PeftModel alone
                return on_peft_model(name)
            return elsewhere_or(name, e)


class PeftModel(nn.Module):
    def __init__(self, model: nn.Module, config=None, adapter_name: str = "default"):
        super().__init__()
        self.base_model = TunedModel(model)
        self.peft_config: dict = {}
        self.active_adapter = None
        self._disabled = False  # inside `with disable_adapter():`
        if config is not None:
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name, inference_mode=self.peft_config[adapter_name].inference_mode)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "peft_config"):
                raise
            model = self.base_model.model
            try:
                return elsewhere(name) or getattr(model, name)
            except AttributeError:  # it named the transformers model alone, as if the call were its
                raise AttributeError(f"edgepeft's PeftModel has no attribute {name!r}, nor has its "
                                     f"{type(model).__name__}") from None

    @property
    def active_adapters(self) -> list:
        """HF PEFT's list form of ``active_adapter``."""
        return [] if self.active_adapter is None else [self.active_adapter]

    @property
    def active_peft_config(self):
        """HF PEFT's: the active adapter's config (None where none is active, as ``peft_type``)."""
        return self.peft_config.get(self.active_adapter)

    @property
    def peft_type(self) -> str | None:
        """The active adapter's method, as HF PEFT names it (``LORA``)."""
        return self.peft_config[self.active_adapter].peft_type if self.active_adapter is not None else None

    # ---------------------------------------------------------------- adapters
    def add_adapter(self, adapter_name: str, peft_config, **options) -> None:
        """Add a new adapter (initialised as PEFT does); it trains once ``set_adapter`` makes it active."""
        not_taken("add_adapter", options)  # below: a layer no export serves, refused as by get_peft_model
        check_saved_whole_linear(self.base_model.model, getattr(peft_config, "modules_to_save", None) or [])
        self._add_adapter(adapter_name, peft_config)

    def _add_adapter(self, adapter_name: str, peft_config) -> None:  # loaded ones too: the export names its refusals
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ConfigError(f"an adapter named {adapter_name!r} already exists; pick another name")
        config = checked_copy(peft_config)
        if config.task_type == "SEQ_CLS":  # PEFT trains the classifier head with the adapter
            config.modules_to_save = list(config.modules_to_save or []) + [
                n for n in CLASSIFIER_NAMES if n not in (config.modules_to_save or [])
            ]
        model = self.base_model.model
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
        try:  # a failure part way leaves no layers of it behind (they trained, and a later adapter of that name took them)
            method_for(config).tuner.inject(model, config, adapter_name)
            if config.modules_to_save:
                wrap_modules_to_save(model, config.modules_to_save, adapter_name)
            check_saved_whole_apart(model)
        except BaseException:
            self._forget(adapter_name)
            raise
        self.peft_config[adapter_name] = config
        # As HF PEFT: the base stays frozen, the other adapters keep their state, and the new one is frozen
        # until set_adapter makes it active (or load_adapter(is_trainable=True) asks for it).
        by_adapter = self._parameters_by_adapter()
        adapters = {id(p) for params in by_adapter.values() for p in params}
        for p in model_parameters(self):
            if id(p) not in adapters:
                p.requires_grad_(False)
        for p in by_adapter[adapter_name]:
            p.requires_grad_(False)

    def _set_requires_grad(self, adapter_name: str, requires_grad: bool) -> None:
        for p in self.adapter_parameters(adapter_name).values():
            p.requires_grad_(requires_grad)

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the one calls use and, as HF PEFT, the one that trains (frozen: ``inference_mode``)."""
        check_one_adapter(adapter_name)
        if adapter_name not in self.peft_config:
            raise ConfigError(f"no adapter named {adapter_name!r}; have {sorted(self.peft_config)}")
        self._activate(adapter_name)
        for name, params in self._parameters_by_adapter().items():
            for p in params:
                p.requires_grad_(name == adapter_name and not inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        """HF PEFT's ``delete_adapter``; deleting the active one activates, trainable, the first left by name, as HF PEFT."""
        if adapter_name not in self.peft_config:
            raise ConfigError(f"no adapter named {adapter_name!r}; have {sorted(self.peft_config)}")
        self._forget(adapter_name)
        if self.active_adapter == adapter_name:
            left = sorted(self.peft_config)
            self._activate(None)
            if left:
                self.set_adapter(left[0])

    def _forget(self, adapter_name: str) -> None:
        """Every layer's entries of ``adapter_name`` and its config removed."""
        for _, module in model_modules(self):
            for dict_name in (*module.adapter_dicts, *module.adapter_values) if isinstance(module, AdapterLayer) else ():
                if adapter_name in (holder := getattr(module, dict_name)):
                    del holder[adapter_name]
        take_out_mixed(self, unused_only=True)  # the last prefix adapter's attention: its own class back
        self.peft_config.pop(adapter_name, None)

    def _activate(self, adapter_name) -> None:
        """The adapter calls use (None: the base model); what trains is left as it is."""
        self.active_adapter = adapter_name
        self._run_layers()

    @property
    def _running(self):
        """The adapter calls run: the active one, or none inside ``disable_adapter``'s block."""
        return None if self._disabled else self.active_adapter

    def _run_layers(self) -> None:
        """Every layer runs the active adapter, or none inside ``disable_adapter``'s block."""
        for _, module in model_modules(self):
            if isinstance(module, AdapterLayer):
                module.active_adapter = self._running

    @contextmanager
    def disable_adapter(self):
        """Calls inside run the base model (HF PEFT's ``with model.disable_adapter():``); ``active_adapter`` stays,
        and an adapter ``set_adapter`` makes active inside the block runs once it ends, as in HF PEFT."""
        was, self._disabled = self._disabled, True
        self._run_layers()
        try:
            yield
        finally:
            self._disabled = was
            self._run_layers()

    def get_base_model(self) -> nn.Module:
        """The transformers model, its adapter layers in place (HF PEFT's ``get_base_model``)."""
        return self.base_model.model

    def _parameters_by_adapter(self) -> dict:
        """{adapter: its parameters} for every adapter, in one walk of the modules (``adapter_parameters`` walks once per adapter)."""
        out = {name: [] for name in self.peft_config}
        for _, module in model_modules(self):
            if not isinstance(module, AdapterLayer):
                continue
            if module.own_state:
                for name, params in out.items():
                    params.extend(module.adapter_parameters(name).values())
                continue
            for dict_name in module.adapter_dicts:
                for name, entry in getattr(module, dict_name).items():
                    if name in out:
                        out[name].extend(entry_parameters(entry))
        return out

    def _adapter_entries(self, adapter_name: str) -> dict:
        """{saved key: (ModuleDict entry, parameter name)} for one adapter, in PEFT's key format."""
        entries = {}
        layers = [(k, m) for k, m in model_modules(self) if isinstance(m, AdapterLayer)]
        wrapped = {m.frozen_attr for _, m in layers if m.frozen_attr}
        for key, module in layers:
            if module.own_state:  # own state: _custom_state
                continue
            for dict_name in module.adapter_dicts:
                holder = getattr(module, dict_name)
                if adapter_name not in holder:
                    continue
                sub = holder[adapter_name]
                # a layer under other methods' wrappers: saved by its module's name (whole path segments only)
                key = ".".join(part for part in key.split(".") if part not in wrapped)
                prefix = key if dict_name == "modules_to_save" else f"{key}.{dict_name}"
                if isinstance(sub, nn.Parameter):  # a ParameterDict entry (IA3's ia3_l): saved as the dict's name
                    entries[prefix] = (module, dict_name, None)
                    continue
                for pname in sub.state_dict():
                    entries[f"{prefix}.{pname}"] = (module, dict_name, pname)
        return entries

    @staticmethod
    def _entry(module, dict_name: str, adapter_name: str, pname):
        sub = getattr(module, dict_name)[adapter_name]
        return sub if pname is None else sub.get_parameter(pname)

    def _custom_state(self) -> list:
        """(key, module) of layers that save computed tensors rather than their parameters."""
        return [(k, m) for k, m in model_modules(self) if isinstance(m, AdapterLayer) and m.own_state]

    def adapter_parameters(self, adapter_name: str) -> dict:
        out = {}
        for saved_key, (module, dict_name, pname) in self._adapter_entries(adapter_name).items():
            out[saved_key] = self._entry(module, dict_name, adapter_name, pname)
        for key, module in self._custom_state():
            out.update({f"{key}.{n}": p for n, p in module.adapter_parameters(adapter_name).items()})
        return out

    def _saved_key(self, adapter_name: str, key: str, loading: bool = False) -> str:
        """A method whose files name the model ``base_model.`` (HF PEFT's prompt learning) sets ``saved_model_prefix``."""
        prefix = method_for(self.peft_config[adapter_name]).tuner.saved_model_prefix
        ours = "base_model.model."
        if prefix is None:
            return key
        if loading:
            return ours + key[len(prefix):] if key.startswith(prefix) else key
        return prefix + key[len(ours):] if key.startswith(ours) else key

    def get_adapter_state_dict(self, adapter_name: str | None = None) -> dict:
        name = adapter_name or self.active_adapter
        state = {}
        for saved_key, (module, dict_name, pname) in self._adapter_entries(name).items():
            state[self._saved_key(name, saved_key)] = self._entry(module, dict_name, name, pname).detach()
        for _, module in self._custom_state():
            state.update(module.saved_tensors(name))
        return state

    def load_adapter(self, model_id: str, adapter_name: str = "default", is_trainable: bool = False, *,
                     subfolder: str | None = None, config=None, **options) -> None:
        """Load the adapter folder ``model_id`` (HF PEFT's name: a local folder here; ``subfolder`` inside it) as
        ``adapter_name``; ``config``: HF PEFT's, in place of the folder's adapter_config.json. Into a loaded name, as HF
        PEFT: the folder's weights replace that adapter's, its config and trainability kept."""
        not_taken("load_adapter", options)
        directory = os.path.join(str(model_id), subfolder) if subfolder else str(model_id)
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:  # HF PEFT's: the folder's weights into that adapter, its config kept
            reload_state(self, adapter_name, directory)
            if not is_trainable:
                self.eval()
            return
        given, config = config is not None, load_config(directory) if config is None else checked_copy(config)
        config.inference_mode = not is_trainable
        try:
            self._add_adapter(adapter_name, config)
        except EdgePeftError as e:  # a config the model cannot take: name the file it came from (not one given)
            raise (e if given else naming_config(e, directory)) from None
        try:  # damaged weights leave no adapter of that name behind (a retry was refused: "already exists")
            path, state = read_adapter_weights(directory)
            try:
                load_state(self, adapter_name, state, path)
            except EdgePeftError as e:  # with config= given, the file's advice (re-save it) mends nothing
                if not given:
                    raise
                raise AdapterBaseMismatchError(f"{path}: does not fit the config= given ({first_line(e).split('; ')[0]}"
                                               "); pass the config it was trained with, or leave config out") from None
        except BaseException:
            self._forget(adapter_name)
            raise
        if is_trainable:  # as HF PEFT: trainable now, even before set_adapter
            self._set_requires_grad(adapter_name, True)
        else:  # as HF PEFT: no dropout (the new layers' Dropout modules start in training mode)
            for name, entry in held_entries(self):
                if name == adapter_name and isinstance(entry, nn.Module):
                    entry.eval()
            if any_training(self):  # not just the new ones (eval() walks N adapters' modules)
                self.eval()

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id, adapter_name: str = "default", is_trainable: bool = False,
                        config=None, subfolder: str | None = None, **options):
        not_taken("from_pretrained", options)
        peft = cls(model)
        peft.load_adapter(model_id, adapter_name, is_trainable=is_trainable, config=config, subfolder=subfolder)
        peft.set_adapter(adapter_name, inference_mode=not is_trainable)
        return peft

    def save_pretrained(self, save_directory, safe_serialization: bool = True, selected_adapters=None,
                        save_embedding_layers="auto", is_main_process: bool = True, **options) -> None:
        """Write each adapter as an HF PEFT dir (non-default adapters in ``save_directory/<name>``), as HF PEFT's
        save_pretrained with its defaults (and its order of arguments); ``is_main_process=False`` writes nothing
        (the other processes of a run)."""
        not_taken("save_pretrained", options)
        directory = str(save_directory)
        check_save_options(directory, save_embedding_layers, safe_serialization)
        if isinstance(selected_adapters, str):  # its letters were read as names
            raise ConfigError(f"selected_adapters takes a list of adapter names, got {selected_adapters!r}; pass "
                              f"[{selected_adapters!r}]")
        selected = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [name for name in selected if name not in self.peft_config]
        if unknown:
            raise ConfigError(f"save_pretrained: no adapter named {', '.join(map(repr, unknown))}; have "
                              f"{sorted(self.peft_config)}")
        configs = {name: self.peft_config[name] for name in selected}
        for config in configs.values():  # every config serialised first: one that cannot be written fails before any file is
            config.to_dict()
        if not is_main_process:
            return
        for name, config in configs.items():
            target = directory if name == "default" else os.path.join(directory, name)
            state = {k: v.contiguous().cpu() for k, v in self.get_adapter_state_dict(name).items()}
            write_bytes_atomic(os.path.join(target, WEIGHTS_NAME), save(state, metadata={"format": "pt"}))
            config.save_pretrained(target, inference_mode=True)

    # ---------------------------------------------------------------- use
    def forward(self, *args, **kwargs):
        """The model with the active adapter; its tuner may rewrite the call's inputs (virtual tokens)."""
        refuse_adapter_names(kwargs)
        name = self.active_adapter
        if args and (task := getattr(self.peft_config.get(name), "task_type", None)):  # HF PEFT's order (its task
            args, kwargs = (), named_arguments(args, kwargs, task)  # models'); no adapter left: the model's own
        if self._running is None:
            return self.base_model.model(*args, **kwargs)
        return method_for(self.peft_config[name]).tuner.forward(self.base_model.model, self.peft_config[name], name,
                                                                *args, **kwargs)

    def generate(self, *args, **kwargs):
        refuse_adapter_names(kwargs)
        if self._running is None:
            return self.base_model.model.generate(*args, **kwargs)
        name = self.active_adapter
        return method_for(self.peft_config[name]).tuner.generate(self.base_model.model, self.peft_config[name], name,
                                                                 *args, **kwargs)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        t, n = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,} || all params: {n:,} || trainable%: {100 * t / n:.4f}")

    def merge_and_unload(self, adapter_name: str | None = None, safe_merge: bool = False, adapter_names=None, *,
                         progressbar: bool = False) -> nn.Module:
        """A copy of the transformers model with ``adapter_name`` (or HF PEFT's ``adapter_names``, one of them)
        folded into its weights; ``safe_merge``: weights that are not finite refused; ``progressbar`` ignored (HF PEFT's
        order: ``merge_and_unload(True, True)`` is its progressbar and safe_merge)."""
        name = merged_name(adapter_name, adapter_names) or self.active_adapter
        if name not in self.peft_config:
            raise ConfigError(f"no adapter named {name!r} to merge; have {sorted(self.peft_config)}")
        tuner = method_for(self.peft_config[name]).tuner
        if tuner.unfoldable:  # before copying the model
            raise unfoldable(name, tuner.unfoldable)
        return merged_copy(self.base_model.model, tuner, name, safe_merge)

    def unload(self) -> nn.Module:
        """A copy of the transformers model with every adapter layer taken out, nothing merged (HF PEFT's unload)."""
        return unloaded_copy(self.base_model.model)


def get_peft_model(model: nn.Module, peft_config, adapter_name: str = "default", **options) -> PeftModel:
    """Wrap ``model`` with a new adapter; only adapter parameters are trainable."""
    not_taken("get_peft_model", options)
    check_new_model(model, peft_config)
    return PeftModel(model, peft_config, adapter_name)
