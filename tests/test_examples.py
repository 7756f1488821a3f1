"""The shipped pipelines and examples, end to end on the embedded model (SmolLM2-135M-Instruct).

Slow: the model takes ~25 s to load (once per test session; the tests share the default pool).
"""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from typing import Any

import pytest

from agentmesh.errors import ModelLoadError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def _embedded_model() -> None:
    from agentmesh.models.builtin import DEFAULT_MODEL, builtin_gguf_path

    try:
        builtin_gguf_path(DEFAULT_MODEL)
    except ModelLoadError as e:
        pytest.skip(str(e))


def test_programmer_writer_pipeline_via_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from agentmesh.models import default_pool
    from agentmesh.runtime.cli import app

    out = CliRunner().invoke(app, ["run", str(ROOT / "graphs" / "programmer_writer.yaml"), "--json",
                                   "--trace", str(tmp_path / "trace.json")])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["ok"] and data["error"] is None
    # It makes the example's point: the filled element, naming the business it only read in the cache.
    assert data["outputs"]["writer"].startswith('<p id="intro">Welcome to')
    assert "Brightbean Coffee" in data["outputs"]["writer"]
    writer, programmer = data["agents"]["writer"], data["agents"]["programmer"]
    assert programmer["work"] == "read" and programmer["prompt_tokens"] > 100  # the page skeleton
    # The writer continued from the programmer's cache: it never prefilled the page itself.
    assert writer["prefilled_tokens"] == writer["prompt_tokens"] - programmer["prompt_tokens"]
    sig = default_pool().get("smollm2-135m-instruct").signature
    per_token = 2 * sig.num_layers * sig.num_kv_heads * sig.head_dim * 4  # K and V, float32 on CPU
    assert data["bytes_by_edge"]["programmer->writer"] == programmer["prompt_tokens"] * per_token
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    moved = [e for e in events if e["ph"] == "X" and e["args"].get("edge") == "programmer->writer"]
    assert moved and moved[0]["args"]["bytes"] == data["bytes_by_edge"]["programmer->writer"]


def test_combined_reasoning_pipeline() -> None:
    from agentmesh.graph import load_graph
    from agentmesh.runtime import run_graph

    from agentmesh.tasks.visit_task import verdict

    g = load_graph(ROOT / "graphs" / "combined_reasoning.yaml")
    r = run_graph(g)
    assert r.ok, r.error
    assert r["hours"].text and r.prompts["planner"].startswith(r["hours"].text)
    sizes = r.bytes_by_edge()
    assert sizes["hours->planner"] == len(r["hours"].text.encode()) and sizes["closures->planner"] > 0
    assert r["planner"].prefilled_tokens == r["planner"].prompt_tokens - r["closures"].prompt_tokens
    # It makes the example's point: the closing day, which only the cache holds, decides the answer.
    monday = r["planner"].text
    assert verdict(monday) == "no" and "closed on Mondays" in monday, monday
    tuesday = run_graph(g, "Can I visit the library at 10 am on Tuesday?").raise_for_error()["planner"].text
    assert verdict(tuesday) == "yes", tuesday


@pytest.mark.parametrize("script", ["programmer_writer.py", "combined_reasoning.py"])
def test_examples_run(script: str, capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    monkeypatch.setattr(sys, "argv", [script, "--max-new-tokens", "12"])
    runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    out = capsys.readouterr().out
    assert "carried" in out and "total" in out
    if script == "programmer_writer.py":
        assert "=== comparison ===" in out and "cache edge (prefix)" in out and "text edge" in out


def test_make_context_task_example_writes_both_splits(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: Any) -> None:
    monkeypatch.setattr(sys, "argv", ["make_context_task.py", str(tmp_path), "--n-train", "5", "--n-test", "3"])
    runpy.run_path(str(ROOT / "examples" / "make_context_task.py"), run_name="__main__")
    out = capsys.readouterr().out
    rows = {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in tmp_path.glob("*.jsonl")}
    assert {len(rows.get("train", [])), len(rows.get("test", []))} == {5, 3}, (out, list(rows))
    assert "train:" in out and "test:" in out


def test_chat_pipeline_keeps_the_conversation() -> None:
    """graphs/chat.yaml as `agentmesh chat` runs it: the second turn reads only its new tokens and
    recalls the name from the first (README, "The other examples, measured": greedy, so deterministic)."""
    from agentmesh.graph import load_graph
    from agentmesh.runtime import ChatSession

    graph = load_graph(ROOT / "graphs" / "chat.yaml")
    session = ChatSession(graph)
    first = session.send("My dog is called Rex.").raise_for_error()["assistant"]
    second = session.send("What is my dog called?").raise_for_error()["assistant"]
    assert first.text and "dog is called Rex" in second.text, (first.text, second.text)
    assert second.prefilled_tokens <= second.prompt_tokens - first.prompt_tokens  # the first turn is not read again
    # The user's own name is theirs, not the assistant's; and a plain question still gets its answer.
    session = ChatSession(graph)
    session.send("Hi, my name is Hannah.").raise_for_error()
    assert "Your name is Hannah" in session.send("What is my name?").raise_for_error()["assistant"].text
    assert "Paris" in ChatSession(graph).send("What is the capital of France?").raise_for_error()["assistant"].text


def test_edge_cloud_pipeline_on_one_host_answers_from_the_handbook() -> None:
    """edge_cloud.yaml with both hosts' agents in this process: the assistant, continuing from the
    librarian's cache of the handbook, gives the battery warranty the handbook states."""
    from agentmesh.graph import load_graph
    from agentmesh.runtime import run_graph

    r = run_graph(load_graph(ROOT / "graphs" / "edge_cloud.yaml"))
    assert r.ok, r.error
    assert "1 year" in r["assistant"].text or "one-year" in r["assistant"].text, r["assistant"].text
    assert r["assistant"].prefilled_tokens == r["assistant"].prompt_tokens - r["librarian"].prompt_tokens


def test_edge_cloud_text_pipeline_on_one_host() -> None:
    """edge_cloud_text.yaml with both hosts' agents in this process (the MQTT runs are in test_workers)."""
    from agentmesh.graph import load_graph
    from agentmesh.runtime import run_graph

    g = load_graph(ROOT / "graphs" / "edge_cloud_text.yaml")
    for agent in g.agents.values():
        agent.max_new_tokens = min(agent.max_new_tokens, 24)
    r = run_graph(g)
    assert r.ok, r.error
    assert all(r[name].text for name in r.outputs)
    assert r.bytes_by_edge()["librarian->assistant"] == len(r["librarian"].text.encode())
