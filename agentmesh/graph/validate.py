"""Whole-graph checks. Each failure is one GraphError: `FILE:LINE: key.path: what is wrong (hint: ...)`.

The schema (spec.py) checks each value; this module checks what needs the whole graph: names that
refer to other entries, cycles, the fuser of every `fuse` edge, `prefix` edges, prompt placeholders
and hosts. A fuser's own metadata is checked only through `fuser_info(ref) -> (receiver_id,
sharer_id) | None`, which the checkpoint code supplies (it must not load weights).
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path

from agentmesh.errors import AgentMeshError, GraphError
from agentmesh.graph import template
from agentmesh.graph.graph import Graph
from agentmesh.graph.source import KeyPath, choices_hint, graph_error
from agentmesh.graph.spec import CLIENT_HOST

FuserInfo = Callable[[str], "tuple[str, str] | None"]


def validate_graph(graph: Graph, *, fuser_info: FuserInfo | None = None) -> None:
    """Raise the first problem found as a GraphError; return None for a valid graph."""
    graph.to_spec()  # value checks (types, ranges, names) for graphs built in Python
    _check_tables(graph)
    _check_agents(graph)
    _check_edges(graph)
    graph.check_acyclic()
    _check_receivers(graph)
    _check_fusers(graph, fuser_info)
    _check_prompts(graph)
    _check_inputs_outputs(graph)


def _err(graph: Graph, path: KeyPath, message: str, hint: str | None = None) -> GraphError:
    return graph_error(graph.source or f"graph {graph.name!r}", path, message, hint)


def _check_tables(graph: Graph) -> None:
    for alias, decl in graph.fusers.items():
        for key in ("receiver", "sharer"):
            model = getattr(decl, key)
            if model is not None and model not in graph.models:
                raise _err(graph, ("fusers", alias, key), f"unknown model alias {model!r}",
                           choices_hint(model, graph.models, "models"))
    for host in graph.auth.hosts if graph.auth is not None else ():
        if host not in graph.hosts and host != CLIENT_HOST:
            raise _err(graph, ("auth", "hosts", host), f"host {host!r} is not declared",
                       choices_hint(host, graph.hosts, "hosts") + f"; declare it under hosts: (or use {CLIENT_HOST} "
                       "for a caller without --host)")


def _check_agents(graph: Graph) -> None:
    for name, agent in graph.agents.items():
        if agent.model is not None and agent.model not in graph.models and graph.models:
            close = difflib.get_close_matches(agent.model, list(graph.models), n=1, cutoff=0.75)
            if close:  # a near-miss of an alias is a typo, not a model ref
                raise _err(graph, ("agents", name, "model"), f"unknown model alias {agent.model!r}",
                           f"did you mean {close[0]!r}?")
        if agent.host is not None and agent.host not in graph.hosts:
            raise _err(graph, ("agents", name, "host"), f"host {agent.host!r} is not declared",
                       choices_hint(agent.host, graph.hosts, "hosts") + "; declare it under hosts:")
        if agent.context_file is not None:
            graph.context_of(name)  # a missing, oversized or unreadable file (a FIFO, a folder) fails here


def _check_edges(graph: Graph) -> None:
    seen: dict[tuple[str, str], int] = {}
    for i, e in enumerate(graph.edges):
        for key, name in (("from", e.sender), ("to", e.receiver)):
            if name not in graph.agents:
                raise _err(graph, ("edges", i, key), f"unknown agent {name!r}",
                           choices_hint(name, graph.agents, "agents"))
        if e.sender == e.receiver:
            raise _err(graph, ("edges", i), f"edge from {e.sender!r} to itself", "an agent cannot feed itself")
        pair = (e.sender, e.receiver)
        if pair in seen:
            raise _err(graph, ("edges", i), f"second edge {e.sender} -> {e.receiver} (first is edges[{seen[pair]}])",
                       "keep one edge per pair of agents")
        seen[pair] = i
        if e.type == "text":
            if e.mode is not None:
                raise _err(graph, ("edges", i, "mode"), f"mode {e.mode!r} on a text edge",
                           "mode belongs to cache edges; write type: cache or drop mode")
            if e.fuser is not None:
                raise _err(graph, ("edges", i, "fuser"), "fuser on a text edge",
                           "fusers belong to cache edges in fuse mode")
        elif e.mode == "prefix":
            if e.fuser is not None:
                raise _err(graph, ("edges", i, "fuser"), "fuser on a prefix edge",
                           "a prefix edge needs no fuser; use mode: fuse to fuse through it")
            s, r = graph.model_of(e.sender), graph.model_of(e.receiver)
            if not s.same_weights(r):
                raise _err(graph, ("edges", i, "mode"),
                           f"prefix edge {e.sender} -> {e.receiver} joins different models "
                           f"({_model_label(s)} and {_model_label(r)})",
                           "prefix needs the same model and dtype on both ends; use mode: fuse with a fuser")


def _model_label(m: object) -> str:
    ref, dtype = getattr(m, "ref"), getattr(m, "dtype")
    return ref if dtype == "auto" else f"{ref} {dtype}"


def _check_receivers(graph: Graph) -> None:
    for name, agent in graph.agents.items():
        cache_in = [(i, e) for i, e in enumerate(graph.edges) if e.receiver == name and e.type == "cache"]
        prefix = [(i, e) for i, e in cache_in if e.mode == "prefix"]
        fuse = [(i, e) for i, e in cache_in if e.mode == "fuse"]
        if len(prefix) > 1:
            i, _ = prefix[1]
            senders = ", ".join(e.sender for _, e in prefix)
            raise _err(graph, ("edges", i), f"{name} has prefix edges from several senders ({senders})",
                       "a receiver continues from one sender's cache; send the others as text or fuse edges")
        if prefix and fuse:
            i, _ = fuse[0]
            raise _err(graph, ("edges", i), f"{name} has both a prefix edge and fuse edges",
                       "continue from one cache (prefix) or fuse sharers' caches (fuse), not both")
        if agent.fusion != "parallel" and not fuse:
            raise _err(graph, ("fusion", name), f"fusion mode {agent.fusion!r} for {name}, which has no fuse edges",
                       "fusion modes apply to receivers of cache edges in fuse mode")


def _same_model_id(a: str, b: str) -> bool:
    def norm(ref: str) -> tuple[str, str]:
        ref = ref.removeprefix("hf://").rstrip("/").lower()
        return ref, ref.rsplit("/", 1)[-1].removesuffix(".gguf")

    (fa, la), (fb, lb) = norm(a), norm(b)
    return fa == fb or la == lb


def _check_fusers(graph: Graph, fuser_info: FuserInfo | None) -> None:
    for i, e in enumerate(graph.edges):
        if not e.is_fuse:
            continue
        ref = graph.fuser_for(e)  # raises: unknown alias, no fuser, ambiguous
        receiver, sharer = graph.model_of(e.receiver), graph.model_of(e.sender)
        if ref.decl is not None:
            for key, agent, model in (("receiver", e.receiver, receiver), ("sharer", e.sender, sharer)):
                declared = getattr(ref.decl, key)
                if declared is None:
                    continue
                declared_ref = graph.resolve_model_ref(graph.models[declared].ref)
                if declared_ref != model.ref:
                    raise _err(graph, ("edges", i, "fuser"),
                               f"fuser {ref.alias!r} is for {key} model {declared!r}, but {agent} runs {model.ref}",
                               "use a fuser trained for these two models")
        if fuser_info is None:
            continue
        try:
            info = fuser_info(ref.ref)
        except AgentMeshError as exc:
            raise _err(graph, ("edges", i, "fuser"), f"fuser {ref.ref}: {exc.message}", exc.hint) from None
        if info is None:
            continue
        for role, agent, model, trained in (("receiver", e.receiver, receiver, info[0]),
                                            ("sharer", e.sender, sharer, info[1])):
            if Path(model.ref).is_absolute():
                continue  # a local folder or file: its hub identity is unknown, nothing to compare
            if not _same_model_id(model.ref, trained):
                raise _err(graph, ("edges", i, "fuser"),
                           f"fuser {ref.alias or ref.ref} was trained for {role} {trained}, but {agent} runs {model.ref}",
                           "use a fuser trained for these two models")


def _check_prompts(graph: Graph) -> None:
    for name, agent in graph.agents.items():
        if agent.prompt is None:
            continue
        text_senders = {e.sender for e in graph.in_edges(name, type="text")}
        cache_senders = {e.sender for e in graph.in_edges(name, type="cache")}
        allowed = {"input", *graph.inputs, *text_senders}
        for ph in template.placeholders(agent.prompt):
            if ph in allowed:
                continue
            path = ("agents", name, "prompt")
            if ph in cache_senders:
                raise _err(graph, path, f"placeholder {{{ph}}}: {ph} sends a cache, not text, to {name}",
                           f"drop {{{ph}}} (the cache carries what {ph} read) or make the edge type: text")
            if ph in graph.agents:
                raise _err(graph, path, f"placeholder {{{ph}}}: no text edge {ph} -> {name}",
                           f"add an edge {{from: {ph}, to: {name}, type: text}}")
            raise _err(graph, path, f"placeholder {{{ph}}} names no input and no upstream text agent",
                       choices_hint(ph, allowed, "placeholders") + "; declare inputs under inputs:")


def _check_inputs_outputs(graph: Graph) -> None:
    for name in graph.inputs:
        if name in graph.agents:
            raise _err(graph, ("inputs", name), f"input {name!r} has the name of an agent",
                       f"rename the input; {{{name}}} in a prompt must mean one thing")
    for i, name in enumerate(graph.outputs or []):
        if name not in graph.agents:
            raise _err(graph, ("outputs", i), f"unknown agent {name!r}", choices_hint(name, graph.agents, "agents"))
    if graph.outputs is not None and len(set(graph.outputs)) != len(graph.outputs):
        raise _err(graph, ("outputs",), "an agent is listed twice", "list each output agent once")
