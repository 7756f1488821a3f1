"""Benchmark 9: what securing and routing edge–cloud runs costs.

Seal: one envelope carrying a cache of the embedded model's shape (30 layers, 3 KV heads of dim
64, `tokens` tokens, float32 as the CPU engine holds it; a lossless payload, as a worker sends by
default) is packed and unpacked (`agentmesh.mesh.envelope`) with each seal: none (`--insecure`),
the pipeline key (HMAC-SHA256), a host's own key (Ed25519 over SHA-256), and each of those with
AES-256-GCM encryption (`auth.encrypt`). MB/s is payload bytes over pack + unpack time, on this
thread (one core); "AES-GCM alone" times `AESGCM.encrypt` + `decrypt` of the same bytes.

Wire: `graphs/edge_cloud.yaml` (the librarian on the cloud reads the handbook; the assistant on
the edge continues from its cache) over a loopback mosquitto, with every worker in this process,
once with the caller on the edge and once with the caller as a pure client (no host): the bytes
every link published, the bytes through the caller's link, and the bytes the trace puts on the
cache edge.
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from agentmesh.bench.common import BenchResult, CacheShape, make_cache, median

if TYPE_CHECKING:
    from agentmesh.graph import Graph
    from agentmesh.models.pool import ModelPool

NAME = "edge_cloud"
GRAPH = Path(__file__).resolve().parents[2] / "graphs" / "edge_cloud.yaml"
SEALS = ("none", "hmac", "signed", "hmac+aes-gcm", "signed+aes-gcm")


@dataclass(frozen=True)
class Config(CacheShape):
    tokens: int = 432
    repeats: int = 7
    callers: tuple[str, ...] = ("edge", "client")  # who runs the scheduler in the wire runs ("" skips them)

    @classmethod
    def quick(cls, **overrides: Any) -> "Config":
        return cls(**{"repeats": 3, **overrides})


def _guards(seal: str) -> tuple[Any, Any]:
    """(sender, receiver) guards of one graph for a seal mode."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from agentmesh.mesh.auth import Guard, cipher_key

    key = os.urandom(32)
    signer = Ed25519PrivateKey.generate()
    cipher = AESGCM(cipher_key(key, "bench")) if seal.endswith("aes-gcm") else None
    if seal == "none":
        return Guard(None, "cloud", "bench"), Guard(None, "edge", "bench")
    publics = {"cloud": signer.public_key()} if seal.startswith("signed") else {}
    sender = Guard(key, "cloud", "bench", signer=signer if publics else None, publics=publics, cipher=cipher)
    return sender, Guard(key, "edge", "bench", publics=publics, cipher=cipher)


def seal_rows(cfg: Config) -> tuple[list[dict[str, Any]], int]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from agentmesh.cache.codec import encode_cache
    from agentmesh.mesh.envelope import pack, unpack

    kv = make_cache(cfg, torch.float32)
    blob = encode_cache(kv, dtype=None)
    mb = len(blob) / 1e6
    channel = "run1/librarian->assistant"
    times: dict[str, list[tuple[float, float]]] = {s: [] for s in SEALS}
    aes = AESGCM(os.urandom(32))
    times["aes-gcm alone"] = []
    guards = {s: _guards(s) for s in SEALS}
    for _ in range(cfg.repeats):  # interleaved, so that load on the machine hits every mode alike
        for seal in SEALS:
            sender, receiver = guards[seal]
            t0 = time.perf_counter()
            data = pack({"kind": "result", "call": "c"}, {"cache": blob}, guard=sender, channel=channel)
            t1 = time.perf_counter()
            env = unpack(data, guard=receiver, channel=channel)
            t2 = time.perf_counter()
            assert len(env.blobs["cache"]) == len(blob)
            times[seal].append((t1 - t0, t2 - t1))
        nonce = os.urandom(12)
        t0 = time.perf_counter()
        ct = aes.encrypt(nonce, blob, None)
        t1 = time.perf_counter()
        aes.decrypt(nonce, ct, None)
        times["aes-gcm alone"].append((t1 - t0, time.perf_counter() - t1))
    rows = []
    for seal, t in times.items():
        pack_s, unpack_s = median(a for a, _ in t), median(b for _, b in t)
        total = median(a + b for a, b in t)
        rows.append({"seal": seal, "payload_MB": mb, "pack_ms": pack_s * 1e3, "unpack_ms": unpack_s * 1e3,
                     "MB_per_s": mb / total, "best_MB_per_s": mb / min(a + b for a, b in t)})
    return rows, len(blob)


async def _wire_run(graph: Graph, caller: str, url: str, pool: ModelPool) -> dict[str, Any]:
    from agentmesh.graph.graph import HostDecl
    from agentmesh.mesh.remote import arun_remote
    from agentmesh.mesh.settings import broker_config
    from agentmesh.mesh.worker import Worker
    from agentmesh.transport.mqtt import MqttLink

    key = os.urandom(32)
    host = None if caller == "client" else caller
    for h in graph.hosts:  # a pure client may call every host
        graph.hosts[h] = HostDecl(callers=tuple(sorted({"edge", "cloud", "client"} - {h})))
    serve = sorted({a.host for a in graph.agents.values() if a.host is not None and a.host != host})
    links = {h: MqttLink(broker_config(graph, url=url, host=h), graph=graph.name) for h in [*serve, "caller"]}
    workers, tasks = [], []
    try:
        for link in links.values():
            await link.open()
        for h in serve:
            w = Worker(graph, h, links[h], pool=pool, key=key)
            ready = asyncio.Event()
            tasks.append(asyncio.create_task(w.serve(ready=ready.set)))
            await asyncio.wait_for(ready.wait(), 30)
            workers.append(w)
        result = await arun_remote(graph, None, host=host, link=links["caller"], pool=pool, key=key, timeout=600,
                                   on_wait=lambda h: None)
        if not result.ok:
            raise RuntimeError(f"the {caller} run failed: {result.error}")
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in links.values():
            await link.close()
    sent = {h: sum(s.wire_bytes_sent for s in link.stats().values()) for h, link in links.items()}
    got = {h: sum(s.wire_bytes_received for s in link.stats().values()) for h, link in links.items()}
    edge = result.bytes_by_edge().get("librarian->assistant", 0)
    return {"caller": caller if host is None else f"host {caller}", "published_MB": sum(sent.values()) / 1e6,
            "caller_out_MB": sent["caller"] / 1e6, "caller_in_MB": got["caller"] / 1e6, "edge_trace_MB": edge / 1e6,
            "answer": result["assistant"].text[:60]}


def wire_rows(cfg: Config, payload_bytes: int) -> list[dict[str, Any]]:
    from agentmesh.graph import load_graph
    from agentmesh.models.pool import ModelPool
    from agentmesh.transport.broker import LocalBroker

    pool = ModelPool()
    rows = []
    with LocalBroker() as broker:
        for caller in (c for c in cfg.callers if c):
            row = asyncio.run(_wire_run(load_graph(GRAPH), caller, broker.url, pool))
            row["crossings"] = row["published_MB"] * 1e6 / payload_bytes
            rows.append(row)
    return rows


def run(cfg: Config = Config(), **_: Any) -> BenchResult:
    torch.manual_seed(cfg.seed)
    rows, payload = seal_rows(cfg)
    wire = wire_rows(cfg, payload)
    by = {r["seal"]: r for r in rows}
    summary = {"payload_bytes": payload, **{f"{r['seal']}_MB_per_s": r["MB_per_s"] for r in rows},
               "encrypt_cost_ms": by["hmac+aes-gcm"]["pack_ms"] + by["hmac+aes-gcm"]["unpack_ms"]
               - by["hmac"]["pack_ms"] - by["hmac"]["unpack_ms"], "wire": wire}
    tables = {}
    if wire:
        tables["Bytes on the wire, graphs/edge_cloud.yaml over a loopback mosquitto (exact)"] = (
            ["caller", "published_MB", "caller_out_MB", "caller_in_MB", "edge_trace_MB", "crossings"], wire)
    return BenchResult(
        name=NAME, title=f"Edge–cloud envelopes: seal and encryption cost on a {payload / 1e6:.1f} MB cache payload; "
                         "bytes on the wire per run",
        config=asdict(cfg), columns=["seal", "payload_MB", "pack_ms", "unpack_ms", "MB_per_s", "best_MB_per_s"],
        rows=rows, summary=summary, extra_tables=tables,
        notes=[f"medians of {cfg.repeats} interleaved rounds on one thread; MB_per_s: payload over pack + unpack "
               "(the same bytes are sealed by the sender and checked by the receiver)",
               "crossings: bytes every link published (requests, caches, acks, heartbeats, results) over the cache "
               "payload: about how many times the cache crossed the broker"])
