"""The soft prompt in PyTorch: HF PEFT's ``PromptEmbedding``."""
from __future__ import annotations

import torch
from torch import nn

from edgepeft.errors import ConfigError


def _tokenizer(config):
    tok = config.tokenizer_name_or_path
    if not isinstance(tok, str):
        if not callable(tok):  # None, a number: "'NoneType' object is not callable"
            raise ConfigError(f"tokenizer_name_or_path={tok!r:.60}: prompt_tuning_init='TEXT' needs a tokenizer's "
                              "folder or hub name, or a tokenizer object; give the base model's folder")
        return tok  # a tokenizer object
    from transformers import AutoTokenizer

    from edgepeft.models import NO_REMOTE_CODE

    kwargs = {**(config.tokenizer_kwargs or {}), **NO_REMOTE_CODE}
    try:
        return AutoTokenizer.from_pretrained(tok, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{tok}: cannot load the tokenizer for prompt_tuning_init='TEXT' ({str(e).splitlines()[0]})") from None


class PromptEmbedding(nn.Module):
    """``embedding``: nn.Embedding(num_virtual_tokens, token_dim); ``forward()`` -> (num_virtual_tokens, token_dim).

    Initialised as HF PEFT does: RANDOM (nn.Embedding's normal init), SAMPLE_VOCAB
    (embeddings of random vocabulary tokens) or TEXT (the init text's token
    embeddings, repeated or cut to num_virtual_tokens).
    """

    def __init__(self, config, word_embeddings: nn.Embedding):
        super().__init__()
        n = config.num_virtual_tokens
        self.embedding = nn.Embedding(n, config.token_dim)
        if config.inference_mode or config.prompt_tuning_init == "RANDOM":
            return
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, word_embeddings.num_embeddings, (n,))
        else:
            ids = list(_tokenizer(config)(config.prompt_tuning_init_text)["input_ids"])
            if not ids:
                raise ConfigError("prompt_tuning_init_text tokenizes to no tokens; give a non-empty text")
            ids = torch.tensor((ids * (n // len(ids) + 1))[:n], dtype=torch.long)
        if int(ids.max()) >= word_embeddings.num_embeddings:
            raise ConfigError(
                f"the init text's token id {int(ids.max())} is outside the model's vocabulary "
                f"({word_embeddings.num_embeddings}); use the base model's tokenizer"
            )
        with torch.no_grad():
            self.embedding.weight.copy_(word_embeddings(ids.to(word_embeddings.weight.device)).float())

    def forward(self) -> torch.Tensor:
        return self.embedding.weight
