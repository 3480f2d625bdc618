"""Text generation on the runtime, against HF PEFT / transformers as the reference.

Greedy ids and per-step logits (prefill and every cached decode step) match
``peft.PeftModel.generate``; sampling is reproducible and its logits processing
matches transformers' processors; switching adapters leaks no cache state; EOS,
stop strings, bad input, the text helpers and ``edgepeft run`` behave as documented.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from peft_refs import ADAPTER_SPECS, hf_generate
from tiny import DECODER_ARCHS, load_reference_base, max_diff_valid, torch_outputs
from word_tokenizer import PROMPT, TEMPLATE, decode
from edgepeft.runtimes import (
    AdapterInUseError,
    ArtifactNotFoundError,
    ConfigError,
    EdgePeftError,
    InvalidInputError,
    Runtime,
    UnknownAdapterError,
)
from edgepeft.runtimes import generation as generation_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW = 16  # new tokens per greedy run
PAD = 0
ATOL = 1e-4

# Every LoRA adapter of the shared decoder exports, plus the bare base (adapter None).
CASES = [(arch, name) for arch in DECODER_ARCHS for name, _ in ADAPTER_SPECS[arch]] + [(arch, None) for arch in DECODER_ARCHS]
CASE_IDS = [f"{arch}-{name or 'base'}" for arch, name in CASES]


def prompt_batch(seq=10, pad=3, seed=7):
    """Two rows, ids in [3, 128); row 1 left-padded with ``pad`` pad tokens (id 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 128, size=(2, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    ids[1, :pad] = PAD
    mask[1, :pad] = 0
    return ids, mask


@pytest.fixture(scope="module")
def runtime_for(shared_export):
    """runtime_for(arch) -> one Runtime over shared_export(arch), kept for the module."""
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = Runtime(shared_export(arch)[0])
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def reference_for(shared_export, hf_reference, tiny_base):
    """reference_for(arch, name) -> HF model (PeftModel for an adapter, the plain base for None), eos disabled."""

    def make(arch, name):
        if name is None:
            model = load_reference_base(tiny_base(arch), "causal-lm")
        else:
            model = hf_reference(arch, shared_export(arch)[1][name])
        model.generation_config.eos_token_id = None  # as our eos_token_id=[]: never stop early
        return model

    return make


@pytest.fixture(scope="module")
def greedy_ref(reference_for):
    """greedy_ref(arch, name) -> (ids, mask, HF sequences, HF per-step logits) for prompt_batch(), NEW tokens."""
    cache = {}

    def get(arch, name):
        if (arch, name) not in cache:
            ids, mask = prompt_batch()
            seqs, logits = hf_generate(reference_for(arch, name), ids, mask, max_new_tokens=NEW, pad_token_id=PAD)
            assert seqs.shape == (2, ids.shape[1] + NEW), "HF stopped early: eos was not disabled"
            cache[(arch, name)] = (ids, mask, seqs, logits)
        return cache[(arch, name)]

    return get


# ---------------------------------------------------------------- 1. greedy ids
@pytest.mark.parametrize("arch,name", CASES, ids=CASE_IDS)
def test_greedy_ids_match_peft_generate(arch, name, runtime_for, greedy_ref):
    ids, mask, hf_seqs, _ = greedy_ref(arch, name)
    ours = runtime_for(arch).generate(ids, mask, adapter=name, max_new_tokens=NEW, eos_token_id=[])
    assert ours.dtype == np.int64
    assert ours.shape == hf_seqs.shape
    np.testing.assert_array_equal(ours[:, : ids.shape[1]], ids)  # the prompt comes back unchanged
    np.testing.assert_array_equal(ours, hf_seqs)


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_greedy_with_repetition_penalty_matches_peft_generate(arch, runtime_for, reference_for):
    """Penalised greedy decoding on a left-padded batch, as HF generate does it.

    transformers' generate leaves a row's left padding out of the penalty
    (RepetitionPenaltyLogitsProcessor(prompt_ignore_length=first real position)),
    so the pad id is not penalised merely for padding the prompt.
    """
    name = ADAPTER_SPECS[arch][-1][0]
    ids, mask = prompt_batch(seed=11)
    for penalty in (1.5, 0.8):
        hf_seqs, _ = hf_generate(reference_for(arch, name), ids, mask, max_new_tokens=NEW, pad_token_id=PAD,
                                 repetition_penalty=penalty)
        ours = runtime_for(arch).generate(ids, mask, adapter=name, max_new_tokens=NEW, eos_token_id=[],
                                          repetition_penalty=penalty)
        np.testing.assert_array_equal(ours, hf_seqs, err_msg=f"repetition_penalty={penalty}")


def test_generation_may_fill_every_position(runtime_for, reference_for):
    """prompt + max_new_tokens == max positions + 1 is allowed (the last token is never fed back) and matches HF
    (gpt2: learned positions); one more is refused."""
    rt = runtime_for("gpt2")
    assert rt.max_positions == 64
    ids, mask = prompt_batch(seq=8, pad=2, seed=5)
    new = rt.max_positions - ids.shape[1] + 1
    hf_seqs, _ = hf_generate(reference_for("gpt2", "all"), ids, mask, max_new_tokens=new, pad_token_id=PAD)
    ours = rt.generate(ids, mask, adapter="all", max_new_tokens=new, eos_token_id=[])
    assert ours.shape == (2, rt.max_positions + 1)
    np.testing.assert_array_equal(ours, hf_seqs)
    with pytest.raises(InvalidInputError, match="exceeds the model's 64 positions"):
        rt.generate(ids, mask, adapter="all", max_new_tokens=new + 1)


# ---------------------------------------------------------------- 2. logits at every step
@pytest.mark.parametrize("arch,name", CASES, ids=CASE_IDS)
def test_step_logits_match_peft_generate(arch, name, runtime_for, greedy_ref):
    """Teacher-forced with HF's tokens (``Runtime.step_logits``): the decode loop's logits match HF's at every step,
    and greedy generation picks HF's tokens from them."""
    ids, mask, hf_seqs, hf_logits = greedy_ref(arch, name)
    rt = runtime_for(arch)
    np.testing.assert_array_equal(rt.generate(ids, mask, adapter=name, max_new_tokens=NEW, eos_token_id=[]), hf_seqs)
    steps = rt.step_logits(ids, mask, adapter=name)
    seen = [next(steps)] + [steps.send(hf_seqs[:, ids.shape[1] + i]) for i in range(NEW - 1)]
    steps.close()
    assert len(seen) == NEW and hf_logits.shape == (NEW, 2, 128)
    for step in range(NEW):  # step 0 is the prefill; the last position of every row is a real token
        diff = float(np.abs(seen[step] - hf_logits[step]).max())
        assert diff <= ATOL, f"{arch}/{name}: step {step} logits differ from HF by {diff:.2e}"


def test_step_logits_says_to_send_tokens_after_the_prefill(runtime_for):
    """next() again (a for loop over the steps) said 'an integer array of shape (2,), got object[]'."""
    steps = runtime_for("llama").step_logits(*prompt_batch(), adapter="all")
    next(steps)
    with pytest.raises(InvalidInputError, match=r"^step_logits: next\(\) runs the prefill only; send each decode "):
        next(steps)
    steps.close()
    for again in (lambda: next(steps), lambda: steps.send(np.array([5, 6]))):  # closed: as a finished generator
        with pytest.raises(StopIteration):  # (next() said to send tokens; send raised it already)
            again()


# ---------------------------------------------------------------- 3. sampling
def test_sampling_is_reproducible_with_a_seed(runtime_for):
    rt = runtime_for("llama")
    ids, mask = prompt_batch()
    kw = dict(adapter="all", max_new_tokens=NEW, eos_token_id=[], do_sample=True, temperature=1.5, top_k=0)
    a = rt.generate(ids, mask, seed=123, **kw)
    b = rt.generate(ids, mask, seed=123, **kw)
    c = rt.generate(ids, mask, seed=124, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c), "different seeds gave the same 2x16 sampled tokens"
    greedy = rt.generate(ids, mask, adapter="all", max_new_tokens=NEW, eos_token_id=[])
    assert not np.array_equal(a, greedy), "sampling at temperature 1.5 returned the greedy ids"
    # stream with the same seed yields the same tokens
    streamed = np.stack(list(rt.stream(ids, mask, seed=123, **kw)), axis=1)
    np.testing.assert_array_equal(streamed, a[:, ids.shape[1]:])


def test_greedy_ignores_sampling_values(runtime_for):
    """As transformers: do_sample=False takes no notice of temperature, top_k or top_p (0 included)."""
    rt = runtime_for("llama")
    ids, mask = prompt_batch()
    plain = rt.generate(ids, mask, adapter="qv", max_new_tokens=6, eos_token_id=[])
    odd = rt.generate(ids, mask, adapter="qv", max_new_tokens=6, eos_token_id=[], temperature=0.0, top_p=0.0, top_k=-1)
    np.testing.assert_array_equal(odd, plain)


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_top_k_1_and_tiny_top_p_sampling_equal_greedy(arch, runtime_for, greedy_ref):
    name = ADAPTER_SPECS[arch][0][0]
    ids, mask, hf_seqs, _ = greedy_ref(arch, name)
    rt = runtime_for(arch)
    for extra in (dict(top_k=1, temperature=2.0), dict(top_k=0, top_p=1e-6, temperature=0.7)):
        out = rt.generate(ids, mask, adapter=name, max_new_tokens=NEW, eos_token_id=[], do_sample=True, seed=5, **extra)
        np.testing.assert_array_equal(out, hf_seqs, err_msg=str(extra))


# ---------------------------------------------------------------- 4. switching adapters
def test_switching_adapters_between_generate_calls_leaks_no_state(shared_export):
    out, _, _ = shared_export("llama")
    ids, mask = prompt_batch()
    kw = dict(max_new_tokens=NEW, eos_token_id=[])
    fresh = {name: Runtime(out).generate(ids, mask, adapter=name, **kw) for name in ("qv", "all", None)}
    assert not np.array_equal(fresh["qv"], fresh["all"]) and not np.array_equal(fresh["qv"], fresh[None])
    rt = Runtime(out)
    for name in ("qv", "all", "qv", None, "all", None, "qv"):
        np.testing.assert_array_equal(rt.generate(ids, mask, adapter=name, **kw), fresh[name], err_msg=str(name))


def test_interleaved_streams_of_two_adapters(shared_export, runtime_for):
    out, _, _ = shared_export("llama")
    ids_a, mask_a = prompt_batch()
    ids_b, mask_b = prompt_batch(seq=6, pad=2, seed=9)  # another shape: a mixed-up cache cannot go unnoticed
    kw = dict(max_new_tokens=NEW, eos_token_id=[])
    solo_a = Runtime(out).generate(ids_a, mask_a, adapter="qv", **kw)[:, ids_a.shape[1]:]
    solo_b = Runtime(out).generate(ids_b, mask_b, adapter="all", **kw)[:, ids_b.shape[1]:]
    solo_c = Runtime(out).generate(ids_a, mask_a, adapter="all", **kw)[:, ids_a.shape[1]:]

    rt = Runtime(out)
    ga = rt.stream(ids_a, mask_a, adapter="qv", **kw)
    gb = rt.stream(ids_b, mask_b, adapter="all", **kw)
    gc = rt.stream(ids_a, mask_a, adapter="all", **kw)  # same adapter as gb, other prompt, alive at once
    got_a, got_b, got_c = [], [], []
    for step in range(NEW):
        got_a.append(next(ga))
        got_b.append(next(gb))
        got_c.append(next(gc))
        if step == 3:
            with pytest.raises(AdapterInUseError):  # held while its generator is alive
                rt.unload_adapter("qv")
    for g in (ga, gb, gc):
        with pytest.raises(StopIteration):
            next(g)
    assert all(t.shape == (2,) and t.dtype == np.int64 for t in got_a + got_b + got_c)
    np.testing.assert_array_equal(np.stack(got_a, 1), solo_a)
    np.testing.assert_array_equal(np.stack(got_b, 1), solo_b)
    np.testing.assert_array_equal(np.stack(got_c, 1), solo_c)
    rt.unload_adapter("qv")  # finished generators release their adapter


def test_sessions_spin_only_during_a_call(shared_export):
    """Threads spin within a call (cheap small ops per decode step) and stop when it returns (no starving)."""
    out, _, _ = shared_export("llama")
    so = Runtime(out).session.get_session_options()
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert so.get_session_config_entry("session.force_spinning_stop") == "1"


# ---------------------------------------------------------------- 5. forward without cache
@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_forward_without_cache_matches_hf(arch, runtime_for, reference_for):
    rt = runtime_for(arch)
    assert rt.cache  # a decoder export with KV-cache I/O: forward runs the past-length-0 path
    ids, mask = prompt_batch(seq=12, pad=4, seed=2)
    for name in [None] + [n for n, _ in ADAPTER_SPECS[arch]]:
        ours = rt.forward(ids, mask, adapter=name)["logits"]
        ref = torch_outputs(reference_for(arch, name), ids, mask, "logits")
        assert ours.shape == ref.shape == (2, 12, 128)
        diff = max_diff_valid(ours, ref, mask)
        assert diff <= ATOL, f"{arch}/{name}: forward logits differ from HF by {diff:.2e}"


# ---------------------------------------------------------------- 6. end of sequence
def stop_index(row, eos):
    hits = [i for i, t in enumerate(row) if t in eos]
    return hits[0] if hits else None


def eos_case(greedy_ref):
    """The first shared-export case whose greedy row 0 has a token (not its first) that row 1 never produces."""
    for arch, name in CASES:
        ids, mask, hf_seqs, _ = greedy_ref(arch, name)
        gen0, gen1 = hf_seqs[0, ids.shape[1]:].tolist(), hf_seqs[1, ids.shape[1]:].tolist()
        one = [t for i, t in enumerate(gen0) if 1 <= i <= NEW - 3 and gen0.index(t) == i and t not in gen1]
        if one:
            return arch, name, ids, mask, gen0, gen1, one[0]
    pytest.fail("no shared-export case has a usable eos candidate")


def test_eos_stops_rows_and_pads_like_hf(runtime_for, reference_for, greedy_ref):
    arch, name, ids, mask, gen0, gen1, eos = eos_case(greedy_ref)
    prompt_len = ids.shape[1]
    rt, model = runtime_for(arch), reference_for(arch, name)
    pad = 5  # not 0: finished rows must get pad_token_id, not a default

    # Row 0 stops at a token row 1 never produces; row 1 runs to max_new_tokens.
    s = gen0.index(eos)
    ours = rt.generate(ids, mask, adapter=name, max_new_tokens=NEW, eos_token_id=[eos], pad_token_id=pad)
    assert ours.shape == (2, prompt_len + NEW)
    assert ours[0, prompt_len:].tolist() == gen0[: s + 1] + [pad] * (NEW - s - 1)
    assert ours[1, prompt_len:].tolist() == gen1
    hf, _ = hf_generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=pad)
    np.testing.assert_array_equal(ours, hf)
    streamed = np.stack(list(rt.stream(ids, mask, adapter=name, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=pad)), 1)
    np.testing.assert_array_equal(streamed, ours[:, prompt_len:])  # a bare int works as eos_token_id too

    # Both rows stop: the output is shorter than max_new_tokens.
    pairs = [(a, b) for a in gen0[: NEW - 3] for b in gen1[: NEW - 3]]
    pairs = [p for p in pairs if max(stop_index(gen0, p), stop_index(gen1, p)) < NEW - 2]
    assert pairs
    eos_ids = list(pairs[0])
    stops = [stop_index(gen0, eos_ids), stop_index(gen1, eos_ids)]
    ours = rt.generate(ids, mask, adapter=name, max_new_tokens=NEW, eos_token_id=eos_ids, pad_token_id=pad)
    assert ours.shape == (2, prompt_len + max(stops) + 1)
    for row, (g, stop) in enumerate(zip((gen0, gen1), stops)):
        assert ours[row, prompt_len:].tolist() == g[: stop + 1] + [pad] * (max(stops) - stop)
    hf, _ = hf_generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=eos_ids, pad_token_id=pad)
    np.testing.assert_array_equal(ours, hf)


def test_default_eos_and_pad_come_from_the_model(runtime_for, shared_export, hf_reference, monkeypatch):
    """Without eos_token_id/pad_token_id the model's own (eos 2, pad 0) apply, as in HF generate."""
    rt = runtime_for("llama")
    assert rt.manifest["eos_token_id"] == [2] and rt.manifest["pad_token_id"] == 0
    ids, mask = prompt_batch(seed=13)
    model = hf_reference("llama", shared_export("llama")[1]["all"])  # generation_config untouched: eos 2
    hf, _ = hf_generate(model, ids, mask, max_new_tokens=NEW)
    np.testing.assert_array_equal(rt.generate(ids, mask, adapter="all", max_new_tokens=NEW), hf)

    # Force the model's eos (2) into row 0 at step 2 and row 1 at step 4: defaults stop and pad with 0.
    forced = np.full((2, NEW), 9, np.int64)
    forced[0, 2] = forced[1, 4] = 2
    steps = []

    def teacher(logits, sequences, *args, **kwargs):
        steps.append(1)
        return forced[:, len(steps) - 1].copy()

    # no public call picks the tokens generate takes: the token selection is replaced to force eos at given steps
    monkeypatch.setattr(generation_module, "next_tokens", teacher)
    out = rt.generate(ids, mask, adapter="all", max_new_tokens=NEW)
    assert out[:, ids.shape[1]:].tolist() == [[9, 9, 2, 0, 0], [9, 9, 9, 9, 2]]


def test_a_generation_config_without_a_pad_fills_finished_rows_with_its_eos(tiny_base, peft_adapter, tmp_path):
    """transformers fills finished rows with the first eos where the model's generation_config.json names no
    pad_token_id (many checkpoints' do); the export took config.json's pad (0) there."""
    import json
    import shutil

    import peft
    import transformers as tf

    from edgepeft.exporters import export

    base = str(tmp_path / "base")
    shutil.copytree(tiny_base("llama"), base)
    adapter = peft_adapter("llama", "qv-eos", seed=21, r=2, target_modules=["q_proj", "v_proj"])

    def reference(ids, mask):
        model = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), adapter).eval()
        return hf_generate(model, ids, mask, max_new_tokens=6)[0]

    ids, mask = prompt_batch(seq=6, pad=0, seed=3)
    first = reference(ids, mask)[:, ids.shape[1]:]
    eos = next(int(t) for t in first[0, :3] if t not in first[1])  # row 0 ends early, row 1 never
    with open(os.path.join(base, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [eos]}, f)
    export([adapter], str(tmp_path / "out"), base=base, names=["qv"])
    ours = Runtime(str(tmp_path / "out")).generate(ids, mask, adapter="qv", max_new_tokens=6)
    np.testing.assert_array_equal(ours, reference(ids, mask))
    assert ours[0, -1] == eos


# ---------------------------------------------------------------- 7. bad input
def test_bad_generation_input_raises_and_runtime_keeps_working(shared_export):
    out, _, _ = shared_export("llama")
    rt = Runtime(out)
    ids, mask = prompt_batch()
    good = dict(adapter="qv", max_new_tokens=8, eos_token_id=[])
    expected = rt.generate(ids, mask, **good)
    long_ids = np.full((1, 65), 5, np.int64)
    zero_row = mask.copy()
    zero_row[1] = 0
    right_padded = np.ones_like(mask)
    right_padded[0, -2:] = 0  # tokens, then padding: the new tokens would follow the pads
    no_pad = Runtime(out)  # a model whose config has no padding id: the first eos id pads finished rows
    no_pad.manifest["pad_token_id"] = None

    def send_past_the_positions():
        steps = rt.step_logits(np.full((1, 63), 5, np.int64), adapter="qv")
        next(steps)
        steps.send([5])  # position 64 of 64
        steps.send([5])

    bad = [
        ("prompt past max positions", InvalidInputError, lambda: rt.generate(long_ids, adapter="qv", max_new_tokens=1)),
        ("prompt + new past max positions", InvalidInputError,
         lambda: rt.generate(np.full((1, 60), 5, np.int64), adapter="qv", max_new_tokens=6)),
        ("empty prompt", InvalidInputError, lambda: rt.generate(np.zeros((1, 0), np.int64), adapter="qv")),
        ("empty list", InvalidInputError, lambda: rt.generate([], adapter="qv")),
        ("all-zero mask row", InvalidInputError, lambda: rt.generate(ids, zero_row, **good)),
        ("right-padded row", InvalidInputError, lambda: rt.generate(ids, right_padded, **good)),
        ("right-padded row, stream", InvalidInputError, lambda: next(rt.stream(ids, right_padded, **good))),
        ("right-padded row, step_logits", InvalidInputError, lambda: next(rt.step_logits(ids, right_padded))),
        ("float ids", InvalidInputError, lambda: rt.generate(ids.astype(np.float32), mask, **good)),
        ("id outside vocab", InvalidInputError, lambda: rt.generate(ids + 200, mask, **good)),
        ("max_new_tokens=0", ConfigError, lambda: rt.generate(ids, mask, adapter="qv", max_new_tokens=0)),
        ("max_new_tokens<0", ConfigError, lambda: rt.generate(ids, mask, adapter="qv", max_new_tokens=-3)),
        ("max_new_tokens float", ConfigError, lambda: rt.generate(ids, mask, adapter="qv", max_new_tokens=2.5)),
        ("temperature=0", ConfigError, lambda: rt.generate(ids, mask, do_sample=True, temperature=0.0, **good)),
        ("temperature<0", ConfigError, lambda: rt.generate(ids, mask, do_sample=True, temperature=-1.0, **good)),
        ("top_p<0", ConfigError, lambda: rt.generate(ids, mask, do_sample=True, top_p=-0.1, **good)),
        ("top_p>1", ConfigError, lambda: rt.generate(ids, mask, do_sample=True, top_p=1.5, **good)),
        ("top_k<0", ConfigError, lambda: rt.generate(ids, mask, do_sample=True, top_k=-1, **good)),
        ("repetition_penalty=0", ConfigError, lambda: rt.generate(ids, mask, repetition_penalty=0.0, **good)),
        ("temperature a string", ConfigError, lambda: rt.generate(ids, mask, temperature="hot", **good)),
        ("temperature nan", ConfigError, lambda: rt.generate(ids, mask, do_sample=True, temperature=float("nan"), **good)),
        ("do_sample not a bool", ConfigError, lambda: rt.generate(ids, mask, do_sample="yes", **good)),
        ("seed<0", ConfigError, lambda: rt.generate(ids, mask, do_sample=True, seed=-1, **good)),
        ("seed float", ConfigError, lambda: rt.generate(ids, mask, do_sample=True, seed=1.5, **good)),
        ("eos a string", ConfigError, lambda: rt.generate(ids, mask, adapter="qv", max_new_tokens=2, eos_token_id="x")),
        ("eos a string, no pad id", ConfigError, lambda: no_pad.generate(ids, mask, max_new_tokens=2, eos_token_id="x")),
        ("eos [None], no pad id", ConfigError, lambda: no_pad.generate(ids, mask, max_new_tokens=2, eos_token_id=[None])),
        ("eos ragged", ConfigError, lambda: rt.generate(ids, mask, max_new_tokens=2, eos_token_id=[[1], [2, 3]])),
        ("eos past int64", ConfigError, lambda: rt.generate(ids, mask, max_new_tokens=2, eos_token_id=2**70)),
        ("eos past int64, stream", ConfigError,  # at the call, not at the first token
         lambda: rt.stream(ids, mask, max_new_tokens=2, eos_token_id=[np.uint64(2**64 - 1)])),
        ("step_logits sent past max positions", InvalidInputError, send_past_the_positions),
        ("pad outside vocab", ConfigError, lambda: rt.generate(ids, mask, pad_token_id=500, **good)),
        ("stop a number", ConfigError, lambda: rt.generate(ids, mask, stop=123, **good)),
        ("stop numbers", ConfigError, lambda: rt.generate(ids, mask, stop=[123], **good)),
        ("ragged mask", InvalidInputError, lambda: rt.generate(ids, [[1, 1], [1]], **good)),
        ("prompt not text", InvalidInputError, lambda: rt.generate_text(123, adapter="qv")),
        ("unknown kwarg to stream", ConfigError, lambda: rt.stream(ids, mask, temprature=0.5, **good)),
        ("unknown kwarg to generate", ConfigError, lambda: rt.generate(ids, mask, temprature=0.5, **good)),
        ("unknown adapter", UnknownAdapterError, lambda: rt.generate(ids, mask, adapter="nope", max_new_tokens=2)),
        ("stop strings without tokenizer", ArtifactNotFoundError,
         lambda: rt.generate(ids, mask, stop=["w1"], **good)),
        ("text without tokenizer", ArtifactNotFoundError, lambda: rt.generate_text("hello", adapter="qv")),
    ]
    failures = []
    for label, error, call in bad:
        try:
            call()
        except EdgePeftError as e:
            if not isinstance(e, error):
                failures.append(f"{label}: {type(e).__name__} instead of {error.__name__}: {e}")
            elif not str(e).strip():
                failures.append(f"{label}: empty message")
        except Exception as e:  # noqa: BLE001 - every other type is a failure of the contract
            failures.append(f"{label}: {type(e).__name__} (not an EdgePeftError): {e}")
        else:
            failures.append(f"{label}: no error")
    assert not failures, "\n".join(failures)
    np.testing.assert_array_equal(rt.generate(ids, mask, **good), expected)
    rt.unload_adapter("qv")  # no failed call left the adapter marked in use


def test_generate_on_a_feature_extraction_export_is_refused(shared_export):
    rt = Runtime(shared_export("bert")[0])
    ids, mask = prompt_batch()
    with pytest.raises(ConfigError, match="generation"):
        rt.generate(ids, mask, adapter="qv", max_new_tokens=2)
    with pytest.raises(ConfigError):
        rt.stream(ids, mask, adapter="qv")
    assert rt.forward(ids, mask, adapter="qv")["last_hidden_state"].shape == (2, 10, 32)  # still works


# ---------------------------------------------------------------- 8. text helpers
def test_generate_text_equals_decoded_generate(text_export, text_rt):
    _, tok, _ = text_export
    ids = np.array([tok.encode(PROMPT).ids], dtype=np.int64)
    assert ids[0, 0] == 1 and ids.shape == (1, 5)  # <s> added by the post-processor
    for adapter in ("tok", None):
        out = text_rt.generate(ids, adapter=adapter, max_new_tokens=12)
        text = text_rt.generate_text(PROMPT, adapter=adapter, max_new_tokens=12)
        assert isinstance(text, str) and text.strip()
        assert text == decode(tok, out[0, ids.shape[1]:])
    assert text_rt.generate_text(PROMPT, adapter="tok", max_new_tokens=12) != text_rt.generate_text(
        PROMPT, adapter=None, max_new_tokens=12)


def test_generate_text_batch_is_left_padded(text_export, text_rt):
    _, tok, _ = text_export
    prompts = [PROMPT, "w99 w98"]
    rows = [tok.encode(p).ids for p in prompts]
    width = max(map(len, rows))
    ids = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    out = text_rt.generate(ids, mask, adapter="tok", max_new_tokens=10)
    texts = text_rt.generate_text(prompts, adapter="tok", max_new_tokens=10)
    assert texts == [decode(tok, row[width:]) for row in out]


def test_generate_text_on_a_list_gives_each_prompt_its_text_alone_whatever_the_padding_id(text_rt):
    """A row that ended first (eos) is filled with the padding id; where that is no special token, decode kept its
    text after the row's end: the batch gave other text than the prompt alone."""
    prompts = [PROMPT, "w99 w98"]
    first = [text_rt.generate(*text_rt.tokenizer.encode(p), adapter="tok", max_new_tokens=6, eos_token_id=[])[0, -6:]
             for p in prompts]
    eos = next(int(t) for t in first[0][:3] if t not in first[1])  # row 0 ends early, row 1 runs on
    pad = next(int(t) for t in first[1] if t not in first[0])  # a plain word's id
    kw = dict(adapter="tok", max_new_tokens=6, eos_token_id=[eos], pad_token_id=pad)
    assert text_rt.generate_text(prompts, **kw) == [text_rt.generate_text(p, **kw) for p in prompts]
    word = text_rt.tokenizer.decode([eos])  # the same row ended by a stop string instead (the review's find), and
    for stop in (word, "40 " + word[:2]):  # by one that begins in the prompt (w40, then the first new word)
        kw = dict(adapter="tok", max_new_tokens=6, eos_token_id=[], pad_token_id=pad, stop=[stop])
        alone = [text_rt.generate_text(p, **kw) for p in prompts]
        assert text_rt.generate_text(prompts, **kw) == alone and alone[0] == word, stop


def test_stream_text_pieces_concatenate_to_generate_text(text_rt):
    for kw in (dict(), dict(do_sample=True, seed=4, temperature=1.5, top_k=0), dict(chat=True)):
        pieces = list(text_rt.stream_text(PROMPT, adapter="tok", max_new_tokens=12, **kw))
        assert len(pieces) > 1 and all(isinstance(p, str) and p for p in pieces)
        assert "".join(pieces) == text_rt.generate_text(PROMPT, adapter="tok", max_new_tokens=12, **kw), kw


def test_chat_uses_the_template(text_export, text_rt):
    import jinja2

    _, tok, _ = text_export
    for messages in ([{"role": "user", "content": PROMPT}],
                     [{"role": "system", "content": "w50 w51"}, {"role": "user", "content": PROMPT}]):
        rendered = jinja2.Environment().from_string(TEMPLATE).render(messages=messages, add_generation_prompt=True)
        assert rendered.endswith("assistant:")
        ids = np.array([tok.encode(rendered, add_special_tokens=False).ids], dtype=np.int64)
        assert 3 not in ids  # every word is in the vocab
        out = text_rt.generate(ids, adapter="tok", max_new_tokens=12)
        expected = decode(tok, out[0, ids.shape[1]:])
        prompt = PROMPT if len(messages) == 1 else messages  # a plain string is one user message
        assert text_rt.generate_text(prompt, adapter="tok", chat=True, max_new_tokens=12) == expected
        # messages as a tuple, as transformers' apply_chat_template takes them (refused: "a list of chat messages")
        assert text_rt.generate_text(tuple(messages), adapter="tok", chat=True, max_new_tokens=12) == expected
        assert text_rt.generate_text([tuple(messages)], adapter="tok", chat=True, max_new_tokens=12) == [expected]


def test_stop_strings_cut_generation_right_after_the_match(text_export, text_rt):
    _, tok, _ = text_export
    ids = np.array([tok.encode(PROMPT).ids], dtype=np.int64)
    new = text_rt.generate(ids, adapter="tok", max_new_tokens=16)[0, ids.shape[1]:].tolist()
    words = decode(tok, new).split()
    assert len(words) >= 4, words
    stop = words[2]  # a word the greedy output holds (not at its start)
    n = next(k for k in range(1, len(new) + 1) if stop in decode(tok, new[:k]))  # tokens until the text holds it
    assert n < len(new)
    out = text_rt.generate(ids, adapter="tok", max_new_tokens=16, stop=[stop])
    assert out[0, ids.shape[1]:].tolist() == new[:n]
    text = text_rt.generate_text(PROMPT, adapter="tok", max_new_tokens=16, stop=stop)
    assert text == decode(tok, new[:n]) and text.endswith(stop)
    assert "".join(text_rt.stream_text(PROMPT, adapter="tok", max_new_tokens=16, stop=[stop])) == text
    # a stop string that never appears changes nothing
    assert text_rt.generate_text(PROMPT, adapter="tok", max_new_tokens=16, stop=["never"]) == decode(tok, new)


# ---------------------------------------------------------------- 9. CLI
def edgepeft(*args, timeout=120):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run([sys.executable, "-m", "edgepeft", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


@pytest.mark.parametrize("adapter,extra,api", [
    ("tok", [], {}),
    ("none", [], {}),
    ("tok", ["--chat"], {"chat": True}),
    ("tok", ["--do-sample", "--seed", "3", "--temperature", "1.5", "--top-k", "0", "--top-p", "0.9"],
     {"do_sample": True, "seed": 3, "temperature": 1.5, "top_k": 0, "top_p": 0.9}),
    ("tok", ["--repetition-penalty", "1.8"], {"repetition_penalty": 1.8}),
], ids=["adapter", "base", "chat", "sampling", "penalty"])
def test_cli_run_streams_generated_text(adapter, extra, api, text_export, text_rt):
    out = text_export[0]
    proc = edgepeft("run", out, "--adapter", adapter, PROMPT, "--max-new-tokens", 5, *extra)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    expected = text_rt.generate_text(PROMPT, adapter=None if adapter == "none" else adapter, max_new_tokens=5, **api)
    assert expected.strip()
    assert proc.stdout.strip() == expected.strip()


def test_cli_run_unknown_adapter_is_a_one_line_error(text_export):
    proc = edgepeft("run", text_export[0], "--adapter", "nope", PROMPT, "--max-new-tokens", 5)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    assert "nope" in errors[0] and "tok" in errors[0]  # names the bad adapter and the loaded ones


def test_a_mask_with_a_hole_is_named_so_not_told_to_pad_left(shared_export):
    """A masks hunt: [1, 1, 0, 0, 1, 1] (tokens masked out) was "padding after its tokens; ... padding_side='left'"."""
    from edgepeft.runtimes import InvalidInputError, Runtime

    rt, ids = Runtime(shared_export("llama")[0]), np.full((1, 6), 5)
    with pytest.raises(InvalidInputError, match=r"^attention_mask row 0 masks out some of its tokens \(a 0 between 1s\)"):
        rt.generate(ids, np.array([[1, 1, 0, 0, 1, 1]]), max_new_tokens=2)
    with pytest.raises(InvalidInputError, match=r"padding after its tokens; generation needs the padding on the left"):
        rt.generate(ids, np.array([[1, 1, 1, 1, 0, 0]]), max_new_tokens=2)
