"""C2CProjector, the projector registry and layer maps."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from agentmesh.c2c.layer_map import LAYER_MAPS, layer_map
from agentmesh.c2c.projector import C2CProjector
from agentmesh.c2c.registry import build_projector, projector_class, projector_name, register_projector
from agentmesh.errors import CacheError, ConfigError

TINY = dict(source_dim=8, target_dim=4, source_num_heads=2, target_num_heads=3, hidden_dim=16, intermediate_dim=24)


def tiny(**kw) -> C2CProjector:
    torch.manual_seed(0)
    return C2CProjector(**{**TINY, **kw})


def kv(b: int, h: int, n: int, d: int, dtype=torch.float32, seed=1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g).to(dtype), torch.randn(b, h, n, d, generator=g).to(dtype)


def inputs(dtype=torch.float32):
    return kv(2, TINY["source_num_heads"], 5, TINY["source_dim"], dtype, 1), kv(2, TINY["target_num_heads"], 5, TINY["target_dim"], dtype, 2)


def published_shapes(hs, ds, ht, dt, hidden, inter, num_layers) -> dict[str, tuple[int, ...]]:
    """The published state-dict layout, written out from the spec's key list."""
    shapes: dict[str, tuple[int, ...]] = {"gate_temperature": ()}
    block = lambda p, i, m: {f"{p}.blocks.{i}.norm.weight": (hidden,), f"{p}.blocks.{i}.w1.weight": (m, hidden),
                             f"{p}.blocks.{i}.w2.weight": (hidden, m)}
    for kind in ("key", "value"):
        shapes |= {f"{kind}_in.weight": (hidden, hs * ds + ht * dt), f"{kind}_in.bias": (hidden,)}
        shapes |= block(f"{kind}_mlp1", 0, inter)
        shapes |= block(f"{kind}_scalar_mlp2", 0, hidden)
        shapes |= {f"{kind}_scalar_head.weight": (ht, hidden), f"{kind}_scalar_head.bias": (ht,)}
        for i in range(num_layers - 2):
            shapes |= block(f"{kind}_proj_mlp2", i, inter)
        shapes |= {f"{kind}_proj_out.weight": (ht * dt, hidden), f"{kind}_proj_out.bias": (ht * dt,)}
        shapes[f"{kind}_gate_logit"] = ()
    return shapes


@pytest.mark.parametrize("hs,ds,ht,dt,hidden,inter,num_layers", [
    (2, 8, 3, 4, 16, 24, 3), (4, 16, 2, 8, 32, 32, 4), (1, 4, 1, 4, 8, 12, 5), (2, 64, 8, 128, 16, 16, 3),
])
def test_state_dict_matches_published_layout(hs, ds, ht, dt, hidden, inter, num_layers):
    p = C2CProjector(ds, dt, hs, ht, hidden_dim=hidden, intermediate_dim=inter, num_layers=num_layers)
    got = {k: tuple(v.shape) for k, v in p.state_dict().items()}
    assert got == published_shapes(hs, ds, ht, dt, hidden, inter, num_layers)
    assert "gate_temperature" in dict(p.named_buffers()) and "gate_temperature" not in dict(p.named_parameters())


def test_published_style_bf16_file_loads_strict_and_round_trips():
    src = tiny(dtype="bfloat16", num_layers=4)
    with torch.no_grad():
        src.key_gate_logit.fill_(0.5)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    dst = tiny(dtype={"__type__": "torch.dtype", "value": "bfloat16"}, num_layers=4, zero_init=True)
    dst.load_state_dict(state, strict=True)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    # A file for another shape is rejected, not silently half-loaded.
    with pytest.raises(RuntimeError):
        tiny(dtype="bfloat16", num_layers=3).load_state_dict(state, strict=True)


def test_bf16_computes_in_bf16_and_returns_target_dtype():
    p = tiny(dtype="torch.bfloat16").eval()
    assert all(t.dtype == torch.bfloat16 for t in p.parameters())
    assert p.init_args["dtype"] == "bfloat16"
    with torch.no_grad():
        p.key_gate_logit.fill_(1.0)
        p.value_gate_logit.fill_(1.0)
    for dtype in (torch.float32, torch.bfloat16):
        src, tgt = inputs(dtype)
        k, v = p(src, tgt)
        assert k.dtype == v.dtype == dtype and k.shape == tgt[0].shape and v.shape == tgt[1].shape
        assert torch.isfinite(k).all() and not torch.equal(k, tgt[0])


def test_matches_hand_written_reference():
    """Spec formula written out with functional ops: sharer first in the concat, heads flattened (H, D)."""
    p = tiny(num_layers=4, dtype="float64").eval()
    with torch.no_grad():
        p.value_gate_logit.fill_(2.0)  # value open, key closed
    (ks, vs), (kt, vt) = inputs(torch.float64)
    sd = p.state_dict()

    def ffn(x, prefix):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[f"{prefix}.norm.weight"]
        return x + F.gelu(y @ sd[f"{prefix}.w1.weight"].T) @ sd[f"{prefix}.w2.weight"].T

    def lin(x, prefix):
        return x @ sd[f"{prefix}.weight"].T + sd[f"{prefix}.bias"]

    b, ht, n, dt = vt.shape
    x = torch.cat([vs.permute(0, 2, 1, 3).reshape(b, n, -1), vt.permute(0, 2, 1, 3).reshape(b, n, -1)], -1)
    h = ffn(lin(x, "value_in"), "value_mlp1.blocks.0")
    proj = lin(ffn(ffn(h, "value_proj_mlp2.blocks.0"), "value_proj_mlp2.blocks.1"), "value_proj_out")
    proj = proj.reshape(b, n, ht, dt).permute(0, 2, 1, 3)
    w = torch.sigmoid(lin(ffn(h, "value_scalar_mlp2.blocks.0"), "value_scalar_head")).permute(0, 2, 1)[..., None]
    k, v = p((ks, vs), (kt, vt))
    assert torch.equal(k, kt)
    torch.testing.assert_close(v, vt + w * proj, rtol=1e-12, atol=1e-12)


def test_eval_gate_closed_is_exact_identity_and_open_gate_changes_output():
    p = tiny().eval()  # gate logits start at 0 -> closed (logit <= 0)
    src, tgt = inputs()
    k, v = p(src, tgt)
    assert torch.equal(k, tgt[0]) and torch.equal(v, tgt[1])
    assert p.gate_status() == {"key": False, "value": False}
    with torch.no_grad():
        p.key_gate_logit.fill_(-3.0)
        p.value_gate_logit.fill_(0.25)
    k, v = p(src, tgt)
    assert torch.equal(k, tgt[0]) and not torch.equal(v, tgt[1])
    assert p.gate_status() == {"key": False, "value": True}
    rk, rv = p.residual(src, tgt)
    assert torch.equal(v, tgt[1] + rv) and not rk.any()


def test_zero_init_is_identity_even_with_open_gates():
    p = tiny(zero_init=True).eval()
    assert not p.key_proj_out.weight.any() and not p.value_proj_out.bias.any()
    with torch.no_grad():
        p.key_gate_logit.fill_(5.0)
        p.value_gate_logit.fill_(5.0)
    src, tgt = inputs()
    k, v = p(src, tgt)
    assert torch.equal(k, tgt[0]) and torch.equal(v, tgt[1])


def test_dropout_is_off_in_eval():
    src, tgt = inputs()
    with_dropout, without = tiny(dropout=0.5), tiny(dropout=0.0)
    for p in (with_dropout, without):
        with torch.no_grad():
            p.key_gate_logit.fill_(1.0)
            p.value_gate_logit.fill_(1.0)
    ref = without.eval()(src, tgt)
    with_dropout.eval()
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(with_dropout(src, tgt), ref))
    with_dropout.train()
    torch.manual_seed(3)
    assert not torch.equal(with_dropout.residual(src, tgt)[0], with_dropout.residual(src, tgt)[0])


def test_temperature_annealing():
    p = tiny(initial_temperature=1.0, final_temperature=0.001, anneal_steps=1000)
    assert p.gate_temperature.item() == 1.0
    for step, want in [(0, 1.0), (500, 10 ** -1.5), (250, 10 ** -0.75), (1000, 0.001), (5000, 0.001)]:
        p.update_temperature(step)
        assert math.isclose(p.gate_temperature.item(), want, rel_tol=1e-6), step
    p.update_temperature(0)
    assert p.gate_temperature.item() == 1.0


def test_training_gate_is_stochastic_per_token_and_head_and_gradients_flow():
    p = tiny(dropout=0.0, dtype="float64")
    with torch.no_grad():
        p.key_gate_logit.fill_(1e-3)  # eval gate = 1, training gate ~ sigmoid(Gumbel) at tau = 1
        p.value_gate_logit.fill_(1e-3)
    src, tgt = inputs(torch.float64)
    hard = p.eval().residual(src, tgt)[0]
    p.train()
    torch.manual_seed(0)
    soft = p.residual(src, tgt)[0]
    g = soft / hard  # (B, H_t, N, D_t): the gate alone, since w and P are deterministic without dropout
    torch.testing.assert_close(g, g[..., :1].expand_as(g))  # one draw per (B, H_t, N, 1)
    assert ((g > 0) & (g < 1)).all()
    assert g[..., 0].unique().numel() == g[..., 0].numel()  # all draws differ
    p.update_temperature(10**6)  # tau = 1e-3: the gate hardens towards 0/1
    soft = p.residual(src, tgt)[0] / hard
    assert ((soft < 1e-3) | (soft > 1 - 1e-3)).float().mean() > 0.9

    p.update_temperature(0)
    k, v = p(src, tgt)
    (k.square().sum() + v.square().sum()).backward()
    for name, param in p.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_eval_forward_needs_no_host_sync():
    # Meta tensors have no values: any .item(), bool() or data-dependent branch would raise.
    with torch.device("meta"):
        p = C2CProjector(**TINY).eval()
        src = torch.empty(2, 2, 5, 8), torch.empty(2, 2, 5, 8)
        tgt = torch.empty(2, 3, 5, 4), torch.empty(2, 3, 5, 4)
    k, v = p(src, tgt)
    assert k.shape == (2, 3, 5, 4) and k.device.type == "meta"


def test_argument_and_shape_errors():
    with pytest.raises(ConfigError, match="num_layers=2"):
        tiny(num_layers=2)
    with pytest.raises(ConfigError, match="dtype"):
        tiny(dtype="int8")
    with pytest.raises(ConfigError, match="dtype"):
        tiny(dtype={"__type__": "torch.dtype", "value": "no_such_type"})
    p = tiny()
    (ks, vs), tgt = inputs()
    with pytest.raises(CacheError, match="expected"):
        p((ks[:, :1], vs[:, :1]), tgt)  # wrong sharer head count
    with pytest.raises(CacheError, match="expected"):
        p((ks[:, :, :3], vs[:, :, :3]), tgt)  # token count differs from the receiver's


def test_registry_build_by_name_and_alias():
    assert projector_class("C2CProjector") is C2CProjector and projector_class("c2c") is C2CProjector
    p = tiny(num_layers=4, dtype="bfloat16")
    assert projector_name(p) == projector_name(C2CProjector) == "C2CProjector"
    clone = build_projector("c2c", p.init_args)
    assert isinstance(clone, C2CProjector) and clone.init_args == p.init_args
    clone.load_state_dict(p.state_dict(), strict=True)
    published = {**TINY, "num_layers": 3, "dropout": 0.1, "initial_temperature": 1.0, "final_temperature": 0.001,
                 "anneal_steps": 1929, "dtype": {"__type__": "torch.dtype", "value": "bfloat16"}, "zero_init": False}
    assert build_projector("C2CProjector", published).key_in.weight.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match=r"unknown projector class 'nope'; known: .*C2CProjector.*c2c"):
        projector_class("nope")
    with pytest.raises(ConfigError, match="colour"):
        build_projector("c2c", {**TINY, "colour": "red"})


def test_registry_plugs_in_new_classes_and_rejects_name_clashes():
    @register_projector("test-identity-projector", aliases=("test-id",))
    class Identity(torch.nn.Module):
        def __init__(self, scale: float = 1.0):
            super().__init__()
            self.scale = scale

    assert isinstance(build_projector("test-id", {"scale": 2.0}), Identity)
    assert projector_name(Identity()) == "test-identity-projector"
    with pytest.raises(ConfigError, match="already registered"):
        register_projector("c2c")(Identity)

    class Unregistered(torch.nn.Module):
        pass

    with pytest.raises(ConfigError, match="not registered"):
        projector_name(Unregistered)


@pytest.mark.parametrize("kind,lt,ls,want", [
    ("last_aligned", 4, 6, (2, 3, 4, 5)),
    ("last_aligned", 6, 4, (0, 0, 0, 1, 2, 3)),
    ("last_aligned", 3, 3, (0, 1, 2)),
    ("last_aligned", 1, 5, (4,)),
    ("last_aligned", 3, 1, (0, 0, 0)),
    ("k_nearest", 3, 5, (0, 2, 4)),  # depths 0, .5, 1 vs 0, .25, .5, .75, 1
    ("k_nearest", 5, 3, (0, 0, 1, 1, 2)),  # .25 and .75 are ties -> lower sharer layer
    ("k_nearest", 4, 2, (0, 0, 1, 1)),  # 1/3 -> 0, 2/3 -> 1
    ("k_nearest", 4, 7, (0, 2, 4, 6)),  # 1/3 = 2/6, 2/3 = 4/6 exactly
    ("k_nearest", 3, 4, (0, 1, 3)),  # .5 is a tie between 1/3 and 2/3 -> 1
    ("k_nearest", 1, 4, (0,)),
    ("k_nearest", 4, 1, (0, 0, 0, 0)),
    ("k_nearest", 28, 24, tuple(round(t * 23 / 27) for t in range(28))),  # Qwen3-0.6B <- Qwen2.5-0.5B
])
def test_layer_maps(kind, lt, ls, want):
    assert layer_map(kind, lt, ls) == want


def test_layer_map_errors():
    assert set(LAYER_MAPS) == {"last_aligned", "k_nearest"}
    with pytest.raises(ConfigError, match="unknown layer map 'nearest'; known: last_aligned, k_nearest"):
        layer_map("nearest", 4, 4)
    with pytest.raises(ConfigError, match="receiver=0"):
        layer_map("last_aligned", 0, 4)
