"""Prefix tuning in the exported base graph.

Decoders: the prefix is the start of the KV cache, so the base graph needs nothing new.
Each layer's key and value is a slot whose ``target`` is that layer's
``past_key_values.%d.key/value`` input: the runtime binds the adapter's (1, kv_heads, n, hd)
tensors, repeated over the batch, as the prefill's past, puts n ones before the
attention mask and starts positions at n (HF PEFT's semantics). No prefix is the
empty cache the runtime binds anyway: the plain base.

Encoders (BERT family): each self-attention gets two graph inputs,
``prefix_key.<module>`` / ``prefix_value.<module>`` (heads, n, hd), put before its own
keys/values inside the graph (``PrefixSelfAttention``), and the graph starts the tokens'
positions at n (``position_axis``: the runtime counts n against max_positions); zero
length is the plain base.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgepeft.models import DECODERS, attention_layout
from edgepeft.registry import SlotSpec
from edgepeft.runtimes.manifest import PAST_KEY, PAST_VALUE, Slot, slot_axis, slot_name
from edgepeft.tuners.prefix.layer import PrefixSelfAttention, add_prefix, share_per_forward
from edgepeft.tuners.prefix.model import check_decoder_task, model_type, self_attention_names
from edgepeft.tuners.virtual import virtual_token_holder

# Decoder attention modules per layer (the slot's module; the cache is indexed by layer).
ATTENTION = {"llama": "model.layers.{}.self_attn", "qwen2": "model.layers.{}.self_attn", "gpt2": "transformer.h.{}.attn"}
AXIS = slot_axis("prefix", "n", "virtual_tokens")  # one length for every layer


class PrefixSlotSelfAttention(PrefixSelfAttention):
    """PrefixSelfAttention reading its prefix from graph inputs (``feed``)."""

    def prefix(self):
        return self.feed["key"], self.feed["value"]  # (heads, n, hd) each


def _layout(model) -> tuple[int, int, int]:
    """(layers, key/value heads, head size): a decoder's prefix has the shape of its KV cache."""
    layout = attention_layout(model.config)
    return layout["num_layers"], layout["num_kv_heads"], layout["head_dim"]


def _modules(model) -> list[str]:
    if model_type(model) in DECODERS:
        return [ATTENTION[model_type(model)].format(layer) for layer in range(_layout(model)[0])]
    return self_attention_names(model)


class PrefixSlots(SlotSpec):
    name = "prefix"

    def unfused(self, model: nn.Module, config) -> list[str]:
        return []

    def slot_table(self, model: nn.Module, config, groups=()) -> list[Slot]:
        _, heads, head_dim = _layout(model)
        decoder = model_type(model) in DECODERS
        check_decoder_task(model_type(model), config.task_type)
        slots = []
        for layer, key in enumerate(_modules(model)):
            for role, past in (("key", PAST_KEY), ("value", PAST_VALUE)):
                if decoder:
                    slots.append(Slot(slot_name("prefix", role, key), "prefix", role, key, (1, heads, AXIS, head_dim),
                                      "float32", "empty", phase="prefill", target=past % layer, virtual_axis=2))
                else:
                    slots.append(Slot(slot_name("prefix", role, key), "prefix", role, key, (heads, AXIS, head_dim),
                                      "float32", "empty", position_axis=1))  # the graph shifts positions by n
        return slots

    def install(self, model: nn.Module, slots: list[Slot], fused: dict):
        feeds, neutral = {}, {}
        modules = _modules(model)
        for s in slots:
            if s.target:
                continue  # a cache input the runtime binds: nothing in the graph
            module = model.get_submodule(s.module)
            if not isinstance(module, PrefixSlotSelfAttention):
                add_prefix(module, PrefixSlotSelfAttention, modules.index(s.module), feed={})
            feeds[s.name] = (module, s.role)
            neutral[s.name] = np.zeros([0 if isinstance(d, str) else d for d in s.shape], dtype=s.dtype)
        if feeds:
            share_per_forward(model)
        return feeds, neutral

    def values(self, peft_model, adapter_name: str, slots: list[Slot]) -> dict:
        model = peft_model.base_model.model
        per_layer = virtual_token_holder(model).prompt_encoder[adapter_name].keys_values()  # [(heads, n, hd) x 2]
        modules = _modules(model)
        out = {}
        for s in slots:
            t = per_layer[modules.index(s.module)][0 if s.role == "key" else 1].detach().float().numpy()
            out[s.name] = np.ascontiguousarray(t[None] if s.target else t)  # decoders: (1, kv_heads, n, hd)
        return out

    def sample(self, slots: list[Slot], neutral: dict) -> dict:
        g = torch.Generator().manual_seed(0)
        return {s.name: torch.randn([2 if isinstance(d, str) else d for d in s.shape], generator=g) * 0.1
                for s in slots if not s.target}

    def describe(self, config) -> dict:
        return {"rank": None, "alpha": None, "targets": None, "num_virtual_tokens": config.num_virtual_tokens,
                "prefix_projection": config.prefix_projection}
