"""An adapter folder's weights as HF PEFT writes them: ``adapter_model.safetensors``, or its older pickled
``adapter_model.bin`` (read with tensors only)."""
from __future__ import annotations

import copy
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from edgepeft.config import PICKLED_WEIGHTS_NAME, WEIGHTS_NAME, load_config
from edgepeft.errors import (AdapterBaseMismatchError, ArtifactNotFoundError, ConfigError, CorruptArtifactError, EdgePeftError,
                             first_line)
from edgepeft.registry import model_modules
from edgepeft.runtimes.access import check_readable
from edgepeft.tuners.heads import CLASSIFIER_NAMES, ModulesToSaveWrapper
from edgepeft.tuners.targets import innermost, output_layer_name


def read_adapter_weights(directory: str) -> tuple[str, dict]:
    """(file, {saved key: tensor}) of an adapter folder: ``adapter_model.safetensors``, else HF PEFT's pickled
    ``adapter_model.bin`` (older hub adapters), read as HF PEFT reads it but with tensors only (no code runs)."""
    path = os.path.join(directory, WEIGHTS_NAME)
    pickled = os.path.join(directory, PICKLED_WEIGHTS_NAME)
    if not os.path.isfile(path) and os.path.isfile(pickled):
        try:
            state = torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  torch's unpickler fails with many types on damaged bytes (IndexError too)
            check_readable(pickled)
            raise _unreadable(pickled, type(e).__name__, "damaged, or holding more than tensors (it is read with "
                              f"weights_only=True); download it again, or re-save it with save_pretrained, which writes "
                              f"{WEIGHTS_NAME}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CorruptArtifactError(f"{pickled}: holds no state dict of tensors; re-save the adapter with save_pretrained")
        return pickled, state
    if not os.path.isfile(path):
        check_readable(path)
        raise ArtifactNotFoundError(f"{path}: adapter weights not found (nor {PICKLED_WEIGHTS_NAME}); re-save the adapter "
                                    "with save_pretrained")
    try:
        return path, load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        check_readable(path)  # safetensors says "No such file" for a file it may not read
        raise _unreadable(path, e, "damaged or cut short; download the adapter again, or re-save it") from None


def saves_biases(directory: str) -> bool:
    """Whether the adapter folder's weights hold a bias (HF PEFT's ``bias="all"``/``"lora_only"`` saves the biases of
    the layers it trains; where a model has none, the adapter is plain LoRA). Unreadable weights count as holding
    one: the config's refusal stands, and loading the weights names what is wrong with them."""
    path = os.path.join(directory, WEIGHTS_NAME)
    try:
        if os.path.isfile(path):
            with safe_open(path, framework="pt") as f:  # the header only
                return any(key.endswith(".bias") for key in f.keys())
        return any(key.endswith(".bias") for key in read_adapter_weights(directory)[1])
    except (EdgePeftError, SafetensorError, OSError):
        return True


def _unreadable(path: str, reason, fix: str) -> CorruptArtifactError:
    """A weights file that cannot be read; a Git LFS pointer (a clone without git-lfs) is named as one."""
    try:
        with open(path, "rb") as f:
            pointer = f.read(24) == b"version https://git-lfs."
    except OSError:  # unreadable (permissions): the error below says so
        pointer = False
    if pointer:
        return CorruptArtifactError(f"{path}: is a Git LFS pointer, not the weights; fetch them (git lfs pull) or "
                                    "download the adapter again")
    return CorruptArtifactError(f"{path}: cannot read adapter weights ({reason}): {fix}")


def named_as_expected(state: dict, expected: set, adapter_name: str) -> dict:
    """Keys as ``state_dict()`` names them, with the name of the adapter being loaded or HF PEFT's default one
    (``lora_A.default.weight``, ``ia3_l.default``: hand-written and some hub files, which HF PEFT's from_pretrained
    loads; export loads each adapter under its own name), renamed to HF PEFT's saved names as HF PEFT maps them on
    load. Another adapter's keys stay as they are (unexpected), and a plain key wins over a named one."""
    def plain(key: str, names) -> str:  # the key without a name of ``names`` (``key`` itself where it has none)
        head, _, last = key.rpartition(".")
        stem, _, named = head.rpartition(".")
        unnamed = ([head] if last in names else []) + ([f"{stem}.{last}"] if named in names else [])
        return next((k for k in unnamed if key not in expected and k in expected and k not in state), key)

    own = any(plain(key, {adapter_name}) != key for key in state)  # keys of its own name: "default" is another's
    names = {adapter_name} if own else {adapter_name, "default"}
    return {plain(key, names): value for key, value in state.items()}


def another_task(path: str, config, model, missing: list, unexpected: list) -> AdapterBaseMismatchError | None:
    """The error where the file at ``path`` holds an adapter of this base for another task than its config's
    ``task_type`` (a hand-edited field): its layers' keys one level deeper or shallower than this model's (``prefix``:
    the transformers ``model``'s ``base_model_prefix``, under which a task model holds the bare one; a head left
    over), or all of it but the classifier head a SEQ_CLS adapter carries (transformers' add_adapter saves a
    classifier's adapter without it, and without task_type). None where the weights do not read so."""
    root, deeper, lack = "base_model.model.", f"base_model.model.{model.base_model_prefix}.", set(missing)
    heads = {*(config.modules_to_save or []), *CLASSIFIER_NAMES}
    in_head = lambda k: any(f".{m}." in k for m in heads)  # noqa: E731
    body = [k for k in unexpected if not in_head(k)]
    for moved in (lambda k: k.startswith(deeper) and root + k[len(deeper):],  # a task model's adapter on the bare one
                  lambda k: k.startswith(root) and deeper + k[len(root):]):  # or the other way
        if body and all(moved(k) in lack for k in body):
            which = f"{body[0]}, where this model has {moved(body[0])}"
            break
    else:
        if not (missing and not unexpected and config.task_type == "SEQ_CLS"
                and all(map(in_head, missing))):
            return None
        which = (f"it lacks the classifier head a SEQ_CLS adapter carries: {missing[0]}; an adapter on the checkpoint's "
                 "own head, as transformers' add_adapter saves it, loads in HF PEFT with task_type null and auto_mapping "
                 f'{{"base_model_class": "{type(model).__name__}"}}')  # HF PEFT refuses SEQ_CLS without it too
    return AdapterBaseMismatchError(
        f"{os.path.join(os.path.dirname(path), 'adapter_config.json')}: task_type {config.task_type} does not fit the "
        f"weights of {os.path.basename(path)} ({which}), another task's; set task_type to the task it was trained for")


def drop_carried_base_weights(model, state: dict, path: str, adapter_keys: set) -> None:
    """HF PEFT saves the base weight of an adapted embedding or lm_head too (``save_embedding_layers="auto"``),
    and of the embedding and output layers with ``save_embedding_layers=True`` (keys of plain base weights; a head
    trained whole, modules_to_save, then comes twice: its ``modules_to_save`` copy, equal to the trained one, goes).

    Unchanged, it is redundant: dropped. A different one (resized or trained embeddings) would change the frozen
    base, which edgepeft exports once and shares: refused.
    """
    for key in [k for k in state if ".modules_to_save." in k and k not in adapter_keys]:  # save_embedding_layers=True:
        trained = key.replace(".modules_to_save.", ".", 1)  # the trained head again, beside it (an hfsaves hunt)
        if trained in adapter_keys and trained in state and state[trained].shape == state[key].shape and \
                torch.equal(state[trained], state[key]):
            del state[key]
    for key in [k for k in state if k.endswith(".weight") and k not in adapter_keys]:
        try:
            # under another method's wrapper too (LoRA and IA3 both on lm_head: the second wraps the first)
            weight = innermost(model.get_submodule(key[: -len(".weight")])).weight
        except AttributeError:
            continue  # no such layer here: reported as an unexpected weight
        saved, weight = state[key], weight.detach()
        # the same weights, at whichever of the two precisions is coarser: a saved half-precision copy is the base
        # rounded, and an fp16 checkpoint loaded in bf16 rounds the other way (a 1e-3 tolerance let trained rows by)
        coarse = max(saved.dtype, weight.dtype, key=lambda d: torch.finfo(d).eps)
        same = weight.shape == saved.shape and (
            torch.equal(saved, weight) if saved.dtype == weight.dtype
            else torch.allclose(saved.to(coarse).float(), weight.to(coarse).float(), rtol=torch.finfo(coarse).eps, atol=0))
        if not same:
            layer = key.removesuffix(".weight").removesuffix(".base_layer").removeprefix("base_model.model.")
            if saved.dim() == 2 and saved.shape[1:] == weight.shape[1:] and saved.shape[0] > weight.shape[0]:
                raise resized(path, layer, saved.shape[0], weight.shape[0])
            raise AdapterBaseMismatchError(
                f"{path}: carries its own {layer} weights (resized embeddings, or tied embeddings trained whole: "
                "modules_to_save, ensure_weight_tying), which would change the frozen base edgepeft shares between "
                "adapters; train the adapter without them")
        del state[key]


def resized(path: str, layer: str, rows: int, vocabulary: int) -> AdapterBaseMismatchError:
    """An adapter trained on its base resized for added tokens (``resize_token_embeddings``): the export that serves
    it is one of that resized model, named as the adapter's base (HF PEFT's folder names the base before resizing)."""
    config = os.path.join(os.path.dirname(path), "adapter_config.json")
    return AdapterBaseMismatchError(
        f"{path}: its {layer} has {rows} rows where the base's vocabulary has {vocabulary}: it was trained on the base "
        f"resized to {rows} tokens; save that resized model (save_pretrained, its tokenizer too) to a folder and set "
        f"base_model_name_or_path in {config} to that folder, without --base (in Python: load it on that model)")


def load_state(peft, adapter_name: str, state: dict, path: str) -> None:
    """``state`` (an adapter folder's saved tensors, read from ``path``) put into ``peft``'s adapter ``adapter_name``,
    every key and shape checked against the layers the config made: a mismatch names the file and its cause."""
    state = {peft._saved_key(adapter_name, k, loading=True): v for k, v in state.items()}
    config = peft.peft_config[adapter_name]  # where it names the base in use, its adapter_config.json is wrong
    other = config.names_another_base(getattr(peft.base_model.model, "name_or_path", None))
    elsewhere = f"the adapter was trained on another base ({config.base_model_name_or_path}); load it on that base"
    resave = ("it names this base, and its adapter_config.json describes other weights ({}): save the adapter "
              "again from its model").format
    fix = elsewhere if other else resave("r, rank_pattern, feedforward_modules, ...")
    # A head trained for another label count gets that shape before loading.
    for key, module in model_modules(peft):
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            saved = {k[len(key) + 1:]: v for k, v in state.items() if k.startswith(key + ".")}
            if module is peft.base_model.model.get_output_embeddings():  # an lm_head: its rows are the vocabulary
                rows, have = (getattr(saved.get("weight"), "shape", (None,))[0], module.original_module.weight.shape[0])
                if rows is not None and rows > have:  # made that many logits, ids past the embeddings
                    raise resized(path, key.removeprefix("base_model.model."), rows, have)
                if rows is not None and rows != have:  # a smaller vocabulary: another base
                    raise AdapterBaseMismatchError(f"{path}: {key} has {rows} rows, the base's vocabulary {have}; {fix}")
                continue
            try:
                module.resize_like(adapter_name, saved)
            except ConfigError as e:
                raise AdapterBaseMismatchError(f"{path}: {key}: {e}; {fix}") from None
    entries = peft._adapter_entries(adapter_name)
    custom = {k: module for _, module in peft._custom_state() for k in module.saved_tensors(adapter_name)}
    state = named_as_expected(state, set(entries) | set(custom), adapter_name)
    drop_carried_base_weights(peft, state, path, set(entries) | set(custom))
    missing = sorted((set(entries) | set(custom)) - set(state))
    unexpected = sorted(set(state) - set(entries) - set(custom))
    if not other and (wrong := another_task(path, config, peft.base_model.model, missing, unexpected)):
        raise wrong
    if unexpected:
        fix = (elsewhere if other else resave(f"it lacks e.g. {missing[0]}") if missing else
               "it names this base: remove those keys from the file or save the adapter again")
        raise AdapterBaseMismatchError(f"{path}: has weights for modules this model lacks (e.g. {unexpected[0]}); {fix}")
    if missing:
        deepest = max((i for i in map(_layer_index, state) if i is not None), default=None)
        if deepest is not None and all((i := _layer_index(k)) is not None and i > deepest for k in missing):
            raise AdapterBaseMismatchError(  # weights for the first layers only: a shallower model's adapter
                f"{path}: has weights for layers 0-{deepest} only, this model has more (e.g. {missing[0]}); "
                f"{elsewhere}")
        raise CorruptArtifactError(f"{path}: lacks adapter weights (e.g. {missing[0]}); re-save the adapter")
    with torch.no_grad():
        for key, (module, dict_name, pname) in entries.items():
            p = peft._entry(module, dict_name, adapter_name, pname)
            if tuple(p.shape) != tuple(state[key].shape):
                rows = state[key].shape[0]  # lora_B of lm_head (out, r): more rows, the vocabulary resized
                if ".lora_B." in key and p.shape[1:] == state[key].shape[1:] and rows > p.shape[0] and \
                        f".{(output := output_layer_name(peft.base_model.model))}." in key:  # named on a mismatch only
                    raise resized(path, output, rows, p.shape[0])
                raise AdapterBaseMismatchError(
                    f"{path}: {key} has shape {list(state[key].shape)}, the model expects {list(p.shape)}; {fix}")
            p.copy_(state[key].to(p.dtype))
    for module in {id(m): m for m in custom.values()}.values():
        module.load_saved_tensors(adapter_name, state, path)


def _layer_index(key: str) -> int | None:
    """The layer a parameter name belongs to (its first numeric part: ``model.layers.3.mlp...`` -> 3), else None."""
    return next((int(part) for part in key.split(".") if part.isdigit()), None)


def reload_state(peft, adapter_name: str, directory: str) -> None:
    """HF PEFT's ``load_adapter`` into a loaded name: the folder's weights copied into that adapter's parameters (in
    place, as an optimizer holds them), its config kept. They are read into a spare adapter of that config first, so
    weights that do not fit change nothing."""
    ours = peft.peft_config[adapter_name]
    theirs = load_config(directory).peft_type if os.path.isfile(os.path.join(directory, "adapter_config.json")) else None
    again = f"load it under another adapter_name, or delete_adapter({adapter_name!r}) first"
    if theirs not in (None, ours.peft_type):
        raise ConfigError(f"{directory}: holds a {theirs} adapter, and adapter {adapter_name!r} is a loaded "
                          f"{ours.peft_type} one; {again}")
    spare = next(f"{adapter_name}_{i}" for i in range(len(peft.peft_config) + 1) if f"{adapter_name}_{i}" not in peft.peft_config)
    trains = [(p, p.requires_grad) for p in peft.parameters()]  # add_adapter freezes the base: as it was after
    layout = copy.deepcopy(ours)  # its initial values are overwritten: a text init's tokenizer is not loaded again
    if getattr(layout, "prompt_tuning_init", None) is not None:
        layout.prompt_tuning_init = "RANDOM"
    cuda = sorted({p.device.index or 0 for p in peft.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):  # nor the random numbers HF PEFT leaves to the app drawn
        peft._add_adapter(spare, layout)
    try:
        path, state = read_adapter_weights(directory)
        try:
            load_state(peft, spare, state, path)
        except EdgePeftError as e:  # its advice (re-save the folder) was for a new adapter of the folder's config
            raise AdapterBaseMismatchError(f"{path}: does not fit adapter {adapter_name!r} as loaded "
                                           f"({first_line(e).split('; ')[0].removeprefix(path + ': ')}); {again}") from None
        have, new = peft.adapter_parameters(adapter_name), peft.adapter_parameters(spare)
        for key, p in have.items():  # a head resized to the file's label count
            if p.shape != new[key].shape:
                raise AdapterBaseMismatchError(f"{path}: {key} has shape {list(new[key].shape)}, adapter "
                                               f"{adapter_name!r} has {list(p.shape)}; {again}")
        with torch.no_grad():
            for key, p in have.items():
                p.copy_(new[key])
    finally:
        peft._forget(spare)
        for p, flag in trains:
            p.requires_grad_(flag)
