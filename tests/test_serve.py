"""The OpenAI-compatible server, driven over loopback HTTP by the official `openai` client and httpx.

Tiny random models (a receiver, a sharer with another shape and a fuser with open gates) keep every
request to milliseconds; one server serves a C2C model, the receiver alone and a pipeline.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from agentmesh.c2c import C2CModel, Fuser  # noqa: E402
from agentmesh.models.inference import pad_sequences  # noqa: E402
from agentmesh.serve.app import create_app  # noqa: E402
from agentmesh.serve.config import Limits  # noqa: E402
from agentmesh.serve.engine import BatchEngine, PipelineEngine, StopScanner  # noqa: E402
from agentmesh.serve.server import ServerThread  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "Hi!", "Tell me about the moon, the stars and the sea tonight.",
    "Two plus three?", "Name a colour.", "Why is the sky blue? Explain it to a child in two sentences.",
    "ok", "Write one line of Python that adds two numbers.", "What does a cache store?",
    "The quick brown fox jumps over which animal?", "Count to five.", "Say something kind.",
    "Where is Berlin?", "Spell 'cat'.", "What is a fuser in Cache-to-Cache communication, briefly?", "Bye.",
]


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    receiver = tiny_model_factory("qwen3", "tiny", seed=11, num_layers=2, num_kv_heads=2, head_dim=16)
    sharer = tiny_model_factory("llama", "tiny", seed=12, num_layers=3, num_kv_heads=1, head_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        fuser = Fuser.build(receiver.signature, sharer.signature, hidden_dim=16, intermediate_dim=16)
    for p in fuser.projectors:  # open gates: the fused answer differs from the receiver's own
        p.key_gate_logit.data.fill_(2.0)
        p.value_gate_logit.data.fill_(2.0)
    return receiver, sharer, fuser.eval()


@pytest.fixture(scope="module")
def pool(tiny):
    from agentmesh.models.pool import ModelPool

    pool = ModelPool()
    pool.put("tiny-receiver", tiny[0])
    pool.put("tiny-sharer", tiny[1])
    return pool


def pipeline_graph():
    from agentmesh.graph import Graph

    g = Graph("two_step")
    g.agent("writer", model="tiny-sharer", prompt="Notes on: {input}", max_new_tokens=6)
    g.agent("answerer", model="tiny-receiver", prompt="{input}\nNotes: {writer}", max_new_tokens=10)
    g.text("writer", "answerer")
    return g


@pytest.fixture(scope="module")
def engines(tiny, pool):
    receiver, sharer, fuser = tiny
    made = {
        "tiny-c2c": BatchEngine("tiny-c2c", C2CModel(receiver, [sharer], [fuser]), max_batch_size=16, window_s=0.05),
        "tiny": BatchEngine("tiny", C2CModel(receiver)),
        "tiny-pipeline": PipelineEngine("tiny-pipeline", pipeline_graph(), pool=pool),
    }
    yield made
    for e in made.values():
        e.close()


@pytest.fixture(scope="module")
def server(engines):
    app = create_app(engines, limits=Limits(max_request_bytes=16_384, max_tokens=4096, default_max_tokens=24))
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def solo(model: C2CModel, question: str, max_tokens: int, **kw) -> tuple[str, int]:
    """(text, tokens) that `model` writes for `question` alone, greedily, stopping at EOS."""
    ids, mask = pad_sequences([model.receiver.chat_ids([{"role": "user", "content": question}])], model.receiver.pad_token_id)
    out = model.generate(ids, mask, max_new_tokens=max_tokens, **kw)[0].tolist()
    eos = set(model.receiver.eos_token_ids)
    kept = out[:next((i for i, t in enumerate(out) if t in eos), len(out))]
    return model.tokenizer.decode(kept, skip_special_tokens=True), len(kept)


def ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def test_models_and_health(client, server):
    assert {m.id for m in client.models.list()} == {"tiny-c2c", "tiny", "tiny-pipeline"}
    assert client.models.retrieve("tiny-c2c").owned_by == "agentmesh"
    health = httpx.get(server.base + "/health").json()
    assert health["status"] == "ok" and health["models"]["tiny-pipeline"]["kind"] == "pipeline"


def test_non_streaming_answer_is_the_solo_answer(client, engines):
    text, n = solo(engines["tiny-c2c"].model, QUESTIONS[0], 12)
    r = client.chat.completions.create(model="tiny-c2c", messages=ask(QUESTIONS[0]), temperature=0, max_tokens=12)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == ("length" if n == 12 else "stop")
    prompt = len(engines["tiny-c2c"].model.receiver.chat_ids(ask(QUESTIONS[0])))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt, n, prompt + n)
    # The fused model and the receiver alone really are two different models.
    alone = client.chat.completions.create(model="tiny", messages=ask(QUESTIONS[0]), temperature=0, max_tokens=12)
    assert alone.choices[0].message.content == solo(engines["tiny"].model, QUESTIONS[0], 12)[0] != text


def test_streaming_chunks_add_up_to_the_answer(client, engines):
    expected, n = solo(engines["tiny-c2c"].model, QUESTIONS[2], 16)
    stream = client.chat.completions.create(model="tiny-c2c", messages=ask(QUESTIONS[2]), temperature=0,
                                            max_tokens=16, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length" if n == 16 else "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n


def test_raw_stream_ends_with_done(server):
    body = {"model": "tiny", "messages": ask("Hi!"), "stream": True, "max_tokens": 4, "temperature": 0}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_stop_sequences_cut_the_answer_in_both_modes(client, engines):
    full, _ = solo(engines["tiny-c2c"].model, QUESTIONS[5], 30, eos_token_id=[])
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), f"pick a visible stop string from {full!r}"
    want = full[:full.index(stop)]
    kw = dict(model="tiny-c2c", messages=ask(QUESTIONS[5]), temperature=0, max_tokens=30, stop=[stop, "\x00never"],
              extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want, "stop")
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw))
    assert streamed == want


def test_stop_scanner_never_releases_part_of_a_stop_string():
    scanner = StopScanner(["END"])
    assert scanner.push("abc E") == ("abc ", False)   # "E" might start "END"
    assert scanner.push("Nx") == ("ENx", False)       # it did not
    assert scanner.push("yEN") == ("y", False)
    assert scanner.push("D and more") == ("", True)
    assert scanner.text == "abc ENxy"


def test_seeded_sampling_repeats_alone_and_in_a_batch(server):
    async def main():
        async with openai.AsyncOpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=60) as c:
            kw = dict(model="tiny-c2c", messages=ask(QUESTIONS[3]), temperature=1.0, top_p=0.9, max_tokens=12,
                      extra_body={"ignore_eos": True})
            first = await c.chat.completions.create(seed=7, **kw)
            crowd = await asyncio.gather(*[c.chat.completions.create(seed=s, **kw) for s in (7, 8, 7, 9)])
            return first.choices[0].message.content, [r.choices[0].message.content for r in crowd]

    first, crowd = asyncio.run(main())
    assert crowd[0] == crowd[2] == first
    assert len(set(crowd)) > 1  # other seeds sample other answers


def test_sixteen_concurrent_streams_each_match_their_solo_answer(server, engines):
    model = engines["tiny-c2c"].model
    limits = [8 + (i * 5) % 17 for i in range(16)]  # different lengths: rows stop on their own
    expected = [solo(model, q, n)[0] for q, n in zip(QUESTIONS, limits)]
    batches_before = engines["tiny-c2c"].stats.batches

    async def one(c, question, n):
        stream = await c.chat.completions.create(model="tiny-c2c", messages=ask(question), temperature=0,
                                                 max_tokens=n, stream=True)
        pieces, reasons = [], []
        async for chunk in stream:
            pieces.append(chunk.choices[0].delta.content or "")
            reasons.append(chunk.choices[0].finish_reason)
        return "".join(pieces), [r for r in reasons if r]

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*[one(c, q, n) for q, n in zip(QUESTIONS, limits)])

    results = asyncio.run(main())
    assert [text for text, _ in results] == expected
    assert all(len(reasons) == 1 for _, reasons in results)  # every stream completed with a finish reason
    stats = engines["tiny-c2c"].stats
    # 16 requests ran in fewer batches than requests: they were batched together.
    assert stats.batches - batches_before < 16 and stats.largest_batch > 1


def test_a_disconnected_client_stops_its_generation(server, engines):
    engine = engines["tiny"]
    cancelled = engine.stats.cancelled
    body = {"model": "tiny", "messages": ask("Go on forever."), "stream": True, "max_tokens": 1500,
            "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.monotonic() + 60
    while engine.stats.cancelled == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats.cancelled == cancelled + 1
    # The engine is free again: the next request is answered (it would wait behind 1500 tokens otherwise).
    r = httpx.post(server.url + "/chat/completions", json={"model": "tiny", "messages": ask("Hi!"), "max_tokens": 3},
                   timeout=60)
    assert r.status_code == 200


def test_pipeline_model_answers_with_its_output_agent(client, pool):
    from agentmesh.runtime import run_graph

    want = run_graph(pipeline_graph(), "Why is the sea salty?", pool=pool)["answerer"].text
    r = client.chat.completions.create(model="tiny-pipeline", messages=ask("Why is the sea salty?"))
    assert r.choices[0].message.content.strip() == want.strip()
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0


@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope", "messages": ask("hi")}, 404, "model"),
    ({"model": "tiny", "messages": ask("hi"), "temperature": 5}, 422, "temperature"),
    ({"model": "tiny", "messages": []}, 422, "messages"),
    ({"model": "tiny"}, 422, "messages"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 422, "messages.0.role"),
    ({"model": "tiny", "messages": ask("hi"), "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ({"model": "tiny", "messages": ask("hi"), "n": 2}, 400, "n"),
    ({"model": "tiny", "messages": ask("hi"), "max_tokens": 100_000}, 400, "max_tokens"),
    ({"model": "tiny", "messages": ask("hi" * 3000)}, 400, "messages"),
    ({"model": "tiny", "messages": ask("hi"), "tools": [{"type": "function"}]}, 400, "tools"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = httpx.post(server.url + "/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and (err["param"] or "").startswith(param)
    assert "Traceback" not in r.text


def test_malformed_oversized_and_misrouted_requests(server):
    url = server.url + "/chat/completions"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(url, content=b"x" * 20_000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "16384" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/completions/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    r = httpx.get(server.url + "/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_api_keys_and_a_full_queue(tiny):
    receiver = tiny[0]
    engine = BatchEngine("tiny", C2CModel(receiver), max_queue=1)
    app = create_app({"tiny": engine}, api_keys={"sekrit"})
    try:
        with ServerThread(app) as s:
            assert httpx.get(s.url + "/models").status_code == 401
            assert httpx.get(s.url + "/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert httpx.get(s.base + "/health").status_code == 200
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=s.url, api_key="wrong", max_retries=0).models.list()
            good = openai.OpenAI(base_url=s.url, api_key="sekrit", max_retries=0, timeout=60)
            long = good.chat.completions.create(model="tiny", messages=ask("hi"), max_tokens=1500, stream=True,
                                                extra_body={"ignore_eos": True})
            next(iter(long))  # admitted and running: the queue (of 1) is now full
            with pytest.raises(openai.RateLimitError) as e:
                good.chat.completions.create(model="tiny", messages=ask("hi"), max_tokens=2)
            assert e.value.status_code == 429 and "limit is 1" in str(e.value)
            long.close()
    finally:
        engine.close()


def test_serve_command_rejects_a_bad_config_in_one_line(tmp_path, capsys):
    from agentmesh.cli import main

    bad = tmp_path / "serve.yaml"
    bad.write_text("models:\n  x: {model: a, pipeline: b.yaml}\n")
    with pytest.raises(SystemExit) as e:
        main(["serve", "--config", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"serve config {bad}: models.x: give either `model`" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_agentmesh_serve_command(tmp_path, tiny_tokenizer):
    from agentmesh.models.tiny import save_tiny_model

    folder = save_tiny_model(tmp_path / "tiny-llama", "llama", tiny_tokenizer, seed=3, num_layers=2)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "AGENTMESH_API_KEYS": ""}
    cmd = [sys.executable, "-c", "from agentmesh.cli import main; main()", "serve"]
    proc = subprocess.Popen(cmd + ["--model", str(folder), "--port", "0", "--name", "llama"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        url, log = None, []
        for line in proc.stderr:
            log.append(line)
            if line.startswith("ready: "):
                url = line.split()[1]
                break
        assert url and url.startswith("http://127.0.0.1:"), "".join(log)
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="llama", messages=ask("Hi!"), max_tokens=5, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=60)[1]
    assert "POST /v1/chat/completions model=llama" in rest and "latency_ms=" in rest
