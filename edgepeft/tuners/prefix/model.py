"""Prefix tuning in PyTorch.

Decoders (Llama, Qwen2, GPT-2), as HF PEFT: the KV cache starts with every layer's
prefix keys/values, the attention mask gets num_virtual_tokens ones in front, and
positions start after the prefix (user ``position_ids`` are shifted by it). Outputs
cover the input tokens only.

Encoders (BERT family): each self-attention puts the prefix before its own keys/values
(``PrefixSelfAttention``, mixed into the module so LoRA and others still find
query/key/value by name), and positions start after the prefix, n..n+T-1, as HF PEFT
on transformers 5 runs a FEATURE_EXTRACTION prefix (the prefix fills the cache and
BertEmbeddings offsets positions by its length); every encoder task alike (HF PEFT
cannot run SEQ_CLS: "Model does not support past key values").
"""
from __future__ import annotations

import torch
from torch import nn

from edgepeft.errors import UnsupportedMethodError, UnsupportedModelError
from edgepeft.models import DECODERS, ENCODERS, cache_kwargs
from edgepeft.tuners.prefix.layer import PrefixEncoder, PrefixSelfAttention, add_prefix, share_per_forward
from edgepeft.tuners.targets import name_matches
from edgepeft.tuners.virtual import (
    VirtualTokenTuner, drop_token_type_ids, extend_mask, generate_with, mask_positions, virtual_token_holder,
)

# Encoder self-attention modules that take a prefix, per model type (full-match regexes).
SELF_ATTENTION = {"bert": r".*\.attention\.self"}


def model_type(model) -> str:
    return getattr(getattr(model, "config", None), "model_type", None)


def self_attention_names(model: nn.Module) -> list[str]:
    pattern = SELF_ATTENTION[model_type(model)]
    return [k for k, _ in model.named_modules() if name_matches(pattern, k)]


def prefix_cache(model, holder, adapter_name: str, batch: int, cache=None):
    """A DynamicCache (or ``cache``, filled in place) holding every layer's prefix, (B, kv_heads, n, hd) each."""
    from transformers import DynamicCache

    cache = cache if cache is not None else DynamicCache(config=model.config)
    dtype = model.dtype  # as HF PEFT: the prefix in the base's dtype (float32 trainable weights on a bfloat16 base)
    for layer, (key, value) in enumerate(holder.prompt_encoder[adapter_name].keys_values()):  # (kv_heads, n, hd)
        cache.update(key.to(dtype).unsqueeze(0).expand(batch, -1, -1, -1).contiguous(),
                     value.to(dtype).unsqueeze(0).expand(batch, -1, -1, -1).contiguous(), layer)
    return cache


def shifted_positions(input_ids, inputs_embeds, position_ids, n: int):
    """An encoder's positions with a prefix: ``position_ids`` (default 0..T-1, BERT's) shifted by the n prefix tokens.

    HF PEFT's FEATURE_EXTRACTION prefix sits in the cache, and BertEmbeddings starts positions
    after the cache: n..n+T-1, (B, T).
    """
    if position_ids is None:
        tokens = input_ids if input_ids is not None else inputs_embeds[..., 0]  # (B, T)
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
    return position_ids + n


def check_decoder_task(arch: str, task_type) -> None:
    """A decoder's prefix starts the KV cache, which only edgepeft's causal-LM graphs take (HF PEFT runs a
    feature-extraction one, not a seq-cls one)."""
    if arch in DECODERS and task_type not in (None, "CAUSAL_LM"):
        raise UnsupportedMethodError(
            f"prefix tuning on a decoder ({arch}) runs and exports for causal-lm only: its keys/values start the KV "
            f"cache, which edgepeft's {task_type} graphs of a decoder do not take; train it with task causal-lm, or use "
            "prompt tuning or LoRA for this task")


class PrefixTuner(VirtualTokenTuner):
    saved_model_prefix = "base_model."  # HF PEFT: heads saved as base_model.<module> for prompt learning

    def inject(self, model: nn.Module, config, adapter_name: str) -> list[str]:
        arch = model_type(model)
        if arch not in DECODERS and arch not in SELF_ATTENTION:
            raise UnsupportedModelError(f"prefix tuning supports {', '.join(sorted(DECODERS | set(SELF_ATTENTION)))}, not {arch!r}")
        check_decoder_task(arch, config.task_type)  # refused before training, not after it at export
        config.fill_from(model.config)
        holder = virtual_token_holder(model, create=True)
        holder.prompt_encoder[adapter_name] = PrefixEncoder(config).to(model.get_input_embeddings().weight.device)
        if arch in ENCODERS:
            for layer, key in enumerate(self_attention_names(model)):
                add_prefix(model.get_submodule(key), PrefixSelfAttention, layer, _source=holder)
            share_per_forward(model)
        return []

    unmergeable = "prefix tuning adds keys and values, it has no weights to merge"

    def merge(self, model: nn.Module, adapter_name: str) -> None:
        raise UnsupportedMethodError(f"{self.unmergeable}; export it with slots instead")

    def forward(self, model, config, adapter_name: str, input_ids=None, attention_mask=None, inputs_embeds=None,
                position_ids=None, **kwargs):
        if (types := drop_token_type_ids(config, kwargs)) is not None:
            kwargs["token_type_ids"] = types
        n = config.num_virtual_tokens
        if model_type(model) in ENCODERS:  # the self-attention layers add the prefix (PrefixSelfAttention)
            return model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                         position_ids=shifted_positions(input_ids, inputs_embeds, position_ids, n), **kwargs)
        batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        device = (input_ids if input_ids is not None else inputs_embeds).device
        for name in ("use_cache", "cache", "past_key_values"):
            kwargs.pop(name, None)
        cache = prefix_cache(model, virtual_token_holder(model), adapter_name, batch)
        return model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=extend_mask(attention_mask, n, batch, device),
                     position_ids=None if position_ids is None else position_ids + n, **cache_kwargs(model, cache), **kwargs)

    def generate(self, model, config, adapter_name: str, *args, **kwargs):
        """``model.generate`` with the cache starting as the prefix; positions from the mask, after the prefix."""
        if model_type(model) not in DECODERS:
            raise UnsupportedModelError(f"{model_type(model)} is an encoder: it does not generate")
        n = config.num_virtual_tokens
        holder = virtual_token_holder(model)

        def step(inputs, key, input_ids, mask, first):
            batch = input_ids.shape[0]
            inputs["attention_mask"] = extend_mask(mask, n, batch, input_ids.device)
            positions = mask_positions(mask) + n  # (B, T so far)
            if first:
                inputs[key] = prefix_cache(model, holder, adapter_name, batch, inputs.get(key))
                inputs["input_ids"], inputs["position_ids"] = input_ids, positions
            else:
                inputs["input_ids"], inputs["position_ids"] = input_ids[:, -1:], positions[:, -1:]
            inputs["inputs_embeds"] = None
            inputs["use_cache"] = True
            return inputs

        return generate_with(model, step, *args, **kwargs)
