"""Prefix tuning in PyTorch: HF PEFT's ``PrefixEncoder`` and edgepeft's encoder self-attention with a prefix."""
from __future__ import annotations

import threading

import torch
from torch import nn

from edgepeft.registry import AdapterLayer
from edgepeft.tuners.targets import made

_forwards = threading.local()  # per thread: a stack of dicts, one per running forward of a model with encoder prefixes


class PrefixEncoder(nn.Module):
    """``forward()`` -> (num_virtual_tokens, num_layers * 2 * token_dim): every layer's prefix keys and values.

    With ``prefix_projection`` (and not ``inference_mode``): embeddings (n, token_dim)
    through Linear -> tanh -> Linear (token_dim -> encoder_hidden_size -> L * 2 * token_dim).
    ``init_weights="zero"`` zeroes the output (the last layer of the MLP), as HF PEFT does.
    """

    def __init__(self, config):
        super().__init__()
        n, width = config.num_virtual_tokens, config.num_layers * 2 * config.token_dim
        self.layout = (config.num_layers, config.num_attention_heads, config.token_dim)
        self.transform = None
        if config.prefix_projection and not config.inference_mode:
            self.embedding = nn.Embedding(n, config.token_dim)
            hidden = config.encoder_hidden_size
            self.transform = made(lambda: nn.Sequential(nn.Linear(config.token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width)),
                                  hidden, width, f"encoder_hidden_size {hidden}: a prefix projection of that width",
                                  f"use a width below {width} (num_layers x 2 x token_dim)")
            last = self.transform[-1]
            if config.init_weights == "zero":
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)
        else:
            self.embedding = nn.Embedding(n, width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self) -> torch.Tensor:
        tokens = self.embedding.weight  # (n, token_dim) or (n, L * 2 * token_dim)
        return self.transform(tokens) if self.transform is not None else tokens

    def keys_values(self) -> list:
        return layer_keys_values(self(), *self.layout)


def layer_keys_values(tokens: torch.Tensor, num_layers: int, heads: int, token_dim: int) -> list:
    """Split HF PEFT's flat prefix into [(key, value)] per layer, each (heads, n, head_dim).

    tokens (n, L * 2 * token_dim) -> (n, L * 2, heads, head_dim) -> (L * 2, heads, n, head_dim);
    layer l's key is entry 2l and its value 2l + 1 (HF PEFT's ``get_prompt`` layout).
    """
    n = tokens.shape[0]
    kv = tokens.reshape(n, num_layers * 2, heads, token_dim // heads).permute(1, 2, 0, 3)
    return [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(num_layers)]


class PrefixSelfAttention(AdapterLayer):
    """Mixed into an encoder self-attention (BERT family): its keys/values get a prefix in front.

        hidden (B, T, H) --> q, k, v (B, heads, T, hd)
        prefix key/value (heads, n, hd) --> expand (B, heads, n, hd) --> cat before k, v: (B, heads, n + T, hd)
        attention mask (B, 1, T, T) --> prefix columns always attended: (B, 1, T, n + T)

    The token sequence is unchanged: the prefix is keys and values only (the tokens'
    positions start after it: ``PrefixTuner.forward`` and the export graph shift them).
    What every layer needs alike (the zeros that broadcast a prefix over the batch, the
    mask with the prefix columns) is built once per forward of the model and reused by
    the other layers, which get the very same mask tensor (``share_per_forward``): an
    exported graph computes it once, not once per layer.
    ``add_prefix`` swaps the module's class for one with this mixin, so its children
    (query/key/value) keep their names and other methods (LoRA on query) still find them.
    ``prefix()`` gives (key, value) for the active adapter, or None: the plain layer. In
    PyTorch they come from the prefix encoder held by the input embeddings (``_source``);
    the export graph's subclass reads graph inputs.
    """

    adapter_dicts = ()  # holds no parameters: its keys/values come from the prefix encoder
    frozen_attr = ""  # not a wrapper: mixed into the attention module itself

    def holds_adapters(self) -> bool:
        return any(isinstance(e, PrefixEncoder) for e in self._source.prompt_encoder.values())

    def take_out(self) -> None:
        take_prefix_out(self)

    def prefix(self):
        encoders = self._source.prompt_encoder
        encoder = encoders[self.active_adapter] if self.active_adapter in encoders else None
        if not isinstance(encoder, PrefixEncoder):
            return None
        shared = _this_forward()
        if shared.get("encoder") is not encoder:  # the prefix encoder runs once per forward, for every layer
            shared.update(encoder=encoder, keys_values=encoder.keys_values())
        return shared["keys_values"][self.prefix_layer]

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        kv = self.prefix()
        if kv is None:
            return super().forward(hidden_states, attention_mask, **kwargs)
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.bert.modeling_bert import eager_attention_forward

        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        batch, length = hidden_states.shape[:2]
        shape = (batch, length, -1, self.attention_head_size)
        query = self.query(hidden_states).view(shape).transpose(1, 2)  # (B, heads, T, hd)
        key = self.key(hidden_states).view(shape).transpose(1, 2)
        value = self.value(hidden_states).view(shape).transpose(1, 2)
        # Adding zeros materialises (B, heads, n, hd) where expand() would give a view: one small add per layer in
        # PyTorch, but in the exported graph it needs no per-layer shape arithmetic (the zeros are built once).
        zeros, attention_mask = self._batch_and_mask(key, attention_mask, kv[0].shape[1])
        key = torch.cat([kv[0].to(key.dtype) + zeros, key], dim=2)  # (heads, n, hd) + (B, 1, 1, 1): (B, heads, n + T, hd)
        value = torch.cat([kv[1].to(key.dtype) + zeros, value], dim=2)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attend(self, query, key, value, attention_mask, dropout=0.0 if not self.training else self.dropout.p,
                              scaling=self.scaling, **kwargs)
        return out.reshape(batch, length, -1).contiguous(), weights  # (B, T, H)

    def _batch_and_mask(self, key, attention_mask, n):
        """Zeros (B, 1, 1, 1) (adding them broadcasts a prefix over the batch) and the mask with n attended columns in front.

        Inside a forward of the model (``share_per_forward``) the first layer builds them and
        the others reuse them while they get the same mask tensor and sizes; the forward's
        thread alone sees them, and they go when it returns. A layer called by itself builds its own.
        """
        shared = _this_forward()
        sizes = (key.shape[0], n, key.dtype, key.device)
        if "pieces" not in shared or shared["mask"] is not attention_mask or shared["sizes"] != sizes:
            mask = attention_mask
            if mask is not None:  # (B, 1, T, T): bool (True = attend) or additive float (0 = attend)
                fill = torch.ones if mask.dtype == torch.bool else torch.zeros
                front = fill(*mask.shape[:-1], n, dtype=mask.dtype, device=mask.device)
                mask = torch.cat([front, mask], dim=-1)
            shared.update(mask=attention_mask, sizes=sizes, pieces=(key.new_zeros(key.shape[0], 1, 1, 1), mask))
        return shared["pieces"]


def _this_forward() -> dict:
    """The dict of the model forward running in this thread (``share_per_forward``), or a new one outside any."""
    stack = getattr(_forwards, "stack", None)
    return stack[-1] if stack else {}


def share_per_forward(model: nn.Module) -> None:
    """Let the prefix layers inside ``model`` share what they build, for the length of one forward of ``model``.

    Hooks (once per model) open a dict for the forward in the calling thread and drop it
    when the forward returns or raises, so nothing outlives the call or crosses threads.
    """
    if getattr(model, "_prefix_forward_hooks", None):
        return
    model._prefix_forward_hooks = (model.register_forward_pre_hook(_enter_forward),
                                   model.register_forward_hook(_leave_forward, always_call=True))


def _enter_forward(module, args):
    _forwards.__dict__.setdefault("stack", []).append({})


def _leave_forward(module, args, output):
    _forwards.stack.pop()


_CLASSES: dict = {}  # (mixin, class) -> the class of both


def _made(mixin: type, cls: type) -> type:
    """The class of ``mixin`` over ``cls``, made once per pair. No module names it, so it pickles (torch.save) and
    copies as the two it is made of (pickle looks a class up by its name: the model could not be saved)."""
    if (mixin, cls) not in _CLASSES:
        _CLASSES[mixin, cls] = type(f"{mixin.__name__}{cls.__name__}", (mixin, cls), {"__reduce_ex__": _reduce_ex})
    return _CLASSES[mixin, cls]


def _own_class(cls: type) -> tuple:
    """(the mixins ``cls`` was made of, outermost first; the module's own class)."""
    mixins = []
    while cls in _CLASSES.values():
        mixin, cls = cls.__bases__
        mixins.append(mixin)
    return tuple(mixins), cls


def _reduce_ex(self, protocol):
    reduced = object.__reduce_ex__(self, protocol)  # (copyreg.__newobj__, (class,), state, ...)
    return (_remade, _own_class(type(self)), *reduced[2:])


def _remade(mixins: tuple, cls: type):
    for mixin in reversed(mixins):
        cls = _made(mixin, cls)
    return cls.__new__(cls)


def add_prefix(module: nn.Module, mixin: type, layer: int, **attributes) -> nn.Module:
    """Give ``module`` the ``mixin`` (once) and its attributes (``take_prefix_out`` takes them back out)."""
    if not isinstance(module, mixin):
        module.__class__ = _made(mixin, type(module))
        module.active_adapter = None
    module.prefix_layer = layer
    object.__setattr__(module, "_prefix_attributes", (*getattr(module, "_prefix_attributes", ()), *attributes))
    for name, value in attributes.items():
        object.__setattr__(module, name, value)  # plain attributes, never registered as submodules
    return module


def take_prefix_out(module: nn.Module) -> None:
    """``module`` as it was before ``add_prefix``: its own class, none of the attributes the prefix gave it."""
    for name in ("prefix_layer", "active_adapter", "_prefix_attributes", *module._prefix_attributes):
        module.__dict__.pop(name, None)
    module.__class__ = _own_class(type(module))[1]
