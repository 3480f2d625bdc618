"""Runtime errors: loading adapters, opening exports, adapter names and inputs (see error_contract.py)."""
from __future__ import annotations

import hashlib
import os
import re
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from tiny import sample_batch
from error_contract import CPU, MAX_POS, VOCAB, assert_still_serving
from error_contract import before, llama, other_export, other_llama_base, rt, small_out, victim  # noqa: F401  (fixtures)
from file_checks import copy_adapter, edit_json, edited_json
from edgepeft.errors import (
    AdapterBaseMismatchError,
    AdapterInUseError,
    ArtifactNotFoundError,
    ConfigError,
    CorruptArtifactError,
    InvalidInputError,
    UnknownAdapterError,
)
from edgepeft.runtimes import Runtime


# --------------------------------------------------------------------------- load_adapter
def test_adapter_for_other_base_is_refused_naming_both(rt, before, other_export, other_llama_base, tiny_base):
    path = os.path.join(other_export, "adapters", "qv")
    with pytest.raises(AdapterBaseMismatchError) as e:
        rt.load_adapter(path, name="other")
    msg = str(e.value)
    assert path in msg and other_llama_base in msg  # the base the adapter was made for
    assert tiny_base("llama") in msg  # the base it was offered to
    assert rt.base_dir in msg
    # OUT holds a 'qv' already: a new name, not --overwrite, which would replace it
    assert f"where {other_llama_base} is the model of {tiny_base('llama')}, export the adapter into this OUT with " \
           f"`edgepeft export --adapter DIR --out {rt.path} --name NAME`" in msg and "'qv'" in msg  # a hunt: else refused
    assert "other" not in rt.adapter_names
    assert_still_serving(rt, before)


def test_a_foreign_adapter_from_bytes_or_in_a_merge_export_gets_a_fix_that_works(rt, other_export, llama, tmp_path,
                                                                                     monkeypatch):
    """Bytes loaded from inside OUT/adapters were named as a folder ('remove adapter bytes, or ... --name adapter
    bytes --overwrite'); inspect told a --merge export's stray adapter to re-export into OUT, which it refuses."""
    from edgepeft.exporters import export
    from edgepeft.runtimes.describe import describe_export

    zipped = shutil.make_archive(str(tmp_path / "foreign"), "zip", os.path.join(other_export, "adapters", "qv"))
    monkeypatch.chdir(os.path.join(rt.path, "adapters"))
    with pytest.raises(AdapterBaseMismatchError) as e:
        rt.load_adapter(open(zipped, "rb").read(), name="other")
    assert "remove adapter bytes" not in str(e.value) and str(e.value).endswith(
        "--name NAME` (OUT holds an adapter named 'qv'; --overwrite would replace it); else load it on the export it "
        "was made for")  # another model's: export refuses it into OUT
    merged = str(tmp_path / "merged")
    export([llama[1]["qv"]], merged, merge=True)
    shutil.copytree(os.path.join(other_export, "adapters", "qv"), os.path.join(merged, "adapters", "qv"))
    problems = describe_export(merged)["problems"]
    assert len(problems) == 1 and problems[0].endswith(
        f"remove it from {os.path.join(merged, 'adapters')}, or export it into another --out"), problems


def test_adapter_for_other_slot_table_is_refused(small_out, llama):
    """Same weights, different slot table: the fingerprint differs, so the load is refused."""
    small = Runtime(small_out, providers=CPU)
    ids, mask = sample_batch(VOCAB)
    want = small.forward(ids, mask, adapter="qv")["logits"]
    path = os.path.join(llama[0], "adapters", "mlp")
    with pytest.raises(AdapterBaseMismatchError) as e:
        small.load_adapter(path)
    assert path in str(e.value) and small.base_dir in str(e.value) and str(e.value).endswith("base folder and every adapter")
    assert small.adapter_names == ["qv"]
    np.testing.assert_allclose(small.forward(ids, mask, adapter="qv")["logits"], want, rtol=0, atol=1e-6)


def test_a_path_that_is_not_utf8_is_named_with_the_fix(rt, before, llama, tmp_path):
    """Bytes of another encoding in a name (a Latin-1 zip unpacked): ONNX Runtime's TypeError read as a damaged base
    or adapter graph ('re-export'), and PyTorch's ONNX exporter gave a traceback. Renaming is the fix."""
    from edgepeft.exporters import export

    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9")
    rename = r"is not UTF-8 \(bytes of another encoding\), and ONNX Runtime, safetensors and tokenizers open UTF-8 paths only; rename it"
    with pytest.raises(ConfigError, match=rename):
        rt.load_adapter(copy_adapter(os.path.join(llama[0], "adapters", "all"), odd))
    assert_still_serving(rt, before)
    shutil.copytree(llama[0], odd + "-out")
    with pytest.raises(ConfigError, match=rename):
        Runtime(odd + "-out")
    with pytest.raises(ConfigError, match=rename):
        export([llama[1]["qv"]], odd + "-new")
    assert not os.path.exists(odd + "-new")
    with pytest.raises(ConfigError, match=r"a path cannot hold a NUL character"):  # the system's bare ValueError
        Runtime(llama[0] + "\0")


def test_an_out_given_as_link_then_dotdot_is_where_the_system_finds_it(llama, tmp_path):
    """LINK/../OUT, LINK a folder elsewhere: os.path.abspath drops 'LINK/..' by its text, where the system goes up from
    the link's target. export gave a traceback from onnx's save, and Runtime looked in another folder."""
    from edgepeft.exporters import export

    os.makedirs(tmp_path / "a" / "b" / "c")
    os.symlink(tmp_path / "a" / "b" / "c", tmp_path / "link")
    export([llama[1]["qv"]], str(tmp_path / "link" / ".." / "out"))
    assert os.path.isdir(tmp_path / "a" / "b" / "out" / "base") and not os.path.exists(tmp_path / "out")
    assert Runtime(str(tmp_path / "link" / ".." / "out")).adapter_names == ["qv"]


def test_truncated_adapter_graph_fails_checksum(rt, before, llama, tmp_path):
    path = copy_adapter(os.path.join(llama[0], "adapters", "all"), tmp_path / "all")
    graph = os.path.join(path, "adapter.onnx")
    size = os.path.getsize(graph)
    with open(graph, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CorruptArtifactError) as e:
        rt.load_adapter(path, name="qv")  # same name as a loaded adapter: it must survive
    msg = str(e.value)
    assert graph in msg and "checksum" in msg and "again from the export it came from" in msg
    assert_still_serving(rt, before)


def test_unreadable_adapter_graph_with_matching_checksum(rt, before, llama, tmp_path):
    """A graph ONNX Runtime cannot load, even though adapter.json's sha256 was updated to match."""
    path = copy_adapter(os.path.join(llama[0], "adapters", "all"), tmp_path / "all")
    graph = os.path.join(path, "adapter.onnx")
    with open(graph, "wb") as f:
        f.write(b"this is not an onnx model")
    edit_json(os.path.join(path, "adapter.json"), sha256=hashlib.sha256(b"this is not an onnx model").hexdigest())
    with pytest.raises(CorruptArtifactError) as e:
        rt.load_adapter(path, name="broken")
    assert graph in str(e.value) and "re-export" in str(e.value)
    assert "broken" not in rt.adapter_names
    assert_still_serving(rt, before)


def test_the_graph_that_runs_is_the_one_whose_checksum_was_checked(llama, tmp_path, monkeypatch):
    """A folder's graph is read once: a file replaced after its sha256 was checked (another adapter's graph, an
    export writing it) is not what runs, at load or at a restage (a budget of 0 restages at every call)."""
    from edgepeft.runtimes import adapters as store_module

    path = copy_adapter(os.path.join(llama[0], "adapters", "qv"), tmp_path / "qv")
    graph, saved = os.path.join(path, "adapter.onnx"), str(tmp_path / "qv.onnx")
    shutil.copyfile(graph, saved)
    real = store_module.run_adapter_graph

    def replaced_while_run(*args):
        shutil.copyfile(os.path.join(llama[0], "adapters", "all", "adapter.onnx"), graph)
        try:
            return real(*args)
        finally:
            shutil.copyfile(saved, graph)

    monkeypatch.setattr(store_module, "run_adapter_graph", replaced_while_run)
    small = Runtime(llama[0], providers=CPU, load_adapters=False, adapter_budget_bytes=0)
    small.load_adapter(path, name="copy")
    ids, mask = sample_batch(VOCAB)
    want = Runtime(llama[0], providers=CPU).forward(ids, mask, adapter="qv")["logits"]
    for _ in range(2):
        np.testing.assert_array_equal(small.forward(ids, mask, adapter="copy")["logits"], want)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b'{"format": "something-else"}', b""],
    ids=["bad-json", "binary", "not-object", "wrong-format", "empty"],
)
def test_garbage_adapter_manifest(rt, before, llama, tmp_path, content):
    path = copy_adapter(os.path.join(llama[0], "adapters", "qv"), tmp_path / "qv")
    manifest = os.path.join(path, "adapter.json")
    with open(manifest, "wb") as f:
        f.write(content)
    with pytest.raises(CorruptArtifactError) as e:
        rt.load_adapter(path, name="garbage")
    assert manifest in str(e.value) and "re-export" in str(e.value)
    assert_still_serving(rt, before)


@pytest.mark.parametrize("field", ["base_fingerprint", "sha256", "slots", "graph"])
def test_manifest_field_of_wrong_type(rt, before, llama, tmp_path, field):
    """A manifest whose required fields are present but null is corrupt, not a crash."""
    path = copy_adapter(os.path.join(llama[0], "adapters", "qv"), tmp_path / "qv")
    manifest = os.path.join(path, "adapter.json")
    edit_json(manifest, **{field: None})
    with pytest.raises(CorruptArtifactError) as e:
        rt.load_adapter(path, name="nulled")
    assert path in str(e.value)
    assert_still_serving(rt, before)


@pytest.mark.parametrize("missing, advice", [("adapter.onnx", "again from the export it came from"), ("adapter.json", "--name NAME --overwrite")])
def test_a_file_missing_from_an_adapter_folder_is_named(rt, before, llama, tmp_path, missing, advice):
    """Its graph, or its manifest beside the graph: named, with the re-export advice."""
    path = copy_adapter(os.path.join(llama[0], "adapters", "qv"), tmp_path / "qv")
    os.remove(os.path.join(path, missing))
    with pytest.raises(ArtifactNotFoundError) as e:
        rt.load_adapter(path, name="incomplete")
    assert os.path.join(path, missing) in str(e.value) and advice in str(e.value)
    assert_still_serving(rt, before)


def test_missing_adapter_dir(rt, before, tmp_path):
    path = str(tmp_path / "no-such-adapter")
    with pytest.raises(ArtifactNotFoundError) as e:
        rt.load_adapter(path)
    assert path in str(e.value) and "edgepeft export" in str(e.value)
    assert_still_serving(rt, before)


def test_folder_without_manifest(rt, before, tmp_path):
    path = tmp_path / "empty-adapter"
    path.mkdir()
    with pytest.raises(ArtifactNotFoundError) as e:
        rt.load_adapter(str(path))
    assert f"{path}: not an exported adapter (no adapter.json, no adapter.onnx); remove it if it is a stray" in str(e.value)
    assert_still_serving(rt, before)


def test_hf_peft_folder_gets_the_export_command(rt, before, llama):
    hf_dir = llama[1]["qv"]  # the HF PEFT folder the export was made from
    with pytest.raises(ArtifactNotFoundError) as e:
        rt.load_adapter(hf_dir, name="hf")
    assert f"{hf_dir}: is an adapter folder in HF PEFT format, not an exported one" in str(e.value)
    assert f"`edgepeft export --adapter {hf_dir} --out OUT`" in str(e.value)
    out = llama[0]  # found by a hunt: OUT, its base and its adapters folder were told "remove it if it is a stray folder"
    for folder, what in ((out, "an export"), (f"{out}/base", f"the base folder of the export {out}"),
                         (f"{out}/adapters", f"the adapters folder of the export {out}")):
        with pytest.raises(ArtifactNotFoundError, match=f"^{re.escape(folder)}: is {re.escape(what)}, not an adapter's "
                                                        f"folder; pass one of the folders in {re.escape(out)}/adapters$"):
            rt.load_adapter(folder)
    assert_still_serving(rt, before)


def test_stray_folder_in_out_adapters_is_named(victim):
    stray = os.path.join(victim, "adapters", "__MACOSX")  # what unzipping an export made on a Mac leaves
    os.mkdir(stray)
    with pytest.raises(ArtifactNotFoundError) as e:
        Runtime(victim, providers=CPU)
    assert f"{stray}: not an exported adapter" in str(e.value) and "stray folder" in str(e.value)


@pytest.mark.parametrize("name, problem", [
    (1, "must be a string"), ("", "must not be blank"), ("  ", "must not be blank"), (b"qv2", "must be a string"),
    (["qv2"], "must be a string"), ("None", "means the base model at the command line (--adapter none)"),
])
def test_adapter_name_is_text_but_not_none(rt, before, llama, name, problem):
    """Any text names a loaded adapter (a dictionary key: 'tenant.42' too), but 'None', which `edgepeft run` reads
    as the base model; export's --name is stricter (a folder, PyTorch module names)."""
    with pytest.raises(ConfigError) as e:
        rt.load_adapter(os.path.join(llama[0], "adapters", "qv"), name=name)
    assert (f"the adapter name {name!r:.80} {problem}; pass another name= (or None: its folder's name, a zip's: the "
            "name it was exported with)") == str(e.value)
    assert rt.adapter_names == ["all", "mlp", "qv"]  # sorted: a non-string name made this raise TypeError
    assert rt.load_adapter(os.path.join(llama[0], "adapters", "qv"), name="tenant.42") == "tenant.42"
    rt.unload_adapter("tenant.42")
    with pytest.raises(UnknownAdapterError):
        rt.forward(*sample_batch(VOCAB), adapter="qv2")
    assert_still_serving(rt, before)


def test_loading_same_name_twice(rt, before, llama):
    path = os.path.join(llama[0], "adapters", "qv")
    with pytest.raises(ConfigError) as e:
        rt.load_adapter(path)  # name defaults to the manifest's: 'qv', already loaded
    assert "'qv'" in str(e.value) and "unload" in str(e.value)
    with pytest.raises(ConfigError):
        rt.load_adapter(os.path.join(llama[0], "adapters", "all"), name="mlp")
    assert_still_serving(rt, before)


def test_load_under_new_name_then_unload(rt, before, llama):
    """The happy path the error cases are measured against: a copy under a new name serves the same numbers."""
    rt.load_adapter(os.path.join(llama[0], "adapters", "qv"), name="qv2")
    ids, mask = sample_batch(VOCAB)
    np.testing.assert_allclose(rt.forward(ids, mask, adapter="qv2")["logits"], before["qv"], rtol=0, atol=1e-6)
    rt.unload_adapter("qv2")
    assert_still_serving(rt, before)


# --------------------------------------------------------------------------- Runtime(path)
def test_runtime_on_folder_without_base(tmp_path):
    with pytest.raises(ArtifactNotFoundError) as e:
        Runtime(str(tmp_path), providers=CPU)
    assert os.path.join(str(tmp_path), "base") in str(e.value) and "edgepeft export" in str(e.value)


def test_runtime_on_an_exports_base_folder_names_the_export(llama):
    """OUT/base is not an export: the message names OUT (it suggested exporting into OUT/base, which nested a
    second export there)."""
    base = os.path.join(llama[0], "base")
    with pytest.raises(ArtifactNotFoundError) as e:
        Runtime(base, providers=CPU)
    assert f"{base}: is the base folder of the export {os.path.abspath(llama[0])}; open" in str(e.value)


def test_relative_export_path_survives_a_change_of_directory(llama, before, tmp_path, monkeypatch):
    """Opened by a relative path, then the app changes directory: adapters evicted by the budget restage from the
    folder it opened, and serve the same numbers."""
    out = llama[0]
    monkeypatch.chdir(os.path.dirname(out))
    moved = Runtime(os.path.basename(out), providers=CPU, adapter_budget_bytes=0)  # every call restages
    monkeypatch.chdir(tmp_path)
    assert moved.path == out and moved.adapter_dir("qv") == os.path.join(out, "adapters", "qv")
    assert_still_serving(moved, before)


@pytest.mark.parametrize("kwargs, wanted", [
    (dict(providers="CPUExecutionProvider"), "providers must be a list of ONNX Runtime provider names"),
    (dict(providers=[("CPUExecutionProvider", "opts")]), "providers must be a list of ONNX Runtime provider names"),
    (dict(sess_options={"intra_op_num_threads": 1}), "sess_options must be an onnxruntime.SessionOptions"),
])
def test_runtime_arguments_of_the_wrong_type(llama, kwargs, wanted):
    """Refused as the caller's mistake, not blamed on the export (re-exporting would not help)."""
    with pytest.raises(ConfigError) as e:
        Runtime(llama[0], **kwargs)
    assert str(e.value).startswith(wanted) and "re-run" not in str(e.value)
    with pytest.raises(ConfigError, match="Runtime takes an export's folder"):
        Runtime(None)
    assert Runtime(llama[0], providers=[]).session.get_providers() == ["CPUExecutionProvider"]  # none given: the CPU


def test_sess_options_ort_refuses_are_the_apps(llama, tmp_path):
    """Session options ONNX Runtime refuses are named as the app's, not as a damaged export (re-exporting would
    not help): the shared pool asked for before use_shared_thread_pool(), and any other setting that fails."""
    shared = ort.SessionOptions()
    shared.use_per_session_threads = False  # python-api.md's setting for apps that opted in to the shared pool
    with pytest.raises(ConfigError, match=r"^sess_options.use_per_session_threads = False takes the process's shared "
                                          r"thread pool, .*use_shared_thread_pool\(\): call that first"):
        Runtime(llama[0], sess_options=shared)
    unwritable = ort.SessionOptions()
    unwritable.optimized_model_filepath = str(tmp_path / "no" / "such" / "dir" / "opt.onnx")
    graph = os.path.join(llama[0], "base", "model.onnx")
    with pytest.raises(ConfigError) as e:
        Runtime(llama[0], sess_options=unwritable)
    assert str(e.value).startswith(f"{graph}: ONNX Runtime cannot load the base graph with the sess_options given (")
    assert str(e.value).endswith("it loads with edgepeft.runtimes.session_options(): start from those")


def test_cuda_asked_first_runs_where_onnx_runtime_started(llama, before):
    """ONNX Runtime falls back to the CPU when CUDA cannot start (no GPU, missing CUDA libraries): the adapters are
    staged where the session runs, so the runtime serves; with a GPU they live on it."""
    rt = Runtime(llama[0], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    running = rt.session.get_providers()[0]
    assert rt.device == (("cuda", 0) if running == "CUDAExecutionProvider" else ("cpu", 0))
    for name, want in before.items():
        np.testing.assert_allclose(rt.forward(*sample_batch(VOCAB), adapter=name)["logits"], want, rtol=0,
                                   atol=1e-6 if running == "CPUExecutionProvider" else 1e-3)


def test_runtime_on_missing_folder(tmp_path):
    path = str(tmp_path / "nowhere")
    with pytest.raises(ArtifactNotFoundError) as e:
        Runtime(path, providers=CPU)
    assert str(e.value).startswith(f"{path}: no such folder; give the folder `edgepeft export --out` wrote, or export "
                                   "there first: `edgepeft export --adapter DIR --out")  # "no exported base here"


def test_runtime_on_corrupt_base(victim):
    graph = os.path.join(victim, "base", "model.onnx")
    with open(graph, "r+b") as f:
        f.truncate(os.path.getsize(graph) // 3)
    with pytest.raises(CorruptArtifactError) as e:
        Runtime(victim, providers=CPU)
    assert graph in str(e.value) and "edgepeft export" in str(e.value)


def test_runtime_on_garbage_base_manifest(victim):
    manifest = os.path.join(victim, "base", "edgepeft.json")
    with open(manifest, "w") as f:
        f.write("{{{")
    with pytest.raises(CorruptArtifactError) as e:
        Runtime(victim, providers=CPU)
    assert manifest in str(e.value)


def test_runtime_with_a_corrupt_adapter_in_out_names_it(victim):
    graph = os.path.join(victim, "adapters", "mlp", "adapter.onnx")
    with open(graph, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(CorruptArtifactError) as e:
        Runtime(victim, providers=CPU)
    assert graph in str(e.value)
    # Without the automatic load the base still opens and the good adapters still load.
    rt = Runtime(victim, providers=CPU, load_adapters=False)
    assert rt.load_adapter(os.path.join(victim, "adapters", "qv")) == "qv"


@pytest.mark.parametrize("change", [
    {"outputs": {}}, {"vocab_size": "abc"}, {"inputs": 5}, {"cache": {"num_layers": 2}}, {"slots": [5]},
    {"max_positions": "many"},
], ids=["no-outputs", "vocab-string", "inputs-number", "cache-partial", "slot-number", "positions-string"])
def test_base_manifest_field_of_wrong_type_is_corrupt(victim, change):
    manifest = os.path.join(victim, "base", "edgepeft.json")
    edit_json(manifest, **change)
    with pytest.raises(CorruptArtifactError) as e:
        Runtime(victim, providers=CPU)
    assert manifest in str(e.value) and "re-run `edgepeft export`" in str(e.value)


@pytest.mark.parametrize("edit", [
    lambda m: m["slots"][0].update(name=["x"]), lambda m: m["slots"][0].update(dtype=3),
    lambda m: m["slots"][0].update(module=None), lambda m: m["slots"][0].update(shape=[[1]]),
    lambda m: m["outputs"].pop("logits"), lambda m: m.update(outputs={"scores": m["outputs"]["logits"]}),
    lambda m: m.update(cache=None),
], ids=["slot-name-list", "slot-dtype-number", "slot-module-none", "slot-shape-nested", "no-logits", "output-renamed",
        "no-cache"])
def test_a_hand_edited_base_manifest_is_corrupt_not_a_traceback(victim, edit):
    """A TypeError (unhashable, no such dtype), a ValueError from the cache layout or ONNX Runtime's own error before."""
    manifest = os.path.join(victim, "base", "edgepeft.json")
    with edited_json(manifest) as data:
        edit(data)
    with pytest.raises(CorruptArtifactError) as e:
        Runtime(victim, providers=CPU).forward(np.array([[5, 6, 7]]))
    assert manifest in str(e.value) and "re-run `edgepeft export`" in str(e.value)


@pytest.mark.parametrize("change", [{"methods": 5}, {"methods": [5]}, {"labels": [1, 2, 3]}, {"parameter_bytes": "x"}],
                         ids=["methods-number", "methods-numbers", "labels-numbers", "bytes-string"])
def test_adapter_manifest_field_of_wrong_type_is_corrupt(rt, before, llama, tmp_path, change):
    path = copy_adapter(os.path.join(llama[0], "adapters", "qv"), tmp_path / "qv")
    edit_json(os.path.join(path, "adapter.json"), **change)
    with pytest.raises(CorruptArtifactError) as e:
        rt.load_adapter(path, name="odd")
    assert path in str(e.value) and next(iter(change)) in str(e.value)
    assert_still_serving(rt, before)


# --------------------------------------------------------------------------- names in calls
def test_unknown_adapter_in_forward(rt, before):
    ids, mask = sample_batch(VOCAB)
    with pytest.raises(UnknownAdapterError) as e:
        rt.forward(ids, mask, adapter="nope")
    msg = str(e.value)
    assert "'nope'" in msg and "qv" in msg and "adapter=None" in msg
    assert_still_serving(rt, before)


def test_unknown_adapter_in_unload(rt, before):
    with pytest.raises(UnknownAdapterError) as e:
        rt.unload_adapter("nope")
    assert "'nope'" in str(e.value) and "qv" in str(e.value)
    assert_still_serving(rt, before)


def test_unload_then_forward_is_unknown(rt, before):
    rt.unload_adapter("mlp")
    ids, mask = sample_batch(VOCAB)
    with pytest.raises(UnknownAdapterError):
        rt.forward(ids, mask, adapter="mlp")
    with pytest.raises(UnknownAdapterError):
        rt.unload_adapter("mlp")
    del before["mlp"]
    assert_still_serving(rt, before)


def test_unload_while_in_use(rt, before):
    ids, mask = sample_batch(VOCAB)
    steps = rt.step_logits(ids, mask, adapter="qv")  # a generation in flight holds its adapter
    next(steps)
    with pytest.raises(AdapterInUseError) as e:
        rt.unload_adapter("qv")
    assert "'qv'" in str(e.value) and "in use" in str(e.value) and "until its close()" in str(e.value)  # a hunt
    # Other adapters are not held and the held one still serves.
    np.testing.assert_allclose(rt.forward(ids, mask, adapter="qv")["logits"], before["qv"], rtol=0, atol=1e-6)
    steps.close()
    assert_still_serving(rt, before)
    rt.unload_adapter("qv")  # allowed once the call is done
    assert "qv" not in rt.adapter_names


def test_in_use_count_is_released_after_a_failed_call(rt, before, monkeypatch):
    """A decode step that fails inside the held section must not leave the adapter pinned."""
    ids, mask = sample_batch(VOCAB)
    steps = rt.step_logits(ids, mask, adapter="qv")
    next(steps)

    def failing_run(binding, run_options=None):
        raise RuntimeError("the session failed mid-generation")

    monkeypatch.setattr(rt.session, "run_with_iobinding", failing_run)
    with pytest.raises(RuntimeError):
        steps.send(np.array([1, 2]))
    monkeypatch.undo()
    rt.unload_adapter("qv")
    assert "qv" not in rt.adapter_names


# --------------------------------------------------------------------------- inputs
def _ids(seq=6, batch=2):
    return np.random.default_rng(0).integers(3, VOCAB, size=(batch, seq)).astype(np.int64)


BAD_INPUTS = {
    "id-equal-vocab": (lambda: np.full((1, 4), VOCAB, np.int64), None, str(VOCAB)),
    "id-above-vocab": (lambda: np.array([[5, 6, VOCAB + 1000]]), None, str(VOCAB + 1000)),
    "negative-id": (lambda: np.array([[5, -1, 7]]), None, "-1"),
    "huge-unsigned-id": (lambda: np.array([[5, 6, 2**64 - 1]], np.uint64), None, str(2**64 - 1)),  # said -1
    "float-ids": (lambda: _ids().astype(np.float32), None, "integer"),
    "float-ids-list": (lambda: [[1.0, 2.0, 3.0]], None, "integer"),
    "bool-ids": (lambda: np.ones((1, 4), bool), None, "integer"),
    "string-ids": (lambda: "hello world", None, "input_ids"),
    "ragged-ids": (lambda: [[1, 2, 3], [4, 5]], None, "input_ids"),
    "empty": (lambda: np.zeros((1, 0), np.int64), None, "empty"),
    "empty-list": (lambda: [], None, "empty"),
    "empty-batch": (lambda: np.zeros((0, 4), np.int64), None, "empty"),
    "3d-ids": (lambda: _ids()[None], None, "shape"),
    "mask-too-short": (lambda: _ids(), lambda: np.ones((2, 5), np.int64), "attention_mask"),
    "mask-wrong-batch": (lambda: _ids(), lambda: np.ones((3, 6), np.int64), "attention_mask"),
    "mask-1d-for-batch": (lambda: _ids(), lambda: np.ones(6, np.int64), "attention_mask"),
    "mask-float": (lambda: _ids(), lambda: np.ones((2, 6), np.float32), "attention_mask"),
    "too-long": (lambda: _ids(seq=MAX_POS + 1, batch=1), None, str(MAX_POS)),
}


@pytest.mark.parametrize("adapter", [None, "qv"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_invalid_input(rt, before, case, adapter):
    make_ids, make_mask, needle = BAD_INPUTS[case]
    with pytest.raises(InvalidInputError) as e:
        rt.forward(make_ids(), None if make_mask is None else make_mask(), adapter=adapter)
    assert needle in str(e.value)
    assert_still_serving(rt, before)


def test_longest_allowed_sequence_runs(rt):
    """The boundary of the too-long case: exactly max positions is accepted."""
    out = rt.forward(_ids(seq=MAX_POS, batch=1))["logits"]
    assert out.shape == (1, MAX_POS, VOCAB) and np.isfinite(out).all()


def test_a_refused_step_token_keeps_the_session(rt):
    """step_logits: a token refused by send() (wrong shape, dtype or id) leaves the prefill and the cache usable:
    the corrected send gives what an uninterrupted session gives."""
    ids, mask = sample_batch(VOCAB)
    good = np.array([5, 9])
    clean = rt.step_logits(ids, mask, adapter="qv")
    want = [next(clean), clean.send(good), clean.send(good)]
    steps = rt.step_logits(ids, mask, adapter="qv")
    with pytest.raises(InvalidInputError, match=r"call next\(\) first"):  # was Python's TypeError: no send before next
        steps.send(good)
    np.testing.assert_array_equal(next(steps), want[0])
    for bad in (5, [5], good.astype(np.float32), good + VOCAB, None):
        with pytest.raises(InvalidInputError):
            steps.send(bad)
    np.testing.assert_array_equal(steps.send(good), want[1])
    with pytest.raises(InvalidInputError):
        next(steps)  # next() sends no token
    np.testing.assert_array_equal(steps.send(good), want[2])
    steps.close()
    clean.close()
    rt.unload_adapter("qv")  # closed sessions hold their adapter no more


def test_a_failed_open_holds_no_session_while_the_app_keeps_the_error(victim, monkeypatch):
    """A Runtime(OUT) refused for a damaged adapter kept its base session (weights, threads) alive through the
    error's traceback: an app retrying until a download finished held one more model per try."""
    import gc
    import sys
    import weakref

    from edgepeft.runtimes.adapters import AdapterStore

    runtime_module, sessions, staged = sys.modules["edgepeft.runtimes.runtime"], [], []
    real, stage = runtime_module.open_base_session, AdapterStore._set_staged
    monkeypatch.setattr(runtime_module, "open_base_session",
                        lambda *a: sessions.append(weakref.ref(s := real(*a))) or s)
    monkeypatch.setattr(AdapterStore, "_set_staged", lambda store, a, arrays, plan: staged.append(
                        [weakref.ref(t) for t in arrays.values()]) or stage(store, a, arrays, plan))
    names = sorted(os.listdir(os.path.join(victim, "adapters")))  # the last one damaged: the others load first
    with open(os.path.join(victim, "adapters", names[-1], "adapter.onnx"), "ab") as f:
        f.write(b"tampered")
    gc.disable()  # no cycle collector: only what the references free
    try:
        with pytest.raises(CorruptArtifactError) as kept:  # the app keeps (or logs) the error
            Runtime(victim, providers=CPU)
        assert kept.traceback and sessions and sessions[0]() is None
        assert len(staged) == len(names) - 1  # the adapters staged before the damaged one: all freed
        assert not [t for tensors in staged for t in tensors if t() is not None]
    finally:
        gc.enable()


def test_a_dropped_runtime_frees_its_staged_adapters(llama):
    """The adapter store and the mixed-batch cache referred to each other: dropping a Runtime kept every staged
    tensor until Python's cycle collector ran."""
    import gc
    import weakref

    gc.disable()
    try:
        rt = Runtime(llama[0], providers=CPU)
        ids, mask = sample_batch()
        rt.forward(ids, mask, adapter=[rt.adapter_names[0], None])  # a mixed batch: the mixer is used
        store = weakref.ref(rt.store)
        del rt
        assert store() is None
    finally:
        gc.enable()
