"""An agent's reading: what it reads before its turn, its role and its private context.

One definition for every place that builds it: graph runs (an agent reading before it answers or
shares), fuser training (a sharer's private context in front of the fused span) and evaluation. A
fuser only works on the layout it was trained on, so a sharer's reading must be built the same way
in all three: [system: role] + [user: context] (+ [user: extra], text a reader is given), each only
when present, rendered by the model's own chat template without a generation prompt.
"""
from __future__ import annotations

from agentmesh.models.protocol import LanguageModel

Messages = tuple[dict[str, str], ...]


def reading_messages(role: str | None, context: str | None, extra: str | None = None) -> Messages:
    """[system: role] + [user: context] (+ [user: extra]), each only when present."""
    out = []
    if role:
        out.append({"role": "system", "content": role})
    if context:
        out.append({"role": "user", "content": context})
    if extra:
        out.append({"role": "user", "content": extra})
    return tuple(out)


def reading_ids(lm: LanguageModel, *, role: str | None = None, context: str | None = None,
                extra: str | None = None) -> list[int]:
    """The token ids of that reading for model `lm` ([] when there is nothing to read)."""
    messages = reading_messages(role, context, extra)
    return list(lm.chat_ids(list(messages), add_generation_prompt=False)) if messages else []
