"""What a training run is asked to do: ``TrainingArguments``, the method's config, and the command that resumes it."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
from dataclasses import dataclass, field

from edgepeft.config import TASK_TYPES
from edgepeft.errors import ConfigError
from edgepeft.files import check_output_dir, plain
from edgepeft.runtimes.access import as_read
from edgepeft.runtimes.values import is_number, is_whole, switch

# Settings that may change when resuming (everything else must match the checkpoint).
WHOLE_FIELDS = ("epochs", "batch_size", "grad_accum", "max_length", "logging_steps")  # whole numbers >= 1
CUT = 256  # --max-length where a task gives none (feature-extraction's: as embed cuts)
MOST = 2**31 - 1  # of those: 10**20 rows a batch or tokens a row was a traceback from torch's sampler or the tokenizer
FLOAT32_MAX = 3.4028234663852886e38  # the optimizer's rates and decay act on float32 tensors
NUMBER_FIELDS = ("lr", "head_lr", "max_grad_norm", "warmup_ratio", "weight_decay")  # numbers (ranges checked apart)
RESUMABLE = {"resume", "overwrite", "progress", "logging_steps"}
# The learning rate of task heads trained whole (``modules_to_save``, e.g. a classifier): they start from
# random weights, whatever the method, so they get their own rate (docs/training.md).
HEAD_LR = 1e-2


@dataclass
class TrainingArguments:
    model: str  # local folder or hub id
    task: str  # causal-lm | seq-cls | feature-extraction
    data: str  # train JSONL
    out: str  # the adapter dir (plus log, curve and checkpoint)
    method: str = "lora"  # a registered method: lora, ia3, bottleneck, ...
    eval_data: str | None = None
    epochs: int = 3
    lr: float | None = None  # None: the method's default (its config's ``default_lr``)
    head_lr: float | None = None  # task heads trained whole; None: HEAD_LR
    batch_size: int = 16
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    scheduler: str = "linear"  # linear | cosine | constant_with_warmup
    max_length: int | None = None  # None: the task's (default_max_length)
    seed: int = 0
    logging_steps: int = 10  # a training-loss entry every N optimizer steps and at each epoch's end (one sync each)
    mixed_precision: str = "auto"  # auto (bf16 on CUDA that has it, else fp32) | no | bf16 | fp16
    save: str = "best"  # best (by the eval metric; needs eval_data) | last
    options: dict = field(default_factory=dict)  # the method config's fields: r, lora_alpha, target_modules, ...
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def check(self) -> None:
        """Refuse bad settings before any work, and fill in the method's defaults (``lr``, ``head_lr``)."""
        for name in ("model", "data", "eval_data", "out"):  # the resume command quotes them (shlex takes no Path)
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
            if not isinstance(getattr(self, name), str) and not (name == "eval_data" and self.eval_data is None):
                raise ConfigError(f"{name} must be a path (a string), got {type(getattr(self, name)).__name__}; give "
                                  + ("a local model folder or a hub id" if name == "model" else "a file's path"
                                     if name != "out" else "the adapter folder to write"))
        for name in ("model", "out"):  # 'LINK/..' where the system (transformers) reads it: the base the adapter
            setattr(self, name, as_read(getattr(self, name)))  # records, its files' folder (temp files went to the
            # text's: "Invalid cross-device link" after an epoch)
        for name in ("resume", "overwrite", "progress"):  # "false" read as true: an adapter replaced
            setattr(self, name, switch(getattr(self, name), name))
        if self.task not in TASK_TYPES.values():
            raise ConfigError(f"task {self.task!r} is not supported; use one of {', '.join(TASK_TYPES.values())}")
        for name in WHOLE_FIELDS:
            if not (name == "max_length" and self.max_length is None) and \
                    not (is_whole(getattr(self, name)) and 1 <= getattr(self, name) <= MOST):
                raise ConfigError(f"--{name.replace('_', '-')} must be a whole number from 1 to {MOST}, got "
                                  f"{getattr(self, name)!r}")
        if self.max_length is None:  # before None meant "as embed cuts", checkpoints said 256: they still resume
            self.max_length = self.default_max_length()
        if not (is_whole(self.seed) and 0 <= self.seed < 2**32):  # numpy's seeds
            raise ConfigError(f"--seed must be a whole number in 0..{2**32 - 1}, got {self.seed!r}")
        for name in NUMBER_FIELDS:
            value = getattr(self, name)
            if not (value is None and name.endswith("lr")) and not is_number(value):
                raise ConfigError(f"--{name.replace('_', '-')} must be a number, got {value!r}")  # ranges: below
        for flag, path in (("--data", self.data), ("--eval", self.eval_data)):  # "$EVAL" unset: --eval "" read as none
            if isinstance(path, str) and not path.strip():
                raise ConfigError(f"{flag} {path!r} names no file; pass a JSONL file"
                                  f"{' (or leave --eval out to train without one)' if flag == '--eval' else ''}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues OUT's checkpoint and --overwrite starts over; give one of them")
        if not isinstance(self.options, dict):
            raise ConfigError(f"options must map the method's fields to values (e.g. {{'r': 8}}), got {self.options!r}")
        self.options = {k: _saved_as(k, v) for k, v in self.options.items()}  # as the checkpoint and the log hold them
        if not 0 <= self.max_grad_norm < math.inf:  # 0: no clipping, as transformers' Trainer reads it
            raise ConfigError(f"--max-grad-norm must be a finite number >= 0 (0: no clipping), got {self.max_grad_norm}; "
                              "pass 1.0, the default")
        check_output_dir(self.out, "--out")
        from edgepeft.models import check_model_source

        check_model_source(self.model, "--model")
        if self.lr is None:
            self.lr = find_method(self.method).config_cls.default_lr
        if self.head_lr is None:
            self.head_lr = HEAD_LR
        for name in ("lr", "head_lr"):  # float32 optimizer state: past its range, a RuntimeError
            if not 0 < getattr(self, name) < FLOAT32_MAX:
                raise ConfigError(f"--{name.replace('_', '-')} must be a number > 0 that float32 holds (below 3.4e38), "
                                  f"got {getattr(self, name)}")
        if not 0 <= self.weight_decay < FLOAT32_MAX:
            raise ConfigError(f"--weight-decay must be a number >= 0 that float32 holds (below 3.4e38), got {self.weight_decay}")
        if not 0 <= self.warmup_ratio <= 1:  # as transformers' TrainingArguments: 1 warms up over every step
            raise ConfigError(f"--warmup-ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.scheduler not in ("linear", "cosine", "constant_with_warmup"):
            raise ConfigError(f"--scheduler must be linear, cosine or constant_with_warmup, got {self.scheduler!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ConfigError(f"--mixed-precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.save not in ("best", "last"):
            raise ConfigError(f"--save must be best or last, got {self.save!r}")
        if self.save == "best" and self.eval_data is None:
            self.save = "last"  # nothing to rank epochs by
        for name in (*WHOLE_FIELDS, "seed"):  # numpy ones too: Python numbers, for the log and the checkpoint's JSON
            setattr(self, name, None if getattr(self, name) is None else int(getattr(self, name)))
        for name in NUMBER_FIELDS:
            setattr(self, name, float(getattr(self, name)))

    def fingerprint(self) -> dict:
        """The settings a checkpoint was made with (paths made absolute)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in RESUMABLE}
        for k in ("data", "eval_data", "out"):
            d[k] = os.path.abspath(d[k]) if d[k] else d[k]
        if os.path.isdir(self.model):
            d["model"] = os.path.abspath(self.model)
        return json.loads(json.dumps(d))

    def default_max_length(self) -> int | None:
        """The task's cut: feature-extraction's None (as embed cuts: its model's limit), else CUT."""
        return None if self.task == "feature-extraction" else CUT

    def command(self, *extra: str, processes: int = 1) -> str:
        """The ``edgepeft train`` command line for these settings (defaults left out), plus ``extra`` flags; under
        torchrun where ``processes`` is over 1 (a checkpoint resumes with as many); a plugin's method run as the docs
        run it, its package imported first."""
        from edgepeft.registry import registering_module

        defaults = TrainingArguments(model="", task="", data="", out="")
        plugin = registering_module(find_method(self.method))  # a newcomer hunt: `edgepeft train` knew no plugin
        launch = ["python", "-c", f"import {plugin}, edgepeft.cli; edgepeft.cli.main()"] if plugin else ["edgepeft"]
        if processes > 1:
            launch = ["torchrun", "--nproc-per-node", str(processes), *(["--no-python", *launch] if plugin else
                                                                        ["-m", "edgepeft"])]
        parts = [*launch, "train", "--model", self.model, "--task", self.task, "--method", self.method,
                 "--data", self.data]
        if self.eval_data:
            parts += ["--eval", self.eval_data]
        parts += ["--out", self.out]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("model", "task", "method", "data", "eval_data", "out", "options", "resume", "overwrite"):
                continue
            if f.name == "progress":  # --quiet
                parts += [] if value else ["--quiet"]
                continue
            if f.name == "max_length" and value == self.default_max_length():
                continue
            if f.name in ("lr", "head_lr") or value != getattr(defaults, f.name):  # rates: the ones this run used
                parts += [f"--{f.name.replace('_', '-')}", repr(value) if isinstance(value, float) else str(value)]
        for key, value in self.options.items():
            parts += ["--option", f"{key}={json.dumps(value)}"]
        return " ".join(shlex.quote(p) for p in [*parts, *extra])


def find_method(method: str):
    """The registered method a name means: its short name (lora, ia3, ...) or HF PEFT's (prefix_tuning, PROMPT_TUNING)."""
    from edgepeft.registry import names_of
    from edgepeft.tuners import methods

    known = {m.name: m for m in methods()}
    for m in methods():
        for key in names_of(m)[1:]:
            known.setdefault(key, m)
    found = known.get(str(method).lower())
    if found is None:
        raise ConfigError(f"method {method!r} is not supported; use one of {', '.join(sorted(x.name for x in methods()))}"
                          " (a method of your own: import its package first, `python -c \"import PACKAGE, edgepeft.cli; "
                          "edgepeft.cli.main()\" train ...`, docs/adding-a-method.md)")
    return found


def _saved_as(key: str, value):
    """An option as JSON holds it: a set as a sorted list (HF PEFT takes sets), a tokenizer as its name or folder,
    numpy's numbers as Python's."""
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    elif isinstance(value, tuple):
        value = list(value)
    elif isinstance(getattr(value, "name_or_path", None), str) and not isinstance(value, str):  # a tokenizer object
        value = value.name_or_path
    value = plain(value)
    if isinstance(value, float) and not math.isfinite(value):  # a number, but none the log can hold
        raise ConfigError(f"option {key}={value!r} must be a finite number")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        raise ConfigError(f"option {key}={value!r:.60} cannot be saved in the training log and checkpoint; give a "
                          "number, string, list or mapping (a tokenizer: its folder)") from None
    return value


# Config fields training sets itself: not options
NOT_OPTIONS = {"task_type", "peft_type", "inference_mode", "base_model_name_or_path", "auto_mapping"}


def method_config(method: str, task: str, options: dict):
    """The config object for ``method`` with ``options`` as its fields (the method's training defaults fill the rest)."""
    m = find_method(method)
    fields = {f.name for f in dataclasses.fields(m.config_cls)} - NOT_OPTIONS
    unknown, sized = sorted(set(options) - fields), getattr(m.config_cls, "model_sizes", ())
    if unknown:
        taken = sorted(fields - set(getattr(m.config_cls, "refused_when_set", ())) - set(sized))  # not those it refuses
        raise ConfigError(f"{m.name} has no option {unknown[0]!r}; its options are {', '.join(taken)}")
    if given := sorted(set(options) & set(sized)):  # it was blamed on an adapter_config.json, at training
        raise ConfigError(f"{given[0]} is the model's size, which training fills in from it; leave {given[0]} out "
                          "of the options")
    task_type = {v: k for k, v in TASK_TYPES.items()}[task]
    options = {**m.config_cls.training_defaults, **options}
    try:
        config = m.config_cls(task_type=task_type, **options)
    except (TypeError, ValueError, ConfigError) as e:
        raise ConfigError(f"invalid {m.name} options {options}: {e}") from None
    return config


def option_defaults(method: str) -> dict:
    """What ``method``'s options are where not given: its training defaults, else its config's own (``r``: 8)."""
    config_cls = find_method(method).config_cls
    own = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
           for f in dataclasses.fields(config_cls) if f.name not in NOT_OPTIONS
           and (f.default, f.default_factory) != (dataclasses.MISSING,) * 2}
    return {**own, **config_cls.training_defaults}


def arguments_of(kwargs: dict) -> TrainingArguments:
    """``edgepeft.train``'s keywords as TrainingArguments; one it does not take is a ConfigError naming it, and the
    keyword a CLI flag maps to."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    unknown = sorted(k for k in kwargs if k not in names)
    if unknown:
        renamed = {"eval": "eval_data=", "quiet": "progress=False", "alpha": "options={'lora_alpha': ...}"}
        hints = "".join(f"; for {k} use {renamed[k]}" for k in unknown if k in renamed)
        raise ConfigError(f"edgepeft.train takes no {', '.join(unknown)}{hints}; a method's own settings (r, "
                          "lora_alpha, target_modules, ...) go in options={...}, the rest are TrainingArguments' "
                          f"fields: {', '.join(sorted(names))}")
    return TrainingArguments(**kwargs)
