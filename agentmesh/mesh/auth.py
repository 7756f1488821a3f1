"""Who may talk to whom across hosts: the keys, the seal on every envelope, and the replay window.

Every envelope between hosts carries `auth: {from, nonce, ts}` in its body and a seal over the
graph name, the channel it was sent on and every byte of the message. Keys never travel and never
sit in the pipeline file; `auth:` names where each host finds them (`key_env: NAME` or
`key_file: PATH`):

* the pipeline key (`auth.key_env`/`key_file`, the same on every host): an HMAC-SHA256 seal. Any
  holder can seal as any host of the graph.
* a key per host (`auth.hosts.NAME`: the host's Ed25519 private key, read only on that host, and
  its public key, written in the file for the others): an Ed25519 signature. A host with its own
  key is believed only when it signed; holding another host's key, or the pipeline key, is not
  enough to speak as it.
* `auth.encrypt: true`: the body and blobs are encrypted with AES-256-GCM under a key derived
  from the pipeline key (so a broker operator, or anyone who may subscribe, reads nothing but the
  envelope prefix and, for a signed message, the signer's name). A signature covers the
  ciphertext; with the pipeline key alone the AES-GCM tag is the seal (one pass, no HMAC).

A receiver accepts a sealed envelope once, only on the channel it was sealed for, only within
`window_s` seconds of its timestamp, and only from a sender its caller lets in (the worker: hosts
the pipeline allows to call it; the caller: the host it called). Everything else is dropped and
counted in `Guard.dropped` by reason, never executed.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agentmesh.errors import ConfigError, TransportError
from agentmesh.graph import Graph
from agentmesh.graph.spec import CLIENT_HOST, KeySource

CLIENT = CLIENT_HOST  # the identity of a caller acting as no host (`agentmesh run` without --host)
MAC_BYTES = 32
SIG_BYTES = 64
NONCE_BYTES = 12  # AES-GCM
TAG_BYTES = 16
MIN_KEY_BYTES = 16
MAX_KEY_FILE_BYTES = 4096
MAX_NAME_BYTES = 64
MAX_SEALED_BYTES = (1 << 31) - 1  # what one AES-GCM call takes
_MAX_NONCES = 200_000
_DOMAIN = b"agentmesh-envelope-v2\x00"
_CIPHER_INFO = b"agentmesh-aes-256-gcm-v1\x00"


class Rejected(TransportError):
    """A message that failed authentication or authorisation; `reason` is its counter's name."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


def _read_secret(source: KeySource, graph: Graph, where: str, env_hint: str, file_hint: str) -> bytes | None:
    """The bytes in the environment variable or file that `source` names, stripped; None when it
    names neither. The secret itself is never put in an error."""
    key_env, key_file = source.key_env, source.key_file
    if key_env is not None:
        value = os.environ.get(key_env)
        if not value:
            raise ConfigError(f"{where}.key_env: environment variable {key_env} is not set",
                              hint=env_hint.format(name=key_env))
        return value.strip().encode()
    if key_file is None:
        return None
    path = Path(graph.resolve_path(str(key_file)))
    try:
        info = path.stat()
    except OSError as e:
        raise ConfigError(f"{where}.key_file: cannot read {path}: {e.strerror or e}",
                          hint=file_hint.format(path=path)) from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{where}.key_file: {path} is not a regular file")
    if info.st_mode & 0o077:
        raise ConfigError(f"{where}.key_file: {path} can be read by other users (mode {stat.S_IMODE(info.st_mode):o})",
                          hint=f"chmod 600 {path}")
    if info.st_size > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"{where}.key_file: {path} is {info.st_size} bytes; a key file holds one key "
                          f"(at most {MAX_KEY_FILE_BYTES} bytes)")
    return path.read_bytes().strip()


def _source_name(source: KeySource) -> str:
    return f"${source.key_env}" if source.key_env is not None else str(source.key_file)


def load_key(graph: Graph) -> bytes | None:
    """The graph's pipeline key from where `auth:` says it is (None without one)."""
    if graph.auth is None:
        return None
    key = _read_secret(graph.auth, graph, "auth", "export {name}=$(openssl rand -hex 32) on every host, the same value",
                       "make it with `openssl rand -hex 32 > {path} && chmod 600 {path}`, the same on every host")
    if key is not None and len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"the key in {_source_name(graph.auth)} is {len(key)} bytes; use at least {MIN_KEY_BYTES}",
                          hint="make one with `openssl rand -hex 32`")
    return key


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The `public_key:` value of a host key: its 32 raw bytes in base64."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def private_key_text(key: Ed25519PrivateKey) -> str:
    """A host key as its key file holds it: the 32-byte seed in hex."""
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption()).hex()


def parse_private_key(data: bytes, where: str) -> Ed25519PrivateKey:
    """An Ed25519 private key from 64 hex digits (`agentmesh keygen`) or a PEM file
    (`openssl genpkey -algorithm ed25519`)."""
    bad = ConfigError(f"{where} holds no Ed25519 private key",
                      hint="make one with `agentmesh keygen FILE` (or `openssl genpkey -algorithm ed25519 -out FILE`)")
    if data.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise bad from None
        if not isinstance(key, Ed25519PrivateKey):
            raise bad
        return key
    try:
        seed = bytes.fromhex(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise bad from None
    if len(seed) != 32:
        raise bad
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_keys(graph: Graph) -> dict[str, Ed25519PublicKey]:
    """The public key of every host that has its own key (`auth.hosts`)."""
    if graph.auth is None:
        return {}
    out = {}
    for name, spec in graph.auth.hosts.items():
        try:
            out[name] = Ed25519PublicKey.from_public_bytes(base64.b64decode(spec.public_key))
        except ValueError:
            raise ConfigError(f"auth.hosts.{name}.public_key is not an Ed25519 public key",
                              hint="paste the `public_key:` that `agentmesh keygen` printed") from None
    return out


def load_host_key(graph: Graph, identity: str) -> Ed25519PrivateKey | None:
    """`identity`'s own signing key (None when the file gives it none), checked against the public
    key the file names for it."""
    spec = graph.auth.hosts.get(identity) if graph.auth is not None else None
    if spec is None:
        return None
    where = f"auth.hosts.{identity}"
    data = _read_secret(spec, graph, where, "export {name}=$(cat FILE) after `agentmesh keygen FILE --host "
                        f"{identity}` on this host", f"make it on this host with `agentmesh keygen {{path}} --host {identity}`")
    assert data is not None  # the schema requires a source
    key = parse_private_key(data, _source_name(spec))
    if public_key_text(key) != spec.public_key:
        raise ConfigError(f"{where}: the key in {_source_name(spec)} does not match the file's public_key "
                          f"(its public key is {public_key_text(key)})",
                          hint="use that host's own key file, or put its public key in the pipeline file")
    return key


def cipher_key(key: bytes, graph: str) -> bytes:
    """The AES-256 key of `graph`, derived from its pipeline key (the MAC key stays separate)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_CIPHER_INFO + graph.encode()).derive(key)


def split_trailer(channel: str, kind: str, mv: memoryview, encrypted: bool = False) -> tuple[int, str | None]:
    """Where a message's sealed part ends, and the signer its signature names (unchecked). An
    encrypted message sealed with the pipeline key has no trailer: its AES-GCM tag is the seal."""
    if kind == "" or kind == "sealed" and encrypted:
        return len(mv), None
    if kind == "sealed":
        if len(mv) < MAC_BYTES:
            raise Rejected("bad_seal", f"a sealed message on {channel!r} is too short for its seal")
        return len(mv) - MAC_BYTES, None
    sig = len(mv) - SIG_BYTES
    if sig < 1 or mv[sig - 1] > MAX_NAME_BYTES or sig - 1 - mv[sig - 1] < 0:
        raise Rejected("bad_seal", f"a signed message on {channel!r} is too short for its signature")
    start = sig - 1 - mv[sig - 1]
    try:
        return start, bytes(mv[start:sig - 1]).decode("ascii")
    except UnicodeDecodeError:
        raise Rejected("bad_seal", f"a signed message on {channel!r} names no signer") from None


@dataclass
class Guard:
    """Seals what this side sends and checks what it receives, for one graph and one identity.

    `key`: the pipeline key (HMAC); `signer`: this identity's own key (it signs instead);
    `publics`: the hosts with their own keys (only their signature speaks for them);
    `cipher`: encrypt every message (and accept only encrypted ones).
    With none of them it is the insecure mode (`--insecure`): envelopes go out unsealed, and sealed
    or not, whatever arrives is taken at its word.
    """

    key: bytes | None
    identity: str
    graph: str
    window_s: float = 60.0
    clock: Callable[[], float] = time.time
    signer: Ed25519PrivateKey | None = None
    publics: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)
    cipher: AESGCM | None = None
    dropped: Counter[str] = field(default_factory=Counter)
    _seen: OrderedDict[str, float] = field(default_factory=OrderedDict)

    @property
    def secure(self) -> bool:
        return self.key is not None or self.signer is not None or bool(self.publics)

    def stamp(self) -> dict[str, object]:
        """The `auth` field of an outgoing envelope: who sends it, a fresh nonce, the time."""
        return {"from": self.identity, "nonce": os.urandom(16).hex(), "ts": round(self.clock(), 3)}

    def _context(self, channel: str) -> bytes:
        return _DOMAIN + self.graph.encode() + b"\x00" + channel.encode() + b"\x00"

    def mac(self, channel: str, parts: Sequence[bytes | memoryview]) -> bytes:
        """HMAC-SHA256 of `parts` (the whole message but its trailer), bound to graph and channel."""
        assert self.key is not None
        m = hmac.new(self.key, self._context(channel), hashlib.sha256)
        for p in parts:
            m.update(p)
        return m.digest()

    def _digest(self, channel: str, parts: Sequence[bytes | memoryview]) -> bytes:
        h = hashlib.sha256(self._context(channel))
        for p in parts:
            h.update(p)
        return h.digest()

    @property
    def seal_kind(self) -> str:
        """How this side seals: "signed" (its own key), "sealed" (the pipeline key) or "" (insecure)."""
        return "signed" if self.signer is not None else "sealed" if self.key is not None else ""

    def seal(self, channel: str, parts: list[bytes | memoryview]) -> tuple[str, list[bytes]]:
        """The seal for `parts` sent on `channel`: ("signed", [name, len, signature]) with this
        host's own key, ("sealed", [mac]) with the pipeline key, ("", []) in the insecure mode."""
        if self.signer is not None:
            name = self.identity.encode()
            head = [name, bytes([len(name)])]
            return "signed", head + [self.signer.sign(self._digest(channel, [*parts, *head]))]
        if self.key is not None:
            # Encrypted, the AES-GCM tag under the pipeline key's cipher key already seals it.
            return "sealed", [] if self.cipher is not None else [self.mac(channel, parts)]
        return "", []

    def verify(self, channel: str, kind: str, mv: memoryview, encrypted: bool = False) -> tuple[int, str | None]:
        """Check the seal of a whole message that arrived on `channel` (before anything in it is
        parsed); `kind` is what its flags say it carries. Returns where the sealed bytes end and,
        for a signature, the host that signed. (The tag of an encrypted message sealed with the
        pipeline key is checked when `decrypt` opens it.)"""
        try:
            end, signer = split_trailer(channel, kind, mv, encrypted)
        except Rejected as e:
            raise self._reject(e.reason, e.message) from None
        if not self.secure:
            return end, None
        if kind == "":
            raise self._reject("unsigned", f"a message on {channel!r} carries no seal")
        if kind == "sealed":
            if self.key is None:
                raise self._reject("bad_seal", f"a message on {channel!r} is sealed with a pipeline key, and this "
                                               "pipeline has none")
            if encrypted:
                return end, None
            if not hmac.compare_digest(self.mac(channel, [mv[:end]]), mv[end:]):
                raise self._reject("bad_seal", f"a message on {channel!r} has a wrong seal")
            return end, None
        assert signer is not None
        public = self.publics.get(signer)
        if public is None:
            raise self._reject("bad_seal", f"a message on {channel!r} is signed by {signer[:40]!r}, which has no "
                                           "public key in the pipeline file")
        sig = len(mv) - SIG_BYTES
        try:
            public.verify(bytes(mv[sig:]), self._digest(channel, [mv[:sig]]))
        except InvalidSignature:
            raise self._reject("bad_seal", f"a message on {channel!r} has a wrong signature for {signer!r}") from None
        return end, signer

    def encrypt(self, channel: str, prefix: bytes, parts: Sequence[bytes | memoryview]) -> list[bytes]:
        """`parts` (the body and blobs) as [nonce, ciphertext + tag], bound to the prefix, graph and channel."""
        assert self.cipher is not None
        size = sum(len(p) for p in parts)
        if size > MAX_SEALED_BYTES - TAG_BYTES:
            raise TransportError(f"an encrypted message holds at most {MAX_SEALED_BYTES - TAG_BYTES} bytes, not {size}")
        nonce = os.urandom(NONCE_BYTES)
        return [nonce, self.cipher.encrypt(nonce, b"".join(parts), self._context(channel) + prefix)]

    def decrypt(self, channel: str, prefix: bytes | memoryview, data: memoryview) -> memoryview:
        """The body and blobs of an encrypted message (its seal already checked)."""
        if self.cipher is None:
            raise self._reject("bad_seal", f"a message on {channel!r} is encrypted, and this host has no "
                                           "auth.encrypt")
        if len(data) < NONCE_BYTES + TAG_BYTES:
            raise self._reject("bad_seal", f"an encrypted message on {channel!r} is too short")
        try:
            plain = self.cipher.decrypt(bytes(data[:NONCE_BYTES]), bytes(data[NONCE_BYTES:]),
                                        self._context(channel) + bytes(prefix))
        except InvalidTag:
            raise self._reject("bad_seal", f"an encrypted message on {channel!r} does not decrypt") from None
        return memoryview(plain)

    def admit(self, auth: object, signer: str | None = None) -> str:
        """The sender named in a verified message's `auth` field, if it is fresh, not a replay,
        and (for a host with its own key) signed by that host."""
        if not isinstance(auth, dict) or not isinstance(auth.get("from"), str):
            raise self._reject("unsigned", "the message names no sender")
        sender: str = auth["from"]
        if not self.secure:
            return sender
        if signer is not None and signer != sender:
            raise self._reject("wrong_key", f"a message from {sender!r} is signed by {signer!r}")
        if signer is None and sender in self.publics:
            raise self._reject("wrong_key", f"a message from {sender!r} is not signed with {sender!r}'s own key")
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
    """The guard of `identity` (a host name or `CLIENT`) for `graph`: the pipeline key (`key`, else
    the graph's `auth:` key) and `identity`'s own key from `auth.hosts`; without any key,
    `ConfigError` unless `insecure` (loopback development)."""
    auth = graph.auth
    key = key if key is not None else load_key(graph)
    signer = load_host_key(graph, identity)
    publics = public_keys(graph)
    if key is None and signer is None:
        if publics:
            raise ConfigError(f"host {identity!r} has no key: the pipeline file gives keys to "
                              f"{', '.join(sorted(publics))} only, and no pipeline key",
                              hint=f"add {identity} under auth: hosts: (agentmesh keygen prints the lines), or "
                                   "a pipeline key (auth: key_env:)")
        if not insecure:
            raise ConfigError(f"graph {graph.name!r} has no key to authenticate messages between hosts, so anyone "
                              "on the broker could drive its workers",
                              hint="add `auth: {key_file: mesh.key}` (or key_env:) to the file, the same key on "
                                   "every host, or pass --insecure for loopback development")
    cipher = AESGCM(cipher_key(key, graph.name)) if auth is not None and auth.encrypt and key is not None else None
    return Guard(key=key, identity=identity, graph=graph.name, window_s=auth.window_s if auth is not None else 60.0,
                 signer=signer, publics=publics, cipher=cipher)

