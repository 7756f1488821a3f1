"""Events a run emits while it goes (for `on_event=` callbacks and `stream_graph`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from agentmesh.runtime.trace import Span

if TYPE_CHECKING:
    from agentmesh.runtime.result import AgentResult, RunResult


@dataclass(frozen=True)
class AgentStarted:
    agent: str


@dataclass(frozen=True)
class PhaseStarted:
    """An agent began a step (`kind` as in `Span.kind`); the matching `Step` comes when it ends."""

    agent: str
    kind: str


@dataclass(frozen=True)
class Step:
    """A step finished; `span` holds its timing, tokens and bytes."""

    span: Span

    @property
    def agent(self) -> str:
        return self.span.agent


@dataclass(frozen=True)
class Token:
    """A piece of generated text (one token's worth, or nothing until a character completes)."""

    agent: str
    text: str
    token_id: int


@dataclass(frozen=True)
class AgentFinished:
    agent: str
    text: str
    result: "AgentResult"


@dataclass(frozen=True)
class AgentFailed:
    agent: str
    error: BaseException


@dataclass(frozen=True)
class RunFinished:
    result: "RunResult"


Event = Union[AgentStarted, PhaseStarted, Step, Token, AgentFinished, AgentFailed, RunFinished]
