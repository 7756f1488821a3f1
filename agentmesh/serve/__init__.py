"""Serving: an OpenAI-compatible HTTP server with batching across requests, and the web demo.

`create_app(engines)` is the FastAPI app; `BatchEngine(name, c2c_model)` batches concurrent
requests for one model; `agentmesh serve` builds both from a YAML file or flags. Needs the
`serve` extra (`pip install agentmesh[serve]`); the demo needs `demo`.
"""
from agentmesh.serve.config import ServeConfig, ServedModel, load_serve_config
from agentmesh.serve.engine import BatchEngine, Job, PipelineEngine

__all__ = ["BatchEngine", "Job", "PipelineEngine", "ServeConfig", "ServedModel", "load_serve_config"]
