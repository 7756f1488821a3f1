"""Cached keys move between positions with the model's own rotary parameters, and fusion uses it."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from agentmesh.cache.hf import forward_with_cache, from_hf
from agentmesh.cache.kv import ModelSignature
from agentmesh.cache.rotary import rotary_spec, rotate_keys
from agentmesh.c2c import C2CModel, Fuser
from agentmesh.c2c.model import SharerInput


def _keys_at(model: Any, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        _, hf = forward_with_cache(model, None, input_ids=ids, position_ids=positions)
    return from_hf(hf).keys


def _scaled(arch_config: Any) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(arch_config, dtype=torch.float32).eval()


def _configs() -> dict[str, Any]:
    from transformers import LlamaConfig, Phi3Config

    base = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {
        "llama-yarn": LlamaConfig(**base, head_dim=16, max_position_embeddings=1024, rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 256}),
        "llama3-scaling": LlamaConfig(**base, head_dim=16, rope_parameters={
            "rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
        "phi3-partial-rotary": Phi3Config(**base, partial_rotary_factor=0.5),
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3", "llama-yarn", "llama3-scaling",
                                  "phi3-partial-rotary"])
def test_keys_computed_at_p_and_rotated_to_q_equal_keys_computed_at_q(tiny_model_factory, arch: str) -> None:
    if arch in ("llama", "qwen2", "qwen3", "gemma3"):
        model = tiny_model_factory(arch).model
    else:
        model = _scaled(_configs()[arch])
    cfg = model.config
    spec = rotary_spec(cfg)
    assert spec is not None and len(spec.layer_kind) == cfg.num_hidden_layers
    if arch == "gemma3":  # local and global layers rotate with their own bases
        assert len(set(spec.layer_kind)) == 2 and spec.inv_freq[0] != spec.inv_freq[1]
    if arch == "phi3-partial-rotary":
        assert 2 * len(spec.inv_freq[0]) == cfg.hidden_size // cfg.num_attention_heads // 2
    ids = torch.randint(3, 100, (2, 9))
    p = torch.arange(9)[None] + torch.tensor([[3], [20]])  # (B, N): each row its own offset
    q = torch.arange(9)[None] + torch.tensor([[41], [0]])
    at_p, at_q = _keys_at(model, ids, p), _keys_at(model, ids, q)
    for layer, (kp, kq) in enumerate(zip(at_p, at_q)):
        assert (kp - kq).abs().max() > 1e-2  # the positions do show in the keys
        moved = rotate_keys(kp, q - p, spec.frequencies(layer), spec.style)
        assert (moved - kq).abs().max() < 1e-4


def test_signature_records_rotary_parameters(tiny_model_factory) -> None:
    sig = tiny_model_factory("gemma3").signature
    again = ModelSignature.from_dict(sig.to_dict())
    assert again == sig and again.rotary is not None
    old = {k: v for k, v in sig.to_dict().items() if k != "rotary"}  # written before rotary existed
    assert ModelSignature.from_dict(old).rotary is None


@pytest.mark.parametrize("key_positions", ["receiver", "sharer"])
def test_fuse_rotates_sharer_keys_to_the_receiver_positions(tiny_model_factory, key_positions: str) -> None:
    from dataclasses import replace

    from agentmesh.models.reading import reading_ids

    lm = tiny_model_factory("qwen3")
    prompt = lm.chat_ids("What is the capital of Veltoria?")
    reading = reading_ids(lm, context="The capital of Veltoria is Marrowby.")
    ids = torch.tensor([prompt])
    sharer_row = torch.tensor([reading + prompt[:-1]])  # the span sits after the sharer's private reading
    oracle = Fuser.oracle(lm.signature, lm.signature)
    oracle = Fuser(replace(oracle.config, key_positions=key_positions), list(oracle.projectors))
    fused = C2CModel(lm, [lm], [oracle]).prefill_fused(ids, torch.ones_like(ids),
                                                       [SharerInput(sharer_row, torch.ones_like(sharer_row))])
    own = C2CModel(lm).prefill_fused(ids, torch.ones_like(ids))
    # Layer 0's keys depend only on the token and its position: moved to the receiver's positions,
    # the sharer's are the receiver's own.
    diff = (fused.keys[0] - own.keys[0]).abs().max()
    assert (diff < 1e-4) if key_positions == "receiver" else (diff > 1e-2)


def test_fuser_json_records_the_layout_and_old_files_keep_theirs(tiny_model_factory, tmp_path) -> None:
    import json
    from pathlib import Path

    from agentmesh.c2c.checkpoints import load_fuser, save_fuser

    r, s = tiny_model_factory("qwen3"), tiny_model_factory("gemma3")
    fuser = Fuser.build(r.signature, s.signature, hidden_dim=8, intermediate_dim=8, fusion="prompt+response")
    folder = save_fuser(fuser, tmp_path / "f")
    doc = json.loads((folder / "fuser.json").read_text())
    assert doc["format_version"] == 2
    assert doc["layout"] == {"fusion": "prompt+response", "key_positions": "receiver"}
    assert doc["sharer"]["signature"]["rotary"]["layer_kind"] == list(s.signature.rotary.layer_kind)
    loaded = load_fuser(folder).config
    assert (loaded.fusion, loaded.key_positions, loaded.sharer.rotary) == ("prompt+response", "receiver", s.signature.rotary)
    # A format-1 file predates re-rotation: it is read as it was trained, keys at the sharer's positions.
    doc["format_version"] = 1
    del doc["layout"]
    (folder / "fuser.json").write_text(json.dumps(doc))
    assert (load_fuser(folder).config.fusion, load_fuser(folder).config.key_positions) == ("prompt", "sharer")
    shipped = Path(__file__).resolve().parents[1] / "fusers" / "smollm2_context"
    if shipped.is_dir():
        assert load_fuser(shipped).config.key_positions == "sharer"
