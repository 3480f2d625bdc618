"""CUDA execution provider: device-resident adapter OrtValues, IOBinding. Skips without a GPU."""
from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest

from tiny import sample_batch

from edgepeft.runtimes import Runtime

pytestmark = pytest.mark.cuda


def _cuda_works() -> bool:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    # onnxruntime-gpu lists the provider even on machines without a GPU or driver.
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


@pytest.fixture(scope="module")
def cuda_runtime(shared_export):
    out, dirs, _ = shared_export("llama")
    if not _cuda_works():
        pytest.skip("no CUDA GPU / CUDAExecutionProvider")
    rt = Runtime(out, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    if rt.session.get_providers()[0] != "CUDAExecutionProvider":
        pytest.skip("CUDAExecutionProvider could not start")
    return rt, Runtime(out), dirs


def test_cuda_matches_cpu_for_every_adapter_and_keeps_adapters_on_device(cuda_runtime):
    gpu, cpu, dirs = cuda_runtime
    ids, mask = sample_batch()
    for name in [None, *dirs]:
        a = gpu.forward(ids, mask, adapter=name)["logits"]
        b = cpu.forward(ids, mask, adapter=name)["logits"]
        assert np.abs(a - b)[mask.astype(bool)].max() <= 1e-3
    for name in dirs:
        assert all(v.device_name().lower() == "cuda" for v in gpu.adapter_tensors(name).values())
