"""`agentmesh demo`: one question answered three ways, side by side, streaming.

1. the receiver alone;
2. text to text: the sharer reads its private notes and writes a message (shown), which the
   receiver then reads with the question;
3. cache to cache: the sharer only prefills (its notes, then the receiver's prompt) and a fuser
   projects its KV cache into the receiver's, which then answers.

Each column shows its latency, time to first token (both from the moment "Ask" is pressed) and the
bytes that crossed between the two models. Which models, fuser and prompts: a YAML file
(`configs/demo.yaml` by default) or flags; nothing is hard-coded here. Each method is a small
agentmesh graph run by the runtime, so the demo measures exactly what a pipeline would do.
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentmesh.errors import AgentMeshError, ConfigError
from agentmesh.serve.config import first_error, resolve_ref
from agentmesh.units import human_bytes
from agentmesh.yaml_file import read_yaml

if TYPE_CHECKING:
    from agentmesh.graph import Graph
    from agentmesh.models.pool import ModelPool

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
METHODS = ("alone", "t2t", "c2c")
TITLES = {"alone": "Receiver alone", "t2t": "Text to text", "c2c": "Cache to cache"}


class DemoExample(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str
    notes: str = ""


class DemoConfig(BaseModel):
    """What the demo runs. `{input}` is the question; `{sharer}` the sharer's message (text to text)."""

    model_config = ConfigDict(extra="forbid")
    title: str = "agentmesh: cache-to-cache side by side"
    receiver: str
    sharer: str
    fuser: str
    receiver_adapter: str | None = None   # a PEFT adapter folder merged into the receiver
    sharer_adapter: str | None = None     # e.g. a specialist fine-tune of the sharer
    dtype: str = "auto"
    receiver_prompt: str = "{input}"
    sharer_prompt: str = "Write down what in your notes helps answer this question: {input}"
    t2t_prompt: str = "A colleague who read the notes says: {sharer}\n\n{input}"
    max_new_tokens: int = Field(default=48, ge=1, le=2048)
    sharer_max_new_tokens: int = Field(default=64, ge=1, le=2048)
    notes: str = ""
    examples: list[DemoExample] = Field(default_factory=list)


def load_demo_config(path: str | Path = DEFAULT_CONFIG, **overrides: Any) -> DemoConfig:
    """The demo config at `path` with `overrides` (None values ignored); paths become absolute."""
    path = Path(path)
    data = read_yaml(path, "demo config")
    if not isinstance(data, dict):
        raise ConfigError(f"demo config {path}: expected a mapping (receiver:, sharer:, fuser:, ...)")
    base = path.resolve().parent
    for key in ("receiver", "sharer", "fuser", "receiver_adapter", "sharer_adapter"):
        if isinstance(data.get(key), str):
            data[key] = resolve_ref(base, data[key])
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return DemoConfig.model_validate(data)
    except ValidationError as e:
        raise first_error(e, f"demo config {path}") from None


def method_graph(cfg: DemoConfig, method: str, notes: str) -> Graph:
    """The graph that answers with `method`: `receiver` answers, `sharer` (if any) holds `notes`."""
    from agentmesh.graph import Graph

    g = Graph(f"demo_{method}")
    g.model("receiver_model", cfg.receiver, dtype=cfg.dtype, adapter=cfg.receiver_adapter)
    context = notes.strip() or None
    if method == "alone":
        g.agent("receiver", model="receiver_model", prompt=cfg.receiver_prompt, max_new_tokens=cfg.max_new_tokens)
        return g
    g.model("sharer_model", cfg.sharer, dtype=cfg.dtype, adapter=cfg.sharer_adapter)
    if method == "t2t":
        g.agent("sharer", model="sharer_model", context=context, prompt=cfg.sharer_prompt,
                max_new_tokens=cfg.sharer_max_new_tokens)
        g.agent("receiver", model="receiver_model", prompt=cfg.t2t_prompt, max_new_tokens=cfg.max_new_tokens)
        g.text("sharer", "receiver")
    else:
        g.agent("sharer", model="sharer_model", context=context)
        g.agent("receiver", model="receiver_model", prompt=cfg.receiver_prompt, max_new_tokens=cfg.max_new_tokens)
        g.cache("sharer", "receiver", mode="fuse", fuser=cfg.fuser)
    g.outputs = ["receiver"]
    return g


@dataclass
class Column:
    """What one column shows while its method runs."""

    answer: str = ""
    message: str = ""          # the sharer's message (text to text)
    tokens: int = 0
    ttft_s: float | None = None
    latency_s: float | None = None
    bytes: int = 0
    error: str | None = None
    started: float = field(default_factory=time.perf_counter)

    def stats(self) -> str:
        if self.error:
            return f"**error:** {self.error}"
        if self.latency_s is None:
            first = "-" if self.ttft_s is None else f"{self.ttft_s:.2f} s"
            return f"running… first token {first} · {self.tokens} tokens"
        first = "-" if self.ttft_s is None else f"{self.ttft_s:.2f} s"
        return (f"latency **{self.latency_s:.2f} s** · first token **{first}** · "
                f"exchanged **{human_bytes(self.bytes)}** · {self.tokens} tokens")


async def run_method(cfg: DemoConfig, method: str, question: str, notes: str, column: Column,
                     pool: ModelPool | None = None) -> AsyncIterator[None]:
    """Run one method, updating `column` as events come; yields after each update."""
    from agentmesh.runtime.events import AgentFailed, RunFinished, Token
    from agentmesh.runtime.scheduler import stream_graph

    column.started = time.perf_counter()
    try:
        async for event in stream_graph(method_graph(cfg, method, notes), {"input": question}, pool=pool):
            if isinstance(event, Token):
                if event.agent == "receiver":
                    column.tokens += 1
                    if column.ttft_s is None:
                        column.ttft_s = time.perf_counter() - column.started
                    column.answer += event.text
                else:
                    column.message += event.text
            elif isinstance(event, AgentFailed):
                column.error = str(event.error)
            elif isinstance(event, RunFinished):
                result = event.result
                column.latency_s = time.perf_counter() - column.started
                column.bytes = sum(result.trace.bytes_by_edge().values()) if result.trace is not None else 0
                if result.error is not None:
                    column.error = str(result.error)
                elif "receiver" in result.agents:
                    column.answer = result.agents["receiver"].text
            yield
    except AgentMeshError as e:
        column.error = str(e)
        column.latency_s = time.perf_counter() - column.started
        yield


async def answer_all(cfg: DemoConfig, question: str, notes: str, *, one_at_a_time: bool = False,
                     pool: ModelPool | None = None) -> AsyncIterator[dict[str, Column]]:
    """The three columns after every event. Together (default) the three runs share the CPU, so
    each one's timings include the others' work; `one_at_a_time` gives each the machine alone."""
    columns = {m: Column() for m in METHODS}
    if one_at_a_time:
        for m in METHODS:
            async for _ in run_method(cfg, m, question, notes, columns[m], pool):
                yield columns
        return
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def drive(m: str) -> None:
        try:
            async for _ in run_method(cfg, m, question, notes, columns[m], pool):
                queue.put_nowait(m)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.ensure_future(drive(m)) for m in METHODS]
    try:
        running = len(tasks)
        while running:
            if await queue.get() is None:
                running -= 1
            yield columns
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def preload(cfg: DemoConfig, *, pool: ModelPool | None = None, echo: Any = print) -> None:
    """Load the models and check the fuser now, so the first question does not wait for them."""
    from agentmesh.models import default_pool
    from agentmesh.runtime.scheduler import run_graph

    pool = pool if pool is not None else default_pool()
    echo(f"loading {cfg.receiver} and {cfg.sharer} ...")
    for ref, adapter in dict.fromkeys(((cfg.receiver, cfg.receiver_adapter), (cfg.sharer, cfg.sharer_adapter))):
        pool.get(ref, dtype=cfg.dtype, adapter=adapter)
    probe = cfg.model_copy(update={"max_new_tokens": 1})
    result = run_graph(method_graph(probe, "c2c", cfg.notes), {"input": "?"}, pool=pool)
    if result.error is not None:
        raise result.error
    echo("models and fuser ready")


def build_demo(cfg: DemoConfig, *, pool: ModelPool | None = None) -> Any:
    """The Gradio Blocks app (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    def outputs(cols: dict[str, Column]) -> tuple[str, ...]:
        return (cols["alone"].answer, cols["alone"].stats(), cols["t2t"].message, cols["t2t"].answer,
                cols["t2t"].stats(), cols["c2c"].answer, cols["c2c"].stats())

    async def ask(question: str, notes: str, one_at_a_time: bool) -> AsyncIterator[tuple[str, ...]]:
        if not question.strip():
            raise gr.Error("type a question first")
        async for cols in answer_all(cfg, question, notes, one_at_a_time=one_at_a_time, pool=pool):
            yield outputs(cols)

    with gr.Blocks(title=cfg.title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {cfg.title}\nReceiver `{Path(cfg.receiver).name}` · sharer `{Path(cfg.sharer).name}` · "
                    f"fuser `{Path(cfg.fuser).name}`. The sharer holds the notes; the receiver gets the question.")
        with gr.Row():
            question = gr.Textbox(label="Question", lines=2, scale=2, elem_id="question")
            notes = gr.Textbox(label="Sharer's private notes", value=cfg.notes, lines=3, scale=3, elem_id="notes")
        with gr.Row():
            submit = gr.Button("Ask", variant="primary", elem_id="ask")
            one = gr.Checkbox(label="one method at a time (timings without the other two on the CPU)", value=False)
        if cfg.examples:
            gr.Examples([[e.question, e.notes or cfg.notes] for e in cfg.examples], inputs=[question, notes])
        boxes = []
        with gr.Row(equal_height=False):
            for m in METHODS:
                with gr.Column():
                    gr.Markdown(f"### {TITLES[m]}")
                    if m == "t2t":
                        boxes.append(gr.Textbox(label="the sharer's message", lines=3, elem_id="message-t2t"))
                    boxes.append(gr.Textbox(label="answer", lines=4, elem_id=f"answer-{m}"))
                    boxes.append(gr.Markdown(elem_id=f"stats-{m}"))
        submit.click(ask, inputs=[question, notes, one], outputs=boxes, api_name="ask")
        question.submit(ask, inputs=[question, notes, one], outputs=boxes, api_name=False)
    return demo


def theme() -> Any:
    import gradio as gr

    # System fonts only: the default theme would fetch web fonts, and the demo runs offline.
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def launch(demo: Any, *, host: str = "127.0.0.1", port: int | None = None, block: bool = True) -> Any:
    """Serve `demo` on `host:port` (a free port when None); returns what Gradio's launch returns."""
    return demo.queue(default_concurrency_limit=4).launch(
        server_name=host, server_port=port, share=False, inbrowser=False, show_error=True, quiet=not block,
        prevent_thread_lock=not block, ssr_mode=False, theme=theme(), footer_links=[])
