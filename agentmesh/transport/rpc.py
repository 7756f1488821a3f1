"""The request/reply protocol between a run's caller and the workers that host its agents.

Channels (over any `Link`; with `MqttLink` a channel `c` is the topic `{topic_root}/{graph}/c/msg`):

* `host/{host}`: a worker's inbox. Every message for the agents of that host goes there
  (requests, cancels, the sharer caches a fusing receiver asked for). One fixed channel per host,
  because links subscribe to exact channels (no wildcards) and a worker outlives runs.
* `{run}/{agent}->{to}` (`edge_channel`): replies to the caller. `to` is the receiver the reply
  feeds when it carries a cache along a graph edge (`librarian->assistant`), else the caller's
  name, so the per-channel link counters read as bytes per edge.

Every message is an envelope: a small JSON body plus named binary blobs (encoded caches)

    magic b"AMRP" | version u16 | reserved u16 | JSON length u32 | blob count u32   (little-endian)
    JSON body (with "blobs": [[name, size], ...]) | blob bytes, in that order

Caches inside are `encode_cache` payloads, checked by `decode_cache`; nothing is ever unpickled.
Envelopes come from the network: `unpack` checks sizes and shapes before trusting anything.
"""
from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NoReturn

import orjson
from pydantic import ValidationError

from agentmesh import errors
from agentmesh.errors import AgentMeshError, ConfigError, RunError, TransportError
from agentmesh.transport.link import edge_channel, validate_segment
from agentmesh.transport.mqtt import MqttConfig

MAGIC = b"AMRP"
VERSION = 1
PREFIX = struct.Struct("<4sHHII")
MAX_JSON_BYTES = 64 << 20   # prompts and documents travel in the JSON body
MAX_BLOBS = 16
_BLOB_NAME = re.compile(r"^[a-z_]{1,32}$")

# Request ops (caller -> worker inbox) and reply kinds (worker -> caller).
CALL_OPS = ("load", "reading", "share", "text")
CONTROL_OPS = ("cancel", "release", "share_result")
REPLY_KINDS = ("ack", "alive", "tokens", "share", "result", "error")


@dataclass(frozen=True)
class Envelope:
    body: dict[str, Any]
    blobs: dict[str, memoryview] = field(default_factory=dict)
    size: int = 0  # bytes of the packed message

    def get(self, key: str, default: Any = None) -> Any:
        return self.body.get(key, default)


def pack(body: Mapping[str, Any], blobs: Mapping[str, bytes | bytearray | memoryview] | None = None) -> bytes:
    """One message: `body` (JSON-serializable) and `blobs` (name -> bytes)."""
    blobs = dict(blobs or {})
    if len(blobs) > MAX_BLOBS:
        raise TransportError(f"a message may carry at most {MAX_BLOBS} blobs, not {len(blobs)}")
    for name in blobs:
        if not _BLOB_NAME.match(name):
            raise TransportError(f"blob name {name!r} must be 1-32 lowercase letters or underscores")
    head = dict(body)
    head["blobs"] = [[name, len(memoryview(b).cast("B"))] for name, b in blobs.items()]
    raw = orjson.dumps(head)
    if len(raw) > MAX_JSON_BYTES:
        raise TransportError(f"message body is {len(raw)} bytes of JSON; the limit is {MAX_JSON_BYTES}")
    return b"".join([PREFIX.pack(MAGIC, VERSION, 0, len(raw), len(blobs)), raw,
                     *(memoryview(b).cast("B") for b in blobs.values())])


def unpack(data: bytes | bytearray | memoryview) -> Envelope:
    """The envelope in `data`, or `TransportError` when anything about it is off."""
    mv = memoryview(data).cast("B")
    if len(mv) < PREFIX.size:
        raise TransportError(f"message of {len(mv)} bytes is shorter than the {PREFIX.size}-byte envelope prefix")
    magic, version, _, json_len, count = PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise TransportError(f"message is not an agentmesh envelope (magic {bytes(magic)!r})")
    if version != VERSION:
        raise TransportError(f"envelope version {version} is not supported (this agentmesh speaks {VERSION}); "
                             "run the same agentmesh version on every host")
    if json_len > min(MAX_JSON_BYTES, len(mv) - PREFIX.size) or count > MAX_BLOBS:
        raise TransportError(f"envelope claims {json_len} bytes of JSON and {count} blobs in a {len(mv)}-byte message")
    try:
        body = orjson.loads(mv[PREFIX.size:PREFIX.size + json_len])
    except orjson.JSONDecodeError:
        raise TransportError("envelope body is not valid JSON") from None
    if not isinstance(body, dict):
        raise TransportError("envelope body must be a JSON object")
    table = body.pop("blobs", [])
    if not isinstance(table, list) or len(table) != count:
        listed = len(table) if isinstance(table, list) else "?"
        raise TransportError(f"envelope lists {listed} blobs, its prefix {count}")
    blobs: dict[str, memoryview] = {}
    pos = PREFIX.size + json_len
    for entry in table:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and _BLOB_NAME.match(entry[0]) and isinstance(entry[1], int) and entry[1] >= 0):
            raise TransportError(f"envelope blob entry {str(entry)[:80]!r} is not [name, size]")
        name, size = entry
        if name in blobs or pos + size > len(mv):
            raise TransportError(f"envelope blob {name!r} repeats or runs past the end of the message")
        blobs[name] = mv[pos:pos + size]
        pos += size
    if pos != len(mv):
        raise TransportError(f"envelope has {len(mv) - pos} trailing bytes after its blobs")
    return Envelope(body, blobs, len(mv))


# ---- channels ---------------------------------------------------------------------------------------
def inbox_channel(host: str) -> str:
    """The channel a host's worker listens on."""
    return f"host/{validate_segment(host, 'host name')}"


def reply_channel(run: str, agent: str, to: str) -> str:
    """Where the worker answers a call for `agent` (`to`: the edge's receiver, or the caller)."""
    return edge_channel(run, f"{agent}->{to}")


# ---- the graph both sides must agree on -----------------------------------------------------------------
def graph_digest(graph: Any) -> str:
    """A fingerprint of what caller and workers must agree on: agents, their hosts, and the edges.
    Models, prompts and paths may differ per machine (each resolves its own files)."""
    facts = {
        "name": graph.name,
        "agents": sorted((a.name, a.host or "") for a in graph.agents.values()),
        "edges": sorted((e.sender, e.receiver, e.type, e.mode or "") for e in graph.edges),
    }
    return hashlib.sha256(orjson.dumps(facts)).hexdigest()[:16]


# ---- broker settings ------------------------------------------------------------------------------------
def mqtt_config(graph: Any, *, url: str | None = None, host: str | None = None, username: str | None = None,
                password_env: str | None = None, **overrides: Any) -> MqttConfig:
    """The `MqttConfig` for reaching `host`'s agents (or, for a worker, for serving them).

    `url` (e.g. `--broker`) wins; else the host's own `broker:` in the file, else the file's
    `broker:` url. Username, password variable, TLS and timeouts come from the file's `broker:`
    section unless given here. `timeout_s` bounds every wait on the broker and on a peer.
    """
    b = graph.broker
    decl = graph.hosts.get(host) if host is not None else None
    chosen = url or (decl.broker if decl is not None else None) or (b.url if b is not None else None)
    if chosen is None:
        raise ConfigError(f"graph {graph.name!r} names no MQTT broker",
                          hint="pass --broker mqtt://HOST:PORT or add `broker: {url: mqtt://HOST:PORT}` to the file")
    opts: dict[str, Any] = {}
    if b is not None:
        opts.update(username=b.username, password_env=b.password_env, topic_root=b.topic_prefix,
                    keepalive=max(5, int(b.keepalive_s)), chunk_size=b.chunk_bytes,
                    connect_timeout=b.timeout_s, send_timeout=b.timeout_s)
        if b.tls is not None:
            if chosen.startswith("mqtt://"):  # `tls:` in the file turns the connection into TLS
                chosen = "mqtts://" + chosen[len("mqtt://"):]
            resolve = lambda p: None if p is None else Path(graph.resolve_path(p))  # noqa: E731
            opts.update(tls_ca=resolve(b.tls.ca_file), tls_cert=resolve(b.tls.cert_file),
                        tls_key=resolve(b.tls.key_file), tls_insecure=b.tls.insecure)
    if username is not None:
        opts["username"] = username
    if password_env is not None:
        opts["password_env"] = password_env
    opts.update(overrides)
    try:
        return MqttConfig(url=chosen, **opts)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "broker"
        why = str(first.get("msg", "invalid")).replace("Value error, ", "")
        raise ConfigError(f"broker setting {where}: {why}") from None


def broker_timeout(graph: Any, default: float = 60.0) -> float:
    return float(graph.broker.timeout_s) if graph.broker is not None else default


# ---- errors across the wire -------------------------------------------------------------------------------
def error_body(exc: BaseException) -> dict[str, Any]:
    """What a worker sends back about a failure: the error class (when it is ours), message and hint."""
    if isinstance(exc, AgentMeshError):
        return {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}
    if type(exc).__name__ == "RunCancelled":
        return {"type": "RunCancelled", "message": str(exc), "hint": None}
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return {"type": "RunError", "message": text, "hint": None}


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
