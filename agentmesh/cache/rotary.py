"""Rotary position embeddings of cached keys: what they are, and moving keys to other positions.

Keys are cached after RoPE: a key computed at position p is `R(p) k` (times a position-free
attention scale, e.g. YaRN's), where `R(p)` rotates each pair of dimensions by `p * inv_freq[i]`.
Rotations compose, so `R(q - p) R(p) k = R(q) k`: a key computed at p is moved to q exactly,
without the model, given the model's `inv_freq`. A `RotarySpec` records those frequencies per
layer (Gemma3's sliding and full-attention layers use different bases), read from the config
with transformers' own rope initialisers (linear, dynamic, yarn, longrope, llama3 scaling;
partial rotary dimensions). Dynamic and longrope scaling are recorded as they are for prompts
within the original context length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Model types whose rotary embedding rotates interleaved pairs (2i, 2i+1) rather than halves.
_INTERLEAVED = frozenset({"gptj", "chatglm", "glm", "glm4", "cohere", "cohere2"})
# Bounds on a recorded spec, which may arrive from another host.
_MAX_KINDS, _MAX_FREQS, _MAX_LAYERS = 8, 4096, 4096


@dataclass(frozen=True)
class RotarySpec:
    """How a model rotates its keys: one `inv_freq` table per kind of layer, and each layer's kind.

    A table of F frequencies rotates the first 2F dimensions of a head (partial rotary leaves the
    rest as they are). `style` is "half" (pairs (i, i + F), Llama/Qwen/Gemma) or "interleaved".
    """

    inv_freq: tuple[tuple[float, ...], ...]
    layer_kind: tuple[int, ...]
    style: str = "half"

    def to_dict(self) -> dict[str, Any]:
        return {"inv_freq": [list(f) for f in self.inv_freq], "layer_kind": list(self.layer_kind), "style": self.style}

    @classmethod
    def from_dict(cls, data: Any) -> "RotarySpec":
        """From `to_dict`'s output, checked (it may come from a file or another host); `ValueError` if malformed."""
        if not isinstance(data, dict) or set(data) != {"inv_freq", "layer_kind", "style"}:
            raise ValueError("rotary must be {inv_freq, layer_kind, style}")
        tables, kinds, style = data["inv_freq"], data["layer_kind"], data["style"]
        if (not isinstance(tables, list) or not 1 <= len(tables) <= _MAX_KINDS
                or not all(isinstance(f, list) and 1 <= len(f) <= _MAX_FREQS for f in tables)
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for f in tables for x in f)):
            raise ValueError(f"rotary.inv_freq must be 1-{_MAX_KINDS} lists of 1-{_MAX_FREQS} numbers")
        if (not isinstance(kinds, list) or len(kinds) > _MAX_LAYERS
                or not all(type(k) is int and 0 <= k < len(tables) for k in kinds)):
            raise ValueError(f"rotary.layer_kind must list, per layer, an index into inv_freq (0-{len(tables) - 1})")
        if style not in ("half", "interleaved"):
            raise ValueError(f"rotary.style is {style!r}; expected 'half' or 'interleaved'")
        return cls(inv_freq=tuple(tuple(float(x) for x in f) for f in tables), layer_kind=tuple(kinds), style=style)

    def frequencies(self, layer: int) -> torch.Tensor:
        return torch.tensor(self.inv_freq[self.layer_kind[layer]], dtype=torch.float64)


def _default_inv_freq(params: dict[str, Any], head_dim: int) -> torch.Tensor:
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rotary_spec(cfg: Any) -> RotarySpec | None:
    """The `RotarySpec` of a decoder config (a text config), or None for a model without RoPE."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(cfg, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        return None
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_type = all(isinstance(v, dict) for v in params.values())  # Gemma3: {layer type: parameters}
    layer_types = list(getattr(cfg, "layer_types", None) or []) if per_type else []
    kinds = sorted(params) if per_type else [None]
    tables = []
    for kind in kinds:
        p = params[kind] if kind is not None else params
        if "rope_theta" not in p:
            return None
        rope_type = p.get("rope_type", "default")
        if rope_type == "default":
            inv = _default_inv_freq(p, head_dim)
        else:
            inv, _scale = ROPE_INIT_FUNCTIONS[rope_type](cfg, None, layer_type=kind) if kind is not None \
                else ROPE_INIT_FUNCTIONS[rope_type](cfg, None)
        tables.append(tuple(float(x) for x in inv.float().tolist()))
    if per_type:
        layer_kind = tuple(kinds.index(t) for t in layer_types)
    else:
        layer_kind = (0,) * cfg.num_hidden_layers
    style = "interleaved" if getattr(cfg, "model_type", "") in _INTERLEAVED else "half"
    return RotarySpec(inv_freq=tuple(tables), layer_kind=layer_kind, style=style)


def rotate_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, style: str = "half") -> torch.Tensor:
    """`keys` (B, H, N, D) rotated by `delta` (B, N) positions (from p to p + delta), in keys' dtype.

    Angles are taken in float64 and the rotation in float32 (at least), so moving a key and
    computing it at the new position agree to float32 rounding.
    """
    f = inv_freq.numel()
    angle = delta.to(keys.device, torch.float64)[:, None, :, None] * inv_freq.to(keys.device)  # (B, 1, N, F)
    wide = torch.promote_types(keys.dtype, torch.float32)
    cos, sin = angle.cos().to(wide), angle.sin().to(wide)
    k = keys.to(wide)
    if style == "interleaved":
        x1, x2 = k[..., 0:2 * f:2], k[..., 1:2 * f:2]
        rot = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    else:
        x1, x2 = k[..., :f], k[..., f:2 * f]
        rot = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return torch.cat([rot, k[..., 2 * f:]], dim=-1).to(keys.dtype)
