"""IA3: HF PEFT parity both ways, and IA3 + LoRA adapters served by one exported base."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from peft_refs import randomize_ia3
from tiny import ARCHS, TASK_TYPES, default_task, load_reference_base, max_diff_valid, sample_batch, torch_outputs, train_steps

import edgepeft
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime

FIELD = {"causal-lm": "logits", "feature-extraction": "last_hidden_state"}


@pytest.fixture(scope="module")
def ia3_adapters(workdir, tiny_base):
    """{arch: HF PEFT IA3 adapter dir} with PEFT's default targets per model type."""
    import peft

    dirs = {}
    for i, arch in enumerate(ARCHS):
        task = default_task(arch)
        pm = peft.get_peft_model(load_reference_base(tiny_base(arch), task), peft.IA3Config(task_type=TASK_TYPES[task]))
        randomize_ia3(pm, seed=50 + i)
        pm.peft_config["default"].base_model_name_or_path = tiny_base(arch)
        path = workdir / "ia3" / arch
        pm.save_pretrained(path)
        dirs[arch] = str(path)
    return dirs


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_ia3_adapter_matches_in_edgepeft_and_back(arch, tiny_base, ia3_adapters, hf_reference, tmp_path):
    import peft

    task = default_task(arch)
    ids, mask = sample_batch()
    ref = torch_outputs(hf_reference(arch, ia3_adapters[arch]), ids, mask, FIELD[task])
    ours = edgepeft.PeftModel.from_pretrained(load_reference_base(tiny_base(arch), task), ia3_adapters[arch]).eval()
    assert np.abs(torch_outputs(ours, ids, mask, FIELD[task]) - ref).max() <= 1e-5
    base = torch_outputs(load_reference_base(tiny_base(arch), task), ids, mask, FIELD[task])
    assert max_diff_valid(ref, base, mask) > 1e-3
    # edgepeft -> HF PEFT: same keys, same outputs
    model = edgepeft.get_peft_model(load_reference_base(tiny_base(arch), task), edgepeft.IA3Config(task_type=TASK_TYPES[task]))
    randomize_ia3(model, seed=7)
    model.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(load_reference_base(tiny_base(arch), task), str(tmp_path / "ours")).eval()
    assert np.abs(torch_outputs(back, ids, mask, FIELD[task]) - torch_outputs(model.eval(), ids, mask, FIELD[task])).max() <= 1e-5
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(load_file(f"{ia3_adapters[arch]}/adapter_model.safetensors"))
    # merging folds the vectors into the weights
    merged = model.merge_and_unload()
    assert np.abs(torch_outputs(merged, ids, mask, FIELD[task]) - torch_outputs(model, ids, mask, FIELD[task])).max() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_ia3_and_lora_adapters_share_one_exported_base(arch, workdir, ia3_adapters, peft_adapter, hf_reference, tiny_base):
    lora = peft_adapter(arch, "all-lora-for-ia3", seed=61, r=4, target_modules="all-linear")
    out = str(workdir / f"out-{arch}-ia3-lora")
    export([ia3_adapters[arch], lora], out, names=["ia3", "lora"])
    rt = Runtime(out)
    task = default_task(arch)
    ids, mask = sample_batch(batch=3)
    for name, adapter_dir in [("lora", lora), ("ia3", ia3_adapters[arch]), ("lora", lora), (None, None)]:
        ours = rt.forward(ids, mask, adapter=name)[FIELD[task]]
        model = hf_reference(arch, adapter_dir) if adapter_dir else load_reference_base(tiny_base(arch), task)
        assert max_diff_valid(ours, torch_outputs(model, ids, mask, FIELD[task]), mask) <= 1e-4, name
    if task == "causal-lm":  # greedy generation identical to HF PEFT for the IA3 adapter
        model = hf_reference(arch, ia3_adapters[arch])
        model.generation_config.eos_token_id = None
        prompt, pmask = sample_batch(batch=2, seq=6)
        with torch.no_grad():
            ref = model.generate(input_ids=torch.from_numpy(prompt), attention_mask=torch.from_numpy(pmask),
                                 max_new_tokens=12, do_sample=False, pad_token_id=0)
        np.testing.assert_array_equal(rt.generate(prompt, pmask, adapter="ia3", max_new_tokens=12, eos_token_id=[]), ref.numpy())
    assert any(s.method == "ia3" for s in rt.slots.values()) and any(s.method == "lora" for s in rt.slots.values())


def test_ia3_training_reduces_the_loss(tiny_base):
    model = edgepeft.get_peft_model(load_reference_base(tiny_base("llama"), "causal-lm"), edgepeft.IA3Config(task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.numel() <= 64 for p in trainable)
    losses = train_steps(model, lr=0.3)
    assert losses[-1] < losses[0] - 0.05


def test_adapters_exported_one_after_another_keep_the_fusion_layout(workdir, peft_adapter, hf_reference, tiny_base, tmp_path):
    """An IA3 that scales up_proj's input keeps gate/up apart. Exported first, a later LoRA joins that layout;
    exported after a LoRA whose base fuses gate/up, it is refused with the way out and OUT stays as it was."""
    import peft

    from edgepeft.errors import ConfigError
    from file_checks import tree_hashes

    base = tiny_base("llama")
    pm = peft.get_peft_model(load_reference_base(base, "causal-lm"), peft.IA3Config(
        target_modules=["up_proj", "v_proj"], feedforward_modules=["up_proj"], task_type="CAUSAL_LM"))
    randomize_ia3(pm, seed=71)
    pm.peft_config["default"].base_model_name_or_path = base
    ia3 = str(tmp_path / "ia3-up")
    pm.save_pretrained(ia3)
    lora = peft_adapter("llama", "all-lora-for-ia3", seed=61, r=4, target_modules="all-linear")
    out = str(tmp_path / "ia3-first")
    export([ia3], out, names=["ia3"])
    export([lora], out, names=["lora"])
    rt = Runtime(out)
    ids, mask = sample_batch(batch=3)
    for name, adapter_dir in [("ia3", ia3), ("lora", lora)]:
        ours = rt.forward(ids, mask, adapter=name)["logits"]
        assert max_diff_valid(ours, torch_outputs(hf_reference("llama", adapter_dir), ids, mask, "logits"), mask) <= 1e-4
    other = str(tmp_path / "lora-first")
    export([lora], other, names=["lora"])
    before = tree_hashes(other)
    with pytest.raises(ConfigError, match=r"gate_proj\+up_proj.* export into a fresh --out folder: ia3 first, then the "
                       "adapters already in OUT"):
        export([ia3], other, names=["ia3"])
    assert tree_hashes(other) == before
    # after adapters with no slot on gate/up (it was refused alike): the new base splits the group
    qv = peft_adapter("llama", "qv-for-ia3", seed=62, r=2, target_modules=["q_proj", "v_proj"])
    third = str(tmp_path / "qv-first")
    export([qv], third, names=["qv"])
    assert any("up_proj" in g for g in Runtime(third).manifest["fused_groups"])
    export([ia3], third, names=["ia3"])
    rt = Runtime(third)
    assert not any("up_proj" in g for g in rt.manifest["fused_groups"])
    for name, adapter_dir in [("ia3", ia3), ("qv", qv)]:
        ours = rt.forward(ids, mask, adapter=name)["logits"]
        assert max_diff_valid(ours, torch_outputs(hf_reference("llama", adapter_dir), ids, mask, "logits"), mask) <= 1e-4


def test_feedforward_entries_match_any_end_of_a_name_as_hf_peft(tiny_base, tmp_path):
    """HF PEFT marks a layer feed-forward when its name ends with a feedforward_modules entry, dot or not
    ("proj" marks mlp.up_proj): such an adapter loads and scales the same sides (it was refused)."""
    import peft

    base = tiny_base("llama")
    config = peft.IA3Config(task_type="CAUSAL_LM", target_modules=r".*mlp\.(up|down)_proj", feedforward_modules=["proj"])
    pm = peft.get_peft_model(load_reference_base(base, "causal-lm"), config)
    randomize_ia3(pm, seed=3)
    pm.save_pretrained(tmp_path / "ia3")
    ids, mask = sample_batch()
    ours = edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / "ia3")).eval()
    assert all(m.is_feedforward for m in ours.modules() if type(m).__name__ == "IA3Linear")
    assert np.abs(torch_outputs(ours, ids, mask, "logits") - torch_outputs(pm.eval(), ids, mask, "logits")).max() <= 1e-5
