"""ONNX Runtime session settings for every edgepeft session: threads, optimizations, device.

Pools spin during a call and stop when it returns, unless the app opts in to one
process-wide pool (``use_shared_thread_pool``). ``samples/bench_threads.py`` measures
the settings side by side.
"""
from __future__ import annotations

import os

from .errors import MissingDependencyError

try:
    import onnxruntime as ort
except ImportError:  # the install without an extra: numpy, tokenizers, click only
    raise MissingDependencyError("edgepeft's runtime needs ONNX Runtime: pip install 'edgepeft[cpu]' "
                                 "(or 'edgepeft[gpu]' for NVIDIA GPUs)") from None

_shared_pool = False


def use_shared_thread_pool(threads: int = 0) -> None:
    """Opt in, once at app start: every ONNX Runtime session of this process shares one pool.

    By default each edgepeft session has its own intra-op pool whose threads spin
    during a call and stop spinning as soon as the call returns
    (``session.force_spinning_stop``). Spinning makes small ops cheap (a decode step
    is 1.2-1.5x slower without it); stopping at the end of each call keeps several
    sessions of one process from starving each other on few cores (with pools that
    spin on after their calls, steps were 1.6-2.7x slower; ``samples/bench_threads.py``
    on 2 cores). One shared pool also keeps a single set of threads for all sessions. It is
    process-wide: after this call ONNX Runtime refuses sessions that ask for their own
    pool (``use_per_session_threads``), so only apps that own the process should opt in.
    """
    global _shared_pool
    from onnxruntime.capi import _pybind_state

    _pybind_state.set_global_thread_pool_sizes(threads or os.cpu_count() or 1, 1)
    _shared_pool = True


def session_options(intra_op_threads: int = 0) -> ort.SessionOptions:
    """edgepeft's session options: all graph optimizations, and threads that spin only during a call.

    See use_shared_thread_pool for why spinning stops when each call returns.
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if _shared_pool:
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = intra_op_threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


def device_of(providers) -> tuple[str, int]:
    """Where adapter OrtValues live: on the GPU when CUDA is the first provider."""
    first = providers[0] if providers else "CPUExecutionProvider"
    name, opts = (first if isinstance(first, tuple) else (first, {}))
    if name == "CUDAExecutionProvider":
        return "cuda", int(opts.get("device_id", 0))
    return "cpu", 0
