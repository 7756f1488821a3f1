"""Batched prefill and decoding on `KVCache`s: the two steps every agent, fused or not, is made of.

Batches are left-padded (real tokens right-aligned) so that every row's next token sits in the last
column; each row's rotary positions count only its real tokens, so a padded row computes exactly
what it would compute alone.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol, Sequence

import torch

from agentmesh.cache.hf import HFCache, forward_with_cache, from_hf, new_hf, to_hf
from agentmesh.cache.kv import KVCache
from agentmesh.errors import ConfigError
from agentmesh.models.protocol import LanguageModel


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick new tokens. Greedy unless `do_sample`; sampling is seeded by `seed` if given."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 0, "an integer >= 0"),
            ("temperature", self.temperature > 0, "a number > 0 (use do_sample=False for greedy)"),
            ("top_k", self.top_k >= 0, "an integer >= 0 (0 turns it off)"),
            ("top_p", 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "a number > 0 (1.0 turns it off)"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ConfigError(f"generation setting {name}={getattr(self, name)!r} is invalid; expected {want}")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))

    def replace(self, **changes: Any) -> "GenerationConfig":
        return replace(self, **changes)

    @classmethod
    def for_model(cls, lm: LanguageModel, *, eos_token_id: int | Sequence[int] | None = None,
                  stop: str | Sequence[str] | None = None, **settings: Any) -> "GenerationConfig":
        """`settings` (None keeps a default) ending at the model's EOS tokens, or at `eos_token_id`."""
        if eos_token_id is None:
            eos_ids = tuple(lm.eos_token_ids)
        else:
            eos_ids = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return cls(eos_token_ids=eos_ids, stop=stops, **{k: v for k, v in settings.items() if v is not None})

    def trim(self, text: str, *, answer_start: str = "") -> str:
        """Generated `text` as a user reads it: cut before the first stop string, after the text
        the answer was started with (if any), stripped. Stops are looked for in `text` only."""
        for s in self.stop:
            text = text.split(s, 1)[0]
        return (answer_start + text).strip()


class Streamer(Protocol):
    """What `decode` feeds as tokens come: transformers' `TextStreamer` fits this protocol."""

    def put(self, value: torch.Tensor) -> None: ...
    def end(self) -> None: ...


@dataclass
class DecodeOutput:
    tokens: torch.Tensor                 # (B, T) new tokens only, `pad_token_id` after a row ends
    cache: KVCache | None = None         # the cache after decoding, when asked for
    finished: torch.Tensor | None = None  # (B,) whether each row hit EOS or a stop string


def left_pad(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the right end (works for left, right or no padding)."""
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids)
    mask = attention_mask.to(torch.long)
    # A stable sort of the 0/1 mask puts the pads first and keeps the order of the real tokens.
    order = torch.argsort(mask, dim=1, stable=True)
    return input_ids.gather(1, order), mask.gather(1, order)


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into `(input_ids, attention_mask)`, both (B, N)."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            ids[row, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[row, width - len(s):] = 1
    return ids, mask


class TokenHook(Protocol):
    """Sees every token a model reads, and may rewrite the K/V it stores for them.

    `read` is called before each forward pass with the tokens about to be read (B, k), their mask
    and their rotary positions; `rewrite` is then called once per layer, inside that pass, with the
    layer's new keys/values (B, H, k, D), before attention reads them. Include-response fusion is
    such a hook: the sharer reads each token first, and its K/V are fused into the receiver's.
    """

    def read(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> None: ...
    def rewrite(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class RunningCache:
    """A transformers cache being extended in place, with the metadata `KVCache` keeps beside it.

    Decoding holds one of these for its whole loop, so the cache is converted from and back to a
    `KVCache` once per call rather than once per token.
    """

    hf: HFCache
    token_ids: torch.Tensor      # (B, N)
    positions: torch.Tensor      # (B, N)
    mask: torch.Tensor           # (B, N)
    hook: TokenHook | None = None

    @classmethod
    def start(cls, lm: LanguageModel, past: KVCache | None, batch: int, hook: TokenHook | None = None) -> "RunningCache":
        rewrite = hook.rewrite if hook is not None else None
        if past is None:
            empty = torch.zeros(batch, 0, dtype=torch.long)
            return cls(new_hf(lm.config, rewrite), empty, empty, empty, hook)
        mask = past.attention_mask
        if mask is None:
            mask = torch.ones(past.batch_size, past.seq_len, dtype=torch.long)
        ids = past.token_ids if past.token_ids is not None else torch.zeros_like(mask)
        pos = past.positions if past.positions is not None else (mask.cumsum(-1) - 1).clamp(min=0)
        return cls(to_hf(past.replace(attention_mask=mask), lm.config, rewrite), ids.cpu(), pos.cpu(), mask.cpu(),
                   hook)

    @property
    def seq_len(self) -> int:
        return self.mask.shape[1]

    def step(self, lm: LanguageModel, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Read `input_ids` (B, k) with their `mask`; return the last position's logits (B, V)."""
        return self.last_logits(lm, input_ids, mask, 1)[:, -1].float()

    def last_logits(self, lm: LanguageModel, input_ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
        """Read `input_ids` (B, k); return the logits of their last `keep` positions (B, keep, V), as
        computed (training differentiates through them)."""
        return self._forward(lm, input_ids, mask, head=True, keep=keep).logits

    def read(self, lm: LanguageModel, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Read `input_ids` (B, k) with their `mask` into the cache: the base model only, no LM head."""
        self._forward(lm, input_ids, mask, head=False)

    def _forward(self, lm: LanguageModel, input_ids: torch.Tensor, mask: torch.Tensor, *, head: bool,
                 keep: int = 1) -> Any:
        start = self.mask.sum(-1, keepdim=True)
        positions = (start + mask.cumsum(-1) - 1).clamp(min=0)  # real tokens count on from the past
        if self.hook is not None:
            self.hook.read(input_ids, mask, positions)
        self.mask = torch.cat([self.mask, mask], dim=1)
        inputs = dict(input_ids=input_ids.to(lm.device), attention_mask=self.mask.to(lm.device),
                      position_ids=positions.to(lm.device))
        if head:
            out, self.hf = forward_with_cache(lm.model, self.hf, **inputs, logits_to_keep=keep)
        else:
            out, self.hf = forward_with_cache(lm.model.get_decoder(), self.hf, **inputs)
        self.token_ids = torch.cat([self.token_ids, input_ids.cpu()], dim=1)
        self.positions = torch.cat([self.positions, positions.cpu()], dim=1)
        return out

    def cache(self, lm: LanguageModel) -> KVCache:
        return from_hf(self.hf, signature=lm.signature, token_ids=self.token_ids,
                       positions=self.positions, attention_mask=self.mask)


def context_length(lm: LanguageModel) -> int | None:
    """How many positions `lm` reads at most (its config's `max_position_embeddings`), if known."""
    n = getattr(getattr(lm.model, "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_context(lm: LanguageModel, tokens: int, new_tokens: int = 0) -> None:
    """Fail before any work when `tokens` read plus `new_tokens` generated exceed `lm`'s context."""
    limit = context_length(lm)
    if limit is not None and tokens + new_tokens > limit:
        also = f" plus {new_tokens} new tokens" if new_tokens else ""
        raise ConfigError(f"the prompt is {tokens} tokens{also}, but {lm.name} reads at most {limit}",
                          hint="shorten the prompt" + (" or lower max_new_tokens" if new_tokens else ""))


@torch.no_grad()
def prefill(lm: LanguageModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            past: KVCache | None = None, *, hook: TokenHook | None = None) -> KVCache:
    """The cache of `input_ids` (B, N) read after `past` (if any); no token is generated.

    Rows must be left-padded (see `left_pad`). The returned cache holds `past`'s tokens too.
    """
    if input_ids.shape[1] == 0:
        if past is None:
            raise ConfigError("prefill got an empty prompt and no past cache; give at least one token")
        return past
    run, mask = _start_prompt(lm, input_ids, attention_mask, past, hook)
    run.read(lm, input_ids, mask)
    return run.cache(lm)


@torch.no_grad()
def prefill_with_logits(lm: LanguageModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        past: KVCache | None = None, *, hook: TokenHook | None = None
                        ) -> tuple[KVCache, torch.Tensor]:
    """`prefill`, and the logits (B, V) of the token after `input_ids`, from the same pass (the LM
    head on the last position only). `decode(..., first_logits=...)` picks its first token from
    them: a prompt read whole this way costs one pass over the weights, as in transformers'
    `generate`, where prefilling all but its last token and reading that one in `decode` costs two.
    """
    if input_ids.shape[1] == 0:
        raise ConfigError("prefill_with_logits got an empty prompt; give at least one token")
    run, mask = _start_prompt(lm, input_ids, attention_mask, past, hook)
    logits = run.step(lm, input_ids, mask)
    return run.cache(lm), logits


def _start_prompt(lm: LanguageModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  past: KVCache | None, hook: TokenHook | None) -> tuple[RunningCache, torch.Tensor]:
    check_context(lm, input_ids.shape[1] + (past.seq_len if past is not None else 0))
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.long)
    return RunningCache.start(lm, past, input_ids.shape[0], hook), mask


@torch.no_grad()
def next_token_logits(lm: LanguageModel, past: KVCache | None, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, *, hook: TokenHook | None = None) -> torch.Tensor:
    """Logits (B, V) for the token after `input_ids` (B, k) read after `past`."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.long)
    return RunningCache.start(lm, past, input_ids.shape[0], hook).step(lm, input_ids, mask)


def _penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Repetition penalty on the tokens in `seen` (B, S): divide positive logits, multiply negative."""
    picked = logits.gather(1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked)


def next_tokens(logits: torch.Tensor, gen: GenerationConfig, seen: torch.Tensor | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from `logits` (B, V) -> (B,)."""
    if gen.repetition_penalty != 1.0 and seen is not None and seen.numel():
        logits = _penalize(logits, seen, gen.repetition_penalty)
    if not gen.do_sample:
        return logits.argmax(-1)
    logits = logits / gen.temperature
    if gen.top_k > 0:
        kth = torch.topk(logits, min(gen.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if gen.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the tokens before it already hold top_p of the mass (the best always stays).
        drop = (cum - sorted_logits.softmax(-1)) >= gen.top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def decode(lm: LanguageModel, cache: KVCache | None, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
           gen: GenerationConfig | Sequence[GenerationConfig], *, pad_token_id: int = 0,
           streamer: Streamer | None = None,
           on_token: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
           prompt_ids: torch.Tensor | None = None, return_cache: bool = False,
           hook: TokenHook | None = None, first_logits: torch.Tensor | None = None) -> DecodeOutput:
    """Read `input_ids` (B, k) after `cache`, then generate up to `gen.max_new_tokens` tokens.

    `input_ids` are the prompt tokens not yet in `cache` (at least the last one, unless
    `first_logits` are given). `gen` is one
    config for every row, or one per row (rows then stop at their own EOS, stop strings and
    `max_new_tokens`, and sample with their own settings and seed, exactly as they would alone).
    A row is finished once it produced an EOS token or a stop string; decoding stops when every
    row is. `prompt_ids` only feed the repetition penalty. `on_token(step, tokens (B,))` is called
    after each step; it may return a (B,) bool tensor of rows to finish now (a caller gone away).
    `hook` sees every token read, prompt and response (see `TokenHook`). `first_logits` (B, V):
    the logits of the token after everything `cache` holds, when `prefill_with_logits` computed
    them with the cache; `input_ids` is then empty (B, 0) and the first token costs no pass.
    """
    if first_logits is not None and (cache is None or input_ids.shape[1] != 0):
        raise ConfigError("decode with first_logits continues a cache that holds the whole prompt: give "
                          "that cache and no input_ids (B, 0)")
    batch = input_ids.shape[0]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.long)
    rows = _RowConfigs.of(gen, batch)
    seen = prompt_ids if prompt_ids is not None else input_ids
    finished = rows.limits == 0
    out: list[torch.Tensor] = []
    step_ids, step_mask = input_ids, mask
    run = RunningCache.start(lm, cache, batch, hook)
    for step in range(rows.max_new_tokens):
        logits = first_logits if step == 0 and first_logits is not None else run.step(lm, step_ids, step_mask)
        tok = rows.pick(logits.cpu(), seen)
        tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
        out.append(tok)
        seen = torch.cat([seen, tok[:, None]], dim=1)
        finished |= rows.is_eos(tok) | (rows.limits <= step + 1)
        if streamer is not None:
            streamer.put(tok if batch > 1 else tok[:1])
        if on_token is not None:
            stop_rows = on_token(step, tok)
            if stop_rows is not None:
                finished |= stop_rows.to(torch.bool)
        if rows.any_stop:
            finished |= rows.hit_stop(lm, torch.stack(out, 1))
        if bool(finished.all()):
            break
        # Finished rows keep stepping on padding; their picks are overwritten above.
        step_ids, step_mask = tok[:, None], torch.ones_like(tok)[:, None]
    if streamer is not None:
        streamer.end()
    tokens = torch.stack(out, 1) if out else torch.empty(batch, 0, dtype=torch.long)
    # The cache holds the prompt and every new token but the last (which was never read back).
    return DecodeOutput(tokens=tokens, cache=run.cache(lm) if return_cache and run.seq_len else None,
                        finished=finished)


class _RowConfigs:
    """The generation settings of each row of a batch, and the per-step decisions they imply."""

    def __init__(self, configs: Sequence[GenerationConfig]):
        self.configs = list(configs)
        first = self.configs[0]
        self.shared = all(c == first for c in self.configs)
        self.max_new_tokens = max(c.max_new_tokens for c in self.configs)
        self.limits = torch.tensor([c.max_new_tokens for c in self.configs], dtype=torch.long)
        eos = sorted({t for c in self.configs for t in c.eos_token_ids}) or [-1]
        # (B, E): row b ends on token eos[e] when its own config lists it.
        self.eos = torch.tensor(eos, dtype=torch.long)
        self.eos_of_row = torch.tensor([[t in c.eos_token_ids for t in eos] for c in self.configs], dtype=torch.bool)
        self.any_stop = any(c.stop for c in self.configs)
        # A seeded sampler draws from its own generator, so a row's draws do not depend on its batch.
        self.generators = [torch.Generator().manual_seed(c.seed) if c.do_sample and c.seed is not None else None
                           for c in self.configs]
        self.one_generator = self.shared and (len(self.configs) == 1 or self.generators[0] is None)

    @classmethod
    def of(cls, gen: GenerationConfig | Sequence[GenerationConfig], batch: int) -> "_RowConfigs":
        configs = [gen] * batch if isinstance(gen, GenerationConfig) else list(gen)
        if len(configs) != batch:
            raise ConfigError(f"decode got {len(configs)} generation configs for a batch of {batch} rows")
        return cls(configs)

    def pick(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """One token per row (B,) from `logits` (B, V)."""
        if self.one_generator:
            return next_tokens(logits, self.configs[0], seen, self.generators[0])
        return torch.cat([next_tokens(logits[b:b + 1], c, None if seen is None else seen[b:b + 1], g)
                          for b, (c, g) in enumerate(zip(self.configs, self.generators))])

    def is_eos(self, tok: torch.Tensor) -> torch.Tensor:
        return ((tok[:, None] == self.eos[None]) & self.eos_of_row).any(-1)

    def hit_stop(self, lm: LanguageModel, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) whether each row's text so far contains one of its stop strings (only the recent
        tail is decoded)."""
        tails = lm.tokenizer.batch_decode(tokens[:, -16:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in c.stop) for c, t in zip(self.configs, tails)], dtype=torch.bool)
