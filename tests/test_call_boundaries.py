"""What a call reads, and when, where an app runs calls from threads and ends them from signal handlers (found by a
hunt): a stream's inputs are read at the call; an app's TimeoutError comes through as itself."""
from __future__ import annotations

import numpy as np
import pytest

from tiny import sample_batch


def test_a_stream_runs_the_inputs_it_checked_at_the_call(shared_export):
    """stream() and step_logits() checked the caller's arrays at the call and read them at the first next(): a buffer
    refilled in between (a request handler's) was generated from unchecked (another prompt, a row of no tokens, an id
    out of the vocabulary as ONNX Runtime's raw error). transformers' generate reads its inputs at the call."""
    from edgepeft.runtimes import Runtime

    out, _, _ = shared_export("llama")
    rt = Runtime(out)
    ids, mask = sample_batch(batch=2, seq=5)
    want = rt.generate(ids, mask, adapter="qv", max_new_tokens=4, eos_token_id=[])[:, 5:]
    want_logits = next(rt.step_logits(ids, mask, adapter="qv"))
    buffer, buffer_mask = ids.copy(), mask.copy()
    stream = rt.stream(buffer, buffer_mask, adapter="qv", max_new_tokens=4, eos_token_id=[])
    steps = rt.step_logits(buffer, buffer_mask, adapter="qv")
    buffer[:], buffer_mask[:] = 10_000, 0  # the next request's, or a refill gone wrong
    assert np.array_equal(np.stack(list(stream), 1), want)
    np.testing.assert_array_equal(next(steps), want_logits)


def test_a_stream_reads_its_adapters_and_chat_at_the_call_and_keeps_its_own_tokens(shared_export, text_export):
    """An invariance hunt: stream() and step_logits() read a per-row list or a weights dict at the first next(), so
    an app's list reused for its next request gave other adapters; stream_text read its chat history (and checked
    its arguments) then; a streamed token the caller edited was fed to the model; adapter_tensors' numpy() views were
    the staged tensors, an edit changing calls by name and not mixed batches. Each edit is now the caller's own."""
    from edgepeft.errors import UnknownAdapterError
    from edgepeft.runtimes import Runtime

    rt = Runtime(shared_export("llama")[0])
    ids, mask = sample_batch(batch=2, seq=5)
    options = dict(max_new_tokens=4, eos_token_id=[])
    want = rt.generate(ids, mask, adapter=["qv", "mlp"], **options)[:, 5:]
    want_logits = next(rt.step_logits(ids, mask, adapter={"qv": 0.5, "all": 0.5}))
    rows, weights = ["qv", "mlp"], {"qv": 0.5, "all": 0.5}
    stream, steps = rt.stream(ids, mask, adapter=rows, **options), rt.step_logits(ids, mask, adapter=weights)
    rows[:], weights["qv"] = [None, "all"], 2.0  # the app's next request
    tokens = []
    for token in stream:
        tokens.append(token.copy())
        token[:] = 7  # the caller's array, reused
    assert np.array_equal(np.stack(tokens, 1), want)
    np.testing.assert_array_equal(next(steps), want_logits)
    staged = rt.forward(ids, mask, adapter="qv")["logits"]
    for value in rt.adapter_tensors("qv").values():
        value.numpy()[...] = 0  # the caller's copy
    np.testing.assert_array_equal(rt.forward(ids, mask, adapter="qv")["logits"], staged)
    out = Runtime(text_export[0])
    history = [{"role": "user", "content": "w99 w98"}]
    answer = out.generate_text(history, adapter="tok", chat=True, **options)
    stream = out.stream_text(history, adapter="tok", chat=True, **options)
    history[:] = [{"role": "user", "content": "w10"}]  # the app's next conversation, while the answer streams
    assert "".join(stream) == answer != out.generate_text(history, adapter="tok", chat=True, **options)
    with pytest.raises(UnknownAdapterError):
        out.stream_text("w10", adapter="nope")  # at the call, as stream's


def _raising_at(code, line: int):
    """A trace function that raises TimeoutError (what a timeout's signal handler raises) as ``code`` reaches
    ``line``: an app's exception at that point of the call."""
    def trace(frame, event, arg):
        if frame.f_code is code:
            def local(frame, event, arg):
                if event == "line" and frame.f_lineno == line:
                    raise TimeoutError("the app's timeout")
                return local
            return local
        return None
    return trace


def test_an_apps_timeout_anywhere_in_a_restage_comes_through_and_leaves_the_store_serving(shared_export):
    """A timeout's exception inside a restage (budget 0: every call restages) came back as "ONNX Runtime cannot run
    the adapter graph ...; re-export the adapter" or "missing or changed (re-exported?)" of intact files; one between
    two lines of the store's bookkeeping left every later call a KeyError, or every later trim off (the budget no
    longer kept)."""
    import inspect
    import sys

    from edgepeft.runtimes import Runtime
    from edgepeft.runtimes.adapter_graph import run_adapter_graph
    from edgepeft.runtimes.adapters import AdapterStore
    from edgepeft.runtimes.manifest import check_adapter_graph

    out, _, _ = shared_export("llama")
    rt = Runtime(out, adapter_budget_bytes=0)
    ids, mask = sample_batch(batch=1, seq=4)
    want = rt.forward(ids, mask, adapter="qv")["logits"]
    places = []  # every line, but the first of a finally (no Python code can guard against an exception there)
    for f in (AdapterStore._acquire, AdapterStore.holding.__wrapped__, AdapterStore._set_staged, AdapterStore.trim,
              AdapterStore._drop, AdapterStore._unchanged_graph, run_adapter_graph, check_adapter_graph):
        lines, first = inspect.getsourcelines(f)
        places += [(f, first + i) for i in range(1, len(lines)) if lines[i - 1].strip() != "finally:"]
    outcomes = set()
    for f, line in places:
        sys.settrace(_raising_at(f.__code__, line))
        try:
            rt.forward(ids, mask, adapter="qv")
            outcomes.add("finished")
        except TimeoutError:
            outcomes.add("TimeoutError")
        finally:
            sys.settrace(None)
        np.testing.assert_array_equal(rt.forward(ids, mask, adapter="qv")["logits"], want, err_msg=f"{f.__name__}:{line}")
        assert rt.store.resident_bytes == 0 and not rt.store.get("qv").holds, f"{f.__name__}:{line}"  # budget, holds
    assert outcomes == {"finished", "TimeoutError"}


def test_an_apps_timeout_while_the_first_text_call_looks_for_a_file_is_no_file_missing(text_export, monkeypatch):
    """os.path.isfile says False on any OSError, TimeoutError among them: a timeout's exception while the first text
    call looked for tokenizer_config.json made a tokenizer without it (no chat template, no bos_token), kept for the
    Runtime's life."""
    import os

    from edgepeft.runtimes import Runtime

    out = text_export[0]
    chat = [{"role": "user", "content": "hi"}]
    want = Runtime(out).generate_text(chat, adapter="tok", chat=True, max_new_tokens=3)
    stat, fired = os.stat, []

    def timing_out(path, *args, **kwargs):
        if str(path).endswith(("tokenizer_config.json", "modules.json")) and not fired:
            fired.append(path)
            raise TimeoutError("the app's timeout")
        return stat(path, *args, **kwargs)

    rt = Runtime(out)
    monkeypatch.setattr(os, "stat", timing_out)
    try:
        rt.generate_text(chat, adapter="tok", chat=True, max_new_tokens=3)
        raise AssertionError("no TimeoutError")
    except TimeoutError:
        pass
    monkeypatch.undo()
    assert fired and rt.generate_text(chat, adapter="tok", chat=True, max_new_tokens=3) == want


def test_an_import_is_read_as_stopped_by_its_cause_only():
    """A review: an import failing inside an app's own `except TimeoutError:` (its __context__) re-raised the app's
    error where the package was missing; an interrupt the binding raised it from (__cause__) is raised as itself."""
    from edgepeft.runtimes.errors import raise_if_stopped

    try:
        raise TimeoutError("the app's own, being handled")
    except TimeoutError:
        try:
            raise ImportError("No module named 'tokenizers'")
        except ImportError as e:
            assert raise_if_stopped(e) is None
    started = ImportError("initialization failed")
    started.__cause__ = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        raise_if_stopped(started)


@pytest.mark.parametrize("call", ["generate", "generate_text"])
def test_an_interrupt_between_two_steps_kept_by_a_repl_releases_the_adapter(text_export, call):
    """A threads hunt: a Ctrl-C landing in generate's (or generate_text's) own loop between two decode steps, its
    exception then kept (as the REPL and Jupyter keep sys.last_value), left the stream alive in the kept frame, the
    adapter held: unload_adapter said "in use by 1 call(s)" with no call running. The stream is closed now."""
    import sys

    from edgepeft.runtimes import Runtime

    rt, yielded = Runtime(text_export[0]), []

    def trace(frame, event, arg):  # after the stream's first token, the next line its consumer runs raises
        if frame.f_code.co_name == "stream_tokens" and event == "return":
            yielded.append(True)
        elif yielded and event == "line" and frame.f_code.co_name in ("drained", "<listcomp>", "generate_text"):
            raise KeyboardInterrupt
        return trace

    sys.settrace(trace)
    try:
        if call == "generate":
            rt.generate([[5, 9, 2, 7]], adapter="tok", max_new_tokens=6, eos_token_id=[])
        else:
            rt.generate_text("w99 w98", adapter="tok", max_new_tokens=6, eos_token_id=[])
    except KeyboardInterrupt as e:
        kept = e  # noqa: F841 (the REPL's sys.last_value: its traceback keeps the frames)
    finally:
        sys.settrace(None)
    assert yielded and "kept" in locals()
    rt.unload_adapter("tok")  # no call runs: nothing holds it


def test_an_apps_own_exception_inside_onnx_runtime_comes_through_as_raised(shared_export, monkeypatch):
    """A threads hunt: a timeout library's own exception class (stopit's TimeoutException derives from Exception),
    landing while ONNX Runtime opened an adapter graph at a restage, was "ONNX Runtime cannot run the adapter graph
    (...); re-export the adapter" of intact files; opening the base, "re-export the base". Only ONNX Runtime's own
    errors are read as the graph's now."""
    import onnxruntime as ort

    from edgepeft.runtimes import Runtime

    class Deadline(Exception):
        pass

    out, _, _ = shared_export("llama")
    rt = Runtime(out, adapter_budget_bytes=0)  # every call restages
    ids, mask = sample_batch(batch=1, seq=4)
    real = ort.InferenceSession

    def late(*args, **kwargs):
        raise Deadline("the app's deadline")

    monkeypatch.setattr(ort, "InferenceSession", late)
    with pytest.raises(Deadline):
        rt.forward(ids, mask, adapter="qv")
    with pytest.raises(Deadline):
        Runtime(out)
    monkeypatch.setattr(ort, "InferenceSession", real)
    assert rt.forward(ids, mask, adapter="qv")["logits"].shape[0] == 1  # nothing was damaged
