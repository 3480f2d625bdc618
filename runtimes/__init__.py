"""edgepeft.runtimes: run an edgepeft export with ONNX Runtime.

Imports onnxruntime, numpy and the standard library only (``tokenizers`` when
present), never torch, transformers or onnx, so it embeds in apps on devices.
"""
from .errors import (
    AdapterBaseMismatchError,
    AdapterInUseError,
    ArtifactNotFoundError,
    ConfigError,
    CorruptArtifactError,
    EdgePeftError,
    ExportValidationError,
    InvalidInputError,
    UnknownAdapterError,
    UnsupportedMethodError,
    UnsupportedModelError,
)
from .runtime import Runtime
from .sessions import session_options, use_shared_thread_pool

__all__ = [
    "Runtime",
    "session_options",
    "use_shared_thread_pool",
    "EdgePeftError",
    "AdapterBaseMismatchError",
    "AdapterInUseError",
    "ArtifactNotFoundError",
    "ConfigError",
    "CorruptArtifactError",
    "ExportValidationError",
    "InvalidInputError",
    "UnknownAdapterError",
    "UnsupportedMethodError",
    "UnsupportedModelError",
]
