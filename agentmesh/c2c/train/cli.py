"""`agentmesh train RECIPE.yaml`: train a fuser from a recipe (mounted by the main CLI).

The Typer app has no sub-commands: its callback is the command, so `add_typer(app, name="train")`
gives `agentmesh train RECIPE.yaml [--steps N] [--out DIR] [--no-resume]`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from agentmesh.errors import AgentMeshError

app = typer.Typer(help="Train a fuser (only the projectors learn) from a recipe YAML.", add_completion=False)


@app.callback(invoke_without_command=True, context_settings={"allow_interspersed_args": True})
def train_command(
    recipe: Path = typer.Argument(..., help="recipe YAML (see recipes/smollm2_context.yaml)"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="optimizer steps (overrides the recipe)"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (overrides the recipe)"),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="continue from the newest checkpoint"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                          help="CPU threads for torch (1 is fastest on a busy machine)"),
) -> None:
    """Train a fuser; writes OUT/fuser (the fuser), checkpoints, history.json and loss_curve.png."""
    try:
        import torch

        from agentmesh.c2c.train import TrainRecipe, train

        if threads is not None:
            torch.set_num_threads(threads)

        loaded = TrainRecipe.from_yaml(recipe)
        changes = {k: v for k, v in (("steps", steps), ("output", out)) if v is not None}
        if steps is not None:
            changes["epochs"] = None
        if changes:
            loaded = TrainRecipe.parse({**loaded.model_dump(), **changes}, source=str(recipe))
        result = train(loaded, progress=progress, resume=resume)
    except AgentMeshError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    evals = f", held-out loss {result.eval_losses[0][1]:.4f} -> {result.final_eval_loss:.4f}" \
        if result.final_eval_loss is not None and result.eval_losses else ""
    train_loss = f"{result.final_train_loss:.4f}" if result.final_train_loss is not None else "n/a"
    typer.echo(f"trained {result.steps}/{result.total_steps} steps: train loss {train_loss}{evals}")
    typer.echo(f"fuser: {result.fuser_dir}  (plot: {result.output_dir / 'loss_curve.png'})")


if __name__ == "__main__":  # python -m agentmesh.c2c.train.cli RECIPE.yaml
    app()
