"""The fuser: one projector per receiver layer, and the fusion of sharer caches into a receiver's.

A `Fuser` is trained for one (receiver, sharer) pair. `fuse` rewrites a receiver `KVCache` with
any number of sharers, each through its own fuser:
    parallel:   K = K_r + sum_j g_j * w_j * P_j(K_s_j, K_r)      (every fuser sees the clean K_r)
    sequential: K_j = K_{j-1} + g_j * w_j * P_j(K_s_j, K_{j-1})  (each fuser sees the last result)
The per-layer loop is pure tensor work: no `.item()`, no host synchronisation.

Keys are cached after RoPE. Where a sharer's span sits at other positions than the receiver's (a
role or context before it, another chat template, tokenizer alignment), its keys are rotated to
the receiver's positions with the sharer's own rotary parameters before any projector sees them
(`FuserConfig.key_positions == "receiver"`; fusers saved before this rule read "sharer": keys as
the sharer computed them, so they are never silently reinterpreted).

A fuser also says *what* it fuses (`FuserConfig.fusion`):
    "prompt":           the prompt but its last token, rewritten after the receiver prefilled it;
    "prompt+response":  every token the receiver reads, the last prompt token and each generated
                        token included, fused as it is read, before the receiver's attention uses it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, Sequence

import torch
from torch import nn

from agentmesh.cache.kv import KVCache, ModelSignature
from agentmesh.cache.rotary import rotate_keys
from agentmesh.c2c.layer_map import layer_map as make_layer_map
from agentmesh.c2c.registry import build_projector
from agentmesh.types import FusionMode, check_fusion_mode
from agentmesh.errors import CacheError, ConfigError

Fusion = Literal["prompt", "prompt+response"]
FUSIONS: tuple[str, ...] = ("prompt", "prompt+response")
KeyPositions = Literal["receiver", "sharer"]
KEY_POSITIONS: tuple[str, ...] = ("receiver", "sharer")


@dataclass(frozen=True)
class Route:
    """Receiver layer `receiver_layer` reads sharer layer `sharer_layer` through projector `projector`."""

    receiver_layer: int
    sharer_layer: int
    projector: int


@dataclass(frozen=True)
class FuserConfig:
    """Everything needed to rebuild a fuser, apart from its weights."""

    receiver: ModelSignature
    sharer: ModelSignature
    projector: str                         # registry name, e.g. "C2CProjector"
    projector_args: tuple[dict[str, Any], ...]  # constructor arguments, one per projector
    routes: tuple[Route, ...]
    layer_map: str = "last_aligned"        # how the routes were made (informational once built)
    alignment: str = "last"                # cross-tokenizer gather strategy ("last", "first", "longest")
    fusion: Fusion = "prompt"              # which tokens are fused (see the module docstring)
    key_positions: KeyPositions = "receiver"  # where the sharer's keys are rotated to before projection
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ConfigError(f"fusion {self.fusion!r} is unknown; expected one of {', '.join(FUSIONS)}")
        if self.key_positions not in KEY_POSITIONS:
            raise ConfigError(f"key_positions {self.key_positions!r} is unknown; expected one of "
                              f"{', '.join(KEY_POSITIONS)}")
        for r in self.routes:
            if not (0 <= r.receiver_layer < self.receiver.num_layers and 0 <= r.sharer_layer < self.sharer.num_layers
                    and 0 <= r.projector < len(self.projector_args)):
                raise ConfigError(
                    f"fuser route {r} is out of range: receiver has {self.receiver.num_layers} layers, "
                    f"sharer {self.sharer.num_layers}, and there are {len(self.projector_args)} projectors")

    @property
    def warning(self) -> str | None:
        """What a user must know before relying on this fuser (e.g. a documented negative result),
        from `provenance["warning"]`; None when there is nothing to say."""
        text = self.provenance.get("warning")
        return str(text) if text else None


class Fuser(nn.Module):
    """Projectors for one (receiver, sharer) pair, with the routes that say which layers they join."""

    def __init__(self, config: FuserConfig, projectors: Sequence[nn.Module] | None = None):
        super().__init__()
        self.config = config
        if projectors is None:
            projectors = [build_projector(config.projector, args) for args in config.projector_args]
        if len(projectors) != len(config.projector_args):
            raise ConfigError(f"fuser config lists {len(config.projector_args)} projectors, got {len(projectors)}")
        self.projectors = nn.ModuleList(projectors)
        self._routes = {r.receiver_layer: r for r in config.routes}

    @classmethod
    def build(cls, receiver: ModelSignature, sharer: ModelSignature, *, projector: str = "C2CProjector",
              layer_map: str = "last_aligned", alignment: str = "last", fusion: Fusion = "prompt",
              **projector_args: Any) -> "Fuser":
        """A fresh fuser with one projector per receiver layer (weights from the projector's init)."""
        sharer_layers = make_layer_map(layer_map, receiver.num_layers, sharer.num_layers)
        args = dict(source_dim=sharer.head_dim, target_dim=receiver.head_dim,
                    source_num_heads=sharer.num_kv_heads, target_num_heads=receiver.num_kv_heads)
        args.update(projector_args)
        routes = tuple(Route(t, s, t) for t, s in enumerate(sharer_layers))
        config = FuserConfig(receiver=receiver, sharer=sharer, projector=projector,
                             projector_args=tuple(dict(args) for _ in routes), routes=routes,
                             layer_map=layer_map, alignment=alignment, fusion=fusion)
        return cls(config)

    @classmethod
    def oracle(cls, receiver: ModelSignature, sharer: ModelSignature, *, fusion: Fusion = "prompt") -> "Fuser":
        """The replacement oracle: every fused position of receiver layer i reads the sharer's own
        layer-i K/V instead of its own. Needs a sharer of the receiver's shape (layers, KV heads,
        head dim), e.g. the same base model with an adapter."""
        if not receiver.same_shape(sharer):
            raise ConfigError(
                f"the oracle needs a sharer of the receiver's shape; receiver {receiver.name!r} has "
                f"{receiver.num_layers} layers of {receiver.num_kv_heads} KV heads of dim {receiver.head_dim}, "
                f"sharer {sharer.name!r} {sharer.num_layers} of {sharer.num_kv_heads} of dim {sharer.head_dim}")
        args = {"num_heads": receiver.num_kv_heads, "head_dim": receiver.head_dim}
        routes = tuple(Route(t, t, t) for t in range(receiver.num_layers))
        config = FuserConfig(receiver=receiver, sharer=sharer, projector="ReplaceProjector",
                             projector_args=tuple(dict(args) for _ in routes), routes=routes,
                             layer_map="identity", fusion=fusion, provenance={"kind": "oracle"})
        return cls(config)

    @property
    def receiver(self) -> ModelSignature:
        return self.config.receiver

    @property
    def sharer(self) -> ModelSignature:
        return self.config.sharer

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def update_temperature(self, step: int) -> None:
        for p in self.projectors:
            if hasattr(p, "update_temperature"):
                p.update_temperature(step)

    def layer_residual(self, layer: int, sharer: KVCache, receiver_kv: tuple[torch.Tensor, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (key, value) residuals `g * w * P` for receiver layer `layer`, each (B, H_r, N, D_r),
        or None when no projector writes that layer. `sharer` holds the same N tokens as
        `receiver_kv`, position for position."""
        r = self._routes.get(layer)
        if r is None:
            return None
        return self.projectors[r.projector].residual(sharer.layer(r.sharer_layer), receiver_kv)

    def check_caches(self, receiver: KVCache, sharer: KVCache) -> None:
        receiver.check_signature(self.receiver, "receiver cache")
        sharer.check_signature(self.sharer, "sharer cache")
        if receiver.batch_size != sharer.batch_size or receiver.seq_len != sharer.seq_len:
            raise CacheError(
                f"receiver span is {receiver.batch_size}x{receiver.seq_len} tokens but sharer span is "
                f"{sharer.batch_size}x{sharer.seq_len}; align the sharer to the receiver's tokens first")

    def extra_repr(self) -> str:
        return f"receiver={self.receiver.name!r}, sharer={self.sharer.name!r}, routes={len(self.config.routes)}"


@dataclass(frozen=True)
class SharerSpan:
    """A sharer's cache for the fused span, aligned to the receiver's positions, and its fuser.

    `mask` (B, N) marks the positions to fuse; elsewhere the receiver keeps its own K/V
    (cross-tokenizer alignment leaves template tokens unfused).
    """

    fuser: Fuser
    cache: KVCache
    mask: torch.Tensor | None = None


def at_receiver_positions(span: SharerSpan, positions: torch.Tensor | None) -> SharerSpan:
    """`span` with its keys rotated from the sharer's positions to `positions` (B, N), the
    receiver's, with the sharer's own rotary parameters; as it is when they already agree, when
    either is unknown, or when the fuser reads keys at the sharer's positions."""
    cache = span.cache
    if span.fuser.config.key_positions != "receiver" or positions is None or cache.positions is None:
        return span
    if torch.equal(cache.positions.cpu(), positions.cpu()):  # the usual case; CPU tensors, no device sync
        return span
    sig = cache.signature or span.fuser.sharer
    rotary = sig.rotary or span.fuser.sharer.rotary
    if rotary is None:
        raise CacheError(f"the sharer span of {sig.name!r} sits at other positions than the receiver's, but its "
                         "rotary parameters are unknown, so its keys cannot be moved to the receiver's positions")
    delta = positions.to(torch.long) - cache.positions.to(torch.long)  # (B, N)
    keys = tuple(rotate_keys(k, delta[:, delta.shape[1] - k.shape[2]:], rotary.frequencies(layer), rotary.style)
                 for layer, k in zip(cache.layer_ids, cache.keys))
    return replace(span, cache=cache.replace(keys=keys, positions=positions))



def fuse_layer(layer: int, keys: torch.Tensor, values: torch.Tensor, sharers: Sequence[SharerSpan],
               mode: FusionMode = "parallel") -> tuple[torch.Tensor, torch.Tensor]:
    """Receiver layer `layer`'s keys/values (B, H_r, N, D_r) with every sharer's residual added.

    Each sharer's cache holds the same N tokens, position for position. The sum is taken in the
    wider of the cache's and the residual's dtype, then stored in the cache's dtype.
    """
    out_k, out_v = keys, values
    for s in sharers:
        base = (keys, values) if mode == "parallel" else (out_k, out_v)
        res = s.fuser.layer_residual(layer, s.cache, base)
        if res is None:
            continue
        dk, dv = res
        if s.mask is not None:
            keep = s.mask[:, None, :, None].to(dk.device, torch.bool)  # (B, 1, N, 1)
            dk, dv = torch.where(keep, dk, 0), torch.where(keep, dv, 0)
        out_k, out_v = (out_k + dk).to(keys.dtype), (out_v + dv).to(values.dtype)
    return out_k, out_v


def fuse(receiver: KVCache, sharers: Sequence[SharerSpan], mode: FusionMode = "parallel",
         *, start: int = 0) -> KVCache:
    """The receiver cache with tokens `[start, start + N)` rewritten by every sharer's fuser.

    Each sharer cache holds exactly those N tokens. Tokens outside the span are left as they are.
    """
    check_fusion_mode(mode)
    if not sharers:
        return receiver
    n = sharers[0].cache.seq_len
    span = receiver.slice_tokens(start, start + n)
    for s in sharers:
        s.fuser.check_caches(span, s.cache)
    sharers = [at_receiver_positions(s, span.positions) for s in sharers]
    pairs = [fuse_layer(layer, k, v, sharers, mode) for layer, k, v in zip(span.layer_ids, span.keys, span.values)]
    fused = span.replace(keys=tuple(k for k, _ in pairs), values=tuple(v for _, v in pairs))
    if start == 0 and n == receiver.seq_len:
        return fused
    pieces = [receiver.slice_tokens(0, start), fused, receiver.slice_tokens(start + n, None)]
    return KVCache.concat([p for p in pieces if p.seq_len > 0])
