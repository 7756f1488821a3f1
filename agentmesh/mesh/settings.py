"""What caller and workers derive from the pipeline file: the graph's fingerprint and the broker settings."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from agentmesh.errors import ConfigError
from agentmesh.graph import Graph
from agentmesh.mesh.auth import CLIENT
from agentmesh.transport.config import BrokerConfig


DEFAULT_MAX_CALLS = 8  # calls a worker serves at once
DEFAULT_MAX_REQUEST_BYTES = 512 << 20  # bytes the requests of a worker's calls in flight hold together


def graph_digest(graph: Graph) -> str:
    """A fingerprint of what caller and workers must agree on: agents, their hosts, and the edges.
    Models, prompts and paths may differ per machine (each resolves its own files)."""
    facts = {
        "name": graph.name,
        "agents": sorted((a.name, a.host or "") for a in graph.agents.values()),
        "edges": sorted((e.sender, e.receiver, e.type, e.mode or "") for e in graph.edges),
    }
    return hashlib.sha256(orjson.dumps(facts)).hexdigest()[:16]


def broker_config(graph: Graph, *, url: str | None = None, host: str | None = None, username: str | None = None,
                  password_env: str | None = None, **overrides: Any) -> BrokerConfig:
    """The broker settings for reaching `host`'s agents (or, for a worker, for serving them).

    `url` (e.g. `--broker`) wins; else the host's own `broker:` in the file, else the file's
    `broker:` url. Everything else comes from the file's `broker:` section unless given here;
    TLS file paths resolve against the file's folder. `timeout_s` bounds every wait on the
    broker and on a peer.
    """
    b = graph.broker or BrokerConfig()
    decl = graph.hosts.get(host) if host is not None else None
    chosen = url or (decl.broker if decl is not None else None) or (graph.broker.url if graph.broker else None)
    if chosen is None:
        raise ConfigError(f"graph {graph.name!r} names no MQTT broker",
                          hint="pass --broker mqtt://HOST:PORT or add `broker: {url: mqtt://HOST:PORT}` to the file")
    changes: dict[str, Any] = {"url": chosen}
    if b.tls is not None:
        resolve = lambda p: None if p is None else Path(graph.resolve_path(p))  # noqa: E731
        changes["tls"] = b.tls.model_copy(update={"ca_file": resolve(b.tls.ca_file),
                                                 "cert_file": resolve(b.tls.cert_file),
                                                 "key_file": resolve(b.tls.key_file)})
    if username is not None:
        changes["username"] = username
    if password_env is not None:
        changes["password_env"] = password_env
    try:  # validated again: the overrides come from the command line
        return BrokerConfig.model_validate({**b.model_dump(exclude_defaults=True), **changes, **overrides})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "broker"
        raise ConfigError(f"broker setting {where}: {first.get('msg', 'invalid')}") from None


def broker_timeout(graph: Graph, default: float = 60.0) -> float:
    return float(graph.broker.timeout_s) if graph.broker is not None else default


def allowed_callers(graph: Graph, host: str) -> frozenset[str]:
    """Who may call the worker of `host`: the file's `callers:` for that host, else the hosts
    (`CLIENT` for agents without a host) whose agents share an edge with this host's agents."""
    decl = graph.hosts.get(host)
    if decl is not None and decl.callers is not None:
        return frozenset(decl.callers)
    mine = {a.name for a in graph.agents_on(host)}
    out: set[str] = set()
    for e in graph.edges:
        for here, there in ((e.sender, e.receiver), (e.receiver, e.sender)):
            if here in mine and there not in mine:
                out.add(graph.agents[there].host or CLIENT)
    return frozenset(out)


def context_ref(agent: str) -> str:
    """What travels instead of `agent`'s private context: the host that runs the agent puts its
    own copy (read from its own disk) where this reference stands."""
    return f"[agentmesh: the private context of {agent}, read on its own host]"


def caller_view(graph: Graph, host: str | None) -> Graph:
    """`graph` as a caller acting as `host` runs it: an agent of another host keeps its private
    context there, so here its context is a reference (and its `context_file` is never opened)."""
    view = copy.copy(graph)
    view.agents = {name: dataclasses.replace(a, context=context_ref(name), context_file=None)
                   if a.host is not None and a.host != host and (a.context or a.context_file) else a
                   for name, a in graph.agents.items()}
    return view
