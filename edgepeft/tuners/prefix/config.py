"""Prefix tuning config: HF PEFT's ``PrefixTuningConfig`` fields, names, defaults and semantics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from edgepeft.errors import AdapterBaseMismatchError, ConfigError
from edgepeft.models import attention_layout
from edgepeft.tuners.virtual import PromptLearningConfig


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Learned keys and values, ``num_virtual_tokens`` of them, before every attention layer's own.

    ``prompt_embeddings`` is (num_virtual_tokens, num_layers * 2 * token_dim); with
    ``prefix_projection`` a trained adapter holds (num_virtual_tokens, token_dim) embeddings
    and a two-layer MLP (token_dim -> encoder_hidden_size -> num_layers * 2 * token_dim),
    and, as HF PEFT does, saves the MLP's output, so a saved adapter is always the keys
    and values themselves. For grouped-query attention ``token_dim`` is
    ``num_key_value_heads * head_dim`` and ``num_attention_heads`` the key/value heads.
    """

    peft_type_name = "PREFIX_TUNING"
    default_lr = 1e-1
    training_defaults = {"num_virtual_tokens": 8}
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False
    init_weights: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:  # a traceback from torch (-3)
            raise ConfigError(f"encoder_hidden_size must be a positive integer (None: token_dim), got "
                              f"{self.encoder_hidden_size!r}")

    def fill_method_fields(self, model_config) -> None:
        """Keys/values come per key/value head: with grouped-query attention, fewer heads than queries have, and a
        head_dim of its own (Llama's config may set one) makes them other than hidden_size wide, as HF PEFT sets."""
        kv_heads, width = getattr(model_config, "num_key_value_heads", None), self.method_width(model_config)
        heads = getattr(model_config, "num_attention_heads", None) or getattr(model_config, "n_head", None)
        if kv_heads is None and self.num_attention_heads != heads:  # GPT-2, BERT: the saved count shapes the prefix
            raise AdapterBaseMismatchError(f"num_attention_heads is {self.num_attention_heads}, the model has {heads} "
                                           "attention heads: the adapter was made for another base; use that one, or "
                                           "save the adapter again from its model")
        if kv_heads is not None and (self.num_attention_heads, self.token_dim) != (kv_heads, width):
            self.token_dim, self.num_attention_heads = width, kv_heads
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim

    def method_width(self, model_config) -> int | None:
        """The keys/values' width: the key/value heads' (fewer than the queries' with grouped-query attention)."""
        if getattr(model_config, "num_key_value_heads", None) is None:
            return None
        layout = attention_layout(model_config)  # the prefix's cache shape (slots.py) reads the same
        return layout["num_kv_heads"] * layout["head_dim"]
