"""Prefix tuning with ``prefix_projection=True``: edgepeft's reparameterization MLP is HF PEFT's.

HF PEFT saves only the projected ``prompt_embeddings``, so adapter round trips never see the
MLP itself. Here both libraries build a prefix model with the same config, HF PEFT's prompt
encoder parameters (embedding, both linears) are copied into edgepeft's by explicit names, and
the two must give the same per-layer past keys/values, the same logits on a left-padded
batch, and the same parameters after identical SGD steps. The MLP's non-linearity is checked
against an explicit ``Linear -> tanh -> Linear`` (HF PEFT's ``PrefixEncoder``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tiny import load_reference_base, max_diff_valid, sample_batch

import edgepeft
from edgepeft.tuners.prefix.layer import PrefixEncoder
from edgepeft.tuners.prefix.model import prefix_cache
from edgepeft.tuners.virtual import virtual_token_holder

N_VIRTUAL = 4
# HF PEFT's PrefixEncoder parameter -> edgepeft's PrefixEncoder parameter (both relative to the encoder).
# HF PEFT: embedding (n, token_dim); transform = Sequential(Linear(token_dim, hidden), Tanh(), Linear(hidden, L*2*token_dim)).
PARAM_MAP = {
    "embedding.weight": "embedding.weight",
    "transform.0.weight": "transform.0.weight",
    "transform.0.bias": "transform.0.bias",
    "transform.2.weight": "transform.2.weight",
    "transform.2.bias": "transform.2.bias",
}


def _build(base, encoder_hidden_size):
    """(HF PEFT model, edgepeft model, HF encoder, edgepeft encoder), HF's encoder parameters copied into edgepeft's."""
    import peft

    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, prefix_projection=True,
              encoder_hidden_size=encoder_hidden_size)
    hf = peft.get_peft_model(load_reference_base(base, "causal-lm"), peft.PrefixTuningConfig(**kw))
    ours = edgepeft.get_peft_model(load_reference_base(base, "causal-lm"), edgepeft.PrefixTuningConfig(**kw))
    hf_enc = hf.prompt_encoder["default"]
    our_enc = virtual_token_holder(ours.base_model.model).prompt_encoder["default"]
    assert isinstance(our_enc, PrefixEncoder)
    assert isinstance(hf_enc.transform[1], torch.nn.Tanh)  # the reference: HF PEFT's MLP is Linear -> Tanh -> Linear

    # Sizes the configs were filled with (grouped-query attention: 2 kv heads x head_dim 16 = token_dim 32).
    hc, oc = hf.peft_config["default"], ours.peft_config["default"]
    for field in ("num_layers", "token_dim", "num_attention_heads", "encoder_hidden_size", "num_virtual_tokens"):
        assert getattr(oc, field) == getattr(hc, field), f"config {field}: edgepeft {getattr(oc, field)} != HF PEFT {getattr(hc, field)}"

    # Random (seeded) HF encoder parameters, large enough that the MLP works in tanh's non-linear range.
    g = torch.Generator().manual_seed(11)
    hf_params = dict(hf_enc.named_parameters())
    our_params = dict(our_enc.named_parameters())
    assert set(hf_params) == set(PARAM_MAP), f"HF PEFT's PrefixEncoder parameters changed: {sorted(hf_params)}"
    assert set(our_params) == set(PARAM_MAP.values()), (
        f"edgepeft's PrefixEncoder parameters {sorted(our_params)} do not map onto HF PEFT's {sorted(PARAM_MAP)}")
    with torch.no_grad():
        for hf_name, our_name in PARAM_MAP.items():
            src, dst = hf_params[hf_name], our_params[our_name]
            assert tuple(dst.shape) == tuple(src.shape), (
                f"layout differs: HF PEFT {hf_name} {tuple(src.shape)} vs edgepeft {our_name} {tuple(dst.shape)}")
            src.copy_(torch.randn(src.shape, generator=g) * 0.5)
            dst.copy_(src)
    return hf, ours, hf_enc, our_enc


def _hf_keys_values(hf, batch):
    """HF PEFT's per-layer prefix [(key, value)], each (B, kv_heads, n, head_dim), from its own get_prompt."""
    cache = hf.get_prompt(batch_size=batch)
    return [(layer.keys, layer.values) for layer in cache.layers]


def _our_keys_values(ours, batch):
    """edgepeft's per-layer prefix [(key, value)], (B, kv_heads, n, head_dim): the cache its forward starts with."""
    model = ours.base_model.model
    cache = prefix_cache(model, virtual_token_holder(model), "default", batch)
    return [(layer.keys, layer.values) for layer in cache.layers]


def _labels(ids, mask):
    labels = ids.clone()
    labels[mask == 0] = -100
    return labels


@pytest.mark.parametrize("encoder_hidden_size", [24, None])  # None: both fill it with token_dim
def test_prefix_projection_mlp_matches_peft(tiny_base, encoder_hidden_size):
    base = tiny_base("llama")
    hf, ours, hf_enc, our_enc = _build(base, encoder_hidden_size)
    hf.eval()
    ours.eval()
    batch = 3
    ids_np, mask_np = sample_batch(batch=batch, seq=7, seed=5)  # rows 1, 2 left-padded by 2 and 4
    ids, mask = torch.from_numpy(ids_np), torch.from_numpy(mask_np)

    # The MLP is Linear -> tanh -> Linear, computed here by hand from HF PEFT's parameters.
    with torch.no_grad():
        p = dict(hf_enc.named_parameters())
        hidden = F.linear(p["embedding.weight"], p["transform.0.weight"], p["transform.0.bias"])
        expected = F.linear(torch.tanh(hidden), p["transform.2.weight"], p["transform.2.bias"])
        relu = F.linear(torch.relu(hidden), p["transform.2.weight"], p["transform.2.bias"])
        assert float((expected - relu).abs().max()) > 0.1  # this data tells tanh from other activations
        got = our_enc()
    assert tuple(got.shape) == tuple(expected.shape)
    assert float((got - expected).abs().max()) <= 1e-6, "edgepeft's prefix MLP is not Linear -> tanh -> Linear"

    # (a) the per-layer past keys/values each library derives from its encoder
    with torch.no_grad():
        theirs_kv, ours_kv = _hf_keys_values(hf, batch), _our_keys_values(ours, batch)
    assert len(ours_kv) == len(theirs_kv) == 2
    for layer, ((tk, tv), (ok, ov)) in enumerate(zip(theirs_kv, ours_kv)):
        for role, t, o in (("key", tk, ok), ("value", tv, ov)):
            assert tuple(o.shape) == tuple(t.shape) == (batch, 2, N_VIRTUAL, 16), (layer, role, o.shape, t.shape)
            assert float((o - t).abs().max()) <= 1e-6, f"layer {layer} {role} differs from HF PEFT's"

    # (b) forward logits on a left-padded batch
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits.numpy()
        mine = ours(input_ids=ids, attention_mask=mask).logits.numpy()
        plain = load_reference_base(base, "causal-lm")(input_ids=ids, attention_mask=mask).logits.numpy()
    assert mine.shape == theirs.shape == (batch, 7, 128)
    assert max_diff_valid(mine, theirs, mask_np) <= 1e-5
    assert max_diff_valid(mine, plain, mask_np) > 1e-2  # the prefix changes the output: (b) can fail

    # (c) identical SGD steps train the same MLP
    hf_train = dict(hf_enc.named_parameters())
    our_train = dict(our_enc.named_parameters())
    assert {id(q) for q in hf.parameters() if q.requires_grad} == {id(q) for q in hf_train.values()}
    assert {id(q) for q in ours.parameters() if q.requires_grad} == {id(q) for q in our_train.values()}, \
        "edgepeft trains more (or less) than the prefix encoder"
    start = {k: v.detach().clone() for k, v in hf_train.items()}
    names = list(PARAM_MAP)
    hf_opt = torch.optim.SGD([hf_train[k] for k in names], lr=0.5)
    our_opt = torch.optim.SGD([our_train[PARAM_MAP[k]] for k in names], lr=0.5)
    hf.train()
    ours.train()
    labels = _labels(ids, mask)
    for step in range(3):
        for model, opt in ((hf, hf_opt), (ours, our_opt)):
            opt.zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            if model is hf:
                hf_loss = loss.item()
            else:
                assert abs(loss.item() - hf_loss) <= 1e-5, f"step {step}: loss {loss.item()} != HF PEFT's {hf_loss}"
        with torch.no_grad():
            for k in names:
                diff = float((our_train[PARAM_MAP[k]] - hf_train[k]).abs().max())
                assert diff <= 1e-6, f"step {step}: {k} differs from HF PEFT's by {diff}"
    with torch.no_grad():  # every MLP parameter moved: the comparison above is not of untouched weights
        for k in names:
            assert float((hf_train[k] - start[k]).abs().max()) > 1e-4, k
    hf.eval()
    ours.eval()
    with torch.no_grad():
        for (tk, tv), (ok, ov) in zip(_hf_keys_values(hf, batch), _our_keys_values(ours, batch)):
            assert float((ok - tk).abs().max()) <= 1e-6 and float((ov - tv).abs().max()) <= 1e-6
