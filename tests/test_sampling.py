"""Token selection (runtimes/generation.py) against transformers' own logits processors.

Numpy only on our side: the repetition penalty, temperature, top-k and top-p give the
same scores as transformers' processors, and sampling follows the same distribution.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgepeft.runtimes import generation as gen


def random_scores(rows=6, vocab=128, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    scores = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    if ties:
        scores = np.round(scores).astype(np.float32)  # many equal values
    return scores


def assert_same_scores(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
    finite = np.isfinite(ref)
    assert np.isfinite(ours[finite]).all()
    if finite.any():
        assert float(np.abs(ours[finite] - ref[finite]).max()) <= 1e-6


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 2.5])
def test_repetition_penalty_matches_transformers(penalty):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    scores = random_scores(seed=1)
    sequences = np.random.default_rng(2).integers(0, 128, size=(scores.shape[0], 20)).astype(np.int64)
    sequences[:, :5] = sequences[:, 5:10]  # repeated ids are penalised once
    before = scores.copy()
    ours = gen.apply_repetition_penalty(scores, sequences, penalty)
    ref = RepetitionPenaltyLogitsProcessor(float(penalty))(torch.from_numpy(sequences), torch.from_numpy(scores.copy()))
    np.testing.assert_array_equal(scores, before)  # the caller's array is not modified
    assert_same_scores(ours, ref.numpy())


PIPELINES = [
    dict(temperature=0.3, top_k=0, top_p=1.0, repetition_penalty=1.0),
    dict(temperature=1.7, top_k=0, top_p=1.0, repetition_penalty=1.0),
    dict(temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0),
    dict(temperature=2.0, top_k=10, top_p=0.5, repetition_penalty=1.0),  # order matters: top-k, then top-p
    dict(temperature=0.8, top_k=0, top_p=0.9, repetition_penalty=1.3),
    dict(temperature=1.2, top_k=20, top_p=0.95, repetition_penalty=0.7),
    dict(temperature=1.1, top_k=0, top_p=0.9, repetition_penalty=1.0, min_p=0.2),  # min-p after top-p
]


@pytest.mark.parametrize("cfg", PIPELINES, ids=lambda c: "-".join(f"{k[:4]}{v}" for k, v in c.items()))
def test_sampling_scores_match_transformers_processor_chain(cfg, monkeypatch):
    """The scores next_tokens samples from are what transformers' processors make, in generate's order."""
    from transformers.generation.logits_process import (
        LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    scores = random_scores(seed=3)
    sequences = np.random.default_rng(8).integers(0, 128, size=(scores.shape[0], 15)).astype(np.int64)
    procs = [RepetitionPenaltyLogitsProcessor(cfg["repetition_penalty"]), TemperatureLogitsWarper(cfg["temperature"])]
    if cfg["top_k"]:
        procs.append(TopKLogitsWarper(cfg["top_k"]))
    if cfg["top_p"] < 1:
        procs.append(TopPLogitsWarper(cfg["top_p"]))
    if cfg.get("min_p"):
        from transformers.generation.logits_process import MinPLogitsWarper

        procs.append(MinPLogitsWarper(cfg["min_p"]))
    ref = LogitsProcessorList(procs)(torch.from_numpy(sequences), torch.from_numpy(scores.copy())).numpy()
    captured = []
    real_softmax = gen.softmax

    def spy(x):
        captured.append(np.array(x, copy=True))
        return real_softmax(x)

    monkeypatch.setattr(gen, "softmax", spy)
    config = gen.GenerationConfig(do_sample=True, **cfg)
    tokens = gen.next_tokens(scores, sequences, config, np.random.default_rng(0))
    assert_same_scores(captured[-1], ref)  # the last softmax is the sampling distribution
    assert np.isfinite(ref[np.arange(len(tokens)), tokens]).all()  # never a token transformers removes


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("k", [1, 2, 7, 50, 127, 128, 500])
def test_top_k_matches_transformers(k, ties):
    from transformers.generation.logits_process import TopKLogitsWarper

    scores = random_scores(seed=4, ties=ties)
    ref = TopKLogitsWarper(k)(None, torch.from_numpy(scores.copy())).numpy()
    assert_same_scores(gen.apply_top_k(scores, k), ref)


@pytest.mark.parametrize("p", [1e-9, 1e-6, 0.05, 0.3, 0.8, 0.95, 0.999, 1.0])
def test_top_p_matches_transformers(p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    scores = random_scores(seed=5)
    ref = TopPLogitsWarper(p)(None, torch.from_numpy(scores.copy())).numpy()
    assert_same_scores(gen.apply_top_p(scores, p), ref)
    # after top-k, as generate chains them (-inf inputs)
    topk = TopKLogitsWarper(20)(None, torch.from_numpy(scores.copy()))
    ref = TopPLogitsWarper(p)(None, topk).numpy()
    assert_same_scores(gen.apply_top_p(gen.apply_top_k(scores, 20), p), ref)


def test_top_p_keeps_as_many_tokens_as_transformers_where_a_float32_sum_drifts():
    """numpy summed float32 probabilities in float32: ten equal ones reached 0.8000000715 at the eighth, so top_p
    0.2 kept 3 where transformers keeps 2 (torch sums float32 in double, each sum rounded); 3 rows in 48 of a
    Qwen2-sized vocabulary kept one more."""
    from transformers.generation.logits_process import TopPLogitsWarper

    def kept(scores, p):
        ref = TopPLogitsWarper(p)(None, torch.from_numpy(scores.copy())).numpy()
        return np.isfinite(gen.apply_top_p(scores, p)).sum(-1).tolist(), np.isfinite(ref).sum(-1).tolist()

    for p in (0.2, 0.3, 0.7, 0.9):
        ours, want = kept(np.zeros((1, 10), np.float32), p)
        assert ours == want == [round(10 * p)], p
    large = random_scores(rows=8, vocab=151_936, seed=2) / np.float32(1.5)
    for p in (0.9, 0.95):
        ours, want = kept(large, p)
        assert ours == want, p


@pytest.mark.parametrize("cfg", [
    dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0),
    dict(temperature=0.7, top_k=5, top_p=1.0, repetition_penalty=1.0),
    dict(temperature=1.3, top_k=0, top_p=0.6, repetition_penalty=1.0),
    dict(temperature=0.9, top_k=8, top_p=0.7, repetition_penalty=1.4),
], ids=["plain", "top_k", "top_p", "all"])
def test_sampled_frequencies_follow_transformers_distribution(cfg):
    """Many draws from one row: never a token transformers' processors remove; frequencies ~ its probabilities."""
    from transformers.generation.logits_process import (
        LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    vocab, draws = 12, 40000
    logits = np.random.default_rng(6).standard_normal((1, vocab)).astype(np.float32) * 1.5
    history = np.array([[3, 3, 7]], dtype=np.int64)
    procs = [RepetitionPenaltyLogitsProcessor(cfg["repetition_penalty"]), TemperatureLogitsWarper(cfg["temperature"])]
    if cfg["top_k"]:
        procs.append(TopKLogitsWarper(cfg["top_k"]))
    if cfg["top_p"] < 1:
        procs.append(TopPLogitsWarper(cfg["top_p"]))
    ref = LogitsProcessorList(procs)(torch.from_numpy(history), torch.from_numpy(logits.copy()))
    probs = torch.softmax(ref.double(), -1).numpy()[0]

    config = gen.GenerationConfig(do_sample=True, **cfg)
    tokens = gen.next_tokens(np.repeat(logits, draws, 0), np.repeat(history, draws, 0), config, np.random.default_rng(0))
    assert tokens.shape == (draws,) and tokens.dtype == np.int64
    freq = np.bincount(tokens, minlength=vocab) / draws
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(probs)), (freq, probs)
    assert float(np.abs(freq - probs).max()) < 0.015, (freq, probs)


def test_a_model_pad_id_that_is_no_token_falls_back_to_eos(shared_export, tmp_path):
    """Some configs say pad_token_id -1: generation then pads finished rows with the first eos, as when it is None."""
    import os
    import shutil

    from edgepeft.runtimes import Runtime
    from file_checks import edit_json

    out = str(tmp_path / "out")
    shutil.copytree(shared_export("llama")[0], out)
    edit_json(os.path.join(out, "base", "edgepeft.json"), pad_token_id=-1, eos_token_id=[7])
    rt = Runtime(out)
    assert rt.generation_config().pad_token_id == 7
    ids = np.array([[5, 6, 7, 8]], dtype=np.int64)
    assert rt.generate(ids, adapter="qv", max_new_tokens=3).shape[0] == 1


@pytest.mark.parametrize("config, field, expected", [
    (dict(target_modules={"v_proj", "q_proj"}, exclude_modules={"x"}), "exclude_modules", ["x"]),
    (dict(modules_to_save=("classifier",)), "modules_to_save", ["classifier"]),
    (dict(r=np.int64(4)), "r", 4),
])
def test_configs_take_what_hf_peft_takes(config, field, expected):
    """Sets, tuples and numpy scalars, as HF PEFT's constructors accept them, stored as JSON can hold them."""
    import edgepeft

    lora = edgepeft.LoraConfig(**config)
    assert getattr(lora, field) == expected and type(getattr(lora, field)) is type(expected)
    assert edgepeft.BottleneckConfig(target_modules={"b", "a"}).target_modules == ["a", "b"]
    assert edgepeft.IA3Config(exclude_modules={"x"}).exclude_modules == ["x"]


def test_a_base_whose_config_says_pad_token_id_minus_one_exports(tiny_base, tmp_path):
    """Older Llama conversions say pad_token_id -1: the export's sample batch padded with it (an IndexError and a
    torch traceback); it pads with 0 there."""
    import os
    import shutil

    from edgepeft.exporters import export
    from edgepeft.runtimes import Runtime
    from file_checks import edit_json
    from peft_refs import lora_adapter

    base = str(tmp_path / "base")
    shutil.copytree(tiny_base("llama"), base)
    edit_json(os.path.join(base, "config.json"), pad_token_id=-1)
    out = str(tmp_path / "out")
    export([lora_adapter(tmp_path / "qv", base, "causal-lm", 6, r=2, target_modules=["q_proj"])], out, names=["qv"])
    assert Runtime(out).generate(np.array([[5, 6, 7]]), adapter="qv", max_new_tokens=2).shape == (1, 5)


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_no_repeat_ngram_matches_transformers(n):
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    scores = random_scores(rows=4, vocab=16, seed=9)
    sequences = np.random.default_rng(10).integers(0, 16, size=(4, 12)).astype(np.int64)
    sequences[1, -2:] = sequences[1, 3:5]  # a bigram seen before: what follows it is banned
    sequences[2, -3:] = sequences[2, 0:3]
    ref = NoRepeatNGramLogitsProcessor(n)(torch.from_numpy(sequences), torch.from_numpy(scores.copy())).numpy()
    assert_same_scores(gen.apply_no_repeat_ngram(scores, sequences, n), ref)
    assert np.isneginf(ref).any() or n == 6


@pytest.mark.parametrize("new", [0, 2, 3, 5])
def test_min_lengths_hold_eos_back_as_transformers(new):
    from transformers.generation.logits_process import MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor

    scores = random_scores(rows=3, vocab=16, seed=11)
    sequences = np.random.default_rng(12).integers(0, 16, size=(3, 6 + new)).astype(np.int64)
    eos = torch.tensor([2, 7])
    for ours_cfg, proc in ((dict(min_new_tokens=3), MinNewTokensLengthLogitsProcessor(6, 3, eos)),
                           (dict(min_length=10), MinLengthLogitsProcessor(10, eos))):
        cfg = gen.GenerationConfig(eos_token_id=[2, 7], **ours_cfg)
        ref = proc(torch.from_numpy(sequences), torch.from_numpy(scores.copy())).numpy()
        assert_same_scores(gen.hold_back_eos(scores, sequences, cfg, prompt_length=6), ref)


@pytest.mark.parametrize("p", [0.0, 0.05, 0.2, 0.9, 1.0])
def test_min_p_matches_transformers(p):
    from transformers.generation.logits_process import MinPLogitsWarper

    scores = random_scores(seed=13)
    ref = MinPLogitsWarper(p)(None, torch.from_numpy(scores.copy())).numpy()
    assert_same_scores(gen.apply_min_p(scores, p), ref)


def test_bfloat16_scalars_are_numbers_in_calls(shared_export):
    """Found by a hunt: ml_dtypes' bfloat16 scalar (numpy's bf16 in onnx and JAX) as a weight or a sampling setting
    was refused as "give a finite number ... got 0.5"; np.float16 was taken. It is the float it holds."""
    import ml_dtypes

    from edgepeft.runtimes import Runtime
    from tiny import sample_batch

    rt = Runtime(shared_export("llama")[0])
    ids, mask = sample_batch(batch=2, seq=5)
    bf16 = ml_dtypes.bfloat16
    np.testing.assert_array_equal(rt.forward(ids, mask, adapter={"qv": bf16(0.5)})["logits"],
                                  rt.forward(ids, mask, adapter={"qv": 0.5})["logits"])
    options = dict(max_new_tokens=4, eos_token_id=[], do_sample=True, seed=3)
    sampled = rt.generate(ids, mask, adapter="qv", temperature=bf16(0.75), top_p=bf16(0.875), min_p=bf16(0.0625),
                          repetition_penalty=bf16(1.25), **options)
    np.testing.assert_array_equal(sampled, rt.generate(ids, mask, adapter="qv", temperature=0.75, top_p=0.875,
                                                       min_p=0.0625, repetition_penalty=1.25, **options))
