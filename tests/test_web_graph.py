"""model.web.onnx (every slot a required input, for ONNX Runtime's JavaScript bindings) and neutral.onnx (the
slots' neutral values) beside model.onnx: the same graph, sharing one weights file."""
from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from tiny import sample_batch


def _session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def test_the_web_graph_requires_every_slot_and_the_neutral_graph_gives_the_base_model(shared_export, virtual_export):
    from edgepeft.runtimes import Runtime

    for out in (shared_export("llama")[0], shared_export("bert")[0], virtual_export("llama")[0]):
        base = os.path.join(out, "base")
        web, neutral = _session(os.path.join(base, "model.web.onnx")), _session(os.path.join(base, "neutral.onnx"))
        assert web.get_overridable_initializers() == []
        names = [o.name for o in neutral.get_outputs()]
        rt = Runtime(out)
        assert set(names) == {s for s in rt.slots if not rt.slots[s].target} | ({"logits_to_keep"} & set(rt.input_names))
        assert set(names) <= {i.name for i in web.get_inputs()}
        feeds = dict(zip(names, neutral.run(None, {})))
        ids, mask = sample_batch()
        feeds |= {"input_ids": ids, "attention_mask": mask}
        if rt.cache:
            feeds["position_ids"] = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).astype(np.int64)
            feeds |= {n: np.zeros((2, rt.cache["num_kv_heads"], 0, rt.cache["head_dim"]), np.float32)
                      for n in rt.cache_inputs}
        ours = web.run([rt.output_name], feeds)[0]
        np.testing.assert_allclose(ours, rt.forward(ids, mask)[rt.output_name], atol=1e-6)
        sizes = {f: os.path.getsize(os.path.join(base, f)) for f in ("model.onnx", "model.web.onnx", "model.onnx.data")}
        assert sizes["model.web.onnx"] <= sizes["model.onnx"] < sizes["model.onnx.data"]  # the weights are shared
