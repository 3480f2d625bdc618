"""Decoder graphs project onto the vocabulary only the positions asked for.

Cached decoder exports take transformers' ``logits_to_keep`` as an int64 scalar
input: the last N positions' logits, 0 (the default) for all. Generation binds 1,
so a prefill computes one row of logits instead of one per prompt token; a plain
forward keeps all of them, and an export made before the input existed still runs.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from file_checks import edited_json
from tiny import DECODER_ARCHS
from edgepeft.runtimes import Runtime
from edgepeft.runtimes.manifest import BASE_DIR, BASE_MANIFEST, LOGITS_TO_KEEP, cache_names


def prefill_feeds(rt: Runtime, seq: int = 7):
    """A left-padded batch of 2 with an empty cache, as a prefill with no adapter."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 128, size=(2, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    c = rt.cache
    empty = np.zeros((2, c["num_kv_heads"], 0, c["head_dim"]), np.float32)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **{n: empty for n in cache_names(c, "past")}}


def recorded_logits_shapes(rt: Runtime, monkeypatch) -> list:
    """Patch rt's session to record the shape of the logits of every run."""
    shapes = []
    run = rt.session.run_with_iobinding

    def recording(binding, *args, **kwargs):
        result = run(binding, *args, **kwargs)
        shapes.append(tuple(binding.get_outputs()[0].shape()))
        return result

    monkeypatch.setattr(rt.session, "run_with_iobinding", recording)
    return shapes


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_kept_logits_are_the_tail_of_all_logits(arch, shared_export):
    rt = Runtime(shared_export(arch)[0], load_adapters=False)
    assert LOGITS_TO_KEEP in rt.manifest["inputs"]
    feeds = prefill_feeds(rt)
    seq = feeds["input_ids"].shape[1]
    every = rt.session.run(["logits"], feeds)[0]  # not fed: the default, 0
    assert every.shape[:2] == (2, seq)
    np.testing.assert_array_equal(rt.session.run(["logits"], {**feeds, LOGITS_TO_KEEP: np.array(0)})[0], every)
    for keep in (1, 3, seq, seq + 5):  # more than there are keeps them all
        kept = rt.session.run(["logits"], {**feeds, LOGITS_TO_KEEP: np.array(keep)})[0]
        assert kept.shape == (2, min(keep, seq), every.shape[-1])
        np.testing.assert_allclose(kept, every[:, -min(keep, seq):], rtol=0, atol=1e-5)


def test_generation_prefills_one_position_and_forward_all(shared_export, monkeypatch):
    out, dirs, _ = shared_export("llama")
    rt = Runtime(out)
    name = sorted(dirs)[0]
    shapes = recorded_logits_shapes(rt, monkeypatch)
    ids = np.arange(3, 12, dtype=np.int64)[None, :]
    rt.generate(ids, adapter=name, max_new_tokens=3)
    assert [s[:2] for s in shapes] == [(1, 1)] * 3  # prefill, then two decode steps
    assert rt.forward(ids, adapter=name)["logits"].shape[:2] == (1, 9)


def test_an_export_without_the_input_still_generates_alike(shared_export, tmp_path, monkeypatch):
    """An export made before ``logits_to_keep`` (its manifest lacks it): full logits, same tokens."""
    out, dirs, _ = shared_export("llama")
    old = str(tmp_path / "old")
    shutil.copytree(out, old)
    path = os.path.join(old, BASE_DIR, BASE_MANIFEST)
    with edited_json(path) as manifest:
        del manifest["inputs"][LOGITS_TO_KEEP]
    name = sorted(dirs)[0]
    ids = np.arange(3, 12, dtype=np.int64)[None, :]
    new_ids = Runtime(out).generate(ids, adapter=name, max_new_tokens=4)
    rt_old = Runtime(old)
    shapes = recorded_logits_shapes(rt_old, monkeypatch)
    np.testing.assert_array_equal(rt_old.generate(ids, adapter=name, max_new_tokens=4), new_ids)
    assert shapes[0][:2] == (1, 9)  # the prefill computed every position, as before
