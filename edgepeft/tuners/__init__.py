"""PEFT methods: one folder per method, each registered once in its ``__init__``."""
from edgepeft.tuners import lora  # noqa: F401  (registers LORA)
