"""Export does not depend on the order of its adapters: every order of a mix of kinds writes the same files,
and each adapter in the mix matches its own reference (HF PEFT where it runs the method, else edgepeft's
PyTorch module with that adapter alone).

The PyTorch reference that export validates against holds every adapter in one model; a second LoRA
adapter added after an IA3 one once wrapped the IA3 layer in a new LoRA layer, and the exporter read the
first one's tensors from the wrong layer (Llama 0.93 off, MiniLM 0.75).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from file_checks import tree_hashes

from peft_refs import (ia3_adapter, peft_virtual_adapter, randomize_adapter, randomize_bottleneck, randomize_ia3,
                       randomize_prompt_encoder)
from tiny import ARCHS, TASK_TYPES, default_task, load_reference_base, max_diff_valid, sample_batch, torch_outputs

import edgepeft
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime

FIRST_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "v_proj", "down_proj"],
                 "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value", "output.dense"]}
FIELD = {"causal-lm": "logits", "seq-cls": "logits", "feature-extraction": "last_hidden_state"}
PROMPT_TOKENS = 3


def _hf_lora(path, base, task, seed, num_labels=None, **kw) -> str:
    import peft

    model = peft.get_peft_model(load_reference_base(base, task, num_labels), peft.LoraConfig(task_type=TASK_TYPES[task], **kw))
    randomize_adapter(model, seed)
    model.peft_config["default"].base_model_name_or_path = base
    model.save_pretrained(str(path))
    return str(path)


def _hf_ia3(path, base, task, seed, num_labels=None) -> str:
    if task == "causal-lm":
        return ia3_adapter(path, base, seed)
    import peft

    model = peft.get_peft_model(load_reference_base(base, task, num_labels), peft.IA3Config(task_type=TASK_TYPES[task]))
    randomize_ia3(model, seed)
    randomize_adapter(model, seed)  # the head's copy
    model.peft_config["default"].base_model_name_or_path = base
    model.save_pretrained(str(path))
    return str(path)


def _ours(path, base, task, seed, config, randomize) -> str:
    model = edgepeft.get_peft_model(load_reference_base(base, task), config)
    randomize(model, seed)
    model.save_pretrained(str(path))
    return str(path)


def _mix(root, arch: str, base: str) -> dict:
    """{name: (adapter dir, which reference runs it: "hf" or "ours")}: LoRA, IA3, a second LoRA, bottleneck, prefix, prompt."""
    task = default_task(arch)
    tt = TASK_TYPES[task]
    mix = {
        "lora_1": (_hf_lora(root / "lora_1", base, task, 1, r=4, lora_alpha=8, target_modules=FIRST_TARGETS[arch]), "hf"),
        "ia3": (_hf_ia3(root / "ia3", base, task, 2), "hf"),
        "lora_2": (_hf_lora(root / "lora_2", base, task, 3, r=2, lora_alpha=4, target_modules="all-linear"), "hf"),
        "bottleneck": (_ours(root / "bottleneck", base, task, 4, edgepeft.BottleneckConfig(task_type=tt, bottleneck_size=4),
                             randomize_bottleneck), "ours"),
        "prompt": (peft_virtual_adapter(root / "prompt", base, "prompt", seed=5, task=task,
                                        num_virtual_tokens=PROMPT_TOKENS), "hf"),
    }
    if arch == "bert":  # HF PEFT refuses prefix tuning for encoders on transformers 5: edgepeft's module is the reference
        config = edgepeft.PrefixTuningConfig(task_type=tt, num_virtual_tokens=2)
        mix["prefix"] = (_ours(root / "prefix", base, task, 6, config, randomize_prompt_encoder), "ours")
    else:
        mix["prefix"] = (peft_virtual_adapter(root / "prefix", base, "prefix", seed=6, task=task, num_virtual_tokens=2), "hf")
    return mix


def _reference(base, task, path, kind, num_labels=None):
    model = load_reference_base(base, task, num_labels)
    if kind == "hf":
        import peft

        return peft.PeftModel.from_pretrained(model, path).eval()
    return edgepeft.PeftModel.from_pretrained(model, path).eval()


def _check_each(out, mix, base, task, num_labels=None):
    rt = Runtime(out)
    ids, mask = sample_batch(batch=2, seq=7, seed=9)
    field = FIELD[task]
    for name, (path, kind) in mix.items():
        ours = rt.forward(ids, mask, adapter=name)[field]
        ref = torch_outputs(_reference(base, task, path, kind, num_labels), ids, mask, field)
        assert ours.shape == ref.shape, name
        n = ours.shape[1] - ids.shape[1] if task != "seq-cls" else 0  # a prompt's tokens come first
        valid = None if task == "seq-cls" else np.concatenate([np.ones((2, n), mask.dtype), mask], axis=1)
        assert max_diff_valid(ours, ref, valid) <= 1e-4, name
        plain = rt.forward(ids, mask)[field]
        if plain.shape == ours.shape:  # the adapter acts (a prompt's output, or a head's, has another shape anyway)
            assert max_diff_valid(ours, plain, valid) > 1e-3, name


@pytest.mark.parametrize("arch", ARCHS)
def test_every_order_of_a_mix_of_kinds_writes_the_same_files_and_each_adapter_matches_its_reference(arch, tiny_base, workdir):
    base, task = tiny_base(arch), default_task(arch)
    root = workdir / "order" / arch
    mix = _mix(root, arch, base)
    orders = [["lora_1", "ia3", "lora_2", "bottleneck", "prefix", "prompt"],  # a LoRA after IA3 after a LoRA
              ["prompt", "prefix", "bottleneck", "lora_2", "ia3", "lora_1"]]
    outs = []
    for i, order in enumerate(orders):
        out = str(root / f"out-{i}")
        export([mix[n][0] for n in order], out, names=order)
        outs.append(out)
    first = tree_hashes(outs[0])
    assert {os.path.join("adapters", n, "adapter.onnx") for n in mix} <= set(first)
    assert tree_hashes(outs[1]) == first
    _check_each(outs[0], mix, base, task)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_classifier_heads_of_mixed_kinds_export_alike_in_any_order(arch, tiny_base, workdir):
    base, task, labels = tiny_base(arch), "seq-cls", 3
    root = workdir / "order-heads" / arch
    mix = {
        "lora_1": (_hf_lora(root / "lora_1", base, task, 11, labels, r=4, lora_alpha=8, target_modules=FIRST_TARGETS[arch]), "hf"),
        "ia3": (_hf_ia3(root / "ia3", base, task, 12, labels), "hf"),
        "lora_2": (_hf_lora(root / "lora_2", base, task, 13, labels, r=2, lora_alpha=4, target_modules="all-linear"), "hf"),
    }
    outs = []
    for i, order in enumerate((["lora_1", "ia3", "lora_2"], ["lora_2", "lora_1", "ia3"])):
        out = str(root / f"out-{i}")
        export([mix[n][0] for n in order], out, names=order)
        outs.append(out)
    assert tree_hashes(outs[1]) == tree_hashes(outs[0])
    _check_each(outs[0], mix, base, task, labels)


def test_a_second_ia3_adapter_that_scales_the_other_side_of_a_layer_is_refused(tiny_base):
    from edgepeft.errors import ConfigError

    model = edgepeft.get_peft_model(load_reference_base(tiny_base("llama"), "causal-lm"),
                                    edgepeft.IA3Config(task_type="CAUSAL_LM", target_modules=["down_proj"],
                                                       feedforward_modules=["down_proj"]))
    with pytest.raises(ConfigError, match="scales this layer's input, 'other' its output, .* export them one at a time "
                       "into the same --out folder"):  # 'list it in feedforward_modules' changed what 'other' computes
        model.add_adapter("other", edgepeft.IA3Config(task_type="CAUSAL_LM", target_modules=["down_proj"],
                                                      feedforward_modules=[]))


def test_a_layer_one_adapter_trains_whole_and_another_adapts_exports_as_the_messages_say(peft_adapter, tmp_path):
    """Together: "one at a time into the same --out folder"; the adapter with LoRA alone first then said "every
    adapter together", which is refused. The advice now names the order that works (the one training it whole first)."""
    from edgepeft.errors import ConfigError

    whole = peft_adapter("llama", "q-whole", seed=71, r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["q_proj"])
    lora = peft_adapter("llama", "q-lora", seed=72, r=2, target_modules=["q_proj", "v_proj"],
                        modules_to_save=["layers.1.self_attn.k_proj"])
    with pytest.raises(ConfigError, match="export them one at a time into the same --out folder, the one that trains "
                                          "it whole first"):
        export([whole, lora], str(tmp_path / "together"), names=["whole", "lora"])
    export([lora], str(tmp_path / "lora-first"), names=["lora"])
    with pytest.raises(ConfigError, match="export into a fresh --out folder: whole first, then the adapters already"):
        export([whole], str(tmp_path / "lora-first"), names=["whole"])
    out = str(tmp_path / "whole-first")
    export([whole], out, names=["whole"])
    export([lora], out, names=["lora"])
    ids, mask = sample_batch(batch=2)
    rt = Runtime(out)
    for name, adapter in (("whole", whole), ("lora", lora)):
        reference = torch_outputs(edgepeft.PeftModel.from_pretrained(
            load_reference_base(rt.manifest["source"], "causal-lm"), adapter).eval(), ids, mask, "logits")
        assert max_diff_valid(rt.forward(ids, mask, adapter=name)["logits"], reference, mask) <= 1e-4


def test_a_head_of_other_outputs_beside_an_adapter_on_that_layer_is_refused_naming_both(peft_adapter, tiny_base,
                                                                                      tmp_path, capsys):
    """A hunt: a classifier of 5 labels (its own head) and, on the 2-label base, a LoRA on the classifier layer
    itself, exported one at a time into one OUT: ONNX Runtime's broadcast error, a traceback (the LoRA's B is sized
    to the base head's 2 outputs). Heads of the base's width still serve beside it."""
    import peft

    from training_helpers import cli_error

    head5 = peft_adapter("bert", "head5", task="seq-cls", num_labels=5, seed=81, r=2, target_modules=["query"])
    on_head = tmp_path / "on-head"
    pm = peft.get_peft_model(load_reference_base(tiny_base("bert"), "seq-cls"),
                             peft.LoraConfig(r=2, target_modules=["query", "classifier"]))
    randomize_adapter(pm, 82)
    pm.peft_config["default"].base_model_name_or_path = tiny_base("bert")
    pm.save_pretrained(str(on_head))
    out = tmp_path / "out"
    with pytest.raises(edgepeft.errors.ConfigError, match=r"one at a time into the same --out folder, the one that "
                       r"trains it whole first \(into separate --out folders where it is a head of another label count "
                       r"than the base's\)$"):  # a review: "one at a time" alone then failed as below
        export([head5, str(on_head)], str(tmp_path / "together"))
    export([head5], str(out), names=["head5"])
    line = cli_error(capsys, "export", "--adapter", on_head, "--out", out)
    assert line == (f"error: {out / 'adapters' / 'head5'}: its head has 5 outputs, and the base's slot lora_B.classifier "
                    "(another adapter's lora on that layer) is sized to the base head's 2: one base serves both only "
                    "with heads of 2 outputs; export the two into separate --out folders")
    assert Runtime(str(out)).adapter_names == ["head5"]
    head2 = peft_adapter("bert", "head2", task="seq-cls", seed=83, r=2, target_modules=["query"])  # the base's width
    export([head2], str(tmp_path / "fits"), names=["head2"])  # the one training the layer whole first
    export([str(on_head)], str(tmp_path / "fits"), names=["on_head"])
    line = cli_error(capsys, "export", "--adapter", head5, "--out", tmp_path / "fits")  # the other order
    assert line.startswith(f"error: {head5}: its head has 5 outputs, and the base's slot lora_B.classifier")
    assert Runtime(str(tmp_path / "fits")).adapter_names == ["head2", "on_head"]
