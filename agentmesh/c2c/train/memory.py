"""What a training run will hold in memory, per process, estimated before the first step.

Exact for parameters, gradients and AdamW state; the activation figure is an upper-bound
estimate from the shapes of the longest micro-batch (what each projector block and each receiver
layer keeps for the backward pass, the fused cache, and the (B, A, V) logits).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from agentmesh.cache.kv import text_config
from agentmesh.errors import ConfigError
from agentmesh.models.protocol import LanguageModel
from agentmesh.units import human_bytes


@dataclass(frozen=True)
class MemoryBudget:
    device: str
    frozen_models: int       # bytes of receiver + sharer weights
    fuser: int               # bytes of the fuser's weights (whole: FSDP gathers them for each pass)
    fuser_parameters: int
    gradients: int           # this process's share
    optimizer: int           # AdamW moments, this process's share
    activations: int         # estimate for one micro-batch
    tokens: str              # what the activation estimate assumed, for people

    @property
    def total(self) -> int:
        return self.frozen_models + self.fuser + self.gradients + self.optimizer + self.activations

    def lines(self, free: int | None = None) -> list[str]:
        have = f" of {human_bytes(free)} available" if free is not None else ""
        return [
            f"memory per process on {self.device} (estimate): {human_bytes(self.total)}{have}",
            f"  frozen models {human_bytes(self.frozen_models)} | fuser {human_bytes(self.fuser)} "
            f"({self.fuser_parameters / 1e6:.2f} M parameters) | gradients {human_bytes(self.gradients)} | "
            f"AdamW state {human_bytes(self.optimizer)} | activations {human_bytes(self.activations)} ({self.tokens})",
        ]


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def estimate(*, receiver: LanguageModel, sharer: LanguageModel, fuser: torch.nn.Module, batch_size: int,
             prompt_tokens: int, answer_tokens: int, sharer_tokens: int, shards: int = 1,
             autocast: torch.dtype | None = None, checkpointing: bool = False, device: str = "cpu") -> MemoryBudget:
    """The budget of one process; `shards` > 1 when FSDP splits the fuser's state over processes."""
    models = {id(receiver.model): receiver.model, id(sharer.model): sharer.model}
    frozen = sum(_param_bytes(m) for m in models.values())
    n_params = sum(p.numel() for p in fuser.parameters())
    fuser_bytes = _param_bytes(fuser)
    grads = fuser_bytes // shards
    optimizer = 2 * n_params * 4 // shards if all(p.dtype == torch.float32 for p in fuser.parameters()) \
        else 2 * fuser_bytes // shards

    rc = text_config(receiver.config)
    r_sig, s_sig = receiver.signature, sharer.signature
    act = 2 if autocast is not None else next(fuser.parameters()).element_size()
    model_el = next(receiver.model.parameters()).element_size()
    b, n, a, s = batch_size, prompt_tokens, answer_tokens, sharer_tokens
    kv_r = 2 * r_sig.num_layers * r_sig.num_kv_heads * r_sig.head_dim          # per token, all layers
    kv_s = 2 * s_sig.num_layers * s_sig.num_kv_heads * s_sig.head_dim
    # Both prefilled caches, the fused copy of the receiver's, and the caches grown by the answer.
    caches = b * ((2 * n + a) * kv_r + s * kv_s) * model_el
    # Per token and receiver layer, keys and values each: the projector's concatenated input,
    # each FFN block's norm/W1/GELU/W2 outputs, the scalar branch and the gated output.
    proj = getattr(fuser, "projectors", [])
    per_token = 0
    for p in proj:
        args = getattr(p, "init_args", {})
        h, i, layers = args.get("hidden_dim", 1024), args.get("intermediate_dim", 1024), args.get("num_layers", 3)
        io = args.get("source_dim", 0) * args.get("source_num_heads", 0) + \
            2 * args.get("target_dim", 0) * args.get("target_num_heads", 0)
        per_token += 2 * (io + h + (layers - 1) * (2 * h + 2 * i) + 4 * h + 4 * args.get("target_dim", 0)
                          * args.get("target_num_heads", 0))
    projectors = b * n * per_token * act
    # The receiver's pass over [last prompt token + answer] keeps about this much per token and layer.
    hidden, inter = rc.hidden_size, getattr(rc, "intermediate_size", 4 * rc.hidden_size)
    layer_acts = b * (a + 1) * rc.num_hidden_layers * (12 * hidden + 3 * inter) * act
    logits = 3 * b * a * r_sig.vocab_size * 4   # logits, their float32 copy, the softmax gradient
    if checkpointing:  # only one projector's and one receiver pass's activations live at a time
        projectors //= max(1, len(proj))
        layer_acts = 0
    return MemoryBudget(
        device=device, frozen_models=frozen, fuser=fuser_bytes, fuser_parameters=n_params, gradients=grads,
        optimizer=optimizer, activations=caches + projectors + layer_acts + logits,
        tokens=f"batch {b} x {n} prompt + {a} answer tokens, sharer {s}")


def available(device: torch.device) -> int | None:
    """Bytes this process may use on `device`: free GPU memory plus what it already holds; on
    CPU, the machine's available memory (plus this process's own) shared by its local processes."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_allocated(device)
    try:
        meminfo = open("/proc/meminfo", encoding="ascii").read()
        avail = int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:"))) * 1024
        status = open("/proc/self/status", encoding="ascii").read()
        rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
    except (OSError, StopIteration, ValueError):
        return None
    return (avail + rss) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def check_fits(budget: MemoryBudget, free: int | None, *, processes: int) -> None:
    """Fail before the first step, with what to change, when the estimate exceeds `free`."""
    if free is None or budget.total <= free:
        return
    hints = ["a smaller batch_size (set global_batch to keep the effective batch)",
             "gradient_checkpointing: true", "autocast: bfloat16"]
    if processes > 1:
        hints.append("fsdp: true")
    raise ConfigError(f"the recipe needs about {human_bytes(budget.total)} per process on {budget.device} "
                      f"but only {human_bytes(free)} is available ({'; '.join(budget.lines()[1:]).strip()}); "
                      f"try {', '.join(hints)}, or check_memory: false to start anyway")


__all__ = ["MemoryBudget", "available", "check_fits", "estimate"]
