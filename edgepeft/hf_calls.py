"""HF PEFT's PeftModel calls that edgepeft's PeftModel answers otherwise: refused with what to call instead, rather
than falling through to transformers' own PEFT integration (a false "use PEFT >= 0.22"), to an AttributeError, or to
a keyword transformers takes and ignores."""
from __future__ import annotations

from edgepeft.errors import ConfigError

_ELSEWHERE = {
    "merge_adapter": "merge_and_unload() (a merged copy; the PeftModel stays as it is)",
    "unmerge_adapter": "merge_and_unload() (a merged copy; the PeftModel stays as it is)",
    "enable_adapters": "`with model.disable_adapter():` (the adapter is back when the block ends)",
    "disable_adapters": "`with model.disable_adapter():`",
    "enable_adapter_layers": "`with model.disable_adapter():` (the adapter is back when the block ends)",
    "disable_adapter_layers": "`with model.disable_adapter():`",
}


def elsewhere(name: str):
    """A stand-in for HF PEFT's call ``name`` that raises ConfigError naming edgepeft's way; None for other names."""
    if name not in _ELSEWHERE:
        return None

    def refused(*args, **kwargs):
        raise ConfigError(f"{name}() (HF PEFT's) is not in edgepeft's PeftModel; use {_ELSEWHERE[name]}")
    return refused


def refuse_adapter_names(kwargs: dict) -> None:
    """HF PEFT's ``adapter_names=`` (an adapter per row) is not in the PyTorch model: transformers took the keyword
    and ran the active adapter on every row, or refused it with its own error."""
    if kwargs.pop("adapter_names", None) is not None:  # None: every row the active adapter, as HF PEFT takes it
        raise ConfigError("adapter_names= (an adapter per row) is not in edgepeft's PyTorch model: run one adapter "
                          "per call (set_adapter), or export and pass adapter=[...] to the runtime's forward/generate")
