"""An adapter folder's weights as HF PEFT writes them: ``adapter_model.safetensors``, or its older pickled
``adapter_model.bin`` (read with tensors only)."""
from __future__ import annotations

import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from edgepeft.config import PICKLED_WEIGHTS_NAME, WEIGHTS_NAME
from edgepeft.errors import ArtifactNotFoundError, CorruptArtifactError


def read_adapter_weights(directory: str) -> tuple[str, dict]:
    """(file, {saved key: tensor}) of an adapter folder: ``adapter_model.safetensors``, else HF PEFT's pickled
    ``adapter_model.bin`` (older hub adapters), read as HF PEFT reads it but with tensors only (no code runs)."""
    path = os.path.join(directory, WEIGHTS_NAME)
    pickled = os.path.join(directory, PICKLED_WEIGHTS_NAME)
    if not os.path.isfile(path) and os.path.isfile(pickled):
        try:
            state = torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  torch's unpickler fails with many types on damaged bytes (IndexError too)
            raise CorruptArtifactError(
                f"{pickled}: cannot read adapter weights ({type(e).__name__}): damaged, or holding more than tensors "
                f"(it is read with weights_only=True); re-save the adapter with save_pretrained, which writes "
                f"{WEIGHTS_NAME}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CorruptArtifactError(f"{pickled}: holds no state dict of tensors; re-save the adapter with save_pretrained")
        return pickled, state
    if not os.path.isfile(path):
        raise ArtifactNotFoundError(f"{path}: adapter weights not found (nor {PICKLED_WEIGHTS_NAME}); re-save the adapter "
                                    "with save_pretrained")
    try:
        return path, load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptArtifactError(f"{path}: cannot read adapter weights ({e}); re-save the adapter") from None
