"""The README's Python snippets run as written, so a newcomer's first copy-paste works.

Every ```python block is executed on its own, from a scratch folder that sees the repository's
graphs/ (snippets open files under it). They use the embedded model, hence `slow`. The shipped
pipelines and examples run in tests/test_examples.py; `test_every_shipped_example_is_run` keeps that
list complete.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)


def test_the_readme_has_python_snippets():
    assert len(SNIPPETS) >= 3
    assert all("path/or/hub-id" not in s and "path/to/" not in s for s in SNIPPETS)  # nothing to fill in


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=lambda i: SNIPPETS[i].splitlines()[0][:40])
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    (tmp_path / "graphs").symlink_to(ROOT / "graphs")
    monkeypatch.chdir(tmp_path)
    code = compile(SNIPPETS[index], f"README.md python snippet {index + 1}", "exec")
    exec(code, {"__name__": "__readme__"})


def test_every_shipped_example_is_run():
    """Each examples/*.py and graphs/*.yaml appears in a test that runs it (by file name)."""
    tests = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py"))
    shipped = sorted([*(ROOT / "examples").glob("*.py"), *(ROOT / "graphs").glob("*.yaml")])
    missing = [p.name for p in shipped if p.name not in tests]
    assert not missing, f"shipped but never run by a test: {missing}"
