"""LoRA config: HF PEFT's ``LoraConfig`` fields, names, defaults and semantics."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from edgepeft.config import PeftConfig
from edgepeft.errors import ConfigError, UnsupportedMethodError
from edgepeft.runtimes.values import is_real, is_whole


TAKEN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")  # HF PEFT's inits that leave the base as it is


def base_changing(init) -> bool:
    """An init HF PEFT runs that changes the base weights, as it matches them (pissa_niter_4; olora in any case)."""
    return isinstance(init, str) and (init.startswith(("pissa", "corda")) or init.lower() == "olora" or
                                      init in ("loftq", "lora_ga"))


# HF PEFT's default LoRA targets per model type (used when target_modules is None).
DEFAULT_LORA_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
}


@dataclass
class LoraConfig(PeftConfig):
    """``delta W = B @ A * scaling`` on each target Linear/Conv1D.

    scaling = lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora``.
    ``target_modules``: a list of names (matched by dotted suffix), a full-match
    regex string, or ``"all-linear"``; None takes PEFT's default for the model type.
    """

    peft_type_name = "LORA"
    default_lr = 5e-3
    cli_shorthands = {"--r": "r", "--alpha": "lora_alpha", "--target-modules": "target_modules"}
    refused_fields = frozenset({"alora_invocation_tokens", "layer_replication", "use_qalora", "lora_ga_config",
                                "velora_config", "monteclora_config", "use_bdlora", "arrow_config", "kasa_config"})
    r: int = 8
    lora_alpha: float = 8  # HF PEFT annotates int; any finite number scales alike
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list, str]] = None
    exclude_modules: Optional[Union[list, str]] = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    layers_to_transform: Optional[Union[list, int]] = None
    layers_pattern: Optional[Union[list, str]] = None
    use_dora: bool = False
    lora_bias: bool = False
    target_parameters: Optional[list] = None
    trainable_token_indices: Optional[Union[list, dict]] = None
    # HF PEFT's fields read from its folders but refused when set (__post_init__'s; a test sets each): no option of
    # --option's list
    refused_when_set: ClassVar[tuple] = ("use_dora", "lora_bias", "bias", "layers_to_transform", "layers_pattern",
                                         "target_parameters", "trainable_token_indices")

    def __post_init__(self):
        super().__post_init__()
        unsupported = {
            "use_dora": self.use_dora,
            "lora_bias": self.lora_bias,
            "bias": self.bias != "none",
            "layers_to_transform": self.layers_to_transform is not None,
            "target_parameters": bool(self.target_parameters),
            "trainable_token_indices": bool(self.trainable_token_indices),
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise UnsupportedMethodError(
                f"LoRA option(s) {', '.join(bad)} are not supported by edgepeft; train without them"
            )
        if self.layers_pattern:  # HF PEFT refuses it without layers_to_transform, which edgepeft does not support
            raise UnsupportedMethodError(
                f"layers_pattern={self.layers_pattern!r} only names where layers_to_transform finds the layer numbers; "
                "without layers_to_transform (which edgepeft does not support) it selects nothing and HF PEFT cannot "
                "load the adapter: train without layers_pattern")
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower() in ("gaussian", "mica"):  # HF PEFT reads these in any case
            self.init_lora_weights = init = init.lower()
        if init == "loftq":  # a variants hunt: told to convert it, which HF PEFT does for the others only
            raise UnsupportedMethodError(
                "init_lora_weights='loftq' is not supported: a LoftQ adapter is trained for its quantized copy of the "
                "base, which edgepeft does not export; train with the default init")
        if init not in TAKEN_INITS and base_changing(init):
            raise UnsupportedMethodError(
                f"init_lora_weights={init!r} is not supported: PiSSA, OLoRA, CorDA and LoRA-GA change the base "
                "weights; train with the default init, or convert an adapter trained so into plain LoRA with HF "
                "PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) first")
        if init not in TAKEN_INITS:  # a typo, "True" as text
            raise UnsupportedMethodError(f"init_lora_weights={init!r} is not supported; pass one of True, False, "
                                         "'gaussian', 'orthogonal', 'eva', 'mica' (--option: JSON, e.g. true or \"gaussian\")")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.r <= 0:
            raise UnsupportedMethodError(f"LoRA r must be positive, got {self.r}")
        for name, pattern, whole in (("rank_pattern", self.rank_pattern, True), ("alpha_pattern", self.alpha_pattern, False)):
            for key, value in pattern.items():
                if not (is_whole(value) and value > 0 if whole else is_real(value)):
                    raise ConfigError(f"{name}[{key!r}] = {value!r} is not a valid {'rank' if whole else 'alpha'}")
                try:  # as _pattern_value matches it ('(?i)query' alone compiles; inside, a traceback at the first match)
                    _key_pattern(key)
                except re.error as e:
                    raise ConfigError(f"{name}: {key!r} is not a regular expression ({e}); correct it as Python's re "
                                      "reads it, as HF PEFT does") from None

    def _pattern_value(self, pattern: dict, key: str, default):
        # PEFT: the first pattern that matches the end of the module name wins.
        for p, v in pattern.items():
            if _key_pattern(p).match(key):
                return v
        return default

    def rank_for(self, key: str) -> int:
        return int(self._pattern_value(self.rank_pattern, key, self.r))

    def scaling_for(self, key: str, r: Optional[int] = None) -> float:
        r = r if r is not None else self.rank_for(key)
        alpha = self._pattern_value(self.alpha_pattern, key, self.lora_alpha)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _key_pattern(pattern: str) -> "re.Pattern":
    """A rank or alpha pattern as HF PEFT matches it: at the end of a module's name."""
    return re.compile(rf"(.*\.)?({pattern})$")
