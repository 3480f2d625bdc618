"""Decoder graphs on ONNX Runtime's fused kernels (``--ops contrib``, the default for Llama, Qwen2 and GPT-2
causal LMs).

Per layer, in the traced copy of the model (GPT-2: no rotary, its LayerNorms as SkipLayerNormalization, as many
key/value heads as heads):

    residual Add + RMSNorm         --> com.microsoft.SkipSimplifiedLayerNormalization (ONNX Runtime does not
                                       fuse these itself; the first norm, after no add, stays plain ONNX ops, which
                                       it fuses into its SimplifiedLayerNormalization: that op has no schema in
                                       ONNX, and in a graph file onnx.checker refuses it)
    rotary on q and k              --> com.microsoft.RotaryEmbedding(x, position_ids, cos cache, sin cache)
    cache append + repeat_kv + causal masked softmax(QK^T)V
                                   --> com.microsoft.GroupQueryAttention(q, k, v, past_key, past_value,
                                       seqlens_k, total_sequence_length, attention_bias)

q, k and v are the projections' outputs as the slot layers left them (LoRA, IA3 and bottleneck slots
on those projections work as before), the past is the cache input (a prefix is its start), and a
prompt's virtual tokens arrive through ``inputs_embeds``: every slot kind keeps its place. The kernel
is causal by itself; the attention mask's padding becomes its attention bias (``attention_inputs``), so
left-padded rows and mixed batches mean what they mean in the standard graph; every row's keys are the
whole cache (``seqlens_k`` = its length - 1). Decode steps may bind one buffer as past and present
(``runtimes/kv_cache.py``): the kernel then appends in place. Each op's PyTorch ``forward`` computes
what transformers computes (the trace's shapes come from it); ``symbolic`` is the ONNX node.
``--ops standard`` exports the graph transformers' own code traces to, for providers without these
kernels.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from edgepeft.runtimes.base_checks import OPS  # the kernels' choice, as the runtime reads it

CONTRIB = "com.microsoft"
FUSED_MODELS = ("llama", "qwen2", "gpt2")  # the models whose attention (and norms after an add) are replaced here
KERNEL_HEAD_MULTIPLE = 16  # GroupQueryAttention's CPU kernel takes head sizes that are multiples of 16


def check_ops(ops) -> None:
    from edgepeft.errors import ConfigError

    if ops not in OPS:
        raise ConfigError(f"--ops {ops!r} is not supported; use one of {', '.join(OPS)}")


def effective_ops(config, task: str, ops: str, log=None) -> str:
    """"contrib" where asked for and the model has the fused build (Llama, Qwen2, GPT-2 causal LMs whose head size
    the kernel takes), else "standard"; ``log`` hears why a contrib request falls back."""
    if ops != "contrib" or task != "causal-lm" or config.model_type not in FUSED_MODELS:
        return "standard"
    from edgepeft.model_checks import rope_type
    from edgepeft.models import attention_layout

    head = attention_layout(config)["head_dim"]
    why = (f"head size {head} is not a multiple of {KERNEL_HEAD_MULTIPLE} (GroupQueryAttention's CPU kernel needs "
           "that)" if head % KERNEL_HEAD_MULTIPLE else
           "dynamic rope scaling changes the rotary tables with the length" if rope_type(config) == "dynamic"
           else None)
    if why and log:
        log(f"note: {why}: standard ops")
    return "standard" if why else "contrib"


def _rms_norm(x, weight, eps: float):
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


class _SkipRMSNorm(torch.autograd.Function):
    """(RMSNorm(x + skip) * weight, x + skip): the residual add and the next norm in one op."""

    @staticmethod
    def forward(ctx, x, skip, weight, eps: float):
        total = x + skip
        return _rms_norm(total, weight, eps), total

    @staticmethod
    def symbolic(g, x, skip, weight, eps: float):
        out = g.op(f"{CONTRIB}::SkipSimplifiedLayerNormalization", x, skip, weight, epsilon_f=eps, outputs=4)
        out[0].setType(x.type())
        out[3].setType(x.type())
        return out[0], out[3]


class _SkipLayerNorm(torch.autograd.Function):
    """(LayerNorm(x + skip), x + skip): GPT-2's residual add and the next LayerNorm in one op."""

    @staticmethod
    def forward(ctx, x, skip, weight, bias, eps: float):
        total = x + skip
        return torch.nn.functional.layer_norm(total, weight.shape, weight, bias, eps), total

    @staticmethod
    def symbolic(g, x, skip, weight, bias, eps: float):
        out = g.op(f"{CONTRIB}::SkipLayerNormalization", x, skip, weight, bias, epsilon_f=eps, outputs=4)
        out[0].setType(x.type())
        out[3].setType(x.type())
        return out[0], out[3]


def _read(norm, *fields) -> list:
    """What the fused body reads of a norm after a residual add, in place of calling it (the last field, eps, as a
    number); a module in the norm's place that lacks them (a method's slot module, or its layer kept by --merge) is
    refused naming the fix, not torch's AttributeError."""
    if missing := [f for f in fields if not hasattr(norm, f)]:
        from edgepeft.errors import UnsupportedMethodError

        raise UnsupportedMethodError(f"{type(norm).__name__}, in a norm's place, has no {' or '.join(missing)}, "
                                     "which the fused decoder of --ops contrib reads (adding-a-method.md, the slots); "
                                     "export with --ops standard")
    return [getattr(norm, f) for f in fields[:-1]] + [float(getattr(norm, fields[-1]))]


def _body_forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                  use_cache=None, **kwargs):
    """LlamaModel/Qwen2Model.forward with each residual add fused into the norm after it:

        x = Norm(h); per layer: a = attn(x); x, h = SkipNorm(a, h); m = mlp(x); x, h = SkipNorm(m, h) (the next
        layer's input norm, after the last layer the final norm)

    ``attention_mask`` is the graph's (B, K) padding mask and ``position_ids`` the input's (SlotGraph gives
    both: ``padding_mask_only``).
    """
    from transformers.modeling_outputs import BaseModelOutputWithPast

    cache = cache if cache is not None else kwargs.get("past_key_values")  # the name before transformers' rename
    hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    layers = list(self.layers[: self.config.num_hidden_layers])
    x = layers[0].input_layernorm(hidden)
    shared = attention_inputs(attention_mask, hidden.shape[1])  # once for every layer
    for i, layer in enumerate(layers):
        attended, _ = layer.self_attn(hidden_states=x, position_ids=position_ids, cache=cache,
                                      attention_inputs=shared)
        norm = layer.post_attention_layernorm
        x, hidden = _SkipRMSNorm.apply(attended, hidden, *_read(norm, "weight", "variance_epsilon"))
        norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.norm
        x, hidden = _SkipRMSNorm.apply(layer.mlp(x), hidden, *_read(norm, "weight", "variance_epsilon"))
    field = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
    return BaseModelOutputWithPast(last_hidden_state=x, **{field: cache})


class _Rotary(torch.autograd.Function):
    """transformers' rotary embedding on (B, S, heads * D) at ``position_ids`` (B, S), tables (positions, D / 2)."""

    @staticmethod
    def forward(ctx, x, position_ids, cos_cache, sin_cache, heads: int):
        B, S, _ = x.shape
        cos = torch.cat([cos_cache[position_ids]] * 2, dim=-1)[:, :, None]  # (B, S, 1, D)
        sin = torch.cat([sin_cache[position_ids]] * 2, dim=-1)[:, :, None]
        x = x.view(B, S, heads, -1)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * cos + rotated * sin).reshape(B, S, -1)

    @staticmethod
    def symbolic(g, x, position_ids, cos_cache, sin_cache, heads: int):
        out = g.op(f"{CONTRIB}::RotaryEmbedding", x, position_ids, cos_cache, sin_cache, num_heads_i=heads)
        out.setType(x.type())
        return out


class _GroupQueryAttention(torch.autograd.Function):
    """Cache append, repeat_kv and softmax(QK^T * scale + bias) V on rotated (B, S, heads * D) q, k, v."""

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total, bias, num_heads: int, kv_heads: int, scale: float):
        B, S, _ = q.shape
        D = past_k.shape[-1]
        q = q.view(B, S, num_heads, D).transpose(1, 2)
        k = k.view(B, S, kv_heads, D).transpose(1, 2)
        v = v.view(B, S, kv_heads, D).transpose(1, 2)
        present_k, present_v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        groups = num_heads // kv_heads
        keys = present_k.repeat_interleave(groups, dim=1)
        values = present_v.repeat_interleave(groups, dim=1)
        scores = (q @ keys.transpose(-1, -2)) * scale + bias  # (B, heads, S, K)
        K = keys.shape[-2]
        causal = torch.ones(S, K, dtype=torch.bool, device=q.device).tril(K - S)  # the kernel is causal itself
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        out = torch.softmax(scores, dim=-1) @ values  # (B, heads, S, D)
        return out.transpose(1, 2).reshape(B, S, -1), present_k, present_v  # -1: a traced "* 1" (one head) breaks torch.onnx

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total, bias, num_heads: int, kv_heads: int, scale: float):
        # GroupQueryAttention's own rotary (do_rotary) ignores position_ids in a prefill: left-padded rows
        # would be cached at other positions than transformers gives them, hence RotaryEmbedding before it.
        out, present_k, present_v = g.op(
            f"{CONTRIB}::GroupQueryAttention", q, k, v, past_k, past_v, seqlens_k, total, *_absent(g, 3), bias,
            num_heads_i=num_heads, kv_num_heads_i=kv_heads, scale_f=scale, outputs=3)
        out.setType(q.type())
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return out, present_k, present_v


def _absent(g, n: int) -> list:
    """``n`` omitted optional inputs (ONNX: an empty name)."""
    return [g.op("prim::Constant").setType(torch._C.OptionalType.ofTensor()) for _ in range(n)]


def attention_inputs(attention_mask, length) -> tuple:
    """GroupQueryAttention's mask inputs from the graph's (B, K) padding mask and the new tokens' count S.

    The kernel is causal by itself; the (B, 1, S, K) additive bias hides padded keys from real queries, and
    ``seqlens_k`` (B,) = K - 1 and ``total_sequence_length`` = K make every row's keys the whole cache (rows
    are left-padded). A padded query sees every key before it: a query that sees none is left unwritten by
    the kernel (it read 1e19 when a prefix met left padding), and what it computes flows into the next
    layer's cached keys, hidden from real queries.
    """
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, K)
    padded_queries = ~attention_mask[:, -length:].bool()[:, None, :, None]  # (B, 1, S, 1)
    bias = torch.where(keys | padded_queries, 0.0, torch.finfo(torch.float32).min)  # (B, 1, S, K)
    row = torch.ones_like(attention_mask, dtype=torch.int32)  # (B, K)
    return bias, row.sum(-1, dtype=torch.int32) - 1, row[0].sum(dtype=torch.int32)


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """The attention of a Llama/Qwen2 layer on the fused ops; ``attention_inputs`` from ``_body_forward``."""
    position_ids = kwargs["position_ids"]
    layer = cache.layers[self.layer_idx]
    # (B, kv_heads, P, D): the graph inputs SlotGraph put in (not the cache's copies: a Concat per layer and step)
    past_k, past_v = cache.graph_inputs[2 * self.layer_idx], cache.graph_inputs[2 * self.layer_idx + 1]
    bias, seqlens_k, total = kwargs["attention_inputs"]
    tables, heads, kv_heads = self.rotary_tables, self.config.num_attention_heads, self.config.num_key_value_heads
    q = _Rotary.apply(self.q_proj(hidden_states), position_ids, tables.cos, tables.sin, heads)
    k = _Rotary.apply(self.k_proj(hidden_states), position_ids, tables.cos, tables.sin, kv_heads)
    out, present_k, present_v = _GroupQueryAttention.apply(
        q, k, self.v_proj(hidden_states), past_k, past_v, seqlens_k, total, bias, heads, kv_heads, float(self.scaling))
    layer.keys, layer.values = present_k, present_v  # what SlotGraph returns as present.*
    return self.o_proj(out), None


class RotaryTables(nn.Module):
    """cos and sin of every position (max positions, head_dim / 2), from the model's own rotary embedding
    (its rope scaling and attention scaling included), shared by every layer's GroupQueryAttention."""

    def __init__(self, model, positions: int):
        super().__init__()
        rotary = model.model.rotary_emb
        ids = torch.arange(positions)[None]
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, dtype=torch.float32), ids)  # (1, positions, head_dim)
        half = cos.shape[-1] // 2
        self.register_buffer("cos", cos[0, :, :half].contiguous())
        self.register_buffer("sin", sin[0, :, :half].contiguous())


def _gpt2_body_forward(self, input_ids=None, cache=None, attention_mask=None, token_type_ids=None,
                       position_ids=None, inputs_embeds=None, use_cache=None, **kwargs):
    """GPT2Model.forward with the attention inputs built once from the (B, K) padding mask for every block, and
    each residual add fused with the LayerNorm after it (as ``_body_forward`` for RMSNorm)."""
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    cache = cache if cache is not None else kwargs.get("past_key_values")  # the name before transformers' rename
    hidden = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
    hidden = self.drop(hidden + self.wpe(position_ids))
    shared = attention_inputs(attention_mask, hidden.shape[1])
    blocks = list(self.h)
    x = blocks[0].ln_1(hidden)
    for i, block in enumerate(blocks):  # GPT2Block.forward's order, each residual add fused with the next norm
        attended, _ = block.attn(x, cache=cache, attention_inputs=shared)
        x, hidden = _SkipLayerNorm.apply(attended, hidden, *_read(block.ln_2, "weight", "bias", "eps"))
        norm = blocks[i + 1].ln_1 if i + 1 < len(blocks) else self.ln_f
        x, hidden = _SkipLayerNorm.apply(block.mlp(x), hidden, *_read(norm, "weight", "bias", "eps"))
    field = "cache" if "cache" in BaseModelOutputWithPastAndCrossAttentions.__dataclass_fields__ else "past_key_values"
    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=x, **{field: cache})


def _gpt2_attention_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    """GPT-2's attention on GroupQueryAttention (as many key/value heads as heads, no rotary: positions are
    the embeddings'); q, k and v are the slot-adapted c_attn's output split in three."""
    cache = cache if cache is not None else kwargs.get("past_key_values")
    layer = cache.layers[self.layer_idx]
    past_k, past_v = cache.graph_inputs[2 * self.layer_idx], cache.graph_inputs[2 * self.layer_idx + 1]
    bias, seqlens_k, total = kwargs["attention_inputs"]
    q, k, v = self.c_attn(hidden_states).split(self.split_size, dim=2)
    out, present_k, present_v = _GroupQueryAttention.apply(
        q, k, v, past_k, past_v, seqlens_k, total, bias, self.num_heads, self.num_heads, float(self.scaling))
    layer.keys, layer.values = present_k, present_v  # what SlotGraph returns as present.*
    return self.resid_dropout(self.c_proj(out)), None


def install_contrib_ops(model, positions: int) -> None:
    """Swap the traced copy's body (each residual add fused with the norm after it) and attentions for the fused ops
    (see the module docstring); for a model ``effective_ops`` allows."""
    model.padding_mask_only = True  # SlotGraph passes the (B, K) mask as it is: the kernel is causal itself
    if model.config.model_type == "gpt2":
        model.transformer.forward = types.MethodType(_gpt2_body_forward, model.transformer)
        for module in model.modules():
            if type(module).__name__ == "GPT2Attention":
                module.forward = types.MethodType(_gpt2_attention_forward, module)
        return
    tables = RotaryTables(model, positions)
    model.model.forward = types.MethodType(_body_forward, model.model)
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("Attention") and hasattr(module, "q_proj"):
            object.__setattr__(module, "rotary_tables", tables)
            module.forward = types.MethodType(_attention_forward, module)
