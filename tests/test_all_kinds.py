"""One tiny Llama base exported once with adapters of all five kinds (HF PEFT LoRA, IA3, prefix with and
without the projection MLP, prompt, and edgepeft's own bottleneck), served by one Runtime that switches
kind on every call: forward and greedy generation must match each adapter's own PyTorch reference, so
any slot left bound (or left unbound) from the previous call shows up as a mismatch."""
from __future__ import annotations

import numpy as np
import pytest

from peft_refs import bottleneck_adapter, greedy_reference, ia3_adapter, peft_virtual_adapter, runtime_step_logits
from tiny import load_reference_base, max_diff_valid, sample_batch, torch_outputs

import edgepeft
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime

ARCH = "llama"
PROMPT_TOKENS = 4  # the prompt-tuning adapter's virtual tokens: they come first in its forward output


@pytest.fixture(scope="module")
def all_kinds(workdir, tiny_base, peft_adapter, hf_reference):
    """(Runtime, {name: PyTorch reference model}): every kind exported into one base, once for the module."""
    root = workdir / "all-kinds"
    base = tiny_base(ARCH)
    dirs = {
        "bottleneck": bottleneck_adapter(root / "bottleneck", base, seed=41),
        "prefix": peft_virtual_adapter(root / "prefix", base, "prefix", seed=42, num_virtual_tokens=3),
        "prefix_mlp": peft_virtual_adapter(root / "prefix_mlp", base, "prefix", seed=43, num_virtual_tokens=5,
                                           prefix_projection=True, encoder_hidden_size=16),
        "prompt": peft_virtual_adapter(root / "prompt", base, "prompt", seed=44, num_virtual_tokens=PROMPT_TOKENS),
        "lora": peft_adapter(ARCH, "all-kinds-lora", seed=45, r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj", "down_proj"]),
        "ia3": ia3_adapter(root / "ia3", base, seed=46),
    }
    report = export(list(dirs.values()), str(workdir / "out-llama-all-kinds"), names=list(dirs))
    assert all(c["max_abs_diff"] <= 1e-4 for c in report["checks"])
    rt = Runtime(workdir / "out-llama-all-kinds")
    assert {s.method for s in rt.slots.values()} >= {"bottleneck", "prefix", "prompt", "lora", "ia3"}
    assert sorted(rt.adapter_names) == sorted(dirs)
    refs = {name: hf_reference(ARCH, d) for name, d in dirs.items() if name != "bottleneck"}
    refs["bottleneck"] = edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"),
                                                            dirs["bottleneck"]).eval()
    refs[None] = load_reference_base(base, "causal-lm")
    return rt, refs


def _tokens(logits, name):
    """The logits at the input tokens' positions (a prompt adapter's virtual tokens come first)."""
    return logits[:, PROMPT_TOKENS:] if name == "prompt" else logits


def test_forward_switches_kind_on_every_call_and_matches_each_reference(all_kinds):
    rt, refs = all_kinds
    ids, mask = sample_batch(batch=2, seq=9, seed=5)  # row 1 left-padded by 2
    expected = {name: torch_outputs(model, ids, mask, "logits") for name, model in refs.items()}
    names = list(expected)
    for i, a in enumerate(names):  # all differ: a call served by another's slots (or by none) cannot pass
        for b in names[i + 1:]:
            assert max_diff_valid(_tokens(expected[a], a), _tokens(expected[b], b), mask) > 1e-3, (a, b)
    order = ["bottleneck", "prefix", "lora", "bottleneck", "prompt", "ia3", None, "prefix_mlp", "bottleneck",
             "prompt", "prefix", "ia3", "lora", "prefix_mlp", None, "bottleneck"]
    assert set(order) == set(refs)
    for name in order:
        ours = rt.forward(ids, mask, adapter=name)["logits"]
        n = PROMPT_TOKENS if name == "prompt" else 0
        assert ours.shape == (2, n + 9, 128), name
        valid = np.concatenate([np.ones((2, n), mask.dtype), mask], axis=1)  # a prompt's tokens come first
        assert max_diff_valid(ours, expected[name], valid) <= 1e-4, name


@pytest.mark.filterwarnings("ignore:Position ids are not supported")  # HF PEFT's prompt tuning drops them, as it should
def test_greedy_generation_alternates_bottleneck_and_prefix(all_kinds):
    rt, refs = all_kinds
    prompt, pmask = sample_batch(batch=2, seq=6, seed=11)  # row 1 left-padded by 2
    new = 10
    names = ("bottleneck", "prefix", "prompt", None)
    expected = {name: greedy_reference(refs[name], prompt, pmask, new) for name in names}
    for i, a in enumerate(names):  # each one generates its own ids: a call served by another's slots cannot pass
        for b in names[i + 1:]:
            assert (expected[a][0][:, 6:] != expected[b][0][:, 6:]).any(), (a, b)
    # a prompt adapter's embeddings are bound at prefill only: the steps after it must not leak them
    for name in ["bottleneck", "prefix", "bottleneck", "prefix", "prompt", "bottleneck", None, "prefix", "bottleneck"]:
        ids, steps = expected[name]
        np.testing.assert_array_equal(rt.generate(prompt, pmask, adapter=name, max_new_tokens=new, eos_token_id=[]),
                                      ids, err_msg=str(name))
        # ids alone can hide a small error (a prefix's positions not shifted moves logits by ~0.03): every step too
        assert float(np.abs(runtime_step_logits(rt, name, prompt, pmask, ids) - steps).max()) <= 1e-4, name
