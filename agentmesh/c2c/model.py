"""`C2CModel`: a receiver LLM that reads its sharers' KV caches through fusers, then decodes.

'prompt' fusion (the published default): the receiver and every sharer prefill the same span, the
whole prompt but its last token; the fusers rewrite the receiver's cache of that span; the receiver
then reads the last prompt token and decodes as usual. 'prompt+response' fusion: every token the
receiver reads, prompt and response, is fused as it is read (`agentmesh.c2c.response`). Nothing is
stored on the model between calls, so one `C2CModel` serves any number of threads at once.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from agentmesh.c2c.fuser import Fuser, Fusion, SharerSpan
from agentmesh.c2c.checkpoints import FuserRef
from agentmesh.c2c.pretrained import ModelLike, build_parts, load_pretrained
from agentmesh.c2c.response import ResponseFusion, SharerReading
from agentmesh.c2c.sharing import SharedCache, SharerInput, align_sharer, fuse_span, reads_receiver_ids, sharer_span
from agentmesh.cache.kv import KVCache
from agentmesh.errors import CheckpointError, ConfigError
from agentmesh.models.inference import (
    GenerationConfig, Streamer, decode, left_pad, next_token_logits, pad_sequences, prefill)
from agentmesh.models.protocol import LanguageModel
from agentmesh.types import FusionMode, Messages, check_fusion_mode


class C2CModel:
    """A receiver, its sharers, and one fuser per sharer.

    With no sharers it is the receiver alone, run through the very same code path, so that a
    closed-gate fuser and no fuser at all give bit-identical logits.
    """

    def __init__(self, receiver: LanguageModel, sharers: Sequence[LanguageModel] = (), fusers: Sequence[Fuser] = (),
                 *, mode: FusionMode = "parallel"):
        if len(sharers) != len(fusers):
            raise ConfigError(f"C2CModel got {len(sharers)} sharers but {len(fusers)} fusers; give one fuser per sharer")
        check_fusion_mode(mode)
        for i, (sharer, fuser) in enumerate(zip(sharers, fusers)):
            for role, lm, sig in (("receiver", receiver, fuser.receiver), ("sharer", sharer, fuser.sharer)):
                if not lm.signature.same_shape(sig):
                    raise CheckpointError(
                        f"fuser {i} was built for {role} {sig.name!r} ({sig.num_layers} layers, {sig.num_kv_heads} "
                        f"KV heads of dim {sig.head_dim}), but the {role} is {lm.name!r} ({lm.signature.num_layers} "
                        f"layers, {lm.signature.num_kv_heads} KV heads of dim {lm.signature.head_dim})")
        self.receiver = receiver
        self.sharers = tuple(sharers)
        self.fusers = tuple(f.eval() for f in fusers)
        self.mode = mode
        kinds = sorted({f.config.fusion for f in self.fusers})
        if len(kinds) > 1:
            raise ConfigError(f"C2CModel got fusers of fusions {kinds}; all fusers of one receiver must fuse the "
                              "same tokens ('prompt' or 'prompt+response')")
        self.fusion: Fusion = kinds[0] if kinds else "prompt"  # type: ignore[assignment]
        self.shares_vocab = tuple(reads_receiver_ids(receiver, s) for s in self.sharers)
        if self.fusion == "prompt+response" and not all(self.shares_vocab):
            raise ConfigError("prompt+response fusion needs sharers that read the receiver's token ids (the same "
                              "vocabulary); a sharer with another tokenizer can only use a 'prompt' fuser")

    @classmethod
    def from_pretrained(cls, ref: FuserRef | Sequence[FuserRef], *, mode: FusionMode = "parallel",
                        **kwargs: Any) -> C2CModel:
        """Load fusers (a folder, a published pair folder, or ``hf://nics-efc/C2C_Fuser/<pair>``;
        a list for several sharers) with the receiver and sharers they were trained for.
        See `agentmesh.c2c.pretrained.load_pretrained` for the options."""
        check_fusion_mode(mode)  # before anything is loaded
        return cls(*load_pretrained(ref, **kwargs), mode=mode)

    @classmethod
    def build(cls, model: ModelLike | None = None, *, mode: FusionMode = "parallel", **kwargs: Any) -> C2CModel:
        """What `agentmesh generate` builds from its options (see `agentmesh.c2c.pretrained.build_parts`)."""
        check_fusion_mode(mode)
        return cls(*build_parts(model, **kwargs), mode=mode)

    @property
    def tokenizer(self) -> Any:
        return self.receiver.tokenizer

    def sharer_span(self, index: int, span_ids: torch.Tensor, span_mask: torch.Tensor,
                    given: SharerInput | None = None) -> SharerSpan:
        """Prefill sharer `index` and return its cache aligned to the receiver span (B, N)."""
        return sharer_span(self._shared(index, span_ids, span_mask, given), span_ids.shape[1])

    def _shared(self, index: int, span_ids: torch.Tensor, span_mask: torch.Tensor,
                given: SharerInput | None) -> SharedCache:
        """Sharer `index`'s prefill of what it reads for the span (the span itself unless `given`)."""
        sharer = self.sharers[index]
        if given is None:
            if not self.shares_vocab[index]:
                raise ConfigError(
                    f"sharer {sharer.name!r} has a different tokenizer from receiver {self.receiver.name!r}; "
                    "use C2CModel.chat(messages) so the text can be aligned, or pass sharer_inputs")
            given = SharerInput(span_ids, span_mask)
        return SharedCache(self.fusers[index], prefill(sharer, given.input_ids, given.attention_mask),
                           given.gather_index)

    def prefill_fused(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      sharer_inputs: Sequence[SharerInput | None] | None = None) -> KVCache | None:
        """The receiver's fused cache of every prompt token but the last (None for 1-token prompts)."""
        span_ids, span_mask = input_ids[:, :-1], attention_mask[:, :-1]
        if span_ids.shape[1] == 0:
            return None
        cache = prefill(self.receiver, span_ids, span_mask)
        if not self.sharers:
            return cache
        given = list(sharer_inputs) if sharer_inputs is not None else [None] * len(self.sharers)
        return fuse_span(cache, [self._shared(i, span_ids, span_mask, given[i]) for i in range(len(self.sharers))],
                         self.mode)

    def start(self, ids: torch.Tensor, mask: torch.Tensor, sharer_inputs: Sequence[SharerInput | None] | None = None
              ) -> tuple[KVCache | None, torch.Tensor, torch.Tensor, ResponseFusion | None]:
        """What decoding a left-padded prompt starts from: (cache, ids and mask still to read, hook).

        'prompt' fusion: the fused cache of all but the last token, which is left to read, no hook.
        'prompt+response': no cache yet; the whole prompt is read through a `ResponseFusion` hook.
        """
        if self.fusion == "prompt" or not self.sharers:
            return self.prefill_fused(ids, mask, sharer_inputs), ids[:, -1:], mask[:, -1:], None
        return None, ids, mask, self.response_fusion(ids, mask, sharer_inputs, span=ids.shape[1] - 1)

    def response_fusion(self, ids: torch.Tensor, mask: torch.Tensor,
                        sharer_inputs: Sequence[SharerInput | None] | None, *, span: int) -> ResponseFusion:
        """The hook that fuses every token of `ids` (B, T) as the receiver reads it.

        Each `SharerInput` is the sharer's reading of the receiver's first `span` columns (the
        prompt but its last token); the sharer then reads the remaining columns as they are (the
        last prompt token, and in training the answer). Left padding keeps them aligned.
        """
        given = list(sharer_inputs) if sharer_inputs is not None else [None] * len(self.sharers)
        readings = [None if g is None else SharerReading(torch.cat([g.input_ids, ids[:, span:]], 1),
                                                         torch.cat([g.attention_mask, mask[:, span:]], 1))
                    for g in given]
        return ResponseFusion(self.sharers, self.fusers, readings, self.mode)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               sharer_inputs: Sequence[SharerInput | None] | None = None) -> torch.Tensor:
        """The receiver's next-token logits (B, V) after the fused prompt: what decoding starts from."""
        ids, mask = left_pad(input_ids, attention_mask)
        cache, rest, rest_mask, hook = self.start(ids, mask, sharer_inputs)
        return next_token_logits(self.receiver, cache, rest, rest_mask, hook=hook)

    def generation_config(self, **overrides: Any) -> GenerationConfig:
        """Defaults for this receiver (its EOS tokens), with `overrides` applied."""
        return GenerationConfig.for_model(self.receiver, **overrides)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 256, do_sample: bool = False, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                 eos_token_id: int | Sequence[int] | None = None, stop: str | Sequence[str] | None = None,
                 seed: int | None = None, streamer: Streamer | None = None,
                 on_token: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
                 sharer_inputs: Sequence[SharerInput | None] | None = None,
                 row_configs: Sequence[GenerationConfig] | None = None) -> torch.Tensor:
        """Generate after `input_ids` (B, N); returns only the new tokens, (B, T), padded after EOS.

        `row_configs` (one `GenerationConfig` per row, see `generation_config`) replaces the
        keyword settings: each row then samples and stops by its own settings, as it would alone.
        `on_token(step, tokens (B,))` may return a (B,) bool tensor of rows to stop now.
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            attention_mask = None if attention_mask is None else attention_mask[None]
        if input_ids.shape[1] == 0:
            raise ConfigError("generate got an empty prompt; give at least one token")
        gen: GenerationConfig | Sequence[GenerationConfig] = row_configs or self.generation_config(
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
            top_p=top_p, repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, stop=stop, seed=seed)
        ids, mask = left_pad(input_ids, attention_mask)
        cache, rest, rest_mask, hook = self.start(ids, mask, sharer_inputs)
        out = decode(self.receiver, cache, rest, rest_mask, gen, pad_token_id=self.receiver.pad_token_id,
                     streamer=streamer, on_token=on_token, prompt_ids=ids, hook=hook)
        return out.tokens

    def encode_chat(self, conversations: Sequence[Messages]) -> tuple[torch.Tensor, torch.Tensor, list[SharerInput] | None]:
        """Receiver ids for a batch of conversations, and each sharer's aligned input where needed."""
        rows = [self.receiver.chat_ids(list(m)) for m in conversations]
        ids, mask = pad_sequences(rows, self.receiver.pad_token_id)
        if all(self.shares_vocab):
            return ids, mask, None
        inputs: list[SharerInput | None] = []
        for sharer, fuser, same in zip(self.sharers, self.fusers, self.shares_vocab):
            if same:
                inputs.append(None)
                continue
            aligned = align_sharer(self.receiver, sharer, fuser, conversations, ids.shape[1] - 1)
            inputs.append(SharerInput(aligned.input_ids, aligned.attention_mask, aligned.gather_index))
        return ids, mask, inputs

    def chat(self, messages: str | Messages | Sequence[Messages], **generate_kwargs: Any) -> str | list[str]:
        """Answer a user message, a conversation, or a batch of conversations, as text."""
        single = isinstance(messages, str) or (len(messages) > 0 and isinstance(messages[0], dict))
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        conversations = [messages] if single else list(messages)
        ids, mask, sharer_inputs = self.encode_chat(conversations)
        tokens = self.generate(ids, mask, sharer_inputs=sharer_inputs, **generate_kwargs)
        texts = [self._finish_text(t, generate_kwargs.get("stop")) for t in tokens]
        return texts[0] if single else texts

    def _finish_text(self, tokens: torch.Tensor, stop: str | Sequence[str] | None) -> str:
        return GenerationConfig(stop=(stop,) if isinstance(stop, str) else tuple(stop or ())).trim(
            self.receiver.tokenizer.decode(tokens, skip_special_tokens=True))


    def __repr__(self) -> str:
        names = ", ".join(s.name for s in self.sharers) or "none"
        return f"C2CModel(receiver={self.receiver.name!r}, sharers=[{names}], mode={self.mode!r}, fusion={self.fusion!r})"
