"""What counts as an integer or a real number in arguments, configs and manifests (numpy scalars included).

bool is an int subclass in Python, but True is no size, seed or rank.
"""
from __future__ import annotations

import numpy as np

from .errors import ConfigError


def switch(value, name: str, hint: str = "") -> bool:
    """A True/False setting (numpy's bool too) as a bool, else ConfigError: a "False" (a string) read as true."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be True or False, got {value!r:.40}{hint}")
    return bool(value)


def is_whole(value) -> bool:
    """An int (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_kind(value, kinds) -> bool:
    """``isinstance`` where bool is no int (a manifest's JSON values)."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)


def is_number(value) -> bool:
    """An int or float (Python or numpy), infinite or NaN too, not a bool: a tolerance's type; an int no float holds
    (10**400) is none (float() of it overflows, after the work where it was compared)."""
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, (bool, np.bool_)):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def as_float(value):
    """A numpy scalar of a float type numpy's own types leave out (ml_dtypes' bfloat16 or float8, which onnx and JAX
    use: "not a number" to ``is_number``) as a Python float; anything else as it is, for the checks to name."""
    if isinstance(value, np.generic) and value.dtype.kind == "V":
        try:
            return float(value)
        except (TypeError, ValueError):  # a structured scalar
            return value
    return value


def is_real(value) -> bool:
    """A finite number (``is_number``)."""
    return is_number(value) and bool(np.isfinite(float(value)))


HALF_CHARACTER = "holds half of a character (a lone surrogate: bytes read in another encoding than UTF-8); pass it as UTF-8 text"


def half_character(text: str) -> bool:
    """Whether ``text`` holds half of a character (a lone surrogate: bytes read in another encoding than UTF-8, a
    string cut inside an emoji). No tokenizer takes one, and no model's text holds one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def size_text(n: int) -> str:
    """``n`` bytes in the largest unit under 1024 of it: "512 B", "585.0 KiB", "2.3 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
