"""The loop both trainers run (a fuser, `loop.py`; a LoRA adapter, `finetune.py`): optimizer steps
until the run's end, held-out evaluation and checkpoints on their schedule, and the tail every run
ends with (a last evaluation, a last checkpoint, history.json and the loss plot).

What a step does is the trainer's (`step()`); the driver owns the counters in `TrainState`, so a
resumed run continues them exactly where the checkpoint left them.
"""
from __future__ import annotations

import json
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Callable, TypeVar

import torch

from agentmesh.progress import progress_bar
from agentmesh.c2c.train.distributed import step_seed
from agentmesh.c2c.train.recipe import RunRecipe
from agentmesh.c2c.train.state import TrainState

T = TypeVar("T")
# One optimizer step -> (loss per answer token, learning rate it used, tokens read).
Step = Callable[[], tuple[float, float, int]]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def drive(recipe: RunRecipe, state: TrainState, *, total: int, stop_at: int | None, step: Step,
          evaluate: Callable[[], None], save: Callable[[], T], out: Path, title: str, desc: str,
          progress: bool, rank: int = 0, main: bool = True, after_step: Callable[[int], None] | None = None,
          steps_context: AbstractContextManager[object] | None = None) -> tuple[bool, T]:
    """Run optimizer steps from `state.step` to `total` (or `stop_at`); returns (whether the run is
    complete, what the last `save()` returned).

    Every step is seeded by (recipe seed, step, rank), so dropout and noise repeat on resumption.
    `after_step(step)` runs after the counters move (the fuser anneals its gate temperature);
    `steps_context` is entered around the steps only (not the evaluations after them). Only the
    `main` process writes history.json and the plot.
    """
    end = total if stop_at is None else min(total, stop_at)
    if state.step == 0:
        evaluate()  # before any step: the base the run improves on
    bar = progress_bar(total=total, initial=state.step, enabled=progress, desc=desc, unit="step")
    try:
        with steps_context or nullcontext():
            while state.step < end:
                started = time.perf_counter()
                torch.manual_seed(step_seed(recipe.seed, state.step, rank))
                loss, lr, tokens = step()
                state.step += 1
                state.samples += state.global_batch
                if after_step is not None:
                    after_step(state.step)
                elapsed = time.perf_counter() - started
                state.losses.append(loss)
                state.lrs.append(lr)
                state.tokens += tokens
                state.seconds += elapsed
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens / elapsed:.0f}")
                if recipe.eval_every and state.step % recipe.eval_every == 0:
                    evaluate()
                    bar.set_postfix(loss=f"{loss:.3f}", eval=f"{state.eval_losses[-1][1]:.3f}")
                if recipe.save_every and state.step % recipe.save_every == 0 and state.step < end:
                    save()
    finally:
        bar.close()
    done = state.step >= total
    if done:
        evaluate()
    saved = save()
    if main:
        (out / "history.json").write_text(json.dumps(state.__dict__), encoding="utf-8")
        plot_loss_curve(state, out / "loss_curve.png", title=title)
    return done, saved


def plot_loss_curve(state: TrainState, path: Path, title: str = "fuser training") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.add_subplot()
    if state.losses:
        steps = range(1, len(state.losses) + 1)
        ax.plot(steps, state.losses, lw=0.8, alpha=0.45, label="train (per step)")
        w = max(1, len(state.losses) // 25)
        if w > 1:
            smooth = [sum(state.losses[max(0, i - w + 1):i + 1]) / len(state.losses[max(0, i - w + 1):i + 1])
                      for i in range(len(state.losses))]
            ax.plot(steps, smooth, lw=1.6, label=f"train ({w}-step mean)")
    if state.eval_losses:
        ax.plot([s for s, _ in state.eval_losses], [v for _, v in state.eval_losses], "o-", lw=1.6, label="held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per answer token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path
