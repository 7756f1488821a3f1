"""The training recipe: every setting `agentmesh train` reads, validated by pydantic (extra keys forbidden)."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Literal, Mapping

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agentmesh.errors import ConfigError
from agentmesh.models.builtin import DEFAULT_MODEL
from agentmesh.yaml_file import read_yaml

# Recipe keys that may change between a run and its resumption without changing what is learnt.
_RESUME_FREE_KEYS = ("output", "eval_every", "save_every", "keep_checkpoints")
# For fusers also how the global batch is split over processes and micro-batches (its size is
# checked on resume), where it runs and how memory is saved.
_FUSER_RESUME_FREE_KEYS = (*_RESUME_FREE_KEYS, "batch_size", "grad_accum", "global_batch", "device",
                           "gradient_checkpointing", "fsdp", "check_memory")
# Keys version-1 checkpoints (single process) did not have.
_NEW_KEYS = ("global_batch", "autocast", "fsdp", "gate_noise", "check_memory", "fusion")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @classmethod
    def parse(cls, data: Mapping[str, Any], *, source: str = "recipe") -> Any:
        """Validate a mapping; errors become one-line `ConfigError`s naming the key."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            value = "" if err["type"] == "missing" else f" (got {err.get('input')!r})"
            more = f"; and {len(e.errors()) - 1} more problem(s)" if len(e.errors()) > 1 else ""
            raise ConfigError(f"{source}: {where}: {err['msg']}{value}{more}") from None


class ProjectorRecipe(_Strict):
    """The projector class and its constructor arguments (the published checkpoints' names)."""

    type: str = "C2CProjector"
    hidden_dim: int = Field(1024, ge=1)
    intermediate_dim: int = Field(1024, ge=1)
    num_layers: int = Field(3, ge=3)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    initial_temperature: float = Field(1.0, gt=0.0)
    final_temperature: float = Field(0.001, gt=0.0)
    anneal_steps: int | None = Field(None, ge=1, description="default: the run's optimizer steps")
    dtype: str = "float32"
    args: dict[str, Any] = Field(default_factory=dict, description="extra arguments for other projector classes")


class InitRecipe(_Strict):
    zero_init: bool = False  # zero the output layers: a fresh fuser is then the identity


class ContextTaskRecipe(_Strict):
    """The built-in context-transfer task's train split, generated in memory (seeded, no download)."""

    n: int = Field(2000, ge=1)
    seed: int = 0
    min_facts: int = Field(3, ge=2)
    max_facts: int = Field(6, ge=2)


class DataRecipe(_Strict):
    """Chats to learn from: a local JSONL file, a Hugging Face dataset, or the context task.

    Rows hold `messages` (role/content) or OpenHermes-2.5 `conversations` (from/value), and an
    optional `context` (a passage only the sharer reads). The final turn must be the assistant's.
    """

    path: Path | None = None
    dataset: str | None = None           # Hugging Face dataset id, e.g. teknium/OpenHermes-2.5
    dataset_config: str | None = None
    context_task: ContextTaskRecipe | None = None
    split: str = "train"
    limit: int | None = Field(None, ge=1)
    max_length: int = Field(2048, ge=2)  # prompt + answer tokens; longer rows are skipped
    eval_fraction: float = Field(0.01, ge=0.0, lt=1.0)
    eval_path: Path | None = None
    eval_limit: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> "DataRecipe":
        if sum(x is not None for x in (self.path, self.dataset, self.context_task)) != 1:
            raise ValueError("give exactly one of data.path (a chat JSONL file), data.dataset (a Hugging Face id) "
                             "or data.context_task (the built-in task)")
        return self

    def describe(self) -> str:
        if self.context_task is not None:
            return f"context task (train split, n={self.context_task.n}, seed={self.context_task.seed})"
        return str(self.path or self.dataset)


class RunRecipe(_Strict):
    """What every training run sets: its data, its length (`steps` or `epochs`), the optimizer and
    its schedule, batches, precision, evaluation and checkpoints. The trainers' recipes add their own."""

    data: DataRecipe
    steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0.0)
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    batch_size: int = Field(8, ge=1, description="sequences per micro-batch on each process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step on each process")
    grad_clip: float | None = Field(1.0, gt=0.0)
    dtype: str = "auto"   # the frozen models' dtype
    device: str = "cpu"
    seed: int = 0
    eval_every: int = Field(100, ge=0)   # optimizer steps; 0: only before and after training
    save_every: int = Field(100, ge=0)   # optimizer steps; 0: only at the end
    keep_checkpoints: int = Field(2, ge=1)
    output: Path = Path("runs/fuser")

    @model_validator(mode="after")
    def _length(self) -> "RunRecipe":
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        return self

    def total_steps(self, num_rows: int, global_batch: int) -> int:
        """Optimizer steps of the run: `steps`, or `epochs` over the rows at `global_batch` rows a step."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil((self.epochs or 1.0) * num_rows / global_batch))


class TrainRecipe(RunRecipe):
    """Everything `train` needs; loaded from YAML with `TrainRecipe.from_yaml`."""

    receiver: str = DEFAULT_MODEL
    sharer: str = DEFAULT_MODEL
    receiver_adapter: Path | None = None  # PEFT adapter folder merged into the frozen receiver
    sharer_adapter: Path | None = None    # ... into the sharer: a specialist fine-tune (`kind: finetune`)
    projector: ProjectorRecipe = Field(default_factory=ProjectorRecipe)
    layer_map: Literal["last_aligned", "k_nearest"] = "last_aligned"
    alignment: Literal["last", "first", "longest"] = "last"  # cross-tokenizer gather strategy
    fusion: Literal["prompt", "prompt+response"] = "prompt"  # also fuse each answer token as it is read
    init: InitRecipe = Field(default_factory=InitRecipe)
    sharer_context: bool = False  # rows carry a `context` that only the sharer reads, before the prompt
    global_batch: int | None = Field(
        None, ge=1, description="sequences per optimizer step over all processes; sets grad_accum to "
                                "global_batch / (batch_size x processes). None: batch_size x grad_accum x processes")
    gradient_checkpointing: bool = False  # recompute projector and receiver activations in the backward pass
    autocast: Literal["bfloat16", "float16"] | None = None  # mixed precision of the forward passes
    fsdp: bool = False  # shard the fuser's parameters, gradients and optimizer state over processes
    gate_noise: bool = True  # Gumbel noise in the training gates; off: sigmoid(logit / tau), deterministic
    check_memory: bool = True  # refuse to start when the memory estimate exceeds what the device has free
    save_dtype: str | None = None  # dtype of the saved fuser (e.g. bfloat16 halves its size); None: as trained

    def accumulation(self, processes: int) -> int:
        """Micro-batches per optimizer step on each of `processes` processes."""
        if self.global_batch is None:
            return self.grad_accum
        per_round = self.batch_size * processes
        if self.global_batch % per_round:
            raise ConfigError(f"global_batch={self.global_batch} is not a multiple of batch_size={self.batch_size} "
                              f"x {processes} process(es); choose a batch_size (or process count) that divides it")
        accum = self.global_batch // per_round
        if "grad_accum" in self.model_fields_set and self.grad_accum != accum:
            raise ConfigError(f"grad_accum={self.grad_accum} contradicts global_batch={self.global_batch} with "
                              f"batch_size={self.batch_size} x {processes} process(es) (that is grad_accum={accum}); "
                              "give one of them")
        return accum

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainRecipe":
        data = read_yaml(path, "recipe file")
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path} must be a YAML mapping of settings, got {type(data).__name__}")
        return cls.parse(data, source=str(path))

    def resume_key(self, *, legacy: bool = False) -> str:
        """A digest of the settings a resumed run must share with the run it continues
        (`legacy`: as version-1 checkpoints computed it)."""
        free = {*_RESUME_FREE_KEYS, *_NEW_KEYS} if legacy else set(_FUSER_RESUME_FREE_KEYS)
        data = self.model_dump(mode="json", exclude=free)
        if data.get("fusion") == "prompt":
            del data["fusion"]  # the default, as before the key existed: runs started then still resume
        for key in ("receiver_adapter", "sharer_adapter"):
            if data.get(key) is None:
                data.pop(key, None)  # likewise
        return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]



__all__ = ["ContextTaskRecipe", "DataRecipe", "InitRecipe", "ProjectorRecipe", "TrainRecipe"]
