"""What a base manifest's values must be beyond their types (``manifest._FIELD_TYPES``), and what the graph must
declare as the manifest says: a hand-edited or damaged ``base/edgepeft.json`` is refused naming its field, where a
value out of range was numpy's "negative dimensions", ONNX Runtime's "Missing Input", an eos id that was a TypeError
in every text call, a cache of 10**12 layers that filled the memory, or "token id 30 is outside the vocabulary [0, 5)"
blaming the input, generate's defaults refused as if a call had passed them."""
from __future__ import annotations

import re

from .errors import ConfigError
from .generation import GenerationConfig, recorded_stops
from .values import is_kind

OPS = ("contrib", "standard")  # exporters' --ops
TOKEN_TYPES = "token_type_ids"  # a seq-cls BERT's input: its second segment (text pairs); manifest.py imports it
ENCODERS = {"bert"}  # model types exported as encoders (no cache; BERT's token types); models.py imports it
DECODERS = {"llama", "qwen2", "gpt2"}  # model types with a causal-LM head; they take use_cache (model_checks imports it)
EXPORTED = sorted(ENCODERS | DECODERS)  # every model type edgepeft exports (js/src/node.js EXPORTED_TYPES: the same)


def generation_errors(generation: dict, vocab: int) -> list[tuple[str, str]]:
    """What generate's defaults (``generation``, as the manifest holds them) hold that a call would be refused:
    (setting, why) pairs, ("repetition_penalty", "must be > 0, got 0.0")."""
    fields = GenerationConfig.__dataclass_fields__
    given = {k: v for k, v in generation.items() if k in fields}
    if given.get("stop") is None or isinstance(given["stop"], str):  # as generate takes them: a config's "###" ("",
        given["stop"] = [given["stop"]] if given.get("stop") is not None else []  # which every generate refused: now)
    given["stop"] = recorded_stops(given["stop"])  # as generate reads them
    if "eos_token_id" in given and not isinstance(given["eos_token_id"], list):  # one id; null is refused, as there
        given["eos_token_id"] = [given["eos_token_id"]]
    try:  # generate's defaults, which a call leaves unset: "--do-sample must be True or False", though no flag was given
        GenerationConfig(**{"pad_token_id": 0, **given}).check(max(vocab, 1))
    except ConfigError as e:  # its messages start with the setting's name
        name, _, rest = str(e).partition(" ")
        return [(name, rest)]
    return []


def base_value_errors(data: dict) -> list[str]:
    """The fields of a type-checked base manifest whose values no export writes (checked before anything is sized by
    them): sizes from 1, eos ids as generate compares them, the cache table naming the graph inputs and outputs it
    lists, the kernels' choice (``ops``)."""
    errors, vocab = [], data["vocab_size"]
    if vocab < 1:
        errors.append(f"field 'vocab_size' must be at least 1, got {vocab}")
    if (most := data.get("max_positions")) is not None and most < 1:
        errors.append(f"field 'max_positions' must be at least 1 (or null), got {most}")
    if (types := data.get("type_vocab_size")) is not None and types < 1:
        errors.append(f"field 'type_vocab_size' must be at least 1 (or null), got {types}")
    if types is None and TOKEN_TYPES in data["inputs"]:  # a call's types are checked against it
        errors.append(f"field 'inputs' lists {TOKEN_TYPES!r}; field 'type_vocab_size' must give its token types")
    if most is None and data.get("ops") == "contrib" and data.get("cache") is not None:  # RotaryEmbedding's error
        errors.append("field 'max_positions' must be the length of a contrib decoder's position tables, got null")
    eos = data.get("eos_token_id") or []
    if not all(is_kind(e, int) and -2**63 <= e < 2**63 for e in eos):  # one outside the vocabulary never matches (a
        errors.append(f"field 'eos_token_id' must list token ids (64-bit integers), got {eos!r:.60}")  # config's)
    if data.get("ops", OPS[1]) not in OPS:
        errors.append(f"field 'ops' must be {' or '.join(OPS)}, got {data['ops']!r:.40}")
    errors += [f"field 'generation.{name}' {why}"
               for name, why in generation_errors(data.get("generation", {}), vocab)]
    cache = data.get("cache")
    layout = {"num_layers": int, "num_kv_heads": int, "head_dim": int,
              "past_key": str, "past_value": str, "present_key": str, "present_value": str}
    if cache is not None and not (all(is_kind(cache.get(k), want) for k, want in layout.items()) and all(
            cache[k].count("%") == 1 and "%d" in cache[k] for k, want in layout.items() if want is str)):
        return [*errors, "field 'cache' lacks the cache layout (names with one %d)"]
    if cache is not None:
        small = [k for k in ("num_layers", "num_kv_heads", "head_dim") if cache[k] < 1]
        if small:
            errors.append(f"field 'cache': {small[0]} must be at least 1, got {cache[small[0]]}")
        for direction, side in (("past", "inputs"), ("present", "outputs")):
            names = [n for n in data[side] if any(_layer_pattern(cache[f"{direction}_{part}"]).fullmatch(n)
                                                  for part in ("key", "value"))]
            if not small and len(names) != 2 * cache["num_layers"]:
                errors.append(f"field 'cache': num_layers is {cache['num_layers']}, field {side!r} lists "
                              f"{len(names)} {direction} tensors (2 a layer)")
    return errors


def _layer_pattern(name: str) -> re.Pattern:
    """``past_key_values.%d.key`` as a pattern of its layers' names."""
    return re.compile(re.escape(name).replace("%d", r"\d+"))


def graph_declaration_errors(session, manifest: dict) -> list[str]:
    """Where the opened graph and the manifest disagree on what the runtime sizes or binds by the manifest: the
    inputs and outputs it lists, the cache's heads and widths, a decoder's vocabulary (its logits)."""
    inputs = {i.name: i.shape for i in session.get_inputs() + session.get_overridable_initializers()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    for side, declared, has in (("inputs", manifest["inputs"], inputs), ("outputs", manifest["outputs"], outputs)):
        absent = sorted(set(declared) - set(has))
        if absent:
            return [f"field {side!r} lists {absent[0]!r}, which the graph lacks"]
    unlisted = sorted({i.name for i in session.get_inputs()} - set(manifest["inputs"]))  # required: no default
    if unlisted:  # ONNX Runtime's "Required inputs ... are missing" at every call
        return [f"the graph takes {unlisted[0]!r}, which field 'inputs' does not list"]
    cache = manifest.get("cache")
    if cache:
        shape = inputs.get(cache["past_key"] % 0) or []  # (batch, kv heads, positions, head width)
        for axis, key in ((1, "num_kv_heads"), (3, "head_dim")):
            if len(shape) == 4 and isinstance(shape[axis], int) and shape[axis] != cache[key]:
                return [f"field 'cache': {key} is {cache[key]}, the graph's is {shape[axis]}"]
        logits = outputs.get("logits") or []
        if logits and isinstance(logits[-1], int) and logits[-1] != manifest["vocab_size"]:
            return [f"field 'vocab_size' is {manifest['vocab_size']}, the graph's logits have {logits[-1]}"]
    return []


def serves_pairs(manifest: dict) -> bool:
    """Whether classify takes text pairs: every seq-cls export but an earlier edgepeft's encoder one, whose graph
    takes no token types (it wrote no ``type_vocab_size``); a decoder's pair needs its template alone."""
    return manifest["task"] == "seq-cls" and ("type_vocab_size" in manifest or manifest["model_type"] not in ENCODERS)
