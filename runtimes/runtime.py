"""Runtime: one base session, many adapters staged as device-resident OrtValues.

    Runtime(OUT)
      |-- session: OUT/base/model.onnx, adapter slots are graph inputs
      |-- store (adapters.py): name -> OrtValues made once at load by running
      |             OUT/adapters/<name>/adapter.onnx, checked against the slot table
      |-- forward(input_ids, attention_mask, adapter=name)
      |     binds input_ids/attention_mask + that adapter's OrtValues (IOBinding);
      |     slots it does not fill keep the graph's neutral default
      |-- generate / stream / step_logits (decoders, generation.py): the same binding plus
      |     the KV cache (kv_cache.py): present.* become the next step's past_key_values.*, or on
      |     GroupQueryAttention graphs one fixed buffer per cache input is both
      `-- generate_text / stream_text / classify / embed (text.py): text in, text or labels out

There is no global active adapter: every call names its adapter, so concurrent calls with different adapters
never interfere. Adapter tensors are not copied per call: a single adapter's are bound as staged; a mixed batch's
are stacked once per set of adapters and cached (mixing.py).
"""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager

import numpy as np

from . import classify, decoded, text
from .access import check_readable, check_text_files, files_digest, folder_identity, located, unchanged_while
from .adapters import AdapterStore, Plan
from .mixing import Lane, Mixer, as_called, assemble, holding, row_specs, run_rows_apart
from .errors import ArtifactNotFoundError, ConfigError, InvalidInputError
from .generation import (SHORTEN, TeacherForcing, drained, generation_config, lane_steps, length_source, length_words,
                         stream_tokens)
from .inputs import check_token_inputs, check_token_types, generation_mask, step_tokens
from .kv_cache import FixedCache, bind_past
from .manifest import (BASE_DIR, BASE_MANIFEST, LOGITS_TO_KEEP, REEXPORT_BASE, TOKEN_TYPES, adapter_dirs, base_file_errors,
                       cache_names, not_an_export, read_base_manifest)
from .sentence import TEXT_FILES
from .sessions import check_providers, device_of, open_base_session, ort, run_bound
from .slot_checks import check_graph_inputs
from .values import switch


class Runtime:
    """Run an edgepeft export; see the module docstring for the lifecycle."""

    def __init__(self, path, providers=None, sess_options=None, load_adapters=True, adapter_budget_bytes=None):
        """``adapter_budget_bytes``: at most that many bytes of adapter tensors stay staged; the least recently
        used are evicted and restaged when a call names them again (None: every adapter stays staged)."""
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"Runtime takes an export's folder (a path), got {type(path).__name__}")
        self.path = located(path)  # the export stays where it was opened when the app changes directory
        if not os.path.isdir(os.path.join(self.path, BASE_DIR)):
            check_readable(os.path.join(path, BASE_DIR))  # OUT another user's: not "no exported base here"
            raise not_an_export(os.fspath(path))
        try:
            base, adapters = os.path.join(self.path, BASE_DIR), switch(load_adapters, "load_adapters")
            # one export's manifest, graph, weights and adapters (re-pointed to a new base renamed in meanwhile)
            unchanged_while(base, lambda: self._open_base(base, providers, sess_options, adapter_budget_bytes, adapters))
        except BaseException:  # a failed open holds nothing: the error's traceback (kept by the app) reaches self
            if "store" in vars(self):  # and the store, with the adapters staged before the one that failed
                vars(self.store).clear()
            vars(self).clear()
            raise

    def __reduce__(self):  # ONNX Runtime's TypeError named no fix (multiprocessing's spawn pickles what it hands over)
        raise ConfigError(f"a Runtime cannot be pickled: its ONNX Runtime sessions live in this process; open one in "
                          f"each process, Runtime({self.path!r})")

    @classmethod
    def from_base_dir(cls, base_dir, providers=None, sess_options=None) -> "Runtime":
        """A runtime over a bare base folder with no adapters loaded (export validation uses it on staged folders)."""
        rt = cls.__new__(cls)
        rt.path = os.path.dirname(located(base_dir))
        rt._open_base(base_dir, providers, sess_options, None)
        return rt

    def _open_base(self, base_dir, providers, sess_options, budget, adapters=False):
        self.manifest, self.base_dir = read_base_manifest(base_dir), base_dir
        self.text_files_seen = folder_identity(base_dir), files_digest(base_dir, TEXT_FILES)  # read at the first text call
        providers = check_providers(providers, sess_options)
        graph = os.path.join(base_dir, self.manifest["graph"])
        if not os.path.isfile(graph):
            raise ArtifactNotFoundError(f"{graph}: base graph missing; {REEXPORT_BASE}")  # an export into OUT opens it
        cut = base_file_errors(base_dir, self.manifest, {self.manifest["graph"], self.manifest["graph"] + ".data"})
        if cut:  # ONNX Runtime's own message names an initializer and offsets, and no fix
            raise cut.pop(0)  # popped: a local holding the raised error would keep this frame alive
        self.session = open_base_session(graph, providers, sess_options)
        check_graph_inputs(self.session, self.manifest, os.path.join(base_dir, BASE_MANIFEST), graph)
        self.device = device_of(self.session)  # ONNX Runtime falls back to the CPU when CUDA cannot start
        self.slots = {s.name: s for s in self.manifest["slots"]}
        self.task = self.manifest["task"]
        self.output_name = next(iter(self.manifest["outputs"]))  # logits / last_hidden_state first
        self.cache = self.manifest.get("cache")  # KV-cache layout of decoder graphs, else None
        self.contrib = self.manifest.get("ops") == "contrib"  # GroupQueryAttention: run_rows_apart, FixedCache
        self.cache_inputs = cache_names(self.cache, "past") if self.cache else []
        self.cache_outputs = cache_names(self.cache, "present") if self.cache else []
        self.neutral = {  # decode steps bind these for slots filled at prefill only (a zero-length prompt)
            s.name: ort.OrtValue.ortvalue_from_numpy(np.zeros([0 if isinstance(d, str) else d for d in s.shape], s.dtype),
                                                     *self.device)
            for s in self.manifest["slots"] if s.phase == "prefill" and not s.target
        }
        self.input_names = list(self.manifest["inputs"])
        # Generation binds 1 to LOGITS_TO_KEEP (forward keeps the graph's default, 0 = all positions);
        # IOBinding binds an input that has a default only as an OrtValue.
        self.keep_last_name = LOGITS_TO_KEEP
        self.keep_last = (ort.OrtValue.ortvalue_from_numpy(np.array(1, dtype=np.int64))
                          if LOGITS_TO_KEEP in self.manifest["inputs"] else None)
        self.vocab_size = int(self.manifest["vocab_size"])
        self.max_positions = self.manifest.get("max_positions")
        # a seq-cls BERT's token types (base_checks: given where the graph takes them), else None: it takes none
        self.type_vocab_size = self.manifest["type_vocab_size"] if TOKEN_TYPES in self.manifest["inputs"] else None
        self.store = AdapterStore(self.manifest, base_dir, self.path, self.cache_inputs, self.device, budget)
        self.mixer = Mixer(self.store, self.device)
        self._tokenizer = None
        for d in adapter_dirs(self.path).values() if adapters else []:
            self.load_adapter(d)  # named by its folder

    # ---------------------------------------------------------------- adapters
    @property
    def adapter_names(self) -> list[str]:
        return self.store.names

    def adapter_info(self, name: str) -> dict:
        """The adapter's manifest (methods, rank, labels, source PEFT config...): a copy (restaging reads its own)."""
        return copy.deepcopy(self.store.get(name).manifest)

    def adapter_tensors(self, name: str) -> dict:
        """{slot name: OrtValue} the adapter binds as graph inputs, on the runtime's device; copies (an edit of the
        staged ones' ``numpy()`` views changed calls by name, not mixed batches, nor what a budget stages again)."""
        with self.store.using(name) as plan:
            staged = {**plan.every, **plan.prefill}
            return {k: ort.OrtValue.ortvalue_from_numpy(v.numpy().copy(), *self.device) for k, v in staged.items()}

    @property
    def resident_adapters(self) -> list[str]:
        """The adapters whose tensors are staged now, least recently used first (all of them without a budget)."""
        return self.store.resident

    def adapter_dir(self, name: str) -> str:
        """The folder the adapter was loaded from (None for one loaded from the bytes of a zip)."""
        return self.store.get(name).path

    def load_adapter(self, source, name=None) -> str:
        """Load an exported adapter (its folder in OUT/adapters, or the bytes of a zip of that folder), validate it
        against the base, stage its tensors; returns its name (None: the folder's, as ``Runtime(OUT)`` names it; a
        zip's: the name it was exported with). On any failure nothing changes: loaded adapters keep serving."""
        return self.store.load(source, name)

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter (its staged tensors go with it). Refused (AdapterInUseError) while a call is using it."""
        self.store.unload(name)

    def labels(self, adapter) -> list | None:
        """Label names saved with a classification adapter, if any (a --merge export's: its base's); a copy."""
        labels = (self.manifest if self.store.serves_base(adapter) else self.store.get(adapter).manifest).get("labels")
        return None if labels is None else list(labels)  # classify reads them: an edit of the caller's stays its own

    # ---------------------------------------------------------------- one graph run
    def slot_binding(self, plan: Plan):
        """An IOBinding with the adapter's slot OrtValues (and a mixed batch's row weights) bound, reused for
        every step of a generation."""
        binding = self.session.io_binding()
        for slot_name, value in (*plan.every.items(), *plan.prefill.items()):
            binding.bind_ortvalue_input(slot_name, value)
        for slot_name, array in plan.cpu.items():  # inputs with a default bind only as OrtValues
            binding.bind_ortvalue_input(slot_name, ort.OrtValue.ortvalue_from_numpy(array, *self.device))
        return binding

    @contextmanager
    def lanes(self, adapter, batch: int, length: int | None = None, new_tokens: int = 0, words=("", SHORTEN)):
        """Hold a call's adapters; yields its lanes: rows sharing a graph run and the Plan each binds (mixing.py).
        ``length`` (+ ``new_tokens``), where given, is checked against the positions with the adapters held: a name
        reloaded since the call checked it may take more virtual tokens (``words``: see ``_check_length``)."""
        self.virtual_positions(adapter, batch)  # a call refused here stages nothing and evicts nothing
        specs = row_specs(adapter, batch)
        with holding(self.store, self.mixer, adapter, specs) as held:
            lanes = [Lane(np.arange(batch), held)] if specs is None else self.mixer.lanes(specs, held)
            if length is not None:
                self._check_length(max(lane.plan.n_positions for lane in lanes), length, new_tokens, *words)
            yield lanes

    def run(self, plan: Plan, ids, mask, position_ids=None, past=None, presents: bool = False, binding=None,
            keep_last: bool = False, types=None) -> list:
        """One session run; adapter slots and the KV cache stay OrtValues (IOBinding).

        ``past``: see ``kv_cache.bind_past``. ``mask``/``position_ids`` count the virtual tokens (``virtual_inputs``).
        ``binding``: one from ``slot_binding(plan)`` to reuse (slots stay bound).
        ``keep_last``: logits for the last position only, where the graph takes ``logits_to_keep`` (it stays
        bound in ``binding``; rows run apart bind it per row); else the graph's default, every position.
        Returns OrtValues: the task output, then the presents when asked for (a FixedCache step: its logits only).
        """
        # GroupQueryAttention graphs are decoders': no token types to split with the rows
        if self.contrib and ids.shape[0] > 1 and ids.shape[1] > 1 and (past is not None or plan.past):
            return run_rows_apart(self, plan, ids, mask, position_ids, past, presents, keep_last)
        binding = binding or self.slot_binding(plan)
        if keep_last and self.keep_last is not None:
            binding.bind_ortvalue_input(self.keep_last_name, self.keep_last)
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        if self.type_vocab_size is not None:  # a seq-cls BERT's: zeros where the call gives none
            binding.bind_cpu_input(TOKEN_TYPES, np.zeros_like(ids) if types is None else types)
        fixed = isinstance(past, FixedCache)  # it binds the logits too, once
        if not fixed:
            binding.bind_output(self.output_name, *self.device)  # first: outputs[0] whatever else is bound
        if self.cache:
            binding.bind_cpu_input("position_ids", position_ids)
            bind_past(self, binding, plan, ids.shape[0], mask.shape[1], past)
        if presents:
            for name in self.cache_outputs:
                binding.bind_output(name, *self.device)
        run_bound(self.session, binding, self.base_dir, mask.shape)
        return [past.logits] if fixed else binding.get_outputs()

    def virtual_inputs(self, plan: Plan, mask, generate: bool):
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

    def _check_call(self, adapter, batch: int, length: int, new_tokens: int = 0, what: str = "", fix: str = SHORTEN) -> None:
        """What a call's first step would refuse, staging nothing: an unknown adapter, a meaningless mix, too many positions."""
        self._check_length(self.virtual_positions(adapter, batch), length, new_tokens, what, fix)

    def virtual_positions(self, adapter, batch: int) -> int:
        """The most positions a call's adapters take besides the text's (a prompt's or prefix's virtual tokens);
        an unknown adapter or a combination without a meaning raises."""
        specs = row_specs(adapter, batch)
        names = [adapter] if specs is None else self.mixer.names(specs)
        known = {n: self.store.get(n) for n in names if not self.store.serves_base(n)}
        if specs is not None:
            self.mixer.check(specs, known)
        return max((a.n_positions for a in known.values()), default=0)

    def _check_length(self, n_virtual: int, length: int, new_tokens: int = 0, what: str = "", fix: str = SHORTEN) -> None:
        """``what``: the new tokens in words; ``fix``: what to do, ``{fits}`` in it the longest max_length that fits."""
        if self.max_positions and (total := length + n_virtual + new_tokens) > self.max_positions:
            raise InvalidInputError(f"prompt of {length} tokens + the adapter's {n_virtual} virtual tokens{what} = {total} "
                                    f"exceeds the model's {self.max_positions} positions; "
                                    f"{fix.format(fits=self.max_positions - n_virtual + 1)}")

    def _inputs(self, input_ids, attention_mask):
        return check_token_inputs(input_ids, attention_mask, self.vocab_size, self.max_positions, self.base_dir)

    # ---------------------------------------------------------------- calls
    def forward(self, input_ids, attention_mask=None, adapter=None, token_type_ids=None) -> dict:
        """Run the base with ``adapter`` bound (None: the base model), no KV cache.

        Returns transformers-named numpy outputs: ``{'logits': ...}`` or
        ``{'last_hidden_state': ...}``. Positions are 0..T-1 as in a transformers
        forward call. An adapter with virtual tokens follows HF PEFT: a prompt's tokens
        come first in the output (B, n + T, ...); a prefix's keys/values shift positions by n. ``token_type_ids``:
        BERT's segments (a text pair's second is 1) where the export takes them (``type_vocab_size`` of them), else 0.
        """
        ids, mask = self._inputs(input_ids, attention_mask)
        types = check_token_types(token_type_ids, ids, self.type_vocab_size, self.base_dir, self.manifest)
        parts = []
        with self.lanes(adapter, *ids.shape) as lanes:
            for lane in lanes:
                rows_ids, rows_mask, rows_types = (ids, mask, types) if len(lanes) == 1 else (
                    ids[lane.rows], mask[lane.rows], None if types is None else types[lane.rows])
                full, positions = self.virtual_inputs(lane.plan, rows_mask, generate=False)
                out = self.run(lane.plan, rows_ids, full, positions, types=rows_types)[0].numpy()
                if lane.plan.columns is not None:  # a head per row: each row's own output columns
                    out = [out[i, start:start + width] for i, (start, width) in enumerate(lane.plan.columns)]
                parts.append((lane.rows, out))
        return {self.output_name: assemble(parts, ids.shape[0])}

    def _decoder_inputs(self, input_ids, attention_mask, pad, eos):
        """``pad``: the padding id the call or the model gives (None: none), which tells left padding without a mask."""
        if not self.cache:
            raise ConfigError(f"{self.base_dir}: a {self.task} export has no text generation; export a causal-lm adapter")
        ids, mask = self._inputs(input_ids, attention_mask)
        return ids, generation_mask(ids, None if attention_mask is None else mask, pad, eos)

    def step_logits(self, input_ids, attention_mask=None, adapter=None):
        """Teacher-forced decoding: a generator whose first ``next()`` runs the prefill and yields the last
        position's logits (B, V); each ``send(tokens)`` ((B,) int64) feeds those tokens through the KV cache
        and yields the next logits. The adapter is held until the generator is closed or collected."""
        ids, mask = self._decoder_inputs(input_ids, attention_mask, self.model_pad_id,
                                        self.manifest.get("eos_token_id") or [])
        adapter = as_called(adapter)  # read at the first next(): an app's list edited meanwhile is its own
        self._check_call(adapter, ids.shape[0], ids.shape[1])  # an unknown adapter fails here, at the call
        lanes = {}

        def steps():
            with self.lanes(adapter, *ids.shape) as held:
                lanes["held"] = held
                inner = lane_steps(self, held, ids, mask)
                token = yield next(inner)
                while True:
                    token = yield inner.send(token)

        def check(token, sent: int) -> np.ndarray:  # every token sent takes a position
            n_virtual = max(lane.plan.n_positions for lane in lanes["held"])
            self._check_length(n_virtual, ids.shape[1], sent, f" + {sent} token(s) sent")
            return step_tokens(token, ids.shape[0], self.vocab_size)

        return TeacherForcing(steps(), check)

    def stream(self, input_ids, attention_mask=None, adapter=None, **generation):
        """Generate token by token: yields the new token of every row, (B,) int64, per step.

        Takes the arguments of ``generate``. Rows that finished (end-of-sequence or a stop string) get ``pad_token_id``
        until every row is done. The adapter is held from the first ``next()`` until the generator finishes: it cannot
        be unloaded mid-generation (unloaded before the first ``next()``, that call raises UnknownAdapterError).
        """
        cfg, adapter = self.generation_config(**generation), as_called(adapter)  # an edit before the first next(): the app's
        pad = cfg.pad_token_id if generation.get("pad_token_id") is not None else self.model_pad_id  # not an eos fallback
        ids, mask = self._decoder_inputs(input_ids, attention_mask, pad, cfg.eos_token_id)
        source, virtual = length_source(self, generation), self.virtual_positions(adapter, ids.shape[0])
        defaulted = cfg.max_new_tokens is None and (cfg.max_length is None or bool(source))  # fits the room: 32, or
        cfg = cfg.for_prompt(ids.shape[1], self.max_positions and self.max_positions - ids.shape[1] - virtual,
                             fit=defaulted)  # the model's max_length (Llama-2's: its context, virtual tokens beyond)
        said, fix = length_words(generation)  # the check once held names them too: an adapter reloaded since may not fit
        words = (f" + max_new_tokens {cfg.max_new_tokens}{source or said} - 1 (the last token is not fed back)", fix)
        self._check_length(virtual, ids.shape[1], cfg.max_new_tokens - 1, *(("", SHORTEN) if defaulted else words))
        padding = np.argmax(mask != 0, axis=1)  # left-padding length per row: each row's first real token
        stops = decoded.StopStrings.of(self, cfg.stop, padding, generation.get("stop") is None) if cfg.stop else None
        return stream_tokens(self, ids, mask, padding, adapter, cfg, stops, words)  # checked again once held

    def generate(self, input_ids, attention_mask=None, adapter=None, **generation) -> np.ndarray:
        """Generate with ``adapter``; returns ids (B, T + new), the prompt included.

        ``generation``: transformers' names: max_new_tokens (else max_length, else 32), min_new_tokens, min_length,
        do_sample, temperature, top_k, top_p, min_p, repetition_penalty, no_repeat_ngram_size, eos_token_id,
        pad_token_id; and seed (reproducible sampling), stop (strings; need the exported tokenizer). What a call
        leaves None (or out: as transformers) comes from the model's generation_config.json, else transformers' defaults
        (greedy). Batches are left-padded.
        """
        ids, _ = self._inputs(input_ids, attention_mask)
        tokens, _ = drained(self.stream(input_ids, attention_mask, adapter, **generation))
        return np.concatenate([ids, *(t[:, None] for t in tokens)], axis=1)

    def generation_config(self, **generation):
        """The settings ``generate`` would use for these arguments (the model's defaults, eos and padding filled in)."""
        return generation_config(self, generation)

    # ---------------------------------------------------------------- text
    @property
    def tokenizer(self) -> text.TextTokenizer:
        """The tokenizer exported with the base (``tokenizers`` package), loaded on first use.
        ``rt.tokenizer.encode(texts)`` -> ``(input_ids, attention_mask)``; ``rt.tokenizer.decode(ids)`` -> text."""
        if self._tokenizer is None:
            check_text_files(self.base_dir, TEXT_FILES, *self.text_files_seen)  # another export's tokenizer, or none
            if cut := base_file_errors(self.base_dir, self.manifest, TEXT_FILES):  # a copy's: other ids, silently
                raise cut.pop(0)
            self._tokenizer = text.TextTokenizer(self.base_dir, padding_side="left" if self.cache else "right",
                                                 pad_id=self.pad_token_id, max_positions=self.max_positions,
                                                 pairs=self.task == "seq-cls", vocab_size=self.vocab_size)
        return self._tokenizer

    @property
    def pad_token_id(self) -> int:
        """The token that pads batches and fills finished rows: the model's, else its first end-of-sequence token."""
        return self.pad_id_or(self.manifest.get("eos_token_id"))

    @property
    def model_pad_id(self) -> int | None:
        """The model's padding token when it is a token id (some configs say -1, some name none)."""
        pad = self.manifest.get("pad_token_id")
        return pad if isinstance(pad, int) and 0 <= pad < self.vocab_size else None

    def pad_id_or(self, eos) -> int:
        """The model's padding token, else the first of ``eos`` in the vocabulary (another never ends a row), else 0."""
        pad = self.model_pad_id
        return next((int(e) for e in eos or [] if 0 <= e < self.vocab_size), 0) if pad is None else pad

    def generate_text(self, prompt, adapter=None, chat: bool = False, **generation):
        """Generated text (without the prompt) for a prompt or a list of prompts (chat messages with ``chat=True``)."""
        return text.generate_text(self, prompt, adapter, chat, **generation)

    def stream_text(self, prompt, adapter=None, chat: bool = False, **generation):
        """Yield the generated text piece by piece for one prompt (or chat messages with ``chat=True``)."""
        return text.stream_text(self, prompt, adapter, chat, **generation)

    def classify(self, texts, adapter=None, truncation: bool = False):
        """``{"label", "score", "scores"}`` for a text or a text pair (a list of them for a list); seq-cls exports.
        A pair: ``{"text": ..., "text_pair": ...}``, or ``(text, text_pair)`` in a list; ``truncation``: as the
        pipeline's (classify.py)."""
        return classify.classify(self, texts, adapter, truncation)

    def embed(self, texts, adapter=None, normalize: bool = True, prompt_name=None, prompt=None) -> np.ndarray:
        """Embeddings as sentence-transformers' ``encode`` gives them (its config's pooling, prompts, truncate_dim),
        L2-normalized unless ``normalize=False``: (hidden,) for a text or (B, hidden); feature-extraction exports."""
        return text.embed(self, texts, adapter, normalize, prompt_name, prompt)
