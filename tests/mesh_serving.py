"""A worker serving one host in an asyncio task, shared by the worker and mesh-security tests."""
from __future__ import annotations

import asyncio
from typing import Any

from agentmesh.graph import Graph
from agentmesh.mesh.settings import broker_config
from agentmesh.mesh.worker import Worker
from agentmesh.models.pool import ModelPool
from agentmesh.transport import MqttLink


async def serving(graph: Graph, host: str, pool: ModelPool, *, link: Any = None,
                  **worker_kw: Any) -> tuple[Worker, Any, Any]:
    """A worker for `host` serving in a task, on `link` or its own MQTT link; returns (worker, task, link).
    `worker_kw` go to `Worker` (on_served, insecure, limits)."""
    if link is None:
        link = MqttLink(broker_config(graph, host=host, reconnect_max_s=0.5), graph=graph.name)
        await link.open()
    worker = Worker(graph, host, link, pool=pool, **worker_kw)
    ready = asyncio.Event()
    task = asyncio.create_task(worker.serve(ready=ready.set))
    await asyncio.wait_for(ready.wait(), 10)
    return worker, task, link


async def stop(worker: Worker, task: Any, link: Any) -> None:
    worker.stop()
    await asyncio.wait_for(task, 5)
    await link.close()
