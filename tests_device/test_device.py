"""The device tier: edgepeft as a device installs it (`pip install 'edgepeft[cpu]' onnxruntime-genai`, no torch,
transformers or onnx), run by `make test` in `.venv-device` on the exports and answers the main suite wrote
(`tests/test_device_fixtures.py`). The runtime, `edgepeft run/inspect/bench`, ONNX Runtime's own LoraAdapter
API and onnxruntime-genai must give the main environment's answers.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.environ.get("EDGEPEFT_DEVICE_FIXTURES", os.path.join(REPO, "build", "device"))
LLAMA, MINILM = os.path.join(FIXTURES, "llama"), os.path.join(FIXTURES, "minilm")
ATOL = 1e-5  # the same ONNX Runtime version, its CPU build against onnxruntime-gpu's CPU provider


@pytest.fixture(scope="module")
def expected():
    path = os.path.join(FIXTURES, "expected.json")
    if not os.path.isfile(path):
        pytest.fail(f"{path}: missing; the main suite writes it (tests/test_device_fixtures.py): run `make test`")
    with open(path) as f:
        return json.load(f)


def cli(*argv, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "edgepeft", *map(str, argv)], capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_this_environment_has_no_torch_transformers_or_onnx():
    for name in ("torch", "transformers", "onnx", "optimum", "accelerate", "matplotlib", "peft"):
        assert importlib.util.find_spec(name) is None, f"{name} is installed in the device environment"
    assert importlib.util.find_spec("onnxruntime") is not None


def test_runtime_gives_the_main_environments_outputs(expected):
    from edgepeft.runtimes import Runtime

    for folder, key in ((LLAMA, "llama"), (MINILM, "minilm")):
        rt, want = Runtime(folder), expected[key]
        ids, mask = np.array(want["ids"]), np.array(want["mask"])
        for adapter, logits in want["forward"].items():
            ours = rt.forward(ids, mask, adapter=None if adapter == "None" else adapter)["logits"]
            assert np.abs(ours - np.array(logits)).max() <= ATOL, (key, adapter)
    rt = Runtime(LLAMA)
    for adapter, ids in expected["llama"]["greedy"].items():
        out = rt.generate(np.array(expected["llama"]["prompt_ids"]), adapter=None if adapter == "None" else adapter,
                          max_new_tokens=len(ids[0]) - len(expected["llama"]["prompt_ids"][0]), eos_token_id=[])
        assert out.tolist() == ids, adapter
    assert Runtime(MINILM).labels("topic") == expected["minilm"]["labels"]


def test_cli_run_inspect_and_bench_work(expected):
    for adapter, text in expected["llama"]["run"].items():
        assert cli("run", LLAMA, "--adapter", adapter, "--max-new-tokens", 8, expected["llama"]["prompt"]).stdout == text
    assert cli("run", MINILM, "--adapter", "topic", "where is my parcel").stdout == expected["minilm"]["run"]
    chat = cli("run", LLAMA, "--adapter", "lora", "--chat", "--max-new-tokens", 8, expected["llama"]["prompt"]).stdout
    assert chat == expected["llama"]["chat"]  # the chat template (jinja2, a runtime dependency)
    assert json.loads(cli("inspect", LLAMA, "--json").stdout) == json.loads(expected["llama"]["inspect"])
    bench = cli("bench", MINILM, "--rounds", 2, "--calls", 2, "--seq", 8).stdout
    assert "topic (lora+head)" in bench and "ms added per call" in bench


def test_train_and_export_name_the_extra_they_need(tmp_path):
    for argv in (["train", "--model", "m", "--task", "seq-cls", "--data", "d.jsonl", "--out", tmp_path / "o"],
                 ["export", "--adapter", "a", "--out", tmp_path / "o"]):
        done = cli(*argv, check=False)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "pip install 'edgepeft[train,cpu]'" in lines[0], done.stderr


def test_the_python_training_api_names_the_extra_it_needs():
    """As the CLI's train and export: one EdgePeftError naming the install, not a ModuleNotFoundError from inside."""
    import importlib

    import edgepeft
    from edgepeft.errors import MissingDependencyError

    for name in ("train", "export", "LoraConfig", "get_peft_model", "edgepeft.exporters", "edgepeft.training"):
        with pytest.raises(MissingDependencyError, match=r"needs torch, .*which this install lacks \(it runs exports "
                                                         r"only\); pip install 'edgepeft\[train,cpu\]'$"):
            importlib.import_module(name) if name.startswith("edgepeft.") else getattr(edgepeft, name)


def test_onnx_runtimes_own_lora_adapter_api_gives_the_runtimes_logits(expected):
    import onnxruntime as ort

    want = expected["minilm"]
    adapter = ort.LoraAdapter()
    adapter.Load(os.path.join(MINILM, "adapters", "topic", "adapter.onnx_adapter"))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    so = ort.SessionOptions()
    so.log_severity_level = 3  # the slots' default initializers are graph inputs too: ONNX Runtime warns at load
    session = ort.InferenceSession(os.path.join(MINILM, "base", "model.onnx"), so, providers=["CPUExecutionProvider"])
    ids, mask = np.array(want["ids"]), np.array(want["mask"])
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}  # BERT's: one text's, 0
    logits = session.run(["logits"], feeds, options)[0]
    assert np.abs(logits - np.array(want["forward"]["topic"])).max() <= ATOL
    plain = session.run(["logits"], feeds)[0]  # no adapter: the base model
    assert np.abs(plain - np.array(want["forward"]["None"])).max() <= ATOL


def _genai_ids(og, folder, prompt, length, adapter=None):
    model = og.Model(os.path.join(folder, "base"))  # reads OUT/base/genai_config.json, written by the export
    adapters = og.Adapters(model)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=length)  # prompt + new tokens
    generator = og.Generator(model, params)
    if adapter is not None:
        adapters.load(os.path.join(folder, "adapters", adapter, "adapter.onnx_adapter"), adapter)
        generator.set_active_adapter(adapters, adapter)  # before the prompt: the prefill runs with it
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return list(generator.get_sequence(0))


def test_onnxruntime_genai_opens_the_exports_and_generates_the_same_ids(expected):
    og = pytest.importorskip("onnxruntime_genai")

    cases = [(LLAMA, expected["llama"])] + [(os.path.join(FIXTURES, arch), want) for arch, want in expected["genai"].items()]
    for folder, want in cases:
        prompt = want["prompt_ids"][0]
        for adapter, ids in want["greedy"].items():
            if adapter == "prompt":
                continue  # a prompt adapter changes the mask and positions: genai cannot run it
            got = _genai_ids(og, folder, prompt, len(ids[0]), None if adapter == "None" else adapter)
            assert got == ids[0], (folder, adapter)


def test_onnxruntime_genai_stops_at_an_eos_and_leaves_it_out(expected, tmp_path):
    """deploy.md: genai stops at an end-of-sequence id (not at the padding id) and get_sequence leaves that eos out;
    edgepeft's ids end with it, as transformers'. An export whose eos is a token greedy decoding reaches later on."""
    og = pytest.importorskip("onnxruntime_genai")
    from edgepeft.runtimes import Runtime

    want = expected["llama"]
    prompt, ids = want["prompt_ids"][0], want["greedy"]["lora"][0]
    new = ids[len(prompt):]
    k = next(k for k in range(1, len(new)) if new[k] not in new[:k])  # the first new token not generated before
    stop = new[k]
    folder = str(tmp_path / "llama")
    shutil.copytree(LLAMA, folder)
    config = os.path.join(folder, "base", "genai_config.json")
    with open(config) as f:
        data = json.load(f)
    data["model"]["eos_token_id"] = stop
    with open(config, "w") as f:
        json.dump(data, f)
    assert _genai_ids(og, folder, prompt, len(ids), "lora") == ids[:len(prompt) + k]
    edgepeft = Runtime(folder).generate(np.array([prompt]), adapter="lora", max_new_tokens=8, eos_token_id=[stop])
    assert edgepeft[0].tolist() == ids[:len(prompt) + k + 1]  # the eos included


def test_bench_genai_refuses_what_it_cannot_measure():
    """Found by a hunt: samples/bench_genai.py was a traceback from genai on --new-tokens 0 and on an encoder's
    export (no genai_config.json); both are refused in one line before anything runs."""
    sample = os.path.join(REPO, "samples", "bench_genai.py")
    for argv, want in ((["--export", LLAMA, "--new-tokens", "0"], "argument --new-tokens: 0 is not a whole number from 1"),
                       (["--export", LLAMA, "--new-tokens", "100000"], "error: --new-tokens 100000: the model's "),
                       (["--export", MINILM, "--adapter", "topic"], f"{MINILM}: a seq-cls export; onnxruntime-genai "
                                                                      "runs decoders")):
        done = subprocess.run([sys.executable, sample, *argv], capture_output=True, text=True, timeout=300)
        assert done.returncode != 0 and "Traceback" not in done.stderr and want in done.stderr.splitlines()[-1], argv


def test_bench_genai_times_greedy_decoding_on_both_sides(tmp_path):
    """Found by a hunt: on a model whose generation_config.json samples (instruct models do), bench_genai.py timed
    edgepeft sampling against genai's greedy loop: two jobs in one table, "greedy ids identical: no"."""
    folder = str(tmp_path / "llama")
    shutil.copytree(LLAMA, folder)
    manifest = os.path.join(folder, "base", "edgepeft.json")
    with open(manifest) as f:
        data = json.load(f)
    data["generation"] = {"do_sample": True, "temperature": 5.0, "top_k": 0}  # as the export records the model's
    with open(manifest, "w") as f:
        json.dump(data, f)
    sample = os.path.join(REPO, "samples", "bench_genai.py")
    done = subprocess.run([sys.executable, sample, "--export", folder, "--rounds", "1", "--new-tokens", "8"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| no adapter", "| lora"))]
    assert len(rows) == 2 and all(row.endswith("| yes |") for row in rows), done.stdout
