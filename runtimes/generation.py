"""Token selection for ``Runtime.generate``: HF transformers' logits processing in numpy.

Order and semantics follow transformers' ``generate``: the repetition penalty, no
repeated n-grams and the minimum lengths (eos held back) apply to greedy and sampled
decoding; temperature, top-k, top-p and min-p (in that order) apply only when sampling,
and greedy decoding ignores their values, as transformers does (stop strings and streamed text: ``decoded``).
"""
from __future__ import annotations

from collections.abc import Generator
from contextlib import closing
from dataclasses import dataclass, field, replace

import numpy as np

from .errors import ConfigError, InvalidInputError
from .access import OLDER_RECORDS, older_export
from .values import as_float, half_character, is_real, is_whole, switch


WHOLE_SETTINGS = ("max_new_tokens", "max_length", "min_new_tokens", "min_length", "top_k", "no_repeat_ngram_size", "seed",
                  "pad_token_id")
DEFAULT_NEW_TOKENS = 32  # when neither the call nor the model sets max_new_tokens or max_length


REPLACEMENT = "\ufffd"  # what the decoded text gives bytes that are no character


def recorded_stops(stop):
    """A model's recorded stop strings but those holding U+FFFD (exports now drop them with a note; an earlier export
    kept them, and every generate would refuse its defaults)."""
    if isinstance(stop, str):
        return [] if REPLACEMENT in stop else stop
    return [s for s in stop if not (isinstance(s, str) and REPLACEMENT in s)] if isinstance(stop, list) else stop


@dataclass
class GenerationConfig:
    max_new_tokens: int | None = DEFAULT_NEW_TOKENS  # None: per prompt (``for_prompt``)
    max_length: int | None = None  # prompt and new tokens, where max_new_tokens is None (transformers' meaning)
    min_new_tokens: int | None = None  # eos cannot come before this many new tokens
    min_length: int | None = None  # ... nor before the prompt and new tokens are this long (min_new_tokens wins)
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # transformers' default; 0 disables
    top_p: float = 1.0
    min_p: float | None = None  # sampling: drop tokens less likely than min_p x the likeliest
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # no n-gram of this size twice in a row (0: off)
    seed: int | None = None
    eos_token_id: list = field(default_factory=list)  # ints; empty: never stop early
    pad_token_id: int = 0
    stop: list = field(default_factory=list)  # strings; need the exported tokenizer

    def check(self, vocab_size: int) -> None:
        """Types always; the sampling values' ranges only when sampling (greedy ignores them, as transformers does)."""
        for name, least in (("max_new_tokens", 1), ("max_length", 1), ("min_new_tokens", 0), ("min_length", 0),
                            ("no_repeat_ngram_size", 0)):
            if (value := getattr(self, name)) is not None and (not is_whole(value) or value < least):
                raise ConfigError(f"{name} must be {'a positive integer' if least else 'an integer >= 0'}, got {value!r}")
        if self.min_p is not None and not is_real(self.min_p):
            raise ConfigError(f"min_p must be a finite number, got {self.min_p!r}")
        switch(self.do_sample, "do_sample")
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not is_real(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if not is_whole(self.top_k):
            raise ConfigError(f"top_k must be an integer, got {self.top_k!r}")
        if self.do_sample:
            if not self.temperature > 0:
                raise ConfigError(f"temperature must be > 0 when sampling, got {self.temperature!r} (greedy decoding: do_sample=False)")
            if self.top_k < 0:
                raise ConfigError(f"top_k must be >= 0 (0: off), got {self.top_k!r}")
            if not 0 <= self.top_p <= 1:
                raise ConfigError(f"top_p must be in [0, 1], got {self.top_p!r}")
            if self.min_p is not None and not 0 <= self.min_p <= 1:
                raise ConfigError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and not (is_whole(self.seed) and self.seed >= 0):
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        # compared with int64 ids: one in that range but outside [0, vocab) never matches, as in transformers
        if not all(is_whole(e) and -2**63 <= e < 2**63 for e in self.eos_token_id):
            raise ConfigError(f"eos_token_id must be token ids (64-bit integers), got {self.eos_token_id!r}")
        if not (is_whole(self.pad_token_id) and 0 <= self.pad_token_id < vocab_size):  # finished rows feed it back
            raise ConfigError(f"pad_token_id must be a token id in [0, {vocab_size}), got {self.pad_token_id!r}")
        if not (isinstance(self.stop, list) and all(isinstance(s, str) for s in self.stop)):
            raise ConfigError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if not all(self.stop):  # "" is found after any token: the first new token would end every row
            raise ConfigError(f"stop strings must not be empty, got {self.stop!r}; leave stop out to stop at eos only")
        if any(map(half_character, self.stop)):  # it never matched: no model's text holds one
            raise ConfigError(f"stop strings must be whole characters, got {self.stop!r} (half of one: bytes read in "
                              "another encoding than UTF-8); pass them as UTF-8 text")
        # generated bytes that are no character decode to U+FFFD: such a stop string matched them (transformers: not)
        if any(REPLACEMENT in s for s in self.stop):
            raise ConfigError(f"stop strings must not hold U+FFFD, got {self.stop!r}: text decodes bytes that are no "
                              "character to it (transformers matches bytes); stop at the characters around it")

    def for_prompt(self, length: int, room: int | None = None, fit: bool = False) -> "GenerationConfig":
        """This config for a prompt ``length`` tokens wide, as transformers sets the lengths: max_new_tokens from
        max_length (``fit``: the model's, at most the ``room``), else 32 at most the ``room`` the positions leave (at
        least 1); min_new_tokens replaces min_length."""
        cfg = self if self.min_new_tokens is None else replace(self, min_length=self.min_new_tokens + length)
        if cfg.max_new_tokens is not None:
            return cfg
        if cfg.max_length is None:  # transformers caps its default too: a long prompt was refused
            return replace(cfg, max_new_tokens=DEFAULT_NEW_TOKENS if room is None else max(1, min(DEFAULT_NEW_TOKENS, room)))
        if cfg.max_length <= length:  # transformers refuses it too
            raise ConfigError(f"max_length {cfg.max_length} (the call's, else the model's generation_config.json) "
                              f"leaves no new token after a {length}-token prompt; pass max_new_tokens")
        new = cfg.max_length - length  # a model's max_length of its context: a prompt adapter's tokens took the last
        return replace(cfg, max_new_tokens=max(1, min(new, room)) if fit and room is not None else new)  # positions


def apply_repetition_penalty(scores: np.ndarray, sequences: np.ndarray, penalty: float, ignore=None) -> np.ndarray:
    """Tokens already in the sequence: negative scores x penalty, positive / penalty.

    ``ignore`` (B,): leading positions of each row left out, as transformers leaves
    out a row's left padding.
    """
    if penalty == 1.0:
        return scores
    vocab = scores.shape[-1]
    if ignore is not None:  # point ignored positions at a dummy column past the vocabulary
        sequences = np.where(np.arange(sequences.shape[1])[None, :] < np.asarray(ignore)[:, None], vocab, sequences)
    padded = np.concatenate([scores, np.zeros((scores.shape[0], 1), scores.dtype)], axis=1)
    picked = np.take_along_axis(padded, sequences, axis=1)  # (B, L)
    picked = np.where(picked < 0, picked * penalty, picked / penalty)
    np.put_along_axis(padded, sequences, picked, axis=1)
    return padded[:, :vocab]


def apply_no_repeat_ngram(scores: np.ndarray, sequences: np.ndarray, n: int) -> np.ndarray:
    """Tokens that would complete an n-gram the row already holds get -inf (its prompt and padding included, as
    transformers' NoRepeatNGramLogitsProcessor reads the whole row)."""
    if n <= 0 or sequences.shape[1] < n:
        return scores
    grams = np.lib.stride_tricks.sliding_window_view(sequences, n, axis=1)  # (B, L-n+1, n)
    tail = sequences[:, sequences.shape[1] - n + 1:]  # the last n-1 tokens: what a new token would complete
    rows, starts = np.nonzero((grams[:, :, :-1] == tail[:, None, :]).all(-1))
    out = scores.copy()
    out[rows, grams[rows, starts, -1]] = -np.inf
    return out


def hold_back_eos(scores: np.ndarray, sequences: np.ndarray, cfg: GenerationConfig, prompt_length: int) -> np.ndarray:
    """eos gets -inf before min_new_tokens new tokens, or while the rows are shorter than min_length (transformers'
    MinNewTokensLength and MinLength processors; the rows' width counts, padding included)."""
    if sequences.shape[1] - prompt_length >= (cfg.min_new_tokens or 0) and sequences.shape[1] >= (cfg.min_length or 0):
        return scores
    eos = [e for e in cfg.eos_token_id if 0 <= e < scores.shape[-1]]
    out = scores.copy()
    out[:, eos] = -np.inf
    return out


def apply_min_p(scores: np.ndarray, p: float | None) -> np.ndarray:
    """Drop tokens whose probability is below ``p`` x the likeliest token's (which stays)."""
    if not p:
        return scores
    probs = softmax(scores)
    return np.where(probs < p * probs.max(-1, keepdims=True), -np.inf, scores)


def apply_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = np.partition(scores, -k, axis=-1)[:, -k][:, None]  # (B, 1): the k-th largest
    return np.where(scores < kth, -np.inf, scores)


def apply_top_p(scores: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of tokens whose probability reaches ``p`` (at least one)."""
    if p >= 1.0:
        return scores
    order = np.argsort(scores, axis=-1, kind="stable")  # ascending, as transformers sorts
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    probs = softmax(sorted_scores)
    # summed in double, each sum rounded to float32, as torch sums float32 (a float32 sum drifts: 0.8000000715)
    remove_sorted = np.cumsum(probs, axis=-1, dtype=np.float64).astype(np.float32) <= np.float32(1 - p)
    remove_sorted[:, -1] = False  # keep the most likely token
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, scores)


def softmax(x: np.ndarray) -> np.ndarray:
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def processed_scores(logits: np.ndarray, sequences: np.ndarray, cfg: GenerationConfig, ignore=None,
                     prompt_length: int | None = None) -> np.ndarray:
    """The scores (B, V) the next tokens are chosen from: greedy, their argmax; sampling, a draw from their softmax.

    ``ignore`` (B,): each row's left-padding length, left out of the repetition penalty. ``prompt_length``: the
    prompt's width in ``sequences`` (None: all of it), for min_new_tokens.
    """
    scores = apply_repetition_penalty(logits.astype(np.float32, copy=False), sequences, cfg.repetition_penalty, ignore)
    scores = apply_no_repeat_ngram(scores, sequences, cfg.no_repeat_ngram_size)
    if cfg.min_new_tokens or cfg.min_length:
        scores = hold_back_eos(scores, sequences, cfg, sequences.shape[1] if prompt_length is None else prompt_length)
    if not cfg.do_sample:
        return scores
    scores = scores / np.float32(cfg.temperature)  # float32, as transformers divides
    return apply_min_p(apply_top_p(apply_top_k(scores, cfg.top_k), cfg.top_p), cfg.min_p)


def next_tokens(logits: np.ndarray, sequences: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator,
                ignore=None, prompt_length: int | None = None) -> np.ndarray:
    """Pick one token per row from last-position ``logits`` (B, V); returns (B,) int64 (``processed_scores``)."""
    with np.errstate(all="ignore"):  # a temperature too small for float32 makes infinities: refused below, once
        scores = processed_scores(logits, sequences, cfg, ignore, prompt_length)
        if not cfg.do_sample:
            return scores.argmax(-1).astype(np.int64)
        probs = softmax(scores.astype(np.float64))
    if not np.isfinite(probs).all():  # transformers refuses to sample these too
        far = cfg.repetition_penalty != 1  # it divides or multiplies scores too (1e-40, 1e40: infinities)
        raise InvalidInputError(f"cannot sample: the scores are not finite (NaN or infinite logits, or temperature "
                                f"{cfg.temperature!r} too small for float32" + (f", or repetition_penalty "
                                f"{cfg.repetition_penalty!r} too far from 1" * far) + "); raise the temperature"
                                + (", bring repetition_penalty nearer to 1," * far) + " or use greedy decoding")
    u = rng.random((probs.shape[0], 1))
    # Rounding can leave the cumulative sum just under u: never fall through to a removed token.
    last = probs.shape[-1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=-1)
    return np.minimum((probs.cumsum(-1) < u).sum(-1), last).astype(np.int64)


# ---------------------------------------------------------------------- the decode loop
def generation_config(rt, generation: dict) -> GenerationConfig:
    """``generate``'s keyword arguments checked and completed as transformers completes them: the model's sampling
    settings, end-of-sequence and padding ids where the call leaves them unset."""
    known = set(GenerationConfig.__dataclass_fields__)
    unknown = sorted(set(generation) - known)
    if unknown:
        raise ConfigError(f"unknown generation argument(s) {', '.join(unknown)}; use {', '.join(sorted(known))}")
    # unset (None): the model's generation_config.json (recorded at export), then transformers' defaults
    older_export(rt.base_dir, rt.manifest, *OLDER_RECORDS["causal-lm"])
    model = {k: v for k, v in (rt.manifest.get("generation") or {}).items() if k in known}
    if "stop" in model:  # an export before the check below
        model["stop"] = recorded_stops(model["stop"])
    args = {**model, **{k: as_float(v) for k, v in generation.items() if v is not None}}
    args.setdefault("max_new_tokens", None)  # per prompt (for_prompt): max_length's, else the default
    eos = args.pop("eos_token_id", rt.manifest.get("eos_token_id") or [])
    eos = list(np.ravel(eos)) if isinstance(eos, np.ndarray) else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if not all(is_whole(e) for e in eos):  # before one of them becomes the padding id
        raise ConfigError(f"eos_token_id must be a token id or a list of token ids (integers), got {eos!r}")
    args["eos_token_id"] = eos
    if "pad_token_id" not in args:  # the model's, when it is a token id (some configs say -1), else the first eos
        args["pad_token_id"] = rt.pad_id_or(args["eos_token_id"])
    stop = [] if args.get("stop") is None else args["stop"]
    args["stop"] = [stop] if isinstance(stop, str) else list(stop) if isinstance(stop, (list, tuple)) else stop
    cfg = GenerationConfig(**args)
    cfg.check(rt.vocab_size)
    # as Python ints: a numpy uint8 max_new_tokens wrapped in the length check's sum (255 + 4 -> 3)
    whole = {k: int(getattr(cfg, k)) for k in WHOLE_SETTINGS if getattr(cfg, k) is not None}
    return replace(cfg, **whole, eos_token_id=[int(e) for e in cfg.eos_token_id])


SHORTEN = "shorten the prompt"  # the fix of a call past the positions (Runtime._check_length)


def length_words(generation: dict) -> tuple[str, str]:
    """(where the call's max_new_tokens came from, the fix) where a generation runs past the positions: its own, and
    shorten the prompt or lower max_new_tokens; or where the call gave max_length alone, whose total the prompt's
    length cancels out of (it was told to shorten the prompt or lower a max_new_tokens it never gave), the max_length
    that fits (``{fits}``: ``Runtime._check_length`` fills it in)."""
    if generation.get("max_new_tokens") is None and (given := generation.get("max_length")) is not None:
        return f" (max_length {given} less the prompt)", "pass max_length {fits} or less"
    return "", SHORTEN + " or lower max_new_tokens"


def length_source(rt, generation: dict) -> str:
    """Where max_new_tokens came from when the call gave no length, for messages: "" (the call's), the model's
    generation_config.json, or the default."""
    if any(generation.get(k) is not None for k in ("max_new_tokens", "max_length")):
        return ""
    model = rt.manifest.get("generation") or {}
    return " (generation_config.json's)" if {"max_new_tokens", "max_length"} & set(model) else " (the default)"


def decode_steps(rt, plan, ids: np.ndarray, mask: np.ndarray):
    """Prefill, then one cached step per token sent in: yields each step's last-position logits (B, V).

    ``steps.send(tokens)`` ((B,) int64) runs the next step. The KV cache stays in OrtValues:
    each step's ``present.*`` outputs are bound as the next step's ``past_key_values.*``, or on
    GroupQueryAttention graphs one buffer per cache input is both (``kv_cache.py``).
    """
    from .kv_cache import FixedCache  # ONNX Runtime's: the settings above serve an install without it (manifests)
    full, positions = rt.virtual_inputs(plan, mask, generate=True)
    binding = rt.slot_binding(plan)
    outputs = rt.run(plan, ids, full, positions, None, presents=True, binding=binding, keep_last=True)
    for name in plan.prefill:  # decode steps add no virtual tokens
        binding.bind_ortvalue_input(name, rt.neutral[name])
    cache = FixedCache(rt, outputs) if rt.contrib else None
    while True:
        token = yield outputs[0].numpy()[:, -1, :].copy()  # the fixed cache's logits buffer is reused
        full = np.concatenate([full, np.ones_like(token)[:, None]], axis=1)
        positions = positions[:, -1:] + 1
        past = cache or outputs[1:]
        outputs = rt.run(plan, token[:, None], full, positions, past, presents=cache is None, binding=binding)


def lane_steps(rt, lanes, ids: np.ndarray, mask: np.ndarray):
    """``decode_steps`` for every lane of a mixed batch, in lockstep: yields (B, V) logits in row order and takes
    (B,) tokens, each lane stepping its own rows with its own cache."""
    if len(lanes) == 1:
        yield from decode_steps(rt, lanes[0].plan, ids, mask)
        return
    steps = [decode_steps(rt, lane.plan, ids[lane.rows], mask[lane.rows]) for lane in lanes]
    parts = [next(s) for s in steps]
    while True:
        logits = np.empty((ids.shape[0], parts[0].shape[-1]), parts[0].dtype)  # a new array each step: the caller's
        for lane, part in zip(lanes, parts):
            logits[lane.rows] = part
        token = yield logits
        parts = [s.send(token[lane.rows]) for lane, s in zip(lanes, steps)]


def stream_tokens(rt, ids, mask, padding, adapter, cfg: GenerationConfig, stops, words):
    """Yield each step's new token per row, (B,) int64, stopping rows at eos or a stop string; return each row's count
    of new tokens with the one that ended it. ``words``: the length check, run again once held (``Runtime.lanes``)."""
    rng, eos = np.random.default_rng(cfg.seed), np.array(cfg.eos_token_id, dtype=np.int64)
    finished, ends = np.zeros(ids.shape[0], dtype=bool), np.zeros(ids.shape[0], dtype=np.int64)
    grown = np.empty((ids.shape[0], ids.shape[1] + min(cfg.max_new_tokens, 256)), np.int64)  # not a copy per step
    grown[:, :ids.shape[1]], sequences = ids, ids
    with rt.lanes(adapter, *ids.shape, cfg.max_new_tokens - 1, words) as lanes:
        steps = lane_steps(rt, lanes, ids, mask)
        logits = next(steps)
        for step in range(cfg.max_new_tokens):
            token = next_tokens(logits, sequences, cfg, rng, ignore=padding, prompt_length=ids.shape[1])
            token = np.where(finished, cfg.pad_token_id, token)
            if ids.shape[1] + step == grown.shape[1]:  # doubled when full
                grown = np.concatenate([grown, np.empty_like(grown)], axis=1)
            grown[:, ids.shape[1] + step] = token
            sequences = grown[:, :ids.shape[1] + step + 1]
            yield token.copy()  # the caller's: an edit of it was fed to the model (transformers feeds its own ids)
            ends += ~finished  # this token counts for each row it did not end before
            finished |= np.isin(token, eos)
            if stops is not None:
                finished |= stops.hit(sequences, finished)
            if finished.all() or step + 1 == cfg.max_new_tokens:
                return ends
            logits = steps.send(token)


def drained(steps) -> tuple[list, object]:
    """Every token a stream yields and what it returns, the stream closed however this ends: an interrupt between
    two steps, its exception kept (as a REPL keeps it), kept the stream and its adapters held (a hunt)."""
    tokens = []
    with closing(steps):
        while True:
            try:
                tokens.append(next(steps))
            except StopIteration as done:
                return tokens, done.value


class TeacherForcing(Generator):
    """What ``Runtime.step_logits`` returns: a generator over the decode loop ``steps``. ``check(token, sent)`` refuses
    a sent token before it reaches the loop, so a refused one (an ``InvalidInputError``) leaves the session, its
    prefill and its cache usable for a corrected ``send``."""

    def __init__(self, steps, check):
        self._steps, self._check, self._sent = steps, check, None

    def send(self, token):
        if self._sent == -1:  # closed: as a generator that finished (next() again said to send tokens)
            raise StopIteration
        if self._sent is None:  # the prefill: takes no token, as a just-started generator
            if token is not None:  # Python's own TypeError told nothing of step_logits
                raise InvalidInputError("step_logits: call next() first (it runs the prefill and returns its logits), "
                                        "then send each token")
            out = self._steps.send(token)
            self._sent = 0
            return out
        if token is None:  # next() again, a for loop: the message said "got object[]"
            raise InvalidInputError("step_logits: next() runs the prefill only; send each decode step's tokens "
                                    "(one id per row) with send(tokens)")
        token = self._check(token, self._sent + 1)
        out = self._steps.send(token)
        self._sent += 1
        return out

    def throw(self, *error):
        return self._steps.throw(*error)

    def close(self) -> None:
        self._steps.close()
        self._sent = -1
