"""Prompt tuning config: HF PEFT's ``PromptTuningConfig`` fields, names, defaults and semantics."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from edgepeft.errors import ConfigError
from edgepeft.tuners.virtual import PromptLearningConfig

INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """``num_virtual_tokens`` learned embeddings (num_virtual_tokens, hidden) put before the input embeddings.

    ``prompt_tuning_init="TEXT"`` starts them as the embeddings of ``prompt_tuning_init_text``
    tokenized with ``tokenizer_name_or_path`` (a local folder, or a tokenizer object, which
    is saved as its ``name_or_path``), repeated or cut to ``num_virtual_tokens``.
    """

    peft_type_name = "PROMPT_TUNING"
    virtual_first = True  # put before the input embeddings (prefix tuning's are only in the cache)
    default_lr = 1e-1
    training_defaults = {"num_virtual_tokens": 8}
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Any = None
    tokenizer_kwargs: Optional[dict] = None

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.tokenizer_name_or_path, os.PathLike):  # a pathlib.Path: AutoTokenizer takes it, JSON not
            self.tokenizer_name_or_path = os.fspath(self.tokenizer_name_or_path)
        self.prompt_tuning_init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init))
        if self.prompt_tuning_init not in INITS:
            raise ConfigError(f"prompt_tuning_init must be one of {', '.join(INITS)}, got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and (not self.tokenizer_name_or_path or self.prompt_tuning_init_text is None):
            raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path")
        if self.tokenizer_kwargs and self.prompt_tuning_init != "TEXT":  # as HF PEFT, which cannot load it otherwise
            raise ConfigError(f"tokenizer_kwargs are read only with prompt_tuning_init='TEXT' (this one is "
                              f"{self.prompt_tuning_init!r}), and HF PEFT refuses them otherwise; leave tokenizer_kwargs out")

    def to_dict(self) -> dict:
        d = super().to_dict()
        tok = self.tokenizer_name_or_path
        if tok is not None and not isinstance(tok, str):  # a tokenizer object: record where it came from
            d["tokenizer_name_or_path"] = getattr(tok, "name_or_path", None) or None
            if d["tokenizer_name_or_path"] is None and self.prompt_tuning_init == "TEXT":
                raise ConfigError("prompt_tuning_init='TEXT' with a tokenizer object that was not loaded from a folder "
                                  "(its name_or_path is empty): the saved config could not name it, and neither edgepeft "
                                  "nor HF PEFT would load it; save the tokenizer and pass its folder")
        return d
