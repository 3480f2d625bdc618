"""Exports and the main environment's answers for the device tier (``tests_device/``, run by ``make test`` in
``.venv-device``: the runtime-only install plus onnxruntime-genai, no torch).

Written to ``build/device/`` (or ``$EDGEPEFT_DEVICE_FIXTURES``):
    llama/     a tiny Llama with a word tokenizer: LoRA and IA3 (with .onnx_adapter files) and a prompt adapter
    minilm/    the real MiniLM-L6 weights with a 3-class LoRA classifier (labels.json)
    expected.json   forward outputs, greedy ids and `edgepeft run` / `inspect` outputs, as this environment gives them
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest

from peft_refs import ia3_adapter, lora_adapter, peft_virtual_adapter
from tiny import sample_batch
from word_tokenizer import PROMPT

from edgepeft.cli import main
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.environ.get("EDGEPEFT_DEVICE_FIXTURES", os.path.join(REPO, "build", "device"))
NEW_TOKENS = 8


def _cli(*argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([str(a) for a in argv])
    return out.getvalue()


def _quiet_prompt(rt, adapters, candidates) -> list:
    """The first prompt (token ids) no adapter answers with eos or pad within NEW_TOKENS: onnxruntime-genai cannot
    be told never to stop (it stops at the model's eos ids), so the tiers compare runs that reach the length limit."""
    stops = {*rt.manifest["eos_token_id"], rt.pad_token_id}
    return next(p for p in candidates
                if not any(stops & set(rt.generate(np.array([p]), adapter=a, max_new_tokens=NEW_TOKENS,
                                                   eos_token_id=[])[0, -NEW_TOKENS:].tolist()) for a in [None, *adapters]))


def _greedy(rt, prompt_ids, adapters) -> dict:
    return {str(a): rt.generate(np.array([prompt_ids]), adapter=a, max_new_tokens=NEW_TOKENS, eos_token_id=[])[0].tolist()
            for a in [None, *adapters]}


@pytest.mark.slow
def test_write_the_device_tiers_exports_and_answers(text_export, tiny_base, tmp_path):
    shutil.rmtree(FIXTURES, ignore_errors=True)
    os.makedirs(FIXTURES)
    _, _, llama_base = text_export  # a tiny Llama folder with a word tokenizer and a chat template
    dirs = {"lora": lora_adapter(tmp_path / "lora", llama_base, "causal-lm", 31, r=4, lora_alpha=8,
                          target_modules=["q_proj", "v_proj", "down_proj"]),
            "ia3": ia3_adapter(tmp_path / "ia3", llama_base, 32),
            "prompt": peft_virtual_adapter(tmp_path / "prompt", llama_base, "prompt", seed=33, num_virtual_tokens=3)}
    llama = os.path.join(FIXTURES, "llama")
    export(list(dirs.values()), llama, names=list(dirs), ort_adapter=True)

    import edgepeft

    minilm_adapter = lora_adapter(tmp_path / "topic", edgepeft.minilm_path(), "seq-cls", 34, num_labels=3, r=8,
                           target_modules=["query", "value"])
    with open(os.path.join(minilm_adapter, "labels.json"), "w") as f:
        json.dump({"labels": ["billing", "delivery", "returns"]}, f)
    minilm = os.path.join(FIXTURES, "minilm")
    export([minilm_adapter], minilm, ort_adapter=True)

    rt, cls = Runtime(llama), Runtime(minilm)
    ids, mask = sample_batch(batch=2, seq=6, seed=4)
    texts = (PROMPT, *(f"w{9 + k} w{30 + 2 * k} w{60 + k}" for k in range(40)))
    prompt_ids = _quiet_prompt(rt, dirs, [rt.tokenizer.encode(t)[0][0].tolist() for t in texts])
    prompt = texts[[rt.tokenizer.encode(t)[0][0].tolist() for t in texts].index(prompt_ids)]
    genai = {}  # onnxruntime-genai on the other decoders (model.type qwen2; gpt2 runs as llama)
    for arch, targets in (("qwen2", ["q_proj", "v_proj"]), ("gpt2", ["c_attn", "c_fc"])):
        folder = os.path.join(FIXTURES, arch)
        export([lora_adapter(tmp_path / f"{arch}-lora", tiny_base(arch), "causal-lm", 35, r=4, target_modules=targets)], folder,
               names=["lora"])
        other = Runtime(folder)
        quiet = _quiet_prompt(other, ["lora"], [[1, 5 + k, 40 + 3 * k, 90 - k] for k in range(40)])
        genai[arch] = {"prompt_ids": [quiet], "greedy": {k: [v] for k, v in _greedy(other, quiet, ["lora"]).items()}}
    text_ids, text_mask = cls.tokenizer.encode(["where is my parcel", "I want my money back"])
    expected = {
        "llama": {
            "ids": ids.tolist(), "mask": mask.tolist(), "prompt": prompt, "prompt_ids": [prompt_ids],
            "forward": {str(a): rt.forward(ids, mask, adapter=a)["logits"].tolist() for a in [None, *dirs]},
            "greedy": {k: [v] for k, v in _greedy(rt, prompt_ids, dirs).items()},
            "run": {a: _cli("run", llama, "--adapter", a, "--max-new-tokens", NEW_TOKENS, prompt) for a in dirs},
            "chat": _cli("run", llama, "--adapter", "lora", "--chat", "--max-new-tokens", NEW_TOKENS, prompt),
            "inspect": _cli("inspect", llama, "--json"),
        },
        "genai": genai,
        "minilm": {
            "ids": text_ids.tolist(), "mask": text_mask.tolist(),
            "forward": {str(a): cls.forward(text_ids, text_mask, adapter=a)["logits"].tolist() for a in [None, "topic"]},
            "run": _cli("run", minilm, "--adapter", "topic", "where is my parcel"),
            "labels": cls.labels("topic"),
        },
    }
    with open(os.path.join(FIXTURES, "expected.json"), "w") as f:
        json.dump(expected, f)
    assert np.array(expected["minilm"]["forward"]["topic"]).shape == (2, 3)
    assert len({json.dumps(v) for v in expected["llama"]["greedy"].values()}) == 4  # every adapter acts
