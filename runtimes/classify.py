"""classify: texts or text pairs -> label and scores (seq-cls exports), as transformers' text-classification pipeline.

A pair (a cross-encoder's query and passage, NLI's premise and hypothesis) is given as that pipeline takes one,
``{"text": ..., "text_pair": ...}``, or as sentence-transformers' CrossEncoder does, ``(text, text_pair)`` in a list;
a list may mix texts and pairs. The tokenizer's pair template joins the two ([CLS] a [SEP] b [SEP] for BERT), and
the second text's token types (1) are bound where the graph takes them (a seq-cls BERT's ``token_type_ids``).
"""
from __future__ import annotations

import os

import numpy as np

from .base_checks import serves_pairs
from .commands import pairs_fix
from .errors import ConfigError, CorruptArtifactError, InvalidInputError
from .access import OLDER_RECORDS, older_export
from .manifest import ADAPTER_MANIFEST, BASE_MANIFEST
from .mixing import BATCH, holding, in_batches, in_groups, row_adapters, row_specs
from .sentence import row_limits, tokenizer_limit
from .text import token_counts
from .values import switch

PAIR_KEYS = ("text", "text_pair")  # transformers' pipeline's pair: the tokenizer's argument names


def _rows(texts) -> tuple[list, bool]:
    """([(text, its pair or None)], whether one text or pair was given)."""
    single = isinstance(texts, (str, dict))
    if isinstance(texts, tuple) and len(texts) == 2 and all(isinstance(t, str) for t in texts):  # CrossEncoder: a pair
        raise InvalidInputError(f"{texts!r:.80} is ambiguous: one pair to sentence-transformers' CrossEncoder, two texts "
                                "to the pipeline; pass [(text, text_pair)] for a pair, or a list of the two texts")
    if not (single or isinstance(texts, (list, tuple)) and texts):
        raise InvalidInputError(f"give a text, a text pair, or a non-empty list of them; got {type(texts).__name__}")
    rows = [_row(item) for item in ([texts] if single else texts)]
    return rows, single


def _row(item) -> tuple:
    if isinstance(item, dict) and "text" in item and not set(item) - set(PAIR_KEYS):  # an empty pair is none, as the
        pair = item.get("text_pair")  # pipeline's tokenizer reads one text's {text, text_pair}; 0 or [] is refused below
        item = item["text"], None if isinstance(pair, str) and not pair else pair
    elif isinstance(item, (list, tuple)) and len(item) == 2:
        item = tuple(item)
    elif isinstance(item, str):
        item = item, None
    if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
            and (item[1] is None or isinstance(item[1], str))):
        raise InvalidInputError("give a text, a text pair ({'text': ..., 'text_pair': ...} or (text, text_pair)), or a "
                                f"non-empty list of them; got {item!r:.80}")
    return item


def classify(rt, texts, adapter=None, truncation: bool = False):
    """{"label", "score", "scores": {label: score}} per text or pair (one dict for one). Scores as transformers'
    text-classification pipeline gives them, by the base config's ``problem_type``: probabilities (softmax), a
    sigmoid per label for multi-label heads and heads of one output, the logits themselves for regression.
    ``truncation``: as the pipeline's, each text or pair cut (longest first) to the tokenizer's ``model_max_length``,
    capped at the model's positions less an adapter's virtual tokens; else nothing is cut."""
    if rt.task != "seq-cls":
        raise ConfigError(f"{rt.base_dir}: a {rt.task} export does not classify; export a seq-cls adapter")
    truncation = switch(truncation, "truncation")
    older_export(rt.base_dir, rt.manifest, *OLDER_RECORDS["seq-cls"])
    rows, single = _rows(texts)
    if not serves_pairs(rt.manifest) and any(pair is not None for _, pair in rows):  # BERT's types unbound
        raise ConfigError(f"{rt.base_dir}: exported before edgepeft served text pairs (a BERT's graph then took no token "
                          f"types); {pairs_fix(rt.manifest)}")
    # held for every batch (a name reloaded between two gave two adapters' scores), and while the cuts are read
    with holding(rt.store, rt.mixer, adapter, row_specs(adapter, len(rows))):
        out = _classified(rt, rows, adapter, truncation)
    return out[0] if single else out


def _classified(rt, rows: list, adapter, truncation: bool) -> list:
    per_row = row_adapters(adapter, len(rows))
    limits = row_limits(rt, adapter, per_row, tokenizer_limit(rt.tokenizer.config.get("model_max_length"),
                                                              rt.max_positions)) if truncation else [None]
    if len(set(limits)) > 1:  # each row cut for its own adapter, as run alone (every row was cut to the room the
        # adapter of the most virtual tokens leaves: a LoRA row beside a prompt's lost its text's end), as embed cuts
        return in_groups(limits, rows, per_row, lambda part, specs: _classified(rt, part, specs, truncation))
    limit = limits[0]
    ids, mask, types = rt.tokenizer.encode_pairs(*zip(*rows), max_length=limit)
    lengths = token_counts([t if p is None else (t, p) for t, p in rows], mask)
    over = limit is None and rt.max_positions and ids.shape[1] + rt.virtual_positions(adapter, len(rows)) > rt.max_positions
    for length, spec in zip(lengths, per_row) if over else ():  # then each row as it runs, with its own adapter's
        if length + (virtual := rt.virtual_positions(spec, 1)) > rt.max_positions:  # the pipeline's fix named too
            extra = f" (+ the adapter's {virtual} virtual tokens)" if virtual else ""
            raise InvalidInputError(f"a text of {length} tokens{extra} exceeds the model's {rt.max_positions} positions; "
                                    "shorten it, or pass truncation=True to cut it as transformers' pipeline does")
    if len(rows) > BATCH:  # in batches of like lengths (see in_batches)
        return in_batches(lengths, rows, per_row, lambda part, specs: _classified(rt, part, specs, truncation))
    if len(set(lengths)) > 1 and _reads_last_position(rt, per_row):  # rows of each length run apart, as one text
        # at a time does (transformers' pipeline): the head would read a shorter row at a pad
        return in_groups(lengths, rows, per_row, lambda part, specs: _classified(rt, part, specs, truncation))
    with rt.lanes(adapter, len(rows)):  # held until the names are read: a name reloaded between renames the scores
        logits = rt.forward(ids, mask, adapter=adapter, token_type_ids=None if rt.type_vocab_size is None else types)
        logits = logits["logits"].astype(np.float64)  # NaN past a row's own labels
        labels = [_labels_of(rt, spec) for spec in per_row]
    out = []
    for row, (named, where) in zip(logits, labels):
        p = label_scores(row[~np.isnan(row)], rt.manifest.get("problem_type"))
        names = named or [str(i) for i in range(len(p))]
        if len(names) != len(p):  # a hand-edited manifest (its checksum covers the graph only)
            raise CorruptArtifactError(f"{where}: gives {len(names)} label name(s), the head has {len(p)} outputs; "
                                       "re-export with --overwrite")
        out.append({"label": names[int(p.argmax())], "score": float(p.max()), "scores": dict(zip(names, map(float, p)))})
    return out


def _reads_last_position(rt, per_row: list) -> bool:
    """Whether a decoder classifier's graph would read each row's last position, padding or not: where the model's
    padding id is no token (none, -1, or past the vocabulary: rows are padded with eos) or a row's adapter adds virtual tokens
    (a prompt passes embeddings, in which transformers cannot see padding). The manifest does not say whether the
    head is a decoder's, so an encoder's (which reads [CLS] either way) is split alike: the same scores, more runs."""
    return rt.model_pad_id is None or any(rt.virtual_positions(spec, 1) for spec in per_row)


def label_scores(logits: np.ndarray, problem_type: str | None) -> np.ndarray:
    """A row of classifier logits as transformers' text-classification pipeline scores them."""
    if problem_type == "regression":
        return logits
    if problem_type == "multi_label_classification" or len(logits) == 1:
        return 1 / (1 + np.exp(-logits))
    p = np.exp(logits - logits.max())
    return p / p.sum()


def _labels_of(rt, spec) -> tuple:
    """(label names, the manifest that gives them) of a row's adapter (a weighted row: the one adapter of it that
    has a head, else the base; None: the base, a merged classifier's)."""
    if isinstance(spec, dict):  # the one whose head runs, whatever the order; none (or a merged one): the base's
        spec = next((n for n in spec if not rt.store.serves_base(n) and rt.store.get(n).has_head), None)
    if rt.store.serves_base(spec):
        return rt.labels(None), os.path.join(rt.base_dir, BASE_MANIFEST)
    folder = rt.adapter_dir(spec)
    return rt.labels(spec), os.path.join(folder, ADAPTER_MANIFEST) if folder else f"adapter {spec!r} (from bytes): adapter.json"
