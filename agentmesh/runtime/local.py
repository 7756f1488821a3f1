"""`LocalEndpoint`: an agent's model run in this process, in worker threads (the run's executor),
so the event loop stays free.

It keeps the unfused caches it computed and reuses the longest matching token prefix of any of
them, so an agent never prefills the same tokens twice: its own reading is reused by its turn, and
in a chat session each turn prefills only what the last turn did not already read.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Sequence

import torch

from agentmesh.c2c.checkpoints import bind_models, check_models, load_any, locate
from agentmesh.c2c.fuser import Fuser
from agentmesh.c2c.sharing import SharedCache, align_sharer, fuse_span
from agentmesh.cache.kv import KVCache
from agentmesh.errors import AgentMeshError, CacheError, ConfigError
from agentmesh.models.inference import GenerationConfig, decode, prefill, prefill_with_logits
from agentmesh.models.loaded_model import LoadedModel
from agentmesh.models.pool import ModelPool
from agentmesh.models.protocol import LanguageModel
from agentmesh.models.streaming import TextDecoder
from agentmesh.runtime.endpoint import (CallContext, ReadRequest, RunCancelled, ShareFn, ShareRequest, TextOutput,
                                        TextRequest, gather_or_cancel)
from agentmesh.runtime.prompts import cache_ids, common_prefix, extend_ids
from agentmesh.runtime.trace import edge_key


def _row(ids: Sequence[int]) -> torch.Tensor:
    return torch.tensor([list(ids)], dtype=torch.long)  # (1, N)


class LocalEndpoint:
    """Runs one agent's model in this process, in worker threads."""

    records_transfers = False

    def __init__(self, agent: str, model_ref: str, *, pool: ModelPool, dtype: str = "auto", device: str = "cpu",
                 adapter: str | None = None):
        self.agent = agent
        self.model_ref = model_ref
        self.adapter = adapter
        self.dtype = dtype
        self.device = device
        self.pool = pool
        self._lm: LoadedModel | None = None
        self._lock = threading.Lock()          # guards the caches below; never held during compute
        self._load_lock = threading.Lock()
        self._store: dict[str, KVCache] = {}   # unfused caches by slot, reusable by token prefix
        self._fused: KVCache | None = None     # this agent's fused prompt span (receivers of fuse edges)
        self._fusers: dict[str, Fuser] = {}

    @property
    def model(self) -> LoadedModel | None:
        """The loaded model (None before `load`)."""
        return self._lm

    def _load(self, ctx: CallContext) -> LoadedModel:
        with self._load_lock:
            if self._lm is None:
                get = lambda: self.pool.get(self.model_ref, dtype=self.dtype, device=self.device,  # noqa: E731
                                            adapter=self.adapter)
                if self.pool.has(self.model_ref, self.adapter):  # loaded already (or registered): nothing to time
                    self._lm = get()
                else:
                    with ctx.trace.span(self.agent, "load") as sp:
                        self._lm = get()
                        sp.detail = str(getattr(self._lm, "name", self.model_ref))
        return self._lm

    async def load(self, ctx: CallContext) -> None:
        if self._lm is None:
            await ctx.in_thread(self._load, ctx)

    async def _model(self, ctx: CallContext) -> LoadedModel:
        await self.load(ctx)
        return self._lm

    def check_fuser(self, ref: str) -> None:
        if not ref.startswith("hf://"):  # a hub ref may need a download: `text` fetches it
            locate(ref)

    def forget(self) -> None:
        """Drop every kept cache (a chat session calls this on reset)."""
        with self._lock:
            self._store.clear()
            self._fused = None

    def _put(self, slot: str, cache: KVCache | None) -> None:
        if cache is not None:
            with self._lock:
                self._store[slot] = cache

    def _best_base(self, lm: LoadedModel, ids: Sequence[int], past: KVCache | None) -> tuple[KVCache | None, int]:
        """The kept cache (or `past`) sharing the longest token prefix with `ids`, cut to that prefix."""
        if past is not None:
            past.check_signature(lm.signature, f"the cache {self.agent} continues from")
        with self._lock:
            candidates = ([past] if past is not None else []) + list(self._store.values())
        best, n = None, 0
        for c in candidates:
            k = common_prefix(cache_ids(c), ids)
            if k > n:
                best, n = c, k
        if best is not None and n < best.seq_len:
            best = best.slice_tokens(0, n)
        return best, n

    def _prefill(self, lm: LoadedModel, ids: Sequence[int], past: KVCache | None, slot: str, ctx: CallContext,
                 kind: str, edge: str | None = None, *, logits: bool = False
                 ) -> tuple[KVCache | None, int, torch.Tensor | None]:
        """The cache of `ids`, computing only what no kept cache already holds: (cache, tokens
        computed, None); with `logits`, the logits of the token after `ids` instead of None, from
        the same pass (so at least the last token is computed)."""
        if not ids:
            return None, 0, None
        ctx.check()
        base, n = self._best_base(lm, ids, past)
        if logits and n == len(ids):
            assert base is not None
            base, n = (base.slice_tokens(0, n - 1) if n > 1 else None), n - 1
        last = None
        with ctx.trace.span(self.agent, kind, edge=edge) as sp:
            cache = base
            if n < len(ids):
                new = _row(ids[n:])
                if logits:
                    cache, last = prefill_with_logits(lm, new, torch.ones_like(new), past=base)
                else:
                    cache = prefill(lm, new, torch.ones_like(new), past=base)
            sp.tokens = len(ids) - n
            if n:
                sp.detail = f"reused {n} of {len(ids)} tokens"
        self._put(slot, cache)
        return cache, len(ids) - n, last

    @staticmethod
    def _reading_ids(lm: LoadedModel, req: ReadRequest) -> list[int]:
        return extend_ids(lm, req.messages, add_generation_prompt=False, base_messages=req.past_messages,
                          base_ids=cache_ids(req.past))

    @staticmethod
    def prompt_ids(lm: LoadedModel, req: TextRequest) -> list[int]:
        """The conversation with a generation prompt, then the agent's answer start, if it has one."""
        ids = extend_ids(lm, req.messages, add_generation_prompt=True, base_messages=req.past_messages,
                         base_ids=cache_ids(req.past))
        start = req.generation.get("answer_start")
        return ids + lm.encode(start) if start else ids

    async def reading(self, req: ReadRequest, ctx: CallContext) -> KVCache | None:
        lm = await self._model(ctx)

        def work() -> KVCache | None:
            ids = self._reading_ids(lm, req)
            if len(ids) == len(cache_ids(req.past)):
                return req.past  # nothing of its own to read: it hands on what it continued from
            cache, _, _ = self._prefill(lm, ids, req.past, "read", ctx, "read")
            return cache

        return await ctx.in_thread(work)

    async def share(self, req: ShareRequest, ctx: CallContext) -> KVCache:
        lm = await self._model(ctx)
        if req.span_ids.shape[0] != 1:
            raise CacheError(f"{self.agent}: the runtime shares one conversation at a time, got a batch of "
                             f"{req.span_ids.shape[0]}")
        span = [int(t) for t in req.span_ids[0][req.span_mask[0].bool()]]
        if not 0 < req.keep_last <= len(span):
            raise CacheError(f"{self.agent}: asked for the last {req.keep_last} positions of a {len(span)}-token span")

        def work() -> KVCache:
            ids = self._reading_ids(lm, req.reading) + span
            cache, _, _ = self._prefill(lm, ids, req.reading.past, f"share:{req.receiver}", ctx, "share",
                                     edge=edge_key(self.agent, req.receiver))
            assert cache is not None
            return cache.slice_tokens(cache.seq_len - req.keep_last, None)

        return await ctx.in_thread(work)

    def _fuser(self, lm: LoadedModel, ref: str) -> Fuser:
        with self._lock:
            if ref in self._fusers:
                return self._fusers[ref]
        fuser = load_any(ref, receiver_signature=lm.signature).eval()
        if fuser.config.fusion != "prompt":
            # Its answer tokens would need fusing as they are decoded; a graph run fuses the prompt once.
            raise ConfigError(f"fuser {ref} was trained with fusion {fuser.config.fusion!r}; graph runs fuse the "
                              "prompt only", hint="use C2CModel.generate or `agentmesh generate --fuser`, "
                              "which fuse every response token too")
        with self._lock:
            return self._fusers.setdefault(ref, fuser)

    def _load_fusers(self, lm: LoadedModel, refs: Sequence[str], ctx: CallContext) -> list[Fuser]:
        missing = [r for r in refs if r not in self._fusers]
        if not missing:
            return [self._fusers[r] for r in refs]
        with ctx.trace.span(self.agent, "load", edge=None) as sp:
            sp.detail = "fusers: " + ", ".join(missing)
            return [self._fuser(lm, r) for r in refs]

    async def text(self, req: TextRequest, ctx: CallContext, share: Sequence[ShareFn] = ()) -> TextOutput:
        if len(share) != len(req.fuse):
            raise AgentMeshError(f"{self.agent}: {len(req.fuse)} fuse inputs but {len(share)} share functions")
        lm = await self._model(ctx)
        ids = await ctx.in_thread(self.prompt_ids, lm, req)
        if not req.fuse:
            # The whole prompt in one pass, its last position's logits giving the first token.
            cache, computed, logits = await ctx.in_thread(self._prefill, lm, ids, req.past, "text", ctx, "prefill",
                                                          logits=True)
            return await ctx.in_thread(self._decode, lm, cache, ids, req, ctx, computed, True, logits)
        cache, computed = await self._fused_prefill(lm, ids, req, ctx, share)
        return await ctx.in_thread(self._decode, lm, cache, ids, req, ctx, computed, False)

    async def _fused_prefill(self, lm: LoadedModel, ids: list[int], req: TextRequest, ctx: CallContext,
                             share: Sequence[ShareFn]) -> tuple[KVCache | None, int]:
        """The receiver prefills its span (the prompt but its last token) from its own unfused
        context while every sharer prefills its reading of the same span; `fuse_span`, the function
        `C2CModel` fuses with, then rewrites the span's K/V. Tokens already fused in an earlier turn
        keep their fused K/V, so only the new tokens are fused."""
        span = ids[:-1]
        if not span:
            return None, 0
        with self._lock:
            old = self._fused
        start = common_prefix(cache_ids(old), span) if old is not None else 0
        new = len(span) - start
        if new == 0:
            assert old is not None
            return old.slice_tokens(0, start), 0
        own = ctx.in_thread(lambda: self._prefill(lm, span, req.past, "raw", ctx, "prefill")[:2])
        fusers = asyncio.ensure_future(ctx.in_thread(self._load_fusers, lm, [f.fuser for f in req.fuse], ctx))
        models = list(req.sharer_models) + [None] * (len(req.fuse) - len(req.sharer_models))
        shared = [self._shared(lm, i, fn, models[i], ids, req, ctx, fusers, start) for i, fn in enumerate(share)]
        (raw, computed), loaded, *got = await gather_or_cancel(own, fusers, *shared)
        ctx.check()

        def work() -> KVCache:
            caches = []
            for f, fuser, (cache, index, keep) in zip(req.fuse, loaded, got):
                if cache.seq_len != keep:
                    raise CacheError(f"sharer {f.sharer} sent {cache.seq_len} positions; {keep} were asked for")
                if cache.signature is not None:
                    check_models(fuser, lm.signature, cache.signature)
                    fuser = bind_models(fuser, lm.signature, cache.signature)
                caches.append(SharedCache(fuser, cache, index))
            base = raw if old is None or start == 0 else KVCache.concat([old.slice_tokens(0, start),
                                                                         raw.slice_tokens(start, None)])
            with ctx.trace.span(self.agent, "fuse") as sp:
                fused = fuse_span(base, caches, req.fusion, start=start)  # type: ignore[arg-type]
                sp.tokens = new
                sp.detail = f"{len(caches)} sharer(s), {req.fusion}" + (f", from token {start}" if start else "")
            with self._lock:
                self._fused = fused
            return fused

        return await ctx.in_thread(work), computed

    async def _shared(self, lm: LoadedModel, i: int, share: ShareFn, sharer: LanguageModel | None, ids: list[int],
                      req: TextRequest, ctx: CallContext, fusers: asyncio.Future[list[Fuser]], start: int
                      ) -> tuple[KVCache, torch.Tensor | None, int]:
        """Sharer `i`'s cache of the span's tokens from `start` on, the gather index that lines it up
        with them (None: position for position) and how many positions it holds."""
        if sharer is None:  # it reads the receiver's own ids
            row = _row(ids[:-1])
            return await share(row, torch.ones_like(row), len(ids) - 1 - start), None, len(ids) - 1 - start
        fuser = (await asyncio.shield(fusers))[i]
        sharer_ids, index, keep = await ctx.in_thread(self._aligned_span, lm, sharer, fuser, ids, req, i, start)
        return await share(sharer_ids, torch.ones_like(sharer_ids), keep), index, keep

    def _aligned_span(self, lm: LoadedModel, sharer: LanguageModel, fuser: Fuser, ids: list[int], req: TextRequest,
                      i: int, start: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """For a sharer with another tokenizer: its own tokens of the conversation up to the last one
        the span's tokens from `start` on read (1, M), their gather index into the last `keep` of
        them (1, N) (-1: not fused), and `keep`."""
        aligned = align_sharer(lm, sharer, fuser, [req.messages], len(ids) - 1)
        if aligned.receiver_ids[0].tolist() != list(ids):
            raise ConfigError(
                f"{self.agent}: its prompt cannot be aligned with the tokenizer of sharer {req.fuse[i].sharer}: it "
                "continues from a cache whose tokens differ from its conversation tokenized whole",
                hint="give the sharer the receiver's tokenizer, or drop the receiver's prefix edge")
        gather = aligned.gather_index[0, start:]   # (N,)
        read = gather[gather >= 0]
        end = int(read.max()) + 1 if read.numel() else 1
        first = int(read.min()) if read.numel() else end - 1
        index = torch.where(gather >= 0, gather - first, -1)[None]   # (1, N), into the last `keep` positions
        return aligned.input_ids[:, :end], index, end - first

    def _decode(self, lm: LoadedModel, cache: KVCache | None, ids: list[int], req: TextRequest, ctx: CallContext,
                computed: int, keep: bool, first_logits: torch.Tensor | None = None) -> TextOutput:
        """Generate after `cache`, which holds the prompt but its last token (that `decode` reads),
        or, given `first_logits` (see `prefill_with_logits`), all of it."""
        ctx.check()
        settings = dict(req.generation)
        answer_start = settings.pop("answer_start", "")
        gen = GenerationConfig.for_model(lm, **settings)
        eos = set(gen.eos_token_ids)
        stream = TextDecoder(lm.tokenizer)
        first: list[float] = []
        if answer_start and ctx.on_token is not None:
            ctx.on_token(answer_start, ids[-1])  # the answer's first piece: the start it was given

        def on_token(step: int, tok: torch.Tensor) -> None:
            if ctx.cancel.is_set():
                raise RunCancelled(f"the run was cancelled while {self.agent} was decoding")
            if not first:
                first.append(ctx.trace.now())
            t = int(tok[0])
            if t in eos:
                return
            piece = stream.push(t)
            if ctx.on_token is not None:
                ctx.on_token(piece, t)

        last = _row(ids[-1:] if first_logits is None else [])
        with ctx.trace.span(self.agent, "decode") as sp:
            out = decode(lm, cache, last, torch.ones_like(last), gen, pad_token_id=lm.pad_token_id, on_token=on_token,
                         prompt_ids=_row(ids), return_cache=keep, first_logits=first_logits)
            sp.tokens = int(out.tokens.shape[1])
        if keep:
            # Unfused prompt + generated tokens: the next turn of a chat reuses all of it.
            self._put("text", out.cache)
        generated = [int(t) for t in out.tokens[0]]
        cut = next((i for i, t in enumerate(generated) if t in eos), len(generated))
        token_ids = tuple(generated[:cut])
        text = gen.trim(lm.decode(list(token_ids), skip_special_tokens=True), answer_start=answer_start)
        finished = bool(out.finished[0]) if out.finished is not None else cut < len(generated)
        return TextOutput(text=text, token_ids=token_ids, prompt_tokens=len(ids),
                          prefilled_tokens=computed + (first_logits is None), first_token_s=first[0] if first else None,
                          finished=finished)

    def __repr__(self) -> str:
        return f"LocalEndpoint({self.agent!r}, model={self.model_ref!r})"
