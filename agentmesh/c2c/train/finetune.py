"""`kind: finetune` recipes: train a LoRA adapter on a base model, e.g. a specialist sharer.

The base model stays frozen; only the LoRA matrices learn, from the model's own next-token loss on
the final assistant turn of each chat (labels -100 on the prompt). Targets are module names or a
preset: ``attention`` (q/k/v/o projections), ``mlp`` (gate/up/down projections: an adapter whose
knowledge sits in the MLPs only) or ``all`` (both). Same data formats, schedule (linear warm-up
then decay), resumable safetensors + JSON checkpoints and held-out loss as fuser training. The
result, ``OUT/adapter``, is a peft adapter folder plus ``agentmesh_adapter.json`` (the base model's
signature and the run's provenance), loadable with ``load_model(base, adapter=OUT/adapter)`` or
``models: {name: {ref: BASE, adapter: OUT/adapter}}`` in a graph.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import orjson
import torch
import yaml
from pydantic import Field
from torch import nn

from agentmesh.c2c.train.data import IGNORE_INDEX, Example, run_data, shard, stream_rows
from agentmesh.c2c.train.driver import drive, lr_factor
from agentmesh.c2c.train.recipe import _RESUME_FREE_KEYS, RunRecipe, _Strict
from agentmesh.c2c.train.state import CHECKPOINT_DIR, TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from agentmesh.errors import ConfigError
from agentmesh.models.adapters import AGENTMESH_ADAPTER
from agentmesh.models.builtin import DEFAULT_MODEL
from agentmesh.models.pool import ModelPool
from agentmesh.models.protocol import LanguageModel

ADAPTER_DIR = "adapter"
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
TARGET_PRESETS["all"] = TARGET_PRESETS["attention"] + TARGET_PRESETS["mlp"]


class LoraRecipe(_Strict):
    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: Literal["attention", "mlp", "all"] | list[str] = "attention"

    def target_modules(self) -> list[str]:
        return list(TARGET_PRESETS[self.targets]) if isinstance(self.targets, str) else list(self.targets)


class FinetuneRecipe(RunRecipe):
    """Everything a `kind: finetune` run needs (the shared settings with a fine-tune's defaults)."""

    kind: Literal["finetune"] = "finetune"
    model: str = DEFAULT_MODEL
    lora: LoraRecipe = Field(default_factory=LoraRecipe)
    lr: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    dtype: str = "float32"
    eval_every: int = Field(0, ge=0)
    save_every: int = Field(50, ge=0)
    output: Path = Path("runs/adapter")

    def resume_key(self) -> str:
        data = self.model_dump(mode="json", exclude=set(_RESUME_FREE_KEYS))
        return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]

    def total_steps(self, num_rows: int, global_batch: int) -> int:
        """As `RunRecipe.total_steps`, but an epoch is `ceil(rows / batch_size)` micro-batches (its last
        one partial), as fine-tunes have always been counted (their recipes' figures rest on it)."""
        if self.steps is not None or self.epochs is None:
            return super().total_steps(num_rows, global_batch)
        per_epoch = math.ceil(num_rows / self.batch_size)
        return max(1, math.ceil(self.epochs * per_epoch / self.grad_accum))


@dataclasses.dataclass
class FinetuneResult:
    output_dir: Path
    adapter_dir: Path | None    # None when the run stopped early (`stop_at`)
    steps: int
    total_steps: int
    losses: list[float]
    eval_losses: list[tuple[int, float]]


def _trainable(model: nn.Module) -> nn.ParameterDict:
    """The adapter's parameters as one module (shared, not copied), for checkpoints and the optimizer."""
    return nn.ParameterDict({n.replace(".", "__"): p for n, p in model.named_parameters() if p.requires_grad})


def _wrap(lm: LanguageModel, lora: LoraRecipe) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, m in lm.model.named_modules() if isinstance(m, nn.Linear)}
    targets = lora.target_modules()
    missing = sorted(set(targets) - names)
    if missing:
        raise ConfigError(f"lora.targets {missing} are not linear modules of {lm.name!r}; "
                          f"its linear modules are {', '.join(sorted(names))}")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a deprecated transformers property
        return get_peft_model(lm.model, config)


def _batch(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+answer ids (B, L), their mask, and labels on the answer tokens only."""
    width = max(len(e.prompt_ids) + len(e.answer_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for b, e in enumerate(examples):
        p, a = len(e.prompt_ids), len(e.answer_ids)
        ids[b, :p + a] = torch.tensor([*e.prompt_ids, *e.answer_ids])
        labels[b, p:p + a] = torch.tensor(e.answer_ids)
        mask[b, :p + a] = 1
    return ids, mask, labels


def _loss_sum(model: nn.Module, examples: Sequence[Example], pad_id: int, device: Any) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the answer tokens, and their count."""
    ids, mask, labels = (t.to(device) for t in _batch(examples, pad_id))
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]  # (B, L-1, V)
    target = labels[:, 1:]
    ce = nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="sum")
    return ce, int((target != IGNORE_INDEX).sum())


@torch.no_grad()
def _held_out(model: nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int, device: Any) -> float:
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        ce, k = _loss_sum(model, examples[i:i + batch_size], pad_id, device)
        total, n = total + float(ce), n + k
    model.train(was)
    return total / max(n, 1)


def finetune(recipe: FinetuneRecipe | Mapping[str, Any], *, pool: ModelPool | None = None, progress: bool = True,
             resume: bool = True, stop_at: int | None = None) -> FinetuneResult:
    """Train a LoRA adapter for `recipe`; write checkpoints, OUT/adapter and a loss plot.

    `pool` supplies the base model by name (tests register tiny ones); the run loads its own copy
    otherwise. With `resume`, the newest checkpoint in the output folder is continued; `stop_at`
    ends the run after that many optimizer steps with a checkpoint.
    """
    from agentmesh.models.load import load_model

    if not isinstance(recipe, FinetuneRecipe):
        recipe = FinetuneRecipe.parse(recipe)
    out = Path(recipe.output)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    # A private copy: LoRA layers are inserted into the model's modules.
    if pool is not None and recipe.model in pool:
        base = pool.get(recipe.model)
        lm = dataclasses.replace(base, model=copy.deepcopy(base.model))
    else:
        lm = load_model(recipe.model, dtype=recipe.dtype, device=recipe.device)
    data = run_data(recipe.data, lm, lm, seed=recipe.seed, sharer_context=False)
    train_ex, eval_ex, what, fingerprint = data.train, data.held_out, data.what, data.fingerprint
    steps = recipe.total_steps(len(train_ex), recipe.batch_size * recipe.grad_accum)
    warmup = math.ceil(recipe.warmup_ratio * steps)
    pad_id = int(lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0)

    torch.manual_seed(recipe.seed)
    model = _wrap(lm, recipe.lora)
    model.train()
    params = _trainable(model)
    opt = torch.optim.AdamW(params.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    state = TrainState(global_batch=recipe.batch_size * recipe.grad_accum)
    ckpt_path = latest_checkpoint(out) if resume else None
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path, recipe=recipe, data_sha256=fingerprint)
        params.load_state_dict(ckpt.fuser, strict=True)
        opt.load_state_dict(ckpt.optimizer)
        sched.load_state_dict(ckpt.scheduler)
        state = ckpt.state
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), encoding="utf-8")

    def evaluate() -> None:
        if eval_ex and not any(s == state.step for s, _ in state.eval_losses):
            state.eval_losses.append([state.step, _held_out(model, eval_ex, recipe.batch_size, pad_id, lm.device)])

    def checkpoint() -> None:
        save_checkpoint(out, fuser=params.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                        state=state, recipe=recipe, data_sha256=fingerprint, keep=recipe.keep_checkpoints)

    orders: dict[int, list[int]] = {}

    def step() -> tuple[float, float, int]:
        micro = [[train_ex[i] for i in stream_rows(len(train_ex), recipe.seed, at, n, orders)]
                 for at, n in shard(state.samples, recipe.batch_size, recipe.grad_accum, 0, 1)]
        n_labels = sum(len(e.answer_ids) for m in micro for e in m)
        loss_sum = 0.0
        for m in micro:
            ce, _ = _loss_sum(model, m, pad_id, lm.device)
            (ce / n_labels).backward()  # token-weighted over the whole step
            loss_sum += float(ce.detach())
        if recipe.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(params.parameters()), recipe.grad_clip)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss_sum / n_labels, lr, sum(len(e.prompt_ids) + len(e.answer_ids) for m in micro for e in m)

    done, _ = drive(recipe, state, total=steps, stop_at=stop_at, step=step, evaluate=evaluate, save=checkpoint,
                    out=out, title=f"LoRA adapter on {lm.name}", desc="finetune adapter", progress=progress)
    adapter_dir = None
    if done:
        provenance = {
            "trained_by": "agentmesh train (kind: finetune)", "recipe": recipe.model_dump(mode="json"),
            "data": what, "data_sha256": fingerprint, "train_rows": len(train_ex), "eval_rows": len(eval_ex),
            "skipped_rows": data.skipped, "steps": state.step, "final_train_loss": state.losses[-1] if state.losses else None,
            "eval_losses": state.eval_losses, "train_seconds": round(state.seconds, 2), "tokens": state.tokens,
            "base_source": lm.source, "trainable_parameters": sum(p.numel() for p in params.parameters()),
        }
        adapter_dir = _save_adapter(model, lm, out / ADAPTER_DIR, recipe, provenance)
    return FinetuneResult(out, adapter_dir, state.step, steps, list(state.losses),
                          [(int(s), float(v)) for s, v in state.eval_losses])


def _save_adapter(model: nn.Module, lm: LanguageModel, folder: Path, recipe: FinetuneRecipe,
                  provenance: dict[str, Any]) -> Path:
    """Write the peft adapter and its agentmesh metadata to a temporary folder, then swap it in."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    # peft records where this machine loaded the base from (a site-packages path for the embedded
    # model) and writes a template model card around it; the recipe's ref is what travels.
    config_path = tmp / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = recipe.model
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (tmp / "README.md").unlink(missing_ok=True)
    meta = {"format": "agentmesh-adapter", "format_version": 1,
            "base": {"ref": recipe.model, "signature": lm.signature.to_dict()},
            "lora": {**recipe.lora.model_dump(mode="json"), "target_modules": recipe.lora.target_modules()},
            "provenance": provenance}
    (tmp / AGENTMESH_ADAPTER).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


__all__ = ["ADAPTER_DIR", "FinetuneRecipe", "FinetuneResult", "LoraRecipe", "TARGET_PRESETS", "finetune"]
