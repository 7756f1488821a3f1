"""How the CLI shows a run: a live rich view on a terminal, plain text otherwise, and the footer."""
from __future__ import annotations

from typing import Any, Callable, TextIO

import time

from rich.console import Group
from rich.panel import Panel
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from agentmesh.progress import pace
from agentmesh.runtime.events import (AgentFailed, AgentFinished, AgentStarted, Event, PhaseStarted, Step, Token)
from agentmesh.runtime.plan import RunPlan
from agentmesh.runtime.result import RunResult
from agentmesh.units import human_bytes

_PHASES = {"load": "loading", "read": "reading", "prefill": "prefilling", "share": "sharing", "fuse": "fusing",
           "decode": "decoding", "transfer": "sending", "text": "sending"}
_STYLE = {"waiting": "dim", "done": "green", "failed": "bold red"}



class LiveView:
    """A rich renderable updated from run events: one status row per agent, the outputs' text."""

    def __init__(self, plan: RunPlan, *, show_tokens: bool = True):
        self.plan = plan
        self.show_tokens = show_tokens
        self.status = {n: "waiting" for n in plan.agents}
        self.tokens = {n: 0 for n in plan.agents}
        self.text = {n: "" for n in plan.outputs}
        self.detail: dict[str, str] = {}
        self.prefill: dict[str, str] = {}  # agent -> how its last prefill went (`pace`)
        self.since = {n: time.perf_counter() for n in plan.agents}  # when each status began
        self.spinners = {n: Spinner("dots", style="yellow") for n in plan.agents}
        self.hosts_waited: list[str] = []  # hosts whose workers have not answered yet
        self.wait_since = 0.0
        self.wait_spinner = Spinner("dots", style="yellow")

    def wait_for_host(self, host: str) -> None:
        """A run across hosts waits for `host`'s worker to announce itself (before any agent starts)."""
        if not self.hosts_waited:
            self.wait_since = time.perf_counter()
        self.hosts_waited.append(host)

    def describe(self) -> str:
        """What is running now, for the line Ctrl-C prints: "a loading, b decoding"."""
        busy = [f"{n} {s}" for n, s in self.status.items() if s not in ("waiting", "done", "failed")]
        if not busy and self.hosts_waited:
            return f"waiting for host {', '.join(self.hosts_waited)}"
        return ", ".join(busy) or "starting"

    def progress_line(self) -> str:
        """`describe()` with the latest prefill's pace, for a one-line spinner (`agentmesh chat`)."""
        last = next(reversed(self.prefill.values()), None)
        return self.describe() + (f" · {last}" if last else "")

    def on_event(self, event: Event) -> None:
        self.hosts_waited.clear()  # events come once every worker has answered
        before = {n: self.status[n] for n in self.status}
        self._apply(event)
        now = time.perf_counter()
        for n, s in self.status.items():
            if before[n] != s:
                self.since[n] = now

    def _apply(self, event: Event) -> None:
        if isinstance(event, AgentStarted):
            if self.status[event.agent] == "waiting":  # a phase already under way (loading) stays shown
                self.status[event.agent] = "started"
        elif isinstance(event, PhaseStarted):
            self.status[event.agent] = _PHASES.get(event.kind, event.kind)
        elif isinstance(event, Token):
            self.tokens[event.agent] = self.tokens.get(event.agent, 0) + 1
            if event.agent in self.text:
                self.text[event.agent] += event.text
        elif isinstance(event, Step) and event.span.kind == "decode":
            self.tokens[event.agent] = event.span.tokens
        elif isinstance(event, Step) and event.span.kind == "prefill" and event.span.tokens:
            self.prefill[event.agent] = pace(event.span.tokens, event.span.duration_s)
        elif isinstance(event, AgentFinished):
            self.status[event.agent] = "done"
            r = event.result
            self.detail[event.agent] = (f"{r.latency_s:.2f} s" + (f", {r.tokens} tok" if r.tokens else "")
                                        + (f", {r.prompt_tokens} read" if r.prompt_tokens else "")
                                        + (f"; prefill {self.prefill[event.agent]}" if event.agent in self.prefill
                                           else ""))
            if event.agent in self.text:
                self.text[event.agent] = event.text
        elif isinstance(event, AgentFailed):
            self.status[event.agent] = "failed"
            self.detail[event.agent] = str(event.error)

    def __rich__(self) -> Group:
        table = Table(box=None, show_header=False, pad_edge=False)
        table.add_column("agent", style="bold")
        table.add_column("status")
        table.add_column("detail", style="dim")
        if self.hosts_waited:
            self.wait_spinner.update(text=Text(f"{self.describe()} {time.perf_counter() - self.wait_since:.0f} s",
                                               style="yellow"))
            table.add_row("", self.wait_spinner, "")
        for name, status in self.status.items():
            style = _STYLE.get(status, "yellow")
            busy = status not in ("waiting", "done", "failed")
            label = status + (f" ({self.tokens[name]} tok)" if busy and status == "decoding" else "")
            if busy:
                self.spinners[name].update(text=Text(f"{label} {time.perf_counter() - self.since[name]:.0f} s",
                                                     style=style))
                table.add_row(name, self.spinners[name], self.detail.get(name, ""))
            else:
                table.add_row(name, Text(label, style=style), self.detail.get(name, ""))
        parts: list[Any] = [table]
        if self.show_tokens:
            for name, text in self.text.items():
                if text:
                    parts.append(Panel(Text(text), title=name, title_align="left", border_style="cyan"))
        return Group(*parts)


class PhaseLog:
    """Off a terminal: one line per agent step as it starts, and one when each agent ends (a
    failure is the run's error line, printed once by the caller)."""

    def __init__(self, write: Callable[[str], Any]):
        self.write = write

    def wait_for_host(self, host: str) -> None:
        self.write(f"waiting for host {host} (its worker) …\n")

    def on_event(self, event: Event) -> None:
        if isinstance(event, PhaseStarted):
            self.write(f"{event.agent}: {_PHASES.get(event.kind, event.kind)} …\n")
        elif isinstance(event, Step) and event.span.kind == "prefill" and event.span.tokens:
            self.write(f"{event.agent}: {pace(event.span.tokens, event.span.duration_s)}\n")
        elif isinstance(event, AgentFinished):
            self.write(f"{event.agent}: done in {event.result.latency_s:.1f} s\n")


class PlainStream:
    """Streams the output agents' tokens as plain text: `name: text...` one agent at a time."""

    def __init__(self, outputs: tuple[str, ...], write: Callable[[str], Any], flush: Callable[[], Any]):
        self.outputs = set(outputs)
        self.write = write
        self.flush = flush
        self.current: str | None = None

    def on_event(self, event: Event) -> None:
        if isinstance(event, Token) and event.agent in self.outputs:
            if self.current != event.agent:
                self.write(("\n" if self.current is not None else "") + f"{event.agent}: ")
                self.current = event.agent
            self.write(event.text)
            self.flush()

    def end(self) -> None:
        if self.current is not None:
            self.write("\n")
            self.flush()
            self.current = None


def print_outputs(result: RunResult, out: TextIO) -> None:
    """Each output agent's text (under its name when there are several)."""
    names = [n for n in result.outputs if n in result.agents]
    for name in names:
        if len(names) > 1:
            out.write(f"== {name} ==\n")
        out.write(result.agents[name].text + "\n")


def footer(result: RunResult) -> str:
    """Run time apart from model loading, latency per output agent and bytes per edge (SI units)."""
    lines = ["---"]
    parts = []
    for name in result.outputs:
        r = result.agents.get(name)
        if r is not None:
            ttft = f", first token {r.ttft_s:.2f} s" if r.ttft_s is not None else ""
            parts.append(f"{name} {r.latency_s:.2f} s ({r.tokens} tokens{ttft})")
    lines.append(f"run {result.run_s:.2f} s + model loading {result.load_s:.2f} s = {result.latency_s:.2f} s")
    if parts:
        lines.append(f"latency {'; '.join(parts)}")
    if result.trace is not None:
        for key, n in result.trace.bytes_by_edge().items():
            edge = result.trace.edges.get(key)
            kind = edge.label if edge is not None else ""
            lines.append(f"edge {key} [{kind}] {human_bytes(n)}")
    return "\n".join(lines)
