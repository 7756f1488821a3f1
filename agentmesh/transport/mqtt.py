"""`MqttLink`: channels over an MQTT broker (aiomqtt), for agents on different hosts.

Topics: `{topic_prefix}/{graph}/{channel}/msg`, so an edge channel `"{run}/{edge}"` (see
`edge_channel`) lives on `agentmesh/{graph}/{run}/{edge}/msg`; each link also listens on its own
control topic `{topic_prefix}/{graph}/_link/{link id}/ctl`.

Every message travels as chunk frames (see `agentmesh.transport.frames`). The receiver
reassembles by (message id, index): redelivered chunks (QoS 1 is at-least-once) are counted and
dropped, a message whose chunks stop coming for `reassembly_timeout_s` fails, and a completed
message must match its SHA-256. Message ids of finished messages are remembered so a late
duplicate never delivers a message twice.

Delivery: QoS 1 (configurable), MQTT 5 with a message expiry interval when the broker speaks it
(else 3.1.1), persistent sessions (so a broker with persistence keeps queued chunks across its
restart), reconnection with bounded exponential backoff and resubscription. A send resumes after a
reconnect from the first chunk the broker had not acknowledged.

The broker's acknowledgement does not mean the receiver will get a chunk (a restart can lose what
the broker held), so delivery is also checked end to end: the receiving link acknowledges every
complete message on the sender's control topic, and the sender keeps the message (`Outbox`) until
then, for at most `resend_keep_s` and `resend_keep_bytes`. A receiver whose message has been quiet
for `repair_after_s` asks the sender for the chunks it misses; a sender whose message has been
quiet and unacknowledged as long sends a probe, which the receiver answers with an
acknowledgement or a request for what it misses (each backs off while nothing answers). Control
messages go at QoS 0: a lost one is asked again. With a `ControlSeal` (`seal_control`, given by
the layer that holds the keys) they go out sealed, and one whose seal does not hold is ignored and
counted (`forged_control`): else anyone who may publish on the broker could make a sender forget a
message its receiver does not have. Every wait is bounded; failures raise `TransportError` with a
one-line message.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping

import aiomqtt
import paho.mqtt.client as paho_mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from agentmesh.errors import TransportError
from agentmesh.transport.config import BrokerConfig
from agentmesh.transport.frames import (FRAME, MAX_CONTROL_BYTES, NO_ORIGIN, FrameError, FrameHeader, Framer,
                                        ack_message, missing_ranges, nack_message, read_control, read_header)
from agentmesh.transport.outbox import Kept, Outbox
from agentmesh.transport.link import (
    ChannelStats, ControlSeal, Link, LinkClosed, LinkMessage, LinkTimeout, decode_headers, encode_headers,
    validate_channel, validate_segment, wait_bounded)

log = logging.getLogger(__name__)

_MAX_PARTIALS = 64
_MAX_DONE_IDS = 16384
_HASH_IN_THREAD = 4 << 20  # hash big payloads off the event loop
_ACKS_PER_MESSAGE = 500
_SEAL_BYTES = 4096  # room a seal may add to a control message (envelope prefix, stamp, signer, signature)
# CONNACK codes: 3.1.1 (4 bad credentials, 5 not authorised) and MQTT 5 (0x86, 0x87).
_AUTH_CODES = {4, 5, 134, 135}
_BAD_PROTOCOL_CODES = {1, 132}


class _AuthRefused(Exception):
    pass


@dataclass(eq=False)
class _Connection:
    client: aiomqtt.Client
    protocol: aiomqtt.ProtocolVersion
    lost: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class _Partial:
    channel: str
    count: int
    total: int
    sha256: bytes
    origin: bytes
    last_progress: float
    chunks: dict[int, memoryview] = field(default_factory=dict)
    received: int = 0
    headers: dict[str, str] | None = None
    asked_at: float = float("-inf")  # when the sender was last asked for missing chunks
    asks: int = 0  # requests since the last new chunk (they back off)


class _ChunkRejected(Exception):
    pass


class MqttLink(Link):
    """Channels of one graph over an MQTT broker. `async with MqttLink(cfg, graph="g") as link:`."""

    def __init__(self, config: BrokerConfig | str, *, graph: str) -> None:
        super().__init__()
        self.config = BrokerConfig(url=config) if isinstance(config, str) else config
        self.graph = validate_segment(graph, "graph name")
        self.default_timeout = self.config.receive_timeout_s
        self.client_id = self.config.client_id or f"agentmesh-{uuid.uuid4().hex[:16]}"
        self._queues: dict[str, asyncio.Queue[LinkMessage | TransportError]] = {}
        self._subscriptions: set[str] = set()
        self._subscribing: dict[str, asyncio.Future[None]] = {}
        self._partials: dict[bytes, _Partial] = {}
        self._done: OrderedDict[bytes, bool] = OrderedDict()  # finished message -> delivered intact
        self._buffered = 0  # bytes of partial and of complete messages not yet received
        # Repair: this link's id on the wire (its control topic), what it sent and keeps, what it acknowledges.
        self._origin = uuid.uuid4().bytes if self.config.resend_keep_bytes > 0 else NO_ORIGIN
        self._outbox = Outbox(max_bytes=self.config.resend_keep_bytes, keep_s=self.config.resend_keep_s)
        self._acks: dict[bytes, list[bytes]] = {}
        self._acks_due: asyncio.Event | None = None
        self._side: set[asyncio.Task[None]] = set()  # probes, requests and resends in flight
        self._connected_at = 0.0
        self._control_seal: ControlSeal | None = None
        self.dropped_control = 0  # control messages that did not parse
        self.forged_control = 0  # control messages whose seal was missing or wrong (with a seal set)
        self._conn: _Connection | None = None
        self._protocol: aiomqtt.ProtocolVersion | None = {
            "auto": None, "5": aiomqtt.ProtocolVersion.V5, "3.1.1": aiomqtt.ProtocolVersion.V311,
        }[self.config.protocol]
        self._connected: asyncio.Event | None = None
        self._closed: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._last_error = "never connected"
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.lost.is_set()

    @property
    def protocol(self) -> str | None:
        """"5" or "3.1.1" once connected."""
        if self._protocol is None:
            return None
        return "5" if self._protocol == aiomqtt.ProtocolVersion.V5 else "3.1.1"

    @property
    def kept(self) -> tuple[int, int]:
        """(messages, bytes) sent and kept because no receiver has acknowledged them yet."""
        return len(self._outbox), self._outbox.bytes

    def seal_control(self, seal: ControlSeal | None) -> None:
        self._control_seal = seal

    def topic(self, channel: str) -> str:
        return f"{self.config.topic_prefix}/{self.graph}/{validate_channel(channel)}/msg"

    def control_topic(self, origin: bytes | None = None) -> str:
        """The control topic of the link `origin` (this link's by default)."""
        return f"{self.config.topic_prefix}/{self.graph}/_link/{(origin or self._origin).hex()}/ctl"

    def _channel_of(self, topic: str) -> str | None:
        head = f"{self.config.topic_prefix}/{self.graph}/"
        if topic.startswith(head) and topic.endswith("/msg") and len(topic) > len(head) + 4:
            return topic[len(head):-4]
        return None

    async def open(self) -> None:
        if self._closed is not None:
            raise TransportError("MqttLink cannot be opened twice; make a new one")
        self._connected, self._closed = asyncio.Event(), asyncio.Event()
        self._acks_due = asyncio.Event()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.timeout_s
        attempt = 0
        while True:
            try:
                conn = await self._connect(clean=True, deadline=deadline)
                break
            except _AuthRefused as exc:
                self._closed.set()
                raise TransportError(str(exc)) from None
            except (aiomqtt.MqttError, OSError, asyncio.TimeoutError) as exc:
                self._last_error = _describe(exc)
            delay = self._backoff(attempt)
            attempt += 1
            if loop.time() + delay >= deadline:
                self._closed.set()
                raise TransportError(f"cannot reach MQTT broker {self.config.url} within "
                                     f"{self.config.timeout_s:.1f} s: {self._last_error}")
            await asyncio.sleep(delay)
        self._set_connection(conn)
        self._tasks = [asyncio.create_task(self._run(conn), name=f"mqtt-link-{self.client_id}"),
                       asyncio.create_task(self._maintain(), name=f"mqtt-repair-{self.client_id}"),
                       asyncio.create_task(self._acknowledge(), name=f"mqtt-acks-{self.client_id}")]

    async def close(self) -> None:
        if self._closed is None or (self._closed.is_set() and not self._tasks):
            if self._closed is None:
                self._closed = asyncio.Event()
            self._closed.set()
            return
        self._closed.set()
        self._outbox.clear()
        tasks = [*self._tasks, *self._side]
        for task in tasks:
            task.cancel()
        assert self._acks_due is not None
        self._acks_due.set()  # wakes the acknowledger to see the link closed, should its cancellation get lost
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []
        conn, self._conn = self._conn, None
        if conn is not None:
            await _disconnect(conn)

    def _backoff(self, attempt: int) -> float:
        cap = min(self.config.reconnect_max_s, self.config.reconnect_min_s * 2 ** min(attempt, 30))
        return cap * random.uniform(0.5, 1.0)  # jitter: peers that lost the broker together spread out

    def _set_connection(self, conn: _Connection) -> None:
        self._conn = conn
        self._connected_at = asyncio.get_running_loop().time()
        for part in self._partials.values():  # quiet transfers are asked about soon after a reconnect
            part.asks = 0
        for kept in self._outbox:
            kept.probes = 0
        assert self._connected is not None
        self._connected.set()

    async def _connect(self, *, clean: bool, deadline: float) -> _Connection:
        """Connect once (trying MQTT 5 then 3.1.1 when `protocol` is auto) and resubscribe."""
        loop = asyncio.get_running_loop()
        cfg = self.config
        password = cfg.password_value()
        tls = cfg.ssl_context()
        versions = [self._protocol] if self._protocol is not None else \
            [aiomqtt.ProtocolVersion.V5, aiomqtt.ProtocolVersion.V311]
        last: BaseException | None = None
        for version in versions:
            v5 = version == aiomqtt.ProtocolVersion.V5
            props = None
            if v5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = cfg.session_expiry_s
            remaining = max(0.05, deadline - loop.time())
            client = aiomqtt.Client(
                cfg.host, cfg.port, username=cfg.username, password=password, identifier=self.client_id,
                protocol=version, clean_session=None if v5 else False,
                clean_start=clean if v5 else paho_mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                keepalive=cfg.keepalive_s, timeout=remaining, properties=props, tls_context=tls,
                max_inflight_messages=cfg.max_inflight)
            client.pending_calls_threshold = 2 * cfg.max_inflight + 8  # our window bounds them already
            try:
                await asyncio.wait_for(client.__aenter__(), remaining + 1.0)
            except aiomqtt.MqttCodeError as exc:
                rc = _rc(exc)
                if rc in _AUTH_CODES:
                    raise _AuthRefused(
                        f"MQTT broker {cfg.url} refused the credentials of user {cfg.username!r} "
                        f"({_describe(exc)}); check username and the password in ${cfg.password_env}"
                        if cfg.username else
                        f"MQTT broker {cfg.url} refused an anonymous connection ({_describe(exc)}); "
                        "set username and password_env") from None
                if rc in _BAD_PROTOCOL_CODES and len(versions) > 1 and v5:
                    last = exc
                    continue
                raise
            conn = _Connection(client, version)
            try:
                await self._subscribe_topics(conn, sorted(self._subscriptions), deadline,
                                             control=self._origin != NO_ORIGIN)
            except BaseException:
                await _disconnect(conn)
                raise
            self._protocol = version
            return conn
        assert last is not None
        raise last

    async def _run(self, conn: _Connection) -> None:
        """Read messages; when the connection drops, reconnect with backoff until closed."""
        assert self._closed is not None and self._connected is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                async for message in conn.client.messages:
                    try:
                        await self._on_message(message)
                    except Exception:  # a bad frame must never stop the link
                        log.exception("dropping an MQTT message on %s", message.topic)
            except aiomqtt.MqttError as exc:
                self._last_error = _describe(exc)
                log.warning("MQTT link %s lost the broker %s: %s", self.client_id, self.config.url,
                            self._last_error)
            conn.lost.set()
            self._connected.clear()
            await _disconnect(conn)
            attempt = 0
            while True:
                await asyncio.sleep(self._backoff(attempt))
                if self._closed.is_set():  # in case a wait_for below swallowed our cancellation
                    return
                attempt += 1
                try:
                    conn = await self._connect(clean=False, deadline=loop.time() + self.config.timeout_s)
                    break
                except Exception as exc:  # keep trying: waiters are bounded by their own timeouts
                    self._last_error = _describe(exc)
                    if not isinstance(exc, (aiomqtt.MqttError, OSError, asyncio.TimeoutError)):
                        log.warning("MQTT link %s cannot reconnect: %s", self.client_id, self._last_error)
            self.reconnects += 1
            log.info("MQTT link %s reconnected to %s", self.client_id, self.config.url)
            self._set_connection(conn)

    async def _wait_connected(self, deadline: float, what: str) -> _Connection:
        assert self._closed is not None and self._connected is not None
        loop = asyncio.get_running_loop()
        while True:
            self._check_open()
            conn = self._conn
            if conn is not None and not conn.lost.is_set():
                return conn
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise LinkTimeout(f"{what}: not connected to MQTT broker {self.config.url} "
                                     f"(last error: {self._last_error})")
            try:
                await wait_bounded(self._connected.wait(), remaining, self._closed, what)
            except TransportError:
                self._check_open()

    def _check_open(self) -> None:
        if self._closed is None:
            raise LinkClosed("MqttLink is not open; use `async with MqttLink(...)` or await open()")
        if self._closed.is_set():
            raise LinkClosed(f"MqttLink to {self.config.url} is closed")

    async def _subscribe_topics(self, conn: _Connection, channels: list[str], deadline: float, *,
                                control: bool = False) -> None:
        names = [self.topic(ch) for ch in channels] + ([self.control_topic()] if control else [])
        if not names:
            return
        remaining = max(0.05, deadline - asyncio.get_running_loop().time())
        topics = [(name, self.config.qos) for name in names]
        try:
            codes = await conn.client.subscribe(topics, timeout=remaining)
        except aiomqtt.MqttError as exc:
            raise aiomqtt.MqttError(f"subscribing to {len(topics)} topic(s) failed: {_describe(exc)}") from None
        for name, code in zip(names, codes):
            value = code.value if hasattr(code, "value") else int(code)
            if value >= 0x80:
                raise TransportError(f"MQTT broker {self.config.url} refused the subscription to "
                                     f"{name!r} (code {value}); check its ACLs")

    async def subscribe(self, channel: str, *, timeout: float | None = None) -> None:
        self._check_open()
        validate_channel(channel)
        self._queue(channel)
        t = self._timeout(timeout)
        what = f"subscribing to channel {channel!r}"
        if channel in self._subscribing:  # another call is subscribing it: wait for that one
            assert self._closed is not None
            await wait_bounded(asyncio.shield(self._subscribing[channel]), t, self._closed, what)
            return
        if channel in self._subscriptions:
            return
        self._subscriptions.add(channel)  # from now on every reconnect resubscribes it
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._subscribing[channel] = done
        try:
            await self._subscribe_once(channel, t, what)
            done.set_result(None)
        except BaseException as exc:
            self._subscriptions.discard(channel)
            done.set_exception(exc if isinstance(exc, TransportError) else TransportError(f"{what}: failed"))
            done.exception()  # retrieved here, so asyncio does not warn when nobody else waits
            raise
        finally:
            del self._subscribing[channel]

    async def _subscribe_once(self, channel: str, timeout: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            conn = await self._wait_connected(deadline, what)
            try:
                await self._subscribe_topics(conn, [channel], deadline)
                return
            except aiomqtt.MqttError as exc:  # lost the connection meanwhile: the reconnect resubscribes
                self._last_error = _describe(exc)
                if loop.time() >= deadline:
                    raise LinkTimeout(f"{what} timed out: {self._last_error}") from None
                await asyncio.sleep(0.05)

    def _queue(self, channel: str) -> asyncio.Queue[LinkMessage | TransportError]:
        return self._queues.setdefault(channel, asyncio.Queue())

    async def send(self, channel: str, payload: bytes | bytearray | memoryview, *,
                   headers: Mapping[str, str] | None = None, timeout: float | None = None) -> str:
        self._check_open()
        topic = self.topic(channel)
        data = memoryview(payload).cast("B")
        if len(data) > self.config.max_message_bytes:
            raise TransportError(f"message on channel {channel!r} is {len(data)} bytes, over the limit of "
                                 f"{self.config.max_message_bytes} (max_message_bytes)")
        head = encode_headers(headers)
        loop = asyncio.get_running_loop()
        t = self.config.timeout_s if timeout is None else self._timeout(timeout)
        deadline = loop.time() + t
        repair = self._origin != NO_ORIGIN and len(data) <= self._outbox.max_bytes
        if repair and not (data.readonly and isinstance(data.obj, bytes)):
            data = memoryview(bytes(data))  # kept after send returns: the caller may reuse its buffer
        frame = Framer(data, chunk_size=self.config.chunk_bytes, digest=await _sha256(data), headers=head,
                       origin=self._origin if repair else NO_ORIGIN)
        count = frame.count
        stats = self._state.channel(channel)
        pending = set(range(count))
        kept: Kept | None = None
        if repair:
            kept = Kept(frame, channel, topic, expires=float("inf"), quiet_since=loop.time(), sending=pending)
            self._outbox.keep(kept)
        try:
            await self._send_chunks(frame, topic, pending, stats, deadline, t, f"sending {len(data)} bytes on "
                                    f"channel {channel!r}")
        except BaseException:
            self._outbox.drop(frame.message_id)
            raise
        if kept is not None:
            kept.quiet_since = loop.time()
            kept.expires = kept.quiet_since + self._outbox.keep_s
        stats.messages_sent += 1
        stats.bytes_sent += len(data)
        return frame.message_id.hex()

    async def _send_chunks(self, frame: Framer, topic: str, pending: set[int], stats: ChannelStats,
                           deadline: float, t: float, what: str) -> None:
        """Publish the chunks in `pending` until the broker acknowledged each, across reconnects."""
        loop = asyncio.get_running_loop()
        count = frame.count
        losses = 0
        while pending:
            conn = await self._wait_connected(deadline, what)
            window = asyncio.Semaphore(self.config.max_inflight)

            async def one(i: int, conn: _Connection = conn, window: asyncio.Semaphore = window) -> None:
                async with window:
                    if conn.lost.is_set():
                        return
                    body = frame(i)
                    await self._publish(conn, topic, body, deadline, what)
                    pending.discard(i)
                    stats.chunks_sent += 1
                    stats.wire_bytes_sent += len(body)

            results = await asyncio.gather(*(one(i) for i in sorted(pending)), return_exceptions=True)
            for r in results:
                if isinstance(r, TransportError):
                    raise type(r)(f"{r.message} ({count - len(pending)}/{count} chunks acknowledged, "
                                         f"{losses} connection loss(es))") from None
                if isinstance(r, BaseException) and not isinstance(r, aiomqtt.MqttError):
                    raise r
            if pending:
                losses += 1
                if loop.time() >= deadline:
                    raise LinkTimeout(f"{what}: timed out after {t:.1f} s with {count - len(pending)}/"
                                         f"{count} chunks acknowledged (last error: {self._last_error})")
                if self._conn is conn and not conn.lost.is_set():
                    # The broker rejected a publish without dropping us; do not spin.
                    await asyncio.sleep(min(1.0, self.config.reconnect_min_s))

    async def _publish(self, conn: _Connection, topic: str, body: bytes, deadline: float, what: str) -> None:
        """Publish one frame and wait for the broker's ack, the connection's loss, or the deadline."""
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise LinkTimeout(f"{what}: timed out")
        props = None
        if conn.protocol == aiomqtt.ProtocolVersion.V5:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = self.config.message_expiry_s
        publish = asyncio.ensure_future(
            conn.client.publish(topic, body, qos=self.config.qos, properties=props, timeout=remaining + 1.0))
        lost = asyncio.ensure_future(conn.lost.wait())
        try:
            done, _ = await asyncio.wait({publish, lost}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if publish in done:
            try:
                publish.result()
            except aiomqtt.MqttError as exc:
                self._last_error = _describe(exc)
                raise
            return
        publish.cancel()
        if lost in done:
            raise aiomqtt.MqttError("connection lost while publishing")
        raise LinkTimeout(f"{what}: timed out waiting for the broker to acknowledge a chunk")

    async def receive_message(self, channel: str, timeout: float | None = None) -> LinkMessage:
        self._check_open()
        assert self._closed is not None
        t = self._timeout(timeout)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self.subscribe(channel, timeout=t)
        remaining = t - (loop.time() - start)
        try:
            item = await wait_bounded(self._queue(channel).get(), max(remaining, 0.001), self._closed,
                                      f"no message on channel {channel!r}")
        except TransportError as exc:
            raise type(exc)(f"{exc.message}{self._progress(channel)}") from None
        if isinstance(item, TransportError):
            raise item
        self._buffered -= len(item.payload)
        return item

    def _progress(self, channel: str) -> str:
        parts = [f"{len(p.chunks)}/{p.count} chunks" for p in self._partials.values() if p.channel == channel]
        state = "connected" if self.connected else f"disconnected: {self._last_error}"
        return f" (broker {self.config.url} {state}" + (f"; partial message: {', '.join(parts)})" if parts else ")")

    async def _on_message(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        raw = message.payload
        if not isinstance(raw, (bytes, bytearray)):
            return
        if topic == self.control_topic() and self._origin != NO_ORIGIN:
            self._on_control(raw)
            return
        channel = self._channel_of(topic)
        if channel is None:
            return
        stats = self._state.channel(channel)
        stats.wire_bytes_received += len(raw)
        try:
            done = self._take_chunk(channel, memoryview(raw))
        except _ChunkRejected as exc:
            log.warning("dropping a chunk on %s: %s", message.topic.value, exc)
            return
        if done is None:
            return
        msg_id, part = done
        await self._finish(msg_id, part)

    def _take_chunk(self, channel: str, raw: memoryview) -> tuple[bytes, _Partial] | None:
        """Store one chunk; the message id and its parts once every chunk is in."""
        try:
            h = read_header(raw)
        except FrameError as exc:
            raise _ChunkRejected(str(exc)) from None
        if h.probe:
            self._on_probe(channel, h)
            return None
        msg_id, index, count, total, head_len = h.message_id, h.index, h.count, h.total, h.head_len
        stats = self._state.channel(channel)
        if msg_id in self._done:
            stats.duplicate_chunks += 1
            return None
        body = raw[FRAME.size + head_len:]
        if FRAME.size + head_len > len(raw) or index >= count or len(body) > total:
            raise _ChunkRejected(f"inconsistent chunk {index}/{count} of {total} bytes")
        part = self._partial(channel, h)
        if index in part.chunks:
            stats.duplicate_chunks += 1
            return None
        if part.received + len(body) > total:
            raise _ChunkRejected(f"chunk {index} overflows the message size {total}")
        if index == 0:
            try:
                part.headers = decode_headers(raw[FRAME.size:FRAME.size + head_len])
            except TransportError as exc:
                raise _ChunkRejected(exc.message) from None
        if self._buffered + len(body) > self.config.max_buffered_bytes:
            stats.dropped_chunks += 1
            raise _ChunkRejected(f"the link holds {self._buffered} bytes not yet received, its limit "
                                 f"(max_buffered_bytes) is {self.config.max_buffered_bytes}")
        part.chunks[index] = body
        part.received += len(body)
        self._buffered += len(body)
        part.last_progress = asyncio.get_running_loop().time()
        part.asks = 0
        stats.chunks_received += 1
        if len(part.chunks) < count:
            return None
        del self._partials[msg_id]
        self._remember(msg_id, False)  # until its SHA-256 is checked
        return msg_id, part

    def _partial(self, channel: str, h: FrameHeader) -> _Partial:
        """The message `h` belongs to, started if new (`_ChunkRejected` if `h` contradicts it)."""
        if h.count > max(1, h.total) or h.total > self.config.max_message_bytes or h.count < 1:
            raise _ChunkRejected(f"inconsistent chunk header: {h.count} chunks of {h.total} bytes")
        part = self._partials.get(h.message_id)
        if part is None:
            if len(self._partials) >= _MAX_PARTIALS:
                oldest = min(self._partials, key=lambda k: self._partials[k].last_progress)
                self._fail(oldest, "dropped: too many messages were being reassembled at once")
            part = _Partial(channel, h.count, h.total, h.sha256, h.origin, asyncio.get_running_loop().time())
            self._partials[h.message_id] = part
        elif (part.channel, part.count, part.total, part.sha256, part.origin) != \
                (channel, h.count, h.total, h.sha256, h.origin):
            raise _ChunkRejected(f"chunk {h.index} disagrees with earlier chunks of its message")
        return part

    def _on_probe(self, channel: str, h: FrameHeader) -> None:
        """A sender asks what we miss of a message: acknowledge it, or ask for the missing chunks."""
        if h.origin == NO_ORIGIN:
            return
        delivered = self._done.get(h.message_id)
        if delivered is not None:
            if delivered:
                self._ack(h.origin, h.message_id)
            return
        part = self._partial(channel, h)
        if asyncio.get_running_loop().time() - part.asked_at >= self.config.repair_after_s / 2:
            self._ask(h.message_id, part)

    def _ask(self, msg_id: bytes, part: _Partial) -> None:
        """Ask the sender of `part` for the chunks it misses (unless the broker is away right now)."""
        missing = missing_ranges(part.chunks, part.count)
        if not missing or part.origin == NO_ORIGIN or not self.connected:
            return
        part.asked_at = asyncio.get_running_loop().time()
        part.asks += 1
        self._state.channel(part.channel).repairs_asked += 1
        self._spawn(self._publish_control(part.origin, nack_message(msg_id, missing)))

    def _ack(self, origin: bytes, msg_id: bytes) -> None:
        if origin == NO_ORIGIN:
            return
        self._acks.setdefault(origin, []).append(msg_id)
        assert self._acks_due is not None
        self._acks_due.set()

    async def _acknowledge(self) -> None:
        """Send the acknowledgements due, those that piled up meanwhile together."""
        assert self._acks_due is not None and self._closed is not None
        # The flag, not only cancellation, ends this loop: Python 3.11's wait_for can swallow a
        # cancellation that arrives as the publish it waits for completes.
        while not self._closed.is_set():
            await self._acks_due.wait()
            self._acks_due.clear()
            due, self._acks = self._acks, {}
            for origin, ids in due.items():
                for i in range(0, len(ids), _ACKS_PER_MESSAGE):
                    await self._publish_control(origin, ack_message(ids[i:i + _ACKS_PER_MESSAGE]))

    async def _publish_control(self, origin: bytes, body: bytes) -> None:
        """QoS 0, best effort: a lost control message is sent again by the repair that needs it."""
        conn = self._conn
        if conn is None or conn.lost.is_set():
            return
        topic = self.control_topic(origin)
        if self._control_seal is not None:
            body = self._control_seal.seal(topic, body)
        try:
            await asyncio.wait_for(conn.client.publish(topic, body, qos=0), 2.0)
        except (aiomqtt.MqttError, asyncio.TimeoutError) as exc:
            log.debug("MQTT link %s could not send a control message: %s", self.client_id, _describe(exc))

    def _open_control(self, raw: bytes | bytearray) -> bytes | bytearray | None:
        """The control message in `raw`: as is without a seal set, else opened (None, counted and
        logged at debug level, when its seal does not hold: a forged acknowledgement must not
        make us forget a message its receiver does not have)."""
        seal = self._control_seal
        if seal is None:
            return raw
        if len(raw) > MAX_CONTROL_BYTES + _SEAL_BYTES:
            raise FrameError(f"sealed control message of {len(raw)} bytes, over {MAX_CONTROL_BYTES + _SEAL_BYTES}")
        try:
            return seal.open(self.control_topic(), bytes(raw))
        except TransportError as exc:
            self.forged_control += 1
            log.debug("ignoring a control message on %s (%d so far): %s", self.control_topic(), self.forged_control,
                      exc.message)
            return None

    def _on_control(self, raw: bytes | bytearray) -> None:
        try:
            body = self._open_control(raw)
            if body is None:
                return
            ctl = read_control(body)
        except FrameError as exc:
            self.dropped_control += 1
            if self.dropped_control == 1 or self.dropped_control % 100 == 0:  # a flood must not flood the log
                log.warning("dropping a control message on %s (%d so far): %s", self.control_topic(),
                            self.dropped_control, exc)
            return
        for msg_id in ctl.acked:
            kept = self._outbox.drop(msg_id)
            if kept is not None:
                self._state.channel(kept.channel).messages_acked += 1
        if ctl.nacked is None:
            return
        kept = self._outbox.get(ctl.nacked)
        if kept is None:  # expired or dropped: the receiver's reassembly timeout ends it
            return
        now = asyncio.get_running_loop().time()
        kept.quiet_since, kept.probes = now, 0
        if now - kept.served_at < self.config.repair_after_s / 2:
            return  # asked again so soon: a duplicate request, or someone trying to make us flood
        kept.served_at = now
        count = kept.framer.count
        kept.resend |= {i for first, end in ctl.missing for i in range(first, min(end, count))} - kept.sending
        if kept.resend and (kept.resender is None or kept.resender.done()):
            kept.resender = self._spawn(self._resend(kept))

    async def _resend(self, kept: Kept) -> None:
        """Publish the chunks `kept`'s receiver asked for again (until asked again, if the broker goes away)."""
        loop = asyncio.get_running_loop()
        stats = self._state.channel(kept.channel)
        what = f"resending chunks on channel {kept.channel!r}"
        while kept.resend:
            conn = self._conn
            if conn is None or conn.lost.is_set():
                return
            window = asyncio.Semaphore(self.config.max_inflight)
            deadline = loop.time() + self.config.timeout_s

            async def one(i: int) -> None:
                async with window:
                    if conn.lost.is_set() or i not in kept.resend:
                        return
                    body = kept.framer(i)
                    await self._publish(conn, kept.topic, body, deadline, what)
                    kept.resend.discard(i)
                    stats.chunks_resent += 1
                    stats.wire_bytes_sent += len(body)

            results = await asyncio.gather(*(one(i) for i in sorted(kept.resend)), return_exceptions=True)
            kept.quiet_since = loop.time()
            if any(isinstance(r, BaseException) for r in results):
                return  # the broker went away or would not take them: the receiver asks again

    async def _probe(self, kept: Kept) -> None:
        conn = self._conn
        if conn is None or conn.lost.is_set():
            return
        try:
            await self._publish(conn, kept.topic, kept.framer.probe(),
                                asyncio.get_running_loop().time() + self.config.timeout_s, "probing")
            self._state.channel(kept.channel).probes_sent += 1
        except (aiomqtt.MqttError, TransportError):
            return  # the broker is away: the message stays kept, and the next quiet period probes again

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._side.add(task)
        task.add_done_callback(self._side.discard)
        return task

    async def _finish(self, msg_id: bytes, part: _Partial) -> None:
        stats = self._state.channel(part.channel)
        queue = self._queue(part.channel)
        if part.received != part.total:
            self._buffered -= part.received
            stats.failed_messages += 1
            queue.put_nowait(TransportError(
                f"message {msg_id.hex()} on channel {part.channel!r}: chunks hold {part.received} bytes, "
                f"its header says {part.total}"))
            return
        payload = _assemble(part)
        if await _sha256(memoryview(payload)) != part.sha256:
            self._buffered -= part.received
            stats.failed_messages += 1
            queue.put_nowait(TransportError(
                f"message {msg_id.hex()} on channel {part.channel!r} is corrupted: its SHA-256 does not match"))
            return
        stats.messages_received += 1
        stats.bytes_received += len(payload)
        self._remember(msg_id, True)
        self._ack(part.origin, msg_id)
        queue.put_nowait(LinkMessage(part.channel, payload, part.headers or {}, msg_id.hex()))

    def _remember(self, msg_id: bytes, delivered: bool) -> None:
        self._done[msg_id] = delivered
        while len(self._done) > _MAX_DONE_IDS:
            self._done.popitem(last=False)

    def _fail(self, msg_id: bytes, why: str) -> None:
        part = self._partials.pop(msg_id)
        self._buffered -= part.received
        self._remember(msg_id, False)
        self._state.channel(part.channel).failed_messages += 1
        self._queue(part.channel).put_nowait(TransportError(
            f"message {msg_id.hex()} on channel {part.channel!r} ({len(part.chunks)}/{part.count} chunks, "
            f"{part.received}/{part.total} bytes) {why}"))

    async def _maintain(self) -> None:
        """Fail messages whose chunks stopped coming for `reassembly_timeout_s`; repair quiet
        transfers (ask for missing chunks, probe unacknowledged messages); forget expired ones."""
        limit = self.config.reassembly_timeout_s
        quiet = self.config.repair_after_s
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, limit / 4, quiet / 2))
            now = loop.time()
            for msg_id in [k for k, p in self._partials.items() if now - p.last_progress > limit]:
                self._fail(msg_id, f"failed: no new chunk for {limit:.1f} s (reassembly_timeout_s)")
            self._outbox.expire(now)
            if not self.connected:
                continue
            since = self._connected_at
            for msg_id, part in list(self._partials.items()):
                if now - max(part.last_progress, part.asked_at, since) >= quiet * 2 ** min(part.asks, 3):
                    self._ask(msg_id, part)
            for kept in self._outbox:
                idle = not kept.sending and (kept.resender is None or kept.resender.done())
                if idle and now - max(kept.quiet_since, since) >= quiet * 2 ** min(kept.probes, 5):
                    kept.probes += 1
                    kept.quiet_since = now
                    self._spawn(self._probe(kept))


def _assemble(part: _Partial) -> bytearray:
    """The chunks of `part` in order, in one writable buffer the receiver owns: the one copy
    reassembly needs, and a payload `decode_cache` can view without copying it again (it cannot
    view immutable `bytes`)."""
    payload = bytearray(part.total)
    pos = 0
    for i in range(part.count):
        chunk = part.chunks[i]
        payload[pos:pos + len(chunk)] = chunk
        pos += len(chunk)
    return payload


async def _sha256(data: memoryview) -> bytes:
    if len(data) >= _HASH_IN_THREAD:  # hashlib drops the GIL, the event loop keeps running
        return await asyncio.to_thread(lambda: hashlib.sha256(data).digest())
    return hashlib.sha256(data).digest()


async def _disconnect(conn: _Connection) -> None:
    """Leave the broker politely if it is there, without waiting long if it is not."""
    try:
        await asyncio.wait_for(conn.client.__aexit__(None, None, None), 2.0)
    except (aiomqtt.MqttError, OSError, asyncio.TimeoutError, RuntimeError):
        pass


def _rc(exc: aiomqtt.MqttCodeError) -> int | None:
    rc: Any = exc.rc
    if rc is None:
        return None
    return rc.value if hasattr(rc, "value") else int(rc)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())
