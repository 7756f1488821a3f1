"""Loading a pipeline file: the YAML is read and checked against the schema, built into a `Graph`,
then checked as a whole (agents, edges, fusers, prompts) with `validate_graph`."""
from __future__ import annotations

from pathlib import Path

from agentmesh.graph.graph import Graph
from agentmesh.graph.validate import FuserInfo, validate_graph
from agentmesh.graph.yaml_io import load_spec


def load_graph(path: str | Path, *, validate: bool = True, fuser_info: FuserInfo | None = None) -> Graph:
    """Load, check and build the graph of a pipeline file; errors name the file, the line and the key path."""
    spec, source = load_spec(path)
    graph = Graph.from_spec(spec, base_dir=Path(path).parent, source=source)
    if validate:
        validate_graph(graph, fuser_info=fuser_info)
    return graph
