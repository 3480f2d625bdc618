"""Prefix tuning: HF PEFT parity in PyTorch (both ways, with the projection MLP), export + runtime
parity on decoders (forward, greedy generation, every decode step), BERT-family encoders against
edgepeft's own module, one base serving prefix/prompt/LoRA adapters per call, training."""
from __future__ import annotations

import gc
import re
import warnings
import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from peft_refs import VIRTUAL_ARCHS, greedy_reference, randomize_prompt_encoder, runtime_step_logits
from tiny import load_reference_base, max_diff_valid, sample_batch, torch_outputs, train_steps

import edgepeft
from edgepeft.errors import ConfigError, InvalidInputError, UnsupportedMethodError
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime


def test_prefix_keys_take_the_heads_own_width_as_hf_peft(tmp_path):
    """head_dim x heads other than hidden_size, every head a key/value head: the prefix was hidden_size wide (a
    size-mismatch RuntimeError in the first forward; edgepeft train printed a traceback)."""
    import peft
    import transformers as tf

    from tiny import tiny_config

    config = tiny_config("llama")
    config.num_key_value_heads = config.num_attention_heads  # 4 x head_dim 16 = 64, hidden_size 32
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    ids, mask = sample_batch()
    model = edgepeft.get_peft_model(load_reference_base(str(tmp_path / "base"), "causal-lm"),
                                    edgepeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    randomize_prompt_encoder(model, seed=6, scale=0.5)
    ours = torch_outputs(model.eval(), ids, mask, "logits")
    assert model.peft_config["default"].token_dim == 64
    model.save_pretrained(tmp_path / "ours")
    hf = peft.PeftModel.from_pretrained(load_reference_base(str(tmp_path / "base"), "causal-lm"), str(tmp_path / "ours"))
    assert hf.peft_config["default"].token_dim == 64
    assert max_diff_valid(torch_outputs(hf.eval(), ids, mask, "logits"), ours, mask) <= 1e-5


@pytest.mark.parametrize("arch", VIRTUAL_ARCHS)
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_matches_peft_both_ways(arch, projection, tiny_base, tmp_path):
    import peft

    base = tiny_base(arch)
    ids, mask = sample_batch()
    config = edgepeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=projection,
                                         encoder_hidden_size=24 if projection else None)
    model = edgepeft.get_peft_model(load_reference_base(base, "causal-lm"), config)
    randomize_prompt_encoder(model, seed=6, scale=0.5)
    model.eval().save_pretrained(tmp_path / "ours")
    state = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    token_dim = 32  # grouped-query attention (Llama, Qwen2): 2 kv heads x head_dim 16; GPT-2: 4 heads x 8
    assert list(state) == ["prompt_embeddings"] and tuple(state["prompt_embeddings"].shape) == (4, 2 * 2 * token_dim)
    ours = torch_outputs(model, ids, mask, "logits")
    assert ours.shape == (2, 9, 128)  # a prefix adds keys/values, not output positions
    hf = peft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / "ours")).eval()
    assert max_diff_valid(torch_outputs(hf, ids, mask, "logits"), ours, mask) <= 1e-5
    hf.save_pretrained(tmp_path / "theirs")
    back = edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / "theirs")).eval()
    assert max_diff_valid(torch_outputs(back, ids, mask, "logits"), ours, mask) <= 1e-5
    assert max_diff_valid(ours, torch_outputs(load_reference_base(base, "causal-lm"), ids, mask, "logits"), mask) > 1e-2
    prompt, pmask = sample_batch(batch=2, seq=6)
    with torch.no_grad():
        got = model.generate(input_ids=torch.from_numpy(prompt), attention_mask=torch.from_numpy(pmask), max_new_tokens=8,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(got.numpy(), greedy_reference(hf, prompt, pmask, 8)[0])
    if projection:  # the file holds the projected keys/values, as HF PEFT's: the MLP cannot be trained further
        with pytest.raises(ConfigError, match="is_trainable=False"):
            edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / "ours"), is_trainable=True)
    with pytest.raises(UnsupportedMethodError, match="no weights to merge"):
        model.merge_and_unload()


@pytest.mark.parametrize("arch", VIRTUAL_ARCHS)
@pytest.mark.parametrize("name", ["prefix", "prefix_mlp"])
def test_exported_prefix_matches_peft_forward_generation_and_steps(arch, name, virtual_export, hf_reference):
    out, dirs, report = virtual_export(arch)
    check = next(c for c in report["checks"] if c["what"] == f"adapter {name}")
    assert check["max_abs_diff"] <= 1e-4 and check["decode_max_abs_diff"] <= 1e-4
    rt = Runtime(out)
    hf = hf_reference(arch, dirs[name])
    ids, mask = sample_batch(batch=2, seq=9)
    ours = rt.forward(ids, mask, adapter=name)["logits"]
    assert ours.shape == (2, 9, 128)
    assert max_diff_valid(ours, torch_outputs(hf, ids, mask, "logits"), mask) <= 1e-4
    prompt, pmask = sample_batch(batch=2, seq=6, seed=7)
    expected_ids, expected_steps = greedy_reference(hf, prompt, pmask, 16)
    np.testing.assert_array_equal(rt.generate(prompt, pmask, adapter=name, max_new_tokens=16, eos_token_id=[]), expected_ids)
    assert float(np.abs(runtime_step_logits(rt, name, prompt, pmask, expected_ids) - expected_steps).max()) <= 1e-4


@pytest.mark.parametrize("arch", VIRTUAL_ARCHS)
def test_one_base_switches_prefix_prompt_lora_and_ia3_per_call(arch, virtual_export, hf_reference, tiny_base):
    out, dirs, _ = virtual_export(arch)
    rt = Runtime(out)
    methods = {s.method for s in rt.slots.values()}
    assert {"prefix", "prompt", "lora", "ia3"} <= methods
    ids, mask = sample_batch(batch=3)
    refs = {name: torch_outputs(hf_reference(arch, d), ids, mask, "logits") for name, d in dirs.items()}
    refs[None] = torch_outputs(load_reference_base(tiny_base(arch), "causal-lm"), ids, mask, "logits")
    for name in ["prefix", "lora", "prompt", None, "prefix_mlp", "ia3", "prompt", "lora", None]:
        ours = rt.forward(ids, mask, adapter=name)["logits"]
        n = ours.shape[1] - ids.shape[1]
        assert n == (4 if name == "prompt" else 0), name
        valid = np.concatenate([np.ones((3, n), mask.dtype), mask], axis=1)
        assert max_diff_valid(ours, refs[name], valid) <= 1e-4, name
    # generation switches too: a prefix, then LoRA, then the plain base, on one runtime
    prompt, pmask = sample_batch(batch=2, seq=5, seed=9)
    for name in ["prefix", "lora", "prompt", "ia3", None]:
        model = hf_reference(arch, dirs[name]) if name else load_reference_base(tiny_base(arch), "causal-lm")
        np.testing.assert_array_equal(rt.generate(prompt, pmask, adapter=name, max_new_tokens=6, eos_token_id=[]),
                                      greedy_reference(model, prompt, pmask, 6)[0])


@pytest.mark.parametrize("arch", VIRTUAL_ARCHS)
def test_a_left_padded_prefix_row_generates_as_it_does_alone(arch, virtual_export):
    """methods.md said prefix tuning generates a padded row as in its batch, not as alone (prompt tuning's case): a
    prefix row's positions skip its pads (HF PEFT's generate shifts the mask's positions by n), so it is the row
    without its pads; a prompt row's pads take positions, as documented."""
    rt = Runtime(virtual_export(arch)[0])
    ids = np.array([[20, 21, 22, 23, 24, 25, 26, 27], [0, 0, 0, 0, 0, 40, 41, 42]])
    mask = (ids > 0).astype(np.int64)
    alone = {name: rt.generate(ids[1:, 5:], mask[1:, 5:], adapter=name, max_new_tokens=8, eos_token_id=[])[0, 3:]
             for name in ("prefix", "prefix_mlp", "prompt")}
    padded = {name: rt.generate(ids, mask, adapter=name, max_new_tokens=8, eos_token_id=[])[1, 8:] for name in alone}
    assert all(np.array_equal(padded[name], alone[name]) for name in ("prefix", "prefix_mlp")), (padded, alone)
    first = {}
    for row in (ids[1:], ids[1:, 5:]):
        steps = rt.step_logits(row, (row > 0).astype(np.int64), adapter="prompt")
        first[row.shape[1]] = next(steps)[0]
        steps.close()
    assert float(np.abs(first[8] - first[3]).max()) > 1e-4  # prompt tuning: the pads' positions count


def test_an_input_past_the_positions_is_told_the_room_beside_virtual_tokens(virtual_export):
    """A hunt: an input past the positions was told "shorten the input" against the positions alone; shortened to
    them, it was refused again for the prefix adapter's virtual tokens. The fix now names both, and followed, it runs."""
    out, _, _ = virtual_export("llama")
    rt, n = Runtime(out), 3  # the prefix adapter's virtual tokens
    with pytest.raises(InvalidInputError, match=f"^sequence length {rt.max_positions + 1} exceeds the model's "
                                                f"{rt.max_positions} positions; shorten the input to {rt.max_positions} "
                                                "tokens, less a prompt or prefix adapter's virtual tokens$"):
        rt.forward(np.full((1, rt.max_positions + 1), 5), adapter="prefix")
    assert rt.forward(np.full((1, rt.max_positions - n), 5), adapter="prefix")["logits"].shape[1] == rt.max_positions - n


def test_a_name_reloaded_before_the_first_step_is_checked_again(virtual_export):
    """stream/step_logits check positions at the call and hold the adapter at the first next(): a name reloaded
    in between with a prefix adapter (3 virtual tokens) was not checked again, and ran past the model's positions
    (a raw ONNX Runtime error, or positions no model has)."""
    out, _, _ = virtual_export("llama")
    rt = Runtime(out)
    ids = np.array([[5, 9, 33, 12, 7]])
    new = rt.max_positions - ids.shape[1] + 1  # every position: accepted for a LoRA adapter
    stream = rt.stream(ids, adapter="lora", max_new_tokens=new, eos_token_id=[])
    long = np.zeros((1, rt.max_positions - 4), np.int64) + 5  # the default length, capped to the room: 4 new tokens
    default = rt.stream(long, adapter="lora", eos_token_id=[])
    steps = rt.step_logits(np.zeros((1, rt.max_positions), np.int64) + 5, adapter="lora")
    rt.unload_adapter("lora")
    rt.load_adapter(f"{out}/adapters/prefix", name="lora")
    with pytest.raises(InvalidInputError, match=f"the adapter's 3 virtual tokens .* exceeds the model's "
                                                f"{rt.max_positions} positions; shorten the prompt or lower max_new_tokens"):
        next(stream)
    with pytest.raises(InvalidInputError, match=f"^prompt of {rt.max_positions - 4} tokens \\+ the adapter's 3 virtual tokens "
                                                "\\+ max_new_tokens 4 \\(the default\\) - 1 \\(the last token is not fed "
                                                f"back\\) = {rt.max_positions + 2} exceeds"):  # counted, not named
        next(default)
    with pytest.raises(InvalidInputError, match=f"{rt.max_positions} tokens \\+ the adapter's 3 virtual tokens = "):
        next(steps)
    rt.unload_adapter("lora")  # no refused call left it held


# ---------------------------------------------------------------- encoders (BERT family)
@pytest.fixture(scope="module")
def bert_prefix(tiny_base, workdir):
    """{task: edgepeft prefix adapter dir} on the tiny BERT (HF PEFT runs no SEQ_CLS prefix; feature extraction
    against HF PEFT: test_peft_roundtrip.py)."""
    dirs = {}
    for task, task_type, kw in [("feature-extraction", "FEATURE_EXTRACTION", dict(num_virtual_tokens=3)),
                                ("seq-cls", "SEQ_CLS", dict(num_virtual_tokens=4, prefix_projection=True))]:
        model = edgepeft.get_peft_model(load_reference_base(tiny_base("bert"), task, num_labels=3 if task == "seq-cls" else None),
                                        edgepeft.PrefixTuningConfig(task_type=task_type, **kw))
        randomize_prompt_encoder(model, seed=8, scale=0.5)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.2)
        path = workdir / "bert-prefix" / task
        model.save_pretrained(path)
        dirs[task] = str(path)
    return dirs


def _bert(tiny_base, task, adapter_dir=None, attn="sdpa"):
    """edgepeft's PyTorch module for an adapter (its head has 3 labels), or the plain base (its own head)."""
    model = load_reference_base(tiny_base("bert"), task, num_labels=3 if task == "seq-cls" and adapter_dir else None)
    model.config._attn_implementation = attn
    return edgepeft.PeftModel.from_pretrained(model, adapter_dir).eval() if adapter_dir else model


@pytest.mark.parametrize("task", ["feature-extraction", "seq-cls"])
def test_bert_prefix_module_is_consistent(task, tiny_base, bert_prefix):
    """edgepeft's own encoder prefix: padding-invariant, same with eager and SDPA attention, not the base."""
    field = "last_hidden_state" if task == "feature-extraction" else "logits"
    ids, mask = sample_batch(batch=2, seq=8)
    ids[1], mask[1] = np.roll(ids[1], -2), np.roll(mask[1], -2)  # right padding: BERT's positions count pads
    sdpa = torch_outputs(_bert(tiny_base, task, bert_prefix[task]), ids, mask, field)
    eager = torch_outputs(_bert(tiny_base, task, bert_prefix[task], attn="eager"), ids, mask, field)
    assert float(np.abs(sdpa - eager).max()) <= 1e-5
    alone = torch_outputs(_bert(tiny_base, task, bert_prefix[task]), ids[1:, :6], mask[1:, :6], field)  # row 1 unpadded
    assert float(np.abs((sdpa[1, :6] if field == "last_hidden_state" else sdpa[1]) - alone[0]).max()) <= 1e-5
    if field == "last_hidden_state":
        assert max_diff_valid(sdpa, torch_outputs(_bert(tiny_base, task), ids, mask, field), mask) > 1e-3


@pytest.mark.parametrize("task", ["feature-extraction", "seq-cls"])
def test_bert_prefix_export_matches_edgepeft_module(task, tiny_base, bert_prefix, peft_adapter, hf_reference, workdir):
    field = "last_hidden_state" if task == "feature-extraction" else "logits"
    lora = peft_adapter("bert", f"qv-for-prefix-{task}", task=task, num_labels=3 if task == "seq-cls" else None, seed=91, r=4)
    out = str(workdir / f"out-bert-prefix-{task}")
    report = export([bert_prefix[task], lora], out, names=["prefix", "lora"])
    assert all(c["max_abs_diff"] <= 1e-4 for c in report["checks"])
    rt = Runtime(out)
    ids, mask = sample_batch(batch=3)
    ref = {"prefix": _bert(tiny_base, task, bert_prefix[task]), None: _bert(tiny_base, task),
           "lora": hf_reference("bert", lora, task, num_labels=3 if task == "seq-cls" else None)}
    for name in ["prefix", "lora", None, "prefix"]:
        ours = rt.forward(ids, mask, adapter=name)[field]
        assert max_diff_valid(ours, torch_outputs(ref[name], ids, mask, field), mask if field != "logits" else None) <= 1e-4, name
    import onnx

    graph = onnx.load(f"{out}/base/model.onnx", load_external_data=False).graph
    built = {re.search(r"layer\.\d+", n.name)[0] for n in graph.node
             if n.op_type == "ConstantOfShape" and "/attention/self/" in n.name}
    assert built == {"layer.0"}  # the batch zeros and the mask's prefix columns: built once, not once per layer


def _bert_two_prefixes(tiny_base):
    """A tiny BERT with prefix adapters "default" (3 virtual tokens) and "long" (5), eval mode."""
    model = edgepeft.get_peft_model(load_reference_base(tiny_base("bert"), "feature-extraction"),
                                    edgepeft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3))
    model.add_adapter("long", edgepeft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=5))
    randomize_prompt_encoder(model, seed=4, scale=0.5)
    return model.eval()


def test_bert_prefix_forward_keeps_nothing_after_it_returns(tiny_base):
    """What the layers share lives for one forward: the mask (and all built from it) is freed with the call."""
    model = _bert_two_prefixes(tiny_base)
    seen = []
    layer = model.get_submodule("base_model.model.encoder.layer.1.attention.self")
    def record(module, args, kwargs):
        seen.append(weakref.ref(args[1] if len(args) > 1 else kwargs["attention_mask"]))

    handle = layer.register_forward_pre_hook(record, with_kwargs=True)
    ids, mask = sample_batch(batch=2, seq=6)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    handle.remove()
    del out
    gc.collect()
    assert seen and all(ref() is None for ref in seen)


class _Alone(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden):
        return self.layer(hidden, None)[0]


def test_bert_prefix_layer_traced_alone_follows_the_batch(tiny_base):
    """A layer traced by itself after a whole forward computes for the batch it is given, not the forward's."""
    model = _bert_two_prefixes(tiny_base).requires_grad_(False)  # the prefix comes from outside the traced layer
    layer = model.get_submodule("base_model.model.encoder.layer.1.attention.self")
    with torch.no_grad():
        model(input_ids=torch.ones(2, 4, dtype=torch.long))  # batch 2, no mask
        hidden = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(2))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(_Alone(layer), (hidden[:2],))
        torch.testing.assert_close(traced(hidden), layer(hidden, None)[0], rtol=0, atol=0)


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_training_reduces_the_loss(tiny_base, projection):
    model = edgepeft.get_peft_model(load_reference_base(tiny_base("llama"), "causal-lm"),
                                    edgepeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6,
                                                                prefix_projection=projection))
    assert all("prompt_encoder" in n for n, p in model.named_parameters() if p.requires_grad)
    losses = train_steps(model, lr=0.05)
    assert losses[-1] < losses[0] - 0.05


def test_decoder_prefix_for_another_task_is_refused_before_training_and_at_export(tiny_base, tmp_path):
    """A decoder's prefix starts the KV cache; edgepeft's seq-cls graphs of a decoder take none (HF PEFT cannot run it
    either): refused when the adapter is made (before any training), and an adapter folder saying so is refused at
    export."""
    import json

    from edgepeft.errors import EdgePeftError

    base = tiny_base("llama")
    with pytest.raises(UnsupportedMethodError, match=r"decoder \(llama\) runs and exports for causal-lm only"):
        edgepeft.get_peft_model(load_reference_base(base, "seq-cls", num_labels=2),
                                edgepeft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    model = edgepeft.get_peft_model(load_reference_base(base, "causal-lm"),
                                    edgepeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.save_pretrained(tmp_path / "cls-prefix")
    config = tmp_path / "cls-prefix" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "task_type": "SEQ_CLS"}))
    with pytest.raises(UnsupportedMethodError, match="causal-lm only") as e:
        export([str(tmp_path / "cls-prefix")], str(tmp_path / "out"))
    assert isinstance(e.value, EdgePeftError) and str(config) in str(e.value)
    assert not (tmp_path / "out" / "base").exists()


def test_bert_prefix_encoder_runs_once_per_forward(tiny_base, bert_prefix, monkeypatch):
    """Every layer indexes one run of the prefix encoder (with its projection MLP), not one run per layer."""
    from edgepeft.tuners.prefix.layer import PrefixEncoder

    model = _bert(tiny_base, "seq-cls", bert_prefix["seq-cls"])
    ids, mask = sample_batch(batch=2, seq=8)
    before = torch_outputs(model, ids, mask, "logits")
    runs = []
    real = PrefixEncoder.keys_values
    monkeypatch.setattr(PrefixEncoder, "keys_values", lambda self: runs.append(1) or real(self))
    np.testing.assert_array_equal(torch_outputs(model, ids, mask, "logits"), before)
    assert len(runs) == 1
