"""Text helpers against transformers' semantics: stop strings, streamed text, and broken tokenizer files.

Stop strings match as transformers' ``StopStringCriteria`` does (special tokens count
as their text, a match may begin in the prompt and must end in a new token);
``stream_text`` flushes what it held back; a tokenizer file that cannot be read is a
``CorruptArtifactError`` naming it.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from edgepeft.runtimes import ConfigError, CorruptArtifactError, MissingDependencyError, Runtime
from edgepeft.runtimes.decoded import StopStrings
from file_checks import edited_json, unrecorded
from word_tokenizer import PROMPT, decode


def ids_of(tok, text: str, special: bool = False) -> list:
    return tok.encode(text, add_special_tokens=special).ids


def stops_after(text_rt, tok, stop: list, prompt: str, new: str) -> bool:
    prompt_ids = ids_of(tok, prompt)
    row = np.array([prompt_ids + ids_of(tok, new)], dtype=np.int64)
    checker = StopStrings(text_rt.tokenizer, stop, np.zeros(1, dtype=np.int64))  # no padding
    return bool(checker.hit(row, np.zeros(1, dtype=bool))[0])


def test_a_stop_string_may_begin_in_the_prompt(text_export, text_rt):
    _, tok, _ = text_export
    assert stops_after(text_rt, tok, ["w40 w50"], "w10 w40", "w50")  # starts in the prompt, ends in the new token
    assert not stops_after(text_rt, tok, ["w10"], "w10 w40", "w50")  # wholly in the prompt: not a stop
    assert not stops_after(text_rt, tok, ["w50 w60"], "w10 w40", "w50")  # not complete yet


def test_a_special_token_is_a_stop_string(text_export, text_rt):
    _, tok, _ = text_export
    assert decode(tok, ids_of(tok, "w20 </s>")) == "w20"  # decoded text drops it ...
    assert stops_after(text_rt, tok, ["</s>"], "w10", "w20 </s>")  # ... the stop check does not
    assert not stops_after(text_rt, tok, ["</s>"], "w10", "w20 w30")


def test_stop_strings_ignore_left_padding(text_export, text_rt):
    """A row's padding is no text: [PAD] before a short prompt cannot complete a stop string."""
    _, tok, _ = text_export
    prompt = [0, 0] + ids_of(tok, "w10")
    row = np.array([prompt + ids_of(tok, "w20")], dtype=np.int64)
    starts = np.array([2])  # the prompt's mask is [0, 0, 1]
    assert not StopStrings(text_rt.tokenizer, ["[PAD] [PAD] w10 w20"], starts).hit(row, np.zeros(1, dtype=bool))[0]
    assert StopStrings(text_rt.tokenizer, ["w10 w20"], starts).hit(row, np.zeros(1, dtype=bool))[0]


def test_stream_text_flushes_what_it_held_back(text_rt, monkeypatch):
    """A piece ending in an incomplete character (U+FFFD) waits for the next token; at the end it is sent."""
    tok = text_rt.tokenizer
    real = tok.decode
    expected = text_rt.generate_text(PROMPT, adapter="tok", max_new_tokens=4)

    def decode_with_partial_tail(ids, skip_special_tokens=True):
        return real(ids, skip_special_tokens) + ("\ufffd" if len(ids) == 4 else "")

    monkeypatch.setattr(tok, "decode", decode_with_partial_tail)
    pieces = list(text_rt.stream_text(PROMPT, adapter="tok", max_new_tokens=4))
    assert "".join(pieces) == expected + "\ufffd"
    assert pieces[-1].endswith("\ufffd")


@pytest.mark.parametrize("name, content, chat", [
    ("tokenizer.json", b'{"version": "1.0", "trunc', False),
    ("tokenizer_config.json", b"{bad", False),
    ("tokenizer_config.json", b"\xff\xfe\x00", False),
    ("chat_template.jinja", b"{% if %}", True),
    ("chat_template.jinja", b"{{ messages | no_such_filter }}", True),
    ("tokenizer.json", lambda t: t["post_processor"].update(single=[{"SpecialToken": {"id": "<zz>", "type_id": 0}}]),
     False),  # a token the file lacks: the library's PanicException (a BaseException) at every encode
], ids=["tokenizer-truncated", "config-not-json", "config-not-utf8", "template-syntax", "template-unknown-filter",
        "post-processor-unknown-token"])
def test_a_broken_tokenizer_file_is_named(text_export, tmp_path, name, content, chat):
    out = str(tmp_path / "out")
    shutil.copytree(text_export[0], out)
    path = os.path.join(out, "base", name)
    if callable(content):
        with edited_json(path) as data:
            content(data)
    else:
        with open(path, "wb") as f:
            f.write(content)
    rt = Runtime(out)
    with pytest.raises(CorruptArtifactError) as e:
        rt.generate_text(PROMPT, adapter="tok", max_new_tokens=2, chat=chat)
    fix = ("correct it in the model's folder and export into a fresh --out (the export copies it as it is; a damaged copy of OUT: "
           "copy the export's base folder again), or pass plain text (chat=False)") if chat else \
        ", or re-run `edgepeft export` into a fresh --out folder"  # a hunt: a template's re-export copied it again
    assert path in str(e.value) and str(e.value).endswith(fix)
    assert "cannot encode with it (no entry found for key)" in str(e.value) or not callable(content)
    assert rt.generate(np.array([[1, 10, 20]]), adapter="tok", max_new_tokens=2).shape == (1, 5)  # ids still work


def test_a_token_past_the_models_embeddings_names_the_tokenizer(text_export, tmp_path):
    """A hunt: a token added to the tokenizer and not to the model's embeddings was "outside the vocabulary of OUT/base;
    tokenize with the base model's tokenizer", which the text call had done (transformers: an IndexError)."""
    import re

    from tokenizers import Tokenizer

    out = str(tmp_path / "out")
    shutil.copytree(text_export[0], out)
    path = os.path.join(out, "base", "tokenizer.json")
    tok, vocab = Tokenizer.from_file(path), Runtime(out).vocab_size
    tok.add_tokens([f"extra{i}" for i in range(vocab + 1 - tok.get_vocab_size())])  # the last at the id vocab
    tok.save(path)
    extra = tok.id_to_token(vocab)
    with pytest.raises(ConfigError, match=f"^{re.escape(path)}: gives {extra!r} the id {vocab}, past the model's "
                                          f"{vocab} embeddings .*; resize the model's embeddings to the tokenizer"):
        Runtime(out).generate_text(f"{PROMPT} {extra}", adapter="tok", max_new_tokens=2)


@pytest.mark.parametrize("prompt", ["", ["w10", ""]], ids=["empty", "one-of-two-empty"])
def test_an_empty_prompt_is_refused(text_rt, prompt, monkeypatch):
    """Without a BOS token an empty text has no tokens: a clear error, not a shape complaint."""
    from edgepeft.runtimes import InvalidInputError

    monkeypatch.setattr(text_rt.tokenizer._tok, "post_processor", None)  # this tokenizer adds <s> otherwise
    with pytest.raises(InvalidInputError, match="a prompt is empty"):
        text_rt.generate_text(prompt, adapter="tok", max_new_tokens=2)


def test_text_with_half_a_character_is_refused_in_one_line(text_export, text_rt):
    """Bytes of another encoding on a command line (Latin-1 "café") reach Python as a lone surrogate: the tokenizers
    package raised a bare TypeError ("TextInputSequence must be str"), and `edgepeft run` printed a traceback. A
    stop string holding one never matched."""
    import subprocess
    import sys

    from edgepeft.runtimes import ConfigError, InvalidInputError

    for call in (lambda: text_rt.generate_text("caf\udce9", adapter="tok", max_new_tokens=2),
                 lambda: text_rt.tokenizer.encode(["w10", "\ud83d"])):
        with pytest.raises(InvalidInputError, match="holds half of a character .* pass it as UTF-8 text"):
            call()
    for odd in (123, None, ["w10", None]):  # TypeErrors from numpy or the tokenizers package
        with pytest.raises(InvalidInputError, match="encode takes a text or a list of texts \\(strings\\), got"):
            text_rt.tokenizer.encode(odd)
    for length in (2.5, "3"):
        with pytest.raises(ConfigError, match=f"max_length must be a whole number of tokens \\(None: no cut\\), got {length!r}"):
            text_rt.tokenizer.encode("w10", max_length=length)
    with pytest.raises(ConfigError, match="stop strings must be whole characters"):
        text_rt.generate_text(PROMPT, adapter="tok", max_new_tokens=2, stop=["\ud800"])
    done = subprocess.run([sys.executable, "-m", "edgepeft", "run", text_export[0].encode(), b"caf\xe9", b"--adapter",
                           b"tok"], capture_output=True)
    assert done.returncode == 1 and b"Traceback" not in done.stderr, done.stderr
    assert done.stderr.decode().splitlines() == [
        "error: text 'caf\\udce9' holds half of a character (a lone surrogate: bytes read in another encoding than "
        "UTF-8); pass it as UTF-8 text"]


def test_chat_templates_get_transformers_environment(text_export, tmp_path):
    """Loop controls and strftime_now, as transformers renders templates; a message the template cannot
    render is the caller's input error, not a corrupt file."""
    from edgepeft.runtimes import InvalidInputError

    out = str(tmp_path / "out")
    shutil.copytree(text_export[0], out)
    with open(os.path.join(out, "base", "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m['role'] }}: "
                "{{ m['content'].strip() }} {% endfor %}{{ strftime_now('%Y')[:0] }}assistant:")
    tok = Runtime(out).tokenizer
    two = [{"role": "user", "content": "w10"}, {"role": "user", "content": "w20"}]
    assert tok.apply_chat_template(two) == "user: w10 assistant:"
    with pytest.raises(InvalidInputError, match="cannot render these messages"):
        tok.apply_chat_template([{"role": "user", "content": 5}])  # no .strip() on a number
    # found by a hunt: a message that is no dict was skipped by many templates (left out, silently); half a
    # character was named in the template's own text; an IndexError or 1 // 0 of the template was a traceback;
    # a {% set %} inside {% generation %} leaked out of it (transformers' is a call block)
    with pytest.raises(InvalidInputError, match=r"chat message 1 is str 'w20', not a dict; give each message as"):
        tok.apply_chat_template([two[0], "w20"])
    assert tok.apply_chat_template(m for m in two) == "user: w10 assistant:"  # a generator was used up: no messages
    for one in (two[0], "w10"):
        with pytest.raises(InvalidInputError, match=r"chat messages are a list of .* dicts, got a (dict|str); pass \[message\]"):
            tok.apply_chat_template(one)
    with pytest.raises(InvalidInputError, match=r"chat message 1's text 'caf\\udce9' holds half of a character"):
        tok.apply_chat_template([two[0], {"role": "user", "content": [{"type": "text", "text": "caf\udce9"}]}])
    for body, error in (("{{ '{0}{1}'.format(1) }}", "IndexError"), ("{{ 1 // (messages|length - 2) }}", "ZeroDivisionError")):
        with open(os.path.join(out, "base", "chat_template.jinja"), "w") as f:
            f.write(body)
        with pytest.raises(InvalidInputError, match=f"cannot render these messages \\({error}: "):
            Runtime(out).tokenizer.apply_chat_template(two)
    with open(os.path.join(out, "base", "chat_template.jinja"), "w") as f:
        f.write("{% set c = 'outer' %}{% generation %}{% set c = 'inner' %}{{ c }}|{% endgeneration %}{{ c }}")
    assert Runtime(out).tokenizer.apply_chat_template(two) == "inner|outer"  # as transformers renders it


def test_a_stop_string_ending_in_a_multi_byte_character_is_found(tmp_path):
    """Byte-level BPE may spell one character over several tokens: the text before the newest token then ends in
    U+FFFD, which the newest token completes. The stop must match there (as transformers' StopStringCriteria),
    and not before its last byte arrives."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from edgepeft.runtimes.text import TextTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["it is warm today", "done and dusted"], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    text = TextTokenizer(str(tmp_path))
    for sentence, stop in (("It is 22°", "°"), ("Done 😀", "😀"), ("It is 22°C", "°C")):
        ids = np.array([ids_of(tok, sentence)], dtype=np.int64)
        stops = StopStrings(text, [stop], np.zeros(1, dtype=np.int64))
        assert ids.shape[1] > len(ids_of(tok, sentence[:-1])) + 1 or len(stop) > 1  # the last character: 2+ tokens
        assert stops.hit(ids, np.zeros(1, dtype=bool))[0], (sentence, stop)
        assert not stops.hit(ids[:, :-1], np.zeros(1, dtype=bool))[0], (sentence, stop)  # its last byte not there yet
        placeholder = StopStrings(text, ["\ufffd"], np.zeros(1, dtype=np.int64))  # a character begun is no U+FFFD
        assert not any(placeholder.hit(ids[:, :k], np.zeros(1, dtype=bool))[0] for k in range(1, ids.shape[1] + 1))


def test_chat_templates_are_sandboxed_and_json_keeps_order_and_text(text_export, tmp_path):
    """As transformers renders them: in an immutable sandbox (a template is code from the model's files), tojson
    keeping key order and non-ASCII text, tools and documents given as none, {% generation %} blocks parsed."""
    render, template = _template_render(text_export, tmp_path)

    call = [{"role": "user", "content": {"city": "Zürich", "unit": "c", "a": "<b>1</b>"}}]
    assert render("{{ messages[0]['content'] | tojson }}", call) == '{"city": "Zürich", "unit": "c", "a": "<b>1</b>"}'
    assert render("{% if tools is not none %}T{% endif %}{% if documents is none %}D{% endif %}", call) == "D"
    assert render("{% generation %}{{ messages | length }}{% endgeneration %}", call) == "1"
    messages = [{"role": "user", "content": "w10"}]
    with pytest.raises(CorruptArtifactError, match="chat_template.jinja: the chat template does what a template may not"):
        render("{{ messages.append(messages[0]) }}", messages)
    assert len(messages) == 1  # the caller's list is left as it was
    with pytest.raises(CorruptArtifactError, match="may not"):
        render("{{ cycler.__init__.__globals__.os.getcwd() }}", messages)


def _template_render(text_export, tmp_path):
    """A copy of the export, and a call rendering messages with a template written into it (and that file)."""
    out = str(tmp_path / "out")
    shutil.copytree(text_export[0], out)
    template = os.path.join(out, "base", "chat_template.jinja")

    def render(source, messages):
        with open(template, "w") as f:
            f.write(source)
        return Runtime(out).tokenizer.apply_chat_template(messages)

    return render, template


class _Streamed:
    """A runtime stand-in for stream_text: its tokenizer, and the ids its stream yields."""

    def __init__(self, tokenizer, new):
        self.tokenizer, self.new = tokenizer, new

    def stream(self, ids, mask, adapter, **generation):
        yield from (np.array([t]) for t in self.new)


def test_a_tokenizer_that_tidies_streams_all_its_text_and_stops_on_the_tokens_text(tmp_path):
    """clean_up_tokenization_spaces (not BPE) rewrites decoded text: " '" + "s" is "'s". stream_text dropped
    everything after such a rewrite (a prefix of the ids no longer decoded to a prefix of the text), and stop
    strings were matched on the tidied text, where transformers' StopStringCriteria reads the tokens' own (" ,")."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    from edgepeft.runtimes.text import TextTokenizer, stream_text

    words = ["[PAD]", "<s>", "</s>", "[UNK]", "I", "do", "n't", "know", ",", "it", "'", "s", "fine", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(words[:4])
    tok.save(str(tmp_path / "tokenizer.json"))
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump({"clean_up_tokenization_spaces": True}, f)
    tidy = TextTokenizer(str(tmp_path))
    new = tok.encode("I do n't know , it ' s fine .").ids
    assert tidy.decode(new) == "I don't know, it's fine."
    assert "".join(stream_text(_Streamed(tidy, new), "I")) == tidy.decode(new)
    comma = new.index(words.index(","))
    for stop, at in ((" ,", comma), ("n't", 2), (" .", len(new) - 1)):
        hits = [bool(StopStrings(tidy, [stop], np.zeros(1, dtype=np.int64)).hit(np.array([new[:k + 1]]),
                                                                               np.zeros(1, dtype=bool))[0])
                for k in range(len(new))]
        assert hits.index(True) == at, stop


def test_a_chat_template_sees_every_named_special_token(text_export, tmp_path):
    """transformers 5 gives a template every *_token the tokenizer config names (Gemma's image_token, boi_token);
    the runtime gave only bos/eos/unk/sep/pad/cls/mask and an extra_special_tokens dict, so they rendered empty."""
    from file_checks import edit_json

    out = str(tmp_path / "out")
    shutil.copytree(text_export[0], out)
    edit_json(os.path.join(out, "base", "tokenizer_config.json"), image_token="w99")
    with open(os.path.join(out, "base", "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}{{ m['role'] }}: {{ image_token }} {{ m['content'] }} {% endfor %}assistant:")
    assert Runtime(out).tokenizer.apply_chat_template([{"role": "user", "content": "w10"}]) == "user: w99 w10 assistant:"


def test_a_template_sees_plain_data_and_what_transformers_refuses_is_refused(text_export, tmp_path, monkeypatch):
    """Found by a hunt, each as transformers 5 renders it: a str-Enum role rendered as 'Role.USER' and a numpy
    number broke tojson (messages are handed over as JSON's types, an object as '<Type>'); a namespace storing a
    '_' name, or a template taking in others ({% include %}, blamed on the messages), rendered; named templates
    with none named default refused plain text too; a jinja2 before 3.1.6 (a sandbox escape) was used."""
    import dataclasses
    import enum

    import jinja2

    from edgepeft.runtimes import ConfigError

    render, template = _template_render(text_export, tmp_path)

    class Role(str, enum.Enum):
        USER = "user"

    @dataclasses.dataclass
    class Message:
        role: str
        content: object

    each = "{% for m in messages %}{{ m.role }}:{{ m.content | tojson }} {% endfor %}"
    import types

    messages = [{"role": Role.USER, "content": {"t": np.float32(0.5), "n": np.int64(3), "a": np.zeros(2)}},
                types.MappingProxyType({"role": "assistant", "content": "w10"})]
    assert render(each, messages) == 'user:{"t": 0.5, "n": 3, "a": "<ndarray>"} assistant:"w10" '
    assert render(each, [Message("assistant", "w10")]) == 'assistant:"w10" '
    assert render("{% set ns = namespace(n=dict(a=1)) %}{{ ns.n.a }}", messages) == "1"
    for body in ("{% set ns = namespace(_seen=0) %}", "{% set ns = namespace() %}{% set ns._seen = 1 %}"):
        with pytest.raises(CorruptArtifactError, match="does what a template may not .*a namespace may not store '_seen'"):
            render(body, messages)
    for body in ("{% include 'x' %}", "{% import 'x' as y %}", "{% extends 'x' %}"):
        with pytest.raises(CorruptArtifactError, match=f"{template}: the chat template takes in other templates"):
            render(body, messages)
    unrecorded(os.path.dirname(os.path.dirname(template)), "chat_template.jinja")  # as exported without one
    from file_checks import edit_json

    out = os.path.dirname(os.path.dirname(template))
    edit_json(os.path.join(out, "base", "tokenizer_config.json"), chat_template=[{"name": "tool_use", "template": "T"}])
    rt = Runtime(out)
    assert rt.tokenizer.encode(PROMPT)[0].shape[1] > 0 and rt.generate_text(PROMPT, adapter="tok", max_new_tokens=1)
    with pytest.raises(CorruptArtifactError, match="none named default"):
        rt.tokenizer.apply_chat_template(messages)
    monkeypatch.setattr(jinja2, "__version__", "3.1.5")
    with pytest.raises(MissingDependencyError, match=r"jinja2 3.1.6 or later .*, not 3.1.5: pip install -U 'jinja2>=3.1.6'"):
        render("{{ 1 }}", messages)


def test_encode_takes_what_transformers_takes_and_refuses_the_rest_in_one_line(text_rt, tmp_path, monkeypatch):
    """Found by a hunt: max_length=0 cut nothing (transformers gives no tokens), 2**64 was the tokenizers package's
    OverflowError; pad_id was never checked (NaN padded with -2**63, 'x' was numpy's ValueError); bytes were read as
    ints ("got int"), a set in hash order and a dict by its keys; padding_side '' took the default; load_adapter('')
    read the app's directory and advised removing it."""
    import transformers as tf

    from edgepeft.runtimes import ArtifactNotFoundError, ConfigError, InvalidInputError

    tok = text_rt.tokenizer
    want = tf.PreTrainedTokenizerFast(tokenizer_file=os.path.join(text_rt.base_dir, "tokenizer.json"))
    for length in (0, 1, 3, 2**64):
        assert tok.encode(PROMPT, add_special_tokens=False, max_length=length)[0][0].tolist() == \
            want(PROMPT, add_special_tokens=False, truncation=True, max_length=min(length, 10**6))["input_ids"]
    for pad in ("x", 2**63, float("nan"), 1.5, True, -1):
        with pytest.raises(ConfigError, match=r"^pad_id must be a token id \(a whole number >= 0\), got "):
            tok.encode(["w10", PROMPT], pad_id=pad)
    for odd in (b"w10", {"w10", "w11"}, {"w10": 1}, (t for t in ["w10"])):
        with pytest.raises(InvalidInputError, match=f"^encode takes a text or a list of texts \\(strings\\), got "
                                                    f"{type(odd).__name__}$"):
            tok.encode(odd)
    assert tok.encode(("w10", "w11"))[0].tolist() == tok.encode(["w10", "w11"])[0].tolist()
    with pytest.raises(ConfigError, match="^padding_side must be 'left' or 'right', got ''$"):
        tok.encode("w10", padding_side="")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArtifactNotFoundError, match=r"^'': an empty path; pass a folder from OUT/adapters/"):
        text_rt.load_adapter("")


def test_text_pairs_are_refused_where_they_were_dropped_or_misread(text_rt, tmp_path):
    """Found by a hunt: a training row's "text_pair" was dropped (a cross-encoder trained on its queries alone, rc 0),
    fields no task reads passed without a word, a list of pairs was "got list", and encode(text, pair) a TypeError
    from the tokenizers package. Pairs are classify's and seq-cls training's now (test_text_pairs.py); elsewhere
    each is said."""
    from edgepeft.errors import DataError
    from edgepeft.runtimes import ConfigError, InvalidInputError
    from edgepeft.runtimes.text import _texts
    from edgepeft.training.data import ignored_fields, read_jsonl

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"text": "how tall", "text_pair": "8,849 m", "positive": "b"}) + "\n")
    with pytest.raises(DataError, match=r'pairs.jsonl:1: "text_pair": text pairs train a classifier \(a cross-encoder: '
                                        r'--task seq-cls with "text", "text_pair" and "label"\), not feature-extraction'):
        read_jsonl(str(data), "feature-extraction")
    data.write_text(json.dumps({"text": "a", "label": 1, "id": 7, "source": "web"}) + "\n")
    assert ignored_fields(read_jsonl(str(data), "seq-cls"), "d", "seq-cls") == \
        'd: rows carry "id", "source", which no task trains on (ignored)'
    data.write_text(json.dumps({"text": "a", "label": 1, "negative": "b"}) + "\n")  # feature-extraction's field
    assert ignored_fields(read_jsonl(str(data), "seq-cls"), "d", "seq-cls") == ('d: rows carry "negative", which '
        "seq-cls training ignores; for a model that uses it, train with --task feature-extraction")
    for pairs in ([("how tall", "8,849 m")], [["a", "b"]], {"text": "a", "text_pair": "b"}):
        with pytest.raises(InvalidInputError, match=r"text pairs are classify's \(a cross-encoder's: a seq-cls export\), "
                                                    r"not embed's$"):
            _texts(pairs)  # embed's reading of its texts
    with pytest.raises(ConfigError, match=r"^add_special_tokens must be True or False, got 'b' \(text pairs: encode_pairs\)$"):
        text_rt.tokenizer.encode("a", "b")


def test_a_base_replaced_or_moved_before_the_first_text_call_is_named(text_export, tmp_path):
    """Found by a hunt: the tokenizer is read at the first text call, not when the Runtime opens: OUT replaced by an
    export of the same weights and another tokenizer was encoded with the new one, silently (the fingerprint is the
    same), and OUT moved was told it has no tokenizer and to export again."""
    from edgepeft.runtimes import ArtifactNotFoundError

    out = str(tmp_path / "out")
    shutil.copytree(text_export[0], out)

    def replaced():  # as an export renames a new base in
        os.rename(os.path.join(out, "base"), str(tmp_path / "old"))
        shutil.copytree(str(tmp_path / "old"), os.path.join(out, "base"))
        shutil.rmtree(str(tmp_path / "old"))

    rt = Runtime(out)
    replaced()
    with open(os.path.join(out, "base", "genai_config.json"), "a") as f:  # --ops's, say: no file text calls read
        f.write(" ")
    assert rt.generate_text(PROMPT, max_new_tokens=2)  # the same tokenizer (an export into OUT keeps it): served
    rt = Runtime(out)
    replaced()
    with edited_json(os.path.join(out, "base", "tokenizer_config.json")) as config:  # another export's tokenizer
        config["chat_template"] = "{{ messages[0]['content'] }}"
    with pytest.raises(CorruptArtifactError, match=f"^{out}/base: replaced since this Runtime opened it, by an export "
                                                   "of another tokenizer or settings"):
        rt.generate_text(PROMPT, max_new_tokens=2)
    assert Runtime(out).generate_text(PROMPT, max_new_tokens=2)  # the fix
    moved = Runtime(out)
    os.rename(out, str(tmp_path / "moved"))
    with pytest.raises(ArtifactNotFoundError, match=f"^{out}/base: moved or removed since this Runtime opened it"):
        moved.tokenizer


def test_switches_take_numpy_bools_and_refuse_anything_else(text_export):
    """Found by a hunt: "no" or "False" (strings) read as true (chat, load_adapters, decode's tidy), decode's
    skip_special_tokens="no" was the tokenizers package's TypeError, and numpy's True was refused by encode."""
    out = text_export[0]
    rt = Runtime(out)
    assert rt.tokenizer.encode(PROMPT, add_special_tokens=np.bool_(False))[0].tolist() == \
        rt.tokenizer.encode(PROMPT, add_special_tokens=False)[0].tolist()
    ids = rt.tokenizer.encode(PROMPT)[0][0]
    for call, name in ((lambda v: rt.tokenizer.decode(ids, skip_special_tokens=v), "skip_special_tokens"),
                       (lambda v: rt.tokenizer.decode(ids, tidy=v), "tidy"),
                       (lambda v: rt.generate_text(PROMPT, chat=v, max_new_tokens=1), "chat"),
                       (lambda v: Runtime(out, load_adapters=v), "load_adapters")):
        call(np.bool_(False))
        with pytest.raises(ConfigError, match=f"^{name} must be True or False, got 'no'$"):
            call("no")
