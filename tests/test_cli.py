"""The `agentmesh` command as a user runs it: a real subprocess, real exit codes, real output."""
from __future__ import annotations

import subprocess
import sys

import pytest


def agentmesh(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentmesh.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_generate_on_the_embedded_model_answers_paris():
    out = agentmesh("generate", "What is the capital of France?", "--max-new-tokens", "24")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


@pytest.mark.slow
def test_generate_streams_and_reads_stdin():
    out = agentmesh("generate", "-", "--stream", "-n", "24", stdin="What is the capital of France?")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


@pytest.mark.parametrize("args, needle", [
    (["generate", "hi", "--model", "/no/such/model"], "/no/such/model"),
    (["generate", "hi", "--fuser", "/no/such/fuser"], "/no/such/fuser"),
    (["generate", "hi", "--mode", "diagonal"], "diagonal"),
    (["fuser", "inspect", "/no/such/fuser"], "/no/such/fuser"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle):
    out = agentmesh(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], out.stderr


def test_readme_test_command_is_what_ci_runs():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    ci = (root / ".ci" / "run").read_text()
    assert "bash setup.sh --test && python3 -m pytest" in readme
    assert "grep -m1 -o 'bash setup.sh --test && .*pytest" in ci
