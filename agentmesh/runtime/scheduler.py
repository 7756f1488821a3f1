"""The asyncio scheduler: runs a graph's agents in dependency order, as concurrently as they allow.

* Every agent's work is a task started at once; a task waits only for what it needs: the texts of
  its text inputs, its prefix sender's reading. Independent agents therefore run side by side, and
  readers prefill their private context while upstream agents are still generating.
* A receiver of fuse edges starts its own prefill and all its sharers' prefills of the same span
  together (`LocalEndpoint.text` gathers them), then fuses, then decodes.
* Models run in worker threads, so the loop stays free to stream tokens (`on_event`, `stream_graph`).
* When an agent fails, the others are cancelled (worker threads stop at their next token) and the
  result names the agent and the cause and keeps what finished. A `timeout` bounds the whole run.

Graph and input errors (`GraphError`) are raised before anything runs; failures while running are
returned as `RunResult.error` (a `RunError`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from agentmesh.c2c.sharing import reads_receiver_ids
from agentmesh.cache.kv import KVCache
from agentmesh.errors import AgentMeshError, ConfigError, RunError, error_line
from agentmesh.graph import Graph
from agentmesh.models.pool import ModelPool, default_pool
from agentmesh.models.protocol import LanguageModel
from agentmesh.runtime.endpoint import (CallContext, Endpoint, ReadRequest, RunCancelled, ShareFn, ShareRequest,
                                        TextRequest, gather_or_cancel)
from agentmesh.runtime.events import (AgentFailed, AgentFinished, AgentStarted, Event, PhaseStarted, RunFinished,
                                      Step, Token)
from agentmesh.runtime.local import LocalEndpoint
from agentmesh.runtime.plan import RunPlan, build_plan
from agentmesh.models.reading import reading_messages
from agentmesh.runtime.prompts import message
from agentmesh.runtime.result import AgentResult, RunResult
from agentmesh.runtime.trace import Trace, edge_key
from agentmesh.types import Messages

History = Mapping[str, Sequence[tuple[str, str]]]  # agent -> earlier (user prompt, its answer) turns
EventCallback = Callable[[Event], Any]


class AgentFailure(Exception):
    """An agent's work raised; carries the agent's name through the tasks that waited for it."""

    def __init__(self, agent: str, cause: BaseException):
        super().__init__(f"{agent}: {cause}")
        self.agent = agent
        self.cause = cause


@dataclass(frozen=True)
class _Reading:
    """An agent's reading: the cache that read `messages` (None when there is nothing to read), and
    what it continued from (its prefix sender's reading)."""

    cache: KVCache | None
    messages: Messages
    past: KVCache | None = None
    past_messages: Messages = ()


def make_endpoints(plan: RunPlan, pool: ModelPool) -> dict[str, Endpoint]:
    """One `LocalEndpoint` per agent (models come from `pool`, so a shared model loads once)."""
    return {n: LocalEndpoint(n, a.model_ref, pool=pool, dtype=a.dtype, device=a.device, adapter=a.adapter)
            for n, a in plan.agents.items()}


def _describe(error: BaseException) -> str:
    if isinstance(error, AgentMeshError):
        return error.message  # the hint travels separately, on the RunError
    return error_line(error)


class _Run:
    """The state of one run: one memoised task per (work, agent), the results so far."""

    def __init__(self, graph: Graph, plan: RunPlan, endpoints: Mapping[str, Endpoint], inputs: Mapping[str, str],
                 history: History, trace: Trace, emit: Callable[[Event], None]):
        self.graph = graph
        self.plan = plan
        self.endpoints = endpoints
        self.inputs = dict(inputs)
        self.history = history
        self.trace = trace
        self.emit = emit
        self.loop = asyncio.get_running_loop()
        self.cancel = threading.Event()
        # Threads are named after the graph, so a trace tells which worker ran each step.
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(8, 3 * len(plan.agents)),
                                                              thread_name_prefix=f"{plan.graph}")
        self.tasks: dict[tuple[str, str], asyncio.Task[Any]] = {}
        self.results: dict[str, AgentResult] = {}
        self.prompts: dict[str, str] = {}          # each decoding agent's user message this turn
        self._started: dict[str, float] = {}
        self._moved: set[str] = set()
        self._readers: dict[str, dict[str, Any]] = {}

    def _threadsafe(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.emit, event)
        except RuntimeError:  # the loop already closed: a late span from a finishing thread
            pass

    def ctx(self, agent: str, *, stream: bool = False) -> CallContext:
        def on_token(piece: str, token_id: int) -> None:
            if piece:
                self._threadsafe(Token(agent, piece, token_id))

        return CallContext(agent=agent, trace=self.trace, cancel=self.cancel, on_token=on_token if stream else None,
                           executor=self.executor)

    def _task(self, kind: str, name: str, make: Callable[[], Any]) -> asyncio.Future[Any]:
        key = (kind, name)
        if key not in self.tasks:
            self.tasks[key] = asyncio.ensure_future(self._guard(name, make()))
        # Shielded: one waiter being cancelled must not cancel work others wait for.
        return asyncio.shield(self.tasks[key])

    @staticmethod
    async def _guard(name: str, coro: Any) -> Any:
        try:
            return await coro
        except (asyncio.CancelledError, AgentFailure, RunCancelled):
            raise
        except Exception as e:  # noqa: BLE001 - every cause is reported, named by its agent
            raise AgentFailure(name, e) from e

    def _start(self, agent: str) -> None:
        if agent not in self._started:
            self._started[agent] = self.trace.now()
            self.emit(AgentStarted(agent))

    def _transfer(self, sender: str, receiver: str, cache: KVCache | None, tokens: int) -> None:
        """Count a cache handed from `sender` to `receiver` in this process. An endpoint that is not
        local moves the caches it sends itself and records their wire bytes."""
        key = edge_key(sender, receiver)
        if cache is None or key in self._moved:
            return
        self._moved.add(key)
        if not self.endpoints[sender].records_transfers:
            now = self.trace.now()
            self.trace.record(sender, "transfer", now, now, tokens=tokens, bytes=cache.nbytes, edge=key,
                              detail="in-process")

    def reading(self, name: str) -> asyncio.Future[_Reading]:
        return self._task("read", name, lambda: self._read(name))

    def text(self, name: str) -> asyncio.Future[str]:
        return self._task("text", name, lambda: self._text(name))

    async def _upstream(self, name: str) -> dict[str, str]:
        senders = self.plan[name].text_inputs
        texts = await gather_or_cancel(*(self.text(s) for s in senders))
        now = self.trace.now()
        for s, t in zip(senders, texts):
            key = edge_key(s, name)
            if key not in self._moved:
                self._moved.add(key)
                self.trace.record(s, "text", now, now, tokens=self.results[s].tokens, bytes=len(t.encode("utf-8")),
                                  edge=key)
        return dict(zip(senders, texts))

    async def _past(self, name: str) -> _Reading:
        """What `name` continues from: its prefix sender's reading (empty without one)."""
        sender = self.plan[name].prefix
        if sender is None:
            return _Reading(None, ())
        rd = await self.reading(sender)
        self._transfer(sender, name, rd.cache, 0 if rd.cache is None else rd.cache.seq_len)
        return rd

    async def _read(self, name: str) -> _Reading:
        a = self.plan[name]
        extra = None
        if not a.decode and (a.text_inputs or a.has_prompt):
            # A reader that is given text reads it after its context (it never answers it).
            extra = self.graph.render_prompt(name, self.inputs, await self._upstream(name))
        past = await self._past(name)
        own = reading_messages(a.role, a.context, extra)
        messages = past.messages + own
        if not own:
            return _Reading(past.cache, messages, past.cache, past.messages)
        self._start(name)
        start = self.trace.now()
        receivers = tuple(n for n, p in self.plan.agents.items() if p.prefix == name)
        cache = await self.endpoints[name].reading(ReadRequest(messages, past.cache, past.messages, receivers),
                                                   self.ctx(name))
        if not a.decode:
            self._reader_done(name, start, 0 if cache is None else cache.seq_len)
            if not a.shares_with:  # a prefix sender's part ends with its reading
                self._finish_reader(name)
        return _Reading(cache, messages, past.cache, past.messages)

    def _reader_done(self, name: str, start: float, prompt_tokens: int) -> None:
        work = "share" if self.plan[name].shares_with else "read"
        stats = self._readers.setdefault(name, {"work": work, "start": start, "prompt": 0})
        stats["prompt"] = max(stats["prompt"], prompt_tokens)
        stats["end"] = self.trace.now()

    def _share_fn(self, receiver: str, sharer: str) -> ShareFn:
        async def share(span_ids: torch.Tensor, span_mask: torch.Tensor, keep_last: int) -> KVCache:
            try:
                rd = await self.reading(sharer)
                self._start(sharer)
                start = self.trace.now()
                req = ShareRequest(receiver=receiver, reading=ReadRequest(rd.messages, rd.past, rd.past_messages),
                                   span_ids=span_ids, span_mask=span_mask, keep_last=keep_last)
                cache = await self.endpoints[sharer].share(req, self.ctx(sharer))
            except (asyncio.CancelledError, AgentFailure, RunCancelled):
                raise
            except Exception as e:  # noqa: BLE001
                raise AgentFailure(sharer, e) from e
            self._moved.discard(edge_key(sharer, receiver))  # every share is a new transfer
            self._transfer(sharer, receiver, cache, keep_last)
            if not self.plan[sharer].decode:
                reading_len = 0 if rd.cache is None else rd.cache.seq_len
                self._reader_done(sharer, start, reading_len + int(span_ids.shape[1]))
            return cache

        return share

    def _load(self, name: str) -> asyncio.Future[None]:
        return self._task("load", name, lambda: self.endpoints[name].load(self.ctx(name)))

    async def _sharer_models(self, name: str) -> tuple[LanguageModel | None, ...]:
        """Per sharer of `name`, its model when it has another tokenizer (the receiver then aligns
        the conversation to it as `C2CModel.chat` does); None where it reads the receiver's ids. A
        model on another host is None too: its worker reads the ids it is sent."""
        fuse = self.plan[name].fuse
        local = {f.sharer for f in fuse if not self.endpoints[f.sharer].records_transfers}
        if self.endpoints[name].records_transfers or not local:
            return ()
        await gather_or_cancel(*(self._load(n) for n in (name, *sorted(local))))
        rm = self.endpoints[name].model
        models = [self.endpoints[f.sharer].model if f.sharer in local else None for f in fuse]
        return tuple(sm if sm is not None and rm is not None and sm is not rm and not reads_receiver_ids(rm, sm)
                     else None for sm in models)

    async def _text(self, name: str) -> str:
        a = self.plan[name]
        upstream, past = await gather_or_cancel(self._upstream(name), self._past(name))
        if a.prefix_sender or a.shares_with:
            # It also hands its reading on: read it once, so its own turn continues from that cache.
            await self.reading(name)
        prompt = self.graph.render_prompt(name, self.inputs, upstream)
        self.prompts[name] = prompt
        turns: list[dict[str, str]] = []
        for user, answer in self.history.get(name, ()):
            turns += [message("user", user), message("assistant", answer)]
        turns.append(message("user", prompt))
        messages = past.messages + reading_messages(a.role, a.context) + tuple(turns)
        req = TextRequest(messages=messages, generation=a.generation, past=past.cache, past_messages=past.messages,
                          fuse=a.fuse, fusion=a.fusion, sharer_models=await self._sharer_models(name))
        share = [self._share_fn(name, f.sharer) for f in a.fuse]
        self._start(name)
        start = self.trace.now()
        out = await self.endpoints[name].text(req, self.ctx(name, stream=True), share)
        end = self.trace.now()
        result = AgentResult(
            agent=name, text=out.text, tokens=len(out.token_ids), latency_s=end - start,
            ttft_s=None if out.first_token_s is None else out.first_token_s - start,
            prompt_tokens=out.prompt_tokens, prefilled_tokens=out.prefilled_tokens, token_ids=out.token_ids,
            work="decode", start_s=start, end_s=end)
        self.results[name] = result
        self.emit(AgentFinished(name, out.text, result))
        return out.text

    def check_fusers(self) -> None:
        """Fail before any model loads when a fuse edge's fuser is missing or unreadable where its
        receiver runs."""
        for name, a in self.plan.agents.items():
            for f in a.fuse:
                try:
                    self.endpoints[name].check_fuser(f.fuser)
                except AgentMeshError as e:
                    raise AgentFailure(name, e) from e

    async def execute(self) -> None:
        if not any(ep.records_transfers for ep in self.endpoints.values()):
            self.check_fusers()
        roots: list[Any] = []
        for name in self.endpoints:
            roots.append(self._load(name))
        for name, a in self.plan.agents.items():
            if a.decode:
                roots.append(self.text(name))
            elif a.prefix_sender or (a.shares_with and (a.role or a.context)):
                # Readers start at once: their context prefill overlaps the upstream agents' work.
                roots.append(self.reading(name))
        await gather_or_cancel(*roots)
        self.finish_readers()

    def finish_readers(self) -> None:
        """Results for the agents that only read or shared (a sharer is done when the run is)."""
        for name in list(self._readers):
            self._finish_reader(name)

    def _finish_reader(self, name: str) -> None:
        st = self._readers.get(name)
        if st is None or name in self.results or "end" not in st:
            return
        spans = [s for s in self.trace.of(name) if s.kind in ("read", "share")]
        result = AgentResult(agent=name, latency_s=st["end"] - st["start"], prompt_tokens=st["prompt"],
                             prefilled_tokens=sum(s.tokens for s in spans), work=st["work"],
                             start_s=st["start"], end_s=st["end"])
        self.results[name] = result
        self.emit(AgentFinished(name, "", result))

    async def stop(self) -> None:
        """Cancel every task still running and wait (briefly: threads stop at their next token)."""
        self.cancel.set()
        pending = [t for t in self.tasks.values() if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        # Idle workers exit now; a busy one (a model load cannot be interrupted) finishes on its own.
        self.executor.shutdown(wait=False, cancel_futures=True)

    def running(self) -> list[str]:
        return sorted({name for (_, name), t in self.tasks.items() if not t.done()})


def _emitter(on_event: EventCallback | None) -> Callable[[Event], None]:
    closed = False

    def emit(event: Event) -> None:
        # Nothing follows RunFinished (a late callback from a stopping thread is dropped).
        nonlocal closed
        if on_event is None or closed:
            return
        closed = isinstance(event, RunFinished)
        on_event(event)

    return emit


async def arun_graph(graph: Graph, inputs: str | Mapping[str, str] | None = None, *, pool: ModelPool | None = None,
                     trace: bool = True, on_event: EventCallback | None = None, timeout: float | None = None,
                     endpoints: Mapping[str, Endpoint] | None = None, history: History | None = None,
                     validate: bool = True) -> RunResult:
    """Run `graph` on `inputs` (a str is `{input}`; a mapping names inputs) and return its `RunResult`.

    `pool`: the `ModelPool` models come from (default: the process-wide pool). `on_event(event)` is
    called on the event loop for every event (see `agentmesh.runtime.events`). `timeout`: seconds
    for the whole run. `endpoints`: agent -> `Endpoint`, to run some agents elsewhere (default: all
    local). `history`: earlier chat turns per agent (used by `ChatSession`).
    """
    plan = build_plan(graph, validate=validate)
    values = graph.resolve_inputs(inputs)
    if endpoints is None:
        if pool is None:
            pool = default_pool()
        endpoints = make_endpoints(plan, pool)
    missing = [n for n in plan.agents if n not in endpoints]
    if missing:
        raise ConfigError(f"no endpoint for agents {', '.join(missing)}; give one per agent of graph {plan.graph!r}")
    emit = _emitter(on_event)
    tr = Trace(plan.graph, edges=plan.edges)
    run = _Run(graph, plan, endpoints, values, history or {}, tr, emit)
    tr.on_span = lambda span: run._threadsafe(Step(span))
    tr.on_begin = lambda agent, kind: run._threadsafe(PhaseStarted(agent, kind))
    error: RunError | None = None
    try:
        await asyncio.wait_for(run.execute(), timeout)
    except AgentFailure as f:
        cause = f.cause
        error = RunError(f"agent {f.agent} failed: {_describe(cause)}", agent=f.agent,
                         hint=getattr(cause, "hint", None))
        error.__cause__ = cause
        emit(AgentFailed(f.agent, cause))
    except asyncio.TimeoutError:
        running = run.running()
        error = RunError(f"the run timed out after {timeout:g} s" + (f" while {', '.join(running)} ran" if running else ""),
                         agent=running[0] if len(running) == 1 else None)
        for name in running:
            emit(AgentFailed(name, error))
    finally:
        await run.stop()
        tr.on_span = tr.on_begin = None
    if error is not None:
        run.finish_readers()
    agents = {n: run.results[n] for n in plan.agents if n in run.results}
    result = RunResult(graph=plan.graph, agents=agents, outputs=plan.outputs, trace=tr if trace else None,
                       error=error, latency_s=tr.now(), prompts=dict(run.prompts), load_s=tr.load_s)
    emit(RunFinished(result))
    return result


def run_sync(make: Callable[[], Any]) -> Any:
    """Run the coroutine `make()` to completion from synchronous code, even inside a running event
    loop (then on a fresh loop in a helper thread, so the caller's loop is never re-entered)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="agentmesh-run") as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def run_graph(graph: Graph, inputs: str | Mapping[str, str] | None = None, **opts: Any) -> RunResult:
    """`arun_graph` for synchronous code; works inside a running event loop too (via a thread)."""
    return run_sync(lambda: arun_graph(graph, inputs, **opts))


async def stream_graph(graph: Graph, inputs: str | Mapping[str, str] | None = None,
                       **opts: Any) -> AsyncIterator[Event]:
    """Run `graph` and yield its events as they come; the last one is `RunFinished(result)`."""
    queue: asyncio.Queue[Event] = asyncio.Queue()
    user = opts.pop("on_event", None)

    def on_event(event: Event) -> None:
        if user is not None:
            user(event)
        queue.put_nowait(event)

    task = asyncio.ensure_future(arun_graph(graph, inputs, on_event=on_event, **opts))
    getter: asyncio.Future[Event] | None = None
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                # The run ended: raise what stopped it before its first event, or drain the queue.
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
                while not queue.empty():
                    event = queue.get_nowait()
                    yield event
                    if isinstance(event, RunFinished):
                        return
                return
            event = getter.result()
            yield event
            if isinstance(event, RunFinished):
                return
    finally:
        if getter is not None and not getter.done():
            getter.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
