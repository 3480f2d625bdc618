"""What ``edgepeft inspect`` shows of an export: its base, slots, adapters, sizes and damaged files (manifests only,
no ONNX Runtime)."""
from __future__ import annotations

import os

from .access import (OLDER_RECORDS, STOPPED, check_readable, moved_aside, older_export, sha256_file, unchanged_while,
                     weights_out_of_reach)
from .adapter_source import adapter_bound, read_adapter_source
from .base_checks import serves_pairs
from .commands import REEXPORT_BASE, adapter_files_fix, copied_base_fix, folder_fix, folder_name_problem, pairs_fix
from .errors import EdgePeftError
from .manifest import (
    ADAPTERS_DIR, BASE_DIR, BASE_MANIFEST, adapter_dirs, base_file_errors, not_an_export,
    read_adapter_manifest, read_base_manifest,
)
from .sentence import prompts_known, sentence_transformers_settings


def _reads_no_outside_links() -> bool:
    """Whether the ONNX Runtime here (1.24+) refuses weights linked out of a graph's folder; inspect runs without one."""
    try:
        from .sessions import ort_version
    except ImportError:  # MissingDependencyError: no ONNX Runtime installed
        return False
    return ort_version() >= (1, 24)


def folder_bytes(path: str) -> int:
    """The bytes of the files under ``path``: a link by its file's (a hub cache's layout: links into blobs/), a link
    to nothing as a link."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:  # a link to nothing: the link's own size
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _damaged(base_dir: str, base: dict) -> list:
    """The base's files whose SHA-256 is not the one the export recorded (``file_sha256``; an earlier export recorded
    none), at the size it wrote: damaged within (a preallocated file a copy stopped filling ran, all zeros); a text
    file at any size (a chat template cut short at a tag rendered other prompts: a runtime checks none, edits allowed)."""
    recorded, text = base.get("file_sha256") or {}, base.get("text_files") or []
    edit = "; an edit of yours: make it in the model folder and export from it, which copies and records it"
    return [f"{path}: not what the export wrote (its SHA-256 differs; damaged in a copy{', or edited' * (name in text)}?); "
            f"{REEXPORT_BASE}{edit * (name in text)}" for name in [*(base.get("file_bytes") or ()), *text]
            if name in recorded and os.path.isfile(path := os.path.join(base_dir, name)) and sha256_file(path) != recorded[name]]


def _ort_adapter_problem(folder: str, manifest: dict, base: dict) -> str | None:
    """The adapter's .onnx_adapter file (--ort-adapter: what ONNX Runtime's LoraAdapter and onnxruntime-genai read,
    edgepeft's runtime never) not what the export wrote, by the SHA-256 its manifest records (an earlier export
    recorded none): a damaged one ran there with other numbers, and inspect said ok. One left out of a deployment is
    none (cli.md)."""
    name, recorded = manifest.get("ort_adapter"), manifest.get("ort_adapter_sha256")
    if not (isinstance(name, str) and isinstance(recorded, str)) or os.path.basename(name) != name or \
            not os.path.isfile(path := os.path.join(folder, name)) or sha256_file(path) == recorded:
        return None
    return f"{path}: not what the export wrote (its SHA-256 differs); {adapter_files_fix(folder, manifest, base)}"


def _unreadable(*paths: str) -> list:
    """The errors of the files among ``paths`` this process may not open: their sizes can be right while
    Runtime(OUT) cannot read them (another user's files)."""
    errors = []
    for path in paths:
        try:
            open(path, "rb").close()
        except OSError as e:
            try:
                check_readable(path)
                errors.append(f"{path}: cannot be read ({e.strerror}); make it readable for this user")
            except EdgePeftError as denied:
                errors.append(str(denied))
    return errors


def _embedding(base_dir: str, base: dict, problems: list) -> dict | None:
    """A feature-extraction export's embed settings (``sentence.Embedding``), a setting embed refuses a problem."""
    if base["task"] != "feature-extraction":
        return None
    try:
        settings = sentence_transformers_settings(base_dir, base.get("max_positions"))
    except EdgePeftError as e:
        problems.append(str(e))
        return None
    return {**settings._asdict(), "prompts": sorted(settings.prompts) if prompts_known(base_dir) else None}


def describe_export(out_dir: str) -> dict:
    """What ``edgepeft inspect`` prints: base, slots, adapters, sizes and problems (no ONNX Runtime needed).

    Problems: a graph file missing (or the base's empty, or its weights file), a base file not as long as the export
    wrote it, one this process may not read or one whose SHA-256 is not the one the export recorded (the base's
    files are read whole: GBs take seconds), an adapter graph whose sha256 differs from its manifest's. Described again
    where an export renamed a new base in meanwhile (its files were named "not what the export wrote").
    """
    return unchanged_while(os.path.join(out_dir, BASE_DIR), lambda: _described(out_dir))


def _described(out_dir: str) -> dict:
    base_dir = os.path.join(out_dir, BASE_DIR)
    if not os.path.isfile(os.path.join(base_dir, BASE_MANIFEST)):
        raise not_an_export(out_dir)  # an adapter folder, one adapter of an export, its base/: what to open instead
    base = read_base_manifest(base_dir)
    adapters, problems = [], []
    graph = os.path.join(base_dir, base["graph"])
    # the weights beside the graph: always since exports write model.web.onnx (which reads them too); an older
    # export kept a base under 1 GB inside the graph
    weights = [graph + ".data"] if base.get("web_graph") or os.path.lexists(graph + ".data") else []
    if not os.path.isfile(graph) or os.path.getsize(graph) == 0:
        problems.append(f"{graph}: base graph missing or empty; {REEXPORT_BASE}")
    elif weights and not os.path.isfile(weights[0]):
        problems.append(f"{graph}.data: the base's weights are missing; {REEXPORT_BASE}")
    else:
        cut = [str(e) for e in base_file_errors(base_dir, base)] + _unreadable(graph, *weights)
        problems += cut or _damaged(base_dir, base)
        problems += [far] if weights and _reads_no_outside_links() and (far := weights_out_of_reach(graph)) else []
    problems += _moved_aside(out_dir)
    try:  # an earlier edgepeft's manifest without a record generate, classify or embed reads
        older_export(base_dir, base, *OLDER_RECORDS[base["task"]])
    except EdgePeftError as e:
        problems.append(str(e))
    most = adapter_bound(base_dir, base)
    for name, d in adapter_dirs(out_dir).items():  # by folder, as the runtime names them
        try:  # as a Runtime reads it: again where an --overwrite renamed a new folder in, and while an export commits,
            _, _, m = read_adapter_source(d, most, base)  # the manifest it renames in next
        except EdgePeftError as e:  # a stray or damaged folder is one problem: inspect printed nothing else (--json:
            problems.append(str(e))  # no JSON at all); one whose graph is damaged is listed too
            try:
                m = read_adapter_manifest(d)
            except EdgePeftError:
                continue
        if problem := _ort_adapter_problem(d, m, base):  # what ONNX Runtime's own LoraAdapter would read
            problems.append(problem)
        if problem := folder_name_problem(d, name):  # Runtime(OUT) refuses to open with it
            problems.append(problem)
        if m["base_fingerprint"] != base["fingerprint"]:  # Runtime(OUT) refuses to open with it too
            problems.append(f"{d}: exported for another base ({m['base_fingerprint'][:12]}; {base_dir} is "
                            f"{base['fingerprint'][:12]}); {folder_fix(out_dir, d, base, m)}{copied_base_fix(m, base, d)}")
        adapters.append(
            {
                "name": name,
                "methods": m["methods"],
                "rank": m.get("rank"),
                "alpha": m.get("alpha"),
                # LoRA's per-module exceptions to rank and alpha (HF PEFT's rank_pattern, alpha_pattern), else {}
                "patterns": {k: v for k in ("rank_pattern", "alpha_pattern")
                             if isinstance(v := (m.get("peft_config") or {}).get(k), dict) and v},
                "slots": len(m["slots"]),
                "labels": m.get("labels"),
                "bytes": folder_bytes(d),
                "matches_base": m["base_fingerprint"] == base["fingerprint"],
            }
        )
    return {
        "embedding": _embedding(base_dir, base, problems),
        "base": {
            "model_type": base["model_type"],
            "task": base["task"],
            "source": base.get("source"),
            "revision": base.get("revision"),
            "fingerprint": base["fingerprint"],
            "dtype": base.get("dtype"),
            "quantization": base.get("quantization"),
            "opset": base.get("opset"),
            "ops": base.get("ops", "standard"),  # contrib: ONNX Runtime's fused kernels (an export into OUT repeats it)
            "merged_adapter": base.get("merged_adapter"),
            # how a classifier takes text pairs: with BERT's token types, by the pair template alone (a decoder's), or
            # not at all (an earlier edgepeft's BERT export); None: no classifier
            "text_pairs": None if base["task"] != "seq-cls" else "not served" if not serves_pairs(base) else
            "token types" if base.get("type_vocab_size") else "template",
            "text_pairs_fix": pairs_fix(base) if base["task"] == "seq-cls" and not serves_pairs(base) else None,
            "bytes": folder_bytes(base_dir),
        },
        "slots": base["slots"],
        "adapters": adapters,
        "problems": problems,  # files the manifests name that are missing or damaged, adapters for another base
    }


def _moved_aside(out_dir: str) -> list[str]:
    """Adapters an export stopped midway (kill -9) had moved aside to replace them, and nothing took their place:
    the runtime does not see them, and the next export puts them back (``remove_abandoned``, which reads them so)."""
    found = moved_aside(os.path.join(out_dir, ADAPTERS_DIR))
    return [f"{folder}: adapter {name!r}, moved aside {STOPPED.format(out_dir)}" for name, folder in found.items()]
