"""Re-export of the error family, which lives in the torch-free runtime package, and the one error of a training-side
import on an install without the training extras."""
from contextlib import contextmanager

from edgepeft.runtimes.errors import *  # noqa: F401,F403
from edgepeft.runtimes.errors import __doc__  # noqa: F401


TRAINING_PACKAGES = ("torch", "transformers", "onnx", "optimum", "accelerate")


def lacking_training_side(what: str) -> MissingDependencyError | None:  # noqa: F405
    """The error of ``what`` (`edgepeft train`, edgepeft.train) on an install without the training extras (a runtime-only
    one): each package it lacks named, with the install that brings them all; None where it lacks none."""
    import importlib.util

    missing = [m for m in TRAINING_PACKAGES if importlib.util.find_spec(m) is None]
    return MissingDependencyError(f"{what} needs {', '.join(missing)}, which this install lacks (it runs exports only); "  # noqa: F405
                                  "pip install 'edgepeft[train,cpu]'") if missing else None


@contextmanager
def training_side(what: str):
    """Imports of the training side: a package missing there (torch on a runtime-only install) is the one-line error
    the CLI's train and export give, not a ModuleNotFoundError from deep inside."""
    try:
        yield
    except (ModuleNotFoundError, MissingDependencyError) as e:  # noqa: F405
        cause = e if isinstance(e, ModuleNotFoundError) else e.__cause__  # an inner guard's: named as this call
        package = (getattr(cause, "name", None) or "edgepeft").partition(".")[0]
        if package == "edgepeft":
            raise
        raise lacking_training_side(what) or MissingDependencyError(  # noqa: F405
            f"{what} needs {package}, which this install lacks; pip install 'edgepeft[train,cpu]'") from cause


def printed(*args, **_) -> None:
    """export's log where it prints (verbose=True, the CLI's): its ``note:`` lines on standard error, as every other
    command's notes, the rest on standard output (a program reading it got notes there)."""
    import sys

    message = " ".join(map(str, args))
    print(message, file=sys.stderr if message.startswith("note: ") else sys.stdout)


def noted(*args, **_) -> None:
    """A log that prints nothing but gives its ``note:`` lines as EdgePeftWarning: export's notes (generation settings
    it does not apply, adapter weights it leaves out) where it prints nothing else (Python's verbose=False), as
    training's; the CLI prints them (verbose)."""
    message = " ".join(map(str, args))
    if message.startswith("note: "):
        warn(message.removeprefix("note: "))  # noqa: F405

