"""The KV-cache I/O of decoder exports, and ``edgepeft run`` streaming.

The base graph names its cache inputs and outputs as optimum does
(``past_key_values.N.key`` in, ``present.N.key`` out) and the base manifest
names them by pattern, expanding to exactly the graph's names. During
generation the cache never leaves ONNX Runtime: each decode step binds the
previous step's present OrtValues as its past, and only the logits are read
into numpy. ``edgepeft run`` writes (and flushes) each text piece as it is
generated, and passes every generation flag to the runtime on its own.
"""
from __future__ import annotations

import os
import re
import sys

import numpy as np
import onnxruntime as ort
import pytest

from word_tokenizer import PROMPT
from edgepeft import cli as cli_module
from edgepeft.runtimes import Runtime
from edgepeft.runtimes.manifest import BASE_DIR, LOGITS_TO_KEEP, cache_names, read_base_manifest

LAYERS = 2  # tiny.py's llama
PAST = [f"past_key_values.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
PRESENT = [f"present.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
TOKEN_INPUTS = ["input_ids", "attention_mask", "position_ids"]


# ---------------------------------------------------------------- 1. graph I/O and manifest
def test_decoder_graph_and_manifest_name_the_cache_as_optimum_does(text_export, text_rt):
    """Graph inputs/outputs carry optimum's cache names, and the manifest's patterns expand to exactly them."""
    out = text_export[0]
    inputs = {i.name: i for i in text_rt.session.get_inputs()}
    outputs = [o.name for o in text_rt.session.get_outputs()]
    assert outputs == ["logits", *PRESENT]
    assert [n for n in inputs if n not in PAST] == TOKEN_INPUTS  # required inputs: tokens, positions, the cache
    assert [n for n in inputs if n in PAST] == PAST

    manifest = read_base_manifest(os.path.join(out, BASE_DIR))
    cache = manifest["cache"]
    assert {k: cache[k] for k in ("past_key", "past_value", "present_key", "present_value")} == {
        "past_key": "past_key_values.%d.key", "past_value": "past_key_values.%d.value",
        "present_key": "present.%d.key", "present_value": "present.%d.value",
    }
    assert cache["num_layers"] == LAYERS
    # the patterns expand to exactly the graph's cache names, in layer order (key, value per layer)
    graph_past = [n for n in inputs if re.fullmatch(r"past_key_values\.\d+\.(key|value)", n)]
    graph_present = [n for n in outputs if re.fullmatch(r"present\.\d+\.(key|value)", n)]
    assert cache_names(cache, "past") == graph_past == PAST
    assert cache_names(cache, "present") == graph_present == PRESENT
    # the manifest's I/O tables name them too, and the layout's sizes are the graph's
    assert set(TOKEN_INPUTS + PAST) <= set(manifest["inputs"]) and LOGITS_TO_KEEP in manifest["inputs"]
    assert list(manifest["outputs"]) == ["logits", *PRESENT]
    for name in PAST:
        batch, heads, length, dim = inputs[name].shape
        assert isinstance(batch, str) and isinstance(length, str)  # symbolic: any batch, any past length
        assert (heads, dim) == (cache["num_kv_heads"], cache["head_dim"]) == (2, 16)
    # the runtime reads its cache I/O from the manifest
    assert (text_rt.cache_inputs, text_rt.cache_outputs) == (PAST, PRESENT)


# ---------------------------------------------------------------- 2. the cache stays in OrtValues
@pytest.fixture
def binding_spy(monkeypatch):
    """Record every IOBinding input bind, session run, ``_run`` result and ``OrtValue.numpy`` call."""
    log = {"events": [], "runs": [], "numpy": [], "copies": 0}
    cls = ort.IOBinding
    bind_cpu, bind_ortvalue, copy_out = cls.bind_cpu_input, cls.bind_ortvalue_input, cls.copy_outputs_to_cpu
    bind_out = cls.bind_ortvalue_output

    def out(self, name, value):
        log["events"].append(("out", name, value))
        return bind_out(self, name, value)

    def cpu(self, name, arr):
        log["events"].append(("cpu", name, None))
        return bind_cpu(self, name, arr)

    def ortvalue(self, name, value):
        log["events"].append(("ortvalue", name, value))
        return bind_ortvalue(self, name, value)

    def copies(self):
        log["copies"] += 1
        return copy_out(self)

    monkeypatch.setattr(cls, "bind_cpu_input", cpu)
    monkeypatch.setattr(cls, "bind_ortvalue_input", ortvalue)
    monkeypatch.setattr(cls, "bind_ortvalue_output", out)
    monkeypatch.setattr(cls, "copy_outputs_to_cpu", copies)
    to_numpy = ort.OrtValue.numpy

    def numpy(self):
        log["numpy"].append(self)
        return to_numpy(self)

    monkeypatch.setattr(ort.OrtValue, "numpy", numpy)
    run = Runtime.run  # every graph run of a call goes through it

    def recording_run(self, *args, **kwargs):
        outputs = run(self, *args, **kwargs)
        log["events"].append(("run", None, None))  # closes the step: the binds before it are its own
        log["runs"].append(list(outputs))
        return outputs

    monkeypatch.setattr(Runtime, "run", recording_run)
    return log


def steps_of(events):
    """The bind events grouped by the session run they precede."""
    steps, current = [], []
    for kind, name, value in events:
        if kind == "run":
            steps.append(current)
            current = []
        else:
            current.append((kind, name, value))
    return steps


def assert_cache_stayed_in_ortvalues(log, runs_expected: int, fixed: bool) -> None:
    """The spy's record of one generation: past bound from the last presents, only logits read as numpy.

    ``fixed``: a GroupQueryAttention graph (kv_cache.FixedCache): the prefill's presents are read once into one
    buffer per cache input, bound at the first decode step as past and present alike (and a logits buffer as
    the output), never again; a decode step returns that logits buffer only.
    """
    runs, steps = log["runs"], steps_of(log["events"])
    assert len(runs) == len(steps) == runs_expected  # prefill + one step per token fed back (the last is not)
    assert len(runs[0]) == 1 + len(PAST)  # logits + every present
    # the prefill binds the (empty) cache start from numpy: the spy does see cpu binds
    assert [n for kind, n, _ in steps[0] if kind == "cpu"] == [*TOKEN_INPUTS, *PAST]
    for k in range(1, runs_expected):
        cpu = [n for kind, n, _ in steps[k] if kind == "cpu"]
        assert cpu == TOKEN_INPUTS, f"decode step {k} bound {cpu} from numpy"
        past = [(n, v) for kind, n, v in steps[k] if kind == "ortvalue" and n.startswith("past_key_values.")]
        outs = {n: v for kind, n, v in steps[k] if kind == "out"}
        if not fixed:  # each past is the very OrtValue the previous step returned as its present (no copy)
            assert len(runs[k]) == 1 + len(PAST) and [n for n, _ in past] == PAST
            assert all(v is p for (_, v), p in zip(past, runs[k - 1][1:])), f"decode step {k} past is not the last presents"
        elif k == 1:  # one buffer per cache input, bound as past and present; the logits buffer as the output
            assert [n for n, _ in past] == PAST and list(outs) == ["logits", *PRESENT]
            assert all(outs[p] is v for p, (_, v) in zip(PRESENT, past)) and runs[k] == [outs["logits"]]
            assert not any(v is p for _, v in past for p in runs[0][1:])  # buffers of their own
        else:
            assert not past and not outs, f"decode step {k} rebound the fixed cache"
            assert len(runs[k]) == 1 and runs[k][0] is runs[1][0]
    # numpy: one read per step, each of that step's logits (and with the fixed cache the prefill's presents, once)
    logits = [a for a in log["numpy"] if any(a is r[0] for r in runs)]
    assert len(logits) == runs_expected and all(a is r[0] for a, r in zip(logits, runs))
    read = [a for a in log["numpy"] if not any(a is r[0] for r in runs)]
    assert len(read) == (len(PAST) if fixed else 0) and all(any(a is p for p in runs[0][1:]) for a in read)
    assert log["copies"] == 0


@pytest.mark.parametrize("adapter", ["tok", None], ids=["adapter", "base"])
def test_generate_decode_steps_bind_fixed_cache_buffers_once_and_read_only_logits(text_rt, binding_spy, adapter):
    """On the GroupQueryAttention graph, after the prefill each past_key_values.* is one fixed buffer bound as
    past and present once, never rebound from numpy, and only the logits are read (assert_cache_stayed_in_ortvalues)."""
    assert text_rt.contrib  # the text model's head size 16: a GroupQueryAttention graph
    new = 5
    ids = np.array([[1, 10, 20, 30, 40], [0, 0, 1, 50, 60]], dtype=np.int64)  # row 1 left-padded
    mask = (ids != 0).astype(np.int64)
    out = text_rt.generate(ids, mask, adapter=adapter, max_new_tokens=new, eos_token_id=[])  # no early stop
    assert out.shape == (2, ids.shape[1] + new)
    assert_cache_stayed_in_ortvalues(binding_spy, new, text_rt.contrib)


def test_standard_graph_decode_steps_bind_the_previous_presents(text_export, binding_spy, tmp_path):
    """On a standard-ops graph (Concat, no fixed buffer) each step's past is the previous step's present."""
    from edgepeft.exporters import export

    out = str(tmp_path / "standard")
    export([os.path.join(os.path.dirname(text_export[0]), "adapter-tok")], out, names=["tok"], ops="standard")
    rt = Runtime(out)
    binding_spy.update(events=[], runs=[], numpy=[], copies=0)  # the export's own checks ran through the spy too
    ids = np.array([[1, 10, 20, 30, 40], [0, 0, 1, 50, 60]], dtype=np.int64)
    rt.generate(ids, (ids != 0).astype(np.int64), adapter="tok", max_new_tokens=5, eos_token_id=[])
    assert not rt.contrib
    assert_cache_stayed_in_ortvalues(binding_spy, 5, False)


def test_stream_text_decode_steps_keep_the_cache_in_ortvalues(text_rt, binding_spy):
    """The text stream (what `edgepeft run` iterates) keeps the cache in OrtValues alike."""
    pieces = list(text_rt.stream_text(PROMPT, adapter="tok", max_new_tokens=4, eos_token_id=[]))
    assert pieces
    assert_cache_stayed_in_ortvalues(binding_spy, 4, text_rt.contrib)


# ---------------------------------------------------------------- 3. `edgepeft run` streams
class RecordingStdout:
    """A text stdout that tells what was written and what was flushed."""

    encoding = "utf-8"
    errors = "strict"

    def __init__(self):
        self.written, self.flushed = "", ""

    def write(self, text):
        self.written += text
        return len(text)

    def flush(self):
        self.flushed = self.written

    def isatty(self):
        return False

    def writable(self):
        return True


def run_cli(monkeypatch, args):
    """``edgepeft run`` in-process with a recording stdout.

    Returns (stdout, calls): one record per ``stream_text`` call, its arguments plus the pieces it
    yielded and, for each piece, what stdout had flushed when the piece was generated.
    """
    stdout = RecordingStdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    calls = []
    real = Runtime.stream_text

    def spy(self, prompt, **kwargs):
        calls.append({"prompt": prompt, **kwargs, "before": [], "pieces": []})
        for piece in real(self, prompt, **kwargs):
            calls[-1]["before"].append(stdout.flushed)  # what the user saw before this piece was generated
            calls[-1]["pieces"].append(piece)
            yield piece

    monkeypatch.setattr(Runtime, "stream_text", spy)
    cli_module.main(["run", *map(str, args)])
    return stdout, calls


def test_cli_run_writes_each_piece_before_the_next_is_generated(text_export, text_rt, monkeypatch):
    """Every text piece is written and flushed to stdout while generation is still running, not at the end."""
    stdout, calls = run_cli(monkeypatch, [text_export[0], PROMPT, "--adapter", "tok", "--max-new-tokens", 6])
    assert len(calls) == 1
    pieces = calls[0]["pieces"]
    assert len(pieces) > 2, pieces
    assert calls[0]["before"] == ["".join(pieces[:i]) for i in range(len(pieces))]
    assert stdout.flushed == stdout.written == "".join(pieces) + "\n"
    assert "".join(pieces) == text_rt.generate_text(PROMPT, adapter="tok", max_new_tokens=6)


# None: the model's generation_config.json decides, else transformers' defaults (test_generation_defaults.py)
DEFAULTS = dict(chat=False, max_new_tokens=64, do_sample=None, temperature=None, top_k=None, top_p=None,
                repetition_penalty=None, seed=None)


@pytest.mark.parametrize("flags, changed", [
    (["--top-p", "0.7"], {"top_p": 0.7}),
    (["--do-sample", "--top-p", "0.7"], {"do_sample": True, "top_p": 0.7}),
    (["--do-sample"], {"do_sample": True}),
    (["--greedy"], {"do_sample": False}),
    (["--temperature", "0.5"], {"temperature": 0.5}),
    (["--top-k", "7"], {"top_k": 7}),
    (["--repetition-penalty", "1.3"], {"repetition_penalty": 1.3}),
    (["--seed", "5"], {"seed": 5}),
    (["--max-new-tokens", "3"], {"max_new_tokens": 3}),
    (["--chat"], {"chat": True}),
], ids=["top-p", "do-sample+top-p", "do-sample", "greedy", "temperature", "top-k", "repetition-penalty", "seed",
        "max-new-tokens", "chat"])
def test_cli_run_passes_each_generation_flag_alone(text_export, monkeypatch, flags, changed):
    """Each flag on its own reaches stream_text under its own name; the others keep their defaults."""
    base_flags = [] if "--max-new-tokens" in flags else ["--max-new-tokens", "2"]
    stdout, calls = run_cli(monkeypatch, [text_export[0], PROMPT, "--adapter", "tok", *base_flags, *flags])
    assert len(calls) == 1
    got = {k: v for k, v in calls[0].items() if k not in ("before", "pieces")}
    want = {**DEFAULTS, "max_new_tokens": 2, **changed, "prompt": PROMPT, "adapter": "tok"}
    assert got == want
    assert stdout.written == "".join(calls[0]["pieces"]) + "\n"


@pytest.mark.parametrize("flags, note", [
    (["--top-p", "0.7", "--seed", "3"], "note: --top-p, --seed only apply with --do-sample; decoding greedily"),
    (["--do-sample", "--top-p", "0.7"], ""),
    (["--repetition-penalty", "1.3"], ""),  # applies to greedy decoding too
])
def test_cli_run_notes_sampling_flags_that_greedy_decoding_ignores(text_export, monkeypatch, capsys, flags, note):
    """Sampling flags without --do-sample get a one-line note on stderr (as transformers warns); stdout stays the text."""
    stdout, calls = run_cli(monkeypatch, [text_export[0], PROMPT, "--adapter", "tok", "--max-new-tokens", "2", *flags])
    assert capsys.readouterr().err.strip() == note
    assert stdout.written == "".join(calls[0]["pieces"]) + "\n"
