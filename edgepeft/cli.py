"""The ``edgepeft`` command line. User errors print one line and exit 1, no traceback."""
from __future__ import annotations

import json
import sys

import click

from edgepeft.errors import EdgePeftError


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@click.group()
@click.version_option(package_name="edgepeft")
def cli():
    """Export PEFT adapters with their base to ONNX once, run and switch them per call."""


@cli.command()
@click.option("--adapter", "adapters", multiple=True, required=True, type=click.Path(), help="HF PEFT / edgepeft adapter folder (repeatable).")
@click.option("--base", default=None, help="Base model folder or hub id (default: the adapter's base_model_name_or_path).")
@click.option("--out", required=True, type=click.Path(), help="Export folder: OUT/base once, OUT/adapters/<name> each.")
@click.option("--name", "names", multiple=True, help="Name for each --adapter, in order (default: the folder's name).")
@click.option("--merge", is_flag=True, help="Fold the single adapter into the weights: a plain single-task graph.")
@click.option("--atol", default=1e-4, show_default=True, help="Validation tolerance vs PyTorch (scaled by max |output| when > 1).")
def export(adapters, base, out, names, merge, atol):
    """Export adapters and their frozen base to ONNX, validated against PyTorch."""
    from edgepeft.exporters import export as run_export

    report = run_export(list(adapters), out, base=base, names=list(names), merge=merge, atol=atol, verbose=True)
    worst = max(c["max_abs_diff"] for c in report["checks"])
    click.echo(f"ok: {len(report['checks'])} checks, max |diff| vs PyTorch {worst:.2e}")


@cli.command()
@click.argument("out", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def inspect(out, as_json):
    """Show the base, its slots and the adapters of an export folder."""
    from edgepeft.runtimes.manifest import describe_export

    info = describe_export(out)
    if as_json:
        info["slots"] = [s.to_json() for s in info["slots"]]
        click.echo(json.dumps(info, indent=2))
        return
    b = info["base"]
    merged = f", merged adapter {b['merged_adapter']}" if b["merged_adapter"] else ""
    click.echo(f"base: {b['model_type']} {b['task']} from {b['source']}  {_size(b['bytes'])}  {b['dtype']} opset {b['opset']}{merged}")
    click.echo(f"  fingerprint {b['fingerprint'][:16]}")
    by_method: dict = {}
    for s in info["slots"]:
        by_method.setdefault(s.method, []).append(s)
    click.echo(f"slots: {len(info['slots'])}")
    for method, slots in by_method.items():
        modules = sorted({s.module for s in slots})
        shown = ", ".join(modules[:4]) + (f", ... ({len(modules)} modules)" if len(modules) > 4 else "")
        click.echo(f"  {method}: {len(slots)} slots on {shown}")
    click.echo(f"adapters: {len(info['adapters'])}")
    for a in info["adapters"]:
        status = "" if a["matches_base"] else "  (made for another base: re-export)"
        rank = f" r={a['rank']}" if a["rank"] is not None else ""
        rank += f" alpha={a['alpha']}" if a["alpha"] is not None else ""
        click.echo(f"  {a['name']}: {'+'.join(a['methods'])}{rank}  {a['slots']} slots  {_size(a['bytes'])}{status}")


@cli.command()
@click.argument("out", type=click.Path())
@click.argument("prompt")
@click.option("--adapter", default="none", show_default=True, help="Adapter name in OUT, or 'none' for the base model.")
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--do-sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=50, show_default=True, type=int)
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--repetition-penalty", default=1.0, show_default=True, type=float)
@click.option("--seed", default=None, type=int, help="Seed for reproducible sampling.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
def run(out, prompt, adapter, max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed, chat):
    """Generate (streamed) or classify PROMPT with an adapter of OUT."""
    import numpy as np

    from edgepeft.runtimes import Runtime

    rt = Runtime(out)
    name = None if adapter.lower() == "none" else adapter
    if name is not None and name not in rt.adapter_names and name != rt.manifest.get("merged_adapter"):
        rt.forward([[0]], adapter=name)  # raises UnknownAdapterError naming the loaded adapters
    if rt.cache:
        for piece in rt.stream_text(prompt, adapter=name, chat=chat, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                    temperature=temperature, top_k=top_k, top_p=top_p,
                                    repetition_penalty=repetition_penalty, seed=seed):
            click.echo(piece, nl=False)
        click.echo()
        return
    ids, mask = rt.tokenizer.encode(prompt, pad_id=rt._pad_id())
    result = rt.forward(ids, mask, adapter=name)
    if rt.task == "seq-cls":
        logits = result["logits"][0]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        labels = rt.labels(name) or [str(i) for i in range(len(probs))]
        for i in np.argsort(-probs):
            click.echo(f"{labels[i]}\t{probs[i]:.4f}")
    else:
        hidden = result["last_hidden_state"][0]  # (T, hidden)
        pooled = hidden.mean(0)
        click.echo(f"last_hidden_state {list(result['last_hidden_state'].shape)}; mean-pooled: "
                   + " ".join(f"{v:.4f}" for v in pooled[:8]) + " ...")


def main(argv=None):
    try:
        cli.main(args=argv, standalone_mode=False)
    except EdgePeftError as e:
        click.echo("error: " + " ".join(str(e).split()), err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
