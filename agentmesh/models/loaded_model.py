"""`LoadedModel`: a causal LM, its tokenizer and its cache signature, ready for inference."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from agentmesh.cache.kv import ModelSignature, text_config
from agentmesh.errors import ConfigError

# Tokens that close an assistant turn in common chat formats (ChatML, Gemma, Llama 3, Phi).
_END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")


def plain_chat_text(messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
    """The fallback chat format for tokenizers without a chat template.

    One line per message, ``"{role}: {content}\\n"``; with `add_generation_prompt` the text ends
    with ``"assistant:"`` so that the model continues as the assistant.
    """
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + "assistant:" if add_generation_prompt else text


def pad_token_id(tokenizer: Any, default: int | None = 0) -> int | None:
    """The id a batch is padded with: the tokenizer's pad token, else its eos token, else `default`."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad) if pad is not None else default


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ConfigError(f"chat message {i} is {m!r}; expected a dict with 'role' and 'content'")
        out.append(dict(m))
    return out


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A frozen (eval mode, no grad) causal LM with its tokenizer.

    `signature` tells which caches the model can read; `source` says where it was loaded from
    (a path, ``hf://org/name@revision``, or ``tiny:...`` for in-memory test models).
    Identity semantics (``eq=False``): two loads of the same files are two different models.
    """

    name: str
    model: torch.nn.Module  # a transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    signature: ModelSignature
    source: str

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def pad_token_id(self) -> int:
        return int(pad_token_id(self.tokenizer) or 0)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every token id that ends generation, without duplicates, most specific first.

        The tokenizer's eos, the generation config's eos ids, and for chat models the
        end-of-turn token their template uses (e.g. ``<|im_end|>``).
        """
        ids: list[int] = []

        def add(value: Any) -> None:
            for v in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(v, int) and v >= 0 and v not in ids:
                    ids.append(v)

        tok = self.tokenizer
        add(getattr(tok, "eos_token_id", None))
        gen = getattr(self.model, "generation_config", None)
        if gen is not None:
            add(getattr(gen, "eos_token_id", None))
        add(getattr(text_config(self.config), "eos_token_id", None))
        template = getattr(tok, "chat_template", None)
        if isinstance(template, str):
            for token in _END_OF_TURN_TOKENS:
                if token in template:
                    add(self._single_token_id(token))
        return tuple(ids)

    def _single_token_id(self, token: str) -> int | None:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if not isinstance(tid, int) or tid == getattr(self.tokenizer, "unk_token_id", None):
            return None
        return tid if self.tokenizer.convert_ids_to_tokens(tid) == token else None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens (no bos/eos added)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _template_kwargs(self) -> dict[str, Any]:
        template = self.tokenizer.chat_template
        model_type = str(getattr(text_config(self.config), "model_type", ""))
        # Qwen3 templates think by default; agents exchange answers, not reasoning traces.
        if model_type.startswith("qwen3") or (isinstance(template, str) and "enable_thinking" in template):
            return {"enable_thinking": False}
        return {}

    def chat_text(self, messages: Sequence[Mapping[str, Any]] | str, *, add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` (a str is one user message).

        Uses the tokenizer's chat template; without one, `plain_chat_text`'s
        ``"role: content"`` lines.
        """
        msgs = _check_messages(messages)
        if not self.has_chat_template:
            return plain_chat_text(msgs, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=add_generation_prompt, **self._template_kwargs())

    def chat_ids(self, messages: Sequence[Mapping[str, Any]] | str, *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `chat_text(messages)`; the template itself places any bos token."""
        return self.encode(self.chat_text(messages, add_generation_prompt=add_generation_prompt))

    def __repr__(self) -> str:
        s = self.signature
        return (f"LoadedModel(name={self.name!r}, type={s.model_type}, layers={s.num_layers}, "
                f"kv_heads={s.num_kv_heads}, head_dim={s.head_dim}, source={self.source!r})")
