"""The KV cache's bindings: a prefill's start (``bind_past``), and a fixed-size cache for decode steps on
GroupQueryAttention graphs (``"ops": "contrib"``, ``FixedCache``).

    prefill:      past (B, kv_heads, P, D) --> graph --> present (B, kv_heads, P + T, D)   (as on any graph)
    decode steps: one buffer (B, kv_heads, capacity, D) per cache input, bound as past_key_values.i AND present.i

GroupQueryAttention sees the same buffer as past and present (ONNX Runtime's
``past_present_share_buffer`` mode) and writes each step's key and value in place, at the
position the attention mask's length gives; a step neither copies the whole cache into a
new present nor allocates one, and the cache inputs and the logits output are bound once,
not every step. The buffer starts at the prefill's length plus ``RESERVE`` and doubles when
a step would pass it, never past the model's positions. Standard graphs grow their cache by
Concat, which has no such mode; they keep the dynamic cache. Measured on the benchmark Llama's merged int4 graph with a bare
ONNX Runtime loop: 0.90 ms per decode step with the dynamic cache, 0.69 ms with the fixed
one, the same greedy ids; Runtime.generate then ran within 3% of that bare loop.
"""
from __future__ import annotations

import numpy as np

from .errors import OutOfMemoryError, first_line
from .sessions import ort

RESERVE = 64  # decode steps the first buffer holds


class FixedCache:
    """Per cache input a buffer that decode steps bind as past and present; ``length`` positions are filled.

    The steps' logits (B, 1, V) go to one buffer too (``logits``), bound once with the cache: a step binds
    only its token, mask and position, and reads no other output.
    """

    def __init__(self, rt, outputs: list):
        """``outputs``: the prefill's, logits (B, T, V) then the presents (B, kv_heads, P + T, D)."""
        self.rt = rt
        arrays = [p.numpy() for p in outputs[1:]]
        self.length = arrays[0].shape[2]
        batch, _, vocab = outputs[0].shape()
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type((batch, 1, vocab), np.float32, *rt.device)
        self._allocate(arrays, self._capped(self.length + RESERVE))

    def _allocate(self, arrays: list, capacity: int) -> None:
        self.buffers = []  # numpy-backed OrtValues on the CPU (they hold their arrays), device copies on a GPU
        for a in arrays:
            try:
                buffer = np.zeros((*a.shape[:2], capacity, a.shape[3]), np.float32)
            except MemoryError as e:  # numpy's "Unable to allocate": as the graph's own allocations are said
                raise OutOfMemoryError.of(self.rt.base_dir, f"the cache of {a.shape[0]} row(s) x {capacity} positions",
                                          first_line(e)) from None
            buffer[:, :, : self.length] = a[:, :, : self.length]
            self.buffers.append(ort.OrtValue.ortvalue_from_numpy(buffer, *self.rt.device))
        self.capacity = capacity
        self._bound = None  # the binding the buffers are bound to

    def _capped(self, capacity: int) -> int:
        """No more positions than the model has (generation refuses to go past them)."""
        return min(capacity, self.rt.max_positions) if self.rt.max_positions else capacity

    def bind(self, binding, length: int) -> None:
        """Bind the buffers for a step after which ``length`` positions are filled (doubling them first if needed)."""
        if length > self.capacity:
            self._allocate([b.numpy() for b in self.buffers], max(length, self._capped(2 * self.capacity)))
        self.length = length
        if binding is self._bound:
            return
        self._bound = binding
        binding.bind_ortvalue_output(self.rt.output_name, self.logits)
        for past, present, value in zip(self.rt.cache_inputs, self.rt.cache_outputs, self.buffers):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)


def bind_past(rt, binding, plan, batch: int, length: int, past) -> None:
    """Bind the cache inputs: ``past`` None is a prefill (the adapter's cache start repeated over the batch, a
    prefix, else empty); a ``FixedCache`` binds its buffers, for a step that fills ``length`` positions;
    else ``past`` is the previous step's present OrtValues."""
    if isinstance(past, FixedCache):
        past.bind(binding, length)
    elif past is not None:
        for name, value in zip(rt.cache_inputs, past):
            binding.bind_ortvalue_input(name, value)
    else:
        empty = np.zeros((batch, rt.cache["num_kv_heads"], 0, rt.cache["head_dim"]), np.float32)
        for name in rt.cache_inputs:
            start = plan.past.get(name)
            binding.bind_cpu_input(name, empty if start is None else np.repeat(start, batch, axis=0))
