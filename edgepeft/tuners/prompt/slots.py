"""Prompt tuning in the exported base graph: one soft-prompt slot before the input embeddings.

    input_ids (B, T) --> embedding --> (B, T, H) --+
    prompt_embeddings.<embedding> (n, H) ----------+--> cat (B, n + T, H) --> model(inputs_embeds=...)

The slot is bound at prefill only (decode steps bind the neutral, zero-length prompt)
and its axis 0 counts virtual tokens, so the runtime puts n ones before the attention
mask and counts positions from 0 over all n + T tokens (HF PEFT's semantics). Outputs
include the virtual positions. Zero length, the graph's default, is the plain base.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgepeft.registry import SlotSpec
from edgepeft.runtimes.manifest import Slot, slot_axis, slot_name
from edgepeft.tuners.virtual import virtual_token_holder


class PromptSlotEmbedding(nn.Module):
    """Turns input_ids into the model's input embeddings with the prompt slot in front."""

    embeds_input_ids = True  # SlotGraph feeds the model inputs_embeds from this module

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.feed = {}

    def forward(self, input_ids):
        embeds = self.base_layer(input_ids)  # (B, T, H)
        # zeros (B, 1, 1) + (1, n, H), not expand(B, ...): traced, the batch keeps the input's dim name
        prompt = embeds.new_zeros(embeds.shape[0], 1, 1) + self.feed["embeddings"].unsqueeze(0)  # (B, n, H)
        return torch.cat([prompt, embeds], dim=1)  # (B, n + T, H)


def embedding_name(model: nn.Module) -> str:
    embeddings = model.get_input_embeddings()
    return next(k for k, m in model.named_modules() if m is embeddings)


class PromptSlots(SlotSpec):
    name = "prompt"

    def slot_table(self, model: nn.Module, config, groups=()) -> list[Slot]:
        key = embedding_name(model)
        hidden = model.get_input_embeddings().weight.shape[1]
        return [Slot(slot_name("prompt", "embeddings", key), "prompt", "embeddings", key,
                     (slot_axis("prompt", "n", key), hidden), "float32", "empty", phase="prefill", virtual_axis=0)]

    def install(self, model: nn.Module, slots: list[Slot], fused: dict):
        feeds, neutral = {}, {}
        for s in slots:
            feeds[s.name] = (PromptSlotEmbedding(model.get_input_embeddings()), s.role)
            neutral[s.name] = np.zeros((0, s.shape[1]), dtype=s.dtype)
        return feeds, neutral

    def values(self, peft_model, adapter_name: str, slots: list[Slot]) -> dict:
        holder = virtual_token_holder(peft_model.base_model.model)
        prompt = holder.tokens(adapter_name).detach().float().numpy()  # (n, H)
        return {s.name: np.ascontiguousarray(prompt) for s in slots}

    def sample(self, slots: list[Slot], neutral: dict) -> dict:
        g = torch.Generator().manual_seed(0)
        return {s.name: torch.randn(2, s.shape[1], generator=g) * 0.01 for s in slots}  # 2 tokens: the axis stays symbolic

    def describe(self, config) -> dict:
        return {"rank": None, "alpha": None, "targets": None, "num_virtual_tokens": config.num_virtual_tokens,
                "prompt_tuning_init": config.prompt_tuning_init}
