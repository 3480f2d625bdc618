"""Exports and the Python runtime's answers for the JavaScript tests (``runtimes/js/test/``, run by ``make test``
with Node's test runner and headless Chromium).

Written to ``build/js/`` (or ``$EDGEPEFT_JS_FIXTURES``):
    llama/     a tiny Llama with a byte-level BPE tokenizer: LoRA, IA3, prompt, prefix and bottleneck adapters
    llama_int8/, llama_int4/   its base quantized, with the LoRA adapter
    gpt2/      a tiny GPT-2 on its contrib graph (GroupQueryAttention, SkipLayerNormalization): LoRA and prefix adapters
    bert_merged/   a tiny BERT classifier with a LoRA adapter merged in (--merge): no slot, no neutral.onnx
    bert_prefix/   a tiny BERT feature extractor with a prefix adapter (positions start after the prefix, in the graph)
    bert_pairs/    a tiny BERT classifier with prompt and LoRA adapters: its graph takes token_type_ids (text pairs;
                   a prompt's virtual tokens of type 0 inside it)
    minilm/    the real MiniLM-L6 weights with an intent (6 labels) and a sentiment (2 labels) LoRA classifier; its
               graph takes token_type_ids (a seq-cls BERT's: text pairs)
    expected.json   tokenizer ids, forward outputs for a call sequence that switches adapter every call,
                    greedy ids (batch 2, left-padded), classifier results, the scores generate picks tokens from
                    for several settings, greedy ids under a generation_config.json's settings, text pairs' ids,
                    types and classifier logits (with their types and without): as the Python runtime gives them
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from peft_refs import bottleneck_adapter, ia3_adapter, lora_adapter, peft_virtual_adapter

from edgepeft.exporters import export
from edgepeft.runtimes import Runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.environ.get("EDGEPEFT_JS_FIXTURES", os.path.join(REPO, "build", "js"))
# what the JavaScript tokenizer got wrong before edgepeft mended it: a CJK ideograph past U+FFFF (not spaced out by
# its BertNormalizer), and spaces before punctuation in decoded text (tidied away where transformers keeps them)
TRICKY = ["a\U00020bb7b \U0002a700, caf\u00e9 \u4e2d\u6587!", "Bonjour ! I do n't know , ok ?"]
TEXTS = ["could you put milk on my list", "the battery died after two days, avoid", "Wake me at 6:30!",
         "honestly the best ramen in town", "set timr 15 min"]
INTENTS = ["alarm", "music", "shopping_list", "smalltalk", "timer", "weather"]
# text pairs (a cross-encoder's query and passage): the second text's tokens of type 1; an empty second text is still a
# pair ([CLS] a [SEP] [SEP]), None none
PAIRS = [("how tall is everest", "mount everest is 8,849 metres high"), ("who wrote hamlet", "a play by shakespeare"),
         ("could you put milk on my list", ""), ("set timr 15 min", None)]


def _tricky(tokenizer) -> dict:
    """TRICKY's ids, and the text the ids decode to (special tokens skipped), as the Python runtime gives them."""
    ids = [_rows(tokenizer.encode(t)[0][0]) for t in TRICKY]
    return {"tricky_tokens": dict(zip(TRICKY, ids)), "tricky_decoded": [tokenizer.decode(i) for i in ids]}


def _step_margins(rt, ids, mask, adapter, new_tokens) -> list:
    """Per decode step, the smallest gap between the top two logits over the rows: where it is small, another
    build's rounding may pick the other token (onnxruntime-web's integer kernels round differently)."""
    steps = rt.step_logits(ids, mask, adapter=adapter)
    logits, margins = next(steps), []
    for k in range(new_tokens.shape[1]):
        top2 = np.sort(logits, axis=-1)[:, -2:]
        margins.append(float((top2[:, 1] - top2[:, 0]).min()))
        if k + 1 < new_tokens.shape[1]:
            logits = steps.send(new_tokens[:, k])
    steps.close()
    return margins


def _rows(a):
    return np.asarray(a).tolist()


def _pairs(cls, adapters) -> dict:
    """PAIRS as the Python runtime encodes them (each alone, then the batch padded) and their classifier logits, with
    their token types and without them (every token of type 0), and classify's answers."""
    texts, pairs = map(list, zip(*PAIRS))
    ids, mask, types = cls.tokenizer.encode_pairs(texts, pairs)
    alone = [cls.tokenizer.encode_pairs(t, p) for t, p in PAIRS]  # one text's call, as the JavaScript encode's
    typed = {a: cls.forward(ids, mask, adapter=a, token_type_ids=types)["logits"] for a in adapters}
    untyped = {a: cls.forward(ids, mask, adapter=a)["logits"] for a in adapters}
    for a in adapters:  # the types reach the graph: the JavaScript tests would pass without them otherwise
        assert np.abs(typed[a] - untyped[a]).max() > 1e-2, a
    return {"texts": texts, "text_pairs": pairs, "ids": _rows(ids), "mask": _rows(mask), "types": _rows(types),
            "tokens": [{"ids": _rows(i[0]), "types": _rows(k[0])} for i, _, k in alone],
            "forward": {a: _rows(v) for a, v in typed.items()}, "untyped": {a: _rows(v) for a, v in untyped.items()},
            "classify": {a: cls.classify(list(PAIRS), adapter=a) for a in adapters}}


# generate's settings (generation_config.json's names) whose processed scores the JavaScript runtime must give
PROCESSING = [{"do_sample": False, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "min_new_tokens": 2},
              {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.2},
              {"do_sample": True, "temperature": 1.3, "top_k": 0, "min_p": 0.05, "no_repeat_ngram_size": 1},
              {"do_sample": True, "top_p": 0.5, "min_length": 12, "no_repeat_ngram_size": 3}]


def _model_ids(rt, ids, mask) -> dict:
    """Greedy ids where the manifest's generation (a generation_config.json's) sets end and padding ids apart from
    config.json's: row 0's first token ends it, and its later places get that padding id."""
    first = int(rt.generate(ids[:1], mask[:1], adapter="lora", max_new_tokens=1, eos_token_id=[])[0, -1])
    generation, before = {"eos_token_id": [first], "pad_token_id": 7}, rt.manifest["generation"]
    rt.manifest["generation"] = generation
    try:
        return {"generation": generation, "ids": _rows(rt.generate(ids, mask, adapter="lora", max_new_tokens=6))}
    finally:
        rt.manifest["generation"] = before


def _default_capped(rt) -> dict:
    """No length given, a prompt 5 positions short of the model's beside the prompt adapter's virtual tokens: as
    transformers caps its default length at the model's positions, 5 new tokens (not 32, which was refused)."""
    virtual = rt.virtual_positions("prompt", 1)
    ids = np.full((1, rt.max_positions - virtual - 5), 9, dtype=np.int64)
    got = rt.generate(ids, adapter="prompt", eos_token_id=[])
    assert got.shape[1] == ids.shape[1] + 5
    from edgepeft.runtimes import InvalidInputError

    with pytest.raises(InvalidInputError, match="virtual tokens = .* positions; shorten the prompt$"):  # no length to
        rt.generate(np.full((1, rt.max_positions - 1), 9), adapter="prompt")  # lower: the default's fits the positions
    return {"ids": _rows(ids), "generated": _rows(got)}


def _processing_cases() -> list:
    """Per setting: one row's logits and tokens so far (2 of left padding, a 9-wide prompt), and the scores the
    Python runtime picks its next token from (None: removed)."""
    from edgepeft.runtimes.generation import GenerationConfig, processed_scores

    rng, cases = np.random.default_rng(7), []
    for settings in PROCESSING:
        logits = (rng.standard_normal((1, 64)) * 3).astype(np.float32)
        row = [0, 0, *rng.integers(1, 8, 8).tolist()]  # few distinct ids: repeats and n-grams to ban
        cfg = GenerationConfig(eos_token_id=[row[-1], 3], **settings)
        scores = processed_scores(logits, np.array([row]), cfg, ignore=[2], prompt_length=9)[0]
        cases.append({"settings": settings, "logits": logits[0].tolist(), "row": row, "padding": 2, "prompt_length": 9,
                      "eos": cfg.eos_token_id, "scores": [None if np.isneginf(x) else float(x) for x in scores]})
    return cases


@pytest.mark.slow
def test_write_the_javascript_tests_exports_and_answers(text_model, tmp_path):
    import edgepeft

    shutil.rmtree(FIXTURES, ignore_errors=True)
    os.makedirs(FIXTURES)
    base = text_model("llama")
    dirs = {"lora": lora_adapter(tmp_path / "lora", base, "causal-lm", 41, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            "ia3": ia3_adapter(tmp_path / "ia3", base, 42),
            "prompt": peft_virtual_adapter(tmp_path / "prompt", base, "prompt", seed=43, num_virtual_tokens=3),
            "prefix": peft_virtual_adapter(tmp_path / "prefix", base, "prefix", seed=44, num_virtual_tokens=2),
            "bottleneck": bottleneck_adapter(tmp_path / "bottleneck", base, 47)}
    llama = os.path.join(FIXTURES, "llama")
    export(list(dirs.values()), llama, names=list(dirs))
    rt = Runtime(llama)
    ids, mask = rt.tokenizer.encode(TEXTS[:2])  # left-padded
    order = ["lora", "ia3", None, "prompt", "bottleneck", "lora", "prefix", "ia3", "prompt", None, "prefix", "bottleneck"]  # switches every call

    quantized = {}
    for bits in ("int8", "int4"):
        export([dirs["lora"]], os.path.join(FIXTURES, f"llama_{bits}"), names=["lora"], quantize=bits,
               qtol=1.0)  # a random tiny model quantizes badly; what counts here is JS == Python on one graph
        q = Runtime(os.path.join(FIXTURES, f"llama_{bits}"))
        quantized[bits] = {"forward": {str(a): _rows(q.forward(ids, mask, adapter=a)["logits"]) for a in (None, "lora")},
                           "greedy": {}, "margins": {}}
        for a in (None, "lora"):
            greedy = q.generate(ids, mask, adapter=a, max_new_tokens=6, eos_token_id=[])
            quantized[bits]["greedy"][str(a)] = _rows(greedy)
            quantized[bits]["margins"][str(a)] = _step_margins(q, ids, mask, a, greedy[:, ids.shape[1]:])

    gpt2_base, gpt2_out = text_model("gpt2"), os.path.join(FIXTURES, "gpt2")
    gpt2_dirs = {"lora": lora_adapter(tmp_path / "gpt2-lora", gpt2_base, "causal-lm", 45, r=4, target_modules=["c_attn", "c_fc"]),
                 "prefix": peft_virtual_adapter(tmp_path / "gpt2-prefix", gpt2_base, "prefix", seed=46, num_virtual_tokens=2)}
    export(list(gpt2_dirs.values()), gpt2_out, names=list(gpt2_dirs))
    gpt2 = Runtime(gpt2_out)
    assert gpt2.manifest["ops"] == "contrib"

    merged = os.path.join(FIXTURES, "bert_merged")
    export([lora_adapter(tmp_path / "bert-cls", text_model("bert"), "seq-cls", 48, 3, r=4, target_modules=["query", "value"])],
           merged, merge=True)
    assert not os.path.exists(os.path.join(merged, "base", "neutral.onnx"))  # no slot: nothing to fill
    plain = Runtime(merged)
    plain_ids, plain_mask = plain.tokenizer.encode(TEXTS[:3])
    bert_prefix = os.path.join(FIXTURES, "bert_prefix")
    export([peft_virtual_adapter(tmp_path / "bert-prefix", text_model("bert"), "prefix", seed=49,
                                 task="feature-extraction", num_virtual_tokens=3)], bert_prefix, names=["prefix"])
    encoder = Runtime(bert_prefix)
    bert_pairs = os.path.join(FIXTURES, "bert_pairs")
    pair_dirs = {"prompt": peft_virtual_adapter(tmp_path / "bert-prompt", text_model("bert"), "prompt", seed=50,
                                                task="seq-cls", num_virtual_tokens=3),
                 "lora": lora_adapter(tmp_path / "bert-lora", text_model("bert"), "seq-cls", 51, r=4,
                                      target_modules=["query", "value"])}
    export(list(pair_dirs.values()), bert_pairs, names=list(pair_dirs))

    minilm_dirs = {}
    for name, labels, seed in (("intent", INTENTS, 45), ("sentiment", ["negative", "positive"], 46)):
        minilm_dirs[name] = lora_adapter(tmp_path / name, edgepeft.minilm_path(), "seq-cls", seed, len(labels), r=8,
                                  target_modules=["query", "value"])
        with open(os.path.join(minilm_dirs[name], "labels.json"), "w") as f:
            json.dump({"labels": labels}, f)
    minilm = os.path.join(FIXTURES, "minilm")
    export(list(minilm_dirs.values()), minilm, names=list(minilm_dirs))
    cls = Runtime(minilm)
    cls_ids, cls_mask = cls.tokenizer.encode(TEXTS)

    settings = {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "min_new_tokens": 3}
    eos = [int(rt.generate(ids, mask, adapter="lora", max_new_tokens=1, eos_token_id=[])[0, -1])]  # held back
    expected = {
        "processing": _processing_cases(),
        "settings_greedy": {"generation": settings, "eos": eos,
                            "ids": _rows(rt.generate(ids, mask, adapter="lora", max_new_tokens=6, eos_token_id=eos,
                                                     **settings))},
        "model_ids": _model_ids(rt, ids, mask),
        "default_capped": _default_capped(rt),
        "llama": {
            "tokens": {t: _rows(rt.tokenizer.encode(t)[0][0]) for t in TEXTS},
            **_tricky(rt.tokenizer),
            "ids": _rows(ids), "mask": _rows(mask), "order": order,
            "forward": [_rows(rt.forward(ids, mask, adapter=a)["logits"]) for a in order],
            "greedy": {str(a): _rows(rt.generate(ids, mask, adapter=a, max_new_tokens=6, eos_token_id=[]))
                       for a in [None, *dirs]},
        },
        **{f"llama_{bits}": v for bits, v in quantized.items()},
        "gpt2": {"forward": {str(a): _rows(gpt2.forward(ids, mask, adapter=a)["logits"]) for a in (None, *gpt2_dirs)},
                 "greedy": {str(a): _rows(gpt2.generate(ids, mask, adapter=a, max_new_tokens=6, eos_token_id=[]))
                            for a in (None, *gpt2_dirs)}},
        "bert_merged": {"ids": _rows(plain_ids), "mask": _rows(plain_mask),
                        "forward": _rows(plain.forward(plain_ids, plain_mask)["logits"])},
        "bert_prefix": {"ids": _rows(plain_ids), "mask": _rows(plain_mask),
                        "forward": {str(a): _rows(encoder.forward(plain_ids, plain_mask, adapter=a)["last_hidden_state"])
                                    for a in (None, "prefix")}},
        "bert_pairs": {"pairs": _pairs(Runtime(bert_pairs), list(pair_dirs))},
        "minilm": {
            "tokens": {t: _rows(cls.tokenizer.encode(t)[0][0]) for t in TEXTS},
            **_tricky(cls.tokenizer),
            "ids": _rows(cls_ids), "mask": _rows(cls_mask),
            "forward": {a: _rows(cls.forward(cls_ids, cls_mask, adapter=a)["logits"]) for a in minilm_dirs},
            "classify": {a: cls.classify(TEXTS, adapter=a) for a in minilm_dirs},
            "pairs": _pairs(cls, list(minilm_dirs)),
        },
    }
    with open(os.path.join(FIXTURES, "expected.json"), "w") as f:
        json.dump(expected, f)
    assert len({json.dumps(v) for v in expected["llama"]["greedy"].values()}) == 6  # every adapter acts
    assert len({json.dumps(v) for v in expected["gpt2"]["greedy"].values()}) == 3


def test_the_javascript_runtime_asks_what_this_one_does():
    """checks.js's constants are Python's: both runtimes refuse an export newer than they read (FORMAT_VERSION), and
    the oldest ONNX Runtime each takes (its refusal names it) is the Python extras' and the npm peer dependencies'
    (a runtime that accepted an older one would call the export damaged)."""
    import re
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads TOML (README: 3.10 or newer)")

    from edgepeft.runtimes.manifest import FORMAT_VERSION
    from edgepeft.runtimes.sessions import MIN_ORT

    want = ".".join(map(str, MIN_ORT))
    with open(os.path.join(REPO, "runtimes", "js", "src", "checks.js"), encoding="utf-8") as f:
        checks = f.read()
    assert re.search(r"export const FORMAT_VERSION = (\d+);", checks).group(1) == str(FORMAT_VERSION)
    js = re.search(r"const MIN_ORT = \[(\d+), (\d+)\]", checks)
    assert js and (int(js[1]), int(js[2])) == MIN_ORT
    with open(os.path.join(REPO, "runtimes", "js", "package.json"), encoding="utf-8") as f:
        assert set(json.load(f)["peerDependencies"].values()) == {f">={want}"}
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert extras["cpu"] == [f"onnxruntime>={want}"] and extras["gpu"] == [f"onnxruntime-gpu>={want}"]
