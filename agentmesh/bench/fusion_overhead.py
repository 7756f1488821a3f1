"""Benchmark 2: what fusion adds to a prefill.

At `tokens` prompt tokens (the fused span), compare
    plain: sharer prefill + receiver prefill (what any two-model pipeline pays), and
    c2c:   `C2CModel.prefill_fused`: the same two prefills + the fuser rewriting the receiver cache,
interleaved, after a warm-up. Then, on the same caches, time `fuse` alone and each receiver layer's
projector call, and count host synchronisations (`aten::item` / `_local_scalar_dense`) inside
`fuse` with torch.profiler: the layer loop must have none.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from agentmesh.bench.common import (
    BenchResult, ModelBench, Target, bench_models, interleave, median, sync)

if TYPE_CHECKING:
    from agentmesh.c2c.fuser import Fuser
    from agentmesh.models.loaded_model import LoadedModel
    from agentmesh.models.pool import ModelPool

NAME = "fusion_overhead"
TARGET_RATIO = 1.15
_SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "cudaStreamSynchronize",
             "cudaDeviceSynchronize")


@dataclass(frozen=True)
class Config(ModelBench):
    tokens: int = 256
    repeats: int = 10
    layer_repeats: int = 5

    @classmethod
    def quick(cls, **overrides: Any) -> "Config":
        return cls(**{"repeats": 3, "layer_repeats": 2, **overrides})


def prompt_ids(lm: LoadedModel, tokens: int, seed: int = 0) -> torch.Tensor:
    """(1, tokens) ids of real text (context-task passages and questions), repeated as needed."""
    from agentmesh.tasks.context_task import generate_split

    ids: list[int] = []
    records = generate_split("test", 64, seed=seed)
    i = 0
    while len(ids) < tokens:
        r = records[i % len(records)]
        ids += lm.encode(f"{r['context']} {r['question']}\n")
        i += 1
    return torch.tensor([ids[:tokens]], dtype=torch.long)


def host_syncs(fn: Any) -> dict[str, int]:
    """Calls of host-synchronising ops while `fn` runs."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
    counts: dict[str, int] = {}
    for ev in prof.key_averages():
        if ev.key in _SYNC_OPS:
            counts[ev.key] = counts.get(ev.key, 0) + ev.count
    return counts


def run(cfg: Config = Config(), *, receiver: LoadedModel | None = None, sharer: LoadedModel | None = None,
        fuser: Fuser | None = None, pool: ModelPool | None = None) -> BenchResult:
    from agentmesh.c2c.fuser import SharerSpan, fuse
    from agentmesh.c2c.model import C2CModel
    from agentmesh.models.inference import prefill

    receiver, sharer, fuser, source = bench_models(cfg, receiver, sharer, fuser, pool)
    model = C2CModel(receiver, [sharer], [fuser])
    # One more token than the span: the fused span is every prompt token but the last.
    ids = prompt_ids(receiver, cfg.tokens + 1, cfg.seed)
    mask = torch.ones_like(ids)
    span_ids, span_mask = ids[:, :-1], mask[:, :-1]
    dev = cfg.device

    with torch.no_grad():
        times = interleave({
            "plain": lambda: (prefill(sharer, span_ids, span_mask), prefill(receiver, span_ids, span_mask)),
            "c2c": lambda: model.prefill_fused(ids, mask),
        }, repeats=cfg.repeats, warmup=1, device=dev)
        receiver_cache = prefill(receiver, span_ids, span_mask)
        sharer_cache = prefill(sharer, span_ids, span_mask)
        spans = [SharerSpan(fuser, sharer_cache)]
        fuse_runs = interleave({"fuse": lambda: fuse(receiver_cache, spans)}, repeats=cfg.repeats, warmup=1,
                               device=dev)
        layer_rows = []
        for route in fuser.config.routes:
            proj = fuser.projectors[route.projector]
            src, tgt = sharer_cache.layer(route.sharer_layer), receiver_cache.layer(route.receiver_layer)
            t = interleave({"p": lambda p=proj, s=src, g=tgt: p.residual(s, g)}, repeats=cfg.layer_repeats,
                           warmup=1, device=dev)["p"]
            layer_rows.append({"layer": route.receiver_layer, "sharer_layer": route.sharer_layer, "ms": median(t) * 1e3})
        syncs = host_syncs(lambda: (fuse(receiver_cache, spans), sync(dev)))

    plain, c2c, fuse_s = median(times["plain"]), median(times["c2c"]), median(fuse_runs["fuse"])
    ratio_wall, ratio_cpu = times.paired_ratio("c2c", "plain"), times.paired_ratio("c2c", "plain", "cpu")
    cpu_plain, cpu_c2c = median(times.cpu["plain"]), median(times.cpu["c2c"])
    proj_total = sum(r["ms"] for r in layer_rows) / 1e3
    for r in layer_rows:
        r["share_of_fuse"] = r["ms"] / 1e3 / fuse_s if fuse_s > 0 else float("nan")
        r["share_of_c2c_prefill"] = r["ms"] / 1e3 / c2c if c2c > 0 else float("nan")
    rows = [
        {"step": "sharer + receiver prefill", "median_ms": plain * 1e3, "vs_plain": 1.0,
         "cpu_ms": cpu_plain * 1e3, "cpu_vs_plain": 1.0},
        {"step": "c2c prefill (prefill_fused)", "median_ms": c2c * 1e3, "vs_plain": ratio_wall,
         "cpu_ms": cpu_c2c * 1e3, "cpu_vs_plain": ratio_cpu},
        {"step": "fuse alone", "median_ms": fuse_s * 1e3, "vs_plain": fuse_s / plain,
         "cpu_ms": median(fuse_runs.cpu["fuse"]) * 1e3, "cpu_vs_plain": median(fuse_runs.cpu["fuse"]) / cpu_plain},
        {"step": "sum of projector calls", "median_ms": proj_total * 1e3, "vs_plain": proj_total / plain,
         "cpu_ms": float("nan"), "cpu_vs_plain": float("nan")},
    ]
    n_syncs = sum(syncs.values())
    summary = {
        "c2c_over_plain_median": ratio_wall, "c2c_over_plain_cpu_median": ratio_cpu,
        "plain_ms": plain * 1e3, "c2c_ms": c2c * 1e3,
        "fuse_ms": fuse_s * 1e3, "projectors_ms": proj_total * 1e3,
        "projector_share_of_fuse": proj_total / fuse_s if fuse_s > 0 else float("nan"),
        "per_layer_ms_mean": proj_total * 1e3 / max(len(layer_rows), 1),
        "host_syncs_in_fuse": syncs, "fuser_parameters": fuser.num_parameters(),
        "times_s": times.wall, "cpu_times_s": times.cpu,
    }
    return BenchResult(
        name=NAME, title=f"Fusion overhead at {cfg.tokens} prompt tokens ({receiver.name})",
        config={**asdict(cfg), "fuser": source},
        columns=["step", "median_ms", "vs_plain", "cpu_ms", "cpu_vs_plain"], rows=rows,
        summary=summary,
        targets=[Target("C2C prefill / plain prefills (median of paired rounds, wall clock)", ratio_wall, "<=",
                        TARGET_RATIO, "x"),
                 Target("C2C prefill / plain prefills (median of paired rounds, CPU time)", ratio_cpu, "<=",
                        TARGET_RATIO, "x"),
                 Target("host synchronisations inside fuse", float(n_syncs), "<=", 0.0)],
        notes=[f"fuser: {source}, {fuser.num_parameters():,} parameters, {len(layer_rows)} projectors",
               f"{cfg.repeats} interleaved rounds after 1 warm-up; vs_plain: median of the per-round ratios; "
               "cpu_*: this process's CPU time (steadier than the wall clock on a shared machine)",
               f"per-layer figures: median of {cfg.layer_repeats} calls of that layer's projector on the real caches"],
        extra_tables={"Projector calls per receiver layer": (
            ["layer", "sharer_layer", "ms", "share_of_fuse", "share_of_c2c_prefill"], layer_rows)})
