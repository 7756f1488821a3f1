"""The compared methods: receiver alone, sharer alone, text-to-text, cache-to-cache and prefix.

Cache-to-cache also runs with the replacement oracles (`Fuser.oracle`) in place of a trained
fuser: `oracle` and `oracle-response` are `CacheToCache` under those names.

A method turns an `Item` into a `MethodOutput`: the receiver's final text, the wall time of the
whole exchange (sharer stage included, batch 1, `time.perf_counter`), the time to the receiver's
first generated token, the bytes that went from sharer to receiver, and the receiver's prefill: how
many prompt tokens it read itself and the seconds from starting to read them to its first token
(the pace `agentmesh generate` shows). Methods only see models through two small protocols,
`Generator` (one model writes text) and `CacheGenerator` (a sharer's cache reaches the receiver),
so their logic is testable with fakes; `agentmesh.eval.adapters` implements both over the real
engine.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol

from agentmesh.errors import error_line
from agentmesh.tasks import prompts
from agentmesh.tasks.datasets import Item
from agentmesh.types import Messages

OnToken = Callable[[str], None]  # called with each new token's text, as soon as it exists
# Called once with how many prompt tokens the receiver reads itself, just before it reads them: the
# start of its prefill, which ends at its first token (how `agentmesh generate` measures one).
OnPrompt = Callable[[int], None]


class Generator(Protocol):
    """One model answering chat messages greedily. `on_prompt`, when given, is told the number of
    prompt tokens the model reads, just before it starts reading them."""

    name: str

    def generate_text(self, messages: Messages, *, max_new_tokens: int, on_token: OnToken | None = None,
                      on_prompt: OnPrompt | None = None) -> str: ...


@dataclass(frozen=True)
class CacheGeneration:
    text: str
    bytes_exchanged: int  # size of the sharer KV cache that reached the receiver, in the wire dtype


class CacheGenerator(Protocol):
    """A receiver answering `messages` with a sharer's KV cache of the same prompt.

    `sharer_context` is a private passage only the sharer reads, ahead of the shared prompt.
    `on_prompt`, when given, is told the number of prompt tokens the receiver reads itself (not
    those the sharer read for it), just before the call that reads them.
    """

    name: str

    def generate_with_cache(self, messages: Messages, *, sharer_context: str | None, max_new_tokens: int,
                            on_token: OnToken | None = None, on_prompt: OnPrompt | None = None) -> CacheGeneration: ...


@dataclass(frozen=True)
class MethodOutput:
    text: str
    latency_s: float
    ttft_s: float | None
    bytes_exchanged: int
    error: str | None = None
    prompt_tokens: int | None = None  # prompt tokens the receiver read itself (None: not reported)
    prefill_s: float | None = None    # from the start of that reading to the receiver's first token


class Method(Protocol):
    name: str

    def run(self, item: Item) -> MethodOutput: ...


class Stopwatch:
    """Wall time since creation, the time of the first token reported to `on_token`, and the
    receiver's prefill: the token count reported to `on_prompt` and the time from that report to
    the first token. Give `on_prompt` to the receiver only (a sharer's reading is not the
    receiver's prefill)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first_token: float | None = None
        self.prompt_tokens: int | None = None
        self.reading: float | None = None  # when the receiver started reading its prompt

    def on_prompt(self, tokens: int) -> None:
        self.prompt_tokens, self.reading = tokens, time.perf_counter()

    def on_token(self, _piece: str) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()

    def output(self, text: str, bytes_exchanged: int = 0) -> MethodOutput:
        end = time.perf_counter()
        ttft = None if self.first_token is None else self.first_token - self.start
        prefill = None
        if self.reading is not None and self.first_token is not None and self.first_token >= self.reading:
            prefill = self.first_token - self.reading
        return MethodOutput(text=text, latency_s=end - self.start, ttft_s=ttft, bytes_exchanged=bytes_exchanged,
                            prompt_tokens=self.prompt_tokens, prefill_s=prefill)


def _alone(model: Generator, messages: Messages, max_new_tokens: int) -> MethodOutput:
    clock = Stopwatch()
    return clock.output(model.generate_text(messages, max_new_tokens=max_new_tokens, on_token=clock.on_token,
                                            on_prompt=clock.on_prompt))


@dataclass
class ReceiverOnly:
    """The receiver answers alone; it never sees the sharer's passage."""

    receiver: Generator
    max_new_tokens: int = 64
    name: str = "receiver"

    def run(self, item: Item) -> MethodOutput:
        return _alone(self.receiver, prompts.receiver_messages(item), self.max_new_tokens)


@dataclass
class SharerOnly:
    """The sharer answers alone, with its private passage when the item has one."""

    sharer: Generator
    max_new_tokens: int = 64
    name: str = "sharer"

    def run(self, item: Item) -> MethodOutput:
        return _alone(self.sharer, prompts.sharer_messages(item), self.max_new_tokens)


@dataclass
class TextToText:
    """Text-to-text, as the C2C paper evaluates it: the sharer writes background (<= `background_tokens`), the receiver answers
    with it. Bytes exchanged are the UTF-8 bytes of the background text."""

    sharer: Generator
    receiver: Generator
    max_new_tokens: int = 64
    background_tokens: int = 256
    name: str = "t2t"

    def run(self, item: Item) -> MethodOutput:
        clock = Stopwatch()
        background = self.sharer.generate_text(prompts.background_messages(item),
                                               max_new_tokens=self.background_tokens)
        text = self.receiver.generate_text(prompts.receiver_background_messages(item, background),
                                           max_new_tokens=self.max_new_tokens, on_token=clock.on_token,
                                           on_prompt=clock.on_prompt)  # the receiver's read of the background
        return clock.output(text, len(background.strip().encode("utf-8")))


@dataclass
class _CacheEdge:
    """The receiver reads only the question; what reaches it from the sharer (which reads the
    passage) is a cache, through `model`."""

    model: CacheGenerator
    max_new_tokens: int = 64
    name: str = "cache"

    def run(self, item: Item) -> MethodOutput:
        clock = Stopwatch()
        out = self.model.generate_with_cache(prompts.receiver_messages(item), sharer_context=item.context,
                                             max_new_tokens=self.max_new_tokens, on_token=clock.on_token,
                                             on_prompt=clock.on_prompt)
        return clock.output(out.text, out.bytes_exchanged)


@dataclass
class CacheToCache(_CacheEdge):
    """C2C: the receiver reads only the question; the sharer (with its passage) prefills the same
    prompt and a fuser writes its cache into the receiver's. The receiver's cache does not grow."""

    name: str = "c2c"


@dataclass
class Prefix(_CacheEdge):
    """Same model on both ends, laid out as a graph's `prefix` edge: the sharer reads the passage
    as its own user turn ([user: passage], no generation prompt), the receiver's question follows
    as the next user turn; the sharer prefills all of it but the last token and the receiver
    continues from that cache. The receiver's cache grows by the whole passage, which is exactly
    what it would have computed had it read the passage itself."""

    name: str = "prefix"


def run_safely(method: Method, item: Item) -> MethodOutput:
    """`method.run(item)`, with any exception turned into an output that carries the error."""
    start = time.perf_counter()
    try:
        return method.run(item)
    except Exception as e:  # one bad item must not end the run; it is reported and counted wrong
        return MethodOutput(text="", latency_s=time.perf_counter() - start, ttft_s=None, bytes_exchanged=0,
                            error=error_line(e))
