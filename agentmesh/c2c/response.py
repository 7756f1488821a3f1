"""Include-response fusion: each token the receiver reads is fused as it is read, before its attention.

A `ResponseFusion` is a `TokenHook` on the receiver's running cache. Before the receiver reads
tokens, every sharer reads the same tokens on its own running cache (the first time: its own
reading of the prompt, which may start with a private role or context); the K/V the sharer
computes for them are captured. Then, inside the receiver's forward pass, each layer's new K/V
are rewritten by the fusers from those captured sharer K/V (`fuse_layer`), and attention reads
the fused K/V. So the last prompt token and every generated token are fused too, and no model
code is patched: the rewrite happens in the cache's `update`.

One `ResponseFusion` serves one generation call (it holds that call's sharer caches).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from agentmesh.c2c.fuser import Fuser, SharerSpan, at_receiver_positions, fuse_layer
from agentmesh.cache.kv import KVCache
from agentmesh.models.inference import RunningCache
from agentmesh.models.protocol import LanguageModel
from agentmesh.types import FusionMode


@dataclass
class _Capture:
    """A `TokenHook` that keeps the K/V a model computes for the tokens of its latest forward pass."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)

    def read(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> None:
        self.keys.clear()
        self.values.clear()

    def rewrite(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer], self.values[layer] = keys, values
        return keys, values


@dataclass(frozen=True)
class SharerReading:
    """A sharer's first reading (B, M), left-padded: its own context, if any, then the whole prompt;
    its last N tokens are the receiver's N prompt tokens, position for position."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


class ResponseFusion:
    """Fuses `sharers`' K/V into every token the receiver reads (see the module docstring)."""

    def __init__(self, sharers: Sequence[LanguageModel], fusers: Sequence[Fuser],
                 readings: Sequence[SharerReading | None], mode: FusionMode = "parallel"):
        self.sharers, self.fusers, self.mode = tuple(sharers), tuple(fusers), mode
        self._first = list(readings)
        self._captures = [_Capture() for _ in self.sharers]
        self._runs: list[RunningCache | None] = [None] * len(self.sharers)
        self._spans: list[SharerSpan] = []

    def read(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> None:
        """Every sharer reads the tokens first; their K/V for the last k positions await the receiver."""
        k = input_ids.shape[1]
        spans = []
        for i, (lm, fuser, capture) in enumerate(zip(self.sharers, self.fusers, self._captures)):
            first = self._first[i]
            ids, smask = (input_ids, mask) if first is None else (first.input_ids, first.attention_mask)
            self._first[i] = None
            if self._runs[i] is None:
                self._runs[i] = RunningCache.start(lm, None, ids.shape[0], capture)
            run = self._runs[i]
            with torch.no_grad():  # the sharer is frozen, also while a fuser trains
                run.read(lm, ids, smask)  # it only reads: no LM head
            layers = sorted(capture.keys)
            cache = KVCache(keys=tuple(capture.keys[j][:, :, -k:] for j in layers),
                            values=tuple(capture.values[j][:, :, -k:] for j in layers),
                            signature=lm.signature, token_ids=run.token_ids[:, -k:],
                            positions=run.positions[:, -k:], attention_mask=run.mask[:, -k:], layer_ids=tuple(layers))
            spans.append(at_receiver_positions(SharerSpan(fuser, cache), positions))
        self._spans = spans

    def rewrite(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fuse_layer(layer, keys, values, self._spans, self.mode)
