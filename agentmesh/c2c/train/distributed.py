"""Data-parallel training on PyTorch's own engine (torch.distributed, DDP, FSDP).

A run is distributed when it is started by `torchrun` (which sets WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT): gloo on CPU, NCCL on CUDA, chosen from the device. Only the fuser
is wrapped, never the frozen models: `FuserLoss` holds them outside its module tree, so DDP
broadcasts and all-reduces projector tensors only.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from agentmesh.c2c.fuser import Fuser
from agentmesh.c2c.model import C2CModel
from agentmesh.errors import ConfigError
from agentmesh.models.load import resolve_device


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank 0 of 1 when not started by torchrun."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of `values` over all ranks (float64, so token counts stay exact)."""
        t = torch.tensor(list(values), dtype=torch.float64)
        if self.distributed:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu().tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(**({"device_ids": [self.device.index]} if self.device.type == "cuda" else {}))


def rank_device(device: str, local_rank: int = 0) -> torch.device:
    """The recipe's device for this process: `auto` is CUDA when present, and a bare `cuda`
    under torchrun is this process's own GPU (cuda:LOCAL_RANK)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = resolve_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"recipe device {device!r}: no CUDA device is visible; use device: cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


@contextlib.contextmanager
def world(device: str) -> Iterator[World]:
    """Join the process group torchrun describes (if any) for the duration of a run."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        yield World(device=rank_device(device))
        return
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = rank_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    try:
        yield World(rank=rank, size=size, local_rank=local, device=dev)
    finally:
        if owned:
            dist.destroy_process_group()


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one optimizer step on one rank (dropout, Gumbel noise).

    A pure function of (seed, step, rank): a resumed run draws what the uninterrupted one drew,
    with no RNG state to carry in checkpoints, and ranks never draw the same noise.
    """
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()[:8], "little")


class FuserLoss(nn.Module):
    """The module DDP/FSDP wrap: its only parameters are the fuser's.

    `forward(batch)` is the summed answer-token loss (`loss_fn(c2c, batch)`); the C2C model (with
    the frozen receiver and sharer) is kept out of the module tree on purpose.
    """

    def __init__(self, c2c: C2CModel, loss_fn: Any):
        super().__init__()
        self.fuser: Fuser = c2c.fusers[0]
        self._c2c = (c2c,)  # a tuple: not registered as a submodule
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self._loss_fn(self._c2c[0], batch)


def wrap(module: FuserLoss, w: World, *, fsdp: bool) -> nn.Module:
    """DDP (every rank holds the whole fuser) or FSDP (parameters, gradients and optimizer state
    sharded across ranks); the module itself in a single process."""
    if not w.distributed:
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        # FSDP shards tensors of one dimension or more; the 0-d gate logits stay whole on every
        # rank and `sync_unsharded` averages their gradients.
        fully_shard(module, ignored_params=set(unsharded(module)))
        return module
    from torch.nn.parallel import DistributedDataParallel

    # Buffers (the gate temperature) are set identically on every rank after each step:
    # nothing needs syncing before each forward.
    ids = [w.device.index] if w.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)


def unsharded(module: nn.Module) -> list[nn.Parameter]:
    """The parameters FSDP leaves whole (0-d)."""
    return [p for p in module.parameters() if p.dim() == 0]


def sync_unsharded(wrapped: nn.Module, w: World) -> None:
    """Average the gradients FSDP does not reduce itself (no-op under DDP or one process)."""
    if not hasattr(wrapped, "unshard"):
        return
    grads = [p.grad for p in unsharded(wrapped) if p.grad is not None]
    if grads:
        flat = torch.stack(grads)
        dist.all_reduce(flat)
        for g, total in zip(grads, flat / w.size):
            g.copy_(total)


def clip_gradients(params: Sequence[nn.Parameter], max_norm: float) -> None:
    """`clip_grad_norm_` over parameters of which some are FSDP shards (DTensors) and some whole."""
    from torch.distributed.tensor import DTensor

    sharded = [p.grad for p in params if p.grad is not None and isinstance(p.grad, DTensor)]
    if not sharded:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    whole = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
    squares = sum(torch.linalg.vector_norm(g, dtype=torch.float32).full_tensor() ** 2 for g in sharded)
    squares = squares + sum(torch.linalg.vector_norm(g, dtype=torch.float32) ** 2 for g in whole)
    coef = torch.clamp(max_norm / (squares.sqrt() + 1e-6), max=1.0)
    for g in (*sharded, *whole):
        g.mul_(coef.to(g.dtype) if not isinstance(g, DTensor) else coef.item())


@contextlib.contextmanager
def no_sync(wrapped: nn.Module, last: bool) -> Iterator[None]:
    """Skip the gradient reduction on all but the last micro-batch of an optimizer step."""
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP
        wrapped.set_requires_gradient_sync(last)
        yield
    elif not last and hasattr(wrapped, "no_sync"):  # DDP
        with wrapped.no_sync():
            yield
    else:
        yield


@contextlib.contextmanager
def gathered(wrapped: nn.Module) -> Iterator[None]:
    """Whole parameters on every rank for a pass outside `forward` (held-out loss with FSDP)."""
    unshard = getattr(wrapped, "unshard", None)
    if unshard is None:
        yield
        return
    unshard()
    try:
        yield
    finally:
        wrapped.reshard()


def full_state(wrapped: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fuser state dict, optimizer state dict) as one process would hold them. Collective."""
    fuser = wrapped.module.fuser if hasattr(wrapped, "module") else wrapped.fuser
    if not hasattr(wrapped, "unshard"):
        return fuser.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, opt_sd = get_state_dict(wrapped, opt, options=StateDictOptions(full_state_dict=True))
    return _strip(model_sd), _optimizer_by_index(opt_sd, _optimizer_names(wrapped, opt))


def _strip(sd: dict[str, Any]) -> dict[str, Any]:
    return {k[len("fuser."):]: v for k, v in sd.items()}


def _optimizer_names(wrapped: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order `Optimizer.state_dict` numbers them (group by group)."""
    name = {id(p): n for n, p in wrapped.named_parameters()}
    return [name[id(p)] for g in opt.param_groups for p in g["params"]]


def _optimizer_by_index(opt_sd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """torch.distributed.checkpoint names optimizer state by parameter; checkpoints number it,
    as `torch.optim.Optimizer.state_dict` does, so they load under DDP and FSDP alike."""
    index = {n: i for i, n in enumerate(names)}
    state = {index[n]: v for n, v in opt_sd["state"].items()}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in opt_sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_full_state(wrapped: nn.Module, opt: torch.optim.Optimizer, model_sd: dict[str, Any],
                    opt_sd: dict[str, Any]) -> None:
    """Load the state `full_state` returned (the same on every rank) into a wrapped module."""
    fuser = wrapped.module.fuser if hasattr(wrapped, "module") else wrapped.fuser
    if not hasattr(wrapped, "unshard"):
        fuser.load_state_dict(model_sd, strict=True)
        opt.load_state_dict(opt_sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    names = _optimizer_names(wrapped, opt)
    by_name = {"state": {names[i]: v for i, v in opt_sd["state"].items()},
               "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in opt_sd["param_groups"]]}
    set_state_dict(wrapped, opt, model_state_dict={f"fuser.{k}": v for k, v in model_sd.items()},
                   optim_state_dict=by_name, options=StateDictOptions(full_state_dict=True, strict=True))


__all__ = [
    "FuserLoss", "World", "clip_gradients", "full_state", "gathered", "load_full_state", "no_sync", "rank_device",
    "step_seed", "sync_unsharded", "unsharded", "world", "wrap",
]
