"""`agentmesh train RECIPE.yaml`: train a fuser, or a LoRA adapter, from a recipe (mounted by the main CLI).

The Typer app has no sub-commands: its callback is the command, so `add_typer(app, name="train")`
gives `agentmesh train RECIPE.yaml [--steps N] [--out DIR] [--no-resume] [--dry-run]`. The recipe's
`kind` picks what is trained: `fuser` (the default) or `finetune` (a LoRA adapter on a base model).
Under `torchrun --nproc_per_node N -m agentmesh train RECIPE.yaml` every process runs the command;
only rank 0 prints.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import typer

from agentmesh.errors import AgentMeshError, ConfigError

app = typer.Typer(help="Train a fuser (only the projectors learn) or, with kind: finetune, a LoRA adapter, "
                       "from a recipe YAML.", add_completion=False)


def _say(text: str, *, err: bool = False) -> None:
    if os.environ.get("RANK", "0") == "0":
        typer.echo(text, err=err)


@app.callback(invoke_without_command=True, context_settings={"allow_interspersed_args": True})
def train_command(
    recipe: Path = typer.Argument(..., help="recipe YAML (see recipes/)"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="optimizer steps (overrides the recipe)"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (overrides the recipe)"),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="continue from the newest checkpoint"),
    stop_after: Optional[int] = typer.Option(
        None, "--stop-after", min=1,
        help="stop after this many optimizer steps with a checkpoint (the schedule still spans the whole run)"),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="tiny stand-in models and data, 2 steps: checks a fuser recipe without a model hub"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                          help="CPU threads for torch (1 is fastest on a busy machine)"),
) -> None:
    """Train a fuser (writes OUT/fuser) or an adapter (kind: finetune, writes OUT/adapter), with
    checkpoints, history.json and loss_curve.png."""
    try:
        import torch

        from agentmesh.c2c.train import TrainRecipe, train
        from agentmesh.yaml_file import read_yaml

        if threads is not None:
            torch.set_num_threads(threads)

        raw = read_yaml(recipe, "recipe file")
        kind = raw.pop("kind", "fuser") if isinstance(raw, dict) else "fuser"
        if kind == "finetune":
            if dry_run or stop_after is not None:
                raise ConfigError(f"{recipe}: --dry-run and --stop-after apply to fuser recipes, not kind: finetune")
            _finetune(raw, str(recipe), steps=steps, out=out, resume=resume, progress=progress)
            return
        if kind != "fuser":
            raise ConfigError(f"{recipe}: kind {kind!r} is unknown; expected 'fuser' (train a fuser) or 'finetune' "
                              "(train a LoRA adapter)")
        loaded = TrainRecipe.parse(raw, source=str(recipe)) if isinstance(raw, dict) else TrainRecipe.from_yaml(recipe)
        changes = {k: v for k, v in (("steps", steps), ("output", out)) if v is not None}
        if steps is not None:
            changes["epochs"] = None
        if changes:
            loaded = TrainRecipe.parse({**loaded.model_dump(exclude_unset=True), **changes}, source=str(recipe))
        pool = None
        with tempfile.TemporaryDirectory(prefix="agentmesh-dry-run-") as scratch:
            if dry_run:
                from agentmesh.c2c.train.dry_run import dry_run as shrink

                target = out or Path(f"{loaded.output}-dry-run")
                loaded, pool = shrink(loaded, target, Path(scratch), processes=int(os.environ.get("WORLD_SIZE", "1")))
                _say(f"dry run: tiny stand-ins for {loaded.receiver} <- {loaded.sharer}, writing to {target}", err=True)
            result = train(loaded, pool=pool, progress=progress, resume=resume, stop_at=stop_after)
    except AgentMeshError as e:
        _say(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    evals = f", held-out loss {result.eval_losses[0][1]:.4f} -> {result.final_eval_loss:.4f}" \
        if result.final_eval_loss is not None and result.eval_losses else ""
    train_loss = f"{result.final_train_loss:.4f}" if result.final_train_loss is not None else "n/a"
    _say(f"trained {result.steps}/{result.total_steps} steps (global batch {result.global_batch}): "
         f"train loss {train_loss}{evals}")
    where = result.fuser_dir if result.fuser_dir is not None else \
        f"not yet (stopped early; rerun to continue from {result.output_dir / 'checkpoints'})"
    _say(f"fuser: {where}  (plot: {result.output_dir / 'loss_curve.png'})")


def _finetune(raw: dict, source: str, *, steps: int | None, out: Path | None, resume: bool, progress: bool) -> None:
    from agentmesh.c2c.train.finetune import FinetuneRecipe, finetune

    changes = {k: v for k, v in (("steps", steps), ("output", out)) if v is not None}
    if steps is not None:
        changes["epochs"] = None
    result = finetune(FinetuneRecipe.parse({**raw, "kind": "finetune", **changes}, source=source),
                      progress=progress, resume=resume)
    evals = f", held-out loss {result.eval_losses[0][1]:.4f} -> {result.eval_losses[-1][1]:.4f}" \
        if len(result.eval_losses) > 1 else ""
    loss = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    typer.echo(f"trained {result.steps}/{result.total_steps} steps: train loss {loss}{evals}")
    typer.echo(f"adapter: {result.adapter_dir}  (plot: {result.output_dir / 'loss_curve.png'})")


if __name__ == "__main__":  # python -m agentmesh.c2c.train.cli RECIPE.yaml
    app()
