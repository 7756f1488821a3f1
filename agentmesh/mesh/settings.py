"""What caller and workers derive from the pipeline file: the graph's fingerprint and the broker settings."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from agentmesh.errors import ConfigError
from agentmesh.graph import Graph
from agentmesh.transport.mqtt import MqttConfig


def graph_digest(graph: Graph) -> str:
    """A fingerprint of what caller and workers must agree on: agents, their hosts, and the edges.
    Models, prompts and paths may differ per machine (each resolves its own files)."""
    facts = {
        "name": graph.name,
        "agents": sorted((a.name, a.host or "") for a in graph.agents.values()),
        "edges": sorted((e.sender, e.receiver, e.type, e.mode or "") for e in graph.edges),
    }
    return hashlib.sha256(orjson.dumps(facts)).hexdigest()[:16]


def mqtt_config(graph: Graph, *, url: str | None = None, host: str | None = None, username: str | None = None,
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


def broker_timeout(graph: Graph, default: float = 60.0) -> float:
    return float(graph.broker.timeout_s) if graph.broker is not None else default
