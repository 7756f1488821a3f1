"""From a validated `Graph`, what every agent must do in a run and what it waits for.

Per agent:
* `text_inputs`: upstream agents whose generated text fills its prompt (they must decode first);
* `prefix`: the one agent (same model) whose reading it continues from;
* `fuse`: its sharers, each with the fuser that projects that sharer's cache into its own;
* `decode`: whether it generates text (an output, a sink, or a sender of text edges);
* `prefix_sender`: whether some receiver continues from its reading (a prefix edge leaves it);
* `shares_with`: receivers it shares its cache with (it is a fuse sharer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from agentmesh.graph import Graph, validate_graph
from agentmesh.runtime.trace import EdgeInfo


@dataclass(frozen=True)
class FuseInput:
    """One sharer of a receiver and the fuser (an absolute path or hf:// ref) for the pair."""

    sharer: str
    fuser: str


@dataclass(frozen=True)
class AgentPlan:
    name: str
    model_ref: str
    dtype: str
    device: str
    role: str | None
    context: str | None
    generation: Mapping[str, Any]
    text_inputs: tuple[str, ...] = ()
    prefix: str | None = None
    fuse: tuple[FuseInput, ...] = ()
    fusion: str = "parallel"
    decode: bool = True
    prefix_sender: bool = False
    shares_with: tuple[str, ...] = ()
    has_prompt: bool = False    # the agent declares its own prompt template
    host: str | None = None
    adapter: str | None = None  # PEFT adapter folder merged into the model


@dataclass(frozen=True)
class RunPlan:
    graph: str
    agents: Mapping[str, AgentPlan]   # in dependency order
    outputs: tuple[str, ...]
    edges: tuple[EdgeInfo, ...]

    @property
    def order(self) -> tuple[str, ...]:
        return tuple(self.agents)

    def __getitem__(self, name: str) -> AgentPlan:
        return self.agents[name]


def build_plan(graph: Graph, *, validate: bool = True) -> RunPlan:
    """The plan of `graph` (validated first unless `validate=False`); raises `GraphError`."""
    if validate:
        validate_graph(graph)
    outputs = tuple(a.name for a in graph.output_agents())
    agents: dict[str, AgentPlan] = {}
    for agent in graph.order():
        name = agent.name
        out_edges = graph.out_edges(name)
        model = graph.model_of(name)
        fuse = tuple(FuseInput(sharer=e.sender, fuser=graph.fuser_for(e).ref) for e in graph.fuse_edges_of(name))
        prefix = graph.prefix_of(name)
        decode = (name in outputs or not out_edges or any(e.is_text for e in out_edges))
        agents[name] = AgentPlan(
            name=name, model_ref=model.ref, dtype=model.dtype, device=model.device,
            role=agent.role, context=graph.context_of(name), generation=agent.generation(),
            text_inputs=tuple(a.name for a in graph.text_inputs_of(name)),
            prefix=None if prefix is None else prefix.name, fuse=fuse, fusion=agent.fusion, decode=decode,
            prefix_sender=any(e.is_prefix for e in out_edges), shares_with=tuple(e.receiver for e in out_edges if e.is_fuse),
            has_prompt=agent.prompt is not None, host=agent.host, adapter=model.adapter)
    edges = tuple(EdgeInfo(sender=e.sender, receiver=e.receiver, type=e.type, mode=e.mode) for e in graph.edges)
    return RunPlan(graph=graph.name, agents=agents, outputs=outputs, edges=edges)
