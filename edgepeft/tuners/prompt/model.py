"""Prompt tuning in PyTorch: the soft prompt goes before the input embeddings (HF PEFT semantics).

    input_ids (B, T) --> embeddings (B, T, H) --+
    prompt (n, H) --> expand (B, n, H) ---------+--> cat (B, n + T, H) --> model(inputs_embeds=...)
    attention_mask (B, T) --> [ones (B, n) | mask] (B, n + T); labels get n x -100 in front

Outputs keep the virtual positions (logits are (B, n + T, V)), as HF PEFT returns them.
User ``position_ids`` are ignored (HF PEFT warns and drops them): positions are 0..n+T-1.
"""
from __future__ import annotations

import torch
from torch import nn

from edgepeft.errors import UnsupportedMethodError
from edgepeft.tuners.prompt.layer import PromptEmbedding
from edgepeft.tuners.virtual import VirtualTokenTuner, drop_token_type_ids, extend_mask, generate_with, virtual_token_holder


class PromptTuner(VirtualTokenTuner):
    saved_model_prefix = "base_model."  # HF PEFT: heads saved as base_model.<module> for prompt learning

    def inject(self, model: nn.Module, config, adapter_name: str) -> list[str]:
        config.fill_from(model.config)
        holder = virtual_token_holder(model, create=True)
        words = model.get_input_embeddings()
        holder.prompt_encoder[adapter_name] = PromptEmbedding(config, words).to(words.weight.device)
        return []

    unmergeable = "prompt tuning adds tokens, it has no weights to merge"

    def merge(self, model: nn.Module, adapter_name: str) -> None:
        raise UnsupportedMethodError(f"{self.unmergeable}; export it with slots instead")

    def inputs_embeds(self, model, adapter_name: str, input_ids, inputs_embeds):
        holder = virtual_token_holder(model)
        if inputs_embeds is None:
            inputs_embeds = model.get_input_embeddings()(input_ids)  # (B, T, H)
        prompt = holder.tokens(adapter_name).to(inputs_embeds.dtype)  # (n, H)
        prompt = prompt.unsqueeze(0).expand(inputs_embeds.shape[0], -1, -1)  # (B, n, H)
        return torch.cat([prompt, inputs_embeds], dim=1)  # (B, n + T, H)

    def forward(self, model, config, adapter_name: str, input_ids=None, attention_mask=None, inputs_embeds=None,
                labels=None, position_ids=None, **kwargs):
        n = config.num_virtual_tokens
        embeds = self.inputs_embeds(model, adapter_name, input_ids, inputs_embeds)
        batch = embeds.shape[0]
        if labels is not None and labels.dim() == 2 and labels.shape[1] == embeds.shape[1] - n:  # token labels
            labels = torch.cat([torch.full((batch, n), -100, dtype=labels.dtype, device=labels.device), labels], dim=1)
        types = drop_token_type_ids(config, kwargs)
        if types is not None:  # sequence classification: the virtual tokens are segment 0
            kwargs["token_type_ids"] = torch.cat([torch.zeros_like(types[:, :1]).expand(-1, n), types], dim=1)
        if labels is not None:
            kwargs["labels"] = labels
        return model(inputs_embeds=embeds, attention_mask=extend_mask(attention_mask, n, batch, embeds.device), **kwargs)

    def generate(self, model, config, adapter_name: str, *args, **kwargs):
        """``model.generate`` with the prompt before the first step's embeddings; ids come back without it."""
        n = config.num_virtual_tokens

        def step(inputs, key, input_ids, mask, first):
            inputs["attention_mask"] = extend_mask(mask, n, input_ids.shape[0], input_ids.device)
            if first:  # prefill: the prompt and every input token, positions 0..n+T-1
                inputs["inputs_embeds"] = self.inputs_embeds(model, adapter_name, input_ids, None)
                inputs["input_ids"] = None
                start, length = 0, n + input_ids.shape[1]
            else:  # decode: the newest token at the next cache position
                inputs["input_ids"], inputs["inputs_embeds"] = input_ids[:, -1:], None
                start, length = inputs[key].get_seq_length(), 1
            positions = torch.arange(start, start + length, device=input_ids.device)
            inputs["position_ids"] = positions.unsqueeze(0).expand(input_ids.shape[0], -1)
            return inputs

        return generate_with(model, step, *args, **kwargs)
