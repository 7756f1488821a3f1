"""The bytes `MqttLink` puts on the broker: chunk frames, probes, and the control messages of repair.

Every message travels as one or more chunks of at most `chunk_size` payload bytes, each framed by
an 88-byte binary header (so MQTT 3.1.1 brokers carry it as well as MQTT 5 ones):

    magic b"AMC2" | message id (16) | origin (16) | chunk index u32 | chunk count u32 |
    total size u64 | SHA-256 of the whole payload (32) | header-JSON length u32    (little-endian)

followed by the message headers as JSON (chunk 0 only) and the chunk's bytes. `origin` names the
sending link, whose control topic takes the receiver's acknowledgements and requests for missing
chunks; all zeros for a sender that takes no part in repair. A probe is a frame with chunk index
`PROBE` and no headers or body: "tell my origin what you miss of this message".

Control messages are small JSON objects on the origin's control topic (wrapped in a seal when the
link has a `ControlSeal`; see `MqttLink.seal_control`):

    {"ack": ["<message id hex>", ...]}                      received complete, SHA-256 matched
    {"nack": "<message id hex>", "missing": [[first, end], ...]}   send these chunks again
"""
from __future__ import annotations

import hashlib
import math
import struct
import uuid
from dataclasses import dataclass
from typing import Iterable, Mapping

import orjson

from agentmesh.transport.link import encode_headers

FRAME = struct.Struct("<4s16s16sIIQ32sI")
FRAME_MAGIC = b"AMC2"
PROBE = 0xFFFFFFFF
NO_ORIGIN = bytes(16)
MAX_CONTROL_BYTES = 64 * 1024
MAX_RANGES = 1024  # per request for missing chunks; the rest are asked for in the next one


class FrameError(Exception):
    """A frame or control message that does not parse: dropped and logged by the link."""


@dataclass(frozen=True)
class FrameHeader:
    message_id: bytes
    origin: bytes
    index: int
    count: int
    total: int
    sha256: bytes
    head_len: int

    @property
    def probe(self) -> bool:
        return self.index == PROBE


def read_header(raw: memoryview) -> FrameHeader:
    if len(raw) < FRAME.size:
        raise FrameError(f"{len(raw)} bytes, shorter than a chunk header")
    magic, msg_id, origin, index, count, total, digest, head_len = FRAME.unpack_from(raw, 0)
    if magic != FRAME_MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r}")
    return FrameHeader(msg_id, origin, index, count, total, digest, head_len)


class Framer:
    """Cuts a payload into chunk frames on demand (`framer(i)` is frame i), copying one chunk at a time."""

    def __init__(self, payload: bytes | bytearray | memoryview, *, chunk_size: int,
                 digest: bytes | None = None, headers: bytes = b"", message_id: bytes | None = None,
                 origin: bytes = NO_ORIGIN) -> None:
        self.data = memoryview(payload).cast("B")
        self.chunk_size = chunk_size
        self.count = max(1, math.ceil(len(self.data) / chunk_size))
        self.digest = digest if digest is not None else hashlib.sha256(self.data).digest()
        self.headers = headers
        self.message_id = message_id or uuid.uuid4().bytes
        self.origin = origin

    def _head(self, index: int, head_len: int) -> bytes:
        return FRAME.pack(FRAME_MAGIC, self.message_id, self.origin, index, self.count, len(self.data),
                          self.digest, head_len)

    def __call__(self, index: int) -> bytes:
        extra = self.headers if index == 0 else b""
        size = self.chunk_size
        return b"".join([self._head(index, len(extra)), extra, self.data[index * size:(index + 1) * size]])

    def probe(self) -> bytes:
        return self._head(PROBE, 0)


def split_frames(payload: bytes, *, chunk_size: int, headers: Mapping[str, str] | None = None) -> list[bytes]:
    """Every chunk frame of one message, as a sender without repair would publish them."""
    framer = Framer(payload, chunk_size=chunk_size, headers=encode_headers(headers))
    return [framer(i) for i in range(framer.count)]


def missing_ranges(have: Iterable[int], count: int, limit: int = MAX_RANGES) -> list[list[int]]:
    """[first, end) runs of the chunk indices below `count` not in `have`, at most `limit` of them."""
    got = set(have)
    out: list[list[int]] = []
    i = 0
    while i < count and len(out) < limit:
        if i in got:
            i += 1
            continue
        start = i
        while i < count and i not in got:
            i += 1
        out.append([start, i])
    return out


def ack_message(ids: Iterable[bytes]) -> bytes:
    return orjson.dumps({"ack": [i.hex() for i in ids]})


def nack_message(message_id: bytes, missing: list[list[int]]) -> bytes:
    return orjson.dumps({"nack": message_id.hex(), "missing": missing})


@dataclass(frozen=True)
class Control:
    acked: tuple[bytes, ...] = ()
    nacked: bytes | None = None
    missing: tuple[tuple[int, int], ...] = ()


def read_control(raw: bytes | bytearray) -> Control:
    """An acknowledgement or a request for missing chunks; `FrameError` for anything else."""
    if len(raw) > MAX_CONTROL_BYTES:
        raise FrameError(f"control message of {len(raw)} bytes, over {MAX_CONTROL_BYTES}")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise FrameError("control message is not JSON") from None
    if not isinstance(data, dict):
        raise FrameError("control message is not a JSON object")
    if "ack" in data:
        ids = data["ack"]
        if not isinstance(ids, list):
            raise FrameError("'ack' must be a list of message ids")
        return Control(acked=tuple(_message_id(i) for i in ids))
    ranges = data.get("missing")
    if not isinstance(ranges, list) or len(ranges) > MAX_RANGES:
        raise FrameError(f"'missing' must be a list of at most {MAX_RANGES} [first, end] ranges")
    spans = []
    for r in ranges:
        if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r) and 0 <= r[0] < r[1]):
            raise FrameError(f"bad chunk range {str(r)[:40]}")
        spans.append((r[0], r[1]))
    return Control(nacked=_message_id(data.get("nack")), missing=tuple(spans))


def _message_id(value: object) -> bytes:
    if not isinstance(value, str) or len(value) != 32:
        raise FrameError(f"bad message id {str(value)[:40]!r}")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise FrameError(f"bad message id {value!r}") from None
