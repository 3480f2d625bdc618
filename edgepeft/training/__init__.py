"""Training adapters on JSONL data (``edgepeft train``, ``edgepeft.train``, ``edgepeft.Trainer``)."""
from edgepeft.errors import training_side

with training_side("edgepeft.training"):  # a runtime-only install: one line naming the install that has torch...
    from edgepeft.training.arguments import TrainingArguments, method_config
    from edgepeft.training.trainer import Trainer, train

__all__ = ["Trainer", "TrainingArguments", "method_config", "train"]
