"""Where a key of a pipeline came from: file and line per key path, and the one-line `GraphError`.

Key paths are tuples such as ("agents", "writer", "max_new_tokens") or ("edges", 2, "fuser"); they
print as `agents.writer.max_new_tokens` and `edges[2].fuser`.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agentmesh.errors import GraphError

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class SourceMap:
    """Line numbers (1-based) of the keys of one YAML file, by key path."""

    file: str
    lines: Mapping[KeyPath, int] = field(default_factory=dict)

    def line_of(self, path: KeyPath) -> int:
        # A key that is missing from the file (e.g. a required one) points at its nearest parent.
        for n in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:n]))
            if line is not None:
                return line
        return 1


def format_key_path(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def one_line(text: str, limit: int = 300) -> str:
    """Collapse whitespace so that an error always fits one terminal line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def graph_error(where: SourceMap | str | None, path: KeyPath, message: str, hint: str | None = None) -> GraphError:
    """Build `FILE:LINE: key.path: message (hint: ...)`.

    `where` is the file's SourceMap, or a label such as "graph 'demo'" for graphs built in Python.
    """
    line: int | None = None
    if isinstance(where, SourceMap):
        line = where.line_of(path)
        prefix = f"{where.file}:{line}"
        file: str | None = where.file
    else:
        prefix = where or "graph"
        file = None
    key = format_key_path(path)
    text = f"{prefix}: {key}: {one_line(message)}" if key else f"{prefix}: {one_line(message)}"
    err = GraphError(text, hint=one_line(hint) if hint else None)
    err.file, err.line, err.key = file, line, key  # type: ignore[attr-defined]
    return err


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A one-line hint naming the closest choice, or None when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


def choices_hint(word: str, choices: Iterable[str], what: str) -> str:
    choices = sorted(choices)
    return did_you_mean(word, choices) or (f"known {what}: {', '.join(choices)}" if choices else f"no {what} declared")
