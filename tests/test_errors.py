"""Bad input gets a clear error and loses nothing.

Every case asserts the specific ``EdgePeftError`` subclass, that the message names
the file (or the offending value) and what to do, and that nothing already there
is lost: a runtime keeps serving the same numbers, an export folder stays
byte-identical.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import sample_batch, tiny_config
from edgepeft.errors import (
    AdapterBaseMismatchError,
    AdapterInUseError,
    ArtifactNotFoundError,
    ConfigError,
    CorruptArtifactError,
    EdgePeftError,
    ExportValidationError,
    InvalidInputError,
    UnknownAdapterError,
    UnsupportedMethodError,
    UnsupportedModelError,
)
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime

CPU = ["CPUExecutionProvider"]
VOCAB = 128  # tiny_config's vocab_size
MAX_POS = 64  # tiny_config's max_position_embeddings


# --------------------------------------------------------------------------- helpers
def tree_hashes(root) -> dict:
    """{relative path: sha256} of every file under root, hidden ones included."""
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        for d in dirnames:  # empty folders count too
            rel = os.path.relpath(os.path.join(dirpath, d), root)
            out.setdefault(rel + "/", "dir")
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def hidden_entries(root) -> list:
    """Names under root that start with '.' (staging, old, tmp leftovers)."""
    found = []
    for dirpath, dirnames, files in os.walk(root):
        found += [os.path.join(dirpath, n) for n in dirnames + files if n.startswith(".")]
    return found


def served(rt) -> dict:
    """The numbers a runtime serves: base and every loaded adapter, on a fixed batch."""
    ids, mask = sample_batch(VOCAB)
    return {name: rt.forward(ids, mask, adapter=name)["logits"] for name in [None, *rt.adapter_names]}


def assert_still_serving(rt, before: dict) -> None:
    after = served(rt)
    assert set(after) == set(before), f"adapters changed: {sorted(map(str, before))} -> {sorted(map(str, after))}"
    for name, want in before.items():
        np.testing.assert_allclose(after[name], want, rtol=0, atol=1e-6, err_msg=f"adapter {name!r} changed")


def copy_adapter(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def edit_json(path, **changes):
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def llama(shared_export):
    return shared_export("llama")  # (OUT, {name: HF adapter dir}, report)


@pytest.fixture(scope="module")
def other_llama_base(tmp_path_factory):
    """A second tiny llama: same config and shapes as tiny_base('llama'), other weights."""
    import transformers as tf

    torch.manual_seed(4321)
    model = tf.AutoModelForCausalLM.from_config(tiny_config("llama"))
    path = str(tmp_path_factory.mktemp("other-llama") / "base-llama-other")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def other_export(tmp_path_factory, llama, other_llama_base):
    """The llama 'qv' adapter exported against the other llama base."""
    out = str(tmp_path_factory.mktemp("other-out") / "out")
    export([llama[1]["qv"]], out, base=other_llama_base)
    return out


@pytest.fixture(scope="module")
def small_out(tmp_path_factory, llama):
    """A fresh export of the llama base with only the 'qv' adapter (q/v slots only)."""
    out = str(tmp_path_factory.mktemp("small-out") / "out")
    export([llama[1]["qv"]], out)
    return out


@pytest.fixture
def rt(llama):
    return Runtime(llama[0], providers=CPU)


@pytest.fixture
def before(rt):
    numbers = served(rt)
    assert rt.adapter_names == ["all", "mlp", "qv"]
    # The comparison means something only if adapters change the output.
    for name in rt.adapter_names:
        assert np.abs(numbers[name] - numbers[None]).max() > 1e-3, name
    return numbers


@pytest.fixture
def victim(tmp_path, llama):
    """A private copy of the shared llama export, for export attempts that must fail."""
    out = str(tmp_path / "victim")
    shutil.copytree(llama[0], out)
    return out


# --------------------------------------------------------------------------- load_adapter
def test_adapter_for_other_base_is_refused_naming_both(rt, before, other_export, other_llama_base, tiny_base):
    path = os.path.join(other_export, "adapters", "qv")
    with pytest.raises(AdapterBaseMismatchError) as e:
        rt.load_adapter(path, name="other")
    msg = str(e.value)
    assert path in msg
    assert other_llama_base in msg  # the base the adapter was made for
    assert tiny_base("llama") in msg  # the base it was offered to
    assert rt.base_dir in msg
    assert "edgepeft export" in msg
    assert "other" not in rt.adapter_names
    assert_still_serving(rt, before)


def test_adapter_for_other_slot_table_is_refused(small_out, llama):
    """Same weights, different slot table: the fingerprint differs, so the load is refused."""
    small = Runtime(small_out, providers=CPU)
    ids, mask = sample_batch(VOCAB)
    want = small.forward(ids, mask, adapter="qv")["logits"]
    path = os.path.join(llama[0], "adapters", "mlp")
    with pytest.raises(AdapterBaseMismatchError) as e:
        small.load_adapter(path)
    assert path in str(e.value) and small.base_dir in str(e.value)
    assert small.adapter_names == ["qv"]
    np.testing.assert_allclose(small.forward(ids, mask, adapter="qv")["logits"], want, rtol=0, atol=1e-6)


def test_truncated_adapter_graph_fails_checksum(rt, before, llama, tmp_path):
    path = copy_adapter(os.path.join(llama[0], "adapters", "all"), tmp_path / "all")
    graph = os.path.join(path, "adapter.onnx")
    size = os.path.getsize(graph)
    with open(graph, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CorruptArtifactError) as e:
        rt.load_adapter(path, name="qv")  # same name as a loaded adapter: it must survive
    msg = str(e.value)
    assert graph in msg and "checksum" in msg and "re-export" in msg
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


def test_missing_adapter_graph(rt, before, llama, tmp_path):
    path = copy_adapter(os.path.join(llama[0], "adapters", "qv"), tmp_path / "qv")
    os.remove(os.path.join(path, "adapter.onnx"))
    with pytest.raises(ArtifactNotFoundError) as e:
        rt.load_adapter(path, name="nograph")
    assert os.path.join(path, "adapter.onnx") in str(e.value)
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
    assert os.path.join(str(path), "adapter.json") in str(e.value)
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


def test_runtime_on_missing_folder(tmp_path):
    path = str(tmp_path / "nowhere")
    with pytest.raises(ArtifactNotFoundError) as e:
        Runtime(path, providers=CPU)
    assert path in str(e.value)


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
    with rt._using("qv"):
        with pytest.raises(AdapterInUseError) as e:
            rt.unload_adapter("qv")
        assert "'qv'" in str(e.value) and "in use" in str(e.value)
        # Other adapters are not held and the held one still serves.
        ids, mask = sample_batch(VOCAB)
        np.testing.assert_allclose(rt.forward(ids, mask, adapter="qv")["logits"], before["qv"], rtol=0, atol=1e-6)
    assert_still_serving(rt, before)
    rt.unload_adapter("qv")  # allowed once the call is done
    assert "qv" not in rt.adapter_names


def test_in_use_count_is_released_after_a_failed_call(rt, before):
    """A forward that raises inside the held section must not leave the adapter pinned."""
    with pytest.raises(RuntimeError):
        with rt._using("qv"):
            raise RuntimeError("call failed")
    rt.unload_adapter("qv")
    assert "qv" not in rt.adapter_names


# --------------------------------------------------------------------------- inputs
def _ids(seq=6, batch=2):
    return np.random.default_rng(0).integers(3, VOCAB, size=(batch, seq)).astype(np.int64)


BAD_INPUTS = {
    "id-equal-vocab": (lambda: np.full((1, 4), VOCAB, np.int64), None, str(VOCAB)),
    "id-above-vocab": (lambda: np.array([[5, 6, VOCAB + 1000]]), None, str(VOCAB + 1000)),
    "negative-id": (lambda: np.array([[5, -1, 7]]), None, "-1"),
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


# --------------------------------------------------------------------------- export: bad adapters
@pytest.fixture(scope="module")
def guarded(tmp_path_factory, llama):
    """A copy of the shared llama export that failing exports are pointed at; checked unchanged."""
    out = str(tmp_path_factory.mktemp("guarded") / "out")
    shutil.copytree(llama[0], out)
    return out


def failing_export(exc, adapters, out, **kw):
    """Run an export that must raise ``exc``; OUT must stay byte-identical."""
    before = tree_hashes(out) if os.path.exists(out) else None
    with pytest.raises(exc) as e:
        export(adapters, out, **kw)
    after = tree_hashes(out) if os.path.exists(out) else None
    assert after == before, "a failed export changed OUT"
    return str(e.value)


def test_export_adapter_dir_without_config(guarded, tmp_path):
    path = tmp_path / "not-an-adapter"
    path.mkdir()
    msg = failing_export(ArtifactNotFoundError, [str(path)], guarded)
    assert os.path.join(str(path), "adapter_config.json") in msg and "save_pretrained" in msg


def test_export_missing_adapter_dir(guarded, tmp_path):
    path = str(tmp_path / "no-such-dir")
    msg = failing_export(ArtifactNotFoundError, [path], guarded)
    assert path in msg


def test_export_garbage_adapter_config(guarded, llama, tmp_path):
    path = copy_adapter(llama[1]["qv"], tmp_path / "qv")
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        f.write("{oops")
    msg = failing_export(CorruptArtifactError, [path], guarded)
    assert os.path.join(path, "adapter_config.json") in msg


def test_export_unknown_peft_type(guarded, llama, tmp_path):
    path = copy_adapter(llama[1]["qv"], tmp_path / "foo")
    config = os.path.join(path, "adapter_config.json")
    edit_json(config, peft_type="FOO")
    msg = failing_export(UnsupportedMethodError, [path], guarded)
    assert config in msg and "'FOO'" in msg
    assert "LORA" in msg  # lists what is supported


@pytest.mark.parametrize(
    "option",
    [dict(use_dora=True), dict(lora_bias=True), dict(bias="all"), dict(layers_to_transform=[0])],
    ids=["use_dora", "lora_bias", "bias", "layers_to_transform"],
)
def test_export_unsupported_lora_option(guarded, llama, tmp_path, option):
    path = copy_adapter(llama[1]["qv"], tmp_path / "opt")
    edit_json(os.path.join(path, "adapter_config.json"), **option)
    msg = failing_export(UnsupportedMethodError, [path], guarded)
    assert next(iter(option)) in msg
    assert path in msg  # names the adapter folder to fix


def test_export_unsupported_task_type(guarded, llama, tmp_path):
    path = copy_adapter(llama[1]["qv"], tmp_path / "s2s")
    edit_json(os.path.join(path, "adapter_config.json"), task_type="SEQ_2_SEQ_LM")
    msg = failing_export(UnsupportedMethodError, [path], guarded)
    assert "SEQ_2_SEQ_LM" in msg and "CAUSAL_LM" in msg
    assert path in msg  # names the adapter folder to fix


@pytest.mark.parametrize(
    "names, needle",
    [(["a", "b"], "--name"), (["bad name!"], "bad name!"), ([".hidden"], ".hidden")],
    ids=["more-names-than-adapters", "bad-characters", "hidden-name"],
)
def test_export_bad_names(guarded, llama, names, needle):
    msg = failing_export(ConfigError, [llama[1]["qv"]], guarded, names=names)
    assert needle in msg


def test_export_two_adapters_same_name(guarded, llama, tmp_path):
    other = copy_adapter(llama[1]["mlp"], tmp_path / "qv")  # folder name 'qv' too
    msg = failing_export(ConfigError, [llama[1]["qv"], other], guarded)
    assert "'qv'" in msg and "--name" in msg


def test_export_adapters_for_different_tasks(guarded, llama, tmp_path):
    cls = copy_adapter(llama[1]["mlp"], tmp_path / "cls")
    edit_json(os.path.join(cls, "adapter_config.json"), task_type="SEQ_CLS")
    msg = failing_export(ConfigError, [llama[1]["qv"], cls], guarded)
    assert "causal-lm" in msg and "seq-cls" in msg and "--out" in msg


def test_export_no_adapters(guarded):
    msg = failing_export(ConfigError, [], guarded)
    assert "--adapter" in msg


def test_export_merge_into_slot_out(guarded, llama):
    msg = failing_export(ConfigError, [llama[1]["qv"]], guarded, merge=True)
    assert os.path.join(guarded, "base") in msg and "--out" in msg


@pytest.fixture(scope="module")
def mistral_base(tmp_path_factory):
    import transformers as tf

    config = tf.MistralConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("mistral") / "base-mistral")
    tf.MistralForCausalLM(config).save_pretrained(path)
    return path


def test_export_unsupported_architecture(guarded, llama, mistral_base, tmp_path):
    path = copy_adapter(llama[1]["qv"], tmp_path / "mistral-qv")
    edit_json(os.path.join(path, "adapter_config.json"), base_model_name_or_path=mistral_base)
    out = str(tmp_path / "fresh-out")
    msg = failing_export(UnsupportedModelError, [path], out)
    assert not os.path.exists(out) or not os.listdir(out)
    assert "'mistral'" in msg and mistral_base in msg
    for supported in ("llama", "qwen2", "gpt2", "bert"):
        assert supported in msg
    # --base pointing at it is refused the same way, and OUT with another base is untouched.
    msg = failing_export(UnsupportedModelError, [llama[1]["qv"]], guarded, base=mistral_base)
    assert "'mistral'" in msg


def test_export_missing_base(guarded, llama, tmp_path):
    path = copy_adapter(llama[1]["qv"], tmp_path / "lost-base")
    gone = str(tmp_path / "deleted-base-model")
    edit_json(os.path.join(path, "adapter_config.json"), base_model_name_or_path=gone)
    msg = failing_export(ArtifactNotFoundError, [path], guarded)
    assert gone in msg and "--base" in msg


def test_export_config_without_base(guarded, llama, tmp_path):
    path = copy_adapter(llama[1]["qv"], tmp_path / "nobase")
    edit_json(os.path.join(path, "adapter_config.json"), base_model_name_or_path=None)
    msg = failing_export(ConfigError, [path], guarded)
    assert path in msg and "--base" in msg


def test_export_truncated_adapter_weights(guarded, llama, tmp_path):
    path = copy_adapter(llama[1]["qv"], tmp_path / "qv")
    weights = os.path.join(path, "adapter_model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    msg = failing_export(CorruptArtifactError, [path], guarded)
    assert weights in msg


def test_export_into_out_of_other_base_same_arch(guarded, llama, other_llama_base, tiny_base):
    """Same architecture and shapes, other weights: refused, OUT unchanged, both bases named."""
    msg = failing_export(AdapterBaseMismatchError, [llama[1]["qv"]], guarded, base=other_llama_base,
                         names=["intruder"])
    assert os.path.join(guarded, "base") in msg
    assert other_llama_base in msg and tiny_base("llama") in msg
    assert not hidden_entries(guarded)


def test_export_into_out_of_other_arch(guarded, peft_adapter, tiny_base):
    msg = failing_export(AdapterBaseMismatchError, [peft_adapter("gpt2", "attn")], guarded)
    assert os.path.join(guarded, "base") in msg
    assert tiny_base("gpt2") in msg and tiny_base("llama") in msg
    assert not hidden_entries(guarded)


def test_guarded_out_still_serves(guarded, llama):
    """After every failed export above, the guarded copy loads and matches the original export."""
    a, b = Runtime(guarded, providers=CPU), Runtime(llama[0], providers=CPU)
    assert a.adapter_names == b.adapter_names == ["all", "mlp", "qv"]
    ids, mask = sample_batch(VOCAB)
    for name in [None, *a.adapter_names]:
        np.testing.assert_allclose(a.forward(ids, mask, adapter=name)["logits"],
                                   b.forward(ids, mask, adapter=name)["logits"], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- export: atomicity
@pytest.fixture
def small_copy(tmp_path, small_out):
    out = str(tmp_path / "small")
    shutil.copytree(small_out, out)
    return out


@pytest.fixture
def failing_checks(monkeypatch):
    """Make every validation check fail, as a real PyTorch/ONNX mismatch would."""
    module = importlib.import_module("edgepeft.exporters.export")
    real = module._check
    monkeypatch.setattr(module, "_check", lambda label, ours, ref, mask, task, atol, where:
                        real(label, ours + 1.0, ref, mask, task, atol, where))


@pytest.mark.parametrize(
    "adapter, grows_base",
    [("qv", False), ("mlp", True)],
    ids=["replace-adapter-reusing-base", "new-slots-restage-base"],
)
def test_failed_validation_leaves_out_byte_identical(small_copy, llama, adapter, grows_base, failing_checks):
    before = tree_hashes(small_copy)
    with pytest.raises(ExportValidationError) as e:
        export([llama[1][adapter]], small_copy)
    msg = str(e.value)
    assert "nothing was written" in msg and "--atol" in msg
    assert os.path.join(small_copy, "base") in msg  # the base check is the first to fail
    assert tree_hashes(small_copy) == before
    assert not hidden_entries(small_copy), hidden_entries(small_copy)
    rt = Runtime(small_copy, providers=CPU)
    assert rt.adapter_names == ["qv"]


@pytest.mark.parametrize("adapter", ["qv", "mlp"], ids=["replace-existing", "new-with-new-slots"])
def test_failed_adapter_validation_leaves_out_byte_identical(small_copy, llama, monkeypatch, adapter):
    """The base passes, the adapter graph is staged and loaded, then the adapter check fails."""
    module = importlib.import_module("edgepeft.exporters.export")
    real = module._check
    labels = []

    def check(label, ours, ref, mask, task, atol, where):
        labels.append(label)
        return real(label, ours, ref, mask, task, -1.0 if label.startswith("adapter") else atol, where)

    monkeypatch.setattr(module, "_check", check)
    before = tree_hashes(small_copy)
    with pytest.raises(ExportValidationError) as e:
        export([llama[1][adapter]], small_copy)
    # llama is a decoder: each forward check is followed by a cached-decode check
    assert labels == ["base (no adapter)", "base (no adapter), cached decode", f"adapter {adapter}"]
    assert llama[1][adapter] in str(e.value)  # names the adapter folder
    assert tree_hashes(small_copy) == before
    assert not hidden_entries(small_copy), hidden_entries(small_copy)


def test_zero_atol_is_exact_comparison(small_copy, llama):
    """atol=0 demands bit-exact ONNX vs PyTorch, which float reordering does not give: it must fail cleanly."""
    before = tree_hashes(small_copy)
    try:
        export([llama[1]["qv"]], small_copy, atol=0.0)
    except ExportValidationError:
        assert tree_hashes(small_copy) == before
        assert not hidden_entries(small_copy)
    else:  # bit-exact after all: then the export must have gone through completely
        assert Runtime(small_copy, providers=CPU).adapter_names == ["qv"]


def test_negative_atol_is_refused(small_copy, llama):
    before = tree_hashes(small_copy)
    with pytest.raises(ConfigError, match="--atol"):
        export([llama[1]["qv"]], small_copy, atol=-1.0)
    assert tree_hashes(small_copy) == before


def test_failed_export_into_fresh_out_leaves_no_partial_export(tmp_path, llama, failing_checks):
    out = str(tmp_path / "fresh")
    with pytest.raises(ExportValidationError):
        export([llama[1]["qv"]], out)
    # Whatever is left must not look like an export: no base, no adapters, no staging.
    assert not os.path.exists(os.path.join(out, "base"))
    assert not os.path.exists(os.path.join(out, "adapters", "qv"))
    if os.path.exists(out):
        assert not hidden_entries(out), hidden_entries(out)
    with pytest.raises(ArtifactNotFoundError):
        Runtime(out, providers=CPU)


def test_every_error_is_an_edgepeft_error():
    for cls in (AdapterBaseMismatchError, AdapterInUseError, ArtifactNotFoundError, ConfigError, CorruptArtifactError,
                ExportValidationError, InvalidInputError, UnknownAdapterError, UnsupportedMethodError,
                UnsupportedModelError):
        assert issubclass(cls, EdgePeftError) and cls is not EdgePeftError
