"""How a sharer's cache meets the receiver's fused span: one definition for `C2CModel` and graph runs.

A sharer reads the receiver's span either as the receiver's own token ids (same vocabulary: the
last N positions of its cache line up with the span) or, with another tokenizer, as the same
conversation rendered and tokenized its own way (`align_sharer`): each receiver position then
reads the K/V of the sharer position its gather index names, and keeps its own K/V where that
index is -1 (template tokens, text no sharer token covers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from agentmesh.c2c.alignment import AlignedBatch, align_batch, same_vocabulary
from agentmesh.c2c.fuser import Fuser, SharerSpan, fuse
from agentmesh.cache.kv import KVCache
from agentmesh.models.protocol import LanguageModel
from agentmesh.types import FusionMode, Messages


@dataclass(frozen=True)
class SharerInput:
    """What one sharer reads for a batch, already in its own token ids.

    `input_ids`/`attention_mask` (B, M) are left-padded; `gather_index` (B, N) gives, for each
    position of the receiver's fused span, the sharer position whose K/V it is fused with
    (-1: not fused). Without `gather_index`, the last N sharer positions line up with the span.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    gather_index: torch.Tensor | None = None


@dataclass(frozen=True)
class SharedCache:
    """A sharer's cache of what it read, with its fuser. `gather_index` (B, N): the position of
    `cache` each of the receiver's N fused tokens reads (-1: none); None: the last N positions."""

    fuser: Fuser
    cache: KVCache
    gather_index: torch.Tensor | None = None


def reads_receiver_ids(receiver: LanguageModel, sharer: LanguageModel) -> bool:
    """Whether `sharer` can read the receiver's token ids as they are.

    A sharer whose vocabulary only lacks some of the receiver's added tokens (Qwen2.5 against
    Qwen3's <think> tokens) still reads the receiver's ids, as the published fusers were trained.
    """
    return same_vocabulary(receiver.tokenizer, sharer.tokenizer, allow_extension=True)


def align_sharer(receiver: LanguageModel, sharer: LanguageModel, fuser: Fuser, conversations: Sequence[Messages],
                 span: int) -> AlignedBatch:
    """What a sharer with another tokenizer reads for `conversations` (each rendered by the receiver
    as `receiver.chat_ids` does): the same conversations in its own template and tokens, gathered
    for the receiver's first `span` positions by the fuser's alignment strategy."""
    return align_batch(receiver, sharer, [list(c) for c in conversations], strategy=fuser.config.alignment,
                       span=span)


def sharer_span(shared: SharedCache, n: int) -> SharerSpan:
    """`shared` lined up with the receiver's n fused tokens, position for position."""
    cache, index = shared.cache, shared.gather_index
    if index is None:
        return SharerSpan(shared.fuser, cache.slice_tokens(cache.seq_len - n, None))
    return SharerSpan(shared.fuser, cache.take_tokens(index.clamp(min=0)), mask=index >= 0)


def fuse_span(receiver: KVCache, shared: Sequence[SharedCache], mode: FusionMode, *, start: int = 0) -> KVCache:
    """`receiver`, the receiver's cache of its span, with the tokens from `start` on rewritten by
    every sharer's fuser (tokens before `start` are kept: fused in an earlier turn)."""
    n = receiver.seq_len - start
    spans = [sharer_span(SharedCache(s.fuser, s.cache.to(device=receiver.device), s.gather_index), n)
             for s in shared]
    with torch.no_grad():
        return fuse(receiver, spans, mode, start=start)
