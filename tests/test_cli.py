"""The command line, run as users run it: ``python -m edgepeft ...`` in a subprocess.

User errors exit 1 with one ``error:`` line that names the path, never a traceback.
"""
from __future__ import annotations

import codecs
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from file_checks import tree_hashes

from peft_refs import spec_adapter
from edgepeft.errors import CorruptArtifactError
from edgepeft.runtimes import InvalidInputError, Runtime
from edgepeft.runtimes.manifest import read_base_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def edgepeft(*args, timeout=240):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run([sys.executable, "-m", "edgepeft", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def no_traceback(proc):
    assert "Traceback" not in proc.stdout and "Traceback" not in proc.stderr, proc.stderr


def assert_user_error(proc, *needles):
    """Exit 1, exactly one ``error:`` line on stderr (the last one), naming every needle."""
    no_traceback(proc)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert lines, "no error message on stderr"
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert lines[-1] == errors[0], f"the error line must be last on stderr:\n{proc.stderr}"
    for needle in needles:
        assert str(needle) in errors[0], (needle, errors[0])
    return errors[0], lines[:-1]  # the error line and any noise before it


@pytest.fixture(scope="module")
def llama(shared_export):
    return shared_export("llama")  # (OUT, {name: HF adapter dir}, report)


# --------------------------------------------------------------------------- export
def test_export_success(tmp_path, llama):
    out = tmp_path / "out"
    dirs = llama[1]
    proc = edgepeft("export", "--adapter", dirs["qv"], "--adapter", dirs["mlp"], "--name", "first", "--out", out)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    stdout = proc.stdout
    shown = []
    for name in ("base (no adapter)", "first", "mlp"):  # a hunt: the ok line's largest could be the unshown base's
        m = re.search(rf"^validated {re.escape(name)}: max \|diff\| vs PyTorch = (\S+)", stdout, re.M)
        assert m, f"no 'validated {name}' line in:\n{stdout}"
        assert 0.0 <= float(m.group(1)) < 1e-3
        shown.append(float(m.group(1)))
    m = re.search(r"^ok: (\d+) checks, max \|diff\| vs PyTorch (\S+)$", stdout, re.M)
    assert m, stdout
    assert int(m.group(1)) == 3  # base + two adapters
    assert float(m.group(2)) == max(shown)
    assert sorted(os.listdir(out / "adapters")) == ["first", "mlp"]
    assert (out / "base" / "edgepeft.json").is_file() and (out / "base" / "model.onnx").is_file()
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_export_reuses_base(tmp_path, llama):
    """A second export into the same OUT reuses the base (it already has every slot) and adds the adapter."""
    out = tmp_path / "out"
    shutil.copytree(llama[0], out)
    base_before = tree_hashes(out / "base")
    proc = edgepeft("export", "--adapter", llama[1]["qv"], "--name", "again", "--out", out)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert "reusing" in proc.stdout and "validated again" in proc.stdout
    assert tree_hashes(out / "base") == base_before
    assert sorted(os.listdir(out / "adapters")) == ["again", "all", "mlp", "qv"]


def test_export_into_a_quantized_out_reports_the_quantized_checks(tmp_path, llama):
    """A second adapter into an int8 OUT reuses the quantized base: every check is relative; one ok line, exit 0."""
    out = tmp_path / "out"
    first = edgepeft("export", "--adapter", llama[1]["qv"], "--out", out, "--quantize", "int8")
    assert first.returncode == 0, first.stderr
    proc = edgepeft("export", "--adapter", llama[1]["qv"], "--name", "again", "--out", out, "--quantize", "int8")
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert "reusing" in proc.stdout
    assert re.search(r"^ok: \d+ checks, int8 graph: max relative error \S+$", proc.stdout, re.M), proc.stdout
    assert sorted(os.listdir(out / "adapters")) == ["again", "qv"]
    # a new base: the adapters already there are judged against OUT's base by --qtol, and said apart from the
    # checks against PyTorch (their difference was reported as "max |diff| vs PyTorch", 350x its tolerance)
    proc = edgepeft("export", "--adapter", llama[1]["mlp"], "--out", out, "--quantize", "int8")
    assert proc.returncode == 0, proc.stderr
    line = re.search(r"^ok: .*$", proc.stdout, re.M).group(0)
    assert re.fullmatch(r"ok: \d+ checks, max \|diff\| vs PyTorch \S+; int8 graph: max relative error \S+; 2 "
                        r"adapter\(s\) already in OUT give OUT's base's outputs on the new base \(max relative error "
                        r"\S+\)", line), line


def test_an_error_keeps_the_paths_it_names(tmp_path):
    """Runtime argument names become flags in run/bench messages; a path with such a name in it stays as it is."""
    from edgepeft.cli import as_flags

    missing = tmp_path / "eval_data.jsonl"
    assert as_flags(f"{missing}: data file not found", ["train", "--eval", str(missing)]) == f"{missing}: data file not found"
    assert as_flags(f"{missing} and max_new_tokens.", ["run", "out"]) == f"{missing} and --max-new-tokens."
    assert as_flags("adapter=None; lower max_new_tokens", ["run", "out"]) == "--adapter none; lower --max-new-tokens"
    # found by a hunt: a name without a slash was a flag's ("--lr 0.01.jsonl:1: not valid JSON", "--seed 1: holds")
    train = ["train", "--model", "m", "--data", "lr=0.01.jsonl", "--out=seed=1", "--eval", "max_length"]
    for said in ("lr=0.01.jsonl:1: not valid JSON", "seed=1: holds a checkpoint", "max_length: data file not found"):
        assert as_flags(said, train) == said
    assert as_flags("max_length=0 must be > 0", [*train, "--max-length", "0"]) == "--max-length 0 must be > 0"
    assert as_flags("lr=0.01 must be", train) == "--lr 0.01 must be"  # not the path's text: a name given a value
    # a prompt "0" matched the digit of an earlier stand-in: the adapter's name came out as NUL bytes
    run = ["run", "out", "0", "--adapter", "qv", "--max-new-tokens", "0"]
    assert as_flags("adapter 'qv' is not loaded in out; max_new_tokens=0", run) == \
        "adapter 'qv' is not loaded in out; --max-new-tokens 0"
    # a hunt: a field given as --option NAME=... was named by its flag, which the user had not typed
    said = "target_modules 'query,value' matches no linear layer"
    assert as_flags(said, [*train, "--option", "target_modules=query,value"]) == said
    assert as_flags(said, [*train, "--option=target_modules=query,value"]) == said  # click's = form (a review)
    assert as_flags(said, [*train, "--target-modules", "query,value"]) == f"--{said.replace('_', '-', 1)}"


# --------------------------------------------------------------------------- inspect
def test_inspect_lists_base_slots_and_adapters(llama):
    out = llama[0]
    proc = edgepeft("inspect", out)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    manifest = read_base_manifest(os.path.join(out, "base"))
    assert re.search(r"^base: llama causal-lm from \S+", text, re.M), text
    assert manifest["source"] in text
    assert manifest["fingerprint"][:16] in text
    assert re.search(rf"^slots: {len(manifest['slots'])}$", text, re.M), text
    assert re.search(r"^  lora: \d+ slots on model\.layers\.0\..* and its per-row weights \(mixed batches\)$", text,
                     re.M), text  # the row-weight input is on no module: not listed as one ("batch")
    assert re.search(r"^adapters: 3$", text, re.M), text
    for name in ("qv", "all"):
        assert re.search(rf"^  {name}: lora r=\d+ alpha=\S+  \d+ slots  ", text, re.M), (name, text)
    # r is not every module's: its rank_pattern says which (inspect showed r=2 for down_proj's 3)
    assert re.search(r'^  mlp: lora r=2 alpha=4 rank_pattern=\{"down_proj": 3\}  \d+ slots  ', text, re.M), text
    assert "made for another base" not in text


def test_inspect_json(llama):
    out = llama[0]
    proc = edgepeft("inspect", out, "--json")
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    manifest = read_base_manifest(os.path.join(out, "base"))
    assert info["base"]["model_type"] == "llama"
    assert info["base"]["task"] == "causal-lm"
    assert info["base"]["fingerprint"] == manifest["fingerprint"]
    assert [s["name"] for s in info["slots"]] == [s.name for s in manifest["slots"]]
    assert sorted(a["name"] for a in info["adapters"]) == ["all", "mlp", "qv"]
    assert all(a["matches_base"] for a in info["adapters"])
    assert {a["name"]: a["rank"] for a in info["adapters"]}["qv"] == 4


def test_inspect_flags_adapter_of_other_base(tmp_path, llama):
    out = tmp_path / "out"
    shutil.copytree(llama[0], out)
    manifest = out / "adapters" / "qv" / "adapter.json"
    data = json.loads(manifest.read_text())
    data["base_fingerprint"] = "0" * 64
    manifest.write_text(json.dumps(data))
    (out / "adapters" / "qv").rename(out / "adapters" / "qv2")  # listed by folder, as the runtime names it
    proc = edgepeft("inspect", out)
    no_traceback(proc)
    assert proc.returncode == 1, proc.stderr  # every Runtime(OUT) refuses it: it exited 0
    assert re.search(r"^  qv2: .*made for another base", proc.stdout, re.M), proc.stdout
    assert not re.search(r"^  all: .*made for another base", proc.stdout, re.M), proc.stdout
    assert f"qv2: exported for another base" in proc.stderr and "--name qv2 --overwrite" in proc.stderr


# --------------------------------------------------------------------------- user errors
def test_export_missing_adapter_dir(tmp_path):
    missing = tmp_path / "no-such-adapter"
    out = tmp_path / "out"
    proc = edgepeft("export", "--adapter", missing, "--out", out)
    assert_user_error(proc, missing)
    assert not (out / "base").exists()


def test_export_into_out_of_other_base(tmp_path, llama, peft_adapter):
    out = tmp_path / "out"
    shutil.copytree(llama[0], out)
    before = tree_hashes(out)
    proc = edgepeft("export", "--adapter", spec_adapter(peft_adapter, "gpt2", "attn"), "--out", out)
    assert_user_error(proc, out / "base", "another --out")
    assert tree_hashes(out) == before
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_export_unsupported_option(tmp_path, llama):
    adapter = tmp_path / "dora"
    shutil.copytree(llama[1]["qv"], adapter)
    config = adapter / "adapter_config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), use_dora=True)))
    proc = edgepeft("export", "--adapter", adapter, "--out", tmp_path / "out")
    assert_user_error(proc, "use_dora", adapter)  # names the option and the folder to fix


def test_inspect_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = edgepeft("inspect", empty)
    assert_user_error(proc, empty, "edgepeft export")


def test_inspect_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    proc = edgepeft("inspect", missing, "--json")
    assert_user_error(proc, missing)
    assert proc.stdout == ""


def test_inspect_corrupt_adapter_manifest(tmp_path, llama):
    out = tmp_path / "out"
    shutil.copytree(llama[0], out)
    (out / "adapters" / "mlp" / "adapter.json").write_text("{ not json")
    proc = edgepeft("inspect", out)
    assert_user_error(proc, out / "adapters" / "mlp" / "adapter.json")


def test_usage_error_is_not_a_traceback(tmp_path):
    proc = edgepeft("export", "--out", tmp_path / "out")  # --adapter missing
    no_traceback(proc)
    assert proc.returncode == 2
    assert "--adapter" in proc.stderr


# --------------------------------------------------------------------------- run on a merged classifier; disk errors
def test_run_names_the_merged_classifier_and_shows_its_labels(tmp_path, text_model):
    import peft
    import transformers

    base = text_model("bert")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
    pm = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]))
    pm.peft_config["default"].base_model_name_or_path = base
    adapter = tmp_path / "tcls"
    pm.save_pretrained(adapter)
    (adapter / "labels.json").write_text(json.dumps({"labels": ["neg", "neu", "pos"]}))
    out = tmp_path / "merged"
    assert edgepeft("export", "--adapter", adapter, "--merge", "--out", out).returncode == 0
    for name in ("tcls", "none"):  # the merged adapter is the base: either name serves it
        proc = edgepeft("run", out, "hello there", "--adapter", name)
        no_traceback(proc)
        assert proc.returncode == 0, proc.stderr
        assert sorted(line.split("\t")[0] for line in proc.stdout.strip().splitlines()) == ["neg", "neu", "pos"]


def test_run_pools_the_text_tokens_of_an_embedding_not_the_virtual_ones(tmp_path, text_model):
    """A prompt adapter's virtual tokens come first in last_hidden_state; the pooled preview covers the text's tokens."""
    import transformers

    import edgepeft as ep

    base = text_model("bert")
    model = ep.get_peft_model(transformers.AutoModel.from_pretrained(base),
                              ep.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=4))
    model.peft_config["default"].base_model_name_or_path = base
    model.save_pretrained(tmp_path / "p")
    out = tmp_path / "out"
    assert edgepeft("export", "--adapter", tmp_path / "p", "--out", out).returncode == 0
    proc = edgepeft("run", out, "hello there", "--adapter", "p")
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    rt = Runtime(out)
    ids, mask = rt.tokenizer.encode("hello there")
    hidden = rt.forward(ids, mask, adapter="p")["last_hidden_state"][0]
    assert hidden.shape[0] == ids.shape[1] + 4
    pooled = hidden[4:].mean(0)
    expected = " ".join(f"{v:.4f}" for v in (pooled / (pooled ** 2).sum() ** 0.5)[:8])
    assert f"pooled by mean (no sentence-transformers files), normalized): {expected} ..." in proc.stdout, (proc.stdout, expected)
    np.testing.assert_allclose(rt.embed("hello there", adapter="p"), pooled / np.linalg.norm(pooled), atol=1e-6)
    rt.tokenizer._tok.post_processor = None  # a tokenizer that adds no token of its own: "" has none (alone: a shape
    for empty in ("", ["", "hello there"]):  # complaint; in a batch the pooling of its padding)
        with pytest.raises(InvalidInputError, match="^text '' has no tokens .*; give text the vocabulary holds$"):
            rt.embed(empty, adapter="p")


def test_bench_json_that_is_a_folder_is_refused_before_measuring(tmp_path, llama):
    proc = edgepeft("bench", llama[0], "--rounds", 1, "--calls", 1, "--json", tmp_path)
    assert_user_error(proc, str(tmp_path), "--json")
    (tmp_path / "afile").write_text("x")
    proc = edgepeft("bench", llama[0], "--rounds", 1, "--calls", 1, "--plot", tmp_path / "afile" / "b.png")
    assert_user_error(proc, str(tmp_path / "afile"), "give --plot a file path in a folder")


def test_a_disk_error_is_one_line(monkeypatch, capsys):
    """Any OSError that reaches the CLI (a path that is a file, no permission, disk full) is one line, exit 1."""
    from edgepeft import cli as cli_module

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/data/out/base/model.onnx")

    monkeypatch.setattr(cli_module.cli, "main", refuse)
    with pytest.raises(SystemExit) as e:
        cli_module.main(["inspect", "x"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: /data/out/base/model.onnx: Permission denied; check the path, its permissions and free space")


@pytest.mark.parametrize("damage", ["adapter-graph-missing", "adapter-graph-truncated", "base-graph-missing",
                                    "base-weights-missing", "base-weights-truncated", "base-weights-zeroed"])
def test_inspect_fails_on_missing_or_damaged_graphs(tmp_path, llama, damage):
    out = tmp_path / "out"
    shutil.copytree(llama[0], out)
    graph = out / ("base" if damage.startswith("base") else "adapters/qv") / ("model.onnx" if damage.startswith("base")
                                                                               else "adapter.onnx")
    if damage.startswith("base-weights"):  # inspect said all was well; Runtime could not load the base
        graph = out / "base" / "model.onnx.data"
    if damage.endswith("missing"):
        graph.unlink()
    elif damage.endswith("zeroed"):  # a hunt: a preallocated file a copy stopped filling, its size right: all zeros
        data = graph.read_bytes()  # came out of every call, and inspect said all was well
        graph.write_bytes(data[:len(data) // 2] + bytes(len(data) - len(data) // 2))
    else:
        graph.write_bytes(graph.read_bytes()[:100])
    proc = edgepeft("inspect", out)
    assert_user_error(proc, str(graph), "not what the export wrote (its SHA-256 differs" if damage.endswith("zeroed")
                      else "re-")
    assert proc.stdout.startswith("base: llama")  # the summary still prints first
    if damage == "base-weights-truncated":  # a copy to a device cut short: ONNX Runtime named an initializer's offsets
        with pytest.raises(CorruptArtifactError, match=rf"{graph}: 100 bytes where the export wrote \d+ \(a copy cut "
                           r"short\?\); copy the export's base folder again"):
            Runtime(out)


def test_inspect_takes_a_python_deployment_without_the_javascript_graphs(tmp_path, llama):
    """deploy.md: model.web.onnx and neutral.onnx are for JavaScript only; inspect called them missing (exit 1)."""
    out = tmp_path / "device"
    shutil.copytree(llama[0], out)
    for name in ("model.web.onnx", "neutral.onnx"):
        (out / "base" / name).unlink()
    proc = edgepeft("inspect", out)
    assert proc.returncode == 0, proc.stderr
    Runtime(out)


def test_generation_flags_on_an_encoder_export_are_refused(shared_export):
    out = shared_export("bert")[0]
    proc = edgepeft("run", out, "hello", "--max-new-tokens", -5, "--temperature", 2)
    assert_user_error(proc, str(out), "--max-new-tokens", "--temperature")
    proc = edgepeft("run", shared_export("llama")[0], "hello", "--prompt-name", "query")  # embeddings' prompts
    assert_user_error(proc, "a causal-lm export does not embed; drop --prompt-name")


def test_inspect_takes_an_older_export_that_keeps_its_weights_in_the_graph(tmp_path, llama):
    """Exports before model.web.onnx kept a base under 1 GB whole in model.onnx: inspect called its weights file
    missing (exit 1), where Runtime serves it."""
    import onnx

    out = tmp_path / "older"
    shutil.copytree(llama[0], out)
    graph = out / "base" / "model.onnx"
    onnx.save_model(onnx.load(str(graph)), str(graph))  # the weights inside
    (out / "base" / "model.onnx.data").unlink()
    manifest = json.loads((out / "base" / "edgepeft.json").read_text())
    for key in ("web_graph", "neutral_graph", "file_bytes"):  # fields those exports did not write
        manifest.pop(key)
    (out / "base" / "edgepeft.json").write_text(json.dumps(manifest))
    proc = edgepeft("inspect", out)
    assert proc.returncode == 0, proc.stderr
    ids = np.array([[1, 5, 9, 3]], dtype=np.int64)
    assert np.array_equal(Runtime(out).forward(ids, adapter="qv")["logits"], Runtime(llama[0]).forward(ids, adapter="qv")["logits"])


def test_ctrl_c_while_onnx_runtime_starts_is_an_interrupt_not_a_missing_install(tmp_path):
    """A hunt: ONNX Runtime's binding turns a Ctrl-C during its start into ImportError("initialization failed"),
    which was "edgepeft's runtime needs ONNX Runtime: pip install 'edgepeft[cpu]'", exit 1."""
    import subprocess
    import sys

    script = ("import sys, importlib.abc\n"
              "class Start(importlib.abc.MetaPathFinder):\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name == 'onnxruntime':\n"
              "            try:\n"
              "                raise KeyboardInterrupt\n"
              "            except KeyboardInterrupt as e:\n"
              "                raise ImportError('initialization failed') from e\n"
              "sys.meta_path.insert(0, Start())\n"
              "from edgepeft.cli import main\n"
              f"main(['run', {str(tmp_path)!r}, 'hello'])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 130 and "pip install" not in done.stderr, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr


def test_text_the_output_cannot_encode_is_escaped_not_a_traceback(tmp_path, llama):
    """A hunt: a label, an adapter's name or generated text that stdout's encoding lacks (cp1252: Windows' Python
    writing to a file) ended in a UnicodeEncodeError traceback, exit 1."""
    import subprocess

    out = shutil.copytree(llama[0], tmp_path / "out")
    os.rename(out / "adapters" / "qv", out / "adapters" / "😀")
    done = subprocess.run([sys.executable, "-m", "edgepeft", "inspect", str(out)], capture_output=True,
                          env={**os.environ, "PYTHONIOENCODING": "cp1252"})
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
    assert "\n  \\U0001f600: lora " in done.stdout.decode("cp1252")


def test_a_prompt_read_from_standard_input_drops_a_byte_order_mark(text_export):
    """A hunt: `edgepeft run OUT -` kept a BOM that Windows' editors and PowerShell put first (3 tokens more: other
    text generated, without a word), where the training data reader drops it. PowerShell 5 saves UTF-16 with a BOM
    (refused as half characters), and a pipe was decoded in the locale's encoding (cp1252 on Windows): UTF-8 it is."""
    import subprocess

    def run(data: bytes, stdio="utf-8"):
        return subprocess.run([sys.executable, "-m", "edgepeft", "run", text_export[0], "-", "--adapter", "tok",
                               "--max-new-tokens", "4"], input=data, capture_output=True,
                              env={**os.environ, "PYTHONIOENCODING": stdio})

    text = "w10 w20 w30\n"
    runs = [run(text.encode()), run(codecs.BOM_UTF8 + text.encode()), run(codecs.BOM_UTF16_LE + text.encode("utf-16-le")),
            run(codecs.BOM_UTF16_BE + text.encode("utf-16-be")), run(text.encode(), stdio="cp037")]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    assert {r.stdout.decode("cp037" if r is runs[-1] else "utf-8") for r in runs} == {runs[0].stdout.decode()}
    odd = run(codecs.BOM_UTF16_LE + b"w\0x")  # an odd count of bytes: no UTF-16
    odd.stdout, odd.stderr = odd.stdout.decode(), odd.stderr.decode()
    assert_user_error(odd, "standard input: starts with UTF-16-LE's byte-order mark", "save the prompt as UTF-8")


def test_inspect_names_a_stray_adapter_folder_among_the_rest(tmp_path, llama):
    """A hunt: an empty folder in OUT/adapters (or one whose adapter.json cannot be read) was inspect's only line:
    no summary, and with --json no JSON at all for a script to read."""
    out = shutil.copytree(llama[0], tmp_path / "out")
    (out / "adapters" / "empty").mkdir()
    proc = edgepeft("inspect", out, "--json")
    assert_user_error(proc, str(out / "adapters" / "empty"), "not an exported adapter")
    data = json.loads(proc.stdout)
    assert [a["name"] for a in data["adapters"]] == sorted(llama[1]) and len(data["problems"]) == 1


def test_run_on_an_adapter_folder_whose_export_exists_gives_the_run_command(tmp_path, peft_adapter, capsys):
    """A hunt: after the export it advised, `run ADAPTER_DIR` advised the same export again, which is refused (the
    name is taken in OUT)."""
    from edgepeft.exporters import export
    from training_helpers import cli_error

    adapter = str(shutil.copytree(peft_adapter("llama", "topic", target_modules=["q_proj"]), tmp_path / "topic"))
    first = cli_error(capsys, "run", adapter, "w1 w2", "--max-new-tokens", "2")
    assert f"export it first with `edgepeft export --adapter {adapter} --out {adapter}-onnx`" in first
    export([adapter], adapter + "-onnx")
    again = cli_error(capsys, "run", adapter, "w1 w2", "--max-new-tokens", "2")
    assert again == (f"error: {adapter}: is an adapter folder (HF PEFT format), not an export; {adapter}-onnx holds its "
                     f"export: run `edgepeft run {adapter}-onnx --adapter topic PROMPT` (trained again since: "
                     f"`edgepeft export --adapter {adapter} --out {adapter}-onnx --name topic --overwrite`)"), again
    dotted = str(shutil.copytree(adapter, tmp_path / "topic.v2"))  # a review: a name export refuses (--name topic_v2)
    export([dotted], dotted + "-onnx", names=["topic_v2"])
    assert f"{dotted}-onnx holds its export: run `edgepeft run {dotted}-onnx --adapter topic_v2 PROMPT`" in cli_error(
        capsys, "run", dotted, "w1 w2")
    assert "topic" in Runtime(adapter + "-onnx").adapter_names  # what that command opens (this base: no tokenizer)


def test_a_folder_of_a_model_type_edgepeft_does_not_export_is_told_so_not_to_export_it(tiny_base, tmp_path):
    """An archs hunt: `run`, `inspect` and Runtime on a Qwen3 adapter folder (or a RoBERTa model folder) said "export
    it first", and that export was refused: "model type 'qwen3' is not supported"."""
    from click.testing import CliRunner

    from edgepeft.cli import cli
    from edgepeft.errors import UnsupportedModelError

    model = shutil.copytree(tiny_base("llama"), tmp_path / "qwen3")
    with open(model / "config.json") as f:
        config = json.load(f)
    with open(model / "config.json", "w") as f:
        json.dump({**config, "model_type": "qwen3"}, f)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model)}))
    said = f"{model}/config.json's model type 'qwen3' is one edgepeft does not export; it exports bert, gpt2, llama"
    for folder in (model, tmp_path / "adapter"):
        with pytest.raises(UnsupportedModelError, match=re.escape(f"{folder}: is not an export, and {said}")):
            Runtime(str(folder))
        result = CliRunner().invoke(cli, ["inspect", str(folder)])
        assert result.exit_code == 1 and said in str(result.exception)
    assert "export an adapter trained on it" in str(CliRunner().invoke(cli, ["inspect", tiny_base("llama")]).exception)


def test_run_on_a_folder_of_hf_peft_adapters_saved_under_their_names_gives_an_export_that_works(tmp_path, peft_adapter,
                                                                                              capsys):
    """A hfsaves hunt: save_pretrained(d, selected_adapters=["other"]) leaves d/other/ only; `run d` said "no exported
    base here; run edgepeft export --adapter DIR --out d first", an export into the HF PEFT folder. It names the
    adapters and an export beside it, which, run as printed, serves them."""
    import shlex

    from training_helpers import cli_error, cli_ok

    saved = tmp_path / "saved"
    shutil.copytree(peft_adapter("llama", "topic", target_modules=["q_proj"]), saved / "other")
    line = cli_error(capsys, "run", str(saved), "w1 w2", "--max-new-tokens", "2")
    assert line.startswith(f"error: {saved}: holds HF PEFT adapters saved under their names (other), not an export; "
                           f"export them first, e.g. `edgepeft export --adapter {saved}/other --out {saved}-onnx`, "
                           f"then run `edgepeft run {saved}-onnx --adapter other PROMPT`"), line
    cli_ok(capsys, *shlex.split(line.split("e.g. `")[1].split("`")[0])[1:])
    assert Runtime(f"{saved}-onnx").adapter_names == ["other"] and not os.path.exists(saved / "base")
    shutil.copytree(saved / "other", f"{saved}-onnx/src")  # an export holding its source is run as the export (a review)
    assert "base/tokenizer.json: missing" in cli_error(capsys, "run", f"{saved}-onnx", "w1 w2", "--adapter", "other")
    # (opened as the export, whose tiny base has no tokenizer; it was refused as a folder of HF PEFT adapters)
