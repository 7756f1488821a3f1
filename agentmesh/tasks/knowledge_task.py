"""The specialist-knowledge task: a sharer that *knows* facts the receiver does not.

Invented facts "the capital of X is Y" about fictional countries. A specialist (the base model
plus a LoRA adapter) is fine-tuned on every fact; the receiver is the base model, which cannot know
them. This is the setting C2C is for: both models read the same question, and the fuser must carry
what the sharer's cache of that question holds into the receiver's cache. There is no passage.

Countries are split into facts A and facts B. A fuser is trained on facts A only and evaluated on
facts B, in phrasings neither the specialist nor the fuser was trained on, so a fuser that scores
on B carries knowledge rather than memorising answers. Capitals come from one pool shared by both
splits, so a fuser cannot learn "the answer is one of B's cities".

Files (`write_knowledge_task`): `specialist.jsonl` (the adapter's fine-tune: facts A and B, training
phrasings), `train.jsonl` (the fuser's training: facts A, every phrasing), `test.jsonl` (facts B,
held-out phrasings) and `general.jsonl` (everyday questions with short answers: a fuser must not
make these worse), all in the chat-row and item shape that `agentmesh train`/`finetune`/`eval` read.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Sequence

from agentmesh.errors import ConfigError
from agentmesh.files import make_folder, write_jsonl
from agentmesh.tasks.context_task import pools
from agentmesh.tasks.datasets import Item
from agentmesh.tasks.prompts import training_messages

# The specialist learns the facts in these phrasings ...
TRAINING_PHRASINGS = ("What is the capital of {e}?", "Which city is the capital of {e}?")
# ... and is asked, at test time, in these.
HELD_OUT_PHRASINGS = ("Name the capital city of {e}.", "{e} has its capital in which city?",
                      "Tell me the capital of {e}.")


def countries_and_capitals(n_a: int, n_b: int, n_capitals: int, *,
                           seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(facts A, facts B): `n_a` and `n_b` (country, capital) pairs, capitals drawn from one
    pool of `n_capitals` invented cities."""
    countries = pools("train")["country"] + pools("test")["country"]
    if n_a + n_b > len(countries):
        raise ConfigError(f"knowledge task: {n_a} + {n_b} countries asked, {len(countries)} exist")
    cities = pools("train")["city"] + pools("test")["city"]
    if n_capitals > len(cities) or n_capitals < 2:
        raise ConfigError(f"knowledge task: {n_capitals} capitals asked; expected 2..{len(cities)}")
    rng = random.Random(f"agentmesh-knowledge-task/{seed}")
    chosen = rng.sample(countries, n_a + n_b)
    capitals = rng.sample(cities, n_capitals)
    facts = [(country, capitals[i % n_capitals]) for i, country in enumerate(chosen)]
    rng.shuffle(facts)
    return facts[:n_a], facts[n_a:]


# Everyday questions with one short, unambiguous answer.
GENERAL_QUESTIONS = (
    ("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"), ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"), ("What is the capital of England?", "London"),
    ("What is the capital of Russia?", "Moscow"), ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of China?", "Beijing"), ("What is the capital of Canada?", "Ottawa"),
    ("What is the largest planet in the solar system?", "Jupiter"), ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the chemical symbol for gold?", "Au"), ("What gas do plants absorb from the air?", "carbon dioxide"),
    ("What is the hardest natural substance?", "diamond"), ("What is the capital of Greece?", "Athens"),
    ("Which organ pumps blood through the body?", "heart"), ("What colour is the sky on a clear day?", "blue"),
    ("What language is mainly spoken in Mexico?", "Spanish"), ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the largest ocean on Earth?", "Pacific"), ("What is the tallest mountain in the world?", "Everest"),
    ("What language is mainly spoken in Brazil?", "Portuguese"), ("What is the currency of Japan?", "yen"),
    ("Which animal is known as the king of the jungle?", "lion"), ("What do bees make?", "honey"),
    ("What is the opposite of hot?", "cold"), ("What is frozen water called?", "ice"),
    ("What is the longest river in Africa?", "Nile"), ("Which star is at the centre of our solar system?", "Sun"),
)


def _records(facts: Sequence[tuple[str, str]], phrasings: Sequence[str], split: str) -> list[dict[str, Any]]:
    out = []
    for i, (country, capital) in enumerate(facts):
        for j, phrasing in enumerate(phrasings):
            item = Item(f"knowledge-{split}-{i}-{j}", phrasing.format(e=country), None, capital, "capital",
                        kind="short")
            out.append({"id": item.id, "question": item.question, "answer": capital, "context": None,
                        "subject": "capital", "messages": training_messages(item)})
    return out


def write_knowledge_task(out_dir: str | Path, *, n_a: int = 50, n_b: int = 50, n_capitals: int = 20,
                         seed: int = 0) -> dict[str, Path]:
    """Write `specialist.jsonl`, `train.jsonl`, `test.jsonl` and `general.jsonl` into `out_dir`;
    returns their paths."""
    a, b = countries_and_capitals(n_a, n_b, n_capitals, seed=seed)
    files = {
        "specialist": _records(a, TRAINING_PHRASINGS, "a") + _records(b, TRAINING_PHRASINGS, "b"),
        "train": _records(a, TRAINING_PHRASINGS + HELD_OUT_PHRASINGS, "a"),
        "test": _records(b, HELD_OUT_PHRASINGS, "b"),
        "general": [{"id": f"general-{i}", "question": q, "answer": a, "context": None, "subject": "general"}
                    for i, (q, a) in enumerate(GENERAL_QUESTIONS)],
    }
    out = make_folder(out_dir, "knowledge task folder")
    paths = {}
    for name, records in files.items():
        paths[name] = write_jsonl(out / f"{name}.jsonl", records)
    return paths
