"""The one exception family of edgepeft.

Every user-facing failure raises an ``EdgePeftError`` subclass whose message says
what was wrong, which file it concerns, and what to do. The CLI prints the message
as one line and exits non-zero. This module is pure Python so the torch-free
runtime can raise the same errors as the exporter.
"""


class EdgePeftError(Exception):
    """Base class of every error edgepeft raises for bad input or bad artifacts."""


class EdgePeftWarning(UserWarning):
    """Input edgepeft reads but partly ignores (an adapter config's unknown fields). The CLI prints each once as a
    ``note:`` line; an app filters them by this category (``warnings.filterwarnings("ignore", category=...)``)."""


class ConfigError(EdgePeftError):
    """An adapter config or a call's arguments are invalid."""


class UnsupportedModelError(EdgePeftError):
    """The model architecture, task or layer type is not supported."""


class UnsupportedMethodError(EdgePeftError):
    """The adapter's PEFT method (``peft_type``) or one of its options is not supported."""


class ArtifactNotFoundError(EdgePeftError):
    """A file or folder that should exist does not."""


class CorruptArtifactError(EdgePeftError):
    """A file exists but cannot be read, fails its checksum, or has the wrong content."""


class AdapterBaseMismatchError(EdgePeftError):
    """An adapter was made for another base model or another slot table."""


class UnknownAdapterError(EdgePeftError):
    """A call names an adapter that is not loaded."""


class AdapterInUseError(EdgePeftError):
    """An adapter cannot be unloaded while a call is using it."""


class InvalidInputError(EdgePeftError):
    """Model inputs have the wrong type, shape or values."""


class OutOfMemoryError(InvalidInputError):
    """A call's inputs need more memory than the device has (the message says how much was asked)."""

    @classmethod
    def of(cls, where: str, what: str, cause: str) -> "OutOfMemoryError":
        """``what`` (rows and positions) did not fit, as ``cause`` (the allocator's words) says: one wording, one fix."""
        return cls(f"{where}: {what} does not fit in memory here ({cause[:120]}); use a smaller batch or shorter inputs")


class ExportValidationError(EdgePeftError):
    """The exported ONNX graph does not match PyTorch within tolerance."""


class DataError(EdgePeftError):
    """A training or evaluation data file has a malformed row (the message names the file and line)."""


class TrainingInterrupted(EdgePeftError):
    """Training was interrupted (Ctrl-C); the message names the checkpoint and the command that resumes it."""


class StorageError(EdgePeftError):
    """The disk refused: no space (or quota) left for a write, or no permission to read; the message names where."""


class MissingDependencyError(EdgePeftError, ImportError):
    """A package this part of edgepeft needs is not installed; the message names the pip extra that brings it."""


# What an app raises to end a call (a timeout's signal handler: TimeoutError, InterruptedError, both OSErrors): let
# through as raised, never read as a file's fault ("damaged, re-export") nor as a file missing (os.path.isfile says
# False on any OSError: a tokenizer built so, without its config, was kept for the Runtime's life)
STOPS = (TimeoutError, InterruptedError)


def raise_if_stopped(error: ImportError) -> None:
    """A Ctrl-C (or an app's stop) that landed in a package's own start, raised as that, not read as the package
    missing: ONNX Runtime's binding turns one into ImportError("initialization failed"), which was "needs ONNX
    Runtime: pip install", exit 1."""
    cause, seen = error.__cause__, set()  # the binding's "from": not __context__, an app's own error being handled
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (KeyboardInterrupt, *STOPS)):
            raise cause.with_traceback(None) from None
        seen.add(id(cause))
        cause = cause.__cause__


def first_line(error: BaseException) -> str:
    """ONNX Runtime's (or another library's) error in one line of a readable length: a forged graph's error named
    each of its 100,000 inputs (megabytes)."""
    return (str(error).splitlines() or [""])[0][:300]


def warn(message: str) -> None:
    """``message`` as an EdgePeftWarning shown at the line that called into edgepeft (the app's, a script's), not at
    edgepeft's own, wherever inside it the warning arose: the first frame of another package's module."""
    import sys
    import warnings

    level, frame = 1, sys._getframe(0)
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "edgepeft":
        frame, level = frame.f_back, level + 1
    warnings.warn(message, EdgePeftWarning, stacklevel=level)
