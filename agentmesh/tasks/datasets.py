"""Task items and their loaders: local JSONL in several known shapes, or Hugging Face datasets.

Every loader yields `Item`s with a letter answer (multiple choice), a number string (GSM8K shape)
or a short text span (context-transfer task), so training and evaluation never look at a
dataset's own field names.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agentmesh.errors import ConfigError, error_line

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
Shape = Literal["auto", "mmlu_redux", "arc", "openbookqa", "gsm8k", "context"]
Kind = Literal["mc", "numeric", "short"]
SHAPES: tuple[str, ...] = ("mmlu_redux", "arc", "openbookqa", "gsm8k", "context")
# MMLU-Redux items whose annotators found no correct choice, or that need expert knowledge: the published evaluation leaves them out.
MMLU_REDUX_SKIP = frozenset({"no_correct_answer", "expert"})


@dataclass(frozen=True)
class Item:
    """One question. `answer` is a letter for multiple choice, a number string for numeric items,
    a short span otherwise; `context` is a passage only the sharer may read (None: no passage)."""

    id: str
    question: str
    choices: tuple[str, ...] | None
    answer: str
    subject: str = ""
    context: str | None = None
    kind: Kind | None = None  # inferred from the other fields when not given

    def __post_init__(self) -> None:
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))
        if self.kind is None:
            object.__setattr__(self, "kind", "mc" if self.choices is not None else
                               "numeric" if self.context is None and _is_number(self.answer) else "short")
        if self.kind == "mc":
            if not self.choices:
                raise ConfigError(f"item {self.id!r} is multiple choice but has no choices")
            if self.answer not in LETTERS[:len(self.choices)]:
                raise ConfigError(f"item {self.id!r} has answer {self.answer!r}; expected one of "
                                  f"{', '.join(LETTERS[:len(self.choices)])} for its {len(self.choices)} choices")

    @property
    def letters(self) -> str:
        """The answer letters of a multiple-choice item ("" otherwise)."""
        return LETTERS[:len(self.choices)] if self.choices else ""

    @property
    def answer_text(self) -> str:
        """The answer as text: the chosen option's text for multiple choice, else `answer`."""
        if self.kind == "mc" and self.choices:
            return self.choices[LETTERS.index(self.answer)]
        return self.answer


def _is_number(text: str) -> bool:
    return re.fullmatch(r"-?\d[\d,]*(\.\d+)?|-?\.\d+", text.strip()) is not None


def detect_shape(row: dict[str, Any]) -> str:
    """The shape of one record, from its keys; ConfigError when no known shape fits."""
    choices = row.get("choices")
    if "question" in row and "context" in row:
        return "context"
    if "question_stem" in row:
        return "openbookqa"
    if "answerKey" in row and isinstance(choices, dict):
        return "arc"
    if "question" in row and isinstance(choices, list) and "answer" in row:
        return "mmlu_redux"
    if "question" in row and isinstance(row.get("answer"), str) and "####" in row["answer"]:
        return "gsm8k"
    raise ConfigError(
        f"cannot tell the dataset shape of a record with keys {sorted(row)}; expected MMLU-Redux "
        "(question, choices, answer), ARC (question, choices{text,label}, answerKey), OpenBookQA "
        "(question_stem, choices, answerKey), GSM8K (question, answer with '#### N') or context "
        "(question, answer, context); or set dataset.shape")


def _letter_from_labels(labels: Sequence[Any], key: Any, where: str) -> str:
    labels = [str(x).strip() for x in labels]
    key = str(key).strip()
    if key not in labels:
        raise ConfigError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
    return LETTERS[labels.index(key)]


def _labelled_choices(row: dict[str, Any], where: str) -> tuple[list[str], str]:
    ch = row.get("choices")
    if not isinstance(ch, dict) or "text" not in ch or "label" not in ch:
        raise ConfigError(f"{where}: 'choices' must be {{'text': [...], 'label': [...]}}, got {ch!r}")
    return [str(t) for t in ch["text"]], _letter_from_labels(ch["label"], row.get("answerKey"), where)


def _mc_answer(answer: Any, n: int, where: str) -> str:
    """An MMLU-style answer (0-based index, or a letter) as a letter."""
    if isinstance(answer, bool):
        raise ConfigError(f"{where}: answer {answer!r} is not a choice index or letter")
    if isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
        i = int(answer)
        if not 0 <= i < n:
            raise ConfigError(f"{where}: answer index {i} is out of range for {n} choices (0-based)")
        return LETTERS[i]
    if isinstance(answer, str) and answer.strip().upper() in LETTERS[:n]:
        return answer.strip().upper()
    raise ConfigError(f"{where}: answer {answer!r} is not a 0-based choice index or a letter A-{LETTERS[n - 1]}")


def gsm8k_answer(text: str) -> str:
    """The number after '####' in a GSM8K solution, without thousands separators."""
    if "####" not in text:
        raise ConfigError(f"GSM8K answer {text[:60]!r} has no '#### N' line")
    final = text.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "")
    if not _is_number(final):
        raise ConfigError(f"GSM8K final answer {final!r} is not a number")
    return final


def parse_row(row: dict[str, Any], shape: str, *, index: int, source: str, subject: str = "") -> Item | None:
    """One record as an `Item`, or None when the shape's rules say to skip it."""
    where = f"{source} record {index}"
    rid = str(row.get("id") or f"{Path(source).stem or 'item'}-{index}")
    subj = str(row.get("subject") or subject or "")
    try:
        if shape == "mmlu_redux":
            if str(row.get("error_type") or "").strip() in MMLU_REDUX_SKIP:
                return None
            choices = [str(c) for c in row["choices"]]
            return Item(rid, str(row["question"]), tuple(choices), _mc_answer(row["answer"], len(choices), where), subj)
        if shape == "arc":
            choices, letter = _labelled_choices(row, where)
            return Item(rid, str(row["question"]), tuple(choices), letter, subj)
        if shape == "openbookqa":
            choices, letter = _labelled_choices(row, where)
            return Item(rid, str(row["question_stem"]), tuple(choices), letter, subj)
        if shape == "gsm8k":
            return Item(rid, str(row["question"]), None, gsm8k_answer(str(row["answer"])), subj or "math",
                        kind="numeric")
        if shape == "context":
            raw = row.get("choices")
            if raw:
                choices = [str(c) for c in raw]
                return Item(rid, str(row["question"]), tuple(choices), _mc_answer(row["answer"], len(choices), where),
                            subj, context=row.get("context") or None)
            return Item(rid, str(row["question"]), None, str(row["answer"]), subj, context=row.get("context") or None,
                        kind="short")
    except KeyError as e:
        raise ConfigError(f"{where} ({shape} shape) has no field {e.args[0]!r}") from None
    except ConfigError as e:
        if e.message.startswith(where):
            raise
        raise ConfigError(f"{where}: {e.message}") from None
    raise ConfigError(f"dataset shape {shape!r} is unknown; expected one of {', '.join(SHAPES)}")


def parse_rows(rows: Iterable[dict[str, Any]], *, shape: str = "auto", source: str = "",
               subject: str = "") -> list[Item]:
    """Records of one shape (detected from the first record when `shape` is "auto") as items."""
    items: list[Item] = []
    for i, row in enumerate(rows):
        if shape == "auto":
            shape = detect_shape(row)
        item = parse_row(row, shape, index=i, source=source, subject=subject)
        if item is not None:
            items.append(item)
    return items


def iter_jsonl(path: str | Path, what: str = "dataset file") -> Iterator[tuple[str, dict[str, Any]]]:
    """("FILE:LINE", record) for every non-blank line of a JSONL file; each record must be an object."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; give a JSONL file with one record per line")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n} is not valid JSON ({e.msg}); expected one JSON object per line") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{n} is a {type(row).__name__}; expected a JSON object")
            yield f"{path}:{n}", row


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [row for _, row in iter_jsonl(path)]


def load_jsonl(path: str | Path, *, shape: str = "auto") -> list[Item]:
    return parse_rows(read_jsonl(path), shape=shape, source=str(path))


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def load_hf(name: str, config: str | Sequence[str] | None = None, *, split: str = "test",
            shape: str = "auto") -> list[Item]:
    """Items from a Hugging Face dataset (needs the optional `datasets` package).

    Several configs (e.g. MMLU-Redux subjects) are concatenated; each config name becomes the
    subject of its items unless the rows carry one. Offline (HF_HUB_OFFLINE=1) only the local
    cache is read.
    """
    try:
        import datasets as hf_datasets
    except ImportError:
        raise ConfigError(f"dataset hf={name!r} needs the optional package 'datasets'",
                          hint="pip install 'agentmesh[datasets]', or give a local JSONL path") from None
    configs: list[str | None] = [config] if config is None or isinstance(config, str) else list(config)
    items: list[Item] = []
    for cfg in configs:
        kwargs: dict[str, Any] = {"split": split}
        if _hub_offline():
            kwargs["download_mode"] = "reuse_cache_if_exists"
        try:
            rows = hf_datasets.load_dataset(name, cfg, **kwargs)
        except Exception as e:  # datasets raises many unrelated types; name the dataset in one line
            offline = " (HF_HUB_OFFLINE is set: only the local cache is read)" if _hub_offline() else ""
            raise ConfigError(f"cannot load Hugging Face dataset {name!r} config {cfg!r} split {split!r}"
                              f"{offline}: {error_line(e)}") from None
        label = f"{name}/{cfg}" if cfg else name
        items.extend(parse_rows((dict(r) for r in rows), shape=shape, source=label, subject=cfg or ""))
    return items


def select(items: Sequence[Item], *, limit: int | None = None, shuffle: bool = False, seed: int = 0) -> list[Item]:
    """A seeded shuffle (optional) and then the first `limit` items."""
    out = list(items)
    if shuffle:
        random.Random(seed).shuffle(out)
    return out if limit is None else out[:limit]


class DatasetConfig(BaseModel):
    """Where the items come from: a local JSONL `path`, or a Hugging Face dataset `hf`."""

    model_config = ConfigDict(extra="forbid")

    path: Path | None = None
    hf: str | None = None
    hf_config: str | list[str] | None = Field(default=None, description="HF config name(s), e.g. MMLU-Redux subjects")
    split: str = "test"
    shape: Shape = "auto"
    limit: int | None = Field(default=None, ge=1)
    seed: int = 0
    shuffle: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> "DatasetConfig":
        if (self.path is None) == (self.hf is None):
            raise ValueError("dataset needs exactly one of 'path' (local JSONL) or 'hf' (Hugging Face dataset name)")
        return self


def load_items(cfg: DatasetConfig) -> list[Item]:
    """The items `cfg` names, shuffled (seeded) and limited."""
    if cfg.path is not None:
        items = load_jsonl(cfg.path, shape=cfg.shape)
    else:
        items = load_hf(cfg.hf or "", cfg.hf_config, split=cfg.split, shape=cfg.shape)
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise ConfigError(f"dataset {cfg.path or cfg.hf} has two items with id {it.id!r}; ids must be unique")
        seen.add(it.id)
    if not items:
        raise ConfigError(f"dataset {cfg.path or cfg.hf} has no usable items")
    return select(items, limit=cfg.limit, shuffle=cfg.shuffle, seed=cfg.seed)
