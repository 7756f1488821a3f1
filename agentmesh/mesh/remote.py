"""Runs that span hosts: agents on other machines are reached through their workers.

    result = await arun_remote(graph, "question", host="edge", broker="mqtt://10.0.0.2:1883")

The caller runs the scheduler. Agents on its own host (`host`), and agents without a host, run in
this process (`LocalEndpoint`); every other agent gets a `RemoteEndpoint` that sends its calls to
the worker of that agent's host (`agentmesh worker FILE.yaml --host NAME`, see
`agentmesh.mesh.worker`) and awaits the replies:

* a call is acknowledged within the broker's `timeout_s`, else it fails naming the agent and the
  host nobody serves; after that the worker's heartbeats must keep coming (a silent worker fails
  the call after `timeout_s`), and the whole call is bounded by `call_timeout` (default: the run's
  timeout, else one hour). A cancelled call is cancelled on the worker too.
* caches travel encoded (`encode_cache`, `wire_dtype`; None keeps them lossless): a remote prefix
  sender's reading comes back to the caller, a remote receiver gets the cache it continues from
  in its request, a remote sharer returns its span cache, and a remote receiver of fuse edges asks
  the caller for each sharer's cache while it prefills. Text edges carry text (in the prompts).
* every cache hop is a "transfer" span on the edge it serves, with the message bytes; the
  worker's own steps (prefill, decode, ...) come back with each result and join the caller's trace.

A cache crosses the network once: the caller only coordinates. A cache between two agents on
other hosts (a prefix sender's reading, a sharer's span) goes from the sharer's worker straight to
the receiver's worker (`deliver` in the request: the receiver, its host and a fresh reference; the
receiver's request then names the reference instead of carrying the cache), sealed by the sharer's
host and checked by the receiver's worker like any message; between two agents on one host it
never leaves that host. Only a receiver that runs in the caller's process gets the cache back.
"""
from __future__ import annotations

import asyncio
import logging
import math
import sys
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from agentmesh.cache.codec import decode_cache, encode_cache
from agentmesh.cache.kv import KVCache
from agentmesh.errors import ConfigError, TransportError
from agentmesh.graph import Graph, validate_graph
from agentmesh.mesh.auth import CLIENT, make_guard
from agentmesh.mesh.client import DEFAULT_CALL_TIMEOUT, CallReply, RemoteClient
from agentmesh.mesh.envelope import Envelope
from agentmesh.mesh.settings import allowed_callers, broker_config, broker_timeout, caller_view
from agentmesh.models.pool import ModelPool, default_pool
from agentmesh.runtime.endpoint import (CallContext, Endpoint, ForwardingEndpoint, ReadRequest, ShareFn,
                                        ShareRequest, TextOutput, TextRequest)
from agentmesh.runtime.local import LocalEndpoint
from agentmesh.runtime.plan import RunPlan, build_plan
from agentmesh.runtime.result import RunResult
from agentmesh.runtime.scheduler import arun_graph, run_sync
from agentmesh.runtime.trace import SPAN_KINDS, Span, edge_key
from agentmesh.transport.config import BrokerConfig
from agentmesh.transport.link import Link
from agentmesh.transport.mqtt import MqttLink

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoutedCache(KVCache):
    """A cache that some of its receivers got straight from the host that made it (`refs`: receiver
    -> the reference its worker holds it under). Without receivers in this process it holds no
    data (head_dim 0, so any model that tried to continue from it here would refuse it)."""

    refs: tuple[tuple[str, str], ...] = ()

    def ref_for(self, receiver: str) -> str | None:
        return dict(self.refs).get(receiver)


def _stand_in(tokens: int, refs: Mapping[str, str] | None = None) -> RoutedCache:
    """What the caller keeps of a cache that stays on its worker or went from there to its receivers:
    its length and where it went."""
    empty = torch.empty(1, 1, tokens, 0)
    return RoutedCache(keys=(empty,), values=(empty,), refs=tuple(sorted((refs or {}).items())))


def _routed(cache: KVCache, refs: Mapping[str, str]) -> KVCache:
    """`cache` (for receivers here), also naming the references of those that got it directly."""
    if not refs:
        return cache
    return RoutedCache(keys=cache.keys, values=cache.values, signature=cache.signature, token_ids=cache.token_ids,
                       positions=cache.positions, attention_mask=cache.attention_mask, layer_ids=cache.layer_ids,
                       refs=tuple(sorted(refs.items())))


def _int(env: Envelope, key: str, default: int | None = None) -> int:
    value = env.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TransportError(f"the worker's reply field {key!r} is {str(value)[:40]!r}, not an integer")
    return value


class RemoteEndpoint:
    """An agent served by the worker of `host`, reached through `client`.

    `prefix`: the agent whose reading it continues from (its transfer is recorded on that edge).
    `wire_dtype`: how the caches this side sends are encoded (None: lossless).
    `hosts`: where each agent of the run runs (None: in this process), so that caches go straight
    to the hosts of their receivers.
    """

    records_transfers = True
    model = None

    def __init__(self, agent: str, host: str, client: RemoteClient, *, prefix: str | None = None,
                 wire_dtype: str | None = None, hosts: Mapping[str, str | None] | None = None):
        self.agent = agent
        self.host = host
        self.client = client
        self.prefix = prefix
        self.wire_dtype = wire_dtype
        self.hosts = dict(hosts or {})

    def _deliveries(self, receivers: Sequence[str]) -> dict[str, dict[str, str]]:
        """For each receiver on a worker's host: where its worker gets the cache directly."""
        return {r: {"to": r, "host": h, "ref": uuid.uuid4().hex} for r in receivers
                if (h := self.hosts.get(r)) is not None}

    def _record_deliveries(self, reply: CallReply, deliveries: Mapping[str, Mapping[str, str]],
                           tokens: int, ctx: CallContext) -> None:
        sizes = reply.env.get("delivered")
        sizes = sizes if isinstance(sizes, dict) else {}
        start = reply.worker_time("encode_s") if "encode_s" in reply.env.body else reply.worker_time("elapsed")
        for r, d in deliveries.items():
            n = sizes.get(r)
            nbytes = n if isinstance(n, int) and n >= 0 else 0
            where = f"kept on host {self.host}" if d["host"] == self.host else f"host {self.host} -> host {d['host']}"
            self._transfer(ctx, self.agent, r, start, reply.received_s, nbytes=nbytes, tokens=tokens,
                           detail=f"{where} directly, wire {reply.env.get('wire') or 'as sent'}")

    def check_fuser(self, ref: str) -> None:
        pass  # the fuser is on the worker's disk; the worker reports a missing one

    def forget(self) -> None:
        pass  # the worker keeps this agent's caches, for as long as the run lasts

    def _import_spans(self, reply: CallReply, ctx: CallContext) -> None:
        """The worker's steps, moved onto the caller's clock."""
        shift = reply.worker_start_s
        spans = reply.env.get("spans")
        for s in spans if isinstance(spans, list) else []:
            if not isinstance(s, dict) or s.get("kind") not in SPAN_KINDS:
                continue
            try:
                start, end = float(s["start_s"]), float(s["end_s"])
                tokens, nbytes = int(s.get("tokens", 0)), int(s.get("bytes", 0))
            except (KeyError, TypeError, ValueError):
                continue
            edge, detail = s.get("edge"), s.get("detail")
            ctx.trace.add(Span(agent=self.agent, kind=s["kind"], start_s=shift + start, end_s=shift + end,
                               tokens=tokens, bytes=nbytes, thread=f"{self.host}/{str(s.get('thread', ''))[:60]}",
                               edge=edge if isinstance(edge, str) else None,
                               detail=detail[:200] if isinstance(detail, str) else None))

    def _transfer(self, ctx: CallContext, sender: str, receiver: str, start: float, end: float, *, nbytes: int,
                  tokens: int, detail: str) -> None:
        ctx.trace.record(sender, "transfer", start, end, tokens=tokens, bytes=nbytes, edge=edge_key(sender, receiver),
                         detail=detail)

    def _wire(self, cache: KVCache) -> str:
        return self.wire_dtype or str(cache.dtype).removeprefix("torch.")

    async def _past(self, past: KVCache | None, ctx: CallContext) -> tuple[dict[str, Any], dict[str, bytes]]:
        """How the cache this agent continues from reaches its worker: the reference under which the
        worker already holds it (sent there directly), else in the request."""
        if past is None:
            return {}, {}
        ref = past.ref_for(self.agent) if isinstance(past, RoutedCache) else None
        if ref is not None:
            return {"past_ref": ref}, {}
        return {}, {"past": await ctx.in_thread(encode_cache, past, dtype=self.wire_dtype)}

    def _record_past(self, past: KVCache | None, reply: CallReply, ctx: CallContext) -> None:
        if isinstance(past, RoutedCache) and past.ref_for(self.agent) is not None:
            return  # recorded by the endpoint that had it sent here
        if past is not None and self.prefix is not None:
            self._transfer(ctx, self.prefix, self.agent, reply.started_s, reply.sent_s, nbytes=reply.request_bytes,
                           tokens=past.seq_len, detail=f"caller -> host {self.host}, wire {self._wire(past)}")

    async def _cache(self, reply: CallReply, receiver: str, ctx: CallContext) -> KVCache:
        blob = reply.env.blobs.get("cache")
        if blob is None:
            raise TransportError(f"agent {self.agent!r} on host {self.host!r} answered without a cache")
        cache = await ctx.in_thread(decode_cache, blob)
        # From the worker's encoding, over the wire, to the decoded cache here.
        start = reply.worker_time("encode_s") if "encode_s" in reply.env.body else reply.worker_time("elapsed")
        self._transfer(ctx, self.agent, receiver, start, ctx.trace.now(), nbytes=reply.env.size,
                       tokens=cache.seq_len,
                       detail=f"host {self.host} -> caller, wire {reply.env.get('wire') or 'as sent'}")
        return cache

    async def load(self, ctx: CallContext) -> None:
        reply = await self.client.call(self.host, self.agent, "load", {}, ctx)
        self._import_spans(reply, ctx)

    async def reading(self, req: ReadRequest, ctx: CallContext) -> KVCache | None:
        extra, blobs = await self._past(req.past, ctx)
        deliveries = self._deliveries(req.receivers)
        here = [r for r in req.receivers if r not in deliveries]
        reply = await self.client.call(
            self.host, self.agent, "reading",
            {"messages": list(req.messages), "past_messages": list(req.past_messages),
             "receivers": list(req.receivers), "want": "cache" if here else "shape",
             "deliver": list(deliveries.values()), **extra},
            ctx, blobs=blobs, to=req.receivers[0] if req.receivers else None)
        self._import_spans(reply, ctx)
        self._record_past(req.past, reply, ctx)
        if reply.env.get("none"):
            return None
        refs = {r: d["ref"] for r, d in deliveries.items()}
        if "cache" not in reply.env.blobs:
            tokens = _int(reply.env, "tokens")
            self._record_deliveries(reply, deliveries, tokens, ctx)
            return _stand_in(tokens, refs)
        cache = await self._cache(reply, here[0], ctx)
        self._record_deliveries(reply, deliveries, cache.seq_len, ctx)
        return _routed(cache, refs)

    async def share(self, req: ShareRequest, ctx: CallContext) -> KVCache:
        past = req.reading.past
        extra, blobs = await self._past(past, ctx)
        deliveries = self._deliveries([req.receiver])
        reply = await self.client.call(
            self.host, self.agent, "share",
            {"receiver": req.receiver, "messages": list(req.reading.messages),
             "past_messages": list(req.reading.past_messages), "span_ids": req.span_ids.tolist(),
             "span_mask": req.span_mask.tolist(), "keep_last": req.keep_last,
             "deliver": list(deliveries.values()), **extra},
            ctx, blobs=blobs, to=req.receiver)
        self._import_spans(reply, ctx)
        self._record_past(past, reply, ctx)
        if deliveries:
            tokens = _int(reply.env, "tokens")
            self._record_deliveries(reply, deliveries, tokens, ctx)
            return _stand_in(tokens, {r: d["ref"] for r, d in deliveries.items()})
        return await self._cache(reply, req.receiver, ctx)

    async def text(self, req: TextRequest, ctx: CallContext, share: Sequence[ShareFn] = ()) -> TextOutput:
        loop = asyncio.get_running_loop()
        by_sharer = {f.sharer: fn for f, fn in zip(req.fuse, share)}
        abort: asyncio.Future[None] = loop.create_future()
        helpers: set[asyncio.Task[None]] = set()
        first: list[float] = []

        async def on_message(env: Envelope) -> None:
            kind = env.get("kind")
            if kind == "tokens":
                pieces = env.get("pieces")
                if not first:
                    first.append(ctx.trace.now())
                for p in pieces if isinstance(pieces, list) else []:
                    if (ctx.on_token is not None and isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                            and isinstance(p[1], int)):
                        ctx.on_token(p[0], p[1])
            elif kind == "share":
                task = asyncio.ensure_future(self._answer_share(env, by_sharer, ctx, abort))
                helpers.add(task)
                task.add_done_callback(helpers.discard)

        extra, blobs = await self._past(req.past, ctx)
        try:
            reply = await self.client.call(
                self.host, self.agent, "text",
                {"messages": list(req.messages), "past_messages": list(req.past_messages),
                 "sharers": [f.sharer for f in req.fuse], "stream": ctx.on_token is not None, **extra},
                ctx, blobs=blobs, on_message=on_message, abort=abort)
        finally:
            for t in helpers:
                t.cancel()
            if abort.done() and not abort.cancelled():
                abort.exception()  # retrieved: the call raised it already
        self._import_spans(reply, ctx)
        self._record_past(req.past, reply, ctx)
        env = reply.env
        ids = env.get("token_ids")
        if not (isinstance(ids, list) and all(isinstance(t, int) for t in ids)):
            raise TransportError(f"agent {self.agent!r} on host {self.host!r} answered without token ids")
        first_s = env.get("first_token_s")
        if first:
            first_token = first[0]
        elif isinstance(first_s, (int, float)):
            first_token = reply.worker_start_s + float(first_s)
        else:
            first_token = None
        return TextOutput(text=str(env.get("text", "")), token_ids=tuple(ids),
                          prompt_tokens=_int(env, "prompt_tokens", 0),
                          prefilled_tokens=_int(env, "prefilled_tokens", 0),
                          first_token_s=first_token, finished=bool(env.get("finished")))

    async def _answer_share(self, env: Envelope, by_sharer: Mapping[str, ShareFn], ctx: CallContext,
                            abort: asyncio.Future[None]) -> None:
        """The worker fusing into this agent asked for a sharer's span cache: compute or fetch it
        (the scheduler's share function) and send it to the worker."""
        sharer = env.get("sharer")
        try:
            fn = by_sharer.get(sharer) if isinstance(sharer, str) else None
            if fn is None:
                raise TransportError(f"host {self.host!r} asked for a cache from {sharer!r}, which does not fuse "
                                     f"into {self.agent!r}")
            rows = [env.get("span_ids"), env.get("span_mask")]
            if not all(isinstance(r, list) and len(r) == 1 and isinstance(r[0], list) and r[0]
                       and all(isinstance(t, int) for t in r[0]) for r in rows):
                raise TransportError(f"host {self.host!r} sent a malformed span for {sharer!r}")
            span_ids, span_mask = (torch.tensor(r, dtype=torch.long) for r in rows)
            cache = await fn(span_ids, span_mask, _int(env, "keep_last"))
            ref = cache.ref_for(self.agent) if isinstance(cache, RoutedCache) else None
            if ref is not None:  # the sharer's host sent it there directly (and its endpoint recorded that)
                await self.client.send_control(self.host, {"op": "share_result", "call": env.get("call"),
                                                           "cb": env.get("cb"), "ref": ref})
                return
            start = ctx.trace.now()
            blob = await ctx.in_thread(encode_cache, cache, dtype=self.wire_dtype)
            size = await self.client.send_control(self.host, {"op": "share_result", "call": env.get("call"),
                                                              "cb": env.get("cb")}, {"cache": blob})
            self._transfer(ctx, sharer, self.agent, start, ctx.trace.now(), nbytes=size,  # type: ignore[arg-type]
                           tokens=cache.seq_len, detail=f"caller -> host {self.host}, wire {self._wire(cache)}")
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - ends the text call with this cause
            if not abort.done():
                abort.set_exception(e)

    def __repr__(self) -> str:
        return f"RemoteEndpoint({self.agent!r}, host={self.host!r}, run={self.client.run_id})"


class FeedingEndpoint(ForwardingEndpoint):
    """A local agent with receivers on other hosts. The scheduler leaves the transfer accounting
    of endpoints that are not local to them; the remote receivers record the caches they ship,
    and this records the in-process hand-offs to local receivers, as the scheduler would."""

    def __init__(self, inner: LocalEndpoint, remote: frozenset[str]):
        super().__init__(inner)
        self.remote = remote

    def _in_process(self, cache: KVCache, receiver: str, ctx: CallContext) -> None:
        if receiver not in self.remote:
            now = ctx.trace.now()
            ctx.trace.record(self.agent, "transfer", now, now, tokens=cache.seq_len, bytes=cache.nbytes,
                             edge=edge_key(self.agent, receiver), detail="in-process")

    async def reading(self, req: ReadRequest, ctx: CallContext) -> KVCache | None:
        cache = await self.inner.reading(req, ctx)
        if cache is not None:
            for r in req.receivers:
                self._in_process(cache, r, ctx)
        return cache

    async def share(self, req: ShareRequest, ctx: CallContext) -> KVCache:
        cache = await self.inner.share(req, ctx)
        self._in_process(cache, req.receiver, ctx)
        return cache

    async def text(self, req: TextRequest, ctx: CallContext, share: Sequence[ShareFn] = ()) -> TextOutput:
        return await self.inner.text(req, ctx, share)


def remote_endpoints(plan: RunPlan, clients: Mapping[str, RemoteClient], *, host: str | None = None, pool: ModelPool,
                     wire_dtype: str | None = None) -> dict[str, Endpoint]:
    """Endpoints for a caller acting as `host` (None: a pure client): its own and host-less agents
    run here, the others through `clients[agent's host]`."""
    remote = frozenset(n for n, a in plan.agents.items() if a.host is not None and a.host != host)
    where = {n: (a.host if n in remote else None) for n, a in plan.agents.items()}
    out: dict[str, Endpoint] = {}
    for name, a in plan.agents.items():
        if name in remote:
            client = clients.get(str(a.host))
            if client is None:
                raise ConfigError(f"no link to host {a.host!r}, where agent {name!r} runs")
            out[name] = RemoteEndpoint(name, str(a.host), client, prefix=a.prefix, wire_dtype=wire_dtype, hosts=where)
            continue
        ep = LocalEndpoint(name, a.model_ref, pool=pool, dtype=a.dtype, device=a.device, adapter=a.adapter)
        feeds = {r for r, p in plan.agents.items() if p.prefix == name} | set(a.shares_with)
        out[name] = FeedingEndpoint(ep, remote) if feeds & remote else ep
    return out


async def arun_remote(graph: Graph, inputs: str | Mapping[str, str] | None = None, *, host: str | None = None,
                      broker: str | None = None, link: Link | None = None, username: str | None = None,
                      password_env: str | None = None, pool: ModelPool | None = None, wire_dtype: str | None = None,
                      timeout: float | None = None, call_timeout: float | None = None, validate: bool = True,
                      key: bytes | None = None, insecure: bool = False,
                      on_wait: Callable[[str], None] | None = None, **opts: Any) -> RunResult:
    """Run `graph` from this process acting as `host` (None: a pure client); agents on other hosts
    run on their workers, reached over `link` (an open link, e.g. for tests) or over MQTT
    (`broker`, else each host's or the file's broker). Messages are sealed with `key`, else the
    file's `auth:` key; without either the run refuses to start unless `insecure`. First it waits
    for every other host's worker to answer (`on_wait(host)`, default a line on stderr, says so).
    `opts` go to `arun_graph` (on_event, trace)."""
    if host is not None and host not in graph.hosts:
        known = ", ".join(sorted(graph.hosts)) or "none"
        raise ConfigError(f"graph {graph.name!r} declares no host {host!r} (hosts: {known})",
                          hint="pass one of the hosts under hosts: to --host, or leave it out to run as a client")
    graph = caller_view(graph, host)  # other hosts' private contexts stay on their hosts
    if validate:
        validate_graph(graph)
    plan = build_plan(graph, validate=False)
    if pool is None:
        pool = default_pool()
    hosts = sorted({a.host for a in plan.agents.values() if a.host is not None and a.host != host})
    guard = make_guard(graph, host or CLIENT, key=key, insecure=insecure)
    if not guard.secure:
        log.warning("--insecure: messages between hosts are not authenticated; any client of the broker can "
                    "drive this pipeline's workers")
    for h in hosts:
        callers = allowed_callers(graph, h)
        if guard.identity not in callers:
            raise ConfigError(f"host {h!r} serves runs only from {', '.join(sorted(callers)) or 'no host'}, not "
                              f"from {guard.identity!r}",
                              hint=f"pass --host with one of those, or list {guard.identity} under "
                                   f"hosts: {h}: callers: in the file")
    run_id = uuid.uuid4().hex[:12]
    limit = call_timeout or timeout or DEFAULT_CALL_TIMEOUT
    wait = broker_timeout(graph)
    async with AsyncExitStack() as stack:
        clients: dict[str, RemoteClient] = {}
        shared: dict[str, RemoteClient] = {}  # one link and one client per distinct broker setting
        for h in hosts:
            cfg = None if link is not None else broker_config(graph, url=broker, host=h, username=username,
                                                             password_env=password_env)
            where = "" if cfg is None else cfg.model_dump_json()
            if where not in shared:
                use = link if cfg is None else await stack.enter_async_context(MqttLink(cfg, graph=graph.name))
                settings = cfg or graph.broker or BrokerConfig()
                shared[where] = RemoteClient(use, graph, guard, run_id=run_id, timeout=wait, call_timeout=limit,
                                             url=None if cfg is None else cfg.url,
                                             heartbeat_timeout=settings.heartbeat_timeout_s)
                stack.push_async_callback(shared[where].close)
            clients[h] = shared[where]
        up_to = min(timeout or math.inf, (graph.broker or BrokerConfig()).start_wait_s)
        say = on_wait or (lambda h: sys.stderr.write(f"waiting for host {h} (its worker; up to {up_to:g} s)...\n"))
        await asyncio.gather(*(clients[h].wait_for_worker(h, up_to, say) for h in hosts))
        endpoints = remote_endpoints(plan, clients, host=host, pool=pool, wire_dtype=wire_dtype)
        return await arun_graph(graph, inputs, endpoints=endpoints, timeout=timeout, validate=False, **opts)


def run_remote(graph: Graph, inputs: str | Mapping[str, str] | None = None, **opts: Any) -> RunResult:
    """`arun_remote` for synchronous code (the CLI's `agentmesh run --broker ...`)."""
    return run_sync(lambda: arun_remote(graph, inputs, **opts))
