"""The training loss: the receiver's cross-entropy on the answer tokens after the fused prompt cache."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from agentmesh.c2c.fuser import Fuser, fuse
from agentmesh.c2c.model import C2CModel
from agentmesh.c2c.train.data import IGNORE_INDEX, Batch, Example, collate
from agentmesh.c2c.train.distributed import World
from agentmesh.cache.hf import forward_with_cache, to_hf
from agentmesh.models.inference import RunningCache, prefill


def batch_loss(c2c: C2CModel, batch: Batch, *, checkpoint_receiver: bool = False) -> torch.Tensor:
    """Summed cross-entropy of the receiver on the answer tokens, after the fused prompt cache.

    Gradients flow only into the fuser: both models are frozen and their caches are computed
    under no_grad; the receiver's pass over the answer differentiates through the fused cache.
    `checkpoint_receiver` keeps none of that pass's activations (nor its (B, A, V) logits) for
    the backward pass, which recomputes them instead.
    """
    if c2c.fusion == "prompt+response":
        return _response_loss(c2c, batch)
    receiver = c2c.receiver
    dev = receiver.device
    span_ids, span_mask = batch.input_ids[:, :-1], batch.attention_mask[:, :-1]     # (B, N)
    cache = prefill(receiver, span_ids, span_mask)
    spans = [c2c.sharer_span(0, span_ids, span_mask, batch.sharer)]
    fused = fuse(cache, spans, c2c.mode)
    step_ids = torch.cat([batch.input_ids[:, -1:], batch.answer_ids], dim=1)        # (B, 1 + A)
    step_mask = torch.cat([batch.attention_mask[:, -1:], batch.answer_mask], dim=1)  # (B, 1 + A)
    # Rotary positions count real tokens only, continuing from the span (as decoding does).
    positions = (span_mask.sum(-1, keepdim=True) + step_mask.cumsum(-1) - 1).clamp(min=0)

    def answer_loss() -> torch.Tensor:
        # A fresh DynamicCache each call: the model appends the answer's keys to it.
        out, _ = forward_with_cache(
            receiver.model, to_hf(fused, receiver.config), input_ids=step_ids.to(dev),
            attention_mask=torch.cat([span_mask, step_mask], dim=1).to(dev), position_ids=positions.to(dev))
        logits = out.logits[:, :-1].float()  # (B, A, V): the logits at token t predict answer token t
        return F.cross_entropy(logits.flatten(0, 1), batch.labels.to(dev).flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")

    if checkpoint_receiver and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(answer_loss, use_reentrant=False)
    return answer_loss()


def _response_loss(c2c: C2CModel, batch: Batch) -> torch.Tensor:
    """`batch_loss` for 'prompt+response' fusers: the receiver reads prompt and answer in one pass
    (teacher forcing) and every token is fused as it is read, the answer's included."""
    ids = torch.cat([batch.input_ids, batch.answer_ids], dim=1)                      # (B, P + A)
    mask = torch.cat([batch.attention_mask, batch.answer_mask], dim=1)
    hook = c2c.response_fusion(ids, mask, [batch.sharer], span=batch.input_ids.shape[1] - 1)
    run = RunningCache.start(c2c.receiver, None, ids.shape[0], hook)
    answers = batch.answer_ids.shape[1]
    logits = run.last_logits(c2c.receiver, ids, mask, answers + 1)[:, :-1].float()   # (B, A, V)
    return F.cross_entropy(logits.flatten(0, 1), batch.labels.to(logits.device).flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@contextmanager
def checkpointed_projectors(fuser: Fuser, enabled: bool = True) -> Iterator[None]:
    """Recompute each projector's activations in the backward pass instead of storing them.

    (transformers' own gradient checkpointing drops the cache, so the receiver's pass is
    checkpointed whole by `batch_loss` instead.) The RNG state is replayed, so Gumbel noise and
    dropout match.
    """
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    patched = []
    for proj in fuser.projectors:
        plain = proj.residual
        proj.residual = (lambda plain: lambda s, t: checkpoint(plain, s, t, use_reentrant=False))(plain)
        patched.append(proj)
    try:
        yield
    finally:
        for proj in patched:
            del proj.residual  # back to the class's method


@torch.no_grad()
def held_out_loss(c2c: C2CModel, examples: Sequence[Example], *, batch_size: int, sharer_context: bool,
                  world: World | None = None) -> float:
    """Mean per-token loss on `examples`, with the fuser as it runs at inference (hard gates, no
    dropout). Under several processes each reads every world.size-th example and the sums are
    all-reduced: every rank returns the same figure."""
    fuser = c2c.fusers[0]
    was_training = fuser.training
    fuser.eval()
    world = world or World()
    mine = examples[world.rank::world.size]
    try:
        total, count = 0.0, 0
        for i in range(0, len(mine), batch_size):
            batch = collate(mine[i:i + batch_size], c2c, sharer_context=sharer_context)
            total += float(batch_loss(c2c, batch))
            count += batch.num_labels
        total, count = world.sum([total, count])
        return total / max(count, 1)
    finally:
        fuser.train(was_training)


__all__ = ["batch_loss", "checkpointed_projectors", "held_out_loss"]
