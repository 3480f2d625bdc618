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
            tokenizer = _tokenizer(config)
            ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
            if not ids:
                raise ConfigError("prompt_tuning_init_text tokenizes to no tokens; give a non-empty text")
            if (top := max(ids)) >= word_embeddings.num_embeddings:  # a token added to the tokenizer alone
                raise ConfigError(
                    f"{getattr(tokenizer, 'name_or_path', None) or 'tokenizer_name_or_path'}: its tokenizer gives "
                    "prompt_tuning_init_text's token "
                    f"{tokenizer.convert_ids_to_tokens(top)!r} the id {top}, past the model's "
                    f"{word_embeddings.num_embeddings} embeddings; leave that token out of the text, or resize the "
                    "model's embeddings to the tokenizer (resize_token_embeddings), save it and train on it")
            ids = torch.tensor((ids * (n // len(ids) + 1))[:n], dtype=torch.long)
        with torch.no_grad():
            self.embedding.weight.copy_(word_embeddings(ids.to(word_embeddings.weight.device)).float())

    def forward(self) -> torch.Tensor:
        return self.embedding.weight
