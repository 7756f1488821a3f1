"""The timeline of a run: every load, read, prefill, share, transfer, fusion, decode and text hand-off.

Spans are recorded from worker threads as well as from the event loop, so `Trace` is thread-safe.
Times are seconds since the run started. Bytes moved per edge: a text edge carries the UTF-8 bytes
of the sender's text; a cache edge carries the KV bytes of the cache (its in-memory size when both
agents share a process, the encoded wire size when it crosses a link).
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson

from agentmesh.files import write_atomic

SPAN_KINDS = ("load", "read", "prefill", "share", "transfer", "fuse", "decode", "text")


@dataclass(frozen=True)
class Span:
    """One step of one agent. `edge` ("sender->receiver") is set for steps that feed an edge."""

    agent: str
    kind: str
    start_s: float
    end_s: float
    tokens: int = 0
    bytes: int = 0
    thread: str = ""
    edge: str | None = None
    detail: str | None = None

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    def overlaps(self, other: "Span") -> bool:
        return self.start_s < other.end_s and other.start_s < self.end_s

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class EdgeInfo:
    sender: str
    receiver: str
    type: str                 # "text" | "cache"
    mode: str | None = None   # "fuse" | "prefix" for cache edges

    @property
    def key(self) -> str:
        return edge_key(self.sender, self.receiver)

    @property
    def label(self) -> str:
        return self.type if self.type == "text" else f"cache/{self.mode}"


def edge_key(sender: str, receiver: str) -> str:
    return f"{sender}->{receiver}"


@dataclass
class OpenSpan:
    """A span being measured: set `tokens`, `bytes` or `detail` before it closes."""

    agent: str
    kind: str
    start_s: float
    edge: str | None = None
    tokens: int = 0
    bytes: int = 0
    detail: str | None = None


class Trace:
    """Spans of one run, relative to its start; exportable as JSON and as a Chrome trace."""

    def __init__(self, name: str = "run", *, edges: list[EdgeInfo] | tuple[EdgeInfo, ...] = (),
                 on_begin: Callable[[str, str], None] | None = None,
                 on_span: Callable[[Span], None] | None = None):
        self.name = name
        self.edges: dict[str, EdgeInfo] = {e.key: e for e in edges}
        self._t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._spans: list[Span] = []
        # Listeners are called from whichever thread records; they must be thread-safe.
        self.on_begin = on_begin
        self.on_span = on_span

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def add(self, span: Span) -> Span:
        with self._lock:
            self._spans.append(span)
        if self.on_span is not None:
            self.on_span(span)
        return span

    def record(self, agent: str, kind: str, start_s: float, end_s: float | None = None, *, tokens: int = 0,
               bytes: int = 0, edge: str | None = None, detail: str | None = None) -> Span:
        end = self.now() if end_s is None else end_s
        return self.add(Span(agent=agent, kind=kind, start_s=start_s, end_s=end, tokens=tokens, bytes=bytes,
                             thread=threading.current_thread().name, edge=edge, detail=detail))

    @contextmanager
    def span(self, agent: str, kind: str, *, edge: str | None = None) -> Iterator[OpenSpan]:
        """Measure the enclosed block as one span (recorded even when the block raises)."""
        if self.on_begin is not None:
            self.on_begin(agent, kind)
        open_ = OpenSpan(agent=agent, kind=kind, start_s=self.now(), edge=edge)
        try:
            yield open_
        finally:
            self.record(agent, kind, open_.start_s, tokens=open_.tokens, bytes=open_.bytes, edge=open_.edge,
                        detail=open_.detail)

    @property
    def spans(self) -> list[Span]:
        with self._lock:
            return sorted(self._spans, key=lambda s: (s.start_s, s.end_s))

    def of(self, agent: str | None = None, kind: str | None = None) -> list[Span]:
        return [s for s in self.spans if (agent is None or s.agent == agent) and (kind is None or s.kind == kind)]

    def bytes_by_edge(self) -> dict[str, int]:
        """Bytes each edge carried, keyed "sender->receiver" (every declared edge, 0 when idle)."""
        out = {key: 0 for key in self.edges}
        for s in self.spans:
            if s.edge is not None and s.kind in ("transfer", "text"):
                out[s.edge] = out.get(s.edge, 0) + s.bytes
        return out

    @property
    def duration_s(self) -> float:
        spans = self.spans
        return max((s.end_s for s in spans), default=0.0)

    @property
    def load_s(self) -> float:
        """Seconds of the run during which some model was loading (overlapping loads count once)."""
        total, reach = 0.0, 0.0
        for s in self.of(kind="load"):  # sorted by start
            if s.end_s > reach:
                total += s.end_s - max(s.start_s, reach)
                reach = s.end_s
        return total

    def to_dict(self) -> dict[str, Any]:
        moved = self.bytes_by_edge()
        return {
            "name": self.name,
            "duration_s": round(self.duration_s, 6),
            "load_s": round(self.load_s, 6),
            "edges": {k: {"type": e.type, "mode": e.mode, "bytes": moved.get(k, 0)} for k, e in self.edges.items()},
            "bytes_by_edge": moved,
            "spans": [s.to_dict() for s in self.spans],
        }

    def to_json(self, *, indent: bool = True) -> str:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2 if indent else 0).decode()

    def save_json(self, path: str | Path) -> Path:
        return write_atomic(path, self.to_json().encode())

    def to_chrome(self) -> dict[str, Any]:
        """Chrome trace event format: one row per agent, one complete ("X") event per span."""
        spans = self.spans
        agents = list(dict.fromkeys(s.agent for s in spans))
        tid = {a: i + 1 for i, a in enumerate(agents)}
        events: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": f"agentmesh {self.name}"}}]
        for a in agents:
            events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid[a], "args": {"name": a}})
        for s in spans:
            args: dict[str, Any] = {"tokens": s.tokens, "bytes": s.bytes, "thread": s.thread}
            if s.edge:
                args["edge"] = s.edge
            if s.detail:
                args["detail"] = s.detail
            events.append({"name": s.kind if not s.edge else f"{s.kind} {s.edge}", "cat": s.kind, "ph": "X",
                           "ts": round(s.start_s * 1e6, 3), "dur": round(max(s.duration_s, 0.0) * 1e6, 3),
                           "pid": 1, "tid": tid[s.agent], "args": args})
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"graph": self.name, "load_s": round(self.load_s, 6),
                              "bytes_by_edge": self.bytes_by_edge()}}

    def save_chrome(self, path: str | Path) -> Path:
        """Write the Chrome trace (open it at https://ui.perfetto.dev or chrome://tracing)."""
        return write_atomic(path, orjson.dumps(self.to_chrome()))

    def __repr__(self) -> str:
        return f"Trace({self.name!r}, spans={len(self._spans)}, duration_s={self.duration_s:.3f})"
