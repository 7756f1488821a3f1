"""Links carry byte payloads (encoded caches, text) between agents over named channels.

A channel is a string such as `"run-7/writer->reader"` (see `edge_channel`): one or more
`/`-separated segments, none empty, without MQTT wildcards (`+`, `#`) or whitespace. A message
sent on a channel is received once by a `receive` on that channel of the same link (queue
semantics); with MQTT every subscribed link gets its own copy.

Subscribe before a peer sends: MQTT brokers drop messages on topics nobody subscribed to, so a
worker subscribes to its inbound channels first and announces itself after. `receive` subscribes
on first use. `InProcessLink` keeps every message whether or not anyone subscribed, so code that
works over MQTT works in one process too.

Every wait is bounded: `timeout=None` means the link's default timeout, never "forever".
"""
from __future__ import annotations

import asyncio
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Awaitable, Mapping, Protocol, TypeVar

import orjson

from agentmesh.errors import TransportError

T = TypeVar("T")

DEFAULT_MAX_MESSAGE_BYTES = 1 << 31
MAX_HEADER_BYTES = 64 * 1024
_SEGMENT = re.compile(r"^[^/+#\s\x00]{1,200}$")


def validate_segment(value: str, what: str = "name") -> str:
    """A single topic level: non-empty, no `/`, `+`, `#`, whitespace or NUL, at most 200 chars."""
    if not isinstance(value, str) or not _SEGMENT.match(value):
        raise TransportError(f"{what} {value!r} is not a valid topic level; use 1-200 characters "
                             "without '/', '+', '#', whitespace or NUL")
    return value


def validate_channel(channel: str) -> str:
    if not isinstance(channel, str) or not channel:
        raise TransportError(f"channel {channel!r} must be a non-empty string")
    for part in channel.split("/"):
        validate_segment(part, f"channel {channel!r} segment")
    return channel


def edge_channel(run: str, edge: str) -> str:
    """The channel of graph edge `edge` in run `run` (topic `agentmesh/{graph}/{run}/{edge}/...`)."""
    return f"{validate_segment(run, 'run id')}/{validate_segment(edge, 'edge name')}"


def encode_headers(headers: Mapping[str, str] | None) -> bytes:
    if not headers:
        return b""
    for k, v in headers.items():
        if not isinstance(k, str) or not k or not isinstance(v, str):
            raise TransportError(f"message header {k!r}: {v!r} must map a non-empty string to a string")
    raw = orjson.dumps(dict(headers))
    if len(raw) > MAX_HEADER_BYTES:
        raise TransportError(f"message headers are {len(raw)} bytes encoded; the limit is {MAX_HEADER_BYTES}")
    return raw


def decode_headers(raw: bytes | memoryview) -> dict[str, str]:
    if not raw:
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise TransportError("message headers are not valid JSON") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise TransportError("message headers must be a JSON object of strings")
    return data


class LinkClosed(TransportError):
    """The link is closed (or was never opened): nothing more will arrive on it."""


class LinkTimeout(TransportError):
    """A bounded wait ran out: no message (or no acknowledgement) came in time."""


@dataclass(frozen=True)
class LinkMessage:
    channel: str
    payload: bytearray  # the receiver's own buffer (writable, so caches in it decode without a copy)
    headers: Mapping[str, str]
    message_id: str


@dataclass
class ChannelStats:
    """Counters of one channel. `wire_bytes_*` include framing, chunk headers and resends."""

    messages_sent: int = 0
    bytes_sent: int = 0
    wire_bytes_sent: int = 0
    chunks_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    wire_bytes_received: int = 0
    chunks_received: int = 0
    duplicate_chunks: int = 0
    dropped_chunks: int = 0  # refused because the link held max_buffered_bytes already
    failed_messages: int = 0
    chunks_resent: int = 0  # sent again because the receiver asked for them (counted in wire_bytes_sent)
    probes_sent: int = 0  # "what do you miss?" to the receivers of an unacknowledged message
    messages_acked: int = 0  # sent messages a receiver acknowledged whole
    repairs_asked: int = 0  # requests for missing chunks this side sent


class ControlSeal(Protocol):
    """How a link authenticates the control messages of its own repair protocol (acknowledgements
    and requests for missing chunks). The transport holds no keys, so the layer that does supplies
    this (`Link.seal_control`); both ends of a transfer must use one of the same pipeline."""

    def seal(self, topic: str, body: bytes) -> bytes:
        """`body` sealed for `topic`, the only topic it is valid on."""
        ...

    def open(self, topic: str, raw: bytes) -> bytes:
        """The body that `raw`, as it arrived on `topic`, was sealed with; `TransportError` when its
        seal is missing, wrong, for another topic, stale or replayed."""
        ...


@dataclass
class _LinkState:
    stats: dict[str, ChannelStats] = field(default_factory=dict)

    def channel(self, name: str) -> ChannelStats:
        return self.stats.setdefault(name, ChannelStats())


class Link(ABC):
    """An async, bounded-wait message link between agents. Use as `async with link: ...`."""

    default_timeout: float

    def __init__(self) -> None:
        self._state = _LinkState()

    async def open(self) -> None:
        """Connect (no-op for links that need no connection)."""

    async def close(self) -> None:
        """Disconnect; pending and later `receive` calls fail with `TransportError`."""

    async def __aenter__(self) -> "Link":
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    @abstractmethod
    async def subscribe(self, channel: str, *, timeout: float | None = None) -> None:
        """Start keeping messages of `channel` (idempotent; returns once the subscription holds)."""

    @abstractmethod
    async def send(self, channel: str, payload: bytes | bytearray | memoryview, *,
                   headers: Mapping[str, str] | None = None, timeout: float | None = None) -> str:
        """Deliver `payload` on `channel`; returns the message id. Raises `TransportError`.

        The payload must not change until `send` returns (large payloads are not copied first).
        """

    @abstractmethod
    async def receive_message(self, channel: str, timeout: float | None = None) -> LinkMessage:
        """The next message on `channel`, waiting at most `timeout` s. Raises `TransportError`."""

    async def receive(self, channel: str, timeout: float | None = None) -> bytearray:
        """The payload of the next message on `channel`."""
        return (await self.receive_message(channel, timeout)).payload

    def seal_control(self, seal: ControlSeal | None) -> None:
        """Seal this link's control messages with `seal` from now on, and ignore those it cannot
        open (None: unsealed, the default). A link without control messages has nothing to seal."""

    def stats(self) -> dict[str, ChannelStats]:
        """A snapshot of the per-channel counters."""
        return {name: replace(s) for name, s in self._state.stats.items()}

    def _timeout(self, timeout: float | None) -> float:
        t = self.default_timeout if timeout is None else timeout
        if not t > 0:
            raise TransportError(f"timeout must be a positive number of seconds, got {timeout!r}")
        return t


async def wait_bounded(aw: Awaitable[T], timeout: float, closed: asyncio.Event, what: str) -> T:
    """`aw`'s result, or `TransportError` when `timeout` passes or `closed` is set first."""
    task = asyncio.ensure_future(aw)
    stop = asyncio.ensure_future(closed.wait())
    try:
        done, _ = await asyncio.wait({task, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()  # cancelled from outside: take the inner wait down with us
        raise
    finally:
        stop.cancel()
    if task in done:
        return task.result()
    task.cancel()
    if stop in done:
        raise LinkClosed(f"{what}: the link was closed")
    raise LinkTimeout(f"{what}: timed out after {timeout:.1f} s")


class InProcessLink(Link):
    """Channels as asyncio queues inside one process: the link a single-process graph run uses."""

    def __init__(self, *, default_timeout: float = 300.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        super().__init__()
        self.default_timeout = default_timeout
        self.max_message_bytes = max_message_bytes
        self._queues: dict[str, asyncio.Queue[LinkMessage]] = {}
        self._closed = asyncio.Event()

    def _queue(self, channel: str) -> asyncio.Queue[LinkMessage]:
        return self._queues.setdefault(channel, asyncio.Queue())

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise LinkClosed("in-process link is closed")

    async def close(self) -> None:
        self._closed.set()

    async def subscribe(self, channel: str, *, timeout: float | None = None) -> None:
        self._check_open()
        self._queue(validate_channel(channel))

    async def send(self, channel: str, payload: bytes | bytearray | memoryview, *,
                   headers: Mapping[str, str] | None = None, timeout: float | None = None) -> str:
        self._check_open()
        validate_channel(channel)
        self._timeout(timeout)
        # The receiver gets its own copy, which the sender can no longer change, writable like
        # what MqttLink delivers (so a cache in it decodes without a second copy).
        data = bytearray(memoryview(payload).cast("B"))
        if len(data) > self.max_message_bytes:
            raise TransportError(f"message on channel {channel!r} is {len(data)} bytes, over the "
                                 f"limit of {self.max_message_bytes}")
        head = decode_headers(encode_headers(headers))
        message = LinkMessage(channel, data, head, uuid.uuid4().hex)
        self._queue(channel).put_nowait(message)
        s = self._state.channel(channel)
        s.messages_sent += 1
        s.bytes_sent += len(data)
        s.wire_bytes_sent += len(data)
        s.chunks_sent += 1
        return message.message_id

    async def receive_message(self, channel: str, timeout: float | None = None) -> LinkMessage:
        self._check_open()
        validate_channel(channel)
        t = self._timeout(timeout)
        message = await wait_bounded(self._queue(channel).get(), t, self._closed,
                                     f"no message on channel {channel!r}")
        s = self._state.channel(channel)
        s.messages_received += 1
        s.bytes_received += len(message.payload)
        s.wire_bytes_received += len(message.payload)
        s.chunks_received += 1
        return message
