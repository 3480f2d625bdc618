"""edgepeft.runtimes: run an edgepeft export with ONNX Runtime.

Imports onnxruntime, numpy and the standard library only (``tokenizers`` when
present), never torch, transformers or onnx, so it embeds in apps on devices.
ONNX Runtime is imported on first use of ``Runtime`` (``pip install 'edgepeft[cpu]'`` or
``'edgepeft[gpu]'``), so the errors and the manifest reader work without it.
"""
from .errors import (
    AdapterBaseMismatchError,
    AdapterInUseError,
    ArtifactNotFoundError,
    ConfigError,
    CorruptArtifactError,
    DataError,
    EdgePeftError,
    EdgePeftWarning,
    ExportValidationError,
    InvalidInputError,
    MissingDependencyError,
    OutOfMemoryError,
    StorageError,
    TrainingInterrupted,
    UnknownAdapterError,
    UnsupportedMethodError,
    UnsupportedModelError,
)

_LAZY = {"Runtime": "runtime", "session_options": "sessions", "use_shared_thread_pool": "sessions"}


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'edgepeft.runtimes' has no attribute {name!r}")


__all__ = [
    "Runtime",
    "session_options",
    "use_shared_thread_pool",
    "EdgePeftError",
    "EdgePeftWarning",
    "AdapterBaseMismatchError",
    "AdapterInUseError",
    "ArtifactNotFoundError",
    "ConfigError",
    "CorruptArtifactError",
    "DataError",
    "ExportValidationError",
    "InvalidInputError",
    "OutOfMemoryError",
    "UnknownAdapterError",
    "UnsupportedMethodError",
    "UnsupportedModelError",
    "MissingDependencyError",
    "StorageError",
    "TrainingInterrupted",
]
