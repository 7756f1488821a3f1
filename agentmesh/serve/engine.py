"""What answers a request: a `Job` (one request's stream of text), the `BatchEngine` that runs
concurrent jobs for one `C2CModel` as one batched fused generation, and the `PipelineEngine`
that answers with a pipeline's output agent.

The batch engine owns one worker thread. It takes the first waiting job, gathers more for a short
window (up to a maximum batch size), and runs them as one left-padded batch: each row samples
with its own settings and seed and stops at its own EOS, stop string or token limit, so a greedy
request gets exactly the tokens it would get alone. Requests that come while a batch runs wait
for the next one. A job whose client went away is dropped from the batch at the next token.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence

import torch

from agentmesh.models.inference import GenerationConfig
from agentmesh.models.streaming import TextDecoder
from agentmesh.serve.protocol import APIError

if TYPE_CHECKING:
    from agentmesh.c2c.model import C2CModel
    from agentmesh.graph import Graph
    from agentmesh.models.pool import ModelPool

log = logging.getLogger("agentmesh.serve")


class StopScanner:
    """Releases generated text piece by piece, holding back whatever could be the start of a stop
    string, so a client never sees any part of the stop string that ends the answer."""

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(stop)
        self.text = ""
        self.sent = 0

    def push(self, delta: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was hit)."""
        self.text += delta
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            cut = min(hits)
            out, self.sent, self.text = self.text[self.sent:cut], cut, self.text[:cut]
            return out, True
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        end = max(len(self.text) - hold, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out, False

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


@dataclass(frozen=True)
class _Finished:
    reason: str


class Job:
    """One request's generation. The engine side (any thread) calls `push`/`finish`/`fail`; the
    request side iterates `stream()` on its event loop and calls `cancel()` if the client leaves."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conversation: list[dict[str, str]], config: GenerationConfig,
                 stop: Sequence[str], prompt_tokens: int, tokenizer: Any = None):
        self.loop = loop
        self.conversation = conversation
        self.config = config
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.created = time.perf_counter()
        self.first_token_s: float | None = None
        self._scanner = StopScanner(stop)
        self._decoder = TextDecoder(tokenizer) if tokenizer is not None else None
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self._cancelled.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self._events.put_nowait, item)

    def push_token(self, token_id: int) -> bool:
        """`push` for engines that generate token ids (the job decodes them with its tokenizer)."""
        assert self._decoder is not None
        return self.push(self._decoder.push(token_id))

    def push(self, delta: str) -> bool:
        """One generated token's text; True once the job is done (stop string, token limit, cancel)."""
        if self.done:
            return True
        self.completion_tokens += 1
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.created
        out, hit = self._scanner.push(delta)
        if out:
            self._put(out)
        if hit:
            self.finish("stop", flush=False)
        elif self.completion_tokens >= self.config.max_new_tokens:
            self.finish("length")
        return self.done

    def finish(self, reason: str, *, flush: bool = True) -> None:
        with self._lock:
            if self.finish_reason is not None:
                return
            self.finish_reason = reason
        rest = ""
        if flush:
            # Text still held back: the end of a stop-string prefix, or bytes of an unfinished character.
            tail = self._decoder.text[len(self._decoder.emitted):] if self._decoder is not None else ""
            rest, hit = self._scanner.push(tail)
            rest += "" if hit else self._scanner.flush()
        if rest:
            self._put(rest)
        self._put(_Finished(reason))

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self.finish_reason is not None:
                return
            self.finish_reason = "error"
        self._put(error)

    def cancel(self) -> None:
        """The client is gone: the engine drops the job at its next token (a finished job stays finished)."""
        if self.finish_reason is None:
            self._cancelled.set()

    async def stream(self) -> AsyncIterator[str]:
        """The answer's text pieces as they come; ends when the job finishes."""
        while True:
            item = await self._events.get()
            if isinstance(item, _Finished):
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def text(self) -> str:
        return "".join([piece async for piece in self.stream()])


@dataclass
class EngineStats:
    """Counts kept for `/health` and tests: batches run, their sizes, rows dropped on disconnect."""

    batches: int = 0
    rows: int = 0
    largest_batch: int = 0
    cancelled: int = 0

    def record(self, size: int) -> None:
        self.batches += 1
        self.rows += size
        self.largest_batch = max(self.largest_batch, size)


class _Admission:
    """How many jobs an engine holds (waiting or running), bounded by `max_queue`."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.count = 0
        self.lock = threading.Lock()

    def enter(self, model: str) -> None:
        with self.lock:
            if self.count >= self.max_queue:
                raise APIError(429, f"model {model!r} already has {self.count} requests waiting or running "
                                    f"(the limit is {self.max_queue}); retry later", code="queue_full")
            self.count += 1

    def leave(self) -> None:
        with self.lock:
            self.count -= 1


class BatchEngine:
    """Serves one `C2CModel` (a plain model is one without sharers) with batching across requests."""

    def __init__(self, name: str, model: C2CModel, *, max_batch_size: int = 16, window_s: float = 0.01,
                 rejoin_s: float = 0.25, max_queue: int = 64, default_temperature: float = 1.0):
        self.name = name
        self.model = model
        self.max_batch_size = max_batch_size
        self.window_s = window_s
        self.rejoin_s = rejoin_s
        self._last_batch = (0, 0.0)  # (rows, when it ended)
        self.default_temperature = default_temperature
        self.stats = EngineStats()
        self._admission = _Admission(max_queue)
        self._waiting: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @property
    def kind(self) -> str:
        return "c2c" if self.model.sharers else "model"

    @property
    def description(self) -> str:
        return repr(self.model)

    @property
    def tokenizer(self) -> Any:
        return self.model.receiver.tokenizer

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self.model.receiver.eos_token_ids)

    @property
    def context_length(self) -> int | None:
        from agentmesh.cache.kv import text_config

        value = getattr(text_config(self.model.receiver.config), "max_position_embeddings", None)
        return int(value) if isinstance(value, int) and value > 0 else None

    def count_prompt(self, conversation: list[dict[str, str]]) -> int:
        return len(self.model.receiver.chat_ids(conversation))

    def submit(self, conversation: list[dict[str, str]], config: GenerationConfig, stop: Sequence[str],
               prompt_tokens: int) -> Job:
        """Queue a job (called on the event loop); `APIError` 429 when the queue is full."""
        self._admission.enter(self.name)
        job = Job(asyncio.get_running_loop(), conversation, config, stop, prompt_tokens, self.tokenizer)
        self._ensure_thread()
        self._waiting.put(job)
        return job

    def close(self) -> None:
        if self._thread is not None:
            self._waiting.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=f"agentmesh-serve-{self.name}", daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            jobs = self._gather()
            if jobs is None:
                return
            if jobs:
                self._run(jobs)

    def _gather(self) -> list[Job] | None:
        """The next batch: the first waiting job and whatever else comes within the window.

        Clients of a batch that just ended tend to come back together, a little after it; so when
        the first job comes within `rejoin_s` of the last batch's end, the batch waits up to
        `rejoin_s` for as many jobs as that batch had. Without this, clients that missed one
        window would stay a batch behind the others for good, in two half-size batches.
        """
        first = self._waiting.get()
        if first is None:
            return None
        jobs = [first]
        start = time.perf_counter()
        rows, ended = self._last_batch
        expect = min(rows, self.max_batch_size) if start - ended < self.rejoin_s else 0
        while len(jobs) < self.max_batch_size:
            limit = start + (self.rejoin_s if len(jobs) < expect else self.window_s)
            try:
                left = limit - time.perf_counter()
                job = self._waiting.get(timeout=left) if left > 0 else self._waiting.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._waiting.put(None)  # close() after this batch
                break
            jobs.append(job)
        live = []
        for job in jobs:
            if job.cancelled:
                self._drop(job)
            else:
                live.append(job)
        return live

    def _drop(self, job: Job) -> None:
        self.stats.cancelled += 1
        job.finish("cancelled")
        self._admission.leave()

    def _run(self, jobs: list[Job]) -> None:
        self.stats.record(len(jobs))
        eos = [set(job.config.eos_token_ids) for job in jobs]
        try:
            ids, mask, sharer_inputs = self.model.encode_chat([job.conversation for job in jobs])

            def on_token(step: int, tok: torch.Tensor) -> torch.Tensor:
                stop_rows = torch.zeros(len(jobs), dtype=torch.bool)
                for b, job in enumerate(jobs):
                    if not job.done:
                        t = int(tok[b])
                        if t in eos[b]:
                            job.finish("stop")
                        else:
                            job.push_token(t)
                    stop_rows[b] = job.done
                return stop_rows

            # Stop strings are the jobs' to find (they see whole text); decode only needs the limits.
            configs = [job.config.replace(stop=()) for job in jobs]
            self.model.generate(ids, mask, sharer_inputs=sharer_inputs, row_configs=configs, on_token=on_token)
            self._last_batch = (len(jobs), time.perf_counter())
            for job in jobs:
                job.finish("length" if job.completion_tokens >= job.config.max_new_tokens else "stop")
        except Exception as e:  # noqa: BLE001 - every job of the batch learns what went wrong
            log.exception("batch of %d for model %s failed", len(jobs), self.name)
            for job in jobs:
                job.fail(e)
        finally:
            for job in jobs:
                if job.cancelled:
                    self.stats.cancelled += 1
                self._admission.leave()


class PipelineEngine:
    """Answers with a pipeline's output agent: the last user message is the pipeline's `{input}`.

    Each request is its own run (runs share the loaded models through one pool); the agents'
    sampling settings come from the pipeline file, while `max_tokens` and `stop` still cut the
    answer short.
    """

    kind = "pipeline"

    def __init__(self, name: str, graph: Graph, *, output: str | None = None, pool: ModelPool | None = None,
                 max_queue: int = 64):
        from agentmesh.runtime.plan import build_plan

        build_plan(graph)  # validates the graph now, not at the first request
        outputs = [a.name for a in graph.output_agents()]
        if output is None and len(outputs) != 1:
            from agentmesh.errors import ConfigError

            raise ConfigError(f"pipeline {graph.name!r} has outputs {outputs}; say which one answers with `output:`")
        self.name = name
        self.graph = graph
        self.output = output or outputs[0]
        self.pool = pool
        self.default_temperature = 1.0
        self.stats = EngineStats()
        self._admission = _Admission(max_queue)
        self._runs: set[asyncio.Task[None]] = set()

    @property
    def description(self) -> str:
        return f"pipeline {self.graph.name!r} answered by agent {self.output!r}"

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return ()

    @property
    def context_length(self) -> int | None:
        return None

    def count_prompt(self, conversation: list[dict[str, str]]) -> int:
        return 0  # known once the run has read its prompts

    def submit(self, conversation: list[dict[str, str]], config: GenerationConfig, stop: Sequence[str],
               prompt_tokens: int) -> Job:
        self._admission.enter(self.name)
        job = Job(asyncio.get_running_loop(), conversation, config, stop, prompt_tokens)
        task = asyncio.ensure_future(self._run(job))
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)
        return job

    async def _run(self, job: Job) -> None:
        from agentmesh.runtime.events import RunFinished, Token
        from agentmesh.runtime.scheduler import stream_graph

        self.stats.record(1)
        user = [m["content"] for m in job.conversation if m["role"] == "user"]
        opts: dict[str, Any] = {} if self.pool is None else {"pool": self.pool}
        events = stream_graph(self.graph, {"input": user[-1] if user else ""}, **opts)
        try:
            async for event in events:
                if job.cancelled:
                    self.stats.cancelled += 1
                    break
                if isinstance(event, Token) and event.agent == self.output:
                    if job.push(event.text):
                        break
                elif isinstance(event, RunFinished):
                    result = event.result
                    if result.error is not None:
                        job.fail(result.error)
                    elif self.output in result.agents:
                        job.prompt_tokens = result.agents[self.output].prompt_tokens
                    job.finish("length" if job.completion_tokens >= job.config.max_new_tokens else "stop")
        except Exception as e:  # noqa: BLE001
            job.fail(e)
        finally:
            await events.aclose()  # stops the run if it is still going
            job.finish("cancelled" if job.cancelled else "stop")
            self._admission.leave()

    def close(self) -> None:
        for task in list(self._runs):
            task.cancel()


Engine = BatchEngine | PipelineEngine
