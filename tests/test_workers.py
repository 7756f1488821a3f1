"""Workers: agents on other hosts served over a link, the caller's remote endpoints, and the
`agentmesh worker` / `agentmesh run --broker` commands (marked `mqtt`: a local mosquitto)."""
from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, TypeVar

import pytest
import torch
from torch import nn

from agentmesh.errors import ConfigError, TransportError
from agentmesh.graph import Graph, load_graph
from agentmesh.models.loaded_model import LoadedModel
from agentmesh.models.pool import ModelPool
from agentmesh.runtime import Token, run_graph
from mesh_serving import serving, stop
from buffers import inside
from agentmesh.mesh.envelope import pack, unpack
from agentmesh.mesh.remote import arun_remote
from agentmesh.mesh.settings import broker_config
from agentmesh.mesh.worker import ServedCall, Worker
from agentmesh.transport import InProcessLink, MqttLink
from agentmesh.transport.broker import LocalBroker, find_mosquitto

pytestmark = [pytest.mark.mqtt, pytest.mark.timeout(120)]

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
QUESTION = "How long is the warranty? Answer briefly. "
DOCUMENT = "The Kestrel rover has a three-year warranty; claims go to the service desk. " * 4


def run(aw: Awaitable[T], limit: float = 60.0) -> T:
    """Run a coroutine with a hard wall-clock limit, so a hang fails the test instead of CI."""
    async def bounded() -> T:
        return await asyncio.wait_for(aw, limit)
    return asyncio.run(bounded())


class _Slow(nn.Module):
    """A model that sleeps before each forward, so a run lasts long enough to break the broker under it."""

    def __init__(self, inner: nn.Module, delay: float):
        super().__init__()
        self.inner, self.delay = inner, delay

    @property
    def config(self) -> Any:
        return self.inner.config

    @property
    def generation_config(self) -> Any:
        return self.inner.generation_config

    def get_decoder(self) -> "_Slow":
        """The base model, slowed alike: readings (prefill) run it without the LM head."""
        return _Slow(self.inner.get_decoder(), self.delay)

    def forward(self, **kwargs: Any) -> Any:
        time.sleep(self.delay)
        return self.inner(**kwargs)


@pytest.fixture(scope="module")
def tiny(tiny_model_factory: Any) -> LoadedModel:
    return tiny_model_factory("qwen3", "tiny", seed=0)


@pytest.fixture()
def pool(tiny: LoadedModel, tiny_model_factory: Any) -> ModelPool:
    p = ModelPool()
    p.put("tiny", tiny)
    p.put("tiny2", tiny_model_factory("qwen3", "tiny", seed=1))
    p.put("slow", LoadedModel(name="slow", model=_Slow(tiny.model, 0.05), tokenizer=tiny.tokenizer,
                              signature=tiny.signature, source="test:slow"))
    return p


KEY_ENV = "AGENTMESH_TEST_MESH_KEY"


@pytest.fixture(autouse=True)
def mesh_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key every graph of this module names (`auth: {key_env: ...}`), as each host would export it."""
    monkeypatch.setenv(KEY_ENV, "k3y-for-the-tests-" + "7" * 32)


def edge_cloud(mode: str, url: str, *, doc_model: str = "tiny", timeout_s: float = 10.0, tokens: int = 8) -> Graph:
    """The shape of graphs/edge_cloud.yaml: a reader with a private document on `cloud`, an
    answering agent on `edge`; a prefix cache edge or a text edge between them."""
    g = Graph(f"ec_{mode}")
    g.host("edge")
    g.host("cloud")
    g.agent("doc", model=doc_model, host="cloud", role="You keep the handbook.", context=DOCUMENT,
            **({"prompt": "Quote the warranty facts. {input}", "max_new_tokens": tokens} if mode == "text" else {}))
    g.agent("ask", model="tiny", host="edge", max_new_tokens=tokens)
    if mode == "text":
        g.text("doc", "ask")
    else:
        g.cache("doc", "ask", mode="prefix")
    g.set_broker(url, timeout_s=timeout_s, heartbeat_timeout_s=min(timeout_s, 15.0), start_wait_s=timeout_s)
    g.set_auth(key_env=KEY_ENV)
    return g


# ---- across hosts over a real broker --------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["prefix", "text"])
def test_two_host_run_gives_the_same_tokens_as_one_process(broker: Any, pool: ModelPool, mode: str) -> None:
    g = edge_cloud(mode, broker.url)
    local = run_graph(g, QUESTION, pool=pool)
    assert local.ok, local.error
    served: list[ServedCall] = []

    async def go() -> Any:
        worker, task, link = await serving(g, "cloud", pool, on_served=served.append)
        try:
            return await arun_remote(g, QUESTION, host="edge", pool=pool, timeout=30)
        finally:
            await stop(worker, task, link)

    remote = run(go())
    assert remote.ok, remote.error
    assert remote["ask"].token_ids == local["ask"].token_ids and remote["ask"].text == local["ask"].text
    assert [c.op for c in served if c.ok] == ["load", "reading" if mode == "prefix" else "text"]
    cloud = served[-1]
    if mode == "prefix":
        # The cache crossed the broker: its encoded size (tensors plus token ids, positions and the
        # header) is what the edge carried, a little more than its in-memory size.
        nbytes = local.bytes_by_edge()["doc->ask"]
        assert nbytes < remote.bytes_by_edge()["doc->ask"] < 1.1 * nbytes + 8192
        assert cloud.bytes_out > nbytes and "wire float32" in cloud.detail
        assert remote["ask"].prefilled_tokens == local["ask"].prefilled_tokens  # it continued from the cache
    else:
        assert remote["doc"].token_ids == local["doc"].token_ids
        assert cloud.bytes_out < 20_000  # text, tokens and heartbeats: no cache went anywhere
    # The worker's own steps joined the caller's trace, under the cloud agent.
    assert {s.kind for s in remote.trace.of("doc")} >= ({"read", "transfer"} if mode == "prefix" else {"decode"})


def test_fuse_and_prefix_edges_across_hosts_match_one_process(pool: ModelPool, tiny: LoadedModel,
                                                              tmp_path: Path) -> None:
    """Every way a cache can cross: a remote prefix sender feeding a receiver on its own host (the
    cache never leaves that host), a local sharer fused into a remote receiver (the worker asks the caller for the span
    cache), and a remote sharer fused into a local receiver."""
    from agentmesh.c2c.checkpoints import save_fuser
    from agentmesh.c2c.fuser import Fuser

    torch.manual_seed(0)
    fuser = Fuser.build(tiny.signature, pool.get("tiny2").signature, hidden_dim=16, intermediate_dim=16, dropout=0.0)
    with torch.no_grad():
        for p in fuser.projectors:
            p.key_gate_logit.fill_(1.0)
            p.value_gate_logit.fill_(1.0)
    fdir = str(save_fuser(fuser, tmp_path / "fuser"))
    g = Graph("mixed")
    g.host("a")
    g.host("b")
    g.agent("p", model="tiny", host="b", context="<html>" + "<p>The quick brown fox.</p>" * 8 + "</html>")
    g.agent("w", model="tiny", host="b", max_new_tokens=6)
    g.agent("helper", model="tiny2", host="a", context="a hint")
    g.agent("n", model="tiny", host="b", max_new_tokens=5)
    g.agent("helper2", model="tiny2", host="b", context="another hint")
    g.agent("m", model="tiny", max_new_tokens=5)  # no host: runs wherever the caller is
    g.cache("p", "w", mode="prefix")
    g.cache("helper", "n", mode="fuse", fuser=fdir)
    g.cache("helper2", "m", mode="fuse", fuser=fdir)
    g.set_broker("mqtt://127.0.0.1:1", timeout_s=10)
    g.set_auth(key_env=KEY_ENV)
    local = run_graph(g, QUESTION, pool=pool)
    assert local.ok, local.error

    async def go() -> Any:
        link = InProcessLink(default_timeout=10)
        worker, task, _ = await serving(g, "b", pool, link=link)
        try:
            return await arun_remote(g, QUESTION, host="a", link=link, pool=pool, timeout=30)
        finally:
            await stop(worker, task, link)

    remote = run(go())
    assert remote.ok, remote.error
    for name in ("w", "n", "m"):
        assert remote[name].token_ids == local[name].token_ids, name
    moved = remote.bytes_by_edge()
    assert moved["p->w"] == 0  # p and w both run on host b: the reading stays there
    assert any("kept on host b directly" in (s.detail or "") for s in remote.trace.of("p"))
    for edge in ("helper->n", "helper2->m"):  # one encoded copy each
        assert local.bytes_by_edge()[edge] < moved[edge] < 2 * local.bytes_by_edge()[edge]


def test_broker_restart_during_a_run_and_the_worker_survives_it(pool: ModelPool) -> None:
    try:
        find_mosquitto()
    except TransportError as exc:
        pytest.skip(str(exc))
    with LocalBroker() as own:
        g = edge_cloud("text", own.url, doc_model="slow", timeout_s=10.0, tokens=24)
        local = run_graph(g, QUESTION, pool=pool)
        assert local.ok, local.error and len(local["doc"].token_ids) > 4

        async def go() -> tuple[Any, Any, float, int]:
            worker, task, link = await serving(g, "cloud", pool)
            try:
                streaming = asyncio.Event()

                def on_event(event: Any) -> None:
                    if isinstance(event, Token) and event.agent == "doc":
                        streaming.set()

                t0 = time.monotonic()
                running = asyncio.create_task(arun_remote(g, QUESTION, host="edge", pool=pool, on_event=on_event,
                                                          timeout=40))
                await asyncio.wait_for(streaming.wait(), 20)  # the cloud is decoding right now
                await asyncio.to_thread(own.restart)
                first = await running
                elapsed = time.monotonic() - t0
                second = await arun_remote(g, QUESTION, host="edge", pool=pool, timeout=40)
                return first, second, elapsed, link.reconnects
            finally:
                await stop(worker, task, link)

        first, second, elapsed, reconnects = run(go(), 90)
    assert reconnects >= 1  # the worker's link lost the broker and came back
    assert elapsed < 45  # completed or failed within the run's timeout, never hung
    if first.ok:
        assert first["ask"].token_ids == local["ask"].token_ids
    else:  # allowed: a clear error naming what failed
        assert first.error.agent in ("doc", "ask") and "host" in str(first.error)
    assert second.ok, second.error  # the same worker serves the next run
    assert second["ask"].token_ids == local["ask"].token_ids


def test_a_broker_that_stays_down_fails_the_run_clearly_within_its_timeout(pool: ModelPool) -> None:
    try:
        find_mosquitto()
    except TransportError as exc:
        pytest.skip(str(exc))
    with LocalBroker() as own:
        g = edge_cloud("text", own.url, doc_model="slow", timeout_s=2.0, tokens=40)

        async def go() -> tuple[Any, float]:
            worker, task, link = await serving(g, "cloud", pool)
            try:
                streaming = asyncio.Event()
                t0 = time.monotonic()
                running = asyncio.create_task(arun_remote(
                    g, QUESTION, host="edge", pool=pool, timeout=60,
                    on_event=lambda e: streaming.set() if isinstance(e, Token) and e.agent == "doc" else None))
                await asyncio.wait_for(streaming.wait(), 20)
                await asyncio.to_thread(own.stop)
                result = await running
                return result, time.monotonic() - t0
            finally:
                await stop(worker, task, link)

        result, elapsed = run(go(), 60)
    assert not result.ok and result.error.agent == "doc"
    message = str(result.error)
    assert "agent 'doc' on host 'cloud': the worker went silent for 2 s (heartbeat_timeout_s); not connected to " \
           "the broker" in message
    assert elapsed < 15  # 2 s of silence, then a bounded cancel and release: nowhere near the run's 60 s


def test_a_host_nobody_serves_fails_after_its_start_wait_naming_the_host(broker: Any, pool: ModelPool) -> None:
    g = edge_cloud("prefix", broker.url, timeout_s=1.5)
    waited: list[str] = []
    with pytest.raises(TransportError) as info:
        run(arun_remote(g, QUESTION, host="edge", pool=pool, timeout=30, on_wait=waited.append))
    message = str(info.value)
    assert "host 'cloud': no worker announced itself within 1.5 s" in message
    assert f"start `agentmesh worker FILE.yaml --host cloud --broker {broker.url}`" in message
    assert waited == ["cloud"]  # said once, while it waited


def test_a_worker_with_another_version_of_the_graph_is_refused(pool: ModelPool) -> None:
    worker_graph = edge_cloud("prefix", "mqtt://127.0.0.1:1")
    caller_graph = edge_cloud("prefix", "mqtt://127.0.0.1:1")
    caller_graph.agent("extra", model="tiny", max_new_tokens=2)

    async def go() -> Any:
        link = InProcessLink(default_timeout=10)
        worker, task, _ = await serving(worker_graph, "cloud", pool, link=link)
        try:
            return await arun_remote(caller_graph, QUESTION, host="edge", link=link, pool=pool, timeout=20)
        finally:
            await stop(worker, task, link)

    with pytest.raises(ConfigError, match="another version of graph .* \\(on host 'cloud'\\)"):
        run(go())  # found out when the caller waits for the worker, before any agent runs


def test_envelopes_from_the_network_are_checked() -> None:
    data = pack({"op": "text", "n": 1}, {"past": b"\x01\x02\x03"})
    env = unpack(data)
    assert env.body == {"op": "text", "n": 1} and bytes(env.blobs["past"]) == b"\x01\x02\x03"
    with pytest.raises(TransportError, match="trailing bytes"):
        unpack(data + b"x")
    with pytest.raises(TransportError, match="runs past the end"):
        unpack(data[:-1])
    with pytest.raises(TransportError, match="not an agentmesh envelope"):
        unpack(b"PK\x03\x04" + data[4:])
    with pytest.raises(TransportError, match="shorter than"):
        unpack(b"AMRP")


def test_a_cache_in_an_envelope_decodes_as_views_of_the_received_buffer() -> None:
    from agentmesh.cache.codec import decode_cache, encode_cache
    from agentmesh.cache.kv import KVCache

    shape = (1, 2, 5, 8)
    kv = KVCache(keys=(torch.randn(shape).bfloat16(),), values=(torch.randn(shape).bfloat16(),),
                 positions=torch.arange(5).unsqueeze(0))
    blob = encode_cache(kv, dtype="bf16")

    async def go() -> None:
        async with InProcessLink(default_timeout=5) as link:
            await check(link)

    async def check(link: InProcessLink) -> None:
        ch = "run-1/a->b"
        await link.subscribe(ch)
        # bodies of every length mod 8: the blob must start aligned whatever the JSON's length
        for pad in range(8):
            await link.send(ch, pack({"op": "cache", "ref": "r" * pad}, {"cache": blob}))
            payload = await link.receive(ch)
            env = unpack(payload)
            assert env.body == {"op": "cache", "ref": "r" * pad}
            out = decode_cache(env.blobs["cache"])
            assert torch.equal(out.keys[0], kv.keys[0]) and torch.equal(out.values[0], kv.values[0])
            assert all(inside(t, payload) for t in (*out.keys, *out.values, out.positions)), pad
    run(go())


# ---- the commands ------------------------------------------------------------------------------------------
def test_worker_cli_errors_are_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from agentmesh.mesh.cli import app

    try:
        find_mosquitto()
    except TransportError as exc:
        pytest.skip(str(exc))
    yaml = str(ROOT / "graphs" / "edge_cloud.yaml")
    monkeypatch.delenv("AGENTMESH_KEY", raising=False)
    keyless = CliRunner().invoke(app, ["worker", yaml, "--host", "cloud", "--broker", "mqtt://127.0.0.1:1"])
    assert keyless.exit_code == 2 and "auth.key_env: environment variable AGENTMESH_KEY is not set" in keyless.stderr
    monkeypatch.setenv("AGENTMESH_KEY", "0123456789abcdef0123456789abcdef")
    with LocalBroker(username="cloud", password="correct-horse") as secured:
        monkeypatch.setenv("AGENTMESH_TEST_WORKER_PW", "wrong")
        out = CliRunner().invoke(app, ["worker", yaml, "--host", "cloud", "--broker", secured.url,
                                       "--username", "cloud", "--password-env", "AGENTMESH_TEST_WORKER_PW"])
    assert out.exit_code == 2, out.output
    assert out.stderr.startswith("error: MQTT broker") and "refused the credentials of user 'cloud'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.output
    unknown = CliRunner().invoke(app, ["worker", yaml, "--host", "moon", "--broker", "mqtt://127.0.0.1:1"])
    assert unknown.exit_code == 2 and "declares no host 'moon' (hosts: cloud, edge)" in unknown.stderr


def _read_lines(stream: Any, lines: queue.Queue[str]) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line)


def test_worker_subprocess_serves_a_cli_run_from_another_host(broker: Any, tiny_tokenizer: Any,
                                                              tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from agentmesh.models.tiny import save_tiny_model
    from agentmesh.cli import _mount, app

    _mount()
    save_tiny_model(tmp_path / "model", "qwen3", tiny_tokenizer, seed=0)
    yaml = tmp_path / "ec.yaml"
    yaml.write_text(f"""version: 1
name: ec_sub
models:
  m: {{ref: ./model}}
hosts: {{edge: {{}}, cloud: {{}}}}
broker: {{url: mqtt://127.0.0.1:1, timeout_s: 20}}
auth: {{key_env: {KEY_ENV}}}
agents:
  doc: {{model: m, host: cloud, role: You keep the handbook., context: {json.dumps(DOCUMENT)}}}
  ask: {{model: m, host: edge, max_new_tokens: 8}}
edges:
  - {{from: doc, to: ask, type: cache, mode: prefix}}
inputs: {{input: {json.dumps(QUESTION)}}}
outputs: [ask]
""")
    err = open(tmp_path / "worker.err", "w")  # a file: a pipe nobody reads could fill up and stall the worker
    proc = subprocess.Popen([sys.executable, "-m", "agentmesh.cli", "worker", str(yaml), "--host", "cloud",
                             "--broker", broker.url], stdout=subprocess.PIPE, stderr=err, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        ready = lines.get(timeout=300)
        assert "worker cloud of graph 'ec_sub' serves doc (m)" in ready and broker.url in ready
        out = CliRunner().invoke(app, ["run", str(yaml), "--broker", broker.url, "--host", "edge", "--json"])
        assert out.exit_code == 0, out.output
        data = json.loads(out.stdout)
        served = lines.get(timeout=60) + lines.get(timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        finally:
            err.close()
    assert code == 0, (tmp_path / "worker.err").read_text()
    local = run_graph(load_graph(yaml), pool=ModelPool())
    assert data["ok"] and data["outputs"]["ask"] == local["ask"].text
    assert data["bytes_by_edge"]["doc->ask"] > local.bytes_by_edge()["doc->ask"]  # encoded, over the broker
    assert data["agents"]["ask"]["prefilled_tokens"] == local["ask"].prefilled_tokens
    assert "load doc" in served and "reading doc" in served and "wire float32 - ok" in served
    assert "worker cloud stopped after 2 call(s)" in lines.get(timeout=30)
