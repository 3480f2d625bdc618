"""HF PEFT's PeftModel calls and options that edgepeft's PeftModel answers otherwise: refused with what to call
instead, rather than falling through to transformers' own PEFT integration (a false "use PEFT >= 0.22"), to an
AttributeError, or to a keyword transformers takes and ignores; or read as edgepeft's (merge_and_unload's)."""
from __future__ import annotations

import os

from edgepeft.errors import ConfigError
from edgepeft.files import check_output_dir

_ELSEWHERE = {
    "merge_adapter": "merge_and_unload() (a merged copy; the PeftModel stays as it is)",
    "unmerge_adapter": "merge_and_unload() (a merged copy; the PeftModel stays as it is)",
    "enable_adapters": "`with model.disable_adapter():` (the adapter is back when the block ends)",
    "disable_adapters": "`with model.disable_adapter():`",
    "enable_adapter_layers": "`with model.disable_adapter():` (the adapter is back when the block ends)",
    "disable_adapter_layers": "`with model.disable_adapter():`",
    "add_weighted_adapter": "the runtime's weighted sums: export the LoRA adapters, then pass adapter={'a': 0.7, "
                            "'b': 0.3} to forward or generate",
}


def elsewhere(name: str):
    """A stand-in for HF PEFT's call ``name`` that raises ConfigError naming edgepeft's way; None for other names."""
    if name not in _ELSEWHERE:
        return None

    def refused(*args, **kwargs):
        raise ConfigError(f"{name}() (HF PEFT's) is not in edgepeft's PeftModel; use {_ELSEWHERE[name]}")
    return refused


PEFT_MODEL_ONLY = ("merge_and_unload", "unload", "delete_adapter", "set_adapter", "peft_config", "active_adapter",
                   "active_adapters")


def on_peft_model(name: str):
    """HF PEFT's ``base_model.<name>``, which edgepeft's PeftModel alone has: a call is refused naming it (a
    ConfigError), an attribute read is an AttributeError naming it (hasattr stays False)."""
    where = f"base_model.{name} (HF PEFT's): edgepeft's base_model holds the transformers model only; use the " \
            f"PeftModel's {name}"
    if name in ("peft_config", "active_adapter", "active_adapters"):
        raise AttributeError(where)

    def refused(*args, **kwargs):
        raise ConfigError(where)
    return refused


def elsewhere_or(name: str, error: AttributeError):
    """``elsewhere(name)``, else ``error`` raised: for a module whose attributes fall through to no other object."""
    if (refused := elsewhere(name)) is None:
        raise error
    return refused


def check_one_adapter(adapter_name) -> None:
    """HF PEFT's LoraModel.set_adapter takes a list (several adapters active at once): refused, naming the way."""
    if not isinstance(adapter_name, str):
        raise ConfigError(f"set_adapter takes one adapter's name, got {adapter_name!r}; for several at once export "
                          "them, then pass adapter=[...] (one per row) or {name: weight} to the runtime")


def refuse_adapter_names(kwargs: dict) -> None:
    """HF PEFT's ``adapter_names=`` (an adapter per row) is not in the PyTorch model: transformers took the keyword
    and ran the active adapter on every row, or refused it with its own error."""
    if kwargs.pop("adapter_names", None) is not None:  # None: every row the active adapter, as HF PEFT takes it
        raise ConfigError("adapter_names= (an adapter per row) is not in edgepeft's PyTorch model: run one adapter "
                          "per call (set_adapter), or export and pass adapter=[...] to the runtime's forward/generate")


_FORWARD = ("input_ids", "attention_mask", "inputs_embeds", "labels", "output_attentions", "output_hidden_states",
            "return_dict")  # HF PEFT's task models' forward, in its order (feature extraction's without labels)


def named_arguments(args: tuple, kwargs: dict, task_type) -> dict:
    """forward's positional arguments named in HF PEFT's order for its task models (the transformers model's third
    and fourth are others: Llama's position_ids, BERT's token_type_ids)."""
    names = [n for n in _FORWARD if not (n == "labels" and task_type == "FEATURE_EXTRACTION")]
    if len(args) > len(names):
        raise ConfigError(f"forward takes at most {len(names)} arguments by position ({', '.join(names)}), as HF "
                          f"PEFT's; got {len(args)}: pass the others by name")
    if twice := [n for n in names[:len(args)] if n in kwargs]:
        raise ConfigError(f"forward got {twice[0]} by position and by name; pass it once")
    return dict(zip(names, args)) | kwargs


def check_save_options(directory: str, save_embedding_layers, safe_serialization: bool) -> None:
    """HF PEFT's save_pretrained options that would make edgepeft write something else, refused before any file is."""
    check_output_dir(directory, "save_pretrained", "a folder")  # a file there or above it, or a folder one may not write
    if not isinstance(safe_serialization, bool):  # save_pretrained(d, ["b"]): edgepeft's older order, HF PEFT's flag
        raise ConfigError(f"save_pretrained's second argument is safe_serialization (True or False, as HF PEFT's), got "
                          f"{safe_serialization!r:.40}; name the adapters to save as selected_adapters=...")
    if not safe_serialization:
        raise ConfigError("safe_serialization=False (adapter_model.bin): edgepeft writes adapter_model.safetensors "
                          "only, which HF PEFT reads as well; leave safe_serialization at True")
    if save_embedding_layers is True:
        raise ConfigError("save_embedding_layers=True: edgepeft trains no base embedding layers to save with the "
                          "adapter; leave it at 'auto'")


def merged_name(adapter_name, adapter_names) -> str | None:
    """The adapter merge_and_unload merges, from its own argument or HF PEFT's: ``merge_and_unload(True)`` (HF PEFT's
    first argument is its progressbar) or ``adapter_names`` of one adapter (edgepeft merges one per copy)."""
    if isinstance(adapter_name, bool):
        adapter_name = None
    if adapter_names is None:
        return adapter_name
    adapter_names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if len(adapter_names) != 1 or adapter_name is not None:
        raise ConfigError(f"adapter_names={adapter_names!r}: edgepeft merges one adapter per copy; give one name, e.g. "
                          "merge_and_unload(adapter_names=['default'])")
    return adapter_names[0]


# the keyword arguments of edgepeft's PeftModel calls: a name close to one is a misspelling of it
TAKEN = ("model", "model_id", "peft_config", "adapter_name", "is_trainable", "config", "subfolder", "save_directory",
         "selected_adapters", "inference_mode", "safe_merge", "adapter_names", "progressbar")


def not_taken(call: str, options: dict) -> None:
    """HF PEFT's keyword arguments edgepeft's ``call`` does not take (``autocast_adapter_dtype``, ``torch_device``,
    ``low_cpu_mem_usage``, ...), refused by name: they were Python's TypeError. A name close to one edgepeft takes is
    its misspelling ("leave it out" loaded an adapter frozen that is_trainabel=True meant to train)."""
    import difflib

    for key in options:
        if (meant := difflib.get_close_matches(key, TAKEN, n=1, cutoff=0.8)) and key not in TAKEN:
            raise ConfigError(f"{call}({key}=...): no such argument; did you mean {meant[0]}=?")
    if options:
        raise ConfigError(f"{call}({', '.join(f'{k}=' for k in options)}...): HF PEFT's, not taken by edgepeft's "
                          f"{call}; leave {'them' if len(options) > 1 else 'it'} out")


def taken_model(model):
    """``model`` where it is a torch module: a path or hub name, as AutoModel takes, was refused much later, naming
    the model's type None or torch's missing ``_modules``."""
    from torch import nn

    if not isinstance(model, nn.Module):
        given = f"{type(model).__name__} {model!r:.80}" if isinstance(model, (str, os.PathLike)) else type(model).__name__
        raise ConfigError(f"model must be a loaded transformers model, got {given}; load it first, e.g. "
                          "transformers.AutoModelForCausalLM.from_pretrained(path), and pass that")
    return model


def check_new_model(model, peft_config) -> None:
    """get_peft_model's arguments: a method's config (None made a PeftModel of no adapter, every base weight
    trainable), on a model that is no PeftModel already (one nested in another saved an adapter no library loads)."""
    if peft_config is None:  # the other kinds: as_config's refusal
        raise ConfigError("config must be a PEFT config such as edgepeft.LoraConfig(...) (or HF PEFT's), got NoneType")
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        raise ConfigError("get_peft_model: the model is a PeftModel already; add this adapter to it with "
                          "model.add_adapter(name, config), or pass its base (model.get_base_model())")
    check_saved_whole_linear(model, getattr(peft_config, "modules_to_save", None) or [])


def check_saved_whole_linear(model, names: list) -> None:
    """Layers a new adapter trains whole (modules_to_save) that are no Linear layer (an embedding: the recipe for
    added tokens), refused before training, as a LoRA target edgepeft does not adapt is: the export refused it after
    training ("use an adapter trained without it")."""
    from torch import nn

    from edgepeft.tuners.heads import saved_whole
    from edgepeft.tuners.targets import innermost

    for key, module in model.named_modules() if names else ():  # a head another adapter saves: its Linear inside
        if saved_whole(names, key) and not isinstance(module := innermost(module), nn.Linear):
            raise ConfigError(
                f"modules_to_save {key!r} is no Linear layer ({type(module).__name__}): edgepeft exports only Linear "
                "layers trained whole (a head's weight and bias are the adapter's slots); leave it out of "
                "modules_to_save (tokens added: train on the model resized and saved with them, as --model)")


def check_adapter_name(name) -> None:
    """An adapter's name as torch takes it for the layers' dicts (torch's KeyError or TypeError, after a check)."""
    if not (isinstance(name, str) and name and "." not in name):
        raise ConfigError(f"adapter name {name!r}: give a non-empty text without '.' (torch names the adapter's "
                          "layers by it), e.g. 'task_v2'")
