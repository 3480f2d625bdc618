from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from edgepeft.config import PeftConfig


@dataclass
class ToyBiasConfig(PeftConfig):
    peft_type_name = "TOY_BIAS"
    default_lr = 1e-2
    cli_shorthands = {"--target-modules": "target_modules"}
    target_modules: Optional[Union[list, str]] = None
