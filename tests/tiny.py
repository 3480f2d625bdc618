"""Tiny models built from configs (Llama, Qwen2, GPT-2, BERT), sample batches and output comparisons.

Needs torch and transformers only; nothing is downloaded.
"""
from __future__ import annotations

import os

import numpy as np
import torch

ARCHS = ["llama", "qwen2", "gpt2", "bert"]
DECODER_ARCHS = ["llama", "qwen2", "gpt2"]
TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "feature-extraction": "FEATURE_EXTRACTION"}


def tiny_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              intermediate_size=64, max_position_embeddings=64, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              intermediate_size=64, max_position_embeddings=64, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **common)  # head size 16: --ops contrib
    if arch == "bert":
        return tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=64, **common)
    raise KeyError(arch)


def default_task(arch: str) -> str:
    return "feature-extraction" if arch == "bert" else "causal-lm"


def load_reference_base(path: str, task: str, num_labels: int | None = None):
    """The base as edgepeft loads it (same seed), optionally with a head of num_labels outputs."""
    from edgepeft.models import load_base

    model = load_base(path, task)
    if num_labels is not None and task == "seq-cls":
        head_name = "classifier" if hasattr(model, "classifier") else "score"
        head = getattr(model, head_name)
        torch.manual_seed(99)
        setattr(model, head_name, torch.nn.Linear(head.in_features, num_labels, bias=head.bias is not None))
        model.config.num_labels = num_labels
    return model.eval()


def sample_batch(vocab=128, batch=2, seq=9, seed=3, pad=0):
    """Token ids and a mask: row 0 full, every later row left-padded by 2 more tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    for row in range(1, batch):
        mask[row, : 2 * row] = 0
        ids[row, : 2 * row] = pad
    return ids, mask


def mixed_batch(n, seq=7, seed=8):
    """Token ids and a mask: row r left-padded by r % 3 tokens."""
    ids = np.random.default_rng(seed).integers(3, 128, size=(n, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    for row in range(n):
        mask[row, : row % 3] = 0
        ids[row, : row % 3] = 0
    return ids, mask


def torch_outputs(model, ids, mask, field):
    from edgepeft.models import call_kwargs

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), return_dict=True,
                    **call_kwargs(model.config))
    return getattr(out, field).float().numpy()


def max_diff_valid(a, b, mask=None):
    """Max |a - b| over real (unpadded) tokens; whole arrays when mask is None."""
    if mask is None:
        return float(np.abs(a - b).max())
    valid = mask.astype(bool)
    return float(np.abs(a[valid] - b[valid]).max())


def train_steps(model, lr: float, steps: int = 30) -> list[float]:
    """Causal-LM losses of ``steps`` AdamW steps on a fixed random batch, training only what requires grad."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(trainable, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def layer_nodes(out: str, ops) -> tuple[list, list]:
    """(names of ``ops`` nodes inside any layer, every node) of OUT's base graph: Llama/Qwen2 ``layers.N``,
    GPT-2 ``h.N``, BERT ``layer.N``."""
    import re

    import onnx

    graph = onnx.load(os.path.join(out, "base", "model.onnx"), load_external_data=False).graph
    inside = [n.name for n in graph.node if n.op_type in ops and re.search(r"/(layers|h|layer)\.\d+/", n.name)]
    return inside, list(graph.node)

