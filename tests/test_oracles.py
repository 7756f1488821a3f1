"""Replacement oracles and include-response fusion on tiny models.

`oracle`: the receiver reads the sharer's own span cache. `oracle-response`: every token the
receiver reads, prompt and response, has the sharer's K/V before the receiver's attention reads it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from agentmesh.c2c import C2CModel, Fuser
from agentmesh.errors import ConfigError
from agentmesh.models.inference import decode, next_token_logits, pad_sequences, prefill
from agentmesh.models.pool import ModelPool

NEW = 6


@pytest.fixture(scope="module")
def pair(tiny_model_factory: Callable[..., Any]) -> tuple[Any, Any]:
    return tiny_model_factory("qwen3", seed=0), tiny_model_factory("qwen3", seed=1)


@pytest.fixture(scope="module")
def batch(pair: tuple[Any, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    receiver = pair[0]
    rows = [receiver.chat_ids("What is the capital of France?"), receiver.chat_ids("Hi")]
    return pad_sequences(rows, receiver.tokenizer.pad_token_id)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_prompt_oracle_is_the_receiver_continuing_from_the_sharer_span(tiny_model_factory, arch: str) -> None:
    receiver, sharer = tiny_model_factory(arch, seed=0), tiny_model_factory(arch, seed=1)
    ids = torch.tensor([receiver.chat_ids("What is the capital of France?")])
    oracle = C2CModel(receiver, [sharer], [Fuser.oracle(receiver.signature, sharer.signature)])
    want = next_token_logits(receiver, prefill(sharer, ids[:, :-1]), ids[:, -1:])
    torch.testing.assert_close(oracle.logits(ids), want, rtol=0, atol=1e-5)
    assert not torch.allclose(want, C2CModel(receiver).logits(ids), atol=1e-3)  # the sharer's cache matters


def test_oracle_needs_same_shape(tiny_model_factory) -> None:
    receiver = tiny_model_factory("qwen3", seed=0)
    other = tiny_model_factory("qwen3", seed=0, num_layers=3)
    with pytest.raises(ConfigError, match="receiver's shape"):
        Fuser.oracle(receiver.signature, other.signature)


def test_response_oracle_fuses_every_token_before_attention(pair, batch) -> None:
    receiver, sharer = pair
    ids, mask = batch
    oracle = C2CModel(receiver, [sharer], [Fuser.oracle(receiver.signature, sharer.signature,
                                                        fusion="prompt+response")])
    assert oracle.fusion == "prompt+response"
    cache, rest, rest_mask, hook = oracle.start(ids, mask)
    assert cache is None and hook is not None and torch.equal(rest, ids)
    gen = oracle.generation_config(max_new_tokens=NEW, eos_token_id=[])
    out = decode(receiver, cache, rest, rest_mask, gen, hook=hook, return_cache=True)
    # Every K/V the receiver stored (prompt, and generated tokens read back) is the sharer's own.
    read = torch.cat([ids, out.tokens[:, :-1]], 1)
    read_mask = torch.cat([mask, torch.ones_like(out.tokens[:, :-1])], 1)
    mine = prefill(sharer, read, read_mask)
    real = read_mask.bool()
    for (k, v), (sk, sv) in zip(out.cache, mine):
        torch.testing.assert_close(k.transpose(1, 2)[real], sk.transpose(1, 2)[real], rtol=0, atol=1e-5)
        torch.testing.assert_close(v.transpose(1, 2)[real], sv.transpose(1, 2)[real], rtol=0, atol=1e-5)
    # The last prompt token is fused too, so the first answer differs from the span-only oracle's.
    span_only = C2CModel(receiver, [sharer], [Fuser.oracle(receiver.signature, sharer.signature)])
    assert not torch.allclose(oracle.logits(ids, mask), span_only.logits(ids, mask), atol=1e-4)
    # Batched rows compute what they compute alone.
    alone = oracle.generate(ids[1:, mask[1].bool()], max_new_tokens=NEW)
    assert torch.equal(oracle.generate(ids, mask, max_new_tokens=NEW)[1, :alone.shape[1]], alone[0])


def test_response_fusion_with_itself_is_the_receiver_alone(pair, batch) -> None:
    receiver = pair[0]
    ids, mask = batch
    same = C2CModel(receiver, [receiver], [Fuser.oracle(receiver.signature, receiver.signature,
                                                        fusion="prompt+response")])
    assert torch.equal(same.generate(ids, mask, max_new_tokens=NEW), C2CModel(receiver).generate(ids, mask, max_new_tokens=NEW))


def test_fusers_of_one_model_fuse_the_same_tokens(pair) -> None:
    receiver, sharer = pair
    with pytest.raises(ConfigError, match="same tokens"):
        C2CModel(receiver, [sharer, sharer], [Fuser.oracle(receiver.signature, sharer.signature),
                                              Fuser.oracle(receiver.signature, sharer.signature, fusion="prompt+response")])


def test_eval_runs_both_oracles(tmp_path: Path, pair) -> None:
    from agentmesh.tasks.context_task import write_context_task
    from agentmesh.eval.runner import evaluate, parse_config

    receiver, sharer = pair
    pool = ModelPool()
    pool.put("r", receiver)
    pool.put("s", sharer)
    paths = write_context_task(tmp_path / "ctx", seed=0, n_train=0, n_test=2)
    config = parse_config({
        "receiver": "r", "sharer": "s", "methods": ["receiver", "oracle", "oracle-response"],
        "dataset": {"path": str(paths["test"])}, "max_new_tokens": 3, "output": str(tmp_path / "out")})
    summary = evaluate(config, pool=pool, progress=False)
    assert list(summary.methods) == ["receiver", "oracle", "oracle-response"]
    assert all(r.error is None for r in summary.results)
    per_token = 2 * sharer.signature.num_layers * sharer.signature.num_kv_heads * sharer.signature.head_dim * 4
    by = {m: [r for r in summary.results if r.method == m] for m in summary.methods}
    # The response oracle sends the sharer's K/V of every token read; the span oracle the span's only.
    for span, full in zip(by["oracle"], by["oracle-response"]):
        assert span.bytes_exchanged % per_token == 0 and full.bytes_exchanged > span.bytes_exchanged


def test_prompt_response_fusers_train_through_the_rewriting_cache(tmp_path: Path, pair) -> None:
    import json

    from agentmesh.c2c.checkpoints import load_fuser
    from agentmesh.c2c.train import train

    receiver, sharer = pair
    pool = ModelPool()
    pool.put("r", receiver)
    pool.put("s", sharer)
    rows = [{"messages": [{"role": "user", "content": "What is the secret word?"}, {"role": "assistant", "content": w}],
             "context": f"The secret word is {w}."} for w in ["apple", "river", "stone", "cloud"] * 3]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {}
    for fusion in ("prompt", "prompt+response"):
        recipe = {"receiver": "r", "sharer": "s", "sharer_context": True, "fusion": fusion, "steps": 2, "lr": 1e-2,
                  "batch_size": 4, "projector": {"hidden_dim": 16, "intermediate_dim": 16, "dropout": 0.0},
                  "data": {"path": str(data), "eval_path": str(data)}, "eval_every": 0, "save_every": 0,
                  "output": str(tmp_path / fusion)}
        results[fusion] = train(recipe, pool=pool, progress=False, resume=False)
    fused, spanned = results["prompt+response"], results["prompt"]
    # A fresh fuser's gates are closed at inference: before training both modes are the receiver alone.
    assert fused.eval_losses[0][1] == pytest.approx(spanned.eval_losses[0][1], rel=1e-5)
    assert all(loss == loss and loss > 0 for loss in fused.losses)
    saved = load_fuser(fused.fuser_dir)
    # Gate logits start at 0; AdamW moved them, so gradients reached the projectors through the cache.
    assert all(float(p.key_gate_logit.detach()) != 0 and float(p.value_gate_logit.detach()) != 0 for p in saved.projectors)
    assert saved.config.fusion == "prompt+response"
    assert C2CModel(receiver, [sharer], [saved]).fusion == "prompt+response"


def test_response_fusion_benchmark_smallest(pair) -> None:
    from agentmesh.bench import module

    mod = module("response_fusion")
    result = mod.run(mod.Config(new_tokens=3, repeats=1, hidden_dim=8), receiver=pair[0], sharer=pair[1])
    modes = [r["mode"] for r in result.rows]
    assert modes[0] == "receiver" and "prompt+response (C2CProjector)" in modes and len(modes) == 5
    assert all(r["first_token_s"] > 0 for r in result.rows)
