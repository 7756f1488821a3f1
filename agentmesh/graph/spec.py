"""The pipeline file schema (pydantic v2, extra keys forbidden everywhere).

This is the user-facing edge of the graph package: a YAML file is checked against these models, then
turned into a `Graph` (plain dataclasses) by `Graph.from_spec`. Semantic checks that need the whole
graph (unknown agents, cycles, fusers, placeholders) live in `validate.py`; this module only checks
the shape and the value of each key.

A pipeline file, every key shown (most are optional):

    version: 1
    name: programmer_writer
    models:   {smol: {ref: smollm2-135m-instruct, dtype: auto, device: cpu}}
    fusers:   {ctx: {path: fusers/smollm2_context, receiver: smol, sharer: smol}}
    agents:
      programmer: {model: smol, role: "...", context_file: assets/page.html}
      writer:     {model: smol, prompt: "{input}", max_new_tokens: 96, host: edge}
    edges:    [{from: programmer, to: writer, type: cache, mode: prefix}]
    fusion:   {writer: parallel}
    hosts:    {edge: {broker: mqtt://10.0.0.2:1883}}
    broker:   {url: mqtt://localhost:1883, username: mesh, password_env: MQTT_PASSWORD}
    auth:     {key_env: AGENTMESH_KEY, encrypt: false, hosts: {edge: {key_file: edge.key, public_key: "..."}}}
    inputs:   {input: "Write the intro"}
    outputs:  [writer]
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from agentmesh.errors import schema_error as custom_error
from agentmesh.transport.config import ENV_NAME_RE, BrokerConfig, check_broker_url
from agentmesh.types import FusionMode

# Must equal agentmesh.models.builtin.DEFAULT_MODEL; repeated here so that reading a pipeline file
# never imports torch/transformers.
DEFAULT_MODEL = "smollm2-135m-instruct"
SPEC_VERSION = 1

CLIENT_HOST = "client"  # the host name of a caller acting as no host (`agentmesh run` without --host)
IDENT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]*$"
IDENT_RE = re.compile(IDENT_PATTERN)
IDENT_HINT = "names start with a letter or _, then letters, digits, _ or -"
DEVICE_RE = re.compile(r"^(cpu|auto|mps|cuda(:\d+)?)$")

Name = Annotated[str, StringConstraints(pattern=IDENT_PATTERN)]
EdgeType = Literal["text", "cache"]
CacheMode = Literal["fuse", "prefix"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]

_DTYPE_SYNONYMS = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=False)


class ModelSpec(_Spec):
    """A model the agents can name by alias."""

    ref: str = Field(min_length=1, description="builtin name, local folder, .gguf file or hub id (org/name, hf://org/name)")
    adapter: str | None = Field(default=None, min_length=1,
                                description="PEFT adapter folder (e.g. LoRA) merged into the base model `ref`")
    dtype: Dtype = "auto"
    device: str = "cpu"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # `small: smollm2-135m-instruct` is short for `small: {ref: smollm2-135m-instruct}`.
        return {"ref": data} if isinstance(data, str) else data

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_synonyms(cls, v: Any) -> Any:
        return _DTYPE_SYNONYMS.get(v, v) if isinstance(v, str) else v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE_RE.match(v):
            raise custom_error(f"unknown device {v!r}", "use cpu, cuda, cuda:N, mps or auto")
        return v


class FuserSpec(_Spec):
    """A trained fuser: a local checkpoint folder or `hf://org/repo[/subfolder]`."""

    path: str = Field(min_length=1)
    receiver: Name | None = Field(default=None, description="model alias the fuser was trained for as receiver")
    sharer: Name | None = Field(default=None, description="model alias the fuser was trained for as sharer")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"path": data} if isinstance(data, str) else data


class AgentSpec(_Spec):
    """One agent: a model, a role, private context, a prompt template and generation settings."""

    model: str | None = Field(default=None, min_length=1, description=f"model alias or ref; default {DEFAULT_MODEL}")
    role: str | None = Field(default=None, description="system prompt")
    context: str | None = Field(default=None, description="private text only this agent sees")
    context_file: str | None = Field(default=None, min_length=1, description="file with the private text, relative to the YAML file")
    prompt: str | None = Field(default=None, description="template with {input}, {<input name>} and {<upstream text agent>}")
    answer_start: str | None = Field(default=None, min_length=1,
                                     description="text the answer begins with (read after the generation prompt, part of the answer)")
    max_new_tokens: int = Field(default=128, ge=1, le=1_000_000)
    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy decoding")
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    stop: list[str] = Field(default_factory=list, description="stop strings")
    host: Name | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_context(self) -> AgentSpec:
        if self.context is not None and self.context_file is not None:
            raise custom_error("both context and context_file are set", "keep one of them")
        return self


class EdgeSpec(_Spec):
    """A channel from one agent to another: `text` (generated text) or `cache` (KV cache)."""

    sender: Name = Field(alias="from")
    receiver: Name = Field(alias="to")
    type: EdgeType = "text"
    mode: CacheMode | None = Field(default=None, description="cache edges only; default fuse")
    fuser: str | None = Field(default=None, min_length=1, description="fuse edges only: fuser alias or path/hf:// ref")

    @model_validator(mode="after")
    def _default_mode(self) -> EdgeSpec:
        # A cache edge without a mode is C2C fusion; spelled out so that dumps are explicit.
        if self.type == "cache" and self.mode is None:
            self.mode = "fuse"
        return self


class HostSpec(_Spec):
    """A machine that runs some of the agents (a worker process joins as this host)."""

    broker: str | None = Field(default=None, description="mqtt:// url for this host; default: the top-level broker")
    description: str | None = None
    callers: list[Name] | None = Field(default=None, description="hosts whose runs this host's worker serves "
                                       "(`client`: a caller without --host); default: the hosts its agents "
                                       "share an edge with")

    @model_validator(mode="before")
    @classmethod
    def _null(cls, data: Any) -> Any:
        return {} if data is None else data

    @field_validator("broker")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return None if v is None else check_broker_url(v)


class KeySource(_Spec):
    """Where a secret key is: an environment variable or a file (never the key itself)."""

    key_env: str | None = Field(default=None, description="environment variable holding the key")
    key_file: str | None = Field(default=None, description="file holding the key (mode 600), relative to this file")
    key: str | None = Field(default=None, exclude=True, description="rejected: use key_env or key_file")

    @field_validator("key")
    @classmethod
    def _no_key(cls, v: str | None) -> None:
        if v is not None:
            raise custom_error("a key must not be written in a pipeline file",
                               "put it in a file (chmod 600) named by key_file:, or in an environment variable "
                               "named by key_env:")
        return None

    @field_validator("key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not ENV_NAME_RE.match(v):
            raise custom_error(f"{v!r} is not an environment variable name",
                               "name the variable that holds the key, e.g. AGENTMESH_KEY")
        return v

    @property
    def has_source(self) -> bool:
        return self.key_env is not None or self.key_file is not None


PUBLIC_KEY_RE = re.compile(r"^[A-Za-z0-9+/]{43}=$")


class HostKeySpec(KeySource):
    """A host's own signing key (Ed25519): its private key stays on that host (key_env or key_file,
    read only there); its public key, which is no secret, is written here for the other hosts."""

    public_key: str = Field(description="the host's Ed25519 public key, base64 (`agentmesh keygen` prints it)")

    @field_validator("public_key")
    @classmethod
    def _public(cls, v: str) -> str:
        if not PUBLIC_KEY_RE.match(v):
            raise custom_error(f"{v[:60]!r} is not an Ed25519 public key (44 characters of base64)",
                               "paste the `public_key:` line `agentmesh keygen FILE` printed")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> HostKeySpec:
        if self.key_env is not None and self.key_file is not None or not self.has_source:
            raise custom_error("a host key needs exactly one of key_env and key_file")
        return self


class AuthSpec(KeySource):
    """How messages between hosts are authenticated: a pipeline key every host holds (HMAC), and/or
    a key per host (`hosts:`, Ed25519 signatures), so that a host can only speak as itself.
    `encrypt: true` also encrypts every message (AES-256-GCM under a key derived from the pipeline key)."""

    hosts: dict[Name, HostKeySpec] = Field(default_factory=dict, description="per-host signing keys")
    encrypt: bool = Field(default=False, description="encrypt messages between hosts (needs the pipeline key)")
    window_s: float = Field(default=60.0, gt=0, le=3600, description="how old (or early) a message may be, "
                            "seconds; clocks of the hosts must agree within it")

    @field_validator("hosts", mode="before")
    @classmethod
    def _null_hosts(cls, v: Any) -> Any:
        return {} if v is None else v

    @model_validator(mode="after")
    def _one_source(self) -> AuthSpec:
        if self.key_env is not None and self.key_file is not None:
            raise custom_error("auth needs at most one of key_env and key_file")
        if not self.has_source and not self.hosts:
            raise custom_error("auth needs a pipeline key (key_env or key_file) or per-host keys (hosts:)")
        if self.encrypt and not self.has_source:
            raise custom_error("auth.encrypt needs the pipeline key (key_env or key_file), which every host shares",
                               "add key_env: or key_file: next to encrypt:")
        return self


class GraphSpec(_Spec):
    """A whole pipeline file."""

    version: Literal[1]
    name: Name
    description: str | None = None
    models: dict[Name, ModelSpec] = Field(default_factory=dict)
    fusers: dict[Name, FuserSpec] = Field(default_factory=dict)
    agents: dict[Name, AgentSpec] = Field(min_length=1)
    edges: list[EdgeSpec] = Field(default_factory=list)
    fusion: dict[Name, FusionMode] = Field(default_factory=dict, description="multi-sharer fusion mode per receiver")
    hosts: dict[Name, HostSpec] = Field(default_factory=dict)
    broker: BrokerConfig | None = None
    auth: AuthSpec | None = None
    inputs: dict[Name, str] = Field(default_factory=dict, description="input name -> default text")
    outputs: list[Name] | None = Field(default=None, description="agents whose outputs a run returns; default the sinks")

    @field_validator("agents", mode="before")
    @classmethod
    def _null_agents(cls, v: Any) -> Any:
        # `writer:` with nothing under it = an agent with every default.
        if isinstance(v, dict):
            return {k: ({} if a is None else a) for k, a in v.items()}
        return v

    @field_validator("models", "fusers", "hosts", "inputs", "fusion", mode="before")
    @classmethod
    def _null_table(cls, v: Any) -> Any:
        return {} if v is None else v

    @field_validator("edges", mode="before")
    @classmethod
    def _null_edges(cls, v: Any) -> Any:
        return [] if v is None else v
