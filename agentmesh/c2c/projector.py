"""`C2CProjector`: projects one sharer layer's K/V into one receiver layer's space.

Parameter names and shapes match the published `projector_i.pt` files, so those load with
`strict=True`. Keys and values have separate, identical branches named `key_*` and `value_*`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from agentmesh.c2c.registry import register_projector
from agentmesh.errors import CacheError, ConfigError

KV = tuple[Tensor, Tensor]


def parse_dtype(value: Any) -> torch.dtype:
    """A torch dtype from a dtype, a name ("bfloat16", "torch.bfloat16") or the published JSON form
    {"__type__": "torch.dtype", "value": "bfloat16"}."""
    raw = value
    if isinstance(value, dict):
        if value.get("__type__") != "torch.dtype" or "value" not in value:
            raise ConfigError(f"bad dtype {raw!r}; expected {{'__type__': 'torch.dtype', 'value': 'bfloat16'}}")
        value = value["value"]
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"bad projector dtype {raw!r}; expected a float dtype such as 'float32' or 'bfloat16'")
    return value


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in at least float32: bf16 sums of squares lose too much precision.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class FFNBlock(nn.Module):
    """x + Dropout(W2 · GELU(W1 · RMSNorm(x))), bias-free, exact GELU."""

    def __init__(self, width: int, intermediate: int, dropout: float, dtype: torch.dtype):
        super().__init__()
        self.norm = RMSNorm(width, dtype=dtype)
        self.w1 = nn.Linear(width, intermediate, bias=False, dtype=dtype)
        self.w2 = nn.Linear(intermediate, width, bias=False, dtype=dtype)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.w2(self.act(self.w1(self.norm(x)))))


class FFNStack(nn.Module):
    """`n` FFN blocks of constant width; an empty stack is the identity."""

    def __init__(self, width: int, intermediate: int, n: int, dropout: float, dtype: torch.dtype):
        super().__init__()
        self.blocks = nn.ModuleList(FFNBlock(width, intermediate, dropout, dtype) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@register_projector("C2CProjector", aliases=("c2c",))
class C2CProjector(nn.Module):
    """Per token: K_out = K_r + g · w · P(K_s, K_r), where P is the projected sharer key, w a per-head
    sigmoid weight and g a per-layer gate (Gumbel-sigmoid in training, hard 0/1 in eval). Same for V."""

    def __init__(
        self,
        source_dim: int,
        target_dim: int,
        source_num_heads: int,
        target_num_heads: int,
        hidden_dim: int = 1024,
        intermediate_dim: int = 1024,
        num_layers: int = 3,
        dropout: float = 0.1,
        initial_temperature: float = 1.0,
        final_temperature: float = 0.001,
        anneal_steps: int = 1929,
        dtype: torch.dtype | str | dict = torch.float32,
        zero_init: bool = False,
    ):
        super().__init__()
        dtype = parse_dtype(dtype)
        sizes = dict(source_dim=source_dim, target_dim=target_dim, source_num_heads=source_num_heads,
                     target_num_heads=target_num_heads, hidden_dim=hidden_dim, intermediate_dim=intermediate_dim)
        for name, size in sizes.items():
            if not isinstance(size, int) or size < 1:
                raise ConfigError(f"C2CProjector {name}={size!r} must be a positive integer")
        if num_layers < 3:
            raise ConfigError(f"C2CProjector num_layers={num_layers} must be >= 3 "
                              f"(1 shared block + >= 1 projection block + output layer)")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"C2CProjector dropout={dropout} must be in [0, 1)")
        if initial_temperature <= 0 or final_temperature <= 0 or anneal_steps < 1:
            raise ConfigError(f"C2CProjector temperatures must be > 0 and anneal_steps >= 1, got "
                              f"{initial_temperature}, {final_temperature}, {anneal_steps}")
        self._init_args = dict(sizes, num_layers=num_layers, dropout=dropout,
                               initial_temperature=initial_temperature, final_temperature=final_temperature,
                               anneal_steps=anneal_steps, dtype=dtype_name(dtype), zero_init=zero_init)
        self.source_num_heads, self.source_dim = source_num_heads, source_dim
        self.target_num_heads, self.target_dim = target_num_heads, target_dim

        in_dim, out_dim = source_num_heads * source_dim, target_num_heads * target_dim
        for kind in ("key", "value"):
            self.add_module(f"{kind}_in", nn.Linear(in_dim + out_dim, hidden_dim, dtype=dtype))
            self.add_module(f"{kind}_mlp1", FFNStack(hidden_dim, intermediate_dim, 1, dropout, dtype))
            self.add_module(f"{kind}_scalar_mlp2", FFNStack(hidden_dim, hidden_dim, 1, dropout, dtype))
            self.add_module(f"{kind}_scalar_head", nn.Linear(hidden_dim, target_num_heads, dtype=dtype))
            self.add_module(f"{kind}_proj_mlp2", FFNStack(hidden_dim, intermediate_dim, num_layers - 2, dropout, dtype))
            self.add_module(f"{kind}_proj_out", nn.Linear(hidden_dim, out_dim, dtype=dtype))
            self.register_parameter(f"{kind}_gate_logit", nn.Parameter(torch.zeros((), dtype=dtype)))
            if zero_init:
                proj_out: nn.Linear = getattr(self, f"{kind}_proj_out")
                nn.init.zeros_(proj_out.weight)
                nn.init.zeros_(proj_out.bias)
        # float32 so the annealed value (down to 1e-3) stays accurate even for bf16 projectors.
        self.register_buffer("gate_temperature", torch.tensor(float(initial_temperature)))
        # A training switch, not a constructor argument: without noise the training gate is the
        # deterministic sigmoid(logit / tau) (runs then reproduce exactly across batch splits).
        self.gate_noise = True

    @property
    def init_args(self) -> dict[str, Any]:
        """Constructor arguments (dtype as a string), enough to rebuild this projector."""
        return dict(self._init_args)

    @property
    def dtype(self) -> torch.dtype:
        return self.key_in.weight.dtype

    def temperature_at(self, step: int) -> float:
        a = self._init_args
        progress = min(max(step, 0) / a["anneal_steps"], 1.0)
        return a["initial_temperature"] * (a["final_temperature"] / a["initial_temperature"]) ** progress

    @torch.no_grad()
    def update_temperature(self, step: int) -> None:
        """Anneal the Gumbel temperature; call after each optimizer step."""
        self.gate_temperature.fill_(self.temperature_at(step))

    def gate_status(self) -> dict[str, bool]:
        """Whether the key/value gates are open at inference (one host sync; not for hot paths)."""
        key_open, value_open = (torch.stack([self.key_gate_logit, self.value_gate_logit]) > 0).tolist()
        return {"key": key_open, "value": value_open}

    def _gate(self, logit: Tensor, shape: tuple[int, ...]) -> Tensor:
        if not self.training:
            return (logit > 0).to(logit.dtype)  # 0-d tensor: no host sync, no branching on values
        dtype = torch.promote_types(logit.dtype, torch.float32)
        if not self.gate_noise:
            return torch.sigmoid(logit.to(dtype) / self.gate_temperature).expand(shape)
        # Gumbel(0, 1) = -log(E), E ~ Exp(1); one draw per (B, H_t, N, 1).
        gumbel = -torch.empty(shape, device=logit.device, dtype=dtype).exponential_().log()
        return torch.sigmoid((logit.to(dtype) + gumbel) / self.gate_temperature)

    def _branch(self, kind: str, source: Tensor, target: Tensor) -> Tensor:
        b, h_t, n, d_t = target.shape
        x = torch.cat([source.transpose(1, 2).flatten(2), target.transpose(1, 2).flatten(2)], dim=-1)  # (B, N, in+out)
        h = getattr(self, f"{kind}_mlp1")(getattr(self, f"{kind}_in")(x))  # (B, N, hidden)
        p = getattr(self, f"{kind}_proj_out")(getattr(self, f"{kind}_proj_mlp2")(h))  # (B, N, H_t*D_t)
        p = p.view(b, n, h_t, d_t).transpose(1, 2)  # (B, H_t, N, D_t)
        s = getattr(self, f"{kind}_scalar_head")(getattr(self, f"{kind}_scalar_mlp2")(h))  # (B, N, H_t)
        w = torch.sigmoid(s).transpose(1, 2).unsqueeze(-1)  # (B, H_t, N, 1)
        g = self._gate(getattr(self, f"{kind}_gate_logit"), (b, h_t, n, 1)).to(p.dtype)
        return g * w * p

    def _check(self, source: Tensor, target: Tensor, what: str) -> None:
        want_s = (self.source_num_heads, self.source_dim)
        want_t = (self.target_num_heads, self.target_dim)
        if (source.dim() != 4 or target.dim() != 4 or tuple(source.shape[1::2]) != want_s
                or tuple(target.shape[1::2]) != want_t or source.shape[0::2] != target.shape[0::2]):
            raise CacheError(f"C2CProjector {what}: got sharer {tuple(source.shape)} and receiver "
                             f"{tuple(target.shape)}; expected (B, {want_s[0]}, N, {want_s[1]}) and "
                             f"(B, {want_t[0]}, N, {want_t[1]}) with equal B and N")

    def residual(self, source_kv: KV, target_kv: KV) -> KV:
        """g·w·P for keys and values, each (B, H_t, N, D_t) in the receiver's dtype."""
        out = []
        for kind, source, target in zip(("key", "value"), source_kv, target_kv):
            self._check(source, target, kind)
            r = self._branch(kind, source.to(self.dtype), target.to(self.dtype))
            out.append(r.to(target.dtype))
        return out[0], out[1]

    def forward(self, source_kv: KV, target_kv: KV) -> KV:
        """Fused receiver (key, value): target + residual."""
        rk, rv = self.residual(source_kv, target_kv)
        return target_kv[0] + rk, target_kv[1] + rv


@register_projector("ReplaceProjector", aliases=("replace",))
class ReplaceProjector(nn.Module):
    """The oracle: the receiver's K/V replaced by the sharer's own (K_out = K_s), for same-shape pairs.

    No weights. What a span reads through it is the most any projector can pass on from the
    sharer's cache without changing what the receiver's layers expect, so its accuracy bounds
    what a trained fuser of the same fusion mode can learn on a task.
    """

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim

    @property
    def init_args(self) -> dict[str, Any]:
        return {"num_heads": self.num_heads, "head_dim": self.head_dim}

    def residual(self, source_kv: KV, target_kv: KV) -> KV:
        """K_s - K_r and V_s - V_r, in at least float32 so that K_r + residual gives back K_s exactly."""
        out = []
        for source, target in zip(source_kv, target_kv):
            if source.shape != target.shape or source.shape[1::2] != (self.num_heads, self.head_dim):
                raise CacheError(f"ReplaceProjector: sharer {tuple(source.shape)} and receiver "
                                 f"{tuple(target.shape)} must both be (B, {self.num_heads}, N, {self.head_dim})")
            wide = torch.promote_types(target.dtype, torch.float32)
            out.append(source.to(wide) - target.to(wide))
        return out[0], out[1]

    def forward(self, source_kv: KV, target_kv: KV) -> KV:
        return source_kv
