"""edgepeft: train PEFT adapters in PyTorch, export the base to ONNX once, switch adapters per call.

Imports are lazy so ``import edgepeft.runtimes`` never pulls in torch.
"""
from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "PeftConfig": "edgepeft.config",
    "load_config": "edgepeft.tuners",
    "minilm_path": "edgepeft.models",
    "LoraConfig": "edgepeft.tuners.lora",
    "IA3Config": "edgepeft.tuners.ia3",
    "BottleneckConfig": "edgepeft.tuners.bottleneck",
    "PrefixTuningConfig": "edgepeft.tuners.prefix",
    "PromptTuningConfig": "edgepeft.tuners.prompt",
    "PeftModel": "edgepeft.peft_model",
    "get_peft_model": "edgepeft.peft_model",
    "EdgePeftError": "edgepeft.errors",
    "Runtime": "edgepeft.runtimes",
    "export": "edgepeft.exporters",
    "train": "edgepeft.training",
    "Trainer": "edgepeft.training",
    "TrainingArguments": "edgepeft.training",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgepeft' has no attribute {name!r}")
