"""The text of generated ids as stop strings and ``stream_text`` read it, with the exported tokenizer
(``text.TextTokenizer``): ``StopStrings`` ends rows at stop strings, as transformers' ``StopStringCriteria``;
``GrowingText`` gives ``stream_text`` the text of the ids so far, decoding a window of them.
"""
from __future__ import annotations

import os

import numpy as np

from .errors import ArtifactNotFoundError


def stop_text(tok: "TextTokenizer", ids) -> str:
    """The text stop strings are matched in: ``decode`` with special tokens, untidied, each run of byte tokens
    decoded as Python decodes bytes (``errors="replace"``). transformers' stop strings read each token's own
    text, where the tokenizer's decoder makes the whole of a run that is not valid UTF-8 U+FFFD: a newline in
    it stays a newline (in a run the tokens after it closed too), a character begun at the end is one U+FFFD."""
    ids = [int(i) for i in ids]
    byte = [tok.byte_of(i) for i in ids]
    if all(b is None for b in byte):
        return tok.decode(ids, False, False)
    cuts = [0, *(k for k in range(1, len(ids)) if (byte[k - 1] is None) != (byte[k] is None)), len(ids)]
    text = ""
    for c, a, b in zip([0, *cuts], cuts, cuts[1:]):
        if byte[a] is not None:
            text += bytes(byte[a:b]).decode("utf-8", "replace")
        else:  # the decoder's text of these tokens where they stand (a text's first token drops its space), after
            # the byte run before them (c: its start), not the whole window (each stretch decoded it: n² a step)
            text += tok.decode(ids[c:b], False, False)[len(tok.decode(ids[c:a], False, False)):]
    return text


class StopStrings:
    """Marks rows whose newest token completes a stop string (decoded with the exported tokenizer).

    As transformers' ``StopStringCriteria``: special tokens count as their text, and a
    match may begin in the prompt; it must end in a new token. Called after every step,
    so only the newest token can complete a match: each call decodes the last few tokens
    of each unfinished row, not the whole text.
    """

    def __init__(self, tokenizer: "TextTokenizer", stops: list, starts: np.ndarray):
        self.tokenizer = tokenizer
        self.stops = stops
        # tokens before the newest one a match can reach back over: a character may take 4 byte-level tokens
        self.lookback = 4 * max(len(s) for s in stops) + 4
        self.starts = starts  # each row's first real token: padding is no text

    @classmethod
    def of(cls, rt, stops: list, starts: np.ndarray, models: bool) -> "StopStrings":
        """``stops`` with ``rt``'s tokenizer. ``models``: they are the model's (generation_config.json's stop_strings),
        not the call's; an export without a tokenizer names them (its message told a call on ids to "pass token ids")."""
        path = os.path.join(rt.base_dir, "tokenizer.json")
        if models and not os.path.isfile(path):
            raise ArtifactNotFoundError(
                f"{path}: missing, and the model's generation_config.json sets stop_strings {stops!r:.80}, which are "
                "matched in decoded text: pass stop=[] to generate without them, or export from a base folder that has "
                "tokenizer.json into a fresh --out folder")
        return cls(rt.tokenizer, stops, starts)

    def hit(self, sequences: np.ndarray, finished: np.ndarray) -> np.ndarray:
        found = np.zeros(len(sequences), dtype=bool)
        for i, (row, start) in enumerate(zip(sequences, self.starts)):
            if finished[i]:
                continue
            window = row[max(start, len(row) - 1 - self.lookback):]
            # the text before the newest token, less a character its bytes had only begun (decoded as U+FFFD):
            # the newest token completes that character, so a match may end in it
            # untidied, as transformers matches the tokens' own text (" ," is found where decode would give ",")
            before = len(stop_text(self.tokenizer, window[:-1]).rstrip("\ufffd"))
            # less a character the newest token only began: its U+FFFD is no text yet (a stop "\ufffd" matched it)
            text = stop_text(self.tokenizer, window).rstrip("\ufffd")
            found[i] = any(s in text[max(0, before - len(s) + 1):] for s in self.stops)
        return found


class OpenBytes:
    """How many of the last ids of a growing list are byte-fallback tokens, counted as the ids come (walking back
    over the run at every id cost n² over a run of n: Thai or emoji text the vocabulary lacks). A run of them decodes
    as a whole, each of its bytes U+FFFD while the run is not valid UTF-8, so its text (a newline shown already
    included) may change until a token of another kind ends the run. Decoded without special tokens, a special token
    inside a run does not end it (and is counted with it)."""

    def __init__(self, tok: "TextTokenizer"):
        self.tok, self.n = tok, 0

    def __call__(self, i: int) -> int:
        """The open run's length once ``i`` is added (a special id after a byte of it counts; one before none)."""
        if self.tok.byte_of(i) is not None or (self.n and i in self.tok.skipped_ids):
            self.n += 1
        elif i not in self.tok.skipped_ids:
            self.n = 0
        return self.n


class GrowingText:
    """The text of a growing list of ids in time linear in its length: decoding the whole list at every token cost
    1.2 ms a token at 2,000 tokens. Special tokens are left out as they come (decoding skips them; a context of
    them only would decode to "", and the next token read as a text's first, its space dropped). The text of the
    other ids before ``start`` is kept, and each call decodes from a few ids before ``start`` (a text's first tokens
    decode apart: Metaspace drops their space, WordPiece keeps "##"; both windows start alike, so the text they add
    is the same). Where a new id changed that context's text (a tidying rewrite), the whole list is decoded.
    ``start`` moves on where the text ends on a whole character."""
    CONTEXT, WINDOW = 8, 32

    def __init__(self, tok: "TextTokenizer"):
        self.tok, self.start, self.kept, self.before = tok, 0, "", ""
        self.seen, self.ids = 0, []  # how many of the caller's ids are read, and the ones not special

    def __call__(self, ids: list, n: int) -> str:
        """The text of ``ids[:n]``; ``n`` never less than the last call's (ids cut before an open byte run)."""
        special = self.tok.skipped_ids
        self.ids += [i for i in ids[self.seen:n] if i not in special]
        self.seen, ids, n = n, self.ids, len(self.ids)
        after = self.tok.decode(ids[max(self.start - self.CONTEXT, 0):n])
        if not after.startswith(self.before):  # a new id rewrote the context's text: decode all, start again
            self.start, self.kept, self.before = 0, "", ""
            after = self.tok.decode(ids[:n])
        text = self.kept + after[len(self.before):]
        if n - self.start > self.WINDOW and not text.endswith("\ufffd"):
            self.start, self.kept, self.before = n, text, self.tok.decode(ids[n - self.CONTEXT:n])
        return text
