"""The default inference path does no wasted work: readings run no LM head, decoding asks for one
position of logits, caches are handed to transformers without a copy, and the tokens are those of
transformers' own greedy `generate`."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from agentmesh.c2c import C2CModel, Fuser
from agentmesh.cache.hf import to_hf
from agentmesh.models.inference import (GenerationConfig, RunningCache, decode, pad_sequences, prefill,
                                        prefill_with_logits)


@pytest.fixture(scope="module")
def pair(tiny_model_factory: Any) -> tuple[Any, Any]:
    receiver = tiny_model_factory("qwen3", "smol", seed=1, num_layers=3, num_kv_heads=2, head_dim=16)
    sharer = tiny_model_factory("llama", "smol", seed=3, num_layers=2, num_kv_heads=4, head_dim=8, num_heads=8)
    return receiver, sharer


class HeadCalls:
    """Counts an LM head's calls and the positions each call computed logits for."""

    def __init__(self, lm: Any):
        self.positions: list[int] = []
        self._handle = lm.model.get_output_embeddings().register_forward_hook(self._hook)

    def _hook(self, module: Any, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        self.positions.append(args[0].shape[1])

    def close(self) -> None:
        self._handle.remove()


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_readings_run_no_lm_head_and_decoding_one_position_per_step(pair: tuple[Any, Any]) -> None:
    receiver, sharer = pair
    torch.manual_seed(0)
    fuser = Fuser.build(receiver.signature, sharer.signature, hidden_dim=16, intermediate_dim=16).eval()
    c2c = C2CModel(receiver, [sharer], [fuser])
    ids, mask = pad_sequences([receiver.chat_ids("Tell me about the moon tonight."), receiver.chat_ids("Hi")],
                              receiver.tokenizer.pad_token_id)
    heads = {"receiver": HeadCalls(receiver), "sharer": HeadCalls(sharer)}
    try:
        prefill(sharer, ids, mask)
        assert heads["sharer"].positions == []
        tokens = c2c.generate(ids, mask, max_new_tokens=5, eos_token_id=-1)
    finally:
        for h in heads.values():
            h.close()
    assert tokens.shape == (2, 5)
    assert heads["sharer"].positions == []
    # one call per generated token, each computing the last position only (prefill computed none)
    assert heads["receiver"].positions == [1] * 5


def test_caches_reach_transformers_without_a_copy(pair: tuple[Any, Any]) -> None:
    receiver, _ = pair
    ids = torch.tensor([receiver.chat_ids("A short prompt about caches.")])
    kv = prefill(receiver, ids)
    hf = to_hf(kv, receiver.config)
    for layer, k, v in zip(hf.layers, kv.keys, kv.values):
        assert layer.keys.data_ptr() == k.data_ptr() and layer.values.data_ptr() == v.data_ptr()
    run = RunningCache.start(receiver, kv, 1)
    assert all(a.keys.data_ptr() == k.data_ptr() for a, k in zip(run.hf.layers, kv.keys))
    # the span a receiver reads of a longer sharer cache is a view of it, not a copy
    span = kv.slice_tokens(2, None)
    assert all(_storage(a) == _storage(b) for a, b in zip(span.keys, kv.keys))
    # and a cache handed over then extended leaves the original untouched
    before = [k.clone() for k in kv.keys]
    decode(receiver, kv, ids[:, -1:], None, GenerationConfig(max_new_tokens=3))
    assert all(torch.equal(a, b) for a, b in zip(before, kv.keys))


@pytest.mark.parametrize("prompt_tokens", [1, 7, 40])
def test_default_decode_is_token_identical_to_transformers_generate(pair: tuple[Any, Any], prompt_tokens: int) -> None:
    receiver, _ = pair
    g = torch.Generator().manual_seed(prompt_tokens)
    ids = torch.randint(5, receiver.config.vocab_size - 5, (1, prompt_tokens), generator=g)
    new = 12
    want = receiver.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                   min_new_tokens=new, do_sample=False, pad_token_id=0)[:, prompt_tokens:]
    cache = prefill(receiver, ids[:, :-1]) if prompt_tokens > 1 else None
    out = decode(receiver, cache, ids[:, -1:], None, GenerationConfig(max_new_tokens=new))  # type: ignore[arg-type]
    assert torch.equal(out.tokens, want)
    # the whole prompt in one pass (what an agent runs), its last logits picking the first token
    heads = HeadCalls(receiver)
    try:
        whole, logits = prefill_with_logits(receiver, ids)
        one_pass = decode(receiver, whole, ids[:, :0], None, GenerationConfig(max_new_tokens=new), first_logits=logits)
    finally:
        heads.close()
    assert torch.equal(one_pass.tokens, want)
    assert heads.positions == [1] * new  # new passes in all, as generate makes; each one position of logits
