"""Checks of a base model's config.json before loading it: what the export cannot trace, and ids the model's own
layers cannot hold (refused naming the field, where transformers fails inside a layer's constructor)."""
from __future__ import annotations

from edgepeft.errors import ConfigError, UnsupportedModelError

DECODERS = {"llama", "qwen2", "gpt2"}  # model types with a causal-LM head; they take use_cache


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


def check_token_ids(config, source: str) -> None:
    """A pad_token_id the embeddings cannot hold (a pad added to the tokenizer and set in config.json without
    resizing the model): transformers' ``nn.Embedding`` asserts on it, a traceback from train and export."""
    pad, size = getattr(config, "pad_token_id", None), getattr(config, "vocab_size", None)
    if config.model_type == "gpt2":  # its embeddings take no padding index: a pad past them is no token, as in
        return  # a classifier whose rows each run alone (Runtime.classify), and transformers loads it
    if isinstance(pad, int) and isinstance(size, int) and not -size <= pad < size:
        eos = config.eos_token_id if isinstance(getattr(config, "eos_token_id", None), int) else None
        raise ConfigError(
            f"{source}: config.json's pad_token_id is {pad}, past the model's vocabulary (vocab_size {size}), which its "
            f"embeddings cannot hold; set pad_token_id to an id below {size}" + (f" (its eos_token_id, {eos})" if eos
            is not None and 0 <= eos < size else "") + ", or resize the embeddings (resize_token_embeddings) and save "
            "the model again")
