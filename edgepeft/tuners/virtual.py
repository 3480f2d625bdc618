"""Virtual tokens: what prompt tuning and prefix tuning share (HF PEFT's "prompt learning").

    transformers model
      |-- input embedding layer: untouched (get_input_embeddings, resize_token_embeddings as without adapters)
      `-- virtual_tokens = VirtualTokens()   no forward
            `-- prompt_encoder[adapter]: the method's encoder; encoder() -> (num_virtual_tokens, D)

The encoders live in a module of their own beside the model's layers: part of the module tree (trainable, moved
with ``.to``), while the input embeddings stay the model's own (``get_input_embeddings().weight`` and
``resize_token_embeddings`` work as without adapters; a save of the base keeps its weights under their names, the
encoders' beside them, which transformers reports as unused when it loads the base). HF PEFT keeps its encoders
outside the model. They change nothing by themselves: the method's tuner rewrites a call's inputs (``forward`` /
``generate`` hooks that PeftModel calls), as HF PEFT's PeftModel does for prompt learning:

- the attention mask gets ``num_virtual_tokens`` ones in front;
- prompt tuning puts the prompt before the input embeddings; user ``position_ids``
  are dropped, so positions count every token, virtual ones included, from 0;
- prefix tuning starts the KV cache with the prefix keys/values, so positions start
  at ``num_virtual_tokens`` (user ``position_ids`` are shifted by it).

Saved state is one tensor, ``prompt_embeddings``, as HF PEFT saves it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from edgepeft.config import PeftConfig
from edgepeft.errors import (AdapterBaseMismatchError, ConfigError, CorruptArtifactError, EdgePeftWarning,
                             UnsupportedMethodError)
from edgepeft.registry import AdapterLayer, Tuner


def hidden_size(model_config) -> int:
    """The model's hidden size (GPT-2 calls it n_embd)."""
    return getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd")


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields HF PEFT's prompt-learning configs share; the model's sizes are filled in at injection."""

    virtual_first = False  # the virtual tokens are the first positions of the model's outputs (and HF PEFT's labels)
    model_sizes = ("num_layers", "token_dim", "num_attention_heads", "num_transformer_submodules")  # not options
    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        if self.num_virtual_tokens is None or self.num_virtual_tokens <= 0:  # check_types: an int or None
            raise ConfigError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}; "
                              "set it (edgepeft train: --option num_virtual_tokens=8)")

    def fill_from(self, model_config) -> None:
        """HF PEFT's ``_prepare_prompt_learning_config``: sizes the config leaves unset come from the model; sizes a
        loaded adapter_config.json sets must be the model's (an adapter trained on another base)."""
        c = model_config
        layers, width = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer"), hidden_size(c)
        fix = (f"the adapter was trained on another base ({self.base_model_name_or_path}); use that one"
               if self.names_another_base(getattr(c, "_name_or_path", None)) else
               "adapter_config.json disagrees with the base it names: save the adapter again from its model")
        if self.num_layers is not None and self.num_layers != layers:
            raise AdapterBaseMismatchError(f"num_layers is {self.num_layers}, the model has {layers} layers: {fix}")
        if self.token_dim is not None and self.token_dim not in (width, self.method_width(c)):
            raise AdapterBaseMismatchError(f"token_dim is {self.token_dim}, the model's hidden size is {width}: {fix}")
        if self.num_layers is None:
            self.num_layers = layers
        if self.token_dim is None:
            self.token_dim = width
        if self.num_attention_heads is None:
            self.num_attention_heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head")
        if self.num_transformer_submodules is None:
            self.num_transformer_submodules = 1
        if self.num_transformer_submodules != 1:
            raise UnsupportedMethodError(  # HF PEFT's 2 (an encoder-decoder's) repeats the virtual tokens on a decoder
                f"num_transformer_submodules is {self.num_transformer_submodules}; edgepeft runs 1 set of virtual tokens "
                "(encoder-decoder models, which take 2, are not supported): train the adapter again without it (1)")
        self.fill_method_fields(c)

    def fill_method_fields(self, model_config) -> None:
        """What a method's own fields take from the model (prefix tuning: key/value sizes); none by default."""

    def method_width(self, model_config) -> int | None:
        """The token_dim ``fill_method_fields`` may set instead of the hidden size (None: it sets none)."""


HOLDER = "virtual_tokens"  # the model's submodule holding the encoders


class VirtualTokens(AdapterLayer):
    """Each adapter's virtual-token encoder, in a module of the model's own (it wraps nothing).

    State: one ``prompt_embeddings`` tensor per adapter (the encoder's output, as HF PEFT saves it).
    """

    adapter_dicts = ("prompt_encoder",)
    own_state = True  # saves the encoder's output, not its parameters
    frozen_attr = None  # wraps nothing: a merged or unloaded copy of the model drops it

    def __init__(self):
        super().__init__()
        self.prompt_encoder = nn.ModuleDict()

    def tokens(self, adapter_name: str) -> torch.Tensor:
        """(num_virtual_tokens, D): the prompt (D = hidden) or flattened prefix keys/values."""
        return self.prompt_encoder[adapter_name]()

    def adapter_parameters(self, adapter_name: str) -> dict:
        return dict(self.prompt_encoder[adapter_name].named_parameters()) if adapter_name in self.prompt_encoder else {}

    def saved_tensors(self, adapter_name: str) -> dict:
        if adapter_name not in self.prompt_encoder:
            return {}
        return {"prompt_embeddings": self.tokens(adapter_name).detach()}

    def load_saved_tensors(self, adapter_name: str, state: dict, path: str) -> None:
        encoder = self.prompt_encoder[adapter_name]
        saved = state["prompt_embeddings"]
        weight = encoder.embedding.weight
        if tuple(saved.shape) != tuple(weight.shape):
            if getattr(encoder, "transform", None) is not None:
                raise ConfigError(
                    f"{path}: prefix_projection adapters are saved with the projection applied (as HF PEFT saves "
                    "them), so the MLP cannot be trained further; load with is_trainable=False"
                )
            raise CorruptArtifactError(
                f"{path}: prompt_embeddings has shape {list(saved.shape)}, the model expects {list(weight.shape)}; "
                "the adapter was trained on another base or with another num_virtual_tokens"
            )
        with torch.no_grad():
            weight.copy_(saved.to(weight.dtype))


def virtual_token_holder(model: nn.Module, create: bool = False) -> VirtualTokens | None:
    """``model``'s VirtualTokens (made on first use when ``create``)."""
    holder = model._modules.get(HOLDER)
    if holder is None and create:
        holder = VirtualTokens()
        model.add_module(HOLDER, holder)
    return holder


class VirtualTokenTuner(Tuner):
    """What prompt and prefix tuners share: their adapter layer is the model's VirtualTokens."""

    def layers(self, model: nn.Module):
        holder = virtual_token_holder(model)
        return [] if holder is None else [(HOLDER, holder)]


def drop_token_type_ids(config, kwargs: dict):
    """Pop ``token_type_ids`` from a call's kwargs; returns them where HF PEFT's prompt learning keeps them.

    HF PEFT ignores them (with a warning) except for sequence classification.
    """
    types = kwargs.pop("token_type_ids", None)
    if types is not None and config.task_type != "SEQ_CLS":
        warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token type ids",
                      EdgePeftWarning, stacklevel=3)  # HF PEFT's words; a UserWarning, as there
        return None
    return types


def extend_mask(mask: torch.Tensor | None, n: int, batch: int, device) -> torch.Tensor | None:
    """``n`` ones before the attention mask (virtual tokens are always attended)."""
    if mask is None:
        return None
    return torch.cat([torch.ones(batch, n, dtype=mask.dtype, device=mask.device), mask], dim=1)


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions from the attention mask, as transformers' generate makes them (left padding counts from 0)."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


def cache_key(inputs: dict) -> str:
    return "cache" if "cache" in inputs else "past_key_values"


def generate_with(model, prepare_step, *generate_args, **generate_kwargs):
    """``model.generate`` with ``prepare_step(inputs, input_ids, mask, first)`` rewriting each step's inputs.

    ``mask`` is the user's attention mask so far (no virtual tokens); ``first`` is the
    prefill step (an empty cache). The model's own preparation runs first.
    """
    original = model.prepare_inputs_for_generation
    saved = model.__dict__.get("prepare_inputs_for_generation")

    def prepare(input_ids, *args, **kwargs):  # named as transformers expects (it validates generate's kwargs)
        inputs = original(input_ids, *args, **kwargs)
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        key = cache_key(inputs)
        cache = inputs.get(key)
        first = cache is None or cache.get_seq_length() == 0
        inputs.pop("cache_position", None)
        return prepare_step(inputs, key, input_ids, mask, first)

    model.prepare_inputs_for_generation = prepare
    try:
        return model.generate(*generate_args, **generate_kwargs)
    finally:
        if saved is None:
            del model.prepare_inputs_for_generation  # the class's own method is back
        else:
            model.prepare_inputs_for_generation = saved
