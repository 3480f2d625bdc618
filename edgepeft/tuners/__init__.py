"""PEFT methods: one folder per method, each registered once in its ``__init__``."""
from edgepeft.tuners import bottleneck, ia3, lora, prefix, prompt  # noqa: F401  (registers each method)
