"""ONNX Runtime session settings for every edgepeft session: threads, optimizations, device.

Pools spin during a call and stop when it returns, unless the app opts in to one
process-wide pool (``use_shared_thread_pool``). ``samples/bench_threads.py`` measures
the settings side by side.
"""
from __future__ import annotations

import re

from .access import check_readable, weights_out_of_reach
from .commands import REEXPORT_BASE
from .errors import (ConfigError, CorruptArtifactError, MissingDependencyError, OutOfMemoryError, StorageError,
                     first_line, raise_if_stopped)
from .values import is_whole

try:
    import onnxruntime as ort
except ImportError as e:  # the install without an extra: numpy, tokenizers, click only
    raise_if_stopped(e)
    raise MissingDependencyError("edgepeft's runtime needs ONNX Runtime: pip install 'edgepeft[cpu]' "
                                 "(or 'edgepeft[gpu]' for NVIDIA GPUs)") from None

# what ONNX Runtime raises for a graph it cannot load or run: its own types (Fail, InvalidGraph, ...: plain
# Exceptions) and its Python wrapper's; an app's own exception (a timeout library's, landing inside) goes through as
# raised, never read as the graph's fault (a threads hunt: "re-export the adapter" for an app's deadline)
ORT_ERRORS = (*(t for t in vars(ort.capi.onnxruntime_pybind11_state).values()
                if isinstance(t, type) and issubclass(t, Exception)), RuntimeError, ValueError, TypeError)
MIN_ORT = (1, 22)  # the decoders' GroupQueryAttention takes 11 inputs from 1.22 (1.20 and 1.21 refuse the graph)
_shared_pool = None  # the threads use_shared_thread_pool made the pool with (0: ONNX Runtime's default), once made


def shared_pool() -> bool:
    """Whether this process's sessions share one pool (``use_shared_thread_pool``)."""
    return _shared_pool is not None


def ort_version() -> tuple:
    """ONNX Runtime's (major, minor)."""
    return tuple(int(part) for part in ort.__version__.split(".")[:2])


def needs_ort(version: tuple, what: str) -> None:
    """MissingDependencyError where the installed ONNX Runtime is older than ``version`` (``what`` needs it)."""
    if ort_version() < version:
        raise MissingDependencyError(f"{what} needs onnxruntime>={'.'.join(map(str, version))}, this is "
                                     f"{ort.__version__}; pip install -U onnxruntime (or onnxruntime-gpu)")


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
    pool (``use_per_session_threads``), so only apps that own the process should opt in. The shared pool's threads
    spin on after every call (ONNX Runtime's Python API has no setting that stops them: 0.56 s of CPU over 15 calls
    100 ms apart, against 0.02 s of work), as ``edgepeft bench --shared-threads`` says.
    """
    global _shared_pool
    from onnxruntime.capi import _pybind_state

    check_threads(threads, "use_shared_thread_pool")
    if shared_pool():  # ONNX Runtime makes the pool once per process: a second call can only repeat the first
        if threads != _shared_pool:
            raise ConfigError(f"use_shared_thread_pool: this process's pool is already made, with threads="
                              f"{_shared_pool} (asked: {threads}); call it once, at app start")
        return
    _pybind_state.set_global_thread_pool_sizes(threads, 1)  # 0: ONNX Runtime's default, as a session's own pool
    _shared_pool = int(threads)


def session_options(intra_op_threads: int = 0) -> ort.SessionOptions:
    """edgepeft's session options: all graph optimizations, and threads that spin only during a call (after
    use_shared_thread_pool: the shared pool, which spins on).

    See use_shared_thread_pool for why spinning stops when each call returns.
    """
    check_threads(intra_op_threads, "session_options")
    if shared_pool() and intra_op_threads:  # ONNX Runtime would run the session on the shared pool all the same
        raise ConfigError(f"session_options: this process's sessions share one pool (use_shared_thread_pool("
                          f"{_shared_pool})); a session cannot have {intra_op_threads} threads of its own: call "
                          "session_options() without intra_op_threads")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if shared_pool():
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = intra_op_threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


def check_threads(threads, call: str) -> None:
    if not (is_whole(threads) and 0 <= threads < 2**31):  # ONNX Runtime's int (past it: a pybind TypeError)
        raise ConfigError(f"{call}: threads must be a whole number from 0 (ONNX Runtime's default: one per physical "
                          f"core) below 2**31, got {threads!r}")


def device_of(session) -> tuple[str, int]:
    """Where adapter OrtValues live: on the GPU when CUDA is the session's first provider. The providers the
    session runs on, not the ones asked for: ONNX Runtime falls back to the CPU when CUDA cannot start."""
    first = session.get_providers()[0]
    if first == "CUDAExecutionProvider":
        return "cuda", int(session.get_provider_options()[first].get("device_id", 0))
    return "cpu", 0


def check_providers(providers, sess_options) -> list | None:
    """The providers list to open a session with (default: the CPU; None where sess_options chose them), the
    arguments' types checked."""
    if sess_options is not None and not isinstance(sess_options, ort.SessionOptions):
        raise ConfigError(f"sess_options must be an onnxruntime.SessionOptions (see edgepeft.runtimes.session_options), "
                          f"got {type(sess_options).__name__}")
    if sess_options is not None and shared_pool() and sess_options.use_per_session_threads:
        raise ConfigError("sess_options asks for a thread pool of its own, which ONNX Runtime refuses after "
                          "use_shared_thread_pool(); set sess_options.use_per_session_threads = False, or start from "
                          "edgepeft.runtimes.session_options()")
    if sess_options is not None and not shared_pool() and not sess_options.use_per_session_threads:
        raise ConfigError("sess_options.use_per_session_threads = False takes the process's shared thread pool, which "
                          "ONNX Runtime has only after edgepeft.runtimes.use_shared_thread_pool(): call that first, "
                          "at app start, or leave use_per_session_threads True")
    if providers is None and sess_options is not None and hasattr(sess_options, "has_providers") \
            and sess_options.has_providers():
        return None  # the app chose them on sess_options (ONNX Runtime 1.22+: add_provider_for_devices, a policy)
    if providers is None or (isinstance(providers, (list, tuple)) and not providers):  # none: the CPU
        return ["CPUExecutionProvider"]
    if isinstance(providers, str) or not isinstance(providers, (list, tuple)) or not all(
            isinstance(p, str) or (isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
                                   and isinstance(p[1], dict)) for p in providers):
        raise ConfigError(f"providers must be a list of ONNX Runtime provider names (or (name, options) pairs), e.g. "
                          f"['CUDAExecutionProvider', 'CPUExecutionProvider'], got {providers!r}")
    return list(providers)


def open_base_session(graph: str, providers: list, sess_options):
    """The base graph's session. A graph ONNX Runtime cannot load is the export's fault (CorruptArtifactError),
    unless it loads with edgepeft's own options: then the app's ``sess_options`` are (ConfigError), and
    re-exporting would not help."""
    try:
        return ort.InferenceSession(graph, sess_options=sess_options or session_options(), providers=providers)
    except ORT_ERRORS as e:
        reason = first_line(e)
    if sess_options is not None:
        try:  # the CPU where sess_options chose the providers (a GPU build asks for a list)
            ort.InferenceSession(graph, sess_options=session_options(), providers=providers or ["CPUExecutionProvider"])
        except ORT_ERRORS:
            pass
        else:
            raise ConfigError(f"{graph}: ONNX Runtime cannot load the base graph with the sess_options given "
                              f"({reason}); it loads with edgepeft.runtimes.session_options(): start from those")
    for path in (graph, f"{graph}.data"):  # another user's files: not the export's fault
        check_readable(path)
    if problem := weights_out_of_reach(graph):  # intact files, another layout
        raise StorageError(problem)
    needs_ort(MIN_ORT, f"{graph}: ONNX Runtime cannot load the base graph ({reason}); edgepeft's export")
    raise CorruptArtifactError(f"{graph}: ONNX Runtime cannot load the base graph ({reason}); {REEXPORT_BASE}")


_NO_MEMORY = re.compile(r"Failed to allocate memory[^\n]*|bad[ _]alloc\w*|out of memory")  # CPU arena, C++, CUDA
_QUIET = ort.RunOptions()
_QUIET.log_severity_level = 4  # a kernel's failure is raised, not also logged in red above the CLI's one line


def run_bound(session, binding, where: str, mask_shape: tuple) -> None:
    """Runs the base graph on its bound inputs. Activations that do not fit in memory (a batch of 20,000 rows) are
    the call's to shrink (OutOfMemoryError), where they were ONNX Runtime's RuntimeError in a traceback."""
    try:
        session.run_with_iobinding(binding, _QUIET)
    except Exception as e:  # onnxruntime raises RuntimeError or its own types
        if not (found := _NO_MEMORY.search(str(e))):
            raise
        raise OutOfMemoryError.of(where, f"a batch of {mask_shape[0]} row(s) x {mask_shape[1]} positions",
                                  found.group(0)) from None
