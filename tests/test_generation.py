"""Fused generation (issue 2): tiny random models of different architectures and shapes."""
from __future__ import annotations

import threading

import pytest
import torch

from agentmesh.c2c import C2CModel, Fuser
from agentmesh.errors import CheckpointError, ConfigError

NEW = 8


@pytest.fixture(scope="module")
def models(tiny_model_factory):
    """Receiver and sharers that differ in layers, KV heads and head dims (shared SmolLM2 vocab)."""
    receiver = tiny_model_factory("qwen3", "smol", seed=1, num_layers=3, num_kv_heads=2, head_dim=16)
    qwen2 = tiny_model_factory("qwen2", "smol", seed=2, num_layers=4, num_kv_heads=1, head_dim=32)
    llama = tiny_model_factory("llama", "smol", seed=3, num_layers=2, num_kv_heads=4, head_dim=8, num_heads=8)
    return receiver, qwen2, llama


def make_fuser(receiver, sharer, *, gate: float, seed: int = 0, **kw) -> Fuser:
    torch.manual_seed(seed)
    fuser = Fuser.build(receiver.signature, sharer.signature, hidden_dim=32, intermediate_dim=32, **kw)
    for p in fuser.projectors:
        p.key_gate_logit.data.fill_(gate)
        p.value_gate_logit.data.fill_(gate)
    return fuser.eval()


@pytest.fixture(scope="module")
def prompts(models):
    receiver = models[0]
    texts = ["Tell me about the moon and the stars tonight.", "Hi!"]
    rows = [receiver.chat_ids(t) for t in texts]
    from agentmesh.models.inference import pad_sequences
    return pad_sequences(rows, receiver.tokenizer.pad_token_id)


def test_closed_gates_and_zero_init_match_receiver_alone(models, prompts):
    receiver, qwen2, llama = models
    ids, mask = prompts
    alone = C2CModel(receiver)
    closed = C2CModel(receiver, [qwen2, llama], [make_fuser(receiver, qwen2, gate=-1.0), make_fuser(receiver, llama, gate=-1.0)])
    zero = C2CModel(receiver, [qwen2], [make_fuser(receiver, qwen2, gate=1.0, zero_init=True)])
    base_logits = alone.logits(ids, mask)
    assert torch.equal(closed.logits(ids, mask), base_logits)
    assert torch.equal(zero.logits(ids, mask), base_logits)
    base_tokens = alone.generate(ids, mask, max_new_tokens=NEW)
    assert torch.equal(closed.generate(ids, mask, max_new_tokens=NEW), base_tokens)
    assert torch.equal(zero.generate(ids, mask, max_new_tokens=NEW), base_tokens)


def test_open_gates_change_the_output(models, prompts):
    receiver, qwen2, _ = models
    ids, mask = prompts
    fused = C2CModel(receiver, [qwen2], [make_fuser(receiver, qwen2, gate=1.0)])
    assert not torch.allclose(fused.logits(ids, mask), C2CModel(receiver).logits(ids, mask))


def _fused_cache(model, ids, mask):
    from agentmesh.models.inference import left_pad
    return model.prefill_fused(*left_pad(ids, mask))


def test_parallel_is_receiver_plus_sum_of_residuals_and_sequential_differs(models, prompts):
    receiver, qwen2, llama = models
    ids, mask = prompts
    f1, f2 = make_fuser(receiver, qwen2, gate=1.0, seed=1), make_fuser(receiver, llama, gate=1.0, seed=2)
    base = _fused_cache(C2CModel(receiver), ids, mask)
    one = _fused_cache(C2CModel(receiver, [qwen2], [f1]), ids, mask)
    two = _fused_cache(C2CModel(receiver, [llama], [f2]), ids, mask)
    both = _fused_cache(C2CModel(receiver, [qwen2, llama], [f1, f2], mode="parallel"), ids, mask)
    seq = _fused_cache(C2CModel(receiver, [qwen2, llama], [f1, f2], mode="sequential"), ids, mask)
    for layer in range(receiver.signature.num_layers):
        for pick in (0, 1):  # keys, values
            b, r1, r2 = (c.layer(layer)[pick] for c in (base, one, two))
            expected = b + (r1 - b) + (r2 - b)
            torch.testing.assert_close(both.layer(layer)[pick], expected, rtol=1e-5, atol=1e-5)
    assert any(not torch.allclose(seq.layer(i)[0], both.layer(i)[0], atol=1e-4)
               for i in range(receiver.signature.num_layers))


def test_padded_batch_equals_single_runs(models, prompts):
    receiver, qwen2, llama = models
    ids, mask = prompts
    model = C2CModel(receiver, [qwen2, llama], [make_fuser(receiver, qwen2, gate=1.0), make_fuser(receiver, llama, gate=1.0)])
    batch = model.generate(ids, mask, max_new_tokens=NEW)
    for row in range(2):
        real = ids[row][mask[row].bool()][None]
        single = model.generate(real, max_new_tokens=NEW)
        assert torch.equal(batch[row, :single.shape[1]], single[0]), f"row {row} differs when batched"
    # right padding is accepted as well and means the same
    right_ids = torch.stack([torch.cat([r[m.bool()], r[~m.bool()]]) for r, m in zip(ids, mask)])
    right_mask = torch.stack([torch.cat([m[m.bool()], m[~m.bool()]]) for m in mask])
    assert torch.equal(model.generate(right_ids, right_mask, max_new_tokens=NEW), batch)


def test_two_threads_generate_at_once(models, prompts):
    receiver, qwen2, _ = models
    ids, mask = prompts
    model = C2CModel(receiver, [qwen2], [make_fuser(receiver, qwen2, gate=1.0)])
    expected = [model.generate(ids[:1], mask[:1], max_new_tokens=NEW), model.generate(ids, mask, max_new_tokens=NEW)]
    results: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        barrier.wait()
        results[i] = model.generate(ids[: i + 1], mask[: i + 1], max_new_tokens=NEW)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert torch.equal(results[0], expected[0]) and torch.equal(results[1], expected[1])


def test_generate_returns_only_new_tokens_padded_after_eos(models, prompts):
    receiver, _, _ = models
    ids, mask = prompts
    model = C2CModel(receiver)
    free = model.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[])
    assert free.shape == (2, NEW)
    eos = int(free[0, 2])  # make the third token of row 0 its end
    out = model.generate(ids, mask, max_new_tokens=NEW, eos_token_id=eos)
    pad = receiver.tokenizer.pad_token_id
    assert out[0, 2] == eos and bool((out[0, 3:] == pad).all())


def test_sampling_is_seeded(models, prompts):
    receiver, qwen2, _ = models
    ids, mask = prompts
    model = C2CModel(receiver, [qwen2], [make_fuser(receiver, qwen2, gate=1.0)])
    kw = dict(max_new_tokens=NEW, do_sample=True, temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.2)
    first = model.generate(ids, mask, seed=7, **kw)
    assert torch.equal(first, model.generate(ids, mask, seed=7, **kw))
    # Sampling is really on: other seeds draw other tokens, and the draws leave the greedy path.
    draws = {tuple(model.generate(ids, mask, seed=seed, **kw).flatten().tolist()) for seed in range(8)}
    greedy = tuple(model.generate(ids, mask, max_new_tokens=NEW).flatten().tolist())
    assert len(draws) > 1 and draws != {greedy}


def test_gemma3_receiver_and_chat(tiny_model_factory):
    receiver = tiny_model_factory("gemma3", "smol", seed=4, num_layers=2, num_kv_heads=1, head_dim=32)
    sharer = tiny_model_factory("qwen3", "smol", seed=5, num_layers=3, num_kv_heads=2, head_dim=16)
    closed = C2CModel(receiver, [sharer], [make_fuser(receiver, sharer, gate=-1.0)])
    assert closed.chat("Hello there", max_new_tokens=4) == C2CModel(receiver).chat("Hello there", max_new_tokens=4)
    texts = C2CModel(receiver, [sharer], [make_fuser(receiver, sharer, gate=1.0)]).chat(
        [[{"role": "user", "content": "One"}], [{"role": "user", "content": "Two, longer"}]], max_new_tokens=4)
    assert isinstance(texts, list) and len(texts) == 2


def test_mismatched_fuser_and_bad_settings_are_clear_errors(models, prompts):
    receiver, qwen2, llama = models
    with pytest.raises(CheckpointError, match="fuser 0 was built for sharer"):
        C2CModel(receiver, [llama], [make_fuser(receiver, qwen2, gate=1.0)])
    with pytest.raises(ConfigError, match="one fuser per sharer"):
        C2CModel(receiver, [qwen2], [])
    with pytest.raises(ConfigError, match="top_p"):
        C2CModel(receiver).generate(prompts[0], prompts[1], max_new_tokens=2, do_sample=True, top_p=1.5)


def test_fused_generate_uses_the_current_transformers_api(models, prompts):
    """Any deprecation transformers announces on our calls fails here, in CI, before users see it."""
    import logging
    import warnings

    receiver, qwen2, _ = models
    model = C2CModel(receiver, [qwen2], [make_fuser(receiver, qwen2, gate=1.0)])
    logging.Logger.warning_once.cache_clear()  # transformers warns once per process; see it here too
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    level = hf_logger.level
    hf_logger.setLevel(logging.WARNING)  # whatever verbosity the environment asked for
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            out = model.generate(*prompts, max_new_tokens=3)
    finally:
        hf_logger.removeHandler(handler)
        hf_logger.setLevel(level)
    assert out.shape[0] == 2
    assert not [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()]
