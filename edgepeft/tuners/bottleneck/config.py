"""Bottleneck adapter config (Houlsby / Pfeiffer). edgepeft's own method: HF PEFT has none."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from edgepeft.config import PeftConfig
from edgepeft.errors import UnsupportedMethodError

# The layer whose output ends each block, per model type, as full-match regexes:
# (after attention, after the feed-forward block).
BLOCK_OUTPUTS = {
    "llama": (r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj"),
    "qwen2": (r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj"),
    "gpt2": (r".*\.attn\.c_proj", r".*\.mlp\.c_proj"),
    "bert": (r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense"),
}
NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")


@dataclass
class BottleneckConfig(PeftConfig):
    """``h <- h + up(act(down(h)))`` on a block's output, before its residual connection.

    ``placement="houlsby"`` adapts the output of the attention and of the
    feed-forward block in every layer; ``"pfeiffer"`` only the feed-forward block.
    ``target_modules`` overrides the placement with explicit layers.
    """

    peft_type_name = "BOTTLENECK"
    default_lr = 2e-3
    cli_shorthands = {"--target-modules": "target_modules"}
    bottleneck_size: int = 64
    placement: str = "houlsby"
    non_linearity: str = "relu"
    target_modules: Optional[Union[list, str]] = None
    exclude_modules: Optional[Union[list, str]] = None
    init_bottleneck_weights: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.placement not in ("houlsby", "pfeiffer"):
            raise UnsupportedMethodError(f"placement must be 'houlsby' or 'pfeiffer', got {self.placement!r}")
        if self.non_linearity not in NON_LINEARITIES:
            raise UnsupportedMethodError(f"non_linearity must be one of {', '.join(NON_LINEARITIES)}, got {self.non_linearity!r}")
        if self.bottleneck_size <= 0:
            raise UnsupportedMethodError(f"bottleneck_size must be positive, got {self.bottleneck_size}")

    def default_targets(self, model_type: str):
        if model_type not in BLOCK_OUTPUTS:
            return None
        attention, feed_forward = BLOCK_OUTPUTS[model_type]
        return f"{attention}|{feed_forward}" if self.placement == "houlsby" else feed_forward
