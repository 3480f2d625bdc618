"""The frozen base as one ONNX graph with every slot as an input (``OUT/base/``), and its manifest.

    plain model --copy--> fuse groups (q|k|v, gate|up) --> each spec installs its slot modules
                --> SlotGraph (cache I/O for causal LMs) --> torch.onnx.export --> model.onnx
    manifest: model type, task, I/O table, slot table, fingerprints, generation ids; tokenizer files copied
"""
from __future__ import annotations

import copy
import json
import os
import shutil

import torch

from edgepeft.exporters.contrib_ops import install_contrib_ops
from edgepeft.exporters.fingerprint import base_fingerprint, made_heads
from edgepeft.exporters.fusion import fuse_groups, trace_conv1d_as_matmul
from edgepeft.exporters.genai_config import genai_notes, write_genai_config
from edgepeft.exporters.graph import OPSET, SlotGraph, export_graph
from edgepeft.exporters.quantize import quantize_graph
from edgepeft.files import write_json_atomic
from edgepeft.hub import cached_folder
from edgepeft.models import (
    NO_REMOTE_CODE, SENTENCE_TRANSFORMERS_FILES, cache_layout, is_placeholder_tokenizer, max_positions, named_labels,
    sentence_transformers_folder,
)
from edgepeft.exporters.generation_settings import SAMPLING_ONLY, generation_fields, ignored_generation
from edgepeft.exporters.web_graph import write_web_variant
from edgepeft.runtimes.manifest import (BASE_GRAPH, BASE_MANIFEST, FORMAT_VERSION, LAYOUT_VERSION, NEUTRAL_GRAPH,
                                        WEB_GRAPH, slot_name)
from edgepeft.runtimes.sentence import (PROMPTS_CONFIG, TEXT_FILES, has_sentence_transformers_files,
                                        sentence_transformers_settings)
from edgepeft.runtimes.text import TextTokenizer
from edgepeft.registry import check_hook
from edgepeft.tuners import spec_for
from edgepeft.tuners.targets import replace_module

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja",
)


def trace_base(model, slots, task, stage, source, weights_fp, groups, merged_adapter=None, ops="standard",
               revision=None, log=lambda *a, **k: None, digests: bool = True) -> dict:
    """Trace ``model`` (its ``groups`` fused) with ``slots`` as inputs into ``stage``; returns the manifest.

    ``ops``: "contrib" (a model ``effective_ops`` allows) or "standard" (see ``contrib_ops``). ``revision``: the hub
    revision of ``source`` (its tokenizer's too). ``log``: where a note goes (a tokenizer left out). ``digests``:
    the files' SHA-256 recorded (not for a graph ``quantize_stage`` writes again, which records its own).
    """
    # first: a tokenizer or a generation default refused is refused before the tracing (minutes on a large model)
    write_side_files(source, stage, task, revision, log)
    generation = generation_fields(model, task)
    graph_model = copy.deepcopy(model)
    fused = fuse_groups(graph_model, groups)
    trace_conv1d_as_matmul(graph_model)
    contrib = ops == "contrib"
    if contrib:
        install_contrib_ops(graph_model, max_positions(model.config))
    feeds, neutral, samples = {}, {}, {}
    by_spec: dict = {}
    for s in slots:
        by_spec.setdefault(s.method, []).append(s)
    output_axis = None
    for name, group in by_spec.items():
        spec = spec_for(name)
        spec_feeds, spec_neutral = spec.install(graph_model, group, fused)
        check_hook(spec, "install", [s for s in group if not s.target], spec_neutral, every=True)  # its neutral
        # values: one per graph input (a slot with a target starts a cache input, no input of its own)
        feeds.update(spec_feeds)
        neutral.update(spec_neutral)
        samples.update(spec.sample(group, spec_neutral))
        output_axis = output_axis or spec.output_axis(group)
    shift = next(((s.name, s.position_axis) for s in slots if s.position_axis is not None), None)
    graph = SlotGraph(graph_model, feeds, task, cache=cache_layout(model.config, task), output_axis=output_axis,
                      shift=shift)
    io = export_graph(graph, graph.sample_inputs(model.config, samples), slots, neutral, os.path.join(stage, BASE_GRAPH),
                      contrib, source)
    required = write_web_variant(stage)  # JavaScript: every slot required, their neutral values in neutral.onnx
    slots = [s for s in slots if s.name not in io["inert_slots"]]
    manifest = {
        "format": "edgepeft-base",
        "format_version": FORMAT_VERSION if graph.types else LAYOUT_VERSION,  # an older runtime binds no types
        "model_type": model.config.model_type,
        "task": task,
        "source": source,
        "revision": revision,  # the hub revision of source (None: the default branch, or a folder)
        "graph": BASE_GRAPH,
        "web_graph": WEB_GRAPH,
        "neutral_graph": NEUTRAL_GRAPH if required else None,  # a merged classifier has no slot to fill
        "fingerprint": base_fingerprint(weights_fp, slots, OPSET),
        "weights_fingerprint": weights_fp,
        "fingerprint_counts_heads": True,  # the base's own head weights are in it (older exports left them out)
        "opset": OPSET,
        "ops": "contrib" if contrib else "standard",  # contrib: ONNX Runtime's fused kernels (contrib_ops.py)
        "dtype": "float32",
        "quantization": None,
        "merged_adapter": merged_adapter,
        # the base head's class names, where the model's config names them (a merged classifier's: set once
        # validation has seen its width), and whether that head was made at load (untrained) rather than loaded
        "labels": named_labels(model.config) if task == "seq-cls" else None,
        "head_initialised": bool(made_heads(model)) if task == "seq-cls" else None,
        # how classify scores the logits, as transformers' pipeline: softmax, sigmoid (multi-label), none (regression)
        "problem_type": getattr(model.config, "problem_type", None) if task == "seq-cls" else None,
        "vocab_size": model.config.vocab_size,
        # a seq-cls BERT's token types (the graph's token_type_ids input: text pairs), else None
        "type_vocab_size": model.config.type_vocab_size if graph.types else None,
        "max_positions": max_positions(model.config),
        **generation,
        "slots": [s.to_json() for s in slots],
        "fused_groups": list(fused),
        **io,
    }
    ignored = ignored_generation(model) if task == "causal-lm" else []
    if ignored:
        sampling = [k for k in SAMPLING_ONLY if any(i.startswith(k + "=") for i in ignored)]
        log(f"note: {source}: generation_config.json sets {', '.join(ignored)}, which edgepeft's generate does not "
            "apply (one sequence per prompt, greedy or sampled); its tokens differ from transformers' generate there"
            + (f" ({', '.join(sampling)}: when sampling)" if sampling else ""))
    if generation["generation"].get("stop") and not os.path.isfile(os.path.join(stage, "tokenizer.json")):
        log(f"note: {source}: generation_config.json sets stop_strings, which are matched in decoded text, and the "
            "export has no tokenizer: generate on token ids with stop=[] (without them), or export from a base folder "
            "that has tokenizer.json")
    manifest.update(graph_files(stage, manifest, digests))
    write_json_atomic(os.path.join(stage, BASE_MANIFEST), manifest, sort_keys=True)
    write_genai_config(model, manifest, stage)  # decoders: onnxruntime-genai opens OUT/base as it is
    for note in genai_notes(manifest):
        log(f"note: {source}: {note}")
    return manifest


def take_made_heads(model, base_dir: str) -> None:
    """Give ``model`` the heads made at load that the base in ``base_dir`` holds: their slots' neutral values.

    A made head is no base weight (the fingerprint leaves it out), so OUT's base is reused for a copy of its model
    whose config.json sets another num_labels (a reranker's 1); its graph holds the head made when it was exported,
    and the base alone is checked against that one. Adapters are unaffected: each fills the slot with its own head.
    """
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in onnx.load(os.path.join(base_dir, BASE_GRAPH), load_external_data=False).graph.initializer}
    for module in sorted(made_heads(model)):
        weight, bias = (inits.get(slot_name("head", role, module)) for role in ("weight", "bias"))
        if weight is None:  # no slot: the graph holds no such head to take
            continue
        w = numpy_helper.to_array(weight, base_dir)  # (in, out)
        head = torch.nn.Linear(*w.shape, bias=bias is not None)
        with torch.no_grad():
            head.weight.copy_(torch.tensor(w.T))
            if bias is not None:
                head.bias.copy_(torch.tensor(numpy_helper.to_array(bias, base_dir)))
        replace_module(model, module, head.eval())


def write_side_files(source: str, stage: str, task: str, revision: str | None = None, log=lambda *a, **k: None) -> None:
    """What the graph runs with, from ``source`` into ``stage``: the tokenizer, generate's defaults (in the manifest
    too), Runtime.embed's length limit and pooling (from the hub too)."""
    write_tokenizer(source, stage, revision, log, pairs=task == "seq-cls")
    note_chat_template(source, stage, log)
    folder = cached_folder(source, revision) or source  # a hub id's snapshot, where loading the model put it
    if os.path.isfile(os.path.join(folder, "generation_config.json")):
        shutil.copy2(os.path.join(folder, "generation_config.json"), stage)
    st = sentence_transformers_folder(source, revision) if task == "feature-extraction" else None
    for f in (*SENTENCE_TRANSFORMERS_FILES, PROMPTS_CONFIG) if st else ():  # embed's prompt_name, truncate_dim
        if os.path.isfile(os.path.join(st, f)):
            os.makedirs(os.path.dirname(os.path.join(stage, f)), exist_ok=True)
            shutil.copy2(os.path.join(st, f), os.path.join(stage, f))
    if st and has_sentence_transformers_files(stage) and not os.path.isfile(os.path.join(stage, PROMPTS_CONFIG)):
        # sentence-transformers' own prompts where the model saved none (a model of before 2.0): without the file,
        # embed took this export for an earlier edgepeft's and refused prompt_name "query", as a fresh export did
        write_json_atomic(os.path.join(stage, PROMPTS_CONFIG), {"prompts": {"query": "", "document": ""},
                                                                "default_prompt_name": None})


def side_difference(have: str, new: str, task: str, max_positions: int | None) -> str | None:
    """What ``have`` (OUT/base) and ``new`` (``write_side_files``' folder) make the runtime do otherwise, as it reads
    them: the tokenizer (rules and vocabulary, special tokens, chat template) or, for embeddings, the
    sentence-transformers settings (length limit, pooling, lower-casing); None: the same. How transformers wrote the
    files (their keys, a hub id's or a folder's) does not count."""
    def tokenizer(folder):
        return TextTokenizer(folder).behaviour() if os.path.isfile(os.path.join(folder, "tokenizer.json")) else None

    if tokenizer(have) != tokenizer(new):
        return "tokenizer (tokenizer.json, tokenizer_config.json, chat template)"
    if task != "feature-extraction":
        return None
    old, now = (sentence_transformers_settings(f, max_positions) for f in (have, new))
    earlier = not os.path.isfile(os.path.join(have, PROMPTS_CONFIG))  # an earlier edgepeft's export
    if earlier:  # prompts only on request (embed names the re-export then)
        old, now = old._replace(prompts={}), now._replace(prompts={})
    if old != now:
        return ("sentence-transformers settings (modules.json, sentence_bert_config.json, 1_Pooling/config.json, "
                f"{PROMPTS_CONFIG}"
                + (f": {have} has no {PROMPTS_CONFIG}, as an earlier edgepeft exported it" if earlier else "") + ")")
    return None


def graph_files(stage: str, manifest: dict, digests: bool = True) -> dict:
    """``file_bytes`` ({file: size}) and ``file_sha256`` ({file: digest}) of the base's graphs and weights file, as
    written: a copy cut short is told by its size at every load (``manifest.base_file_errors``), one damaged within
    (a preallocated file a copy stopped filling) by its digest in ``edgepeft inspect``: the weights are too large to
    hash on every load. ``text_files``: the files text calls read (the tokenizer's, the chat template, the
    sentence-transformers files) as written, which a copy must have (at the first text call: a copy without
    tokenizer_config.json cut no text, one without sentence_bert_config.json cut at the positions, one without the
    chat template was told it has none, silently), their SHA-256 with the graphs' (inspect: a template cut short at a
    tag rendered other prompts; edited since, it is named too); the others may go (deploy.md)."""
    from edgepeft.runtimes.access import sha256_file

    names = (manifest["graph"], manifest["graph"] + ".data", manifest.get("web_graph"), manifest.get("neutral_graph"))
    paths = {n: os.path.join(stage, n) for n in names if n and os.path.isfile(os.path.join(stage, n))}
    text = [n for n in TEXT_FILES if "/" not in n and os.path.isfile(os.path.join(stage, n))]  # 1_Pooling/: modules.json
    return {"file_bytes": {n: os.path.getsize(p) for n, p in paths.items()}, "text_files": text,
            **({"file_sha256": {n: sha256_file(os.path.join(stage, n)) for n in [*paths, *text]}} if digests else {})}


def write_tokenizer(source: str, stage: str, revision: str | None = None, log=lambda *a, **k: None,
                    pairs: bool = False) -> None:
    """The base's tokenizer as transformers loads it, into ``stage``: its tokenizer.json is the one transformers
    runs. transformers 5 rebuilds some tokenizers (Llama-2's: no Prepend normalizer, Metaspace first only), so
    a copied file gave other ids (' Hello', text after <s>). A hub id's tokenizer comes too. A tokenizer that
    transformers cannot load is copied as it is (a folder's), or left out (the runtime then takes token ids), and
    so is one with no vocabulary beyond its special tokens: transformers 5 makes such a placeholder for a folder
    without tokenizer files, which encodes every word as [UNK] (or nothing). ``pairs``: a classifier's, whose
    pair template a copy must encode with too."""
    import transformers

    from edgepeft.errors import ArtifactNotFoundError

    for f in TOKENIZER_FILES if os.path.isdir(source) else ():  # a hub snapshot's blob gone: an export without it
        if os.path.islink(link := os.path.join(source, f)) and not os.path.exists(link):  # failed every text call
            raise ArtifactNotFoundError(f"{link}: is a link to {os.readlink(link)}, which does not exist (a download "
                                        "cut short, a cache cleaned); download the model again, or put the file there")
    if os.path.isdir(source) and not any(os.path.isfile(os.path.join(source, f)) for f in TOKENIZER_FILES):
        return
    why = None  # transformers' refusal, noted once the files are copied (or none of a hub id's are)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, revision=revision, **NO_REMOTE_CODE)
    except Exception as e:  # noqa: BLE001  one that needs remote code, another package or the network
        why, tokenizer = f"note: transformers cannot load the tokenizer of {source} ({str(e).splitlines()[0][:120]}); ", None
        if not os.path.isdir(source):
            log(why + "the export has none: pass token ids")
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        if not is_placeholder_tokenizer(tokenizer):
            tokenizer.save_pretrained(stage)
            plain_tokenizer_json(os.path.join(stage, "tokenizer.json"))
            settled_config(os.path.join(stage, "tokenizer_config.json"), tokenizer)
        return
    copied = [f for f in TOKENIZER_FILES if os.path.isdir(source) and os.path.isfile(os.path.join(source, f))]
    for f in copied:
        shutil.copy2(os.path.join(source, f), os.path.join(stage, f))
    if "tokenizer.json" in copied:  # files the runtime cannot read either (a byte-order mark) failed every text call
        _check_copied_tokenizer(source, stage, pairs)  # later with "re-run export", which copied them again
    if copied and why:
        log(why + "its files are copied as they are")


def note_chat_template(source: str, stage: str, log) -> None:
    """A model's chat template that cannot be used, noted at export: transformers says so at its first chat call
    only, and every chat=True call of the export refuses it (a re-export, the fix that named, copied it again)."""
    from edgepeft.errors import EdgePeftError, MissingDependencyError
    from edgepeft.runtimes import chat_template
    from edgepeft.runtimes.text import TextTokenizer

    try:
        template = TextTokenizer(stage).chat_template if os.path.isfile(os.path.join(stage, "tokenizer.json")) else None
        if template is not None:
            chat_template.compile_template(chat_template.default_template(template, source), source,
                                           "chat=True calls of this export refuse it: correct it in the model's "
                                           "folder and export into a fresh --out, or pass plain text")
    except MissingDependencyError:  # jinja2 missing or too old: the runtime names that itself
        pass
    except EdgePeftError as e:
        log(f"note: {e}")


def _check_copied_tokenizer(source: str, stage: str, pairs: bool) -> None:
    from edgepeft.errors import ConfigError, EdgePeftError
    from edgepeft.runtimes.text import TextTokenizer

    try:
        TextTokenizer(stage, pairs=pairs)
    except EdgePeftError as e:
        why = str(e).replace(stage, source).rsplit("; ", 1)[0]  # its fix is for an export's copy
        raise ConfigError(f"{why}; transformers cannot load the tokenizer either: correct it (a byte-order mark: save "
                          "it as UTF-8 without one, as transformers writes it), or remove the tokenizer files to "
                          "export without them (then pass token ids)") from None


def settled_config(path: str, tokenizer) -> None:
    """``path`` (the tokenizer_config.json save_pretrained wrote) without how the tokenizer was loaded (local_files_only
    follows HF_HUB_OFFLINE: two exports of one tokenizer differed, and a Runtime opened before a re-export took it for
    another tokenizer), and with the ``legacy`` flag save_pretrained drops (a Llama-2 tokenizer's "legacy": true:
    transformers reloaded OUT/base as not legacy, other ids than the model's)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    for key in ("local_files_only", "is_local"):
        config.pop(key, None)
    if isinstance(getattr(tokenizer, "legacy", None), bool):
        config.setdefault("legacy", tokenizer.legacy)
    write_json_atomic(path, config)


def plain_tokenizer_json(path: str) -> None:
    """``path`` (a tokenizer.json) rewritten without indentation, padding or truncation: save_pretrained indents it,
    which a browser downloads (MiniLM's: 0.71 MB indented, 0.47 MB compact), and keeps MiniLM's padding to 128 ids
    and cut at 128, which transformers' tokenizer(text) turns off, as edgepeft's runtimes do; ONNX Runtime's recipe
    (deploy.md) and onnxruntime-genai read the file as it is."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        data.update(padding=None, truncation=None)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, separators=(",", ":"))


def quantize_stage(stage: str, quantize: str, qtol: float, log) -> None:
    """Quantize a staged, float32-validated base graph in place and record it in its manifest, with the tolerance it
    is checked by (``qtol``: the re-exports a message advises repeat it, which the base passed only by it)."""
    log(f"quantizing the base's weights to {quantize}")
    path = os.path.join(stage, BASE_MANIFEST)
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)  # as written (read_base_manifest parses the slot table)
    manifest.update(quantize_graph(os.path.join(stage, BASE_GRAPH), quantize), qtol=qtol)
    write_web_variant(stage)  # the JavaScript variant reads the quantized weights file now
    manifest.update(graph_files(stage, manifest))
    write_json_atomic(path, manifest, sort_keys=True)


def note_adapter_tokenizers(sources, base: str, revision: str | None, log) -> None:
    """An adapter folder saved with a tokenizer of its own (TRL saves the fine-tune's: chat tokens added, another
    chat template), which the export does not serve: every adapter of an export reads its base's tokenizer, and
    the fine-tune's texts became other ids there (its tokens as pieces, its template unknown), without a word.
    Said where that tokenizer encodes otherwise than the base's: its own tokens (the padding token aside: padding
    is masked), its rules, or its chat template."""
    import tempfile

    saved = [s for s in sources if any(os.path.isfile(os.path.join(s.path, f))
                                       for f in ("tokenizer.json", "tokenizer_config.json"))]
    if not saved:
        return
    with tempfile.TemporaryDirectory() as have:
        write_tokenizer(base, have, revision)
        ours = TextTokenizer(have) if os.path.isfile(os.path.join(have, "tokenizer.json")) else None
        for src in saved:
            with tempfile.TemporaryDirectory() as theirs:
                try:  # one that cannot be read is not served either: no note (the export goes on, as before)
                    write_tokenizer(src.path, theirs)
                    differs = os.path.isfile(os.path.join(theirs, "tokenizer.json")) and tokenizer_differences(
                        ours, TextTokenizer(theirs))
                except Exception:  # noqa: BLE001  transformers', tokenizers' or our refusal of a damaged file
                    continue
                if differs:
                    log(f"note: {src.path}: holds its own tokenizer, which differs from its base's ({base}) in "
                        f"{differs}; the export serves the base's to every adapter, so texts of the fine-tune's become "
                        "other ids: to serve this one, export into a fresh --out with --base a folder holding the base "
                        "model and this tokenizer (save_pretrained both into one folder)")


def tokenizer_differences(base, adapter) -> str:
    """What ``adapter``'s tokenizer (TextTokenizer) encodes or templates otherwise than ``base``'s (None: it has
    none), in words; "" where only the padding token differs."""
    if base is None:
        return "having one (the base has none: the export takes token ids only)"
    pad = adapter.special_tokens.get("pad_token")
    mine, yours = base._tok.get_vocab(with_added_tokens=True), adapter._tok.get_vocab(with_added_tokens=True)
    added = [t for t, i in sorted(yours.items(), key=lambda kv: kv[1]) if mine.get(t) != i and t != pad]
    rules = [k for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder")
             if json.loads(base._tok.to_str()).get(k) != json.loads(adapter._tok.to_str()).get(k)]
    rules += sorted(k for k in {**base.special_tokens, **adapter.special_tokens}  # an eos a chat template writes
                    if k != "pad_token" and base.special_tokens.get(k) != adapter.special_tokens.get(k))
    words = ([f"its tokens {', '.join(map(repr, added[:3]))}" + (f" and {len(added) - 3} more" if len(added) > 3 else "")]
             if added else []) + ([f"its {', '.join(rules)}"] if rules else []) + (
        ["its chat template"] if adapter.chat_template and adapter.chat_template != base.chat_template else [])
    return " and ".join(words)
