"""`LinkedEndpoint`: an endpoint whose caches cross a transport link on their way to the receivers.

It wraps another endpoint (usually a `LocalEndpoint`): every cache that agent hands on (its reading
for prefix receivers, its span for fuse receivers) is encoded with the cache codec, sent over a
`Link`, received and decoded (checked against the model signature) before the receiver gets it.
The trace records one "transfer" span per edge with the wire bytes the link counted.

With an `InProcessLink` this measures what an edge costs on the wire (and what a lossy wire dtype
does to the answers) without a second machine; it is also the reference for remote endpoints,
which move caches the same way between workers.
"""
from __future__ import annotations

import uuid
from typing import Sequence

from agentmesh.cache.codec import decode_cache, encode_cache
from agentmesh.cache.kv import KVCache
from agentmesh.runtime.endpoint import (CallContext, Endpoint, ForwardingEndpoint, ReadRequest, ShareFn,
                                        ShareRequest, TextOutput, TextRequest)
from agentmesh.runtime.trace import edge_key
from agentmesh.transport.link import Link, edge_channel


class LinkedEndpoint(ForwardingEndpoint):
    """`inner`'s agent, with the caches it hands on sent over `link` in `wire_dtype`
    (None: the cache's own dtype, lossless; "bf16", "fp16", "int8", "fp8" as in the codec)."""

    def __init__(self, inner: Endpoint, link: Link, *, wire_dtype: str | None = None, run_id: str | None = None):
        super().__init__(inner)
        self.link = link
        self.wire_dtype = wire_dtype
        self.run_id = run_id or uuid.uuid4().hex[:12]

    async def _cross(self, cache: KVCache, receiver: str, ctx: CallContext) -> KVCache:
        """Send `cache` to `receiver` over the link and return what arrived (decoded and checked)."""
        key = edge_key(self.agent, receiver)
        channel = edge_channel(self.run_id, key)
        before = self.link.stats().get(channel)
        with ctx.trace.span(self.agent, "transfer", edge=key) as sp:
            payload = await ctx.in_thread(encode_cache, cache, dtype=self.wire_dtype)
            await self.link.subscribe(channel)
            await self.link.send(channel, payload, headers={"agent": self.agent, "receiver": receiver})
            data = await self.link.receive(channel)
            arrived = await ctx.in_thread(decode_cache, data, expected=cache.signature)
            after = self.link.stats().get(channel)
            wire = (after.wire_bytes_sent if after else 0) - (before.wire_bytes_sent if before else 0)
            sp.bytes = wire or len(payload)
            sp.tokens = cache.seq_len
            sp.detail = f"{type(self.link).__name__}, wire dtype {self.wire_dtype or 'as is'}"
        return arrived

    async def reading(self, req: ReadRequest, ctx: CallContext) -> KVCache | None:
        cache = await self.inner.reading(req, ctx)
        if cache is None or not req.receivers:
            return cache
        arrived = None
        for receiver in req.receivers:  # one copy per receiver, as separate hosts would need
            arrived = await self._cross(cache, receiver, ctx)
        return arrived

    async def share(self, req: ShareRequest, ctx: CallContext) -> KVCache:
        cache = await self.inner.share(req, ctx)
        return await self._cross(cache, req.receiver, ctx)

    async def text(self, req: TextRequest, ctx: CallContext, share: Sequence[ShareFn] = ()) -> TextOutput:
        return await self.inner.text(req, ctx, share)

    def __repr__(self) -> str:
        return f"LinkedEndpoint({self.inner!r}, link={type(self.link).__name__}, wire_dtype={self.wire_dtype!r})"
