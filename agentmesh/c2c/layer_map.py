"""Layer maps: which sharer layer each receiver layer reads (one projector per receiver layer)."""
from __future__ import annotations

from fractions import Fraction

from agentmesh.errors import ConfigError

LAYER_MAPS = ("last_aligned", "k_nearest")


def _last_aligned(lt: int, ls: int) -> tuple[int, ...]:
    # Last layers aligned; surplus early receiver layers all read sharer layer 0.
    return tuple(min(max(t + ls - lt, 0), ls - 1) for t in range(lt))


def _depth(i: int, num_layers: int) -> Fraction:
    # Relative depth on [0, 1]; exact fractions so ties are real ties, not float noise.
    return Fraction(i, num_layers - 1) if num_layers > 1 else Fraction(0)


def _k_nearest(lt: int, ls: int) -> tuple[int, ...]:
    # min() keeps the first minimum, so ties go to the lower sharer layer.
    return tuple(min(range(ls), key=lambda s: abs(_depth(s, ls) - _depth(t, lt))) for t in range(lt))


def layer_map(kind: str, num_receiver_layers: int, num_sharer_layers: int) -> tuple[int, ...]:
    """Entry t is the sharer layer read by receiver layer t; length = `num_receiver_layers`."""
    if num_receiver_layers < 1 or num_sharer_layers < 1:
        raise ConfigError(f"layer_map needs >= 1 layer per model, got receiver={num_receiver_layers}, "
                          f"sharer={num_sharer_layers}")
    if kind == "last_aligned":
        return _last_aligned(num_receiver_layers, num_sharer_layers)
    if kind == "k_nearest":
        return _k_nearest(num_receiver_layers, num_sharer_layers)
    raise ConfigError(f"unknown layer map {kind!r}; known: {', '.join(LAYER_MAPS)}")
