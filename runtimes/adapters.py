"""The adapter store: adapters registered by name, staged as OrtValues on demand, held while calls use them.

    register(OUT/adapters/<name> or zip bytes)   adapter.json checked (fingerprint, checksum): known, not staged
    stage                                        run adapter.onnx once, check every tensor against its slot,
                                                 sort them into a Plan of what a call binds, as OrtValues
    hold(names)                                  a call's hold: staged first when needed, then unload and
                                                 eviction leave them alone until the call ends

With ``budget_bytes``, at most that many bytes of staged tensors (and of mixed batches' stacks: mixing.py) stay
resident: the least recently used adapters no call holds are evicted, and restaged (from their files, checked again,
or bytes) when a call names them again; a zip's bytes come on top. Every change takes one lock; staging runs outside it.
"""
from __future__ import annotations

import io
import itertools
import os
import threading
import weakref
import zipfile
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np

from .errors import AdapterInUseError, ArtifactNotFoundError, ConfigError, CorruptArtifactError, EdgePeftError, UnknownAdapterError
from .manifest import ADAPTER_GRAPH, ADAPTERS_DIR, check_adapter_graph, read_adapter_manifest, stacks_as_output
from .access import STOPPED, moved_aside
from .commands import base_flags, folder_name_problem, name_problem
from .adapter_graph import run_adapter_graph
from .adapter_source import adapter_bound, base_mismatch, read_adapter_source
from .sessions import ort
from .slot_checks import axis_sharing, check_adapter_tensors
from .values import is_whole


class Plan:
    """What one call binds for an adapter (see the manifest's slot fields).

    every: {graph input: OrtValue} bound at every step; prefill: bound at the first step
    only; past: {cache input: array (1, ...)} that starts the cache, repeated over the
    batch; n_past / n_prepend: virtual tokens added as past / before the input tokens;
    n_inside: virtual tokens the graph adds itself (an encoder's prefix), which take positions only;
    cpu: {graph input: array} bound from numpy (a mixed batch's row selectors);
    columns: each row's (start, width) of the task output (a head per row), or None.
    """

    __slots__ = ("every", "prefill", "past", "n_past", "n_prepend", "n_inside", "cpu", "columns")

    def __init__(self):
        self.every, self.prefill, self.past, self.n_past, self.n_prepend, self.n_inside = {}, {}, {}, 0, 0, 0
        self.cpu, self.columns = {}, None

    @property
    def n_virtual(self) -> int:
        """Virtual tokens the runtime adds to the mask and positions."""
        return self.n_past + self.n_prepend

    @property
    def n_positions(self) -> int:
        """Positions the adapter's virtual tokens take, every kind: what a length check counts."""
        return self.n_virtual + self.n_inside


NO_ADAPTER = Plan()


class Registered:
    """An adapter the store knows: where to (re)stage it from, its manifest, and its staged state."""

    __slots__ = ("name", "path", "data", "manifest", "methods", "stackable", "saved_alone", "has_head", "plan", "arrays",
                 "bytes", "holds", "n_positions")

    def __init__(self, name, path, data, manifest, slots: dict, task: str):
        self.name, self.path, self.data, self.manifest = name, path, data, manifest
        filled = [slots[n] for n in manifest["slots"] if n in slots]
        self.methods = {s.method for s in filled}  # of the slots it fills (adapter.json's "methods" is not trusted)
        # rows can share a run with others' rows (exports before the check wrote selector "output" on any saved layer)
        stacks = [s.stack_axis is not None and (s.selector != "output" or stacks_as_output(task, s.module)) for s in filled]
        self.stackable = all(stacks)
        # layers saved whole whose copies cannot share a run (an lm_head, a pooler; a classifier's head can)
        self.saved_alone = sorted({s.module for s, ok in zip(filled, stacks) if s.method == "head" and not ok})
        self.has_head = any(s.selector == "output" for s in filled)  # fills the output-selected slots (a head)
        self.plan = None  # staged: a Plan of OrtValues
        self.arrays = None  # staged: {slot: array}, what mixed batches stack
        self.bytes = 0
        self.holds = weakref.WeakSet()  # the calls in flight that hold it (see _Call)
        self.n_positions = 0  # positions its virtual tokens take, known from the staging at load (kept when evicted)

    @property
    def source(self):
        """What ``load`` takes to load this adapter again: its folder, or the bytes of a zip of its files."""
        if self.path is not None:
            return self.path
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for file, data in self.data.items():
                archive.writestr(file, data)
        return buffer.getvalue()


class _Call:
    """One call's hold on its adapters, a token each adapter keeps weakly (not a count): Ctrl-C or a timeout's
    signal handler raising anywhere, the release itself included, leaves no hold once the call's frames are gone
    (a count raised and not yet recorded kept an adapter in use for the life of the Runtime)."""
    __slots__ = ("__weakref__",)


class AdapterStore:
    """The adapters one Runtime serves, by name. Thread-safe."""

    def __init__(self, base_manifest: dict, base_dir: str, out: str, past_names: list, device: tuple,
                 budget_bytes: int | None = None):
        self.base = base_manifest
        self.base_dir = base_dir
        self.out = out
        self.slots = {s.name: s for s in base_manifest["slots"]}
        self.sharing = axis_sharing(self.slots)  # what each adapter's tensors are checked against (restages too)
        self.past_names = past_names
        self.device = device
        self.merged = base_manifest.get("merged_adapter")  # a --merge export's adapter: the base graph as it is
        self.most_bytes = adapter_bound(base_dir, base_manifest)  # the most an adapter file may unpack to
        if budget_bytes is not None and not (is_whole(budget_bytes) and budget_bytes >= 0):
            raise ConfigError(f"adapter_budget_bytes must be an integer count of bytes >= 0 (64_000_000, not 64e6), "
                              f"got {budget_bytes!r}")
        self.budget = None if budget_bytes is None else int(budget_bytes)
        self._adapters: dict[str, Registered] = {}
        self._resident: OrderedDict = OrderedDict()  # staged names, least recently used first
        self.lock = threading.RLock()  # the Mixer takes it too, for its cache of stacks (mixing.py)
        self._trimming = threading.local()  # a trim under way in this thread (see trim)
        self._staging: dict[str, threading.Lock] = {}
        self.on_change = []  # WeakMethods(name): unloaded, evicted or restaged (weak: a Mixer holds this store)
        self.cache, self.clock = lambda: None, itertools.count()  # the Mixer (weak), whose stacks the budget counts

    @property
    def names(self) -> list[str]:
        return sorted(self._adapters)

    @property
    def resident(self) -> list[str]:
        """The adapters staged now, least recently used first."""
        with self.lock:
            return list(self._resident)

    @property
    def resident_bytes(self) -> int:
        with self.lock:  # a list first: the collector may run a finalizer that trims before a generator's
            return sum(a.bytes for a in map(self._adapters.get, list(self._resident)) if a)  # first step

    def staged_bytes(self, name: str) -> int:
        """The bytes adapter ``name`` takes staged, what the budget counts (known from its staging at load)."""
        return self.get(name).bytes

    def serves_base(self, name) -> bool:
        """No adapter, or the one a --merge export folded into the base: calls run the base graph as it is."""
        return name is None or name == self.merged

    def get(self, name: str) -> Registered:
        if name is None:  # "use adapter=None for the base model" was the advice: the base has no adapter's files
            raise UnknownAdapterError("adapter None is the base model, which has no adapter folder or manifest; "
                                      "the base's own are rt.base_dir and rt.manifest")
        adapter = self._adapters.get(_one_name(name))
        if adapter is None:
            merged = f"; {self.merged!r} is merged into the base" if self.merged else ""
            aside = self.out and isinstance(name, str) and moved_aside(os.path.join(self.out, ADAPTERS_DIR)).get(name)
            if aside:  # "not loaded" hid where it was
                raise UnknownAdapterError(f"adapter {name!r} is not loaded: moved aside to {aside} {STOPPED.format(self.out)}")
            raise UnknownAdapterError(
                f"adapter {name!r} is not loaded in {self.out}; loaded: {', '.join(map(repr, self.names)) or 'none'}{merged} "
                "(use adapter=None for the base model)"
            )
        return adapter

    # ---------------------------------------------------------------- load / unload
    def load(self, source, name=None) -> str:
        """Register an exported adapter (its folder, or the bytes of a zip of it) and stage it (within the budget).

        Returns its name. On any failure nothing changes: adapters already loaded keep serving.
        """
        if name is not None and name_problem(name):
            raise ConfigError(f"the adapter name {name!r:.80} {name_problem(name)}; pass another name= (or None: its "
                              "folder's name, a zip's: the name it was exported with)")
        path, files, manifest = read_adapter_source(source, self.most_bytes, self.base)
        label = path or "adapter bytes"
        if name is None:  # a folder is named as Runtime(OUT) names what it finds in OUT/adapters: by the folder
            name = os.path.basename(os.path.normpath(path)) if path else manifest["name"]
            if path and (problem := folder_name_problem(path, name)):  # `run --adapter None` ran the base model
                raise ConfigError(problem + ", or load it with name=")
            if not path and (problem := name_problem(name)):
                raise ConfigError(f"{label}: the adapter name {name!r:.80} (the adapter.json's) {problem}; load it "
                                  "with name=")
        if manifest["base_fingerprint"] != self.base["fingerprint"]:
            raise base_mismatch(label, manifest, path, self.base, self.base_dir, self.out)
        # a folder's files are read again at each restage (an evicted adapter's bytes are not kept)
        entry = Registered(name, path, None if path else files, manifest, self.slots, self.base.get("task", ""))
        arrays, plan = self._stage(entry, files[ADAPTER_GRAPH])  # a load stages (and checks) it even under a budget
        with self.lock:
            if name in self._adapters:
                raise ConfigError(f"{label}: an adapter named {name!r} is already loaded; unload it first or pick another name")
            self._adapters[name] = entry
            self._set_staged(entry, arrays, plan)
            self.trim()
        return name

    def unload(self, name: str) -> None:
        """Forget an adapter and drop its staged tensors. Refused while a call is using it."""
        with self.lock:
            adapter = self._adapters.get(_one_name(name))
            if adapter is None:
                raise UnknownAdapterError(f"adapter {name!r} is not loaded; loaded: {', '.join(map(repr, self.names)) or 'none'}")
            if adapter.holds:
                raise AdapterInUseError(f"adapter {name!r} is in use by {len(adapter.holds)} call(s); unload it when they "
                                        "finish (a stream or step_logits read no further holds it until its close())")
            self._drop(adapter)
            del self._adapters[name]
            self._staging.pop(name, None)

    # ---------------------------------------------------------------- holds
    @contextmanager
    def using(self, name):
        """Hold one adapter for the length of one call; yields its Plan (unload is refused meanwhile)."""
        if self.serves_base(_one_name(name)):
            yield NO_ADAPTER
            return
        with self.holding([name]) as held:
            yield held[name].plan

    @contextmanager
    def holding(self, names):
        """Hold adapters for one call, staging any that are not resident; yields {name: Registered}."""
        names = [n for n in dict.fromkeys(names) if not self.serves_base(n)]
        held, call = [], _Call()
        try:
            for name in names:
                self._acquire(name, call, held)
            yield {a.name: a for a in held}
        finally:
            with self.lock:
                for adapter in held:
                    adapter.holds.discard(call)
                self.trim()

    def _acquire(self, name: str, call: "_Call", held: list) -> None:
        """Hold adapter ``name`` for ``call`` (listed in ``held`` before it holds it), staging it if evicted."""
        with self.lock:
            adapter = self.get(name)
            held.append(adapter)
            adapter.holds.add(call)
            if adapter.plan is not None:
                self._used(name)
                return
            lock = self._staging.setdefault(name, threading.Lock())
        with lock:  # one thread restages; the others wait for it
            if adapter.plan is None:
                arrays, plan = self._stage(adapter, self._unchanged_graph(adapter))
                with self.lock:
                    self._set_staged(adapter, arrays, plan)
                    self.trim()

    def _set_staged(self, adapter: Registered, arrays: dict, plan: Plan) -> None:
        self._used(adapter.name)  # first: a timeout's exception here left a plan no trim saw (KeyError at each later
        # call's move_to_end); a resident with none is restaged
        adapter.bytes = int(sum(a.nbytes for a in arrays.values()))
        adapter.arrays, adapter.plan, adapter.n_positions = arrays, plan, plan.n_positions
        self._changed(adapter.name)

    def _used(self, name: str) -> None:
        """``name`` staged or used now: the last of ``_resident``, its value the use's turn (stacks take turns too)."""
        self._resident[name] = next(self.clock)
        self._resident.move_to_end(name)

    def _drop(self, adapter: Registered) -> None:
        adapter.plan = adapter.arrays = None  # its bytes stay known (staged_bytes); resident_bytes counts residents
        self._resident.pop(adapter.name, None)
        self._changed(adapter.name)

    def _changed(self, name: str) -> None:
        for listener in self.on_change:
            if (notify := listener()) is not None:
                notify(name)

    def trim(self) -> None:
        """Evict least recently used adapters no call holds, and stacks, until the staged bytes and the stacks fit the
        budget (the Mixer calls it after caching a stack). A release the garbage collector runs inside a trim (an
        abandoned stream's finalizer, in this thread: the lock is re-entrant) leaves the trimming to the trim under
        way, which would count dropped adapters twice."""
        if self.budget is None:
            return
        if getattr(self._trimming, "on", False):
            self._trimming.again = True  # the trim under way goes round once more
            return
        try:  # the bytes counted again each time: what a deferred release staged counts too (on: set inside, or a
            self._trimming.on = self._trimming.again = True  # timeout's exception before the try left every trim off)
            while self._trimming.again:
                self._trimming.again = False
                cache = self.cache()  # a Mixer: its stacks count too, the least recently used of them and of the
                while self.resident_bytes + (cache.stacked_bytes if cache else 0) > self.budget:  # adapters going first
                    unheld = next((a for a in map(self._adapters.get, list(self._resident)) if a and not a.holds), None)
                    stack = cache.oldest() if cache else None  # (its last use, its key): a call using it keeps its own
                    if stack and (unheld is None or stack[0] < self._resident[unheld.name]):
                        cache.shed(stack[1])  # built again from the staged tensors by the next call naming them
                    elif unheld is None:
                        break
                    else:
                        self._drop(unheld)
        finally:
            self._trimming.on = False

    # ---------------------------------------------------------------- staging and checks
    def _unchanged_graph(self, adapter: Registered) -> bytes:
        """Before a restage: the graph's bytes, a folder's still the ones load checked (bytes cannot change)."""
        if adapter.data is not None:
            return adapter.data[ADAPTER_GRAPH]
        try:
            return check_adapter_graph(adapter.path, adapter.manifest, self.most_bytes, self.base)
        except EdgePeftError:  # re-exported since (edgepeft export --overwrite): for this base, or for a new one
            if not os.path.isdir(adapter.path):  # moved (OUT renamed) or removed: loading it again there fails too
                raise ArtifactNotFoundError(
                    f"{adapter.path}: gone since adapter {adapter.name!r} was loaded (moved or removed); unload_adapter("
                    f"{adapter.name!r}) and load it from where it is now, or open a Runtime on the export there") from None
        try:
            base = read_adapter_manifest(adapter.path)["base_fingerprint"]
        except EdgePeftError:
            base = adapter.manifest["base_fingerprint"]
        fix = (f"unload_adapter({adapter.name!r}) and load it again" if base == adapter.manifest["base_fingerprint"]
               else "its base was re-exported too: open a new Runtime on the export")
        raise CorruptArtifactError(
            f"{os.path.join(adapter.path, adapter.manifest['graph'])}: missing or changed (re-exported?) since "
            f"adapter {adapter.name!r} was loaded; {fix}")

    def _stage(self, adapter: Registered, graph: bytes) -> tuple[dict, Plan]:
        label = adapter.path or "adapter bytes"
        where = os.path.join(adapter.path, adapter.manifest["graph"]) if adapter.path else f"{label}: {ADAPTER_GRAPH}"
        arrays = run_adapter_graph(graph, where, self.most_bytes, len(self.slots))
        check_adapter_tensors(label, adapter.manifest, arrays, self.slots, self.sharing, self.base_dir,
                              (self.out, *base_flags(self.base)))
        return arrays, self._plan(label, arrays)

    def _plan(self, label: str, arrays: dict) -> Plan:
        """Sort an adapter's tensors by how they are bound (graph input, prefill only, cache start)."""
        plan = Plan()
        for name, arr in arrays.items():
            slot = self.slots[name]
            if slot.target:
                plan.past[slot.target] = np.ascontiguousarray(arr)
            else:
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), *self.device)
                (plan.prefill if slot.phase == "prefill" else plan.every)[name] = value
            if slot.virtual_axis is not None and slot.target:
                plan.n_past = int(arr.shape[slot.virtual_axis])  # every layer's prefix has the same length
            elif slot.virtual_axis is not None:
                plan.n_prepend += int(arr.shape[slot.virtual_axis])
            if slot.position_axis is not None:
                plan.n_inside = int(arr.shape[slot.position_axis])  # every layer's prefix has the same length
        if plan.past and set(plan.past) != set(self.past_names):
            raise CorruptArtifactError(
                f"{label}: the adapter starts {len(plan.past)} of the {len(self.past_names)} cache inputs; re-export the adapter"
            )
        return plan


def _one_name(name):
    """An adapter's name as the calls that take one name check it (a list would fail as a dict key)."""
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"this call takes one adapter's name (a string), got {name!r}; lists and weights of "
                          "adapters are for the calls that run them (forward, generate, classify, embed)")
    return name
