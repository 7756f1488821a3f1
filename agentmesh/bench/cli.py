"""`agentmesh bench NAME [--quick]`: every benchmark of `agentmesh.bench`, from the command line.

`app` is a typer sub-app (one command per benchmark, plus `all` and `report`), mounted by the
main CLI as `agentmesh bench`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import typer

from agentmesh.bench import BENCHMARKS, DESCRIPTIONS
from agentmesh.commands import Commands

app = Commands(no_args_is_help=True,
               help="Measure latency, overhead and throughput; each benchmark prints a table and writes JSON.")


def _command(name: str) -> Callable[..., None]:
    def command(
        quick: bool = typer.Option(False, "--quick", help="The small configuration (under two minutes)."),
        json_path: Optional[Path] = typer.Option(None, "--json", help=f"JSON output (default bench/results/{name}.json; bench/results/quick/ with --quick)."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (model benchmarks only)."),
        threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                              help="torch threads (default 1; 2 on a dedicated 2-core machine)."),
        overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a config field."),
    ) -> None:
        from agentmesh.bench import run_named

        run_named(name, quick=quick, json_path=json_path, device=device, threads=threads, overrides=overrides)

    command.__doc__ = DESCRIPTIONS[name]
    return command


for _name in BENCHMARKS:
    app.command(_name)(_command(_name))
    if "_" in _name:  # c2c-vs-t2t works too
        app.command(_name.replace("_", "-"), hidden=True)(_command(_name))


@app.command("all")
def run_all(
    quick: bool = typer.Option(False, "--quick", help="The small configuration of each benchmark."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for the JSON files (default bench/results; bench/results/quick with --quick)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                          help="torch threads (default 1; 2 on a dedicated 2-core machine)."),
) -> None:
    """Run every benchmark, one after another."""
    from agentmesh.bench import run_named

    for name in BENCHMARKS:
        run_named(name, quick=quick, threads=threads,
                  json_path=None if out_dir is None else out_dir / f"{name}.json")


@app.command("report")
def report(
    results: Path = typer.Option(Path("bench") / "results", "--results", help="Folder of benchmark JSON files."),
    out: Path = typer.Option(Path("bench") / "RESULTS.md", "--out", help="Markdown file to write."),
    machine: Optional[str] = typer.Option(None, "--machine", help='Machine label, e.g. "2-core CPU, no GPU".'),
) -> None:
    """Write the results table (figures, targets, machine, commands) from the JSON files."""
    from agentmesh.bench.report import write

    typer.echo(f"wrote {write(out, results, machine_label=machine)}")
