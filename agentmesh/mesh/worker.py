"""`Worker`: serves the agents a graph places on one host, answering callers over a `Link`.

    async with MqttLink(broker_config(graph, host="cloud"), graph=graph.name) as link:
        worker = Worker(graph, "cloud", link)
        await worker.preload()
        await worker.serve()            # until cancelled or the link closes

The worker listens on its host's inbox channel (see `agentmesh.mesh.envelope`). Each call
(`load`, `reading`, `share`, `text`) is acknowledged at once, kept alive with heartbeats while it
works, and answered with a result or an error on the reply channel the caller named. Caches go
out through the cache codec in `wire_dtype` (None: lossless). Streaming `text` calls send their
tokens in small batches as they come. A receiver with fuse edges asks the caller for each sharer's
span cache (a `share` message) and waits for it in its inbox.

What a call may do is decided by the worker's own copy of the graph: which agents it serves,
their models, generation settings and fusers (paths resolve on this machine). The caller sends
the conversation and the caches it continues from. Calls of one run share one `LocalEndpoint` per
agent (so a reader's cache is reused by its own turn); the worker keeps the last `max_runs` runs
and forgets a run when its caller releases it.

An `MqttLink` reconnects, resubscribes and repairs broken transfers on its own, so a worker and
its calls outlive broker restarts.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from agentmesh.cache.codec import decode_cache, encode_cache
from agentmesh.cache.kv import KVCache
from agentmesh.errors import AgentMeshError, ConfigError, TransportError
from agentmesh.runtime.endpoint import CallContext, ReadRequest, ShareFn, ShareRequest, TextRequest
from agentmesh.runtime.local import LocalEndpoint
from agentmesh.runtime.plan import build_plan
from agentmesh.runtime.trace import Trace
from agentmesh.graph import Graph
from agentmesh.mesh.auth import Rejected, make_guard
from agentmesh.mesh.envelope import (CALL_OPS, Envelope, error_body, inbox_channel, pack, raise_remote,
                                     seal_link_control, unpack)
from agentmesh.mesh.settings import (DEFAULT_MAX_CALLS, DEFAULT_MAX_REQUEST_BYTES, allowed_callers, broker_timeout,
                                     context_ref, graph_digest)
from agentmesh.models.pool import ModelPool, default_pool
from agentmesh.transport.link import Link, LinkClosed, LinkMessage, LinkTimeout, validate_channel
from agentmesh.types import Messages
from agentmesh.units import human_bytes

log = logging.getLogger(__name__)

_RECENT_CALLS = 4096
_POLL_S = 0.25  # how often the inbox loop looks up from the link to see whether to stop
_KEEP_REPLY_S = 120.0  # longest a result is resent while its caller does not confirm it
_MAX_TOKENS_PER_MESSAGE = 256
_MAX_DELIVERIES = 64  # caches sent straight here and not yet claimed by their receiver's call


@dataclass(frozen=True)
class ServedCall:
    """One call a worker served (or failed), for its log."""

    op: str
    agent: str
    run: str
    caller: str
    seconds: float
    bytes_in: int       # the request, plus sharer caches it waited for
    bytes_out: int      # everything sent back: acks, heartbeats, tokens, the result
    ok: bool
    detail: str = ""
    error: str | None = None

    def line(self) -> str:
        state = "ok" if self.ok else f"failed: {self.error}"
        extra = f", {self.detail}" if self.detail else ""
        return (f"{self.op} {self.agent} (run {self.run}, from {self.caller}): {self.seconds * 1000:.0f} ms, "
                f"in {human_bytes(self.bytes_in)}, out {human_bytes(self.bytes_out)}{extra} - {state}")



@dataclass(frozen=True)
class _Delivery:
    """A cache another worker (or this one) sent straight to a receiver served here."""

    run: str
    sender: str  # the agent that made it
    receiver: str
    cache: KVCache | None = None  # made on this host
    env: Envelope | None = None  # arrived from another host, still encoded

    @property
    def nbytes(self) -> int:
        return self.env.size if self.env is not None else 0


@dataclass(eq=False)
class _Call:
    call: str
    run: str
    agent: str
    reply: str
    caller: str
    cancel: threading.Event = field(default_factory=threading.Event)
    callbacks: dict[int, asyncio.Future[Envelope]] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    deadline: float = float("inf")  # loop time after which the caller has surely given up
    got: asyncio.Event = field(default_factory=asyncio.Event)  # the caller has the call's last message
    resend_s: float = 2.0


def _messages(value: Any, key: str) -> Messages:
    """Chat messages from the wire: a list of {"role": str, "content": str}."""
    if not isinstance(value, list):
        raise TransportError(f"request field {key!r} must be a list of messages")
    out = []
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise TransportError(f"request field {key!r} holds {str(m)[:60]!r}, not a {{role, content}} message")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _ids(value: Any, key: str) -> torch.Tensor:
    """A (1, N) LongTensor from a JSON list of one list of ints."""
    if not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], list) and value[0]
            and all(isinstance(t, int) and 0 <= t < 1 << 31 for t in value[0])):
        raise TransportError(f"request field {key!r} must be [[token ids...]] (one non-empty row)")
    return torch.tensor(value, dtype=torch.long)


def _str(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise TransportError(f"request field {key!r} must be a non-empty string")
    return value


def served_agents(graph: Graph, host: str) -> tuple[str, ...]:
    """The agents `graph` places on `host`; `ConfigError` for an unknown host or one without agents."""
    if host not in graph.hosts:
        known = ", ".join(sorted(graph.hosts)) or "none"
        raise ConfigError(f"graph {graph.name!r} declares no host {host!r} (hosts: {known})",
                          hint="pick one of the hosts under hosts: in the file")
    agents = tuple(a.name for a in graph.agents_on(host))
    if not agents:
        raise ConfigError(f"graph {graph.name!r} places no agent on host {host!r}",
                          hint=f"set `host: {host}` on the agents this machine should run")
    return agents


class Worker:
    """Serves the agents `graph` places on `host` over `link` (an open `Link`)."""

    def __init__(self, graph: Graph, host: str, link: Link, *, pool: ModelPool | None = None, wire_dtype: str | None = None,
                 max_runs: int = 8, on_served: Callable[[ServedCall], None] | None = None, key: bytes | None = None,
                 insecure: bool = False, max_calls: int = DEFAULT_MAX_CALLS,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.agents = served_agents(graph, host)
        self.guard = make_guard(graph, host, key=key, insecure=insecure)
        self.callers = allowed_callers(graph, host)
        self.plan = build_plan(graph)
        self._contexts = {context_ref(n): self.plan[n].context for n in self.agents if self.plan[n].context}
        self.graph = graph
        self.host = host
        self.link = link
        seal_link_control(link, self.guard)  # so nobody without the keys makes the link forget or resend what it sent
        self.pool = pool if pool is not None else default_pool()
        self.wire_dtype = wire_dtype
        self.max_runs = max_runs
        self.on_served = on_served
        self.digest = graph_digest(graph)
        self.inbox = inbox_channel(host)
        self._runs: OrderedDict[str, dict[str, LocalEndpoint]] = OrderedDict()
        self._owners: OrderedDict[str, str] = OrderedDict()  # run -> the caller that started it
        self._calls: dict[str, _Call] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(4, 3 * len(self.agents)),
                                                               thread_name_prefix=f"worker-{host}")
        self.served = 0
        self.resent = 0  # last messages of calls sent again because their caller had not confirmed them
        self.max_calls, self.max_request_bytes = max_calls, max_request_bytes
        self._held = 0  # bytes of the requests of the calls in flight
        self._running = 0  # calls in flight
        self._stopping = False
        self._deliveries: OrderedDict[str, asyncio.Future[_Delivery]] = OrderedDict()  # ref -> cache
        self.delivery_timeout = broker_timeout(graph)

    async def preload(self) -> None:
        """Load every served agent's model now, so the first call does not wait for it."""
        loop = asyncio.get_running_loop()
        for name in self.agents:
            a = self.plan[name]
            await loop.run_in_executor(self._executor, lambda a=a: self.pool.get(
                a.model_ref, dtype=a.dtype, device=a.device, adapter=a.adapter))

    async def serve(self, ready: Callable[[], None] | None = None) -> None:
        """Answer calls until `stop()`, cancellation or the link closing. `ready()` runs once the
        inbox is subscribed."""
        await self.link.subscribe(self.inbox)
        if ready is not None:
            ready()
        try:
            # Short waits and a flag rather than cancellation: a receive cancelled mid-wait can
            # leave the link's internal queue getter behind.
            while not self._stopping:
                try:
                    msg = await self.link.receive_message(self.inbox, timeout=_POLL_S)
                except LinkClosed:
                    return
                except LinkTimeout:
                    continue
                except TransportError as e:  # a broken message: say so and go on
                    log.warning("worker %s: %s", self.host, e.message)
                    await asyncio.sleep(0.05)
                    continue
                self._dispatch(msg)
        finally:
            await self.close()

    def stop(self) -> None:
        """Make `serve` return (within a fraction of a second), cancelling the calls in flight."""
        self._stopping = True

    async def close(self) -> None:
        """Stop every call in flight and free the worker threads (the link stays open)."""
        for c in self._calls.values():
            c.cancel.set()
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coro: Any, on_done: Callable[[], None] | None = None) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if on_done is not None:
            task.add_done_callback(lambda _: on_done())

    def _busy(self, size: int) -> str | None:
        """Why a new call of `size` bytes is refused now, or None when it fits the limits."""
        if self._running >= self.max_calls:
            return f"host {self.host!r} is busy: {self._running} calls in flight (max_calls {self.max_calls}); try again"
        if self._held + size > self.max_request_bytes:
            return (f"host {self.host!r} is busy: its calls in flight hold {self._held} bytes, this one {size} "
                    f"(max_request_bytes {self.max_request_bytes}); try again")
        return None

    def _release(self, size: int) -> None:
        self._held -= size
        self._running -= 1

    async def _refuse(self, env: Envelope, why: str) -> None:
        """Tell an authenticated caller its call was refused (it waits for nothing then)."""
        try:
            reply = validate_channel(_str(env.body, "reply"))
            body = {"call": _str(env.body, "call"), "kind": "error", "error": error_body(TransportError(why))}
            await self.link.send(reply, pack(body, guard=self.guard, channel=reply))
        except TransportError as e:
            log.warning("worker %s could not refuse a call: %s", self.host, e.message)

    @property
    def dropped(self) -> dict[str, int]:
        """Messages dropped unexecuted, by reason (unsigned, bad_seal, wrong_key, stale, replayed, plaintext,
        unauthorised, malformed, busy)."""
        return dict(self.guard.dropped)

    def _drop(self, e: Rejected) -> None:
        """Log a dropped message: the first of each reason, then every 100th, so that a flood of
        forgeries cannot flood the log too (the counts are in `dropped`)."""
        n = self.guard.dropped[e.reason]
        if n == 1 or n % 100 == 0:
            log.warning("worker %s dropped a message (%s, %d so far): %s", self.host, e.reason, n, e.message)

    def _dispatch(self, msg: LinkMessage) -> None:
        try:
            env = unpack(msg.payload, guard=self.guard, channel=self.inbox)
            op = _str(env.body, "op")
        except Rejected as e:
            self._drop(e)
            return
        except TransportError as e:
            self._drop(self.guard.refuse("malformed", e.message))
            return
        sender = env.sender or "?"
        if op == "cache":  # from the host of the agent that made it, which need not be a caller
            self._receive_delivery(env, sender)
            return
        if sender not in self.callers:
            self._drop(self.guard.refuse("unauthorised", f"host {sender!r} may not call host {self.host!r} "
                                                         f"(allowed: {', '.join(sorted(self.callers)) or 'none'})"))
            return
        call = env.get("call")
        c = self._calls.get(call) if isinstance(call, str) else None
        if op == "cancel":
            if c is not None and c.caller == sender:
                c.cancel.set()
        elif op == "release":
            run = env.get("run")
            if isinstance(run, str) and self._owners.get(run) == sender:
                self._runs.pop(run, None)
                self._owners.pop(run, None)
                for ref in [r for r, f in self._deliveries.items() if f.done() and f.result().run == run]:
                    del self._deliveries[ref]
        elif op == "share_result":
            cb = env.get("cb")
            fut = c.callbacks.get(cb) if c is not None and c.caller == sender and isinstance(cb, int) else None
            if fut is not None and not fut.done():
                c.bytes_in += env.size  # type: ignore[union-attr]
                fut.set_result(env)
        elif op == "got":  # the caller has a call's result: stop resending it
            if c is not None and c.caller == sender:
                c.got.set()
        elif op == "ping":  # a caller waiting for this host to come up
            self._spawn(self._pong(env))
        elif op in CALL_OPS:
            if not isinstance(call, str) or c is not None or call in self._recent:
                return  # a resent request we already have
            self._recent[call] = None
            while len(self._recent) > _RECENT_CALLS:
                self._recent.popitem(last=False)
            busy = self._busy(env.size)
            if busy is not None:
                self.guard.refuse("busy", busy)
                self._spawn(self._refuse(env, busy))
                return
            self._held += env.size
            self._running += 1
            self._spawn(self._serve_call(op, env, sender), on_done=lambda size=env.size: self._release(size))
        else:
            self._drop(self.guard.refuse("malformed", f"unknown op {op!r}"))

    def _feeds(self, sender: str, receiver: str) -> bool:
        """Whether the graph has a cache edge from `sender` to `receiver` (prefix or fuse)."""
        a = self.plan.agents.get(receiver)
        return a is not None and (a.prefix == sender or any(f.sharer == sender for f in a.fuse))

    def _delivery(self, ref: str) -> asyncio.Future[_Delivery]:
        fut = self._deliveries.get(ref)
        if fut is None:
            fut = self._deliveries[ref] = asyncio.get_running_loop().create_future()
            while len(self._deliveries) > _MAX_DELIVERIES:  # the oldest, never claimed, go first
                _, old = self._deliveries.popitem(last=False)
                old.cancel()
        return fut

    def _receive_delivery(self, env: Envelope, host: str) -> None:
        """A cache another host's worker sent for a receiver served here: kept under its reference
        if the graph has that edge and `host` runs its sender."""
        b = env.body
        run, ref, frm, to = b.get("run"), b.get("ref"), b.get("from"), b.get("to")
        if not all(isinstance(v, str) and 0 < len(v) <= 64 for v in (run, ref, frm, to)) or "cache" not in env.blobs:
            self._drop(self.guard.refuse("malformed", "a cache delivery without run, ref, from, to or cache"))
            return
        sender = self.graph.agents.get(frm)  # type: ignore[arg-type]
        if sender is None or sender.host != host or to not in self.agents or not self._feeds(frm, to):  # type: ignore[arg-type]
            self._drop(self.guard.refuse("unauthorised", f"host {host!r} may not send a cache from {frm!r} to "
                                                         f"{to!r} on host {self.host!r}"))
            return
        if sum(f.result().nbytes for f in self._deliveries.values() if f.done()) + env.size > self.max_request_bytes:
            self._drop(self.guard.refuse("busy", f"host {self.host!r} holds too many delivered caches"))
            return
        fut = self._delivery(ref)  # type: ignore[arg-type]
        if not fut.done():
            fut.set_result(_Delivery(run=run, sender=frm, receiver=to, env=env))  # type: ignore[arg-type]

    def _targets(self, asked: Any, allowed: tuple[str, ...]) -> list[tuple[str, str, str]]:
        """(receiver, its host, ref) for each delivery the caller asked for: only to receivers this
        agent feeds (`allowed`), each at the host the graph places it on."""
        if asked is None:
            return []
        if not isinstance(asked, list) or len(asked) > len(allowed):
            raise TransportError("request field 'deliver' must list at most one delivery per receiver")
        out = []
        for d in asked:
            to, host, ref = (d.get(k) for k in ("to", "host", "ref")) if isinstance(d, dict) else (None,) * 3
            if not all(isinstance(v, str) and 0 < len(v) <= 64 for v in (to, host, ref)):
                raise TransportError(f"request field 'deliver' holds {str(d)[:80]!r}, not {{to, host, ref}}")
            if to not in allowed or self.graph.agents[to].host != host:  # type: ignore[index]
                raise TransportError(f"the caller asked to send a cache to {to!r} on host {host!r}, which "
                                     "the graph does not feed from here")
            out.append((to, host, ref))
        return out  # type: ignore[return-value]

    async def _deliver(self, c: _Call, cache: KVCache, ctx: CallContext, asked: Any,
                       allowed: tuple[str, ...]) -> dict[str, int]:
        """Send `cache` straight to the receivers the caller named in `deliver` (those in `allowed`),
        encoded once; one on this host keeps it here. Returns the bytes sent per receiver."""
        targets = self._targets(asked, allowed)
        sizes: dict[str, int] = {}
        blob: bytes | None = None
        for to, host, ref in targets:
            if host == self.host:
                fut = self._delivery(ref)
                if not fut.done():
                    fut.set_result(_Delivery(run=c.run, sender=c.agent, receiver=to, cache=cache))
                sizes[to] = 0
                continue
            if blob is None:
                blob = await ctx.in_thread(encode_cache, cache, dtype=self.wire_dtype)
            inbox = inbox_channel(host)
            payload = pack({"op": "cache", "run": c.run, "ref": ref, "from": c.agent, "to": to, "wire": self._wire(cache)},
                           {"cache": blob}, guard=self.guard, channel=inbox)
            await self.link.send(inbox, payload)
            c.bytes_out += len(payload)
            sizes[to] = len(payload)
        return sizes

    async def _take(self, c: _Call, ref: Any, sender: str, ctx: CallContext, expected: Any = None) -> KVCache:
        """The cache delivered under `ref` for this call's agent from `sender`, once it arrives."""
        if not isinstance(ref, str) or not ref:
            raise TransportError("request field 'past_ref'/'ref' must be a non-empty string")
        fut = self._delivery(ref)
        loop = asyncio.get_running_loop()
        until = min(c.deadline, loop.time() + self.delivery_timeout)
        while not fut.done():
            if c.cancel.is_set():
                raise TransportError(f"{c.agent}: the caller cancelled while {sender}'s cache was awaited")
            if loop.time() > until:
                host = self.graph.agents[sender].host if sender in self.graph.agents else None
                raise TransportError(f"{c.agent}: the cache of {sender!r} from host {host!r} did not arrive within "
                                     f"{self.delivery_timeout:g} s")
            await asyncio.wait({fut}, timeout=0.5)
        self._deliveries.pop(ref, None)
        d = fut.result()
        if d.run != c.run or d.sender != sender or d.receiver != c.agent:
            raise TransportError(f"{c.agent}: the cache under that reference is {d.sender}'s for {d.receiver}, "
                                 f"not {sender}'s")
        if d.cache is not None:
            return d.cache
        assert d.env is not None
        c.bytes_in += d.env.size
        return await ctx.in_thread(decode_cache, d.env.blobs["cache"], expected=expected)

    async def _pong(self, env: Envelope) -> None:
        try:
            reply = validate_channel(_str(env.body, "reply"))
            body: dict[str, Any] = {"call": _str(env.body, "call"), "kind": "here", "agents": list(self.agents)}
            if env.get("graph") != self.digest:
                body.update(kind="error", error=error_body(self._version_error()))
            await self.link.send(reply, pack(body, guard=self.guard, channel=reply))
        except TransportError as e:
            self._drop(self.guard.refuse("malformed", e.message))

    def _version_error(self) -> ConfigError:
        return ConfigError(f"the worker for host {self.host!r} runs another version of graph {self.graph.name!r} "
                           "(its agents, hosts or edges differ)", hint="use the same pipeline file on every host")

    def _messages(self, value: Any, key: str) -> Messages:
        """Messages from the wire, with each reference to a served agent's private context replaced
        by that context as this host read it (callers never hold it)."""
        return tuple({"role": m["role"], "content": self._contexts.get(m["content"], m["content"])}
                     for m in _messages(value, key))

    def _endpoint(self, run: str, agent: str) -> LocalEndpoint:
        eps = self._runs.get(run)
        if eps is None:
            eps = self._runs[run] = {}
            while len(self._runs) > self.max_runs:
                self._runs.popitem(last=False)
        self._runs.move_to_end(run)
        if agent not in eps:
            a = self.plan[agent]
            eps[agent] = LocalEndpoint(agent, a.model_ref, pool=self.pool, dtype=a.dtype, device=a.device,
                                       adapter=a.adapter)
        return eps[agent]

    async def _send(self, c: _Call, body: dict[str, Any], blobs: Mapping[str, bytes] | None = None) -> None:
        payload = pack({"call": c.call, **body}, blobs, guard=self.guard, channel=c.reply)
        await self.link.send(c.reply, payload)
        c.bytes_out += len(payload)

    async def _serve_call(self, op: str, env: Envelope, caller: str) -> None:
        # One clock for the call: its spans, `encode_s` and `elapsed` are all seconds since it arrived.
        trace = Trace(f"{self.graph.name}@{self.host}")
        body = env.body
        try:
            c = _Call(call=_str(body, "call"), run=_str(body, "run"), agent=_str(body, "agent"),
                      reply=validate_channel(_str(body, "reply")), caller=caller, bytes_in=env.size)
        except (TransportError, AgentMeshError) as e:
            self._drop(self.guard.refuse("malformed", e.message))
            return
        owner = self._owners.setdefault(c.run, caller)
        self._owners.move_to_end(c.run)
        while len(self._owners) > _RECENT_CALLS:
            self._owners.popitem(last=False)
        if owner != caller:
            self._drop(self.guard.refuse("unauthorised", f"{caller!r} called into run {c.run} of {owner!r}"))
            return
        budget = body.get("deadline_s")
        if isinstance(budget, (int, float)) and budget > 0:
            c.deadline = asyncio.get_running_loop().time() + float(budget)
        self._calls[c.call] = c
        beat: asyncio.Task[None] | None = None
        detail, error = "", None
        try:
            await self._send(c, {"kind": "ack", "host": self.host})
            every = float(body.get("heartbeat_s") or 5.0)
            c.resend_s = min(max(2 * every, 0.5), 30.0)
            beat = asyncio.ensure_future(self._heartbeat(c, every))
            if c.agent not in self.agents:
                raise ConfigError(f"host {self.host!r} does not serve agent {c.agent!r} (it serves "
                                  f"{', '.join(self.agents)})", hint="the caller and this worker read different files")
            if body.get("graph") != self.digest:
                raise self._version_error()
            ctx = CallContext(agent=c.agent, trace=trace, cancel=c.cancel, executor=self._executor)
            handler = {"load": self._load, "reading": self._reading, "share": self._share, "text": self._text}[op]
            result, blobs, detail = await handler(c, env, ctx)
            result.update(kind="result", elapsed=trace.now(), spans=[s.to_dict() for s in trace.spans])
            await self._answer(c, result, blobs)
        except asyncio.CancelledError:
            error = "cancelled"
            raise
        except Exception as e:  # noqa: BLE001 - every failure goes back to the caller
            info = error_body(e)
            error = info["message"]
            await self._answer(c, {"kind": "error", "error": info})
        finally:
            if beat is not None:
                beat.cancel()
            self._calls.pop(c.call, None)
            self.served += 1
            if self.on_served is not None:
                self.on_served(ServedCall(op=op, agent=c.agent, run=c.run, caller=caller,
                                          seconds=trace.now(), bytes_in=c.bytes_in,
                                          bytes_out=c.bytes_out, ok=error is None, detail=detail, error=error))

    async def _answer(self, c: _Call, body: dict[str, Any], blobs: Mapping[str, bytes] | None = None) -> None:
        """Send a call's last message (its result or error), again every few heartbeats until the
        caller says it has it, at most until the caller has surely given up. The link repairs a
        transfer that a broker restart broke, but only while it keeps the message (resend_keep_s);
        this covers outages longer than that and a caller whose link started over."""
        loop = asyncio.get_running_loop()
        until = min(c.deadline, loop.time() + _KEEP_REPLY_S)
        while True:
            try:
                await self._send(c, body, blobs)  # sealed anew each time: a fresh nonce, not a replay
            except TransportError as e:
                log.warning("worker %s could not answer %s yet: %s", self.host, c.reply, e.message)
            try:
                await asyncio.wait_for(c.got.wait(), c.resend_s)
                return
            except asyncio.TimeoutError:
                if loop.time() >= until or self._stopping:
                    return
                self.resent += 1

    async def _heartbeat(self, c: _Call, every: float) -> None:
        """Tell the caller the call is still being worked on (so a dead worker is noticed quickly)."""
        every = min(max(every, 0.05), 30.0)
        while True:
            await asyncio.sleep(every)
            try:
                await self._send(c, {"kind": "alive"})
            except TransportError:
                pass  # the broker is away; the link reconnects and the next beat goes out

    async def _past(self, c: _Call, env: Envelope, ep: LocalEndpoint, ctx: CallContext) -> KVCache | None:
        blob, ref = env.blobs.get("past"), env.get("past_ref")
        if blob is None and ref is None:
            return None
        await ep.load(ctx)
        sig = ep.model.signature
        if ref is not None:  # sent straight here by the host of this agent's prefix sender
            prefix = self.plan[c.agent].prefix
            if prefix is None:
                raise TransportError(f"{c.agent} continues from no other agent's cache")
            return await self._take(c, ref, prefix, ctx, expected=sig)
        return await ctx.in_thread(decode_cache, blob, expected=sig)

    async def _encode(self, cache: KVCache, ctx: CallContext) -> tuple[dict[str, Any], dict[str, bytes]]:
        """The result fields and blob of a cache reply; `encode_s` (call time when encoding began)
        lets the caller's transfer span cover encoding, the wire and decoding."""
        began = ctx.trace.now()
        blob = await ctx.in_thread(encode_cache, cache, dtype=self.wire_dtype)
        return {"wire": self._wire(cache), "encode_s": began}, {"cache": blob}

    def _wire(self, cache: KVCache) -> str:
        return self.wire_dtype or str(cache.dtype).removeprefix("torch.")

    def _detail(self, cache: KVCache) -> str:
        return f"cache {cache.seq_len} tokens, wire {self._wire(cache)}"

    def _sent(self, sizes: Mapping[str, int]) -> str:
        return "".join(f", to {r} directly ({human_bytes(n)})" for r, n in sizes.items())

    async def _load(self, c: _Call, env: Envelope, ctx: CallContext) -> tuple[dict[str, Any], dict[str, bytes], str]:
        ep = self._endpoint(c.run, c.agent)
        await ep.load(ctx)
        return {"model": str(getattr(ep.model, "name", ""))}, {}, ""

    async def _reading(self, c: _Call, env: Envelope, ctx: CallContext) -> tuple[dict[str, Any], dict[str, bytes], str]:
        b = env.body
        ep = self._endpoint(c.run, c.agent)
        receivers = b.get("receivers") or []
        if not (isinstance(receivers, list) and all(isinstance(r, str) for r in receivers)):
            raise TransportError("request field 'receivers' must be a list of agent names")
        req = ReadRequest(messages=self._messages(b.get("messages"), "messages"), past=await self._past(c, env, ep, ctx),
                          past_messages=self._messages(b.get("past_messages", []), "past_messages"),
                          receivers=tuple(receivers))
        cache = await ep.reading(req, ctx)
        if cache is None:
            return {"none": True}, {}, "nothing to read"
        began = ctx.trace.now()
        sent = await self._deliver(c, cache, ctx, b.get("deliver"),
                                   tuple(n for n, a in self.plan.agents.items() if a.prefix == c.agent))
        if b.get("want") == "shape":  # no receiver at the caller: it stays here (or went straight to them)
            return ({"tokens": cache.seq_len, "delivered": sent, "wire": self._wire(cache), "encode_s": began}, {},
                    f"reading {cache.seq_len} tokens kept on this host{self._sent(sent)}")
        fields, blobs = await self._encode(cache, ctx)
        return {**fields, "delivered": sent}, blobs, self._detail(cache) + self._sent(sent)

    async def _share(self, c: _Call, env: Envelope, ctx: CallContext) -> tuple[dict[str, Any], dict[str, bytes], str]:
        b = env.body
        ep = self._endpoint(c.run, c.agent)
        keep = b.get("keep_last")
        if not isinstance(keep, int):
            raise TransportError("request field 'keep_last' must be an integer")
        reading = ReadRequest(messages=self._messages(b.get("messages"), "messages"), past=await self._past(c, env, ep, ctx),
                              past_messages=self._messages(b.get("past_messages", []), "past_messages"))
        req = ShareRequest(receiver=_str(b, "receiver"), reading=reading, span_ids=_ids(b.get("span_ids"), "span_ids"),
                           span_mask=_ids(b.get("span_mask"), "span_mask"), keep_last=keep)
        cache = await ep.share(req, ctx)
        began = ctx.trace.now()
        sent = await self._deliver(c, cache, ctx, b.get("deliver"),
                                   (req.receiver,) if self._feeds(c.agent, req.receiver) else ())
        if sent:
            return ({"tokens": cache.seq_len, "delivered": sent, "wire": self._wire(cache), "encode_s": began}, {},
                    self._detail(cache) + self._sent(sent))
        fields, blobs = await self._encode(cache, ctx)
        return fields, blobs, self._detail(cache)

    async def _text(self, c: _Call, env: Envelope, ctx: CallContext) -> tuple[dict[str, Any], dict[str, bytes], str]:
        b = env.body
        ep = self._endpoint(c.run, c.agent)
        a = self.plan[c.agent]
        asked = b.get("sharers") or []
        if sorted(asked) != sorted(f.sharer for f in a.fuse):
            raise ConfigError(f"the caller fuses {asked} into {c.agent}, this host's file fuses "
                              f"{[f.sharer for f in a.fuse]}", hint="use the same pipeline file on every host")
        req = TextRequest(messages=self._messages(b.get("messages"), "messages"), generation=a.generation,
                          past=await self._past(c, env, ep, ctx),
                          past_messages=self._messages(b.get("past_messages", []), "past_messages"),
                          fuse=a.fuse, fusion=a.fusion)
        share = [self._share_fn(c, f.sharer, ctx) for f in a.fuse]
        stream = bool(b.get("stream"))
        pump: asyncio.Task[None] | None = None
        if stream:
            loop = asyncio.get_running_loop()
            pieces: asyncio.Queue[tuple[str, int] | None] = asyncio.Queue()
            ctx.on_token = lambda piece, tok: loop.call_soon_threadsafe(pieces.put_nowait, (piece, tok))
            pump = asyncio.ensure_future(self._stream(c, pieces))
        try:
            out = await ep.text(req, ctx, share)
        except BaseException:
            if pump is not None:
                pump.cancel()
            raise
        if pump is not None:
            pieces.put_nowait(None)
            try:
                await asyncio.wait_for(pump, 30.0)  # the tokens go out before the result
            except (asyncio.TimeoutError, TransportError):
                pass  # the result carries every token anyway
        result = {"text": out.text, "token_ids": list(out.token_ids), "prompt_tokens": out.prompt_tokens,
                  "prefilled_tokens": out.prefilled_tokens, "first_token_s": out.first_token_s,
                  "finished": out.finished}
        return result, {}, f"{len(out.token_ids)} tokens generated"

    async def _stream(self, c: _Call, pieces: asyncio.Queue[tuple[str, int] | None]) -> None:
        """Send generated tokens in order, batching whatever piled up while the last batch went out."""
        done = False
        while not done:
            batch = []
            item = await pieces.get()
            while True:
                if item is None:
                    done = True
                    break
                batch.append([item[0], item[1]])
                if pieces.empty() or len(batch) >= _MAX_TOKENS_PER_MESSAGE:
                    break
                item = pieces.get_nowait()
            if batch:
                try:
                    await self._send(c, {"kind": "tokens", "pieces": batch})
                except TransportError as e:
                    log.warning("worker %s stopped streaming to %s: %s", self.host, c.reply, e.message)
                    return

    def _share_fn(self, c: _Call, sharer: str, ctx: CallContext) -> ShareFn:
        """Ask the caller for `sharer`'s span cache (the caller runs or reaches that sharer)."""

        async def share(span_ids: torch.Tensor, span_mask: torch.Tensor, keep_last: int) -> KVCache:
            loop = asyncio.get_running_loop()
            cb = len(c.callbacks)
            fut: asyncio.Future[Envelope] = loop.create_future()
            c.callbacks[cb] = fut
            await self._send(c, {"kind": "share", "cb": cb, "sharer": sharer, "span_ids": span_ids.tolist(),
                                 "span_mask": span_mask.tolist(), "keep_last": keep_last})
            while not fut.done():  # the caller cancels the call when it gives up; the deadline, if it died
                if c.cancel.is_set():
                    raise TransportError(f"{c.agent}: the caller cancelled while {sharer}'s cache was awaited")
                if loop.time() > c.deadline:
                    raise TransportError(f"{c.agent}: the caller never sent {sharer}'s cache")
                await asyncio.wait({fut}, timeout=0.5)
            env = fut.result()
            if env.get("error") is not None:
                raise_remote(env.get("error"), sharer, "caller")
            if env.get("ref") is not None:  # the sharer's host sent it straight here
                return await self._take(c, env.get("ref"), sharer, ctx)
            blob = env.blobs.get("cache")
            if blob is None:
                raise TransportError(f"the caller's answer for {sharer}'s cache carries no cache")
            return await ctx.in_thread(decode_cache, blob)

        return share

    def __repr__(self) -> str:
        return f"Worker(host={self.host!r}, agents={list(self.agents)}, link={type(self.link).__name__})"
