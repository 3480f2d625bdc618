"""Checks of a base model's config.json before loading it: what the export cannot trace, and ids the model's own
layers cannot hold (refused naming the field, where transformers fails inside a layer's constructor)."""
from __future__ import annotations

from edgepeft.errors import ConfigError, UnsupportedModelError, first_line
from edgepeft.runtimes.base_checks import DECODERS
from edgepeft.runtimes.manifest import CLASSIFIER_NAMES

TEXT_ROOM = 4  # positions an export's checks need for text beside virtual tokens: a row left-padded by 3 keeps a token
SAMPLE_TOKENS = 8  # a traced sample's length (check_traceable asks the model's positions for as many)


def rope_type(config) -> str | None:
    """The rotary scaling's type ("dynamic", "linear", ...), None without one."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope.get("rope_type") or rope.get("type")


def sliding_layers(config) -> list:
    """The attention kinds other than full attention in ``config``'s layer_types (Qwen2's sliding window)."""
    return sorted({t for t in getattr(config, "layer_types", None) or [] if t != "full_attention"})


def check_exportable(config, source: str) -> None:
    """Refuse what the export cannot trace: sliding-window attention layers (Qwen2's ``use_sliding_window``),
    longrope scaling, an encoder made a causal decoder (``is_decoder``), and BERT's relative position embeddings.

    transformers keeps a cropped cache for sliding layers, which the graph's one cache layout for
    every layer does not fit; longrope switches its rotary frequencies once a sequence passes
    original_max_position_embeddings, which one traced graph cannot follow. ``load_base`` checks it, so
    ``edgepeft train`` refuses them too; a model given to ``get_peft_model`` in PyTorch is unaffected.
    """
    if quantized := getattr(config, "quantization_config", None):  # transformers' quantizers: ImportError, NameError
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else getattr(quantized, "quant_method", "?")
        raise UnsupportedModelError(
            f"{source}: config.json's quantization_config ({method}) marks a quantized checkpoint, which edgepeft does "
            "not load: it trains and exports from float weights (and quantizes them itself: export --quantize int8 or "
            "int4); use the model's unquantized checkpoint")
    if rope_type(config) == "longrope":
        raise UnsupportedModelError(
            f"{source}: config.json's rope scaling is longrope, which edgepeft cannot export (its rotary "
            "frequencies change with the sequence length); use a base model without longrope scaling")
    if getattr(config, "position_embedding_type", "absolute") in ("relative_key", "relative_key_query"):
        raise UnsupportedModelError(  # transformers 5 dropped them and runs absolute positions instead, silently
            f"{source}: config.json's position_embedding_type is {config.position_embedding_type}, which transformers "
            "5 no longer computes (it would run absolute positions, not what the model was trained with); use a model "
            "with absolute position embeddings")
    if getattr(config, "is_decoder", False) and config.model_type not in DECODERS:
        raise UnsupportedModelError(
            f"{source}: config.json sets is_decoder: true (an encoder run as a causal decoder), which edgepeft cannot "
            "export (its graph attends both ways); set it to false and train adapters on it so, or use a decoder model "
            "(Llama, Qwen2, GPT-2)")
    if sliding := sliding_layers(config):
        raise UnsupportedModelError(
            f"{source}: config.json's layer_types holds {', '.join(sliding)} layers, which edgepeft cannot export "
            "(full attention only); use a copy whose config.json sets use_sliding_window to false and every "
            "layer_types entry to full_attention (the same model for inputs no longer than sliding_window)")


def pad_unheld(config) -> bool:
    """config.json's pad_token_id is one the model's embeddings cannot hold as their padding index (transformers'
    ``nn.Embedding`` asserts on it). GPT-2's take no padding index: a pad past them is no token, as in a classifier
    whose rows each run alone (Runtime.classify), and transformers loads it."""
    pad, size = getattr(config, "pad_token_id", None), getattr(config, "vocab_size", None)
    return config.model_type != "gpt2" and isinstance(pad, int) and isinstance(size, int) and not -size <= pad < size


def check_token_ids(config, source: str) -> None:
    """A pad_token_id the embeddings cannot hold (a pad added to the tokenizer and set in config.json without
    resizing the model): transformers' ``nn.Embedding`` asserts on it, a traceback from train and export."""
    pad, size = getattr(config, "pad_token_id", None), getattr(config, "vocab_size", None)
    if pad_unheld(config):
        eos = config.eos_token_id if isinstance(getattr(config, "eos_token_id", None), int) else None
        raise ConfigError(
            f"{source}: config.json's pad_token_id is {pad}, past the model's vocabulary (vocab_size {size}), which its "
            f"embeddings cannot hold; set pad_token_id to an id below {size}" + (f" (its eos_token_id, {eos})" if eos
            is not None and 0 <= eos < size else "") + ", or resize the embeddings (resize_token_embeddings) and save "
            "the model again")


def check_loaded_weights(model, info: dict, label: str, task: str) -> None:
    """Weights transformers started from random values (its load report, which edgepeft silences) where the
    checkpoint should have held them, and saved layers it dropped: train and export ran on them and said ok (the
    export's check compares with the same random model). A head made for the task (a classifier, the pooler before
    it) and a missing output layer (told apart by ``load_base``) aside."""
    output = model.get_output_embeddings() if task == "causal-lm" else None
    out = next((n for n, m in model.named_modules() if m is output), None) if output is not None else None
    missing = [k for k in info.get("missing_keys", []) if k.split(".")[0] not in CLASSIFIER_NAMES
               and ".pooler." not in f".{k}" and not (out and k.startswith(out + "."))]
    unexpected = list(info.get("unexpected_keys", []))
    layers = getattr(model.config, "num_hidden_layers", None)
    beyond = [k for k in unexpected if isinstance(layers, int) and (i := _layer(k)) is not None and i >= layers]
    if beyond:
        raise ConfigError(f"{label}: config.json's num_hidden_layers is {layers}, and its weights hold more layers "
                          f"(e.g. {beyond[0]}), which transformers would drop; use the config.json saved with these "
                          "weights")
    modules = dict(model.named_modules())  # once: a checkpoint of another type has hundreds of unexpected keys
    if placeless := [k for k in unexpected if _placeless(k, modules)]:
        raise ConfigError(f"{label}: its weights hold {placeless[0]}, which the model config.json describes has no "
                          f"place for (model_type {model.config.model_type!r}; biases where attention_bias or mlp_bias "
                          "is false?): transformers would drop it and compute another model; use the config.json "
                          "saved with these weights")
    if not missing:
        return
    renamed = [u for u in unexpected if u.endswith("." + missing[0]) or missing[0].endswith("." + u.split(".", 1)[-1])]
    if renamed:
        why = (f"its weights are saved under other names (e.g. {renamed[0]} for {missing[0]}: saved from a wrapper, "
               "such as DDP's module.); load them and save the model again from the unwrapped model (save_pretrained)")
    elif (first := min((_layer(k) for k in missing if _layer(k) is not None), default=None)) is not None and all(
            k in missing for k, _ in model.named_parameters() if (i := _layer(k)) is not None and i >= first):
        why = (f"config.json's num_hidden_layers is {layers}, and its weights hold {first} layers (none for "
               f"{missing[0]}); use the config.json saved with these weights")
    elif getattr(model.config, "auto_map", None):  # a known type's name on a model of its own code (ALiBi, ...)
        why = (f"its weights do not fit transformers' {type(model).__name__} (none for {missing[0]}): config.json's "
               "auto_map names the model's own Python code, which edgepeft never runs; use a model transformers "
               "implements as it is")
    else:
        why = (f"its weights files lack {len(missing)} of the model's weights (e.g. {missing[0]}), which transformers "
               "would start from random values; download the model again, or save it again (save_pretrained)")
    raise ConfigError(f"{label}: {why}")


def _placeless(key: str, modules: dict) -> bool:
    """A saved weight or bias inside a module the model has (a layer, its attention) that has no such tensor: biases
    config.json turns off, another model type's norms (a Qwen3 relabelled llama), which transformers drops. Another
    task's head (BERT's cls.*, an lm_head) has no module here, and buffers saved by older versions (position_ids,
    GPT-2's masked_bias) are not weights."""
    *path, leaf = key.split(".")
    if leaf not in ("weight", "bias") or path[:1] and path[0] in CLASSIFIER_NAMES:  # a head made at load (a token
        return False  # classifier's score.bias under a sequence classifier): its own check
    if (m := modules.get(".".join(path))) is not None:
        return getattr(m, leaf, None) is None
    return any(".".join(path[:i]) in modules for i in range(1, len(path)))


def _layer(key: str) -> int | None:
    """The layer a weight's name puts it in (its first numeric part: ``model.layers.3.mlp...`` -> 3), else None."""
    return next((int(part) for part in key.split(".") if part.isdigit()), None)


def check_traceable(positions: int | None, virtual: bool, where: str, fix: str = "export") -> None:
    """The export traces the base with SAMPLE_TOKENS tokens, and 2 virtual ones beside them where an adapter adds some
    (a prompt's, a prefix's: its slots' traced sizes): a model with fewer positions is refused before tracing, where an
    IndexError stopped it, and before training such an adapter (``fix`` "train"), which its export refused."""
    need = SAMPLE_TOKENS + (2 if virtual else 0)
    if positions and positions < need:
        raise ConfigError(f"{where}: the model has {positions} positions (config.json), fewer than the {need} the export "
                          f"traces it with{f' ({SAMPLE_TOKENS} tokens and 2 virtual ones)' if virtual else ''}; {fix} a "
                          f"model of {need} positions or more")


def generation_fault(name_or_path: str, revision: str | None) -> str | None:
    """Why transformers refuses the model's generation_config.json (an unknown cache_implementation, max_new_tokens
    0, a value of another type), or None (none there, or one it reads): its error at loading the model was told to be
    missing weights files, or a traceback (a hunt)."""
    from transformers import GenerationConfig

    try:
        GenerationConfig.from_pretrained(name_or_path, revision=revision)
    except (ValueError, TypeError) as e:
        return first_line(e)
    except OSError:  # none there (transformers loads the model without it), or not JSON (which it skips alike)
        return None
    return None

