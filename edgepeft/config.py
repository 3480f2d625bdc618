"""Adapter configs: HF PEFT's ``adapter_config.json`` read and written field for field.

Each method's config is a dataclass subclass of ``PeftConfig`` registered with its
``peft_type``. Unknown fields (files from newer PEFT versions) load with a warning,
not a crash; unknown ``peft_type`` values raise ``UnsupportedMethodError``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass
from typing import Optional

from edgepeft.errors import (ArtifactNotFoundError, ConfigError, CorruptArtifactError, EdgePeftError,
                             UnsupportedMethodError, first_line, warn)
from edgepeft.runtimes.access import saved_under_names, unexpanded_tilde
from edgepeft.runtimes.values import is_real, is_whole

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"  # HF PEFT's save_pretrained(safe_serialization=False): read, never written
LABELS_NAME = "labels.json"  # class names beside a classifier adapter (edgepeft train writes it)

# HF PEFT task_type -> edgepeft task (the export's head).
TASK_TYPES = {
    "CAUSAL_LM": "causal-lm",
    "SEQ_CLS": "seq-cls",
    "FEATURE_EXTRACTION": "feature-extraction",
}

_CONFIG_CLASSES: dict[str, type] = {}


def task_type_of_class(auto_mapping) -> str | None:
    """The task_type of an adapter saved without one, from the model class HF PEFT recorded (``auto_mapping``'s
    ``base_model_class``, which its AutoPeftModel loads): LlamaForSequenceClassification -> SEQ_CLS. None: none
    recorded; another head (token classification, masked LM) names itself, and ``task`` refuses it."""
    name = (auto_mapping or {}).get("base_model_class") if isinstance(auto_mapping, dict) else None
    if not isinstance(name, str):
        return None
    for suffix, task_type in (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
                              ("LMHeadModel", "CAUSAL_LM")):
        if name.endswith(suffix):
            return task_type
    head = re.search(r"For\w+$", name)
    return head.group(0)[3:] if head else "FEATURE_EXTRACTION"  # a bare LlamaModel / BertModel: hidden states

# Fields HF PEFT writes that change nothing edgepeft does when left at these values.
_HARMLESS_FIELDS = {"peft_type", "peft_version", "megatron_core", "megatron_config", "qalora_group_size",
                    "ensure_weight_tying"}  # read where it adds an embedding (a refusal names it), harmless elsewhere


def naming_config(error: EdgePeftError, directory: str) -> EdgePeftError:
    """``error`` (about what an adapter's config asks) naming that adapter's ``adapter_config.json``."""
    if directory in str(error):
        return error
    return type(error)(f"{os.path.join(directory, CONFIG_NAME)}: {error}")


def register_config(cls):
    """Class decorator: make ``cls`` the config for its ``peft_type``."""
    _CONFIG_CLASSES[cls.peft_type_name] = cls
    return cls


def supported_peft_types() -> list[str]:
    return sorted(_CONFIG_CLASSES)


@dataclass
class PeftConfig:
    """Fields every PEFT config has."""

    peft_type_name = ""  # class attribute, set by subclasses
    # What `edgepeft train` uses when the user gives no --lr / leaves these options out (docs/training.md's table).
    default_lr = 1e-3
    training_defaults = {}
    cli_shorthands = {}  # `edgepeft train` flag -> the field it sets (--r -> r)
    # HF PEFT fields edgepeft does not model that change what the adapter computes: refused when set (others warn)
    refused_fields = frozenset()
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    modules_to_save: Optional[list] = None
    auto_mapping: Optional[dict] = None  # HF PEFT: the model class it was saved on (AutoPeftModel loads that class)

    @property
    def peft_type(self) -> str:
        return self.peft_type_name

    @property
    def task(self) -> Optional[str]:
        """edgepeft's task name for ``task_type`` (None when the config has none)."""
        if self.task_type is None:
            return None
        if self.task_type not in TASK_TYPES:
            raise UnsupportedMethodError(  # T5's SEQ_2_SEQ_LM: no other task type serves it
                f"task_type {self.task_type!r} is not supported; edgepeft exports adapters of the tasks "
                f"{', '.join(TASK_TYPES)} on Llama, Qwen2, GPT-2 and BERT models: train one of those"
            )
        return TASK_TYPES[self.task_type]

    @property
    def recorded_task(self) -> Optional[str]:
        """The task of the model class HF PEFT recorded (``auto_mapping``), for an adapter saved without task_type:
        a classifier's adapter runs on the classifier, its head the checkpoint's own, as AutoPeftModel loads it."""
        task_type = task_type_of_class(self.auto_mapping)
        if task_type is None or task_type in TASK_TYPES:
            return TASK_TYPES.get(task_type)
        raise UnsupportedMethodError(
            f"has no task_type and was saved on {self.auto_mapping['base_model_class']} (auto_mapping), whose task "
            f"edgepeft does not export; it exports {', '.join(TASK_TYPES)}: use an adapter trained for one of them")

    def names_another_base(self, here: str | None) -> bool:
        """Whether the base this config names may not be ``here`` (the model in use; either unknown counts): a
        mismatch then advises that base, else (it names the base in use) a re-save of the adapter."""
        named = self.base_model_name_or_path
        return not (named and here) or os.path.abspath(named) != os.path.abspath(here)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["peft_type"] = self.peft_type
        for k, v in d.items():
            if isinstance(v, set):
                d[k] = sorted(v)
        return d

    def __post_init__(self):
        self.check_types()  # every config, however it is made; subclasses call this first

    def check_types(self) -> None:
        """Each field holds a value of its annotated type (numbers finite); raises ConfigError naming the field."""
        self.task  # noqa: B018  (an unknown or unsupported task_type raises here, when the config is made)
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (set, frozenset, tuple)):  # HF PEFT takes sets (and keeps them); JSON holds lists
                value = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
            elif hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a numpy scalar
                value = value.item()
            setattr(self, f.name, value)
            if not _fits(value, hints[f.name]):
                raise ConfigError(f"{f.name} = {value!r} is not a valid {_type_name(hints[f.name])}"
                                  f"{_as_typed(f.name, value, hints[f.name])}")
        for name in ("target_modules", "exclude_modules", "feedforward_modules", "modules_to_save"):
            value = getattr(self, name, None)  # [5] was a TypeError where the names are matched
            if isinstance(value, list) and not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name} must list module names (strings), got {value!r:.80}")
        # HF PEFT's regular expressions: a string of modules matches in full, a pattern's key at a name's end
        for name in ("target_modules", "exclude_modules"):  # a rank or alpha pattern: LoraConfig checks it as it matches
            value = getattr(self, name, None)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as e:  # it was a traceback at the first match
                    raise ConfigError(f"{name}: {value!r} is not a regular expression ({e}); correct it as Python's re "
                                      "reads it, as HF PEFT does") from None

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "PeftConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in _HARMLESS_FIELDS and d[k] not in (None, False, {}, []))
        refused = [k for k in unknown if k in cls.refused_fields]
        if refused:
            them = "them" if len(refused) > 1 else "it"
            raise UnsupportedMethodError(f"{', '.join(refused)} {'change' if len(refused) > 1 else 'changes'} what the "
                                         f"adapter computes, and edgepeft does not support {them}: use an adapter "
                                         f"trained without {them}")
        if unknown:
            warn(f"{source}: ignoring fields this edgepeft does not know: {', '.join(unknown)}")
        config = cls(**{k: v for k, v in d.items() if k in names})
        config.ties_embeddings = d.get("ensure_weight_tying") is True  # HF PEFT's: targets the tied embedding too
        return config

    def save_pretrained(self, directory: str, inference_mode: bool | None = None) -> None:
        """Write ``adapter_config.json``; ``inference_mode`` overrides the field in the file (HF PEFT's model saves True)."""
        from edgepeft.files import write_json_atomic

        data = self.to_dict()
        if inference_mode is not None:
            data["inference_mode"] = inference_mode
        # fields sorted, values as they are: the first rank/alpha pattern matching a module wins (HF PEFT's rule),
        # so the patterns keep their order
        write_json_atomic(os.path.join(directory, CONFIG_NAME), dict(sorted(data.items())))

    @classmethod
    def from_pretrained(cls, directory: str) -> "PeftConfig":
        config = load_config(directory)
        if cls is not PeftConfig and not isinstance(config, cls):
            raise ConfigError(f"{directory}: holds a {config.peft_type} adapter, not {cls.peft_type_name}")
        return config


def _fits(value, annotation) -> bool:
    """``value`` matches ``annotation`` (None, bool, int, float, str, list, dict and their Optional/Union)."""
    if annotation is typing.Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    annotation = origin or annotation
    if annotation is float:
        return is_real(value)
    if annotation is int:
        return is_whole(value)
    return not isinstance(annotation, type) or isinstance(value, annotation)


def _as_typed(name: str, value, annotation) -> str:
    """How to write ``value`` as the type wanted, where the mistake is the form's: a value of ``edgepeft train
    --option KEY=VALUE`` is read as JSON, so 123 is a number, True and lm_head are text (a hunt found no fix given)."""
    want = lambda kind: _fits(kind, annotation)  # noqa: E731
    if isinstance(value, str) and value.lower() in ("true", "false") and want(True):
        return f"; write {value.lower()} (JSON, unquoted; in Python {value.capitalize()})"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and want(True):  # 1 for true
        return "; write true or false (JSON, unquoted; in Python True or False)"
    if isinstance(value, str) and want([value]):
        return f"; give a list: {json.dumps([value])} (at the command line in single quotes: --option '{name}={json.dumps([value])}')"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and want(str(value)):
        return f"; give it as text: \"{value}\" (at the command line in single quotes: --option '{name}=\"{value}\"')"
    return ""


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    annotation = typing.get_origin(annotation) or annotation
    return {type(None): "null", float: "finite number", int: "whole number"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def _exported(directory: str) -> str | None:
    """What to pass instead of an export's folder, or of an adapter folder inside one (both lack adapter_config.json)."""
    from edgepeft.runtimes.manifest import ADAPTER_MANIFEST, BASE_DIR, BASE_MANIFEST, enclosing_export

    if os.path.isfile(os.path.join(directory, BASE_DIR, BASE_MANIFEST)):
        return ("this folder is an export (OUT) of `edgepeft export`; pass the folder an adapter was saved in "
                "(save_pretrained, edgepeft train --out), or run this export (Runtime, edgepeft run)")
    if os.path.isfile(os.path.join(directory, ADAPTER_MANIFEST)) and (out := enclosing_export(directory)):
        return (f"this folder is an adapter exported into {out}, served from there (edgepeft run {out} ... --adapter "
                f"{os.path.basename(os.path.normpath(directory))}); to export it again, pass the folder it was saved in")
    return None


def load_config(directory: str) -> PeftConfig:
    """Read ``directory/adapter_config.json`` into the registered config class."""
    directory = str(directory)
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        named = saved_under_names(directory)
        fix = (f"it holds adapters saved under their names: pass {' or '.join(os.path.join(directory, d) for d in named)}"
               if named else "pass an adapter folder saved by save_pretrained (edgepeft or HF PEFT)")
        raise ArtifactNotFoundError(unexpanded_tilde(directory, "--adapter") or f"{path}: not found; "
                                    f"{_exported(directory) or fix}")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8 or JSON, a number of 5,000 digits
        raise CorruptArtifactError(f"{path}: not valid JSON ({first_line(e).split('; ')[0]}); re-save the adapter") from None
    if not isinstance(d, dict) or not isinstance(d.get("peft_type"), str):
        raise CorruptArtifactError(f"{path}: has no 'peft_type' name; re-save the adapter with save_pretrained")
    if d["peft_type"] == "LORA" and d.get("bias") in ("all", "lora_only"):  # a variants hunt: refused, "train again"
        from edgepeft.adapter_weights import saves_biases

        if not saves_biases(directory):  # HF PEFT's bias where its layers have none (Llama): plain LoRA (Qwen2's
            # q/k/v have biases, which bias="all" saves)
            d = {**d, "bias": "none"}
    return _config_from_dict(d, path, "fix the file or re-save the adapter")


# HF PEFT 0.21's PeftType values: peft is installed only with [dev], and without it a LoHa adapter was told to import
# its plugin's package
HF_PEFT_TYPES = frozenset(
    "PROMPT_TUNING MULTITASK_PROMPT_TUNING P_TUNING PREFIX_TUNING LORA ADALORA ADAMSS BOFT ADAPTION_PROMPT IA3 BEFT LILY "
    "LOHA LOKR OFT POLY LN_TUNING VERA FROD PVERA FOURIERFT GLORA XLORA HRA VBLORA UNILORA CPT MISS RANDLORA ROAD "
    "TRAINABLE_TOKENS HIRA SHIRA C3A WAVEFT OSF DELORA GRALORA CARTRIDGE TINYLORA PSOFT PEANUT SHADOW SUPERTUNING "
    "DEFT".split())


def _hf_peft_type(name: str) -> bool:
    """Whether HF PEFT names the method ``name`` (this list, or the installed peft's): a LoHa adapter is no plugin's
    to import."""
    try:
        from peft import PeftType
    except ImportError:
        return name in HF_PEFT_TYPES
    return name in HF_PEFT_TYPES | {t.value for t in PeftType}


def _config_from_dict(d: dict, source: str, fix: str) -> PeftConfig:
    """The registered config class for ``d["peft_type"]`` made from ``d``; errors begin with ``source``."""
    cls = _CONFIG_CLASSES.get(d["peft_type"])
    if cls is None:  # HF PEFT's other methods, or a method of one's own whose package is not imported
        own = "" if _hf_peft_type(d["peft_type"]) else (
            "; a method of your own is known once its package is imported: run `python -c \"import PACKAGE, "
            "edgepeft.cli; edgepeft.cli.main()\" ...` (docs/adding-a-method.md)")
        raise UnsupportedMethodError(
            f"{source}: peft_type {d['peft_type']!r} is not supported; edgepeft supports "
            f"{', '.join(supported_peft_types())}: train the adapter again with one of them (edgepeft train --method, "
            f"or HF PEFT){own}"
        )
    try:
        config = cls.from_dict(d, source=source)
        config.task  # noqa: B018  (checks task_type)
    except EdgePeftError as e:
        raise type(e)(f"{source}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: invalid config ({e}); {fix}") from None
    return config


def checked_copy(config) -> PeftConfig:
    """A copy of ``as_config(config)`` with its checks run again: a field set after the config was made (``cfg.r =
    8.7`` built rank 8 and saved 8.7; ``cfg.r = 0`` was a ZeroDivisionError) is refused as at its making."""
    config = copy.deepcopy(as_config(config))
    config.__post_init__()
    return config


def as_config(config) -> PeftConfig:
    """What ``get_peft_model``/``add_adapter`` take: an edgepeft config as it is; an HF PEFT config (a ported script)
    read as its saved adapter_config.json would be, so the same fields are taken, warned about or refused."""
    if isinstance(config, PeftConfig):
        return config
    if type(config).__module__.partition(".")[0] == "peft" and hasattr(config, "to_dict"):
        d = json.loads(json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, (set, frozenset))
                                  else str(v)))  # as HF PEFT writes it: sets as lists, its enums as their names
        return _config_from_dict(d, f"HF PEFT's {type(config).__name__}", "make an edgepeft config instead")
    raise ConfigError(f"config must be a PEFT config such as edgepeft.LoraConfig(...) (or HF PEFT's), got "
                      f"{type(config).__name__}")

