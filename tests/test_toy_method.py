"""Adding a method touches its own folder only: ``tests/toy_bias`` (a learned per-layer output bias) registers
itself, then trains, saves, exports and runs through the public paths, as the built-in methods do."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from peft_refs import greedy_reference
from tiny import load_reference_base, sample_batch, torch_outputs
from file_checks import write_lines
from training_helpers import REPO, seq_cls_rows

import edgepeft
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime

import toy_bias  # noqa: F401  (registers the "toybias" method)


def test_a_method_from_the_test_folder_trains_saves_exports_and_runs(text_model, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows(32))
    adapter = str(tmp_path / "bias")
    log = edgepeft.train(model=text_model("bert"), task="seq-cls", method="toybias", data=data, eval_data=data,
                         out=adapter, epochs=3, batch_size=8, progress=False)
    assert log["args"]["lr"] == toy_bias.ToyBiasConfig.default_lr  # its own default rate
    assert min(e["loss"] for e in log["evals"][1:]) < log["evals"][0]["loss"]  # the best epoch beats the untrained adapter
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        assert json.load(f)["peft_type"] == "TOY_BIAS"

    out = str(tmp_path / "out")
    export([adapter], out)
    rt = Runtime(out)  # the runtime knows nothing of the method: it binds the slots the manifest declares
    assert rt.adapter_info("bias")["methods"] == ["toybias", "head"]
    ids, mask = rt.tokenizer.encode(["sample number 3 sounds good", "bad"])
    model = edgepeft.PeftModel.from_pretrained(load_reference_base(text_model("bert"), "seq-cls", 2), adapter).eval()
    ref = torch_outputs(model, ids, mask, "logits")
    ours = rt.forward(ids, mask, adapter="bias")["logits"]
    assert np.abs(ours - ref).max() <= 1e-4
    assert rt.classify("sample number 3 sounds good", adapter="bias")["label"] in ("neg", "pos")

    merged = str(tmp_path / "merged")  # the tuner's merge folds the bias into the layer's own
    export([adapter], merged, merge=True)
    assert np.abs(Runtime(merged).forward(ids, mask)["logits"] - ref).max() <= 1e-4


def test_a_toy_adapter_generates_on_a_decoder_as_pytorch_does(tiny_base, tmp_path):
    base = tiny_base("llama")
    model = edgepeft.get_peft_model(load_reference_base(base, "causal-lm"),
                                    toy_bias.ToyBiasConfig(task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "toy_bias" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(tmp_path / "bias")
    out = str(tmp_path / "out")
    export([str(tmp_path / "bias")], out)
    rt = Runtime(out)
    prompt, pmask = sample_batch(batch=2, seq=5)
    expected, _ = greedy_reference(model.eval(), prompt, pmask, 6)
    np.testing.assert_array_equal(rt.generate(prompt, pmask, adapter="bias", max_new_tokens=6, eos_token_id=[]), expected)
    assert (rt.generate(prompt, pmask, max_new_tokens=6, eos_token_id=[]) != expected).any()  # it does act


def test_no_shared_code_names_the_toy_method():
    for folder in ("edgepeft", "exporters", "runtimes"):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for f in files:
                if f.endswith(".py"):
                    with open(os.path.join(root, f), encoding="utf-8") as fh:
                        source = fh.read()
                    assert "toybias" not in source and "TOY_BIAS" not in source, f
