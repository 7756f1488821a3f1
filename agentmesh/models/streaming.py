"""Turning a stream of token ids into a stream of text, one safe piece at a time."""
from __future__ import annotations

from typing import Any


class TextDecoder:
    """Decodes one sequence incrementally: `push(token_id)` returns the newly complete text.

    Byte-level tokenizers can split one character over several tokens; text is only released once
    it no longer ends in a replacement character, so a stream never shows half a character.
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
