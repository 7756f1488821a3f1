"""The opt-in fast decode path: static cache, compiled step, bf16, int8 and weight-only int8 weights, measured
against fp32 eager."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from agentmesh.errors import ConfigError
from agentmesh.models.fast import (FastConfig, FastDecoder, Int8WeightOnlyLinear, convert_weights,
                                  weight_bytes_per_token)

NEW = 10


@pytest.fixture(scope="module")
def lm(tiny_model_factory: Any) -> Any:
    return tiny_model_factory("qwen3", "smol", seed=1, num_layers=3, num_kv_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def prompt_and_reference(lm: Any) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([lm.chat_ids("Tell me about the moon.")])
    ref = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                            do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    return ids, ref


@pytest.mark.parametrize("static", [True, False])
def test_fp32_fast_decoding_is_token_identical_to_generate(lm: Any, prompt_and_reference: Any, static: bool) -> None:
    ids, ref = prompt_and_reference
    dec = FastDecoder(lm, FastConfig(static_cache=static, max_len=64))
    assert torch.equal(dec.generate(ids, NEW), ref)
    assert torch.equal(dec.generate(ids, NEW, forced=ref), ref)  # teacher-forced: the same picks
    first = int(ref[0, 0])
    assert dec.generate(ids, NEW, eos_token_ids=[first]).tolist() == [[first]]  # stops at EOS


def test_compiled_step_decodes_the_tokens_of_the_uncompiled_static_path(lm: Any, prompt_and_reference: Any) -> None:
    from torch._dynamo.utils import counters

    ids, _ = prompt_and_reference
    long = ids.repeat(1, 8)[:, :250]
    # The short prompt decodes in a 256-slot cache; the long one in a 512-slot cache, across position 256.
    assert ids.shape[1] + NEW <= 256 and long.shape[1] < 256 < long.shape[1] + NEW
    torch._dynamo.reset()  # the count below starts from nothing compiled
    counters.clear()
    # int8wo on the long prompt only: on the short one its bf16 logits tie exactly at one step,
    # where any rounding difference between compiled and eager code may pick either token.
    for weights, prompts, graphs_so_far in (("fp32", (ids, long), 2), ("int8wo", (long,), 3)):
        eager = FastDecoder(lm, FastConfig(weights=weights, max_len=512))  # type: ignore[arg-type]
        compiled = FastDecoder(lm, FastConfig(weights=weights, compile=True, max_len=512))  # type: ignore[arg-type]
        for x in prompts:
            assert torch.equal(compiled.generate(x, NEW), eager.generate(x, NEW))
        # The step really went through dynamo, and as one graph per cache size: no graph break,
        # no recompilation from one step to the next.
        assert dict(counters["frames"]) == {"total": graphs_so_far, "ok": graphs_so_far}
        assert not counters["graph_break"]
    assert torch.equal(compiled.generate(long, NEW), eager.generate(long, NEW))  # a size met before: reused
    assert counters["frames"]["ok"] == 3
    torch._dynamo.reset()  # the compiled graphs hold on to the converted weights


def test_bf16_and_int8_read_fewer_weight_bytes_and_report_agreement(lm: Any, prompt_and_reference: Any) -> None:
    ids, ref = prompt_and_reference
    fp32 = weight_bytes_per_token(lm.model)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    for weights in ("bf16", "int8", "int8wo"):
        dec = FastDecoder(lm, FastConfig(weights=weights, max_len=64))  # type: ignore[arg-type]
        assert dec.model is not lm.model
        picks = dec.generate(ids, NEW, forced=ref)
        assert picks.shape == ref.shape
        agreement = float((picks == ref).float().mean())
        assert 0.0 <= agreement <= 1.0
        assert weight_bytes_per_token(dec.model) < fp32
    bf16 = convert_weights(lm.model, "bf16")
    assert weight_bytes_per_token(bf16) == fp32 // 2
    int8 = convert_weights(lm.model, "int8")
    assert isinstance(int8.get_output_embeddings(), nn.Linear)  # the LM head stays float
    assert not any(type(m) is nn.Linear for name, m in int8.named_modules() if name.endswith("q_proj"))
    wo = convert_weights(lm.model, "int8wo")
    linears = [m for m in lm.model.modules() if isinstance(m, nn.Linear)]
    assert isinstance(wo.get_output_embeddings(), Int8WeightOnlyLinear)  # the LM head too
    assert not any(isinstance(m, nn.Linear) for m in wo.modules())
    # one byte per weight, and a bf16 scale per output channel
    assert weight_bytes_per_token(wo) == sum(m.weight.numel() + 2 * m.out_features for m in linears)
    # the loaded model itself is never converted
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


def test_int8_weight_only_linear_stays_within_its_rounding_bounds() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(48, 100)
    q = Int8WeightOnlyLinear(lin)
    w = q.weight_int8.float() * q.scales.float()[:, None]  # the weights it multiplies by
    step = lin.weight.detach().abs().amax(1, keepdim=True) / 127
    # every weight within half a step, plus the bf16 rounding of its scale (127 steps x 2**-8)
    assert ((lin.weight.detach() - w).abs() <= step * (0.5 + 127 * 2 ** -8) + 1e-7).all()
    x = torch.randn(3, 5, 48)
    xb = x.bfloat16().float()  # the activations it multiplies
    with torch.no_grad():
        y = q(x)
        exact = xb @ w.T + lin.bias
    assert y.dtype == x.dtype and y.shape == (3, 5, 100)
    # float32 accumulation, then one bf16 rounding of each output (unit roundoff 2**-8), with margin
    assert ((y - exact).abs() <= (xb.abs() @ w.abs().T) * 2 ** -7 + 1e-6).all()


def test_fast_config_errors_are_clear(lm: Any) -> None:
    with pytest.raises(ConfigError, match="weights 'fp4' are unknown"):
        FastConfig(weights="fp4")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="compile needs static_cache=True"):
        FastConfig(static_cache=False, compile=True)
    dec = FastDecoder(lm, FastConfig(max_len=8))
    with pytest.raises(ConfigError, match="exceed the static cache's max_len 8"):
        dec.generate(torch.ones(1, 5, dtype=torch.long), 4)
    with pytest.raises(ConfigError, match="one prompt"):
        dec.generate(torch.ones(2, 3, dtype=torch.long), 1)
