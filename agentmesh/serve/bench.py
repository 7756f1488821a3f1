"""`agentmesh bench serve`: the server under 1, 4 and 16 concurrent clients, over HTTP.

Each client is a closed loop: it streams one chat completion, waits for the end, sends the next.
Every request asks for exactly `new_tokens` tokens (EOS ignored) so that all concurrency levels do
the same work per request; prompts are context-task questions, rotating. The server is started
in this process on the embedded C2C pair (SmolLM2-135M receiver and sharer, the shipped fuser)
unless `url` names a running one. Reported per level: requests/s, generated tokens/s, latency and
time to first token (p50/p95, as the client sees them) and the server's mean batch size.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

from agentmesh.bench.common import BenchResult, ModelBench, Target, bench_models, median, pct

NAME = "serve"
TARGET_RATIO = 3.0


@dataclass(frozen=True)
class Config(ModelBench):
    clients: tuple[int, ...] = (1, 4, 16)
    rounds: int = 2                   # requests per client (the one-client level sends at least `min_requests`)
    min_requests: int = 4
    new_tokens: int = 64
    window_ms: float = 10.0
    rejoin_ms: float = 250.0
    max_batch_size: int = 16
    url: str | None = None            # a running server (its /v1 URL); None: start one here
    model: str = "smollm2-c2c"

    @classmethod
    def quick(cls, **overrides: Any) -> "Config":
        return cls(**{"new_tokens": 32, "rounds": 2, "min_requests": 2, "clients": (1, 16), **overrides})


def _questions(n: int, seed: int) -> list[list[dict[str, str]]]:
    from agentmesh.bench.c2c_vs_t2t import load_items
    from agentmesh.tasks.prompts import receiver_messages

    return [list(receiver_messages(item)) for item in load_items(n, seed)]


async def _client(http: Any, url: str, model: str, prompts: list[Any], count: int, offset: int, new_tokens: int,
                  out: list[dict[str, float]]) -> None:
    import orjson

    for k in range(count):
        body = {"model": model, "messages": prompts[(offset + k) % len(prompts)], "stream": True,
                "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        start, first, tokens = time.perf_counter(), None, 0
        async with http.stream("POST", url + "/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"the server answered {r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = orjson.loads(line[6:])
                if first is None and data.get("choices") and data["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - start
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
        out.append({"latency_s": time.perf_counter() - start, "ttft_s": first if first is not None else float("nan"),
                    "tokens": tokens})


async def _level(url: str, cfg: Config, prompts: list[Any], clients: int, per_client: int) -> tuple[float, list[Any]]:
    import httpx

    out: list[dict[str, float]] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*[_client(http, url, cfg.model, prompts, per_client, i * per_client, cfg.new_tokens, out)
                               for i in range(clients)])
        return time.perf_counter() - start, out


def _start_server(cfg: Config) -> tuple[Any, Any, str]:
    from agentmesh.c2c.model import C2CModel
    from agentmesh.serve.app import create_app
    from agentmesh.serve.engine import BatchEngine
    from agentmesh.serve.server import ServerThread

    receiver, sharer, fuser, source = bench_models(cfg)
    engine = BatchEngine(cfg.model, C2CModel(receiver, [sharer], [fuser]), max_batch_size=cfg.max_batch_size,
                         window_s=cfg.window_ms / 1000, rejoin_s=cfg.rejoin_ms / 1000,
                         max_queue=4 * max(cfg.clients))
    server = ServerThread(create_app({cfg.model: engine})).__enter__()
    return server, engine, source


def run(cfg: Config = Config()) -> BenchResult:
    server, engine, source = (None, None, "the server at " + cfg.url) if cfg.url else _start_server(cfg)
    url = cfg.url or server.url
    top = max(cfg.clients)
    prompts = _questions(max(top * cfg.rounds, cfg.min_requests, 8), cfg.seed)
    rows = []
    try:
        print(f"serving {cfg.model} at {url}; warming up", flush=True)
        asyncio.run(_level(url, cfg, prompts, 1, 1))  # warm-up (first-call allocations)
        for clients in cfg.clients:
            per_client = max(cfg.rounds, -(-cfg.min_requests // clients))
            before = (engine.stats.batches, engine.stats.rows) if engine is not None else (0, 0)
            wall, done = asyncio.run(_level(url, cfg, prompts, clients, per_client))
            lat = [d["latency_s"] for d in done]
            ttft = [d["ttft_s"] for d in done]
            tokens = sum(d["tokens"] for d in done)
            batches = (engine.stats.batches - before[0], engine.stats.rows - before[1]) if engine else (0, 0)
            rows.append({"clients": clients, "requests": len(done), "wall_s": wall, "requests_per_s": len(done) / wall,
                         "tokens_per_s": tokens / wall, "p50_latency_s": median(lat), "p95_latency_s": pct(lat, 0.95),
                         "p50_ttft_s": median(ttft), "p95_ttft_s": pct(ttft, 0.95),
                         "mean_batch": batches[1] / batches[0] if batches[0] else float("nan")})
            print(f"{clients:>3} client(s): {len(done)} requests in {wall:.1f} s, "
                  f"{rows[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    finally:
        if server is not None:
            server.__exit__(None, None, None)
            engine.close()
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["vs_1_client"] = row["tokens_per_s"] / base
    ratio = rows[-1]["vs_1_client"]
    return BenchResult(
        name=NAME, title=f"Serving over HTTP: {', '.join(map(str, cfg.clients))} concurrent clients ({cfg.model})",
        config={**asdict(cfg), "fuser": source},
        columns=["clients", "requests", "wall_s", "requests_per_s", "tokens_per_s", "vs_1_client", "p50_latency_s",
                 "p95_latency_s", "p50_ttft_s", "p95_ttft_s", "mean_batch"],
        rows=rows, summary={"throughput_ratio": ratio},
        targets=[Target(f"{top} concurrent clients / 1 client, generated tokens/s", ratio, ">=", TARGET_RATIO, "x")],
        notes=[f"{cfg.new_tokens} tokens per request (EOS ignored), greedy, streamed; closed-loop clients; "
               f"batch window {cfg.window_ms:g} ms (rejoin {cfg.rejoin_ms:g} ms), at most {cfg.max_batch_size} "
               f"per batch; fuser: {source}",
               "latency and time to first token as the client measures them (queueing included); a request "
               "that arrives while a batch runs waits for the next batch"])
