"""One adapter as its own small ONNX graph plus its manifest (``OUT/adapters/<name>/``).

    adapter.onnx   no inputs; one output per slot the adapter fills (each spec's ``values``)
    adapter.json   methods, rank/alpha/targets (each spec's ``describe``), base fingerprint,
                   slot shapes, sha256 of adapter.onnx, the source PEFT config, label names
    adapter.onnx_adapter   the same tensors in ONNX Runtime's format, where that format can hold them
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgepeft.config import LABELS_NAME
from edgepeft.errors import ConfigError, CorruptArtifactError, ExportValidationError
from edgepeft.exporters import ort_adapter as ort_format
from edgepeft.exporters.graph import IR_VERSION, OPSET
from edgepeft.files import write_json_atomic
from edgepeft.models import named_labels
from edgepeft.runtimes.access import located, sha256_file
from edgepeft.runtimes.manifest import ADAPTER_GRAPH, ADAPTER_MANIFEST, LAYOUT_VERSION, ORT_ADAPTER
from edgepeft.registry import check_hook
from edgepeft.tuners import specs_for
from edgepeft.tuners.layout import Assembled


def write_adapter_graph(values: dict, path: str) -> None:
    """An ONNX graph with no inputs and one output per slot.

    A plain tensor is an initializer behind an Identity; an ``Assembled`` one is
    Pad/Concat nodes over its parts' initializers, run once when the runtime loads
    the adapter.
    """
    nodes, inits, outputs = [], [], []
    for name, value in sorted(values.items()):
        if isinstance(value, Assembled):
            inputs = []
            for i, part in enumerate(value.parts):
                part_name = f"value.{name}.{i}"
                inits.append(numpy_helper.from_array(np.ascontiguousarray(part, dtype=np.float32), part_name))
                if value.pads and any(value.pads[i]):
                    left, right = value.pads[i]
                    pads_name = f"pads.{name}.{i}"
                    inits.append(numpy_helper.from_array(np.array([0, left, 0, right], dtype=np.int64), pads_name))
                    nodes.append(helper.make_node("Pad", [part_name, pads_name], [f"padded.{name}.{i}"]))
                    part_name = f"padded.{name}.{i}"
                inputs.append(part_name)
            nodes.append(helper.make_node("Concat", inputs, [name], axis=value.axis))
            shape = list(value.shape)
        else:
            value = np.array(value, dtype=np.float32, order="C")  # a 0-d value stays 0-d (ascontiguousarray: [1])
            inits.append(numpy_helper.from_array(value, f"value.{name}"))
            nodes.append(helper.make_node("Identity", [f"value.{name}"], [name]))
            shape = list(value.shape)
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    graph = helper.make_graph(nodes, "edgepeft_adapter", [], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgepeft")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save_model(model, path)


def write_adapter(peft, src, slots: list, base_manifest: dict, stage: str, ort_adapter: bool) -> dict:
    """Stage ``src``'s graph and manifest in ``stage``; ``slots``: those of the base its specs fill."""
    config = peft.peft_config[src.name]
    specs = specs_for(config)  # the method's own first, then those every adapter has (task heads)
    values, names = {}, [specs[0].name]
    for i, spec in enumerate(specs):
        own = [s for s in slots if s.method == spec.name]
        filled = spec.values(peft, src.name, own) if own else {}
        check_hook(spec, "values", own, filled, every=False)
        if own and not filled and not i:  # the method's own fills nothing: the adapter would run the base model
            raise ConfigError(f"{type(spec).__name__}.values gives {src.name!r} no value for any of its slots "
                              f"({own[0].name}, ...); mend the method's values (docs/adding-a-method.md)")
        values.update(filled)
        if filled and i:
            names.append(spec.name)
    bad = next((n for n, v in values.items() for part in (v.parts if isinstance(v, Assembled) else [v])
                if not np.isfinite(np.asarray(part, dtype=np.float32)).all()), None)
    if bad:  # the runtime refuses to stage it: named here with what to look for (no --atol helps)
        raise ExportValidationError(
            f"{src.path}: the adapter's {bad} holds NaN or infinity, so nothing can be checked; nothing was written. Look "
            "for non-finite values in its weights (adapter_model.safetensors or adapter_model.bin) and retrain or fix them")
    graph = os.path.join(stage, ADAPTER_GRAPH)
    write_adapter_graph(values, graph)
    ort_file = None
    if ort_adapter and ort_format.applies(slots):
        ort_file = ORT_ADAPTER
        ort_format.write_ort_adapter(graph, os.path.join(stage, ORT_ADAPTER))
    manifest = {
        "format": "edgepeft-adapter",
        "format_version": LAYOUT_VERSION,
        "name": src.name,
        "methods": names,
        "peft_type": config.peft_type,
        "task": base_manifest["task"],
        "base_fingerprint": base_manifest["fingerprint"],
        "base_source": base_manifest["source"],
        **specs[0].describe(config),
        "modules_to_save": config.modules_to_save,
        "slots": {k: list(v.shape) for k, v in sorted(values.items())},
        "parameter_bytes": int(sum(v.nbytes for v in values.values())),
        "graph": ADAPTER_GRAPH,
        "sha256": sha256_file(graph),
        "ort_adapter": ort_file,  # its SHA-256 for inspect: ONNX Runtime's LoraAdapter reads it unchecked
        **({"ort_adapter_sha256": sha256_file(os.path.join(stage, ort_file))} if ort_file else {}),
        "peft_config": config.to_dict(),
        "source": located(src.path),  # where the system read it ("LINK/.." is the link target's parent)
        "labels": None,  # set by set_labels once validation has seen the output's width
    }
    if (field := _non_finite(manifest["peft_config"])) is not None:  # written as NaN: JSON.parse (the JS runtime)
        # refused the manifest, "re-export it", which wrote it again
        raise ConfigError(f"{os.path.join(src.path, 'adapter_config.json')}: field {field!r} holds NaN or infinity, "
                          "which JSON does not hold (a JavaScript runtime cannot read it); set it to a number or null")
    write_json_atomic(os.path.join(stage, ADAPTER_MANIFEST), manifest, sort_keys=True)
    return manifest


def _non_finite(value, where: str = ""):
    """The dotted path of the first NaN or infinity in ``value`` (dicts and lists within), else None."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        if (found := _non_finite(item, f"{where}.{key}" if where else str(key))) is not None:
            return found
    return where if isinstance(value, float) and not math.isfinite(value) else None


def saved_labels(src_path: str) -> list | None:
    """Class names saved beside a classifier adapter (``labels.json``, written by ``edgepeft train``), else None:
    read with its weights (``resolve``), as one run's (read after tracing, a run into the folder meanwhile gave
    its labels to the first run's classifier)."""
    path = os.path.join(src_path, LABELS_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            labels = json.load(f)["labels"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CorruptArtifactError(f"{path}: cannot read the label names ({e}); fix or delete the file") from None
    if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise CorruptArtifactError(f"{path}: 'labels' must be a list of strings; fix or delete the file")
    return labels


def read_labels(src, width: int, config=None) -> list | None:
    """The adapter source ``src``'s saved labels (``saved_labels``), else those the base's ``config`` names (as
    transformers labels the adapted model), or None. ``width``: the classifier's output count, which they must match.
    """
    labels, path = src.labels, os.path.join(src.path, LABELS_NAME)
    if labels is None:
        return named_labels(config, width) if config is not None else None
    if len(labels) != width:
        raise CorruptArtifactError(f"{path}: names {len(labels)} labels but the adapter's classifier has "
                                   f"{width} outputs; fix or delete the file")
    return labels


def set_labels(manifest_path: str, labels: list | None) -> None:
    """Record label names in a staged manifest (an adapter's, or a merged base's)."""
    if labels is None:
        return
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["labels"] = labels
    write_json_atomic(manifest_path, manifest, sort_keys=True)
