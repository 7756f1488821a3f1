"""Benchmark 3: fused generation throughput at batch `batch` against batch 1.

`C2CModel.generate` with one sharer and its fuser (the standard layout: the sharer prefills the
same prompt span) on context-task questions, left-padded into one batch; every row
writes exactly `new_tokens` tokens (EOS ignored). Reported per batch size:
    end to end: new tokens / wall time of `generate` (fused prefill + decoding), the target;
    decoding:   new tokens / wall time of decoding alone, from an already fused cache.
Batch 1 runs rotate over the batch's questions; the two batch sizes are interleaved.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from agentmesh.bench.common import BenchResult, ModelBench, Target, bench_models, interleave, median

if TYPE_CHECKING:
    from agentmesh.c2c.fuser import Fuser
    from agentmesh.models.loaded_model import LoadedModel
    from agentmesh.models.pool import ModelPool

NAME = "batching"
TARGET_RATIO = 3.0


@dataclass(frozen=True)
class Config(ModelBench):
    batch: int = 8
    new_tokens: int = 64
    repeats: int = 4

    @classmethod
    def quick(cls, **overrides: Any) -> "Config":
        return cls(**{"new_tokens": 32, "repeats": 1, **overrides})


def prompts(lm: LoadedModel, n: int, seed: int = 0) -> list[list[int]]:
    """Receiver prompts (chat ids) of `n` context-task questions."""
    from agentmesh.bench.c2c_vs_t2t import load_items
    from agentmesh.tasks.prompts import receiver_messages

    return [lm.chat_ids(receiver_messages(item)) for item in load_items(n, seed)]


def run(cfg: Config = Config(), *, receiver: LoadedModel | None = None, sharer: LoadedModel | None = None,
        fuser: Fuser | None = None, pool: ModelPool | None = None) -> BenchResult:
    from agentmesh.c2c.model import C2CModel
    from agentmesh.models.inference import decode, pad_sequences

    receiver, sharer, fuser, source = bench_models(cfg, receiver, sharer, fuser, pool)
    model = C2CModel(receiver, [sharer], [fuser])
    pad = model.receiver.pad_token_id
    rows = prompts(receiver, cfg.batch, cfg.seed)
    big_ids, big_mask = pad_sequences(rows, pad)                     # (B, N)
    singles = [pad_sequences([r], pad) for r in rows]                # each (1, N_i)
    state = {"i": 0}
    gen_kw = dict(max_new_tokens=cfg.new_tokens, do_sample=False, eos_token_id=[])

    def one() -> torch.Tensor:
        ids, mask = singles[state["i"] % len(singles)]
        state["i"] += 1
        return model.generate(ids, mask, **gen_kw)

    def many() -> torch.Tensor:
        return model.generate(big_ids, big_mask, **gen_kw)

    gen = model.generation_config(max_new_tokens=cfg.new_tokens, eos_token_id=[])
    with torch.no_grad():
        fused_one = model.prefill_fused(*singles[0])
        fused_many = model.prefill_fused(big_ids, big_mask)
        e2e = interleave({"1": one, str(cfg.batch): many}, repeats=cfg.repeats, warmup=1, device=cfg.device)
        dec = interleave({
            "1": lambda: decode(receiver, fused_one, singles[0][0][:, -1:], singles[0][1][:, -1:], gen,
                                pad_token_id=pad),
            str(cfg.batch): lambda: decode(receiver, fused_many, big_ids[:, -1:], big_mask[:, -1:], gen,
                                           pad_token_id=pad),
        }, repeats=cfg.repeats, warmup=1, device=cfg.device)

    table = []
    for b in (1, cfg.batch):
        key = str(b)
        tokens = b * cfg.new_tokens
        table.append({"batch": b, "e2e_s": median(e2e[key]), "e2e_tokens_per_s": tokens / median(e2e[key]),
                      "e2e_cpu_tokens_per_s": tokens / median(e2e.cpu[key]),
                      "decode_s": median(dec[key]), "decode_tokens_per_s": tokens / median(dec[key]),
                      "decode_cpu_tokens_per_s": tokens / median(dec.cpu[key]),
                      "prompt_tokens": int(big_mask.sum()) if b > 1 else int(singles[0][1].sum())})
    ratio_e2e = table[1]["e2e_tokens_per_s"] / table[0]["e2e_tokens_per_s"]
    ratio_dec = table[1]["decode_tokens_per_s"] / table[0]["decode_tokens_per_s"]
    ratio_e2e_cpu = table[1]["e2e_cpu_tokens_per_s"] / table[0]["e2e_cpu_tokens_per_s"]
    ratio_dec_cpu = table[1]["decode_cpu_tokens_per_s"] / table[0]["decode_cpu_tokens_per_s"]
    summary = {"e2e_throughput_ratio": ratio_e2e, "decode_throughput_ratio": ratio_dec,
               "e2e_throughput_ratio_cpu": ratio_e2e_cpu, "decode_throughput_ratio_cpu": ratio_dec_cpu,
               "e2e_times_s": e2e.wall, "decode_times_s": dec.wall, "e2e_cpu_s": e2e.cpu, "decode_cpu_s": dec.cpu,
               "padded_width": big_ids.shape[1]}
    return BenchResult(
        name=NAME, title=f"Fused generation throughput, batch {cfg.batch} vs 1 ({receiver.name})",
        config={**asdict(cfg), "fuser": source},
        columns=["batch", "e2e_s", "e2e_tokens_per_s", "e2e_cpu_tokens_per_s", "decode_s", "decode_tokens_per_s",
                 "decode_cpu_tokens_per_s", "prompt_tokens"],
        rows=table, summary=summary,
        targets=[Target(f"batch {cfg.batch} / batch 1 tokens/s, end to end (wall clock)", ratio_e2e, ">=",
                        TARGET_RATIO, "x"),
                 Target(f"batch {cfg.batch} / batch 1 tokens/s, end to end (CPU time)", ratio_e2e_cpu, ">=",
                        TARGET_RATIO, "x"),
                 Target(f"batch {cfg.batch} / batch 1 tokens/s, decoding only (wall clock)", ratio_dec, ">=",
                        TARGET_RATIO, "x")],
        notes=[f"{cfg.new_tokens} new tokens per row (EOS ignored); fuser: {source}; "
               f"{cfg.repeats} interleaved rounds after 1 warm-up; batch-1 rounds rotate over the "
               f"{cfg.batch} questions, batch-1 decoding uses the first",
               "end to end includes the receiver's and the sharer's prefill and the fusion: on a CPU, prefill is "
               "compute-bound and costs batch times as much, so only the decoding part gains from batching",
               "*_cpu_*: from this process's CPU time (steadier than the wall clock on a shared machine)"])
