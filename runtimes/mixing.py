"""Rows of one batch with different adapters, or weighted sums of adapters, in as few graph runs as the slots allow.

    adapter=["a", None, {"a": 0.7, "b": 0.3}, "p"]   one entry per row (a name, None, or {name: weight})
        -> lanes: rows that share a graph run, each with the Plan it binds
           stackable rows (LoRA, IA3, heads): one run, every adapter's tensors side by side
               LoRA   A_stack = [A_a | A_b]  (in, R), B_stack (R, out); row weights (rows, 1, R) pick each
                      row's rank columns: 0, 1, or the adapter's weight in a weighted row
               IA3    stack = [ones; l_a; l_b] (N, size); row weights (rows, N): one-hot on the row's vector
               heads  every row's head side by side; each row reads its own output columns
           other rows (prompt, prefix, bottleneck): a run per adapter

Each adapter's width in a LoRA stack is its largest rank over the slots (zero-padded where
smaller), so one row-weight input serves every LoRA slot. Stacks are built from the staged
tensors once per set of adapters and cached (dropped when one of them is unloaded, evicted or
restaged, and first where an adapter budget is short: it counts them); per call only the small
row-weight arrays are made. A weighted row computes
``sum_i w_i * B_i A_i x``: HF PEFT with those adapters active and each one's scaling times its weight.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import numpy as np

from .adapters import NO_ADAPTER, Plan
from .errors import ConfigError, InvalidInputError
from .sessions import ort
from .values import as_float, is_number, is_real

CACHED_STACKS = 16  # sets of adapters whose stacked tensors stay built


def run_rows_apart(rt, plan: Plan, ids, mask, positions, past, presents: bool, keep_last: bool) -> list:
    """``rt.run`` one row at a time, the outputs joined along the batch (OrtValues, as ``rt.run`` returns).

    For graphs on GroupQueryAttention (``ops: contrib``), whose CPU kernel takes a single row when several
    new tokens meet a non-empty cache: a prefix adapter's prefill of a batch.
    """
    import copy

    batch = ids.shape[0]
    parts = []
    for i in range(batch):
        row = copy.copy(plan)
        row.cpu = {k: v[i:i + 1] if v.shape[0] == batch else v for k, v in plan.cpu.items()}
        row_past = None if past is None else [_owned(p.numpy()[i:i + 1], rt.device) for p in past]
        parts.append([o.numpy() for o in rt.run(row, ids[i:i + 1], mask[i:i + 1], positions[i:i + 1], row_past,
                                                presents, keep_last=keep_last)])
    return [_owned(np.concatenate(arrays), rt.device) for arrays in zip(*parts)]


def _owned(array: np.ndarray, device) -> "ort.OrtValue":
    """An OrtValue holding a copy of ``array`` in memory of its own: ``array`` may be a view into another
    OrtValue's memory (``OrtValue.numpy()`` of a previous run's output), freed with that OrtValue."""
    value = ort.OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype, *device)
    value.update_inplace(np.ascontiguousarray(array))
    return value


def row_specs(adapter, batch: int):
    """None for one adapter (or none) for every row; else each row's {name: weight} ({} is the base model)."""
    if adapter is None or isinstance(adapter, str):
        return None
    if isinstance(adapter, dict):
        return [_weights(adapter)] * batch
    if not isinstance(adapter, (list, tuple)):
        raise InvalidInputError(f"adapter must be a name, None, a {{name: weight}} dict or a list of those, one per row; "
                                f"got {type(adapter).__name__}")
    if len(adapter) != batch:
        raise InvalidInputError(f"adapter lists {len(adapter)} entries for {batch} rows; give one per row (None: the base)")
    for a in adapter:
        if a is not None and not isinstance(a, (str, dict)):
            raise InvalidInputError(f"adapter lists {a!r:.40} for a row; give each row an adapter's name, None (the "
                                    "base) or a {name: weight} dict")
    return [{} if a is None else {a: 1.0} if isinstance(a, str) else _weights(a) for a in adapter]


def as_called(adapter):
    """``adapter`` as a call was given it, its lists and dicts copied: a stream reads it at its first ``next()``, and
    an app's list or weights edited meanwhile (reused for its next request) gave other adapters, without a word."""
    if isinstance(adapter, dict):
        return dict(adapter)
    return [dict(a) if isinstance(a, dict) else a for a in adapter] if isinstance(adapter, (list, tuple)) else adapter


def holding(store, mixer, adapter, specs):
    """A call's adapters held (unloading refused, kept staged), its ``row_specs`` ``specs``: nothing stacked."""
    return store.using(adapter) if specs is None else store.holding(mixer.names(specs))


BATCH = 32  # rows a text call runs at once (sentence-transformers' encode and predict: 32)


def in_groups(keys: list, rows: list, per_row: list, call) -> list:
    """``call(rows, their adapters)`` once per group of rows with equal ``keys``, the results in the rows' order."""
    parts = {}
    for key in set(keys):
        at = [i for i, k in enumerate(keys) if k == key]
        parts.update(zip(at, call([rows[i] for i in at], [per_row[i] for i in at])))
    return [parts[i] for i in range(len(rows))]


def in_batches(lengths: list, rows: list, per_row: list, call) -> list:
    """``in_groups`` over batches of ``BATCH`` rows of like token counts, the results in the rows' order: one padded
    batch of every row took memory by the count of rows times the longest row's squared (a list of 10,000 texts, one
    long: hundreds of GB), where transformers' pipeline runs a text at a time and sentence-transformers 32."""
    order = np.argsort(lengths, kind="stable")  # (N,)
    batch = np.empty(len(rows), dtype=np.int64)
    batch[order] = np.arange(len(rows)) // BATCH
    return in_groups(batch.tolist(), rows, per_row, call)


def row_adapters(adapter, rows: int) -> list:
    """Each row's adapter (a name, a weighted dict, None) of a call's ``adapter`` argument; a per-row list of the
    wrong length is refused here, before a caller indexes it."""
    row_specs(adapter, rows)
    return list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * rows


def _weights(spec) -> dict:
    if not isinstance(spec, dict) or not spec or not all(isinstance(k, str) for k in spec):
        raise InvalidInputError(f"a weighted adapter is a non-empty {{name: weight}} dict; got {spec!r}")
    spec = {name: _real(weight) for name, weight in spec.items()}
    for name, weight in spec.items():
        # the row weights are float32: 1e40 is inf (compared as a float: a float16 weight overflowed the bound)
        if not is_real(weight) or abs(float(weight)) > float(np.finfo(np.float32).max):
            raise InvalidInputError(f"adapter {name!r} has weight {weight!r}; give a finite number (within float32's "
                                    "range, 3.4e38)")
    return {k: float(v) for k, v in spec.items()}


def _real(weight):
    """A weight as HF PEFT's ``scaling *= weight`` takes it: a 0-d array, a torch scalar, a Fraction or a Decimal is
    the float it holds (refused as "give a finite number" before), as are ml_dtypes' bfloat16 scalars."""
    weight = as_float(weight)
    if (is_number(weight) or isinstance(weight, (bool, np.bool_, str, bytes, complex, np.complexfloating))
            or getattr(weight, "ndim", 0) or getattr(getattr(weight, "dtype", None), "kind", "") == "c"
            or not hasattr(type(weight), "__float__")):
        return weight
    try:
        return float(weight)
    except (TypeError, ValueError, OverflowError, RuntimeError):  # a tensor of several values
        return weight


class Lane:
    """Rows (indices into the batch) that share one graph run, and the Plan that run binds."""

    __slots__ = ("rows", "plan")

    def __init__(self, rows, plan):
        self.rows, self.plan = np.asarray(rows, dtype=np.int64), plan


class Mixer:
    """Builds the lanes of a mixed call; caches stacked tensors per set of adapters."""

    def __init__(self, store, device):
        self.store = store
        self.device = device
        self.slots = store.slots
        self.selectors = {s.name: s for s in self.slots.values() if s.selects}
        self._stacks: OrderedDict = OrderedDict()
        # the store's lock: its unload and eviction call _forget holding it, and a release the garbage collector runs
        # inside this class's blocks (an abandoned stream's) takes it: two locks deadlocked two threads
        self._lock = store.lock
        store.on_change.append(weakref.WeakMethod(self._forget))
        store.cache = weakref.ref(self)  # the budget counts the stacks: see shed

    def names(self, specs) -> list:
        return sorted({n for spec in specs for n in spec if not self.store.serves_base(n)})

    def check(self, specs, known: dict) -> list:
        """Each row's spec without the base's names, or ConfigError for a row without a meaning; ``known``:
        {name: Registered} (staged or not: only manifests are read)."""
        checked = []
        for spec in specs:
            for name, weight in spec.items():
                if self.store.serves_base(name) and weight != 1.0:
                    raise ConfigError(f"adapter {name!r} is merged into this export's weights: it runs at weight 1.0 "
                                      f"only, not {weight}; export it with slots (without --merge) to weight it")
            spec = {n: w for n, w in spec.items() if not self.store.serves_base(n)}
            self._check(spec, known)
            checked.append(spec)
        return checked

    def lanes(self, specs, held: dict) -> list:
        """The lanes of a call; ``held``: {name: Registered} the call holds."""
        groups: dict = {}  # lane key -> rows
        for row, spec in enumerate(self.check(specs, held)):
            alone = [n for n in spec if not held[n].stackable]
            key = ("alone", alone[0]) if alone else ("stack", bool(self._head_of(spec, held)))
            groups.setdefault(key, []).append(row)
        lanes = []
        for (kind, what), rows in groups.items():
            if kind == "alone":
                lanes.append(Lane(rows, held[what].plan))
            else:
                lanes.append(Lane(rows, self._stacked_plan([specs[r] for r in rows], held, heads=what)))
        return lanes

    def _check(self, spec: dict, held: dict) -> None:
        """A weighted sum has a meaning for LoRA only (one head at most rides along); other kinds go one per row."""
        if len(spec) == 1 and next(iter(spec.values())) == 1.0:
            return
        for name in spec:
            methods = held[name].methods
            if held[name].saved_alone:  # HF PEFT weights the LoRA only; which saved copy would a sum use?
                raise ConfigError(f"adapter {name!r} saves {', '.join(held[name].saved_alone)} whole (not a classifier's "
                                  "head), which cannot be weighted or combined; give it alone, by name")
            lora = methods <= {"lora", "head"} and "lora" in methods
            if lora and not held[name].stackable:  # a base of export format 1 or 2: no slot stacks
                raise ConfigError(f"adapter {name!r} is LoRA, but {self.store.base_dir} was exported before LoRA "
                                  "adapters could be weighted or combined; export every adapter into a fresh --out "
                                  "folder to weight it")
            if not lora:
                raise ConfigError(f"adapter {name!r} ({'+'.join(sorted(methods))}) cannot be weighted or combined: "
                                  "weighted sums are defined for LoRA adapters; give it alone, by name")
        if sum(held[n].has_head for n in spec) > 1:
            raise ConfigError(f"adapters {', '.join(sorted(spec))} each bring a classifier head; two heads have no "
                              "weighted sum: combine at most one adapter with a head")

    def _head_of(self, spec: dict, held: dict):
        """The adapter of ``spec`` that fills the output-selected slots (a head), or None."""
        return next((name for name in spec if held[name].has_head), None)

    # ---------------------------------------------------------------- stacks
    def _stacked_plan(self, specs: list, held: dict, heads: bool) -> Plan:
        names = tuple(sorted({n for spec in specs for n in spec if not self.store.serves_base(n)}))
        if not names:
            return NO_ADAPTER
        stacks = self._stack(names, held)
        plan = Plan()
        plan.every = stacks["values"]
        for selector, layout in stacks["layouts"].items():
            kind = self.selectors[selector].selects
            if kind == "columns":  # (rows, 1, R): each row's weight on its adapters' rank columns
                weights = np.zeros((len(specs), 1, layout["width"]), np.float32)
                for r, spec in enumerate(specs):
                    for name, w in spec.items():
                        start, width = layout["extent"].get(name, (0, 0))
                        weights[r, 0, start:start + width] = w
            else:  # "adapters": (rows, N) one-hot on the row's stacked vector (0: ones, the base)
                weights = np.zeros((len(specs), layout["width"]), np.float32)
                for r, spec in enumerate(specs):
                    index = next((layout["extent"][n][0] for n in spec if n in layout["extent"]), 0)
                    weights[r, index] = 1.0
            plan.cpu[selector] = weights
        if heads:  # each row's head columns in the output
            extent = stacks["output"]
            plan.columns = [extent[self._head_of(spec, held)] for spec in specs]
        return plan

    def _stack(self, names: tuple, held: dict) -> dict:
        with self._lock:
            built = self._stacks.get(names)
            if built is not None:
                self._stacks.move_to_end(names)
                built["used"] = next(self.store.clock)
                return built
        arrays = {n: held[n].arrays for n in names}
        values, layouts, output = {}, {}, {}
        used = {self.slots[s].selector for a in arrays.values() for s in a if self.slots[s].stack_axis is not None}
        by_selector: dict = {}  # every slot of a selector in use: a row weight spans them all
        for slot in self.slots.values():
            if slot.stack_axis is not None and slot.selector in used:
                by_selector.setdefault(slot.selector, []).append(slot)
        for selector, slots in by_selector.items():
            if selector == "output":
                output = self._stack_heads(slots, names, arrays, values)
            elif self.selectors[selector].selects == "columns":
                layouts[selector] = self._stack_columns(slots, names, arrays, values)
            else:
                layouts[selector] = self._stack_vectors(slots, names, arrays, values)
        built = {"values": {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), *self.device)
                            for k, v in values.items()}, "layouts": layouts, "output": output,
                 "bytes": int(sum(v.nbytes for v in values.values())), "used": next(self.store.clock)}
        with self._lock:
            self._stacks[names] = built
            while len(self._stacks) > CACHED_STACKS:
                self._stacks.popitem(last=False)
            if self.store.budget is not None:  # within it, with the staged tensors (this call's stack may go: it
                self.store.trim()  # holds it, and builds it again next time)
        return built

    @property
    def stacked_bytes(self) -> int:
        """The bytes the cached stacks take, which an adapter budget counts."""
        with self._lock:
            return sum(built["bytes"] for built in list(self._stacks.values()))

    def oldest(self) -> tuple | None:
        """(the turn of its last use, its key) of the least recently used stack, which an adapter budget counts (a hunt
        found 16 sets kept at 22x it, uncounted); None: no stack."""
        with self._lock:
            return next(((built["used"], key) for key, built in list(self._stacks.items())), None)

    def shed(self, key) -> None:
        with self._lock:
            self._stacks.pop(key, None)

    @staticmethod
    def _stack_columns(slots, names, arrays, values) -> dict:
        """LoRA: each adapter's tensors zero-padded to its widest rank, side by side along the rank axis."""
        widths = {n: max((arrays[n][s.name].shape[s.stack_axis] for s in slots if s.name in arrays[n]), default=0)
                  for n in names}
        extent, start = {}, 0
        for n in names:
            extent[n] = (start, widths[n])
            start += widths[n]
        for s in slots:
            parts = []
            for n in names:
                shape = [widths[n] if i == s.stack_axis else d for i, d in enumerate(s.shape)]
                part = np.zeros(shape, np.float32)
                if s.name in arrays[n]:
                    value = arrays[n][s.name]
                    part[tuple(slice(0, k) for k in value.shape)] = value
                parts.append(part)
            values[s.name] = np.concatenate(parts, axis=s.stack_axis)
        return {"width": start, "extent": extent}

    @staticmethod
    def _stack_vectors(slots, names, arrays, values) -> dict:
        """IA3: the slot's neutral vector (the base: ones for a scale, zeros for an added bias), then each adapter's
        vector (the neutral one where it fills nothing there). A newcomer hunt's zeros-neutral slot was stacked with
        ones: the rows without it were 2.6 off."""
        for s in slots:
            neutral = np.full([1 if isinstance(d, str) else d for d in s.shape], s.neutral == "ones", np.float32)
            values[s.name] = np.concatenate([neutral] + [arrays[n].get(s.name, neutral) for n in names], axis=s.stack_axis)
        extent = {n: (1 + i, 1) for i, n in enumerate(names) if any(s.name in arrays[n] for s in slots)}
        return {"width": 1 + len(names), "extent": extent}

    @staticmethod
    def _stack_heads(slots, names, arrays, values) -> dict:
        """Heads: each head adapter's side by side along the output axis; returns {name: (start, width)}."""
        heads = [n for n in names if any(s.name in arrays[n] for s in slots)]
        extent, start = {}, 0
        for n in heads:
            width = arrays[n][slots[0].name].shape[slots[0].stack_axis]
            extent[n] = (start, width)
            start += width
        for s in slots:
            values[s.name] = np.concatenate([arrays[n][s.name] for n in heads], axis=s.stack_axis)
        return extent

    def _forget(self, name: str) -> None:
        with self._lock:  # it may run inside this lock, in the same thread (above): the keys are copied first
            for key in [k for k in list(self._stacks) if name in k]:
                self._stacks.pop(key, None)


def assemble(parts: list, batch: int) -> np.ndarray:
    """One output array from each lane's (rows, output): rows in batch order. Rows whose outputs are shorter
    (fewer prompt positions, fewer labels) are padded with NaN in front (positions) or behind (labels)."""
    if len(parts) == 1 and not isinstance(parts[0][1], list):
        return parts[0][1]
    rows_out = {}
    for rows, out in parts:
        for i, row in enumerate(rows):
            rows_out[int(row)] = out[i]
    shapes = {r.shape for r in rows_out.values()}
    if len(shapes) == 1:
        return np.stack([rows_out[r] for r in range(batch)])
    if rows_out[0].ndim == 1:  # labels: pad behind
        width = max(r.shape[0] for r in rows_out.values())
        return np.stack([np.pad(rows_out[r], (0, width - rows_out[r].shape[0]), constant_values=np.nan)
                         for r in range(batch)])
    length = max(r.shape[0] for r in rows_out.values())  # positions: a prompt's virtual ones come first
    return np.stack([np.pad(rows_out[r], [(length - rows_out[r].shape[0], 0)] + [(0, 0)] * (rows_out[r].ndim - 1),
                            constant_values=np.nan) for r in range(batch)])
