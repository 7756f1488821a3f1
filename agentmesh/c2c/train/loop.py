"""Fuser training: only the projectors learn, from the receiver's next-token loss.

One step, per micro-batch of chats:
  1. the receiver prefills its prompt minus the last token, the sharer the same span (after its
     private context when the recipe has one); both frozen, under no_grad;
  2. the fuser rewrites the receiver's span cache, with gradients;
  3. the receiver reads [last prompt token + answer tokens] after the fused cache (a transformers
     `DynamicCache` built by `to_hf`; its `torch.cat` keeps the autograd graph), and the loss is
     its cross-entropy on the answer tokens (labels -100 on padding).
AdamW, linear warm-up then linear decay, gradient clipping, the gate temperature annealed after
each optimizer step. Checkpoints are safetensors (tensors) + JSON (everything else); never pickle.
The data is one seeded stream of rows (a fresh shuffle per epoch); each optimizer step reads the
next global batch from it, split over processes and micro-batches, and dropout and Gumbel noise
are seeded per (step, rank). A resumed run, on any number of processes that keeps the global
batch, therefore sees the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import math
import shutil
import sys
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import yaml

from agentmesh.c2c.fuser import Fuser
from agentmesh.c2c.model import C2CModel
from agentmesh.c2c.train.driver import drive, lr_factor, plot_loss_curve
from agentmesh.c2c.train.data import Batch, collate, run_data, shard, stream_rows
from agentmesh.c2c.train.distributed import (
    FuserLoss, World, clip_gradients, full_state, gathered, load_full_state, no_sync, sync_unsharded,
    world, wrap,
)
from agentmesh.c2c.train.loss import batch_loss, checkpointed_projectors, held_out_loss
from agentmesh.c2c.train.memory import available, check_fits, estimate
from agentmesh.c2c.train.recipe import TrainRecipe
from agentmesh.c2c.train.state import CHECKPOINT_DIR, TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from agentmesh.errors import ConfigError
from agentmesh.models.pool import ModelPool
from agentmesh.models.protocol import LanguageModel

FUSER_DIR = "fuser"


@dataclass
class TrainResult:
    output_dir: Path
    fuser_dir: Path | None          # None when the run stopped early (`stop_at`)
    steps: int                      # optimizer steps done
    total_steps: int
    losses: list[float]             # train loss per optimizer step
    lrs: list[float]                # learning rate of each optimizer step
    eval_losses: list[tuple[int, float]]  # (step, held-out loss); step 0 is before training
    final_eval_loss: float | None
    final_train_loss: float | None
    data_sha256: str
    global_batch: int = 0           # sequences per optimizer step, all processes together
    main: bool = True               # False on the ranks > 0 of a distributed run (they write nothing)

    @property
    def completed(self) -> bool:
        return self.steps >= self.total_steps


def _final_train_loss(losses: Sequence[float]) -> float | None:
    tail = losses[-max(1, min(10, len(losses) // 10 or 1)):]
    return sum(tail) / len(tail) if tail else None


def _load_models(recipe: TrainRecipe, pool: ModelPool | None, device: torch.device
                 ) -> tuple[LanguageModel, LanguageModel]:
    if pool is None:
        pool = ModelPool()  # loads a shared receiver/sharer ref once
    receiver = pool.get(recipe.receiver, dtype=recipe.dtype, device=str(device), adapter=recipe.receiver_adapter)
    sharer = pool.get(recipe.sharer, dtype=recipe.dtype, device=str(device), adapter=recipe.sharer_adapter)
    for lm in (receiver, sharer):
        lm.model.eval()
        lm.model.requires_grad_(False)
    return receiver, sharer


def _build_fuser(recipe: TrainRecipe, receiver: LanguageModel, sharer: LanguageModel, steps: int) -> Fuser:
    p = recipe.projector
    args = dict(hidden_dim=p.hidden_dim, intermediate_dim=p.intermediate_dim, num_layers=p.num_layers,
                dropout=p.dropout, initial_temperature=p.initial_temperature,
                final_temperature=p.final_temperature, anneal_steps=p.anneal_steps or steps, dtype=p.dtype,
                zero_init=recipe.init.zero_init, **p.args)
    fuser = Fuser.build(receiver.signature, sharer.signature, projector=p.type, layer_map=recipe.layer_map,
                        alignment=recipe.alignment, fusion=recipe.fusion, **args)
    for proj in fuser.projectors:
        if not recipe.gate_noise:
            if not hasattr(proj, "gate_noise"):
                raise ConfigError(f"gate_noise: false needs a projector with a gate_noise switch; "
                                  f"{type(proj).__name__} has none")
            proj.gate_noise = False
    return fuser.to(receiver.device)


def _param_groups(fuser: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Matrices decay; biases, norm weights and gate logits (0-d/1-d) do not.
    decay = [p for p in fuser.parameters() if p.dim() >= 2]
    rest = [p for p in fuser.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _autocast_dtype(recipe: TrainRecipe, device: torch.device) -> torch.dtype | None:
    if recipe.autocast is None:
        return None
    if recipe.autocast == "float16" and device.type != "cuda":
        raise ConfigError(f"autocast: float16 needs a CUDA device (this run is on {device}); use autocast: bfloat16")
    return getattr(torch, recipe.autocast)


def train(recipe: TrainRecipe | Mapping[str, Any], *, pool: ModelPool | None = None, progress: bool = True,
          resume: bool = True, stop_at: int | None = None) -> TrainResult:
    """Train a fuser for `recipe`; write checkpoints, the fuser, its provenance and a loss plot.

    Started by `torchrun`, each process trains on its shard of every global batch and gradients
    are all-reduced (DDP, or FSDP with `fsdp: true`); only rank 0 prints and writes files.
    `pool` (a `ModelPool`) supplies the models (tests register tiny ones by name). With `resume`,
    the newest checkpoint in the output folder is continued, on any number of processes that
    keeps the global batch. `stop_at` ends the run after that many optimizer steps with a
    checkpoint (the schedule still spans the full run).
    """
    if not isinstance(recipe, TrainRecipe):
        recipe = TrainRecipe.parse(recipe)
    with world(recipe.device) as w:
        return _train(recipe, w, pool=pool, progress=progress and w.main, resume=resume, stop_at=stop_at)


def _train(recipe: TrainRecipe, w: World, *, pool: ModelPool | None, progress: bool, resume: bool,
           stop_at: int | None) -> TrainResult:
    out = Path(recipe.output)
    accum = recipe.accumulation(w.size)
    global_batch = recipe.batch_size * accum * w.size
    precision = _autocast_dtype(recipe, w.device)
    if w.main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    w.barrier()  # no rank looks for a checkpoint before rank 0 has cleared them

    receiver, sharer = _load_models(recipe, pool, w.device)
    data = run_data(recipe.data, receiver, sharer, seed=recipe.seed, sharer_context=recipe.sharer_context)
    train_ex, eval_ex, what, fingerprint = data.train, data.held_out, data.what, data.fingerprint
    steps = recipe.total_steps(len(train_ex), global_batch)
    warmup = math.ceil(recipe.warmup_ratio * steps)

    torch.manual_seed(recipe.seed)  # the same initial fuser on every rank
    fuser = _build_fuser(recipe, receiver, sharer, steps)
    c2c = C2CModel(receiver, [sharer], [fuser])
    fuser.train()  # C2CModel puts its fusers in eval mode
    sharded = recipe.fsdp and w.distributed
    budget = estimate(
        receiver=receiver, sharer=sharer, fuser=fuser, batch_size=recipe.batch_size,
        prompt_tokens=max(len(e.prompt_ids) for e in train_ex), answer_tokens=max(len(e.answer_ids) for e in train_ex),
        sharer_tokens=max(len(e.prompt_ids) + len(e.context_ids) for e in train_ex), shards=w.size if sharded else 1,
        autocast=precision, checkpointing=recipe.gradient_checkpointing, device=str(w.device))
    free = available(w.device)
    if progress:
        print("\n".join(budget.lines(free)), file=sys.stderr, flush=True)
        print(f"global batch {global_batch} = batch_size {recipe.batch_size} x grad_accum {accum} x "
              f"{w.size} process(es){' (FSDP)' if sharded else ''}; {steps} optimizer steps", file=sys.stderr, flush=True)
    if recipe.check_memory:
        check_fits(budget, free, processes=w.size)

    loss_fn = partial(batch_loss, checkpoint_receiver=recipe.gradient_checkpointing)
    wrapped = wrap(FuserLoss(c2c, loss_fn), w, fsdp=sharded)
    opt = torch.optim.AdamW(_param_groups(wrapped, recipe.weight_decay), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    scaler = torch.amp.GradScaler("cuda") if precision == torch.float16 else None
    state = TrainState(global_batch=global_batch)
    ckpt_path = latest_checkpoint(out) if resume else None
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path, recipe=recipe, data_sha256=fingerprint)
        if ckpt.state.global_batch != global_batch:
            raise ConfigError(
                f"checkpoint {ckpt_path} trained with a global batch of {ckpt.state.global_batch} sequences; this run "
                f"has {global_batch} (batch_size {recipe.batch_size} x grad_accum {accum} x {w.size} process(es)); "
                f"set global_batch: {ckpt.state.global_batch} (or batch_size/grad_accum to match) to continue it")
        load_full_state(wrapped, opt, ckpt.fuser, ckpt.optimizer)
        sched.load_state_dict(ckpt.scheduler)
        state = ckpt.state
    if w.main:
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False),
                                         encoding="utf-8")

    def autocast() -> Any:
        return torch.autocast(w.device.type, dtype=precision) if precision is not None else nullcontext()

    def evaluate() -> None:
        if eval_ex and not any(s == state.step for s, _ in state.eval_losses):
            with gathered(wrapped), autocast():
                loss = held_out_loss(c2c, eval_ex, batch_size=recipe.batch_size,
                                     sharer_context=recipe.sharer_context, world=w)
            state.eval_losses.append([state.step, loss])

    def save() -> dict[str, torch.Tensor]:
        fuser_sd, opt_sd = full_state(wrapped, opt)  # collective under FSDP
        if w.main:
            save_checkpoint(out, fuser=fuser_sd, optimizer=opt_sd, scheduler=sched.state_dict(), state=state,
                            recipe=recipe, data_sha256=fingerprint, keep=recipe.keep_checkpoints)
        return fuser_sd

    orders: dict[int, list[int]] = {}
    params = [p for p in wrapped.parameters() if p.requires_grad]

    def step() -> tuple[float, float, int]:
        micro = [collate([train_ex[i] for i in stream_rows(len(train_ex), recipe.seed, at, n, orders)],
                         c2c, sharer_context=recipe.sharer_context)
                 for at, n in shard(state.samples, recipe.batch_size, accum, w.rank, w.size)]
        return _optimizer_step(wrapped, micro, opt, sched, params, recipe.grad_clip, w, autocast, scaler)

    # Before the first step, the evaluation is the receiver as if unfused: a fresh fuser's gates
    # are closed at inference.
    done, fuser_sd = drive(recipe, state, total=steps, stop_at=stop_at, step=step, evaluate=evaluate, save=save,
                           out=out, title=f"{receiver.name} <- {sharer.name}", desc="train fuser", progress=progress,
                           rank=w.rank, main=w.main, after_step=fuser.update_temperature,
                           steps_context=checkpointed_projectors(fuser, recipe.gradient_checkpointing))
    final_eval = state.eval_losses[-1][1] if state.eval_losses and done else None
    final_train = _final_train_loss(state.losses)
    fuser_dir = out / FUSER_DIR if done else None
    if w.main and done:
        provenance = {
            "trained_by": "agentmesh train", "recipe": recipe.model_dump(mode="json"),
            "data": what, "data_sha256": fingerprint, "train_rows": len(train_ex), "eval_rows": len(eval_ex),
            "skipped_rows": {"train": data.skipped, "eval": data.held_out_skipped}, "steps": state.step,
            "global_batch": global_batch, "processes": w.size,
            "final_train_loss": final_train, "final_eval_loss": final_eval,
            "initial_eval_loss": state.eval_losses[0][1] if state.eval_losses else None,
            "train_seconds": round(state.seconds, 2), "tokens": state.tokens,
            "receiver_source": receiver.source, "sharer_source": sharer.source,
            "versions": {"torch": torch.__version__, "transformers": _version("transformers"),
                         "agentmesh": _version("agentmesh")},
        }
        _save_final(fuser.config, fuser_sd, out / FUSER_DIR, provenance, recipe)
    w.barrier()  # the fuser is on disk before any rank returns
    return TrainResult(output_dir=out, fuser_dir=fuser_dir, steps=state.step, total_steps=steps,
                       losses=list(state.losses), lrs=list(state.lrs),
                       eval_losses=[(int(s), float(v)) for s, v in state.eval_losses],
                       final_eval_loss=final_eval, final_train_loss=final_train, data_sha256=fingerprint,
                       global_batch=global_batch, main=w.main)


def _optimizer_step(wrapped: torch.nn.Module, micro: Sequence[Batch], opt: torch.optim.Optimizer, sched: Any,
                    params: Sequence[torch.nn.Parameter], grad_clip: float | None, w: World,
                    autocast: Any, scaler: Any) -> tuple[float, float, int]:
    """One optimizer step over this rank's micro-batches; returns (loss per answer token over
    the global batch, lr used, tokens read by all ranks)."""
    # Token-weighted over the global batch, as if it were one batch: DDP and FSDP average the
    # ranks' gradients, so each rank scales its summed loss by world size / global label count.
    n_labels, = w.sum([sum(b.num_labels for b in micro)])
    scale = w.size / n_labels
    loss_sum = 0.0
    for j, b in enumerate(micro):
        with no_sync(wrapped, last=j == len(micro) - 1):
            with autocast():
                ce = wrapped(b)
            scaled = ce * scale
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += float(ce.detach())
    sync_unsharded(wrapped, w)
    if scaler is not None:
        scaler.unscale_(opt)
    if grad_clip is not None:
        clip_gradients(params, grad_clip)
    lr = sched.get_last_lr()[0]
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    loss_total, tokens = w.sum([loss_sum, sum(b.num_tokens for b in micro)])
    return loss_total / n_labels, lr, int(tokens)


def _save_final(config: Any, state_dict: Mapping[str, torch.Tensor], folder: Path, provenance: dict[str, Any],
                recipe: TrainRecipe) -> Path:
    from agentmesh.c2c.checkpoints import save_fuser

    fuser = Fuser(config)
    fuser.load_state_dict({k: v.cpu() for k, v in state_dict.items()}, strict=True)
    fuser.eval()
    if recipe.save_dtype is not None:
        fuser = cast_fuser(fuser, recipe.save_dtype)
    # The model refs the recipe names are what a user passes to load the pair again.
    ids = {"base_model": recipe.receiver, "teacher_model": recipe.sharer}
    fuser.config = replace(fuser.config, provenance={**fuser.config.provenance, **ids})
    save_fuser(fuser, folder, provenance=provenance)
    return folder


def cast_fuser(fuser: Fuser, dtype: str | torch.dtype) -> Fuser:
    """A copy of `fuser` whose projectors are rebuilt in `dtype` (their constructor argument too,
    so the saved checkpoint says what it holds); the gate temperature buffers stay float32."""
    from agentmesh.c2c.projector import dtype_name, parse_dtype
    from agentmesh.c2c.registry import build_projector

    name = dtype_name(parse_dtype(dtype))
    args = tuple({**a, "dtype": name} for a in fuser.config.projector_args)
    projectors = []
    for p, a in zip(fuser.projectors, args):
        q = build_projector(fuser.config.projector, a)
        q.load_state_dict(p.state_dict())  # copy_ casts to q's dtypes
        projectors.append(q.eval())
    return Fuser(replace(fuser.config, projector_args=args), projectors).eval()


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


__all__ = ["FUSER_DIR", "TrainResult", "cast_fuser", "lr_factor", "plot_loss_curve", "train"]
