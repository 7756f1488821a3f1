"""The graph runtime on tiny random-weight models: scheduling, the three edge kinds, failures,
traces, streaming, chat sessions and the `run`/`chat` commands."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import agentmesh
from agentmesh.c2c.fuser import Fuser
from agentmesh.c2c.model import C2CModel, SharerInput
from agentmesh.graph import Graph, load_graph
from agentmesh.models.inference import GenerationConfig, decode, prefill
from agentmesh.models.loaded_model import LoadedModel
from agentmesh.models.pool import ModelPool
from agentmesh.runtime import AgentFinished, ChatSession, RunFinished, Step, Token, build_plan, run_graph, stream_graph
from agentmesh.models.reading import reading_messages

pytestmark = pytest.mark.timeout(120)


# ---- models ---------------------------------------------------------------------------------------
class Meeting:
    """Where the forwards of the models sharing it wait until `want` of them run at once (after
    that, or after `patience` seconds, nobody waits again): concurrency becomes a count, `peak`,
    instead of something inferred from sleeps and clocks."""

    def __init__(self, patience: float = 30.0):
        self.cond = threading.Condition()
        self.want = 0  # 0: nobody waits
        self.in_flight = 0
        self.peak = 0
        self.done = False
        self.patience = patience

    def enter(self) -> None:
        with self.cond:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            if self.want and not self.done:
                if self.in_flight >= self.want:
                    self.done = True
                    self.cond.notify_all()
                elif not self.cond.wait_for(lambda: self.done, timeout=self.patience):
                    self.done = True  # they never met: the test's assertion on `peak` says so

    def leave(self) -> None:
        with self.cond:
            self.in_flight -= 1


class _Wrapped(nn.Module):
    """A model that counts its forwards (`calls`, `in_flight`), and sleeps before each one, waits at a
    `Meeting`, waits for an event (`hold`: before anything, so a failure can be ordered after another
    model's start), announces that it is in flight (`started`), or raises."""

    def __init__(self, inner: nn.Module, *, delay: float = 0.0, fail: str | None = None,
                 meeting: Meeting | None = None, counts: dict[str, int] | None = None,
                 hold: threading.Event | None = None, started: threading.Event | None = None):
        super().__init__()
        self.inner = inner
        self.delay = delay
        self.fail = fail
        self.meeting = meeting
        self.hold = hold
        self.started = started
        self.counts = counts if counts is not None else {"calls": 0, "in_flight": 0}  # shared with get_decoder()

    @property
    def calls(self) -> int:
        return self.counts["calls"]

    @property
    def in_flight(self) -> int:
        return self.counts["in_flight"]

    @property
    def config(self) -> Any:
        return self.inner.config

    @property
    def generation_config(self) -> Any:
        return self.inner.generation_config

    def get_decoder(self) -> "_Wrapped":
        """The base model, wrapped alike: readings (prefill) run it without the LM head."""
        return _Wrapped(self.inner.get_decoder(), delay=self.delay, fail=self.fail, meeting=self.meeting,
                        counts=self.counts, hold=self.hold, started=self.started)

    def forward(self, **kwargs: Any) -> Any:
        self.counts["calls"] += 1
        if self.fail is not None and self.hold is None:
            raise RuntimeError(self.fail)
        self.counts["in_flight"] += 1
        if self.started is not None:
            self.started.set()
        if self.meeting is not None:
            self.meeting.enter()
        try:
            if self.hold is not None and not self.hold.wait(timeout=60):
                raise RuntimeError("test model: nobody released the hold within 60 s")
            if self.fail is not None:
                raise RuntimeError(self.fail)
            time.sleep(self.delay)
            return self.inner(**kwargs)
        finally:
            self.counts["in_flight"] -= 1
            if self.meeting is not None:
                self.meeting.leave()


def _wrap(lm: LoadedModel, name: str, **kw: Any) -> LoadedModel:
    return LoadedModel(name=name, model=_Wrapped(lm.model, **kw), tokenizer=lm.tokenizer, signature=lm.signature,
                       source=f"test:{name}")


@pytest.fixture(scope="module")
def tiny(tiny_model_factory: Any) -> LoadedModel:
    return tiny_model_factory("qwen3", "tiny", seed=0)


@pytest.fixture(scope="module")
def tiny2(tiny_model_factory: Any) -> LoadedModel:
    return tiny_model_factory("qwen3", "tiny", seed=1)


@pytest.fixture()
def meeting() -> Meeting:
    return Meeting()


@pytest.fixture()
def pool(tiny: LoadedModel, tiny2: LoadedModel, meeting: Meeting) -> ModelPool:
    p = ModelPool()
    p.put("tiny", tiny)
    p.put("tiny2", tiny2)
    p.put("slow", _wrap(tiny2, "slow", meeting=meeting))
    p.put("slow_receiver", _wrap(tiny, "slow_receiver", meeting=meeting))
    p.put("crawl", _wrap(tiny, "crawl", delay=0.05))
    p.put("broken", _wrap(tiny, "broken", fail="boom: forward exploded"))
    return p


def open_fuser(receiver: Any, sharer: Any, *, gate_logit: float) -> Fuser:
    """A small seeded fuser (width 16) whose gates are open (every layer fuses)."""
    torch.manual_seed(0)
    fuser = Fuser.build(receiver, sharer, hidden_dim=16, intermediate_dim=16, dropout=0.0)
    with torch.no_grad():
        for p in fuser.projectors:
            p.key_gate_logit.fill_(gate_logit)
            p.value_gate_logit.fill_(gate_logit)
    return fuser


@pytest.fixture(scope="module")
def fuser_dir(tmp_path_factory: pytest.TempPathFactory, tiny: LoadedModel, tiny2: LoadedModel) -> Path:
    """A small fuser tiny <- tiny2 with open gates, saved in the agentmesh layout."""
    from agentmesh.c2c.checkpoints import save_fuser

    return save_fuser(open_fuser(tiny.signature, tiny2.signature, gate_logit=1.0),
                      tmp_path_factory.mktemp("fusers") / "tiny_from_tiny2")


def _greedy(lm: LoadedModel, ids: list[int], max_new_tokens: int) -> list[int]:
    """The receiver alone on one prompt: transformers' own greedy `generate`, up to its EOS."""
    row = torch.tensor([ids])
    out = lm.model.generate(row, attention_mask=torch.ones_like(row), max_new_tokens=max_new_tokens,
                            do_sample=False, eos_token_id=list(lm.eos_token_ids), pad_token_id=0)
    new = out[0, len(ids):].tolist()
    eos = set(lm.eos_token_ids)
    return new[: next((i for i, t in enumerate(new) if t in eos), len(new))]


def test_an_agent_reads_its_prompt_in_one_pass_like_generate(tiny: LoadedModel) -> None:
    counts = {"calls": 0, "in_flight": 0}
    pool = ModelPool()
    pool.put("counted", _wrap(tiny, "counted", counts=counts))
    g = Graph("one")
    g.agent("w", model="counted", role="You are terse.", max_new_tokens=6)
    r = run_graph(g, "Name a colour.", pool=pool)
    assert r.ok, r.error
    kept = len(r["w"].token_ids)
    picks = kept if kept == 6 else kept + 1  # fewer than 6: it stopped at an EOS, not kept in token_ids
    # one pass for the whole prompt (its logits give the first token), one per later token: as
    # many as `generate` makes, not one more for a last prompt token read on its own
    assert counts["calls"] == picks
    assert r["w"].prefilled_tokens == r["w"].prompt_tokens


# ---- scheduling and text edges ---------------------------------------------------------------------
def test_text_edges_fill_prompts_and_run_in_dependency_order(pool: ModelPool) -> None:
    g = Graph("chain")
    a = g.agent("a", model="tiny", role="You list facts.", max_new_tokens=6)
    b = g.agent("b", model="tiny2", prompt="Facts: {a}\nQuestion: {input}", max_new_tokens=5)
    c = g.agent("c", model="tiny", max_new_tokens=4)
    g.text(a, b)
    g.text(b, c)
    g.text(a, c)
    r = run_graph(g, "What now?", pool=pool)
    assert r.ok, r.error
    assert r.outputs == ("c",)
    assert r.prompts["b"] == f"Facts: {r['a'].text}\nQuestion: What now?"
    # The default template lists each upstream text under a heading, then the input.
    assert f"a wrote:\n{r['a'].text}" in r.prompts["c"] and f"b wrote:\n{r['b'].text}" in r.prompts["c"]
    assert r.prompts["c"].endswith("What now?")
    assert r["a"].end_s <= r["b"].start_s and r["b"].end_s <= r["c"].start_s
    sizes = r.bytes_by_edge()
    assert sizes["a->b"] == len(r["a"].text.encode()) and sizes["b->c"] == len(r["b"].text.encode())
    assert all(res.tokens > 0 for res in r.values())


def test_plan_says_who_decodes_reads_and_shares(fuser_dir: Path) -> None:
    g = Graph("plan")
    g.agent("ctx", model="tiny", context="secret")
    g.agent("helper", model="tiny2", context="hint")
    g.agent("note", model="tiny")
    g.agent("out", model="tiny")
    g.cache("ctx", "out", mode="prefix")
    g.cache("helper", "out", mode="fuse", fuser=str(fuser_dir))
    with pytest.raises(Exception, match="both a prefix edge and fuse edges"):
        build_plan(g)
    g.edges.pop()
    g.cache("helper", "note", mode="fuse", fuser=str(fuser_dir))
    g.text("note", "out")
    plan = build_plan(g)
    assert plan["ctx"].prefix_sender and not plan["ctx"].decode
    assert plan["helper"].shares_with == ("note",) and not plan["helper"].decode
    assert plan["note"].decode and plan["note"].fuse[0].sharer == "helper"
    assert plan["out"].prefix == "ctx" and plan["out"].text_inputs == ("note",)
    assert plan.order.index("note") < plan.order.index("out")


def test_independent_agents_run_concurrently(pool: ModelPool, meeting: Meeting) -> None:
    g = Graph("pair")
    g.agent("x", model="slow", max_new_tokens=3)
    g.agent("y", model="slow", max_new_tokens=3)
    meeting.want = 2
    r = run_graph(g, "go", pool=pool)
    assert r.ok, r.error
    assert meeting.peak == 2  # both prefills were in flight at once
    assert set(r.outputs) == {"x", "y"}
    x, y = r.trace.of("x", "prefill")[0], r.trace.of("y", "prefill")[0]
    assert x.overlaps(y) and x.thread != y.thread


# ---- prefix edges -------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokenizer", ["tiny", "smol"])
def test_prefix_gives_the_same_greedy_tokens_as_one_prompt(pool: ModelPool, tiny_model_factory: Any,
                                                          tokenizer: str) -> None:
    tiny = tiny_model_factory("qwen3", tokenizer, seed=2)
    pool.put("m", tiny)
    g = Graph("pw")
    g.agent("programmer", model="m", role="You are a web programmer.",
            context="<html><body><h1>Bakery</h1><p id=\"intro\"></p></body></html>")
    g.agent("writer", model="m", role="You are a copywriter.", max_new_tokens=12)
    g.cache("programmer", "writer", mode="prefix")
    r = run_graph(g, "Write the intro paragraph.", pool=pool)
    assert r.ok, r.error
    # The receiver never re-read the sender's tokens ...
    sender_tokens = r["programmer"].prompt_tokens
    assert r["writer"].prefilled_tokens == r["writer"].prompt_tokens - sender_tokens
    assert r.bytes_by_edge()["programmer->writer"] > 0
    # ... and generates exactly what one prompt holding the sender's context as text gives.
    messages = [*reading_messages("You are a web programmer.",
                                  "<html><body><h1>Bakery</h1><p id=\"intro\"></p></body></html>"),
                *reading_messages("You are a copywriter.", None),
                {"role": "user", "content": "Write the intro paragraph."}]
    ids = tiny.chat_ids(messages)
    assert len(ids) == r["writer"].prompt_tokens
    assert list(r["writer"].token_ids) == _greedy(tiny, ids, 12)
    assert len(r["writer"].token_ids) > 0


def test_prefix_chain_and_readers_with_text_inputs(pool: ModelPool, tiny: LoadedModel) -> None:
    g = Graph("chain")
    g.agent("a", model="tiny", context="first page")
    g.agent("b", model="tiny", role="second reader", context="second page")
    g.agent("c", model="tiny", max_new_tokens=5)
    g.cache("a", "b", mode="prefix")
    g.cache("b", "c", mode="prefix")
    r = run_graph(g, "Sum up.", pool=pool)
    assert r.ok, r.error
    messages = [*reading_messages(None, "first page"), *reading_messages("second reader", "second page"),
                {"role": "user", "content": "Sum up."}]
    ids = tiny.chat_ids(messages)
    assert r["c"].prompt_tokens == len(ids)
    assert r["c"].prefilled_tokens == len(ids) - r["b"].prompt_tokens
    assert list(r["c"].token_ids) == _greedy(tiny, ids, 5)


# ---- fuse edges -----------------------------------------------------------------------------------------
def test_fuse_edge_matches_c2c_model(pool: ModelPool, tiny: LoadedModel, tiny2: LoadedModel,
                                     fuser_dir: Path) -> None:
    from agentmesh.c2c.checkpoints import load_any

    g = Graph("fused")
    g.agent("helper", model="tiny2", role="You know the page.", context="<p id=intro></p>")
    g.agent("writer", model="tiny", role="You write.", max_new_tokens=10)
    g.cache("helper", "writer", mode="fuse", fuser=str(fuser_dir))
    r = run_graph(g, "Fill the intro.", pool=pool)
    assert r.ok, r.error
    ids = tiny.chat_ids([*reading_messages("You write.", None), {"role": "user", "content": "Fill the intro."}])
    span = ids[:-1]
    sharer_ids = tiny2.chat_ids(list(reading_messages("You know the page.", "<p id=intro></p>")),
                                add_generation_prompt=False) + span
    model = C2CModel(tiny, [tiny2], [load_any(fuser_dir)])
    want = model.generate(torch.tensor([ids]), max_new_tokens=10,
                          sharer_inputs=[SharerInput(torch.tensor([sharer_ids]), torch.ones(1, len(sharer_ids),
                                                                                               dtype=torch.long))])
    eos = set(tiny.eos_token_ids)
    want_ids = want[0].tolist()
    want_ids = want_ids[: next((i for i, t in enumerate(want_ids) if t in eos), len(want_ids))]
    assert list(r["writer"].token_ids) == want_ids
    fuse = r.trace.of("writer", "fuse")
    assert len(fuse) == 1 and fuse[0].tokens == len(span)
    share = r.trace.of("helper", "share")[0]
    assert share.tokens == len(span)  # the helper's own context was read before the span arrived
    assert r.trace.of("helper", "read")[0].end_s <= share.start_s
    moved = r.bytes_by_edge()["helper->writer"]
    sig = tiny2.signature
    assert moved == 2 * sig.num_layers * sig.num_kv_heads * len(span) * sig.head_dim * 4  # K and V, float32
    assert r["helper"].work == "share"


def test_two_sharers_prefill_concurrently_with_the_receiver(pool: ModelPool, meeting: Meeting,
                                                            fuser_dir: Path) -> None:
    g = Graph("two")
    g.agent("s1", model="slow")
    g.agent("s2", model="slow")
    g.agent("r", model="slow_receiver", max_new_tokens=3, fusion="parallel")
    g.cache("s1", "r", mode="fuse", fuser=str(fuser_dir))
    g.cache("s2", "r", mode="fuse", fuser=str(fuser_dir))
    meeting.want = 3
    r = run_graph(g, "Combine.", pool=pool)
    assert r.ok, r.error
    assert meeting.peak == 3  # the receiver's prefill and both sharers' were in flight at once
    s1, s2 = r.trace.of("s1", "share")[0], r.trace.of("s2", "share")[0]
    own = r.trace.of("r", "prefill")[0]
    assert s1.overlaps(s2) and own.overlaps(s1) and own.overlaps(s2), (own, s1, s2)
    assert len({s1.thread, s2.thread, own.thread}) == 3
    fuse = r.trace.of("r", "fuse")[0]
    assert fuse.start_s >= max(s1.end_s, s2.end_s, own.end_s)
    assert fuse.detail and "2 sharer(s)" in fuse.detail
    assert r.trace.of("r", "decode")[0].start_s >= fuse.end_s


def test_sharers_read_their_contexts_before_the_span_exists(pool: ModelPool, meeting: Meeting,
                                                            fuser_dir: Path) -> None:
    g = Graph("two_ctx")
    g.agent("s1", model="slow", context="fact one")
    g.agent("s2", model="slow", context="fact two")
    g.agent("up", model="slow_receiver", max_new_tokens=2)
    g.agent("r", model="tiny", max_new_tokens=3, fusion="sequential")
    g.text("up", "r")
    g.cache("s1", "r", mode="fuse", fuser=str(fuser_dir))
    g.cache("s2", "r", mode="fuse", fuser=str(fuser_dir))
    meeting.want = 3
    r = run_graph(g, "Combine.", pool=pool)
    assert r.ok, r.error
    assert meeting.peak == 3
    read1, read2 = r.trace.of("s1", "read")[0], r.trace.of("s2", "read")[0]
    up = r.trace.of("up", "prefill")[0]
    # Both sharers read their own context while the upstream agent was still working ...
    assert read1.overlaps(read2) and read1.overlaps(up) and read2.overlaps(up)
    # ... so once the receiver's prompt existed, they prefilled only its span.
    span = r["r"].prompt_tokens - 1
    assert [s.tokens for s in r.trace.of(kind="share")] == [span, span]
    assert r["s1"].work == "share" and r["s1"].prompt_tokens == read1.tokens + span


@pytest.fixture(scope="module")
def cross_pair(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> dict[str, Path]:
    """A receiver and a sharer saved to disk with different tokenizers (the tiny BPE and one
    trained on other text), and an open-gate fuser between them."""
    from agentmesh.c2c.checkpoints import save_fuser
    from agentmesh.models.load import load_model
    from agentmesh.models.tiny import save_tiny_model, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("cross")
    other = train_tiny_tokenizer(300, ["Cache to cache: the writer reads the helper's keys and values.",
                                       "Fill the intro paragraph of the landing page, in one sentence."])
    receiver = save_tiny_model(root / "receiver", "qwen3", tiny_tokenizer, seed=0)
    sharer = save_tiny_model(root / "sharer", "llama", other, seed=3)
    r, s = load_model(str(receiver)), load_model(str(sharer))
    assert r.tokenizer.get_vocab() != s.tokenizer.get_vocab()
    return {"receiver": receiver, "sharer": sharer,
            "fuser": save_fuser(open_fuser(r.signature, s.signature, gate_logit=3.0), root / "fuser")}


def _until_eos(tokens: list[int], eos: Any) -> list[int]:
    return tokens[: next((i for i, t in enumerate(tokens) if t in set(eos)), len(tokens))]


def test_cross_tokenizer_fuse_edge_in_a_pipeline_matches_c2c_model_chat(tmp_path: Path,
                                                                        cross_pair: dict[str, Path]) -> None:
    from agentmesh.c2c.checkpoints import load_any
    from agentmesh.graph.load import load_graph

    f = tmp_path / "xtok.yaml"
    f.write_text(f"""version: 1
name: xtok
models:
  r: {{ref: {cross_pair['receiver']}}}
  s: {{ref: {cross_pair['sharer']}}}
agents:
  helper: {{model: s}}
  writer: {{model: r, role: You write., max_new_tokens: 8}}
edges:
  - {{from: helper, to: writer, type: cache, mode: fuse, fuser: {cross_pair['fuser']}}}
inputs: {{input: Fill the intro paragraph.}}
""")
    pool = ModelPool()
    r = run_graph(load_graph(f), pool=pool)
    assert r.ok, r.error
    receiver, sharer = pool.get(str(cross_pair["receiver"])), pool.get(str(cross_pair["sharer"]))
    model = C2CModel(receiver, [sharer], [load_any(cross_pair["fuser"])])
    assert model.shares_vocab == (False,)
    messages = [*reading_messages("You write.", None), {"role": "user", "content": "Fill the intro paragraph."}]
    ids, mask, sharer_inputs = model.encode_chat([messages])
    want = model.generate(ids, mask, sharer_inputs=sharer_inputs, max_new_tokens=8)[0].tolist()
    assert list(r["writer"].token_ids) == _until_eos(want, receiver.eos_token_ids)
    assert r["writer"].text == model.chat(messages, max_new_tokens=8)
    alone = _greedy(receiver, ids[0].tolist(), 8)
    assert list(r["writer"].token_ids) != alone  # the fuser changed the answer: the sharer was read
    # The sharer read its own tokens, up to the last one a fused position reads; only those were sent.
    gather = sharer_inputs[0].gather_index[0]
    used = gather[gather >= 0]
    share = r.trace.of("helper", "share")[0]
    assert share.tokens == int(used.max()) + 1
    sig = sharer.signature
    moved = r.bytes_by_edge()["helper->writer"]
    assert moved == 2 * sig.num_layers * sig.num_kv_heads * (int(used.max()) - int(used.min()) + 1) * sig.head_dim * 4


# ---- failures -----------------------------------------------------------------------------------------
def test_a_prompt_response_fuser_is_refused_by_graph_runs(pool: ModelPool, tiny: LoadedModel, tiny2: LoadedModel,
                                                          tmp_path: Path) -> None:
    from agentmesh.c2c.checkpoints import save_fuser

    fuser = Fuser.build(tiny.signature, tiny2.signature, hidden_dim=8, intermediate_dim=8, fusion="prompt+response")
    path = save_fuser(fuser, tmp_path / "response_fuser")
    g = Graph("response")
    g.agent("helper", model="tiny2")
    g.agent("writer", model="tiny", max_new_tokens=3)
    g.cache("helper", "writer", mode="fuse", fuser=str(path))
    r = run_graph(g, "x", pool=pool)
    assert r.error is not None and r.error.agent == "writer"
    assert "fusion 'prompt+response'" in str(r.error) and "graph runs fuse the prompt only" in str(r.error)


def test_a_failing_agent_ends_the_run_cleanly(pool: ModelPool) -> None:
    g = Graph("fails")
    g.agent("a", model="tiny", max_new_tokens=4)
    g.agent("b", model="broken", max_new_tokens=4)
    g.agent("c", model="tiny", max_new_tokens=4)
    g.agent("d", model="crawl", max_new_tokens=1000)  # independent; ~50 s unless cancelled
    g.text("a", "b")
    g.text("b", "c")
    events: list[Any] = []
    r = run_graph(g, "go", pool=pool, on_event=events.append)
    assert not r.ok
    assert "d" not in r and pool.get("crawl").model.calls < 1000  # d was cancelled, not run to its end
    assert r.error.agent == "b" and "boom: forward exploded" in str(r.error) and "RuntimeError" in str(r.error)
    assert "a" in r and r["a"].tokens > 0      # what finished is kept
    assert "b" not in r and "c" not in r
    assert isinstance(events[-1], RunFinished) and events[-1].result is r
    assert any(type(e).__name__ == "AgentFailed" and e.agent == "b" for e in events)
    with pytest.raises(KeyError, match="the run failed"):
        r["c"]


def test_a_failure_does_not_wait_for_a_busy_thread(pool: ModelPool, tiny: LoadedModel) -> None:
    started, release = threading.Event(), threading.Event()
    stuck = _wrap(tiny, "stuck", hold=release, started=started)       # one forward pass that cannot be interrupted
    pool.put("stuck", stuck)
    pool.put("fails_later", _wrap(tiny, "fails_later", fail="boom: after a started", hold=started))
    g = Graph("busy")
    g.agent("a", model="stuck", max_new_tokens=3)
    g.agent("b", model="fails_later", max_new_tokens=3)
    try:
        r = run_graph(g, "go", pool=pool)
        assert stuck.model.in_flight == 1  # the run ended while a's forward pass was still running
        assert r.error is not None and r.error.agent == "b" and "a" not in r
    finally:
        release.set()


def test_a_failing_sharer_is_named(pool: ModelPool, fuser_dir: Path) -> None:
    pool.put("broken2", _wrap(pool.get("tiny2"), "broken2", fail="sharer died"))
    g = Graph("fails2")
    g.agent("helper", model="broken2")
    g.agent("writer", model="tiny", max_new_tokens=3)
    g.cache("helper", "writer", mode="fuse", fuser=str(fuser_dir))
    r = run_graph(g, "x", pool=pool)
    assert r.error is not None and r.error.agent == "helper" and "sharer died" in str(r.error)


def test_a_missing_model_or_fuser_fails_the_run_with_the_agent_named(pool: ModelPool, tmp_path: Path) -> None:
    g = Graph("missing")
    g.agent("helper", model="tiny2")
    g.agent("writer", model="tiny", max_new_tokens=3)
    g.cache("helper", "writer", mode="fuse", fuser=str(tmp_path / "nowhere"))
    r = run_graph(g, "x", pool=pool)
    assert r.error is not None and r.error.agent == "writer" and "nowhere" in str(r.error)


def test_timeout_stops_the_run(pool: ModelPool) -> None:
    g = Graph("slowpoke")
    g.agent("d", model="crawl", max_new_tokens=1000)
    r = run_graph(g, "go", pool=pool, timeout=0.5)
    assert pool.get("crawl").model.calls < 1000  # stopped, not run to its end
    assert not r.ok and "timed out after 0.5 s" in str(r.error) and r.error.agent == "d"


# ---- trace, events, streaming ---------------------------------------------------------------------------
def test_trace_exports_json_and_chrome(pool: ModelPool, tmp_path: Path) -> None:
    g = Graph("traced")
    g.agent("p", model="tiny", context="page")
    g.agent("w", model="tiny", max_new_tokens=4)
    g.cache("p", "w", mode="prefix")
    r = run_graph(g, "go", pool=pool)
    data = json.loads(r.trace.to_json())
    assert {"read", "transfer", "prefill", "decode"} <= {s["kind"] for s in data["spans"]}
    assert data["bytes_by_edge"]["p->w"] > 0
    chrome = json.loads(r.trace.save_chrome(tmp_path / "t.json").read_text())
    xs = [e for e in chrome["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == len(data["spans"])
    for e in xs:
        assert {"name", "ph", "ts", "dur", "pid", "tid", "args"} <= set(e) and e["dur"] >= 0
    names = {e["args"]["name"] for e in chrome["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {"p", "w"}
    d = r.to_dict()
    assert json.loads(json.dumps(d))["outputs"] == {"w": r["w"].text} and d["ok"] is True


def test_answer_start_is_read_after_the_generation_prompt_and_begins_the_answer(pool: ModelPool, tmp_path: Path,
                                                                             tiny: LoadedModel) -> None:
    g = Graph("started")
    g.agent("w", model="tiny", answer_start='<p id="intro">Welcome to', max_new_tokens=6)

    async def main() -> list[Any]:
        return [e async for e in stream_graph(g, "Write the intro.", pool=pool)]

    events = asyncio.run(main())
    r = events[-1].result
    assert r.ok, r.error
    ids = tiny.chat_ids([{"role": "user", "content": "Write the intro."}]) + tiny.encode('<p id="intro">Welcome to')
    assert r["w"].prompt_tokens == len(ids)
    assert list(r["w"].token_ids) == _greedy(tiny, ids, 6)  # it continued the start it was given
    assert r["w"].text == ('<p id="intro">Welcome to' + tiny.decode(list(r["w"].token_ids))).strip()
    streamed = "".join(e.text for e in events if isinstance(e, Token))
    assert streamed.strip() == r["w"].text  # the start is streamed first
    g.to_yaml(tmp_path / "started.yaml")
    assert load_graph(tmp_path / "started.yaml").agents["w"].answer_start == '<p id="intro">Welcome to'


def test_stream_yields_tokens_then_run_finished(pool: ModelPool) -> None:
    g = Graph("streamed")
    g.agent("w", model="tiny", max_new_tokens=8)

    async def main() -> list[Any]:
        return [e async for e in stream_graph(g, "hello", pool=pool)]

    events = asyncio.run(main())
    assert isinstance(events[-1], RunFinished)
    tokens = [e for e in events if isinstance(e, Token)]
    assert tokens and all(e.agent == "w" for e in tokens)
    finished = next(i for i, e in enumerate(events) if isinstance(e, AgentFinished))
    assert max(i for i, e in enumerate(events) if isinstance(e, Token)) < finished
    assert any(isinstance(e, Step) and e.span.kind == "decode" for e in events)
    result = events[-1].result
    assert "".join(e.text for e in tokens).strip() == result["w"].text


def test_run_works_inside_a_running_loop_and_arun(pool: ModelPool) -> None:
    g = Graph("loop")
    g.agent("w", model="tiny", max_new_tokens=3)

    async def main() -> tuple[Any, Any]:
        inside = agentmesh.run(g, "x", pool=pool)            # sync call from async code: no deadlock
        awaited = await agentmesh.arun(g, "x", pool=pool)
        return inside, awaited

    inside, awaited = asyncio.run(main())
    assert inside.ok and awaited.ok and inside["w"].token_ids == awaited["w"].token_ids


# ---- chat sessions --------------------------------------------------------------------------------------
def test_chat_session_reuses_the_cache_and_matches_a_fresh_run(pool: ModelPool) -> None:
    g = Graph("chat")
    g.agent("p", model="tiny", role="You are a programmer.", context="<html>page</html>")
    g.agent("bot", model="tiny", max_new_tokens=6)
    g.cache("p", "bot", mode="prefix")
    s = ChatSession(g, pool=pool)
    first = s.send("Hello there")
    second = s.send("And then?")
    assert first.ok and second.ok
    bot1, bot2 = first["bot"], second["bot"]
    assert bot2.prompt_tokens > bot1.prompt_tokens
    assert bot2.prefilled_tokens < bot2.prompt_tokens - bot1.prompt_tokens + 2  # only the new turn's tokens
    assert second["p"].prefilled_tokens == 0  # the reader's context was kept from turn 1
    assert s.history["bot"][0] == ("Hello there", bot1.text)
    fresh = run_graph(g, "And then?", pool=pool, history={"bot": [("Hello there", bot1.text)]})
    assert fresh["bot"].token_ids == bot2.token_ids
    assert fresh["bot"].prefilled_tokens > bot2.prefilled_tokens
    s.reset()
    assert s.send("Hello there")["bot"].token_ids == bot1.token_ids


def test_chat_session_fuses_only_new_tokens(pool: ModelPool, fuser_dir: Path) -> None:
    g = Graph("fchat")
    g.agent("helper", model="tiny2", context="hint")
    g.agent("bot", model="tiny", max_new_tokens=5)
    g.cache("helper", "bot", mode="fuse", fuser=str(fuser_dir))
    s = ChatSession(g, pool=pool)
    first, second = s.send("One"), s.send("Two")
    assert first.ok and second.ok, (first.error, second.error)
    span2 = second["bot"].prompt_tokens - 1
    fused = second.trace.of("bot", "fuse")[0]
    assert 0 < fused.tokens < span2
    assert second.trace.of("helper", "share")[0].tokens == fused.tokens
    fresh = run_graph(g, "Two", pool=pool, history={"bot": [("One", first["bot"].text)]})
    assert fresh.trace.of("bot", "fuse")[0].tokens == span2
    assert fresh["bot"].token_ids == second["bot"].token_ids


# ---- command line ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    from agentmesh.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3", "qwen3", tiny_tokenizer, seed=0)


def _pipeline(tmp_path: Path, tiny_dir: Path) -> Path:
    f = tmp_path / "p.yaml"
    f.write_text(f"""version: 1
name: cli_demo
models:
  t: {{ref: {tiny_dir}}}
agents:
  p: {{model: t, context: "<p id=intro></p>"}}
  w: {{model: t, max_new_tokens: 5}}
edges:
  - {{from: p, to: w, type: cache, mode: prefix}}
inputs: {{input: Write.}}
""")
    return f


def test_cli_run_json_and_trace(tmp_path: Path, tiny_dir: Path) -> None:
    from typer.testing import CliRunner

    from agentmesh.runtime.cli import app

    f = _pipeline(tmp_path, tiny_dir)
    out = CliRunner().invoke(app, ["run", str(f), "--json", "--trace", str(tmp_path / "trace.json")])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["ok"] and set(data["outputs"]) == {"w"} and data["bytes_by_edge"]["p->w"] > 0
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    plain = CliRunner().invoke(app, ["run", str(f), "--input", "Other words."])
    assert plain.exit_code == 0, plain.output
    assert "p->w" in plain.stdout and "latency" in plain.stdout
    piped = CliRunner().invoke(app, ["run", str(f), "--input", "-", "--stream", "--json"], input="From stdin.")
    assert piped.exit_code == 0 and json.loads(piped.stdout)["ok"]
    streamed = CliRunner().invoke(app, ["run", str(f), "--stream"])
    assert streamed.exit_code == 0 and streamed.stdout.startswith("w: ")


def test_cli_run_failure_is_one_line_and_exit_2(tmp_path: Path, tiny_dir: Path) -> None:
    from typer.testing import CliRunner

    from agentmesh.runtime.cli import app

    f = tmp_path / "f.yaml"
    f.write_text(f"""version: 1
name: nofuser
models:
  t: {{ref: {tiny_dir}}}
agents:
  s: {{model: t}}
  w: {{model: t, max_new_tokens: 3}}
edges:
  - {{from: s, to: w, type: cache, mode: fuse, fuser: ./missing_fuser}}
""")
    out = CliRunner().invoke(app, ["run", str(f), "--input", "x"])
    assert out.exit_code == 2
    assert out.stderr.startswith("error: agent w failed:") and "missing_fuser" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.output


def test_cli_errors_are_one_line_with_exit_2(tmp_path: Path, tiny_dir: Path) -> None:
    from typer.testing import CliRunner

    from agentmesh.runtime.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: bad\nagents: {a: {}}\nedges: [{from: a, to: ghost}]\n")
    out = CliRunner().invoke(app, ["run", str(bad)])
    assert out.exit_code == 2
    assert "ghost" in out.stderr and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.output
    missing = CliRunner().invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "nope.yaml" in missing.stderr


def test_cli_chat_keeps_history(tmp_path: Path, tiny_dir: Path) -> None:
    from typer.testing import CliRunner

    from agentmesh.runtime.cli import app

    f = _pipeline(tmp_path, tiny_dir)
    out = CliRunner().invoke(app, ["chat", str(f)], input="first\nsecond\nexit\nnever\n")
    assert out.exit_code == 0, out.output
    answers = [line for line in out.stdout.splitlines() if line.startswith("w:")]
    assert len(answers) == 2


# ---- caches over a link -----------------------------------------------------------------------------------
@pytest.mark.parametrize("wire", [None, "int8"])
def test_linked_endpoint_sends_caches_over_a_link_and_counts_wire_bytes(pool: ModelPool, fuser_dir: Path,
                                                                      wire: str | None) -> None:
    from agentmesh.runtime import make_endpoints
    from agentmesh.mesh.linked import LinkedEndpoint
    from agentmesh.transport import InProcessLink

    g = Graph("linked")
    g.agent("p", model="tiny", context="<html>" + "<p>The quick brown fox jumps.</p>" * 20 + "</html>")
    g.agent("helper", model="tiny2", context="hint")
    g.agent("w", model="tiny", max_new_tokens=6)
    g.agent("n", model="tiny", max_new_tokens=4)
    g.cache("p", "w", mode="prefix")
    g.cache("helper", "n", mode="fuse", fuser=str(fuser_dir))
    question = "Please answer the question step by step. " * 10
    local = run_graph(g, question, pool=pool)

    async def main() -> Any:
        async with InProcessLink(default_timeout=30) as link:
            endpoints = make_endpoints(build_plan(g), pool)
            for name in ("p", "helper"):
                endpoints[name] = LinkedEndpoint(endpoints[name], link, wire_dtype=wire)
            return await agentmesh.arun(g, question, endpoints=endpoints)

    linked = asyncio.run(main())
    assert linked.ok, linked.error
    sizes, in_process = linked.bytes_by_edge(), local.bytes_by_edge()
    assert len(linked.trace.of(kind="transfer")) == 2
    for edge in ("p->w", "helper->n"):
        if wire is None:   # lossless: the tensor bytes plus token ids, positions, mask and the header
            assert in_process[edge] < sizes[edge] < 1.1 * in_process[edge] + 8192
        else:              # int8: a quarter of the float32 tensor bytes, plus scales, token ids and the header
            assert sizes[edge] < in_process[edge] / 2
    if wire is None:
        assert linked["w"].token_ids == local["w"].token_ids and linked["n"].token_ids == local["n"].token_ids


def test_load_time_is_reported_apart_from_run_time():
    from agentmesh.runtime.display import footer
    from agentmesh.runtime.result import RunResult
    from agentmesh.runtime.trace import Trace

    tr = Trace("t")
    tr.record("a", "load", 0.0, 4.0)
    tr.record("b", "load", 1.0, 5.0)   # overlaps a's load: counts once
    tr.record("a", "decode", 5.0, 7.0)
    tr.record("c", "load", 8.0, 9.0)
    assert tr.load_s == pytest.approx(6.0)
    result = RunResult(graph="t", trace=tr, latency_s=10.0, load_s=tr.load_s)
    assert result.run_s == pytest.approx(4.0)
    d = result.to_dict()
    assert (d["latency_s"], d["load_s"], d["run_s"]) == (10.0, 6.0, 4.0)
    assert tr.to_chrome()["otherData"]["load_s"] == 6.0
    assert "run 4.00 s + model loading 6.00 s = 10.00 s" in footer(result)
