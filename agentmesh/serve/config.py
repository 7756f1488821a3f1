"""What `agentmesh serve` serves: the YAML file (or the flags) naming each model, and the limits.

    # agentmesh serve --config configs/serve.yaml
    models:
      smollm2:                         # a plain model
        model: smollm2-135m-instruct
      smollm2-c2c:                     # a C2CModel: receiver + one sharer and fuser per sharer
        model: smollm2-135m-instruct
        sharers: [smollm2-135m-instruct]
        fusers: [../fusers/smollm2_context]
      fuse-by-path:                    # a pipeline file; its output agent answers
        pipeline: ../graphs/fuse_by_path.yaml
    batching: {max_batch_size: 16, window_ms: 10}

Paths are relative to the YAML file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agentmesh.errors import ConfigError
from agentmesh.yaml_file import read_yaml

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"
API_KEYS_ENV = "AGENTMESH_API_KEYS"


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServedModel(_Settings):
    """One entry of `models:`: `model` (with optional `sharers` + `fusers`), or `pipeline`."""

    model: str | None = None
    sharers: list[str] = Field(default_factory=list)
    fusers: list[str] = Field(default_factory=list)
    mode: Literal["parallel", "sequential"] = "parallel"
    pipeline: str | None = None
    output: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    temperature: float = Field(default=1.0, ge=0, le=2, description="used when a request gives none (OpenAI: 1)")
    description: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "ServedModel":
        if (self.model is None) == (self.pipeline is None):
            raise ValueError("give either `model` (a plain model or a C2C receiver) or `pipeline` (a pipeline file)")
        if self.pipeline is not None and (self.sharers or self.fusers):
            raise ValueError("a pipeline's sharers and fusers are in its own file; drop `sharers`/`fusers`")
        if len(self.sharers) != len(self.fusers) and self.sharers:
            raise ValueError(f"{len(self.sharers)} sharers but {len(self.fusers)} fusers; give one fuser per sharer")
        if self.output is not None and self.pipeline is None:
            raise ValueError("`output` names a pipeline's answering agent; it needs `pipeline`")
        return self

    @property
    def kind(self) -> str:
        return "pipeline" if self.pipeline else ("c2c" if self.fusers else "model")


class Batching(_Settings):
    max_batch_size: int = Field(default=16, ge=1, le=256)
    window_ms: float = Field(default=10.0, ge=0, le=10_000)
    rejoin_ms: float = Field(default=250.0, ge=0, le=60_000,
                             description="how long a batch waits for the clients of the batch before it")


class Limits(_Settings):
    max_queue: int = Field(default=64, ge=1, description="requests waiting or running per model; more get 429")
    max_request_bytes: int = Field(default=1 << 20, ge=1024, description="larger bodies get 413")
    max_tokens: int = Field(default=2048, ge=1, description="the most a request may ask for")
    default_max_tokens: int = Field(default=512, ge=1, description="when a request gives no max_tokens")


class ServeConfig(_Settings):
    models: dict[str, ServedModel] = Field(min_length=1)
    batching: Batching = Field(default_factory=Batching)
    limits: Limits = Field(default_factory=Limits)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys_env: str = Field(default=API_KEYS_ENV, description="environment variable holding comma-separated keys")

    @model_validator(mode="after")
    def _names(self) -> "ServeConfig":
        import re

        for name in self.models:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"model name {name!r} may use letters, digits and . _ : / - only")
        return self


def first_error(e: ValidationError, where: str) -> ConfigError:
    err = e.errors()[0]
    key = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    return ConfigError(f"{where}: {key}: {msg}")


def resolve_ref(base: Path, ref: str) -> str:
    """A model, fuser or pipeline reference relative to `base` when it names a path there."""
    path = Path(ref).expanduser()
    if path.is_absolute():
        return str(path)
    candidate = base / path
    return str(candidate.resolve()) if candidate.exists() or ref.startswith(".") else ref


def load_serve_config(path: str | Path) -> ServeConfig:
    """Read and validate a serve YAML file; paths become absolute. One-line `ConfigError`s."""
    path = Path(path)
    data = read_yaml(path, "serve config")
    if not isinstance(data, dict):
        raise ConfigError(f"serve config {path}: expected a mapping with `models:` at the top")
    try:
        cfg = ServeConfig.model_validate(data)
    except ValidationError as e:
        raise first_error(e, f"serve config {path}") from None
    base = path.resolve().parent
    for entry in cfg.models.values():
        if entry.model is not None:
            entry.model = resolve_ref(base, entry.model)
        entry.sharers = [resolve_ref(base, s) for s in entry.sharers]
        entry.fusers = [resolve_ref(base, f) for f in entry.fusers]
        if entry.pipeline is not None:
            entry.pipeline = resolve_ref(base, entry.pipeline)
    return cfg


def config_from_flags(*, name: str | None, model: str | None, sharers: list[str], fusers: list[str],
                      pipeline: str | None, mode: str = "parallel", dtype: str = "auto", **top: Any) -> ServeConfig:
    """The config `agentmesh serve` flags describe: one served model."""
    entry: dict[str, Any] = {"mode": mode, "dtype": dtype}
    if pipeline is not None:
        entry["pipeline"] = str(Path(pipeline).resolve())
    else:
        from agentmesh.models import DEFAULT_MODEL

        entry.update(model=model or DEFAULT_MODEL, sharers=sharers, fusers=fusers)
    if name is None:
        name = Path(pipeline).stem if pipeline else Path(model or "smollm2-135m-instruct").name
        name += "-c2c" if fusers else ""
    try:
        return ServeConfig.model_validate({"models": {name: entry}, **{k: v for k, v in top.items() if v is not None}})
    except ValidationError as e:
        raise first_error(e, "agentmesh serve") from None
