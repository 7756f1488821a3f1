"""Faults against a real mosquitto on loopback (marked `mqtt`): broker restarts in the middle of
multi-MB transfers (between two links, and in runs across hosts: a cache going to a worker and one
coming back from it), and the bounds on what a sender keeps for repair.

The broker here has no persistence, so a restart loses every session and every message it held:
what arrives, arrives because the links repaired the transfer themselves."""
from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Awaitable, TypeVar

import aiomqtt
import pytest

from agentmesh.errors import TransportError
from agentmesh.graph import Graph
from agentmesh.mesh.remote import arun_remote
from agentmesh.mesh.settings import broker_config
from agentmesh.models.loaded_model import LoadedModel
from agentmesh.models.pool import ModelPool
from agentmesh.runtime import run_graph
from agentmesh.transport.broker import LocalBroker, find_mosquitto
from agentmesh.transport.config import BrokerConfig
from agentmesh.transport.frames import nack_message
from agentmesh.transport.link import edge_channel
from agentmesh.transport.mqtt import MqttLink
from mesh_serving import serving, stop

pytestmark = [pytest.mark.mqtt, pytest.mark.timeout(120)]

T = TypeVar("T")
DOWN_S = 0.5  # how long each restart keeps the broker away
SLACK_S = 4.0  # reconnecting, noticing the quiet transfer, resending: "a few seconds"
RESTARTS = 10
CHUNK = 32 * 1024
KEY_ENV = "AGENTMESH_TEST_MESH_KEY"
DOCUMENT = ("The Kestrel rover has a three-year warranty; claims go to the service desk in Tromso, "
            "which answers within five working days. ") * 12


def run(aw: Awaitable[T], limit: float = 90.0) -> T:
    """Run a coroutine with a hard wall-clock limit, so a hang fails the test instead of CI."""
    async def bounded() -> T:
        return await asyncio.wait_for(aw, limit)
    return asyncio.run(bounded())


def config(url: str, **kw: Any) -> BrokerConfig:
    base: dict[str, Any] = dict(url=url, timeout_s=20, receive_timeout_s=20, reconnect_min_s=0.05,
                                reconnect_max_s=0.5, repair_after_s=0.5)
    return BrokerConfig(**{**base, **kw})


def paced(link: MqttLink, delay: float) -> None:
    """Slow `link`'s publishing so a transfer lasts long enough to break the broker at chosen moments."""
    publish = link._publish

    async def slow(*args: Any, **kw: Any) -> None:
        await asyncio.sleep(delay)
        await publish(*args, **kw)
    link._publish = slow  # type: ignore[method-assign]


def reconnects_after(link: MqttLink, peer: MqttLink, extra_s: float = 0.3) -> None:
    """Make `link` come back only `extra_s` after `peer` has, so what `peer` sends meanwhile finds no
    subscription on a broker that forgot it (as when one host reconnects before another)."""
    connect = link._connect
    seen = peer.reconnects

    async def late(*, clean: bool, deadline: float) -> Any:
        if not clean:
            await until(lambda: peer.reconnects > seen and peer.connected, 20, "the peer reconnecting")
            await asyncio.sleep(extra_s)
        return await connect(clean=clean, deadline=deadline)
    link._connect = late  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def forgetful_broker() -> Any:
    """A mosquitto without persistence: a restart loses every session and every message it held."""
    try:
        find_mosquitto()
    except TransportError as exc:
        pytest.skip(str(exc))
    with LocalBroker(persistence=False) as b:
        yield b


def chunks_in(link: MqttLink, channel: str) -> int:
    stats = link.stats().get(channel)
    return stats.chunks_received if stats is not None else 0


async def until(condition: Any, limit: float, what: str) -> None:
    """Wait (polling) until `condition()` holds, failing after `limit` s."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not condition():
        if loop.time() > end:
            raise AssertionError(f"{what}: not within {limit} s")
        await asyncio.sleep(0.002)


def test_a_multi_mb_transfer_survives_a_broker_restart_at_ten_moments_in_both_directions(forgetful_broker):
    broker = forgetful_broker
    data = [os.urandom(4 << 20), os.urandom(4 << 20)]
    chunks = (4 << 20) // (32 * 1024)

    async def go() -> tuple[float, list[tuple[int, float, bool]], dict[str, Any]]:
        cfg = config(broker.url, chunk_bytes=32 * 1024, max_inflight=4)
        async with MqttLink(cfg, graph="g") as a, MqttLink(cfg, graph="g") as b:
            ab, ba = edge_channel("r", "a->b"), edge_channel("r", "b->a")
            await b.subscribe(ab)
            await a.subscribe(ba)
            paced(a, 0.005)
            paced(b, 0.005)

            async def transfer(k: int, moment: float | None) -> tuple[float, bool]:
                tx, rx, ch = (a, b, ab) if k % 2 == 0 else (b, a, ba)
                payload = data[k % 2]
                start_chunks = chunks_in(rx, ch)
                t = time.monotonic()
                sending = asyncio.create_task(tx.send(ch, payload))
                receiving = asyncio.create_task(rx.receive(ch))
                if moment is not None:
                    target = start_chunks + int(moment * chunks)
                    await until(lambda: chunks_in(rx, ch) >= target or receiving.done(), 20,
                                "the transfer reaching its restart moment")
                    mid = not receiving.done()
                    await asyncio.to_thread(broker.restart, DOWN_S)
                else:
                    mid = True
                await sending
                got = await receiving
                assert got == payload, f"run {k}: {len(got)} bytes arrived, not the {len(payload)} sent"
                return time.monotonic() - t, mid

            baseline, _ = await transfer(0, None)
            runs = []
            for k in range(RESTARTS):
                elapsed, mid = await transfer(k, (k + 0.5) / RESTARTS)
                runs.append((k, elapsed, mid))
            await until(lambda: a.kept == (0, 0) and b.kept == (0, 0), 10, "every message acknowledged")
            with pytest.raises(TransportError, match="no message"):
                await b.receive(ab, timeout=0.3)  # nothing delivered twice
            sa, sb = a.stats(), b.stats()
            counts = {
                "resent": sa[ab].chunks_resent + sb[ba].chunks_resent,
                "asked": sb[ab].repairs_asked + sa[ba].repairs_asked,
                "delivered": sb[ab].messages_received + sa[ba].messages_received,
                "acked": sa[ab].messages_acked + sb[ba].messages_acked,
                "duplicates": sb[ab].duplicate_chunks + sa[ba].duplicate_chunks,
                "reconnects": a.reconnects + b.reconnects,
            }
            return baseline, runs, counts

    baseline, runs, counts = run(go())
    for k, elapsed, mid in runs:
        print(f"restart at {(k + 0.5) / RESTARTS:.0%} of 4 MiB ({'mid-transfer' if mid else 'after it'}): "
              f"{elapsed:.2f} s (undisturbed {baseline:.2f} s)")
    print(counts)
    assert sum(mid for _, _, mid in runs) >= RESTARTS - 1  # the restarts landed inside the transfers
    for k, elapsed, _ in runs:
        assert elapsed < baseline + DOWN_S + SLACK_S, f"run {k} took {elapsed:.1f} s"
    assert counts["reconnects"] == 2 * RESTARTS  # both links lost the broker every time and came back
    assert counts["delivered"] == counts["acked"] == RESTARTS + 1
    assert counts["resent"] > 0 and counts["asked"] > 0  # the broker lost chunks, the receivers asked again


def test_a_sender_keeps_unacknowledged_messages_within_its_bounds_until_they_expire(forgetful_broker):
    broker = forgetful_broker

    async def go() -> None:
        cfg = config(broker.url, resend_keep_bytes=3 << 20, resend_keep_s=2.0, repair_after_s=0.2)
        async with MqttLink(cfg, graph="g") as tx, MqttLink(cfg, graph="g") as rx:
            nobody, heard = edge_channel("r", "nobody"), edge_channel("r", "heard")
            for _ in range(5):  # nobody subscribed: nobody acknowledges
                await tx.send(nobody, os.urandom(1 << 20))
            assert tx.kept == (3, 3 << 20)  # the oldest two made room
            await tx.send(nobody, os.urandom(4 << 20))  # over the bound alone: never kept
            assert tx.kept == (3, 3 << 20)
            await until(lambda: tx.kept == (0, 0), 5, "unacknowledged messages expiring")
            assert tx.stats()[nobody].probes_sent > 0  # it asked while it kept them
            await rx.subscribe(heard)
            await tx.send(heard, b"x" * 5000)
            assert await rx.receive(heard, timeout=5) == b"x" * 5000
            await until(lambda: tx.kept == (0, 0), 3, "the acknowledgement arriving")
            assert tx.stats()[heard].messages_acked == 1
    run(go(), 30)


def test_requests_for_missing_chunks_cannot_make_a_sender_flood(forgetful_broker):
    """A flood of requests for one message's chunks resends them at most once per half repair interval."""
    broker = forgetful_broker
    async def go() -> None:
        cfg = config(broker.url, chunk_bytes=4096, repair_after_s=2.0)
        async with MqttLink(cfg, graph="g") as tx:
            ch = edge_channel("r", "nobody")
            sent = bytes.fromhex(await tx.send(ch, os.urandom(40_000)))  # 10 chunks, kept: nobody acknowledges
            async with aiomqtt.Client("127.0.0.1", broker.port) as raw:
                for _ in range(50):
                    await raw.publish(tx.control_topic(), nack_message(sent, [[0, 10]]), qos=1)
                for garbage in (b"not json", b"[]", b'{"nack": "zz", "missing": []}', b'{"ack": 5}'):
                    await raw.publish(tx.control_topic(), garbage, qos=1)
                await raw.publish(tx.control_topic(), b'{"ack": ["' + sent.hex().encode() + b'"]}', qos=1)
            await until(lambda: tx.kept == (0, 0), 5, "the acknowledgement arriving")
            assert tx.stats()[ch].chunks_resent == 10  # one request taken up, the other 49 ignored
            assert tx.dropped_control == 4
    run(go(), 30)


@pytest.fixture(scope="module")
def pool(tiny_model_factory: Any) -> ModelPool:
    """A tiny model with a wide cache (8 KiB a token), so a reading of DOCUMENT is a few MB on the wire."""
    p = ModelPool()
    wide: LoadedModel = tiny_model_factory("qwen3", "tiny", seed=0, num_layers=4, num_heads=4, num_kv_heads=4,
                                           head_dim=64, hidden_size=128)
    p.put("wide", wide)
    return p


@pytest.fixture(autouse=True)
def mesh_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "k3y-for-the-fault-tests-" + "5" * 32)


def cache_across(url: str, reader_host: str) -> Graph:
    """A reader of DOCUMENT on `reader_host`, whose cache an answering agent on the other host continues from."""
    other = "edge" if reader_host == "cloud" else "cloud"
    g = Graph(f"faults_{reader_host}")
    g.host("edge")
    g.host("cloud")
    g.agent("doc", model="wide", host=reader_host, role="You keep the handbook.", context=DOCUMENT)
    g.agent("ask", model="wide", host=other, max_new_tokens=6)
    g.cache("doc", "ask", mode="prefix")
    g.set_broker(url, timeout_s=20, heartbeat_timeout_s=5, start_wait_s=20, chunk_bytes=CHUNK, repair_after_s=0.5,
                 reconnect_min_s=0.05, reconnect_max_s=0.5)
    g.set_auth(key_env=KEY_ENV)
    return g


@pytest.mark.parametrize("direction", ["worker->caller", "caller->worker"])
def test_a_run_across_hosts_survives_a_broker_restart_in_the_middle_of_its_cache(forgetful_broker: Any,
                                                                                pool: ModelPool, direction: str):
    """worker->caller: the cloud's reading comes back to the edge; caller->worker: the edge's reading
    goes to the cloud inside the request that continues from it."""
    broker = forgetful_broker
    g = cache_across(broker.url, "cloud" if direction == "worker->caller" else "edge")
    local = run_graph(g, "How long is the warranty? ", pool=pool)
    assert local.ok, local.error
    chunks = local.bytes_by_edge()["doc->ask"] // CHUNK
    assert chunks >= 40  # a multi-MB cache

    async def go() -> tuple[Any, float, float, bool, dict[str, int]]:
        worker, task, worker_link = await serving(g, "cloud", pool)
        caller_link = MqttLink(broker_config(g, host="edge"), graph=g.name)
        await caller_link.open()
        sender, receiver = (worker_link, caller_link) if direction == "worker->caller" else (caller_link, worker_link)
        paced(sender, 0.02)
        received = lambda: sum(s.chunks_received for s in receiver.stats().values())  # noqa: E731
        try:
            t = time.monotonic()
            first = await arun_remote(g, "How long is the warranty? ", host="edge", link=caller_link, pool=pool,
                                      timeout=60)
            undisturbed = time.monotonic() - t
            assert first.ok, first.error
            before = received()
            reconnects_after(receiver, sender)
            t = time.monotonic()
            running = asyncio.create_task(arun_remote(g, "How long is the warranty? ", host="edge",
                                                      link=caller_link, pool=pool, timeout=60))
            await until(lambda: received() >= before + chunks // 2 or running.done(), 30, "the cache half across")
            mid = received() < before + chunks
            await asyncio.to_thread(broker.restart, DOWN_S)
            result = await running
            elapsed = time.monotonic() - t
            counts = {"resent": sum(s.chunks_resent for s in sender.stats().values()),
                      "asked": sum(s.repairs_asked for s in receiver.stats().values()),
                      "probes": sum(s.probes_sent for s in sender.stats().values()),
                      "reconnects": sender.reconnects + receiver.reconnects,
                      "refused control": sum(x.forged_control + x.dropped_control for x in (sender, receiver))}
            return result, undisturbed, elapsed, mid, counts
        finally:
            await stop(worker, task, worker_link)
            await caller_link.close()

    result, undisturbed, elapsed, mid, counts = run(go())
    print(f"\n{direction}: {local.bytes_by_edge()['doc->ask'] / 2 ** 20:.1f} MiB cache, restart half-way: "
          f"{elapsed:.2f} s (undisturbed {undisturbed:.2f} s), {counts}")
    assert mid  # the restart landed inside the run
    assert result.ok, result.error
    assert result["ask"].token_ids == local["ask"].token_ids
    assert counts["reconnects"] == 2  # both links lost the broker and came back
    assert counts["refused control"] == 0  # both ends seal their acknowledgements and requests and open the other's
    assert counts["resent"] > 0 and counts["asked"] + counts["probes"] > 0  # chunks were lost and asked for
    assert elapsed < undisturbed + DOWN_S + SLACK_S
