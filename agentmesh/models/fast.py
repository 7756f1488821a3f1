"""Opt-in fast greedy decoding at batch 1, each lever measured against the default fp32 eager path.

The levers, independent of each other (`agentmesh bench decode` reports every mode's speed, its
greedy agreement with fp32 eager and the fraction of the memory-bandwidth limit it reaches):

* `static_cache`: keys and values preallocated once (transformers' static cache), so a decode
  step writes one position in place instead of concatenating every layer's whole cache;
* `compile`: the decode step through `torch.compile` (static shapes, so one graph serves every
  step; the first steps pay the compilation, about 50 s for the embedded model on one
  core of a 2-core VM);
* `weights`: "bf16" (a bfloat16 copy: half the bytes read per token), "int8" (dynamic int8
  quantization of every linear layer but the LM head: about a quarter for those layers) or
  "int8wo" (int8 weights only, one scale per output channel, LM head included, each matmul on
  bfloat16 activations: a quarter of the bytes, with activations kept far more precise than
  dynamic quantization keeps them).

Decoding at batch 1 reads every weight once per token, so bytes per token over memory bandwidth
bounds its speed; fewer bytes is what the weight modes buy. The default path
(`agentmesh.models.inference.decode`) is not changed by any of this.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import nn

from agentmesh.cache.hf import HFCache, forward_with_cache, new_hf, static_hf
from agentmesh.errors import ConfigError
from agentmesh.models.protocol import LanguageModel

FastWeights = Literal["fp32", "bf16", "int8", "int8wo"]


@dataclass(frozen=True)
class FastConfig:
    """Which levers a `FastDecoder` pulls; `max_len` bounds prompt + new tokens with a static cache
    (each call allocates only what it needs, in steps of 256 slots)."""

    weights: FastWeights = "fp32"
    static_cache: bool = True
    compile: bool = False
    max_len: int = 2048

    def __post_init__(self) -> None:
        if self.weights not in ("fp32", "bf16", "int8", "int8wo"):
            raise ConfigError(f"fast decode weights {self.weights!r} are unknown; expected fp32, bf16, int8 "
                              "or int8wo")
        if self.compile and not self.static_cache:
            raise ConfigError("compile needs static_cache=True (a growing cache changes shape every step)")
        if self.max_len < 1:
            raise ConfigError(f"fast decode max_len {self.max_len} must be >= 1")

    @property
    def name(self) -> str:
        parts = [self.weights, "static" if self.static_cache else "dynamic"] + (["compile"] if self.compile else [])
        return "+".join(parts)


class Int8WeightOnlyLinear(nn.Module):
    """`linear` with int8 weights, one scale per output channel (its amax / 127, so each weight is
    off by at most half a step), multiplied by torch's int8-weight matmul on bfloat16 activations;
    the output comes back in the input's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scales)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


def _int8_weight_only(model: nn.Module) -> nn.Module:
    out = copy.deepcopy(model)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8WeightOnlyLinear(child))
    return out.eval()


def convert_weights(model: nn.Module, weights: FastWeights) -> nn.Module:
    """`model` itself for "fp32"; a converted copy otherwise (the original is untouched)."""
    if weights == "fp32":
        return model
    if weights == "bf16":
        return copy.deepcopy(model).to(torch.bfloat16).eval()
    if weights == "int8wo":
        return _int8_weight_only(model)
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    head = model.get_output_embeddings()  # type: ignore[operator]
    # The LM head stays float: its int8 rounding flips near-tied argmaxes far more often than
    # the same rounding inside the layers does.
    spec = {name: default_dynamic_qconfig for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and mod is not head}
    with warnings.catch_warnings():  # torch.ao announces its move to torchao on every call
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model), qconfig_spec=spec, dtype=torch.qint8).eval()


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every linear layer (the LM head included, which for
    tied embeddings reads the whole table; an embedding lookup reads one row, not counted)."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            total += mod.weight.numel() * mod.weight.element_size()
        elif isinstance(mod, Int8WeightOnlyLinear):
            total += mod.weight_int8.numel() + mod.scales.numel() * mod.scales.element_size()
        elif hasattr(mod, "_packed_params") and callable(getattr(mod, "weight", None)):  # dynamic int8 linear
            w = mod.weight()
            total += w.numel() * w.element_size() + 4 * w.shape[0]
    return total


class FastDecoder:
    """Greedy batch-1 decoding of `lm` with the levers of `config`.

    `generate(input_ids (1, N), n)` returns the new tokens (1, T). With `forced` (1, n) tokens it
    feeds those instead of its own picks and still returns its picks: the teacher-forced greedy
    agreement with another decoder is then `(picks == forced).float().mean()`.
    """

    def __init__(self, lm: LanguageModel, config: FastConfig = FastConfig()):
        self.lm = lm
        self.config = config
        self.model = convert_weights(lm.model, config.weights)
        self._step = torch.compile(self._forward, dynamic=False) if config.compile else self._forward

    def _forward(self, input_ids: torch.Tensor, cache: HFCache, positions: torch.Tensor) -> torch.Tensor:
        out, _ = forward_with_cache(self.model, cache, input_ids=input_ids, position_ids=positions, logits_to_keep=1)
        return out.logits[:, -1]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_ids: Sequence[int] = (),
                 forced: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
            raise ConfigError(f"fast decoding takes one prompt (1, N), N >= 1; got {tuple(input_ids.shape)}")
        n = input_ids.shape[1]
        if self.config.static_cache and n + max_new_tokens > self.config.max_len:
            raise ConfigError(f"prompt ({n}) + new tokens ({max_new_tokens}) exceed the static cache's "
                              f"max_len {self.config.max_len}", hint="raise FastConfig.max_len")
        device = self.lm.device
        # Attention reads every slot of a static cache, so it is sized to this call (rounded up to
        # 256 slots, so a compiled step meets few distinct shapes), not to `max_len`.
        slots = min(self.config.max_len, -(-(n + max_new_tokens) // 256) * 256)
        cache = static_hf(self.model.config, slots) if self.config.static_cache else new_hf(self.model.config)
        logits = self._forward(input_ids.to(device), cache, torch.arange(n, device=device)[None])
        eos = set(int(t) for t in eos_token_ids)
        picks: list[torch.Tensor] = []
        for i in range(max_new_tokens):
            tok = logits.float().argmax(-1, keepdim=True)  # (1, 1)
            picks.append(tok)
            if forced is None and int(tok) in eos:
                break
            if i + 1 == max_new_tokens:
                break
            feed = forced[:, i:i + 1].to(device) if forced is not None else tok
            logits = self._step(feed, cache, torch.full((1, 1), n + i, device=device))
        return torch.cat(picks, 1).cpu() if picks else torch.empty(1, 0, dtype=torch.long)
