"""Fingerprints: which base (weights + config) and which slot table an artifact belongs to."""
from __future__ import annotations

import hashlib
import json

import torch

# Config keys that name or describe a checkpoint but do not change the computation.
_VOLATILE = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "id2label", "label2id",
             "_attn_implementation_autoset", "use_cache"}


def weights_fingerprint(model: torch.nn.Module, skip_modules=(), config: bool = True) -> str:
    """sha256 of the model config (``config``: with it) and every tensor (name, dtype, shape, bytes).

    ``skip_modules`` are left out: weights that are not the base's (``made_heads``). A base's own head counts
    even when it is a slot: the graph uses it wherever an adapter leaves the slot empty.
    """
    h = hashlib.sha256()
    if config:
        h.update(json.dumps(_counted_config(model), sort_keys=True, default=str).encode())
    skip = tuple(m + "." for m in skip_modules)
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(skip):
            continue
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim: a view fails
    return h.hexdigest()


def _counted_config(model) -> dict:
    return {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE}


def config_differences(a: torch.nn.Module, b: torch.nn.Module) -> list:
    """The config.json keys two models' fingerprints count and differ in."""
    x, y = _counted_config(a), _counted_config(b)
    return sorted(k for k in x.keys() | y.keys() if k not in x or k not in y or x[k] != y[k])


def made_heads(model: torch.nn.Module) -> set:
    """The classifier modules ``load_base`` made (seeded, untrained) for a checkpoint without one: not the base's
    weights, so they stay out of its fingerprint."""
    return set(getattr(model, "edgepeft_made_heads", ()))


def base_fingerprint(weights_fp: str, slots, opset: int) -> str:
    """The fingerprint adapters are checked against: base weights plus slot table."""
    table = json.dumps([s.to_json() for s in sorted(slots, key=lambda s: s.name)], sort_keys=True)
    return hashlib.sha256(f"{weights_fp}|{opset}|{table}".encode()).hexdigest()
