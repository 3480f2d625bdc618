"""Bottleneck adapters (Houlsby, Pfeiffer): edgepeft's own peft_type "BOTTLENECK"."""
from edgepeft.registry import Method, register_method
from edgepeft.tuners.bottleneck.config import BottleneckConfig
from edgepeft.tuners.bottleneck.layer import BottleneckLinear
from edgepeft.tuners.bottleneck.model import BottleneckTuner
from edgepeft.tuners.bottleneck.slots import BottleneckSlots

BOTTLENECK = register_method(Method(name="bottleneck", config_cls=BottleneckConfig, tuner=BottleneckTuner(), slots=BottleneckSlots()))

__all__ = ["BottleneckConfig", "BottleneckLinear", "BottleneckTuner", "BottleneckSlots", "BOTTLENECK"]
