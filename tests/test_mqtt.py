"""Links: the in-process link, MQTT config checks, and (marked `mqtt`) a real local mosquitto."""
from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Awaitable, TypeVar

import aiomqtt
import pytest
import torch
from pydantic import ValidationError

from agentmesh.cache.codec import decode_cache, encode_cache
from agentmesh.cache.kv import KVCache, ModelSignature
from agentmesh.errors import ConfigError, TransportError
from agentmesh.transport.broker import LocalBroker, find_mosquitto, free_port
from agentmesh.transport.link import InProcessLink, edge_channel
from agentmesh.transport.config import BrokerConfig
from agentmesh.transport.frames import split_frames
from agentmesh.transport.mqtt import MqttLink
from buffers import inside

T = TypeVar("T")
SIG = ModelSignature(name="tiny", model_type="qwen3", num_layers=16, num_kv_heads=4, head_dim=64,
                     vocab_size=1000, fingerprint="c" * 16)
PW_ENV = "AGENTMESH_TEST_MQTT_PASSWORD"


def run(aw: Awaitable[T], limit: float = 30.0) -> T:
    """Run a coroutine with a hard wall-clock limit, so a hang fails the test instead of CI."""
    async def bounded() -> T:
        return await asyncio.wait_for(aw, limit)
    return asyncio.run(bounded())


def big_cache(seed: int = 0) -> KVCache:
    """16 layers of (1, 4, 512, 64) bf16 keys and values: 8 MiB of tensors."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, SIG.num_kv_heads, 512, SIG.head_dim)
    kv = [torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(2 * SIG.num_layers)]
    return KVCache(keys=kv[::2], values=kv[1::2], signature=SIG,
                   token_ids=torch.randint(0, 1000, (1, 512), generator=g),
                   positions=torch.arange(512).unsqueeze(0))


def config(url: str, **kw: Any) -> BrokerConfig:
    base: dict[str, Any] = dict(url=url, timeout_s=10, receive_timeout_s=10, reconnect_min_s=0.05,
                                reconnect_max_s=0.5)
    return BrokerConfig(**{**base, **kw})


# ---- no broker needed --------------------------------------------------------------------------
def test_in_process_link_delivers_in_order_with_headers_and_bounded_waits():
    async def go() -> None:
        async with InProcessLink(default_timeout=5) as link:
            ch = edge_channel("run-1", "writer->reader")
            await link.send(ch, b"first", headers={"kind": "text"})
            await link.send(ch, bytearray(b"second"))
            m = await link.receive_message(ch)
            assert (m.payload, dict(m.headers)) == (b"first", {"kind": "text"})
            assert await link.receive(ch) == b"second"
            t = time.monotonic()
            with pytest.raises(TransportError, match="no message on channel 'run-1/writer->reader'.*0.2 s"):
                await link.receive(ch, timeout=0.2)
            assert time.monotonic() - t < 2.0
            assert link.stats()[ch].messages_received == 2
            waiter = asyncio.create_task(link.receive(ch, timeout=5))
            await asyncio.sleep(0.05)
            await link.close()
            with pytest.raises(TransportError, match="closed"):
                await waiter
            with pytest.raises(TransportError, match="closed"):
                await link.send(ch, b"late")
    run(go())


def test_channels_and_configs_are_validated():
    with pytest.raises(TransportError, match="valid topic level"):
        edge_channel("run+1", "a")
    with pytest.raises(TransportError, match="valid topic level"):
        edge_channel("run", "a/b")
    with pytest.raises(TransportError, match="valid topic level"):
        MqttLink(BrokerConfig(), graph="g").topic("r/#")
    with pytest.raises(ValidationError, match="must not carry credentials"):
        BrokerConfig(url="mqtt://user:hunter2@127.0.0.1:1883")
    with pytest.raises(ValidationError, match="invalid broker url 'http://127.0.0.1:1883'"):
        BrokerConfig(url="http://127.0.0.1:1883")
    with pytest.raises(ValidationError, match="is not an environment variable name"):
        BrokerConfig(password_env="hunter2 is my password")
    with pytest.raises(ValidationError, match="a password must not be written"):
        BrokerConfig(password="hunter2")
    with pytest.raises(ValidationError, match="key_file is set without tls.cert_file"):
        BrokerConfig(tls={"key_file": "k.pem"})
    with pytest.raises(ValidationError, match="valid topic level"):
        BrokerConfig(topic_prefix="a/#")
    cfg = BrokerConfig(url="mqtts://broker.example:9000", tls={"ca_file": "/nonexistent/ca.pem"})
    assert (cfg.host, cfg.port, cfg.secure) == ("broker.example", 9000, True)
    assert BrokerConfig(url="mqtts://h").port == 8883 and BrokerConfig(url="mqtt://h").port == 1883
    assert BrokerConfig(url="mqtt://h", tls=True).secure  # a tls: section turns TLS on
    with pytest.raises(ConfigError, match="cannot load the broker's TLS files"):
        cfg.ssl_context()
    with pytest.raises(ConfigError, match="AGENTMESH_UNSET_VARIABLE is not set"):
        BrokerConfig(password_env="AGENTMESH_UNSET_VARIABLE").password_value()
    link = MqttLink(BrokerConfig(), graph="g")
    assert link.topic(edge_channel("r7", "a->b")) == "agentmesh/g/r7/a->b/msg"


def test_unreachable_broker_fails_within_connect_timeout():
    port = free_port()  # nothing listens there

    async def go() -> None:
        async with MqttLink(config(f"mqtt://127.0.0.1:{port}", timeout_s=1.0), graph="g"):
            pass
    t = time.monotonic()
    with pytest.raises(TransportError, match=f"cannot reach MQTT broker mqtt://127.0.0.1:{port} within 1.0 s"):
        run(go())
    assert time.monotonic() - t < 3.0


# ---- with mosquitto ----------------------------------------------------------------------------
def test_missing_mosquitto_says_how_to_install_it():
    with pytest.raises(TransportError, match="apt-get install -y mosquitto"):
        find_mosquitto("mosquitto-not-installed-here")


@pytest.mark.mqtt
def test_local_broker_refuses_a_taken_port_and_restarts_on_its_own(broker):
    with pytest.raises(TransportError, match=f"cannot start mosquitto on 127.0.0.1:{broker.port}"):
        LocalBroker(port=broker.port).start()
    with LocalBroker() as other:
        port = other.port
        other.restart()
        assert other.running and other.port == port and other.url == f"mqtt://127.0.0.1:{port}"
    assert not other.running


@pytest.mark.mqtt
def test_multi_mb_cache_crosses_the_broker_in_chunks_and_arrives_identical(broker):
    kv = big_cache()
    payload = encode_cache(kv, dtype="bf16")
    assert len(payload) > 8 * 2 ** 20

    async def go() -> tuple[KVCache, dict[str, str], float]:
        cfg = config(broker.url, chunk_bytes=256 * 1024)
        async with MqttLink(cfg, graph="edge-cloud") as rx, MqttLink(cfg, graph="edge-cloud") as tx:
            ch = edge_channel("run-1", "cloud->edge")
            await rx.subscribe(ch)
            t = time.perf_counter()
            sent = asyncio.create_task(tx.send(ch, payload, headers={"kind": "cache", "wire": "bf16"}))
            message = await rx.receive_message(ch)
            await sent
            elapsed = time.perf_counter() - t
            rs, ts = rx.stats()[ch], tx.stats()[ch]
            assert rs.chunks_received == ts.chunks_sent == -(-len(payload) // (256 * 1024)) >= 33
            assert rs.bytes_received == ts.bytes_sent == len(payload)
            assert rs.duplicate_chunks == 0 and rx.protocol == "5"
            out = decode_cache(message.payload, expected=SIG)
            # reassembly is the one copy: the decoded cache views the reassembled buffer
            assert all(inside(t, message.payload) for t in (*out.keys, *out.values, out.token_ids))
            return out, dict(message.headers), elapsed

    out, headers, elapsed = run(go())
    assert headers == {"kind": "cache", "wire": "bf16"}
    for a, b in zip((*kv.keys, *kv.values), (*out.keys, *out.values)):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert torch.equal(out.token_ids, kv.token_ids)
    print(f"\n8 MiB cache over loopback mosquitto: {len(payload) / elapsed / 1e6:.1f} MB/s")


@pytest.mark.mqtt
def test_redelivered_chunks_do_not_duplicate_data(broker):
    payload = os.urandom(5000)
    frames = split_frames(payload, chunk_size=2048, headers={"n": "1"})
    assert len(frames) == 3

    async def go() -> None:
        async with MqttLink(config(broker.url), graph="g") as rx:
            ch = edge_channel("r", "dup")
            await rx.subscribe(ch)
            async with aiomqtt.Client("127.0.0.1", broker.port) as raw:
                # out of order, with repeats, then the whole message again after it completed
                for i in (0, 1, 1, 0, 2, 2, 0, 1, 2):
                    await raw.publish(rx.topic(ch), frames[i], qos=1)
            message = await rx.receive_message(ch, timeout=5)
            assert message.payload == payload and dict(message.headers) == {"n": "1"}
            with pytest.raises(TransportError, match="no message"):
                await rx.receive(ch, timeout=0.5)
            s = rx.stats()[ch]
            assert (s.messages_received, s.bytes_received, s.chunks_received, s.duplicate_chunks) == (1, 5000, 3, 6)
    run(go())


@pytest.mark.mqtt
def test_incomplete_or_corrupted_messages_fail_with_clear_errors(broker):
    payload = os.urandom(5000)
    frames = split_frames(payload, chunk_size=2048)
    bad = bytearray(split_frames(payload, chunk_size=8192)[0])
    bad[-1] ^= 0xFF  # one flipped byte in the data: the SHA-256 must catch it

    async def go() -> None:
        async with MqttLink(config(broker.url, reassembly_timeout_s=0.4), graph="g") as rx:
            a, b = edge_channel("r", "lossy"), edge_channel("r", "corrupt")
            await rx.subscribe(a)
            await rx.subscribe(b)
            async with aiomqtt.Client("127.0.0.1", broker.port) as raw:
                await raw.publish(rx.topic(a), frames[0], qos=1)
                await raw.publish(rx.topic(b), bytes(bad), qos=1)
                await raw.publish(rx.topic(b), b"not a frame", qos=1)
            t = time.monotonic()
            with pytest.raises(TransportError, match=r"1/3 chunks.*no new chunk for 0.4 s"):
                await rx.receive(a, timeout=5)
            assert time.monotonic() - t < 2.5
            with pytest.raises(TransportError, match="corrupted"):
                await rx.receive(b, timeout=5)
    run(go())


@pytest.mark.mqtt
def test_mqtt_311_and_no_sender_timeout(broker):
    async def go() -> None:
        cfg = config(broker.url, protocol="3.1.1", chunk_bytes=1024)
        async with MqttLink(cfg, graph="g") as rx, MqttLink(cfg, graph="g") as tx:
            assert rx.protocol == "3.1.1"
            ch = edge_channel("r", "old")
            await rx.subscribe(ch)
            data = os.urandom(10_000)
            await tx.send(ch, data)
            assert await rx.receive(ch, timeout=5) == data
            t = time.monotonic()
            with pytest.raises(TransportError, match=r"timed out after 0.3 s \(broker .* connected\)"):
                await rx.receive(ch, timeout=0.3)
            assert time.monotonic() - t < 3.0
            waiting = asyncio.create_task(rx.receive(ch, timeout=5))
            await asyncio.sleep(0.05)
            await rx.close()
            with pytest.raises(TransportError, match="closed"):
                await waiting
            with pytest.raises(TransportError, match="closed"):
                await rx.send(ch, b"late")
    run(go())


@pytest.mark.mqtt
def test_auto_protocol_falls_back_to_311_when_the_broker_refuses_mqtt5(broker, monkeypatch):
    tried: list[aiomqtt.ProtocolVersion] = []

    class OldBrokerClient(aiomqtt.Client):
        """Acts as if the broker answered CONNACK 0x84 (unsupported protocol version) to MQTT 5."""

        def __init__(self, *args: Any, protocol: aiomqtt.ProtocolVersion, **kw: Any) -> None:
            super().__init__(*args, protocol=protocol, **kw)
            self.wanted = protocol
            tried.append(protocol)

        async def __aenter__(self) -> "OldBrokerClient":
            if self.wanted == aiomqtt.ProtocolVersion.V5:
                raise aiomqtt.MqttCodeError(132, "Unsupported protocol version")
            return await super().__aenter__()

    monkeypatch.setattr(aiomqtt, "Client", OldBrokerClient)

    async def go() -> None:
        async with MqttLink(config(broker.url), graph="g") as link:
            assert link.protocol == "3.1.1"
            ch = edge_channel("r", "fallback")
            await link.subscribe(ch)
            await link.send(ch, b"x" * 3000)
            assert await link.receive(ch, timeout=5) == b"x" * 3000
    run(go())
    assert tried == [aiomqtt.ProtocolVersion.V5, aiomqtt.ProtocolVersion.V311]


@pytest.mark.mqtt
def test_broker_restart_mid_transfer_completes_within_the_timeout():
    """With persistent sessions (LocalBroker's default) the transfer resumes after the restart
    (tests/test_mesh_faults.py restarts a broker that keeps nothing)."""
    try:
        find_mosquitto()
    except TransportError as exc:
        pytest.skip(str(exc))
    data = os.urandom(8 * 2 ** 20)
    send_timeout = 12.0

    async def go(broker: LocalBroker) -> tuple[Any, Any, float, int]:
        cfg = config(broker.url, chunk_bytes=64 * 1024, max_inflight=2, timeout_s=send_timeout,
                     receive_timeout_s=send_timeout)
        async with MqttLink(cfg, graph="g") as rx, MqttLink(cfg, graph="g") as tx:
            publish = tx._publish

            async def paced(*args: Any, **kw: Any) -> None:  # slow the sender so the restart lands mid-way
                await asyncio.sleep(0.01)
                await publish(*args, **kw)
            tx._publish = paced  # type: ignore[method-assign]
            ch = edge_channel("r", "big")
            await rx.subscribe(ch)
            t = time.monotonic()
            sending = asyncio.create_task(tx.send(ch, data))
            receiving = asyncio.create_task(rx.receive(ch))
            while ch not in rx.stats() or rx.stats()[ch].chunks_received < 10:
                await asyncio.sleep(0.01)
            assert not receiving.done()
            await asyncio.to_thread(broker.restart)
            sent, got = await asyncio.gather(sending, receiving, return_exceptions=True)
            return sent, got, time.monotonic() - t, tx.reconnects + rx.reconnects

    with LocalBroker() as broker:
        sent, got, elapsed, reconnects = run(go(broker), limit=40)
    assert reconnects >= 2  # both links lost the broker and came back
    assert elapsed < send_timeout + 3
    for outcome in (sent, got):
        assert not isinstance(outcome, BaseException), outcome
    assert got == data
    print(f"\nbroker restart mid-transfer: completed after {elapsed:.1f} s")


@pytest.mark.mqtt
def test_credentials_wrong_are_refused_and_right_ones_from_the_environment_work(monkeypatch):
    try:
        find_mosquitto()
    except TransportError as exc:
        pytest.skip(str(exc))
    with LocalBroker(username="edge", password="correct-horse") as broker:
        async def attempt(cfg: BrokerConfig) -> bytes:
            async with MqttLink(cfg, graph="g") as link:
                ch = edge_channel("r", "auth")
                await link.subscribe(ch)
                await link.send(ch, b"hello")
                return await link.receive(ch, timeout=5)

        monkeypatch.setenv(PW_ENV, "wrong")
        t = time.monotonic()
        with pytest.raises(TransportError, match="refused the credentials of user 'edge'"):
            run(attempt(config(broker.url, username="edge", password_env=PW_ENV)))
        with pytest.raises(TransportError, match="refused an anonymous connection"):
            run(attempt(config(broker.url)))
        assert time.monotonic() - t < 5.0  # refused at once, not retried until a timeout
        monkeypatch.setenv(PW_ENV, "correct-horse")
        assert run(attempt(config(broker.url, username="edge", password_env=PW_ENV))) == b"hello"
