"""edgepeft: train PEFT adapters in PyTorch, export the base to ONNX once, switch adapters per call.

Imports are lazy so ``import edgepeft.runtimes`` never pulls in torch.
"""
import os
from contextlib import nullcontext
from importlib import import_module

__version__ = "0.1.0"

# a checkout: edgepeft.exporters and edgepeft.runtimes are its exporters/ and runtimes/ (pyproject's package-dir);
# where its edgepeft/ comes first on the path (python run in the checkout's root), an installed wheel's were not found
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtimes")) and all(
        os.path.isfile(os.path.join(_checkout, sub, "__init__.py")) for sub in ("exporters", "runtimes")):
    __path__.append(_checkout)

_LAZY = {
    "PeftConfig": "edgepeft.config",
    "load_config": "edgepeft.tuners",
    "minilm_path": "edgepeft.models",
    "PeftModel": "edgepeft.peft_model",
    "get_peft_model": "edgepeft.peft_model",
    "EdgePeftError": "edgepeft.errors",
    "EdgePeftWarning": "edgepeft.errors",
    "Runtime": "edgepeft.runtimes",
    "export": "edgepeft.exporters",
    "train": "edgepeft.training",
    "Trainer": "edgepeft.training",
    "TrainingArguments": "edgepeft.training",
}

# the built-in methods' configs, for `from edgepeft import *` (any registered method's is found by name, below)
BUILT_IN_CONFIGS = ("LoraConfig", "IA3Config", "BottleneckConfig", "PrefixTuningConfig", "PromptTuningConfig")
__all__ = sorted([*_LAZY, *BUILT_IN_CONFIGS])


def __getattr__(name):
    from edgepeft.errors import training_side  # torch, onnx... missing: one line naming the install that has them

    if name in _LAZY:  # the runtime's names need none of them
        runtime = _LAZY[name] in ("edgepeft.runtimes", "edgepeft.errors")
        with nullcontext() if runtime else training_side(f"edgepeft.{name}"):
            return getattr(import_module(_LAZY[name]), name)
    if name.endswith("Config"):  # a registered method's config class (LoraConfig; a plugin's once it is imported)
        with training_side(f"edgepeft.{name}"):
            methods = import_module("edgepeft.tuners").methods()
        for method in methods:
            if method.config_cls.__name__ == name:
                return method.config_cls
    raise AttributeError(f"module 'edgepeft' has no attribute {name!r}")
