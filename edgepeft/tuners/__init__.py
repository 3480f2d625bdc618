"""PEFT methods: one folder per method, each registered once in its ``__init__``."""
from edgepeft.tuners import ia3, lora  # noqa: F401  (registers IA3, LORA)
