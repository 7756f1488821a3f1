"""Running agent graphs: the plan, the asyncio scheduler, endpoints, results, traces and chat sessions."""
from agentmesh.runtime.endpoint import CallContext, Endpoint, ReadRequest, ShareRequest, TextOutput, TextRequest
from agentmesh.runtime.events import (AgentFailed, AgentFinished, AgentStarted, Event, PhaseStarted, RunFinished,
                                      Step, Token)
from agentmesh.runtime.local import LocalEndpoint
from agentmesh.runtime.plan import AgentPlan, FuseInput, RunPlan, build_plan
from agentmesh.runtime.result import AgentResult, RunResult
from agentmesh.runtime.scheduler import arun_graph, make_endpoints, run_graph, stream_graph
from agentmesh.runtime.session import ChatSession
from agentmesh.runtime.trace import EdgeInfo, Span, Trace

__all__ = [
    "AgentFailed", "AgentFinished", "AgentPlan", "AgentResult", "AgentStarted", "CallContext", "ChatSession",
    "EdgeInfo", "Endpoint", "Event", "FuseInput", "LocalEndpoint", "PhaseStarted", "ReadRequest", "RunFinished",
    "RunPlan", "RunResult", "ShareRequest", "Span", "Step", "TextOutput", "TextRequest", "Token", "Trace",
    "arun_graph", "build_plan", "make_endpoints", "run_graph", "stream_graph",
]
