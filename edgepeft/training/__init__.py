"""Training adapters on JSONL data (``edgepeft train``, ``edgepeft.train``, ``edgepeft.Trainer``)."""
from edgepeft.training.trainer import Trainer, TrainingArguments, method_config, train

__all__ = ["Trainer", "TrainingArguments", "method_config", "train"]
