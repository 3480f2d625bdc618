"""Adapters under a memory budget (``Runtime(OUT, adapter_budget_bytes=N)``): at most N bytes of staged tensors, and
of the stacks mixed batches build from them, stay resident; the rest is restaged when a call names it, its answers
unchanged."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from tiny import mixed_batch as _batch

from edgepeft.errors import ConfigError, InvalidInputError, UnknownAdapterError
from edgepeft.runtimes import Runtime

KINDS = ["lora_qv", "lora_all", "ia3", "prompt", "prefix"]


@pytest.fixture(scope="module")
def rt(mixed_decoder):
    return Runtime(mixed_decoder[0])


def _served(rt, names):
    ids, mask = _batch(2, seed=11)
    return {n: rt.forward(ids, mask, adapter=n)["logits"] for n in names}


def test_a_budget_keeps_only_recent_adapters_staged_and_restages_the_rest_transparently(mixed_decoder, rt):
    want = _served(rt, KINDS)
    sizes = {n: sum(v.numpy().nbytes for v in rt.adapter_tensors(n).values()) for n in KINDS}
    budget = max(sizes.values()) + 1
    small = Runtime(mixed_decoder[0], adapter_budget_bytes=np.int64(budget))  # a numpy int is a whole number too
    assert small.adapter_names == sorted(KINDS) and small.store.resident_bytes <= budget
    with pytest.raises(ConfigError, match="adapter_budget_bytes"):
        Runtime(mixed_decoder[0], adapter_budget_bytes=True)  # not a byte count
    assert len(small.resident_adapters) < len(KINDS)
    for _ in range(2):
        for name in KINDS:  # every call restages what was evicted: the answers do not change
            np.testing.assert_array_equal(_served(small, [name])[name], want[name])
            assert small.resident_adapters[-1] == name and small.store.resident_bytes <= budget + max(sizes.values())
    mixed = small.forward(*_batch(5, seed=11), adapter=["lora_qv", "ia3", "lora_all", None, "lora_qv"])["logits"]
    assert mixed.shape[0] == 5  # a call holding more than the budget still runs (evicted after it)
    assert small.store.resident_bytes <= budget


def test_a_generation_under_a_budget_stages_each_evicted_adapter_once(mixed_decoder, rt, monkeypatch):
    """A call checks its adapters from what load recorded, so an evicted adapter is staged once, by the call itself."""
    from edgepeft.runtimes import adapters as store_module

    small = Runtime(mixed_decoder[0], adapter_budget_bytes=0)
    staged = []
    real = store_module.run_adapter_graph
    monkeypatch.setattr(store_module, "run_adapter_graph",
                        lambda graph, where, *bounds: staged.append(where) or real(graph, where, *bounds))
    ids, mask = _batch(2)
    for adapter in ("prompt", ["lora_qv", "prefix"]):
        staged.clear()
        want = rt.generate(ids, mask, adapter=adapter, max_new_tokens=3, eos_token_id=[])
        np.testing.assert_array_equal(small.generate(ids, mask, adapter=adapter, max_new_tokens=3, eos_token_id=[]), want)
        assert len(staged) == len(set(staged)) == (1 if isinstance(adapter, str) else 2), staged
        staged.clear()
        steps = small.step_logits(ids, mask, adapter=adapter)
        assert staged == []  # nothing staged before the first step
        next(steps)
        steps.close()
        assert len(staged) == (1 if isinstance(adapter, str) else 2), staged
    with pytest.raises(InvalidInputError, match="virtual tokens"):  # still checked at the call, from the manifest
        small.generate(np.full((1, small.max_positions - 2), 5), adapter="prompt", max_new_tokens=1)
    with pytest.raises(ConfigError, match="weighted sums are defined for LoRA"):
        small.stream(ids, mask, adapter={"prompt": 0.5})
    warm = Runtime(mixed_decoder[0], adapter_budget_bytes=sum(v.numpy().nbytes for v in rt.adapter_tensors("lora_all").values()))
    warm.forward(ids, mask, adapter="lora_all")
    staged.clear()
    for refused in ({"lora_qv": 0.5, "ia3": 0.5}, ["lora_qv", "nope"]):  # forward staged them and evicted lora_all
        with pytest.raises((ConfigError, UnknownAdapterError)):
            warm.forward(ids, mask, adapter=refused)
    assert staged == [] and warm.resident_adapters == ["lora_all"]


def test_the_stacks_of_mixed_batches_count_within_the_budget(mixed_decoder, rt):
    """A threads hunt: the budget counted staged tensors only, while the stacks mixed batches keep (16 sets, each
    adapter zero-padded to every slot of its kind) came on top: 22x the budget. They count now, shed first (built
    again from the staged tensors), and every answer stays the same."""
    stackable, ids, mask = ["lora_qv", "lora_all", "ia3"], *_batch(3, seed=5)
    unbounded = Runtime(mixed_decoder[0])
    unbounded.forward(ids, mask, adapter=stackable)
    budget = sum(rt.store.staged_bytes(n) for n in stackable) + unbounded.mixer.stacked_bytes  # room for one stack
    small = Runtime(mixed_decoder[0], adapter_budget_bytes=budget)
    for rows in [*itertools.permutations(stackable, 2), stackable]:  # the three last: its stack, which fits, is kept
        rows = [*rows, *[None] * (3 - len(rows))]
        want = unbounded.forward(ids, mask, adapter=rows)["logits"]
        np.testing.assert_allclose(small.forward(ids, mask, adapter=rows)["logits"], want, atol=1e-5)
        assert small.store.resident_bytes + small.mixer.stacked_bytes <= budget
    assert small.mixer.stacked_bytes and small.resident_adapters == sorted(stackable, key=small.resident_adapters.index)
    assert unbounded.store.resident_bytes + unbounded.mixer.stacked_bytes > 2 * budget  # what the budget now sheds


def test_the_least_recently_used_goes_first_a_stack_or_an_adapter(mixed_decoder, rt):
    """A review: the order between a stack and an adapter had no test (evicting adapters first passed). A stack not used
    since its adapters were used alone goes before them; an adapter not used since the stack goes before it."""
    ids, mask = _batch(2, seed=3)
    unbounded = Runtime(mixed_decoder[0])
    unbounded.forward(ids, mask, adapter=["lora_qv", "lora_all"])
    stack = unbounded.mixer.stacked_bytes
    pair, ia3 = sum(rt.store.staged_bytes(n) for n in ("lora_qv", "lora_all")), rt.store.staged_bytes("ia3")
    assert ia3 <= stack  # the budget below holds the three adapters, or the pair and its stack
    small = Runtime(mixed_decoder[0], adapter_budget_bytes=pair + stack)
    small.forward(ids, mask, adapter=["lora_qv", "lora_all"])  # the stack, newer than its adapters
    for name in ("lora_qv", "lora_all"):  # each used alone since: the stack is the oldest
        small.forward(ids, mask, adapter=name)
    small.forward(ids, mask, adapter="ia3")
    assert small.mixer.stacked_bytes == 0 and set(small.resident_adapters) == {"lora_qv", "lora_all", "ia3"}
    small.forward(ids, mask, adapter=["lora_qv", "lora_all"])  # now the stack is newer than ia3, which goes
    assert small.mixer.stacked_bytes == stack and "ia3" not in small.resident_adapters
