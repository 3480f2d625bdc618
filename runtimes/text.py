"""Text in and out: the tokenizer exported with the base, and the Runtime's text calls built on it.

    generate_text / stream_text   prompt(s) or chat messages -> new text (stop strings end rows)
    classify (classify.py)        text(s) or text pairs -> label and probabilities (seq-cls exports)
    embed                         text(s) -> mean-pooled, normalized embeddings (feature-extraction exports)

Optional: ``tokenizers`` (and ``jinja2`` for chat templates) are imported only when
text helpers are used, so an app that feeds token ids needs neither.
"""
from __future__ import annotations

import copy
import functools
import json
import os

import numpy as np

from . import chat_template
from .access import OLDER_RECORDS, check_readable, older_export, present, read_json, read_text
from .errors import ArtifactNotFoundError, ConfigError, CorruptArtifactError, InvalidInputError, first_line
from .errors import STOPS, MissingDependencyError, raise_if_stopped
from .decoded import GrowingText, OpenBytes
from .generation import drained
from .inputs import tokenizer_ids_checked
from .values import HALF_CHARACTER, half_character, is_whole, switch
from .mixing import BATCH, holding, in_batches, in_groups, row_adapters, row_specs
from .sentence import (TOKENIZER_FIX as _FIX, chosen_prompt, lowercase_first, pool, row_limits, unit,
                       sentence_transformers_settings)


def _tidied(text: str) -> str:
    """transformers' clean_up_tokenization: no space before punctuation, English contractions joined."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


def _content(token):
    """A special token's text: as written, or an AddedToken's ``content``."""
    return token.get("content") if isinstance(token, dict) else token


class TextTokenizer:
    """``tokenizer.json`` plus ``tokenizer_config.json`` (special tokens, chat template)."""

    def __init__(self, base_dir: str, padding_side: str = "left", pad_id: int = 0, max_positions: int | None = None,
                 pairs: bool = False, vocab_size: int | None = None):
        """``pairs``: the export classifies text pairs (a seq-cls one): the pair template is checked too.
        ``vocab_size``: the model's; a token past it is named (``_in_vocabulary``)."""
        path = os.path.join(base_dir, "tokenizer.json")
        if not present(path):
            check_readable(path)
            raise ArtifactNotFoundError(
                f"{path}: missing (the export has no tokenizer, or the file was removed); copy the export's base folder "
                "again, or pass token ids, or export from a base folder that has tokenizer.json into a fresh --out folder"
            )
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise_if_stopped(e)
            raise MissingDependencyError("text helpers need the `tokenizers` package: pip install tokenizers") from None
        try:
            self._tok = Tokenizer.from_file(path)
        except STOPS:
            raise
        except Exception as e:  # tokenizers raises a bare Exception for a bad file
            check_readable(path)
            raise CorruptArtifactError(f"{path}: not a tokenizer the `tokenizers` package can read ({e}); {_FIX}") from None
        try:  # a post-processor naming a token the file lacks panics at every encode (the library's PanicException)
            self._tok.encode("a", "b" if pairs else None)  # one text, and a pair's template where classify takes pairs
        except (KeyboardInterrupt, SystemExit, *STOPS):
            raise
        except BaseException as e:
            raise CorruptArtifactError(f"{path}: the `tokenizers` package cannot encode with it ({first_line(e)}); {_FIX}") from None
        self.base_dir, self.vocab_size = base_dir, vocab_size
        self.max_positions = max_positions  # the model's: caps a text's length in embed
        self._tok.no_padding()  # we pad ourselves
        self.padding_side = padding_side
        self.pad_id = pad_id
        self._tok.no_truncation()  # too-long prompts get a clear error, not a silent cut
        config_path = os.path.join(base_dir, "tokenizer_config.json")
        self.config = read_json(config_path, "tokenizer config", _FIX, optional=True)
        # as transformers: special-token text in a prompt is plain text (a defence against prompt injection)
        self._tok.encode_special_tokens = self.config.get("split_special_tokens") is True
        added = self._tok.get_added_tokens_decoder()  # special: transformers' all_special_ids (embed's prompt length)
        self.special_ids, special = {i for i, t in added.items() if t.special}, {t.content for t in added.values() if t.special}
        self.skipped_ids = {i for i in added if self._tok.id_to_token(i) in special}  # decode's, as Rust's: "▁<|User|>" kept
        # decoded text tidied (" ," -> ",") as transformers tidies it: where the config asks, never for BPE unless told
        self._tidy = self.config.get("clean_up_tokenization_spaces") is True and (type(self._tok.model).__name__ != "BPE"
            or self.config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output") is True)
        self.truncation_side = self.config.get("truncation_side") or "right"  # which end a cut text loses
        if self.truncation_side not in ("left", "right"):
            raise CorruptArtifactError(f"{config_path}: truncation_side must be 'left' or 'right', got "
                                       f"{self.truncation_side!r}; {_FIX}")
        map_path = os.path.join(base_dir, "special_tokens_map.json")  # older tokenizers name their tokens there
        self.special_map = read_json(map_path, "special tokens map", _FIX, optional=True)
        template_path = os.path.join(base_dir, "chat_template.jinja")
        self.template_source = config_path
        self.chat_template = self.config.get("chat_template")  # several, by name: the default taken when used
        self._template = None  # compiled on first use
        if present(template_path):
            self.chat_template, self.template_source = read_text(template_path, _FIX), template_path

    @functools.cached_property
    def sentence_transformers(self) -> tuple:
        """(``sentence.Embedding`` settings, the tokenizer ``embed`` encodes with: this one, or a copy that
        lower-cases first, as sentence-transformers' do_lower_case): read once per Runtime, not per ``embed`` call."""
        settings = sentence_transformers_settings(self.base_dir, self.max_positions)
        if not settings.lower:
            return settings, self
        lowered = copy.copy(self)
        lowered._tok = type(self._tok).from_str(self._tok.to_str())
        lowered._tok.encode_special_tokens = self._tok.encode_special_tokens  # to_str does not carry it
        lowercase_first(lowered._tok)
        return settings, lowered

    @functools.cached_property
    def special_tokens(self) -> dict:
        """{bos_token: text, ...}: the named special tokens a chat template sees, as transformers 5 gives them: every
        ``*_token`` the config names (Gemma's ``image_token``, ``boi_token``, ...; as transformers saves them) and an
        ``extra_special_tokens`` dict's, special_tokens_map.json's first."""
        named = {}
        for source in (self.config, self.special_map):
            extra = source.get("extra_special_tokens")
            named.update({k: _content(v) for k, v in extra.items()} if isinstance(extra, dict) else {})
            named.update({k: _content(v) for k, v in source.items() if k.endswith("_token")})
        return {k: v for k, v in named.items() if isinstance(v, str)}

    def behaviour(self) -> tuple:
        """What this tokenizer does (rules and vocabulary, special tokens, chat template), for telling two apart."""
        return json.loads(self._tok.to_str()), self._tok.encode_special_tokens, self._tidy, self.special_tokens, \
            self.chat_template

    def encode(self, texts, add_special_tokens: bool = True, pad_id: int | None = None,
               padding_side: str | None = None, max_length: int | None = None,
               text_pair=None) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)`` for a text or a list of texts: padded, (B, T) int64 each.

        Left padding for generation (new tokens follow every row's last real token); right padding otherwise, so
        encoders' absolute positions start at 0 in every row. ``pad_id`` defaults to the model's padding token.
        ``max_length``: longer texts are cut to it, their special tokens kept, at the tokenizer config's
        ``truncation_side`` (transformers' ``truncation=True``); None: no text is cut."""
        if text_pair is not None:  # transformers' spelling: its pairs' types need encode_pairs' third array
            raise ConfigError("encode takes no text_pair; encode text pairs with encode_pairs(texts, text_pairs), which "
                              "returns their token_type_ids too")
        add_special_tokens = switch(add_special_tokens, "add_special_tokens", " (text pairs: encode_pairs)")
        if max_length is not None and not is_whole(max_length):  # a TypeError from the tokenizers package
            raise ConfigError(f"max_length must be a whole number of tokens (None: no cut), got {max_length!r}")
        pad_id, side = self._padding(pad_id, padding_side)
        rows = [self._cut(t, add_special_tokens, max_length).ids if max_length is not None else
                self._tok.encode(t, add_special_tokens=add_special_tokens).ids for t in _text_list(texts, "encode")]
        return _padded(self._in_vocabulary(rows), None, pad_id, side)[:2]

    def encode_pairs(self, texts, text_pairs, pad_id: int | None = None, padding_side: str | None = None,
                     max_length: int | None = None, add_special_tokens: bool = True) -> tuple[np.ndarray, ...]:
        """``(input_ids, attention_mask, token_type_ids)`` for texts and their pairs joined by the tokenizer's pair template
        ([CLS] a [SEP] b [SEP] for BERT) as transformers' ``tokenizer(texts, text_pair=text_pairs)`` (a pair None,
        ``text_pairs`` None, or one text's pair "" as its one-text call: the text alone): the template's types (a BERT
        pair's second text 1), padded with 0 as ``encode`` pads. ``max_length``: each row cut to it as transformers'
        ``truncation=True`` cuts (a pair longest first); None: no cut. ``add_special_tokens=False``: typed 0 and 1."""
        add_special_tokens = switch(add_special_tokens, "add_special_tokens")
        if max_length is not None and not is_whole(max_length):
            raise ConfigError(f"max_length must be a whole number of tokens (None: no cut), got {max_length!r}")
        pad_id, side = self._padding(pad_id, padding_side)
        texts = _text_list(texts, "encode_pairs")
        pairs = [text_pairs or None] if isinstance(text_pairs, str) else [None] * len(texts) if text_pairs is None else text_pairs
        if not isinstance(pairs, (list, tuple)) or len(pairs) != len(texts):
            raise InvalidInputError(f"encode_pairs takes one pair (a text, or None) per text: {len(texts)} text(s), "
                                    f"got {type(text_pairs).__name__} {text_pairs!r:.60}")
        for p in pairs:
            if p is not None and not isinstance(p, str):
                raise InvalidInputError(f"encode_pairs takes a text (a string) or None per pair, got {type(p).__name__}")
            _text_list(p or "", "encode_pairs")  # half characters
        encoded = [self._tok.encode(t, p, add_special_tokens=add_special_tokens) if max_length is None else
                   self._cut(t, add_special_tokens, max_length, p) for t, p in zip(texts, pairs)]
        return _padded(self._in_vocabulary([e.ids for e in encoded]), [e.type_ids for e in encoded], pad_id, side)

    def _in_vocabulary(self, rows: list) -> list:
        return tokenizer_ids_checked(rows, self.vocab_size, os.path.join(self.base_dir, "tokenizer.json"), self._tok)

    def _padding(self, pad_id, padding_side) -> tuple[int, str]:
        pad_id = self.pad_id if pad_id is None else pad_id
        if not (is_whole(pad_id) and 0 <= pad_id < 2**63):  # numpy's ValueError; NaN became -2**63
            raise ConfigError(f"pad_id must be a token id (a whole number >= 0), got {pad_id!r}")
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {side!r}")
        return pad_id, side

    def _cut(self, text: str, add_special_tokens: bool, max_length: int, pair: str | None = None):
        """The encoding of ``text`` (and its ``pair``) cut to ``max_length`` tokens, special tokens kept, at the config's
        truncation side; a pair as transformers' ``truncation=True`` cuts one (the Rust library's longest first)."""
        first = self._tok.encode(text, add_special_tokens=False)
        second = None if pair is None else self._tok.encode(pair, add_special_tokens=False)
        special = self._tok.num_special_tokens_to_add(second is not None) if add_special_tokens else 0
        if max_length < special:
            raise ConfigError(f"max_length {max_length} is less than the {special} special tokens every text gets; "
                              "raise it")
        room, n1, n2 = max_length - special, len(first.ids), 0 if second is None else len(second.ids)
        if n1 + n2 > room:  # a pair's shorter text kept where it fits in half the room, the longer cut to the rest
            keep = min(n1, n2, room // 2) if second is not None else 0
            n1, n2 = (keep, room - keep) if second is not None and n1 <= n2 else (room - keep, keep)
            first.truncate(n1, direction=self.truncation_side)  # truncate's OverflowError past 2**64: not reached
            if second is not None:
                second.truncate(n2, direction=self.truncation_side)
        return self._tok.post_process(first, second, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = True, tidy: bool = True) -> str:
        """The text of ``ids``; ``tidy``: as transformers' decode (clean_up_tokenization_spaces where the config asks),
        False: the tokens' text as it is (transformers' stop strings read that)."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):  # int() read 5.7 as 5; transformers refuses
            raise InvalidInputError(f"decode takes one sequence of token ids (integers), got {ids.tolist()!r:.80}")
        skip, tidy = switch(skip_special_tokens, "skip_special_tokens"), switch(tidy, "tidy")
        try:
            text = self._tok.decode(ids.tolist(), skip_special_tokens=skip)
        except OverflowError:  # the tokenizers package's word for an id < 0 or >= 2**32
            raise InvalidInputError(f"decode takes token ids from 0 to 2**32 - 1, got {ids.tolist()!r:.80}") from None
        return _tidied(text) if self._tidy and tidy else text

    def byte_of(self, i) -> int | None:
        """The byte a byte-fallback token (``<0x0A>``: Llama-2, Mistral) stands for, else None."""
        token = self._tok.id_to_token(int(i)) or ""
        hexa = token[3:5] if len(token) == 6 and token.startswith("<0x") and token.endswith(">") else ""
        return int(hexa, 16) if hexa and all(c in "0123456789abcdefABCDEF" for c in hexa) else None

    @functools.cached_property
    def rewrites(self) -> bool:
        """Whether more tokens can change text already decoded (not only add to it): the config's tidying, or a
        decoder that cleans up as it joins (BERT's WordPiece decoder, ``cleanup``): " '" becomes "'s" with an "s"."""
        def cleans(part) -> bool:
            if isinstance(part, dict):
                return part.get("cleanup") is True or any(cleans(v) for v in part.values())
            return isinstance(part, list) and any(cleans(v) for v in part)
        return self._tidy or cleans(json.loads(self._tok.to_str()).get("decoder"))

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True,
                            continue_final_message: bool | None = False) -> str:
        if continue_final_message is not None and switch(continue_final_message, "continue_final_message") and \
                switch(add_generation_prompt, "add_generation_prompt"):  # as transformers refuses both
            raise ConfigError("continue_final_message and add_generation_prompt cannot both be True: the first ends "
                              "the text inside the last message, the second after it; pass add_generation_prompt=False")
        if self._template is None:  # compiled once; a missing template or jinja2 fails here with a ConfigError
            self._template = chat_template.compile_template(
                chat_template.default_template(self.chat_template, self.template_source), self.template_source)
        return chat_template.render(self._template, self.template_source, messages, add_generation_prompt,
                                    self.special_tokens, continue_final_message)


# ---------------------------------------------------------------------- the Runtime's text calls
def _text_list(texts, call: str) -> list:
    """A text or a list of texts as a list of whole-character strings, or InvalidInputError."""
    if not isinstance(texts, (str, list, tuple)):  # bytes read as ints, a set in hash order, a dict by its keys
        raise InvalidInputError(f"{call} takes a text or a list of texts (strings), got {type(texts).__name__}")
    texts = [texts] if isinstance(texts, str) else list(texts)
    for text in texts:  # the tokenizers package's TypeError said "TextInputSequence must be str"
        if not isinstance(text, str):
            raise InvalidInputError(f"{call} takes a text or a list of texts (strings), got {type(text).__name__}")
        if half_character(text):
            raise InvalidInputError(f"text {text[:40]!r} {HALF_CHARACTER}")
    return texts


def _padded(rows: list, types: list | None, pad_id: int, side: str) -> tuple:
    """(ids, mask, token types or None) (B, T) int64 from each row's ids (and types, padded with 0), on ``side``."""
    width = max(map(len, rows)) if rows else 0
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    kinds = None if types is None else np.zeros_like(mask)
    for i, r in enumerate(rows):  # a row of no tokens stays padding
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols], mask[i, cols] = r, 1
        if kinds is not None:
            kinds[i, cols] = types[i]
    return ids, mask, kinds


def prompt_ids(rt, prompt, chat: bool):
    """(ids, mask, single): the prompt(s) tokenized, left-padded; ``single``: one prompt, not a list of them."""
    chat = switch(chat, "chat")
    # chat messages as a list or a tuple (transformers' apply_chat_template takes both), or a list of those
    single = isinstance(prompt, str) or (chat and isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict))
    if not (single or (isinstance(prompt, (list, tuple)) and prompt
                       and all(isinstance(p, (list, tuple) if chat and not isinstance(p, str) else str) for p in prompt))):
        raise InvalidInputError(f"prompt must be a string or a non-empty list of strings{' or of chat messages' if chat else ''}; "
                                f"got {type(prompt).__name__}")
    tok = rt.tokenizer
    prompts = [prompt] if single else list(prompt)
    if chat:
        texts = [tok.apply_chat_template(list(p) if isinstance(p, (list, tuple)) else [{"role": "user", "content": p}],
                                         continue_final_message=None) for p in prompts]  # as the pipeline
        ids, mask = tok.encode(texts, add_special_tokens=False, padding_side="left")
    else:
        ids, mask = tok.encode(prompts, padding_side="left")
    if ids.size == 0 or (mask.sum(-1) == 0).any():
        raise InvalidInputError("a prompt is empty (it has no tokens); give some text")
    return ids, mask, single


def stream_text(rt, prompt, adapter=None, chat: bool = False, **generation):
    """Yield the generated text piece by piece for one prompt (pieces end on whole characters). The prompt is read
    and the call checked at the call, as ``stream``'s (a chat history edited before the first ``next()`` was used)."""
    ids, mask, _ = prompt_ids(rt, prompt, chat)
    if ids.shape[0] != 1:
        raise ConfigError("stream_text takes one prompt; use generate_text for a batch")
    return _pieces(rt.tokenizer, rt.stream(ids, mask, adapter, **generation))


def _pieces(tok, tokens):  # stream_text's pieces of the stream ``tokens``
    new, shown = [], ""
    # decoding that rewrites text (" ," -> ",", " n" + "'t" -> "n't") may still change the last characters: they wait
    hold = 8 if tok.rewrites else 0  # (a rewrite reaches at most this far back, chained ones included)
    text_of, open_bytes = GrowingText(tok), OpenBytes(tok)
    for token in tokens:
        new.append(int(token[0]))
        settled = text_of(new, len(new) - open_bytes(new[-1]))  # an open run of byte tokens may change
        settled = settled[:max(len(settled) - hold, 0)]
        if settled.startswith(shown) and len(settled) > len(shown) and not settled.endswith("\ufffd"):
            yield settled[len(shown):]
            shown = settled
    text = tok.decode(new)
    if text.startswith(shown) and len(text) > len(shown):  # held back: a character or byte run open at the end
        yield text[len(shown):]


def generate_text(rt, prompt, adapter=None, chat: bool = False, **generation):
    """Generated text (without the prompt) for a prompt or a list of prompts."""
    ids, mask, single = prompt_ids(rt, prompt, chat)
    # the stream returns where each row ended (its eos, a stop string): a row that ended before the others is filled
    tokens, ends = drained(rt.stream(ids, mask, adapter, **generation))  # with the padding id, which decode may keep
    new = np.stack(tokens, axis=1)
    texts = [rt.tokenizer.decode(row[:end]) for row, end in zip(new, ends)]
    return texts[0] if single else texts


def _texts(texts) -> tuple[list, bool]:
    single = isinstance(texts, str)
    if not (single or (isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts))):
        pairs = isinstance(texts, dict) or isinstance(texts, (list, tuple)) and any(isinstance(t, (list, tuple, dict))
                                                                                    for t in texts)
        raise InvalidInputError(f"give a text or a non-empty list of texts; got {type(texts).__name__}" + (
            "; text pairs are classify's (a cross-encoder's: a seq-cls export), not embed's" * pairs))
    return ([texts] if single else list(texts)), single


def token_counts(rows: list, mask: np.ndarray) -> list:
    """Each text's tokens; a text of none is refused (transformers' pipeline refuses it): in a batch a classifier's head
    or the pooling read its padding, a label or an embedding for no text."""
    lengths = mask.sum(-1).tolist()
    if 0 in lengths:
        raise InvalidInputError(f"text {rows[lengths.index(0)]!r:.60} has no tokens (this model's tokenizer adds none "
                                "of its own); give text the vocabulary holds")
    return lengths


def embed(rt, texts, adapter=None, normalize: bool = True, prompt_name=None, prompt=None) -> np.ndarray:
    """(B, hidden) float32 ((hidden,) for one text), L2-normalized: as sentence-transformers' encode, texts cut to
    ``max_seq_length``, pooled by ``1_Pooling/config.json``'s mode (else the mean: sentence.py), ``prompt`` (or the model's
    ``prompt_name``) before each (out of the pooling where ``include_prompt`` is false), ``truncate_dim`` values kept; a
    prompt adapter's virtual tokens out of the pooling, texts cut further where the positions leave no room."""
    if rt.task != "feature-extraction":
        raise ConfigError(f"{rt.base_dir}: a {rt.task} export gives no embeddings; export a feature-extraction adapter")
    older_export(rt.base_dir, rt.manifest, *OLDER_RECORDS[rt.task])  # before edgepeft copied the pooling settings
    rows, single, normalize = *_texts(texts), switch(normalize, "normalize")
    settings, tokenizer = rt.tokenizer.sentence_transformers
    prompt = chosen_prompt(settings, rt.base_dir, prompt_name, prompt)
    skip = 0  # tokens at each row's start left out of the pooling: the prompt's, as encode measures it
    if prompt:
        rows = [prompt + row for row in rows]
        ids = tokenizer.encode(prompt, max_length=settings.limit)[0][0].tolist()
        skip = 0 if settings.include_prompt else len(ids) - (bool(ids) and ids[-1] in tokenizer.special_ids)
    with holding(rt.store, rt.mixer, adapter, row_specs(adapter, len(rows))):  # for every batch: not reloaded between
        pooled = _embedded(rt, rows, adapter, normalize and settings.normalized, skip)  # as the Normalize module
    pooled = pooled[:, :settings.truncate_dim]  # after that, as encode truncates
    if normalize and not settings.normalized:  # after the cut, as encode(normalize_embeddings=True): before it, the
        pooled = unit(pooled)  # values matched neither that nor encode() (a model without Normalize, with truncate_dim)
    return pooled[0] if single else pooled


def _embedded(rt, rows: list, adapter, normalize: bool, skip: int) -> np.ndarray:
    settings, tokenizer = rt.tokenizer.sentence_transformers
    per_row = row_adapters(adapter, len(rows))
    limits = row_limits(rt, adapter, per_row, settings.limit)  # a prompt's or prefix's tokens take positions too
    if len(set(limits)) > 1:  # rows cut to other lengths run in batches of their own: a wider row pads them past it
        return np.stack(in_groups(limits, rows, per_row, lambda part, specs: _embedded(rt, part, specs, normalize, skip)))
    ids, mask = tokenizer.encode(rows, max_length=limits[0])
    if len(rows) > BATCH:  # in batches of like lengths (see in_batches)
        return np.stack(in_batches(token_counts(rows, mask), rows, per_row,
                                   lambda part, specs: _embedded(rt, part, specs, normalize, skip)))
    token_counts(rows, mask)
    hidden = rt.forward(ids, mask, adapter=adapter)["last_hidden_state"][:, -ids.shape[1]:]  # (B, T, H)
    skip = min(skip, limits[0] - 1) if limits[0] < settings.limit else skip  # cut shorter (virtual tokens): the prompt too,
    pooled = pool(hidden, mask * (mask.cumsum(1) > skip), settings.mode)  # its last token kept, as encode keeps one's
    return unit(pooled) if normalize else pooled
