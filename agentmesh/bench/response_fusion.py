"""Benchmark 8: what include-response fusion costs per generated token.

Batch-1 greedy decoding of the embedded model as receiver and sharer, three ways:
    receiver:         no sharer, plain decoding;
    prompt:           'prompt' fusion: the span is fused once, decoding is plain receiver decoding;
    prompt+response:  every generated token is read by the sharer first and fused into the
                      receiver's cache (through the rewriting cache) before its attention reads it.
Fusers: a fresh C2CProjector fuser (`bench_fuser`, gates opened) and the projector-free replacement
oracle. ms/token by the difference method: (time for `new_tokens` tokens - time for 1 token) /
(new_tokens - 1), so the prefill cancels out; methods interleaved, medians. EOS is ignored so
every run decodes the same number of tokens.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

import torch

from agentmesh.bench.common import BenchResult, ModelBench, bench_models, interleave, median

if TYPE_CHECKING:
    from agentmesh.c2c.fuser import Fuser
    from agentmesh.models.loaded_model import LoadedModel
    from agentmesh.models.pool import ModelPool

NAME = "response_fusion"
PROMPT = "Explain in a few sentences why the sky is blue, and why sunsets are red."


@dataclass(frozen=True)
class Config(ModelBench):
    new_tokens: int = 32
    repeats: int = 3

    @classmethod
    def quick(cls, **overrides: Any) -> "Config":
        return cls(**{"new_tokens": 8, "repeats": 2, **overrides})


def _with_fusion(fuser: Fuser, fusion: str) -> Fuser:
    from agentmesh.c2c.fuser import Fuser

    return Fuser(replace(fuser.config, fusion=fusion), list(fuser.projectors))


def run(cfg: Config = Config(), *, receiver: LoadedModel | None = None, sharer: LoadedModel | None = None,
        fuser: Fuser | None = None, pool: ModelPool | None = None) -> BenchResult:
    from agentmesh.c2c.fuser import Fuser
    from agentmesh.c2c.model import C2CModel

    receiver, sharer, fuser, source = bench_models(cfg, receiver, sharer, fuser, pool)
    for p in fuser.projectors:  # open gates: a closed fuser would skip nothing, but say nothing either
        with torch.no_grad():
            p.key_gate_logit.fill_(1.0)
            p.value_gate_logit.fill_(1.0)
    oracle = Fuser.oracle(receiver.signature, sharer.signature)
    models = {
        "receiver": C2CModel(receiver),
        "prompt (C2CProjector)": C2CModel(receiver, [sharer], [_with_fusion(fuser, "prompt")]),
        "prompt+response (C2CProjector)": C2CModel(receiver, [sharer], [_with_fusion(fuser, "prompt+response")]),
        "prompt (oracle)": C2CModel(receiver, [sharer], [oracle]),
        "prompt+response (oracle)": C2CModel(receiver, [sharer], [_with_fusion(oracle, "prompt+response")]),
    }
    ids = torch.tensor([receiver.chat_ids(PROMPT)])

    def gen(model: C2CModel, n: int) -> Callable[[], torch.Tensor]:
        return lambda: model.generate(ids, max_new_tokens=n, eos_token_id=[])

    methods = {}
    for name, model in models.items():
        methods[f"{name}|1"] = gen(model, 1)
        methods[f"{name}|n"] = gen(model, cfg.new_tokens)
    with torch.no_grad():
        times = interleave(methods, repeats=cfg.repeats, warmup=1, device=cfg.device)
    base = None
    rows = []
    for name in models:
        one, full = median(times[f"{name}|1"]), median(times[f"{name}|n"])
        ms = (full - one) / (cfg.new_tokens - 1) * 1e3
        base = ms if base is None else base
        rows.append({"mode": name, "ms_per_token": ms, "vs_receiver": ms / base, "first_token_s": one})
    summary = {r["mode"]: round(r["ms_per_token"], 2) for r in rows}
    return BenchResult(
        name=NAME, title=f"decode cost of include-response fusion, {receiver.name} <- {sharer.name}",
        config={**asdict(cfg), "fuser": source, "prompt_tokens": int(ids.shape[1])},
        columns=["mode", "ms_per_token", "vs_receiver", "first_token_s"], rows=rows, summary=summary,
        notes=["prompt+response reads each token with the sharer too (one more forward per token) and runs "
               "every projector on it; prompt fusion decodes at the receiver's own speed."])
