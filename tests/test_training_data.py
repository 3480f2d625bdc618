"""Training data on bad input: DataError naming the file and line; the encoder's masks and padding."""
from __future__ import annotations

import json
import re

import pytest
import torch

from edgepeft.errors import ArtifactNotFoundError, ConfigError, DataError
from edgepeft.training.data import (
    IGNORE_INDEX, Encoder, check_positions, label_ids, label_names, read_jsonl,
)
from file_checks import write_lines
from training_helpers import WordTokenizer


# --------------------------------------------------------------------------- read_jsonl
def test_missing_data_file(tmp_path):
    path = tmp_path / "nowhere.jsonl"
    with pytest.raises(ArtifactNotFoundError) as e:
        read_jsonl(str(path), "seq-cls")
    assert str(path) in str(e.value) and "JSONL" in str(e.value)


def test_a_folder_given_as_data_is_named_so_and_a_pipe_is_read_once(tmp_path):
    """A folder said "data file not found" for a path that is there; a pipe (``--data <(...)``) was read twice (the
    rows, then the note on other tasks' fields), so it was refused."""
    import os
    import threading

    with pytest.raises(ConfigError, match=f"^{tmp_path}: is a folder, not a data file; pass a JSONL file"):
        read_jsonl(str(tmp_path), "seq-cls")
    os.mkfifo(tmp_path / "rows")
    writer = threading.Thread(target=write_lines, args=(tmp_path / "rows", [{"text": "a", "label": "x", "positive": "b"}]),
                              daemon=True)  # no hang when the read fails
    writer.start()
    rows = read_jsonl(str(tmp_path / "rows"), "seq-cls")
    writer.join()
    assert [r["text"] for r in rows] == ["a"] and rows.ignored == {"positive"}


def test_invalid_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, '{"text": "c", "label"'])
    with pytest.raises(DataError) as e:
        read_jsonl(path, "seq-cls")
    assert f"{path}:3:" in str(e.value) and "not valid JSON" in str(e.value)


@pytest.mark.parametrize("data, said", [
    (json.dumps([{"text": "a", "label": "x"}], indent=2).encode(), "the file is one JSON document over several lines "
     "(a pretty-printed list), not JSON Lines: write each row as one JSON object on its own line (jq -c '.[]' "),
    (json.dumps({"text": "a", "label": "x"}, indent=2).encode(), "the file is one JSON document over several lines (a "
     "pretty-printed dict), not JSON Lines: write each row as one JSON object on its own line (jq -c . file.json"),
    ('{"text": "a", "label": "x"}\n'.encode("utf-16-le"), "the file holds NUL bytes (UTF-16 text?): save it as UTF-8"),
    (b'{"text": "a", "label": "x"}\r{"text": "b", "label": "y"}\r', "its lines end in CR alone (old Mac line ends)")])
def test_a_file_that_is_no_json_lines_is_named_for_what_it_is(tmp_path, data, said):
    """Found by a hunt: each was "line 1: not valid JSON (Expecting value)" and "each line must be one JSON object"."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    with pytest.raises(DataError, match=f"^{path}:1: not valid JSON \\(.*\\); {re.escape(said)}"):
        read_jsonl(str(path), "seq-cls")


def test_a_gzip_compressed_file_is_told_to_be_unpacked(tmp_path):
    """A training-paths hunt: data.jsonl.gz was "not UTF-8 text; save the file as UTF-8 JSONL" (it is, packed)."""
    import gzip

    import subprocess

    # a fixes hunt: "gunzip -k FILE" refused a name without .gz (curl saving a gzip-encoded answer under its name)
    (tmp_path / "d.jsonl").write_text("not mine to replace")
    for name in ("d.jsonl.gz", "dl.jsonl", "d.jsonl.gz"):  # the second d.jsonl.gz: d.jsonl unpacked by the first
        path = tmp_path / name
        path.write_bytes(gzip.compress(b'{"text": "a", "label": "x"}\n' * 50))
        with pytest.raises(DataError, match=f"^{path}:.*: not UTF-8 text .*; the file is gzip-compressed: unpack it "
                                            r"\(gunzip -c .*\) and pass that file$") as e:
            read_jsonl(str(path), "seq-cls")
        command = str(e.value).split("(gunzip", 1)[1].rsplit(") and pass", 1)[0]
        subprocess.run(f"gunzip{command}", shell=True, check=True)
        assert len(read_jsonl(command.rsplit("> ", 1)[1].strip("'"), "seq-cls")) == 50
    assert (tmp_path / "d.jsonl").read_text() == "not mine to replace"


def test_two_objects_on_one_line_is_invalid_json(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "a", "label": "x"} {"text": "b", "label": "y"}'])
    with pytest.raises(DataError, match=r":1: not valid JSON"):
        read_jsonl(path, "seq-cls")
    path = write_lines(tmp_path / "deep.jsonl", ["[" * 100000])  # Python's RecursionError, a traceback
    with pytest.raises(DataError, match=r"deep.jsonl:1: not valid JSON \(nested too deeply\)"):
        read_jsonl(path, "seq-cls")
    path = write_lines(tmp_path / "big.jsonl", ['{"text": "a", "label": "x", "id": 1%s}' % ("0" * 5000)])
    with pytest.raises(DataError, match=r"big.jsonl:1: not valid JSON \(Exceeds the limit \(4300 digits\) for integer "
                                        r"string conversion: value has 5001 digits\); each line"):  # a traceback
        read_jsonl(path, "seq-cls")


@pytest.mark.parametrize("line, kind", [('["a", "b"]', "list"), ('"just text"', "str"), ("42", "int"), ("null", "NoneType")])
def test_non_object_line(tmp_path, line, kind):
    path = write_lines(tmp_path / "d.jsonl", [{"text": "ok"}, line])
    with pytest.raises(DataError) as e:
        read_jsonl(path, "causal-lm")
    msg = str(e.value)
    assert f"{path}:2:" in msg and "JSON object" in msg and kind in msg


@pytest.mark.parametrize("task, row, needs", [
    ("seq-cls", {"text": "hi"}, '"label"'),
    ("seq-cls", {"label": "pos"}, '"text"'),
    ("causal-lm", {"prompt": "only a prompt"}, '"completion"'),
    ("causal-lm", {"completion": "only a completion"}, '"prompt"'),
    ("causal-lm", {"body": "wrong field"}, '"text"'),
    ("feature-extraction", {"text": "no pair"}, '"positive"'),
    ("feature-extraction", {"positive": "no anchor"}, '"text"'),
    ("seq-cls", {}, "no fields"),
])
def test_missing_fields_per_task(tmp_path, task, row, needs):
    path = write_lines(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError) as e:
        read_jsonl(path, task)
    msg = str(e.value)
    assert f"{path}:1:" in msg and task in msg and needs in msg


def test_causal_lm_accepts_both_shapes_and_keeps_line_numbers(tmp_path):
    """A row with the text and its prompt/completion trains the completion, as TRL's SFTTrainer does (it trained the
    text, the prompt's tokens too, silently)."""
    path = write_lines(tmp_path / "d.jsonl", [{"text": "plain"}, "", "   ", {"prompt": "Q", "completion": "A", "extra": 1},
                                              {"text": "Q A", "prompt": "Q", "completion": "A"}])
    rows = read_jsonl(path, "causal-lm")
    assert rows == [{"text": "plain", "_line": 1}, {"prompt": "Q", "completion": "A", "_line": 4},
                    {"prompt": "Q", "completion": "A", "_line": 5}]


@pytest.mark.parametrize("row, half, lacking", [({"text": "Q", "completion": " A"}, "completion", "prompt"),
                                                ({"prompt": "Q", "text": "Q A"}, "prompt", "completion"),
                                                ({"text": "T", "prompt": "Q", "completion": None}, "prompt", "completion")])
def test_half_a_prompt_completion_row_beside_a_text_is_refused(tmp_path, row, half, lacking):
    """Found by a hunt: {"text", "completion"} trained the text alone (its completion dropped without a word), and
    {"prompt", "text"} the text without its prompt. A null field is a column's missing value, as pandas writes
    mixed rows ({"text": null, "prompt": ..., "completion": ...} was refused)."""
    path = write_lines(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError, match=f'^{path}:1: "{half}" without "{lacking}": a causal-lm row is '
                                        r'\{"prompt", "completion"\} or \{"text"\}; '
                                        f'give it "{lacking}" or drop "{half}"$'):
        read_jsonl(path, "causal-lm")
    path = write_lines(tmp_path / "nulls.jsonl", [{"text": None, "prompt": "Q", "completion": "A"},
                                                  {"text": "T", "prompt": None, "completion": None}])
    assert read_jsonl(path, "causal-lm") == [{"prompt": "Q", "completion": "A", "_line": 1}, {"text": "T", "_line": 2}]


@pytest.mark.parametrize("task, row, field", [
    ("seq-cls", {"text": "", "label": "x"}, "text"),
    ("seq-cls", {"text": "   ", "label": "x"}, "text"),
    ("seq-cls", {"text": 3, "label": "x"}, "text"),
    ("causal-lm", {"prompt": "Q", "completion": ""}, "completion"),
    ("causal-lm", {"text": None}, "text"),
    ("feature-extraction", {"text": "a", "positive": " \t"}, "positive"),
])
def test_empty_or_non_string_text(tmp_path, task, row, field):
    path = write_lines(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError) as e:
        read_jsonl(path, task)
    assert f"{path}:1:" in str(e.value) and f'"{field}" must be a string of more than whitespace' in str(e.value)


@pytest.mark.parametrize("label, words", [
    (True, "string of more than whitespace, an integer or a relevance score from 0 to 1"),
    (False, "string of more than whitespace, an integer or a relevance score from 0 to 1"),
    (1.5, "string of more than whitespace, an integer or a relevance score from 0 to 1"),  # 0.5 and 1.0: a reranker's scores
    (-0.5, "string of more than whitespace, an integer or a relevance score from 0 to 1"),
    (float("nan"), "string of more than whitespace, an integer or a relevance score from 0 to 1"),
    ("", "string of more than whitespace, an integer or a relevance score from 0 to 1"),
    ("  ", "string of more than whitespace, an integer or a relevance score from 0 to 1"),  # was a class of its own
    (None, "string of more than whitespace, an integer or a relevance score from 0 to 1"),
    (["a"], "string of more than whitespace, an integer or a relevance score from 0 to 1"),
    (-1, ">= 0"),
])
def test_bad_label_values(tmp_path, label, words):
    path = write_lines(tmp_path / "d.jsonl", [{"text": "fine", "label": "ok"}, {"text": "bad", "label": label}])
    with pytest.raises(DataError) as e:
        read_jsonl(path, "seq-cls")
    assert f"{path}:2:" in str(e.value) and words in str(e.value)


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"text": "a", "label": 0}\n\n  \t\n{"text": "b", "label": 1}\r\n\n', encoding="utf-8")
    rows = read_jsonl(str(path), "seq-cls")
    assert [(r["text"], r["label"], r["_line"]) for r in rows] == [("a", 0, 2), ("b", 1, 5)]


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_jsonl(str(path), "feature-extraction")
    assert str(path) in str(e.value) and "no rows" in str(e.value) and '"positive"' in str(e.value)


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    with pytest.raises(DataError) as e:
        read_jsonl(str(path), "seq-cls")
    assert str(path) in str(e.value) and "UTF-8" in str(e.value)


def test_an_unpaired_surrogate_names_the_line(tmp_path):
    """Valid JSON ("\\ud800": a string cut inside an emoji) that no tokenizer takes: a TypeError traceback."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": "a \\ud800 b", "label": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_jsonl(str(path), "seq-cls")
    assert str(e.value) == (f"{path}:2: \"text\" holds an unpaired surrogate ('\\ud800', half a character escaped in "
                            "JSON); mend or drop that text")


def test_non_utf8_error_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "fine", "label": "b"}\n{"text": "caf\xe9", "label": "b"}\n')
    with pytest.raises(DataError) as e:
        read_jsonl(str(path), "seq-cls")
    assert f"{path}:3" in str(e.value)


# --------------------------------------------------------------------------- label_names / label_ids
def test_mixed_string_and_integer_labels(tmp_path):
    path = str(tmp_path / "d.jsonl")
    rows = [{"label": "pos", "_line": 1}, {"label": 1, "_line": 2}]
    with pytest.raises(DataError) as e:
        label_names(rows, path)
    assert path in str(e.value) and "mix strings and integers" in str(e.value)


@pytest.mark.parametrize("values", [(0.0, 1.0), (0.0, 0.5), (0.0, "a"), (0.0, 1), (0.9, 0.1), (0, 0.0, 1)])
def test_relevance_scores_are_refused_for_a_head_of_classes(values):
    """A hunt: 0.0 read as no score (false): 0.0 and 1.0, the usual binary relevance, were tracebacks."""
    with pytest.raises(DataError, match=r"^d.jsonl: labels such as 0\.\d+ are relevance scores, which train a head of "
                                        r"one output .* \(config.json's \"num_labels\": 1, no problem_type"):
        label_names([{"label": v, "_line": i} for i, v in enumerate(values)], "d.jsonl")


def test_single_string_class(tmp_path):
    path = str(tmp_path / "d.jsonl")
    with pytest.raises(DataError) as e:
        label_names([{"label": "pos", "_line": 1}, {"label": "pos", "_line": 2}], path)
    assert path in str(e.value) and "'pos'" in str(e.value) and "two or more" in str(e.value)


def test_single_integer_class_is_rejected(tmp_path):
    path = str(tmp_path / "d.jsonl")
    with pytest.raises(DataError):
        label_names([{"label": 0, "_line": 1}, {"label": 0, "_line": 2}], path)


def test_integer_labels_name_every_class_up_to_the_max():
    rows = [{"label": 2, "_line": 1}, {"label": 0, "_line": 2}, {"label": 2, "_line": 3}]
    assert label_names(rows, "d.jsonl") == ["0", "1", "2"]
    assert label_ids(rows, ["0", "1", "2"], "d.jsonl") == [2, 0, 2]
    for first in (1, 10):  # numbered from 1 (or in tens): a class 0 no row has, trained as one (7 or 61 classes)
        with pytest.raises(DataError, match=rf"d.jsonl: integer labels are class ids 0..N-1, and the least here is "
                           rf"{first}; renumber them from 0, or use string labels"):
            label_names([{"label": first * k, "_line": k} for k in range(1, 7)], "d.jsonl")


def test_labels_that_differ_only_in_spaces_around_them_are_refused():
    """"pos" and "pos " made two classes that read alike in labels.json and every score."""
    rows = [{"label": "neg", "_line": 1}, {"label": "pos", "_line": 2}, {"label": "pos ", "_line": 3}]
    with pytest.raises(DataError) as e:
        label_names(rows, "d.jsonl")
    assert str(e.value) == "d.jsonl: labels 'pos' and 'pos ' differ only in spaces around them; spell each class one way"
    with pytest.raises(DataError) as e:  # found by a hunt: two classes, silently
        label_names([{"label": "caf\u00e9", "_line": 1}, {"label": "cafe\u0301", "_line": 2}], "d.jsonl")
    assert str(e.value) == ("d.jsonl: labels 'cafe\u0301' and 'caf\u00e9' differ only in how their characters are encoded "
                            "(Unicode normalization: an accent apart or joined); spell each class one way")
    assert label_names(rows[:2] + [{"label": "p os", "_line": 3}], "d.jsonl") == ["neg", "p os", "pos"]


def test_string_labels_are_sorted():
    rows = [{"label": "pos", "_line": 1}, {"label": "neg", "_line": 2}, {"label": "mid", "_line": 3}]
    names = label_names(rows, "d.jsonl")
    assert names == ["mid", "neg", "pos"]
    assert label_ids(rows, names, "d.jsonl") == [2, 1, 0]


def test_a_trained_classifiers_label_order_is_kept_where_the_data_has_its_labels():
    """As transformers' run_glue: sorted, a trained head (id2label positive, negative) started inverted and HF PEFT
    named the adapter's classes the other way round. Names match case and spaces aside (POS for pos), in the data's
    spelling; integer class ids stay ids (a checkpoint's names may mean other classes)."""
    rows = [{"label": "positive", "_line": 1}, {"label": "negative", "_line": 2}]
    assert label_names(rows, "d.jsonl", ["positive", "negative"]) == ["positive", "negative"]
    assert label_ids(rows, ["positive", "negative"], "d.jsonl") == [0, 1]
    assert label_names(rows, "d.jsonl", ["POSITIVE ", "Negative"]) == ["positive", "negative"]
    assert label_names(rows, "d.jsonl", ["positive", "neutral"]) == ["negative", "positive"]  # other names: sorted
    ids = [{"label": 1, "_line": 1}, {"label": 0, "_line": 2}]
    assert label_names(ids, "d.jsonl", ["positive", "negative"]) == ["0", "1"]


def test_a_trained_head_whose_classes_the_data_lacks_is_said_to_be_replaced():
    """Found by a hunt: a trained 3-class head given rows of two of its classes was replaced by a new 2-class head
    from scratch without a word (transformers' run_glue warns)."""
    from types import SimpleNamespace

    from edgepeft.training.data import replaced_head_note

    config = SimpleNamespace(num_labels=3, problem_type="single_label_classification")
    head = ["negative", "neutral", "positive"]
    assert replaced_head_note(config, ["negative", "positive"], "m", False, head) == (
        "m: its head was trained on the classes negative, neutral, positive (config.json's id2label), not the data's "
        "labels negative, positive; a head of 2 classes is trained from scratch in its place; label the rows with its "
        "classes, each present, to fine-tune its head as trained")
    assert "its 3 outputs are trained as these, in this order" in replaced_head_note(config, ["a", "b", "c"], "m", False, head)
    assert replaced_head_note(config, ["Negative", "neutral ", "positive"], "m", False, head) is None  # its names
    # found by a hunt: its class ids train its head as they are, but its names were lost without a word
    assert replaced_head_note(config, ["0", "1", "2"], "m", False, head) == (
        "m: its head names its classes negative, neutral, positive (config.json's id2label); the data's integer labels "
        "train them as class ids, which the adapter's labels (and classify) name 0, 1, 2; label the rows with its "
        "class names to keep them")
    assert replaced_head_note(config, ["0", "1", "2"], "m", False, ["0", "1", "2"]) is None  # its names are the ids


def test_eval_label_not_in_training_labels_names_eval_file_and_line(tmp_path):
    eval_path = write_lines(tmp_path / "eval.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "maybe"}])
    rows = read_jsonl(eval_path, "seq-cls")
    with pytest.raises(DataError) as e:
        label_ids(rows, ["neg", "pos"], eval_path)
    msg = str(e.value)
    assert msg == f"{eval_path}:2: label 'maybe' is not one of the training labels ['neg', 'pos']; use one of " \
                  "those, or add training rows labelled 'maybe' to --data"  # it named no fix


def test_eval_integer_label_beyond_training_max(tmp_path):
    eval_path = write_lines(tmp_path / "eval.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 3}])
    with pytest.raises(DataError, match=rf"{eval_path}:2: label 3 is not one of the training labels .*; use one of "
                                        r"those, or add training rows labelled 3 to --data$"):
        label_ids(read_jsonl(eval_path, "seq-cls"), ["0", "1"], eval_path)


def test_an_eval_label_of_another_kind_is_not_to_be_added_to_the_data(tmp_path):
    """A fixes hunt: "add training rows labelled 0.5 (or 5) to --data" where the training labels are strings: followed,
    --data was refused (relevance scores; labels mixing strings and integers). A string among integers alike."""
    from edgepeft.training.data import label_names

    def names_of(*labels):  # as training reads them from --data's rows
        return label_names([{"label": x, "_line": i} for i, x in enumerate(labels, 1)], "train.jsonl")

    strings = names_of("0", "1")  # string labels that read as class ids (a review): 2 is refused by --data, "2" taken
    for label, names, add in ((0.5, names_of("neg", "pos"), False), (5, names_of("neg", "pos"), False),
                              ("pos", names_of(0, 1), False), (0.5, names_of(0, 1), False), (2, names_of(0, 1), True),
                              (2, strings, False), ("2", strings, True)):
        eval_path = write_lines(tmp_path / "eval.jsonl", [{"text": "b", "label": label}])
        with pytest.raises(DataError, match=rf"{eval_path}:1: label {label!r} is not one of the training labels "
                                            rf".*; use one of those{', or add training rows' if add else '$'}"):
            label_ids(read_jsonl(eval_path, "seq-cls"), names, eval_path)


# --------------------------------------------------------------------------- Encoder
def test_a_completion_is_tokenized_as_the_text_reads_on_from_its_prompt(tmp_path, capsys):
    """A Llama-2-style (Metaspace) tokenizer starts a text tokenized alone with '▁': the completion trained on
    'Paris is\n nice', a space the data does not have (TRL tokenizes prompt + completion as one text)."""
    import transformers
    from test_text_transformers import llama2_tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(llama2_tokenizer(tmp_path / "tok"))
    enc = Encoder(tok, "causal-lm", max_length=64)
    (f,) = enc.encode([{"prompt": "Paris is\n", "completion": "nice", "_line": 1}], "d.jsonl")
    assert tok.decode(f["input_ids"], skip_special_tokens=True) == "Paris is\nnice"
    assert f["input_ids"][:-1] == tok("Paris is\nnice")["input_ids"] and f["input_ids"][-1] == tok.eos_token_id
    # found by a hunt: a prompt ending in a space, joined to the completion's first token ('▁nice'), trained "is  nice"
    # (two spaces) without a word; TRL warns: so does a note, naming the line
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    spm = Tokenizer(models.BPE(unk_token="<unk>"))
    spm.pre_tokenizer, spm.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    spm.train_from_iterator(["Paris is nice"] * 4, trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>", "</s>"]))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=spm, eos_token="</s>", unk_token="<unk>")
    assert tok.tokenize("Paris is ")[-1] == "▁" and tok.tokenize("Paris is nice")[-1] == "▁nice"
    capsys.readouterr()
    Encoder(tok, "causal-lm", max_length=64).encode([{"prompt": "Paris is ", "completion": "nice", "_line": 3}], "d.jsonl")
    assert capsys.readouterr().err.startswith("note: d.jsonl: line 3: the tokenizer joins the prompt's end to the "
                                              "completion's start (a prompt ending in a space), so the completion is "
                                              "tokenized alone: its tokens are not those of prompt + completion")


def test_rows_longer_than_the_tokenizers_length_get_no_indexing_warning(tmp_path, capfd):
    """Found by a hunt: transformers' "will result in indexing errors" was printed for rows the encoder cuts to
    --max-length anyway."""
    import transformers
    from test_text_transformers import llama2_tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(llama2_tokenizer(tmp_path / "tok"), model_max_length=8)
    (f,) = Encoder(tok, "causal-lm", max_length=8).encode([{"text": "Paris is nice " * 10, "_line": 1}], "d.jsonl")
    assert len(f["input_ids"]) == 8 and "indexing errors" not in capfd.readouterr().err


def test_prompt_completion_masks_the_prompt_and_ends_with_eos():
    tok = WordTokenizer()
    enc = Encoder(tok, "causal-lm", max_length=64)
    (f,) = enc.encode([{"prompt": "what is two", "completion": "four", "_line": 1}], "d.jsonl")
    prompt = tok("what is two")["input_ids"]  # BOS + 3 words
    completion = tok("four", add_special_tokens=False)["input_ids"]
    assert f["input_ids"] == prompt + completion + [tok.eos_token_id]
    assert f["labels"] == [IGNORE_INDEX] * len(prompt) + completion + [tok.eos_token_id]
    assert f["input_ids"][-1] == f["labels"][-1] == tok.eos_token_id


def test_plain_text_rows_learn_every_token_and_end_with_eos():
    tok = WordTokenizer()
    (f,) = Encoder(tok, "causal-lm", max_length=64).encode([{"text": "a b c", "_line": 1}], "d.jsonl")
    assert f["input_ids"] == f["labels"] == tok("a b c")["input_ids"] + [tok.eos_token_id]
    tok.vocab["</s>"] = tok.eos_token_id  # found by a hunt: a text ending in the eos got a second one
    text, pair = Encoder(tok, "causal-lm", max_length=64).encode(
        [{"text": "a b c </s>", "_line": 1}, {"prompt": "a", "completion": "b </s>", "_line": 2}], "d.jsonl")
    assert text["input_ids"] == f["input_ids"] and pair["input_ids"] == tok("a b")["input_ids"] + [tok.eos_token_id]


def test_truncation_keeps_the_first_completion_token():
    enc = Encoder(WordTokenizer(), "causal-lm", max_length=5)  # prompt = 4 tokens
    (f,) = enc.encode([{"prompt": "p q r", "completion": "x y z", "_line": 1}], "d.jsonl")
    assert len(f["input_ids"]) == len(f["labels"]) == 5
    assert f["labels"][:4] == [IGNORE_INDEX] * 4 and f["labels"][4] != IGNORE_INDEX


@pytest.mark.parametrize("max_length", [1, 3, 4])
def test_truncation_that_leaves_nothing_to_learn(max_length):
    enc = Encoder(WordTokenizer(), "causal-lm", max_length=max_length)
    rows = [{"prompt": "short", "completion": "ok", "_line": 1}, {"prompt": "p q r", "completion": "x", "_line": 7}]
    if max_length == 1:
        rows = rows[1:]
    with pytest.raises(DataError) as e:
        enc.encode(rows, "train.jsonl")
    assert str(e.value) == f"train.jsonl:7: nothing left to learn after truncating to --max-length {max_length} " \
                           "tokens; shorten the prompt or raise --max-length"
    with pytest.raises(DataError) as e:  # a text row has no prompt to shorten
        Encoder(WordTokenizer(), "causal-lm", max_length=1).encode([{"text": "a b c", "_line": 3}], "train.jsonl")
    assert str(e.value) == "train.jsonl:3: nothing left to learn after truncating to --max-length 1 tokens; raise " \
                           "--max-length"


def test_seq_cls_encode_checks_labels_against_training_names():
    enc = Encoder(WordTokenizer(), "seq-cls", max_length=3, labels=["neg", "pos"])
    feats = enc.encode([{"text": "one two three four", "label": "pos", "_line": 1}], "d.jsonl")
    assert feats == [{"input_ids": [1, 10, 11], "label": 1}]  # cut to max_length
    with pytest.raises(DataError, match=r"eval\.jsonl:4: label 'meh'"):
        enc.encode([{"text": "x", "label": "meh", "_line": 4}], "eval.jsonl")


def test_collate_causal_right_pads_with_pad_id_mask_and_ignore_index():
    tok = WordTokenizer(pad=5)
    enc = Encoder(tok, "causal-lm", max_length=64)
    feats = enc.encode([{"text": "a b c d", "_line": 1}, {"prompt": "q", "completion": "r", "_line": 2}], "d.jsonl")
    batch = enc.collate(feats)
    long, short = feats[0], feats[1]
    width = len(long["input_ids"])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape == (2, width)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["labels"].dtype == torch.long
    n = len(short["input_ids"])
    assert batch["input_ids"][1].tolist() == short["input_ids"] + [5] * (width - n)
    assert batch["attention_mask"].tolist() == [[1] * width, [1] * n + [0] * (width - n)]
    assert batch["labels"][1].tolist() == short["labels"] + [IGNORE_INDEX] * (width - n)
    assert batch["labels"][0].tolist() == long["labels"]


def test_collate_seq_cls_and_feature_extraction():
    tok = WordTokenizer(pad=5)
    enc = Encoder(tok, "seq-cls", max_length=64, labels=["a", "b"])
    batch = enc.collate(enc.encode([{"text": "x y z", "label": "b", "_line": 1}, {"text": "w", "label": "a", "_line": 2}], "d"))
    assert batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"][1].tolist()[2:] == [5, 5] and batch["attention_mask"][1].tolist() == [1, 1, 0, 0]

    enc = Encoder(tok, "feature-extraction", max_length=64)
    batch = enc.collate(enc.encode([{"text": "x", "positive": "p q r", "_line": 1},
                                    {"text": "x y z", "positive": "p", "_line": 2}], "d"))
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["input_ids"][0].tolist()[2:] == [5, 5]
    assert batch["positive_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["positive_ids"][1].tolist()[2:] == [5, 5]
    assert "labels" not in batch


def test_pad_id_falls_back_to_eos_then_zero():
    assert Encoder(WordTokenizer(pad=None, eos=2), "causal-lm", 8).pad_id == 2
    assert Encoder(WordTokenizer(pad=None, eos=None), "causal-lm", 8).pad_id == 0




def test_a_utf8_byte_order_mark_is_no_text(tmp_path):
    """Windows editors and Excel save "UTF-8" with a byte-order mark: the rows are the same as without one."""
    plain = write_lines(tmp_path / "plain.jsonl", [{"text": "a b", "label": "x"}, {"text": "c", "label": "y"}])
    marked = tmp_path / "bom.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + open(plain, "rb").read())
    assert read_jsonl(str(marked), "seq-cls") == read_jsonl(plain, "seq-cls")


def test_classifier_rows_truncate_as_transformers_keeping_sep():
    """--max-length cuts a long text as the tokenizer's own truncation does: [CLS] ... [SEP], as the runtime's
    tokenizer always ends a text, not the first max_length ids with [SEP] cut off."""
    import edgepeft
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(edgepeft.minilm_path())
    text = "the battery died after two days and the screen cracked the week after"
    want = tok(text, truncation=True, max_length=8)["input_ids"]
    assert want[-1] == tok.sep_token_id and len(want) == 8
    assert Encoder(tok, "seq-cls", 8, labels=["a"]).encode([{"text": text, "label": "a", "_line": 1}], "d") == \
        [{"input_ids": want, "label": 0}]
    pair = Encoder(tok, "feature-extraction", 8).encode([{"text": text, "positive": text, "_line": 1}], "d")
    assert pair == [{"input_ids": want, "positive_ids": want}]


@pytest.mark.parametrize("task", ["seq-cls", "feature-extraction"])
def test_a_max_length_that_leaves_no_text_is_refused(task):
    """BERT adds [CLS] and [SEP]: at --max-length 2 every row was those two ids (a classifier trained on no text),
    and at 1 transformers cut nothing (rows ran at full length)."""
    import edgepeft
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(edgepeft.minilm_path())
    for max_length in (1, 2):
        with pytest.raises(ConfigError) as e:
            Encoder(tok, task, max_length, labels=["a"])
        assert str(e.value) == (f"--max-length {max_length} leaves no token of text: the tokenizer adds 2 special "
                                "tokens to each text; pass --max-length 3 or more")
    (row,) = Encoder(tok, task, 3, labels=["a"]).encode([{"text": "hi there", "label": "a", "positive": "x", "_line": 1}],
                                                     "d")
    assert len(row["input_ids"]) == 3


def test_rows_longer_than_the_models_positions_are_refused_naming_the_fix():
    features = [{"input_ids": [1] * 10}, {"input_ids": [1] * 60}]
    rows = [{"_line": 1}, {"_line": 7}]
    check_positions(features, rows, "d.jsonl", 64, 4)  # 60 + 4 virtual tokens fit 64 positions
    with pytest.raises(ConfigError) as e:
        check_positions(features, rows, "d.jsonl", 64, 5)
    assert str(e.value) == ("d.jsonl:7: 60 tokens + 5 virtual tokens exceed the model's 64 positions; pass "
                            "--max-length 59 or less")
    with pytest.raises(ConfigError, match="num_virtual_tokens=64 leaves 0 of the model's 64 positions"):
        check_positions(features, rows, "d.jsonl", 64, 64)
    # fewer than an export needs: training allowed them, the export then refused the adapter
    check_positions(features[:1], rows, "d.jsonl", 14, 4)  # 10 tokens + 4 virtual ones fit 14 positions
    with pytest.raises(ConfigError) as e:
        check_positions([{"input_ids": [1] * 3}], rows, "d.jsonl", 64, 61)
    assert str(e.value) == ("num_virtual_tokens=61 leaves 3 of the model's 64 positions for the text, fewer than the 4 "
                            "its export needs; use 60 or fewer")
    # a hunt: a prompt that fills the room alone was told "--max-length 21 or less", which left nothing to learn
    with pytest.raises(ConfigError, match=r"^d.jsonl:7: 25 tokens \+ 3 virtual tokens exceed the model's 24 positions; its "
                                          r"prompt's 22 tokens leave no room: shorten the prompt$"):
        check_positions([{"input_ids": [1] * 25, "labels": [-100] * 22 + [1] * 3}], [{"_line": 7, "prompt": "p"}], "d.jsonl",
                        24, 3)
    check_positions(features, rows, "d.jsonl", None, 100)  # no position table: nothing to check
