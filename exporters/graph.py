"""Build ONNX graphs: the frozen base with adapter slots as inputs, and adapter graphs.

    input_ids, attention_mask, [position_ids, logits_to_keep, past_key_values.*], slot_1 ... slot_n
          |                    |                                   |
          v                    v                                   v (slot modules read their feeds)
    transformers model with slot layers --> logits / last_hidden_state, [present.*]

Decoders exported for causal-LM get KV-cache I/O: one graph serves prefill (past
length 0) and decode (past length > 0), traced with past length 4.

Slot inputs also get an initializer of the same name holding the neutral value,
which makes them optional: a session that binds no slot runs the exact base model.
``logits_to_keep`` defaults to 0 (logits for every position), so a caller that does
not know it gets a plain forward's output.
"""
from __future__ import annotations

import inspect
import os
import re
import warnings
from contextlib import contextmanager

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from edgepeft.exporters.shapes import simplify_shapes
from edgepeft.exporters.tied import share_tied_tables
from edgepeft.errors import UnsupportedModelError, first_line
from edgepeft.files import usual_permissions
from edgepeft.models import DECODERS, ENCODERS, cache_kwargs, call_kwargs, output_cache, reads_token_types
from edgepeft.runtimes.manifest import (
    LOGITS_TO_KEEP, TOKEN_TYPES, PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE, TASK_OUTPUTS, cache_names,
)

OPSET = 18
IR_VERSION = 9  # ONNX Runtime 1.20+ reads IR 9 (opset 18 needs IR >= 8); base and adapter graphs alike


def cache_manifest(layout: dict) -> dict:
    return {**layout, "past_key": PAST_KEY, "past_value": PAST_VALUE, "present_key": PRESENT_KEY, "present_value": PRESENT_VALUE}


class SlotGraph(torch.nn.Module):
    """The model as traced for export: cache and slot tensors arrive as forward arguments."""

    def __init__(self, model, feeds: dict, task: str, cache: dict | None = None, output_axis: str | None = None,
                 shift: tuple[str, int] | None = None):
        """``output_axis``: the symbolic size of a classifier's output (its label count, from a head slot).
        ``shift``: (slot, axis) of a slot whose tokens come before the input's keys inside the graph (an
        encoder's prefix, the slot table's ``position_axis``): the tokens' positions start after them."""
        super().__init__()
        self.model = model
        self.slot_names = list(feeds)
        self._feeds = [feeds[n] for n in self.slot_names]  # (slot module, role) per slot
        # A slot module that embeds input_ids itself (a prompt before the tokens): the model gets inputs_embeds.
        self.embedder = next((m for m, _ in self._feeds if getattr(m, "embeds_input_ids", False)), None)
        self.shift = (self.slot_names.index(shift[0]), shift[1]) if shift else None
        self.output_name = TASK_OUTPUTS[task]
        self.cache = cache_manifest(cache) if cache else None
        self.kwargs = {} if cache else call_kwargs(model.config)
        # Generation needs the last position's logits only: a cached graph takes LOGITS_TO_KEEP
        # when the model does (transformers' causal LMs), so a prefill does not project every
        # prompt position onto the vocabulary.
        self.keep = bool(cache) and LOGITS_TO_KEEP in inspect.signature(model.forward).parameters
        # A decoder classifier given inputs_embeds cannot find each row's last non-pad token (transformers
        # then takes the last position): with a prompt slot the graph pools as transformers does from input_ids.
        self.pools_from_ids = self.embedder is not None and task == "seq-cls" and model.config.model_type in DECODERS
        self.encoder = model.config.model_type in ENCODERS
        # a classifier reading two segments (a cross-encoder's query and passage): BERT's token types as an input
        self.types = reads_token_types(model.config, task)
        self.task = task
        self.output_axis = output_axis

    def io_table(self) -> tuple[dict, dict]:
        """({input: {axis: symbolic name}}, {output: ...}) in graph order, slots left out: the one place the
        graph's I/O names and axes are declared (the trace and the manifest both read it)."""
        tokens = {0: "batch", 1: "sequence"}
        # past and/or a prompt's n ones come before the ids' columns
        longer = self.cache is not None or self.embedder is not None
        inputs = {"input_ids": tokens, "attention_mask": {0: "batch", 1: "total_sequence"} if longer else tokens}
        if self.types:
            inputs[TOKEN_TYPES] = tokens
        if self.cache:
            # A prompt puts its virtual tokens before input_ids: positions may be longer than the ids.
            # Otherwise they are as long, and one name lets the shape pass prove the rotary products' dims.
            inputs["position_ids"] = {0: "batch", 1: "position_sequence" if self.embedder is not None else "sequence"}
            if self.keep:
                inputs[LOGITS_TO_KEEP] = {}
            inputs.update({n: {0: "batch", 2: "past_sequence"} for n in cache_names(self.cache, "past")})
        if self.task == "seq-cls":
            output = {0: "batch", 1: self.output_axis} if self.output_axis else {0: "batch"}
        elif self.keep:
            output = {0: "batch", 1: "kept_sequence"}
        else:  # a prompt's n positions come first in the output
            output = {0: "batch", 1: "total_sequence" if self.embedder is not None else "sequence"}
        outputs = {self.output_name: output}
        if self.cache:
            outputs.update({n: {0: "batch", 2: "total_sequence"} for n in cache_names(self.cache, "present")})
        return inputs, outputs

    @property
    def input_names(self) -> list[str]:
        return [*self.io_table()[0], *self.slot_names]

    @property
    def output_names(self) -> list[str]:
        return list(self.io_table()[1])

    def forward(self, input_ids, attention_mask, *rest):
        n_past = 2 * self.cache["num_layers"] if self.cache else 0
        extra = {}
        types, rest = (rest[0], rest[1:]) if self.types else (None, rest)
        if self.cache:
            from transformers import DynamicCache

            position_ids, rest = rest[0], rest[1:]
            if self.keep:
                keep, rest = rest[0], rest[1:]
            past, rest = rest[:n_past], rest[n_past:]
            cache = DynamicCache(config=self.model.config)
            for layer in range(self.cache["num_layers"]):  # past: (B, kv_heads, P, head_dim) each
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            cache.graph_inputs = past  # the inputs themselves: GroupQueryAttention appends (contrib_ops.py)
            extra = {"position_ids": position_ids, **cache_kwargs(self.model, cache)}
        for (module, role), value in zip(self._feeds, rest):
            module.feed[role] = value
        tokens = {"inputs_embeds": self.embedder(input_ids)} if self.embedder is not None else {"input_ids": input_ids}
        if self.pools_from_ids:
            return self._classify(input_ids, tokens["inputs_embeds"], attention_mask)
        first = next(iter(tokens.values()))  # (B, T) ids or (B, T, H) embeddings
        if self.keep:  # a cached export only
            extra[LOGITS_TO_KEEP] = kept_positions(keep, first.shape[1])
        # transformers takes a 4D mask as it is; built here, its dims keep the inputs' names (``causal_mask``).
        # Without a cache, positions are passed too: transformers' default (0 .. T-1) comes from arange.
        if self.encoder:
            # the shifting slot's length along its axis (0 for the neutral value), traced from the input's shape
            offset = rest[self.shift[0]].shape[self.shift[1]] if self.shift else None
            extra.update(encoder_positions(first, offset, types))
            attention_mask = padding_mask(attention_mask, first)
        else:  # every layer full attention: check_exportable
            if not self.cache:
                extra["position_ids"] = counted_positions(first)
            if not getattr(self.model, "padding_mask_only", False):  # contrib_ops: the kernel is causal itself
                attention_mask = causal_mask(attention_mask, first)
        out = self.model(**tokens, attention_mask=attention_mask, return_dict=True, **self.kwargs, **extra)
        result = getattr(out, self.output_name)
        if not self.cache:
            return result
        presents = []
        for layer in output_cache(out).layers:  # (B, kv_heads, P + T, head_dim) each
            presents += [layer.keys, layer.values]
        return (result, *presents)

    def _classify(self, input_ids, embeds, attention_mask):
        """A decoder classifier's logits at each row's last non-pad token, as transformers finds it from input_ids.

        With a prompt bound (n virtual tokens first) the last position, as HF PEFT's prompt tuning gets
        from transformers (which cannot see padding in inputs_embeds). Traced without Python branches.
        """
        body = getattr(self.model, self.model.base_model_prefix)
        hidden = body(inputs_embeds=embeds, attention_mask=attention_mask, return_dict=True, **self.kwargs).last_hidden_state
        logits = self.model.score(hidden)  # (B, n + T, labels)
        virtual = torch.ones_like(attention_mask[:, : attention_mask.shape[1] - input_ids.shape[1]])  # (B, n)
        pad = self.model.config.pad_token_id
        real = torch.ones_like(input_ids, dtype=torch.bool) if pad is None else input_ids != pad
        longer = torch.ones_like(attention_mask).sum(-1, keepdim=True) > torch.ones_like(input_ids).sum(-1, keepdim=True)
        real = real | longer  # a prompt (n > 0; no reduction over the empty (B, 0)): every position counts, the last wins
        counted = torch.cat([virtual.bool(), real], dim=1).long()  # (B, n + T)
        last = (torch.arange(counted.shape[1], device=counted.device) * counted).argmax(-1)
        return logits[torch.arange(logits.shape[0], device=logits.device), last]

    def sample_inputs(self, config, slot_samples: dict) -> tuple:
        """Inputs to trace with: batch 2 (one row left-padded), past length 4 when cached."""
        from edgepeft.models import sample_inputs

        slots = [slot_samples[n] for n in self.slot_names]
        if not self.cache:
            ids, mask = sample_inputs(config)
            types = (sample_token_types(mask),) if self.types else ()
            return (ids, self._with_virtual(ids, mask, slots), *types, *slots)
        batch, past, new = 2, 4, 3
        ids, mask = sample_inputs(config, batch=batch, seq=past + new)
        mask = self._with_virtual(ids[:, past:], mask, slots)  # (B, past + virtual + T)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, virtual + T)
        g = torch.Generator().manual_seed(0)
        c = self.cache
        kv = [torch.randn(batch, c["num_kv_heads"], past, c["head_dim"], generator=g) for _ in range(2 * c["num_layers"])]
        keep = (torch.tensor(2),) if self.keep else ()  # 2 of the 3 new tokens: the kept axis differs from the input's
        return (ids[:, past:], mask, position_ids, *keep, *kv, *slots)

    def _with_virtual(self, ids, mask, slots):
        """The sample mask with ones for the tokens the embedder puts before ``ids`` (a sample prompt)."""
        if self.embedder is None:
            return mask
        for (module, role), value in zip(self._feeds, slots):
            module.feed[role] = value
        with torch.no_grad():
            virtual = self.embedder(ids).shape[1] - ids.shape[1]
        return torch.cat([torch.ones(mask.shape[0], virtual, dtype=mask.dtype), mask], dim=1)


def causal_mask(attention_mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The (B, 1, T, K) boolean mask transformers' SDPA attention builds from a (B, K) padding mask.

    Query i is the i-th of the last T = tokens.shape[1] of the K positions (past first); it sees
    key j when j is not after it and ``attention_mask[:, j]`` is 1. The indices count along
    the inputs themselves (not ``arange``, whose length has no name), so the mask's dims keep
    the inputs' symbolic names; with transformers' own mask the shape pass (``shapes.py``)
    cannot prove the attention reshapes after it, and they stay Shape arithmetic in every layer.
    """
    keys = counted_positions(attention_mask)  # (B, K): 0 .. K-1
    queries = counted_positions(tokens) + (attention_mask.shape[1] - tokens.shape[1])  # (B, T): K-T .. K-1
    causal = keys[:, None, None, :] <= queries[:, None, :, None]  # (B, 1, T, K)
    return causal & attention_mask[:, None, None, :].bool()


def _rows(tokens: torch.Tensor) -> torch.Tensor:
    return tokens if tokens.dim() == 2 else tokens[..., 0]  # input_ids (B, T) or inputs_embeds (B, T, H)


def padding_mask(attention_mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The (B, 1, T, T) boolean mask transformers' SDPA attention builds for an encoder: every query sees the
    keys ``attention_mask`` keeps. Built from the inputs, for the dims' names (see ``causal_mask``)."""
    queries = torch.ones_like(_rows(tokens), dtype=torch.bool)  # (B, T)
    return queries[:, None, :, None] & attention_mask[:, None, None, :].bool()


def counted_positions(tokens: torch.Tensor) -> torch.Tensor:
    """Position ids 0 .. T-1 for every row (transformers' default without a cache), counted along the inputs."""
    return torch.ones_like(_rows(tokens), dtype=torch.long).cumsum(-1) - 1


def encoder_positions(tokens: torch.Tensor, offset=None, types=None) -> dict:
    """BERT's default position ids (0 .. T-1, shifted by ``offset``) and token types (``types``, else 0), counted
    along the inputs.

    ``offset``: the prefix tokens before the input's keys (an encoder prefix: n .. n+T-1, as HF PEFT).
    ``types``: (B, T) for the input's tokens; a prompt's virtual tokens before them are of type 0, as HF PEFT's.
    BertEmbeddings slices them from buffers otherwise, which shape inference cannot relate to
    the inputs: the embeddings' sum, and every dim after it, lost the batch and length names.
    """
    positions = counted_positions(tokens)  # (B, T)
    if offset is not None:
        positions = positions + offset
    zeros = torch.zeros_like(positions)
    if types is not None:  # (B, n) zeros for the n tokens a prompt puts first, then the input's own
        types = torch.cat([zeros[:, : zeros.shape[1] - types.shape[1]], types], dim=1)
    return {"position_ids": positions, "token_type_ids": zeros if types is None else types}


def sample_token_types(mask: torch.Tensor) -> torch.Tensor:
    """A sample batch's token types, as a text pair's: each row's first half of real tokens 0, the rest 1."""
    return (mask.cumsum(-1) > mask.sum(-1, keepdim=True) // 2).long() * mask


def kept_positions(keep: torch.Tensor, length) -> torch.Tensor:
    """The positions whose logits ``keep`` asks for: the last ``keep`` of ``length``, all when 0 (traced: Range)."""
    start = torch.where(keep > 0, torch.clamp(length - keep, min=0), torch.zeros_like(keep))
    return torch.arange(start, length)


def export_graph(graph: SlotGraph, sample_inputs: tuple, slots, neutral: dict, path: str,
                 contrib: bool = False, source: str = "the base") -> dict:
    """Trace ``graph`` to ``path``; returns the I/O table written into the manifest. ``contrib``: the model
    emits ONNX Runtime's com.microsoft ops (``contrib_ops.py``). ``source``: the base, for a message."""
    io_axes, out_axes = graph.io_table()
    slot_axes = {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in slots if not s.target}
    graph.eval()
    with warnings.catch_warnings(), torch.no_grad(), exportable(source):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            sample_inputs,
            path,
            input_names=graph.input_names,
            output_names=graph.output_names,
            dynamic_axes={**io_axes, **out_axes, **slot_axes},
            opset_version=OPSET,
            custom_opsets={"com.microsoft": 1} if contrib else None,
            do_constant_folding=True,
            dynamo=False,
        )
    defaults = {**neutral, LOGITS_TO_KEEP: np.array(0, dtype=np.int64)} if graph.keep else neutral
    used = _finish(path, defaults)

    def table(axes_by_name):
        return {n: {"dtype": "int64" if n in ("input_ids", "attention_mask", "position_ids", TOKEN_TYPES, LOGITS_TO_KEEP)
                    else "float32",
                    "axes": a} for n, a in axes_by_name.items()}

    return {
        "inert_slots": sorted(set(neutral) - used),
        "inputs": table(io_axes),
        "outputs": table(out_axes),
        "cache": graph.cache,
    }


@contextmanager
def exportable(source: str):
    """An op torch's ONNX exporter cannot write (xIELU's expm1: config.json's hidden_act) as one line, not a traceback."""
    try:
        yield
    except torch.onnx.errors.UnsupportedOperatorError as e:
        op = re.search(r"operator '([^']+)'", str(e))
        raise UnsupportedModelError(f"{source}: the model runs {op[1] if op else first_line(e)}, which torch's ONNX "
                                    f"exporter cannot write (opset {OPSET}); use a model without it (an activation: "
                                    "config.json's hidden_act, such as silu or gelu)") from None


def _finish(path: str, neutral: dict) -> set:
    """Give every slot input (and LOGITS_TO_KEEP) an initializer of its own name (its neutral value),
    and turn the traced shape arithmetic into constants where the graph's symbolic dims allow (``shapes``).

    Returns the slots the graph uses: a slot on a layer that cannot reach the
    output (BertModel's pooler for ``last_hidden_state``) is dropped by the tracer.
    """
    model = onnx.load(path)
    existing = {i.name for i in model.graph.initializer}
    used = {i.name for i in model.graph.input} & set(neutral)
    for name, value in neutral.items():
        if name in used and name not in existing:
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, order="C"), name))
    simplify_shapes(model)
    share_tied_tables(model)  # a tied output layer reads the embedding table, not a copy (tied.py)
    model.ir_version = IR_VERSION  # the adapter graphs' too
    data = os.path.basename(path) + ".data"
    # the weights in model.onnx.data, which the JavaScript variant (web_graph.py) reads too
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data)
    usual_permissions(os.path.join(os.path.dirname(path), data))  # onnx writes the data file 0600
    return used
