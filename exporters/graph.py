"""Build ONNX graphs: the frozen base with adapter slots as inputs, and adapter graphs.

    input_ids, attention_mask, slot_1 ... slot_n        (graph inputs)
          |                    |
          v                    v  (each slot module reads its feed)
    transformers model with slot layers  --> logits / last_hidden_state

Slot inputs also get an initializer of the same name holding the neutral value,
which makes them optional: a session fed only input_ids/attention_mask runs the
exact base model.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edgepeft.models import call_kwargs
from edgepeft.runtimes.manifest import TASK_OUTPUTS

OPSET = 18
_EXTERNAL_DATA_BYTES = 1 << 30  # above this the base graph keeps its weights in model.onnx.data


class SlotGraph(torch.nn.Module):
    """The model as traced for export: slot tensors arrive as forward arguments."""

    def __init__(self, model, feeds: dict, task: str):
        super().__init__()
        self.model = model
        self.slot_names = list(feeds)
        self._feeds = [feeds[n] for n in self.slot_names]  # (slot module, role) per slot
        self.output_name = TASK_OUTPUTS[task]
        self.kwargs = call_kwargs(model.config)

    def forward(self, input_ids, attention_mask, *slot_values):
        for (module, role), value in zip(self._feeds, slot_values):
            module.feed[role] = value
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **self.kwargs)
        return getattr(out, self.output_name)


def output_axes(task: str, slots) -> dict:
    if task == "seq-cls":
        head_axes = [s.shape[-1] for s in slots if s.method == "head" and s.role == "weight"]
        return {0: "batch", 1: head_axes[0]} if head_axes else {0: "batch"}
    return {0: "batch", 1: "sequence"}


def export_graph(graph: SlotGraph, sample_inputs: tuple, slots, neutral: dict, path: str, task: str) -> dict:
    """Trace ``graph`` to ``path``; returns the I/O table written into the manifest."""
    token_axes = {0: "batch", 1: "sequence"}
    slot_axes = {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in slots}
    output = graph.output_name
    dynamic_axes = {"input_ids": token_axes, "attention_mask": token_axes, output: output_axes(task, slots), **slot_axes}
    graph.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            sample_inputs,
            path,
            input_names=["input_ids", "attention_mask", *graph.slot_names],
            output_names=[output],
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    used = _add_neutral_defaults(path, neutral)
    return {
        "inert_slots": sorted(set(neutral) - used),
        "inputs": {
            "input_ids": {"dtype": "int64", "axes": token_axes},
            "attention_mask": {"dtype": "int64", "axes": token_axes},
        },
        "outputs": {output: {"dtype": "float32", "axes": output_axes(task, slots)}},
    }


def _add_neutral_defaults(path: str, neutral: dict) -> set:
    """Give every slot input an initializer of its own name (its neutral value).

    Returns the slots the graph uses: a slot on a layer that cannot reach the
    output (BertModel's pooler for ``last_hidden_state``) is dropped by the tracer.
    """
    big = os.path.getsize(path) + sum(v.nbytes for v in neutral.values()) > _EXTERNAL_DATA_BYTES
    model = onnx.load(path)
    existing = {i.name for i in model.graph.initializer}
    used = {i.name for i in model.graph.input} & set(neutral)
    for name, value in neutral.items():
        if name in used and name not in existing:
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
    data = os.path.basename(path) + ".data"
    onnx.save_model(model, path, save_as_external_data=big, all_tensors_to_one_file=True, location=data)
    return used


def write_adapter_graph(values: dict, path: str) -> None:
    """An ONNX graph with no inputs and one output per slot, each an Identity of its tensor."""
    nodes, inits, outputs = [], [], []
    for name, value in sorted(values.items()):
        value = np.ascontiguousarray(value, dtype=np.float32)
        inits.append(numpy_helper.from_array(value, f"value.{name}"))
        nodes.append(helper.make_node("Identity", [f"value.{name}"], [name]))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(nodes, "edgepeft_adapter", [], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgepeft")
    model.ir_version = 9  # ONNX Runtime 1.20+ reads IR 9 (opset 18 needs IR >= 8)
    onnx.checker.check_model(model)
    onnx.save_model(model, path)
