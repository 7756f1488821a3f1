"""Resumable training state: safetensors (tensors) + JSON (everything else) checkpoints; never pickle."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from agentmesh.c2c.fuser import Fuser
from agentmesh.c2c.train.recipe import TrainRecipe
from agentmesh.errors import CheckpointError, ConfigError

CHECKPOINT_DIR = "checkpoints"


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = t
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def _set_rng(tensors: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


@dataclass
class TrainState:
    """What a checkpoint restores besides tensors."""

    step: int = 0
    losses: list[float] = field(default_factory=list)          # train loss per optimizer step
    lrs: list[float] = field(default_factory=list)             # learning rate used by each step
    eval_losses: list[list[float]] = field(default_factory=list)  # [step, loss] pairs
    tokens: int = 0
    seconds: float = 0.0


def save_checkpoint(folder: Path, *, fuser: Fuser, opt: torch.optim.Optimizer, sched: Any,
                    state: TrainState, recipe: TrainRecipe, data_sha256: str, keep: int) -> Path:
    from safetensors.torch import save_file

    root = folder / CHECKPOINT_DIR
    target = root / f"step-{state.step:07d}"
    tmp = root / f".tmp-step-{state.step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    opt_tensors, opt_meta = _optimizer_to_flat(opt)
    tensors = {f"fuser.{k}": v.detach().contiguous() for k, v in fuser.state_dict().items()}
    save_file({**tensors, **opt_tensors, **_rng_tensors()}, str(tmp / "state.safetensors"))
    meta = {"format": "agentmesh-train-checkpoint", "version": 1, "resume_key": recipe.resume_key(),
            "data_sha256": data_sha256, "state": state.__dict__, "optimizer": opt_meta,
            "scheduler": sched.state_dict()}
    (tmp / "trainer.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(p for p in (folder / CHECKPOINT_DIR).glob("step-*") if (p / "trainer.json").is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path, *, fuser: Fuser, opt: torch.optim.Optimizer, sched: Any,
                    recipe: TrainRecipe, data_sha256: str) -> TrainState:
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
        tensors = load_file(str(path / "state.safetensors"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"training checkpoint {path} is unreadable: {e}") from None
    if meta.get("format") != "agentmesh-train-checkpoint":
        raise CheckpointError(f"{path}/trainer.json is not an agentmesh training checkpoint")
    if meta["resume_key"] != recipe.resume_key() or meta["data_sha256"] != data_sha256:
        raise ConfigError(f"checkpoint {path} was made with another recipe or other data; "
                          "rerun with --no-resume (starts over) or choose another output folder")
    fuser.load_state_dict({k[len("fuser."):]: v for k, v in tensors.items() if k.startswith("fuser.")}, strict=True)
    _optimizer_from_flat(opt, tensors, meta["optimizer"])
    sched.load_state_dict(meta["scheduler"])
    _set_rng(tensors)
    return TrainState(**meta["state"])



__all__ = ["CHECKPOINT_DIR", "TrainState", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]
