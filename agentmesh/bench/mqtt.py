"""Benchmark 5: a KV cache over MQTT (`MqttLink`) through a loopback mosquitto (`LocalBroker`).

The cache: 256 tokens of the embedded model's shape (30 layers, 3 KV heads of dim 64, float32 as
the CPU engine holds it), encoded once as a bf16 payload (`encode_cache`). For each chunk size, a
sender link and a receiver link (QoS 1, like every agentmesh link) move the payload; the time runs
from `send` being called to `receive` returning the whole, checked payload. Chunk sizes are
interleaved round by round after a warm-up transfer each. A last row times the whole cache-to-cache
path at the default chunk size: encode, send, receive, decode.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from agentmesh.bench.common import BenchResult, CacheShape, Target, make_cache, median

if TYPE_CHECKING:
    from agentmesh.cache.kv import KVCache
    from agentmesh.transport.link import Link

NAME = "mqtt"
TARGET_MBPS = 100.0
DEFAULT_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Config(CacheShape):
    wire: str = "bf16"
    chunk_sizes: tuple[int, ...] = (64 * 1024, 256 * 1024, 1024 * 1024, 4 * 1024 * 1024, 16 * 1024 * 1024)
    repeats: int = 8
    qos: int = 1

    @classmethod
    def quick(cls, **overrides: Any) -> "Config":
        return cls(**{"repeats": 2, "chunk_sizes": (64 * 1024, 256 * 1024, 4 * 1024 * 1024), **overrides})


def cpu_seconds(pid: int | None) -> float:
    """CPU time a process has used (Linux schedstat, nanosecond resolution); nan where unknown."""
    if pid is None:
        return float("nan")
    try:
        return int(open(f"/proc/{pid}/schedstat").read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return float("nan")


async def _transfer(sender: Link, receiver: Link, channel: str, payload: bytes) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    got = asyncio.ensure_future(receiver.receive(channel, timeout=120))
    await sender.send(channel, payload, timeout=120)
    data = await got
    elapsed = loop.time() - start
    if len(data) != len(payload):
        raise RuntimeError(f"received {len(data)} bytes, sent {len(payload)}")
    return elapsed


async def _measured(sender: Link, receiver: Link, channel: str, payload: bytes,
                    broker_pid: int | None) -> tuple[float, float, float]:
    """(wall, this process's CPU, the broker's CPU) seconds of one transfer."""
    c0, b0 = time.process_time(), cpu_seconds(broker_pid)
    wall = await _transfer(sender, receiver, channel, payload)
    return wall, time.process_time() - c0, cpu_seconds(broker_pid) - b0


async def _run(cfg: Config, url: str, payload: bytes, kv: KVCache,
               broker_pid: int | None = None) -> tuple[dict[int, list[tuple[float, float, float]]], dict[int, Any],
                                                       list[float], list[float]]:
    from contextlib import AsyncExitStack

    from agentmesh.cache.codec import decode_cache, encode_cache
    from agentmesh.transport.config import BrokerConfig
    from agentmesh.transport.mqtt import MqttLink

    times: dict[int, list[tuple[float, float, float]]] = {c: [] for c in cfg.chunk_sizes}
    stats: dict[int, Any] = {}
    pipeline: list[float] = []
    codec_only: list[float] = []
    async with AsyncExitStack() as stack:
        pairs = {}
        for size in cfg.chunk_sizes:
            conf = BrokerConfig(url=url, chunk_bytes=size, qos=cfg.qos)  # type: ignore[arg-type]
            a = await stack.enter_async_context(MqttLink(conf, graph="bench"))
            b = await stack.enter_async_context(MqttLink(conf, graph="bench"))
            channel = f"run/chunk{size}"
            await b.subscribe(channel)
            await _transfer(a, b, channel, payload)  # warm-up
            pairs[size] = (a, b, channel)
        for r in range(cfg.repeats):
            order = list(cfg.chunk_sizes)
            shift = r % len(order)
            for size in order[shift:] + order[:shift]:
                a, b, channel = pairs[size]
                times[size].append(await _measured(a, b, channel, payload, broker_pid))
        for size, (a, b, channel) in pairs.items():
            stats[size] = b.stats().get(channel)
        default = DEFAULT_CHUNK if DEFAULT_CHUNK in pairs else cfg.chunk_sizes[0]
        a, b, channel = pairs[default]
        loop = asyncio.get_running_loop()
        for _ in range(max(2, cfg.repeats // 2)):
            start = loop.time()
            data = encode_cache(kv, dtype=cfg.wire)
            got = asyncio.ensure_future(b.receive(channel, timeout=120))
            await a.send(channel, data, timeout=120)
            decode_cache(await got, dtype=kv.dtype)
            pipeline.append(loop.time() - start)
            start = loop.time()
            decode_cache(encode_cache(kv, dtype=cfg.wire), dtype=kv.dtype)
            codec_only.append(loop.time() - start)
    return times, stats, pipeline, codec_only


def run(cfg: Config = Config(), **_: Any) -> BenchResult:
    from agentmesh.cache.codec import encode_cache
    from agentmesh.transport.broker import LocalBroker

    kv = make_cache(cfg, torch.float32)
    payload = encode_cache(kv, dtype=cfg.wire)
    with LocalBroker() as broker:
        pid = broker._proc.pid if getattr(broker, "_proc", None) is not None else None
        times, stats, pipeline, codec_only = asyncio.run(_run(cfg, broker.url, payload, kv, pid))
    size_mb = len(payload) / 1e6
    best = min(median(w for w, _, _ in t) for t in times.values())
    rows = []
    for size in cfg.chunk_sizes:
        t = median(w for w, _, _ in times[size])
        own, brk = median(c for _, c, _ in times[size]), median(b for _, _, b in times[size])
        s = stats.get(size)
        chunks = -(-len(payload) // size)
        rows.append({"chunk_KiB": size // 1024, "chunks": chunks, "median_ms": t * 1e3,
                     "MB_per_s": size_mb / t, "vs_best": t / best, "python_cpu_ms": own * 1e3,
                     "broker_cpu_ms": brk * 1e3, "cpu_bound_MB_per_s": size_mb / (own + brk),
                     "wire_overhead_pct": 100.0 * ((s.wire_bytes_received / max(s.messages_received, 1)) / len(payload) - 1)
                     if s is not None and s.messages_received else float("nan")})
    default = next((r for r in rows if r["chunk_KiB"] * 1024 == DEFAULT_CHUNK), rows[0])
    pipe = median(pipeline)
    summary = {"payload_bytes": len(payload), "cache_bytes": kv.nbytes, "best_MB_per_s": size_mb / best,
               "default_chunk_MB_per_s": default["MB_per_s"], "cache_to_cache_ms": pipe * 1e3,
               "codec_only_ms": median(codec_only) * 1e3,
               "cache_to_cache_MB_per_s_of_payload": size_mb / pipe,
               "times_s": {str(k): [w for w, _, _ in v] for k, v in times.items()},
               "python_cpu_s": {str(k): [c for _, c, _ in v] for k, v in times.items()},
               "broker_cpu_s": {str(k): [b for _, _, b in v] for k, v in times.items()}}
    extra = {"Cache to cache at the default chunk size (256 KiB)": (
        ["step", "median_ms", "payload_MB_per_s"],
        [{"step": "encode + send + receive + decode", "median_ms": pipe * 1e3, "payload_MB_per_s": size_mb / pipe},
         {"step": "encode + decode only (no link)", "median_ms": median(codec_only) * 1e3,
          "payload_MB_per_s": size_mb / median(codec_only)}])}
    return BenchResult(
        name=NAME, title=(f"MQTT link, loopback mosquitto: {cfg.tokens}-token cache as a {cfg.wire} payload of "
                          f"{size_mb:.2f} MB (QoS {cfg.qos})"),
        config=asdict(cfg), columns=["chunk_KiB", "chunks", "median_ms", "MB_per_s", "vs_best", "python_cpu_ms",
                                     "broker_cpu_ms", "cpu_bound_MB_per_s", "wire_overhead_pct"],
        rows=rows, summary=summary,
        targets=[Target("link throughput at the default 256 KiB chunks (wall clock)", default["MB_per_s"], ">=",
                        TARGET_MBPS, " MB/s"),
                 Target("link throughput at the default 256 KiB chunks (CPU-bound)", default["cpu_bound_MB_per_s"],
                        ">=", TARGET_MBPS, " MB/s")],
        notes=[f"median of {cfg.repeats} interleaved rounds after a warm-up transfer per chunk size; sender, "
               "receiver and broker share this machine's cores",
               "vs_best: time relative to the fastest chunk size (the chunking overhead); python_cpu_ms: CPU time of "
               "this process (sender and receiver links) per transfer, broker_cpu_ms: mosquitto's; cpu_bound_MB_per_s: "
               "the payload over both, what the link would move if it never waited for a core"],
        extra_tables=extra)
