"""IA3 config: HF PEFT's ``IA3Config`` fields, names, defaults and semantics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from edgepeft.errors import ConfigError
from edgepeft.config import PeftConfig

# HF PEFT's defaults per model type (used when target_modules / feedforward_modules are None).
DEFAULT_IA3_TARGETS = {
    "llama": ["k_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bert": ["key", "value", "output.dense"],
}
DEFAULT_IA3_FEEDFORWARD = {
    "llama": ["down_proj"],
    "qwen2": ["down_proj"],
    "gpt2": ["mlp.c_proj"],
    "bert": ["output.dense"],
}


@dataclass
class IA3Config(PeftConfig):
    """Learned vectors that rescale activations.

    A target layer's output is multiplied by a vector ``l`` (out,); a feed-forward
    target (``feedforward_modules``) has its input multiplied instead (in,).
    """

    peft_type_name = "IA3"
    default_lr = 3e-2
    cli_shorthands = {"--target-modules": "target_modules"}
    target_modules: Optional[Union[list, str]] = None
    exclude_modules: Optional[Union[list, str]] = None
    feedforward_modules: Optional[Union[list, str]] = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self):
        super().__post_init__()
        self.check_feedforward(self.target_modules)

    def check_feedforward(self, targets, defaults_of: str = "") -> None:
        """HF PEFT's check that ``feedforward_modules`` are among ``targets`` (lists only). ``defaults_of``: the model
        type whose default targets stand in for ``target_modules`` left out, which HF PEFT does not check (it trains
        such an adapter, records those defaults and then cannot load it)."""
        ff = self.feedforward_modules
        if not (isinstance(ff, list) and isinstance(targets, list)) or set(ff) <= set(targets):
            return
        missing = sorted(set(ff) - set(targets))
        if not defaults_of:
            raise ConfigError(f"feedforward_modules must be a subset of target_modules; {missing} are not targets")
        raise ConfigError(f"feedforward_modules {missing} are not among target_modules, left out: {defaults_of}'s "
                          f"defaults {sorted(targets)}; name all the targets in target_modules: "
                          f"{','.join(sorted(targets) + missing)}")
