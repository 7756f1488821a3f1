"""`agentmesh graph check|show`: check pipeline files and show them as a table or a mermaid chart.

Mounted by the main CLI as `agentmesh graph`; also runnable as `python -m agentmesh.graph.cli`.
Every failure is one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from agentmesh.commands import Commands
from agentmesh.errors import AgentMeshError, GraphError
from agentmesh.graph.graph import Graph
from agentmesh.graph.load import load_graph
from agentmesh.graph.render import describe, mermaid

app = Commands(help="Check and show pipeline graphs (YAML).", no_args_is_help=True)


class Format(str, enum.Enum):
    text = "text"
    mermaid = "mermaid"


def _fuser_info(ref: str) -> tuple[str, str] | None:
    # Imported here, when a graph has a fuse edge, so that checking other graphs never imports torch.
    from agentmesh.c2c.checkpoints import fuser_info

    return fuser_info(ref)


def _load(file: Path) -> Graph:
    return load_graph(file, fuser_info=_fuser_info)


def _check_models(file: Path, graph: Graph) -> None:
    """Every agent's model names something that exists (checked without loading it): a misspelled
    built-in name or a missing folder fails here rather than after a run has started."""
    from agentmesh.models.load import resolve_ref

    for name in graph.agents:
        ref = graph.model_of(name).ref
        try:
            resolve_ref(ref)
        except AgentMeshError as exc:
            raise GraphError(f"{file}: agents.{name}.model: {exc}") from None


def _expand(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
            if not found:
                raise GraphError(f"{path}: the folder holds no pipeline files (*.yaml, *.yml)")
            out += found
        else:
            out.append(path)
    return out


@app.command()
def check(files: Annotated[list[Path], typer.Argument(help="pipeline files (or folders of *.yaml) to check")]) -> None:
    """Check pipeline files: prints `ok FILE (N agents, M edges)` for each good one."""
    failed = False
    for file in _expand(files):
        try:
            g = _load(file)
            _check_models(file, g)
        except AgentMeshError as exc:
            typer.echo(str(exc), err=True)
            failed = True
            continue
        typer.echo(f"ok {file} ({_count(len(g.agents), 'agent')}, {_count(len(g.edges), 'edge')})")
    if failed:
        raise typer.Exit(2)


@app.command()
def show(file: Annotated[Path, typer.Argument(help="pipeline file")],
         format: Annotated[Format, typer.Option("--format", "-f", help="text table or mermaid flowchart")]
         = Format.text) -> None:
    """Show a pipeline: agents, edges, run order (text) or a mermaid flowchart."""
    g = _load(file)
    typer.echo(describe(g) if format is Format.text else mermaid(g), nl=False)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


if __name__ == "__main__":
    app()
