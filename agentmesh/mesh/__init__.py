"""Runs of one graph across hosts: the envelope and channels, settings derived from a graph, the
caller's client and remote endpoints (`arun_remote` / `run_remote`), and the worker serving a host's agents."""
from agentmesh.mesh.client import RemoteClient
from agentmesh.mesh.envelope import Envelope, pack, unpack
from agentmesh.mesh.linked import LinkedEndpoint
from agentmesh.mesh.remote import RemoteEndpoint, arun_remote, run_remote
from agentmesh.mesh.settings import graph_digest, broker_config
from agentmesh.mesh.worker import ServedCall, Worker

__all__ = ["Envelope", "LinkedEndpoint", "RemoteClient", "RemoteEndpoint", "ServedCall", "Worker", "arun_remote",
           "graph_digest", "broker_config", "pack", "run_remote", "unpack"]
