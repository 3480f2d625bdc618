"""The adapter store: each adapter's tensors staged once as OrtValues, checked against the base's slot table,
sorted by how a call binds them, and held while calls use them.

    load(OUT/adapters/<name>)  adapter.json (fingerprint, checksum) --> run adapter.onnx once
                               --> check every tensor against its slot --> Plan --> OrtValues
    using(name)                a call's hold: unload waits for no one; it is refused while held
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import numpy as np

from .errors import (
    AdapterBaseMismatchError,
    AdapterInUseError,
    ArtifactNotFoundError,
    ConfigError,
    CorruptArtifactError,
    UnknownAdapterError,
)
from .manifest import adapter_graph_error, read_adapter_manifest
from .sessions import ort, session_options


class Plan:
    """What one call binds for an adapter (see the manifest's slot fields).

    every: {graph input: OrtValue} bound at every step; prefill: bound at the first step
    only; past: {cache input: array (1, ...)} that starts the cache, repeated over the
    batch; n_past / n_prepend: virtual tokens added as past / before the input tokens.
    """

    __slots__ = ("every", "prefill", "past", "n_past", "n_prepend")

    def __init__(self):
        self.every, self.prefill, self.past, self.n_past, self.n_prepend = {}, {}, {}, 0, 0

    @property
    def n_virtual(self) -> int:
        return self.n_past + self.n_prepend


NO_ADAPTER = Plan()


class StagedAdapter:
    __slots__ = ("name", "path", "manifest", "plan", "users")

    def __init__(self, name, path, manifest, plan):
        self.name = name
        self.path = path
        self.manifest = manifest
        self.plan = plan
        self.users = 0  # calls in flight


class AdapterStore:
    """The adapters one Runtime serves, by name. Thread-safe: loads, unloads and holds take one lock."""

    def __init__(self, base_manifest: dict, base_dir: str, out: str, past_names: list, device: tuple):
        self.base = base_manifest
        self.base_dir = base_dir
        self.out = out
        self.slots = {s.name: s for s in base_manifest["slots"]}
        self.past_names = past_names
        self.device = device
        self.merged = base_manifest.get("merged_adapter")  # a --merge export's adapter: the base graph as it is
        self._adapters: dict[str, StagedAdapter] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return sorted(self._adapters)

    def serves_base(self, name) -> bool:
        """No adapter, or the one a --merge export folded into the base: calls run the base graph as it is."""
        return name is None or name == self.merged

    def get(self, name: str) -> StagedAdapter:
        adapter = self._adapters.get(name)
        if adapter is None:
            raise UnknownAdapterError(
                f"adapter {name!r} is not loaded in {self.out}; loaded: {', '.join(self.names) or 'none'} "
                "(use adapter=None for the base model)"
            )
        return adapter

    # ---------------------------------------------------------------- load / unload
    def load(self, path, name=None) -> str:
        """Load an exported adapter folder, validate it against the base, stage its tensors; returns its name.

        On any failure nothing changes: adapters already loaded keep serving.
        """
        path = str(path)
        if not os.path.isdir(path):
            raise ArtifactNotFoundError(
                f"{path}: no such adapter folder; pass a folder from OUT/adapters/ made by `edgepeft export`"
            )
        manifest = read_adapter_manifest(path)
        name = name or manifest["name"]
        if manifest["base_fingerprint"] != self.base["fingerprint"]:
            raise AdapterBaseMismatchError(
                f"{path}: adapter {manifest['name']!r} was exported for base {manifest['base_fingerprint'][:12]} "
                f"({manifest.get('base_source')}), but {self.base_dir} is base {self.base['fingerprint'][:12]} "
                f"({self.base.get('source')}); export the adapter into this OUT with "
                f"`edgepeft export --adapter <adapter dir> --out {self.out}`"
            )
        if (error := adapter_graph_error(path, manifest)) is not None:
            raise error
        arrays = run_adapter_graph(os.path.join(path, manifest["graph"]))
        self._check_tensors(path, manifest, arrays)
        plan = self._plan(path, arrays)
        with self._lock:
            if name in self._adapters:
                raise ConfigError(f"{path}: an adapter named {name!r} is already loaded; unload it first or pick another name")
            self._adapters[name] = StagedAdapter(name, path, manifest, plan)
        return name

    def unload(self, name: str) -> None:
        """Drop an adapter's staged tensors. Refused while a call is using it."""
        with self._lock:
            adapter = self._adapters.get(name)
            if adapter is None:
                raise UnknownAdapterError(f"adapter {name!r} is not loaded; loaded: {', '.join(self.names) or 'none'}")
            if adapter.users:
                raise AdapterInUseError(f"adapter {name!r} is in use by {adapter.users} call(s); unload it when they finish")
            del self._adapters[name]

    @contextmanager
    def using(self, name):
        """Hold an adapter for the length of one call; yields its Plan (unload is refused meanwhile)."""
        if self.serves_base(name):
            yield NO_ADAPTER
            return
        with self._lock:
            adapter = self.get(name)
            adapter.users += 1
        try:
            yield adapter.plan
        finally:
            with self._lock:
                adapter.users -= 1

    # ---------------------------------------------------------------- checks
    def _plan(self, path: str, arrays: dict) -> Plan:
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
        if plan.past and set(plan.past) != set(self.past_names):
            raise CorruptArtifactError(
                f"{path}: the adapter starts {len(plan.past)} of the {len(self.past_names)} cache inputs; re-export the adapter"
            )
        return plan

    def _check_tensors(self, path: str, manifest: dict, arrays: dict) -> None:
        """Every output must be a slot of this base with the slot's fixed sizes and dtype."""
        axes: dict[str, int] = {}
        for slot_name, arr in arrays.items():
            slot = self.slots.get(slot_name)
            if slot is None:
                raise AdapterBaseMismatchError(
                    f"{path}: adapter fills slot {slot_name!r} that {self.base_dir} lacks; "
                    f"re-export with `edgepeft export --adapter <adapter dir> --out {self.out}` to add it"
                )
            if arr.dtype != np.dtype(slot.dtype) or arr.ndim != len(slot.shape):
                raise CorruptArtifactError(
                    f"{path}: slot {slot_name} is {arr.dtype}{list(arr.shape)}, base expects "
                    f"{slot.dtype}{list(slot.shape)}; re-export the adapter"
                )
            for size, want in zip(arr.shape, slot.shape):
                if isinstance(want, str):
                    if axes.setdefault(want, size) != size:
                        raise CorruptArtifactError(
                            f"{path}: axis {want} is {size} in {slot_name} but {axes[want]} elsewhere; re-export the adapter"
                        )
                elif size != want:
                    raise CorruptArtifactError(
                        f"{path}: slot {slot_name} has shape {list(arr.shape)}, base expects {list(slot.shape)}; "
                        "re-export the adapter for this base"
                    )
        if set(manifest["slots"]) != set(arrays):
            raise CorruptArtifactError(f"{path}: adapter.json and adapter.onnx disagree on the slots; re-export the adapter")


def run_adapter_graph(graph: str) -> dict:
    """{slot name: array}: an adapter graph's outputs (it has no inputs), run once on the CPU."""
    try:
        sess = ort.InferenceSession(graph, sess_options=session_options(1), providers=["CPUExecutionProvider"])
        outputs = sess.run(None, {})
    except Exception as e:
        raise CorruptArtifactError(
            f"{graph}: ONNX Runtime cannot run the adapter graph ({str(e).splitlines()[0]}); re-export the adapter"
        ) from None
    return {o.name: v for o, v in zip(sess.get_outputs(), outputs)}
