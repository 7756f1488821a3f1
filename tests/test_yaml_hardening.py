"""Hostile pipeline files and context paths: each is refused with one line, in bounded memory,
before anything blocks (a FIFO with no writer, /dev/zero) or expands (aliases, deep nesting)."""
from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agentmesh.errors import GraphError
from agentmesh.graph import load_graph
from agentmesh.graph.cli import app as graph_app
from agentmesh.graph.yaml_io import MAX_DEPTH, read_yaml

HEADER = "version: 1\nname: hostile\n"
AGENTS = "agents:\n  a: {model: smollm2-135m-instruct}\n"


def laughs(levels: int = 9, width: int = 9) -> str:
    """The "billion laughs" shape: each anchor a list of `width` aliases of the one before."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "x-laughs:\n" + "".join(f"  {line}\n" for line in lines)


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def check(path: Path | str) -> tuple[int, str]:
    out = CliRunner().invoke(graph_app, ["check", str(path)])
    return out.exit_code, out.output


def assert_one_line_exit_2(path: Path | str, needle: str) -> None:
    code, output = check(path)
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], output
    assert "Traceback" not in output


def test_billion_laughs_is_rejected_in_bounded_memory(tmp_path):
    path = write(tmp_path, HEADER + laughs() + AGENTS)  # 9^10 = 3.5e9 values once expanded
    tracemalloc.start()
    try:
        with pytest.raises(GraphError, match=r"more than 100,000 values once its aliases are expanded"):
            read_yaml(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000, f"peak {peak / 1e6:.1f} MB while refusing a 1 kB file"
    assert_one_line_exit_2(path, "aliases are expanded")


def test_a_few_aliases_are_still_fine(tmp_path):
    text = HEADER + "x-defaults: &d {model: smollm2-135m-instruct, max_new_tokens: 8}\nagents:\n  a: *d\n  b: *d\n"
    data, _ = read_yaml(write(tmp_path, text))
    assert data["agents"]["a"] == data["agents"]["b"] == {"model": "smollm2-135m-instruct", "max_new_tokens": 8}


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 5000])
def test_deep_nesting_is_one_line(tmp_path, depth):
    path = write(tmp_path, HEADER + "x-deep: " + "[" * depth + "]" * depth + "\n" + AGENTS)
    with pytest.raises(GraphError, match="nests deeper than"):
        read_yaml(path)
    assert_one_line_exit_2(path, "nests deeper than")


def test_a_self_referring_alias_is_refused(tmp_path):
    path = write(tmp_path, HEADER + "x-loop: &loop [a, *loop]\n" + AGENTS)
    with pytest.raises(GraphError, match="nests deeper than|refers to itself|recursive"):
        read_yaml(path)


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x1b", "\x7f"])
def test_control_bytes_name_their_line(tmp_path, char):
    path = write(tmp_path, HEADER + f"description: bad{char}byte\n" + AGENTS)
    with pytest.raises(GraphError, match=rf"p.yaml:3: control character U\+{ord(char):04X}"):
        read_yaml(path)
    assert_one_line_exit_2(path, "control character")


def test_oversized_file_is_refused_before_parsing(tmp_path):
    path = write(tmp_path, HEADER + AGENTS + "# " + "x" * 1_100_000 + "\n")
    assert_one_line_exit_2(path, "is larger than 1.0 MB")


def fifo(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    os.mkfifo(path)  # opening it for reading would block until a writer comes: it must never be opened
    return path


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "directory"])
def test_special_files_as_the_pipeline_path(tmp_path, kind):
    path = {"fifo": lambda: fifo(tmp_path, "p.yaml"), "dev_zero": lambda: Path("/dev/zero"),
            "directory": lambda: tmp_path}[kind]()
    needle = "is a directory" if kind == "directory" else "not a regular file"
    with pytest.raises(GraphError, match=needle):
        read_yaml(path)
    if kind != "directory":  # `graph check DIR` checks the folder's files instead
        assert_one_line_exit_2(path, needle)


def test_graph_check_of_a_folder_without_pipelines_says_so(tmp_path):
    assert_one_line_exit_2(tmp_path, "holds no pipeline files")


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "directory", "missing", "oversized"])
def test_special_files_as_context_file(tmp_path, kind):
    if kind == "fifo":
        target = str(fifo(tmp_path, "ctx.txt"))
    elif kind == "oversized":
        big = tmp_path / "big.txt"
        with big.open("wb") as f:
            f.truncate(9_000_000)  # sparse: the size is what counts
        target = str(big)
    else:
        target = {"dev_zero": "/dev/zero", "directory": str(tmp_path), "missing": str(tmp_path / "nope.txt")}[kind]
    needle = {"fifo": "not a regular file", "dev_zero": "not a regular file", "directory": "is a directory",
              "missing": "does not exist", "oversized": "is larger than 8.0 MB"}[kind]
    path = write(tmp_path, HEADER + f"agents:\n  a: {{model: smollm2-135m-instruct, context_file: '{target}'}}\n")
    with pytest.raises(GraphError, match=rf"agents\.a\.context_file.*{needle}"):
        load_graph(path)
    assert_one_line_exit_2(path, needle)


def test_run_has_a_default_time_limit(tmp_path, monkeypatch):
    import agentmesh.runtime.scheduler as scheduler
    from agentmesh.runtime.cli import DEFAULT_RUN_TIMEOUT_S, app as run_app
    from agentmesh.runtime.result import RunResult

    seen: dict[str, object] = {}

    def fake_run(graph, text, **opts):
        seen.update(opts)
        return RunResult(graph=graph.name, outputs=("a",))

    monkeypatch.setattr(scheduler, "run_graph", fake_run)
    path = write(tmp_path, HEADER + AGENTS.replace("}", ", prompt: hi}"))
    out = CliRunner().invoke(run_app, ["run", str(path)])
    assert out.exit_code == 0, out.output
    assert seen["timeout"] == DEFAULT_RUN_TIMEOUT_S and 0 < DEFAULT_RUN_TIMEOUT_S <= 3600
    out = CliRunner().invoke(run_app, ["run", str(path), "--timeout", "5"])
    assert seen["timeout"] == 5.0
