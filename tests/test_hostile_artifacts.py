"""Exports that arrive damaged, hand-edited or hostile (a download, another person's copy): refused with a clear
error, never a silent wrong result, a crash deep in a call, or a file read from outside the export."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from file_checks import edit_json, edited_json
from edgepeft.errors import ArtifactNotFoundError, ConfigError, CorruptArtifactError
from edgepeft.runtimes import Runtime
from edgepeft.runtimes.manifest import REEXPORT_BASE

IDS = np.array([[5, 6, 7, 8, 9]], dtype=np.int64)
LORA_A = "lora_A.model.layers.0.self_attn.q_proj+k_proj+v_proj"
LORA_B = "lora_B.model.layers.0.self_attn.q_proj+k_proj+v_proj"


@pytest.fixture
def out(virtual_export, tmp_path):
    """A copy of the tiny Llama export with prompt, prefix, LoRA and IA3 adapters, to edit."""
    return shutil.copytree(virtual_export("llama")[0], tmp_path / "out")


def graph_outputs(adapter_dir) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(os.path.join(adapter_dir, "adapter.onnx"), providers=["CPUExecutionProvider"])
    return {o.name: v for o, v in zip(sess.get_outputs(), sess.run(None, {}))}


def write_adapter_graph(adapter_dir, arrays: dict, external: str | None = None) -> None:
    """Rewrite adapter.onnx to output ``arrays`` (``external``: LORA_A's values kept in that external file instead),
    with adapter.json's slots and checksum to match, as a careful forger would."""
    nodes, outputs, inits = [], [], []
    for i, (name, arr) in enumerate(arrays.items()):
        tensor = numpy_helper.from_array(np.asarray(arr), f"w{i}")
        if name == LORA_A and external:
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", external), ("offset", "0"), ("length", str(arr.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        inits.append(tensor)
        nodes.append(helper.make_node("Identity", [f"w{i}"], [name]))
        outputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape)))
    model = helper.make_model(helper.make_graph(nodes, "adapter", [], outputs, initializer=inits),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    _save_graph(adapter_dir, model, slots={k: list(np.asarray(v).shape) for k, v in arrays.items()})


def _save_graph(adapter_dir, model, **fields) -> None:
    """Write ``model`` as the adapter's graph, adapter.json's sha256 (and ``fields``) made to match."""
    path = os.path.join(adapter_dir, "adapter.onnx")
    onnx.save(model, path)
    with open(path, "rb") as f:
        edit_json(os.path.join(adapter_dir, "adapter.json"), sha256=hashlib.sha256(f.read()).hexdigest(), **fields)


def zipped(adapter_dir, **changes) -> bytes:
    """The bytes of a zip of an adapter folder; ``changes`` edit its adapter.json."""
    with open(os.path.join(adapter_dir, "adapter.json")) as f:
        manifest = {**json.load(f), **changes}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("adapter.json", json.dumps(manifest))
        archive.write(os.path.join(adapter_dir, "adapter.onnx"), "adapter.onnx")
    return buffer.getvalue()


def test_an_adapter_folder_named_none_is_refused_not_run_as_the_base(out):
    """`edgepeft run OUT --adapter None` ran the base model when OUT/adapters/None held an adapter."""
    os.rename(os.path.join(out, "adapters", "lora"), os.path.join(out, "adapters", "None"))
    with pytest.raises(ConfigError) as e:
        Runtime(out)
    assert str(e.value) == (f"{os.path.join(out, 'adapters', 'None')}: the adapter name 'None' (the folder's) means "
                            "the base model at the command line (--adapter none); rename the folder, or load it with "
                            "name=")
    rt = Runtime(out, load_adapters=False)
    for name in ("none", "NONE", " "):  # a zip is named by its adapter.json
        with pytest.raises(ConfigError, match=re.escape(f"adapter bytes: the adapter name {name!r} (the adapter.json's)")):
            rt.load_adapter(zipped(os.path.join(out, "adapters", "None"), name=name))
    assert rt.load_adapter(os.path.join(out, "adapters", "None"), name="renamed") == "renamed"


@pytest.mark.parametrize("folder", ["None", "lora ", "team\\lora", "lo\x01ra"])
def test_a_folder_name_one_runtime_refuses_is_refused_by_both_and_by_inspect(out, folder):
    """A paths hunt: Python served OUT/adapters/"lora " and "team\\lora", which the JS runtime refuses (and the JS
    runtime loaded a hidden ".lora", which Python leaves out); inspect passed an OUT whose None folder every Runtime
    refuses (cli.md: it exits 1 where a Runtime refuses OUT)."""
    from edgepeft.runtimes.describe import describe_export

    renamed = os.path.join(out, "adapters", folder)
    os.rename(os.path.join(out, "adapters", "lora"), renamed)
    with pytest.raises(ConfigError, match=re.escape(f"{renamed}: the adapter name {folder!r} (the folder's) ")) as e:
        Runtime(out)
    assert str(e.value).endswith("; rename the folder, or load it with name=")
    assert [p for p in describe_export(out)["problems"] if p.startswith(renamed)] == [str(e.value)[:-len(", or load it with name=")]]
    os.rename(renamed, os.path.join(out, "adapters", ".lora"))
    rt = Runtime(out)
    assert "lora" not in rt.adapter_names and ".lora" not in rt.adapter_names and not describe_export(out)["problems"]
    with pytest.raises(ConfigError, match=r"\(the folder's\) must be a folder's name that is not hidden \(no '\.' first\)"):
        rt.load_adapter(os.path.join(out, "adapters", ".lora"))
    assert rt.load_adapter(os.path.join(out, "adapters", ".lora"), name="team/lora ") == "team/lora "  # any name=


@pytest.mark.parametrize("edit, message", [
    ("B left out", f"fills {LORA_A} but not {LORA_B}, which shares its axis"),
    ("selector filled", "fills the selector slot 'lora_rows.batch', which the runtime binds per call"),
    ("two IA3 adapters stacked", "stacks 2 adapters along ia3_n.stack; an adapter gives 1"),
    ("one prefix layer", "fills prefix_key.model.layers.0.self_attn but not prefix_key.model.layers.1.self_attn"),
])
def test_an_adapter_graph_that_fills_its_slots_in_part_is_refused_at_load(out, edit, message):
    """An adapter graph edited (checksum and adapter.json to match) to fill half a LoRA pair crashed in ONNX Runtime
    on the first call; one filling a row selector with zeros silently ran the base model."""
    name = {"two IA3 adapters stacked": "ia3", "one prefix layer": "prefix"}.get(edit, "lora")
    adapter = os.path.join(out, "adapters", name)
    arrays = graph_outputs(adapter)
    if edit == "B left out":
        del arrays[LORA_B]
    elif edit == "selector filled":
        arrays["lora_rows.batch"] = np.zeros((1, 1, 4), np.float32)
    elif edit == "two IA3 adapters stacked":
        arrays = {k: np.concatenate([v, v]) for k, v in arrays.items()}
    else:
        arrays = {k: v for k, v in arrays.items() if "layers.1." not in k or "value" in k}
    write_adapter_graph(adapter, arrays)
    rt = Runtime(out, load_adapters=False)
    with pytest.raises(CorruptArtifactError) as e:
        rt.load_adapter(adapter)
    assert str(e.value) == f"{adapter}: adapter {message}; re-export the adapter" or message in str(e.value)
    assert rt.adapter_names == []


@pytest.mark.parametrize("slot, field, value, message", [
    (LORA_A, "virtual_axis", "1", "malformed slot"),
    (LORA_A, "virtual_axis", 7, "virtual_axis must be an axis of its shape (0 to 1)"),
    (LORA_A, "stack_axis", 5, "stack_axis must be an axis of its shape (0 to 1)"),
    (LORA_A, "selector", "nope", "selector must name a selector slot (one with selects) or be output"),
    (LORA_A, "selector", "", "stack_axis and selector come together"),
    (LORA_A, "phase", "decode", "phase must be one of every, prefill"),
    (LORA_A, "phase", "prefill", "a slot bound at prefill adds virtual tokens and counts them (virtual_axis)"),
    (LORA_A, None, {"phase": "prefill", "virtual_axis": 1}, f"slot '{LORA_B}': phase every differs from {LORA_A}'s"),
    (LORA_A, "target", "nope", "target must name a cache input"),
    (LORA_A, "neutral", "twos", "neutral must be one of empty, base, ones, zeros"),
    ("ia3_in.model.layers.0.mlp.down_proj", "virtual_axis", 0, "virtual tokens (virtual_axis, target) are bound at "
                                                               "prefill only"),
    ("prefix_key.model.layers.0.self_attn", "virtual_axis", None, "a slot bound at prefill adds virtual tokens and counts them"),
    ("prompt_embeddings.model.embed_tokens", "virtual_axis", None, "a slot bound at prefill adds virtual tokens"),
    (LORA_A, "name", LORA_B, "its name is listed twice"),
    (LORA_A, "members", "abc", "members must be module names"),
    (LORA_A, "name", LORA_A + "x", f"slot '{LORA_A}x' is not an input of"),
    (LORA_A, "shape", ["lora_r.x", -1], "its shape's sizes must be 0 or more"),  # a hunt: numpy's ValueError, and
    ("prompt_embeddings.model.embed_tokens", "shape", [10 ** 12, 32], "virtual_axis must be a named axis"),  # MemoryError
])
def test_a_hand_edited_slot_table_is_refused_when_opened(out, slot, field, value, message):
    """Fields of the base's slot table out of range or out of step were a TypeError, IndexError or KeyError deep in
    a call, or an ONNX Runtime crash."""
    path = os.path.join(out, "base", "edgepeft.json")
    with edited_json(path) as manifest:
        entry = next(s for s in manifest["slots"] if s["name"] == slot)
        entry.pop(field) if value is None else entry.update({field: value} if field else value)
    with pytest.raises(CorruptArtifactError) as e:
        Runtime(out)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
    assert str(e.value).endswith("re-run `edgepeft export` into a fresh --out folder")


@pytest.mark.parametrize("field, value, message", [
    ("cache", {"past_key": "past.key"}, "field 'cache' lacks the cache layout (names with one %d)"),  # a TypeError
    ("cache", {"present_value": "present.%d.%s"}, "field 'cache' lacks the cache layout (names with one %d)"),
    ("graph", "..", "field 'graph' must be a file name in the same folder"),
    ("format_version", -5, "format version -5 is not a version (a whole number from 1)"),  # it was taken
    ("format_version", "3", "format version '3' is not a version"),  # it was 'newer than this edgepeft reads'
    ("format_version", 99, "format version 99 is newer than this edgepeft reads (4)"),
    # what the runtime sizes by: numpy's "negative dimensions", ONNX Runtime's "Missing Input", a hang filling memory
    ("cache", {"head_dim": -1}, "field 'cache': head_dim must be at least 1, got -1"),
    ("cache", {"num_layers": 1}, "field 'cache': num_layers is 1, field 'inputs' lists 4 past tensors (2 a layer)"),
    ("cache", {"num_layers": 10**12}, "field 'cache': num_layers is 1000000000000, field 'inputs' lists 4 past"),
    ("eos_token_id", 5, "field 'eos_token_id' must be a list of token ids, got 5"),  # a TypeError in each text call
    ("eos_token_id", [10**30], "field 'eos_token_id' must list token ids (64-bit integers), got [10000"),
    ("vocab_size", 0, "field 'vocab_size' must be at least 1, got 0"),  # "token id 30 is outside the vocabulary"
    ("max_positions", -1, "field 'max_positions' must be at least 1 (or null), got -1"),
    ("max_positions", None, "field 'max_positions' must be the length of a contrib decoder's position tables"),
    ("ops", "fast", "field 'ops' must be contrib or standard, got 'fast'"),  # export advised "--ops fast"
    ("fused_groups", 5, "field 'fused_groups' must be a list, got 5"),  # export's tracebacks
    ("inert_slots", 5, "field 'inert_slots' must be a list, got 5"),
    ("quantization", 1.5, "field 'quantization' must be a string, got 1.5"),
    ("file_bytes", {"/etc/shadow": 1}, "field 'file_bytes' must name files in the same folder"),  # inspect's sizes
    ("text_files", ["../../x", 3], "field 'text_files' must name files in the same folder"),
    ("eos_token_id", [128], None),  # outside the vocabulary: never met, as a config's 50256 on a smaller vocabulary
    ("generation", {"do_sample": "x"}, "field 'generation.do_sample' must be True or False, got 'x'"),  # "--do-sample"
    ("generation", {"do_sample": True, "temperature": 0}, "field 'generation.temperature' must be > 0 when sampling"),
    ("generation", {"stop": "###", "eos_token_id": 5}, None),  # one string, one id: as generate takes them
    ("generation", {"stop": ""}, "field 'generation.stop' strings must not be empty"),  # opened, every generate refused
    ("generation", {"eos_token_id": "x"}, "field 'generation.eos_token_id' must be token ids"),  # a TypeError
    ("generation", {"eos_token_id": None}, "field 'generation.eos_token_id' must be token ids"),  # as each call
])
def test_a_hand_edited_base_manifest_is_refused_when_opened_or_inspected(out, field, value, message):
    """A cache name without its %d was a TypeError from `edgepeft inspect` and Runtime(OUT)."""
    from edgepeft.runtimes.describe import describe_export

    path = os.path.join(out, "base", "edgepeft.json")
    with edited_json(path) as manifest:
        manifest[field] = {**manifest[field], **value} if isinstance(value, dict) else value
    for opening in (Runtime, describe_export):
        if message is None:
            opening(out)
            continue
        with pytest.raises(CorruptArtifactError) as e:
            opening(out)
        assert str(e.value).startswith(f"{path}: {message}")


def test_a_base_manifest_listing_another_output_first_is_refused(out):
    """The runtime returns the first output: in another order generate was a ValueError ("too many values to unpack"),
    and the JavaScript forward returned a cache tensor as the logits."""
    path = os.path.join(out, "base", "edgepeft.json")
    with edited_json(path) as manifest:
        manifest["outputs"] = dict(reversed(manifest["outputs"].items()))
    with pytest.raises(CorruptArtifactError, match=re.escape(f"{path}: field 'outputs' must list 'logits' first, a "
                                                             "causal-lm graph's")):
        Runtime(out)


@pytest.mark.parametrize("field, value, message", [
    ("cache", {"num_kv_heads": 1}, "field 'cache': num_kv_heads is 1, the graph's is 2"),
    ("cache", {"head_dim": 8}, "field 'cache': head_dim is 8, the graph's is 16"),
    ("vocab_size", 100, "field 'vocab_size' is 100, the graph's logits have 128"),
    ("inputs", {"segment_ids": {"axes": {}, "dtype": "int64"}}, "field 'inputs' lists 'segment_ids', which the graph "
                                                                "lacks"),
])
def test_a_base_manifest_that_disagrees_with_its_graph_is_refused_when_opened(out, field, value, message):
    """Values inside their ranges that the graph does not have: ONNX Runtime's errors at the first call."""
    path = os.path.join(out, "base", "edgepeft.json")
    with edited_json(path) as manifest:
        manifest[field] = {**manifest[field], **value} if isinstance(value, dict) else value
    with pytest.raises(CorruptArtifactError) as e:
        Runtime(out)
    assert str(e.value) == f"{path}: {message}; {REEXPORT_BASE}"


@pytest.mark.parametrize("source", ["folder", "zip"])
def test_an_adapter_graph_cannot_read_a_file_beside_it_or_in_the_apps_directory(out, tmp_path, monkeypatch, source):
    """A zip's adapter.onnx naming external data read it from the app's working directory (ONNX Runtime resolves it
    there for bytes); exports write no external data for adapters, so none is read, from anywhere."""
    adapter = os.path.join(out, "adapters", "lora")
    arrays = graph_outputs(adapter)
    write_adapter_graph(adapter, arrays, external="secret.bin")
    for folder in (tmp_path, adapter):  # the app's directory, and the adapter's own folder
        np.full(arrays[LORA_A].shape, 7.0, np.float32).tofile(os.path.join(folder, "secret.bin"))
    monkeypatch.chdir(tmp_path)
    rt = Runtime(out, load_adapters=False)
    with pytest.raises(CorruptArtifactError, match=r"it reads tensors from another file \(external data\), where "
                       "adapter graphs hold them inside"):
        rt.load_adapter(adapter if source == "folder" else zipped(adapter))
    assert rt.adapter_names == []


def test_weighting_follows_the_adapters_tensors_not_its_adapter_json(out):
    """An IA3 adapter whose adapter.json says lora was weighted: the weight was ignored in silence."""
    edit_json(os.path.join(out, "adapters", "ia3", "adapter.json"), methods=["lora"])
    rt = Runtime(out)
    with pytest.raises(ConfigError, match="adapter 'ia3' .ia3. cannot be weighted or combined"):
        rt.forward(IDS, adapter={"ia3": 0.5})


def test_an_export_name_too_long_for_a_folder_is_refused_before_anything_is_written(virtual_export, tmp_path):
    """A 235-character --name passed the name check, exported the base, then failed on the staging folder's name."""
    from edgepeft.exporters import export

    target = tmp_path / "new-out"
    with pytest.raises(ConfigError) as e:
        export([virtual_export("llama")[1]["lora"]], str(target), names=["a" * 235])
    assert "is longer than 100 characters; choose another --name" in str(e.value)
    assert not target.exists()


def test_a_zip_bomb_is_refused_by_its_declared_sizes_before_it_unpacks(out):
    """A 1 MB zip whose adapter.onnx unpacks to 1.2 GB was unpacked whole (2.4 GB of memory, a MemoryError at 3 GB)
    before the checksum refused it."""
    rt = Runtime(out, load_adapters=False)
    size = rt.store.most_bytes + 1
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("adapter.json", json.dumps({"format": "edgepeft-adapter"}))
        with archive.open("adapter.onnx", "w", force_zip64=True) as f:
            for _ in range(size // (64 << 20) + 1):
                f.write(bytes(64 << 20))
    assert len(buffer.getvalue()) < size / 500
    with pytest.raises(CorruptArtifactError, match=r"^adapter bytes: adapter.onnx unpacks to more than an adapter of "
                       r"this base can take \(\d+ bytes\); zip an adapter folder from OUT/adapters/$"):
        rt.load_adapter(buffer.getvalue())
    rt.load_adapter(zipped(os.path.join(out, "adapters", "lora")))  # an adapter's own zip is well inside the bound


def test_a_zip_or_a_file_given_as_a_path_is_named_as_such(out, tmp_path):
    """A zip's path (python-api.md loads a zip from its bytes), or a file of an adapter's folder, was told "no such
    adapter folder", though it exists."""
    rt, folder = Runtime(out, load_adapters=False), os.path.join(out, "adapters", "lora")
    path = str(tmp_path / "lora.zip")
    with open(path, "wb") as f:
        f.write(zipped(folder))
    with pytest.raises(ArtifactNotFoundError, match=re.escape(f"{path}: is a file, not an adapter folder; a zip of one "
                                                              "loads from its bytes: rt.load_adapter(open(path, 'rb').read())")):
        rt.load_adapter(path)
    with pytest.raises(ArtifactNotFoundError, match="adapter.onnx: is a file, not an adapter folder; pass a folder from "):
        rt.load_adapter(os.path.join(folder, "adapter.onnx"))
    assert rt.load_adapter(open(path, "rb").read()) == "lora"


def test_a_zip_member_compressed_otherwise_than_make_archive_does_is_refused(out):
    """bzip2 and LZMA unpack a whole chunk at a time: 785 bytes declaring 1,000 unpacked 1 GB before the checksum
    failed, and a damaged stream was a raw OSError."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_BZIP2) as archive:
        archive.writestr("adapter.json", "{}")
        archive.writestr("adapter.onnx", b"")
    with pytest.raises(CorruptArtifactError, match=r"^adapter bytes: adapter.json is compressed otherwise than a zip of "
                       r"an adapter folder is \(stored or deflated\); zip it with shutil.make_archive$"):
        Runtime(out, load_adapters=False).load_adapter(buffer.getvalue())


def test_a_zip_that_declares_less_than_it_holds_is_not_unpacked_past_it(out):
    """A 200 KB zip declaring 1,000 bytes for 200 MB: zipfile's read unpacked it all (2 GB at most a member) before
    its checksum failed."""
    import tracemalloc

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("adapter.json", json.dumps({"format": "edgepeft-adapter"}))
        archive.writestr("adapter.onnx", bytes(200 << 20))
        archive.filelist[-1].file_size = 1000  # what the central directory says
    rt = Runtime(out, load_adapters=False)
    tracemalloc.start()
    with pytest.raises(CorruptArtifactError, match="^adapter bytes: not a readable zip archive"):
        rt.load_adapter(buffer.getvalue())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 << 20, peak


@pytest.mark.parametrize("text", ['{"rank": 1' + "0" * 5000 + "}", "[" * 100_000 + "]" * 100_000],
                         ids=["5000-digit-number", "nested-100000-deep"])
def test_json_python_cannot_read_is_named_as_damaged(out, text):
    """Python's JSON reader raises ValueError past 4,300 digits and RecursionError deep down: raw tracebacks from
    load_adapter (folder or zip), Runtime(OUT) and inspect."""
    from edgepeft.runtimes.describe import describe_export

    adapter = os.path.join(out, "adapters", "lora")
    rt = Runtime(out, load_adapters=False)
    with pytest.raises(CorruptArtifactError, match=r"^adapter bytes: adapter.json is not valid JSON"):
        rt.load_adapter(_zip_with(adapter, text))
    with open(os.path.join(adapter, "adapter.json"), "w") as f:
        f.write(text)
    with pytest.raises(CorruptArtifactError, match=r"adapter.json: adapter manifest is not valid JSON"):
        rt.load_adapter(adapter)
    with open(os.path.join(out, "base", "edgepeft.json"), "w") as f:
        f.write(text)
    for call in (Runtime, describe_export):
        with pytest.raises(CorruptArtifactError, match=r"edgepeft.json: base manifest is not valid JSON"):
            call(out)


def _zip_with(adapter_dir, manifest_text: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("adapter.json", manifest_text)
        archive.write(os.path.join(adapter_dir, "adapter.onnx"), "adapter.onnx")
    return buffer.getvalue()


def test_an_adapter_graph_giving_a_sequence_is_refused(out):
    """A sequence output named as a slot was an AttributeError ('list' object has no attribute 'dtype')."""
    adapter = os.path.join(out, "adapters", "lora")
    arrays = graph_outputs(adapter)
    write_adapter_graph(adapter, arrays)
    model = onnx.load(os.path.join(adapter, "adapter.onnx"))
    a = next(o for o in model.graph.output if o.name == LORA_A)
    node = next(n for n in model.graph.node if n.output[0] == LORA_A)
    node.output[0] = "tensor"
    model.graph.node.append(helper.make_node("SequenceConstruct", ["tensor"], [LORA_A]))
    a.type.CopyFrom(helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, None)))
    _save_graph(adapter, model)
    rt = Runtime(out, load_adapters=False)
    with pytest.raises(CorruptArtifactError, match=r"adapter.onnx: it holds a SequenceConstruct node \(exports write "
                       r"Identity, Concat, Pad only\); re-export the adapter$"):
        rt.load_adapter(adapter)


def _forged(adapter_dir, arrays: dict, nodes: list, inits: list, outputs: list) -> None:
    """adapter.onnx giving ``arrays`` (Identity each) plus ``nodes``/``inits``/``outputs``, its checksum to match."""
    ident = [helper.make_node("Identity", [f"w{i}"], [name]) for i, name in enumerate(arrays)]
    tensors = [numpy_helper.from_array(np.asarray(a), f"w{i}") for i, a in enumerate(arrays.values())]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape)) for n, a in arrays.items()]
    model = helper.make_model(helper.make_graph(ident + nodes, "adapter", [], outs + outputs, initializer=tensors + inits),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    _save_graph(adapter_dir, model)


def _int64(name, values):
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


@pytest.mark.parametrize("case", ["constant-of-shape", "loop", "concat-many", "wide-pad", "pad-widths-computed",
                                  "sparse-widths"])
def test_an_adapter_graph_holding_what_no_export_writes_is_refused_before_it_runs(out, case):
    """Loading ran any graph before checking its outputs: a 1 KB adapter.onnx took 3 GB (ConstantOfShape, a Pad), or
    never returned (a Loop of 10^12 steps). Exports write Identity, Concat and Pad nodes over tensors of their own,
    and what those make is worked out from the tensors' dims before anything runs."""
    adapter = os.path.join(out, "adapters", "lora")
    arrays = graph_outputs(adapter)
    big = helper.make_tensor_value_info("big", TensorProto.FLOAT, None)
    x = numpy_helper.from_array(np.ones((1, 1), np.float32), "x")
    too_much = r"its nodes would make \d+ bytes of tensors, more than an adapter of this base can take \(\d+\)"
    nodes, inits, said = {
        "constant-of-shape": ([helper.make_node("ConstantOfShape", ["shape"], ["big"])], [_int64("shape", [1 << 40])],
                              "it holds a ConstantOfShape node"),
        "loop": ([helper.make_node("Loop", ["n", ""], ["big"], body=helper.make_graph([], "b", [], []))],
                 [_int64("n", 10 ** 12)], "its attribute holds field 6, which exports never write"),  # its body
        "concat-many": ([helper.make_node("Concat", ["y"] * 1000, ["big"], axis=0)],  # 400 KB of file, 400 MB made
                        [numpy_helper.from_array(np.ones(100_000, np.float32), "y")], too_much),
        "wide-pad": ([helper.make_node("Pad", ["x", "pads"], ["big"])], [x, _int64("pads", [0, 0, 0, 1 << 30])], too_much),
        "pad-widths-computed": ([helper.make_node("Identity", ["w"], ["pads"]), helper.make_node("Pad", ["x", "pads"], ["big"])],
                                [x, _int64("w", [0, 0, 0, 2])],
                                r"a Pad's widths are not two per axis of a tensor of the graph's own \(None\)"),
        "sparse-widths": ([helper.make_node("Pad", ["x", "pads"], ["big"])], [x, _int64("pads", [0, 0, 0, 1])],
                          r"its graph holds field 15, which exports never write"),  # ORT took the sparse one of its name
    }[case]
    _forged(adapter, arrays, nodes, inits, [] if case == "loop" else [big])
    if case == "sparse-widths":
        model = onnx.load(os.path.join(adapter, "adapter.onnx"))
        model.graph.sparse_initializer.append(helper.make_sparse_tensor(
            _int64("pads", [1 << 30]), _int64("at", [3]), [4]))
        _save_graph(adapter, model)
    rt = Runtime(out, load_adapters=False)
    with pytest.raises(CorruptArtifactError, match=rf"adapter.onnx: .*{said}.*; re-export the adapter$"):
        rt.load_adapter(adapter)
    with pytest.raises(CorruptArtifactError, match=said):
        rt.load_adapter(zipped(adapter))
    assert rt.adapter_names == []
    rt.load_adapter(os.path.join(out, "adapters", "ia3"))  # an export's own graph passes


def test_an_adapter_graph_of_more_nodes_than_an_export_writes_for_its_base_is_refused(out, tmp_path):
    """ONNX Runtime's load time grows faster than a graph's nodes: 100,000 Identity nodes (a 5 MB adapter.onnx, no
    bytes of tensors to speak of) took minutes to load. An export writes an output per slot it fills (a LoRA B on
    fused q/k/v: 4 nodes and 6 tensors); a method of one's own may assemble a slot from up to 7 padded parts
    (adding-a-method.md): a graph may hold 16 nodes and 16 tensors a slot of its base."""
    from edgepeft.exporters.adapter_graph import write_adapter_graph
    from edgepeft.runtimes.adapter_graph import NODES_PER_SLOT, adapter_graph_problem
    from edgepeft.tuners.layout import Assembled

    assert NODES_PER_SLOT == 16
    parts = [np.ones((2, 3), np.float32)] * 7
    write_adapter_graph({"slot": Assembled(parts, axis=0, pads=[(i, 6 - i) for i in range(7)])}, str(tmp_path / "a.onnx"))
    with open(tmp_path / "a.onnx", "rb") as f:
        assert adapter_graph_problem(f.read(), 1 << 30, slots=1) is None  # 8 nodes, 14 tensors for one slot
    adapter = os.path.join(out, "adapters", "lora")
    rt = Runtime(out, load_adapters=False)
    slots, arrays = len(rt.store.slots), graph_outputs(adapter)
    x = numpy_helper.from_array(np.ones((1, 1), np.float32), "x0")
    for nodes, inits in (([helper.make_node("Identity", [f"x{i}"], [f"x{i + 1}"]) for i in range(16 * slots)], [x]),
                         ([], [numpy_helper.from_array(np.ones(0, np.float32), f"e{i}") for i in range(16 * slots)])):
        _forged(adapter, arrays, nodes, inits, [])
        said = rf"it holds \d+ outputs, \d+ nodes and \d+ tensors, where an export writes an output per slot of its " \
               rf"base \({slots} here\) and at most 16 nodes and tensors a slot; re-export the adapter$"
        with pytest.raises(CorruptArtifactError, match=said):
            rt.load_adapter(adapter)
        with pytest.raises(CorruptArtifactError, match=said):
            rt.load_adapter(zipped(adapter))
    assert rt.adapter_names == []
    rt.load_adapter(os.path.join(out, "adapters", "ia3"))  # an export's own graph passes


def test_onnx_runtimes_error_on_a_forged_graph_is_named_in_a_line_of_its_own_length(out):
    """An Identity of 100,000 inputs passes the reader (an Identity's shape is its first input's) and ONNX Runtime
    refuses it naming every input: the message was megabytes long."""
    adapter = os.path.join(out, "adapters", "lora")
    _forged(adapter, graph_outputs(adapter), [helper.make_node("Identity", ["x" * 20] * 100_000, ["big"])],
            [numpy_helper.from_array(np.ones((1, 1), np.float32), "x" * 20)], [])
    rt = Runtime(out, load_adapters=False)
    with pytest.raises(CorruptArtifactError, match="ONNX Runtime cannot run the adapter graph") as e:
        rt.load_adapter(adapter)
    assert len(str(e.value)) < len(adapter) + 500


def _pb(field: int, value) -> bytes:
    """One protobuf field: an int as a varint, bytes as length-delimited (a forger writes fields as it likes)."""
    def varint(n: int) -> bytes:
        out = b""
        while True:
            out, n = out + bytes([n & 0x7F | (0x80 if n > 0x7F else 0)]), n >> 7
            if not n:
                return out
    return varint(field << 3 | (0 if isinstance(value, int) else 2)) + (
        varint(value) if isinstance(value, int) else varint(len(value)) + value)


def test_an_adapter_graph_is_read_as_onnx_runtime_reads_it(out):
    """A field given twice counts once, the last time (protobuf's rule): a Concat whose axis was written 0 then 1 was
    read as 0, and doublings then a Pad the checks counted at 260 KB made 1 GB. String tensors were counted 4 bytes
    an element (a 1 MB string concatenated 600 times passed)."""
    from edgepeft.runtimes.adapter_graph import adapter_graph_problem

    def tensor(name, dims, kind, raw):
        return b"".join(_pb(1, d) for d in dims) + _pb(2, kind) + _pb(8, name.encode()) + _pb(9, raw)

    def node(op, inputs, output, *attributes):
        return b"".join(_pb(1, i.encode()) for i in inputs) + _pb(2, output.encode()) + _pb(4, op.encode()) + \
            b"".join(_pb(5, a) for a in attributes)

    axis_twice = _pb(1, b"axis") + _pb(3, 0) + _pb(3, 1) + _pb(20, 2)  # AttributeProto: name, i, i, type INT
    nodes = [node("Concat", [f"c{k - 1}" if k else "a"] * 2, f"c{k}", axis_twice) for k in range(14)]
    nodes.append(node("Pad", ["c13", "pads"], "out"))
    inits = [tensor("a", [1, 1], 1, np.ones(1, np.float32).tobytes()),
             tensor("pads", [4], 7, np.array([16383, 0, 0, 0], np.int64).tobytes())]
    graph = b"".join(_pb(1, n) for n in nodes) + b"".join(_pb(5, t) for t in inits)
    problem = adapter_graph_problem(_pb(1, 9) + _pb(7, graph), 70_000_000)
    assert problem == "its nodes would make 1073872924 bytes of tensors, more than an adapter of this base can take " \
                      "(70000000)"  # [16384, 16384] floats: the Pad's rows on a [1, 16384] tensor
    # i written as bytes, which protobuf skips (ONNX Runtime kept axis 1), and a key of 5 bytes whose bits past 32
    # protobuf drops (the readers saw an unknown field, ONNX Runtime a node)
    axis_as_bytes = _pb(1, b"axis") + _pb(3, 1) + _pb(3, b"\x00") + _pb(20, 2)
    nodes[0] = node("Concat", ["a", "a"], "c0", axis_as_bytes)
    graph = b"".join(_pb(1, n) for n in nodes) + b"".join(_pb(5, t) for t in inits)
    assert adapter_graph_problem(_pb(1, 9) + _pb(7, graph), 70_000_000) == (
        "it is not a graph an export writes (axis written as bytes)")
    hidden = b"\x8a\x80\x80\x80\x10" + _pb(1, node("ConstantOfShape", ["pads"], "big"))[1:]  # field 1, as ORT reads it
    graph = hidden + b"".join(_pb(5, t) for t in inits)
    assert adapter_graph_problem(_pb(1, 9) + _pb(7, graph), 70_000_000) == (
        "it is not a graph an export writes (a field key out of protobuf's range)")
    # what ONNX Runtime builds while it parses, before any check: 2-byte empty attribute tensors (400x the file), a
    # tensor listed as an output many times (JavaScript copies each); -1 is written as 2**64 - 1
    a = [tensor("a", [1, 1], 1, np.ones(1, np.float32).tobytes())]
    out = [_pb(12, _pb(1, b"c"))]
    for attribute, outputs, said in (
            (_pb(1, b"axis") + _pb(3, 0) + _pb(20, 2) + _pb(10, b"") * 1000, out,
             "it is not a graph an export writes (its attribute holds field 10, which exports never write)"),
            (_pb(1, b"axis") + _pb(3, 0) + _pb(20, 2), out * 200, "its outputs name a tensor twice, or one it does not define"),
            (_pb(1, b"axis") + _pb(3, (1 << 64) - 1) + _pb(20, 2), out, None)):
        graph = _pb(1, node("Concat", ["a", "a"], "c", attribute)) + _pb(5, a[0]) + b"".join(outputs)
        assert adapter_graph_problem(_pb(1, 9) + _pb(7, graph), 70_000_000) == said
    strings = tensor("s", [1], 8, b"") + _pb(6, b"x" * 1000)  # TensorProto.STRING, string_data
    graph = _pb(1, node("Concat", ["s"] * 600, "out", _pb(1, b"axis") + _pb(3, 0) + _pb(20, 2))) + _pb(5, strings)
    assert adapter_graph_problem(_pb(1, 9) + _pb(7, graph), 70_000_000) == (
        "it is not a graph an export writes (its tensor holds field 6, which exports never write)")  # string_data


def test_a_hostile_adapters_tensors_and_sizes_are_refused_at_load_within_bounds(out, tmp_path, tiny_base):
    """Found by a hunt: NaN tensors loaded (greedy generate then picked token 0 at every step; classify was numpy's
    ValueError), and so did a head of no classes; a zip's adapter.json of "[]," unpacked to the graph's bound (71 kB
    of zip took 1.7 GB); a folder's adapter.onnx was read whole (a sparse file of GBs, or a link to one)."""
    lora = os.path.join(out, "adapters", "lora")
    rt = Runtime(str(out), load_adapters=False)
    nan = shutil.copytree(lora, tmp_path / "nan")
    write_adapter_graph(nan, {**graph_outputs(lora), LORA_A: np.full_like(graph_outputs(lora)[LORA_A], np.nan)})
    with pytest.raises(CorruptArtifactError, match=f"^{nan}: slot {re.escape(LORA_A)} holds values that are not "
                                                   r"finite \(NaN or infinity\), which no export writes"):
        rt.load_adapter(str(nan), name="nan")
    with pytest.raises(CorruptArtifactError, match=r"^adapter bytes: adapter.json unpacks to more than an adapter of "
                                                   r"this base can take \(16777216 bytes\)"):
        rt.load_adapter(_zip_with(lora, "[" + "[]," * (6 << 20) + "[]]"))
    sparse = shutil.copytree(lora, tmp_path / "sparse")
    os.truncate(sparse / "adapter.onnx", rt.store.most_bytes + 1)  # sparse: no disk taken
    with pytest.raises(CorruptArtifactError, match=f"^{sparse / 'adapter.onnx'}: more than an adapter of this base can "
                                                   f"take \\({rt.store.most_bytes} bytes\\)"):
        rt.load_adapter(str(sparse), name="sparse")
    from peft_refs import lora_adapter

    from edgepeft.exporters import export

    cls_out = str(tmp_path / "cls")
    export([lora_adapter(tmp_path / "cls-lora", tiny_base("bert"), "seq-cls", 4, num_labels=3, r=2,
                         target_modules=["query"])], cls_out, names=["cls"])
    head = shutil.copytree(os.path.join(cls_out, "adapters", "cls"), tmp_path / "head")
    arrays = graph_outputs(head)
    arrays = {k: v[..., :0] if k.startswith("head_") else v for k, v in arrays.items()}
    write_adapter_graph(head, arrays)
    with pytest.raises(CorruptArtifactError, match=f"^{head}: slot head_.* is a head of no outputs"):
        Runtime(cls_out, load_adapters=False).load_adapter(str(head), name="headless")
