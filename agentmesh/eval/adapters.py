"""The methods' `Generator` / `CacheGenerator` protocols over the real engine (`C2CModel`,
`prefill`, `decode`). This is the only module of `agentmesh.eval` that runs models.

Engine functions used (and nothing else):
  * `C2CModel(receiver, sharers, fusers).generate(input_ids (1, N), attention_mask, *,
    max_new_tokens, on_token=fn(step, tokens (B,)), sharer_inputs=[SharerInput | None])`
    -> new tokens (1, T); `.encode_chat([messages])` for cross-tokenizer sharers;
    `.generation_config(max_new_tokens=...)` for EOS defaults.
  * `prefill(lm, input_ids (1, N)) -> KVCache` and `decode(lm, cache, input_ids (1, k), mask,
    gen, pad_token_id=, on_token=, prompt_ids=)` for `prefix`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from agentmesh.cache.kv import KVCache, ModelSignature
from agentmesh.errors import ConfigError
from agentmesh.eval.methods import CacheGeneration, OnPrompt, OnToken
from agentmesh.models.reading import reading_ids
from agentmesh.models.loaded_model import LoadedModel
from agentmesh.models.protocol import LanguageModel
from agentmesh.types import Messages

if TYPE_CHECKING:
    from agentmesh.c2c.model import C2CModel


def kv_nbytes(signature: ModelSignature, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of a full-depth K+V cache of `tokens` tokens (what `KVCache.nbytes` reports)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * signature.num_layers * signature.num_kv_heads * signature.head_dim * tokens * itemsize


def cache_wire_nbytes(cache: KVCache, wire_dtype: torch.dtype | None) -> int:
    """`cache.nbytes` as it would be sent in `wire_dtype` (its own dtype when None)."""
    if wire_dtype is None or wire_dtype == cache.dtype:
        return cache.nbytes
    scale = torch.empty((), dtype=wire_dtype).element_size()
    return cache.nbytes // cache.keys[0].element_size() * scale


def _token_callback(tokenizer: Any, on_token: OnToken | None) -> Callable[[int, torch.Tensor], None] | None:
    """An engine `on_token(step, tokens (B,))` that reports each new token's text to `on_token`."""
    if on_token is None:
        return None
    from agentmesh.models.streaming import TextDecoder

    decoder = TextDecoder(tokenizer)

    def callback(_step: int, tokens: torch.Tensor) -> None:
        on_token(decoder.push(int(tokens.reshape(-1)[0])))

    return callback


class ModelGenerator:
    """`Generator` over one `LoadedModel` (the receiver or the sharer alone), greedy."""

    def __init__(self, lm: LanguageModel, *, name: str | None = None):
        from agentmesh.c2c.model import C2CModel

        self.lm = lm
        self.name = name or lm.name
        self._engine = C2CModel(lm)

    def generate_text(self, messages: Messages, *, max_new_tokens: int, on_token: OnToken | None = None,
                      on_prompt: OnPrompt | None = None) -> str:
        ids = torch.tensor([self.lm.chat_ids(messages)], dtype=torch.long)  # (1, N)
        if on_prompt is not None:
            on_prompt(ids.shape[1])
        out = self._engine.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                    on_token=_token_callback(self.lm.tokenizer, on_token))
        return self.lm.decode(out[0]).strip()


class C2CGenerator:
    """`CacheGenerator` over a `C2CModel` with sharers and fusers.

    Bytes exchanged: every sharer's K/V for the fused tokens (the prompt minus its last token, or
    with 'prompt+response' fusion every token the receiver read; the private passage stays with
    the sharer), in `wire_dtype` (default: the sharer's dtype). The receiver reads the whole prompt;
    the sharers' prefill and the fusion run inside the same engine call, so its prefill time
    includes them (as `agentmesh generate --fuser` shows it).
    """

    def __init__(self, model: C2CModel, *, wire_dtype: torch.dtype | None = None, name: str = "c2c"):
        if not model.sharers:
            raise ConfigError("c2c needs a C2CModel with at least one sharer and its fuser")
        self.model = model
        self.wire_dtype = wire_dtype
        self.name = name

    def generate_with_cache(self, messages: Messages, *, sharer_context: str | None, max_new_tokens: int,
                            on_token: OnToken | None = None, on_prompt: OnPrompt | None = None) -> CacheGeneration:
        model = self.model
        receiver = model.receiver
        if sharer_context:
            if not all(model.shares_vocab):
                raise ConfigError("a private sharer passage needs sharers that share the receiver's tokenizer; "
                                  "cross-tokenizer passages are not supported yet")
            from agentmesh.c2c.model import SharerInput

            prompt = receiver.chat_ids(messages)
            ids = torch.tensor([prompt], dtype=torch.long)  # (1, N)
            mask = torch.ones_like(ids)
            sharer_inputs: Sequence[Any] | None = []
            for sharer in model.sharers:
                row = torch.tensor([reading_ids(sharer, context=sharer_context) + prompt[:-1]], dtype=torch.long)
                sharer_inputs.append(SharerInput(row, torch.ones_like(row)))  # (1, P + N - 1)
        else:
            ids, mask, sharer_inputs = model.encode_chat([messages])
        read = int(mask[0].sum())  # the prompt tokens the receiver reads
        if on_prompt is not None:
            on_prompt(read)
        out = model.generate(ids, mask, max_new_tokens=max_new_tokens, do_sample=False,
                             on_token=_token_callback(receiver.tokenizer, on_token), sharer_inputs=sharer_inputs)
        span = read - 1
        if model.fusion == "prompt+response":  # also the last prompt token and every generated token read back
            span += max(out.shape[1], 1)
        sent = sum(kv_nbytes(s.signature, span, self.wire_dtype or s.dtype) for s in model.sharers)
        return CacheGeneration(receiver.decode(out[0]).strip(), sent)


def prefix_ids(lm: LanguageModel, context: str | None, messages: Messages) -> list[int]:
    """Token ids of a prefix edge: the sender's reading of `context`, then the receiver's turn.

    The layout of a graph's `prefix` edge, built by the same functions: the sender reads
    [user: context] with no generation prompt (what a fused sharer reads before the span too), and
    the receiver's `messages` extend that conversation; only the text they add is tokenized and
    appended to the sender's ids, so the receiver reads exactly `sender tokens + its own tokens`.
    """
    from agentmesh.models.reading import reading_messages
    from agentmesh.runtime.prompts import extend_ids

    reading = reading_messages(None, context) if context else ()
    base = reading_ids(lm, context=context) if context else []
    return extend_ids(lm, (*reading, *messages), add_generation_prompt=True, base_messages=reading, base_ids=base)


class PrefixGenerator:
    """`CacheGenerator` for `prefix`: the sharer (same weights as the receiver) prefills the whole
    prompt but its last token; the receiver reads that token after the sharer's cache and decodes
    (its prefill: one token). Bytes exchanged: that cache, in `wire_dtype` (default: the model's dtype)."""

    def __init__(self, sharer: LoadedModel, receiver: LoadedModel | None = None, *,
                 wire_dtype: torch.dtype | None = None, name: str = "prefix"):
        receiver = receiver if receiver is not None else sharer
        # Same architecture is not enough: the weights must be the same too (same object or files).
        same = receiver is sharer or (receiver.source == sharer.source
                                      and receiver.signature.fingerprint == sharer.signature.fingerprint)
        if not same:
            raise ConfigError(f"prefix needs the same model on both ends; receiver {receiver.name!r} and sharer "
                              f"{sharer.name!r} differ (use c2c with a fuser instead)")
        from agentmesh.c2c.model import C2CModel

        self.sharer, self.receiver = sharer, receiver
        self.wire_dtype = wire_dtype
        self.name = name
        self._engine = C2CModel(receiver)  # for the receiver's generation defaults (EOS tokens)

    def generate_with_cache(self, messages: Messages, *, sharer_context: str | None, max_new_tokens: int,
                            on_token: OnToken | None = None, on_prompt: OnPrompt | None = None) -> CacheGeneration:
        from agentmesh.models.inference import decode, prefill

        ids = torch.tensor([prefix_ids(self.receiver, sharer_context, messages)], dtype=torch.long)  # (1, N)
        if ids.shape[1] < 2:
            raise ConfigError("prefix needs a prompt of at least two tokens")
        cache = prefill(self.sharer, ids[:, :-1])  # the sharer's work: (1, H, N-1, D) per layer
        gen = self._engine.generation_config(max_new_tokens=max_new_tokens, do_sample=False)
        last = ids[:, -1:]  # the receiver's own reading, on top of the sharer's cache
        if on_prompt is not None:
            on_prompt(last.shape[1])
        out = decode(self.receiver, cache, last, None, gen, pad_token_id=self.receiver.pad_token_id,
                     on_token=_token_callback(self.receiver.tokenizer, on_token), prompt_ids=ids)
        return CacheGeneration(self.receiver.decode(out.tokens[0]).strip(), cache_wire_nbytes(cache, self.wire_dtype))
