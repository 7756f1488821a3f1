"""`Outbox`: the messages a link sent, kept until their receiver acknowledges them.

The broker's acknowledgement of a chunk only says the broker has it; a broker restart can still
lose it before it reaches the receiver. So a sender keeps each message (a reference to the
payload, not a copy, when it is `bytes`) until the receiving link acknowledges it whole, until
it is older than `keep_s`, or until newer messages need the room (at most `max_bytes` are kept;
the oldest go first). Meanwhile the receiver asks for chunks it misses and the sender resends
them from here.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

from agentmesh.transport.frames import Framer


@dataclass(eq=False)
class Kept:
    framer: Framer
    channel: str
    topic: str
    expires: float
    quiet_since: float  # the last time this message was published or its receiver was heard about it
    sending: set[int]  # chunks the first send has not had acknowledged by the broker yet (it owns the set)
    resend: set[int] = field(default_factory=set)  # chunks asked for again, not yet resent
    resender: asyncio.Task[None] | None = None
    probes: int = 0
    served_at: float = float("-inf")  # when a request for missing chunks was last taken up

    @property
    def size(self) -> int:
        return len(self.framer.data)


class Outbox:
    def __init__(self, *, max_bytes: int, keep_s: float) -> None:
        self.max_bytes = max_bytes
        self.keep_s = keep_s
        self._kept: OrderedDict[bytes, Kept] = OrderedDict()
        self.bytes = 0
        self.evicted = 0  # dropped unacknowledged to make room
        self.expired = 0  # dropped unacknowledged after keep_s

    def __len__(self) -> int:
        return len(self._kept)

    def __iter__(self) -> Iterator[Kept]:
        return iter(list(self._kept.values()))

    def keep(self, kept: Kept) -> bool:
        """Keep `kept` (making room by dropping the oldest); False when it alone is over `max_bytes`."""
        if kept.size > self.max_bytes:
            return False
        while self._kept and self.bytes + kept.size > self.max_bytes:
            self.drop(next(iter(self._kept)))
            self.evicted += 1
        self._kept[kept.framer.message_id] = kept
        self.bytes += kept.size
        return True

    def get(self, message_id: bytes) -> Kept | None:
        return self._kept.get(message_id)

    def drop(self, message_id: bytes) -> Kept | None:
        kept = self._kept.pop(message_id, None)
        if kept is not None:
            self.bytes -= kept.size
            if kept.resender is not None:
                kept.resender.cancel()
        return kept

    def expire(self, now: float) -> None:
        for kept in [k for k in self._kept.values() if k.expires <= now]:
            self.drop(kept.framer.message_id)
            self.expired += 1

    def clear(self) -> None:
        for message_id in list(self._kept):
            self.drop(message_id)
