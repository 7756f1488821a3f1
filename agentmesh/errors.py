"""Typed errors. Each one carries a one-line message that names the offending file, key or value
and says what would be right; the CLI prints it and exits with status 2."""
from __future__ import annotations

from pydantic_core import PydanticCustomError


def error_line(error: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message` (`Type` alone for an empty message), at most `limit`
    characters of message: how a foreign exception appears inside one of our one-line errors."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class AgentMeshError(Exception):
    """Base class of every error agentmesh raises on purpose."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} (hint: {hint})")


class ConfigError(AgentMeshError):
    """A config, recipe or argument value is invalid."""


class ModelLoadError(AgentMeshError):
    """A model or tokenizer could not be found or loaded."""


class CheckpointError(AgentMeshError):
    """A fuser checkpoint is missing files, has wrong keys/shapes, or targets other models."""


class CacheError(AgentMeshError):
    """A KV cache does not fit the model or operation it was given to."""


class CodecError(CacheError):
    """A serialized KV cache payload is corrupted, truncated, oversized or for another model."""


class GraphError(AgentMeshError):
    """An agent graph or pipeline file is invalid."""


class RunError(AgentMeshError):
    """An agent failed while a graph was running."""

    def __init__(self, message: str, *, agent: str | None = None, hint: str | None = None):
        self.agent = agent
        super().__init__(message, hint=hint)


class TransportError(AgentMeshError):
    """A link between hosts failed (broker unreachable, refused credentials, timeout)."""


def schema_error(message: str, hint: str | None = None) -> PydanticCustomError:
    """Raised inside a pydantic validator: the message is ours, the hint travels in ctx (the YAML
    loader shows it as `(hint: ...)`)."""
    # pydantic substitutes "{key}" for ctx keys only, so braces in the message stay as written.
    return PydanticCustomError("agentmesh", message, {"agentmesh_hint": hint} if hint else None)
