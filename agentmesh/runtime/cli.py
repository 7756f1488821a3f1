"""`agentmesh run FILE.yaml` and `agentmesh chat FILE.yaml`.

The main app registers them with `app.command("run")(run_command)` and
`app.command("chat")(chat_command)`; this module's own `app` holds both too (for tests and
`python -m agentmesh.runtime.cli`). Every error is one line on stderr and exit status 2.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import orjson
import typer

from agentmesh.commands import Commands, fail, show_error
from agentmesh.errors import RunError

if TYPE_CHECKING:
    from agentmesh.graph import Graph


# A run that has not ended in this long is stuck (a worker that never answers, a prompt far past
# what the machine can decode): stop it rather than wait for ever. `--timeout` changes it.
DEFAULT_RUN_TIMEOUT_S = 1800.0


def _load(file: Path) -> Graph:
    from agentmesh.graph import load_graph

    return load_graph(file)


def _read_input(value: str | None) -> str | None:
    if value != "-":
        return value
    return sys.stdin.read().strip()


def _across_hosts(ctx: typer.Context) -> Callable[..., Any]:
    """The runner of runs across hosts (`agentmesh.mesh.run_remote`). The mesh sits above the
    runtime, so the main app hands it down through the click context (`ctx.obj.run_remote`)."""
    runner = getattr(ctx.obj, "run_remote", None)
    if runner is None:
        raise typer.BadParameter("--broker and --host need the full `agentmesh` command, which runs across hosts")
    return runner


def _is_terminal() -> bool:
    return bool(getattr(sys.stdout, "isatty", lambda: False)())


def run_command(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="Pipeline file (YAML).", show_default=False)],
    input: Annotated[Optional[str], typer.Option("--input", "-i", help="Text for {input}; '-' reads standard input. "
                                                 "Default: the file's inputs.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result (outputs, timings, bytes, trace) as JSON.")]
    = False,
    trace: Annotated[Optional[Path], typer.Option("--trace", help="Write a Chrome trace of the run (open it in "
                                                  "Perfetto).")] = None,
    stream: Annotated[Optional[bool], typer.Option("--stream/--no-stream", help="Show tokens as they come "
                                                   "(default: on a terminal).")] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.001, help="Stop the run after this many seconds "
                                           "(model loading included).")] = DEFAULT_RUN_TIMEOUT_S,
    broker: Annotated[Optional[str], typer.Option("--broker", help="Run across hosts over this MQTT broker "
                                                  "(mqtt://HOST:PORT); agents on other hosts run on their workers "
                                                  "(`agentmesh worker`).")] = None,
    host: Annotated[Optional[str], typer.Option("--host", help="With a broker: act as this host and run its "
                                                "agents here (default: a pure client).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Across hosts without a key (the file has no "
                                           "auth:): messages are not authenticated. Loopback development "
                                           "only.")] = False,
) -> None:
    """Run a pipeline once and print each output agent's text, then latency and bytes per edge."""
    from agentmesh.progress import Interrupted
    from agentmesh.runtime.display import LiveView, PhaseLog, PlainStream, footer, print_outputs
    from agentmesh.runtime.plan import build_plan
    from agentmesh.runtime.scheduler import run_graph

    graph = _load(file)
    if broker and not any(a.host for a in graph.agents.values()):
        raise typer.BadParameter(f"{file} places no agent on a host (no `host:` keys), so there is nothing to "
                                 "run across hosts; drop --broker", param_hint="--broker")
    plan = build_plan(graph, validate=False)
    text = _read_input(input)
    graph.resolve_inputs(text)  # a missing input fails here, before any model loads
    terminal = _is_terminal() and not json_out
    live_view = stream if stream is not None else terminal
    log = PhaseLog(lambda line: (sys.stderr.write(line), sys.stderr.flush()))
    view = LiveView(plan, show_tokens=live_view)

    def on_wait(name: str) -> None:
        view.wait_for_host(name)
        if not terminal:
            log.wait_for_host(name)

    # Across hosts (a broker or a host named): through the file's broker, or the one given.
    runner = (functools.partial(_across_hosts(ctx), broker=broker, host=host, insecure=insecure, on_wait=on_wait)
              if (broker or host) else run_graph)
    try:
        if terminal:
            from rich.console import Console
            from rich.live import Live

            with Live(view, console=Console(), refresh_per_second=8, transient=False):
                result = runner(graph, text, on_event=view.on_event, timeout=timeout, validate=False)
        else:
            plain = PlainStream(plan.outputs, sys.stdout.write, sys.stdout.flush) if live_view and not json_out else None

            def on_event(event: Any) -> None:
                view.on_event(event)
                log.on_event(event)
                if plain is not None:
                    plain.on_event(event)

            result = runner(graph, text, on_event=on_event, timeout=timeout, validate=False)
            if plain is not None:
                plain.end()
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while {view.describe()}") from None
    if trace is not None and result.trace is not None:
        try:
            result.trace.save_chrome(trace)
        except OSError as e:
            fail(f"cannot write the trace to {trace}: {e.strerror or e}")
    if json_out:
        sys.stdout.write(orjson.dumps(result.to_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        if not live_view:  # otherwise the text was shown as it came
            print_outputs(result, sys.stdout)
        sys.stdout.write(footer(result) + "\n")
    sys.stdout.flush()
    if result.error is not None:
        fail(result.error)


def chat_command(
    file: Annotated[Path, typer.Argument(help="Pipeline file (YAML).", show_default=False)],
    stream: Annotated[Optional[bool], typer.Option("--stream/--no-stream", help="Show tokens as they come "
                                                   "(default: on a terminal).")] = None,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="Stop a turn after this many seconds.")]
    = None,
) -> None:
    """Chat with a pipeline: each line you type is one turn ({input}); 'exit' or end of input stops.

    The conversation is kept, and every agent reuses its cache from the turn before.
    """
    from agentmesh.progress import Interrupted, Steps
    from agentmesh.runtime.display import LiveView, PhaseLog, PlainStream
    from agentmesh.runtime.session import ChatSession

    graph = _load(file)
    session = ChatSession(graph, timeout=timeout)
    interactive = bool(getattr(sys.stdin, "isatty", lambda: False)())
    live = stream if stream is not None else _is_terminal()
    outputs = session.plan.outputs
    failed: RunError | None = None
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text.lower() in ("exit", "quit"):
            break
        plain = PlainStream(outputs, sys.stdout.write, sys.stdout.flush) if live else None
        view = LiveView(session.plan, show_tokens=False)
        steps = Steps()
        log = None if steps.live else PhaseLog(lambda line: (sys.stderr.write(line), sys.stderr.flush()))
        try:
            # A spinner on a terminal, a log line per step otherwise (see PhaseLog).
            with steps.step("turn", "starting") if steps.live else contextlib.nullcontext(None) as show:
                def on_event(event: Any) -> None:
                    view.on_event(event)
                    if show is not None:
                        show(view.progress_line())
                    if log is not None:
                        log.on_event(event)
                    if plain is not None:
                        plain.on_event(event)

                result = session.send(text, on_event=on_event)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted while {view.describe()}") from None
        if plain is not None:
            plain.end()
        else:
            for name in outputs:
                if name in result.agents:
                    sys.stdout.write(f"{name}: {result.agents[name].text}\n")
        sys.stdout.flush()
        if result.error is not None:
            failed = result.error
            show_error(result.error)
    if failed is not None:
        raise typer.Exit(2)


app = Commands(no_args_is_help=True, help="Run pipelines and chat with them.")
app.command("run")(run_command)
app.command("chat")(chat_command)


if __name__ == "__main__":
    app()
