"""`agentmesh train RECIPE --dry-run`: the whole run, shrunk, in seconds and without a model hub.

The receiver and sharer become random-weight models of the same architectures (configs shrunk,
one tokenizer trained on the spot, as the published pairs share theirs), the projectors shrink
to width 32, and the data becomes a handful of chats in the OpenHermes-2.5 shape (a temporary file per
process, so that only rank 0 writes into the run's folder). Everything else (layer map, temperature schedule, optimizer, schedule, memory check,
checkpoints, processes) is the recipe's, for two optimizer steps with gradient accumulation, on
the recipe's device, or the CPU where no GPU is visible.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agentmesh.c2c.train.recipe import TrainRecipe
from agentmesh.models.pool import ModelPool

DRY_RUN_STEPS = 2
# Architectures recognised in a model reference; anything else stands in as llama.
_ARCHS = ("qwen3", "qwen2", "gemma3", "llama")
# Shrunk shapes: the receiver a layer deeper than the sharer, as in the published pairs, so the
# last_aligned map has surplus receiver layers reading sharer layer 0.
_RECEIVER = dict(num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128)
_SHARER = dict(num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=1, head_dim=8, intermediate_size=64)
_TOPICS = ("the sea", "a red fox", "prime numbers", "rain in spring", "a quiet town", "the stars", "bread", "tea")


def stand_in_arch(ref: str) -> str:
    name = ref.lower().replace(".", "").replace("-", "")
    return next((a for a in _ARCHS if a in name), "llama")


def dry_run_rows(n: int = 16) -> list[dict[str, Any]]:
    """Chats in the OpenHermes-2.5 row shape (`conversations` of from/value turns)."""
    rows = []
    for i in range(n):
        topic = _TOPICS[i % len(_TOPICS)]
        turns = [{"from": "human", "value": f"Write one short sentence about {topic}."},
                 {"from": "gpt", "value": f"Here is a sentence about {topic}, number {i}."}]
        if i % 3 == 0:
            turns.insert(0, {"from": "system", "value": "You are a helpful assistant."})
        rows.append({"conversations": turns})
    return rows


def dry_run(recipe: TrainRecipe, out: Path, scratch: Path, *, processes: int = 1) -> tuple[TrainRecipe, ModelPool]:
    """(the shrunk recipe writing to `out`, a pool holding the stand-ins under the recipe's refs);
    its data file goes to the folder `scratch`."""
    from agentmesh.models.tiny import build_tiny_model, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer()
    pool = ModelPool()
    pool.put(recipe.receiver, build_tiny_model(stand_in_arch(recipe.receiver), tokenizer, seed=0,
                                               name=f"stand-in for {recipe.receiver}", **_RECEIVER))
    if recipe.sharer != recipe.receiver:
        pool.put(recipe.sharer, build_tiny_model(stand_in_arch(recipe.sharer), tokenizer, seed=1,
                                                 name=f"stand-in for {recipe.sharer}", **_SHARER))
    data = scratch / "dry-run-data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in dry_run_rows()), encoding="utf-8")
    batch = 2
    shrunk = recipe.model_dump()
    shrunk.update(
        projector={**shrunk["projector"], "hidden_dim": 32, "intermediate_dim": 32},
        data={"path": str(data), "eval_fraction": 0.25, "max_length": recipe.data.max_length},
        steps=DRY_RUN_STEPS, epochs=None, batch_size=batch, grad_accum=2, global_batch=batch * 2 * processes,
        dtype="float32", device=recipe.device if _cuda(recipe) else "cpu", eval_every=1, save_every=1, output=str(out),
        sharer_context=False,  # the stand-in chats carry no private context
        autocast=recipe.autocast if recipe.autocast != "float16" or _cuda(recipe) else None)
    return TrainRecipe.parse(shrunk, source="dry run"), pool


def _cuda(recipe: TrainRecipe) -> bool:
    import torch

    return recipe.device != "cpu" and torch.cuda.is_available()


__all__ = ["DRY_RUN_STEPS", "dry_run", "dry_run_rows", "stand_in_arch"]
