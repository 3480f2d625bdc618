"""What training reads off a model's outputs beyond its own loss: sentence embeddings pooled as sentence-transformers
pools them (texts cut as it cuts them), and a prompt-tuned decoder classifier's logits at each row's last real token."""
from __future__ import annotations

import contextlib
import logging

import torch

from edgepeft.errors import ConfigError, warn


def embedding_settings(model: str, revision, config, tokenizer, n_virtual: int) -> tuple:
    """(the length texts are cut to, pooling mode, lower-case texts) as ``Runtime.embed`` serves the export: the
    model's sentence-transformers settings, else its tokenizer's limit, capped at its positions less the virtual
    tokens of a prompt or prefix adapter (training refused texts that embed, and sentence-transformers, cut)."""
    from edgepeft.models import max_positions, sentence_transformers_folder
    from edgepeft.runtimes.sentence import cut_length, sentence_transformers_settings, tokenizer_limit

    positions, folder = max_positions(config), sentence_transformers_folder(model, revision)
    settings = sentence_transformers_settings(folder, positions) if folder else None
    if settings and not settings.include_prompt:
        warn(f"{folder}: 1_Pooling's include_prompt is false: Runtime.embed(prompt=...) leaves a prompt's tokens out of "
             "the pooling, training pools a prompt in the texts with them")
    limit, mode, lower = settings[:3] if settings else (
        tokenizer_limit(getattr(tokenizer, "model_max_length", None), positions), "mean", False)
    return cut_length(limit, positions, n_virtual), mode, lower


def pooled(model, ids, mask, mode="mean"):
    """Embeddings pooled as sentence-transformers pools them (``mode``: its 1_Pooling config), L2-normalized."""
    hidden = model(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
    hidden = hidden[:, hidden.shape[1] - mask.shape[1]:]  # a prompt's virtual tokens come first: pool the text's own
    m = mask[..., None].to(hidden.dtype)
    count = m.sum(1).clamp(min=1)
    rows, real = torch.arange(mask.shape[0], device=mask.device), mask.bool()  # first/last real token, either padding
    vector = {"cls": lambda: hidden[rows, real.int().argmax(1)],
              "lasttoken": lambda: hidden[rows, mask.shape[1] - 1 - real.flip(1).int().argmax(1)] * real.any(1)[:, None],
              "max": lambda: hidden.masked_fill(m == 0, -1e9).max(1).values,
              "mean_sqrt_len": lambda: (hidden * m).sum(1) / count.sqrt()}.get(mode, lambda: (hidden * m).sum(1) / count)()
    return torch.nn.functional.normalize(vector.float(), dim=-1)


def retrieval_loss(model, batch: dict, mode: str) -> tuple:
    """(sentence-transformers' MultipleNegativesRankingLoss, (text, positive) embeddings): each text's cosine
    similarity x 20 to every positive and hard negative of the batch, its own positive the target. Texts,
    positives and negatives in one forward (DDP allows one forward per backward)."""
    fields = [("input_ids", "attention_mask"), ("positive_ids", "positive_mask"), ("negative_ids", "negative_mask")]
    parts = [(batch[i], batch[m]) for i, m in fields if i in batch]
    width = max(ids.shape[1] for ids, _ in parts)
    ids, mask = (torch.cat([torch.nn.functional.pad(t[k], (0, width - t[k].shape[1])) for t in parts]) for k in (0, 1))
    rows = len(batch["input_ids"])
    a, candidates = pooled(model, ids, mask, mode).split([rows, len(ids) - rows])
    scores = 20.0 * a @ candidates.T
    loss = torch.nn.functional.cross_entropy(scores, torch.arange(rows, device=a.device))
    if torch.is_grad_enabled() and not loss.requires_grad:  # was torch's "element 0 of tensors does not require grad"
        targets = getattr(getattr(model, "module", model).active_peft_config, "target_modules", None)
        raise ConfigError(f"target_modules {targets!r} are all off the path to the embeddings, which pool the last "
                          "hidden states (a pooler layer is no part of them), so training has nothing to learn; "
                          "target layers inside the encoder, or leave target_modules out for the defaults")
    return loss, (a, candidates[:rows])


@contextlib.contextmanager
def last_real_token_pooled(model, mask: torch.Tensor):
    """transformers' decoder classifiers pool each row's last non-pad token, found from input_ids; given inputs_embeds
    (a prompt before the tokens, as HF PEFT gives them) they pool the last position, a pad in a right-padded batch.
    Within, the score layer's output at the last position is each row's at its last real token: what the row alone
    gives (causal attention never reads the pads after it), which is what ``classify`` serves. transformers' warning
    that padding goes undetected is left out (``padding_warning_left_out``)."""
    base = getattr(model, "module", model).get_base_model()  # DDP's wrapper holds the model as .module
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # in the inputs; the virtual tokens come before them

    def at_last_real(module, args, logits):
        rows = torch.arange(logits.shape[0], device=logits.device)
        shift = logits.shape[1] - mask.shape[1]  # the prompt's virtual tokens
        return torch.cat([logits[:, :-1], logits[rows, shift + last].unsqueeze(1)], dim=1)

    hook = base.score.register_forward_hook(at_last_real)
    try:
        with padding_warning_left_out(base):
            yield
    finally:
        hook.remove()


@contextlib.contextmanager
def padding_warning_left_out(base):
    """Within, transformers' warning that a decoder classifier given inputs_embeds "will not detect padding tokens"
    is left out (the logger of the module whose forward says it): training and the export's check pool each row's
    last real token themselves, and the warning read as a fault of theirs ("Results may be unexpected")."""
    def undetected(record) -> bool:
        return "will not detect padding tokens" not in record.getMessage()

    logger = logging.getLogger(type(base).forward.__module__)
    logger.addFilter(undetected)
    try:
        yield
    finally:
        logger.removeFilter(undetected)
