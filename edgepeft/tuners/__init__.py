"""PEFT methods: one folder per method, each registered once in its ``__init__``; task heads register their slots.

Import the lookups from here (importing this package registers the built-in methods):
``method_for(config)``, ``methods()``, ``specs_for(config)``, ``spec_for(name)``, ``load_config(dir)``.
"""
from edgepeft.config import load_config
from edgepeft.registry import method_for, methods, spec_for, specs_for
from edgepeft.tuners import bottleneck, heads, ia3, lora, prefix, prompt  # noqa: F401  (each registers itself)

__all__ = ["load_config", "method_for", "methods", "spec_for", "specs_for"]
