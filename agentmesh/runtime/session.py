"""`ChatSession`: a multi-turn conversation with a graph that keeps history and reuses caches.

Every decoding agent keeps its own conversation: each turn appends (its user message, its answer).
The session keeps one endpoint per agent for its whole life, and endpoints keep the caches they
computed, so a turn prefills only the tokens the previous turn had not read (the longest common
token prefix is reused). A receiver of fuse edges fuses only its new tokens: tokens fused in an
earlier turn keep their fused K/V, and new tokens are computed from the unfused context and then
fused, exactly as a fresh run over the whole conversation would (fusion is per token).
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from agentmesh.graph import Graph
from agentmesh.models.pool import ModelPool, default_pool
from agentmesh.runtime.endpoint import Endpoint
from agentmesh.runtime.events import Event, RunFinished
from agentmesh.runtime.plan import build_plan
from agentmesh.runtime.result import RunResult
from agentmesh.runtime.scheduler import EventCallback, arun_graph, make_endpoints, run_sync, stream_graph


class ChatSession:
    """`session.send("hi")` -> `RunResult`; the next `send` continues the same conversation."""

    def __init__(self, graph: Graph, *, pool: ModelPool | None = None, inputs: Mapping[str, str] | None = None,
                 timeout: float | None = None, endpoints: Mapping[str, Endpoint] | None = None):
        self.graph = graph
        self.plan = build_plan(graph)
        if endpoints is None:
            if pool is None:
                pool = default_pool()
            endpoints = make_endpoints(self.plan, pool)
        self.endpoints = dict(endpoints)
        self.inputs = dict(inputs or {})
        self.timeout = timeout
        self.history: dict[str, list[tuple[str, str]]] = {}
        self.results: list[RunResult] = []

    @property
    def turns(self) -> int:
        return len(self.results)

    def _options(self, user_text: str) -> dict[str, Any]:
        return dict(inputs={**self.inputs, "input": user_text}, endpoints=self.endpoints,
                    history={k: list(v) for k, v in self.history.items()}, timeout=self.timeout, validate=False)

    def _remember(self, result: RunResult) -> None:
        self.results.append(result)
        if not result.ok:
            return  # a failed turn leaves the conversation as it was
        for agent, prompt in result.prompts.items():
            if agent in result.agents:
                self.history.setdefault(agent, []).append((prompt, result.agents[agent].text))

    async def asend(self, user_text: str, *, on_event: EventCallback | None = None) -> RunResult:
        opts = self._options(user_text)
        result = await arun_graph(self.graph, opts.pop("inputs"), on_event=on_event, **opts)
        self._remember(result)
        return result

    def send(self, user_text: str, *, on_event: EventCallback | None = None) -> RunResult:
        return run_sync(lambda: self.asend(user_text, on_event=on_event))

    async def stream(self, user_text: str) -> AsyncIterator[Event]:
        """Like `asend`, yielding the turn's events; the last one is `RunFinished(result)`."""
        opts = self._options(user_text)
        async for event in stream_graph(self.graph, opts.pop("inputs"), **opts):
            if isinstance(event, RunFinished):
                self._remember(event.result)
            yield event

    def reset(self) -> None:
        """Forget the conversation and every kept cache."""
        self.history.clear()
        self.results.clear()
        for ep in self.endpoints.values():
            ep.forget()

    def __repr__(self) -> str:
        return f"ChatSession({self.plan.graph!r}, turns={self.turns})"
