"""agentmesh: LLM agents that talk through their KV caches.

The top-level names are imported lazily so `import agentmesh` stays cheap (the CLI starts fast).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "C2CModel": "agentmesh.c2c.model",
    "Fuser": "agentmesh.c2c.fuser",
    "C2CProjector": "agentmesh.c2c.projector",
    "KVCache": "agentmesh.cache.kv",
    "ModelSignature": "agentmesh.cache.kv",
    "GenerationConfig": "agentmesh.models.inference",
    "load_model": "agentmesh.models",
    "ModelPool": "agentmesh.models",
    "DEFAULT_MODEL": "agentmesh.models",
    "Graph": "agentmesh.graph",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'agentmesh' has no attribute {name!r}")
