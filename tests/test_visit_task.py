"""The visit task (agentmesh/tasks/visit_task.py): labels that follow from the facts, training kept
apart from the graph's place and question phrasings, and the graph reading what training showed."""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from agentmesh.errors import ConfigError
from agentmesh.tasks import visit_task as vt

ROOT = Path(__file__).resolve().parent.parent


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_clock() -> None:
    assert [vt.clock(9), vt.clock(12), vt.clock(14, 30), vt.clock(0), vt.clock(23)] == \
        ["9 am", "noon", "2:30 pm", "12 am", "11 pm"]


@pytest.mark.parametrize("case", ["closed day", "open", "outside hours"])
def test_drawn_visits_have_the_asked_case_and_its_answer(case: str) -> None:
    rng = random.Random(3)
    for _ in range(200):
        v = vt.draw_visit(rng, "Maple", "museum", case)
        assert v.case == case
        answer = v.answer()
        assert answer.startswith(f"You asked about {v.day} at {vt.clock(v.hour, v.minute)}.")
        assert f"closed on {v.closed_day}s and open from {vt.clock(v.opens)} to {vt.clock(v.closes)}." in answer
        if case == "closed day":
            assert answer.endswith(f"So no: it is closed on {v.day}s.")
        elif case == "outside hours":
            assert answer.endswith("its opening hours.") and not (v.opens <= v.hour < v.closes)
        else:
            assert answer.endswith("So yes: it is open then.") and v.opens <= v.hour < v.closes
            assert v.day != v.closed_day


def test_written_task_is_seeded_balanced_and_keeps_the_graph_out_of_training(tmp_path: Path) -> None:
    paths = vt.write_visit_task(tmp_path / "a", n_train=80, n_test=16, seed=1)
    again = vt.write_visit_task(tmp_path / "b", n_train=80, n_test=16, seed=1)
    assert paths["train"].read_bytes() == again["train"].read_bytes()
    assert paths["train"].read_bytes() != vt.write_visit_task(tmp_path / "c", n_train=80, seed=2)["train"].read_bytes()

    train, test = _rows(paths["train"]), _rows(paths["test"])
    assert Counter(r["case"] for r in train) == {"open": 40, "closed day": 30, "outside hours": 10}
    name, place = vt.GRAPH_PLACE
    assert all(r["visit"]["name"] != name for r in train)
    assert all((r["visit"]["name"], r["visit"]["place"]) == vt.GRAPH_PLACE for r in test)
    train_questions = {r["question"] for r in train}
    test_templates = {q.format(place="museum", day="Monday", t="9 am") for q in vt.TEST_QUESTIONS}
    assert not train_questions & test_templates
    for r in train + test:
        system, user, assistant = r["messages"]
        visit = vt.Visit(**r["visit"])
        assert [system["role"], user["role"], assistant["role"]] == ["system", "user", "assistant"]
        assert f"closed every {visit.closed_day}" in system["content"]
        assert user["content"].endswith(vt.PLANNER_PROMPT.format(hours="", input=r["question"]).lstrip())
        assert assistant["content"] == visit.answer()


def test_bad_sizes_and_a_file_for_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="n_train=0"):
        vt.write_visit_task(tmp_path, n_train=0)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file; give a folder"):
        vt.write_visit_task(tmp_path / "f")


def test_the_graph_gives_its_planner_what_the_task_trained_on() -> None:
    from agentmesh.graph import load_graph

    g = load_graph(ROOT / "graphs" / "combined_reasoning.yaml")
    assert g.agents["planner"].prompt == vt.PLANNER_PROMPT
    name, place = vt.GRAPH_PLACE
    assert g.agents["closures"].role == vt.SYSTEM.format(name=name, place=place, day="Monday")
    # The prefix edge needs one model on both ends: the planner's adapter reads the closing day too.
    planner, closures = g.model_of("planner"), g.model_of("closures")
    assert planner.adapter is not None and planner.adapter == closures.adapter
    assert Path(planner.adapter, "adapter_config.json").is_file()


def test_answers_are_read_as_a_user_would() -> None:
    closed = vt.Visit("Riverside", "library", 9, 17, "Monday", "Monday", 10, 0)
    late = vt.Visit("Riverside", "library", 9, 17, "Monday", "Tuesday", 19, 0)
    open_ = vt.Visit("Riverside", "library", 9, 17, "Monday", "Tuesday", 10, 0)
    assert all(v.is_right(v.answer()) for v in (closed, late, open_))
    assert closed.is_right("No, the library is closed on Mondays.") and open_.is_right("Yes, you can.")
    assert not closed.is_right("You asked about Monday at 10 am. So yes: it is open then.")
    assert not late.is_right("So yes: it is open then.")
    assert not open_.is_right("So no: it is closed on Tuesdays.")
    assert not open_.is_right("So yes: it is open then. So no: it is not.")        # both verdicts
    assert not open_.is_right("You asked about nothing.")                            # no verdict
    assert not open_.is_right("Yes, it opens at 17:00 AM.")
