"""A word-level tokenizer for the tiny Llama (ids 0..127), with a chat template: exact, readable text tests."""
from __future__ import annotations

# ---------------------------------------------------------------- text: a tiny llama with a word-level tokenizer
WORDS = [f"w{i}" for i in range(8, 128)]
SPECIAL = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3}
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPT = "w10 w20 w30 w40"


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = dict(SPECIAL)
    vocab.update({":": 4, "user": 5, "assistant": 6, "system": 7})
    vocab.update({w: i for i, w in enumerate(WORDS, start=8)})
    assert len(vocab) == 128 and sorted(vocab.values()) == list(range(128))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(list(SPECIAL))
    return tok


def decode(tok, ids):
    return tok.decode([int(i) for i in ids], skip_special_tokens=True)

