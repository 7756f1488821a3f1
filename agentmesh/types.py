"""Types every layer shares, free of torch and transformers so that any package can import them."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, get_args

from agentmesh.errors import ConfigError

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": text}
Messages = Sequence[Message]  # a conversation, oldest message first

# How several sharers' caches are fused into one receiver's: "parallel" sums every fuser's
# residual over the clean receiver cache; "sequential" applies them one after another.
FusionMode = Literal["parallel", "sequential"]
FUSION_MODES: tuple[str, ...] = get_args(FusionMode)


def check_fusion_mode(mode: str, what: str = "fusion mode") -> None:
    if mode not in FUSION_MODES:
        raise ConfigError(f"{what} {mode!r} is unknown; expected 'parallel' or 'sequential'")
