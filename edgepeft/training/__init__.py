"""Training adapters on JSONL data (``edgepeft train``, ``edgepeft.train``, ``edgepeft.Trainer``)."""
from edgepeft.training.arguments import TrainingArguments, method_config
from edgepeft.training.trainer import Trainer, train

__all__ = ["Trainer", "TrainingArguments", "method_config", "train"]
