"""Prompt tuning: a learned soft prompt before the input embeddings (HF PEFT compatible)."""
from edgepeft.registry import Method, register_method
from edgepeft.tuners.prompt.config import PromptTuningConfig
from edgepeft.tuners.prompt.layer import PromptEmbedding
from edgepeft.tuners.prompt.model import PromptTuner
from edgepeft.tuners.prompt.slots import PromptSlots

PROMPT = register_method(Method(name="prompt", config_cls=PromptTuningConfig, tuner=PromptTuner(), slots=PromptSlots()))

__all__ = ["PromptTuningConfig", "PromptEmbedding", "PromptTuner", "PromptSlots", "PROMPT"]
