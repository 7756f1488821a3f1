"""The endpoint contract: where an agent's model runs. The scheduler talks to every agent through
this seam and nothing else.

An endpoint serves one agent and offers three async calls:

* `reading(ReadRequest) -> KVCache | None` — prefill the agent's reading (role + private context,
  after its prefix sender's reading); the cache a prefix edge hands on;
* `share(ShareRequest) -> KVCache` — as a fuse sharer: read its reading, then the receiver's prompt
  span in its own token ids, and return the cache of the span's last `keep_last` positions;
* `text(TextRequest, share=[...]) -> TextOutput` — prefill its prompt (fusing its sharers' caches,
  whose prefills it starts concurrently with its own), then decode.

`LocalEndpoint` (runtime/local.py) runs the model in this process. An endpoint that moves caches
over a link (agentmesh.mesh) implements the same calls; it sets `records_transfers = True` and
records a "transfer" span (with the wire bytes) for every cache it sends.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Protocol, Sequence, TypeVar

import torch

from agentmesh.cache.kv import KVCache
from agentmesh.models.loaded_model import LoadedModel
from agentmesh.models.protocol import LanguageModel
from agentmesh.runtime.plan import FuseInput
from agentmesh.runtime.trace import Trace
from agentmesh.types import Messages

T = TypeVar("T")

# (span_ids (1, N) in the sharer's vocabulary, span_mask (1, N), keep_last) -> the sharer's cache of the
# span's last keep_last positions
ShareFn = Callable[[torch.Tensor, torch.Tensor, int], Awaitable[KVCache]]


class RunCancelled(Exception):
    """Raised inside a worker thread when the run it works for was cancelled (another agent failed)."""


@dataclass(frozen=True)
class ReadRequest:
    """A reading conversation. It starts with `past_messages`, which `past` (a prefix sender's
    reading cache, or None) has already read."""

    messages: Messages = ()
    past: KVCache | None = None
    past_messages: Messages = ()
    receivers: tuple[str, ...] = ()  # the agents that will continue from this reading (prefix edges)


@dataclass(frozen=True)
class ShareRequest:
    """Read `reading`, then the receiver's span `span_ids` (1, N); return the last `keep_last` positions."""

    receiver: str
    reading: ReadRequest
    span_ids: torch.Tensor
    span_mask: torch.Tensor
    keep_last: int


@dataclass(frozen=True)
class TextRequest:
    """The agent's whole conversation (`messages`: prefix sender's reading, own reading, turns) and
    how to generate. `fuse` lists the sharers whose caches are fused into the prompt span."""

    messages: Messages
    generation: Mapping[str, Any]
    past: KVCache | None = None
    past_messages: Messages = ()
    fuse: tuple[FuseInput, ...] = ()
    fusion: str = "parallel"
    # Per fuse input, the sharer's model when it has another tokenizer: the receiver then aligns the
    # conversation to it as `C2CModel.chat` does. None (or no entry): it reads the receiver's ids.
    sharer_models: tuple[LanguageModel | None, ...] = ()


@dataclass(frozen=True)
class TextOutput:
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    prefilled_tokens: int
    first_token_s: float | None  # trace time of the first generated token
    finished: bool               # it stopped at EOS or a stop string (not at max_new_tokens)


@dataclass
class CallContext:
    """What a call needs besides its request: the agent it serves, the run's trace and cancel flag,
    and where generated text goes (`on_token(text_piece, token_id)`, called from a worker thread)."""

    agent: str
    trace: Trace
    cancel: threading.Event = field(default_factory=threading.Event)
    on_token: Callable[[str, int], None] | None = None
    executor: concurrent.futures.Executor | None = None  # None: the event loop's default executor

    def in_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Awaitable[T]:
        """Run `fn(*args, **kwargs)` in a worker thread. A run owns its executor, so when it stops it
        never waits for a thread still busy (a model still loading, say) to return."""
        return asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    def check(self) -> None:
        if self.cancel.is_set():
            raise RunCancelled(f"the run was cancelled while {self.agent} was working")


class Endpoint(Protocol):
    agent: str
    # True: the endpoint records the "transfer" span of every cache it hands on (it moves them over
    # a link itself); False: the scheduler records them as in-process hand-offs.
    records_transfers: bool

    @property
    def model(self) -> LoadedModel | None:
        """The agent's model when it runs in this process and has loaded (None otherwise)."""
        ...

    def check_fuser(self, ref: str) -> None:
        """Raise before anything loads if fuser `ref` cannot be found where this agent runs."""
        ...

    def forget(self) -> None:
        """Drop every cache kept between calls (a chat session's reset)."""
        ...

    async def load(self, ctx: CallContext) -> None: ...
    async def reading(self, req: ReadRequest, ctx: CallContext) -> KVCache | None: ...
    async def share(self, req: ShareRequest, ctx: CallContext) -> KVCache: ...
    async def text(self, req: TextRequest, ctx: CallContext, share: Sequence[ShareFn] = ()) -> TextOutput: ...


class ForwardingEndpoint:
    """Another endpoint, `inner`, with something added to how its caches travel: the model, fuser
    checks, kept caches and loading stay inner's. It records the transfers of what it hands on."""

    records_transfers = True

    def __init__(self, inner: Endpoint):
        self.inner = inner
        self.agent = inner.agent

    @property
    def model(self) -> LoadedModel | None:
        return self.inner.model

    def check_fuser(self, ref: str) -> None:
        self.inner.check_fuser(ref)

    def forget(self) -> None:
        self.inner.forget()

    async def load(self, ctx: CallContext) -> None:
        await self.inner.load(ctx)


async def gather_or_cancel(*aws: Awaitable[Any]) -> list[Any]:
    """Like `asyncio.gather`, but when one fails the others are cancelled before the error is raised."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    if not tasks:
        return []
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        raise
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            for p in pending:
                p.cancel()
            raise t.exception()  # type: ignore[misc]
    return [t.result() for t in tasks]
