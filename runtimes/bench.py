"""``edgepeft bench OUT``: what switching tasks costs on this machine, measured on the runtime alone.

Peers, all on one Runtime and interleaved round by round in a new seeded random order each
round (load drifts, ratios hold):
  none           every call with no adapter (the base model)
  stay:NAME      every call with adapter NAME
  switching      every call with the next adapter in turn (NAME, NAME2, ..., none, NAME, ...),
                 ``calls`` times each per round; its times are split per adapter, so
                 switch cost = switching[NAME] - stay[NAME], in ms, round by round: the median
                 of the rounds' differences and their interquartile range (the run's noise)
Plus staging (``load_adapter`` of each adapter's files, median of 3), the bytes each
adapter keeps staged, the process's resident memory, and for causal-LM exports
generation tokens/s per adapter (``new_tokens`` > 0: the batch's new tokens, greedy, the peers interleaved
the same way). Nothing here imports torch.
"""
from __future__ import annotations

import os
import random
import statistics
import time

import numpy as np

from edgepeft.runtimes import sessions
from edgepeft.runtimes.access import STOPPED, moved_aside
from edgepeft.runtimes.commands import ADAPTERS_DIR
from edgepeft.runtimes.errors import (ConfigError, InvalidInputError, OutOfMemoryError,
                                      UnknownAdapterError, first_line, warn)
from edgepeft.runtimes.values import is_whole, size_text


def rss_bytes() -> int | None:
    """Resident memory of this process (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _median_ms(times: list) -> float:
    return statistics.median(times) * 1e3


def interleaved(peers: dict, rounds: int, calls: int, warmup: int = 3, repeat: dict | None = None, seed: int = 0,
                settle: int = 0) -> dict:
    """Time each peer ``calls`` times a round (x ``repeat[peer]``), ``rounds`` rounds, after ``warmup`` calls; the
    first ``settle`` calls of each peer's turn untimed (they follow another peer's: a switch, timed as the stay).

    Peers go in a new seeded random order each round, so drift (thermal, other load) and
    the peer that ran just before hit all alike. Returns {peer: [(seconds, what the call
    returned), ...]}.
    """
    for fn in peers.values():  # first runs allocate
        for _ in range(warmup):
            fn()
    times = {k: [] for k in peers}
    shuffle = random.Random(seed)
    for _ in range(rounds):
        for k in shuffle.sample(list(peers), len(peers)):
            for _ in range(settle):
                peers[k]()
            for _ in range(calls * (repeat or {}).get(k, 1)):
                t = time.perf_counter()
                ran = peers[k]()
                times[k].append((time.perf_counter() - t, ran))
    return times


def alternating(rt, ids, mask, names: list):
    """A call that runs the next adapter of ``names`` (None: the base) each time and returns which one ran."""
    turn = {"i": 0}

    def call():
        adapter = names[turn["i"] % len(names)]
        turn["i"] += 1
        rt.forward(ids, mask, adapter=adapter)
        return adapter

    return call


def measure(rt, adapters=None, batch: int = 1, seq: int = 32, rounds: int = 10, calls: int = 10,
            new_tokens: int = 0, seed: int = 0) -> dict:
    """Latency per adapter, switch cost, staging time, memory (see the module docstring)."""
    adapters = [adapters] if isinstance(adapters, str) else adapters  # one name, not its letters
    if not (adapters is None or isinstance(adapters, (list, tuple)) and all(isinstance(a, str) for a in adapters)):
        raise ConfigError(f"adapters must be an adapter's name or a list of names, got {adapters!r}")
    if not (is_whole(seed) and seed >= 0):
        raise ConfigError(f"seed must be a whole number >= 0, got {seed!r}")
    names = list(dict.fromkeys(rt.adapter_names if adapters is None else adapters))  # a name given twice: once
    aside = moved_aside(os.path.join(rt.path, ADAPTERS_DIR))  # a stopped export's: named, not "holds no adapter"
    for name, folder in aside.items() if adapters is None else ():
        warn(f"{folder}: adapter {name!r} not measured: moved aside {STOPPED.format(rt.path)}")
    for name in names:  # unknown names fail now, naming the loaded ones
        if name in aside:
            raise UnknownAdapterError(f"--adapter {name}: moved aside to {aside[name]} {STOPPED.format(rt.path)}")
        if name not in rt.adapter_names and not rt.store.serves_base(name):
            held = [*rt.adapter_names, *[m for m in [rt.manifest.get("merged_adapter")] if m]]
            raise UnknownAdapterError(f"--adapter {name}: {rt.path} holds no adapter {name!r} (it holds "
                                      f"{', '.join(map(repr, held)) or 'none'}); give one of those, or none for the base "
                                      "model alone")
    names = [n for n in names if not rt.store.serves_base(n)]  # a --merge export's name: the base, measured anyway
    for key, value in (("batch", batch), ("seq", seq), ("rounds", rounds), ("calls", calls)):
        if not (is_whole(value) and value >= 1):
            raise ConfigError(f"--{key} must be a whole number >= 1, got {value!r}")
    if not (is_whole(new_tokens) and new_tokens >= 0):
        raise ConfigError(f"--new-tokens must be a whole number >= 0 (0: no generation), got {new_tokens!r}")
    batch, seq, rounds, calls, new_tokens = (int(v) for v in (batch, seq, rounds, calls, new_tokens))
    if new_tokens and not rt.cache:
        raise ConfigError(f"{rt.base_dir}: generation needs a causal-LM export; drop --new-tokens")
    generated = f" + --new-tokens {new_tokens} - 1 (the last is not fed back)" if new_tokens else ""
    for adapter in [None, *names]:  # before minutes of measuring (and before ids of 10**30 positions)
        rt._check_call(adapter, batch, seq, max(new_tokens - 1, 0), generated,
                       "shorten the prompt " + ("(--seq) or lower --new-tokens" if new_tokens else "(here: lower --seq)"))
    rng = np.random.default_rng(seed)
    low = min(1000, rt.vocab_size // 2)  # skip the special and padding ids at the start of most vocabularies
    try:
        ids = rng.integers(low, rt.vocab_size, size=(batch, seq), dtype=np.int64)
    except (MemoryError, ValueError) as e:  # numpy's "Unable to allocate", "Maximum allowed dimension exceeded"
        raise ConfigError(f"--batch {batch} x --seq {seq}: the token ids alone do not fit in memory here "
                          f"({first_line(e)}); lower --batch") from None
    mask = np.ones_like(ids)
    cycle = [*names, None]
    def run(adapter=None):  # the outputs dropped: each timed call's kept grew memory by rounds x calls x logits
        rt.forward(ids, mask, adapter=adapter)
    peers = {"none": run} | {f"stay:{n}": (lambda n=n: run(n)) for n in names}
    if names:
        peers["switching"] = alternating(rt, ids, mask, cycle)
    try:
        timed = interleaved(peers, rounds, calls, repeat={"switching": len(cycle)}, settle=1)  # switching: `calls` each
    except InvalidInputError as e:  # too many positions, or too little memory: in this command's terms
        raise type(e)(f"{e} (here: lower {'--batch or ' * isinstance(e, OutOfMemoryError)}--seq)") from None
    times = {k: [dt for dt, _ in v] for k, v in timed.items()}
    split = {n: [dt for dt, ran in timed.get("switching", []) if ran == n] for n in cycle}
    per_round = {n: _round_differences(split[n], times[f"stay:{n}"], rounds) for n in names}
    result = {
        "setup": {"base": rt.base_dir, "batch": batch, "seq": seq, "rounds": rounds, "calls": calls,
                  "providers": rt.session.get_providers(), "quantization": rt.manifest.get("quantization"),
                  "slots": len(rt.slots), "cpus": os.cpu_count(), "new_tokens": new_tokens,
                  "shared_threads": sessions.shared_pool()},
        "none_ms": _median_ms(times["none"]),
        "merged_adapter": rt.manifest.get("merged_adapter"),
        "rss_bytes": rss_bytes(),
        "adapters": {},
    }
    for n in names:
        info = rt.adapter_info(n)
        load = []
        spare = next(s for i in range(len(rt.adapter_names) + 1)  # a name OUT does not hold
                     if (s := f"{n}__bench{i or ''}") not in rt.adapter_names)
        for _ in range(3):  # staging cost: read, check and place the adapter's tensors (under another name)
            t = time.perf_counter()
            tmp = rt.load_adapter(rt.store.get(n).source, name=spare)  # its folder or zip bytes
            load.append(time.perf_counter() - t)
            rt.unload_adapter(tmp)
        stay = _median_ms(times[f"stay:{n}"])
        result["adapters"][n] = {
            "methods": info.get("methods"),
            "stay_ms": stay,
            "switching_ms": _median_ms(split[n]),
            "switching_over_stay": _median_ms(split[n]) / stay,  # the latency columns' ratio; switch_ms: the cost
            "switch_ms": float(np.median(per_round[n])),
            "switch_ms_iqr": [float(q) for q in np.percentile(per_round[n], [25, 75])],
            "over_base": stay / result["none_ms"],
            "load_ms": _median_ms(load),
            # what adapter_budget_bytes counts: the tensors as bound (fused q/k/v block-diagonal), not the file's
            "staged_bytes": rt.store.staged_bytes(n),
        }
    # no switching rounds without an adapter: null, not left out (cli.md lists the key; a script read a KeyError)
    result["switching_none_ms"] = _median_ms(split[None]) if names else None
    if new_tokens:  # the batch's new tokens per second, peers in turns as above; no eos or stop string ends early
        generating = {adapter or "none": (lambda a=adapter: rt.generate(
            ids, mask, adapter=a, max_new_tokens=new_tokens, eos_token_id=[], stop=[], do_sample=False))
            for adapter in [None, *names]}
        timed = interleaved(generating, max(1, rounds // 3), 1, warmup=1, seed=seed + 1)
        result["tokens_per_s"] = {k: statistics.median((out.shape[1] - seq) * batch / dt for dt, out in v)
                                  for k, v in timed.items()}
    return result


def _round_differences(switching: list, stay: list, rounds: int) -> np.ndarray:
    """Per round, the median switching time minus the median staying time, in ms (each round holds both peers' calls)."""
    a, b = np.array_split(np.array(switching), rounds), np.array_split(np.array(stay), rounds)
    return np.array([np.median(x) - np.median(y) for x, y in zip(a, b)]) * 1e3


def switch_cost_text(a: dict) -> str:
    """``+0.012 ms [-0.020, +0.041]``: the switch cost with the run's noise, and what it means."""
    lo, hi = a["switch_ms_iqr"]
    verdict = "within noise" if lo <= 0 <= hi else ("slower" if lo > 0 else "faster (noise)")
    return f"{a['switch_ms']:+.3f} [{lo:+.3f}, {hi:+.3f}] {verdict}"


def table(result: dict) -> str:
    """The result as a markdown table."""
    base = f"{merged} (merged into the base)" if (merged := result.get("merged_adapter")) else "none (base model)"
    rows = [(base, f"{result['none_ms']:.3f}", "", "1.000", "", "")]
    for n, a in result["adapters"].items():
        rows.append((f"{n} ({'+'.join(a['methods'] or [])})", f"{a['stay_ms']:.3f}", f"{a['switching_ms']:.3f}",
                     f"{a['over_base']:.3f}", switch_cost_text(a), f"{a['load_ms']:.1f} / {size_text(a['staged_bytes'])}"))
    head = ["adapter", "latency (ms)", "when switching every call (ms)", "/ base",
            "switch cost: ms added per call [IQR over rounds]", "load (ms) / staged"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    if result.get("tokens_per_s"):
        lines.append("")
        lines.append("| adapter | generation tokens/s |")
        lines.append("| --- | --- |")
        lines += [f"| {result.get('merged_adapter') or n if n == 'none' else n} | {v:.1f} |"
                  for n, v in result["tokens_per_s"].items()]
    return "\n".join(lines)
