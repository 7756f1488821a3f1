"""How every agentmesh command fails: one line on stderr, exit status 2, never a traceback.

`Commands` is the typer app each package's command line is built on (and the main `agentmesh`
app): every command registered on it turns an `AgentMeshError` into that line. The main entry
point catches the same errors raised outside a command; `fail` is for a command that fails on
its own account.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NoReturn

import typer

from agentmesh.errors import AgentMeshError


def show_error(error: BaseException | str) -> None:
    """Print ``error: <error>`` as one line on stderr."""
    typer.echo(f"error: {' '.join(str(error).split())}", err=True)


def fail(error: BaseException | str) -> NoReturn:
    """`show_error`, then exit with status 2."""
    show_error(error)
    raise typer.Exit(2)


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """`command`, with every `AgentMeshError` it raises shown by `fail`."""
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except AgentMeshError as e:
            fail(e)
    return run


class Commands(typer.Typer):
    """A typer app whose commands fail in one line (see `one_line_errors`)."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("add_completion", False)
        kwargs.setdefault("pretty_exceptions_enable", False)
        super().__init__(**kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        register = super().command(*args, **kwargs)

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            register(one_line_errors(fn))
            return fn
        return decorator
