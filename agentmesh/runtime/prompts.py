"""What each agent reads, as chat messages, and how messages become token ids that extend a cache.

An agent's input is a conversation in two parts:

* its **reading**: its role (system message) and private context (user message), rendered without a
  generation prompt (`agentmesh.models.reading`, the one definition training and evaluation use
  too). A prefix sender's reading is what its receivers continue from.
* its **turn**: earlier turns of a chat session, then the user message for this run (its prompt
  template filled with the run's inputs and its upstream agents' texts), with a generation prompt.

Token ids are built by *extension*: when a conversation continues a cache whose messages are known,
only the text the new messages add is tokenized and appended to that cache's own token ids, so the
receiver of a prefix edge reads exactly `sender tokens + its own tokens` (S + R).
"""
from __future__ import annotations

from typing import Sequence

import torch

from agentmesh.cache.kv import KVCache
from agentmesh.models.protocol import LanguageModel
from agentmesh.types import Message


def message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def render(lm: LanguageModel, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
    """The model's chat rendering of `messages` ("" for none: an empty conversation renders nothing)."""
    if not messages:
        return ""
    return lm.chat_text([dict(m) for m in messages], add_generation_prompt=add_generation_prompt)


def extend_ids(lm: LanguageModel, messages: Sequence[Message], *, add_generation_prompt: bool,
               base_messages: Sequence[Message] = (), base_ids: Sequence[int] = ()) -> list[int]:
    """Token ids of `messages`, reusing `base_ids`, the ids of their first `len(base_messages)` messages.

    The text the later messages add to the rendering is tokenized on its own and appended, so the
    result always starts with `base_ids`. When the template does not render the longer conversation
    as an extension of the shorter one (e.g. it inserts a default system prompt only at the start),
    the later messages are rendered alone instead.
    """
    if not base_messages:
        return list(base_ids) + lm.encode(render(lm, messages, add_generation_prompt=add_generation_prompt))
    base_text = render(lm, base_messages, add_generation_prompt=False)
    full = render(lm, messages, add_generation_prompt=add_generation_prompt)
    if full.startswith(base_text):
        added = full[len(base_text):]
    else:
        added = render(lm, messages[len(base_messages):], add_generation_prompt=add_generation_prompt)
    return list(base_ids) + (lm.encode(added) if added else [])


def common_prefix(a: torch.Tensor | Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    x = torch.as_tensor(a, dtype=torch.long).reshape(-1)
    y = torch.as_tensor(list(b), dtype=torch.long)
    n = min(x.numel(), y.numel())
    if n == 0:
        return 0
    diff = (x[:n] != y[:n]).nonzero()
    return int(diff[0, 0]) if diff.numel() else n


def cache_ids(cache: KVCache | None) -> list[int]:
    """Token ids of a batch-of-one cache (the runtime runs one conversation per agent)."""
    if cache is None or cache.token_ids is None:
        return []
    ids = cache.token_ids[0]
    if cache.attention_mask is not None:
        ids = ids[cache.attention_mask[0].bool()]
    return [int(t) for t in ids]
