"""PEFT methods: one folder per method, each registered once in its ``__init__``."""
from edgepeft.tuners import bottleneck, ia3, lora  # noqa: F401  (registers BOTTLENECK, IA3, LORA)
