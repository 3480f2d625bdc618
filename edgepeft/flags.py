"""The command line's messages in its own terms: the runtime's and the trainer's name Python arguments
(``max_new_tokens=0``), where the command's users typed flags (``--max-new-tokens 0``)."""
from __future__ import annotations

import os
import re

import click


def as_flags(message: str, argv) -> str:
    """A runtime message in the command's own terms: ``adapter=None`` -> ``--adapter none``, ``max_new_tokens`` -> ``--max-new-tokens``.

    The runtime's and the trainer's messages name their Python arguments; at the command line its users typed flags.
    Names inside paths and file names are left alone."""
    from edgepeft.cli import cli

    command = cli.commands.get(next((a for a in argv if not a.startswith("-")), ""), None)
    flags = {p.name: p.opts[0] for p in (command.params if command else []) if isinstance(p, click.Option)}
    if not flags:
        return message
    optioned = [b for a, b in zip(argv, argv[1:]) if a == "--option"] + [a[9:] for a in argv if a.startswith("--option=")]
    for name in {o.partition("=")[0] for o in optioned}:  # as typed: --option r=4, --option=r=4
        if flags.get(name) not in argv:
            flags.pop(name, None)
    values = {"None": "none", "True": "", "False": ""}
    paths = {}  # quoted names and text, the command's paths ("sweep lr=0.01/train.jsonl"): no flag names inside them
    quoted = dict.fromkeys(re.findall(r"(?<![=\w])('[^'\n]*'|\"[^\"\n]*\")", message))  # not a value's: name='x'
    # each shielded text stands in as one character of Unicode's private use area: no word, no digit a later
    # pattern (a prompt "0") could match inside it
    for a in [*quoted, *sorted({a for a in argv if " " in a or "/" in a or os.sep in a}, key=len, reverse=True)]:
        if a in message:
            paths[chr(0xE000 + len(paths))] = a
            message = message.replace(a, chr(0xE000 + len(paths) - 1))
    for a in sorted(_named(command, argv), key=len, reverse=True):  # "lr=0.01.jsonl", --out seed=1: as typed
        token = chr(0xE000 + len(paths))
        message, n = re.subn(r"(?<![\w.\-/=])" + re.escape(a) + r"(?![\w\-=]|\.\w)", token, message)
        if n:
            paths[token] = a

    def flag(m):
        name, value = m.group(1), m.group(2).strip("'")
        if name not in flags:
            return m.group(0)
        if value in ("True", "False"):
            negative = next((p.secondary_opts[0] for p in command.params  # --do-sample/--greedy: --greedy
                             if p.name == name and getattr(p, "secondary_opts", None)), None)
            return flags[name] if value == "True" else negative or f"no {flags[name]}"
        return f"{flags[name]} {values.get(value, value)}"

    alone = r"(?<![\w/.\-])", r"(?![\w/\-]|\.\w)"  # a word of its own, not part of a path or file name
    message = re.sub(alone[0] + r"(\w+)=('[^' ]*'|[\w.+\-]*\w)" + alone[1], flag, message)  # None, 0.005, -3, 'linear'
    message = re.sub(alone[0] + r"([a-z]+)(?= must )", lambda m: flags.get(m.group(1), m.group(1)), message)  # "seed must"
    message = re.sub(alone[0] + r"([a-z]+_[a-z_]+)" + alone[1], lambda m: flags.get(m.group(1), m.group(1)), message)
    for token, path in paths.items():
        message = message.replace(token, path)
    return message


def _named(command, argv) -> set:
    """What the command line gave as paths, model names and texts (its arguments, ``--data``, ``--model``, ...):
    flag names inside them are theirs."""
    try:
        ctx = command.make_context(command.name, argv[argv.index(command.name) + 1:], resilient_parsing=True)
    except (click.ClickException, ValueError):
        return set()
    named = set()
    for p in command.params:
        if isinstance(p, click.Argument) or isinstance(p.type, click.Path) or p.name in ("model", "base"):
            value = ctx.params.get(p.name)
            named.update(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str) and v)
    return named


def one_value(ctx, param, values):
    """A flag given more than once where one value is taken (click keeps the last: `run --adapter A --adapter B` ran
    B alone, saying nothing), refused; else its value, or its default."""
    from edgepeft.errors import ConfigError

    if len(values) > 1:
        flag = param.opts[0]
        raise ConfigError(f"{flag} given {len(values)} times ({', '.join(values)}); give one {flag} (a batch of rows "
                          "each with its adapter: Runtime's adapter=[...], from Python)")
    return values[0]
