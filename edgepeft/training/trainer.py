"""The training loop behind ``edgepeft train``: PEFT adapters on JSONL data, under accelerate.

    Trainer(TrainingArguments(model=..., task=..., method="lora", data=..., out=...)).train()

One loop serves one CPU, one GPU and several processes (``accelerate launch`` or
``torchrun``: DDP, each process a shard of every epoch). AdamW with warmup then
decay, gradient accumulation and clipping, autocast where the device has it, an
evaluation each epoch, a checkpoint each epoch (``--resume`` continues from it),
and in OUT: the best (or last) adapter as an HF PEFT dir, ``labels.json`` for
classifiers, ``training_log.json`` and ``training_curve.png``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from edgepeft.config import CONFIG_NAME, LABELS_NAME, TASK_TYPES
from edgepeft.errors import ConfigError, CorruptArtifactError
from edgepeft.files import check_output_dir, replace_dir, staging_dir, write_json_atomic
from edgepeft.plots import training_curve
from edgepeft.training.data import Encoder, label_names, read_jsonl

LOG_NAME = "training_log.json"
CURVE_NAME = "training_curve.png"
CHECKPOINT = "checkpoint"
_STATE = "trainer_state.pt"
# Settings that may change when resuming (everything else must match the checkpoint).
_RESUMABLE = {"resume", "overwrite", "progress", "logging_steps"}


@dataclass
class TrainingArguments:
    model: str  # local folder or hub id
    task: str  # causal-lm | seq-cls | feature-extraction
    data: str  # train JSONL
    out: str  # the adapter dir (plus log, curve and checkpoint)
    method: str = "lora"  # a registered method: lora, ia3, bottleneck, ...
    eval_data: str | None = None
    epochs: int = 3
    lr: float = 5e-4
    batch_size: int = 16
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    scheduler: str = "linear"  # linear | cosine | constant_with_warmup
    max_length: int = 256
    seed: int = 0
    logging_steps: int = 10  # a training-loss entry every N optimizer steps and at each epoch's end (one sync each)
    mixed_precision: str = "auto"  # auto (bf16 on CUDA that has it, else fp32) | no | bf16 | fp16
    save: str = "best"  # best (by the eval metric; needs eval_data) | last
    options: dict = field(default_factory=dict)  # the method config's fields: r, lora_alpha, target_modules, ...
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def check(self) -> None:
        if self.task not in TASK_TYPES.values():
            raise ConfigError(f"task {self.task!r} is not supported; use one of {', '.join(TASK_TYPES.values())}")
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "logging_steps"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {getattr(self, name)!r}")
        if not 0 < self.max_grad_norm < math.inf:
            raise ConfigError(f"--max-grad-norm must be a finite number > 0, got {self.max_grad_norm}")
        check_output_dir(self.out, "--out")
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"--lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.scheduler not in ("linear", "cosine", "constant_with_warmup"):
            raise ConfigError(f"--scheduler must be linear, cosine or constant_with_warmup, got {self.scheduler!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ConfigError(f"--mixed-precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.save not in ("best", "last"):
            raise ConfigError(f"--save must be best or last, got {self.save!r}")
        if self.save == "best" and self.eval_data is None:
            self.save = "last"  # nothing to rank epochs by

    def fingerprint(self) -> dict:
        """The settings a checkpoint was made with (paths made absolute)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in _RESUMABLE}
        for k in ("data", "eval_data", "out"):
            d[k] = os.path.abspath(d[k]) if d[k] else d[k]
        if os.path.isdir(self.model):
            d["model"] = os.path.abspath(self.model)
        return json.loads(json.dumps(d))


def method_config(method: str, task: str, options: dict):
    """The config object for ``method`` (a short name: lora, ia3, ...) with ``options`` as its fields."""
    from edgepeft.registry import methods

    known = {m.name: m for m in methods()}
    for m in methods():  # PEFT's own names too: prefix_tuning, PROMPT_TUNING, ...
        known.setdefault(m.peft_type.lower(), m)
        known.setdefault(m.peft_type.lower().split("_")[0], m)
    m = known.get(method.lower())
    if m is None:
        raise ConfigError(f"method {method!r} is not supported; use one of {', '.join(sorted(x.name for x in methods()))}")
    fields = {f.name for f in dataclasses.fields(m.config_cls)} - {"task_type", "peft_type"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"{m.name} has no option {unknown[0]!r}; its options are {', '.join(sorted(fields))}")
    task_type = {v: k for k, v in TASK_TYPES.items()}[task]
    try:
        config = m.config_cls(task_type=task_type, **options)
    except (TypeError, ValueError, ConfigError) as e:
        raise ConfigError(f"invalid {m.name} options {options}: {e}") from None
    return config


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    fix = "save one beside the model (tokenizer.save_pretrained) or pass a model folder that has one"
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{model}: no usable tokenizer ({str(e).splitlines()[0]}); {fix}") from None
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)) + 1:  # transformers 5 builds an empty one when files are missing
        raise ConfigError(f"{model}: has no tokenizer files (its tokenizer would know only special tokens); {fix}")
    return tokenizer


class Trainer:
    """Train one adapter; ``train()`` returns the summary also written to ``training_log.json``."""

    def __init__(self, args: TrainingArguments | None = None, **kwargs):
        self.args = args if args is not None else TrainingArguments(**kwargs)
        self.args.check()

    # ------------------------------------------------------------------ setup
    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration

        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()  # a second run in this process may pick another precision
        mp = self.args.mixed_precision
        cuda = torch.cuda.is_available()
        if mp == "auto":
            mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
        if mp == "fp16" and not cuda:
            raise ConfigError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this machine")
        # cpu=True without CUDA: several CPU processes (torchrun) then form a gloo DDP group
        return Accelerator(gradient_accumulation_steps=self.args.grad_accum, mixed_precision=mp, cpu=not cuda,
                           dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=self.args.seed))

    def _data(self):
        a = self.args
        rows = read_jsonl(a.data, a.task)
        eval_rows = read_jsonl(a.eval_data, a.task) if a.eval_data else None
        labels = label_names(rows, a.data) if a.task == "seq-cls" else None
        encoder = Encoder(load_tokenizer(a.model), a.task, a.max_length, labels)
        train = encoder.encode(rows, a.data)
        evals = encoder.encode(eval_rows, a.eval_data) if eval_rows else None
        return encoder, train, evals, labels

    def _model(self, labels):
        from edgepeft.models import load_base
        from edgepeft.peft_model import get_peft_model

        a = self.args
        config = method_config(a.method, a.task, dict(a.options))
        config.base_model_name_or_path = os.path.abspath(a.model) if os.path.isdir(a.model) else a.model
        base = load_base(a.model, a.task, labels=labels)
        torch.manual_seed(a.seed)  # the adapter's initial values
        try:
            return get_peft_model(base, config)
        except (TypeError, ValueError) as e:  # a value the config took but the layers cannot use
            raise ConfigError(f"invalid {a.method} options {a.options}: {e}") from None

    def _prepare_out(self) -> dict | None:
        """The checkpoint state to resume from (None: a fresh run)."""
        a = self.args
        ckpt = os.path.join(a.out, CHECKPOINT)
        if not os.path.exists(os.path.join(ckpt, _STATE)):
            if a.resume:
                raise ConfigError(f"{a.out}: no checkpoint to resume from; run without --resume")
            if os.path.exists(os.path.join(a.out, CONFIG_NAME)) and not a.overwrite:
                raise ConfigError(f"{a.out}: holds an adapter already; pass --overwrite to replace it, or another --out")
            return None
        if not a.resume:
            if not a.overwrite:
                raise ConfigError(f"{a.out}: holds a checkpoint of an earlier run; pass --resume to continue it, "
                                  "--overwrite to start over, or another --out")
            return None
        path = os.path.join(ckpt, _STATE)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only: runs no code
            state["args"], state["epoch"], state["trainable"]  # noqa: B018
        except Exception as e:  # noqa: BLE001  (truncated or foreign file: torch raises many kinds)
            raise CorruptArtifactError(f"{path}: cannot read the checkpoint ({type(e).__name__}); "
                                       "start over with --overwrite") from None
        old, new = state["args"], self.args.fingerprint()
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            k = changed[0]
            raise ConfigError(f"{ckpt}: was made with {k}={old.get(k)!r}, this run has {k}={new.get(k)!r}; "
                              "resume with the same settings or start over with --overwrite")
        return state

    # ------------------------------------------------------------------ loss and metrics
    def _loss(self, model, batch):
        """(loss, what evaluation needs: the logits, or the (anchor, positive) embeddings)."""
        if self.args.task != "feature-extraction":
            fields = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
            out = model(**fields, return_dict=True)
            return out.loss, out.logits
        # texts and positives in one forward (DDP allows one forward per backward)
        width = max(batch["input_ids"].shape[1], batch["positive_ids"].shape[1])
        pad = torch.nn.functional.pad
        ids = torch.cat([pad(t, (0, width - t.shape[1])) for t in (batch["input_ids"], batch["positive_ids"])])
        mask = torch.cat([pad(t, (0, width - t.shape[1])) for t in (batch["attention_mask"], batch["positive_mask"])])
        a, p = _pooled(model, ids, mask).split(len(batch["input_ids"]))
        scores = 20.0 * a @ p.T  # cosine similarity x 20, as sentence-transformers' MultipleNegativesRankingLoss
        return torch.nn.functional.cross_entropy(scores, torch.arange(len(a), device=a.device)), (a, p)

    @torch.no_grad()
    def _evaluate(self, acc, model, loader) -> dict:
        model.eval()
        total, count, correct, seen, anchors, positives = 0.0, 0, 0, 0, [], []
        for batch in loader:
            with acc.autocast():
                loss, extra = self._loss(model, batch)
            if self.args.task == "causal-lm":
                n = (batch["labels"][:, 1:] != -100).sum()
            else:
                n = torch.tensor(len(batch["input_ids"]), device=acc.device)
            total += float(acc.reduce(loss.detach().float() * n, "sum"))
            count += int(acc.reduce(n, "sum"))
            if self.args.task == "seq-cls":
                pred, gold = acc.gather_for_metrics((extra.argmax(-1), batch["labels"]))
                correct += int((pred == gold).sum())
                seen += len(gold)
            elif self.args.task == "feature-extraction":
                a, p = acc.gather_for_metrics(extra)
                anchors.append(a.float())
                positives.append(p.float())
        model.train()
        result = {"loss": total / max(count, 1)}
        if self.args.task == "seq-cls":
            result["accuracy"] = correct / max(seen, 1)
        elif self.args.task == "causal-lm":
            result["perplexity"] = math.exp(min(result["loss"], 50.0))
        else:  # retrieval: is each text's nearest positive (among all eval positives) its own?
            a, p = torch.cat(anchors), torch.cat(positives)
            result["accuracy"] = float(((a @ p.T).argmax(-1) == torch.arange(len(a), device=a.device)).float().mean())
        return result

    def _metric(self, evaluation: dict) -> tuple[str, float]:
        """(name, value) for choosing the best epoch: accuracy (higher is better) when there is one, else loss."""
        if "accuracy" in evaluation:
            return "accuracy", evaluation["accuracy"]
        return "loss", evaluation["loss"]

    # ------------------------------------------------------------------ train
    def train(self) -> dict:
        from accelerate.utils import set_seed
        from torch.utils.data import DataLoader
        from transformers import get_scheduler

        a = self.args
        acc = self._accelerator()
        resume = self._prepare_out()
        set_seed(a.seed)
        encoder, train_rows, eval_rows, labels = self._data()
        peft = self._model(labels)
        params = [p for p in peft.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay)
        loader = DataLoader(train_rows, batch_size=a.batch_size, shuffle=True, collate_fn=encoder.collate)
        eval_loader = (DataLoader(eval_rows, batch_size=a.batch_size, collate_fn=encoder.collate)
                       if eval_rows else None)
        model, optimizer, loader = acc.prepare(peft, optimizer, loader)
        if eval_loader is not None:
            eval_loader = acc.prepare(eval_loader)
        steps_per_epoch = math.ceil(len(loader) / a.grad_accum)
        total = steps_per_epoch * a.epochs
        scheduler = get_scheduler(a.scheduler, optimizer, num_warmup_steps=round(a.warmup_ratio * total),
                                  num_training_steps=total)
        log = {"args": a.fingerprint(), "labels": labels, "world_size": acc.num_processes,
               "train_examples": len(train_rows), "eval_examples": len(eval_rows or []),
               "trainable_parameters": trainable, "total_parameters": sum(p.numel() for p in peft.parameters()),
               "steps_per_epoch": steps_per_epoch, "history": [], "evals": [], "best": None, "train_seconds": 0.0}
        start_epoch = 0
        if resume is not None:
            _load_trainable(acc.unwrap_model(model), resume["trainable"])
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
            _set_rng(resume["rng"])
            log.update(resume["log"])
            start_epoch = resume["epoch"]
        if acc.is_main_process:
            os.makedirs(a.out, exist_ok=True)
        bar = _progress(a.progress and acc.is_main_process, total, start_epoch * steps_per_epoch)
        if resume is None and eval_loader is not None:  # the untrained adapter, for comparison
            log["evals"].append({"epoch": 0, "step": 0, **self._evaluate(acc, model, eval_loader)})
            bar.write("before training: eval " + _shown(log["evals"][-1]))
        model.train()
        step = start_epoch * steps_per_epoch
        for epoch in range(start_epoch, a.epochs):
            loader.set_epoch(epoch)
            t0, examples, window = time.perf_counter(), 0, []
            for batch in loader:
                with acc.accumulate(model):
                    with acc.autocast():
                        loss, _ = self._loss(model, batch)
                    acc.backward(loss)
                    window.append(loss.detach().float())
                    examples += len(batch["input_ids"]) * acc.num_processes
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(params, a.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                if not acc.sync_gradients:
                    continue
                scheduler.step()
                step += 1
                bar.update(1)
                if step % a.logging_steps and step % steps_per_epoch:  # log every N steps and at the epoch's end
                    continue
                mean = float(acc.reduce(torch.stack(window).mean(), "mean"))  # the mean since the last entry
                window = []
                if not math.isfinite(mean):  # every process sees the reduced mean: all stop alike
                    kept = (f"{a.out} keeps the adapter saved before" if os.path.isfile(os.path.join(a.out, CONFIG_NAME))
                            else "no adapter was saved")
                    raise ConfigError(f"training diverged at step {step} (epoch {epoch + 1}): the loss is {mean}; "
                                      f"lower --lr (now {a.lr:g}) or check the data; {kept}")
                speed = examples / max(time.perf_counter() - t0, 1e-9)
                lr = scheduler.get_last_lr()[0]
                log["history"].append({"step": step, "epoch": epoch + 1, "loss": mean, "lr": lr, "examples_per_s": speed})
                bar.set_postfix(epoch=f"{epoch + 1}/{a.epochs}", loss=f"{mean:.4f}", lr=f"{lr:.2e}", ex_s=f"{speed:.0f}")
            log["train_seconds"] += time.perf_counter() - t0
            self._end_epoch(acc, model, eval_loader, optimizer, scheduler, log, epoch, bar)
        bar.close()
        log["replica_checksums"] = [float(x) for x in acc.gather(_checksum(params, acc.device))]
        if acc.is_main_process:  # the checksums join the log; the curve, drawn at the last epoch, is unchanged
            self._write_log(log, curve=False)
        acc.wait_for_everyone()
        acc.end_training()
        return log

    def _end_epoch(self, acc, model, eval_loader, optimizer, scheduler, log, epoch, bar) -> None:
        """Evaluate, save the adapter (best or last), the log, the curve and a checkpoint."""
        a = self.args
        evaluation = self._evaluate(acc, model, eval_loader) if eval_loader is not None else None
        improved = True
        if evaluation is not None:
            evaluation = {"epoch": epoch + 1, "step": log["history"][-1]["step"] if log["history"] else 0, **evaluation}
            log["evals"].append(evaluation)
            name, value = self._metric(evaluation)
            best = log["best"]
            improved = best is None or (value < best["value"] if name == "loss" else value > best["value"])
            if improved:
                log["best"] = {"epoch": epoch + 1, "metric": name, "value": value}
            bar.write(f"epoch {epoch + 1}/{a.epochs}: eval {_shown(evaluation)}" + ("  (best so far)" if improved else ""))
        if acc.is_main_process:
            peft = acc.unwrap_model(model)
            if a.save == "last" or improved:
                _save_adapter(peft, a.out, log["labels"])
            self._write_log(log)
            stage = staging_dir(a.out, "checkpoint")
            # The trainable tensors themselves, not the saved adapter: a prefix adapter with a projection
            # is saved with its MLP applied (HF PEFT's format), which cannot train on from where it stopped.
            trainable = {k: p.detach().cpu() for k, p in peft.named_parameters() if p.requires_grad}
            torch.save({"args": a.fingerprint(), "epoch": epoch + 1, "trainable": trainable,
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _get_rng(),
                        "log": log}, os.path.join(stage, _STATE))
            replace_dir(stage, os.path.join(a.out, CHECKPOINT))
        acc.wait_for_everyone()

    def _write_log(self, log: dict, curve: bool = True) -> None:
        write_json_atomic(os.path.join(self.args.out, LOG_NAME), log)
        if curve:
            training_curve(log, os.path.join(self.args.out, CURVE_NAME))


def train(**kwargs) -> dict:
    """``edgepeft.train(model=..., task=..., data=..., out=..., method="lora", ...)``: see ``TrainingArguments``."""
    return Trainer(TrainingArguments(**kwargs)).train()


# ---------------------------------------------------------------------- helpers
def _pooled(model, ids, mask):
    hidden = model(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
    hidden = hidden[:, hidden.shape[1] - mask.shape[1]:]  # a prompt's virtual tokens come first: pool the text's own
    m = mask[..., None].to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)  # mean pooling, as sentence-transformers
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def _shown(evaluation: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in evaluation.items() if k not in ("epoch", "step"))


def _save_adapter(peft, directory: str, labels) -> None:
    peft.save_pretrained(directory)
    if labels is not None:
        write_json_atomic(os.path.join(directory, LABELS_NAME), {"labels": labels})


def _load_trainable(peft, saved: dict) -> None:
    """Put a checkpoint's trainable tensors back (the settings already matched, so the names do)."""
    params = {k: p for k, p in peft.named_parameters() if p.requires_grad}
    if params.keys() != saved.keys():
        raise CorruptArtifactError(f"the checkpoint's trainable tensors do not match the model "
                                   f"({len(saved)} saved, {len(params)} trainable); start over with --overwrite")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])


def _checksum(params, device) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([sum(p.detach().double().sum() for p in params)]).to(device)


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


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def write(self, text):
        pass

    def close(self):
        pass


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

