"""What survives a training run's epochs: the adapter OUT keeps, and the checkpoint ``--resume`` continues from.

The checkpoint holds the trainable tensors themselves (not the saved adapter: a prefix adapter with a
projection is saved with its MLP applied, HF PEFT's format, which cannot train on from where it stopped),
the optimizer and scheduler, every random generator, the log and the settings it was made with.
"""
from __future__ import annotations

import io
import os
import pathlib
import random
import shutil
import time

import numpy as np
import torch

from edgepeft.config import CONFIG_NAME, LABELS_NAME, PICKLED_WEIGHTS_NAME, WEIGHTS_NAME
from edgepeft.errors import ConfigError, CorruptArtifactError, TrainingInterrupted
from edgepeft.interrupts import TERMINATED, stopping, under_torchrun
from edgepeft.files import names_in, replace_dir, staging_dir, write_bytes_atomic, write_json_atomic
from edgepeft.runtimes.access import aside_elsewhere
from edgepeft.training.arguments import option_defaults

CHECKPOINT = "checkpoint"
STATE = "trainer_state.pt"
LOG_NAME = "training_log.json"
CURVE_NAME = "training_curve.png"
# settings that follow from others where not given (the method's rate and options, the task's cut, --save without
# --eval): a --resume refusal names them only where nothing they follow from changed
FOLLOWING = ("lr", "max_length", "options", "save")
RUN_FILES = (CHECKPOINT, CONFIG_NAME, WEIGHTS_NAME, LABELS_NAME, LOG_NAME, CURVE_NAME)  # what a run writes in OUT
# and what --overwrite removes of an earlier adapter: an HF PEFT folder's pickled weights too (a hunt: left beside the
# new adapter's, a copy or an upload carried both)
EARLIER_FILES = (*RUN_FILES, PICKLED_WEIGHTS_NAME)


def removed_earlier_run(out: str) -> set | None:
    """--overwrite, at a run's first save: the earlier run's files in ``out`` removed (they were replaced one by one,
    so a run failing between its adapter and its checkpoint left its adapter beside the earlier run's checkpoint);
    returns what ``out`` holds then (``names_in``), from which a failure before the checkpoint takes back its own."""
    for name in EARLIER_FILES:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
    return names_in(out)


def save_checkpoint(out: str, peft, fingerprint: dict, epoch: int, optimizer, scheduler, log: dict,
                    rngs: list[dict]) -> None:
    """``rngs``: every process's generators (``process_rngs``), for each to resume with its own."""
    stage = staging_dir(out, "checkpoint")
    trainable = {k: p.detach().cpu() for k, p in peft.named_parameters() if p.requires_grad}
    try:
        state = io.BytesIO()  # written by write_bytes_atomic: a full disk is an OSError (torch's writer: a RuntimeError)
        torch.save({"args": fingerprint, "epoch": epoch, "trainable": trainable, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rngs, "log": log}, state)
        write_bytes_atomic(os.path.join(stage, STATE), state.getbuffer())  # not a copy
        replace_dir(stage, os.path.join(out, CHECKPOINT))
    finally:  # interrupted or out of disk while writing: no half-written staging folder is left in OUT
        shutil.rmtree(stage, ignore_errors=True)


def read_checkpoint(out: str) -> dict | None:
    """The state saved in OUT's checkpoint (None: there is none)."""
    path = os.path.join(out, CHECKPOINT, STATE)
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only: runs no code
        state["args"], state["epoch"], state["trainable"]  # noqa: B018
    except Exception as e:  # noqa: BLE001  (truncated or foreign file: torch raises many kinds)
        raise CorruptArtifactError(f"{path}: cannot read the checkpoint ({type(e).__name__}); "
                                   "start over with --overwrite") from None
    return state


def check_resumable(state: dict, ckpt: str, settings: dict, processes: int) -> None:
    """Refuse to resume a checkpoint made with other settings (the first that differs named as a flag or option, one
    the user gave before those that follow from it) or by another number of processes (torchrun): the data each takes
    and the steps per epoch follow it."""
    old, new, log = state["args"], settings, state.get("log", {})
    # not --out: the checkpoint is found in it, and a folder moved or copied (mv out renamed) resumes; nor --data and
    # --eval where the log holds their rows' digests, which check_same_data compares: a project moved or copied resumes
    same = {k for k, digest in (("data", "data_sha256"), ("eval_data", "eval_sha256"))
            if digest in log and (old.get(k) is None) == (new.get(k) is None)}
    if old.get("model") != new.get("model") and _moved_together(old, new):
        same.add("model")  # a model folder as far from OUT as it was: the project moved or copied whole
    changed = sorted((k for k in set(old) | set(new) if old.get(k) != new.get(k) and k != "out" and k not in same),
                     key=lambda k: (k in FOLLOWING, k))  # --method ia3 named, not the rate that follows from it
    if changed[:1] == ["options"]:  # the same method: its option that differs, each as it resolves
        defaults = option_defaults(new["method"])
        a, b = ({**defaults, **(s.get("options") or {})} for s in (old, new))
        option = next((o for o in sorted(set(a) | set(b)) if a.get(o) != b.get(o)), None)  # None: --r 8, LoRA's r
        changed, old, new = ([option], a, b) if option is not None else (changed[1:], old, new)
    if changed and changed[0] not in old and changed[0] != "options":  # "was made with no --head-lr": no flag says so
        raise ConfigError(f"{ckpt}: was made by an earlier edgepeft, which recorded no {changed[0]}; start over with "
                          "--overwrite")
    if changed:
        k = changed[0]
        moved = " (a model folder moved since: put it back there, or link that path to it)" * (
            k == "model" and isinstance(old.get(k), str) and not os.path.lexists(old[k]))
        raise ConfigError(f"{ckpt}: was made with {_setting(k, old)}, this run has {_setting(k, new)}; resume with "
                          f"the same settings{moved} or start over with --overwrite")
    made = state.get("log", {}).get("world_size", 1)
    if made != processes:
        raise ConfigError(f"{ckpt}: was made by {made} training process(es), this run has {processes}; resume "
                          f"with {made} (torchrun --nproc-per-node {made} -m edgepeft train ... --resume) or start "
                          "over with --overwrite")


def _moved_together(old: dict, new: dict) -> bool:
    """Whether the run's model folder lies as far from its OUT as it did (a project moved or copied whole)."""
    if not all(isinstance(s.get(k), str) and os.path.isabs(s[k]) for s in (old, new) for k in ("model", "out")):
        return False  # a hub id
    try:
        return os.path.relpath(old["model"], old["out"]) == os.path.relpath(new["model"], new["out"])
    except ValueError:  # Windows: another drive, no relative path
        return False


def _setting(name: str, settings: dict) -> str:
    """``lr=0.005``, or ``no eval_data`` for one not given (the CLI reads both as flags: no --r none to type)."""
    value = settings.get(name)
    return f"no {name}" if value is None else f"{name}={value!r}"


def check_same_data(state: dict | None, ckpt: str, labels: list | None, data: str, digests: dict) -> None:
    """Refuse to resume on data whose classes differ from the checkpoint's (a label renamed trained its rows as
    another class and saved the old names; one added was a size-mismatch traceback), or on rows changed since
    (``digests``: {"data_sha256": (its file, sha256), "eval_sha256": ...}): the steps per epoch, the
    log's counts and the evals that pick the best epoch follow the rows, and the log kept the old ones."""
    if state is None:
        return
    log = state.get("log", {})
    if log.get("labels") != labels and labels is None and log.get("labels") == ["0", "1"]:  # before scores_relevance
        raise ConfigError(f"{ckpt}: was made by an earlier edgepeft, which trained a head of 2 classes in place of this "
                          "model's one-output head (a reranker's, kept now for labels 0 and 1); start over with --overwrite")
    if log.get("labels") != labels:
        raise ConfigError(f"{ckpt}: was made with the labels {log.get('labels')}, {data} now gives {labels}; resume "
                          "with the data it was made with or start over with --overwrite")
    for key, (path, digest) in digests.items():
        if key in log and log[key] != digest:  # a checkpoint from before the digests: not checked
            raise ConfigError(f"{ckpt}: was made with other rows in {path} (the file changed since, or it is "
                              "another file); resume with the rows it was made with or start over with --overwrite")


def restore(peft, optimizer, scheduler, state: dict, process: int) -> None:
    """``process``: this process's index (torchrun): its own generators, as it left them."""
    load_trainable(peft, state["trainable"])
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as e:  # other parameter groups: an earlier edgepeft's, with --weight-decay set
        raise ConfigError(f"the checkpoint's optimizer state does not fit this edgepeft's ({e}); start over with "
                          "--overwrite") from None
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    _set_rng(rng[process] if isinstance(rng, list) else rng)  # an older checkpoint: rank 0's for every process


def save_adapter(peft, directory: str, labels) -> None:
    peft.save_pretrained(directory)
    if labels is not None:
        write_json_atomic(os.path.join(directory, LABELS_NAME), {"labels": labels})
    elif os.path.isfile(os.path.join(directory, LABELS_NAME)):  # left by a classifier this run overwrote
        os.remove(os.path.join(directory, LABELS_NAME))


def load_trainable(peft, saved: dict) -> None:
    """Put a checkpoint's trainable tensors back (the settings already matched, so the names do)."""
    params = {k: p for k, p in peft.named_parameters() if p.requires_grad}
    if params.keys() != saved.keys():
        saved = {_current_name(k): v for k, v in saved.items()}
    if params.keys() != saved.keys():
        raise CorruptArtifactError(f"the checkpoint's trainable tensors do not match the model "
                                   f"({len(saved)} saved, {len(params)} trainable); start over with --overwrite")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])


def _current_name(key: str) -> str:
    """A prompt or prefix encoder's name in a checkpoint of an earlier edgepeft, which kept the encoders inside the
    input embeddings (``...embed_tokens.prompt_encoder.<adapter>...``), as they are named now."""
    from edgepeft.tuners.virtual import HOLDER

    head, found, rest = key.partition(".prompt_encoder.")
    return f"base_model.model.{HOLDER}.prompt_encoder.{rest}" if found and not head.endswith(HOLDER) else key


def checksum(params, device) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([sum(p.detach().double().sum() for p in params)]).to(device)


def replica_checksums(acc, params) -> list[float]:
    """Each process's ``checksum`` of ``params`` (one: a single process's).

    A run's last collective on tensors Python made, so it waits, the GIL let go, until gloo's worker threads hold
    none of them: a worker that lets go of such a tensor takes the GIL, and ending the group (``destroy_process_group``,
    or the DDP model freed) joins the workers with the GIL held, so a worker not yet done would wait for ever in
    ``~ProcessGroupGloo``. Earlier collectives' workers are done long before (the run's saving and its barriers come
    between); a run stopped by an error skips the teardown (``processes.leave``).
    """
    import torch.distributed as dist

    mine = checksum(params, acc.device)
    if acc.num_processes == 1:
        return [float(mine)]
    everyone = [torch.empty_like(mine) for _ in range(acc.num_processes)]
    dist.all_gather(everyone, mine)
    held = lambda: any(getattr(t, "_use_count", lambda: 1)() > 1 for t in (mine, *everyone))  # noqa: E731 (Python's: 1)
    deadline = time.monotonic() + 60  # a reference kept for good: go on rather than wait here for ever
    while dist.get_backend() == "gloo" and held() and time.monotonic() < deadline:
        time.sleep(0.001)
    return [float(t) for t in everyone]


def process_rngs(acc) -> list[dict]:
    """Every process's generator states, in process order: each draws its own dropout masks."""
    if acc.num_processes == 1:
        return [_get_rng()]
    import torch.distributed as dist

    everyone = [None] * acc.num_processes
    dist.all_gather_object(everyone, _get_rng())
    return everyone


def _get_rng() -> dict:
    """Every generator's state as tensors and plain data, so the checkpoint loads with weights_only."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_out_folder(out: str, model: str) -> None:
    """--out is the adapter's own folder: not the base model's (the base would turn into an adapter folder), and
    not inside an export, whose folders exports replace."""
    from edgepeft.runtimes.manifest import BASE_DIR, BASE_MANIFEST, enclosing_export

    real = os.path.realpath(out)
    if os.path.isdir(model) and real == os.path.realpath(model):
        raise ConfigError(f"{out}: is the --model folder; give --out a folder of its own for the adapter")
    if os.path.isfile(os.path.join(real, BASE_DIR, BASE_MANIFEST)):
        raise ConfigError(f"{out}: is an export; give --out a folder of its own for the adapter (then `edgepeft "
                          "export --adapter` it into the export)")
    if (export := enclosing_export(real)) is not None:
        raise ConfigError(f"{out}: lies inside the export {export}, whose folders exports replace; give --out a "
                          "folder outside it (then `edgepeft export --adapter` it into the export)")
    check_outside_checkpoints(out)


def check_outside_checkpoints(out: str) -> None:
    """Refuse an OUT (a training run's, an export's) at or in a run's checkpoint folder, which its next save (--resume,
    --overwrite) replaces whole: what was written there went with it, unsaid."""
    real = os.path.realpath(out)
    for folder in [real, *map(str, pathlib.Path(real).parents)]:
        if os.path.basename(folder) == CHECKPOINT and os.path.isfile(os.path.join(folder, STATE)):
            raise ConfigError(f"{out}: lies in {folder}, the checkpoint of the run in {os.path.dirname(folder)}, which "
                              "its next save (--resume) replaces whole; give --out a folder of its own")


def no_checkpoint(out: str) -> ConfigError:
    """--resume where ``out`` holds no checkpoint: one moved aside by a run this process cannot tell stopped (another
    container's, an earlier boot's) named with the mv that puts it back (--overwrite would discard its epochs); an
    adapter there (a run stopped before its first checkpoint) started over; else a run without --resume."""
    there = os.path.exists(os.path.join(out, CONFIG_NAME))
    return ConfigError(f"{out}: no checkpoint to resume from; " + (aside_elsewhere(out, CHECKPOINT) or (
        "it holds an adapter (a finished run, or one stopped before it saved a checkpoint): start over with "
        "--overwrite instead of --resume" if there else "run without --resume")))


def check_fresh_out(out: str) -> None:
    """A run that neither resumes nor overwrites replaces nothing: not an earlier run's checkpoint or adapter, nor
    a file or folder of the user's where training writes."""
    if os.path.exists(os.path.join(out, CHECKPOINT, STATE)):
        raise ConfigError(f"{out}: holds a checkpoint of an earlier run; pass --resume to continue it, "
                          "--overwrite to start over, or another --out")
    if os.path.exists(os.path.join(out, CONFIG_NAME)):
        raise ConfigError(f"{out}: holds an adapter already; pass --overwrite to replace it, or another --out")
    written = [n for n in (CHECKPOINT, WEIGHTS_NAME, LABELS_NAME, LOG_NAME, CURVE_NAME) if os.path.exists(os.path.join(out, n))]
    if written:
        raise ConfigError(f"{os.path.join(out, written[0])}: training writes there; move it, pass --overwrite to "
                          "replace it, or give another --out")


def interrupted(args, n: int, processes: int, began: bool = True, peer_gone: bool = False) -> TrainingInterrupted:
    """What an interrupt of a run of ``args`` whose checkpoint holds ``n`` epochs (Ctrl-C; ``peer_gone``: under
    torchrun another process's end, as the first process saw it; a SIGTERM there, torchrun's agent stopping every
    process) leaves: the last checkpoint (or the one a --resume run was reading, as it was) and the command that
    resumes it, or nothing (train removes an OUT it made, as for any error)."""
    stopping()
    ckpt = os.path.join(args.out, CHECKPOINT)
    what = ("another process stopped (torchrun's report names which, and why)" if peer_gone else
            "torchrun stopped the processes (its report names why)" if TERMINATED and under_torchrun() else "interrupted")
    if n or args.resume and os.path.isfile(os.path.join(ckpt, STATE)):  # --resume stopped before it read the epoch
        held = f"holds the run after epoch {n} of {args.epochs}" if n else "is kept"
        return TrainingInterrupted(f"{what}; {ckpt} {held}; continue with: " + args.command("--resume", processes=processes))
    return TrainingInterrupted(f"{what} in the first epoch; nothing was saved in {args.out}" if began else
                               f"{what} before training began; nothing saved in {args.out}")
