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


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """`agentmesh ARGS` in this process (fast: no interpreter start), as (exit code, stdout, stderr)."""
    import logging
    import os
    import warnings

    from agentmesh.cli import main

    env, root = dict(os.environ), logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        with warnings.catch_warnings(), pytest.raises(SystemExit) as stop:
            main(list(args))
    finally:  # the CLI quiets libraries for its process; leave this test process as it was
        os.environ.clear()
        os.environ.update(env)
        root.setLevel(level)
        root.handlers[:] = handlers
        logging.captureWarnings(False)
    out = capsys.readouterr()
    return stop.value.code, out.out, out.err


def test_version_and_bare_command(capsys):
    from agentmesh import __version__

    code, out, err = run_main(capsys, "--version")
    assert code == 0 and out.strip() == f"agentmesh {__version__}"
    code, out, err = run_main(capsys)
    assert code == 2 and "Usage" in out + err and "error:" not in out + err  # the help, no empty error line


@pytest.mark.parametrize("args, needle", [
    (["generate", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", "hi", "--top-p", "0"], "--top-p"),
    (["generate", "hi", "--top-p", "1.5"], "--top-p"),
    (["generate", "hi", "--repetition-penalty", "0"], "--repetition-penalty"),
    (["generate", "hi", "--top-k", "-3"], "--top-k"),
    (["generate", "hi", "--model", "./no/such/folder"], "no model at ./no/such/folder"),
    (["generate", "hi", "--model", "smollm2-135m-instrct"], "did you mean 'smollm2-135m-instruct'"),
    (["run", "graphs/combined_reasoning.yaml", "--broker", "mqtt://127.0.0.1:1"], "nothing to run across hosts"),
    (["generate", "hi", "--no-such-flag"], "--no-such-flag"),
])
def test_bad_flags_are_one_line_and_exit_2(capsys, monkeypatch, args, needle):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    code, out, err = run_main(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert out == ""


def test_graph_check_catches_a_misspelled_model_and_agents_key(tmp_path, capsys):
    (tmp_path / "model.yaml").write_text("version: 1\nname: x\nagents:\n  a: {model: smollm2-135m-instrct}\n")
    (tmp_path / "key.yaml").write_text("version: 1\nname: x\nagent:\n  a: {model: smollm2-135m-instruct}\n")
    code, out, err = run_main(capsys, "graph", "check", str(tmp_path / "model.yaml"), str(tmp_path / "key.yaml"))
    lines = err.splitlines()
    assert code == 2 and len(lines) == 2, err
    assert "agents.a.model: unknown model 'smollm2-135m-instrct'" in lines[0]
    assert "did you mean 'smollm2-135m-instruct'" in lines[0]
    assert "unknown key 'agent'" in lines[1] and "did you mean 'agents'" in lines[1]


def default_sigint() -> None:
    """In the child: Ctrl-C does what it does at a terminal, even when the tests themselves run
    where SIGINT is ignored (a shell starts background jobs so, and exec keeps an ignored signal)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args: str, cwd: str | None = None) -> subprocess.Popen:
    import os

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "agentmesh", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, preexec_fn=default_sigint)


def interrupt_when(proc: subprocess.Popen, needle: str) -> tuple[int, list[str]]:
    """Send Ctrl-C (SIGINT) once `needle` shows on stderr; the exit code and stderr lines after it."""
    import signal

    seen: list[str] = []
    for line in proc.stderr:
        seen.append(line.rstrip("\n"))
        if needle in line:
            proc.send_signal(signal.SIGINT)
            break
    else:
        proc.wait()
        pytest.fail(f"never saw {needle!r} (exit {proc.returncode}): {seen}")
    rest = proc.stderr.read().splitlines()
    proc.wait(timeout=120)
    proc.stdout.close()
    proc.stderr.close()
    return proc.returncode, rest


@pytest.mark.slow
def test_ctrl_c_while_loading_is_one_line_and_exit_130():
    proc = start("generate", "What is the capital of France?")
    code, after = interrupt_when(proc, "loading smollm2-135m-instruct (")
    lines = [line for line in after if line.strip()]
    assert code == 130 and len(lines) == 1 and lines[0].startswith("interrupted while loading smollm2-135m-instruct ("), after
    assert lines[0].endswith(" MB)"), after


@pytest.mark.slow
def test_ctrl_c_while_reading_a_long_prompt():
    prompt = "Summarise this. " + "The river runs past the old mill and the bakery. " * 150
    proc = start("generate", prompt, "-n", "8")
    code, after = interrupt_when(proc, "reading the prompt (")
    lines = [line for line in after if line.strip()]
    assert code == 130 and len(lines) == 1 and lines[0].startswith("interrupted while reading the prompt"), after


@pytest.mark.slow
def test_ctrl_c_while_a_run_decodes_leaves_no_trace_file(tmp_path):
    graph = tmp_path / "story.yaml"
    graph.write_text("version: 1\nname: story\nagents:\n  teller: {model: smollm2-135m-instruct, "
                     "prompt: 'Tell a very long story about a lighthouse keeper.', max_new_tokens: 400}\n")
    trace = tmp_path / "trace.json"
    proc = start("run", str(graph), "--trace", str(trace))
    code, after = interrupt_when(proc, "teller: decoding")
    lines = [line for line in after if line.strip() and not line.startswith("teller:")]
    assert code == 130 and lines == ["interrupted while teller decoding"], after
    assert sorted(p.name for p in tmp_path.iterdir()) == ["story.yaml"]  # no trace, whole or partial


def test_ctrl_c_while_waiting_for_a_worker_is_one_line_and_exit_130(tmp_path, broker):
    """A pure client (no model of its own) on a real broker whose worker never comes."""
    graph = tmp_path / "remote.yaml"
    graph.write_text("version: 1\nname: remote\nhosts:\n  cloud: {callers: [client]}\nagents:\n"
                     "  teller: {model: smollm2-135m-instruct, host: cloud, prompt: 'Hi'}\n")
    proc = start("run", str(graph), "--broker", broker.url, "--insecure")
    code, after = interrupt_when(proc, "waiting for host cloud")
    lines = [line for line in after if line.strip()]
    assert code == 130 and lines == ["interrupted while waiting for host cloud"], after


def test_progress_bar_off_a_terminal_is_one_line_per_update(capsys):
    """Training and evaluation bars in a log file or CI: whole lines, never carriage returns."""
    from agentmesh.progress import progress_bar

    with progress_bar(total=3, desc="train fuser", unit="step", log_every_s=0.0) as bar:
        for _ in range(3):
            bar.update(1)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) >= 2 and all(line.startswith("train fuser:") for line in lines)
    assert "3/3" in lines[-1]
