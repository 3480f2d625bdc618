"""A sentence-transformers model's settings, read as sentence-transformers (6.x) loads them: how ``Runtime.embed``
and feature-extraction training cut, lower-case and pool texts, so both give what ``SentenceTransformer.encode``
gives.

    sentence_bert_config.json   max_seq_length (else the tokenizer's model_max_length), capped at the model's
                                positions; do_lower_case (a Lowercase step before the tokenizer's normalizer)
    modules.json                Transformer, Pooling (1_Pooling), Normalize: by class name, sentence-transformers
                                5's paths (sentence_transformers.models.X) and 6's (...modules.x.X)
    1_Pooling/config.json       pooling_mode (6.x: a name) or the pooling_mode_* flags (5.x), include_prompt
    config_sentence_transformers.json   prompts (embed's prompt_name), truncate_dim; default_prompt_name refused

Settings by which encode embeds other than a Pooling of the token embeddings (``transformer_task`` fill-mask, another
``method_output_name`` or ``module_output_name``, no Pooling module), and ``query_length``/``document_length``, are
refused. A plain transformers folder (no such files) pools by the mean and is cut as sentence-transformers cuts it
(sentence-transformers 6 would pool a plain decoder by its last token, and render texts through the tokenizer's chat
template where it has one: save the model with sentence-transformers to embed as its encode does). A saved
``modality_config`` that renders texts through the chat template ("message"), ``processing_kwargs``, ``tokenizer_args`` or
``processor_kwargs``, are refused.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from .errors import ConfigError, CorruptArtifactError, InvalidInputError
from .access import present, read_json
from .commands import REEXPORT_BASE
from .manifest import BASE_MANIFEST

SENTENCE_TRANSFORMERS_FILES = ("sentence_bert_config.json", "modules.json", "1_Pooling/config.json")  # as exported
PROMPTS_CONFIG = "config_sentence_transformers.json"  # prompts, default_prompt_name (refused), truncate_dim
MODULES = ("Transformer", "Pooling", "Normalize")  # the modules embed runs (class names)
TEXT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              *SENTENCE_TRANSFORMERS_FILES, PROMPTS_CONFIG)  # what a runtime's text calls read from the base folder
POOLING = {"mean": "mean", "cls": "cls", "max": "max", "mean_sqrt_len": "mean_sqrt_len",
           "mean_sqrt_len_tokens": "mean_sqrt_len", "lasttoken": "lasttoken"}  # sentence-transformers' names -> edgepeft's
LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
                  "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len", "pooling_mode_weightedmean_tokens": "weightedmean",
                  "pooling_mode_lasttoken": "lasttoken"}  # sentence-transformers 5's flags
TOKENIZER_FIX = REEXPORT_BASE  # what mends an export's tokenizer and sentence-transformers files
MODEL_FIX = "restore it as sentence-transformers saves it with the model (download the model again)"  # a model's


class Embedding(NamedTuple):
    """How ``embed`` (and feature-extraction training: the first three) cuts, lower-cases, pools and prompts texts."""
    limit: int | None  # max_seq_length, else the tokenizer's limit (None: none)
    mode: str  # pooling
    lower: bool  # do_lower_case
    include_prompt: bool  # 1_Pooling's: False leaves a prompt's tokens out of the pooling
    truncate_dim: int | None  # the embedding's first values encode gives (None: all)
    prompts: dict  # {name: prompt} for embed's prompt_name
    normalized: bool = False  # modules.json lists Normalize: encode normalizes before the cut to truncate_dim


def check_default_prompt(folder: str) -> None:
    """Refuse a model whose sentence-transformers config sets ``default_prompt_name``: its ``encode`` puts that
    prompt before every text, which edgepeft's embed and training do not (they would embed other text)."""
    path, settings = _prompts_config(folder, "repair it, or remove it")
    name, prompts = settings.get("default_prompt_name"), settings.get("prompts")
    prompt = prompts.get(name) if name is not None and isinstance(prompts, dict) else None
    if prompt:  # "" prepends nothing
        raise ConfigError(f"{path}: default_prompt_name {name!r} puts {prompt!r} before every text in "
                          "sentence-transformers' encode, which edgepeft does not; set it to null and pass "
                          f"prompt_name={name!r} to Runtime.embed")


def _prompts_config(folder: str, fix: str = TOKENIZER_FIX) -> tuple:
    path = os.path.join(folder, PROMPTS_CONFIG)
    return path, read_json(path, "sentence-transformers config", fix, optional=True)


def sentence_transformers_settings(folder: str, max_positions: int | None = None) -> Embedding:
    """The ``Embedding`` settings of the model in ``folder`` (an export's base/, or the model's own folder for
    training). ``max_positions``: the model's, which caps the limit (max_seq_length, else the tokenizer's own)."""
    config, modules, pooling = (os.path.join(folder, f) for f in SENTENCE_TRANSFORMERS_FILES)
    exported = present(os.path.join(folder, BASE_MANIFEST))  # else a model's folder (training, export)
    fix = TOKENIZER_FIX if exported else MODEL_FIX  # an export's files mend by copying the export, a model's not
    settings = read_json(config, "sentence-transformers config", fix, optional=True)
    limit, lower = settings.get("max_seq_length"), settings.get("do_lower_case") is True
    if limit is not None and not (isinstance(limit, int) and not isinstance(limit, bool) and limit > 2):
        raise CorruptArtifactError(f"{config}: max_seq_length must be a whole number > 2, got {limit!r}; {fix}")
    if limit is None:
        limit = _tokenizer_limit(folder, max_positions, fix)
    elif max_positions and limit > max_positions:  # sentence-transformers' cut past the positions: BERT's RuntimeError
        limit = max_positions  # there; here every text "exceeds the positions" though the caller's was any length
    _check_modality(config, settings.get("modality_config"))
    _check_output(config, settings, fix)
    if settings.get("processing_kwargs"):  # sentence-transformers 6 saves them where they were set
        raise ConfigError(f"{config}: processing_kwargs {settings['processing_kwargs']!r} change how "
                          "sentence-transformers' encode tokenizes texts, which edgepeft's embed and training do not "
                          "follow; remove them (max_seq_length sets the length texts are cut to)")
    if taken := {k: v for k in ("tokenizer_args", "processor_kwargs") if (v := _tokenizing(settings.get(k)))}:
        key, value = next(iter(taken.items()))  # a hunt: ignored, where encode loads its tokenizer with them
        others = {k: v for k, v in value.items() if k != "model_max_length"} if isinstance(value, dict) else value
        fix = [f"set max_seq_length to {value['model_max_length']} (encode's cut)"] if others != value else []
        fix += [f"save the tokenizer with them (AutoTokenizer.from_pretrained({folder!r}, **{others!r})"
                f".save_pretrained({folder!r}))"] if others else []
        raise ConfigError(f"{config}: {key} {value!r} change how sentence-transformers tokenizes texts, which "
                          f"edgepeft's embed and training do not follow; {' and '.join(fix)}, then remove them here")
    listed = _check_modules(modules, fix)
    normalized = "Normalize" in listed
    prompts_path, extra = _prompts_config(folder, fix)
    prompts, truncate = extra.get("prompts") or {}, extra.get("truncate_dim")
    if not (isinstance(prompts, dict) and all(isinstance(v, str) for v in prompts.values())):
        raise CorruptArtifactError(f"{prompts_path}: prompts must map names to texts, got {prompts!r:.80}; {fix}")
    prompts = {"query": "", "document": "", **prompts}  # sentence-transformers 6 gives every model these two
    if truncate is not None and not (isinstance(truncate, int) and not isinstance(truncate, bool) and truncate > 0):
        raise CorruptArtifactError(f"{prompts_path}: truncate_dim must be a whole number > 0, got {truncate!r}; "
                                   f"{fix}")
    if not (listed or present(os.path.dirname(pooling), folder=True)):  # no Pooling module: the mean, as sentence-transformers
        return Embedding(limit, "mean", lower, True, truncate, prompts, normalized)  # listed: a copy without it is
        # named, not meaned
    fields = read_json(pooling, "pooling config", fix if exported else f"{fix}, or remove the Pooling entry of "
                       "modules.json")
    modes = fields.get("pooling_mode")
    if modes is None:  # sentence-transformers 5: one flag per mode; none set pools by the mean, as 6.x reads it
        modes = [LEGACY_POOLING.get(k, k.removeprefix("pooling_mode_")) for k, v in fields.items()
                 if k.startswith("pooling_mode_") and v] or ["mean"]
    modes = [modes] if isinstance(modes, str) else modes
    if not (isinstance(modes, list) and len(modes) == 1 and modes[0] in POOLING):
        shown = " + ".join(map(str, modes)) if isinstance(modes, list) else repr(modes)
        raise ConfigError(f"{pooling}: pooling {shown or 'none'} is not one edgepeft pools by (mean, cls, max, "
                          "mean_sqrt_len_tokens, lasttoken); export (or train on) a copy of the model whose pooling is "
                          "one of those, then pool Runtime.forward's last_hidden_state as this model does yourself")
    return Embedding(limit, POOLING[modes[0]], lower, bool(fields.get("include_prompt", True)), truncate, prompts,
                     normalized)  # include_prompt: any falsy value leaves a prompt out, as sentence-transformers reads it


def chosen_prompt(settings: Embedding, folder: str, prompt_name, prompt) -> str | None:
    """The prompt ``encode`` puts before each text: ``prompt`` where given (it wins over ``prompt_name``), else the
    model's prompt named ``prompt_name`` (in ``folder``'s config)."""
    yourself = "or pass the prompt itself (prompt='...'; at the command line --embed-prompt)"
    if prompt is None and prompt_name is not None:
        if not prompts_known(folder):
            raise ConfigError(f"prompt_name {prompt_name!r}: {folder} has no {PROMPTS_CONFIG}, as an earlier edgepeft "
                              f"exported it; export again into a fresh --out, {yourself}")
        if not isinstance(prompt_name, str) or prompt_name not in settings.prompts:
            raise ConfigError(f"prompt_name {prompt_name!r}: the model names the prompts {sorted(settings.prompts)}; "
                              f"pass one of them, {yourself}")
        prompt = settings.prompts[prompt_name]
    if not (prompt is None or isinstance(prompt, str)):
        raise InvalidInputError(f"prompt must be a text, got {type(prompt).__name__}")
    return prompt


def prompts_known(folder: str) -> bool:
    """Whether the prompts of the model in ``folder`` (an export's base/) are known: an export with
    sentence-transformers files but not its prompts' file was an earlier edgepeft's (a plain model has only
    sentence-transformers' query and document prompts, both empty)."""
    return present(os.path.join(folder, PROMPTS_CONFIG)) or not has_sentence_transformers_files(folder)


def has_sentence_transformers_files(folder: str) -> bool:
    """Whether ``folder`` holds a sentence-transformers model's settings (any of its files an export copies)."""
    return any(present(os.path.join(folder, f)) for f in SENTENCE_TRANSFORMERS_FILES)


def _tokenizer_limit(folder: str, max_positions: int | None, fix: str) -> int | None:
    """sentence-transformers' limit where its config gives none: the tokenizer's ``model_max_length`` (where
    sentence-transformers 6 saves ``max_seq_length``), capped at the model's positions."""
    path = os.path.join(folder, "tokenizer_config.json")
    own = read_json(path, "tokenizer config", fix, optional=True).get("model_max_length")
    return tokenizer_limit(own, max_positions)


def tokenizer_limit(own, max_positions: int | None) -> int | None:
    """A tokenizer's ``model_max_length`` (``own``; none where it is no whole number > 2), capped at the positions."""
    own = own if isinstance(own, int) and not isinstance(own, bool) and own > 2 else None
    return min((n for n in (own, max_positions) if n), default=None)


def cut_length(limit: int | None, max_positions: int | None, n_virtual: int) -> int | None:
    """The length ``embed`` (and training) cuts a text to: ``limit``, less room for a prompt's or prefix's
    ``n_virtual`` tokens within the model's positions."""
    return min(limit or max_positions, max_positions - n_virtual) if max_positions and n_virtual else limit


def unit(pooled: np.ndarray) -> np.ndarray:
    """Each row L2-normalized, as torch.nn.functional.normalize (eps 1e-12)."""
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def row_limits(rt, adapter, per_row: list, limit: int | None) -> list:
    """Each row's cut (``cut_length``) for its own adapter's virtual tokens, as run alone; one adapter (or one mix)
    for every row is asked once."""
    virtual = ([rt.virtual_positions(spec, 1) for spec in per_row] if isinstance(adapter, (list, tuple))
               else [rt.virtual_positions(adapter, len(per_row))] * len(per_row))
    return [cut_length(limit, rt.max_positions, n) for n in virtual]


def _check_modality(config: str, modalities) -> None:
    """Refuse a saved ``modality_config`` that routes texts through the chat template: sentence-transformers 6 then
    renders each text as a user message (no special tokens of the tokenizer's own), which embed does not."""
    if isinstance(modalities, dict) and any("message" in str(key).split("+") for key in modalities):
        raise ConfigError(f"{config}: modality_config has \"message\", so sentence-transformers' encode renders each "
                          "text through the tokenizer's chat template, which edgepeft's embed and training do not; "
                          "remove \"message\" from modality_config (encode then embeds texts as they are, as edgepeft)")


def _check_output(config: str, settings: dict, fix: str) -> None:
    """Refuse sentence-transformers 6 settings by which encode embeds other than the pooled ``last_hidden_state`` that
    embed and training pool: another task's output (fill-mask: the vocabulary's logits), another output of the model
    (``pooler_output``, taken as the sentence's), or queries and documents cut to lengths of their own."""
    routes = settings.get("modality_config") if isinstance(settings.get("modality_config"), dict) else {}
    named = [r.get("method_output_name") for r in routes.values() if isinstance(r, dict)]
    if not all(n is None or isinstance(n, str) for n in named):
        raise CorruptArtifactError(f"{config}: a method_output_name is not a name; {fix}")
    outputs = set(named) - {None, "last_hidden_state"}
    odd = {"transformer_task": settings.get("transformer_task") not in (None, "feature-extraction"),
           "method_output_name": bool(outputs),
           "module_output_name": settings.get("module_output_name") not in (None, "token_embeddings")}
    if key := next((k for k, bad in odd.items() if bad), None):
        value = sorted(outputs)[0] if key == "method_output_name" else settings[key]
        raise ConfigError(f"{config}: {key} {value!r}: sentence-transformers' encode embeds other than the model's "
                          "last_hidden_state pooled, which edgepeft's embed and training pool; use a model saved for "
                          "feature-extraction (its token embeddings pooled), or take Runtime.forward's outputs")
    if lengths := [k for k in ("query_length", "document_length", "query_expansion") if settings.get(k) is not None]:
        raise ConfigError(f"{config}: {', '.join(lengths)}: sentence-transformers' encode_query and encode_document "
                          "cut (or pad) texts to lengths of their own, which edgepeft's embed does not; remove them "
                          "(max_seq_length then cuts queries and documents alike)")


LOADING = {"trust_remote_code", "cache_dir", "local_files_only", "revision", "token", "use_auth_token", "force_download"}


def _tokenizing(args):
    """``tokenizer_args`` / ``processor_kwargs`` less ``LOADING``, what only says where the tokenizer comes from
    (sentence-transformers drops trust_remote_code; the rest change no token)."""
    return {k: v for k, v in args.items() if k not in LOADING} if isinstance(args, dict) else args


def _check_modules(modules: str, fix: str) -> list:
    """The names of the modules ``modules`` (modules.json) lists (then 1_Pooling among them), refusing those embed
    does not run."""
    listed = read_json(modules, "sentence-transformers modules", fix, list, optional=True)
    if listed and not any(isinstance(m, dict) and str(m.get("type", "")).rsplit(".", 1)[-1] == "Pooling" for m in listed):
        raise ConfigError(f"{modules}: the model lists no Pooling module, so sentence-transformers' encode does not "
                          "pool the token embeddings as edgepeft's embed and training do; add one (1_Pooling), or "
                          "export (or train on) a copy with one and pool Runtime.forward's last_hidden_state as this "
                          "model does yourself")
    other = []
    for m in listed:
        kind, path = (str(m.get("type", "")), m.get("path")) if isinstance(m, dict) else (repr(m), None)
        name = kind.rsplit(".", 1)[-1]
        if not (kind.startswith("sentence_transformers.") and name in MODULES) or (name == "Pooling" and path != "1_Pooling"):
            other.append(kind)
    if other:
        raise ConfigError(f"{modules}: the model runs {other} beyond a Transformer, 1_Pooling and Normalize, "
                          "which edgepeft does not; export (or train on) a copy of the model whose modules.json lists "
                          "only those, then apply the model's modules after the Transformer to Runtime.forward's "
                          "last_hidden_state yourself")
    return [str(m.get("type", "")).rsplit(".", 1)[-1] for m in listed]


def lowercase_first(tokenizer) -> None:
    """``do_lower_case`` as sentence-transformers 6 applies it: a Lowercase step before the normalizer of
    ``tokenizer`` (a ``tokenizers.Tokenizer``, changed in place), unless it has one. Special tokens such as
    ``[SEP]`` are still found in the text, and each character is lowered alone (``str.lower`` gave other ids)."""
    from tokenizers.normalizers import Lowercase, Sequence

    normalizer = tokenizer.normalizer
    steps = list(normalizer) if isinstance(normalizer, Sequence) else [normalizer] if normalizer is not None else []
    if not any(isinstance(n, Lowercase) for n in steps):
        tokenizer.normalizer = Sequence([Lowercase(), *steps])


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """(B, H): token states (B, T, H) pooled over each row's tokens (``mask``), as sentence-transformers' Pooling."""
    weights = mask[..., None].astype(np.float32)
    if mode in ("cls", "lasttoken"):  # each row's first (last) real token, whichever side it is padded on
        real = mask.astype(bool)
        at = real.argmax(1) if mode == "cls" else mask.shape[1] - 1 - real[:, ::-1].argmax(1)
        picked = hidden[np.arange(len(hidden)), at]
        return picked if mode == "cls" else picked * real.any(1)[:, None]  # a row of no tokens: zeros, as theirs
    if mode == "max":
        return np.where(weights > 0, hidden, -1e9).max(1)
    count = np.maximum(weights.sum(1), 1)
    return (hidden * weights).sum(1) / (np.sqrt(count) if mode == "mean_sqrt_len" else count)
