"""What a run returns: each agent's output and timings, the trace, and the error if one agent failed."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from agentmesh.errors import RunError
from agentmesh.runtime.trace import Trace


@dataclass(frozen=True)
class AgentResult:
    """One agent's part in a run.

    `work` is what the agent did: "decode" (it generated `text`), "read" (a prefix sender: its
    cache was continued from) or "share" (a fuse sharer: its cache was fused into a receiver's).
    Times are seconds: `latency_s` from the agent's start (its inputs ready) to its end, `ttft_s` to
    its first generated token. `prompt_tokens` is what it read; `prefilled_tokens` how many of
    those it computed (the rest came from a cache: a prefix sender's or its own from an earlier turn).
    """

    agent: str
    text: str = ""
    tokens: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    prompt_tokens: int = 0
    prefilled_tokens: int = 0
    token_ids: tuple[int, ...] = ()
    work: str = "decode"
    start_s: float = 0.0
    end_s: float = 0.0

    @property
    def reused_tokens(self) -> int:
        return max(self.prompt_tokens - self.prefilled_tokens, 0)

    @property
    def tokens_per_s(self) -> float | None:
        if self.ttft_s is None or self.tokens < 2 or self.latency_s <= self.ttft_s:
            return None
        return (self.tokens - 1) / (self.latency_s - self.ttft_s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "agent": self.agent, "work": self.work, "text": self.text, "tokens": self.tokens,
            "latency_s": round(self.latency_s, 6), "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 6),
            "prompt_tokens": self.prompt_tokens, "prefilled_tokens": self.prefilled_tokens,
            "start_s": round(self.start_s, 6), "end_s": round(self.end_s, 6),
        }


@dataclass
class RunResult(Mapping[str, AgentResult]):
    """A mapping agent name -> `AgentResult` for every agent that finished, plus the run's trace.

    When an agent failed, `error` is a `RunError` naming it (`error.agent`) and the cause; the
    agents that finished before the run stopped are still here.
    """

    graph: str
    agents: dict[str, AgentResult] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    trace: Trace | None = None
    error: RunError | None = None
    latency_s: float = 0.0  # the whole run, model loading included
    prompts: dict[str, str] = field(default_factory=dict)  # each decoding agent's user message
    load_s: float = 0.0  # of `latency_s`, the time some model was loading

    @property
    def run_s(self) -> float:
        """The run's time without model loading: what a run with its models already loaded takes."""
        return max(self.latency_s - self.load_s, 0.0)

    def __getitem__(self, agent: str) -> AgentResult:
        try:
            return self.agents[agent]
        except KeyError:
            why = f" (the run failed: {self.error})" if self.error is not None else ""
            raise KeyError(f"no result for agent {agent!r}{why}; finished: {', '.join(self.agents) or 'none'}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.agents)

    def __len__(self) -> int:
        return len(self.agents)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str:
        """The text of the output agent (of the first one, when there are several)."""
        for name in self.outputs:
            if name in self.agents:
                return self.agents[name].text
        return ""

    @property
    def texts(self) -> dict[str, str]:
        """Output agent -> text, for the outputs that finished."""
        return {n: self.agents[n].text for n in self.outputs if n in self.agents}

    def bytes_by_edge(self) -> dict[str, int]:
        return {} if self.trace is None else self.trace.bytes_by_edge()

    def raise_for_error(self) -> "RunResult":
        if self.error is not None:
            raise self.error
        return self

    def to_dict(self, *, spans: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "graph": self.graph, "ok": self.ok,
            "error": None if self.error is None else {"agent": self.error.agent, "message": str(self.error)},
            "outputs": {n: self.agents[n].text for n in self.outputs if n in self.agents},
            "latency_s": round(self.latency_s, 6),
            "load_s": round(self.load_s, 6),
            "run_s": round(self.run_s, 6),
            "agents": {n: r.to_dict() for n, r in self.agents.items()},
            "bytes_by_edge": self.bytes_by_edge(),
        }
        if self.trace is not None:
            out["edges"] = {k: {"type": e.type, "mode": e.mode} for k, e in self.trace.edges.items()}
            if spans:
                out["trace"] = [s.to_dict() for s in self.trace.spans]
        return out

    def __repr__(self) -> str:
        state = "ok" if self.ok else f"error={self.error}"
        return f"RunResult({self.graph!r}, agents={list(self.agents)}, {state}, latency_s={self.latency_s:.3f})"
