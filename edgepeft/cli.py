"""The ``edgepeft`` command line. User errors print one line and exit 1, no traceback."""
from __future__ import annotations

import json
import os
import re
import sys

import click
from click.core import ParameterSource

from edgepeft.errors import EdgePeftError, TrainingInterrupted, first_line
from edgepeft.flags import as_flags, method_options, one_value
from edgepeft.interrupts import stopped_status, terminated_as_interrupts
from edgepeft.processes import end_group, first, leave, notes_once, peer_stopped, say, stdin_text
from edgepeft.runtimes.values import size_text as _size


@click.group()
@click.version_option(package_name="edgepeft")
def cli():
    """Export PEFT adapters with their base to ONNX once, run and switch them per call."""


def _needs_training_side(command: str) -> None:
    """``train`` and ``export`` need the training extras, which a runtime-only install lacks: say so in one line."""
    import importlib.util

    from edgepeft.errors import MissingDependencyError, lacking_training_side

    if error := lacking_training_side(f"`edgepeft {command}`"):
        raise error
    if command == "export" and importlib.util.find_spec("onnxruntime") is None:  # export validates on it
        raise MissingDependencyError("`edgepeft export` checks the export on ONNX Runtime, which this install lacks; "
                                     "pip install 'edgepeft[cpu]' (or 'edgepeft[gpu]')")


@cli.command()
@click.option("--model", required=True, help="Base model: a local folder or a hub id.")
@click.option("--task", required=True, type=click.Choice(["causal-lm", "seq-cls", "feature-extraction"]))
@click.option("--method", default="lora", show_default=True, help="lora, ia3, bottleneck, ... (any registered method).")
@click.option("--data", required=True, type=click.Path(), help="Training JSONL.")
@click.option("--eval", "eval_data", default=None, type=click.Path(), help="Held-out JSONL, evaluated each epoch.")
@click.option("--out", required=True, type=click.Path(), help="Adapter folder to write (HF PEFT format, plus log and curve).")
@click.option("--epochs", default=3, show_default=True, type=int)
@click.option("--lr", default=None, type=float, help="Learning rate (default: the method's own, see docs/training.md).")
@click.option("--head-lr", default=None, type=float, help="Rate of a task head the model lacks, trained whole from random weights: a new classifier (default 1e-2).")
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option("--grad-accum", default=1, show_default=True, type=int, help="Micro-batches per optimizer step.")
@click.option("--max-grad-norm", default=1.0, show_default=True, type=float)
@click.option("--warmup-ratio", default=0.1, show_default=True, type=float)
@click.option("--weight-decay", default=0.0, show_default=True, type=float)
@click.option("--scheduler", default="linear", show_default=True, type=click.Choice(["linear", "cosine", "constant_with_warmup"]))
@click.option("--max-length", type=int, help="Tokens per example (longer ones are cut).  [default: feature-extraction: as Runtime.embed cuts; else 256]")
@click.option("--mixed-precision", default="auto", show_default=True, type=click.Choice(["auto", "no", "bf16", "fp16"]))
@click.option("--save", default="best", show_default=True, type=click.Choice(["best", "last"]), help="Which epoch's adapter OUT keeps.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--logging-steps", default=10, show_default=True, type=int, help="Log the training loss every N optimizer steps (and at each epoch's end).")
@click.option("--r", "--rank", "r", default=None, type=int, help="LoRA rank (--rank under torchrun, which takes --r as its own).")
@click.option("--alpha", default=None, type=float, help="LoRA alpha.")
@click.option("--target-modules", default=None, help="Target modules (LoRA, IA3, bottleneck), comma-separated, or all-linear.")
@click.option("--option", "pairs", multiple=True, help="Any field of the method's config, KEY=VALUE (repeatable).")
@click.option("--resume", is_flag=True, help="Continue from OUT's checkpoint (same settings).")
@click.option("--overwrite", is_flag=True, help="Start over even if OUT holds an earlier run's checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar, nor the eval line of each epoch (training_log.json keeps them).")
def train(model, task, method, data, eval_data, out, epochs, lr, head_lr, batch_size, grad_accum, max_grad_norm, warmup_ratio,
          weight_decay, scheduler, max_length, mixed_precision, save, seed, logging_steps, r, alpha, target_modules, pairs,
          resume, overwrite, quiet):
    """Train an adapter on JSONL data; OUT is an HF PEFT adapter dir ready for `edgepeft export`."""
    _needs_training_side("train")
    from edgepeft.training import Trainer, TrainingArguments
    from edgepeft.training.summary import AGAIN

    args = TrainingArguments(
        model=model, task=task, method=method, data=data, eval_data=eval_data, out=out, epochs=epochs, lr=lr, head_lr=head_lr,
        batch_size=batch_size, grad_accum=grad_accum, max_grad_norm=max_grad_norm, warmup_ratio=warmup_ratio,
        weight_decay=weight_decay, scheduler=scheduler, max_length=max_length, mixed_precision=mixed_precision,
        save=save, seed=seed, logging_steps=logging_steps, options=method_options(method, r, alpha, target_modules, pairs),
        resume=resume, overwrite=overwrite, progress=not quiet)
    log = Trainer(args).train()
    end_group()  # torchrun's: it ends with the command
    if not first():  # one report from a multi-process run
        return
    b = log.get("best")
    kept = (f"the last epoch's adapter ({log['args']['epochs']}, --save last)" if log["args"]["save"] == "last"
            else f"the best epoch's adapter ({b['epoch']})" if b else "")
    if b and log.get("beat_untrained") is False:
        untrained = log["evals"][0]
        click.echo(f"done, but no epoch beat the untrained adapter (eval {b['metric']} {untrained[b['metric']]:.4f}); "
                   f"{kept} is in {out}; {log.get('hint') or 'try another --lr or more --epochs' + AGAIN}")
    elif b:
        click.echo(f"ok: best eval {b['metric']} {b['value']:.4f} at epoch {b['epoch']} (lr {log['args']['lr']:g}); "
                   f"{kept} is in {out}")
    else:
        click.echo(f"ok: adapter in {out} (lr {log['args']['lr']:g})")


@cli.command()
@click.option("--adapter", "adapters", multiple=True, required=True, type=click.Path(), help="HF PEFT / edgepeft adapter folder (repeatable).")
@click.option("--base", default=None, help="Base model folder or hub id (default: the adapter's base_model_name_or_path).")
@click.option("--out", required=True, type=click.Path(), help="Export folder: OUT/base once, OUT/adapters/<name> each.")
@click.option("--name", "names", multiple=True, help="Name for each --adapter, in order (default: the folder's name).")
@click.option("--merge", is_flag=True, help="Fold the single adapter into the weights: a plain single-task graph.")
@click.option("--atol", default=1e-4, show_default=True, help="Validation tolerance vs PyTorch (scaled by max |output| when > 1).")
@click.option("--quantize", type=click.Choice(["int8", "int4"]), default=None, help="Store the base's weights as int8 or int4 (CPU); adapters stay float32.")
@click.option("--qtol", default=0.2, show_default=True, help="With --quantize: tolerated relative RMS error vs PyTorch.")
@click.option("--ort-adapter/--no-ort-adapter", default=None, help="Also write each adapter as ONNX Runtime's .onnx_adapter (LoRA, IA3, bottleneck, heads, BERT prefix), for onnxruntime-genai and ort.LoraAdapter; default: on for float bases.")
@click.option("--overwrite", is_flag=True, help="Replace adapters of the same name already in OUT (refused otherwise).")
@click.option("--ops", type=click.Choice(["contrib", "standard"]), default="contrib", show_default=True, help="contrib: Llama/Qwen2/GPT-2 causal LMs on ONNX Runtime's fused kernels (GroupQueryAttention, Skip(Simplified)LayerNormalization, RotaryEmbedding); standard: plain ONNX ops, for runtimes without them.")
def export(adapters, base, out, names, merge, atol, quantize, qtol, ort_adapter, overwrite, ops):
    """Export adapters and their frozen base to ONNX, validated against PyTorch."""
    _needs_training_side("export")
    from edgepeft.exporters import export as run_export

    if quantize is None and click.get_current_context().get_parameter_source("qtol") is not ParameterSource.DEFAULT:
        click.echo("note: --qtol only applies with --quantize (a float32 base is checked by --atol)", err=True)
    if merge and ort_adapter:
        click.echo("note: --ort-adapter writes adapter files; --merge writes none (the adapter is in the weights)", err=True)

    report = run_export(list(adapters), out, base=base, names=list(names), merge=merge, atol=atol, verbose=True,
                        quantize=quantize, qtol=qtol, ort_adapter=ort_adapter, overwrite=overwrite, ops=ops)
    checks = [c for c in report["checks"] if "against" not in c]  # against PyTorch
    exact = [c["max_abs_diff"] for c in checks if "relative_error" not in c]
    relative = [c["relative_error"] for c in checks if "relative_error" in c]
    parts = [f"max |diff| vs PyTorch {max(exact):.2e}"] if exact else []  # none when a quantized base was reused
    if relative:
        parts.append(f"{quantize or 'quantized'} graph: max relative error {max(relative):.2e}")
    kept = [c.get("relative_error", c["max_abs_diff"]) for c in report["checks"] if "against" in c]
    if kept:
        parts.append(f"{len(kept)} adapter(s) already in OUT give OUT's base's outputs on the new base (max "
                     f"{'relative error' if relative else '|diff|'} {max(kept):.2e})")
    line = f"ok: {len(report['checks'])} checks, " + "; ".join(parts)
    click.echo(line)


@cli.command()
@click.argument("out", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def inspect(out, as_json):
    """Show the base, its slots and the adapters of an export folder."""
    from edgepeft.runtimes.describe import describe_export

    info = describe_export(out)
    if as_json:
        info["slots"] = [s.to_json() for s in info["slots"]]
        click.echo(json.dumps(info, indent=2))
        _fail_on(info["problems"])
        return
    b = info["base"]
    merged = f", merged adapter {b['merged_adapter']}" if b["merged_adapter"] else ""
    weights = f"{q} weights" + " (com.microsoft MatMulNBits)" * (q == "int4") if (q := b["quantization"]) else b["dtype"]
    source = (b.get("source") or "a source not recorded") + (f" (revision {b['revision']})" if b.get("revision") else "")
    click.echo(f"base: {b['model_type']} {b['task']} from {source}  {_size(b['bytes'])}  {weights} opset {b['opset']} "
               f"{b['ops']} ops{merged}")
    click.echo(f"  fingerprint {b['fingerprint'][:16]}")
    if pairs := b["text_pairs"]:  # what classify takes
        click.echo("  classify: texts" + (f" only (an earlier edgepeft's export; for text pairs, {b['text_pairs_fix']})"
                   if pairs == "not served" else f" and text pairs (by {pairs})"))
    if e := info["embedding"]:  # what embed does, as Runtime reads it
        click.echo(f"  embed: pooled by {e['mode']}, texts cut to {e['limit'] or 'no limit'}"
                   + ", lower-cased" * e["lower"] + ", prompts left out of the pooling" * (not e["include_prompt"])
                   + (f", the first {e['truncate_dim']} values" if e["truncate_dim"] else "")
                   + "; prompt names: " + (", ".join(e["prompts"]) if e["prompts"] is not None else
                                           "not exported (an earlier edgepeft's export)"))
    by_method: dict = {}
    for s in info["slots"]:
        by_method.setdefault(s.method, []).append(s)
    click.echo(f"slots: {len(info['slots'])}")
    for method, slots in by_method.items():
        modules = sorted({s.module for s in slots if s.role != "rows"})  # a row-weight input is on no module
        shown = ", ".join(modules[:4]) + (f", ... ({len(modules)} modules)" if len(modules) > 4 else "")
        rows = " and its per-row weights (mixed batches)" if any(s.role == "rows" for s in slots) else ""
        click.echo(f"  {method}: {len(slots)} slots on {shown}{rows}")
    click.echo(f"adapters: {len(info['adapters'])}")
    for a in info["adapters"]:
        status = "" if a["matches_base"] else "  (made for another base: re-export)"
        rank = f" r={a['rank']}" if a["rank"] is not None else ""
        rank += f" alpha={a['alpha']}" if a["alpha"] is not None else ""
        rank += "".join(f" {k}={json.dumps(v) if len(json.dumps(v)) < 60 else f'{{{len(v)} patterns: --json}}'}"
                        for k, v in a["patterns"].items())  # the modules r does not hold
        click.echo(f"  {a['name']}: {'+'.join(a['methods'])}{rank}  {a['slots']} slots  {_size(a['bytes'])}{status}")
        if a.get("labels"):
            click.echo(f"    labels: {', '.join(a['labels'])}")
    _fail_on(info["problems"])


def _fail_on(problems: list) -> None:
    """inspect's exit: 1 with one error line naming every missing or damaged file and adapter for another base."""
    if problems:
        from edgepeft.errors import CorruptArtifactError

        raise CorruptArtifactError("; ".join(problems))


@cli.command()
@click.argument("out", type=click.Path())
@click.option("--adapter", "adapters", multiple=True, help="Adapters to measure (repeatable; default: all in OUT).")
@click.option("--batch", default=1, show_default=True, type=int)
@click.option("--seq", default=32, show_default=True, type=int, help="Tokens per call.")
@click.option("--rounds", default=10, show_default=True, type=int, help="Interleaved rounds.")
@click.option("--calls", default=10, show_default=True, type=int, help="Timed calls per peer per round.")
@click.option("--new-tokens", default=0, show_default=True, type=int, help="Also measure generation tokens/s (causal-LM exports).")
@click.option("--shared-threads", is_flag=True, help="Measure with one process-wide spinning thread pool (use_shared_thread_pool).")
@click.option("--json", "as_json", type=click.Path(), default=None, help="Also write the raw numbers to this JSON file ('-': stdout).")
@click.option("--plot", type=click.Path(), default=None, help="Also draw the latencies to this PNG file.")
def bench(out, adapters, batch, seq, rounds, calls, new_tokens, shared_threads, as_json, plot):
    """Latency per adapter, switch cost, staging time and memory of an export, on this machine."""
    from edgepeft.errors import ConfigError
    from edgepeft.files import check_output_files, json_text, write_json_atomic
    from edgepeft.runtimes import Runtime, use_shared_thread_pool
    from edgepeft.runtimes.bench import measure, table
    from edgepeft.runtimes.manifest import enclosing_export

    to_stdout = as_json == "-"  # as `edgepeft run OUT -` reads stdin: a file named '-' was written
    as_json, plot = check_output_files({"--json": None if to_stdout else as_json, "--plot": plot})  # before measuring
    for path, flag in ((as_json, "--json"), (plot, "--plot")):
        if path and (export := enclosing_export(path)):  # the measured export's own files, say
            raise ConfigError(f"{path}: lies inside {os.path.join(export, os.path.relpath(path, export).split(os.sep)[0])}"
                              f" of the export {export}, whose files exports own; give {flag} a path outside that folder")
    if plot and not plot.lower().endswith(".png"):
        raise ConfigError(f"{plot}: --plot draws a PNG image; give it a file name ending in .png")
    if plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            from edgepeft.errors import MissingDependencyError

            raise MissingDependencyError("--plot draws with matplotlib, which this install lacks; pip install matplotlib")
    if shared_threads:
        use_shared_thread_pool()
    named = [a for a in adapters if a.lower() != "none"]  # the base, as `run --adapter none`: measured anyway
    result = measure(Runtime(out), named if adapters else None, batch=batch, seq=seq, rounds=rounds, calls=calls,
                     new_tokens=new_tokens)  # no --adapter: every adapter; --adapter none: the base alone
    s = result["setup"]
    rss = f", resident memory {_size(result['rss_bytes'])}" if result["rss_bytes"] else ""
    click.echo(f"{out}: batch {s['batch']} x {s['seq']} tokens, {s['rounds']} rounds x {s['calls']} calls per peer, "
               f"{s['providers'][0]}, {s['slots']} slots{rss}\n{table(result)}", err=to_stdout)
    if to_stdout:
        click.echo(json_text(result), nl=False)
    elif as_json:
        write_json_atomic(as_json, result)
    if plot:
        from edgepeft.plots import bench_chart

        bench_chart(result, plot)


SAMPLING_ONLY = ("--temperature", "--top-k", "--top-p", "--seed")  # what greedy decoding ignores
NOT_GENERATION = ("out", "prompt", "adapter", "prompt_name", "embed_prompt", "text_pair", "truncation")  # run's others


@cli.command()
@click.argument("out", type=click.Path())
@click.argument("prompt")
@click.option("--adapter", default=["none"], multiple=True, callback=one_value,
              help="Adapter name in OUT, or 'none' for the base model.  [default: none]")
@click.option("--max-new-tokens", type=int, help="[default: the model's generation_config.json (max_new_tokens, "
              "else max_length), else 32, as Runtime.generate]")
@click.option("--do-sample/--greedy", default=None, help="Sample, or decode greedily.  [default: as the model's "
              "generation_config.json says, else greedy]")
@click.option("--temperature", type=float, help="[default: the model's generation_config.json, else 1.0]")
@click.option("--top-k", type=int, help="[default: the model's generation_config.json, else 50]")
@click.option("--top-p", type=float, help="[default: the model's generation_config.json, else 1.0]")
@click.option("--repetition-penalty", type=float, help="[default: the model's generation_config.json, else 1.0]")
@click.option("--seed", default=None, type=int, help="Seed for reproducible sampling.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--prompt-name", help="Embeddings: the model's prompt of that name before the text, as encode(prompt_name=).")
@click.option("--embed-prompt", help="Embeddings: this prompt before the text, as encode(prompt=).")
@click.option("--text-pair", help="Classifiers: the pair's second text (a cross-encoder's passage, NLI's hypothesis), "
              "as the pipeline's {'text': PROMPT, 'text_pair': ...}.")
@click.option("--truncation", is_flag=True, help="Classifiers: cut a long text or pair to the model's length, as the "
              "pipeline's truncation=True.")
def run(out, prompt, adapter, max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed, chat,
        prompt_name, embed_prompt, text_pair, truncation):
    """Generate (streamed), classify or embed PROMPT with an adapter of OUT (PROMPT '-': read from standard input)."""
    from edgepeft.errors import ConfigError
    from edgepeft.runtimes import Runtime
    if prompt == "-" and sys.stdin is None:  # closed (<&-, a daemon's): click gives None, whose read was a traceback
        raise ConfigError("PROMPT '-' reads standard input, which is closed; pass the prompt as an argument")
    if prompt == "-":  # a long prompt, or one a pipe makes; its last newline is the pipe's, as $(...) drops it
        prompt = stdin_text(sys.stdin.buffer.read()).removesuffix("\n").removesuffix("\r")
    from edgepeft.runtimes.access import saved_under_names

    if not os.path.isfile(os.path.join(out, "base", "edgepeft.json")) and (  # not an export (which may hold anything)
            os.path.isfile(os.path.join(out, "adapter_config.json")) or saved_under_names(out)):  # the run that
        from edgepeft.runtimes.commands import quote  # serves it, in the command's terms
        from edgepeft.runtimes.manifest import not_an_export
        raise not_an_export(out, lambda new, name: f"run `edgepeft run {quote(new)} --adapter {quote(name)} PROMPT`")
    rt = Runtime(out)
    name = None if adapter.lower() == "none" else adapter
    labels = rt.labels(name)  # an unknown name raises UnknownAdapterError naming the loaded adapters
    ctx = click.get_current_context()
    given = ["--greedy" if p == "do_sample" and ctx.params[p] is False else f"--{p.replace('_', '-')}"  # as typed
             for p in ctx.params if p not in NOT_GENERATION and ctx.get_parameter_source(p) is not ParameterSource.DEFAULT]
    prompts = [f for f, v in (("--prompt-name", prompt_name), ("--embed-prompt", embed_prompt)) if v is not None]
    if prompts and rt.task != "feature-extraction":
        raise ConfigError(f"{out}: a {rt.task} export does not embed; drop {', '.join(prompts)} (embeddings' prompts)")
    if (text_pair is not None or truncation) and rt.task != "seq-cls":
        flags = " and ".join(f for f, v in (("--text-pair", text_pair is not None), ("--truncation", truncation)) if v)
        raise ConfigError(f"{out}: a {rt.task} export does not classify; drop {flags} (a classifier's)")
    if given and not rt.cache:
        raise ConfigError(f"{out}: a {rt.task} export classifies or embeds, it does not generate; drop {', '.join(given)}")
    if rt.cache:
        idle = [f for f in given if f in SAMPLING_ONLY]
        generation = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                          top_p=top_p, repetition_penalty=repetition_penalty, seed=seed)
        if idle and not rt.generation_config(**generation).do_sample:  # checked before the note; transformers warns alike
            verb = "only applies" if len(idle) == 1 else "only apply"
            click.echo(f"note: {', '.join(idle)} {verb} with --do-sample; decoding greedily", err=True)
        for piece in rt.stream_text(prompt, adapter=name, chat=chat, **generation):
            click.echo(piece, nl=False, color=True)  # as generated: click strips escapes for a pipe
        click.echo()
        return
    if name is None and rt.task == "seq-cls" and not rt.manifest.get("merged_adapter") and \
            rt.manifest.get("head_initialised", True):  # exports before it was recorded: as they said
        click.echo("note: no adapter: the base model's classifier head is untrained (random); pick a classifier with "
                   f"--adapter ({', '.join(rt.adapter_names) or 'none in this export'})", err=True)
    if rt.task == "seq-cls":
        scores = rt.classify(prompt if text_pair is None else {"text": prompt, "text_pair": text_pair}, adapter=name,
                             truncation=truncation)
        scores = scores["scores"]
        for label, p in sorted(scores.items(), key=lambda kv: -kv[1]):
            click.echo(f"{label}\t{p:.4f}")
    else:
        from edgepeft.runtimes.sentence import has_sentence_transformers_files

        pooled = rt.embed(prompt, adapter=name, prompt_name=prompt_name, prompt=embed_prompt)
        settings = rt.tokenizer.sentence_transformers[0]
        how = f"pooled by {settings.mode}" + ("" if has_sentence_transformers_files(rt.base_dir)
                                              else " (no sentence-transformers files)")
        cut = (", normalized" if not settings.truncate_dim else  # the Normalize module's order, else encode's
               ", the first values of a normalized vector (truncate_dim)" if settings.normalized else
               ", its first values (truncate_dim), normalized")
        click.echo(f"embedding ({pooled.shape[0]} values, {how}{cut}): " + " ".join(f"{v:.4f}" for v in pooled[:8]) + " ...")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    with notes_once(), terminated_as_interrupts():
        try:
            cli.main(args=argv, standalone_mode=False,  # python -c "import PLUGIN, edgepeft.cli; ...": not "Try '-c"
                     prog_name="edgepeft" if sys.argv[:1] in (["-c"], [""], []) else None)
        except TrainingInterrupted as e:  # as it is: its resume command quotes paths whose spaces count
            say(str(e))
            leave(stopped_status())
        except EdgePeftError as e:  # one line; spaces inside a path stay
            say("error: " + as_flags(re.sub(r"\s*\n\s*", " ", str(e)), argv))
            leave(1)
        except OSError as e:  # the disk said no: a path that is a file, no permission, disk full
            where = f"{e.filename}: " if e.filename else ""
            say(f"error: {where}{e.strerror or e}; check the path, its permissions and free space")
            leave(1)
        except click.exceptions.Abort as e:  # click's for a KeyboardInterrupt: an export's says what it wrote
            said = e.__cause__ if isinstance(e.__cause__, KeyboardInterrupt) else None
            say(str(said) if said and str(said) else "aborted")
            leave(stopped_status())
        except click.exceptions.ClickException as e:
            e.show()
            leave(e.exit_code)
        except KeyboardInterrupt:
            leave(stopped_status())
        except RuntimeError as e:  # a collective failed where another process stopped: its error names why
            if not peer_stopped(e):
                raise
            say(f"error: process {os.environ['RANK']} stopped with the others ({first_line(e)})")
            leave(1)


if __name__ == "__main__":
    main()
