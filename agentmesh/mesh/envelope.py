"""The messages between a run's caller and the workers that host its agents: envelopes, channels, errors.

Channels (over any `Link`; with `MqttLink` a channel `c` is the topic `{topic_root}/{graph}/c/msg`):

* `host/{host}`: a worker's inbox. Every message for the agents of that host goes there
  (requests, cancels, the sharer caches a fusing receiver asked for, and `cache` deliveries: a
  cache another host's worker sends straight to this host's receiver). One fixed channel per host,
  because links subscribe to exact channels (no wildcards) and a worker outlives runs.
* `{run}/{agent}->{to}` (`edge_channel`): replies to the caller. `to` is the receiver the reply
  feeds when it carries a cache along a graph edge (`librarian->assistant`), else the caller's
  name, so the per-channel link counters read as bytes per edge.

Every message is an envelope: a small JSON body plus named binary blobs (encoded caches)

    magic b"AMRP" | version u16 | flags u16 | JSON length u32 | blob count u32   (little-endian)
    JSON body (with "blobs": [[name, size], ...], "auth": {from, nonce, ts}) | blob bytes, in order
    | the seal: HMAC-SHA256 (32 bytes, flag SEALED) or signer name | its length u8 | Ed25519
      signature (64 bytes, flag SIGNED); see `agentmesh.mesh.auth`

With flag ENCRYPTED the JSON body and blobs are replaced by a 12-byte nonce and their AES-256-GCM
ciphertext and tag (the prefix, graph and channel are its associated data); a signature covers
that, and with SEALED the tag is the seal (no HMAC trailer).

A link's own control messages (acknowledgements and requests for missing chunks, which decide
what a sender forgets or sends again) travel as envelopes too, sealed for the link's control topic
(`LinkControlSeal`), so that only holders of the pipeline's keys can send them.

Caches inside are `encode_cache` payloads, checked by `decode_cache`; nothing is ever unpickled.
Envelopes come from the network: `unpack` checks sizes and shapes before trusting anything.
"""
from __future__ import annotations

import re
import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, NoReturn

import orjson

from agentmesh import errors
from agentmesh.errors import AgentMeshError, RunError, TransportError, error_line
from agentmesh.mesh.auth import Guard, Rejected, split_trailer
from agentmesh.runtime.endpoint import RunCancelled
from agentmesh.transport.link import Link, edge_channel, validate_segment

MAGIC = b"AMRP"
VERSION = 2
SEALED = 1  # prefix flags: an HMAC seal follows the blobs,
SIGNED = 2  # or a signature,
ENCRYPTED = 4  # and the body and blobs are encrypted
_KINDS = {0: "", SEALED: "sealed", SIGNED: "signed"}
PREFIX = struct.Struct("<4sHHII")
_BLOB_ALIGN = 8
MAX_JSON_BYTES = 16 << 20   # prompts and conversations travel in the JSON body
MAX_BLOBS = 16
_BLOB_NAME = re.compile(r"^[a-z_]{1,32}$")

# Request ops (caller -> worker inbox) and reply kinds (worker -> caller).
CALL_OPS = ("load", "reading", "share", "text")
CONTROL_OPS = ("cancel", "release", "share_result", "ping", "got", "cache")
REPLY_KINDS = ("ack", "alive", "tokens", "share", "result", "error", "here")


@dataclass(frozen=True)
class Envelope:
    body: dict[str, Any]
    blobs: dict[str, memoryview] = field(default_factory=dict)
    size: int = 0  # bytes of the packed message
    sender: str | None = None  # who sealed it (checked when the receiver holds the key)

    def get(self, key: str, default: Any = None) -> Any:
        return self.body.get(key, default)


def pack(body: Mapping[str, Any], blobs: Mapping[str, bytes | bytearray | memoryview] | None = None, *,
         guard: Guard | None = None, channel: str = "") -> bytes:
    """One message: `body` (JSON-serializable) and `blobs` (name -> bytes), stamped with the
    sender and sealed for `channel` by `guard` (when it holds a key)."""
    blobs = dict(blobs or {})
    if len(blobs) > MAX_BLOBS:
        raise TransportError(f"a message may carry at most {MAX_BLOBS} blobs, not {len(blobs)}")
    for name in blobs:
        if not _BLOB_NAME.match(name):
            raise TransportError(f"blob name {name!r} must be 1-32 lowercase letters or underscores")
    head = dict(body)
    head["blobs"] = [[name, len(memoryview(b).cast("B"))] for name, b in blobs.items()]
    if guard is not None:
        head["auth"] = guard.stamp()
    raw = orjson.dumps(head)
    if len(raw) > MAX_JSON_BYTES:
        raise TransportError(f"message body is {len(raw)} bytes of JSON; the limit is {MAX_JSON_BYTES}")
    # Trailing spaces (still JSON) start the first blob 8-byte aligned, so a cache in it decodes
    # as views of the received buffer rather than as an aligned copy.
    raw += b" " * (-(PREFIX.size + len(raw)) % _BLOB_ALIGN)
    kind = guard.seal_kind if guard is not None else ""
    flags = {"": 0, "sealed": SEALED, "signed": SIGNED}[kind]
    encrypt = guard is not None and guard.cipher is not None
    prefix = PREFIX.pack(MAGIC, VERSION, flags | (ENCRYPTED if encrypt else 0), len(raw), len(blobs))
    parts: list[bytes | memoryview] = [raw, *(memoryview(b).cast("B") for b in blobs.values())]
    if encrypt:
        assert guard is not None
        parts = list(guard.encrypt(channel, prefix, parts))
    parts.insert(0, prefix)
    if kind:
        assert guard is not None
        parts += guard.seal(channel, parts)[1]
    return b"".join(parts)


def unpack(data: bytes | bytearray | memoryview, *, guard: Guard | None = None, channel: str = "") -> Envelope:
    """The envelope in `data` as it arrived on `channel`, or `TransportError` when anything about
    it is off (`Rejected` when `guard` refuses it: its seal is checked before anything is parsed)."""
    mv = memoryview(data).cast("B")
    total = len(mv)
    if len(mv) < PREFIX.size:
        raise TransportError(f"message of {len(mv)} bytes is shorter than the {PREFIX.size}-byte envelope prefix")
    magic, version, flags, json_len, count = PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise TransportError(f"message is not an agentmesh envelope (magic {bytes(magic)!r})")
    if version != VERSION:
        raise TransportError(f"envelope version {version} is not supported (this agentmesh speaks {VERSION}); "
                             "run the same agentmesh version on every host")
    if flags & ~(SEALED | SIGNED | ENCRYPTED) or flags & SEALED and flags & SIGNED:
        raise TransportError(f"envelope has unknown flags {flags:#x}")
    kind = _KINDS[flags & (SEALED | SIGNED)]
    encrypted = bool(flags & ENCRYPTED)
    if guard is not None:
        end, signer = guard.verify(channel, kind, mv, encrypted)
    else:
        end, signer = split_trailer(channel, kind, mv, encrypted)
    if end < PREFIX.size:
        raise TransportError(f"sealed message of {len(mv)} bytes is too short for its seal")
    start = PREFIX.size
    if encrypted:
        if guard is None:
            raise TransportError("the message is encrypted; reading it needs the pipeline key")
        mv = guard.decrypt(channel, mv[:PREFIX.size], mv[PREFIX.size:end])
        start, end = 0, len(mv)
    elif guard is not None and guard.cipher is not None:
        raise guard.refuse("plaintext", f"a message on {channel!r} is not encrypted, and this pipeline encrypts "
                                        "(auth.encrypt)")
    if json_len > min(MAX_JSON_BYTES, end - start) or count > MAX_BLOBS:
        raise TransportError(f"envelope claims {json_len} bytes of JSON and {count} blobs in a {end - start}-byte body")
    try:
        body = orjson.loads(mv[start:start + json_len])
    except orjson.JSONDecodeError:
        raise TransportError("envelope body is not valid JSON") from None
    if not isinstance(body, dict):
        raise TransportError("envelope body must be a JSON object")
    table = body.pop("blobs", [])
    if not isinstance(table, list) or len(table) != count:
        listed = len(table) if isinstance(table, list) else "?"
        raise TransportError(f"envelope lists {listed} blobs, its prefix {count}")
    blobs: dict[str, memoryview] = {}
    pos = start + json_len
    for entry in table:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and _BLOB_NAME.match(entry[0]) and isinstance(entry[1], int) and entry[1] >= 0):
            raise TransportError(f"envelope blob entry {str(entry)[:80]!r} is not [name, size]")
        name, size = entry
        if name in blobs or pos + size > end:
            raise TransportError(f"envelope blob {name!r} repeats or runs past the end of the message")
        blobs[name] = mv[pos:pos + size]
        pos += size
    if pos != end:
        raise TransportError(f"envelope has {end - pos} trailing bytes after its blobs")
    auth = body.pop("auth", None)
    sender = guard.admit(auth, signer) if guard is not None else None
    return Envelope(body, blobs, total, sender)


class LinkControlSeal:
    """A link's control messages as envelopes sealed by `guard`'s keys (`Link.seal_control`): the
    control JSON is the blob `control` of an envelope `{"op": "link_control"}` sealed for the
    control topic, so it is checked as every envelope is (seal, encryption, topic, replay window).

    It checks with a copy of `guard` that keeps its own counters and nonces: a forged
    acknowledgement is counted by the link (`forged_control`) and here, by reason, in `dropped`,
    not among the envelopes the guard's owner dropped."""

    def __init__(self, guard: Guard) -> None:
        self.guard = replace(guard, dropped=Counter(), _seen=OrderedDict())

    @property
    def dropped(self) -> Counter[str]:
        return self.guard.dropped

    def seal(self, topic: str, body: bytes) -> bytes:
        return pack({"op": "link_control"}, {"control": body}, guard=self.guard, channel=topic)

    def open(self, topic: str, raw: bytes) -> bytes:
        try:
            env = unpack(raw, guard=self.guard, channel=topic)
        except Rejected:
            raise  # counted by reason already
        except TransportError as e:
            raise self.guard.refuse("malformed", e.message) from None
        blob = env.blobs.get("control")
        if env.get("op") != "link_control" or blob is None or len(env.blobs) != 1:
            raise self.guard.refuse("malformed", f"a sealed message on {topic!r} is not a link's control message")
        return bytes(blob)


def seal_link_control(link: Link, guard: Guard) -> None:
    """Seal `link`'s acknowledgements and requests for missing chunks with `guard`'s keys, when it
    has any (in the insecure mode they stay unsealed, as the envelopes do). On a link that serves
    a worker and a caller alike the last guard set seals; any guard of the pipeline opens its seals."""
    if guard.secure:
        link.seal_control(LinkControlSeal(guard))


def inbox_channel(host: str) -> str:
    """The channel a host's worker listens on."""
    return f"host/{validate_segment(host, 'host name')}"


def reply_channel(run: str, agent: str, to: str) -> str:
    """Where the worker answers a call for `agent` (`to`: the edge's receiver, or the caller)."""
    return edge_channel(run, f"{agent}->{to}")


def error_body(exc: BaseException) -> dict[str, Any]:
    """What a worker sends back about a failure: the error class (when it is ours), message and hint."""
    if isinstance(exc, AgentMeshError):
        return {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}
    if isinstance(exc, RunCancelled):
        return {"type": "RunCancelled", "message": str(exc), "hint": None}
    return {"type": "RunError", "message": error_line(exc), "hint": None}


def raise_remote(body: Any, agent: str, host: str) -> NoReturn:
    """Raise the error a worker reported, as the same agentmesh error class, naming its host."""
    body = body if isinstance(body, dict) else {}
    message = str(body.get("message") or "the worker reported an unspecified error")[:2000]
    hint = body.get("hint") if isinstance(body.get("hint"), str) else None
    cls = getattr(errors, str(body.get("type")), None)
    # The hint is folded into the message: the scheduler quotes the cause's text in its RunError.
    text = f"{message} (on host {host!r})" + (f" (hint: {hint[:500]})" if hint else "")
    if isinstance(cls, type) and issubclass(cls, AgentMeshError) and cls is not RunError:
        raise cls(text)
    raise RunError(text, agent=agent)
