"""agentmesh: LLM agents that talk through their KV caches.

    g = agentmesh.Graph("site")
    ...
    result = agentmesh.run(g, "Write the intro")      # or: await agentmesh.arun(...), agentmesh.stream(...)

A graph only describes a pipeline; running it is the runtime's job (`run`, `arun`, `stream`,
`ChatSession`). The top-level names are imported lazily so `import agentmesh` stays cheap (the CLI
starts fast).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> (module, attribute in that module)
_EXPORTS = {name: (module, attr or name) for name, module, attr in [
    ("C2CModel", "agentmesh.c2c.model", None),
    ("Fuser", "agentmesh.c2c.fuser", None),
    ("C2CProjector", "agentmesh.c2c.projector", None),
    ("KVCache", "agentmesh.cache.kv", None),
    ("ModelSignature", "agentmesh.cache.kv", None),
    ("GenerationConfig", "agentmesh.models.inference", None),
    ("load_model", "agentmesh.models", None),
    ("ModelPool", "agentmesh.models", None),
    ("DEFAULT_MODEL", "agentmesh.models", None),
    ("Graph", "agentmesh.graph", None),
    ("run", "agentmesh.runtime.scheduler", "run_graph"),
    ("arun", "agentmesh.runtime.scheduler", "arun_graph"),
    ("stream", "agentmesh.runtime.scheduler", "stream_graph"),
    ("ChatSession", "agentmesh.runtime.session", None),
]}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'agentmesh' has no attribute {name!r}")
