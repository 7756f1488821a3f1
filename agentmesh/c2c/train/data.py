"""Training data: chat rows from JSONL, a Hugging Face dataset or the context task; the receiver's
tokens of each chat; batches; and the seeded order in which a run reads them."""
from __future__ import annotations

import hashlib
import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import orjson
import torch

from agentmesh.c2c.model import C2CModel, SharerInput
from agentmesh.models.reading import reading_ids
from agentmesh.c2c.train.recipe import DataRecipe
from agentmesh.errors import ConfigError, error_line
from agentmesh.models.inference import pad_sequences
from agentmesh.models.protocol import LanguageModel
from agentmesh.tasks.datasets import iter_jsonl

IGNORE_INDEX = -100
# OpenHermes-2.5 speaker names -> chat roles.
_SPEAKERS = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


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
    return list(itertools.islice(iter_jsonl(path, "data file"), limit))


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
                          f"{error_line(e)}") from None
    return [(f"{data.dataset}[{i}]", row) for i, row in enumerate(ds)]


def _context_task_rows(data: DataRecipe) -> list[tuple[str, Any]]:
    from agentmesh.tasks.context_task import generate_split

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


def answer_token_ids(lm: LanguageModel, prompt: Sequence[Mapping[str, str]], answer: str,
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


def tokenize_rows(rows: Sequence[ChatRow], receiver: LanguageModel, sharer: LanguageModel, *, sharer_context: bool,
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
        ctx = reading_ids(sharer, context=r.context) if sharer_context else []
        out.append(Example(r, tuple(prompt_ids), tuple(answer_ids), tuple(ctx)))
    return out, skipped


@dataclass(frozen=True)
class RunData:
    """A run's examples: `train` and `held_out`, what the data is (for messages and provenance), the
    rows skipped for length in each, and the training rows' fingerprint (checked on resume)."""

    train: list[Example]
    held_out: list[Example]
    what: str
    skipped: int
    held_out_skipped: int
    fingerprint: str


def run_data(data: DataRecipe, receiver: LanguageModel, sharer: LanguageModel, *, seed: int,
             sharer_context: bool) -> RunData:
    """Load and tokenize a run's rows; fails when no training row fits `data.max_length`."""
    train_rows, eval_rows = load_rows(data, seed=seed)
    what = data.describe()
    tok = dict(sharer_context=sharer_context, max_length=data.max_length)
    train, skipped = tokenize_rows(train_rows, receiver, sharer, what=what, **tok)
    held_out, held_out_skipped = tokenize_rows(eval_rows, receiver, sharer, what=f"{what} (held out)", **tok)
    if not train:
        raise ConfigError(f"data {what}: all {len(train_rows)} training rows are longer than "
                          f"data.max_length={data.max_length} tokens")
    return RunData(train, held_out, what, skipped, held_out_skipped, data_fingerprint([e.row for e in train]))


def collate(examples: Sequence[Example], c2c: C2CModel, *, sharer_context: bool) -> Batch:
    receiver, sharer = c2c.receiver, c2c.sharers[0]
    r_pad = receiver.pad_token_id
    if c2c.shares_vocab[0]:
        ids, mask = pad_sequences([e.prompt_ids for e in examples], r_pad)      # (B, P)
        given = SharerInput(ids[:, :-1], mask[:, :-1]) if sharer_context else None
    else:
        ids, mask, inputs = c2c.encode_chat([list(e.row.prompt) for e in examples])
        given = inputs[0] if inputs else None
    if sharer_context:
        given = prepend_context(given, [e.context_ids for e in examples], sharer.pad_token_id)
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


def stream_rows(n: int, seed: int, start: int, count: int, orders: dict[int, list[int]] | None = None) -> list[int]:
    """Row indices at global positions [start, start + count) of the run's data stream.

    The stream is the n rows in a fresh seeded shuffle per epoch, epoch after epoch. It does not
    depend on how many processes read it, so a run resumed on another number of processes reads
    on from the position it had reached. `orders` memoises the shuffles (pass the same dict).
    """
    orders = {} if orders is None else orders
    out = []
    for pos in range(start, start + count):
        epoch, k = divmod(pos, n)
        if epoch not in orders:
            order = list(range(n))
            random.Random(f"{seed}:{epoch}").shuffle(order)
            for old in [e for e in orders if e < epoch - 1]:
                del orders[old]  # only the current and previous epoch are ever read again
            orders[epoch] = order
        out.append(orders[epoch][k])
    return out


def shard(step_start: int, batch_size: int, accum: int, rank: int, world: int) -> list[tuple[int, int]]:
    """(start, count) in the stream of each of this rank's micro-batches in one optimizer step.

    An optimizer step reads batch_size x accum x world consecutive positions from `step_start`;
    micro-batch j of rank r is the slot j * world + r. The union over ranks is the step's global
    batch, whatever the split.
    """
    return [(step_start + (j * world + rank) * batch_size, batch_size) for j in range(accum)]



__all__ = ["IGNORE_INDEX", "Batch", "ChatRow", "Example", "answer_token_ids", "chat_row", "collate",
           "data_fingerprint", "load_rows", "prepend_context", "shard", "stream_rows", "tokenize_rows"]
