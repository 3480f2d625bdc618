"""Runtime: one base session, many adapters staged as device-resident OrtValues.

    Runtime(OUT)
      |-- session: OUT/base/model.onnx, adapter slots are optional graph inputs
      |-- adapters: name -> {slot name: OrtValue}, made once at load by running
      |             OUT/adapters/<name>/adapter.onnx, checked against the slot table
      |-- forward(input_ids, attention_mask, adapter=name)
      |     binds input_ids/attention_mask + that adapter's OrtValues (IOBinding);
      |     slots it does not fill keep the graph's neutral default
      `-- generate / stream (decoders): the same binding plus the KV cache, whose
            present.* OrtValues become the next step's past_key_values.*

There is no global active adapter: every call names its adapter, so concurrent
calls with different adapters never interfere. Adapter tensors are never copied
per call.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import numpy as np
import onnxruntime as ort

from .errors import (
    AdapterBaseMismatchError,
    AdapterInUseError,
    ArtifactNotFoundError,
    ConfigError,
    CorruptArtifactError,
    InvalidInputError,
    UnknownAdapterError,
)
from .manifest import (
    BASE_DIR,
    LOGITS_TO_KEEP,
    adapter_dirs,
    adapter_graph_error,
    cache_names,
    read_adapter_manifest,
    read_base_manifest,
)
from .generation import GenerationConfig, next_tokens
from .sessions import device_of, session_options
from .text import TextTokenizer


class _Plan:
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


_NO_ADAPTER = _Plan()


class _Adapter:
    __slots__ = ("name", "path", "manifest", "plan", "users")

    def __init__(self, name, path, manifest, plan):
        self.name = name
        self.path = path
        self.manifest = manifest
        self.plan = plan
        self.users = 0  # calls in flight

    @property
    def values(self) -> dict:
        """{slot name: OrtValue} of every graph input the adapter fills."""
        return {**self.plan.every, **self.plan.prefill}


class Runtime:
    """Run an edgepeft export; see the module docstring for the lifecycle."""

    def __init__(self, path, providers=None, sess_options=None, load_adapters=True):
        base_dir = os.path.join(str(path), BASE_DIR)
        if not os.path.isdir(base_dir):
            raise _not_an_export(str(path))
        self.path = str(path)
        self._open_base(base_dir, providers, sess_options)
        if load_adapters:
            for name, d in adapter_dirs(self.path).items():
                self.load_adapter(d, name=name)

    @classmethod
    def from_base_dir(cls, base_dir, providers=None, sess_options=None) -> "Runtime":
        """A runtime over a bare base folder with no adapters loaded (used by export validation)."""
        rt = cls.__new__(cls)
        rt.path = os.path.dirname(os.path.abspath(base_dir))
        rt._open_base(base_dir, providers, sess_options)
        return rt

    def _open_base(self, base_dir, providers, sess_options):
        self.manifest = read_base_manifest(base_dir)
        self.base_dir = base_dir
        self.providers = list(providers or ["CPUExecutionProvider"])
        self._device = device_of(self.providers)
        graph = os.path.join(base_dir, self.manifest["graph"])
        if not os.path.isfile(graph):
            raise ArtifactNotFoundError(f"{graph}: base graph missing; re-run `edgepeft export`")
        try:
            self.session = ort.InferenceSession(
                graph, sess_options=sess_options or session_options(), providers=self.providers
            )
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise CorruptArtifactError(
                f"{graph}: ONNX Runtime cannot load the base graph ({str(e).splitlines()[0]}); "
                "re-run `edgepeft export` into a fresh --out folder"
            ) from None
        self.slots = {s.name: s for s in self.manifest["slots"]}
        self.task = self.manifest["task"]
        self.output_name = next(iter(self.manifest["outputs"]))  # logits / last_hidden_state first
        self.cache = self.manifest.get("cache")  # KV-cache layout of decoder graphs, else None
        self._past_names = cache_names(self.cache, "past") if self.cache else []
        self._neutral = {  # decode steps bind these for slots filled at prefill only (a zero-length prompt)
            s.name: ort.OrtValue.ortvalue_from_numpy(np.zeros([0 if isinstance(d, str) else d for d in s.shape], s.dtype),
                                                     *self._device)
            for s in self.manifest["slots"] if s.phase == "prefill" and not s.target
        }
        self._present_names = cache_names(self.cache, "present") if self.cache else []
        self.input_names = list(self.manifest["inputs"])
        # The OrtValue generation binds to LOGITS_TO_KEEP (1; forward keeps the graph's default, 0 = all positions);
        # exports made before it existed have no such input and compute every position.
        # (IOBinding binds an input that has a default only as an OrtValue.)
        self._keep_last = (ort.OrtValue.ortvalue_from_numpy(np.array(1, dtype=np.int64))
                           if LOGITS_TO_KEEP in self.manifest["inputs"] else None)
        self.vocab_size = int(self.manifest["vocab_size"])
        self.max_positions = self.manifest.get("max_positions")
        self._adapters: dict[str, _Adapter] = {}
        self._lock = threading.Lock()
        self._tokenizer = None

    # ---------------------------------------------------------------- adapters
    @property
    def adapter_names(self) -> list[str]:
        return sorted(self._adapters)

    def adapter_info(self, name: str) -> dict:
        """The adapter's manifest (method, rank, labels, source PEFT config...)."""
        return self._get(name).manifest

    def load_adapter(self, path, name=None) -> str:
        """Load an exported adapter folder, validate it against the base, stage its tensors.

        Returns the adapter's name. On any failure nothing changes: adapters already
        loaded keep serving.
        """
        path = str(path)
        if not os.path.isdir(path):
            raise ArtifactNotFoundError(
                f"{path}: no such adapter folder; pass a folder from OUT/adapters/ made by `edgepeft export`"
            )
        manifest = read_adapter_manifest(path)
        name = name or manifest["name"]
        if manifest["base_fingerprint"] != self.manifest["fingerprint"]:
            raise AdapterBaseMismatchError(
                f"{path}: adapter {manifest['name']!r} was exported for base {manifest['base_fingerprint'][:12]} "
                f"({manifest.get('base_source')}), but {self.base_dir} is base {self.manifest['fingerprint'][:12]} "
                f"({self.manifest.get('source')}); export the adapter into this OUT with "
                f"`edgepeft export --adapter <adapter dir> --out {self.path}`"
            )
        if (error := adapter_graph_error(path, manifest)) is not None:
            raise error
        arrays = self._run_adapter_graph(os.path.join(path, manifest["graph"]))
        self._check_adapter_tensors(path, manifest, arrays)
        plan = self._plan(path, arrays)
        with self._lock:
            if name in self._adapters:
                raise ConfigError(f"{path}: an adapter named {name!r} is already loaded; unload it first or pick another name")
            self._adapters[name] = _Adapter(name, path, manifest, plan)
        return name

    def _plan(self, path: str, arrays: dict) -> _Plan:
        """Sort an adapter's tensors by how they are bound (graph input, prefill only, cache start)."""
        plan = _Plan()
        for name, arr in arrays.items():
            slot = self.slots[name]
            if slot.target:
                plan.past[slot.target] = np.ascontiguousarray(arr)
            else:
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), *self._device)
                (plan.prefill if slot.phase == "prefill" else plan.every)[name] = value
            if slot.virtual_axis is not None and slot.target:
                plan.n_past = int(arr.shape[slot.virtual_axis])  # every layer's prefix has the same length
            elif slot.virtual_axis is not None:
                plan.n_prepend += int(arr.shape[slot.virtual_axis])
        if plan.past and set(plan.past) != set(self._past_names):
            raise CorruptArtifactError(
                f"{path}: the adapter starts {len(plan.past)} of the {len(self._past_names)} cache inputs; re-export the adapter"
            )
        return plan

    def unload_adapter(self, name: str) -> None:
        """Drop an adapter's staged tensors. Refused while a call is using it."""
        with self._lock:
            adapter = self._adapters.get(name)
            if adapter is None:
                raise UnknownAdapterError(f"adapter {name!r} is not loaded; loaded: {self.adapter_names or 'none'}")
            if adapter.users:
                raise AdapterInUseError(f"adapter {name!r} is in use by {adapter.users} call(s); unload it when they finish")
            del self._adapters[name]

    def _run_adapter_graph(self, graph: str) -> dict:
        try:
            sess = ort.InferenceSession(graph, sess_options=session_options(1), providers=["CPUExecutionProvider"])
            outputs = sess.run(None, {})
        except Exception as e:
            raise CorruptArtifactError(
                f"{graph}: ONNX Runtime cannot run the adapter graph ({str(e).splitlines()[0]}); re-export the adapter"
            ) from None
        return {o.name: v for o, v in zip(sess.get_outputs(), outputs)}

    def _check_adapter_tensors(self, path: str, manifest: dict, arrays: dict) -> None:
        """Every output must be a slot of this base with the slot's fixed sizes and dtype."""
        axes: dict[str, int] = {}
        for slot_name, arr in arrays.items():
            slot = self.slots.get(slot_name)
            if slot is None:
                raise AdapterBaseMismatchError(
                    f"{path}: adapter fills slot {slot_name!r} that {self.base_dir} lacks; "
                    f"re-export with `edgepeft export --adapter <adapter dir> --out {self.path}` to add it"
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
        declared = set(manifest["slots"])
        if declared != set(arrays):
            raise CorruptArtifactError(f"{path}: adapter.json and adapter.onnx disagree on the slots; re-export the adapter")

    def _get(self, name: str) -> _Adapter:
        adapter = self._adapters.get(name)
        if adapter is None:
            raise UnknownAdapterError(
                f"adapter {name!r} is not loaded in {self.path}; loaded: {', '.join(self.adapter_names) or 'none'} "
                "(use adapter=None for the base model)"
            )
        return adapter

    @contextmanager
    def _using(self, name):
        """Hold an adapter for the length of one call (unload waits for it)."""
        if self._serves_base(name):
            yield _NO_ADAPTER
            return
        with self._lock:
            adapter = self._get(name)
            adapter.users += 1
        try:
            yield adapter.plan
        finally:
            with self._lock:
                adapter.users -= 1

    # ---------------------------------------------------------------- inputs
    def _check_ids(self, input_ids, attention_mask):
        try:
            ids = np.asarray(input_ids)
        except Exception:
            raise InvalidInputError("input_ids must be an array of token ids") from None
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.size == 0:
            raise InvalidInputError(f"input_ids must have shape (batch, sequence) and not be empty; got {list(ids.shape)}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InvalidInputError(f"input_ids must be integers; got dtype {ids.dtype}")
        ids = ids.astype(np.int64, copy=False)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise InvalidInputError(
                f"token id {hi if hi >= self.vocab_size else lo} is outside the vocabulary [0, {self.vocab_size}) "
                f"of {self.base_dir}; tokenize with the base model's tokenizer"
            )
        if self.max_positions and ids.shape[1] > self.max_positions:
            raise InvalidInputError(
                f"sequence length {ids.shape[1]} exceeds the model's {self.max_positions} positions; shorten the input"
            )
        if attention_mask is None:
            mask = np.ones_like(ids)
        else:
            try:
                mask = np.asarray(attention_mask)
            except Exception:
                raise InvalidInputError("attention_mask must be an array of 0/1 (batch, sequence)") from None
            if mask.ndim == 1:
                mask = mask[None, :]
            if mask.shape != ids.shape:
                raise InvalidInputError(
                    f"attention_mask has shape {list(mask.shape)} but input_ids has {list(ids.shape)}; they must match"
                )
            if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_):
                raise InvalidInputError(f"attention_mask must be 0/1 integers; got dtype {mask.dtype}")
            mask = mask.astype(np.int64, copy=False)
            if mask.size and (mask.min() < 0 or mask.max() > 1):
                raise InvalidInputError("attention_mask must hold only 0 (padding) and 1 (token)")
        return np.ascontiguousarray(ids), np.ascontiguousarray(mask)

    # ---------------------------------------------------------------- calls
    def _slot_binding(self, plan: _Plan):
        """An IOBinding with the adapter's slot OrtValues bound (reused for every step of a generation)."""
        binding = self.session.io_binding()
        for slot_name, value in (*plan.every.items(), *plan.prefill.items()):
            binding.bind_ortvalue_input(slot_name, value)
        return binding

    def _run(self, plan: _Plan, ids, mask, position_ids=None, past=None, presents: bool = False, binding=None) -> list:
        """One session run; adapter slots and the KV cache stay OrtValues (IOBinding).

        ``past`` None is a prefill: the cache starts as the adapter's (a prefix) or empty.
        ``mask``/``position_ids`` already count the virtual tokens (``_virtual_inputs``).
        ``binding``: one from ``_slot_binding(plan)`` to reuse (slots stay bound).
        Returns OrtValues: the task output, then the presents when asked for.
        """
        binding = binding or self._slot_binding(plan)
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        if self.cache:
            binding.bind_cpu_input("position_ids", position_ids)
            if past is None:  # prefill: the adapter's cache start repeated over the batch, else empty
                empty = np.zeros((ids.shape[0], self.cache["num_kv_heads"], 0, self.cache["head_dim"]), np.float32)
                for name in self._past_names:
                    start = plan.past.get(name)
                    binding.bind_cpu_input(name, empty if start is None else np.repeat(start, ids.shape[0], axis=0))
            else:
                for name, value in zip(self._past_names, past):
                    binding.bind_ortvalue_input(name, value)
        binding.bind_output(self.output_name, *self._device)
        if presents:
            for name in self._present_names:
                binding.bind_output(name, *self._device)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _virtual_inputs(self, plan: _Plan, mask, generate: bool):
        """The prefill's attention mask and positions with the adapter's virtual tokens (HF PEFT's semantics).

        The mask gets one 1 per virtual token in front. Positions: a forward call, or any
        call with tokens put before the input (prompt tuning), counts every token from the
        cache start (n_past); generation otherwise takes them from the mask (left padding
        counts from 0) shifted by the virtual tokens in the cache (prefix tuning).
        """
        batch, length = mask.shape
        full = np.concatenate([np.ones((batch, plan.n_virtual), np.int64), mask], axis=1) if plan.n_virtual else mask
        if not self.cache:
            return full, None
        if generate and not plan.n_prepend:
            positions = mask.cumsum(-1) - 1
            positions[mask == 0] = 1  # as transformers fills padded positions
            return full, positions + plan.n_past
        positions = np.arange(plan.n_past, plan.n_past + plan.n_prepend + length, dtype=np.int64)
        return full, np.broadcast_to(positions, (batch, positions.size)).copy()

    def _check_length(self, plan: _Plan, length: int, new_tokens: int = 0, what: str = "") -> None:
        if self.max_positions and (total := length + plan.n_virtual + new_tokens) > self.max_positions:
            raise InvalidInputError(
                f"prompt of {length} tokens + the adapter's {plan.n_virtual} virtual tokens{what} = {total} exceeds the "
                f"model's {self.max_positions} positions; shorten the prompt" + (" or lower max_new_tokens" if what else "")
            )

    def forward(self, input_ids, attention_mask=None, adapter=None) -> dict:
        """Run the base with ``adapter`` bound (None: the base model), no KV cache.

        Returns transformers-named numpy outputs: ``{'logits': ...}`` or
        ``{'last_hidden_state': ...}``. Positions are 0..T-1 as in a transformers
        forward call. An adapter with virtual tokens follows HF PEFT: a prompt's tokens
        come first in the output (B, n + T, ...); a prefix's keys/values shift positions by n.
        """
        ids, mask = self._check_ids(input_ids, attention_mask)
        with self._using(adapter) as plan:
            self._check_length(plan, ids.shape[1])
            full, positions = self._virtual_inputs(plan, mask, generate=False)
            result = self._run(plan, ids, full, positions)[0].numpy()
        return {self.output_name: result}

    def stream(self, input_ids, attention_mask=None, adapter=None, **generation):
        """Generate token by token: yields the new token of every row, (B,) int64, per step.

        Takes the arguments of ``generate``. Rows that finished (end-of-sequence or a
        stop string) get ``pad_token_id`` until every row is done. The adapter is held
        from the first ``next()`` until the generator finishes, so it cannot be unloaded
        mid-generation (unloaded before the first ``next()``, that call raises UnknownAdapterError).
        """
        if not self.cache:
            raise ConfigError(f"{self.base_dir}: a {self.task} export has no text generation; export a causal-lm adapter")
        ids, mask = self._check_ids(input_ids, attention_mask)
        cfg = self._generation_config(generation)
        with self._using(adapter) as plan:  # an unknown adapter or too many virtual tokens fail now, not at next()
            # the last new token is never fed back: it needs no position
            self._check_length(plan, ids.shape[1], cfg.max_new_tokens - 1,
                               f" + max_new_tokens {cfg.max_new_tokens} - 1 (the last token is not fed back)")
        if (mask.sum(-1) == 0).any():
            raise InvalidInputError("a prompt row has no tokens (its attention_mask is all 0)")
        padding = np.argmax(mask != 0, axis=1)  # left-padding length per row: each row's first real token
        stops = _StopStrings(self, cfg.stop, padding) if cfg.stop else None  # needs the tokenizer: fail now
        return self._stream(ids, mask, padding, adapter, cfg, stops)

    def _steps(self, plan: _Plan, ids, mask):
        """Prefill, then one cached step per token sent in: yields each step's last-position logits (B, V).

        ``steps.send(tokens)`` ((B,) int64) runs the next step; the KV cache stays in OrtValues.
        """
        full, positions = self._virtual_inputs(plan, mask, generate=True)
        binding = self._slot_binding(plan)
        if self._keep_last is not None:  # the last position's logits only (forward keeps the default, all)
            binding.bind_ortvalue_input(LOGITS_TO_KEEP, self._keep_last)
        outputs = self._run(plan, ids, full, positions, None, presents=True, binding=binding)
        for name in plan.prefill:  # decode steps add no virtual tokens
            binding.bind_ortvalue_input(name, self._neutral[name])
        while True:
            token = yield outputs[0].numpy()[:, -1, :]
            full = np.concatenate([full, np.ones_like(token)[:, None]], axis=1)
            positions = positions[:, -1:] + 1
            outputs = self._run(plan, token[:, None], full, positions, outputs[1:], presents=True, binding=binding)

    def _stream(self, ids, mask, padding, adapter, cfg, stops):
        rng = np.random.default_rng(cfg.seed)
        eos = np.array(cfg.eos_token_id, dtype=np.int64)
        sequences, finished = ids, np.zeros(ids.shape[0], dtype=bool)
        with self._using(adapter) as plan:
            steps = self._steps(plan, ids, mask)
            logits = next(steps)
            for step in range(cfg.max_new_tokens):
                token = next_tokens(logits, sequences, cfg, rng, ignore=padding)
                token = np.where(finished, cfg.pad_token_id, token)
                sequences = np.concatenate([sequences, token[:, None]], axis=1)
                yield token
                finished |= np.isin(token, eos)
                if stops is not None:
                    finished |= stops.hit(sequences, finished)
                if finished.all() or step + 1 == cfg.max_new_tokens:
                    return
                logits = steps.send(token)

    def generate(self, input_ids, attention_mask=None, adapter=None, max_new_tokens=32, do_sample=False,
                 temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0, seed=None,
                 eos_token_id=None, pad_token_id=None, stop=None, **unknown) -> np.ndarray:
        """Generate with ``adapter``; returns ids (B, T + new), the prompt included.

        Greedy by default; ``do_sample`` with ``temperature``/``top_k``/``top_p`` and a
        ``seed`` for reproducible sampling. ``eos_token_id`` defaults to the model's;
        ``stop`` strings need the exported tokenizer. Batches are left-padded.
        """
        args = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                    top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id, stop=stop, **unknown)
        ids, _ = self._check_ids(input_ids, attention_mask)
        tokens = [t[:, None] for t in self.stream(input_ids, attention_mask, adapter, **args)]
        return np.concatenate([ids, *tokens], axis=1)

    def _generation_config(self, generation: dict) -> GenerationConfig:
        known = set(GenerationConfig.__dataclass_fields__)
        unknown = sorted(set(generation) - known)
        if unknown:
            raise ConfigError(f"unknown generation argument(s) {', '.join(unknown)}; use {', '.join(sorted(known))}")
        args = {k: v for k, v in generation.items() if v is not None}
        eos = args.pop("eos_token_id", self.manifest.get("eos_token_id") or [])
        args["eos_token_id"] = list(np.ravel(eos)) if isinstance(eos, (list, tuple, np.ndarray)) else [eos]
        if "pad_token_id" not in args:  # the model's, when it is a token id (some configs say -1), else the first eos
            args["pad_token_id"] = self._pad_id(args["eos_token_id"])
        stop = args.get("stop") or []
        args["stop"] = [stop] if isinstance(stop, str) else list(stop) if isinstance(stop, (list, tuple)) else stop
        cfg = GenerationConfig(**args)
        cfg.check(self.vocab_size)
        return cfg

    # ---------------------------------------------------------------- text
    @property
    def tokenizer(self) -> TextTokenizer:
        """The tokenizer exported with the base (``tokenizers`` package), loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = TextTokenizer(self.base_dir, padding_side="left" if self.cache else "right",
                                            pad_id=self.pad_token_id)
        return self._tokenizer

    def _prompt_ids(self, prompt, chat: bool):
        """(ids, mask, single): the prompt(s) tokenized, left-padded; ``single``: one prompt, not a list of them."""
        single = isinstance(prompt, str) or (chat and isinstance(prompt, list) and prompt and isinstance(prompt[0], dict))
        if not (single or (isinstance(prompt, (list, tuple)) and prompt
                           and all(isinstance(p, list if chat and not isinstance(p, str) else str) for p in prompt))):
            raise InvalidInputError(f"prompt must be a string or a non-empty list of strings{' or of chat messages' if chat else ''}; "
                                    f"got {type(prompt).__name__}")
        tok = self.tokenizer
        prompts = [prompt] if single else list(prompt)
        if chat:
            texts = [tok.apply_chat_template(p if isinstance(p, list) else [{"role": "user", "content": p}]) for p in prompts]
            ids, mask = tok.encode(texts, add_special_tokens=False, pad_id=self._pad_id(), padding_side="left")
        else:
            ids, mask = tok.encode(prompts, pad_id=self._pad_id(), padding_side="left")
        if ids.size == 0 or (mask.sum(-1) == 0).any():
            raise InvalidInputError("a prompt is empty (it has no tokens); give some text")
        return ids, mask, single

    @property
    def pad_token_id(self) -> int:
        """The token that pads batches and fills finished rows: the model's, else its first end-of-sequence token."""
        return self._pad_id()

    def _pad_id(self, eos=None) -> int:
        pad = self.manifest.get("pad_token_id")
        if isinstance(pad, int) and 0 <= pad < self.vocab_size:
            return pad
        eos = self.manifest.get("eos_token_id") if eos is None else eos
        return int((eos or [0])[0])

    def stream_text(self, prompt, adapter=None, chat: bool = False, **generation):
        """Yield the generated text piece by piece for one prompt (or chat messages with ``chat=True``)."""
        ids, mask, _ = self._prompt_ids(prompt, chat)
        if ids.shape[0] != 1:
            raise ConfigError("stream_text takes one prompt; use generate_text for a batch")
        new, shown, text = [], "", ""
        for token in self.stream(ids, mask, adapter, **generation):
            new.append(int(token[0]))
            text = self.tokenizer.decode(new)
            if text.startswith(shown) and len(text) > len(shown) and not text.endswith("\ufffd"):
                yield text[len(shown):]
                shown = text
        if text.startswith(shown) and len(text) > len(shown):  # held back: a character still incomplete at the end
            yield text[len(shown):]

    def generate_text(self, prompt, adapter=None, chat: bool = False, **generation):
        """Generated text (without the prompt) for a prompt or a list of prompts."""
        ids, mask, single = self._prompt_ids(prompt, chat)
        out = self.generate(ids, mask, adapter, **generation)
        texts = [self.tokenizer.decode(row[ids.shape[1]:]) for row in out]
        return texts[0] if single else texts

    def labels(self, adapter) -> list | None:
        """Label names saved with a classification adapter, if any (a --merge export's: its base's)."""
        if self._serves_base(adapter):
            return self.manifest.get("labels")
        return self._get(adapter).manifest.get("labels")

    def _serves_base(self, name) -> bool:
        """No adapter, or the one a --merge export folded into the base: calls run the base graph as it is."""
        return name is None or name == self.manifest.get("merged_adapter")


def _not_an_export(path: str) -> ArtifactNotFoundError:
    """What to do with a folder that holds no export: an adapter folder gets the export command that fits it."""
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        out = os.path.normpath(path) + "-onnx"
        return ArtifactNotFoundError(f"{path}: is an adapter folder (HF PEFT format), not an export; export it first "
                                     f"with `edgepeft export --adapter {path} --out {out}`, then use {out}")
    if os.path.isfile(os.path.join(path, "adapter.json")):
        out, name = os.path.dirname(os.path.dirname(os.path.abspath(path))), os.path.basename(os.path.normpath(path))
        return ArtifactNotFoundError(f"{path}: is one adapter of the export {out}; open {out} and pick adapter {name!r}")
    return ArtifactNotFoundError(f"{os.path.join(path, BASE_DIR)}: no exported base here; run "
                                 f"`edgepeft export --adapter DIR --out {path}` first")


class _StopStrings:
    """Marks rows whose newest token completes a stop string (decoded with the exported tokenizer).

    As transformers' ``StopStringCriteria``: special tokens count as their text, and a
    match may begin in the prompt; it must end in a new token. Called after every step,
    so only the newest token can complete a match: each call decodes the last few tokens
    of each unfinished row, not the whole text.
    """

    def __init__(self, runtime: Runtime, stops: list, starts: np.ndarray):
        self.tokenizer = runtime.tokenizer
        self.stops = stops
        self.lookback = max(len(s) for s in stops)  # tokens before the newest one a match can reach back over
        self.starts = starts  # each row's first real token: padding is no text

    def hit(self, sequences: np.ndarray, finished: np.ndarray) -> np.ndarray:
        found = np.zeros(len(sequences), dtype=bool)
        for i, (row, start) in enumerate(zip(sequences, self.starts)):
            if finished[i]:
                continue
            window = row[max(start, len(row) - 1 - self.lookback):]
            before = len(self.tokenizer.decode(window[:-1], skip_special_tokens=False))
            text = self.tokenizer.decode(window, skip_special_tokens=False)
            found[i] = any(s in text[max(0, before - len(s) + 1):] for s in self.stops)
        return found
