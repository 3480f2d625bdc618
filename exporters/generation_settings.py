"""What a model's generation config tells the export: its end-of-sequence and padding ids, the settings of
transformers' generate the runtime applies as the model's defaults (in the manifest), and those it does not."""
from __future__ import annotations

import os

from edgepeft.runtimes.generation import recorded_stops


def eos_token_ids(model) -> list[int]:
    """End-of-sequence ids from the generation config, as transformers' generate reads them (made from config.json
    where the model has no generation_config.json; none where that file names none: config.json's is not read)."""
    gen = getattr(model, "generation_config", None)
    eos = gen.eos_token_id if gen is not None else model.config.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


# What transformers' generate takes from a model's generation_config.json when the call leaves it unset, and the
# runtime applies too (stop_strings is the runtime's ``stop``)
GENERATION_DEFAULTS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size",
                       "max_new_tokens", "max_length", "min_new_tokens", "min_length", "stop_strings")
# Settings that change generate's tokens which the runtime does not apply, with the value that changes nothing
# (SAMPLING_ONLY: when it samples)
SAMPLING_ONLY = ("typical_p", "epsilon_cutoff", "eta_cutoff", "top_h")
IGNORED_GENERATION = {"num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "penalty_alpha": None,
                      "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                      "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None, "typical_p": 1.0,
                      "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "exponential_decay_length_penalty": None,
                      "guidance_scale": 1.0, "top_h": None, "max_time": None, "dola_layers": None, "token_healing": False,
                      "watermarking_config": None, "prompt_lookup_num_tokens": None,
                      # a decoder's prompt is their "encoder input" in transformers: they change greedy ids there too
                      "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0}


def generation_defaults(model) -> dict:
    """The settings the model's generation config sets that the runtime applies (Qwen2.5-Instruct: sampling at 0.7,
    top-k 20...; Qwen2.5: max_new_tokens 2048); transformers 5 leaves every unset one None."""
    gen = getattr(model, "generation_config", None)
    found = {key: value for key in GENERATION_DEFAULTS if (value := getattr(gen, key, None)) is not None}
    if "stop_strings" in found:  # but those holding U+FFFD, which generate refuses (ignored_generation notes them)
        found["stop"] = recorded_stops(found.pop("stop_strings"))
    return found


def ignored_generation(model) -> list[str]:
    """``key=value`` of the model's generation settings that change generate's tokens in transformers and that the
    runtime does not apply (beam search, bad words...): the export says so."""
    gen = getattr(model, "generation_config", None)
    stops = getattr(gen, "stop_strings", None) or []
    dropped = [s for s in ([stops] if isinstance(stops, str) else stops) if s not in recorded_stops(stops)]
    return [f"{key}={value!r}" for key, neutral in IGNORED_GENERATION.items()
            if (value := getattr(gen, key, None)) is not None and value != neutral] + (
        [f"stop_strings={dropped!r} (U+FFFD matches bytes that are no character)"] if dropped else [])


def pad_token_id(model, task: str) -> int | None:
    """The padding id: for generation the generation config's, as transformers' generate takes it (made from
    config.json where the model has no generation_config.json; None where that file names none, so finished rows
    get the first eos, as in transformers); for classifiers the model config's, which their forward reads."""
    gen = getattr(model, "generation_config", None)
    return gen.pad_token_id if task == "causal-lm" and gen is not None else model.config.pad_token_id


def generation_fields(model, task: str) -> dict:
    """The manifest's padding and end-of-sequence ids and generate's defaults: the model's generation config. A
    default every call would refuse (repetition_penalty 0, which transformers' generate refuses too) is named in
    the model's file: the staged manifest's refusal named a staging file, and "a fresh --out" failed the same way."""
    from edgepeft.errors import ConfigError
    from edgepeft.runtimes.base_checks import generation_errors

    fields = {"pad_token_id": pad_token_id(model, task), "eos_token_id": eos_token_ids(model),
              "generation": generation_defaults(model) if task == "causal-lm" else {}}  # as transformers' generate
    if wrong := generation_errors(fields["generation"], getattr(model.config, "vocab_size", None) or 1):
        name, why = wrong[0]  # the runtime's stop is the file's stop_strings; its fix (after ";") is a call's
        name, why = ("stop_strings", why.replace("strings must not be empty", "must hold no empty string", 1)) \
            if name == "stop" else (name, why)
        folder = getattr(model, "name_or_path", "") or ""
        where, fix = ((_generation_file(folder), "correct it there, or remove it") if os.path.isdir(folder) else (
            f"{folder or 'the model'}'s generation_config.json (or its config.json)",
            "download the model, correct it in its folder and export from there"))
        raise ConfigError(f"{where}: {name!r} {why.split(';')[0]}; {fix} (transformers' generate refuses it too)")
    return fields


def _generation_file(folder: str) -> str:
    """The file the model's generation settings come from: its generation_config.json, else config.json (from which
    transformers makes them)."""
    own = os.path.join(folder, "generation_config.json")
    return own if os.path.isfile(own) else os.path.join(folder, "config.json")
