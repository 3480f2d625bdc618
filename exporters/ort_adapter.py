"""ONNX Runtime's own adapter format (``.onnx_adapter``) beside edgepeft's adapter graph.

ONNX Runtime (1.20+) binds an adapter's named tensors over a session's inputs with
``RunOptions.add_active_adapter``, and onnxruntime-genai loads such files too. That is
the same mechanism as edgepeft's slots, so an adapter whose every slot is a plain graph
input bound at every step (LoRA, IA3, bottleneck, task heads) can also be written in that
format (``export(..., ort_adapter=True)``, ``--ort-adapter``; it doubles the adapter's
bytes on disk): ``ort.LoraAdapter`` + the exported base then run it without edgepeft; so can an
encoder's prefix (BERT: its keys and values are inputs of every run). Prompt tuning, and a
decoder's prefix, also change the mask, the positions or the starting cache, which those
tools do not do, so they get no such file.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile

import onnxruntime as ort

from edgepeft.files import NO_WRITE
from edgepeft.runtimes.manifest import LAYOUT_VERSION
from edgepeft.runtimes.sessions import session_options


def applies(slots) -> bool:
    """True when binding the tensors as inputs at every run is the whole adapter."""
    return bool(slots) and all(s.phase == "every" and not s.target and s.virtual_axis is None for s in slots)


def write_ort_adapter(graph_path: str, out_path: str) -> None:
    """Run the adapter graph once and store its outputs (the slot tensors, full size) as an ``.onnx_adapter``."""
    # edgepeft's options: after use_shared_thread_pool(), ONNX Runtime refuses a session asking for threads of its own
    session = ort.InferenceSession(graph_path, session_options(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    arrays = session.run(None, {})
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(LAYOUT_VERSION)
    adapter.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in zip(names, arrays)})
    try:
        adapter.export_adapter(out_path)
    except RuntimeError:  # "Failed to write N bytes": an OSError where space or quota ran out, as other writers give
        lacking = _no_room(os.path.dirname(os.path.abspath(out_path)), sum(a.nbytes for a in arrays))
        if lacking:
            raise OSError(lacking, os.strerror(lacking), out_path) from None
        raise


def _no_room(folder: str, size: int) -> int | None:
    """ENOSPC, EDQUOT or EFBIG where a file of ``size`` bytes cannot be made in ``folder``: it is allocated and removed (a
    quota leaves the disk's free space as it is); where the platform or filesystem cannot allocate, free space tells."""
    if not os.path.isdir(folder):
        return None
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".edgepeft-room-")
    except OSError as e:
        return e.errno if e.errno in NO_WRITE else None
    try:
        os.posix_fallocate(fd, 0, max(size, 1))
    except (AttributeError, OSError) as e:  # AttributeError: no posix_fallocate (macOS, Windows)
        if getattr(e, "errno", None) in NO_WRITE:
            return e.errno
        return errno.ENOSPC if shutil.disk_usage(folder).free < size else None
    finally:
        os.close(fd)
        os.remove(probe)
    return None
