"""The optimizer as transformers' Trainer builds it (``create_optimizer``): AdamW with its defaults, biases and norm
weights kept out of weight decay (``get_decay_parameter_names``), and a head trained whole (``modules_to_save``) that starts from
random weights (a classifier the base lacks) at its own rate."""
from __future__ import annotations

import torch
from torch import nn

# transformers' Trainer.get_decay_parameter_names: parameters named so (lower-cased) or inside a LayerNorm get no decay
NO_DECAY = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def make_optimizer(peft: nn.Module, lr: float, head_lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``peft``'s trainable parameters: the adapter's at ``lr``, heads made at load (``load_base``'s
    ``edgepeft_made_heads``: random weights) and trained whole at ``head_lr``, each split into decayed and undecayed
    groups where ``weight_decay`` is set (without it, one group each). Modules a user trains whole (an ``lm_head``
    in ``modules_to_save``) start from pretrained weights: at ``lr``, as the adapter (they trained 1,000x faster)."""
    from transformers.trainer_pt_utils import get_parameter_names

    from edgepeft.tuners.heads import CLASSIFIER_NAMES, ModulesToSaveWrapper

    base = peft.get_base_model()
    made = getattr(base, "edgepeft_made_heads", CLASSIFIER_NAMES)  # a base load_base did not load: HF PEFT's heads
    fresh = {id(p) for name, module in base.named_modules() if isinstance(module, ModulesToSaveWrapper)
             and name.split(".")[0] in made for p in module.modules_to_save.parameters()}
    named = [(n, p) for n, p in peft.named_parameters() if p.requires_grad]
    decayed = set(get_parameter_names(peft, [nn.LayerNorm], NO_DECAY)) if weight_decay else {n for n, _ in named}
    groups = []
    for head in (False, True):
        for decay in (True, False):
            params = [p for n, p in named if (id(p) in fresh) == head and (n in decayed) == decay]
            if params:
                groups.append({"params": params, "lr": head_lr if head else lr,
                               "weight_decay": weight_decay if decay else 0.0})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
