"""Text in and out as transformers gives it, where tokenizers and chat templates differ from the plain files.

A Llama-2-style tokenizer (byte fallback, ``tokenizer_class`` LlamaTokenizer, which transformers 5 rebuilds):
the export writes the tokenizer transformers runs, ``stream_text`` never drops text when a byte run turns to
U+FFFD, stop strings read a byte token's own text. Chat templates get what transformers hands them: named
templates, messages without None values, every special token, reasoning under its aliases, and a template's
own refusal is the caller's input error.
"""
from __future__ import annotations

import json
import os
import shutil
import types

import numpy as np
import pytest
import torch

from peft_refs import lora_adapter
from word_tokenizer import PROMPT, TEMPLATE

from edgepeft.errors import ArtifactNotFoundError, ConfigError, CorruptArtifactError, InvalidInputError
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime
from edgepeft.runtimes import text as text_calls
from edgepeft.runtimes.decoded import GrowingText, OpenBytes, StopStrings
from edgepeft.runtimes.text import TextTokenizer

TEXTS = ["Hello world, how are you today?", "the quick brown fox", "It is 22 degrees", "Paris is nice\nyes"] * 10
TRICKY = ["Hello world", " Hello", "Hello  world", "a\nb", "Paris<s>is", "Hi </s> there", "é€😀", " "]


def llama2_tokenizer(folder, tokenizer_class="LlamaTokenizer") -> str:
    """A Llama-2-style tokenizer.json (Prepend + Replace normalizer, BPE with byte fallback, ByteFallback decoder)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizer
    learner.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    learnt = json.loads(learner.to_str())["model"]
    vocab = sorted(learnt["vocab"], key=learnt["vocab"].get)
    vocab += [b for b in (f"<0x{i:02X}>" for i in range(256)) if b not in learnt["vocab"]]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": tokenizer_class, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "add_bos_token": True, "legacy": False}, f)
    return str(folder)


def test_the_export_writes_the_tokenizer_transformers_runs(tmp_path):
    """transformers 5 rebuilds LlamaTokenizer without the file's Prepend normalizer: the copied file gave other
    ids for ' Hello' and for text after <s> or </s> (and so other chat prompts and generations)."""
    import transformers as tf

    base = llama2_tokenizer(tmp_path / "base")
    hf = tf.AutoTokenizer.from_pretrained(base)
    assert TextTokenizer(base).encode(" Hello")[0].tolist()[0] != hf(" Hello")["input_ids"]  # the file as it is
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=8, intermediate_size=64, vocab_size=len(hf), pad_token_id=0, bos_token_id=1,
                            eos_token_id=2, max_position_embeddings=64)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(base)
    out = str(tmp_path / "out")
    export([lora_adapter(tmp_path / "lora", base, "causal-lm", 3, r=2, target_modules=["q_proj"])], out, names=["a"])
    ours = Runtime(out).tokenizer
    for text in TRICKY:
        want = hf(text)["input_ids"]
        assert ours.encode(text)[0].tolist()[0] == want, text
        assert ours.decode(want) == hf.decode(want, skip_special_tokens=True), text
    with pytest.raises(InvalidInputError, match="decode takes one sequence of token ids"):  # int() read 5.7 as 5
        ours.decode([5.7, 6])
    for bad in ([-1, 5], [2**40]):  # OverflowError (2**40 was told "integers >= 0")
        with pytest.raises(InvalidInputError, match=r"decode takes token ids from 0 to 2\*\*32 - 1, got "):
            ours.decode(bad)
    assert ours.decode([]) == ""


def test_the_exported_tokenizer_config_is_the_same_offline_or_not_and_keeps_legacy(tmp_path):
    """save_pretrained wrote local_files_only (HF_HUB_OFFLINE's: a Runtime opened before a re-export refused the same
    tokenizer as another) and dropped a Llama-2 config's "legacy": true (OUT/base reloaded as not legacy: other ids)."""
    import transformers as tf

    from edgepeft.exporters.base_graph import write_tokenizer

    source = llama2_tokenizer(tmp_path / "source")
    with open(os.path.join(source, "tokenizer_config.json")) as f:
        config = json.load(f)
    with open(os.path.join(source, "tokenizer_config.json"), "w") as f:
        json.dump({**config, "legacy": True}, f)
    os.makedirs(stage := str(tmp_path / "stage"))
    write_tokenizer(source, stage)
    with open(os.path.join(stage, "tokenizer_config.json")) as f:
        written = json.load(f)
    assert "local_files_only" not in written and "is_local" not in written and written.get("legacy") is True
    for text in ("hello</s>there", *TRICKY):
        assert tf.AutoTokenizer.from_pretrained(stage)(text)["input_ids"] == tf.AutoTokenizer.from_pretrained(source)(text)["input_ids"]


def _byte_run(tok):
    """Tokens whose decode changes text already shown: a newline byte, then a byte that begins no character."""
    words = tok._tok.encode("is the quick", add_special_tokens=False).ids
    return [tok._tok.token_to_id(t) for t in ["▁Par", "<0x0A>", "<0xE6>"]] + words + [tok._tok.token_to_id("<0xE6>")]


def test_stream_text_keeps_streaming_after_a_byte_run_turns_to_replacement_characters(tmp_path):
    """Byte-fallback decoders make every byte of an invalid run U+FFFD, the newline shown before included:
    the shown text was no longer a prefix, and nothing more came (not even the final flush)."""
    tok = TextTokenizer(llama2_tokenizer(tmp_path / "tok"))
    chosen = _byte_run(tok)
    assert tok.decode(chosen[:2]) == "Par\n" and tok.decode(chosen[:3]).startswith("Par\ufffd\ufffd")
    rt = types.SimpleNamespace(tokenizer=tok, stream=lambda ids, mask, adapter, **g: (np.array([t]) for t in chosen))
    pieces = list(text_calls.stream_text(rt, "Hello"))
    assert "".join(pieces) == tok.decode(chosen)
    assert len(pieces) > 2  # streamed, not held to the end


def test_stream_text_holds_back_a_byte_run_a_special_token_interrupts(tmp_path):
    """stream_text decodes without special tokens, so <0x28> <unk> <0xE6> is one byte run whose '(' turns to
    U+FFFD: the run was held back only up to <unk>, '(' was shown, and everything after it was lost."""
    tok = TextTokenizer(llama2_tokenizer(tmp_path / "tok"))
    chosen = [tok._tok.token_to_id(t) for t in ["▁Par", "<0x28>", "<unk>", "<0xE6>", "▁the▁quick▁", "how"]]
    rt = types.SimpleNamespace(tokenizer=tok, stream=lambda ids, mask, adapter, **g: (np.array([t]) for t in chosen))
    pieces = list(text_calls.stream_text(rt, "Hello"))
    assert "".join(pieces) == tok.decode(chosen) == "Par\ufffd\ufffd the quick how"
    assert len(pieces) > 2


def test_stream_text_keeps_a_special_token_that_decode_keeps(tmp_path):
    """A special added token that is normalized (its text in the vocabulary is the normalizer's, "▁<|User|>") is not
    skipped by the Rust library's decode, so generate_text keeps it; stream_text left every special id out itself."""
    from tokenizers import AddedToken, Tokenizer

    base = llama2_tokenizer(tmp_path / "tok", "PreTrainedTokenizerFast")
    tokenizer = Tokenizer.from_file(os.path.join(base, "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken("<|User|>", normalized=True, special=True)])
    tokenizer.save(os.path.join(base, "tokenizer.json"))
    tok = TextTokenizer(base)
    chosen = tok._tok.encode("how are you <|User|> hello there </s> is", add_special_tokens=False).ids
    assert "<|User|> hello" in tok.decode(chosen) and "</s>" not in tok.decode(chosen)  # <|User|> kept, </s> skipped
    user = max(tok.special_ids)  # <|User|>, the last added: special still (transformers' all_special_ids: embed's prompt length)
    assert user in tok.special_ids and user not in tok.skipped_ids and 2 in tok.skipped_ids
    rt = types.SimpleNamespace(tokenizer=tok, stream=lambda ids, mask, adapter, **g: (np.array([t]) for t in chosen))
    assert "".join(text_calls.stream_text(rt, "Hello")) == tok.decode(chosen)


def test_split_special_tokens_encodes_special_token_text_as_text(tmp_path):
    """tokenizer_config.json's split_special_tokens: transformers encodes '</s>' in a prompt as plain text (a defence
    against prompt injection); the runtime made it the control token."""
    import transformers as tf

    folder = llama2_tokenizer(tmp_path / "tok", tokenizer_class="PreTrainedTokenizerFast")
    text = "Hello</s> the<s>"
    plain = TextTokenizer(folder).encode(text)[0][0].tolist()
    config = os.path.join(folder, "tokenizer_config.json")
    with open(config) as f:
        settings = json.load(f)
    with open(config, "w") as f:
        json.dump({**settings, "split_special_tokens": True}, f)
    want = tf.AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
    assert TextTokenizer(folder).encode(text)[0][0].tolist() == want != plain


def test_stop_strings_read_a_byte_tokens_own_text_as_transformers(tmp_path):
    """<0xE6> then <0x0A>: transformers' StopStringCriteria sees '\\n' (each token's own text); the decoder's
    whole-run U+FFFD hid it, so generation ran past the stop, at the end of the text and (later) inside it."""
    import transformers as tf
    from transformers.generation.stopping_criteria import StopStringCriteria

    folder = llama2_tokenizer(tmp_path / "tok", tokenizer_class="PreTrainedTokenizerFast")
    ours, hf = TextTokenizer(folder), tf.AutoTokenizer.from_pretrained(folder)
    prompt = hf("Hello")["input_ids"]
    for new, stop in ([["<0xE6>", "<0x0A>"], "\n"], [["<0xE6>", "<0x41>"], "A"], [["▁Par", "<0x0A>"], "\n"],
                      [["<0xE6>", "▁Par"], "Par"], [["<0xE6>", "<0x0A>"], "A"]):
        row = np.array([prompt + [ours._tok.token_to_id(t) for t in new]])
        got = StopStrings(ours, [stop], np.zeros(1, np.int64)).hit(row, np.zeros(1, bool))[0]
        assert got == bool(StopStringCriteria(hf, [stop])(torch.from_numpy(row), None)[0]), (new, stop)
    # a run closed by a token of another kind, not valid UTF-8 (an emoji cut short): its newline or letter was
    # U+FFFD too, so the stop after it was never found; each step as transformers
    paris = hf("Paris", add_special_tokens=False)["input_ids"]
    for new, stop in ([["<0xF0>", "<0x9F>", "<0x98>", "<0x0A>"], "\n Paris"], [["<0xBA>", "<0x4D>"], "M Paris"]):
        new = [ours._tok.token_to_id(t) for t in new] + paris
        for k in range(1, len(new) + 1):
            row = np.array([prompt + new[:k]])
            got = StopStrings(ours, [stop], np.zeros(1, np.int64)).hit(row, np.zeros(1, bool))[0]
            assert got == bool(StopStringCriteria(hf, [stop])(torch.from_numpy(row), None)[0]), (new[:k], stop)
        assert got, stop


@pytest.mark.parametrize("stop", ["", [""], ["w10", ""]])
def test_an_empty_stop_string_is_refused(text_rt, stop):
    """"" is found after any token ([""] ended every row after one token; "" was ignored)."""
    with pytest.raises(ConfigError, match="stop strings must not be empty"):
        text_rt.generate_text(PROMPT, adapter="tok", max_new_tokens=3, stop=stop)
    with pytest.raises(ConfigError, match="^stop strings must not hold U\\+FFFD"):  # a hunt: it matched any stray byte
        text_rt.generate_text(PROMPT, adapter="tok", max_new_tokens=3, stop=[f"{stop}\ufffd"])


def _folder(text_export, tmp_path, config: dict, special_map: dict | None = None) -> str:
    folder = str(tmp_path / "tok")
    os.makedirs(folder)
    shutil.copy(os.path.join(text_export[0], "base", "tokenizer.json"), folder)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **config}, f)
    if special_map:
        with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
            json.dump(special_map, f)
    return folder


@pytest.mark.parametrize("config, special_map, messages", [
    ({"chat_template": [{"name": "default", "template": TEMPLATE}, {"name": "tool_use", "template": "T"}]}, None,
     [{"role": "user", "content": "w10"}]),
    ({"chat_template": "{% for m in messages %}{% if 'tool_calls' in m %}T{% endif %}{{ m['content'] }}{% endfor %}"},
     None, [{"role": "assistant", "content": "w10", "tool_calls": None}]),
    ({"chat_template": "{{ pad_token }}|{{ unk_token }}|{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}",
      "pad_token": "[PAD]"}, {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "unk_token": "[UNK]"},
     [{"role": "user", "content": "w10"}]),
    ({"chat_template": "{% for m in messages %}{{ m.reasoning_content }}|{{ m.thinking }}|{{ m.content }}{% endfor %}"},
     None, [{"role": "assistant", "content": "w10", "reasoning": "w20"}]),
    ({"chat_template": "{{ bos_token }}|{{ image_token }}|{{ messages[0]['content'] }}", "bos_token": "<s>",
      "extra_special_tokens": {"image_token": "<unk>"}}, {"bos_token": "</s>"},  # both were others than transformers'
     [{"role": "user", "content": "w10"}]),
], ids=["named-templates", "none-values-dropped", "every-special-token", "reasoning-aliases",
        "extra-special-tokens, special_tokens_map.json first"])
def test_chat_templates_render_as_transformers_renders_them(text_export, tmp_path, config, special_map, messages):
    import transformers as tf

    folder = _folder(text_export, tmp_path, config, special_map)
    want = tf.AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False,
                                                                        add_generation_prompt=True)
    assert TextTokenizer(folder).apply_chat_template(messages) == want


REQUIRES_SYSTEM = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('Start with a system message') }}{% endif %}"


def test_chat_template_refusals_name_the_file(text_export, tmp_path, capsys):
    """Named templates without a default are the file's fault (found when a chat is rendered: plain text is
    fine); a template's raise_exception is the caller's."""
    folder = _folder(text_export, tmp_path, {"chat_template": [{"name": "tool_use", "template": "T"}]})
    with pytest.raises(CorruptArtifactError, match=r"tokenizer_config.json: has chat templates named tool_use but none "
                       "named default"):
        TextTokenizer(folder).apply_chat_template([{"role": "user", "content": "w10"}])
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": REQUIRES_SYSTEM}, f)
    with pytest.raises(InvalidInputError, match=r"tokenizer_config.json: the chat template refuses these messages \(Start "
                       r"with a system message\); give each message the role and the text content the template expects, "
                       r"or pass plain text \(chat=False\)$"):
        TextTokenizer(folder).apply_chat_template([{"role": "user", "content": "w10"}])
    # a chat hunt: `run --chat`, which sends one user message, was given no fix it could follow
    from training_helpers import cli_error, cli_ok

    out = shutil.copytree(text_export[0], tmp_path / "out")
    (out / "base" / "chat_template.jinja").write_text(REQUIRES_SYSTEM)  # an edit on the device: served
    assert cli_error(capsys, "run", out, "--adapter", "tok", "--chat", "w10").endswith(
        "(Start with a system message); give each message the role and the text content the template expects, or pass "
        "plain text (no --chat)")
    cli_ok(capsys, "run", out, "--adapter", "tok", "w10", "--max-new-tokens", "2")  # which runs


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_a_base_without_tokenizer_files_exports_no_tokenizer(tiny_base, tmp_path, arch):
    """transformers 5 builds a placeholder tokenizer for a folder without tokenizer files (special tokens only:
    every BERT word [UNK], every GPT-2 text no tokens); exported, it gave confident answers to any text."""
    base = tiny_base(arch)
    assert not any(os.path.exists(os.path.join(base, f)) for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
    out = str(tmp_path / "out")
    task, targets = ("causal-lm", ["q_proj"]) if arch == "llama" else ("feature-extraction", ["query"])
    adapter = lora_adapter(tmp_path / "qv", base, task, 4, r=2, target_modules=targets)
    export([adapter], out, names=["qv"])
    assert not os.path.exists(os.path.join(out, "base", "tokenizer.json"))
    rt = Runtime(out)
    with pytest.raises(ArtifactNotFoundError, match=r"tokenizer.json: missing \(the export has no tokenizer, or the file "
                                                    r"was removed\); copy the export's base folder again, or pass token "
                                                    "ids, or export from a base folder that has tokenizer.json into a "
                                                    "fresh --out folder$"):
        rt.tokenizer


def test_a_tokenizer_transformers_cannot_load_is_said_and_copied_as_it_is(tiny_base, tmp_path, capsys, monkeypatch):
    """It was left out or copied without a word (a tokenizer class of another package, remote code, no network)."""
    import transformers as tf

    base = str(tmp_path / "base")
    shutil.copytree(tiny_base("llama"), base)
    llama2_tokenizer(base)
    real = tf.AutoTokenizer.from_pretrained

    def refuse(source, *args, **kwargs):  # as transformers refuses a tokenizer that needs trust_remote_code
        if str(source) == base:
            raise ValueError("this tokenizer needs trust_remote_code=True")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(tf.AutoTokenizer, "from_pretrained", refuse)
    out = str(tmp_path / "out")
    export([lora_adapter(tmp_path / "qv", base, "causal-lm", 4, r=2, target_modules=["q_proj"])], out, names=["qv"],
           verbose=True)
    assert "note: transformers cannot load the tokenizer of" in capsys.readouterr().err  # a note: on stderr
    assert os.path.isfile(os.path.join(out, "base", "tokenizer.json"))  # the folder's files, as they are
    from file_checks import add_bom

    monkeypatch.undo()  # a hunt: a file neither transformers nor the runtime reads (a byte-order mark) was copied, and
    config = os.path.join(base, "tokenizer_config.json")  # every text call said "re-run export", which copied it again
    add_bom(config)
    from edgepeft.exporters import base_graph

    def traced(*args, **kwargs):  # a review: refused only after the tracing (minutes on a large model)
        raise AssertionError("the base was traced before its tokenizer was checked")

    monkeypatch.setattr(base_graph, "export_graph", traced)
    with pytest.raises(ConfigError, match=f"^{config}: tokenizer config is not valid JSON .*; "
                       "transformers cannot load the tokenizer either: correct it \\(a byte-order mark"):
        export([str(tmp_path / "qv")], str(tmp_path / "bom-out"), verbose=True)
    assert "copied as they are" not in "".join(capsys.readouterr())  # not said of files then refused
    assert not os.path.exists(tmp_path / "bom-out")


@pytest.mark.parametrize("tidy", [True, False, None])
@pytest.mark.parametrize("model", ["WordPiece", "BPE"])
def test_decoded_text_is_tidied_as_transformers_tidies_it(tmp_path, model, tidy):
    """clean_up_tokenization_spaces: true (older configs) tidies " ," and " n't" in transformers' decode, except for
    a BPE model; the runtime never tidied."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    words = ["[UNK]", "[CLS]", "[SEP]", "i", "do", "n", "'", "t", "know", ",", "ok", "?", "!", "."]
    if model == "WordPiece":
        tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
        tok.decoder = decoders.WordPiece()
    else:
        tok = Tokenizer(models.BPE({w: i for i, w in enumerate(words)}, [], unk_token="[UNK]"))
        tok.decoder = decoders.WordPiece()  # joins with spaces as WordPiece does: the tidy step is what differs
    tok.normalizer, tok.pre_tokenizer = normalizers.BertNormalizer(), pre_tokenizers.BertPreTokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}
    if tidy is not None:
        config["clean_up_tokenization_spaces"] = tidy
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ids = tok.encode("i do n ' t know , ok ? !").ids
    ours = TextTokenizer(str(tmp_path)).decode(ids)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path).decode(ids)
    assert ours == reference, (ours, reference)
    assert (ours == "i don't know, ok?!") == (tidy is True and model == "WordPiece")


def test_a_max_length_shorter_than_the_special_tokens_is_refused():
    """MiniLM's [CLS] and [SEP] with max_length 1: an OverflowError traceback from the tokenizers library."""
    import edgepeft

    tokenizer = TextTokenizer(edgepeft.minilm_path())
    with pytest.raises(ConfigError, match=r"max_length 1 is less than the 2 special tokens every text gets; raise it"):
        tokenizer.encode("hello world", max_length=1)
    assert tokenizer.encode("hello world", max_length=2)[0].tolist() == [[101, 102]]  # the special tokens alone


def _decoders(tmp_path) -> dict:
    """Tokenizers whose decoders join tokens differently: byte fallback (Llama-2), byte-level BPE (GPT-2),
    WordPiece with cleanup (MiniLM), and MiniLM's with the config's tidying on."""
    import edgepeft
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    byte_level.train_from_iterator(TEXTS + TRICKY, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(tmp_path / "bytes")
    byte_level.save(str(tmp_path / "bytes" / "tokenizer.json"))
    shutil.copytree(edgepeft.minilm_path(), tmp_path / "tidy", ignore=shutil.ignore_patterns("*.safetensors"))
    with open(tmp_path / "tidy" / "tokenizer_config.json", "r+") as f:
        config = dict(json.load(f), clean_up_tokenization_spaces=True)
        f.seek(0), json.dump(config, f), f.truncate()
    folders = {"llama2": llama2_tokenizer(tmp_path / "llama2"), "bytes": str(tmp_path / "bytes"),
               "wordpiece": edgepeft.minilm_path(), "tidy": str(tmp_path / "tidy")}
    return {name: TextTokenizer(folder) for name, folder in folders.items()}


def test_stream_text_decodes_in_time_linear_in_the_text(tmp_path):
    """stream_text decoded every generated id again at each new one (1.2 ms a token at 2,000 tokens on MiniLM's
    tokenizer). It now decodes a window, and its text is still the whole decode's at every length, for random ids
    of each decoder (byte runs cut anywhere, partial characters, runs of special tokens, tidying rewrites)."""
    rng = np.random.default_rng(0)
    for name, tok in _decoders(tmp_path).items():
        size = tok._tok.get_vocab_size()
        ids = [int(i) for i in rng.integers(0, min(size, 400), 1500)]  # MiniLM: its first 400 ids are marks, bytes
        if name in ("wordpiece", "tidy"):
            words = tok._tok.encode("it ' s fine , is n't it ? don ' t go . he ' ll see .", add_special_tokens=False)
            ids = [int(i) for i in rng.choice(words.ids + [1996, 2003, 2009, 1005], 1500)]  # rewrites, often
        specials = sorted(tok.special_ids)
        for at in rng.integers(0, len(ids), 12) if specials else ():  # runs of them (a small model loops on <unk>):
            ids[at:at] = [int(rng.choice(specials))] * int(rng.integers(8, 40))  # a context of them decodes to ""
        ids[700:700] = [specials[0]] * 1500 if specials else []  # and a long one, which the window must pass at once
        decoded = []
        real = tok._tok

        class Counting:  # counts the ids handed to the tokenizers package
            def __getattr__(self, attr):
                return getattr(real, attr)

            def decode(self, part, **kw):
                decoded.append(len(part))
                return real.decode(part, **kw)

        tok._tok = Counting()
        rt = types.SimpleNamespace(tokenizer=tok, stream=lambda ids_, mask, adapter, **g: (np.array([t]) for t in ids))
        pieces = list(text_calls.stream_text(rt, "Hello"))
        assert sum(decoded) < 100 * len(ids), name  # every prefix decoded whole: about 750 x len(ids)
        tok._tok = real
        assert "".join(pieces) == tok.decode(ids), name
        assert len(pieces) > 100, name
        growing, open_bytes = GrowingText(tok), OpenBytes(tok)
        for k in range(1, len(ids) + 1):
            n = k - open_bytes(ids[k - 1])
            assert n == k - open_run(tok, ids[:k]), (name, k)
            assert growing(ids, n) == tok.decode(ids[:n]), (name, k)


def open_run(tok, ids) -> int:
    """The open byte run at the end of ``ids``, walked back (special ids after its first byte counted)."""
    n = skipped = 0
    for i in reversed(ids):
        if i in tok.special_ids:
            skipped += 1
        elif tok.byte_of(i) is None:
            break
        else:
            n, skipped = n + skipped + 1, 0
    return n


def test_text_of_byte_runs_costs_time_linear_in_them(tmp_path, monkeypatch):
    """Found by a hunt: stream_text walked back over the open byte run at every token (n² over a run of n: 4,000
    tokens of Thai took 7 s), and each stop-string check decoded the window from its start once per stretch between
    byte runs (n² in the longest stop: 20 ms a step per row at 128 characters). The text stays transformers'."""
    import transformers as tf
    from transformers.generation.stopping_criteria import StopStringCriteria

    folder = llama2_tokenizer(tmp_path / "tok", tokenizer_class="PreTrainedTokenizerFast")
    tok, hf = TextTokenizer(folder), tf.AutoTokenizer.from_pretrained(folder)
    thai = [tok._tok.token_to_id(f"<0x{b:02X}>") for b in "สวัสดีครับ".encode() * 200]
    mixed = [t for pair in zip(thai[:600], hf("the quick fox " * 200, add_special_tokens=False)["input_ids"]) for t in pair]
    calls = {"byte_of": 0, "decoded": 0}
    byte_of, decode = tok.byte_of, tok.decode
    monkeypatch.setattr(tok, "byte_of", lambda i: calls.__setitem__("byte_of", calls["byte_of"] + 1) or byte_of(i))
    monkeypatch.setattr(tok, "decode", lambda ids, *a: calls.__setitem__("decoded", calls["decoded"] + len(ids))
                        or decode(ids, *a))
    rt = types.SimpleNamespace(tokenizer=tok, stream=lambda ids, mask, adapter, **g: (np.array([t]) for t in thai))
    assert "".join(text_calls.stream_text(rt, "Hello")) == hf.decode(thai)
    assert calls["byte_of"] < 3 * len(thai)  # walked back: about len(thai)² / 2
    calls["decoded"] = 0
    stop = "x" * 100  # a window of 404 tokens
    row = np.array([mixed])
    assert not StopStrings(tok, [stop], np.zeros(1, np.int64)).hit(row, np.zeros(1, bool))[0]
    assert calls["decoded"] < 20 * 404  # the window from its start for each of ~200 stretches: about 80,000 ids
    assert not StopStringCriteria(hf, [stop])(torch.from_numpy(row), None)[0]


def test_a_chat_ending_in_an_answer_begun_is_continued_as_the_pipeline_continues_it(text_export, text_rt):
    """Found by a hunt: a last assistant message (a prefill) was closed and a new answer begun, where transformers'
    text-generation pipeline continues it (continue_final_message when the last role is the assistant's)."""
    import transformers as tf

    chat = [{"role": "user", "content": "w10 w11"}, {"role": "assistant", "content": "w20 w21"}]
    hf = tf.AutoTokenizer.from_pretrained(os.path.join(text_export[0], "base"))
    begun = hf.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    assert text_rt.tokenizer.apply_chat_template(chat, continue_final_message=None) == begun
    assert text_rt.tokenizer.apply_chat_template(chat) == hf.apply_chat_template(chat, tokenize=False,
                                                                                 add_generation_prompt=True)
    parts = [chat[0], {"role": "assistant", "content": [{"type": "text", "text": "w20 w21"}]}]  # a review: refused
    assert text_rt.tokenizer.apply_chat_template(parts, continue_final_message=None) == hf.apply_chat_template(
        parts, tokenize=False, continue_final_message=True)
    with pytest.raises(ConfigError, match="continue_final_message and add_generation_prompt cannot both be True"):
        text_rt.tokenizer.apply_chat_template(chat, continue_final_message=True)
    ids, mask = text_rt.tokenizer.encode(begun, add_special_tokens=False)
    new = text_rt.generate(ids, mask, adapter="tok", max_new_tokens=3)[0, ids.shape[1]:]
    assert text_rt.generate_text(chat, adapter="tok", chat=True, max_new_tokens=3) == text_rt.tokenizer.decode(new)
    # found by a hunt: a part that is no dict was a bare ValueError (transformers passes it by for the last text
    # part); an empty chat in a batch was rendered as a bare generation prompt (transformers refuses it)
    mixed = [chat[0], {"role": "assistant", "content": [{"type": "text", "text": "w20 w21"}, "w22"]}]
    assert text_rt.tokenizer.apply_chat_template(mixed, continue_final_message=None) == hf.apply_chat_template(
        mixed, tokenize=False, continue_final_message=True)
    with pytest.raises(ValueError, match="empty conversation"):
        hf.apply_chat_template([], tokenize=False)
    with pytest.raises(InvalidInputError, match=r"^a chat holds no message; give each chat at least one"):
        text_rt.generate_text([chat, []], adapter="tok", chat=True, max_new_tokens=3)


def test_a_chat_template_that_cannot_be_used_is_noted_at_export_and_named_the_models(text_export, tmp_path):
    """Found by a hunt: a model whose template does not parse exported without a word, and every chat call said
    "copy the export's base folder again, or re-run edgepeft export": a re-export copied the same template."""
    from edgepeft.errors import EdgePeftWarning
    from edgepeft.exporters import export
    from edgepeft.runtimes import Runtime

    base = str(tmp_path / "base")
    shutil.copytree(text_export[2], base)
    with open(os.path.join(base, "tokenizer_config.json")) as f:
        config = json.load(f)
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}A:"
    with open(os.path.join(base, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    adapter = os.path.join(os.path.dirname(text_export[0]), "adapter-tok")
    with pytest.warns(EdgePeftWarning, match=rf"^{base}: the chat template does not parse \(.*\); chat=True "
                                             r"calls of this export refuse it: correct it in the model's folder and "
                                             r"export into a fresh --out, or pass plain text$"):
        export([adapter], str(tmp_path / "out"), base=base, names=["tok"])
    rt = Runtime(str(tmp_path / "out"))
    with pytest.raises(CorruptArtifactError, match=r"the chat template does not parse \(.*\); correct it in the "
                                                   r"model's folder and export into a fresh --out \(the export copies "
                                                   r"it as it is; a damaged copy of OUT: copy the export's base folder again\), "
                                                   r"or pass plain text \(chat=False\)$"):
        rt.generate_text("w10", adapter="tok", chat=True, max_new_tokens=2)
    assert isinstance(rt.generate_text("w10", adapter="tok", max_new_tokens=2), str)  # plain text: as ever
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the fix, followed (a hunt:
    with open(os.path.join(base, "tokenizer_config.json"), "w") as f:  # "export again" into OUT was refused: another
        json.dump(config, f)  # tokenizer)
    export([adapter], str(tmp_path / "fresh"), base=base, names=["tok"])
    assert isinstance(Runtime(str(tmp_path / "fresh")).generate_text("w10", adapter="tok", chat=True, max_new_tokens=2), str)


def test_an_adapter_saved_with_its_own_tokenizer_is_noted_and_the_fix_serves_it(text_export, tmp_path):
    """A hunt: a fine-tune saved with its tokenizer (TRL saves it: chat tokens, another chat template) exported with
    the base's, without a word: its texts became other ids. Its padding token alone (TRL sets one) is no difference."""
    import warnings

    import peft
    import transformers as tf

    from tiny import load_reference_base

    from edgepeft.runtimes import EdgePeftWarning

    base = text_export[2]
    pm = peft.get_peft_model(load_reference_base(base, "causal-lm"),
                             peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    pm.peft_config["default"].base_model_name_or_path = base
    adapter = str(tmp_path / "adapter")
    pm.save_pretrained(adapter)
    tok = tf.AutoTokenizer.from_pretrained(base)

    def notes(out, *more):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            export([adapter], str(tmp_path / out), *more)
        return [str(w.message) for w in said if issubclass(w.category, EdgePeftWarning) and "own tokenizer" in str(w.message)]

    tok.pad_token = tok.eos_token  # as TRL leaves it
    tok.save_pretrained(adapter)
    assert notes("pad-only") == []
    with open(os.path.join(adapter, "tokenizer.json"), "w") as f:  # a review: one that cannot be read failed the export
        f.write("{not json")
    assert notes("damaged") == [] and os.path.isdir(tmp_path / "damaged" / "adapters" / "adapter")
    other = tf.AutoTokenizer.from_pretrained(base)
    other.eos_token = "<unk>"  # a review: another eos (which a chat template writes) was no difference
    other.save_pretrained(adapter)
    assert len(said := notes("eos")) == 1 and "its eos_token;" in said[0], said
    tok.chat_template = "{% for m in messages %}user : {{ m['content'] }} {% endfor %}"
    tok.save_pretrained(adapter)
    said = notes("out")
    assert len(said) == 1 and said[0].startswith(f"{adapter}: holds its own tokenizer, which differs from its "
                                                 f"base's ({base}) in its chat template; the export serves the base's")
    fixed = str(tmp_path / "base-and-tokenizer")  # the fix, as it says
    load_reference_base(base, "causal-lm").save_pretrained(fixed)
    tf.AutoTokenizer.from_pretrained(adapter).save_pretrained(fixed)
    assert notes("fresh", str(fixed)) == []
    chat = [{"role": "user", "content": "hello"}]
    want = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert Runtime(str(tmp_path / "fresh")).tokenizer.apply_chat_template(chat) == want
