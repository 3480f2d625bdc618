"""Export errors: bad adapters, wrong bases, failed validation, atomic writes (see error_contract.py)."""
from __future__ import annotations

import importlib
import inspect
import os
import shutil

import numpy as np
import pytest
import torch

from peft_refs import spec_adapter
from tiny import load_reference_base, sample_batch
from error_contract import CPU, VOCAB
from error_contract import llama, other_llama_base, small_out  # noqa: F401  (fixtures)
from file_checks import copy_adapter, edit_json, hidden_entries, tree_hashes
from edgepeft.errors import (
    AdapterBaseMismatchError,
    AdapterInUseError,
    ArtifactNotFoundError,
    ConfigError,
    CorruptArtifactError,
    EdgePeftError,
    ExportValidationError,
    InvalidInputError,
    StorageError,
    UnknownAdapterError,
    UnsupportedMethodError,
    UnsupportedModelError,
)
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime


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
    [dict(use_dora=True), dict(lora_bias=True), dict(layers_to_transform=[0])],  # bias: test_peft_roundtrip (a Llama
    ids=["use_dora", "lora_bias", "layers_to_transform"],  # saves none, a plain LoRA that exports)
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
    [(["a", "b"], "--name"), (["bad name!"], "bad name!"), ([".hidden"], ".hidden"),
     (["intent-v1.2"], "'intent-v1.2' must be letters, digits, '_', '-'; choose another --name (e.g. --name intent-v1_2)"),
     (["_draft"], "'_draft' must start with a letter or digit; choose another --name (e.g. --name draft)"),
     (["-x"], "'-x' must start with a letter or digit; choose another --name (e.g. --name x)"),
     (["n" * 101], f"'{'n' * 77}...' is longer than 100 characters; choose another --name (e.g. --name {'n' * 100})"),
     ("v1.2", "'v1.2' must be letters, digits, '_', '-'; choose another --name (e.g. --name v1_2)")],
    ids=["more-names-than-adapters", "bad-characters", "hidden-name", "dot (a KeyError from torch)",
         "underscore first (was: 'must be letters, digits, _, -'; pass --name, which it was)", "dash first",
         "too long (its quote was cut off)", "one name as a string (was: 4 --name values, its letters)"],
)
def test_export_bad_names(guarded, llama, names, needle):
    msg = failing_export(ConfigError, [llama[1]["qv"]], guarded, names=names)
    assert needle in msg


def test_export_bad_folder_name_asks_for_a_name(guarded, llama, tmp_path):
    path = copy_adapter(llama[1]["qv"], tmp_path / "_draft")
    msg = failing_export(ConfigError, [path], guarded)
    assert msg.endswith("'_draft' must start with a letter or digit; pass --name (e.g. --name draft)")


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


def test_export_merge_of_two_adapters_is_refused_before_loading(guarded, llama, monkeypatch):
    """It said '--merge folds exactly one adapter into the base; got 2' (no file, no fix) after loading everything."""
    monkeypatch.setattr(importlib.import_module("edgepeft.exporters.export"), "resolve", lambda *a, **k: 1 / 0)
    msg = failing_export(ConfigError, iter([llama[1]["qv"], llama[1]["mlp"]]), guarded, merge=True)  # any iterable
    assert msg == (f"--merge folds one adapter into the base, got 2 ({llama[1]['qv']}, {llama[1]['mlp']}); export each "
                   "with --merge into its own --out folder, or all without --merge into one")


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


def test_export_into_out_of_other_base_same_arch(guarded, llama, other_llama_base, tiny_base, tmp_path):
    """Same architecture and shapes, other weights: refused, OUT unchanged, both bases named."""
    path = copy_adapter(llama[1]["qv"], tmp_path / "intruder")
    edit_json(os.path.join(path, "adapter_config.json"), base_model_name_or_path=other_llama_base)
    msg = failing_export(AdapterBaseMismatchError, [path], guarded)
    assert os.path.join(guarded, "base") in msg
    assert other_llama_base in msg and tiny_base("llama") in msg
    assert not hidden_entries(guarded)


def test_base_with_other_weights_than_the_adapters_recorded_base_is_refused(llama, other_llama_base, tiny_base, tmp_path):
    """--base whose weights differ from the base the adapter was trained on: one line naming both, nothing written."""
    out = str(tmp_path / "out")
    msg = failing_export(AdapterBaseMismatchError, [llama[1]["qv"]], out, base=other_llama_base)
    assert llama[1]["qv"] in msg and other_llama_base in msg and tiny_base("llama") in msg and "drop --base" in msg
    assert not os.path.exists(out)
    copy = str(tmp_path / "same-weights")  # another folder with the very same weights passes
    shutil.copytree(tiny_base("llama"), copy)
    export([llama[1]["qv"]], str(tmp_path / "ok"), base=copy)


@pytest.mark.parametrize("edit", ["none", "chat template", "generation_config"])
def test_a_base_copy_with_other_side_files_is_refused(text_export, tmp_path, edit):
    """Same weights and config.json, another chat template or generation_config.json: the adapters of one OUT share
    OUT/base's, so the new adapter would have run with OUT's (the base reused), or OUT's adapters with the new
    one's (the base rebuilt for new slots: gate_proj), silently. An unchanged copy elsewhere is the same base, and so
    is an OUT whose tokenizer_config.json was written otherwise (older edgepeft copied the folder's as it was)."""
    import peft

    out = str(tmp_path / "out")
    shutil.copytree(text_export[0], out)
    copy = str(tmp_path / "copy")
    shutil.copytree(text_export[2], copy)
    if edit == "chat template":
        edit_json(os.path.join(copy, "tokenizer_config.json"), chat_template="{{ messages[0]['content'] }}")
    elif edit == "generation_config":
        edit_json(os.path.join(copy, "generation_config.json"), max_new_tokens=7)
    else:
        shutil.copy(os.path.join(copy, "tokenizer_config.json"), os.path.join(out, "base"))
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["gate_proj" if edit == "generation_config" else "q_proj"])
    pm = peft.get_peft_model(load_reference_base(copy, "causal-lm"), config)
    pm.save_pretrained(str(tmp_path / "a"))
    if edit == "none":
        export([str(tmp_path / "a")], out, names=["new"])
        assert Runtime(out, providers=CPU).adapter_names == ["new", "tok"]
        return
    msg = failing_export(AdapterBaseMismatchError, [str(tmp_path / "a")], out, names=["new"])
    what = ("tokenizer (tokenizer.json, tokenizer_config.json, chat template)" if edit == "chat template" else
            "generation ({} here, {'max_new_tokens': 7} in its generation_config.json, or its config.json where it "
            "has none)")
    assert msg == (f"{os.path.join(out, 'base')}: differs from {copy}, these adapters' base (the same weights), in its "
                   f"{what}; the adapters of one --out folder share one base: export these into another --out folder")


def test_a_base_folder_changed_since_the_export_is_named_so(small_copy, llama, tiny_base, tmp_path):
    """The adapter's base is the folder OUT was exported from, edited since (a newer download): said so, rather than
    "was exported from X; these adapters need X"."""
    folder = str(tmp_path / "base")
    shutil.copytree(tiny_base("llama"), folder)
    out = str(tmp_path / "out")
    path = copy_adapter(llama[1]["qv"], tmp_path / "qv")
    edit_json(os.path.join(path, "adapter_config.json"), base_model_name_or_path=folder)
    export([path], out)
    edit_json(os.path.join(folder, "config.json"), rms_norm_eps=1e-5)
    msg = failing_export(AdapterBaseMismatchError, [path], out, names=["again"])
    assert msg == (f"{os.path.join(out, 'base')}: was exported from {folder} whose weights or config.json have "
                   "changed since; export them into another --out folder")


def test_export_into_out_of_other_arch(guarded, peft_adapter, tiny_base):
    msg = failing_export(AdapterBaseMismatchError, [spec_adapter(peft_adapter, "gpt2", "attn")], guarded)
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


def patch_checks(monkeypatch, change):
    """Wrap the exporter's comparison of outputs: ``change(arguments)`` edits them by name before it runs.

    A real PyTorch/ONNX mismatch cannot be made on demand for the base alone or for one adapter alone,
    so these tests make the comparison itself fail; nothing public lets a test do that.
    """
    module = importlib.import_module("edgepeft.exporters.validate")
    real = module.compare_outputs
    signature = inspect.signature(real)

    def compare(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        change(bound.arguments)
        return real(*bound.args, **bound.kwargs)

    monkeypatch.setattr(module, "compare_outputs", compare)


@pytest.fixture
def failing_checks(monkeypatch):
    """Make every validation check fail, as a real PyTorch/ONNX mismatch would."""
    patch_checks(monkeypatch, lambda arguments: arguments.update(ours=arguments["ours"] + 1.0))


@pytest.mark.parametrize(
    "adapter, grows_base",
    [("qv", False), ("mlp", True)],
    ids=["replace-adapter-reusing-base", "new-slots-restage-base"],
)
def test_failed_validation_leaves_out_byte_identical(small_copy, llama, adapter, grows_base, failing_checks):
    before = tree_hashes(small_copy)
    with pytest.raises(ExportValidationError) as e:
        export([llama[1][adapter]], small_copy, overwrite=True)
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
    labels = []

    def fail_adapters(arguments):
        labels.append(arguments["label"])
        if arguments["label"].startswith("adapter"):
            arguments["atol"] = -1.0

    patch_checks(monkeypatch, fail_adapters)
    before = tree_hashes(small_copy)
    with pytest.raises(ExportValidationError) as e:
        export([llama[1][adapter]], small_copy, overwrite=True)
    # llama is a decoder: each forward check is followed by a cached-decode check
    assert labels == ["base (no adapter)", "base (no adapter), cached decode", f"adapter {adapter}"]
    assert llama[1][adapter] in str(e.value)  # names the adapter folder
    assert tree_hashes(small_copy) == before
    assert not hidden_entries(small_copy), hidden_entries(small_copy)


def test_zero_atol_is_exact_comparison(small_copy, llama):
    """atol=0 demands bit-exact ONNX vs PyTorch, which float reordering does not give: it must fail cleanly."""
    before = tree_hashes(small_copy)
    try:
        export([llama[1]["qv"]], small_copy, atol=0.0, overwrite=True)
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


@pytest.mark.parametrize("where", ["new/deeper/fresh", "new/../fresh"])  # makedirs makes "new" for the second too
def test_failed_export_into_fresh_out_leaves_no_partial_export(tmp_path, llama, failing_checks, where):
    out = str(tmp_path / where)
    with pytest.raises(ExportValidationError):
        export([llama[1]["qv"]], out)
    assert os.listdir(tmp_path) == []  # nothing at all: not OUT's adapters/, nor the folders made above OUT
    with pytest.raises(ArtifactNotFoundError):
        Runtime(out, providers=CPU)


def test_every_error_is_an_edgepeft_error():
    for cls in (AdapterBaseMismatchError, AdapterInUseError, ArtifactNotFoundError, ConfigError, CorruptArtifactError,
                ExportValidationError, InvalidInputError, StorageError, UnknownAdapterError, UnsupportedMethodError,
                UnsupportedModelError):
        assert issubclass(cls, EdgePeftError) and cls is not EdgePeftError


# --------------------------------------------------------------------------- export: OUT's own contents and adapter configs
@pytest.mark.parametrize("damage, error", [("stray-folder", ArtifactNotFoundError), ("corrupt-manifest", CorruptArtifactError)])
def test_an_unreadable_adapter_in_out_stops_the_export_before_the_base_changes(small_copy, llama, damage, error):
    """A new adapter that needs new slots replaces OUT/base and re-points the adapters there: a sibling that
    cannot be read must stop the export first, not leave a new base with old adapters pointing elsewhere."""
    if damage == "stray-folder":
        os.makedirs(os.path.join(small_copy, "adapters", "notes"))
        named = os.path.join(small_copy, "adapters", "notes") + ": not an exported adapter"  # a stray: remove it
    else:
        named = os.path.join(small_copy, "adapters", "qv", "adapter.json")
        with open(named, "w") as f:
            f.write("{bad")
    before = tree_hashes(small_copy)
    with pytest.raises(error) as e:
        export([llama[1]["mlp"]], small_copy)  # mlp needs slots the small base lacks
    assert named in str(e.value)
    assert tree_hashes(small_copy) == before
    assert not hidden_entries(small_copy), hidden_entries(small_copy)


@pytest.mark.parametrize("inside", ["base", "adapters", "adapters/qv/sub"])
def test_an_out_inside_an_export_is_refused(small_copy, llama, inside):
    """--out OUT/base (or OUT/adapters, or deeper) would nest a second export inside OUT: refused, naming OUT, and
    the fix works."""
    before = tree_hashes(small_copy)
    msg = failing_export(ConfigError, [llama[1]["mlp"]], os.path.join(small_copy, inside))
    assert f"lies inside the export {os.path.abspath(small_copy)}; give --out {os.path.abspath(small_copy)}" in msg
    assert tree_hashes(small_copy) == before
    export([llama[1]["mlp"]], os.path.abspath(small_copy))
    assert Runtime(small_copy, providers=CPU).adapter_names == ["mlp", "qv"]


def test_an_adapter_folder_in_out_that_cannot_be_written_stops_the_export_before_the_base_changes(
        small_copy, llama, monkeypatch):
    """A new base re-points every adapter already in OUT: one whose folder is read-only must stop the export
    before the base is replaced (it left a new base that the old adapters did not fit)."""
    locked = os.path.join(small_copy, "adapters", "qv")
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and not (
        mode & os.W_OK and os.path.abspath(path) == os.path.abspath(locked)))  # root ignores chmod: a stand-in
    before = tree_hashes(small_copy)
    with pytest.raises(ConfigError) as e:
        export([llama[1]["mlp"]], small_copy)  # mlp needs slots the small base lacks
    assert locked in str(e.value) and "permission denied" in str(e.value)
    assert tree_hashes(small_copy) == before
    export([llama[1]["qv"]], small_copy, names=["qv2"])  # the base is kept: nothing re-points the locked adapter
    assert Runtime(small_copy, providers=CPU).adapter_names == ["qv", "qv2"]


@pytest.mark.parametrize("where", ["out", "out/adapters", "out/base"])
def test_a_file_where_out_needs_a_folder_is_refused_before_any_work(tmp_path, llama, where, monkeypatch):
    module = importlib.import_module("edgepeft.exporters.resolve")
    monkeypatch.setattr(module, "load_base", lambda *a: pytest.fail("the base was loaded before OUT was checked"))
    path = tmp_path / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("keep me")
    with pytest.raises(ConfigError) as e:
        export([llama[1]["qv"]], str(tmp_path / "out"))
    assert str(path) in str(e.value) and "is a file" in str(e.value)
    assert path.read_text() == "keep me"


@pytest.mark.parametrize("field, value, error", [
    ("target_modules", 5, ConfigError), ("lora_alpha", "x", ConfigError), ("lora_alpha", float("nan"), ConfigError),
    ("r", 2.5, ConfigError), ("rank_pattern", "x", ConfigError), ("rank_pattern", {"q_proj": "four"}, ConfigError),
    ("peft_type", ["LORA"], CorruptArtifactError),
])
def test_a_wrong_typed_adapter_config_field_is_named(guarded, tmp_path, llama, field, value, error):
    path = copy_adapter(llama[1]["qv"], tmp_path / "adapter")
    config = os.path.join(path, "adapter_config.json")
    edit_json(config, **{field: value})
    msg = failing_export(error, [path], guarded)
    assert config in msg and field in msg


def test_a_base_of_other_depth_is_named_as_another_base(small_copy, tmp_path):
    """Fewer layers mean fewer fused groups: still 'another base', not a layout the adapters disagree on."""
    import peft
    import transformers

    from tiny import tiny_config

    config = tiny_config("llama")
    config.num_hidden_layers = 1
    shallow = str(tmp_path / "shallow")
    transformers.LlamaForCausalLM(config).save_pretrained(shallow)
    pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(shallow),
                             peft.LoraConfig(r=2, target_modules=["q_proj", "up_proj"], task_type="CAUSAL_LM"))
    pm.peft_config["default"].base_model_name_or_path = shallow
    pm.save_pretrained(tmp_path / "a")
    msg = failing_export(AdapterBaseMismatchError, [str(tmp_path / "a")], small_copy)
    assert shallow in msg


def test_export_of_longrope_scaling_is_refused(guarded, llama, tmp_path):
    """longrope switches its rotary frequencies past original_max_position_embeddings: one traced graph cannot
    follow that (the contrib graph was off by 8e-4, the standard trace failed inside torch.onnx)."""
    import transformers as tf

    from tiny import tiny_config

    config = tiny_config("llama")
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0,
                              "original_max_position_embeddings": 16, "short_factor": [1.0] * 8,
                              "long_factor": [float(i + 1) for i in range(8)]}
    torch.manual_seed(0)
    base = str(tmp_path / "base-longrope")
    tf.LlamaForCausalLM(config).save_pretrained(base)
    for ops in ("contrib", "standard"):
        msg = failing_export(UnsupportedModelError, [llama[1]["qv"]], guarded, base=base, ops=ops)
        assert base in msg and "longrope" in msg and "without longrope" in msg


def test_export_of_sliding_window_layers_is_refused(guarded, llama, tmp_path):
    """Qwen2 with use_sliding_window: transformers crops those layers' cache, which the graph cannot carry."""
    import transformers as tf

    config = tf.Qwen2Config(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, intermediate_size=64, max_position_embeddings=64,
                            use_sliding_window=True, sliding_window=4, max_window_layers=1)
    torch.manual_seed(0)
    base = str(tmp_path / "base-qwen2-sliding")
    tf.Qwen2ForCausalLM(config).save_pretrained(base)
    msg = failing_export(UnsupportedModelError, [llama[1]["qv"]], guarded, base=base)
    assert base in msg and "sliding_attention" in msg and "use_sliding_window" in msg and "full_attention" in msg
    # following the message's fix exports
    fixed = str(tmp_path / "base-qwen2-full")
    shutil.copytree(base, fixed)
    edit_json(os.path.join(fixed, "config.json"), use_sliding_window=False,
              layer_types=["full_attention"] * config.num_hidden_layers)
    lora = copy_adapter(llama[1]["qv"], tmp_path / "qwen2-qv")
    edit_json(os.path.join(lora, "adapter_config.json"), base_model_name_or_path=base)  # trained on the sliding one
    export([lora], str(tmp_path / "out-full"), base=fixed)  # a hunt: refused, the recorded base loaded with its checks


def test_adapters_a_training_run_wrote_into_out_are_not_taken_for_exported_ones(llama, tmp_path, monkeypatch):
    """The README's layout, ./adapters/<name> from edgepeft train, then an export with --out .: the fix offered
    was "or remove ./adapters", the user's trained adapters."""
    work = tmp_path / "my project"
    copy_adapter(llama[1]["qv"], work / "adapters" / "topic")
    monkeypatch.chdir(work)
    before = tree_hashes(".")
    msg = failing_export(ConfigError, [llama[1]["mlp"]], ".")
    assert msg == ("./adapters: holds topic: HF PEFT adapter folders, not exported ones, which the export would take "
                   f"for its own; give --out a folder of its own, e.g. --out '{work}-onnx'")  # not .-onnx: hidden
    assert tree_hashes(".") == before
    export([llama[1]["mlp"]], f"{work}-onnx")  # the fix works


def test_a_model_at_out_base_is_never_replaced(llama, tiny_base, tmp_path):
    """The base model kept at OUT/base (a folder of the user's, no edgepeft.json): refused before any work."""
    work = tmp_path / "work"
    shutil.copytree(tiny_base("llama"), work / "base")
    adapter = copy_adapter(llama[1]["qv"], tmp_path / "adapter")
    edit_json(os.path.join(adapter, "adapter_config.json"), base_model_name_or_path=str(work / "base"))
    msg = failing_export(ConfigError, [adapter], str(work))
    assert os.path.join(str(work), "base") in msg and "not an edgepeft export" in msg and "--out" in msg
    other = tmp_path / "other"
    inside = copy_adapter(llama[1]["qv"], other / "adapters" / "mine")  # an input inside what the export replaces
    for overwrite in (False, True):
        msg = failing_export(ConfigError, [inside], str(other), base=tiny_base("llama"), overwrite=overwrite)
        assert inside in msg and "move it out of the --out folder" in msg


def test_slots_of_a_method_this_process_lacks_are_named():
    from edgepeft.tuners import spec_for

    with pytest.raises(UnsupportedMethodError, match="'toy'.*register that method"):
        spec_for("toy")


def test_messages_about_an_adapter_name_its_folder(llama, virtual_export, tmp_path):
    """A target_modules the model lacks names adapter_config.json; --merge of a prefix adapter names the adapter."""
    bad = copy_adapter(llama[1]["qv"], tmp_path / "bad-targets")
    edit_json(os.path.join(bad, "adapter_config.json"), target_modules=["nonexistent"])
    msg = failing_export(ConfigError, [bad], str(tmp_path / "out-a"))
    assert msg.startswith(os.path.join(bad, "adapter_config.json") + ": target_modules ['nonexistent'] matches no")
    prefix = virtual_export("llama")[1]["prefix"]
    msg = failing_export(UnsupportedMethodError, [prefix], str(tmp_path / "out-b"), merge=True)  # found by a hunt:
    assert msg == f"{prefix}: prefix tuning adds keys and values, it has no weights to merge; export it without --merge"


def test_an_adapter_with_nan_weights_is_refused_naming_the_cause(llama, tmp_path):
    """NaN in PyTorch's own outputs: no --atol helps ("loosen --atol" was the advice), so the message says what to
    look for, and nothing is written."""
    from safetensors.torch import load_file, save_file

    bad = copy_adapter(llama[1]["qv"], tmp_path / "nan-adapter")
    weights = os.path.join(bad, "adapter_model.safetensors")
    state = load_file(weights)
    first = sorted(state)[0]
    state[first][0, 0] = float("nan")
    save_file(state, weights)
    msg = failing_export(ExportValidationError, [bad], str(tmp_path / "out"), atol=float("inf"))
    assert msg.startswith(bad) and "NaN or inf" in msg and "adapter_model.safetensors" in msg
    assert not os.path.exists(tmp_path / "out")

