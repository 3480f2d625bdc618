"""Training data: JSONL rows checked line by line, tokenized and batched per task.

    seq-cls             {"text": ..., "label": "positive" | 3 | 0.7 (a one-output head's relevance score)}, and
                        "text_pair" for a pair (a cross-encoder's query and passage: joined by the tokenizer's
                        pair template, BERT's second segment)
    causal-lm           {"prompt": ..., "completion": ...}  (loss on the completion only)  or  {"text": ...}
    feature-extraction  {"text": ..., "positive": ...}  (pairs; in-batch negatives), and hard negatives in
                        "negative" or "negative_1", "negative_2", ... (the same fields in every row)

A bad row raises ``DataError`` naming the file and the line."""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import unicodedata
from types import SimpleNamespace  # a Python tokenizer has no backend_tokenizer

import torch

from edgepeft.errors import ArtifactNotFoundError, ConfigError, DataError
from edgepeft.model_checks import TEXT_ROOM
from edgepeft.runtimes.access import check_readable, unexpanded_tilde
from edgepeft.runtimes.inputs import tokenizer_ids_checked
from edgepeft.processes import first
from edgepeft.training.jsonl import file_lines, gzip_fix, not_json_lines
from edgepeft.training.labels import ClassNames, label_ids
from edgepeft.runtimes.sentence import lowercase_first

IGNORE_INDEX = -100  # label value the loss skips (padding, prompt tokens)
PAIR = "text_pair"  # a seq-cls row's second text (transformers' tokenizer argument)
FIELDS = {
    "seq-cls": [("text", "label")],
    "causal-lm": [("prompt", "completion"), ("text",)],  # a row with both: the completion trains, as in TRL
    "feature-extraction": [("text", "positive")],
}


def check_positions(features: list[dict], rows: list[dict], path: str, positions: int | None, n_virtual: int) -> None:
    """Every row's tokens and the adapter's virtual tokens fit the model's positions: learned position tables
    (BERT, GPT-2) end there, and the exported graph takes no more."""
    if not positions:
        return
    limit = positions - n_virtual
    if n_virtual and limit < TEXT_ROOM:  # which the export would refuse
        raise ConfigError(f"num_virtual_tokens={n_virtual} leaves {max(limit, 0)} of the model's {positions} positions "
                          f"for the text, fewer than the {TEXT_ROOM} its export needs; use {positions - TEXT_ROOM} or fewer")
    for feature, row in zip(features, rows):
        longest = max(map(len, [feature["input_ids"], feature.get("positive_ids", ()), *feature.get("negative_ids", ())]))
        if longest > limit:  # a prompt that fills the room alone: cut to it, nothing was left to learn (a hunt)
            virtual = f" + {n_virtual} virtual tokens" if n_virtual else ""
            prompt = sum(y == IGNORE_INDEX for y in feature.get("labels", ())) if "prompt" in row else 0
            raise ConfigError(f"{path}:{row['_line']}: {longest} tokens{virtual} exceed the model's {positions} positions; "
                              + (f"its prompt's {prompt} tokens leave no room: shorten the prompt" if prompt >= limit
                                 else f"pass --max-length {limit} or less"))


class Rows(list):
    """A data file's rows (dicts, each with its ``_line``), and the fields of other tasks they carry (``ignored``)."""

    def __init__(self, rows: list, ignored: set, unknown: set = frozenset()):
        super().__init__(rows)
        self.ignored, self.unknown = ignored, unknown  # unknown: fields no task reads


def _other_fields(task: str) -> dict:
    """{field: the task that trains on it} for the fields ``task`` ignores."""
    used = {k for shape in FIELDS[task] for k in shape}
    return {k: t for t, shapes in FIELDS.items() for shape in shapes for k in shape if k not in used}


def read_data(data: str, eval_data: str | None, task: str) -> tuple[Rows, Rows | None]:
    """The rows of --data and of --eval (None where not given); one file given as both is read once (one pipe given
    twice: /dev/stdin's rows came for --data, and --eval found none; a FIFO waited for a second writer for ever)."""
    rows = read_jsonl(data, task)
    try:
        same = bool(eval_data) and os.path.samefile(data, eval_data)
    except OSError:  # read_jsonl names what is missing
        same = False
    return rows, copy.deepcopy(rows) if same else read_jsonl(eval_data, task) if eval_data else None


def read_jsonl(path: str, task: str) -> Rows:
    """The rows of ``path``, each checked against the task's fields (blank lines skipped), read once (a pipe too)."""
    path = str(path)
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a folder, not a data file; pass a JSONL file with one JSON object per line")
    if not os.path.exists(path):
        check_readable(path)
        raise ArtifactNotFoundError(unexpanded_tilde(path, "it") or f"{path}: data file not found; pass a JSONL file with "
                                    "one JSON object per line")  # '~' quoted: "not found" hid why
    shapes = FIELDS[task]
    want = " or ".join("{" + ", ".join(f'"{k}"' for k in shape) + "}" for shape in shapes)
    rows, others, ignored, unknown, columns = [], _other_fields(task), set(), set(), []
    lines = file_lines(path)
    for n, data in enumerate(lines, 1):
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{n}: not UTF-8 text ({e.reason}); " + (
                gzip_fix(path) if lines[0][:2] == b"\x1f\x8b" else
                "save the file as UTF-8 JSONL")) from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:  # arrays nested thousands deep; a number of 5,000 digits
            reason = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply" \
                if isinstance(e, RecursionError) else str(e).split(";")[0]
            raise DataError(f"{path}:{n}: not valid JSON ({reason}); {not_json_lines(lines) or 'each line must be one JSON object'}"
                            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object like {want}, got {type(row).__name__}")
        ignored |= others.keys() & row.keys()
        if PAIR in row and row[PAIR] in (None, ""):  # a column's missing value: the text alone, as the pipeline reads
            del row[PAIR]  # {"text_pair": None} and "" (and classify's dict form)
        if PAIR in row and task != "seq-cls":  # read past, a pair's second text would be dropped
            raise DataError(f"{path}:{n}: \"{PAIR}\": text pairs train a classifier (a cross-encoder: --task seq-cls "
                            f"with \"text\", \"{PAIR}\" and \"label\"), not {task}; drop the field")
        pair = [PAIR] if PAIR in row else []
        negatives = _negative_names(row)  # feature-extraction's: another task's fields elsewhere
        ignored |= set(negatives) if task != "feature-extraction" else set()
        unknown |= row.keys() - others.keys() - {k for s in shapes for k in s} - set(negatives) - set(pair)
        given = {k for k, v in row.items() if v is not None}  # a column's missing value (pandas, datasets): none
        shape = next((s for s in shapes if given.issuperset(s)), None) or next((s for s in shapes if row.keys() >= set(s)),
                                                                               None)  # a null in it: named below
        if shape is None:
            raise DataError(f"{path}:{n}: a {task} row needs {want}; this row has {sorted(row) or 'no fields'}")
        for other in shapes:  # half of another shape ({"text", "completion"}): that half was dropped without a word
            if half := [k for k in other if k in given and k not in shape and not given.issuperset(other)]:
                lacking = " and ".join(f'"{k}"' for k in other if k not in given)
                raise DataError(f'{path}:{n}: "{half[0]}" without {lacking}: a {task} row is {want}; give it {lacking}'
                                f' or drop "{half[0]}"')
        names = negatives if task == "feature-extraction" else []
        for k in [*shape, *names, *pair]:
            try:  # JSON's \ud800 escapes half a character (a string cut inside an emoji): no tokenizer takes it
                row[k].encode("utf-8") if isinstance(row[k], str) else None
            except UnicodeEncodeError as e:
                raise DataError(f"{path}:{n}: \"{k}\" holds an unpaired surrogate ({row[k][e.start]!r}, half a character "
                                "escaped in JSON); mend or drop that text") from None
            if k == "label":
                if isinstance(row[k], bool) or not isinstance(row[k], (str, int, float)) or \
                        isinstance(row[k], str) and not row[k].strip() or isinstance(row[k], float) and not 0 <= row[k] <= 1:
                    raise DataError(f"{path}:{n}: \"label\" must be a string of more than whitespace, an integer or "
                                    f"a relevance score from 0 to 1, got {row[k]!r}")
                if isinstance(row[k], int) and row[k] < 0:
                    raise DataError(f"{path}:{n}: integer labels must be >= 0, got {row[k]}")
            elif not isinstance(row[k], str) or not row[k].strip():
                raise DataError(f"{path}:{n}: \"{k}\" must be a string of more than whitespace, got {row[k]!r}")
        if rows and names != columns:
            raise DataError(f"{path}:{n}: has negatives {names or 'none'}, the first row {columns or 'none'}; give "
                            "every row the same negative fields (each is a column of candidates)")
        columns = names
        rows.append({k: row[k] for k in [*shape, *pair]} | ({"negatives": [row[k] for k in names]} if names else {}) |
                    {"_line": n})
    if not rows:
        raise DataError(f"{path}: no rows; a {task} file needs lines like {want}")
    return Rows(rows, ignored, unknown)


def _negative_names(row: dict) -> list:
    """A retrieval pair's hard-negative fields, in order: "negative" or "negative_1", ... (the columns after the
    positive that sentence-transformers' MultipleNegativesRankingLoss scores each text against too)."""
    return sorted((k for k in row if k == "negative" or k.startswith("negative_") and k[9:].isascii() and k[9:].isdigit()),
                  key=lambda k: int(k[9:] or 0))


def rows_digest(rows: list | None) -> str | None:
    """sha256 of the rows' fields (not their line numbers): which data a checkpoint was trained on."""
    if rows is None:
        return None
    fields = [{k: v for k, v in r.items() if k != "_line"} for r in rows]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def process_share(rows: list, size: int, index: int, processes: int) -> list:
    """Process ``index``'s evaluation rows: batches index, index + processes, ... of the ``size``-row batches one
    process makes, so that each batch is scored once, as in one process."""
    return [r for k in range(index, math.ceil(len(rows) / size), processes) for r in rows[k * size:(k + 1) * size]]


def ignored_fields(rows: Rows, path: str, task: str) -> str | None:
    """A note when ``rows`` (``path``'s) carry fields another task trains on but ``task`` ignores (a "label" for
    causal-lm), or fields no task reads (an "id"), else None."""
    notes, others = [], _other_fields(task)
    if rows.ignored:
        names = ", ".join(f'"{k}"' for k in sorted(rows.ignored))
        tasks = " or ".join(f"--task {t}" for t in sorted({others.get(k, "feature-extraction") for k in rows.ignored}))
        notes.append(f"rows carry {names}, which {task} training ignores; for a model that uses it, train with {tasks}")
    if rows.unknown:
        names = ", ".join(f'"{k}"' for k in sorted(rows.unknown)[:5]) + (" ..." if len(rows.unknown) > 5 else "")
        notes.append(f"rows carry {names}, which no task trains on (ignored)")
    return f"{path}: " + "; ".join(notes) if notes else None


def label_names(rows: list[dict], path: str, head: list[str] | None = None) -> list[str]:
    """Names of the classes, index = class id: sorted strings, or str(i) for integer labels 0..max. ``head``: a
    trained classifier's class names in its head's order (config.json's id2label): where the data has the same
    names (case and spaces aside, as transformers' run_glue compares them), that order, in the data's spelling
    (sorted, a trained head started inverted and HF PEFT read the classes the other way round)."""
    values = {r["label"] for r in rows}  # a set holds 0 or 0.0, whichever came first: the rows are read for scores
    if (scored := next((r["label"] for r in rows if isinstance(r["label"], float)), None)) is not None:
        raise DataError(f"{path}: labels such as {scored} are relevance scores, which train a head of one output (a "
                        "cross-encoder reranker's) where every label is one; give class labels (strings, or integers "
                        "0..N-1), or for scores a --model of one output (config.json's \"num_labels\": 1, no problem_type: "
                        "a model without a trained classifier, a sentence-transformers one, copied and set so, trains one)")
    ints = all(isinstance(v, int) for v in values)
    if not ints and any(isinstance(v, int) for v in values):
        raise DataError(f"{path}: labels mix strings and integers; use one kind for every row")
    if len(values) < 2:
        raise DataError(f"{path}: every row has the label {next(iter(values))!r}; classification needs two or more")
    if not ints:
        trimmed = {}
        for v in sorted(values):  # "pos" and "pos ", "café" composed and decomposed: two classes of one name
            if trimmed.setdefault(key := unicodedata.normalize("NFC", v.strip()), v) != v:
                how = "in spaces around them" if trimmed[key].strip() == v.strip() else "in how their characters are " \
                    "encoded (Unicode normalization: an accent apart or joined)"
                raise DataError(f"{path}: labels {trimmed[key]!r} and {v!r} differ only {how}; spell each class one way")
        spelled = {v.strip().lower(): v for v in values}
        order = [h.strip().lower() for h in head or []]
        return ClassNames([spelled[k] for k in order] if len(spelled) == len(values) and sorted(order) == sorted(spelled)
                          else sorted(values), ints=False)
    if max(values) >= max(1000, 2 * len(values)):  # class ids, not arbitrary numbers
        raise DataError(f"{path}: integer labels must be class ids 0..N-1 (got {max(values)} for {len(values)} "
                        "classes); use string labels or renumber them")
    if min(values) > 0:  # numbered from 1 (or 10, 20, ...): 1..6 made 7 classes, class 0 never trained
        raise DataError(f"{path}: integer labels are class ids 0..N-1, and the least here is {min(values)}; renumber "
                        "them from 0, or use string labels")
    return ClassNames(map(str, range(max(values) + 1)), ints=True)


def scores_relevance(config, rows: list[dict]) -> bool:
    """Whether a seq-cls run keeps ``config``'s head of one output (a cross-encoder reranker's relevance score) and
    trains it on labels 0 and 1, or scores from 0 to 1 (a teacher's), with binary cross-entropy, as
    sentence-transformers' CrossEncoder trains one (a head of 2 classes from scratch replaced it: the reranker's
    scoring lost)."""
    return getattr(config, "num_labels", None) == 1 and getattr(config, "problem_type", None) is None and (
        all(type(r["label"]) is float or r["label"] in (0, 1) and type(r["label"]) is int for r in rows) or
        any(type(r["label"]) is float for r in rows))  # the others then named at their lines (relevance_scores)


def relevance_scores(rows: list[dict], path: str) -> list[float]:
    """A relevance run's labels (``scores_relevance``): each 0 or 1, or a score between."""
    for r in rows:
        if isinstance(r["label"], str) or not 0 <= r["label"] <= 1:
            raise DataError(f"{path}:{r['_line']}: label {r['label']!r} is not a relevance score; the training rows "
                            "score relevance from 0 to 1 (a one-output head's): label these rows so too")
    return [float(r["label"]) for r in rows]


def replaced_head_note(config, labels: list, model: str, kept: bool, head: list | None = None) -> str | None:
    """A note where the data's labels replace a head of one output (a reranker's score) with one of their classes
    (``kept``: ``scores_relevance`` keeps it), or are not the classes a trained head names (``head``: its id2label),
    as transformers' run_glue warns: a head of another count is trained from scratch in its place."""
    ids = [str(i) for i in range(len(head or []))]  # class ids 0..N-1 are its outputs
    if head and labels == ids != head:  # trained as they are; the adapter's labels.json (and classify) then say 0, 1, ...
        return (f"{model}: its head names its classes {', '.join(head)} (config.json's id2label); the data's integer "
                f"labels train them as class ids, which the adapter's labels (and classify) name {', '.join(ids)}; "
                "label the rows with its class names to keep them")
    if head and labels and labels != ids and [h.strip().lower() for h in head] != [v.strip().lower() for v in labels]:
        fate = (f"a head of {len(labels)} classes is trained from scratch in its place" if len(labels) != len(head)
                else f"its {len(head)} outputs are trained as these, in this order")
        return (f"{model}: its head was trained on the classes {', '.join(head)} (config.json's id2label), not the "
                f"data's labels {', '.join(labels)}; {fate}; label the rows with its classes, each present, to "
                "fine-tune its head as trained")
    if kept or getattr(config, "num_labels", None) != 1 or getattr(config, "problem_type", None):
        return None
    return (f"{model}: its head gives one score (a reranker's); labels {', '.join(labels)} train a head of {len(labels)} "
            f"classes from scratch in its place; label the rows 0 and 1{' (numbers, not strings)' * labels.digits}, or with "
            "scores from 0 to 1, to keep and fine-tune its score")


class Encoder:
    """Turns checked rows into token-id features and pads them into batches."""

    def __init__(self, tokenizer, task: str, max_length: int, labels: list[str] | None = None,
                 pad_id: int | None = None, lower: bool = False, types: bool = False, vocab: int | None = None):
        """``labels``: a classifier's class names (None on a seq-cls run: relevance scores, ``scores_relevance``).
        ``pad_id``: the model's padding token (config.json), which a decoder classifier looks for to find
        each row's last token; else the tokenizer's, else its end-of-sequence token. ``lower``: pairs are
        lower-cased first (a sentence-transformers model's do_lower_case). ``types``: the model reads token types
        (``models.reads_token_types``): a text pair's are batched too. ``vocab``: the model's vocab_size, which every
        id fed must be below (a token added to the tokenizer alone was an IndexError traceback from the embeddings)."""
        if lower:  # as sentence-transformers: a Lowercase step in (a copy of) the tokenizer, not str.lower
            tokenizer = copy.deepcopy(tokenizer)
            lowercase_first(tokenizer.backend_tokenizer)
        self.tokenizer, self.task, self.max_length, self.labels, self.types = tokenizer, task, max_length, labels, types
        self.completions_alone = []  # the lines of rows whose completion was tokenized alone (_completion)
        pad = pad_id if pad_id is not None else tokenizer.pad_token_id
        eos = tokenizer.eos_token_id if vocab is None or (tokenizer.eos_token_id or 0) < vocab else None
        if pad is None or vocab is not None and not 0 <= pad < vocab:  # a pad added to the tokenizer alone, or the
            pad = eos if eos is not None else 0  # config's no token: an id of the model's (padding is masked)
        self.pad_id, self.vocab = pad, vocab
        if task != "causal-lm":
            self._check_room(len(self._ids("")), "text")

    def _check_room(self, specials: int, what: str) -> None:
        if self.max_length <= specials:  # transformers then cuts none of the text, or all of it
            raise ConfigError(f"--max-length {self.max_length} leaves no token of text: the tokenizer adds {specials} "
                              f"special tokens to each {what}; pass --max-length {specials + 1} or more")

    def _ids(self, text: str, special: bool = True) -> list[int]:  # cut to --max-length later: no "indexing errors"
        return self.tokenizer(text, add_special_tokens=special, truncation=False, verbose=False)["input_ids"]

    def _cut(self, text: str) -> list[int]:
        """At most max_length ids, truncated as transformers' tokenizers truncate: [SEP] / eos stay at the end."""
        return self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"]

    def _classified(self, row: dict, label: int) -> dict:
        """A seq-cls row's features: a pair joined by the tokenizer's pair template (cut longest first, as
        transformers' truncation=True), its token types where the model reads them."""
        enc = self.tokenizer(row["text"], truncation=True, max_length=self.max_length,
                             **({PAIR: row[PAIR]} if PAIR in row else {}), **({"return_token_type_ids": True} if self.types else {}))
        return {"input_ids": enc["input_ids"], "label": label} | (
            {"token_type_ids": enc["token_type_ids"]} if self.types else {})

    def encode(self, rows: list[dict], path: str) -> list[dict]:
        features = self._encode(rows, path)
        if self.vocab is not None:
            every = [ids for f in features for k, v in f.items() if k.endswith("ids") and k != "token_type_ids"
                     for ids in (v if k == "negative_ids" else [v])]
            tokenizer_ids_checked(every, self.vocab, os.path.join(getattr(self.tokenizer, "name_or_path", "") or "",
                                  "tokenizer.json"), SimpleNamespace(id_to_token=self.tokenizer.convert_ids_to_tokens))
        return features

    def _encode(self, rows: list[dict], path: str) -> list[dict]:
        if self.task == "seq-cls":
            if any(PAIR in r for r in rows):  # a pair's template adds more ([CLS] a [SEP] b [SEP]: 3)
                self._check_room(self.tokenizer.num_special_tokens_to_add(pair=True), "pair")
            labels = label_ids(rows, self.labels, path) if self.labels is not None else relevance_scores(rows, path)
            return [self._classified(r, y) for r, y in zip(rows, labels)]
        if self.task == "feature-extraction":
            return [{"input_ids": self._cut(r["text"]), "positive_ids": self._cut(r["positive"])} |
                    ({"negative_ids": [self._cut(t) for t in r["negatives"]]} if "negatives" in r else {}) for r in rows]
        self.completions_alone = []
        causal = [self._causal(r, path) for r in rows]
        if self.completions_alone and first():  # TRL warns alike: the ids trained read otherwise than prompt + completion
            alone = self.completions_alone
            lines = ("lines " if len(alone) > 1 else "line ") + ", ".join(map(str, alone[:5])) + (" ..." if len(alone) > 5 else "")
            print(f"note: {path}: {lines}: the tokenizer joins the prompt's end to the completion's start (a "
                  "prompt ending in a space), so the completion is tokenized alone: its tokens are not those of prompt "
                  "+ completion (on a Llama-2 style tokenizer, nor is its text); end the prompt before the space and "
                  "start the completion with it", file=sys.stderr)
        return causal

    def _causal(self, row: dict, path: str) -> dict:
        eos = self.tokenizer.eos_token_id
        ended = lambda ids: ids + ([eos] if eos is not None and ids[-1:] != [eos] else [])  # once, as TRL appends it
        if "text" in row:
            ids = ended(self._ids(row["text"]))
            labels = list(ids)
        else:
            prompt = self._ids(row["prompt"])
            completion = ended(self._completion(row["prompt"], row["completion"], row["_line"]))
            ids = prompt + completion
            labels = [IGNORE_INDEX] * len(prompt) + completion
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(y == IGNORE_INDEX for y in labels[1:]):
            fix = "raise --max-length" if "text" in row else "shorten the prompt or raise --max-length"
            raise DataError(f"{path}:{row['_line']}: nothing left to learn after truncating to --max-length "
                            f"{self.max_length} tokens; {fix}")
        return {"input_ids": ids, "labels": labels}

    def _completion(self, prompt: str, completion: str, line: int) -> list[int]:
        """The completion's ids as the text reads on from the prompt, as TRL tokenizes prompt + completion: alone,
        a Metaspace tokenizer (Llama-2, Mistral) starts it with '▁', a space the text does not have. Where the
        joint ids do not begin with the prompt's (a token across the seam), the completion alone (``completions_alone``)."""
        head, whole = self._ids(prompt, special=False), self._ids(prompt + completion, special=False)
        if whole[:len(head)] == head:
            return whole[len(head):]
        self.completions_alone.append(line)
        return self._ids(completion, special=False)

    def _pad(self, seqs: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)

    def _mask(self, seqs: list[list[int]]) -> torch.Tensor:
        return self._pad([[1] * len(s) for s in seqs], 0)

    def collate(self, features: list[dict]) -> dict:
        """Right-padded tensors (the models read the last real token through the mask)."""
        ids = [f["input_ids"] for f in features]
        batch = {"input_ids": self._pad(ids, self.pad_id), "attention_mask": self._mask(ids)}
        if self.task == "seq-cls":
            batch["labels"] = torch.tensor([f["label"] for f in features],  # class ids, or relevance scores
                                           dtype=torch.long if self.labels is not None else torch.float)
            if self.types:  # padded with type 0, as transformers' tokenizers pad them
                batch["token_type_ids"] = self._pad([f["token_type_ids"] for f in features], 0)
        elif self.task == "causal-lm":
            batch["labels"] = self._pad([f["labels"] for f in features], IGNORE_INDEX)
        else:  # the negatives a column at a time: every row's first, then every row's second, ...
            negatives = [n for column in zip(*(f.get("negative_ids", ()) for f in features)) for n in column]
            for field, seqs in (("positive", [f["positive_ids"] for f in features]), ("negative", negatives)):
                if seqs:
                    batch[f"{field}_ids"], batch[f"{field}_mask"] = self._pad(seqs, self.pad_id), self._mask(seqs)
        return batch
