"""`KVCache`: the one value type in which keys and values move between agentmesh packages."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import torch

from agentmesh.cache.rotary import RotarySpec, rotary_spec
from agentmesh.errors import CacheError

# Config fields that decide whether two models produce interchangeable caches.
_FINGERPRINT_FIELDS = (
    "model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_size", "intermediate_size", "vocab_size", "rope_theta", "rope_parameters", "rms_norm_eps",
    "max_position_embeddings", "sliding_window", "tie_word_embeddings",
)


def text_config(config: Any) -> Any:
    """The decoder config of a (possibly multimodal) transformers config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@dataclass(frozen=True)
class ModelSignature:
    """What a cache must agree with to be read by a model: its shape and a config fingerprint,
    and how its keys were rotated (`rotary`; None for a model without RoPE or a record without it)."""

    name: str
    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    fingerprint: str
    rotary: RotarySpec | None = None

    @classmethod
    def from_config(cls, config: Any, name: str = "") -> "ModelSignature":
        cfg = text_config(config)
        num_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        facts = {k: getattr(cfg, k, None) for k in _FINGERPRINT_FIELDS}
        blob = json.dumps(facts, sort_keys=True, default=str).encode()
        return cls(
            name=name or getattr(cfg, "_name_or_path", "") or cfg.model_type,
            model_type=cfg.model_type,
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            vocab_size=cfg.vocab_size,
            fingerprint=hashlib.sha256(blob).hexdigest()[:16],
            rotary=_rotary_or_none(cfg),
        )

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["rotary"] = None if self.rotary is None else self.rotary.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSignature":
        """From `to_dict`'s output; records written before `rotary` existed read as None. A malformed
        `rotary` raises `ValueError`."""
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k != "rotary"}
        rotary = data.get("rotary")
        return cls(**fields, rotary=None if rotary is None else RotarySpec.from_dict(rotary))

    def same_shape(self, other: "ModelSignature") -> bool:
        return (self.num_layers, self.num_kv_heads, self.head_dim) == (
            other.num_layers, other.num_kv_heads, other.head_dim)


def _rotary_or_none(cfg: Any) -> RotarySpec | None:
    # A config transformers' rope initialisers cannot read still loads; its keys are then never
    # re-rotated, and fusion refuses caches that would need it (see `agentmesh.c2c.fuser`).
    try:
        return rotary_spec(cfg)
    except (KeyError, TypeError, AttributeError, ValueError):
        return None


@dataclass(frozen=True)
class KVCache:
    """Per-layer keys and values, each `(B, H, N, D)`, plus what is needed to use them again.

    `layer_ids[i]` is the model layer that `keys[i]`/`values[i]` belong to (a cache may hold a
    subset of layers). `attention_mask` (B, N) marks real tokens (1) against padding (0);
    `positions` (B, N) are the rotary positions the keys were computed at. Tensors are never
    modified in place: every operation returns a new `KVCache`.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    signature: ModelSignature | None = None
    token_ids: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    layer_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(self.keys))
        object.__setattr__(self, "values", tuple(self.values))
        if not self.layer_ids:
            object.__setattr__(self, "layer_ids", tuple(range(len(self.keys))))
        if len(self.keys) != len(self.values) or len(self.keys) != len(self.layer_ids):
            raise CacheError(
                f"KVCache has {len(self.keys)} key layers, {len(self.values)} value layers and "
                f"{len(self.layer_ids)} layer ids; all three must be equal")
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k.dim() != 4 or k.shape != v.shape:
                raise CacheError(
                    f"KVCache layer {self.layer_ids[i]}: keys {tuple(k.shape)} and values "
                    f"{tuple(v.shape)} must both be (batch, heads, tokens, head_dim)")

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def seq_len(self) -> int:
        """Tokens held by the longest layer (sliding-window layers may hold fewer)."""
        return max((k.shape[2] for k in self.keys), default=0)

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def __len__(self) -> int:
        return self.num_layers

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(zip(self.keys, self.values))

    def layer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of model layer `layer_id`."""
        try:
            i = self.layer_ids.index(layer_id)
        except ValueError:
            raise CacheError(f"KVCache holds layers {list(self.layer_ids)}, not layer {layer_id}") from None
        return self.keys[i], self.values[i]

    def replace(self, **changes: Any) -> "KVCache":
        return replace(self, **changes)

    def slice_tokens(self, start: int | None = None, stop: int | None = None) -> "KVCache":
        """The tokens `[start, stop)` of every layer (and of the per-token metadata)."""
        s = slice(start, stop)
        cut = lambda t: None if t is None else t[:, s]  # noqa: E731
        return replace(
            self,
            keys=tuple(k[:, :, s] for k in self.keys),
            values=tuple(v[:, :, s] for v in self.values),
            token_ids=cut(self.token_ids), positions=cut(self.positions),
            attention_mask=cut(self.attention_mask))

    def take_tokens(self, index: torch.Tensor) -> "KVCache":
        """Per row, the tokens at `index` (B, N) in that order (e.g. to align with another tokenizer)."""
        idx = index.to(self.device, torch.long)
        take = lambda t: t.gather(2, idx[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))  # noqa: E731
        meta = lambda t: None if t is None else t.gather(1, idx.to(t.device))  # noqa: E731
        return replace(
            self, keys=tuple(take(k) for k in self.keys), values=tuple(take(v) for v in self.values),
            token_ids=meta(self.token_ids), positions=meta(self.positions),
            attention_mask=meta(self.attention_mask))

    def select_layers(self, layer_ids: Sequence[int]) -> "KVCache":
        pairs = [self.layer(i) for i in layer_ids]
        return replace(self, keys=tuple(k for k, _ in pairs), values=tuple(v for _, v in pairs),
                       layer_ids=tuple(layer_ids))

    def select_batch(self, index: torch.Tensor | Sequence[int]) -> "KVCache":
        idx = torch.as_tensor(index, dtype=torch.long, device=self.device)
        pick = lambda t: None if t is None else t.index_select(0, idx.to(t.device))  # noqa: E731
        return replace(
            self, keys=tuple(k.index_select(0, idx) for k in self.keys),
            values=tuple(v.index_select(0, idx) for v in self.values),
            token_ids=pick(self.token_ids), positions=pick(self.positions),
            attention_mask=pick(self.attention_mask))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "KVCache":
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        meta = lambda t: None if t is None else t.to(device=device)  # noqa: E731
        return replace(
            self, keys=tuple(move(k) for k in self.keys), values=tuple(move(v) for v in self.values),
            token_ids=meta(self.token_ids), positions=meta(self.positions),
            attention_mask=meta(self.attention_mask))

    def clone(self) -> "KVCache":
        c = lambda t: None if t is None else t.clone()  # noqa: E731
        return replace(
            self, keys=tuple(k.clone() for k in self.keys), values=tuple(v.clone() for v in self.values),
            token_ids=c(self.token_ids), positions=c(self.positions), attention_mask=c(self.attention_mask))

    @staticmethod
    def concat(caches: Sequence["KVCache"]) -> "KVCache":
        """Caches of the same layers joined along the token axis, in order."""
        first = caches[0]
        for c in caches[1:]:
            if c.layer_ids != first.layer_ids:
                raise CacheError(f"cannot concatenate caches of layers {list(first.layer_ids)} "
                                 f"and {list(c.layer_ids)}")
        cat = lambda ts: None if any(t is None for t in ts) else torch.cat(ts, dim=1)  # noqa: E731
        return replace(
            first,
            keys=tuple(torch.cat(ks, dim=2) for ks in zip(*(c.keys for c in caches))),
            values=tuple(torch.cat(vs, dim=2) for vs in zip(*(c.values for c in caches))),
            token_ids=cat([c.token_ids for c in caches]), positions=cat([c.positions for c in caches]),
            attention_mask=cat([c.attention_mask for c in caches]))

    def check_signature(self, expected: ModelSignature, what: str = "cache") -> None:
        """Raise `CacheError` unless this cache was made by a model with `expected`'s shape."""
        sig = self.signature
        if sig is not None and sig.fingerprint != expected.fingerprint:
            raise CacheError(f"{what} was made by model {sig.name!r} (fingerprint {sig.fingerprint}); "
                             f"expected {expected.name!r} (fingerprint {expected.fingerprint})")
        for lid, k in zip(self.layer_ids, self.keys):
            if lid >= expected.num_layers or k.shape[1] != expected.num_kv_heads or k.shape[3] != expected.head_dim:
                raise CacheError(
                    f"{what} layer {lid} has {k.shape[1]} heads of dim {k.shape[3]}; model {expected.name!r} "
                    f"has {expected.num_layers} layers of {expected.num_kv_heads} heads of dim {expected.head_dim}")
