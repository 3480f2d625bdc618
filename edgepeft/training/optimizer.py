"""The optimizer as transformers' Trainer builds it (``create_optimizer``): AdamW with its defaults, biases and norm
weights kept out of weight decay (``get_decay_parameter_names``), and a head trained whole (``modules_to_save``),
which starts from random weights, at its own rate."""
from __future__ import annotations

import torch
from torch import nn

# transformers' Trainer.get_decay_parameter_names: parameters named so (lower-cased) or inside a LayerNorm get no decay
NO_DECAY = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def make_optimizer(peft: nn.Module, lr: float, head_lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``peft``'s trainable parameters: the adapter's at ``lr``, heads trained whole at ``head_lr``, each
    split into decayed and undecayed groups where ``weight_decay`` is set (without it, one group each, as before)."""
    from transformers.trainer_pt_utils import get_parameter_names

    named = [(n, p) for n, p in peft.named_parameters() if p.requires_grad]
    decayed = set(get_parameter_names(peft, [nn.LayerNorm], NO_DECAY)) if weight_decay else {n for n, _ in named}
    groups = []
    for head in (False, True):
        for decay in (True, False):
            params = [p for n, p in named if (".modules_to_save." in n) == head and (n in decayed) == decay]
            if params:
                groups.append({"params": params, "lr": head_lr if head else lr,
                               "weight_decay": weight_decay if decay else 0.0})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
