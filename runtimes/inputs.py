"""The checks every call's token inputs pass before they reach ONNX Runtime (its own errors are not one-line)."""
from __future__ import annotations

import numpy as np

from .commands import pairs_fix
from .errors import STOPS, ConfigError, InvalidInputError


def check_token_inputs(input_ids, attention_mask, vocab_size: int, max_positions, base_dir: str):
    """(ids, mask) as contiguous int64 (B, T) arrays of their own, or InvalidInputError saying what is wrong. Copies:
    a stream reads them at its first ``next()``, after the caller may have refilled its buffer (unchecked values)."""
    try:
        ids = np.array(input_ids)
    except STOPS:
        raise
    except Exception:
        raise InvalidInputError("input_ids must be an array of token ids") from None
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.size == 0:
        raise InvalidInputError(f"input_ids must have shape (batch, sequence) and not be empty; got {list(ids.shape)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InvalidInputError(f"input_ids must be integers; got dtype {ids.dtype}")
    lo, hi = int(ids.min()), int(ids.max())  # before int64: a uint64 id past 2**63 would read as negative
    ids = ids.astype(np.int64, copy=False)
    if lo < 0 or hi >= vocab_size:
        raise InvalidInputError(
            f"token id {hi if hi >= vocab_size else lo} is outside the vocabulary [0, {vocab_size}) "
            f"of {base_dir}; tokenize with the base model's tokenizer"
        )
    if max_positions and ids.shape[1] > max_positions:
        raise InvalidInputError(
            f"sequence length {ids.shape[1]} exceeds the model's {max_positions} positions; shorten the input to "
            f"{max_positions} tokens, less a prompt or prefix adapter's virtual tokens"  # checked apart once it fits
        )
    if attention_mask is None:
        mask = np.ones_like(ids)
    else:
        try:
            mask = np.array(attention_mask)
        except STOPS:
            raise
        except Exception:
            raise InvalidInputError("attention_mask must be an array of 0/1 (batch, sequence)") from None
        if mask.ndim == 1:
            mask = mask[None, :]
        if mask.shape != ids.shape:
            raise InvalidInputError(
                f"attention_mask has shape {list(mask.shape)} but input_ids has {list(ids.shape)}; they must match"
            )
        if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_):
            raise InvalidInputError(f"attention_mask must be 0/1 integers; got dtype {mask.dtype}")
        mask = mask.astype(np.int64, copy=False)
        if mask.size and (mask.min() < 0 or mask.max() > 1):
            raise InvalidInputError("attention_mask must hold only 0 (padding) and 1 (token)")
    return np.ascontiguousarray(ids), np.ascontiguousarray(mask)


def check_token_types(token_type_ids, ids: np.ndarray, types: int | None, base_dir: str, manifest: dict) -> np.ndarray | None:
    """``token_type_ids`` as a contiguous int64 array of ``ids``' shape, or None (none given, or all 0 where the graph
    takes none: every token is of type 0 there). ``types``: the graph's token types, None where it takes none;
    ``manifest``: the base's, for what gives an earlier BERT export the types (``commands.pairs_fix``)."""
    if token_type_ids is None:
        return None
    try:
        given = np.asarray(token_type_ids)
    except STOPS:
        raise
    except Exception:
        raise InvalidInputError("token_type_ids must be an array of token types (batch, sequence)") from None
    given = given[None, :] if given.ndim == 1 else given
    if given.shape != ids.shape:
        raise InvalidInputError(f"token_type_ids has shape {list(given.shape)} but input_ids has {list(ids.shape)}; "
                                "they must match")
    if given.size and not np.issubdtype(given.dtype, np.integer):
        raise InvalidInputError(f"token_type_ids must be integers; got dtype {given.dtype}")
    lo, hi = (int(given.min()), int(given.max())) if given.size else (0, 0)
    if types is None and (lo or hi):
        raise InvalidInputError(
            f"{base_dir}: this export takes no token_type_ids (only a seq-cls export of a model with token types, "
            f"BERT's, does; for one exported before edgepeft served text pairs, {pairs_fix(manifest)}); pass none")
    if types is not None and (lo < 0 or hi >= types):
        raise InvalidInputError(f"token type {hi if hi >= types else lo} is outside the model's [0, {types}); give 0 for "
                                "a text's (or a pair's first) tokens, 1 for a pair's second")
    return None if types is None else np.ascontiguousarray(given.astype(np.int64, copy=False))


def generation_mask(ids: np.ndarray, mask: np.ndarray | None, pad: int | None, eos) -> np.ndarray:
    """The mask a decoder call generates with, left-padded rows with tokens only. ``mask`` None (none given): as
    transformers' generate infers it, the padding id's positions where the batch holds the padding id and that id
    ends no sequence (a padding id that is an eos could be a real token), else every position."""
    told = mask is None and pad is not None and pad not in eos and bool((ids == pad).any())
    if mask is None:
        mask = (ids != pad).astype(np.int64) if told else np.ones_like(ids)
    if (mask.sum(-1) == 0).any():
        raise InvalidInputError(f"an input_ids row is all padding ({pad}) and no attention_mask was given; pass the "
                                "attention_mask (rt.tokenizer.encode gives both)" if told else
                                "a prompt row has no tokens (its attention_mask is all 0)")
    right = (np.diff(mask, axis=1) < 0).any(axis=1)  # a 0 after a 1: the next tokens would follow padding
    if right.any():
        row = int(np.argmax(right))
        raise InvalidInputError(
            f"input_ids row {row} holds the padding id {pad} after a token and no attention_mask was given; pass one: "
            "ones where these are real tokens (ids that generate returned), else the mask that marks the padding "
            "(rt.tokenizer.encode gives it)" if told else
            f"attention_mask row {row} masks out some of its tokens (a 0 between 1s), which generation does not "
            "take; leave those tokens out of input_ids instead"  # (a hunt: "pad on the left" could not mend it)
            if mask[row, int(np.argmax(np.diff(mask[row]) < 0)) + 1:].any() else  # a 1 after the first 0 after a 1
            f"attention_mask row {row} has padding after its tokens; generation needs the padding on the left (a "
            "tokenizer's padding_side='left')")
    return mask


def step_tokens(token, batch: int, vocab_size: int) -> np.ndarray:
    """A decode step's tokens sent by the caller (``step_logits``): one id per row, as (B,) int64."""
    token = np.asarray(token)
    if token.shape != (batch,) or not np.issubdtype(token.dtype, np.integer):
        raise InvalidInputError(f"send one token id per row: an integer array of shape ({batch},), "
                                f"got {token.dtype}{list(token.shape)}")
    if token.min() < 0 or token.max() >= vocab_size:
        raise InvalidInputError(f"a token id is outside the vocabulary [0, {vocab_size})")
    return token.astype(np.int64, copy=False)


def tokenizer_ids_checked(rows: list, vocab_size: int | None, path: str, tokenizer) -> list:
    """``rows`` (token ids the export's tokenizer at ``path`` gave), where every id is one of the model's: a token
    added to the tokenizer and not to the model's embeddings was "outside the vocabulary; tokenize with the base
    model's tokenizer", which it was."""
    if vocab_size is not None and (top := max((max(row) for row in rows if row), default=-1)) >= vocab_size:
        raise ConfigError(f"{path}: gives {tokenizer.id_to_token(top)!r} the id {top}, past the model's {vocab_size} "
                          "embeddings (a token added to the tokenizer, not to the model); resize the model's embeddings "
                          "to the tokenizer (resize_token_embeddings), train and export again, or remove the token from "
                          "the tokenizer")
    return rows
