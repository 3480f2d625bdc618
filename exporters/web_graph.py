"""The base graph for JavaScript: ``model.web.onnx`` (every slot a required input) and ``neutral.onnx``.

ONNX Runtime's JavaScript bindings list only a graph's required inputs: onnxruntime-node drops a feed
for an input with a default (an adapter slot: the call silently runs the base model) and
onnxruntime-web refuses it. So beside ``model.onnx`` (slots with defaults: edgepeft's Python runtime,
plain ONNX Runtime sessions, onnxruntime-genai) each export writes:

    model.web.onnx   the same nodes, the slots' (and logits_to_keep's) defaults removed: required inputs;
                     it reads the same weights file, model.onnx.data, so it costs only its nodes on disk
    neutral.onnx     no inputs; one output per removed default, its value (zero-size LoRA tensors, ones for
                     IA3, the base head, logits_to_keep 0): what a JavaScript runtime binds for the slots
                     a call's adapter does not fill; not written where there is none (a merged classifier:
                     ONNX Runtime loads no graph without outputs)
"""
from __future__ import annotations

import os

import onnx
from onnx import helper, numpy_helper

from edgepeft.exporters.adapter_graph import IR_VERSION
from edgepeft.exporters.graph import OPSET
from edgepeft.runtimes.manifest import BASE_GRAPH, NEUTRAL_GRAPH, WEB_GRAPH


def write_web_variant(stage: str) -> list[str]:
    """Write ``model.web.onnx`` and ``neutral.onnx`` beside ``stage/model.onnx``; returns the inputs made required."""
    model = onnx.load(os.path.join(stage, BASE_GRAPH), load_external_data=False)
    inputs = {i.name for i in model.graph.input}
    defaults = [t for t in model.graph.initializer if t.name in inputs]  # slots and logits_to_keep
    outputs, values = [], []
    for tensor in defaults:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:  # a base head: read its value for neutral.onnx
            onnx.external_data_helper.load_external_data_for_tensor(tensor, stage)
        array = numpy_helper.to_array(tensor)
        values.append(numpy_helper.from_array(array, f"neutral.{tensor.name}"))
        outputs.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(array.shape)))
    if defaults:
        nodes = [helper.make_node("Identity", [f"neutral.{t.name}"], [t.name]) for t in defaults]
        neutral = helper.make_model(helper.make_graph(nodes, "edgepeft_neutral", [], outputs, initializer=values),
                                    opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgepeft")
        neutral.ir_version = IR_VERSION
        onnx.save_model(neutral, os.path.join(stage, NEUTRAL_GRAPH))
    names = {t.name for t in defaults}  # the same graph without those defaults; weights stay in model.onnx.data
    kept = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save_model(model, os.path.join(stage, WEB_GRAPH))
    return sorted(names)
