"""Fuse the projections that read the same tensor into one MatMul, in every export.

    x --> q_proj --> q                x --> MatMul(x, W_q|W_k|W_v) (+ group deltas) (+ bias) --> Split --> q, k, v
      --> k_proj --> k      ==>
      --> v_proj --> v

Fewer, larger MatMuls run faster on ONNX Runtime, and an adapter on a fused group
costs one delta for the whole group (one A-projection shared by q, k and v) instead
of one per module. The merged and the slot exports are fused alike, so their
comparison stays fair. Groups are found by running the model once and recording
which Linear/Conv1D layers receive the very same input tensor.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from edgepeft.tuners.layout import group_key
from edgepeft.tuners.targets import in_out_features, replace_module



def _weight_in_out(module: nn.Module) -> torch.Tensor:
    """The weight as (in, out), the layout x @ W consumes."""
    return module.weight.T if isinstance(module, nn.Linear) else module.weight


def shared_input_groups(model: nn.Module, run_once) -> list[list[str]]:
    """Names of Linear/Conv1D layers that receive the same input tensor, in call order.

    ``run_once()`` runs the model on sample inputs. Only groups of two or more
    layers with the same input width are returned.
    """
    calls: list[tuple[int, str]] = []
    alive = []  # keeps every input alive during the run, so no two tensors share an id()
    hooks = []

    def record(name, x):
        alive.append(x)
        calls.append((id(x), name))

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)):
            hooks.append(module.register_forward_pre_hook(lambda m, args, name=name: record(name, args[0])))
    try:
        with torch.no_grad():
            run_once()
    finally:
        for h in hooks:
            h.remove()
    by_input: dict[int, list[str]] = {}
    for tensor_id, name in calls:
        members = by_input.setdefault(tensor_id, [])
        if name not in members:
            members.append(name)
    groups = []
    for members in by_input.values():
        widths = {in_out_features(model.get_submodule(m))[0] for m in members}
        if len(members) > 1 and len(widths) == 1:
            groups.append(members)
    return groups


class FusedProjection(nn.Module):
    """One MatMul for a group of layers; method slots add deltas (before the bias)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.sizes = [in_out_features(m)[1] for m in members]
        self.weight = nn.Parameter(torch.cat([_weight_in_out(m).detach() for m in members], dim=1), requires_grad=False)
        biases = [m.bias.detach() if m.bias is not None else torch.zeros(s) for m, s in zip(members, self.sizes)]
        has_bias = any(m.bias is not None for m in members)
        self.bias = nn.Parameter(torch.cat(biases), requires_grad=False) if has_bias else None
        self.deltas: list = []  # callables x -> (..., sum of sizes), added before the bias
        self.scales: list = []  # callables () -> (rows, 1, sum of sizes), multiplied after the bias
        self._x = None
        self._parts = None

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self._x is not x:  # the first member called computes the whole group
            out = x @ self.weight  # (B, T, in) @ (in, sum out) -> (B, T, sum out)
            for delta in self.deltas:
                out = out + delta(x)
            if self.bias is not None:
                out = out + self.bias
            for scale in self.scales:
                out = out * scale()
            self._x, self._parts = x, torch.split(out, self.sizes, dim=-1)
        return self._parts[index]


class FusedMember(nn.Module):
    """Stands where one member layer was; returns its slice of the fused output."""

    def __init__(self, group: FusedProjection, index: int, original: nn.Module):
        super().__init__()
        self.group = group
        self.index = index
        self.in_features, self.out_features = in_out_features(original)

    def forward(self, x):
        return self.group.part(self.index, x)


def _conv1d_as_matmul(self, x):  # (B, T, in) @ (in, out) + (out,): Conv1D.forward's product, on 3D
    return x @ self.weight + self.bias


def trace_conv1d_as_matmul(model: nn.Module) -> None:
    """Make each GPT-2 Conv1D of ``model`` (the copy being traced) compute ``x @ W + b`` on (B, T, in).

    Conv1D itself flattens to (B*T, in) for ``addmm`` and views the result back: traced, a
    Gemm between two Reshapes whose sizes are Shape ops in every layer, and a flatten
    that loses the batch and length dims' names, so the shape pass cannot fold them.
    """
    import types

    for module in model.modules():
        if type(module) is Conv1D:
            module.forward = types.MethodType(_conv1d_as_matmul, module)


def fuse_groups(model: nn.Module, groups: list[list[str]]) -> dict[str, FusedProjection]:
    """Replace each group's layers by members of one FusedProjection; returns {group key: projection}."""
    fused = {}
    for members in groups:
        modules = [model.get_submodule(m) for m in members]
        projection = FusedProjection(modules)
        for i, (name, module) in enumerate(zip(members, modules)):
            replace_module(model, name, FusedMember(projection, i, module))
        fused[group_key(members)] = projection
    return fused
