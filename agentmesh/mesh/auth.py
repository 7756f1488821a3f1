"""Who may talk to whom across hosts: the key, the seal on every envelope, and the replay window.

Every envelope between hosts carries `auth: {from, nonce, ts}` in its body and, with a key, an
HMAC-SHA256 trailer over the graph name, the channel it was sent on and every byte of the message.
The key never travels and never sits in the pipeline file: `auth: {key_env: NAME}` or
`auth: {key_file: PATH}` says where each host finds it (the same key on every host of the graph).

A receiver accepts a sealed envelope once, only on the channel it was sealed for, only within
`window_s` seconds of its timestamp, and only from a sender its caller lets in (the worker: hosts
the pipeline allows to call it; the caller: the host it called). Everything else is dropped and
counted in `Guard.dropped` by reason, never executed.

What this does not give: with one key per graph, any host holding it can claim to be any other
host of that graph; secrecy of payloads (see `agentmesh.mesh.envelope` for what travels).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import stat
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from agentmesh.errors import ConfigError, TransportError
from agentmesh.graph import Graph

CLIENT = "client"  # the identity of a caller acting as no host (`agentmesh run` without --host)
MAC_BYTES = 32
MIN_KEY_BYTES = 16
MAX_KEY_FILE_BYTES = 4096
_MAX_NONCES = 200_000
_DOMAIN = b"agentmesh-envelope-v2\x00"


class Rejected(TransportError):
    """A message that failed authentication or authorisation; `reason` is its counter's name."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


def load_key(graph: Graph) -> bytes | None:
    """The graph's key from where `auth:` says it is (None without an `auth:` section)."""
    auth = graph.auth
    if auth is None:
        return None
    if auth.key_env is not None:
        value = os.environ.get(auth.key_env)
        if not value:
            raise ConfigError(f"auth.key_env: environment variable {auth.key_env} is not set",
                              hint=f"export {auth.key_env}=$(openssl rand -hex 32) on every host, the same value")
        return _checked(value.strip().encode(), f"${auth.key_env}")
    path = Path(graph.resolve_path(str(auth.key_file)))
    try:
        info = path.stat()
    except OSError as e:
        raise ConfigError(f"auth.key_file: cannot read {path}: {e.strerror or e}",
                          hint="create it with `openssl rand -hex 32 > FILE && chmod 600 FILE`") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"auth.key_file: {path} is not a regular file")
    if info.st_mode & 0o077:
        raise ConfigError(f"auth.key_file: {path} can be read by other users (mode {stat.S_IMODE(info.st_mode):o})",
                          hint=f"chmod 600 {path}")
    if info.st_size > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"auth.key_file: {path} is {info.st_size} bytes; a key file holds one key "
                          f"(at most {MAX_KEY_FILE_BYTES} bytes)")
    return _checked(path.read_bytes().strip(), str(path))


def _checked(key: bytes, where: str) -> bytes:
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"the key in {where} is {len(key)} bytes; use at least {MIN_KEY_BYTES}",
                          hint="make one with `openssl rand -hex 32`")
    return key


@dataclass
class Guard:
    """Seals what this side sends and checks what it receives, for one graph and one identity.

    `key=None` is the insecure mode (`--insecure`): envelopes go out unsealed, and sealed or not,
    whatever arrives is taken at its word.
    """

    key: bytes | None
    identity: str
    graph: str
    window_s: float = 60.0
    clock: Callable[[], float] = time.time
    dropped: Counter[str] = field(default_factory=Counter)
    _seen: OrderedDict[str, float] = field(default_factory=OrderedDict)

    @property
    def secure(self) -> bool:
        return self.key is not None

    def stamp(self) -> dict[str, object]:
        """The `auth` field of an outgoing envelope: who sends it, a fresh nonce, the time."""
        return {"from": self.identity, "nonce": os.urandom(16).hex(), "ts": round(self.clock(), 3)}

    def mac(self, channel: str, parts: list[bytes | memoryview]) -> bytes:
        """HMAC-SHA256 of `parts` (the whole message but its trailer), bound to graph and channel."""
        assert self.key is not None
        m = hmac.new(self.key, _DOMAIN + self.graph.encode() + b"\x00" + channel.encode() + b"\x00",
                     hashlib.sha256)
        for p in parts:
            m.update(p)
        return m.digest()

    def verify(self, channel: str, signed: memoryview, trailer: memoryview | None) -> None:
        """Check the seal of a message that arrived on `channel` (before anything in it is parsed)."""
        if self.key is None:
            return
        if trailer is None:
            raise self._reject("unsigned", f"a message on {channel!r} carries no seal")
        if not hmac.compare_digest(self.mac(channel, [signed]), trailer):
            raise self._reject("bad_seal", f"a message on {channel!r} has a wrong seal")

    def admit(self, auth: object) -> str:
        """The sender named in a verified message's `auth` field, if it is fresh and not a replay."""
        if not isinstance(auth, dict) or not isinstance(auth.get("from"), str):
            raise self._reject("unsigned", "the message names no sender")
        sender: str = auth["from"]
        if self.key is None:
            return sender
        nonce, ts = auth.get("nonce"), auth.get("ts")
        if not (isinstance(nonce, str) and len(nonce) == 32 and isinstance(ts, (int, float))):
            raise self._reject("unsigned", f"message from {sender!r} has no nonce or timestamp")
        now = self.clock()
        if abs(now - float(ts)) > self.window_s:
            raise self._reject("stale", f"message from {sender!r} is {now - float(ts):+.0f} s off this host's "
                                        f"clock (window {self.window_s:g} s)")
        self._forget(now)
        if nonce in self._seen:
            raise self._reject("replayed", f"message from {sender!r} was seen before (nonce {nonce[:8]}...)")
        self._seen[nonce] = now
        return sender

    def refuse(self, reason: str, message: str) -> Rejected:
        """Count a message dropped for `reason` (e.g. an unauthorised sender) and say why."""
        return self._reject(reason, message)

    def _reject(self, reason: str, message: str) -> Rejected:
        self.dropped[reason] += 1
        return Rejected(reason, message)

    def _forget(self, now: float) -> None:
        # A nonce older than the window can be forgotten: its message would be stale anyway.
        while self._seen and (len(self._seen) > _MAX_NONCES or
                              now - next(iter(self._seen.values())) > 2 * self.window_s):
            self._seen.popitem(last=False)


def make_guard(graph: Graph, identity: str, *, key: bytes | None = None, insecure: bool = False) -> Guard:
    """The guard of `identity` (a host name or `CLIENT`) for `graph`: `key`, else the graph's
    `auth:` key; without one, `ConfigError` unless `insecure` (loopback development)."""
    key = key if key is not None else load_key(graph)
    if key is None and not insecure:
        raise ConfigError(f"graph {graph.name!r} has no key to authenticate messages between hosts, so anyone on "
                          "the broker could drive its workers",
                          hint="add `auth: {key_file: mesh.key}` (or key_env:) to the file, the same key on every "
                               "host, or pass --insecure for loopback development")
    window = graph.auth.window_s if graph.auth is not None else 60.0
    return Guard(key=key, identity=identity, graph=graph.name, window_s=window)
