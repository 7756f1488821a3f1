"""Fuser training (spec §7): only the projectors learn, from the receiver's next-token loss.

One step, per micro-batch of chats:
  1. the receiver prefills its prompt minus the last token, the sharer the same span (after its
     private context when the recipe has one); both frozen, under no_grad;
  2. the fuser rewrites the receiver's span cache, with gradients;
  3. the receiver reads [last prompt token + answer tokens] after the fused cache (a transformers
     `DynamicCache` built by `to_hf`; its `torch.cat` keeps the autograd graph), and the loss is
     its cross-entropy on the answer tokens (labels -100 on padding).
AdamW, linear warm-up then linear decay, gradient clipping, the gate temperature annealed after
each optimizer step. Checkpoints are safetensors (tensors) + JSON (everything else); never pickle.
The data order is a pure function of (seed, epoch), so a resumed run sees the batches an
uninterrupted run would have seen.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import orjson
import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agentmesh.c2c.fuser import Fuser, fuse
from agentmesh.c2c.model import C2CModel, SharerInput, context_ids
from agentmesh.cache.hf import to_hf
from agentmesh.errors import CheckpointError, ConfigError
from agentmesh.yaml_file import read_yaml
from agentmesh.models.builtin import DEFAULT_MODEL
from agentmesh.models.inference import pad_sequences, prefill

IGNORE_INDEX = -100
FUSER_DIR = "fuser"
CHECKPOINT_DIR = "checkpoints"
# Recipe keys that may change between a run and its resumption without changing what is learnt.
_RESUME_FREE_KEYS = ("output", "eval_every", "save_every", "keep_checkpoints")
# OpenHermes-2.5 speaker names -> chat roles.
_SPEAKERS = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


# ==== the recipe =================================================================================
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ProjectorRecipe(_Strict):
    """The projector class and its constructor arguments (spec §2 names)."""

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


class TrainRecipe(_Strict):
    """Everything `train` needs; loaded from YAML with `TrainRecipe.from_yaml`."""

    receiver: str = DEFAULT_MODEL
    sharer: str = DEFAULT_MODEL
    projector: ProjectorRecipe = Field(default_factory=ProjectorRecipe)
    layer_map: Literal["last_aligned", "k_nearest"] = "last_aligned"
    alignment: Literal["last", "first", "longest"] = "last"  # cross-tokenizer gather strategy
    init: InitRecipe = Field(default_factory=InitRecipe)
    sharer_context: bool = False  # rows carry a `context` that only the sharer reads, before the prompt
    data: DataRecipe
    steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0.0)
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float | None = Field(1.0, gt=0.0)
    dtype: str = "auto"   # the frozen models' dtype
    device: str = "cpu"
    seed: int = 0
    eval_every: int = Field(100, ge=0)   # optimizer steps; 0: only before and after training
    save_every: int = Field(100, ge=0)   # optimizer steps; 0: only at the end
    keep_checkpoints: int = Field(2, ge=1)
    gradient_checkpointing: bool = False
    save_dtype: str | None = None  # dtype of the saved fuser (e.g. bfloat16 halves its size); None: as trained
    output: Path = Path("runs/fuser")

    @model_validator(mode="after")
    def _length(self) -> "TrainRecipe":
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainRecipe":
        data = read_yaml(path, "recipe file")
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path} must be a YAML mapping of settings, got {type(data).__name__}")
        return cls.parse(data, source=str(path))

    @classmethod
    def parse(cls, data: Mapping[str, Any], *, source: str = "recipe") -> "TrainRecipe":
        """Validate a mapping; errors become one-line `ConfigError`s naming the key."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            value = "" if err["type"] == "missing" else f" (got {err.get('input')!r})"
            more = f"; and {len(e.errors()) - 1} more problem(s)" if len(e.errors()) > 1 else ""
            raise ConfigError(f"{source}: {where}: {err['msg']}{value}{more}") from None

    def resume_key(self) -> str:
        """A digest of the settings a resumed run must share with the run it continues."""
        data = self.model_dump(mode="json", exclude=set(_RESUME_FREE_KEYS))
        return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


# ==== data =======================================================================================
@dataclass(frozen=True)
class ChatRow:
    """One training chat: the prompt turns, the final assistant answer, and the sharer's context."""

    prompt: tuple[dict[str, str], ...]
    answer: str
    context: str | None = None

    def canonical(self) -> bytes:
        row = {"messages": [*self.prompt, {"role": "assistant", "content": self.answer}], "context": self.context}
        return orjson.dumps(row, option=orjson.OPT_SORT_KEYS)


def _row_messages(raw: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a JSON object with 'messages' or 'conversations'")
    if "messages" in raw:
        msgs = raw["messages"]
        if not isinstance(msgs, list) or not all(
                isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise ConfigError(f"{where}: 'messages' must be a list of {{role, content}} strings")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if "conversations" in raw:
        out = []
        for i, turn in enumerate(raw["conversations"] or ()):
            speaker = turn.get("from") if isinstance(turn, Mapping) else None
            if speaker not in _SPEAKERS or not isinstance(turn.get("value"), str):
                raise ConfigError(f"{where}: conversations[{i}] has from={speaker!r}; expected one of "
                                  f"{', '.join(sorted(_SPEAKERS))} with a string 'value'")
            out.append({"role": _SPEAKERS[speaker], "content": turn["value"]})
        return out
    raise ConfigError(f"{where}: expected a 'messages' list (chat) or a 'conversations' list (OpenHermes shape)")


def chat_row(raw: Any, where: str = "row") -> ChatRow | None:
    """A `ChatRow` from a dataset row, or None when it has no final assistant turn to learn."""
    msgs = _row_messages(raw, where)
    if len(msgs) < 2 or msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
        return None
    context = raw.get("context")
    if context is not None and not isinstance(context, str):
        raise ConfigError(f"{where}: 'context' must be a string, got {type(context).__name__}")
    return ChatRow(prompt=tuple(msgs[:-1]), answer=msgs[-1]["content"], context=context or None)


def _read_jsonl(path: Path, limit: int | None) -> list[tuple[str, Any]]:
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist")
    rows = []
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{n}", orjson.loads(line)))
            except orjson.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not valid JSON ({e})") from None
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _read_hf(data: DataRecipe) -> list[tuple[str, Any]]:
    try:
        import datasets  # optional: pip install datasets
    except ImportError:
        raise ConfigError(f"data.dataset {data.dataset!r} needs the `datasets` package; "
                          "install it with `pip install datasets` (or use a local JSONL data.path)") from None
    split = data.split if data.limit is None else f"{data.split}[:{data.limit}]"
    try:
        ds = datasets.load_dataset(data.dataset, data.dataset_config, split=split)
    except Exception as e:  # the datasets library raises many types; report one line
        raise ConfigError(f"could not load data.dataset {data.dataset!r} split {split!r}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return [(f"{data.dataset}[{i}]", row) for i, row in enumerate(ds)]


def _context_task_rows(data: DataRecipe) -> list[tuple[str, Any]]:
    from agentmesh.eval.context_task import generate_split

    task = data.context_task
    assert task is not None
    n = task.n if data.limit is None else min(task.n, data.limit)
    records = generate_split("train", n, seed=task.seed, min_facts=task.min_facts, max_facts=task.max_facts)
    return [(f"context task record {r['id']}", r) for r in records]


def load_rows(data: DataRecipe, *, seed: int = 0) -> tuple[list[ChatRow], list[ChatRow]]:
    """(train rows, held-out rows). Without `eval_path`, a seeded `eval_fraction` of the data is held out."""
    if data.path is not None:
        raw = _read_jsonl(data.path, data.limit)
    elif data.dataset is not None:
        raw = _read_hf(data)
    else:
        raw = _context_task_rows(data)
    rows = [r for where, x in raw if (r := chat_row(x, where)) is not None]
    if not rows:
        raise ConfigError(f"data {data.describe()}: no row ends with an assistant turn to learn from")
    if data.eval_path is not None:
        held = [r for where, x in _read_jsonl(data.eval_path, data.eval_limit) if (r := chat_row(x, where))]
        return rows, held
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = math.ceil(len(rows) * data.eval_fraction) if data.eval_fraction > 0 else 0
    if data.eval_limit is not None:
        n_eval = min(n_eval, data.eval_limit)
    if n_eval >= len(rows):
        raise ConfigError(f"data.eval_fraction={data.eval_fraction} leaves no training rows out of {len(rows)}")
    held_idx = set(order[:n_eval])
    return ([r for i, r in enumerate(rows) if i not in held_idx], [rows[i] for i in sorted(held_idx)])


def data_fingerprint(rows: Sequence[ChatRow]) -> str:
    """sha256 of the rows, in order, each as canonical JSON on its own line."""
    h = hashlib.sha256()
    for r in rows:
        h.update(r.canonical())
        h.update(b"\n")
    return h.hexdigest()


# ==== tokenized examples and batches =============================================================
@dataclass(frozen=True)
class Example:
    row: ChatRow
    prompt_ids: tuple[int, ...]    # receiver chat tokens, ending with the assistant header
    answer_ids: tuple[int, ...]    # receiver tokens of the answer, through its end-of-turn token
    context_ids: tuple[int, ...]   # sharer tokens of its private context (empty without one)


@dataclass
class Batch:
    input_ids: torch.Tensor        # (B, P) left-padded prompts
    attention_mask: torch.Tensor   # (B, P)
    answer_ids: torch.Tensor       # (B, A) right-padded answers
    answer_mask: torch.Tensor      # (B, A)
    labels: torch.Tensor           # (B, A) answer ids, IGNORE_INDEX on padding
    sharer: SharerInput | None     # what the sharer reads; None: the receiver's own span
    num_labels: int
    num_tokens: int                # real tokens read by both models (throughput)


def prepend_context(given: SharerInput, context_ids: Sequence[Sequence[int]], pad_id: int) -> SharerInput:
    """`given` (left-padded) with each row's context tokens put in front; gather indices follow."""
    rows = []
    for b in range(given.input_ids.shape[0]):
        real = given.input_ids[b][given.attention_mask[b].bool()].tolist()
        rows.append([*context_ids[b], *real])
    ids, mask = pad_sequences(rows, pad_id)  # (B, M')
    if given.gather_index is None:
        return SharerInput(ids, mask)  # the span is still the last N positions
    old_pad = given.input_ids.shape[1] - given.attention_mask.sum(-1)              # (B,)
    new_pad = ids.shape[1] - mask.sum(-1)                                          # (B,)
    ctx = torch.tensor([len(c) for c in context_ids], dtype=torch.long)            # (B,)
    shift = (new_pad + ctx - old_pad)[:, None]                                     # (B, 1)
    gather = torch.where(given.gather_index >= 0, given.gather_index + shift, given.gather_index)
    return SharerInput(ids, mask, gather)


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def answer_token_ids(lm: Any, prompt: Sequence[Mapping[str, str]], answer: str,
                     prompt_ids: Sequence[int]) -> list[int]:
    """The receiver's tokens of `answer` as its chat template writes the final turn, through the
    first end-of-turn token (what follows it is template, not answer)."""
    eos = set(lm.eos_token_ids)
    full = lm.chat_ids([*prompt, {"role": "assistant", "content": answer}], add_generation_prompt=False)
    if len(full) > len(prompt_ids) and list(full[:len(prompt_ids)]) == list(prompt_ids):
        ids = list(full[len(prompt_ids):])
    else:  # the template renders history turns differently (e.g. drops a think block): encode alone
        ids = lm.encode(answer)
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i + 1]
    return ids + [lm.eos_token_ids[0]] if lm.eos_token_ids else ids


def tokenize_rows(rows: Sequence[ChatRow], receiver: Any, sharer: Any, *, sharer_context: bool,
                  max_length: int, what: str = "data") -> tuple[list[Example], int]:
    """(examples, number of rows skipped for being longer than `max_length`)."""
    out, skipped = [], 0
    for i, r in enumerate(rows):
        if sharer_context and r.context is None:
            raise ConfigError(f"{what} row {i} has no 'context', but the recipe sets sharer_context: true")
        prompt_ids = receiver.chat_ids(list(r.prompt))
        answer_ids = answer_token_ids(receiver, r.prompt, r.answer, prompt_ids)
        if len(prompt_ids) < 2 or len(prompt_ids) + len(answer_ids) > max_length:
            skipped += 1
            continue
        ctx = context_ids(sharer, r.context) if sharer_context and r.context else []
        out.append(Example(r, tuple(prompt_ids), tuple(answer_ids), tuple(ctx)))
    return out, skipped


def collate(examples: Sequence[Example], c2c: C2CModel, *, sharer_context: bool) -> Batch:
    receiver, sharer = c2c.receiver, c2c.sharers[0]
    r_pad = _pad_id(receiver.tokenizer)
    if c2c.shares_vocab[0]:
        ids, mask = pad_sequences([e.prompt_ids for e in examples], r_pad)      # (B, P)
        given = SharerInput(ids[:, :-1], mask[:, :-1]) if sharer_context else None
    else:
        ids, mask, inputs = c2c.encode_chat([list(e.row.prompt) for e in examples])
        given = inputs[0] if inputs else None
    if sharer_context:
        given = prepend_context(given, [e.context_ids for e in examples], _pad_id(sharer.tokenizer))
    width = max(len(e.answer_ids) for e in examples)
    answer = torch.full((len(examples), width), r_pad, dtype=torch.long)         # (B, A)
    answer_mask = torch.zeros_like(answer)
    for b, e in enumerate(examples):
        answer[b, :len(e.answer_ids)] = torch.tensor(e.answer_ids)
        answer_mask[b, :len(e.answer_ids)] = 1
    labels = answer.masked_fill(answer_mask == 0, IGNORE_INDEX)
    sharer_tokens = int(given.attention_mask.sum()) if given is not None else int(mask.sum()) - len(examples)
    return Batch(ids, mask, answer, answer_mask, labels, given, num_labels=int(answer_mask.sum()),
                 num_tokens=int(mask.sum() + answer_mask.sum()) + sharer_tokens)


# ==== the loss ===================================================================================
def batch_loss(c2c: C2CModel, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy of the receiver on the answer tokens, after the fused prompt cache.

    Gradients flow only into the fuser: both models are frozen and their caches are computed
    under no_grad; the receiver's pass over the answer differentiates through the fused cache.
    """
    receiver = c2c.receiver
    dev = receiver.device
    span_ids, span_mask = batch.input_ids[:, :-1], batch.attention_mask[:, :-1]     # (B, N)
    cache = prefill(receiver, span_ids, span_mask)
    spans = [c2c.sharer_span(0, span_ids, span_mask, batch.sharer)]
    fused = fuse(cache, spans, c2c.mode)
    step_ids = torch.cat([batch.input_ids[:, -1:], batch.answer_ids], dim=1)        # (B, 1 + A)
    step_mask = torch.cat([batch.attention_mask[:, -1:], batch.answer_mask], dim=1)  # (B, 1 + A)
    # Rotary positions count real tokens only, continuing from the span (as decoding does).
    positions = (span_mask.sum(-1, keepdim=True) + step_mask.cumsum(-1) - 1).clamp(min=0)
    out = receiver.model(
        input_ids=step_ids.to(dev), attention_mask=torch.cat([span_mask, step_mask], dim=1).to(dev),
        position_ids=positions.to(dev), past_key_values=to_hf(fused, receiver.config), use_cache=True)
    logits = out.logits[:, :-1].float()  # (B, A, V): the logits at token t predict answer token t
    return F.cross_entropy(logits.flatten(0, 1), batch.labels.to(dev).flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@contextmanager
def checkpointed_projectors(fuser: Fuser, enabled: bool = True) -> Iterator[None]:
    """Recompute each projector's activations in the backward pass instead of storing them.

    transformers' own gradient checkpointing drops `past_key_values`, so it cannot be used on the
    receiver's pass over the fused cache; the projectors, run once per layer over the whole span,
    hold most of the memory anyway. The RNG state is replayed, so Gumbel noise and dropout match.
    """
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    patched = []
    for proj in fuser.projectors:
        plain = proj.residual
        proj.residual = (lambda plain: lambda s, t: checkpoint(plain, s, t, use_reentrant=False))(plain)
        patched.append(proj)
    try:
        yield
    finally:
        for proj in patched:
            del proj.residual  # back to the class's method


@torch.no_grad()
def held_out_loss(c2c: C2CModel, examples: Sequence[Example], *, batch_size: int, sharer_context: bool) -> float:
    """Mean per-token loss on `examples`, with the fuser as it runs at inference (hard gates, no dropout)."""
    fuser = c2c.fusers[0]
    was_training = fuser.training
    fuser.eval()
    try:
        total, count = 0.0, 0
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size], c2c, sharer_context=sharer_context)
            total += float(batch_loss(c2c, batch))
            count += batch.num_labels
        return total / max(count, 1)
    finally:
        fuser.train(was_training)


# ==== schedule and data order ====================================================================
def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def micro_batch(n: int, batch_size: int, seed: int, index: int,
                orders: dict[int, list[int]] | None = None) -> list[int]:
    """Row indices of micro-batch `index`: each epoch is a fresh seeded shuffle of the n rows.

    `orders` memoises the epochs' shuffles for one run (pass the same dict on every call).
    """
    per_epoch = math.ceil(n / batch_size)
    epoch, k = divmod(index, per_epoch)
    orders = {} if orders is None else orders
    if epoch not in orders:
        order = list(range(n))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        orders.clear()  # only the current epoch is ever needed again
        orders[epoch] = order
    return orders[epoch][k * batch_size:(k + 1) * batch_size]


def total_steps(recipe: TrainRecipe, num_rows: int) -> int:
    if recipe.steps is not None:
        return recipe.steps
    per_epoch = math.ceil(num_rows / recipe.batch_size)
    return max(1, math.ceil((recipe.epochs or 1.0) * per_epoch / recipe.grad_accum))


# ==== checkpoints (safetensors + JSON, no pickle) ================================================
def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = t
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def _set_rng(tensors: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


@dataclass
class TrainState:
    """What a checkpoint restores besides tensors."""

    step: int = 0
    losses: list[float] = field(default_factory=list)          # train loss per optimizer step
    lrs: list[float] = field(default_factory=list)             # learning rate used by each step
    eval_losses: list[list[float]] = field(default_factory=list)  # [step, loss] pairs
    tokens: int = 0
    seconds: float = 0.0


def save_checkpoint(folder: Path, *, fuser: Fuser, opt: torch.optim.Optimizer, sched: Any,
                    state: TrainState, recipe: TrainRecipe, data_sha256: str, keep: int) -> Path:
    from safetensors.torch import save_file

    root = folder / CHECKPOINT_DIR
    target = root / f"step-{state.step:07d}"
    tmp = root / f".tmp-step-{state.step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    opt_tensors, opt_meta = _optimizer_to_flat(opt)
    tensors = {f"fuser.{k}": v.detach().contiguous() for k, v in fuser.state_dict().items()}
    save_file({**tensors, **opt_tensors, **_rng_tensors()}, str(tmp / "state.safetensors"))
    meta = {"format": "agentmesh-train-checkpoint", "version": 1, "resume_key": recipe.resume_key(),
            "data_sha256": data_sha256, "state": state.__dict__, "optimizer": opt_meta,
            "scheduler": sched.state_dict()}
    (tmp / "trainer.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(p for p in (folder / CHECKPOINT_DIR).glob("step-*") if (p / "trainer.json").is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path, *, fuser: Fuser, opt: torch.optim.Optimizer, sched: Any,
                    recipe: TrainRecipe, data_sha256: str) -> TrainState:
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
        tensors = load_file(str(path / "state.safetensors"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"training checkpoint {path} is unreadable: {e}") from None
    if meta.get("format") != "agentmesh-train-checkpoint":
        raise CheckpointError(f"{path}/trainer.json is not an agentmesh training checkpoint")
    if meta["resume_key"] != recipe.resume_key() or meta["data_sha256"] != data_sha256:
        raise ConfigError(f"checkpoint {path} was made with another recipe or other data; "
                          "rerun with --no-resume (starts over) or choose another output folder")
    fuser.load_state_dict({k[len("fuser."):]: v for k, v in tensors.items() if k.startswith("fuser.")}, strict=True)
    _optimizer_from_flat(opt, tensors, meta["optimizer"])
    sched.load_state_dict(meta["scheduler"])
    _set_rng(tensors)
    return TrainState(**meta["state"])


# ==== results ====================================================================================
@dataclass
class TrainResult:
    output_dir: Path
    fuser_dir: Path | None          # None when the run stopped early (`stop_at`)
    steps: int                      # optimizer steps done
    total_steps: int
    losses: list[float]             # train loss per optimizer step
    lrs: list[float]                # learning rate of each optimizer step
    eval_losses: list[tuple[int, float]]  # (step, held-out loss); step 0 is before training
    final_eval_loss: float | None
    final_train_loss: float | None
    data_sha256: str

    @property
    def completed(self) -> bool:
        return self.steps >= self.total_steps


def plot_loss_curve(state: TrainState, path: Path, title: str = "fuser training") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.add_subplot()
    if state.losses:
        steps = range(1, len(state.losses) + 1)
        ax.plot(steps, state.losses, lw=0.8, alpha=0.45, label="train (per step)")
        w = max(1, len(state.losses) // 25)
        if w > 1:
            smooth = [sum(state.losses[max(0, i - w + 1):i + 1]) / len(state.losses[max(0, i - w + 1):i + 1])
                      for i in range(len(state.losses))]
            ax.plot(steps, smooth, lw=1.6, label=f"train ({w}-step mean)")
    if state.eval_losses:
        ax.plot([s for s, _ in state.eval_losses], [v for _, v in state.eval_losses], "o-", lw=1.6, label="held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per answer token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def _final_train_loss(losses: Sequence[float]) -> float | None:
    tail = losses[-max(1, min(10, len(losses) // 10 or 1)):]
    return sum(tail) / len(tail) if tail else None


# ==== the loop ===================================================================================
def _load_models(recipe: TrainRecipe, pool: Any) -> tuple[Any, Any]:
    if pool is None:
        from agentmesh.models.pool import ModelPool

        pool = ModelPool()  # loads a shared receiver/sharer ref once
    receiver = pool.get(recipe.receiver, dtype=recipe.dtype, device=recipe.device)
    sharer = pool.get(recipe.sharer, dtype=recipe.dtype, device=recipe.device)
    for lm in (receiver, sharer):
        lm.model.eval()
        lm.model.requires_grad_(False)
    return receiver, sharer


def _build_fuser(recipe: TrainRecipe, receiver: Any, sharer: Any, steps: int) -> Fuser:
    p = recipe.projector
    args = dict(hidden_dim=p.hidden_dim, intermediate_dim=p.intermediate_dim, num_layers=p.num_layers,
                dropout=p.dropout, initial_temperature=p.initial_temperature,
                final_temperature=p.final_temperature, anneal_steps=p.anneal_steps or steps, dtype=p.dtype,
                zero_init=recipe.init.zero_init, **p.args)
    fuser = Fuser.build(receiver.signature, sharer.signature, projector=p.type, layer_map=recipe.layer_map,
                        alignment=recipe.alignment, **args)
    return fuser.to(receiver.device)


def _param_groups(fuser: Fuser, weight_decay: float) -> list[dict[str, Any]]:
    # Matrices decay; biases, norm weights and gate logits (0-d/1-d) do not.
    decay = [p for p in fuser.parameters() if p.dim() >= 2]
    rest = [p for p in fuser.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train(recipe: TrainRecipe | Mapping[str, Any], *, pool: Any = None, progress: bool = True,
          resume: bool = True, stop_at: int | None = None) -> TrainResult:
    """Train a fuser for `recipe`; write checkpoints, the fuser, its provenance and a loss plot.

    `pool` (a `ModelPool`) supplies the models (tests register tiny ones by name). With `resume`,
    the newest checkpoint in the output folder is continued. `stop_at` ends the run after that
    many optimizer steps with a checkpoint (the schedule still spans the full run).
    """
    if not isinstance(recipe, TrainRecipe):
        recipe = TrainRecipe.parse(recipe)
    out = Path(recipe.output)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)

    receiver, sharer = _load_models(recipe, pool)
    train_rows, eval_rows = load_rows(recipe.data, seed=recipe.seed)
    what = recipe.data.describe()
    tok = dict(sharer_context=recipe.sharer_context, max_length=recipe.data.max_length)
    train_ex, skipped = tokenize_rows(train_rows, receiver, sharer, what=what, **tok)
    eval_ex, eval_skipped = tokenize_rows(eval_rows, receiver, sharer, what=f"{what} (held out)", **tok)
    if not train_ex:
        raise ConfigError(f"data {what}: all {len(train_rows)} training rows are longer than "
                          f"data.max_length={recipe.data.max_length} tokens")
    fingerprint = data_fingerprint([e.row for e in train_ex])
    steps = total_steps(recipe, len(train_ex))
    warmup = math.ceil(recipe.warmup_ratio * steps)

    torch.manual_seed(recipe.seed)
    fuser = _build_fuser(recipe, receiver, sharer, steps)
    c2c = C2CModel(receiver, [sharer], [fuser])
    fuser.train()  # C2CModel puts its fusers in eval mode
    opt = torch.optim.AdamW(_param_groups(fuser, recipe.weight_decay), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    state = TrainState()
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, fuser=fuser, opt=opt, sched=sched, recipe=recipe, data_sha256=fingerprint)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), encoding="utf-8")

    def evaluate() -> None:
        if eval_ex and not any(s == state.step for s, _ in state.eval_losses):
            loss = held_out_loss(c2c, eval_ex, batch_size=recipe.batch_size, sharer_context=recipe.sharer_context)
            state.eval_losses.append([state.step, loss])

    end = steps if stop_at is None else min(steps, stop_at)
    orders: dict[int, list[int]] = {}
    params = [p for p in fuser.parameters() if p.requires_grad]
    from tqdm.auto import tqdm

    if state.step == 0:
        evaluate()  # the receiver as if unfused: a fresh fuser's gates are closed at inference
    bar = tqdm(total=steps, initial=state.step, disable=not progress, desc="train fuser", unit="step",
               dynamic_ncols=True)
    try:
        with checkpointed_projectors(fuser, recipe.gradient_checkpointing):
            while state.step < end:
                started = time.perf_counter()
                first = state.step * recipe.grad_accum
                micro = [collate([train_ex[i] for i in micro_batch(len(train_ex), recipe.batch_size, recipe.seed,
                                                                  first + j, orders)],
                                 c2c, sharer_context=recipe.sharer_context)
                         for j in range(recipe.grad_accum)]
                loss, lr = _optimizer_step(c2c, micro, opt, sched, params, recipe.grad_clip)
                state.step += 1
                fuser.update_temperature(state.step)
                elapsed = time.perf_counter() - started
                tokens = sum(b.num_tokens for b in micro)
                state.losses.append(loss)
                state.lrs.append(lr)
                state.tokens += tokens
                state.seconds += elapsed
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens / elapsed:.0f}")
                if recipe.eval_every and state.step % recipe.eval_every == 0:
                    evaluate()
                    bar.set_postfix(loss=f"{loss:.3f}", eval=f"{state.eval_losses[-1][1]:.3f}")
                if recipe.save_every and state.step % recipe.save_every == 0 and state.step < end:
                    save_checkpoint(out, fuser=fuser, opt=opt, sched=sched, state=state, recipe=recipe,
                                    data_sha256=fingerprint, keep=recipe.keep_checkpoints)
    finally:
        bar.close()

    done = state.step >= steps
    if done:
        evaluate()
    save_checkpoint(out, fuser=fuser, opt=opt, sched=sched, state=state, recipe=recipe,
                    data_sha256=fingerprint, keep=recipe.keep_checkpoints)
    (out / "history.json").write_text(json.dumps(state.__dict__), encoding="utf-8")
    plot_loss_curve(state, out / "loss_curve.png", title=f"{receiver.name} <- {sharer.name}")
    final_eval = state.eval_losses[-1][1] if state.eval_losses and done else None
    final_train = _final_train_loss(state.losses)
    fuser_dir = None
    if done:
        provenance = {
            "trained_by": "agentmesh train", "recipe": recipe.model_dump(mode="json"),
            "data": what, "data_sha256": fingerprint, "train_rows": len(train_ex), "eval_rows": len(eval_ex),
            "skipped_rows": {"train": skipped, "eval": eval_skipped}, "steps": state.step,
            "final_train_loss": final_train, "final_eval_loss": final_eval,
            "initial_eval_loss": state.eval_losses[0][1] if state.eval_losses else None,
            "train_seconds": round(state.seconds, 2), "tokens": state.tokens,
            "receiver_source": receiver.source, "sharer_source": sharer.source,
            "versions": {"torch": torch.__version__, "transformers": _version("transformers"),
                         "agentmesh": _version("agentmesh")},
        }
        fuser_dir = _save_final(fuser, out / FUSER_DIR, provenance, recipe)
    return TrainResult(output_dir=out, fuser_dir=fuser_dir, steps=state.step, total_steps=steps,
                       losses=list(state.losses), lrs=list(state.lrs),
                       eval_losses=[(int(s), float(v)) for s, v in state.eval_losses],
                       final_eval_loss=final_eval, final_train_loss=final_train, data_sha256=fingerprint)


def _optimizer_step(c2c: C2CModel, micro: Sequence[Batch], opt: torch.optim.Optimizer, sched: Any,
                    params: Sequence[torch.nn.Parameter], grad_clip: float | None) -> tuple[float, float]:
    """One optimizer step over the micro-batches; returns (loss per answer token, lr used)."""
    n_labels = sum(b.num_labels for b in micro)
    loss_sum = 0.0
    for b in micro:
        ce = batch_loss(c2c, b)
        (ce / n_labels).backward()  # token-weighted, as if all micro-batches were one batch
        loss_sum += float(ce.detach())
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    lr = sched.get_last_lr()[0]
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum / n_labels, lr


def _save_final(fuser: Fuser, folder: Path, provenance: dict[str, Any], recipe: TrainRecipe) -> Path:
    from agentmesh.c2c.checkpoints import save_fuser

    fuser.eval()
    if recipe.save_dtype is not None:
        fuser = cast_fuser(fuser, recipe.save_dtype)
    # The model refs the recipe names are what a user passes to load the pair again.
    ids = {"base_model": recipe.receiver, "teacher_model": recipe.sharer}
    fuser.config = replace(fuser.config, provenance={**fuser.config.provenance, **ids})
    save_fuser(fuser, folder, provenance=provenance)
    return folder


def cast_fuser(fuser: Fuser, dtype: str | torch.dtype) -> Fuser:
    """A copy of `fuser` whose projectors are rebuilt in `dtype` (their constructor argument too,
    so the saved checkpoint says what it holds); the gate temperature buffers stay float32."""
    from agentmesh.c2c.projector import dtype_name, parse_dtype
    from agentmesh.c2c.registry import build_projector

    name = dtype_name(parse_dtype(dtype))
    args = tuple({**a, "dtype": name} for a in fuser.config.projector_args)
    projectors = []
    for p, a in zip(fuser.projectors, args):
        q = build_projector(fuser.config.projector, a)
        q.load_state_dict(p.state_dict())  # copy_ casts to q's dtypes
        projectors.append(q.eval())
    return Fuser(replace(fuser.config, projector_args=args), projectors).eval()


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


__all__ = [
    "Batch", "ChatRow", "ContextTaskRecipe", "DataRecipe", "Example", "InitRecipe", "ProjectorRecipe", "TrainRecipe", "TrainResult",
    "TrainState", "batch_loss", "cast_fuser", "chat_row", "collate", "data_fingerprint", "held_out_loss", "load_rows",
    "lr_factor", "micro_batch", "plot_loss_curve", "prepend_context", "tokenize_rows",
    "train",
]
