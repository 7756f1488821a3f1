"""The model contract: what prefill, decoding, fusion, the runtime and evaluation need of a
language model. `LoadedModel` is the implementation; tests and tools may pass anything that
has these members.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from agentmesh.cache.kv import ModelSignature


class LanguageModel(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def model(self) -> torch.nn.Module:
        """The causal LM module: `forward(input_ids (B, N), attention_mask, position_ids, cache)` -> logits (B, N, V)."""
        ...

    @property
    def tokenizer(self) -> Any:
        """A transformers tokenizer: `encode`, `decode`, `pad_token_id`, `eos_token_id`, `chat_template`."""
        ...

    @property
    def signature(self) -> ModelSignature:
        """Which caches the model reads: layer count, KV heads, head dim, config fingerprint."""
        ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def config(self) -> Any:
        """The model's transformers config (its text config holds the sizes and token ids)."""
        ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    @property
    def pad_token_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str: ...

    def chat_text(self, messages: Sequence[Mapping[str, Any]] | str, *, add_generation_prompt: bool = True
                  ) -> str: ...

    def chat_ids(self, messages: Sequence[Mapping[str, Any]] | str, *, add_generation_prompt: bool = True
                 ) -> list[int]: ...
