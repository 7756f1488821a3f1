"""Progress as a person sees it: on a terminal (a pseudo-terminal here) a spinner with the elapsed
time of the slow step; off a terminal one log line per phase. Real subprocesses, real model.

The terminal tests stop the process with Ctrl-C once the elapsed time has visibly grown, so they
never wait for the whole model to load.
"""
from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

STORY = ("version: 1\nname: story\nagents:\n  teller: {model: smollm2-135m-instruct, "
         "prompt: 'Say hello.', max_new_tokens: 4}\n")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def on_terminal(args: list[str], until: re.Pattern[str]) -> tuple[int, str]:
    """Run `agentmesh ARGS` on a pseudo-terminal; once its screen output matches `until`, press
    Ctrl-C. Returns the exit status and everything it wrote (escape codes removed)."""
    controller, terminal = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "PYTHONUNBUFFERED": "1"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "agentmesh", *args], stdin=terminal, stdout=terminal,
                            stderr=terminal, env=env, close_fds=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as at a terminal
    os.close(terminal)
    seen, interrupted = "", False
    try:
        while True:
            ready, _, _ = select.select([controller], [], [], 300)
            if not ready:
                pytest.fail(f"no output for 300 s; so far: {seen[-2000:]!r}")
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the process closed the terminal
                break
            if not chunk:
                break
            seen += ANSI.sub("\n", chunk.decode(errors="replace"))
            if not interrupted and until.search(seen):
                proc.send_signal(signal.SIGINT)
                interrupted = True
        code = proc.wait(timeout=120)
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
    if not interrupted:
        pytest.fail(f"never matched {until.pattern!r} (exit {code}): {seen[-2000:]!r}")
    return code, seen


def test_generate_on_a_terminal_shows_the_loading_spinner_with_elapsed_time():
    # rich's elapsed column reads h:mm:ss; wait until it has counted past two seconds.
    code, seen = on_terminal(["generate", "Hi"],
                             re.compile(r"loading smollm2-135m-instruct \(\d+\.\d MB\)\s+0:00:0[2-9]"))
    assert code == 130, seen[-2000:]
    assert "interrupted while loading smollm2-135m-instruct (" in seen, seen[-2000:]


def test_run_on_a_terminal_shows_each_agents_phase_with_elapsed_time(tmp_path: Path):
    graph = tmp_path / "story.yaml"
    graph.write_text(STORY)
    code, seen = on_terminal(["run", str(graph)], re.compile(r"teller\s+\S*\s*loading ([2-9]|\d\d+) s"))
    assert code == 130, seen[-2000:]
    assert "interrupted while teller loading" in seen, seen[-2000:]


def test_off_a_terminal_each_phase_is_one_log_line(tmp_path: Path):
    graph = tmp_path / "story.yaml"
    graph.write_text(STORY)
    out = subprocess.run([sys.executable, "-m", "agentmesh", "run", str(graph)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    phases = [line for line in lines if line.endswith(" …")]
    assert phases == ["teller: loading …", "teller: prefilling …", "teller: decoding …"], lines
    assert sum(line.startswith("teller: read ") and line.endswith("tokens/s)") for line in lines) == 1, lines
    assert lines[-1].startswith("teller: done in "), lines
    assert "\x1b[" not in out.stderr and "\r" not in out.stderr  # no spinner or colour codes in a log
