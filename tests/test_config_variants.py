"""config.json fields the tiny test models leave at their defaults, which changed what the export traced or checked:
BERT's chunked feed-forward, a model with few positions, an encoder made a causal decoder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tiny import load_reference_base, max_diff_valid, tiny_config
from edgepeft.errors import UnsupportedModelError
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime


def _base(tmp_path, arch: str, **fields) -> str:
    import transformers as tf

    config = tiny_config(arch)
    for key, value in fields.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    (tf.BertModel if arch == "bert" else tf.AutoModelForCausalLM.from_config)(config).save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


def _lora(tmp_path, base: str, task: str, targets: list) -> str:
    import peft

    from peft_refs import randomize_adapter
    from tiny import TASK_TYPES

    pm = peft.get_peft_model(load_reference_base(base, task), peft.LoraConfig(task_type=TASK_TYPES[task], r=2,
                                                                              target_modules=targets))
    randomize_adapter(pm, 3)
    pm.save_pretrained(str(tmp_path / "lora"))
    return str(tmp_path / "lora")


def test_a_chunked_feed_forward_runs_at_every_length(tmp_path):
    """chunk_size_feed_forward fixed the chunk count at the traced length: other lengths failed in ONNX Runtime."""
    base = _base(tmp_path, "bert", chunk_size_feed_forward=4)
    export([_lora(tmp_path, base, "feature-extraction", ["query", "value", "dense"])], str(tmp_path / "out"),
           names=["lora"])
    rt, model = Runtime(str(tmp_path / "out")), load_reference_base(base, "feature-extraction")
    for length in (5, 12):
        ids = np.random.default_rng(length).integers(3, 128, (2, length))
        mask = np.ones_like(ids)
        with torch.no_grad():  # the feed-forward works position by position: chunks change nothing
            want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
        assert max_diff_valid(rt.forward(ids, mask)["last_hidden_state"], want.numpy(), mask) < 1e-4


def test_a_model_with_ten_positions_exports(tmp_path):
    """The export's own checks took 8 tokens + 3 decode steps: 'prompt of 8 tokens ... exceeds the model's 10
    positions; shorten the prompt', where the user gave no prompt."""
    base = _base(tmp_path, "llama", max_position_embeddings=10)
    report = export([_lora(tmp_path, base, "causal-lm", ["q_proj"])], str(tmp_path / "out"))
    assert all(c["max_abs_diff"] < 1e-4 for c in report["checks"])


def test_an_encoder_made_a_decoder_is_refused_naming_the_field(tmp_path):
    base = _base(tmp_path, "bert", is_decoder=True)
    with pytest.raises(UnsupportedModelError, match="config.json sets is_decoder: true"):
        export([_lora(tmp_path, base, "feature-extraction", ["query"])], str(tmp_path / "out"))
