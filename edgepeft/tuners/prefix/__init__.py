"""Prefix tuning: learned keys/values before every attention layer's own (HF PEFT compatible)."""
from edgepeft.registry import Method, register_method
from edgepeft.tuners.prefix.config import PrefixTuningConfig
from edgepeft.tuners.prefix.layer import PrefixEncoder, PrefixSelfAttention, add_prefix
from edgepeft.tuners.prefix.model import PrefixTuner
from edgepeft.tuners.prefix.slots import PrefixSlots

PREFIX = register_method(Method(name="prefix", config_cls=PrefixTuningConfig, tuner=PrefixTuner(), slots=PrefixSlots()))

__all__ = ["PrefixTuningConfig", "PrefixEncoder", "PrefixSelfAttention", "add_prefix", "PrefixTuner", "PrefixSlots", "PREFIX"]
