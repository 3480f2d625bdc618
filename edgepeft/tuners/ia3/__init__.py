"""IA3: learned vectors rescaling layer outputs (or feed-forward inputs), HF PEFT compatible."""
from edgepeft.registry import Method, register_method
from edgepeft.tuners.ia3.config import IA3Config
from edgepeft.tuners.ia3.layer import IA3Linear
from edgepeft.tuners.ia3.model import IA3Tuner
from edgepeft.tuners.ia3.slots import IA3Slots

IA3 = register_method(Method(name="ia3", config_cls=IA3Config, tuner=IA3Tuner(), slots=IA3Slots()))

__all__ = ["IA3Config", "IA3Linear", "IA3Tuner", "IA3Slots", "IA3"]
