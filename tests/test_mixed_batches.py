"""Many tasks at once: one row per adapter in a batch, weighted and scaled LoRA adapters, adapters under a memory
budget, and one Runtime serving many threads. Each mixed row must equal the same row run alone; weighted adapters
must equal HF PEFT with those adapters active and each one's scaling times its weight."""
from __future__ import annotations

import fractions
import io
import json
import os
import re
import shutil
import threading
import warnings
import zipfile

import numpy as np
import pytest
import torch

from file_checks import edited_json
from peft_refs import ia3_adapter, lora_adapter, peft_virtual_adapter, randomize_adapter
from tiny import load_reference_base, mixed_batch as _batch

from edgepeft.errors import (AdapterBaseMismatchError, AdapterInUseError, ArtifactNotFoundError, ConfigError,
                             CorruptArtifactError, InvalidInputError, UnknownAdapterError)
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime

KINDS = ["lora_qv", "lora_all", "ia3", "prompt", "prefix"]


@pytest.fixture(scope="module")
def decoder(mixed_decoder):
    return mixed_decoder


@pytest.fixture(scope="module")
def rt(decoder):
    return Runtime(decoder[0])


def _alone(rt, ids, mask, spec, row):
    return rt.forward(ids[row:row + 1], mask[row:row + 1], adapter=spec)["logits"][0]


def test_each_row_of_a_mixed_batch_equals_the_row_alone(rt):
    spec = ["lora_qv", None, "ia3", "lora_all", "prompt", "prefix", "lora_qv", {"lora_qv": 0.5, "lora_all": 2.0}]
    ids, mask = _batch(len(spec))
    mixed = rt.forward(ids, mask, adapter=spec)["logits"]
    assert mixed.shape == (8, 3 + 7, 128)  # the prompt row's 3 virtual positions set the length
    for row, adapter in enumerate(spec):
        alone = _alone(rt, ids, mask, adapter, row)
        got = mixed[row, -alone.shape[0]:]
        assert np.isnan(mixed[row, :mixed.shape[1] - alone.shape[0]]).all()  # shorter rows: NaN in front
        valid = np.concatenate([np.ones(alone.shape[0] - 7, bool), mask[row].astype(bool)])
        assert float(np.abs(got - alone)[valid].max()) <= 1e-5, adapter
    base = rt.forward(ids, mask)["logits"]  # every row's adapter acts on that row alone
    for row, adapter in enumerate(spec):
        if adapter is not None and adapter != "prompt":
            assert float(np.abs(mixed[row, -7:] - base[row])[mask[row].astype(bool)].max()) > 1e-3, adapter


def test_stackable_rows_share_one_graph_run(rt):
    spec = ["lora_qv", "ia3", None, "lora_all", {"lora_qv": 0.3}]
    with rt.lanes(spec, len(spec)) as lanes:
        assert len(lanes) == 1 and lanes[0].rows.tolist() == [0, 1, 2, 3, 4]
    with rt.lanes(["lora_qv", "prompt", "prefix", "ia3", "prompt"], 5) as lanes:
        assert sorted(lane.rows.tolist() for lane in lanes) == [[0, 3], [1, 4], [2]]


def test_mixed_generation_gives_each_rows_own_ids(rt):
    spec = ["lora_qv", "prefix", None, "ia3", "prompt", "lora_all"]
    ids, mask = _batch(len(spec), seq=5, seed=9)  # rows left-padded
    out = rt.generate(ids, mask, adapter=spec, max_new_tokens=6, eos_token_id=[])
    for row, adapter in enumerate(spec):
        alone = rt.generate(ids[row:row + 1], mask[row:row + 1], adapter=adapter, max_new_tokens=6, eos_token_id=[])
        np.testing.assert_array_equal(out[row], alone[0], err_msg=str(adapter))
    steps = rt.step_logits(ids, mask, adapter=spec)  # teacher-forced steps of a mixed batch, row by row
    first = next(steps)
    second = steps.send(out[:, 5])
    steps.close()
    for row, adapter in enumerate(spec):
        one = rt.step_logits(ids[row:row + 1], mask[row:row + 1], adapter=adapter)
        assert float(np.abs(next(one)[0] - first[row]).max()) <= 1e-5
        assert float(np.abs(one.send(out[row:row + 1, 5])[0] - second[row]).max()) <= 1e-5
        one.close()


def _hf_combination(decoder, weights: dict):
    """HF PEFT with every adapter of ``weights`` active, each one's scaling multiplied by its weight."""
    import peft

    out, dirs = decoder
    names = list(weights)
    model = peft.PeftModel.from_pretrained(load_reference_base(_base_of(dirs[names[0]]), "causal-lm"), dirs[names[0]],
                                           adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(dirs[name], adapter_name=name)
    model.base_model.set_adapter(names)
    for module in model.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict):
            for name, w in weights.items():
                if name in module.scaling:
                    module.scaling[name] *= w
    return model.eval()


def _base_of(adapter_dir):
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        return json.load(f)["base_model_name_or_path"]


@pytest.mark.parametrize("weights", [{"lora_qv": 0.7, "lora_all": 0.3}, {"lora_qv": 0.5}, {"lora_all": -1.5, "lora_qv": 2.0},
                                     {"lora_qv": fractions.Fraction(1, 2), "lora_all": np.array(0.25)}])  # were refused
def test_weighted_and_scaled_lora_equal_hf_peft_with_both_active(decoder, rt, weights):
    ids, mask = _batch(2)
    ref = _hf_combination(decoder, weights)
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    ours = rt.forward(ids, mask, adapter=weights)["logits"]
    assert float(np.abs(ours - want)[mask.astype(bool)].max()) <= 1e-4
    mixed = rt.forward(ids, mask, adapter=[weights, "ia3"])["logits"]  # in a mixed batch too
    assert float(np.abs(mixed[0] - ours[0]).max()) <= 1e-5


def test_combinations_without_a_meaning_are_refused(rt):
    ids, mask = _batch(2)
    for bad in ({"ia3": 0.5}, {"prompt": 1.0, "lora_qv": 1.0}, {"lora_qv": 1.0, "prefix": 0.5}):
        with pytest.raises(ConfigError, match="weighted sums are defined for LoRA"):
            rt.forward(ids, mask, adapter=bad)
    with pytest.raises(InvalidInputError, match="one per row"):
        rt.forward(ids, mask, adapter=["lora_qv"])
    with pytest.raises(InvalidInputError, match=r"lists 5 for a row; give each row .*name, None .* or a \{name: weight"):
        rt.forward(ids, mask, adapter=["lora_qv", 5])  # was told "a weighted adapter is a non-empty dict"
    for weight in (float("nan"), 1e40, 10 ** 400, np.complex128(0.5)):  # 1e40: infinite in the row weights;
        for spec in ({"lora_qv": weight}, [{"lora_qv": weight}, None]):  # 10**400: a TypeError from numpy
            with pytest.raises(InvalidInputError, match=r"give a finite number \(within float32's range, 3.4e38\)"):
                rt.forward(ids, mask, adapter=spec)
    with warnings.catch_warnings():  # a hunt: a float16 weight compared in float16 warned of an overflow
        warnings.simplefilter("error")
        rt.forward(ids, mask, adapter={"lora_qv": np.float16(0.5)})
    # the calls that take one name refuse a list or weights (a TypeError: unhashable type before)
    for call in (rt.labels, rt.adapter_info, rt.adapter_dir, rt.adapter_tensors, rt.unload_adapter):
        for bad in (["lora_qv"], {"lora_qv": 1.0}):
            with pytest.raises(ConfigError, match=r"this call takes one adapter's name \(a string\), got .*lora_qv"):
                call(bad)
    assert "lora_qv" in rt.adapter_names


def test_weighting_lora_on_a_base_exported_before_weighted_sums_names_the_fix(decoder, tmp_path):
    """Slots of export formats 1 and 2 do not stack: a weighted LoRA was refused as if it were not LoRA ('weighted
    sums are defined for LoRA adapters'), with no working fix."""
    out = str(tmp_path / "older")
    shutil.copytree(decoder[0], out)
    manifest = os.path.join(out, "base", "edgepeft.json")
    with edited_json(manifest) as data:
        for slot in data["slots"]:  # as the older exports wrote them
            slot.pop("stack_axis", None), slot.pop("selector", None)
    rt = Runtime(out)
    ids, mask = _batch(2)
    with pytest.raises(ConfigError) as e:
        rt.forward(ids, mask, adapter={"lora_qv": 0.5})
    assert str(e.value) == (f"adapter 'lora_qv' is LoRA, but {out}/base was exported before LoRA adapters could be "
                            "weighted or combined; export every adapter into a fresh --out folder to weight it")
    single = rt.forward(ids, mask, adapter="lora_qv")["logits"]  # by name it runs as before
    assert np.array_equal(rt.forward(ids, mask, adapter=["lora_qv", "lora_qv"])["logits"], single)


def test_an_adapter_exported_into_a_served_out_asks_for_a_new_runtime(decoder, tmp_path):
    """Exporting an adapter with new slots into OUT re-exports its base; a Runtime opened before cannot serve it.
    The advice was to export it again (which changed nothing); it is to open a new Runtime."""
    out, dirs = str(tmp_path / "served"), decoder[1]
    export([dirs["lora_qv"]], out, names=["lora_qv"])
    serving = Runtime(out)
    export([dirs["ia3"]], out, names=["ia3"])
    with pytest.raises(AdapterBaseMismatchError, match=r"adapters/ia3: adapter 'ia3' was exported for the base .*/base "
                       r"holds now \(\w+\), re-exported since this Runtime opened it \(\w+\); open a new Runtime\("):
        serving.load_adapter(os.path.join(out, "adapters", "ia3"))
    assert serving.adapter_names == ["lora_qv"]
    assert Runtime(out).adapter_names == ["ia3", "lora_qv"]


@pytest.fixture(scope="module")
def classifiers(workdir, tiny_base):
    """(OUT, dirs): tiny BERT classifiers with 2 and 3 labels, and an IA3 one, in one base."""
    import peft

    root, base = workdir / "mixed-cls", tiny_base("bert")
    dirs = {"two": lora_adapter(root / "two", base, "seq-cls", 71, num_labels=2, r=4, target_modules=["query", "value"]),
            "three": lora_adapter(root / "three", base, "seq-cls", 72, num_labels=3, r=2, target_modules=["query", "value"])}
    model = peft.get_peft_model(load_reference_base(base, "seq-cls", 3), peft.IA3Config(task_type="SEQ_CLS"))
    randomize_adapter(model, 73)
    model.peft_config["default"].base_model_name_or_path = base
    model.save_pretrained(root / "ia3")
    dirs["ia3"] = str(root / "ia3")
    out = str(root / "out")
    export(list(dirs.values()), out, names=list(dirs))
    return out, dirs


def test_rows_with_their_own_heads_share_a_run_and_keep_their_label_counts(classifiers):
    rt = Runtime(classifiers[0])
    spec = ["two", "three", None, "ia3", "two", {"three": 0.5}]
    ids, mask = _batch(len(spec))
    mixed = rt.forward(ids, mask, adapter=spec)["logits"]
    assert mixed.shape == (6, 3)
    with rt.lanes(spec, len(spec)) as lanes:
        assert len(lanes) == 2  # rows with heads share one run; the base-model row runs the base head
    for row, adapter in enumerate(spec):
        alone = _alone(rt, ids, mask, adapter, row)
        assert float(np.abs(mixed[row, :alone.shape[0]] - alone).max()) <= 1e-5, adapter
        assert np.isnan(mixed[row, alone.shape[0]:]).all()  # fewer labels: NaN behind
    with pytest.raises(ConfigError, match="two heads"):
        rt.forward(ids, mask, adapter={"two": 0.5, "three": 0.5})


# ---------------------------------------------------------------- a memory budget
def test_an_eviction_inside_the_mixers_own_lock_goes_through(decoder):
    """A hold the garbage collector releases (an abandoned stream in a cycle) evicts where the collection started,
    which can be inside the mixer's lock (a collection starts at any allocation); the eviction tells the mixer to
    forget that adapter's stacks, taking the lock again: a plain Lock waited for itself for good."""
    small = Runtime(decoder[0], adapter_budget_bytes=0)
    done = threading.Event()

    def inside():
        with small.mixer._lock:
            small.unload_adapter("lora_qv")  # the store tells the mixer, as an eviction does
        done.set()

    threading.Thread(target=inside, daemon=True).start()
    assert done.wait(30) and "lora_qv" not in small.adapter_names


def test_a_release_the_collector_runs_in_the_mixer_while_another_thread_unloads(decoder):
    """Found by a hunt: thread X stacking a mixed batch (the mixer's lock) ran the collector, which released an
    abandoned stream's hold (the store's lock), while thread Y, unloading (the store's lock), told the mixer to forget
    (its lock): each waited for the other for good, and every later call for the store's lock. One lock serves both."""
    import gc
    import time
    from collections import OrderedDict

    two = Runtime(decoder[0])
    ids, mask = _batch(2)
    cycle, stacking, unloading = {}, threading.Event(), threading.Event()
    cycle["self"], cycle["stream"] = cycle, two.stream(ids, mask, adapter="lora_qv", max_new_tokens=4, eos_token_id=[])
    next(cycle["stream"])  # it holds lora_qv; in a cycle, only the collector finalizes it

    class Collecting(OrderedDict):  # the collector's turn, at thread X's insert inside the mixer's lock
        def __setitem__(self, key, value):
            if threading.current_thread().name == "X" and not stacking.is_set():
                stacking.set()
                unloading.wait(5)  # Y inside the store's lock (without the fix; with it, Y waits for this one)
                gc.collect()
            super().__setitem__(key, value)

    drop = two.store._drop

    def dropping(adapter):  # Y's unload, holding the store's lock, before it tells the mixer
        unloading.set()
        drop(adapter)

    two.mixer._stacks, two.store._drop = Collecting(), dropping
    gc.disable()
    try:
        del cycle
        threads = [threading.Thread(target=lambda: two.forward(ids, mask, adapter=["lora_all", "ia3"]), name="X",
                                    daemon=True),
                   threading.Thread(target=lambda: stacking.wait() and two.unload_adapter("prompt"), daemon=True)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "deadlocked"
    finally:
        gc.enable()
    assert "prompt" not in two.adapter_names
    two.unload_adapter("lora_qv")  # the stream's hold was released


def test_an_adapter_loads_from_the_bytes_of_a_zip_of_its_folder(decoder, rt, tmp_path):
    data = shutil.make_archive(str(tmp_path / "lora"), "zip", os.path.join(decoder[0], "adapters", "lora_qv"))
    with open(data, "rb") as f:
        raw = f.read()
    other = Runtime(decoder[0], load_adapters=False)
    assert other.load_adapter(raw, name="from-bytes") == "from-bytes"
    ids, mask = _batch(2)
    np.testing.assert_array_equal(other.forward(ids, mask, adapter="from-bytes")["logits"],
                                  rt.forward(ids, mask, adapter="lora_qv")["logits"])
    broken = io.BytesIO()
    with zipfile.ZipFile(broken, "w") as z, zipfile.ZipFile(data) as src:
        z.writestr("adapter.json", src.read("adapter.json"))
        z.writestr("adapter.onnx", src.read("adapter.onnx")[:-10])
    with pytest.raises(CorruptArtifactError, match="checksum"):
        other.load_adapter(broken.getvalue(), name="broken")
    with pytest.raises(CorruptArtifactError, match="not a readable zip"):
        other.load_adapter(b"not a zip", name="junk")
    deflated = io.BytesIO()  # a damaged compressed stream (zlib.error inside zipfile)
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as z, zipfile.ZipFile(data) as src:
        z.writestr("adapter.json", src.read("adapter.json"))
        z.writestr("adapter.onnx", src.read("adapter.onnx"))
    damaged = bytearray(deflated.getvalue())
    start = damaged.index(b"adapter.onnx") + len(b"adapter.onnx")  # the first entry of the graph's stream
    damaged[start + 20:start + 60] = bytes(40)
    with pytest.raises(CorruptArtifactError, match="not a readable zip.*decompressing"):
        other.load_adapter(bytes(damaged), name="damaged")
    two = io.BytesIO()
    with zipfile.ZipFile(two, "w") as z, zipfile.ZipFile(data) as src:
        for folder in ("a", "b"):
            z.writestr(f"{folder}/adapter.json", src.read("adapter.json"))
            z.writestr(f"{folder}/adapter.onnx", src.read("adapter.onnx"))
    with pytest.raises(CorruptArtifactError, match="more than one adapter folder"):
        other.load_adapter(two.getvalue(), name="two")
    for bad in (None, 3):
        with pytest.raises(ConfigError, match="a path\\) or the bytes of a zip"):
            other.load_adapter(bad)
    windows = io.BytesIO()  # Windows' zips (PowerShell 5) separate folders with backslashes: it was "needs adapter.json"
    with zipfile.ZipFile(windows, "w") as z, zipfile.ZipFile(data) as src:
        for name in ("adapter.json", "adapter.onnx"):
            z.writestr(f"lora_qv\\{name}", src.read(name))
    assert other.load_adapter(windows.getvalue()) == "lora_qv"  # no name given: the one it was exported with
    other.unload_adapter("lora_qv")
    renamed = shutil.copytree(os.path.join(decoder[0], "adapters", "lora_qv"), tmp_path / "lora-v2")
    assert other.load_adapter(renamed) == "lora-v2"  # a folder: by its name, as Runtime(OUT) names it
    other.unload_adapter("lora-v2")
    assert other.adapter_names == ["from-bytes"]
    from edgepeft.runtimes.bench import measure  # staging is measured from the same bytes, under another name

    sources, load = [], other.load_adapter
    other.load_adapter = lambda source, name=None: sources.append(source) or load(source, name)
    assert "from-bytes" in measure(other, rounds=1, calls=1, seq=4)["adapters"]
    graph = zipfile.ZipFile(data).read("adapter.onnx")
    assert sources and all(zipfile.ZipFile(io.BytesIO(s)).read("adapter.onnx") == graph for s in sources)
    assert other.adapter_names == ["from-bytes"]  # the measuring copy is unloaded again


@pytest.mark.parametrize("budget", [64e6, -1, "1000", True])
def test_a_budget_that_is_no_count_of_bytes_is_refused_naming_one_that_is(decoder, budget):
    """Found by a hunt: 64e6 was told to be "a whole number of bytes", which it is."""
    with pytest.raises(ConfigError, match=r"^adapter_budget_bytes must be an integer count of bytes >= 0 \(64_000_000, "
                                          rf"not 64e6\), got {re.escape(repr(budget))}$"):
        Runtime(decoder[0], adapter_budget_bytes=budget)


def test_a_restage_checks_the_file_again(decoder, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(decoder[0], out)
    small = Runtime(out, adapter_budget_bytes=0)
    ids, mask = _batch(2)
    small.forward(ids, mask, adapter="lora_qv")
    assert small.resident_adapters == []  # evicted after the call
    graph = os.path.join(out, "adapters", "lora_qv", "adapter.onnx")
    with open(graph, "r+b") as f:  # replaced behind the runtime's back (an export --overwrite, a bad copy)
        f.seek(-10, 2)
        f.write(bytes(10))
    with pytest.raises(CorruptArtifactError, match=r"changed \(re-exported\?\) since adapter 'lora_qv' was loaded; "
                                                   r"unload_adapter\('lora_qv'\) and load it again"):
        small.forward(ids, mask, adapter="lora_qv")
    # re-exported for a new base (--overwrite with new slots): unloading and loading again is refused, so say so
    manifest = os.path.join(out, "adapters", "lora_qv", "adapter.json")
    with open(manifest) as f:
        fields = json.load(f)
    with open(manifest, "w") as f:
        json.dump({**fields, "base_fingerprint": "f" * 64}, f)
    with pytest.raises(CorruptArtifactError, match="its base was re-exported too: open a new Runtime on the export"):
        small.forward(ids, mask, adapter="lora_qv")
    np.testing.assert_array_equal(small.forward(ids, mask, adapter="ia3")["logits"],
                                  Runtime(decoder[0]).forward(ids, mask, adapter="ia3")["logits"])
    moved = str(tmp_path / "moved")  # found by a hunt: OUT renamed was told to load the adapter again there
    os.rename(out, moved)
    with pytest.raises(ArtifactNotFoundError, match=rf"^{os.path.join(out, 'adapters', 'ia3')}: gone since adapter 'ia3'"
                                                   r" was loaded \(moved or removed\); unload_adapter\('ia3'\) and load "
                                                   "it from where it is now, or open a Runtime on the export there$"):
        small.forward(ids, mask, adapter="ia3")


# ---------------------------------------------------------------- many threads
def test_many_threads_each_get_their_single_thread_answers(decoder):
    rt = Runtime(decoder[0], adapter_budget_bytes=20_000)  # evictions and restaging while threads run
    specs = [*KINDS, None, ["lora_qv", "prompt", None, "ia3"], [{"lora_qv": 0.4, "lora_all": 0.6}, "prefix", "ia3", "ia3"]]
    inputs = {i: _batch(4 if isinstance(s, list) else 2, seed=20 + i) for i, s in enumerate(specs)}
    want = {i: rt.forward(*inputs[i], adapter=s)["logits"] for i, s in enumerate(specs)}
    gens = {i: rt.generate(*inputs[i], adapter=s, max_new_tokens=4, eos_token_id=[]) for i, s in enumerate(specs)}
    errors, done = [], []

    def worker(t):
        try:
            for k in range(12):
                i = (t + k) % len(specs)
                got = rt.forward(*inputs[i], adapter=specs[i])["logits"]
                assert np.array_equal(np.isnan(got), np.isnan(want[i])) and np.allclose(got, want[i], atol=1e-6,
                                                                                         equal_nan=True), specs[i]
                if k % 4 == 0:
                    np.testing.assert_array_equal(rt.generate(*inputs[i], adapter=specs[i], max_new_tokens=4,
                                                              eos_token_id=[]), gens[i])
            done.append(t)
        except Exception as e:  # noqa: BLE001  (reported below with the thread's failure)
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(done) == list(range(8)), errors[:3]


def test_unloading_an_adapter_a_call_holds_is_refused_and_eviction_waits(decoder):
    rt = Runtime(decoder[0], adapter_budget_bytes=0)  # nothing stays staged once no call holds it
    ids, mask = _batch(2)
    steps = rt.step_logits(ids, mask, adapter=["lora_qv", "ia3"])
    next(steps)  # the generation holds both
    assert set(rt.resident_adapters) >= {"lora_qv", "ia3"}
    with pytest.raises(AdapterInUseError):
        rt.unload_adapter("ia3")
    rt.forward(ids, mask, adapter="lora_all")  # another call's staging does not evict the held ones
    assert set(rt.resident_adapters) >= {"lora_qv", "ia3"}
    steps.close()
    assert rt.resident_adapters == []  # released: evicted at once under a zero budget
    rt.unload_adapter("ia3")


def test_a_call_interrupted_anywhere_in_taking_or_releasing_its_adapters_holds_none_after(decoder):
    """Ctrl-C (or a timeout's signal handler) raising between a hold's count and its record left the adapter in use
    for the life of the Runtime: unload refused, never evicted. A KeyboardInterrupt raised at each line in turn, the
    release's own included."""
    import sys

    from edgepeft.runtimes.adapters import AdapterStore

    rt = Runtime(decoder[0], adapter_budget_bytes=0)  # nothing stays staged once no call holds it: restages too
    ids, mask = _batch(2)
    codes = (AdapterStore._acquire.__code__, AdapterStore.holding.__wrapped__.__code__)
    lines, interrupted = [(code, line) for code in codes for line in sorted({n for _, _, n in code.co_lines() if n})], 0
    for code, line in lines:
        fired = []

        def tracer(frame, event, arg):
            def local(frame, event, arg):
                if event == "line" and frame.f_lineno == line and not fired:
                    fired.append(line)
                    raise KeyboardInterrupt
                return local
            return local if frame.f_code is code else None

        sys.settrace(tracer)
        try:
            rt.forward(ids, mask, adapter=["lora_qv", "ia3"])
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            sys.settrace(None)
        for name in ("lora_qv", "ia3"):  # refused while a call holds it
            rt.unload_adapter(name)
            rt.load_adapter(os.path.join(decoder[0], "adapters", name))
    assert interrupted >= len(lines) // 2, (interrupted, len(lines))  # the interrupts did fire (lines a call skips aside)
    assert np.array_equal(rt.forward(ids, mask, adapter=["lora_qv", "ia3"])["logits"],
                                    Runtime(decoder[0]).forward(ids, mask, adapter=["lora_qv", "ia3"])["logits"])


def test_saved_layers_other_than_the_classifier_run_their_rows_apart(tiny_base, tmp_path):
    """Only a classifier's columns can sit side by side in one run: an lm_head (causal LM) or a pooler saved with
    the adapter feeds the rest of the graph, so those adapters' rows run apart (the stacked heads gave doubled
    vocabularies, NaN rows and a shape error) and each row equals that row alone."""
    llama, bert = tiny_base("llama"), tiny_base("bert")
    ms = {f"ms{i}": lora_adapter(tmp_path / f"ms{i}", llama, "causal-lm", 90 + i, r=2 + i, target_modules=["q_proj"],
                                 modules_to_save=["lm_head"]) for i in (1, 2)}
    cls = {f"p{i}": lora_adapter(tmp_path / f"p{i}", bert, "seq-cls", 93 + i, num_labels=1 + i, r=4,
                                 target_modules=["query"], modules_to_save=["classifier", "pooler.dense"]) for i in (1, 2)}
    ids = np.random.default_rng(8).integers(3, 128, size=(2, 7)).astype(np.int64)
    mask = np.ones_like(ids)
    for adapters, key in ((ms, "logits"), (cls, "logits")):
        out = str(tmp_path / f"out-{next(iter(adapters))}")
        export(list(adapters.values()), out, names=list(adapters))
        rt = Runtime(out)
        mixed = rt.forward(ids, mask, adapter=list(adapters))[key]
        saved = r"lm_head" if adapters is ms else r"\S*pooler.dense"
        with pytest.raises(ConfigError, match=rf"adapter '\w+' saves {saved} whole \(not a classifier's head\), which "
                           "cannot be weighted"):  # not "weighted sums are defined for LoRA adapters": it is one
            rt.forward(ids, mask, adapter={next(iter(adapters)): 0.5})
        if adapters is ms:
            assert mixed.shape == (2, 7, rt.vocab_size)  # not two vocabularies side by side
        for row, name in enumerate(adapters):
            alone = rt.forward(ids[row:row + 1], mask[row:row + 1], adapter=name)[key][0]
            np.testing.assert_allclose(mixed[row][..., :alone.shape[-1]], alone, atol=1e-5)
    manifest = os.path.join(tmp_path, "out-ms1", "base", "edgepeft.json")  # as exports before the fix wrote it
    with edited_json(manifest) as data:
        for slot in data["slots"]:
            if slot["method"] == "head":
                slot.update(stack_axis=1 if slot["role"] == "weight" else 0, selector="output")
    decoder = Runtime(str(tmp_path / "out-ms1"))  # the runtime keeps such adapters' rows apart too
    steps = decoder.step_logits(ids, mask, adapter=list(ms))
    assert next(steps).shape == (2, decoder.vocab_size)
    greedy = decoder.generate(ids, mask, adapter=list(ms), max_new_tokens=3, eos_token_id=[])
    for row, name in enumerate(ms):
        np.testing.assert_array_equal(greedy[row], decoder.generate(ids[row:row + 1], mask[row:row + 1], adapter=name,
                                                                    max_new_tokens=3, eos_token_id=[])[0])


def test_a_release_the_collector_runs_inside_the_store_leaves_it_whole(decoder):
    """Found by a hunt (threads abandoning step_logits under a budget): a hold the garbage collector let go (an
    abandoned stream's finalizer, run at any allocation in this thread, the store's lock being re-entrant)
    restaged and trimmed while the store was summing its staged bytes: "OrderedDict mutated during iteration" from a
    call's cleanup, the trim abandoned over the budget."""
    small = Runtime(decoder[0], adapter_budget_bytes=0)
    store, fired = small.store, []

    class Collecting(dict):  # the collector's turn, inside the store's walk of its staged adapters
        def __getitem__(self, name):
            if not fired:
                fired.append(name)
                with store.holding(["lora_qv"]):  # a finalizer's release
                    pass
            return super().__getitem__(name)

        def get(self, name, default=None):
            return self[name] if name in self else default

    with store.holding(["ia3", "lora_all"]):
        store._adapters = Collecting(store._adapters)
    assert fired and store.resident == []  # the trim went through: the budget of 0 kept
