"""The command line in its own terms: its messages (the runtime's and the trainer's name Python arguments,
``max_new_tokens=0``, where the command's users typed flags, ``--max-new-tokens 0``), and train's flags as a method's
config fields."""
from __future__ import annotations

import json
import os
import re
import shlex

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


def method_options(method: str, r, alpha, target_modules, pairs) -> dict:
    """The method config's fields from the shorthand flags and --option KEY=VALUE (VALUE parsed as JSON)."""
    from edgepeft.errors import ConfigError, first_line

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {pair!r}: write it as KEY=VALUE, e.g. --option lora_dropout=0.1")
        try:
            options[key] = json.loads(value)
        except (ValueError, RecursionError) as e:  # a number of 5,000 digits, arrays nested thousands deep
            text = value.strip()  # JSON meant: a string ("...), or an object or list whole ({...}, [...])
            if text[:1] == '"' or (text[:1], text[-1:]) in (("{", "}"), ("[", "]")):  # a variants hunt: kept its quotes
                quoted = len(text) > 1 and text[-1] == '"'  # the regex '".*layers\.1"' matched nothing; [qv]_proj is text
                raise ConfigError(f"--option {shlex.quote(pair)}: the value is not valid JSON ({first_line(e)}); in JSON a "
                                  "backslash is written twice (\\\\. for a regular expression's \\.)" + (
                                      f": --option {shlex.quote(key + '=' + json.dumps(text[1:-1]))}, or the text "
                                      "without its quotes" if quoted else ""))
            options[key] = value  # a bare string
    from edgepeft.training.arguments import find_method

    modules = target_modules if target_modules is None or target_modules.lower() == "all-linear" \
        else [m.strip() for m in target_modules.split(",")]  # "q_proj, v_proj": two names
    if isinstance(modules, list) and not all(modules):
        raise ConfigError(f"--target-modules {target_modules!r} has an empty name; list names with commas, e.g. "
                          "--target-modules q_proj,v_proj")
    given = {"--r": r, "--alpha": alpha, "--target-modules": modules}
    config_cls = find_method(method).config_cls
    for flag, value in given.items():
        if value is None:
            continue
        field = config_cls.cli_shorthands.get(flag)  # what the method says the flag sets
        if field is None:
            raise ConfigError(f"{flag} is not an option of {method}; pass its fields with --option KEY=VALUE")
        if field in options:
            raise ConfigError(f"{flag} and --option {field}=... both set {field}; give one of them")
        options[field] = value
    return options
