"""The agent graph users build in Python or load from YAML.

    g = Graph(name="site")
    p = g.agent("programmer", context=page_html, role="You are a web programmer.")
    w = g.agent("writer", prompt="{input}", max_new_tokens=96)
    g.cache(p, w, mode="prefix")
    result = agentmesh.run(g, "Write the intro")   # the runtime runs graphs; a graph only describes

Agents and edges are plain dataclasses; a networkx DiGraph (`g.nx`, node = agent name) is built from
them on demand. Everything the scheduler needs to plan a run is answered here: `order()`,
`sharers_of()`, `fuse_edges_of()`, `prefix_of()`, `text_inputs_of()`, `model_of()`, `fuser_for()`,
`context_of()`, `render_prompt()`, `resolve_inputs()`.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import networkx as nx
from pydantic import ValidationError

from agentmesh.errors import GraphError
from agentmesh.files import FileProblem, read_text_limited
from agentmesh.graph import template
from agentmesh.graph.source import KeyPath, SourceMap, choices_hint, graph_error
from agentmesh.graph.spec import (DEFAULT_MODEL, IDENT_HINT, IDENT_RE, AgentSpec, AuthSpec, CacheMode, EdgeType,
                                  GraphSpec)
from agentmesh.graph.yaml_io import dump_spec, spec_from_data
from agentmesh.transport.config import BrokerConfig, TLSConfig
from agentmesh.types import FusionMode

S = TypeVar("S")

# A context file is read into a prompt: far past any model's context length is a wrong path.
MAX_CONTEXT_BYTES = 8_000_000


@dataclass
class Agent:
    """One agent. `model` is a model alias of the graph or a model ref; None = the embedded default.

    `prompt` is a template with `{input}`, `{<input name>}` and `{<upstream text agent>}`
    placeholders; None = every upstream text output, then `{input}` (see `Graph.prompt_template_of`).
    `temperature` 0 means greedy decoding. `answer_start` is text the answer begins with: the agent
    reads it right after the generation prompt and continues it, and it is part of the answer (a
    small model follows an output format far more reliably when it is started for it).
    """

    name: str
    model: str | None = None
    role: str | None = None
    context: str | None = None
    context_file: str | None = None
    prompt: str | None = None
    answer_start: str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    host: str | None = None
    fusion: FusionMode = "parallel"

    def generation(self) -> dict[str, Any]:
        """Keyword arguments for generation (names as in models.inference.GenerationConfig), and
        `answer_start`, which the endpoint that runs the agent reads before the answer."""
        gen: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0}
        if self.temperature > 0:
            gen["temperature"] = self.temperature
        for key in ("top_k", "top_p", "repetition_penalty"):
            if getattr(self, key) is not None:
                gen[key] = getattr(self, key)
        if self.stop:
            gen["stop"] = list(self.stop)
        if self.answer_start:
            gen["answer_start"] = self.answer_start
        return gen


@dataclass(frozen=True)
class Edge:
    """A channel. `text`: the sender generates and its text fills the receiver's prompt. `cache`:
    the sender only prefills; `fuse` mode fuses its cache into the receiver's through a fuser,
    `prefix` mode lets the receiver (same model) continue from the sender's cache."""

    sender: str
    receiver: str
    type: EdgeType = "text"
    mode: CacheMode | None = None
    fuser: str | None = None

    @property
    def is_text(self) -> bool:
        return self.type == "text"

    @property
    def is_fuse(self) -> bool:
        return self.type == "cache" and self.mode == "fuse"

    @property
    def is_prefix(self) -> bool:
        return self.type == "cache" and self.mode == "prefix"

    @property
    def label(self) -> str:
        return "text" if self.type == "text" else f"cache/{self.mode}"


@dataclass(frozen=True)
class ModelDecl:
    ref: str
    dtype: str = "auto"
    device: str = "cpu"
    adapter: str | None = None  # PEFT adapter folder on top of `ref`


@dataclass(frozen=True)
class FuserDecl:
    path: str
    receiver: str | None = None  # model alias
    sharer: str | None = None  # model alias


@dataclass(frozen=True)
class HostDecl:
    broker: str | None = None  # mqtt:// url; None = the graph's broker
    description: str | None = None
    callers: tuple[str, ...] | None = None  # hosts its worker serves; None = those its agents share an edge with


@dataclass(frozen=True)
class ResolvedModel:
    """An agent's model after alias lookup; `ref` is absolute for local files and folders."""

    ref: str
    dtype: str = "auto"
    device: str = "cpu"
    alias: str | None = None
    adapter: str | None = None  # absolute path of a PEFT adapter folder

    def same_weights(self, other: ResolvedModel) -> bool:
        # Device may differ (a cache can move between devices); ref, adapter and dtype may not.
        return self.ref == other.ref and self.adapter == other.adapter and self.dtype == other.dtype


@dataclass(frozen=True)
class ResolvedFuser:
    """The fuser a `fuse` edge uses: `ref` is an absolute path or an hf:// ref."""

    ref: str
    alias: str | None = None
    decl: FuserDecl | None = None


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("./", "../", "/", "~", "hf://")) or "/" in ref or "\\" in ref or ref.endswith(".gguf")


class Graph:
    """A graph of agents and the channels between them."""

    def __init__(self, name: str = "graph", *, description: str | None = None,
                 base_dir: str | Path | None = None):
        if not IDENT_RE.match(name):
            raise GraphError(f"graph name {name!r} is not a valid name", hint=IDENT_HINT)
        self.name = name
        self.description = description
        self.base_dir: Path | None = Path(base_dir) if base_dir is not None else None
        self.agents: dict[str, Agent] = {}
        self.edges: list[Edge] = []
        self.models: dict[str, ModelDecl] = {}
        self.fusers: dict[str, FuserDecl] = {}
        self.hosts: dict[str, HostDecl] = {}
        self.broker: BrokerConfig | None = None
        self.auth: AuthSpec | None = None
        self.inputs: dict[str, str] = {}
        self.outputs: list[str] | None = None
        # Set when the graph came from a file, so that errors can name file and line.
        self.source: SourceMap | None = None

    def agent(self, name: str, *, model: str | None = None, role: str | None = None, context: str | None = None,
              context_file: str | Path | None = None, prompt: str | None = None, answer_start: str | None = None,
              max_new_tokens: int = 128,
              temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
              repetition_penalty: float | None = None, stop: str | Sequence[str] = (), host: str | None = None,
              fusion: FusionMode = "parallel") -> Agent:
        """Add an agent and return it."""
        if not isinstance(name, str) or not IDENT_RE.match(name):
            raise self._error(("agents",), f"agent name {name!r} is not a valid name", IDENT_HINT)
        if name in self.agents:
            raise self._error(("agents", name), f"duplicate agent name {name!r}", "give every agent its own name")
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        agent = Agent(name=name, model=model, role=role, context=context,
                      context_file=None if context_file is None else str(context_file), prompt=prompt,
                      answer_start=answer_start, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      repetition_penalty=repetition_penalty, stop=stops, host=host, fusion=fusion)
        self.agents[name] = agent
        return agent

    def text(self, sender: Agent | str, receiver: Agent | str) -> Edge:
        """The sender generates; its text fills `{<sender>}` in the receiver's prompt."""
        return self._connect(sender, receiver, "text", None, None)

    def cache(self, sender: Agent | str, receiver: Agent | str, *, mode: CacheMode = "fuse",
              fuser: str | Path | None = None) -> Edge:
        """The sender prefills and hands its KV cache to the receiver (`fuse` through a fuser, or
        `prefix`: the receiver, same model, continues from the sender's cache)."""
        if mode not in ("fuse", "prefix"):
            raise self._error(("edges", len(self.edges), "mode"), f"unknown cache mode {mode!r}",
                              "use mode='fuse' or mode='prefix'")
        return self._connect(sender, receiver, "cache", mode, None if fuser is None else str(fuser))

    def model(self, alias: str, ref: str | Path, *, dtype: str = "auto", device: str = "cpu",
              adapter: str | Path | None = None) -> str:
        """Declare a model alias (`adapter`: a PEFT adapter folder merged into `ref`); returns the
        alias, to pass as `agent(..., model=...)`."""
        self._check_name(("models",), alias, self.models, "model alias")
        self.models[alias] = ModelDecl(ref=str(ref), dtype=dtype, device=device,
                                       adapter=None if adapter is None else str(adapter))
        return alias

    def fuser(self, alias: str, path: str | Path, *, receiver: str | None = None, sharer: str | None = None) -> str:
        """Declare a fuser (folder or hf:// ref) trained for the models `receiver` and `sharer` (aliases)."""
        self._check_name(("fusers",), alias, self.fusers, "fuser alias")
        self.fusers[alias] = FuserDecl(path=str(path), receiver=receiver, sharer=sharer)
        return alias

    def host(self, name: str, *, broker: str | None = None, description: str | None = None,
             callers: Sequence[str] | None = None) -> str:
        """Declare a host (a machine a worker runs on); returns its name, to pass as `agent(..., host=...)`."""
        self._check_name(("hosts",), name, self.hosts, "host name")
        self.hosts[name] = HostDecl(broker=broker, description=description,
                                    callers=None if callers is None else tuple(callers))
        return name

    def set_broker(self, url: str, *, username: str | None = None, password_env: str | None = None,
                   tls: bool | TLSConfig | None = None, **options: Any) -> BrokerConfig:
        """Set the MQTT broker (options: any `BrokerConfig` field, e.g. topic_prefix, timeout_s, chunk_bytes)."""
        self.broker = self._section("broker", lambda: BrokerConfig(
            url=url, username=username, password_env=password_env, tls=tls, **options))
        return self.broker

    def set_auth(self, *, key_env: str | None = None, key_file: str | Path | None = None,
                 hosts: Mapping[str, Mapping[str, str]] | None = None, encrypt: bool = False,
                 window_s: float = 60.0) -> AuthSpec:
        """Name where the keys authenticating messages between hosts are: the pipeline key (one of
        key_env, key_file) and/or per-host keys (`hosts`: name -> {key_env|key_file, public_key})."""
        self.auth = self._section("auth", lambda: AuthSpec.model_validate({
            "key_env": key_env, "key_file": None if key_file is None else str(key_file), "hosts": dict(hosts or {}),
            "encrypt": encrypt, "window_s": window_s}))
        return self.auth

    def _section(self, key: str, build: Callable[[], S]) -> S:
        """A settings model built in Python, its validation error said as a YAML file's would be."""
        try:
            return build()
        except ValidationError as e:
            first = e.errors()[0]
            raise self._error((key, *first.get("loc", ())), str(first.get("msg", "invalid")),
                              (first.get("ctx") or {}).get("agentmesh_hint")) from None

    def input(self, name: str, default: str = "") -> str:
        """Declare a named input with its default text; prompts refer to it as `{name}`."""
        if not IDENT_RE.match(name):
            raise self._error(("inputs",), f"input name {name!r} is not a valid name", IDENT_HINT)
        self.inputs[name] = default
        return name

    def _check_name(self, path: KeyPath, name: str, table: Mapping[str, Any], what: str) -> None:
        if not isinstance(name, str) or not IDENT_RE.match(name):
            raise self._error(path, f"{what} {name!r} is not a valid name", IDENT_HINT)
        if name in table:
            raise self._error((*path, name), f"duplicate {what} {name!r}")

    def _connect(self, sender: Agent | str, receiver: Agent | str, type_: EdgeType, mode: CacheMode | None,
                 fuser: str | None) -> Edge:
        names = []
        for key, ref in (("from", sender), ("to", receiver)):
            name = ref.name if isinstance(ref, Agent) else ref
            if name not in self.agents:
                raise self._error(("edges", len(self.edges), key), f"unknown agent {name!r}",
                                  choices_hint(str(name), self.agents, "agents"))
            names.append(name)
        edge = Edge(sender=names[0], receiver=names[1], type=type_, mode=mode, fuser=fuser)
        self.edges.append(edge)
        return edge

    @property
    def nx(self) -> nx.DiGraph:
        """A fresh networkx view: nodes are agent names (attr `agent`), edges carry attr `edge`.
        Edges naming unknown agents are left out (validation reports them)."""
        g = nx.DiGraph(name=self.name)
        for name, agent in self.agents.items():
            g.add_node(name, agent=agent)
        for edge in self.edges:
            if edge.sender in self.agents and edge.receiver in self.agents:
                g.add_edge(edge.sender, edge.receiver, edge=edge, type=edge.type, mode=edge.mode)
        return g

    def order(self) -> list[Agent]:
        """Agents in dependency order (senders before receivers; ties in declaration order)."""
        rank = {name: i for i, name in enumerate(self.agents)}
        try:
            names = list(nx.lexicographical_topological_sort(self.nx, key=rank.__getitem__))
        except nx.NetworkXUnfeasible:
            self.check_acyclic()
            raise
        return [self.agents[n] for n in names]

    def check_acyclic(self) -> None:
        """Raise a GraphError naming the cycle, e.g. `cycle a -> b -> a`."""
        try:
            cycle = nx.find_cycle(self.nx)
        except nx.NetworkXNoCycle:
            return
        names = [u for u, _ in cycle] + [cycle[0][0]]
        first = next(i for i, e in enumerate(self.edges) if (e.sender, e.receiver) == tuple(cycle[0][:2]))
        raise self._error(("edges", first), f"cycle {' -> '.join(names)}",
                          "edges must not loop back; agents run in dependency order")

    def in_edges(self, agent: Agent | str, *, type: EdgeType | None = None) -> list[Edge]:
        name = self._name(agent)
        return [e for e in self.edges if e.receiver == name and (type is None or e.type == type)]

    def out_edges(self, agent: Agent | str, *, type: EdgeType | None = None) -> list[Edge]:
        name = self._name(agent)
        return [e for e in self.edges if e.sender == name and (type is None or e.type == type)]

    def text_inputs_of(self, agent: Agent | str) -> list[Agent]:
        """Senders of text edges into `agent`, in edge order."""
        return [self.agents[e.sender] for e in self.in_edges(agent, type="text")]

    def sharers_of(self, agent: Agent | str) -> list[Agent]:
        """Senders of cache edges (fuse and prefix) into `agent`, in edge order."""
        return [self.agents[e.sender] for e in self.in_edges(agent, type="cache")]

    def fuse_edges_of(self, agent: Agent | str) -> list[Edge]:
        return [e for e in self.in_edges(agent, type="cache") if e.mode == "fuse"]

    def prefix_of(self, agent: Agent | str) -> Agent | None:
        """The agent whose cache `agent` continues from (a valid graph has at most one)."""
        edges = [e for e in self.in_edges(agent, type="cache") if e.mode == "prefix"]
        return self.agents[edges[0].sender] if edges else None

    def sinks(self) -> list[Agent]:
        """Agents without outgoing edges, in declaration order."""
        senders = {e.sender for e in self.edges}
        return [a for n, a in self.agents.items() if n not in senders]

    def sources(self) -> list[Agent]:
        receivers = {e.receiver for e in self.edges}
        return [a for n, a in self.agents.items() if n not in receivers]

    def output_agents(self) -> list[Agent]:
        """The agents whose outputs a run returns: `outputs`, or the sinks."""
        if self.outputs is None:
            return self.sinks()
        return [self.agents[n] for n in self.outputs]

    def agents_on(self, host: str | None) -> list[Agent]:
        """Agents placed on `host` (None = agents without a host, which run in the caller's process)."""
        return [a for a in self.agents.values() if a.host == host]

    def _name(self, agent: Agent | str) -> str:
        name = agent.name if isinstance(agent, Agent) else agent
        if name not in self.agents:
            raise GraphError(f"graph {self.name!r} has no agent {name!r}", hint=choices_hint(name, self.agents, "agents"))
        return name

    @property
    def root(self) -> Path:
        """The folder relative paths resolve against: the YAML file's folder, or the working directory."""
        return self.base_dir if self.base_dir is not None else Path.cwd()

    def resolve_path(self, path: str | Path) -> Path:
        p = Path(os.path.expanduser(str(path)))
        return p if p.is_absolute() else Path(os.path.normpath(self.root / p))

    def resolve_model_ref(self, ref: str) -> str:
        # Local files/folders become absolute; builtin names and hub ids stay as written.
        if ref.startswith(("./", "../", "/", "~")) or ref.endswith(".gguf") or (self.root / ref).exists():
            return str(self.resolve_path(ref))
        return ref

    def model_of(self, agent: Agent | str) -> ResolvedModel:
        a = self.agents[self._name(agent)]
        written = a.model or DEFAULT_MODEL
        decl = self.models.get(written)
        if decl is not None:
            adapter = None if decl.adapter is None else str(self.resolve_path(decl.adapter))
            return ResolvedModel(ref=self.resolve_model_ref(decl.ref), dtype=decl.dtype, device=decl.device,
                                 alias=written, adapter=adapter)
        return ResolvedModel(ref=self.resolve_model_ref(written))

    def resolve_fuser_ref(self, path: str) -> str:
        return path if path.startswith("hf://") else str(self.resolve_path(path))

    def fuser_candidates(self, edge: Edge) -> list[str]:
        """Fuser-table aliases declared for exactly this edge's (receiver model, sharer model) pair."""
        receiver, sharer = self.model_of(edge.receiver), self.model_of(edge.sender)
        out = []
        for alias, decl in self.fusers.items():
            if decl.receiver is None or decl.sharer is None:
                continue
            if decl.receiver not in self.models or decl.sharer not in self.models:
                continue
            r = self.resolve_model_ref(self.models[decl.receiver].ref)
            s = self.resolve_model_ref(self.models[decl.sharer].ref)
            if r == receiver.ref and s == sharer.ref:
                out.append(alias)
        return out

    def fuser_for(self, edge: Edge) -> ResolvedFuser:
        """The fuser of a `fuse` edge: the edge's own (alias or path), else the one fuser-table entry
        declared for its models."""
        path = ("edges", self._edge_index(edge), "fuser")
        if not edge.is_fuse:
            raise self._error(path, f"edge {edge.sender} -> {edge.receiver} is not a fuse edge")
        if edge.fuser is not None:
            decl = self.fusers.get(edge.fuser)
            if decl is not None:
                return ResolvedFuser(ref=self.resolve_fuser_ref(decl.path), alias=edge.fuser, decl=decl)
            if not _looks_like_path(edge.fuser):
                raise self._error(path, f"unknown fuser {edge.fuser!r}",
                                  choices_hint(edge.fuser, self.fusers, "fusers") + "; a path needs a '/'")
            return ResolvedFuser(ref=self.resolve_fuser_ref(edge.fuser))
        found = self.fuser_candidates(edge)
        if len(found) == 1:
            decl = self.fusers[found[0]]
            return ResolvedFuser(ref=self.resolve_fuser_ref(decl.path), alias=found[0], decl=decl)
        if not found:
            raise self._error(path[:2], f"fuse edge {edge.sender} -> {edge.receiver} has no fuser",
                              "add fuser: <alias or path> to the edge, declare one under fusers: with matching "
                              "receiver/sharer models, or use mode: prefix when both agents run the same model")
        raise self._error(path[:2], f"several fusers fit {edge.sender} -> {edge.receiver}: {', '.join(found)}",
                          "name one with fuser: on the edge")

    def context_of(self, agent: Agent | str) -> str | None:
        """The agent's private context: inline text or the content of `context_file`."""
        a = self.agents[self._name(agent)]
        if a.context_file is None:
            return a.context
        file = self.resolve_path(a.context_file)
        try:
            return read_text_limited(file, MAX_CONTEXT_BYTES)
        except FileProblem as exc:
            raise self._error(("agents", a.name, "context_file"), f"context file {str(file)!r} {exc}",
                              "paths are relative to the pipeline file's folder") from None

    def prompt_template_of(self, agent: Agent | str) -> str:
        """The agent's prompt template; the default lists every upstream text output, then `{input}`."""
        a = self.agents[self._name(agent)]
        if a.prompt is not None:
            return a.prompt
        parts = [f"{s.name} wrote:\n{{{s.name}}}" for s in self.text_inputs_of(a)]
        return "\n\n".join([*parts, "{input}"])

    def render_prompt(self, agent: Agent | str, inputs: Mapping[str, str], upstream: Mapping[str, str]) -> str:
        """Fill the agent's template from the run's inputs and the texts of its upstream agents."""
        return template.render(self.prompt_template_of(agent), {**inputs, **upstream})

    def resolve_inputs(self, inputs: str | Mapping[str, str] | None = None) -> dict[str, str]:
        """The values for every input placeholder: a string is `{input}`; a mapping overrides the
        declared defaults by name. Unknown or missing inputs are a GraphError."""
        values = dict(self.inputs)
        if isinstance(inputs, str):
            values["input"] = inputs
        elif inputs is not None:
            for key, value in inputs.items():
                if key != "input" and key not in self.inputs:
                    raise GraphError(f"graph {self.name!r} has no input {key!r}",
                                     hint=choices_hint(key, {"input", *self.inputs}, "inputs"))
                values[key] = str(value)
        for a in self.agents.values():
            for name in template.placeholders(self.prompt_template_of(a)):
                if name not in self.agents and name not in values:
                    raise GraphError(f"no value for input {{{name}}} used by agent {a.name!r}",
                                     hint="pass it to run(), or give it a default under inputs:")
        return values

    def to_spec(self) -> GraphSpec:
        """The pipeline-file form of this graph (checked by the schema)."""
        return spec_from_data(self._to_data(), self.source or self._label)

    def _to_data(self) -> dict[str, Any]:
        def agent_data(a: Agent) -> dict[str, Any]:
            d = {k: getattr(a, k) for k in AgentSpec.model_fields}
            d["stop"] = list(a.stop)
            return d

        return {
            "version": 1, "name": self.name, "description": self.description,
            "models": {k: vars(v).copy() for k, v in self.models.items()},
            "fusers": {k: vars(v).copy() for k, v in self.fusers.items()},
            "agents": {n: agent_data(a) for n, a in self.agents.items()},
            "edges": [{"from": e.sender, "to": e.receiver, "type": e.type, "mode": e.mode, "fuser": e.fuser}
                      for e in self.edges],
            "fusion": {n: a.fusion for n, a in self.agents.items() if a.fusion != "parallel"},
            "hosts": {k: vars(v).copy() for k, v in self.hosts.items()},
            "broker": None if self.broker is None else self.broker.model_dump(mode="json", exclude_defaults=True),
            "auth": None if self.auth is None else self.auth.model_dump(exclude_defaults=True),
            "inputs": dict(self.inputs),
            "outputs": None if self.outputs is None else list(self.outputs),
        }

    @classmethod
    def from_spec(cls, spec: GraphSpec, *, base_dir: str | Path | None = None,
                  source: SourceMap | None = None) -> Graph:
        """Build a graph from a checked spec; `base_dir` is where relative paths resolve (the YAML's
        folder). The cross-agent checks are `validate_graph`'s (`load_graph` runs them)."""
        g = cls(spec.name, description=spec.description, base_dir=base_dir)
        g.source = source
        g.models = {k: ModelDecl(ref=m.ref, dtype=m.dtype, device=m.device, adapter=m.adapter)
                    for k, m in spec.models.items()}
        g.fusers = {k: FuserDecl(path=f.path, receiver=f.receiver, sharer=f.sharer) for k, f in spec.fusers.items()}
        g.hosts = {k: HostDecl(broker=h.broker, description=h.description,
                               callers=None if h.callers is None else tuple(h.callers)) for k, h in spec.hosts.items()}
        g.auth = spec.auth
        g.broker = spec.broker
        for name, a in spec.agents.items():
            fields = a.model_dump()
            fields["stop"] = tuple(fields["stop"])
            g.agents[name] = Agent(name=name, **fields)
        for name, mode in spec.fusion.items():
            if name not in g.agents:
                raise g._error(("fusion", name), f"fusion mode for unknown agent {name!r}",
                               choices_hint(name, g.agents, "agents"))
            g.agents[name].fusion = mode
        g.edges = [Edge(sender=e.sender, receiver=e.receiver, type=e.type, mode=e.mode, fuser=e.fuser)
                   for e in spec.edges]
        g.inputs = dict(spec.inputs)
        g.outputs = None if spec.outputs is None else list(spec.outputs)
        return g

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The pipeline file text; also written to `path` when given. Relative paths in it keep
        their meaning only when `path` lies in `base_dir`."""
        text = dump_spec(self.to_spec())
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @property
    def _label(self) -> str:
        return f"graph {self.name!r}"

    def _error(self, path: KeyPath, message: str, hint: str | None = None) -> GraphError:
        return graph_error(self.source or self._label, path, message, hint)

    def _edge_index(self, edge: Edge) -> int:
        for i, e in enumerate(self.edges):
            if e is edge:
                return i
        return self.edges.index(edge)

    def _key(self) -> tuple[Any, ...]:
        return (self.name, self.description, self.agents, self.edges, self.models, self.fusers, self.hosts,
                self.broker, self.inputs, self.outputs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Graph) and self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, agents={list(self.agents)}, edges={len(self.edges)})"
