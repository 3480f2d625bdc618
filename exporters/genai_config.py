"""``OUT/base/genai_config.json``: what onnxruntime-genai needs to open a decoder export as it is.

    og.Model("OUT/base")  ->  model.type, ids, context length, decoder file and I/O names, head counts
    og.Adapters(model).load("OUT/adapters/<name>/adapter.onnx_adapter", name)  ->  LoRA / IA3 by name

``past_present_share_buffer`` follows the graph's ops. On contrib graphs (GroupQueryAttention)
it is true: genai binds one ``max_length`` buffer per cache input as past and present, and the
kernel appends in place, as edgepeft's runtime does (``runtimes/kv_cache.py``). The graph takes
the attention mask's length as the filled part, so genai's mask must grow by one position a
step, as it does on the CPU (the static ``max_length`` mask of its graph capture would misplace
them). Standard graphs grow their KV cache by concatenation and keep it false (true fails
there: genai preallocates ``max_length`` positions). On the benchmark Llama's contrib export
genai's greedy ids stay the same with and without it, and it ran 1.02-1.07x faster (two paired
runs, with and without its LoRA). genai never binds ``logits_to_keep``, whose default (0)
gives every position's logits at prefill. It does not mask padding (a batch of prompts of
unequal lengths differs from transformers' left-padded result), and its tokenizer adds no BOS
token. Search defaults come from the model's
``generation_config.json`` where it has one.
"""
from __future__ import annotations

import os

from edgepeft.files import write_json_atomic
from edgepeft.runtimes.manifest import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE

GENAI_CONFIG = "genai_config.json"
# edgepeft model type -> the onnxruntime-genai model type that runs its graph. genai's own "gpt2" class expects
# another cache layout ("Model input was not found"); its generic decoder path ("llama") runs ours as it is.
GENAI_TYPES = {"llama": "llama", "qwen2": "qwen2", "gpt2": "llama"}


def genai_config(model, manifest: dict) -> dict | None:
    """The config for a causal-LM decoder export (None for other exports)."""
    config, cache = model.config, manifest.get("cache")
    if cache is None or config.model_type not in GENAI_TYPES:
        return None
    gen = manifest.get("generation") or {}
    eos = manifest["eos_token_id"] or [0]  # none: genai needs one (genai_notes says so at export)
    pad = manifest["pad_token_id"] if isinstance(manifest["pad_token_id"], int) and manifest["pad_token_id"] >= 0 else eos[0]
    context = manifest["max_positions"] or 2048
    heads = config.num_attention_heads  # GPT-2's config maps n_head / n_embd to these names
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
              "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE}
    return {
        "model": {
            "type": GENAI_TYPES[config.model_type],
            "vocab_size": manifest["vocab_size"],
            "context_length": context,
            "bos_token_id": config.bos_token_id if config.bos_token_id is not None else eos[0],
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": pad,
            "decoder": {
                "filename": manifest["graph"],
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": cache["head_dim"],
                "hidden_size": config.hidden_size,
                "num_attention_heads": heads,
                "num_key_value_heads": cache["num_kv_heads"],
                "num_hidden_layers": cache["num_layers"],
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
            },
        },
        "search": {
            "do_sample": bool(gen.get("do_sample", False)),
            "num_beams": 1,
            "num_return_sequences": 1,
            "max_length": min(int(gen.get("max_length") or context), context),  # the model's, prompt included
            "min_length": int(gen.get("min_length") or 0),  # genai has no min_new_tokens (the prompt's length varies)
            "no_repeat_ngram_size": int(gen.get("no_repeat_ngram_size") or 0),
            "temperature": float(gen.get("temperature", 1.0)),
            "top_k": int(gen.get("top_k", 50)),
            "top_p": float(gen.get("top_p", 1.0)),
            "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
            "past_present_share_buffer": manifest.get("ops") == "contrib",  # see the module docstring
        },
    }


def genai_notes(manifest: dict) -> list[str]:
    """What genai will do otherwise than edgepeft's generate on this export, for the export to say."""
    if manifest.get("cache") is None:
        return []
    notes = [] if manifest["eos_token_id"] else [
        "this model has no end-of-sequence id: edgepeft generates to the length asked; onnxruntime-genai, which needs "
        "one, stops at id 0 (genai_config.json's eos_token_id)"]
    gen = manifest.get("generation") or {}
    for name, instead in (("min_new_tokens", "min_length"), ("max_new_tokens", "max_length")):
        if gen.get(name):
            notes.append(f"generation_config.json sets {name}, which onnxruntime-genai cannot express ({instead} "
                         f"counts the prompt too): pass {instead} to genai for each prompt")
    if gen.get("stop"):  # genai 0.18 has no stop strings: it generates past them
        notes.append("generation_config.json sets stop_strings, which onnxruntime-genai does not apply: it generates "
                     "past them; stop on the decoded text in your loop")
    if gen.get("min_p"):  # nor min_p ("Unknown value" from set_search_options)
        notes.append("generation_config.json sets min_p, which onnxruntime-genai does not apply: its sampling keeps "
                     "the unlikely tokens min_p drops")
    return notes


def write_genai_config(model, manifest: dict, stage: str) -> bool:
    """Write ``genai_config.json`` beside a decoder base graph; returns whether one was written."""
    config = genai_config(model, manifest)
    if config is None:
        return False
    write_json_atomic(os.path.join(stage, GENAI_CONFIG), config, sort_keys=True)
    return True
