"""Adapters also written in ONNX Runtime's own format run on the exported base without edgepeft."""
from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort

from tiny import max_diff_valid, sample_batch
from edgepeft.runtimes import Runtime


def _feeds(rt, ids, mask):
    """The base graph's inputs for one plain forward call (no adapter slots: the run options bind them)."""
    feeds = {"input_ids": ids, "attention_mask": mask}
    if rt.type_vocab_size:  # a seq-cls BERT's segments: one text's, all 0
        feeds["token_type_ids"] = np.zeros_like(ids)
    if rt.cache:
        feeds["position_ids"] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        empty = np.zeros((ids.shape[0], rt.cache["num_kv_heads"], 0, rt.cache["head_dim"]), np.float32)
        feeds |= {name: empty for name in rt.cache_inputs}
    return feeds


def _run_with_ort_adapter(rt, adapter_dir, ids, mask):
    adapter = ort.LoraAdapter()
    adapter.Load(os.path.join(adapter_dir, "adapter.onnx_adapter"))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    session = ort.InferenceSession(os.path.join(rt.base_dir, "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run([rt.output_name], _feeds(rt, ids, mask), options)[0]


def test_ort_adapter_files_match_the_runtime(shared_export, workdir):
    from edgepeft.exporters import export

    for arch in ("llama", "bert"):
        out, dirs, _ = shared_export(arch)  # written by default on a float base
        none = str(workdir / f"no-ort-adapter-{arch}")
        export([dirs[sorted(dirs)[0]]], none, ort_adapter=False)
        assert not os.listdir(os.path.join(none, "adapters", sorted(dirs)[0])).count("adapter.onnx_adapter")
        rt = Runtime(out)
        ids, mask = sample_batch()
        for name in dirs:
            adapter_dir = os.path.join(out, "adapters", name)
            with open(os.path.join(adapter_dir, "adapter.json")) as f:
                assert json.load(f)["ort_adapter"] == "adapter.onnx_adapter"
            ours = rt.forward(ids, mask, adapter=name)[rt.output_name]
            theirs = _run_with_ort_adapter(rt, adapter_dir, ids, mask)
            assert max_diff_valid(ours, theirs, mask) < 1e-5, (arch, name)
            assert max_diff_valid(ours, rt.forward(ids, mask)[rt.output_name], mask) > 1e-3  # the adapter acts


def test_prompt_and_prefix_adapters_get_no_ort_adapter_file(virtual_export, workdir, capsys):
    """Asked for with ort_adapter=True (--ort-adapter), the file left out is named in a note; it went unsaid."""
    from edgepeft.exporters import export

    dirs = virtual_export("llama")[1]
    out = str(workdir / "ort-adapter-virtual")
    export(list(dirs.values()), out, names=list(dirs), ort_adapter=True, verbose=True)
    notes = [line for line in capsys.readouterr().err.splitlines() if "no .onnx_adapter written" in line]
    assert sorted(n.split(":")[1].strip() for n in notes) == ["prefix", "prefix_mlp", "prompt"]
    manifests = {}
    for name in os.listdir(os.path.join(out, "adapters")):
        with open(os.path.join(out, "adapters", name, "adapter.json")) as f:
            manifests[name] = json.load(f)
    virtual = {n for n, m in manifests.items() if set(m["methods"]) & {"prompt", "prefix"}}
    assert virtual
    for name, m in manifests.items():
        has_file = os.path.exists(os.path.join(out, "adapters", name, "adapter.onnx_adapter"))
        assert has_file == (name not in virtual) == (m["ort_adapter"] is not None), name
        if has_file:  # IA3 and LoRA on the base that also has prompt/prefix slots
            rt = Runtime(out)
            ids, mask = sample_batch()
            ours = rt.forward(ids, mask, adapter=name)[rt.output_name]
            theirs = _run_with_ort_adapter(rt, os.path.join(out, "adapters", name), ids, mask)
            assert max_diff_valid(ours, theirs, mask) < 1e-5, name


def test_an_encoders_prefix_adapter_runs_from_its_ort_adapter_file(tiny_base, tmp_path):
    """BERT's prefix keys and values are plain inputs of every run (no cache, no mask change): ort.LoraAdapter runs it."""
    from peft_refs import peft_virtual_adapter
    from edgepeft.exporters import export

    out = str(tmp_path / "out")
    export([peft_virtual_adapter(tmp_path / "prefix", tiny_base("bert"), "prefix", seed=5, task="feature-extraction",
                                 num_virtual_tokens=3)], out, names=["prefix"])
    rt = Runtime(out)
    ids, mask = sample_batch()
    ours = rt.forward(ids, mask, adapter="prefix")[rt.output_name]
    theirs = _run_with_ort_adapter(rt, os.path.join(out, "adapters", "prefix"), ids, mask)
    assert max_diff_valid(ours, theirs, mask) < 1e-5
    assert max_diff_valid(ours, rt.forward(ids, mask)[rt.output_name], mask) > 1e-3  # the adapter acts


def test_base_and_adapter_graphs_share_one_ir_version(shared_export):
    import onnx

    out, dirs, _ = shared_export("llama")
    base = onnx.load(os.path.join(out, "base", "model.onnx"), load_external_data=False)
    versions = {onnx.load(os.path.join(out, "adapters", n, "adapter.onnx")).ir_version for n in dirs}
    assert versions == {base.ir_version} == {9}


def test_an_export_after_the_shared_thread_pool_writes_its_ort_adapter_files(peft_adapter, tmp_path):
    """Found by a hunt: after use_shared_thread_pool() (an app's start, bench --shared-threads), the export's session
    that writes .onnx_adapter files asked for threads of its own, which ONNX Runtime refuses (a raw error)."""
    import subprocess
    import sys

    from peft_refs import spec_adapter

    script = ("import sys; from edgepeft.runtimes import use_shared_thread_pool; use_shared_thread_pool(1); "
              "from edgepeft.exporters import export; export([sys.argv[1]], sys.argv[2], ort_adapter=True)")
    done = subprocess.run([sys.executable, "-c", script, spec_adapter(peft_adapter, "llama", "qv"), str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert os.path.isfile(tmp_path / "o" / "adapters" / "qv" / "adapter.onnx_adapter")


def test_a_damaged_ort_adapter_file_is_named_by_inspect(shared_export, tmp_path, capsys):
    """A lifecycle hunt: one byte changed in adapter.onnx_adapter (its size kept), or the file cut short, passed
    `edgepeft inspect`, and ONNX Runtime's LoraAdapter served it 3.14 away from HF PEFT (edgepeft's runtime reads
    adapter.onnx). Its SHA-256 is recorded and checked now."""
    import shutil

    from training_helpers import cli_error

    out = shutil.copytree(shared_export("llama")[0], tmp_path / "copy")
    name = sorted(os.listdir(out / "adapters"))[0]
    path = out / "adapters" / name / "adapter.onnx_adapter"
    data = bytearray(path.read_bytes())
    data[len(data) // 2 | 3] ^= 0x08
    path.write_bytes(bytes(data))
    line = cli_error(capsys, "inspect", out)
    assert line.startswith(f"error: {path}: not what the export wrote (its SHA-256 differs); copy {path.parent} again "
                           "from its export, or re-export its adapter into this OUT: `edgepeft export --adapter ")
    path.write_bytes(bytes(data[: len(data) // 2]))
    assert cli_error(capsys, "inspect", out).startswith(f"error: {path}: not what the export wrote")
    path.unlink()  # left out of a deployment that serves it with edgepeft (cli.md): no problem
    from training_helpers import cli_ok

    assert "error" not in cli_ok(capsys, "inspect", out)
