"""Shared helpers and fixtures of the error-contract tests (test_errors_runtime.py, test_errors_export.py).

Bad input gets a clear error and loses nothing: every case asserts the specific
``EdgePeftError`` subclass, that the message names the file (or the offending value)
and what to do, and that nothing already there is lost: a runtime keeps serving the
same numbers, an export folder stays byte-identical.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from file_checks import copy_adapter, edit_json
from tiny import sample_batch, tiny_config
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime

CPU = ["CPUExecutionProvider"]
VOCAB = 128  # tiny_config's vocab_size
MAX_POS = 64  # tiny_config's max_position_embeddings


# --------------------------------------------------------------------------- helpers
def served(rt) -> dict:
    """The numbers a runtime serves: base and every loaded adapter, on a fixed batch."""
    ids, mask = sample_batch(VOCAB)
    return {name: rt.forward(ids, mask, adapter=name)["logits"] for name in [None, *rt.adapter_names]}


def assert_still_serving(rt, before: dict) -> None:
    after = served(rt)
    assert set(after) == set(before), f"adapters changed: {sorted(map(str, before))} -> {sorted(map(str, after))}"
    for name, want in before.items():
        np.testing.assert_allclose(after[name], want, rtol=0, atol=1e-6, err_msg=f"adapter {name!r} changed")


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def llama(shared_export):
    return shared_export("llama")  # (OUT, {name: HF adapter dir}, report)


@pytest.fixture(scope="module")
def other_llama_base(tmp_path_factory):
    """A second tiny llama: same config and shapes as tiny_base('llama'), other weights."""
    import transformers as tf

    torch.manual_seed(4321)
    model = tf.AutoModelForCausalLM.from_config(tiny_config("llama"))
    path = str(tmp_path_factory.mktemp("other-llama") / "base-llama-other")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def other_export(tmp_path_factory, llama, other_llama_base):
    """The llama 'qv' adapter, recorded as trained on the other llama base, exported against it."""
    root = tmp_path_factory.mktemp("other-out")
    adapter = copy_adapter(llama[1]["qv"], root / "qv")
    edit_json(os.path.join(adapter, "adapter_config.json"), base_model_name_or_path=other_llama_base)
    out = str(root / "out")
    export([adapter], out)
    return out


@pytest.fixture(scope="module")
def small_out(tmp_path_factory, llama):
    """A fresh export of the llama base with only the 'qv' adapter (q/v slots only)."""
    out = str(tmp_path_factory.mktemp("small-out") / "out")
    export([llama[1]["qv"]], out)
    return out


@pytest.fixture
def rt(llama):
    return Runtime(llama[0], providers=CPU)


@pytest.fixture
def before(rt):
    numbers = served(rt)
    assert rt.adapter_names == ["all", "mlp", "qv"]
    # The comparison means something only if adapters change the output.
    for name in rt.adapter_names:
        assert np.abs(numbers[name] - numbers[None]).max() > 1e-3, name
    return numbers


@pytest.fixture
def victim(tmp_path, llama):
    """A private copy of the shared llama export, for export attempts that must fail."""
    out = str(tmp_path / "victim")
    shutil.copytree(llama[0], out)
    return out


