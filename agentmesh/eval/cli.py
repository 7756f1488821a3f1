"""Command line of `agentmesh.eval`: `eval CONFIG.yaml`, `compare` and the `make-*-task OUT_DIR` generators.

`app` is a typer app meant to be mounted into the main CLI (`app.add_typer(eval_cli.app)` merges
its commands). Every agentmesh error becomes one line on stderr and exit status 2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from agentmesh.commands import Commands
from agentmesh.files import make_folder

app = Commands(no_args_is_help=True, help="Evaluate methods of agent communication.")


@app.command("eval")
def eval_command(
    config: Path = typer.Argument(..., help="evaluation config (YAML)"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="evaluate at most N items"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (overrides the config's 'output')"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
) -> None:
    """Run every configured method on the same items; write summary.json, items.csv and plots."""
    from agentmesh.eval.report import format_table
    from agentmesh.eval.runner import evaluate, load_config

    cfg = load_config(config)
    if limit is not None:
        cfg = cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"limit": limit})})
    if out is not None:
        cfg = cfg.model_copy(update={"output": out})
    summary = evaluate(cfg, progress=progress)
    typer.echo(format_table(summary))
    typer.echo(f"report written to {cfg.output}")


@app.command("make-context-task")
def make_context_task_command(
    out_dir: Path = typer.Argument(..., help="folder for train.jsonl and test.jsonl"),
    seed: int = typer.Option(0, "--seed"),
    n_train: int = typer.Option(2000, "--n-train", min=0),
    n_test: int = typer.Option(200, "--n-test", min=0),
    mc: bool = typer.Option(False, "--mc/--short", help="multiple choice (4 choices) instead of short answers"),
    min_facts: int = typer.Option(3, "--min-facts", help="fewest facts per passage"),
    max_facts: int = typer.Option(6, "--max-facts", help="most facts per passage"),
) -> None:
    """Generate the context-transfer task (seeded, no download)."""
    from agentmesh.tasks.context_task import write_context_task

    paths = write_context_task(out_dir, seed=seed, n_train=n_train, n_test=n_test, multiple_choice=mc,
                               min_facts=min_facts, max_facts=max_facts)
    for split, path in paths.items():
        typer.echo(f"{split}: {path}")


@app.command("make-knowledge-task")
def make_knowledge_task_command(
    out_dir: Path = typer.Argument(..., help="folder for specialist.jsonl, train.jsonl and test.jsonl"),
    seed: int = typer.Option(0, "--seed"),
    facts_a: int = typer.Option(50, "--facts-a", min=1, help="countries the fuser trains on (facts A)"),
    facts_b: int = typer.Option(50, "--facts-b", min=1, help="countries it is tested on (facts B)"),
    capitals: int = typer.Option(20, "--capitals", min=2, help="size of the pool capitals are drawn from"),
) -> None:
    """Generate the specialist-knowledge task (invented facts, split A/B; seeded, no download)."""
    from agentmesh.tasks.knowledge_task import write_knowledge_task

    paths = write_knowledge_task(out_dir, n_a=facts_a, n_b=facts_b, n_capitals=capitals, seed=seed)
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


@app.command("make-visit-task")
def make_visit_task_command(
    out_dir: Path = typer.Argument(..., help="folder for train.jsonl and test.jsonl"),
    seed: int = typer.Option(0, "--seed"),
    n_train: int = typer.Option(1200, "--n-train", min=1),
    n_test: int = typer.Option(48, "--n-test", min=1),
) -> None:
    """Generate the visit task of graphs/combined_reasoning.yaml's planner (seeded, no download)."""
    from agentmesh.tasks.visit_task import write_visit_task

    for split, path in write_visit_task(out_dir, n_train=n_train, n_test=n_test, seed=seed).items():
        typer.echo(f"{split}: {path}")


@app.command("make-memory-task")
def make_memory_task_command(
    out_dir: Path = typer.Argument(..., help="folder for train.jsonl"),
    seed: int = typer.Option(0, "--seed"),
    n: int = typer.Option(1200, "--n", min=1, help="conversations"),
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m",
                              help="the base model, whose own answers to everyday questions the rows keep"),
) -> None:
    """Generate the memory task of graphs/chat.yaml's assistant (loads the model; seeded, no download)."""
    from agentmesh.c2c.model import C2CModel
    from agentmesh.models.pool import default_pool
    from agentmesh.progress import Steps
    from agentmesh.tasks.memory_task import EVERYDAY, answer_everyday, write_memory_task

    make_folder(out_dir, "memory task folder")  # before the slow part: a bad folder fails at once
    steps = Steps()
    with steps.step("load", f"loading {model}"):
        lm = default_pool().get(model)
    with steps.step("answer", f"answering {len(EVERYDAY)} everyday questions with {model}"):
        everyday = answer_everyday(lambda conversations: C2CModel(lm).chat(conversations, max_new_tokens=48))
    typer.echo(f"train: {write_memory_task(out_dir, everyday, n=n, seed=seed)}")


@app.command("compare")
def compare_command(
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help="receiver (and sharer) model ref"),
    fuser: Optional[str] = typer.Option(None, "--fuser", "-f",
                                        help="a trained fuser folder: the cache edge becomes c2c instead of prefix"),
    sharer: Optional[str] = typer.Option(None, "--sharer", "-s", help="sharer model ref (default: the receiver's)"),
    questions: Optional[Path] = typer.Option(
        None, "--questions", "-q", help="JSONL of questions with a private 'context' (default: five built-in notes)"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="ask at most N questions"),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", "-n", min=1, help="answer length limit"),
) -> None:
    """Receiver alone vs a text edge vs a cache edge on questions with known answers, side by side."""
    import time

    from agentmesh.eval import compare
    from agentmesh.tasks.datasets import load_jsonl
    from agentmesh.models.pool import default_pool

    items = list(load_jsonl(questions) if questions is not None else compare.NOTES)[:limit]
    pool = default_pool()
    started = time.perf_counter()
    typer.echo(f"loading {model} ...")
    receiver = pool.get(model)
    sharer_lm = pool.get(sharer) if sharer else receiver
    loaded_fuser = None
    if fuser is not None:
        from agentmesh.eval.runner import load_fuser

        loaded_fuser = load_fuser(fuser, receiver, sharer_lm)
        if loaded_fuser.config.warning:
            typer.echo(f"warning: {fuser}: {loaded_fuser.config.warning}", err=True)
    methods = compare.build(receiver, fuser=loaded_fuser, sharer=sharer_lm, max_new_tokens=max_new_tokens)
    typer.echo(f"loaded in {time.perf_counter() - started:.1f} s (not counted in the times below)")
    typer.echo("Each question's facts are in a private note only the sharer reads. Times are wall "
               "seconds per answer, the sharer's work included; [read ...] is the receiver's own prefill "
               "(the prompt tokens it read, up to its first token).")
    position = {item.id: i for i, item in enumerate(items, 1)}

    def show(row: compare.Row) -> None:
        if row.result.method == methods[0].name:
            typer.echo(compare.format_question(row.item, position[row.item.id], len(items)))
        typer.echo(compare.format_row(row))

    summary = compare.compare(items, methods, on_row=show)
    typer.echo(compare.format_summary(summary))
    typer.echo(compare.closing_note(summary, fused=loaded_fuser is not None))
