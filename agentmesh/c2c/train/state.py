"""Resumable training state: safetensors (tensors) + JSON (everything else) checkpoints; never pickle."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from agentmesh.c2c.train.recipe import TrainRecipe
from agentmesh.errors import CheckpointError, ConfigError

CHECKPOINT_DIR = "checkpoints"


def _optimizer_to_flat(sd: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = t
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


@dataclass
class TrainState:
    """What a checkpoint restores besides tensors."""

    step: int = 0
    samples: int = 0        # global samples read so far: where the data stream continues
    global_batch: int = 0   # samples per optimizer step (all ranks, all micro-batches)
    losses: list[float] = field(default_factory=list)          # train loss per optimizer step
    lrs: list[float] = field(default_factory=list)             # learning rate used by each step
    eval_losses: list[list[float]] = field(default_factory=list)  # [step, loss] pairs
    tokens: int = 0
    seconds: float = 0.0


@dataclass
class Checkpoint:
    """A loaded training checkpoint, as one process holds it (whole, unsharded)."""

    path: Path
    fuser: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    state: TrainState


def save_checkpoint(folder: Path, *, fuser: Mapping[str, torch.Tensor], optimizer: Mapping[str, Any],
                    scheduler: Mapping[str, Any], state: TrainState, recipe: Any, data_sha256: str,
                    keep: int) -> Path:
    """Write `folder/checkpoints/step-N` atomically (a temporary folder renamed into place) and
    drop all but the newest `keep`. Called on rank 0 only."""
    from safetensors.torch import save_file

    root = folder / CHECKPOINT_DIR
    target = root / f"step-{state.step:07d}"
    tmp = root / f".tmp-step-{state.step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
    tensors = {f"fuser.{k}": v.detach().cpu().contiguous() for k, v in fuser.items()}
    save_file({**tensors, **opt_tensors}, str(tmp / "state.safetensors"))
    meta = {"format": "agentmesh-train-checkpoint", "version": 2, "resume_key": recipe.resume_key(),
            "data_sha256": data_sha256, "state": state.__dict__, "optimizer": opt_meta,
            "scheduler": dict(scheduler)}
    (tmp / "trainer.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(p for p in (folder / CHECKPOINT_DIR).glob("step-*") if (p / "trainer.json").is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path, *, recipe: Any, data_sha256: str) -> Checkpoint:
    """The checkpoint at `path`, if `recipe` (a `TrainRecipe` or any recipe with `resume_key`,
    `batch_size` and `grad_accum`) and the data are those it was made with."""
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
        tensors = load_file(str(path / "state.safetensors"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"training checkpoint {path} is unreadable: {e}") from None
    if meta.get("format") != "agentmesh-train-checkpoint" or meta.get("version") not in (1, 2):
        raise CheckpointError(f"{path}/trainer.json is not an agentmesh training checkpoint (format version 1 or 2)")
    version = meta["version"]
    legacy = version == 1 and isinstance(recipe, TrainRecipe)
    keys = {recipe.resume_key(legacy=True) if legacy else recipe.resume_key()}
    if meta["resume_key"] not in keys or meta["data_sha256"] != data_sha256:
        raise ConfigError(f"checkpoint {path} was made with another recipe or other data; "
                          "rerun with --no-resume (starts over) or choose another output folder")
    state = dict(meta["state"])
    if version == 1:  # single-process runs: one optimizer step read batch_size x grad_accum rows
        state["global_batch"] = recipe.batch_size * recipe.grad_accum
        state["samples"] = state["step"] * state["global_batch"]
    fuser = {k[len("fuser."):]: v for k, v in tensors.items() if k.startswith("fuser.")}
    return Checkpoint(path, fuser, _optimizer_from_flat(tensors, meta["optimizer"]), meta["scheduler"],
                      TrainState(**state))


__all__ = ["CHECKPOINT_DIR", "Checkpoint", "TrainState", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]
