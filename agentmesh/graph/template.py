"""Prompt templates: `{name}` placeholders, `{{` and `}}` for literal braces.

Only `{identifier}` is a placeholder, so prompts that contain code or JSON (`{"a": 1}`, `{ x }`) need
no escaping. Agent names may contain `-`, which is why this is not `str.format`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from agentmesh.errors import GraphError

_TOKEN_RE = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_-]*)\}")


def placeholders(template: str) -> list[str]:
    """The placeholder names in `template`, in order of first use, without repeats."""
    seen: dict[str, None] = {}
    for m in _TOKEN_RE.finditer(template):
        if m.group(1) is not None:
            seen.setdefault(m.group(1), None)
    return list(seen)


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill every placeholder from `values`; a placeholder without a value is an error."""

    def fill(m: re.Match[str]) -> str:
        token, name = m.group(0), m.group(1)
        if name is None:
            return token[0]  # "{{" -> "{", "}}" -> "}"
        if name not in values:
            known = ", ".join(sorted(values)) or "none"
            raise GraphError(f"prompt placeholder {{{name}}} has no value (known: {known})")
        return values[name]

    return _TOKEN_RE.sub(fill, template)
