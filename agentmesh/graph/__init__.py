"""Agent graphs: agents, text and cache edges, a networkx DiGraph underneath, the YAML pipeline
schema with its loader/dumper, validation and views. Importing this package never imports torch."""
from agentmesh.graph.graph import (Agent, BrokerConfig, Edge, FuserDecl, Graph, HostDecl, ModelDecl, ResolvedFuser,
                                   ResolvedModel, TLSConfig)
from agentmesh.graph.load import load_graph
from agentmesh.graph.render import describe, mermaid
from agentmesh.graph.spec import DEFAULT_MODEL, GraphSpec
from agentmesh.graph.validate import FuserInfo, validate_graph
from agentmesh.graph.yaml_io import dump_spec, load_spec

__all__ = [
    "Agent", "BrokerConfig", "DEFAULT_MODEL", "Edge", "FuserDecl", "FuserInfo", "Graph", "GraphSpec",
    "HostDecl", "ModelDecl", "ResolvedFuser", "ResolvedModel", "TLSConfig", "describe", "dump_spec", "load_graph", "load_spec",
    "mermaid", "validate_graph",
]
