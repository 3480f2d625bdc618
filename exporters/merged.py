"""``edgepeft export --merge``: one adapter folded into the base's weights, a plain graph with no slots, validated
against HF PEFT's model as the slot exports are (``export.py``)."""
from __future__ import annotations

import os

from edgepeft.config import load_config
from edgepeft.errors import ConfigError, EdgePeftError, UnsupportedMethodError
from edgepeft.exporters.adapter_graph import read_labels, set_labels
from edgepeft.exporters.base_graph import quantize_stage, trace_base
from edgepeft.exporters.contrib_ops import effective_ops
from edgepeft.exporters.fingerprint import weights_fingerprint
from edgepeft.exporters.resolve import ExportPlan
from edgepeft.exporters.validate import log_check, validate
from edgepeft.files import Staging, remove_moved_aside
from edgepeft.interrupts import written_whole
from edgepeft.sharing import check_replaceable
from edgepeft.runtimes import Runtime
from edgepeft.tuners import method_for
from edgepeft.tuners.copies import merged_copy
from edgepeft.runtimes.manifest import ADAPTERS_DIR, BASE_MANIFEST, adapter_dirs


def check_mergeable(adapters: list, merge: bool) -> None:
    """--merge's adapters, before the base is loaded: one, of a method with weights to fold (a folder whose config does
    not load is named by resolve, with the rest)."""
    if not merge:
        return
    if len(adapters) > 1:
        raise ConfigError(f"--merge folds one adapter into the base, got {len(adapters)} ({', '.join(map(str, adapters))})"
                          "; export each with --merge into its own --out folder, or all without --merge into one")
    try:
        why = method_for(load_config(adapters[0])).tuner.unmergeable  # prompt learning's virtual tokens
    except EdgePeftError:
        return
    if why:
        raise UnsupportedMethodError(f"{adapters[0]}: {why}; export it without --merge")


def export_merged(plan: ExportPlan) -> dict:
    """``--merge``: one adapter folded into the weights, a plain graph with no slots."""
    src, existing, base_dir = plan.sources[0], plan.existing, plan.base_dir
    if existing and not existing.get("merged_adapter"):
        raise ConfigError(f"{base_dir}: holds a slot base (an export without --merge); write the --merge export to another --out folder")
    if existing and not plan.overwrite:
        raise ConfigError(f"{base_dir}: holds adapter {existing['merged_adapter']!r} merged into the base already; "
                          "pass --overwrite to replace it, or give another --out")
    if stranded := sorted(adapter_dirs(plan.out)):  # left by a slot base removed since: a merged base would strand them
        raise ConfigError(f"{os.path.join(plan.out, ADAPTERS_DIR)}: holds {', '.join(stranded)}; "
                          "a --merge export takes no adapters: give another --out, or remove that folder")
    check_replaceable(base_dir, f"mount {plan.out} itself (the folder holding base/), or export into another --out")
    merged = merged_copy(plan.peft.base_model.model, method_for(plan.peft.peft_config[src.name]).tuner, src.name,
                         keep_layers=True).eval()  # a bottleneck's layers run in the graph
    with Staging() as staging:
        stage = staging.new(plan.out, "merged")
        plan.log(f"exporting {src.name} merged into the base to {base_dir}")
        trace_base(merged, [], plan.task, stage, plan.source, weights_fingerprint(merged), plan.groups,
                   merged_adapter=src.name, ops=effective_ops(merged.config, plan.task, plan.ops, plan.log),
                   revision=plan.revision, log=plan.log, digests=not plan.quantize)
        rt = Runtime.from_base_dir(stage)
        plan.peft.set_adapter(src.name, inference_mode=True)
        checks = [validate(f"merged {src.name}", rt, None, plan.peft, plan.task, plan.atol, src.path)]
        log_check(plan.log, checks[-1], f"merged {src.name}")
        if plan.task == "seq-cls":  # the trained head's width (the config may still say 2)
            set_labels(os.path.join(stage, BASE_MANIFEST), read_labels(src, checks[-1]["output_width"],
                                                                       plan.model.config))
        if plan.quantize:
            quantize_stage(stage, plan.quantize, plan.qtol, plan.log)
            rt = Runtime.from_base_dir(stage)
            checks.append(validate(f"merged {src.name}, {plan.quantize}", rt, None, plan.peft, plan.task, plan.atol,
                                   src.path, qtol=plan.qtol))
            log_check(plan.log, checks[-1], f"merged {src.name} ({plan.quantize})")
        with written_whole(plan.out):
            remove_moved_aside(staging.swap(stage, base_dir))
    return {"out": plan.out, "base": {"reused": False, "path": base_dir, "slots": 0, "merged_adapter": src.name},
            "adapters": [], "checks": checks}
