"""The one adapter between `KVCache` and transformers' cache objects.

Nothing else in agentmesh touches transformers' cache classes or names the keyword a model's
forward takes its cache by, so a change in either is mended here alone.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import Cache, DynamicLayer

from agentmesh.cache.kv import KVCache, ModelSignature
from agentmesh.errors import CacheError

# A transformers cache object, as the rest of agentmesh names it without importing transformers' classes.
HFCache = Cache


def from_hf(
    past: HFCache | tuple[Any, ...] | list[Any],
    *,
    signature: ModelSignature | None = None,
    token_ids: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> KVCache:
    """Wrap a transformers cache (a `DynamicCache`, or legacy tuples) as a `KVCache`.

    No tensor is copied: the `KVCache` shares storage with `past`, which is safe because
    `DynamicCache.update` concatenates into new tensors rather than writing in place.
    """
    if hasattr(past, "layers"):
        pairs = [(layer.keys, layer.values) for layer in past.layers]
    elif isinstance(past, (tuple, list)):
        pairs = [(k, v) for k, v, *_ in past]
    else:
        raise CacheError(f"cannot read a KV cache from {type(past).__name__}; expected a transformers Cache")
    if any(k is None or k.dim() != 4 for k, _ in pairs):
        raise CacheError("transformers cache has an empty layer; run a forward pass with use_cache=True first")
    return KVCache(keys=tuple(k for k, _ in pairs), values=tuple(v for _, v in pairs), signature=signature,
                   token_ids=token_ids, positions=positions, attention_mask=attention_mask)


# (layer index, new keys (B, H, k, D), new values) -> the keys and values to store instead.
Rewrite = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class RewritingCache(DynamicCache):
    """A `DynamicCache` that passes each layer's new keys/values through `rewrite` before storing them.

    The model's attention reads what `update` returns, so a rewrite takes effect before any query
    of the same forward pass sees those positions: this is how a sharer's K/V are fused into every
    token as it is read (include-response fusion), without touching model code.
    """

    def __init__(self, rewrite: Rewrite, config: Any):
        super().__init__(config=config)
        self.rewrite = rewrite

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        key_states, value_states = self.rewrite(layer_idx, key_states, value_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def static_hf(config: Any, max_len: int) -> StaticCache:
    """An empty transformers static cache: keys and values for `max_len` tokens, allocated at the
    first forward and written in place after (what `torch.compile` needs: fixed shapes and addresses)."""
    return StaticCache(config=config, max_cache_len=max_len)


def new_hf(config: Any, rewrite: Rewrite | None = None) -> DynamicCache:
    """An empty transformers cache for a model with `config` (rewriting new K/V when `rewrite` is given)."""
    return DynamicCache(config=config) if rewrite is None else RewritingCache(rewrite, config)


def to_hf(kv: KVCache, config: Any, rewrite: Rewrite | None = None) -> DynamicCache:
    """A fresh transformers cache for a model with `config`, holding `kv`'s tensors (not copied).

    Sliding-window layers keep only their window, but remember how many tokens were seen so the
    model's masks stay right. `rewrite` (see `RewritingCache`) applies to tokens added later only.
    """
    cache = new_hf(config, rewrite)
    if kv.layer_ids != tuple(range(len(cache.layers))):
        raise CacheError(f"cache holds layers {list(kv.layer_ids)}, but the model needs all "
                         f"{len(cache.layers)} layers in order")
    total = kv.attention_mask.shape[1] if kv.attention_mask is not None else kv.seq_len
    for layer, k, v in zip(cache.layers, kv.keys, kv.values):
        if type(layer) is DynamicLayer:
            # `update` on an empty layer concatenates onto an empty tensor: a copy of the whole
            # cache before the first token; handing the tensors over shares them instead.
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        else:
            layer.update(k, v)
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = total
    return cache


def forward_with_cache(module: torch.nn.Module, cache: HFCache | None, **inputs: Any) -> tuple[Any, HFCache]:
    """`module(**inputs)` reading and extending the transformers cache `cache` (None to start one).

    Returns (the model output, the extended cache). transformers 5.24 renamed the cache keyword
    and output field from `past_key_values` to `cache` (the old name warns and goes in 5.40), so
    this is the only call site that names it.
    """
    out = module(**inputs, cache=cache, use_cache=True)
    return out, out.cache
