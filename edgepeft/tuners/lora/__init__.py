"""LoRA: low-rank updates on Linear/Conv1D layers (HF PEFT compatible)."""
from edgepeft.registry import Method, register_method
from edgepeft.tuners.lora.config import LoraConfig
from edgepeft.tuners.lora.layer import LoraLinear
from edgepeft.tuners.lora.model import LoraTuner
from edgepeft.tuners.lora.slots import LoraSlots

LORA = register_method(Method(name="lora", config_cls=LoraConfig, tuner=LoraTuner(), slots=LoraSlots()))

__all__ = ["LoraConfig", "LoraLinear", "LoraTuner", "LoraSlots", "LORA"]
