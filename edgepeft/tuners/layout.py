"""What methods and the exporter share about the base graph's layout: the names of fused layer groups, and
slot values that an adapter graph assembles at load from compact parts, and the row weights of a mixed batch.

Methods import these from here, so they need nothing from ``edgepeft.exporters``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


def group_key(members: list[str]) -> str:
    """``model.layers.0.self_attn.q_proj+k_proj+v_proj``: a fused group's name in slot names."""
    parent = members[0].rpartition(".")[0]
    if all(m.rpartition(".")[0] == parent for m in members):
        return parent + "." + "+".join(m.rpartition(".")[2] for m in members)
    return "+".join(members)


class RowWeights(nn.Module):
    """Holds a mixed batch's row-weight graph input, read by every slot module of one method in a graph."""

    def __init__(self):
        super().__init__()
        self.feed = {}

    def share_with(self, module: nn.Module) -> None:
        """``module.rows`` is this one object, not a submodule of each layer."""
        object.__setattr__(module, "rows", self)


@dataclass
class Assembled:
    """A slot tensor the adapter graph builds at load from compact parts.

    The parts are concatenated along ``axis``; with ``pads`` each part is first
    zero-padded (left, right) along the other axis (a block-diagonal matrix).
    Only the parts are stored, so the file holds the adapter's parameters only.
    """

    parts: list
    axis: int
    pads: list | None = None

    @property
    def shape(self) -> tuple:
        first = self.parts[0].shape
        if self.axis == 1:
            return (first[0], sum(p.shape[1] for p in self.parts))
        width = first[1] + sum(self.pads[0]) if self.pads else first[1]
        return (sum(p.shape[0] for p in self.parts), width)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)
