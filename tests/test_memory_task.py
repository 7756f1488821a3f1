"""The memory task (agentmesh/tasks/memory_task.py): conversations under the chat graph's own role,
labels that give back the name that was given, and nothing the bench asks about in training."""
from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from agentmesh.errors import ConfigError
from agentmesh.tasks import memory_task as mt
from agentmesh.tasks.knowledge_task import GENERAL_QUESTIONS

ROOT = Path(__file__).resolve().parent.parent
EVERYDAY = {q: f"An answer to: {q}" for q in mt.EVERYDAY}


def _bench():
    spec = importlib.util.spec_from_file_location("examples_success", ROOT / "bench" / "examples_success.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("examples_success", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_rows_are_seeded_mixed_and_give_back_what_was_given() -> None:
    rows = mt.memory_rows(400, EVERYDAY, seed=1)
    assert rows == mt.memory_rows(400, EVERYDAY, seed=1) and rows != mt.memory_rows(400, EVERYDAY, seed=2)
    assert Counter(r["kind"] for r in rows) == {"recall": 200, "ack": 100, "general": 100}
    for r in rows:
        messages = r["messages"]
        assert messages[0] == {"role": "system", "content": mt.CHAT_ROLE}
        assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * ((len(messages) - 1) // 2)
        if r["kind"] == "general":
            assert messages[2]["content"] == EVERYDAY[messages[1]["content"]]  # the base model's own answer
            continue
        said, last = messages[1]["content"], messages[-1]["content"]
        name = next(n for n in mt.NAMES if n in said)
        assert name in messages[2]["content"] and name in last  # acknowledged, then given back
        if r["kind"] == "recall":
            assert name not in messages[-2]["content"]  # the question does not contain the answer
    assert any(len(r["messages"]) == 7 for r in rows)  # a recall with an everyday turn in between


def test_training_keeps_apart_what_measures_it() -> None:
    bench = _bench()
    text = json.dumps(mt.memory_rows(1200, EVERYDAY), ensure_ascii=False)
    for said, question, name, thing in bench.NAMED:
        assert said not in text and question not in text and name not in mt.NAMES and thing not in mt.RELATIONS
    assert not set(bench.OWN_NAMES) & set(mt.NAMES)
    assert not set(bench.OWN_QUESTIONS) & set(mt.OWN_QUESTIONS)
    assert not {q for q, _ in GENERAL_QUESTIONS} & set(mt.EVERYDAY)


def test_the_graph_is_what_the_task_trained_on(tmp_path: Path) -> None:
    from agentmesh.graph import load_graph

    g = load_graph(ROOT / "graphs" / "chat.yaml")
    assert g.agents["assistant"].role == mt.CHAT_ROLE
    with pytest.raises(ConfigError, match="n=0"):
        mt.memory_rows(0, EVERYDAY)
    with pytest.raises(ConfigError, match="no answer for 1 everyday questions"):
        mt.memory_rows(4, {q: a for q, a in EVERYDAY.items() if q != mt.EVERYDAY[0]})
    path = mt.write_memory_task(tmp_path / "m", EVERYDAY, n=12)
    assert len(path.read_text(encoding="utf-8").splitlines()) == 12


def test_everyday_answers_come_from_the_model_asked_under_the_chat_role() -> None:
    asked: list[list[dict[str, str]]] = []

    def chat(conversations: list[list[dict[str, str]]]) -> list[str]:
        asked.extend(conversations)
        return [f"  answer to\n{c[-1]['content']} " for c in conversations]

    answers = mt.answer_everyday(chat)
    assert list(answers) == list(mt.EVERYDAY) and answers[mt.EVERYDAY[0]] == f"answer to {mt.EVERYDAY[0]}"
    assert all(c[0] == {"role": "system", "content": mt.CHAT_ROLE} and len(c) == 2 for c in asked)
