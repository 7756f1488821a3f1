"""Attacks on runs across hosts, against a real mosquitto on loopback: forged, replayed, stale and
unauthorised messages are dropped and counted, never executed; runs without a key refuse to start;
private context never crosses the broker."""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from torch import nn

from agentmesh.errors import ConfigError, GraphError
from agentmesh.graph import Graph
from agentmesh.mesh.auth import Guard, cipher_key, make_guard, private_key_text, public_key_text
from agentmesh.mesh.envelope import LinkControlSeal, inbox_channel, pack, seal_link_control, unpack
from agentmesh.mesh.remote import arun_remote
from agentmesh.mesh.settings import broker_config, graph_digest
from agentmesh.mesh.worker import Worker
from agentmesh.models.loaded_model import LoadedModel
from agentmesh.models.pool import ModelPool
from agentmesh.runtime import Token, run_graph
from agentmesh.transport import BrokerConfig, InProcessLink, MqttLink
from agentmesh.transport.frames import ack_message, nack_message
from mesh_serving import serving, stop

pytestmark = [pytest.mark.mqtt, pytest.mark.timeout(120)]

T = TypeVar("T")
GRAPHS = Path(__file__).resolve().parents[1] / "graphs"
KEY = b"the-shared-key-of-these-tests-0123456789"
KEY_ENV = "AGENTMESH_TEST_SECURITY_KEY"
QUESTION = "How long is the warranty? Answer briefly. "
SECRET = ("Internal note 7731: the Kestrel rover battery warranty is thirty-one months; "
          "claims go to desk QX-4 on the second floor. ") * 3


def run(aw: Awaitable[T], limit: float = 60.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(aw, limit)
    return asyncio.run(bounded())


async def until(check: Callable[[], bool], limit: float = 10.0) -> None:
    """Wait for `check()` to hold (an event, polled), failing after `limit` s."""
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("the expected state never came")
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def pool(tiny_model_factory: Any) -> ModelPool:
    p = ModelPool()
    tiny: LoadedModel = tiny_model_factory("qwen3", "tiny", seed=0)
    p.put("tiny", tiny)
    p.put("tiny2", tiny_model_factory("qwen3", "tiny", seed=1))
    p.put("slow", LoadedModel(name="slow", model=_Slow(tiny.model, 0.05), tokenizer=tiny.tokenizer,
                              signature=tiny.signature, source="test:slow"))
    return p


class _Slow(nn.Module):
    """A model that sleeps before each forward, so a call lasts long enough to fault under it."""

    def __init__(self, inner: nn.Module, delay: float):
        super().__init__()
        self.inner, self.delay = inner, delay
        self.config, self.generation_config = inner.config, inner.generation_config

    def get_decoder(self) -> Any:
        return self.inner.get_decoder()

    def forward(self, **kwargs: Any) -> Any:
        time.sleep(self.delay)
        return self.inner(**kwargs)


@pytest.fixture(autouse=True)
def mesh_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY.decode())


def edge_cloud(url: str, *, auth: bool = True, mode: str = "prefix", doc_model: str = "tiny", tokens: int = 6,
               encrypt: bool = False, **broker: Any) -> Graph:
    g = Graph(f"sec_{mode}")
    g.host("edge")
    g.host("cloud")
    g.agent("doc", model=doc_model, host="cloud", role="You keep the handbook.", context=SECRET,
            **({"prompt": "Quote the warranty facts. {input}", "max_new_tokens": tokens} if mode == "text" else {}))
    g.agent("ask", model="tiny", host="edge", max_new_tokens=6)
    if mode == "text":
        g.text("doc", "ask")
    else:
        g.cache("doc", "ask", mode="prefix")
    g.set_broker(url, **{"timeout_s": 10, **broker})
    if auth:
        g.set_auth(key_env=KEY_ENV, encrypt=encrypt)
    return g


def test_forged_replayed_stale_and_unauthorised_requests_are_dropped_and_counted(broker: Any,
                                                                                pool: ModelPool) -> None:
    g = edge_cloud(broker.url)
    inbox = inbox_channel("cloud")

    def request(call: str, reply: str) -> dict[str, Any]:
        return {"op": "load", "call": call, "run": "r1", "agent": "doc", "reply": reply, "heartbeat_s": 5.0,
                "graph": graph_digest(g)}

    async def go() -> tuple[Worker, list[str]]:
        worker, task, link = await serving(g, "cloud", pool)
        try:
            async with MqttLink(broker_config(g), graph=g.name) as attacker:  # anonymous, like any broker client
                reply = "r1/doc->edge"
                await attacker.subscribe(reply)
                edge = Guard(KEY, "edge", g.name)
                forged = {
                    "unsigned": pack(request("c-unsigned", reply)),
                    "bad_seal": pack(request("c-wrong-key", reply), guard=Guard(b"w" * 32, "edge", g.name),
                                     channel=inbox),
                    "unauthorised": pack(request("c-intruder", reply), guard=Guard(KEY, "intruder", g.name),
                                         channel=inbox),
                    "stale": pack(request("c-stale", reply), guard=Guard(KEY, "edge", g.name,
                                                                          clock=lambda: time.time() - 3600),
                                  channel=inbox),
                    "other_channel": pack(request("c-moved", reply), guard=edge, channel=inbox_channel("edge")),
                    "malformed": b"\x00" * 64,
                }
                genuine = pack(request("c-genuine", reply), guard=edge, channel=inbox)
                for payload in forged.values():
                    await attacker.send(inbox, payload)
                await attacker.send(inbox, genuine)
                await attacker.send(inbox, genuine)  # the same bytes again: a replay
                kinds = []
                while len(kinds) < 2:  # ack and result of the one genuine call
                    env = unpack(await attacker.receive(reply, timeout=20), guard=Guard(KEY, "edge", g.name),
                                 channel=reply)
                    assert env.sender == "cloud" and env.get("call") == "c-genuine"
                    kinds.append(env.get("kind"))
                await until(lambda: sum(worker.dropped.values()) == 7)
                return worker, kinds
        finally:
            await stop(worker, task, link)

    worker, kinds = run(go())
    assert kinds == ["ack", "result"]
    assert worker.served == 1  # only the genuine call ran
    assert worker.dropped == {"unsigned": 1, "bad_seal": 2, "unauthorised": 1, "stale": 1, "replayed": 1,
                              "malformed": 1}


def test_runs_across_hosts_without_a_key_refuse_to_start_unless_insecure(broker: Any, pool: ModelPool) -> None:
    g = edge_cloud(broker.url, auth=False)
    with pytest.raises(ConfigError, match="has no key to authenticate messages between hosts"):
        run(arun_remote(g, QUESTION, host="edge", pool=pool))
    with pytest.raises(ConfigError, match="--insecure"):
        Worker(g, "cloud", MqttLink(broker_config(g), graph=g.name), pool=pool)

    async def go() -> Any:
        worker, task, link = await serving(g, "cloud", pool, insecure=True)
        try:
            return await arun_remote(g, QUESTION, host="edge", pool=pool, insecure=True, timeout=30)
        finally:
            await stop(worker, task, link)

    result = run(go())
    assert result.ok, result.error
    assert result["ask"].token_ids == run_graph(g, QUESTION, pool=pool)["ask"].token_ids


def test_a_caller_the_pipeline_does_not_allow_is_refused_before_it_sends(broker: Any, pool: ModelPool) -> None:
    g = edge_cloud(broker.url)
    with pytest.raises(ConfigError, match="host 'cloud' serves runs only from edge, not from 'client'"):
        run(arun_remote(g, QUESTION, pool=pool))  # a pure client: the file lets only the edge call the cloud
    g.hosts["cloud"] = type(g.hosts["cloud"])(callers=("edge", "client"))
    assert g.hosts["cloud"].callers == ("edge", "client")


@pytest.mark.parametrize("mode", ["prefix", "text"])
def test_private_context_never_crosses_the_broker(broker: Any, pool: ModelPool, mode: str) -> None:
    """A passive subscriber to every topic sees no byte sequence of the cloud's private context."""
    result, seen = _overheard_run(edge_cloud(broker.url, mode=mode), pool)
    assert result.ok, result.error
    wire = b"\n".join(seen)
    assert len(seen) > 3 and len(wire) > 1000  # the run did cross the broker
    # The links' acknowledgements went as sealed envelopes (chunk frames start b"AMC2"), none as bare JSON.
    assert any(p.startswith(b"AMRP") for p in seen) and not [p for p in seen if p.startswith(b"{")]
    secret = SECRET.encode()
    leaks = [secret[i:i + 12] for i in range(0, len(secret) - 12) if secret[i:i + 12] in wire]
    assert not leaks, leaks[:3]


def test_a_run_started_before_its_worker_waits_for_it_then_runs(broker: Any, pool: ModelPool) -> None:
    g = edge_cloud(broker.url)
    waited: list[str] = []
    asked = asyncio.Event()

    def on_wait(host: str) -> None:
        waited.append(host)
        asked.set()

    async def go() -> Any:
        running = asyncio.create_task(arun_remote(g, QUESTION, host="edge", pool=pool, timeout=60, on_wait=on_wait))
        await asyncio.wait_for(asked.wait(), 20)  # the caller is waiting: only now does the worker start
        worker, task, link = await serving(g, "cloud", pool)
        try:
            return await running
        finally:
            await stop(worker, task, link)

    result = run(go())
    assert result.ok, result.error
    assert waited == ["cloud"]
    assert result["ask"].token_ids == run_graph(g, QUESTION, pool=pool)["ask"].token_ids


def test_a_worker_that_dies_mid_call_is_detected_within_the_heartbeat_timeout(broker: Any,
                                                                              pool: ModelPool) -> None:
    g = edge_cloud(broker.url, mode="text", doc_model="slow", tokens=200, heartbeat_timeout_s=1.5)

    async def go() -> tuple[Any, float]:
        worker, task, link = await serving(g, "cloud", pool)
        decoding = asyncio.Event()
        running = asyncio.create_task(arun_remote(
            g, QUESTION, host="edge", pool=pool, timeout=60,
            on_event=lambda e: decoding.set() if isinstance(e, Token) and e.agent == "doc" else None))
        await asyncio.wait_for(decoding.wait(), 20)
        task.cancel()  # the worker process dies: no error reply, no more heartbeats
        await asyncio.gather(task, return_exceptions=True)
        await link.close()
        died = time.monotonic()
        result = await running
        return result, time.monotonic() - died

    result, after = run(go())
    assert not result.ok and result.error.agent == "doc"
    assert "agent 'doc' on host 'cloud': the worker went silent for 1.5 s (heartbeat_timeout_s)" in str(result.error)
    assert after < 1.5 + 5  # the heartbeat timeout, then a bounded cancel and release


def _rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_a_flood_of_forged_messages_is_dropped_with_bounded_memory(broker: Any, pool: ModelPool) -> None:
    """1,000 forged or garbage messages (~160 MB) at a worker whose link may hold 32 MiB: nothing
    runs, memory stays bounded, and the worker still serves a genuine run afterwards."""
    limit = 32 << 20
    g = edge_cloud(broker.url, max_buffered_bytes=limit)
    inbox = inbox_channel("cloud")

    async def go() -> tuple[Worker, int, Any, Any]:
        worker, task, link = await serving(g, "cloud", pool)
        try:
            async with MqttLink(broker_config(g), graph=g.name) as attacker:
                base = _rss_bytes()
                big = pack({"op": "text", "call": "x", "run": "r", "agent": "doc", "reply": "r/x->y"},
                           {"past": bytes(200 << 10)})
                for i in range(1000):
                    payload = big if i % 3 else b"\xff" * (64 << 10)
                    await attacker.send(inbox, payload)
                stats = lambda: link.stats().get(inbox)  # noqa: E731
                await until(lambda: stats() is not None and stats().chunks_received + stats().dropped_chunks
                            >= 1000, limit=60)
                await until(lambda: sum(worker.dropped.values()) >= stats().chunks_received, limit=30)
                grown = _rss_bytes() - base
            result = await arun_remote(g, QUESTION, host="edge", pool=pool, timeout=30)
            return worker, grown, stats(), result
        finally:
            await stop(worker, task, link)

    worker, grown, stats, result = run(go(), 120)
    assert worker.served == 2 and result.ok, result.error  # only the genuine run's load and reading
    assert worker.dropped == {"unsigned": 666, "malformed": 334}  # every forgery counted, none executed
    assert stats.chunks_received + stats.dropped_chunks >= 1000
    assert grown < 2 * limit + (32 << 20), f"RSS grew by {grown / 1e6:.0f} MB"


def test_a_worker_over_its_limits_refuses_calls_with_a_clear_reply(broker: Any, pool: ModelPool) -> None:
    g = edge_cloud(broker.url)

    async def go() -> Any:
        worker, task, link = await serving(g, "cloud", pool, max_request_bytes=64)
        try:
            return await arun_remote(g, QUESTION, host="edge", pool=pool, timeout=30), worker
        finally:
            await stop(worker, task, link)

    result, worker = run(go())
    assert not result.ok and result.error.agent == "doc"
    assert "host 'cloud' is busy" in str(result.error) and "max_request_bytes 64" in str(result.error)
    assert worker.served == 0 and worker.dropped.get("busy", 0) >= 1


class _LosesFirstResult(InProcessLink):
    """A link that loses the first result a worker sends, as a broker restart can lose a queued reply."""

    lost = 0

    async def send(self, channel: str, payload: Any, **kw: Any) -> str:
        if not channel.startswith("host/") and not self.lost and unpack(payload).get("kind") == "result":
            self.lost += 1
            return "lost"
        return await super().send(channel, payload, **kw)


def test_a_lost_result_is_sent_again_until_the_caller_confirms_it(pool: ModelPool) -> None:
    g = edge_cloud("mqtt://127.0.0.1:1", heartbeat_timeout_s=2.0)

    async def go() -> tuple[Any, Worker]:
        link = _LosesFirstResult(default_timeout=10)
        worker = Worker(g, "cloud", link, pool=pool)
        ready = asyncio.Event()
        task = asyncio.create_task(worker.serve(ready=ready.set))
        await asyncio.wait_for(ready.wait(), 10)
        try:
            return await arun_remote(g, QUESTION, host="edge", link=link, pool=pool, timeout=30), worker
        finally:
            worker.stop()
            await asyncio.wait_for(task, 5)

    result, worker = run(go())
    assert result.ok, result.error
    assert worker.resent >= 1 and worker.served == 2
    assert result["ask"].token_ids == run_graph(g, QUESTION, pool=pool)["ask"].token_ids


HOST_KEY_ENV = "AGENTMESH_TEST_EDGE_KEY"


def host_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *names: str) -> dict[str, dict[str, str]]:
    """A signing key for each host: the first in an environment variable, the others in key files
    (mode 600); the `auth: hosts:` table naming them."""
    table: dict[str, dict[str, str]] = {}
    for i, name in enumerate(names):
        key = Ed25519PrivateKey.generate()
        if i == 0:
            monkeypatch.setenv(HOST_KEY_ENV, private_key_text(key))
            table[name] = {"key_env": HOST_KEY_ENV, "public_key": public_key_text(key)}
        else:
            path = tmp_path / f"{name}.key"
            path.write_text(private_key_text(key) + "\n")
            path.chmod(0o600)
            table[name] = {"key_file": str(path), "public_key": public_key_text(key)}
    return table


def with_host_keys(g: Graph, table: dict[str, dict[str, str]], *, pipeline_key: bool = True,
                   encrypt: bool = False) -> Graph:
    g.host("lab")  # a third host of the pipeline, with its own key, that the cloud does not serve
    g.set_auth(key_env=KEY_ENV if pipeline_key else None, hosts=table, encrypt=encrypt)
    return g


def test_a_host_with_its_own_key_cannot_be_impersonated_by_another_host(broker: Any, pool: ModelPool,
                                                                         tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The lab holds its own key and the pipeline key; whatever it seals claiming to be the edge
    (with its key, the pipeline key, or its key under the edge's name) is dropped and counted;
    a genuine run, signed by the edge and answered signed by the cloud, gives the local tokens."""
    g = with_host_keys(edge_cloud(broker.url), host_keys(tmp_path, monkeypatch, "edge", "cloud", "lab"))
    inbox = inbox_channel("cloud")
    lab = make_guard(g, "lab")
    assert lab.signer is not None and lab.key == KEY

    def request(call: str) -> dict[str, Any]:
        return {"op": "load", "call": call, "run": "r1", "agent": "doc", "reply": "r1/doc->edge",
                "heartbeat_s": 5.0, "graph": graph_digest(g)}

    def as_edge_signed_by_lab(body: dict[str, Any]) -> bytes:
        # The lab's signature with the edge's name in the trailer and in the body.
        impostor = Guard(None, "edge", g.name, signer=lab.signer, publics=lab.publics)
        return pack(body, guard=impostor, channel=inbox)

    async def go() -> tuple[Worker, Any]:
        worker, task, link = await serving(g, "cloud", pool)
        try:
            async with MqttLink(broker_config(g), graph=g.name) as attacker:
                forged = [
                    pack(request("c-lab-key"), guard=Guard(KEY, "edge", g.name, publics=lab.publics),
                         channel=inbox),  # the pipeline key
                    pack({**request("c-lab-claims"), "x": 1}, guard=lab, channel=inbox),  # as itself: not allowed
                    as_edge_signed_by_lab(request("c-lab-as-edge")),
                ]
                # The lab's own signature, the edge named only in the body.
                body = pack(request("c-lab-body"), guard=Guard(None, "lab", g.name, signer=lab.signer,
                                                               publics=lab.publics), channel=inbox)
                forged.append(body.replace(b'"from":"lab"', b'"from":"edge"'))
                for payload in forged:
                    await attacker.send(inbox, payload)
                await until(lambda: sum(worker.dropped.values()) == len(forged))
            result = await arun_remote(g, QUESTION, host="edge", pool=pool, timeout=30)
            return worker, result
        finally:
            await stop(worker, task, link)

    worker, result = run(go())
    assert result.ok, result.error
    assert result["ask"].token_ids == run_graph(g, QUESTION, pool=pool)["ask"].token_ids
    assert worker.served == 2  # the genuine run's load and reading; no forgery ran
    assert worker.dropped == {"wrong_key": 1, "unauthorised": 1, "bad_seal": 2}


def test_a_reply_from_a_host_with_its_own_key_must_carry_its_signature(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    g = with_host_keys(edge_cloud("mqtt://127.0.0.1:1"), host_keys(tmp_path, monkeypatch, "edge", "cloud"),
                       pipeline_key=False)
    edge, cloud = make_guard(g, "edge"), make_guard(g, "cloud")
    assert edge.key is None and edge.seal_kind == "signed"
    channel = "r1/doc->edge"
    genuine = unpack(pack({"kind": "ack"}, guard=cloud, channel=channel), guard=edge, channel=channel)
    assert genuine.sender == "cloud"
    forged = Guard(None, "cloud", g.name, signer=edge.signer, publics=edge.publics)  # the edge's key, the cloud's name
    with pytest.raises(Exception, match="wrong signature for 'cloud'"):
        unpack(pack({"kind": "result"}, guard=forged, channel=channel), guard=edge, channel=channel)
    with pytest.raises(ConfigError, match="host 'lab' has no key: the pipeline file gives keys to cloud, edge only"):
        make_guard(g, "lab")
    assert edge.dropped == {"bad_seal": 1}


def test_host_keys_are_named_in_the_file_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = host_keys(tmp_path, monkeypatch, "edge", "cloud")
    g = with_host_keys(edge_cloud("mqtt://127.0.0.1:1"), table)
    (tmp_path / "cloud.key").chmod(0o644)
    with pytest.raises(ConfigError, match=r"cloud.key can be read by other users \(mode 644\)"):
        make_guard(g, "cloud")
    (tmp_path / "cloud.key").chmod(0o600)
    wrong = dict(table, cloud={**table["cloud"], "public_key": table["edge"]["public_key"]})
    with pytest.raises(ConfigError, match="does not match the file's public_key"):
        make_guard(with_host_keys(edge_cloud("mqtt://127.0.0.1:1"), wrong), "cloud")
    secret = os.environ[HOST_KEY_ENV]
    with pytest.raises(GraphError, match="auth.hosts.edge.key: a key must not be written in a pipeline file") as e:
        g.set_auth(hosts={"edge": {"key": secret, "public_key": table["edge"]["public_key"]}})
    assert secret not in str(e.value)
    with pytest.raises(GraphError, match="is not an Ed25519 public key"):
        g.set_auth(hosts={"edge": {"key_env": HOST_KEY_ENV, "public_key": "abc"}})
    yaml = tmp_path / "keys.yaml"
    yaml.write_text(f"""version: 1
name: keyed
hosts: {{edge: {{}}}}
auth:
  hosts:
    edge: {{key: {secret}, public_key: {table["edge"]["public_key"]}}}
agents: {{a: {{host: edge}}}}
""")
    from agentmesh.graph import load_graph, validate_graph
    with pytest.raises(GraphError, match=r"keys.yaml:6: auth.hosts.edge.key: a key must not be written") as e:
        load_graph(yaml)
    assert secret not in str(e.value)
    yaml.write_text(yaml.read_text().replace(f"key: {secret}", f"key_env: {HOST_KEY_ENV}"))
    assert make_guard(load_graph(yaml), "edge").seal_kind == "signed"
    g.set_auth(key_env=KEY_ENV, hosts={"moon": table["edge"]})
    with pytest.raises(GraphError, match="auth.hosts.moon: host 'moon' is not declared"):
        validate_graph(g)


def test_keygen_writes_a_private_key_file_and_prints_the_lines_for_the_file(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from agentmesh.mesh.auth import parse_private_key
    from agentmesh.mesh.cli import app

    path = tmp_path / "edge.key"
    out = CliRunner().invoke(app, ["keygen", str(path), "--host", "edge"])
    assert out.exit_code == 0, out.output
    assert path.stat().st_mode & 0o777 == 0o600
    key = parse_private_key(path.read_bytes().strip(), str(path))
    assert f"edge: {{key_file: {path}, public_key: {public_key_text(key)}}}" in out.stdout
    assert path.read_text().strip() not in out.output  # the secret is written to the file only
    again = CliRunner().invoke(app, ["keygen", str(path)])
    assert again.exit_code == 2 and "exists; keygen never overwrites a key" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def _overheard_run(g: Graph, pool: ModelPool) -> tuple[Any, list[bytes]]:
    """Run `g` from the edge with the cloud's worker in this process, while a passive subscriber
    to every topic of its broker records each message; returns (result, the messages' payloads)."""
    broker_url = g.broker.url if g.broker is not None else ""
    host, port = broker_url.removeprefix("mqtt://").split(":")
    seen: list[bytes] = []

    async def go() -> Any:
        async with aiomqtt.Client(host, int(port), identifier="eavesdropper") as spy:
            await spy.subscribe("agentmesh/#")

            async def listen() -> None:
                async for message in spy.messages:
                    seen.append(bytes(message.payload))  # type: ignore[arg-type]

            listening = asyncio.create_task(listen())
            worker, task, link = await serving(g, "cloud", pool)
            try:
                return await arun_remote(g, QUESTION, host="edge", pool=pool, timeout=30)
            finally:
                await stop(worker, task, link)
                await asyncio.sleep(0.2)
                listening.cancel()

    return run(go()), seen


def _eavesdropped_run(g: Graph, pool: ModelPool, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, bytes, list[bytes]]:
    """`_overheard_run`, also recording the cache payloads the worker encoded; returns (result,
    the wire, those payloads)."""
    import agentmesh.mesh.worker as worker_module

    encoded: list[bytes] = []
    real = worker_module.encode_cache

    def recording(*args: Any, **kw: Any) -> bytes:
        encoded.append(real(*args, **kw))
        return encoded[-1]

    monkeypatch.setattr(worker_module, "encode_cache", recording)
    result, seen = _overheard_run(g, pool)
    return result, b"\n".join(seen), encoded


def _pieces(data: bytes, size: int = 24, every: int = 997) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data) - size, every)]


def test_encrypted_runs_show_a_subscriber_no_cache_bytes_prompt_or_answer(broker: Any, pool: ModelPool,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    """With `auth.encrypt` a subscriber to agentmesh/# finds no 24-byte piece of the cache the
    cloud sent, nor the question, the context or the cloud's answer (the text run also signs with
    per-host keys); without it the same check finds the cache (so the check can fail)."""
    plain, wire, encoded = _eavesdropped_run(edge_cloud(broker.url), pool, monkeypatch)
    assert plain.ok and len(encoded) == 1
    pieces = _pieces(encoded[0])
    assert sum(p in wire for p in pieces) > 0.9 * len(pieces)  # in clear, the cache is there to read

    secret, wire, encoded = _eavesdropped_run(edge_cloud(broker.url, encrypt=True), pool, monkeypatch)
    assert secret.ok, secret.error
    assert secret["ask"].token_ids == plain["ask"].token_ids
    assert len(encoded) == 1 and len(wire) > len(encoded[0])  # the cache did cross, encrypted
    assert not [p for p in _pieces(encoded[0]) if p in wire]

    g = with_host_keys(edge_cloud(broker.url, mode="text", tokens=12),
                       host_keys(tmp_path, monkeypatch, "edge", "cloud"), encrypt=True)
    text, wire, _ = _eavesdropped_run(g, pool, monkeypatch)
    assert text.ok, text.error
    answer = text["doc"].text.encode()
    assert len(answer) > 12
    for clear in (QUESTION.encode(), SECRET.encode(), answer, b"warranty facts"):
        assert not [clear[i:i + 12] for i in range(len(clear) - 12) if clear[i:i + 12] in wire]


def test_a_host_that_does_not_encrypt_is_refused_by_one_that_does(pool: ModelPool) -> None:
    g = edge_cloud("mqtt://127.0.0.1:1", encrypt=True)
    clear = Guard(KEY, "edge", g.name)  # the right key, no encryption
    cloud = make_guard(g, "cloud")
    inbox = inbox_channel("cloud")
    with pytest.raises(Exception, match="is not encrypted, and this pipeline encrypts"):
        unpack(pack({"op": "load"}, guard=clear, channel=inbox), guard=cloud, channel=inbox)
    sealed = pack({"op": "load"}, guard=make_guard(g, "edge"), channel=inbox)
    with pytest.raises(Exception, match="is encrypted, and this host has no auth.encrypt"):
        unpack(sealed, guard=clear, channel=inbox)
    tampered = bytearray(sealed)
    tampered[40] ^= 1  # a ciphertext byte: the AES-GCM tag is this message's seal
    with pytest.raises(Exception, match="does not decrypt"):
        unpack(bytes(tampered), guard=cloud, channel=inbox)
    with pytest.raises(Exception, match="does not decrypt"):  # moved to another topic
        unpack(sealed, guard=make_guard(g, "cloud"), channel=inbox_channel("edge"))
    assert unpack(sealed, guard=cloud, channel=inbox).body == {"op": "load"}
    assert cloud.dropped == {"plaintext": 1, "bad_seal": 1} and clear.dropped == {"bad_seal": 1}
    with pytest.raises(GraphError, match="auth.encrypt needs the pipeline key"):
        g.set_auth(hosts={"edge": {"key_env": KEY_ENV, "public_key": "A" * 43 + "="}}, encrypt=True)


@pytest.mark.parametrize("args, message", [
    (["--max-calls", "0"], "--max-calls '0' is not a whole number of at least 1"),
    (["--max-calls", "many"], "--max-calls 'many' is not a whole number of at least 1"),
    (["--max-request-bytes", "12XB"], "--max-request-bytes: '12XB' is not a size"),
    (["--max-request-bytes", "0"], "--max-request-bytes '0' is 0 bytes; the least is 1 bytes"),
    (["--max-queued-bytes", "1000"], "--max-queued-bytes '1000' is 1000 bytes; the least is 1048576 bytes"),
])
def test_worker_load_limit_options_are_checked(args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from agentmesh.mesh.cli import app

    out = CliRunner().invoke(app, ["worker", str(GRAPHS / "edge_cloud.yaml"), "--host", "cloud", *args])
    assert out.exit_code == 2 and out.stderr.startswith(f"error: {message}"), out.output
    assert len(out.stderr.strip().splitlines()) == 1


def test_worker_load_limit_options_reach_the_worker_and_its_link(broker: Any, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import agentmesh.mesh.worker as worker_module
    from agentmesh.mesh.cli import app

    seen: dict[str, Any] = {}

    class Recorded:
        def __init__(self, graph: Any, host: str, link: Any, **kw: Any):
            seen.update(kw, queued=link.config.max_buffered_bytes)
            raise ConfigError("stopped by the test")

    monkeypatch.setattr(worker_module, "Worker", Recorded)
    monkeypatch.setenv("AGENTMESH_KEY", KEY.decode())
    out = CliRunner().invoke(app, ["worker", str(GRAPHS / "edge_cloud.yaml"), "--host", "cloud", "--broker", broker.url, "--max-calls", "3",
                                   "--max-request-bytes", "64MB", "--max-queued-bytes", "2MiB"])
    assert out.exit_code == 2 and out.stderr.strip() == "error: stopped by the test", out.output
    assert seen["max_calls"] == 3 and seen["max_request_bytes"] == 64_000_000 and seen["queued"] == 2 << 20


def _wire_bytes(link: Any) -> tuple[int, int]:
    """(sent, received) wire bytes of a link, over all its channels."""
    stats = link.stats().values()
    return sum(s.wire_bytes_sent for s in stats), sum(s.wire_bytes_received for s in stats)


def _three_party(g: Graph, pool: ModelPool, before: Callable[[Any], Awaitable[None]] | None = None
                 ) -> tuple[Any, dict[str, tuple[int, int]], dict[str, Worker]]:
    """Run `g` from a pure client (no host) with workers for cloud and edge; returns the result,
    each link's (sent, received) bytes and the workers. `before(workers)` runs first."""
    for h in ("cloud", "edge"):
        g.hosts[h] = type(g.hosts[h])(callers=("client", "cloud", "edge"))

    async def go() -> tuple[Any, dict[str, tuple[int, int]], dict[str, Worker]]:
        served = {h: await serving(g, h, pool) for h in ("cloud", "edge")}
        caller = MqttLink(broker_config(g), graph=g.name)
        await caller.open()
        try:
            if before is not None:
                await before({h: w for h, (w, _, _) in served.items()})
            result = await arun_remote(g, QUESTION, link=caller, pool=pool, timeout=30)
        finally:
            for w, task, link in served.values():
                await stop(w, task, link)
            await caller.close()
        links = {"caller": _wire_bytes(caller), **{h: _wire_bytes(link) for h, (_, _, link) in served.items()}}
        return result, links, {h: w for h, (w, _, _) in served.items()}

    return run(go())


@pytest.mark.parametrize("secured", ["pipeline key", "host keys, encrypted"])
def test_a_cache_between_two_remote_hosts_crosses_the_network_once(broker: Any, pool: ModelPool, secured: str,
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A pure client runs doc (cloud) -> ask (edge), a prefix edge: the reading goes from the cloud's
    worker straight to the edge's (signed by the cloud and encrypted, in the second case); the
    caller's link carries only small control messages. A delivery from a host that does not run
    the sender is dropped."""
    g = edge_cloud(broker.url)
    if secured != "pipeline key":
        with_host_keys(g, host_keys(tmp_path, monkeypatch, "edge", "cloud"), encrypt=True)
    local = run_graph(g, QUESTION, pool=pool)
    cache_bytes = local.bytes_by_edge()["doc->ask"]

    async def forge(workers: dict[str, Worker]) -> None:
        async with MqttLink(broker_config(g), graph=g.name) as attacker:
            inbox = inbox_channel("edge")
            fake = pack({"op": "cache", "run": "r", "ref": "f" * 32, "from": "doc", "to": "ask"},
                        {"cache": b"\x00" * 64}, guard=make_guard(g, "client"), channel=inbox)
            await attacker.send(inbox, fake)
            await until(lambda: workers["edge"].dropped.get("unauthorised") == 1)

    result, links, workers = _three_party(g, pool, forge)
    assert result.ok, result.error
    assert result["ask"].token_ids == local["ask"].token_ids
    moved = result.bytes_by_edge()["doc->ask"]
    assert cache_bytes < moved < 1.5 * cache_bytes  # one encoded copy (two were 2x)
    caller_sent, caller_got = links["caller"]
    assert caller_sent + caller_got < 50_000 < cache_bytes  # requests, acks, results: no cache
    assert cache_bytes < links["cloud"][0] < 1.5 * cache_bytes + 50_000  # the cloud sent it once
    assert links["edge"][1] > cache_bytes  # ... and the edge received it
    assert workers["edge"].dropped == {"unauthorised": 1}
    assert any("host cloud -> host edge directly" in (s.detail or "") for s in result.trace.of("doc"))


def test_a_sharer_on_one_remote_host_fuses_into_a_receiver_on_another_directly(broker: Any, pool: ModelPool,
                                                                               tmp_path: Path) -> None:
    from agentmesh.c2c.checkpoints import save_fuser
    from agentmesh.c2c.fuser import Fuser

    import torch

    torch.manual_seed(0)
    fuser = Fuser.build(pool.get("tiny").signature, pool.get("tiny2").signature, hidden_dim=16,
                        intermediate_dim=16, dropout=0.0)
    with torch.no_grad():
        for p in fuser.projectors:
            p.key_gate_logit.fill_(1.0)
            p.value_gate_logit.fill_(1.0)
    g = Graph("sec_fuse")
    g.host("edge")
    g.host("cloud")
    g.agent("helper", model="tiny2", host="cloud", context=SECRET)
    g.agent("ask", model="tiny", host="edge", max_new_tokens=6)
    g.cache("helper", "ask", mode="fuse", fuser=str(save_fuser(fuser, tmp_path / "fuser")))
    g.set_broker(broker.url, timeout_s=10)
    g.set_auth(key_env=KEY_ENV)
    local = run_graph(g, QUESTION, pool=pool)
    assert local.ok, local.error
    span_bytes = local.bytes_by_edge()["helper->ask"]

    result, links, _ = _three_party(g, pool)
    assert result.ok, result.error
    assert result["ask"].token_ids == local["ask"].token_ids
    assert span_bytes < result.bytes_by_edge()["helper->ask"] < 1.5 * span_bytes + 2000
    caller_sent, caller_got = links["caller"]
    assert caller_sent + caller_got < span_bytes  # the span cache never passed the caller
    assert links["cloud"][0] > span_bytes and links["edge"][1] > span_bytes


def test_a_direct_cache_that_never_comes_fails_the_call_naming_its_host(broker: Any, pool: ModelPool) -> None:
    g = edge_cloud(broker.url, timeout_s=1)
    g.hosts["edge"] = type(g.hosts["edge"])(callers=("client",))
    inbox = inbox_channel("edge")

    async def go() -> Any:
        worker, task, link = await serving(g, "edge", pool)
        try:
            async with MqttLink(broker_config(g), graph=g.name) as client:
                reply = "r9/ask->client"
                await client.subscribe(reply)
                me = Guard(KEY, "client", g.name)
                await client.send(inbox, pack({"op": "text", "call": "c1", "run": "r9", "agent": "ask", "reply": reply,
                                               "graph": graph_digest(g), "heartbeat_s": 5.0, "sharers": [],
                                               "messages": [{"role": "user", "content": "hi"}], "past_ref": "x" * 32},
                                              guard=me, channel=inbox))
                while True:
                    env = unpack(await client.receive(reply, timeout=20), guard=me, channel=reply)
                    if env.get("kind") == "error":
                        return env.get("error")
        finally:
            await stop(worker, task, link)

    error = run(go())
    assert error["message"] == "ask: the cache of 'doc' from host 'cloud' did not arrive within 1 s"


def _link_guards(secured: str) -> tuple[Guard, Guard, Guard]:
    """(sender, receiver, outsider) guards of graph "g": the outsider has the wrong key (a pipeline
    key of its own, or a host key the file does not name, signing as the receiver)."""
    wrong = b"not-the-pipeline-key-" + b"9" * 20
    if secured == "host keys":
        edge, cloud = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        publics = {"edge": edge.public_key(), "cloud": cloud.public_key()}
        return (Guard(None, "edge", "g", signer=edge, publics=publics),
                Guard(None, "cloud", "g", signer=cloud, publics=publics),
                Guard(None, "cloud", "g", signer=Ed25519PrivateKey.generate(), publics=publics))
    encrypted = secured == "pipeline key, encrypted"

    def guard(key: bytes, who: str) -> Guard:
        return Guard(key, who, "g", cipher=AESGCM(cipher_key(key, "g")) if encrypted else None)
    return guard(KEY, "edge"), guard(KEY, "cloud"), guard(wrong, "cloud")


@pytest.mark.parametrize("secured", ["pipeline key", "pipeline key, encrypted", "host keys"])
def test_forged_acknowledgements_and_requests_do_not_touch_what_a_sender_keeps(broker: Any, secured: str) -> None:
    """With keys, a link's acknowledgements and requests for missing chunks are sealed: forged ones
    (unsealed, wrong key, moved from another link's topic, replayed) neither make the sender forget
    a message its receiver does not have nor make it resend; the transfer then completes by the
    sealed repair, and a genuine acknowledgement still drops what it names."""
    tx_guard, rx_guard, outsider = _link_guards(secured)
    cfg = BrokerConfig(url=broker.url, timeout_s=10, receive_timeout_s=10, reconnect_min_s=0.05,
                       reconnect_max_s=0.5, repair_after_s=0.3, chunk_bytes=4096)
    ch = "r1/doc->edge"
    payload = os.urandom(40_000)  # 10 chunks

    async def go() -> tuple[MqttLink, MqttLink, LinkControlSeal]:
        async with MqttLink(cfg, graph="g") as tx, MqttLink(cfg, graph="g") as rx:
            seal = LinkControlSeal(tx_guard)
            tx.seal_control(seal)
            seal_link_control(rx, rx_guard)
            sent = bytes.fromhex(await tx.send(ch, payload))  # nobody subscribed yet: nobody has it
            topic, elsewhere = tx.control_topic(), rx.control_topic()
            ack = ack_message([sent])
            genuine = LinkControlSeal(rx_guard)
            harmless = genuine.seal(topic, ack_message([os.urandom(16)]))  # names a message tx never sent
            forged = [
                ack,  # what any client of the broker could send before
                pack({"op": "link_control"}, {"control": ack}, channel=topic),  # an envelope without a seal
                LinkControlSeal(outsider).seal(topic, ack),
                LinkControlSeal(outsider).seal(topic, nack_message(sent, [[0, 10]])),
                genuine.seal(elsewhere, ack),  # sealed for the receiver's own topic, moved here
                harmless,  # a replay (its first copy goes before it)
            ]
            async with aiomqtt.Client("127.0.0.1", broker.port) as raw:
                await raw.publish(topic, harmless, qos=1)
                for body in forged:
                    await raw.publish(topic, body, qos=1)
                await until(lambda: tx.forged_control == len(forged))
                assert tx.kept == (1, len(payload))  # still kept: its receiver has not got it
                assert tx.stats()[ch].chunks_resent == tx.stats()[ch].messages_acked == 0
                await rx.subscribe(ch)  # the receiver comes: the sender's probe, its sealed request, the resend
                assert await rx.receive(ch, timeout=10) == payload
                await until(lambda: tx.kept == (0, 0))  # its sealed acknowledgement arrived
                other = bytes.fromhex(await tx.send("r1/nobody", b"y" * 5000))
                assert tx.kept == (1, 5000)
                await raw.publish(topic, genuine.seal(topic, ack_message([other])), qos=1)  # sealed: whoever sends it
                await until(lambda: tx.kept == (0, 0))
            return tx, rx, seal

    tx, rx, seal = run(go())
    assert tx.forged_control == 6 and seal.dropped == {"malformed": 1, "unsigned": 1, "bad_seal": 3, "replayed": 1}
    assert tx_guard.dropped == {}  # counted by the link's seal, not among the envelopes its owner dropped
    assert rx.forged_control == tx.dropped_control == rx.dropped_control == 0
    stats = tx.stats()[ch]
    # How many chunks the repair resends is not fixed by this test's events (one CI run saw 3 of 10,
    # the payload still arriving whole); that the sealed repair resent some is.
    assert stats.messages_acked == 1 and 1 <= stats.chunks_resent <= 10 and stats.probes_sent >= 1
    assert rx.stats()[ch].repairs_asked >= 1
