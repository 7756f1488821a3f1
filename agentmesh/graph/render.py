"""Human views of a graph: a text table (`describe`) and a mermaid flowchart (`mermaid`)."""
from __future__ import annotations

import re
from agentmesh.errors import GraphError
from agentmesh.graph.graph import Agent, Edge, Graph
from agentmesh.graph.source import one_line

_MERMAID_RESERVED = {"end", "graph", "subgraph", "flowchart", "style", "class", "classdef", "click",
                     "linkstyle", "direction", "default"}


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _model_text(graph: Graph, agent: Agent) -> str:
    m = graph.model_of(agent)
    return f"{m.alias} ({m.ref})" if m.alias else m.ref


def _edge_text(graph: Graph, edge: Edge) -> str:
    if edge.is_fuse:
        return f"cache/fuse via {edge.fuser or _matched_fuser(graph, edge)}"
    return edge.label


def _matched_fuser(graph: Graph, edge: Edge) -> str:
    found = graph.fuser_candidates(edge)
    return found[0] if len(found) == 1 else "?"


def describe(graph: Graph) -> str:
    """A plain-text summary: agents (model, host, context, prompt), edges, run order, outputs."""
    lines = [f"graph {graph.name}: {len(graph.agents)} agents, {len(graph.edges)} edges"]
    if graph.description:
        lines.append(f"  {one_line(graph.description, 100)}")
    rows = [["agent", "model", "host", "context", "prompt"]]
    for agent in graph.agents.values():
        context = (f"file {agent.context_file}" if agent.context_file
                   else f"{len(agent.context)} chars" if agent.context else "-")
        rows.append([agent.name, _model_text(graph, agent), agent.host or "-", context,
                     one_line(graph.prompt_template_of(agent), 48)])
    lines += ["", "agents:", *_table(rows)]
    if graph.edges:
        rows = [["from", "to", "channel"]] + [[e.sender, e.receiver, _edge_text(graph, e)] for e in graph.edges]
        lines += ["", "edges:", *_table(rows)]
    if graph.fusers:
        rows = [["fuser", "path", "receiver", "sharer"]] + [
            [k, f.path, f.receiver or "-", f.sharer or "-"] for k, f in graph.fusers.items()]
        lines += ["", "fusers:", *_table(rows)]
    if graph.hosts:
        rows = [["host", "broker", "agents"]] + [
            [h, d.broker or (graph.broker.url if graph.broker else "-"),
             ", ".join(a.name for a in graph.agents_on(h)) or "-"] for h, d in graph.hosts.items()]
        lines += ["", "hosts:", *_table(rows)]
    try:
        order = ", ".join(a.name for a in graph.order())
    except GraphError:  # a view of an invalid graph still shows what it can
        order = "(cycle)"
    lines += ["", f"order: {order}", f"outputs: {', '.join(a.name for a in graph.output_agents())}"]
    return "\n".join(lines) + "\n"


def _node_ids(graph: Graph) -> dict[str, str]:
    ids: dict[str, str] = {}
    used: set[str] = set()
    for i, name in enumerate(graph.agents):
        base = re.sub(r"[^A-Za-z0-9_]", "_", name)
        node_id = base if base.lower() not in _MERMAID_RESERVED and base not in used else f"{base}_{i}"
        ids[name] = node_id
        used.add(node_id)
    return ids


def _quote(text: str) -> str:
    return text.replace('"', "#quot;")


def mermaid(graph: Graph, *, direction: str = "LR") -> str:
    """A mermaid flowchart: text edges solid, cache edges dotted and labelled with their mode.
    Agents placed on hosts are grouped in one subgraph per host."""
    ids = _node_ids(graph)
    out = [f"flowchart {direction}"]

    def node(agent: Agent) -> str:
        m = graph.model_of(agent)
        return f'{ids[agent.name]}["{_quote(agent.name)}<br/><small>{_quote(m.alias or m.ref)}</small>"]'

    for host in graph.hosts:
        members = graph.agents_on(host)
        if members:
            out.append(f'  subgraph host_{re.sub(r"[^A-Za-z0-9_]", "_", host)}["host: {_quote(host)}"]')
            out += [f"    {node(a)}" for a in members]
            out.append("  end")
    out += [f"  {node(a)}" for a in graph.agents.values() if a.host is None or a.host not in graph.hosts]
    for e in graph.edges:
        if e.sender not in ids or e.receiver not in ids:
            continue
        if e.is_text:
            out.append(f"  {ids[e.sender]} -->|text| {ids[e.receiver]}")
        else:
            label = e.mode if not e.is_fuse else f"fuse: {_quote(e.fuser or _matched_fuser(graph, e))}"
            out.append(f'  {ids[e.sender]} -.->|"{label}"| {ids[e.receiver]}')
    return "\n".join(out) + "\n"
