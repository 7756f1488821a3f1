"""`RemoteClient`: the caller's side of a run across hosts. It sends calls to workers' inboxes
and routes their replies (acks, heartbeats, tokens, share requests, results) back to each call.

A call is acknowledged within `timeout`, else it fails naming the agent and the host nobody serves;
after that the worker's heartbeats must keep coming (a silent worker fails the call after
`timeout`), and the whole call is bounded by `call_timeout`. A cancelled call is cancelled on the
worker too.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

from agentmesh.errors import TransportError
from agentmesh.graph import Graph
from agentmesh.mesh.auth import Guard, Rejected
from agentmesh.mesh.envelope import (Envelope, inbox_channel, pack, raise_remote, reply_channel, seal_link_control,
                                     unpack)
from agentmesh.mesh.settings import graph_digest
from agentmesh.runtime.endpoint import CallContext
from agentmesh.transport.link import Link, LinkClosed, LinkTimeout

log = logging.getLogger(__name__)

DEFAULT_CALL_TIMEOUT = 3600.0
_POLL_S = 0.25  # how often reply pumps look up from the link to see whether the run is over


@dataclass(frozen=True)
class CallReply:
    """A call's result message and when things happened on the caller's trace clock."""

    env: Envelope
    request_bytes: int
    started_s: float
    sent_s: float
    acked_s: float
    received_s: float

    @property
    def worker_start_s(self) -> float:
        """When the worker took the call, on the caller's clock: half the ack's round trip after
        the request went out (the small ack travels about as fast as the request did)."""
        elapsed = self.env.get("elapsed")
        elapsed = float(elapsed) if isinstance(elapsed, (int, float)) and elapsed >= 0 else 0.0
        start = self.sent_s + max(self.acked_s - self.sent_s, 0.0) / 2
        return max(self.sent_s, min(start, self.received_s - elapsed))

    def worker_time(self, key: str) -> float:
        """A time the worker reported (seconds into the call), on the caller's clock."""
        value = self.env.get(key)
        value = float(value) if isinstance(value, (int, float)) and value >= 0 else 0.0
        return min(self.worker_start_s + value, self.received_s)


class RemoteClient:
    """The caller's side of one link for one run: sends calls to workers, routes their replies."""

    def __init__(self, link: Link, graph: Graph, guard: Guard, *, run_id: str | None = None,
                 timeout: float = 60.0, call_timeout: float = DEFAULT_CALL_TIMEOUT, url: str | None = None,
                 heartbeat_timeout: float = 15.0):
        self.link = link
        self.graph_name = graph.name
        self.digest = graph_digest(graph)
        self.guard = guard
        seal_link_control(link, guard)  # so nobody without the keys makes the link forget or resend what it sent
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.caller = guard.identity
        self.timeout = float(timeout)
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.call_timeout = float(call_timeout)
        self.url = url or getattr(getattr(link, "config", None), "url", None) or type(link).__name__
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._waiting: dict[str, tuple[str, asyncio.Queue[Envelope]]] = {}  # call -> (its host, its replies)
        self._lock: asyncio.Lock | None = None
        self._hosts: set[str] = set()
        self._closing = False
        self._finished: OrderedDict[str, str] = OrderedDict()  # call -> host, of calls already answered
        self._confirming: set[asyncio.Task[None]] = set()

    @property
    def heartbeat_s(self) -> float:
        """How often workers say a call is alive: four beats fit in the time that means it died."""
        return max(0.05, self.heartbeat_timeout / 4)

    async def _ensure_pump(self, channel: str) -> None:
        if channel in self._pumps:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if channel in self._pumps:
                return
            await self.link.subscribe(channel, timeout=self.timeout)  # before any request asks for it
            self._pumps[channel] = asyncio.create_task(self._pump(channel), name=f"agentmesh-replies-{channel}")

    async def _pump(self, channel: str) -> None:
        # Short waits and a flag rather than cancellation: a receive cancelled mid-wait can leave
        # the link's internal queue getter behind.
        while not self._closing:
            try:
                msg = await self.link.receive_message(channel, timeout=_POLL_S)
            except LinkClosed:
                return
            except LinkTimeout:
                continue
            except TransportError as e:  # a message that failed on its way: say so and go on
                log.warning("replies on %s: %s", channel, e.message)
                await asyncio.sleep(0.05)
                continue
            try:
                env = unpack(msg.payload, guard=self.guard, channel=channel)
            except Rejected:
                continue  # counted in guard.dropped
            except TransportError as e:
                log.warning("dropping a reply on %s: %s", channel, e.message)
                continue
            call = env.get("call")
            waiting = self._waiting.get(call)  # type: ignore[arg-type]
            if waiting is None:
                if call in self._finished and env.sender == self._finished[call]:
                    self._confirm(self._finished[call], call)  # our confirmation got lost: say it again
                continue
            host, queue = waiting
            if env.sender != host:
                self.guard.refuse("unauthorised", f"{env.sender!r} answered a call to host {host!r}")
                continue
            queue.put_nowait(env)

    async def send_control(self, host: str, body: Mapping[str, Any], blobs: Mapping[str, bytes] | None = None,
                           *, timeout: float | None = None) -> int:
        """Send a message that expects no reply (a sharer's cache, a cancel, a release); returns its size."""
        inbox = inbox_channel(host)
        payload = pack(body, blobs, guard=self.guard, channel=inbox)
        await self.link.send(inbox, payload, timeout=timeout or self.timeout)
        return len(payload)

    async def call(self, host: str, agent: str, op: str, body: Mapping[str, Any], ctx: CallContext, *,
                   blobs: Mapping[str, bytes] | None = None, to: str | None = None,
                   on_message: Callable[[Envelope], Awaitable[None]] | None = None,
                   abort: asyncio.Future[None] | None = None) -> CallReply:
        """Send `op` for `agent` to `host`'s worker and wait for its result (`TransportError` on
        silence, the worker's error re-raised). `on_message` sees tokens and share requests;
        `abort`, when it fails, ends the call with its exception (and cancels it on the worker)."""
        loop = asyncio.get_running_loop()
        call = uuid.uuid4().hex
        reply = reply_channel(self.run_id, agent, to or self.caller)
        what = f"agent {agent!r} on host {host!r}"
        queue: asyncio.Queue[Envelope] = asyncio.Queue()
        self._waiting[call] = (host, queue)
        self._hosts.add(host)
        deadline = loop.time() + self.call_timeout
        started = ctx.trace.now()
        cancel_remote = True
        try:
            try:
                await self._ensure_pump(reply)
                size = await self.send_control(host, {
                    "op": op, "call": call, "run": self.run_id, "agent": agent, "reply": reply,
                    "graph": self.digest, "heartbeat_s": self.heartbeat_s,
                    "deadline_s": self.call_timeout, **body}, blobs)
            except TransportError as e:
                cancel_remote = False
                raise TransportError(f"{what}: {e.message}") from None
            sent = ctx.trace.now()
            acked: float | None = None
            while True:
                env = await self._next(queue, acked=acked is not None, deadline=deadline, what=what, host=host,
                                       abort=abort)
                kind = env.get("kind")
                if acked is None:
                    acked = ctx.trace.now()
                if kind in ("ack", "alive"):
                    continue
                if kind in ("error", "result"):
                    cancel_remote = False
                    self._confirm(host, call)
                if kind == "error":
                    raise_remote(env.get("error"), agent, host)
                if kind == "result":
                    return CallReply(env, size, started, sent, acked, ctx.trace.now())
                if on_message is not None:
                    await on_message(env)
        finally:
            self._waiting.pop(call, None)
            if cancel_remote:
                await self._cancel(host, call)

    async def _next(self, queue: asyncio.Queue[Envelope], *, acked: bool, deadline: float, what: str, host: str,
                    abort: asyncio.Future[None] | None) -> Envelope:
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TransportError(f"{what}: no result within {self.call_timeout:g} s (call_timeout)")
        limit = self.heartbeat_timeout if acked else self.timeout
        wait = min(limit, remaining)
        getter = asyncio.ensure_future(queue.get())
        waits: set[asyncio.Future[Any]] = {getter} | ({abort} if abort is not None else set())
        try:
            done, _ = await asyncio.wait(waits, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            getter.cancel()
            raise
        if getter in done:
            return getter.result()
        getter.cancel()
        if abort is not None and abort in done:
            exc = abort.exception()
            raise exc if exc is not None else TransportError(f"{what}: aborted")
        if wait < limit:
            raise TransportError(f"{what}: no result within {self.call_timeout:g} s (call_timeout)")
        state = ""
        if getattr(self.link, "connected", True) is False:
            state = f"; not connected to the broker {self.url}"
        if not acked:
            raise TransportError(f"{what}: no worker answered within {wait:g} s{state}; start `agentmesh worker "
                                 f"FILE.yaml --host {host} --broker {self.url}` on that machine, with the same "
                                 "pipeline file")
        raise TransportError(f"{what}: the worker went silent for {wait:g} s (heartbeat_timeout_s){state}; it died "
                             "or lost the broker")

    async def wait_for_worker(self, host: str, limit: float, on_wait: Callable[[str], None] | None = None) -> None:
        """Return once `host`'s worker answers a ping (sent again every second: a worker that is
        not up yet has no subscription for the broker to keep it in). `on_wait(host)` is called
        once if it does not answer at once; `TransportError` after `limit` s."""
        loop = asyncio.get_running_loop()
        call = uuid.uuid4().hex
        channel = reply_channel(self.run_id, host, self.caller)
        queue: asyncio.Queue[Envelope] = asyncio.Queue()
        self._waiting[call] = (host, queue)
        deadline = loop.time() + limit
        told = False
        try:
            await self._ensure_pump(channel)
            while True:
                try:
                    await self.send_control(host, {"op": "ping", "call": call, "reply": channel, "graph": self.digest},
                                            timeout=max(0.1, min(self.timeout, deadline - loop.time())))
                    env = await asyncio.wait_for(queue.get(), max(0.05, min(1.0, deadline - loop.time())))
                except (asyncio.TimeoutError, LinkTimeout):
                    if loop.time() >= deadline:
                        state = "" if getattr(self.link, "connected", True) else f" (not connected to {self.url})"
                        raise TransportError(f"host {host!r}: no worker announced itself within {limit:g} s{state}; "
                                             f"start `agentmesh worker FILE.yaml --host {host} --broker {self.url}` "
                                             "on that machine, with the same pipeline file and key") from None
                    if not told and on_wait is not None:
                        on_wait(host)
                    told = True
                    continue
                if env.get("kind") == "error":
                    raise_remote(env.get("error"), host, host)
                return
        finally:
            self._waiting.pop(call, None)

    def _confirm(self, host: str, call: str) -> None:
        """Tell the worker its call's last message arrived, so it stops resending it."""
        self._finished[call] = host
        while len(self._finished) > 1024:
            self._finished.popitem(last=False)
        task = asyncio.ensure_future(self._quietly(self.send_control(host, {"op": "got", "call": call}, timeout=2.0)))
        self._confirming.add(task)
        task.add_done_callback(self._confirming.discard)

    @staticmethod
    async def _quietly(aw: Awaitable[Any]) -> None:
        try:
            await asyncio.wait_for(aw, 3.0)
        except (TransportError, asyncio.TimeoutError):
            pass  # the worker resends; the next copy is confirmed again

    async def _cancel(self, host: str, call: str) -> None:
        try:
            await asyncio.wait_for(self.send_control(host, {"op": "cancel", "call": call}, timeout=2.0), 3.0)
        except (TransportError, asyncio.TimeoutError, asyncio.CancelledError):
            pass

    async def close(self) -> None:
        """Tell the workers the run is over (they free its caches) and stop routing replies."""
        for host in sorted(self._hosts):
            try:
                await asyncio.wait_for(self.send_control(host, {"op": "release", "run": self.run_id}, timeout=2.0), 3.0)
            except (TransportError, asyncio.TimeoutError):
                pass
        if self._confirming:
            await asyncio.wait(set(self._confirming), timeout=3.5)
        self._closing = True
        pumps = list(self._pumps.values())
        if pumps:
            _, late = await asyncio.wait(pumps, timeout=2 * _POLL_S + 1.0)
            for task in late:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        self._pumps.clear()
