"""What a call reads, and when, where an app runs calls from threads and ends them from signal handlers (found by a
hunt): a stream's inputs are read at the call; an app's TimeoutError comes through as itself."""
from __future__ import annotations

import numpy as np

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
