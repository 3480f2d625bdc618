"""The training loop behind ``edgepeft train``: PEFT adapters on JSONL data, under accelerate.

    Trainer(TrainingArguments(model=..., task=..., method="lora", data=..., out=...)).train()

One loop serves one CPU, one GPU and several processes (``accelerate launch`` or ``torchrun``: DDP, each process a
shard of every epoch). AdamW with warmup then decay, gradient accumulation and clipping, autocast where the device
has it, an evaluation and a checkpoint each epoch (``--resume`` continues from it), and in OUT: the best (or last)
adapter as an HF PEFT dir, ``labels.json`` for classifiers, ``training_log.json`` and ``training_curve.png``.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import time

import torch
from torch.nn.functional import binary_cross_entropy_with_logits

from edgepeft.errors import ConfigError, DataError
from edgepeft.files import missing_folders, remove_abandoned, remove_empty, remove_new, names_in, reporting_full_disk
from edgepeft.interrupts import deferred_interrupts, stopping
from edgepeft.model_checks import check_traceable
from edgepeft.sharing import one_at_a_time
from edgepeft.models import DECODERS, load_model_config, load_tokenizer, max_positions, named_labels, reads_token_types
from edgepeft.plots import missing_matplotlib, training_curve
from edgepeft.processes import first, peer_gone
from edgepeft.training.arguments import CUT, TrainingArguments, arguments_of, method_config
from edgepeft.training.checkpoint import (
    CHECKPOINT, CURVE_NAME, LOG_NAME, check_fresh_out, check_same_data, check_out_folder, check_resumable, interrupted,
    process_rngs, RUN_FILES, no_checkpoint, read_checkpoint, removed_earlier_run, replica_checksums, restore,
    save_adapter, save_checkpoint)
from edgepeft.training.data import (
    IGNORE_INDEX, Encoder, check_positions, ignored_fields, label_names, process_share, read_data, replaced_head_note,
    rows_digest, scores_relevance)
from edgepeft.training.optimizer import make_optimizer
from edgepeft.training.pooling import embedding_settings, last_real_token_pooled, retrieval_loss
from edgepeft.training.summary import beat_untrained, diverged, hint, rank, shown

class Trainer:
    """Train one adapter; ``train()`` returns the summary also written to ``training_log.json``."""

    def __init__(self, args: TrainingArguments | None = None, **kwargs):
        self.args = args if args is not None else TrainingArguments(**kwargs)
        self.args.check()

    # ------------------------------------------------------------------ setup
    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs

        AcceleratorState._reset_state()  # a second run in this process may pick another precision
        mp = self.args.mixed_precision
        cuda = torch.cuda.is_available()
        if mp == "auto":
            mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
        if mp == "fp16" and not cuda:
            raise ConfigError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this machine")
        # cpu=True without CUDA: several CPU processes (torchrun) then form a gloo DDP group. Embeddings pool the
        # last hidden state: an adapter on BERT's pooler (all-linear) gets no gradient, which DDP refused at step 2
        unused = [DistributedDataParallelKwargs(find_unused_parameters=True)] if self.args.task == "feature-extraction" else []
        return Accelerator(mixed_precision=mp, cpu=not cuda, kwargs_handlers=unused,  # _epoch accumulates gradients
                           dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=self.args.seed,
                                                                     even_batches=False))  # repeated rows: see _epoch

    def _data(self, method):
        """``method``: the adapter's config (its virtual tokens take positions too)."""
        args = self.args
        rows, eval_rows = read_data(args.data, args.eval_data, args.task)
        hard = bool(rows) and "negatives" in rows[0]  # hard negatives: a pair alone still has some
        for path, read, scored in ((args.data, rows, "in-batch negatives score"),  # a pair alone: a loss of 0
                                   (args.eval_data, eval_rows, "retrieval scores")):  # a pair alone: 0 or 1.0
            if args.task == "feature-extraction" and read is not None and len(read) < 2 and not (hard and read is rows):
                raise DataError(f"{path}: one pair; {scored} each text against the other pairs' positives, so add "
                                "pairs (2 or more)")
        if args.task == "feature-extraction" and args.batch_size == 1 and not hard:  # in-batch negatives: a loss of 0
            raise ConfigError("--batch-size 1 leaves each pair without negatives (its loss is 0, nothing is learnt); "
                              "pass --batch-size 2 or more, or give hard negatives (\"negative\")")
        other = ignored_fields(eval_rows, args.eval_data, args.task) if eval_rows and args.eval_data != args.data else None
        self.digests = {"data_sha256": (args.data, rows_digest(rows)),  # what --resume checks (the file each is of)
                        "eval_sha256": (args.eval_data, rows_digest(eval_rows))}
        config = load_model_config(args.model, "--model", revision=method.revision)  # --option revision=: a hub revision
        head = named_labels(config) if args.task == "seq-cls" else None  # a trained classifier's own class names
        self.score = args.task == "seq-cls" and scores_relevance(config, rows)  # a reranker's one output, kept
        labels = label_names(rows, args.data, head) if args.task == "seq-cls" and not self.score else None
        replaced = replaced_head_note(config, labels, args.model, self.score, head) if args.task == "seq-cls" else None
        for note in (ignored_fields(rows, args.data, args.task), other, replaced, missing_matplotlib()):
            if note and first():  # one note from a multi-process run
                print(f"note: {note}", file=sys.stderr)
        model_pad = getattr(config, "pad_token_id", None) if args.task == "seq-cls" else None
        n_virtual = getattr(method, "num_virtual_tokens", None) or 0
        check_traceable(max_positions(config), bool(n_virtual), args.model, "train")  # what its export would refuse
        tokenizer = load_tokenizer(args.model, method.revision)
        # texts cut, lower-cased and pooled as sentence-transformers (and embed)
        limit, self.pooling, lower = embedding_settings(args.model, method.revision, config, tokenizer, n_virtual) \
            if args.task == "feature-extraction" else (None, "mean", False)
        cut = args.max_length or limit or CUT  # feature-extraction: as embed cuts (256 cut MiniLM's 512 silently)
        encoder = Encoder(tokenizer, args.task, min(cut, limit or cut), labels, pad_id=model_pad, lower=lower,
                          types=reads_token_types(config, args.task), vocab=config.vocab_size)
        train = encoder.encode(rows, args.data)
        evals = encoder.encode(eval_rows, args.eval_data) if eval_rows else None
        self.virtual_first = getattr(method, "virtual_first", False)  # the config's to say: see _count
        # no pad to find (a prompt's inputs_embeds first; a config pad that is no token): the last position, see _loss
        self.pools_last_real = args.task == "seq-cls" and config.model_type in DECODERS and (
            self.virtual_first or model_pad not in (None, encoder.pad_id))
        for features, checked, path in ((train, rows, args.data), (evals or [], eval_rows or [], args.eval_data)):
            check_positions(features, checked, path, max_positions(config), n_virtual)
        return encoder, train, evals, head if self.score else labels and list(labels), config  # outputs' names, plain data

    def _model(self, labels, config, model_config):
        from edgepeft.models import load_base
        from edgepeft.peft_model import get_peft_model

        args = self.args
        config.base_model_name_or_path = os.path.abspath(args.model) if os.path.isdir(args.model) else args.model
        base = load_base(args.model, args.task, labels=labels, revision=config.revision,  # the one the adapter records
                         config=model_config, flag="--model", seed=args.seed)
        torch.manual_seed(args.seed)  # the adapter's initial values
        try:
            return get_peft_model(base, config)
        except (TypeError, ValueError) as e:  # a value the config took but the layers cannot use
            raise ConfigError(f"invalid {args.method} options {args.options}: {e}") from None

    def _prepare_out(self, acc) -> dict | None:
        """The checkpoint state to resume from (None: a fresh run), for each of ``acc``'s processes (torchrun)."""
        args, processes = self.args, acc.num_processes
        check_out_folder(args.out, args.model)
        if acc.is_main_process:  # a run killed between the checkpoint's renames: put it back, once
            for line in remove_abandoned(args.out, "a training run"):
                print(f"note: {line}", file=sys.stderr)
        acc.wait_for_everyone()  # before any process looks for the checkpoint
        ckpt = os.path.join(args.out, CHECKPOINT)
        state = read_checkpoint(args.out) if args.resume else None
        if state is None:
            if args.resume:
                raise no_checkpoint(args.out)
            if not args.overwrite:
                check_fresh_out(args.out)
            return None
        check_resumable(state, ckpt, self.args.fingerprint(), processes)
        return state

    # ------------------------------------------------------------------ loss and metrics
    def _loss(self, model, batch):
        """(loss, what evaluation needs: the logits, or the (anchor, positive) embeddings)."""
        if self.args.task != "feature-extraction":
            names = ("input_ids", "attention_mask", "token_type_ids") + ("labels",) * (not self.score)
            with last_real_token_pooled(model, batch["attention_mask"]) if self.pools_last_real else contextlib.nullcontext():
                out = model(**{k: batch[k] for k in names if k in batch}, return_dict=True)
            if self.score:  # binary cross-entropy on the one logit, as CrossEncoder's BinaryCrossEntropyLoss
                return binary_cross_entropy_with_logits(out.logits[:, 0], batch["labels"].float()), out.logits
            return out.loss, out.logits
        return retrieval_loss(model, batch, self.pooling)

    def _count(self, acc, batch) -> torch.Tensor:
        """What a batch's loss is the mean over: its label tokens (causal LM: the shifted labels; with a prompt's
        virtual tokens first, which HF PEFT labels -100, the first label too), else its rows."""
        if self.args.task == "causal-lm":
            return (batch["labels"][:, 0 if self.virtual_first else 1:] != IGNORE_INDEX).sum()
        return torch.tensor(len(batch["input_ids"]), device=acc.device)

    @torch.no_grad()
    def _evaluate(self, acc, model, loader) -> dict:
        """Each process scores its own batches (``process_share``: each batch once, as one process would), through the
        module without DDP, as the shares differ in length; then the sums are added up and the embeddings gathered."""
        from accelerate.utils import gather_object

        module = acc.unwrap_model(model)
        module.eval()
        total, count, correct, seen, pairs = 0.0, 0, 0, 0, []
        for batch in loader:
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            with acc.autocast():
                loss, extra = self._loss(module, batch)
            n = self._count(acc, batch)
            total, count = total + float(loss.float() * n), count + int(n)
            if self.args.task == "seq-cls":  # a score is right on its label's side of 0.5
                right = (extra[:, 0] > 0) == (batch["labels"] > 0.5) if self.score else extra.argmax(-1) == batch["labels"]
                correct, seen = correct + int(right.sum()), seen + len(batch["labels"])
            elif self.args.task == "feature-extraction":  # the embeddings, and each positive's ids (its text)
                ids = [tuple(row[m.bool()].tolist()) for row, m in zip(batch["positive_ids"], batch["positive_mask"])]
                pairs.append((*(t.float().cpu() for t in extra), ids))
        model.train()
        sums = acc.reduce(torch.tensor([total, count, correct, seen], dtype=torch.float64, device=acc.device), "sum")
        total, count, correct, seen = sums.tolist()
        result = {"loss": total / max(count, 1)}
        if self.args.task == "seq-cls":
            result["accuracy"] = correct / max(seen, 1)
        elif self.args.task == "causal-lm":
            result["perplexity"] = math.exp(min(result["loss"], 50.0))
        else:  # retrieval: is each text's nearest positive (among all eval positives) its own, or the same text (a
            pairs = gather_object(pairs)  # duplicate pair's: a tie, argmax took the first, and it scored as a miss)
            a, p = (torch.cat(side) for side in list(zip(*pairs))[:2])
            ids = [key for part in pairs for key in part[2]]
            nearest = [j for rows in a.split(1024) for j in (rows @ p.T).argmax(-1).tolist()]  # (N, N) held: N² memory
            result["accuracy"] = sum(ids[j] == ids[i] for i, j in enumerate(nearest)) / max(len(ids), 1)
        return result

    # ------------------------------------------------------------------ train
    def train(self) -> dict:
        """The run, holding OUT against another run into it (both found it fresh and said ok, one's adapter beside the
        other's log); one process only: under torchrun the others would wait at a barrier that times out (30 min)."""
        acc = self._accelerator()
        made_out = missing_folders(self.args.out)  # OUT and the folders above it that this run makes
        held = one_at_a_time(self.args.out, lambda note: print(note, file=sys.stderr), "training run") \
            if acc.num_processes == 1 else contextlib.nullcontext()
        self._checkpointed, self._there = 0, None  # the epochs OUT's checkpoint holds; what OUT held once prepared
        try:
            with held:
                try:
                    with torch.inference_mode(False), torch.enable_grad():  # an app's no_grad: it trains all the same
                        return self._train(acc)
                except BaseException:  # an adapter with no checkpoint (a full disk at the first save), which this run
                    if not self._checkpointed and acc.is_main_process:  # and --resume refuse, is taken back
                        remove_new(self.args.out, self._there, RUN_FILES)
                    remove_empty(made_out)  # while OUT is held: a run waiting for it then finds it gone, and remakes it
                    raise
        except KeyboardInterrupt:  # waiting for the other run (no cleanup ran), or loading (click's bare "aborted")
            remove_empty(made_out)  # a --resume run's checkpoint is kept as it was: its command is given
            raise interrupted(self.args, self._checkpointed, acc.num_processes, began=False) from None

    def _train(self, acc) -> dict:
        from accelerate.utils import set_seed
        from torch.utils.data import DataLoader
        from transformers import get_scheduler

        args = self.args
        resume = self._prepare_out(acc)
        self._there = names_in(args.out)  # after a checkpoint a killed run moved aside is put back: not this run's
        self._checkpointed = resume["epoch"] if resume is not None else 0  # Ctrl-C while loading: resumed as printed
        set_seed(args.seed)
        method = method_config(args.method, args.task, dict(args.options))
        encoder, train_rows, eval_rows, labels, model_config = self._data(method)
        check_same_data(resume, os.path.join(args.out, CHECKPOINT), labels, args.data, self.digests)
        peft = self._model(labels, method, model_config)
        params = [p for p in peft.parameters() if p.requires_grad]
        optimizer = make_optimizer(peft, args.lr, args.head_lr, args.weight_decay)
        loader = DataLoader(train_rows, batch_size=args.batch_size, shuffle=True, collate_fn=encoder.collate)
        eval_loader = (DataLoader(process_share(eval_rows, args.batch_size, acc.process_index, acc.num_processes), batch_size=args.batch_size,
                                  collate_fn=encoder.collate, generator=torch.Generator()) if eval_rows else None)  # draws no dropout seed
        model, optimizer, loader = acc.prepare(peft, optimizer, loader)  # each process every n-th batch (the first most)
        steps_per_epoch = math.ceil(math.ceil(len(train_rows) / (args.batch_size * acc.num_processes)) / args.grad_accum)
        self._spare = {k: v.to(acc.device) for k, v in encoder.collate(train_rows[:1]).items()}  # see _epoch
        total = steps_per_epoch * args.epochs
        scheduler = get_scheduler(args.scheduler, optimizer, num_warmup_steps=math.ceil(args.warmup_ratio * total),
                                  num_training_steps=total)
        log = {"args": args.fingerprint(), "labels": labels, "world_size": acc.num_processes,
               "mixed_precision": str(acc.mixed_precision),
               "train_examples": len(train_rows), "eval_examples": len(eval_rows or []), **{k: digest for k, (_, digest) in self.digests.items()},
               "trainable_parameters": sum(p.numel() for p in params),
               "total_parameters": sum(p.numel() for p in peft.parameters()),
               "steps_per_epoch": steps_per_epoch, "history": [], "evals": [], "best": None, "train_seconds": 0.0}
        start_epoch = 0
        if resume is not None:
            restore(acc.unwrap_model(model), optimizer, scheduler, resume, acc.process_index)
            log.update(resume["log"])
            log["args"] = {**log["args"], "out": args.fingerprint()["out"]}  # a checkpoint moved with its OUT
            start_epoch = resume["epoch"]
        if acc.is_main_process:
            os.makedirs(args.out, exist_ok=True)
        bar = _progress(args.progress and acc.is_main_process, total, start_epoch * steps_per_epoch)
        try:
            if resume is None and eval_loader is not None:  # the untrained adapter, for comparison
                log["evals"].append({"epoch": 0, "step": 0, **self._evaluate(acc, model, eval_loader)})
                bar.write("before training: eval " + shown(log["evals"][-1]))
            model.train()
            for epoch in range(start_epoch, args.epochs):
                self._epoch(acc, model, loader, optimizer, scheduler, params, log, epoch, steps_per_epoch, bar)
                self._end_epoch(acc, model, eval_loader, optimizer, scheduler, log, epoch, bar)
        except (KeyboardInterrupt, RuntimeError) as e:  # a RuntimeError: another process gone, or this one's own
            stopping()  # first: torchrun's SIGTERM that follows would cut the line
            bar.close()
            gone = isinstance(e, RuntimeError)  # in the first process, another's end (gloo's traceback, a hunt)
            if gone and not (first() and peer_gone(e)):
                raise  # this process's own (out of memory), or another process's: the CLI says it (peer_stopped)
            raise interrupted(args, self._checkpointed, log["world_size"], peer_gone=gone) from None
        bar.close()
        log["hint"] = hint(log, args.lr, args.epochs)
        if (beat := beat_untrained(log)) is not None:
            log["beat_untrained"] = beat
        if log["hint"] and acc.is_main_process:
            print(f"note: {log['hint']}", file=sys.stderr)
        try:  # Ctrl-C here was click's bare "aborted": the checkpoint holds every epoch, and --resume finishes
            log["replica_checksums"] = replica_checksums(acc, params)  # waits until gloo lets go of them: see there
            if acc.is_main_process:  # the checksums join the log; the curve, drawn at the last epoch, is unchanged
                with reporting_full_disk(args.out, "--out"):
                    self._write_log(log, curve=False)
        except KeyboardInterrupt:
            raise interrupted(args, self._checkpointed, log["world_size"]) from None
        acc.wait_for_everyone()  # the process group stays (torchrun): a script's next run trains in it; the CLI ends it
        return log

    def _epoch(self, acc, model, loader, optimizer, scheduler, params, log, epoch, steps_per_epoch, bar) -> None:
        """One pass over the training data, logging the mean loss every ``logging_steps`` optimizer steps. An
        optimizer step takes ``grad_accum`` batches (fewer at the epoch's end), each batch's mean loss weighted by its
        share of the window's label tokens (causal LM) or examples, over every process, as transformers' Trainer
        divides the summed loss by the window's ``num_items_in_batch``: the step is the whole window's. Every process
        takes as many steps: one past its rows runs a spare batch, weighted 0, so that DDP's sync meets the others'."""
        args = self.args
        loader.set_epoch(epoch)
        step = epoch * steps_per_epoch
        t0, examples, losses, batches = time.perf_counter(), 0, [], iter(loader)
        for _ in range(steps_per_epoch):
            window = list(itertools.islice(batches, args.grad_accum))
            counts = [self._count(acc, b) for b in window] or [torch.zeros((), dtype=torch.long, device=acc.device)]
            total, weighted = acc.reduce(torch.stack(counts).sum(), "sum").clamp(min=1), 0.0  # DDP averages gradients
            for i, batch in enumerate(window or [self._spare]):
                with contextlib.nullcontext() if i == len(counts) - 1 else acc.no_sync(model):  # sync once
                    with acc.autocast():
                        loss, _ = self._loss(model, batch)
                    acc.backward(loss * counts[i] * acc.num_processes / total)
                weighted = weighted + loss.detach().float() * counts[i]
                examples += len(batch["input_ids"]) * acc.num_processes * bool(window)
            losses.append(weighted / total)  # this process's part of the step's loss (summed over processes when logged)
            if args.max_grad_norm:  # 0: no clipping, as transformers' Trainer reads it
                acc.clip_grad_norm_(params, args.max_grad_norm)
            lr = scheduler.get_last_lr()[0]  # the rate this step takes (logged, as transformers logs it)
            optimizer.step()
            optimizer.zero_grad()
            if not acc.optimizer_step_was_skipped:  # fp16: a step the gradient scaler skipped moves no schedule
                scheduler.step()
            step += 1
            bar.update(1)
            if step % args.logging_steps and step % steps_per_epoch:  # log every N steps and at the epoch's end
                continue
            mean, losses = float(acc.reduce(torch.stack(losses).mean(), "sum")), []  # the steps' since the last entry
            if not math.isfinite(mean):  # every process sees the reduced mean: all stop alike
                raise diverged(args, step, epoch, f"the loss is {mean}")
            speed = examples / max(time.perf_counter() - t0, 1e-9)
            log["history"].append({"step": step, "epoch": epoch + 1, "loss": mean, "lr": lr, "examples_per_s": speed})
            bar.set_postfix(epoch=f"{epoch + 1}/{args.epochs}", loss=f"{mean:.4f}", lr=f"{lr:.2e}", ex_s=f"{speed:.0f}")
        next(batches, None)  # the loader's end (its batches are all taken): accelerate lets go of it
        log["train_seconds"] += time.perf_counter() - t0

    def _end_epoch(self, acc, model, eval_loader, optimizer, scheduler, log, epoch, bar) -> None:
        """Evaluate, save the adapter (best or last), the log, the curve and a checkpoint."""
        args = self.args
        evaluation = self._evaluate(acc, model, eval_loader) if eval_loader is not None else None
        improved = True
        if evaluation is not None:
            evaluation = {"epoch": epoch + 1, "step": log["history"][-1]["step"] if log["history"] else 0, **evaluation}
            by_epoch = {e["epoch"]: e for e in log["evals"]}
            log["evals"].append(evaluation)
            best = log["best"]
            improved = best is None or rank(evaluation) > rank(by_epoch[best["epoch"]])
            if improved:
                name = "accuracy" if "accuracy" in evaluation else "loss"
                log["best"] = {"epoch": epoch + 1, "metric": name, "value": evaluation[name], "loss": evaluation["loss"]}
            untrained = by_epoch.get(0)  # "best so far" only for an epoch at least as good as before training
            so_far = improved and (untrained is None or rank(evaluation) >= rank(untrained))
            bar.write(f"epoch {epoch + 1}/{args.epochs}: eval {shown(evaluation)}" + ("  (best so far)" if so_far else ""))
        rngs = process_rngs(acc)  # every process's, as the checkpoint keeps them
        if acc.is_main_process:
            peft = acc.unwrap_model(model)  # Ctrl-C, below: after the checkpoint that the saved adapter belongs to
            with deferred_interrupts(), reporting_full_disk(args.out, "--out"):
                if args.overwrite and not self._checkpointed:  # a failure before the checkpoint then leaves neither
                    self._there = removed_earlier_run(args.out)  # run's files, not this run's adapter beside the last's
                if args.save == "last" or improved:
                    save_adapter(peft, args.out, log["labels"])
                self._write_log(log)
                save_checkpoint(args.out, peft, args.fingerprint(), epoch + 1, optimizer, scheduler, log, rngs)
                self._checkpointed = epoch + 1  # set before a Ctrl-C held off meanwhile is raised
        self._checkpointed = epoch + 1
        acc.wait_for_everyone()

    def _write_log(self, log: dict, curve: bool = True) -> None:
        from edgepeft.files import write_json_atomic

        write_json_atomic(os.path.join(self.args.out, LOG_NAME), log)
        if curve:
            training_curve(log, os.path.join(self.args.out, CURVE_NAME))


def train(**kwargs) -> dict:
    """``edgepeft.train(model=..., task=..., data=..., out=..., method="lora", ...)``: see ``TrainingArguments``."""
    return Trainer(arguments_of(kwargs)).train()


# ---------------------------------------------------------------------- helpers
class _NoBar:
    """--quiet's progress bar: shows and writes nothing."""
    update = set_postfix = write = close = staticmethod(lambda *args, **kwargs: None)


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
