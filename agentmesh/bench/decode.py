"""Benchmark 7: batch-1 greedy decoding of the embedded model, every mode against transformers'
own `generate` (fp32 eager) and against the memory-bandwidth roofline.

Modes: "generate" (transformers' `model.generate`, greedy, fp32 eager: the reference), "default"
(agentmesh's own path, what every unfused agent runs: `prefill_with_logits` of the whole prompt,
whose last logits give the first token, then `decode`), and the opt-in `FastDecoder` modes of
`agentmesh.models.fast` named weights+cache(+compile), e.g. "int8+static".

ms/token is the difference method: (time for `new_tokens` tokens - time for 1 token) /
(new_tokens - 1), so the prompt's prefill cancels out; methods interleaved, medians. Greedy
agreement is teacher-forced: each mode is fed the fp32 eager continuation of every prompt of a
fixed set and its own pick is compared with the reference's at every position (a free-running
comparison would count every token after a first difference as wrong).

Roofline: decoding one token reads every weight once, so weight bytes per token / memory
bandwidth is the fastest any implementation could go on this core; the bandwidth is the faster
of a 256 MB copy (bytes read + written per second) and a 256 MB sum (bytes read per second),
on one thread. `roofline_fraction` = that bound / the measured ms/token.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from agentmesh.bench.common import BenchResult, Target, embedded_model, interleave, median

if TYPE_CHECKING:
    from agentmesh.models.loaded_model import LoadedModel
    from agentmesh.models.pool import ModelPool

NAME = "decode"
TARGET_FAST = 0.6       # fastest mode's ms/token / generate's, with agreement >= TARGET_AGREEMENT
TARGET_AGREEMENT = 0.95
TARGET_DEFAULT = 1.02   # default / generate, end to end, at every prompt length
PROMPTS = (
    "The history of the printing press begins in",
    "Write a short note to a neighbour about a lost cat.",
    "Explain why the sky is blue in two sentences.",
    "List three uses of copper.",
    "What is the capital of France, and what river runs through it?",
    "Translate 'good morning' into Spanish and French.",
    "A recipe for pancakes needs",
    "The main difference between a virus and a bacterium is",
)


@dataclass(frozen=True)
class Config:
    modes: tuple[str, ...] = ("fp32+static", "bf16+static", "int8+static", "int8wo+static", "int8wo+static+compile")
    new_tokens: int = 32
    prompt_lengths: tuple[int, ...] = (16, 128, 512)   # default vs generate, end to end
    agreement_prompts: int = 8
    agreement_tokens: int = 32
    repeats: int = 3
    bandwidth_mb: int = 256
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0

    @classmethod
    def quick(cls, **overrides: Any) -> "Config":
        return cls(**{"modes": ("fp32+static", "int8wo+static"), "new_tokens": 8, "prompt_lengths": (16, 128),
                      "agreement_prompts": 2, "agreement_tokens": 8, "repeats": 1, "bandwidth_mb": 64,
                      **overrides})


def _progress(message: str) -> None:
    print(f"decode: {message}", file=sys.stderr, flush=True)


def memory_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> dict[str, float]:
    """GB/s of one thread: a copy (bytes read + written) and a sum (bytes read), medians."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    runs = interleave({"copy": lambda: dst.copy_(src), "read": lambda: src.sum()}, repeats=repeats, warmup=1)
    copy_gbps = 2 * nbytes / median(runs["copy"]) / 1e9
    read_gbps = nbytes / median(runs["read"]) / 1e9
    return {"copy_GB_per_s": copy_gbps, "read_GB_per_s": read_gbps, "GB_per_s": max(copy_gbps, read_gbps)}


def parse_mode(mode: str) -> Any:
    """"int8+static+compile" -> FastConfig(weights="int8", static_cache=True, compile=True)."""
    from agentmesh.errors import ConfigError
    from agentmesh.models.fast import FastConfig

    parts = mode.split("+")
    if parts[0] not in ("fp32", "bf16", "int8", "int8wo") or not set(parts[1:]) <= {"static", "dynamic", "compile"}:
        raise ConfigError(f"decode mode {mode!r} is unknown; expected WEIGHTS[+static|+dynamic][+compile], "
                          "WEIGHTS one of fp32, bf16, int8, int8wo")
    return FastConfig(weights=parts[0], static_cache="dynamic" not in parts,  # type: ignore[arg-type]
                      compile="compile" in parts, max_len=4096)


def _prompt_ids(lm: LoadedModel, length: int, seed: int) -> torch.Tensor:
    """A chat prompt of exactly `length` tokens (real text, repeated as needed)."""
    ids: list[int] = []
    i = 0
    while len(ids) < length:
        ids += lm.chat_ids(PROMPTS[(seed + i) % len(PROMPTS)])
        i += 1
    return torch.tensor([ids[-length:]])


def run(cfg: Config = Config(), *, lm: LoadedModel | None = None, pool: ModelPool | None = None) -> BenchResult:
    from agentmesh.models.fast import FastDecoder, weight_bytes_per_token
    from agentmesh.models.inference import GenerationConfig, decode, prefill_with_logits

    lm = lm if lm is not None else embedded_model(pool, device=cfg.device, dtype=cfg.dtype)
    _progress(f"memory bandwidth ({cfg.bandwidth_mb} MB, one thread)")
    bw = memory_bandwidth(cfg.bandwidth_mb << 20, repeats=max(cfg.repeats, 3))
    _progress(f"preparing modes {', '.join(cfg.modes)}")
    decoders = {mode: FastDecoder(lm, parse_mode(mode)) for mode in cfg.modes}

    def hf_generate(ids: torch.Tensor, n: int) -> Callable[[], Any]:
        mask = torch.ones_like(ids)
        return lambda: lm.model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                         do_sample=False, pad_token_id=0)

    def default(ids: torch.Tensor, n: int) -> Callable[[], Any]:
        gen = GenerationConfig(max_new_tokens=n)

        def go() -> Any:  # what an unfused agent runs (`LocalEndpoint.text`): the prompt in one pass
            cache, logits = prefill_with_logits(lm, ids)
            return decode(lm, cache, ids[:, :0], None, gen, first_logits=logits)
        return go

    def fast(mode: str, ids: torch.Tensor, n: int) -> Callable[[], Any]:
        return lambda: decoders[mode].generate(ids, n)

    # Greedy reference continuations (fp32 eager, transformers' generate) and each mode's agreement.
    _progress(f"greedy agreement: {cfg.agreement_prompts} prompts x {cfg.agreement_tokens} tokens per mode")
    agree_ids = [torch.tensor([lm.chat_ids(p)]) for p in PROMPTS[:cfg.agreement_prompts]]
    refs = [hf_generate(ids, cfg.agreement_tokens)()[:, ids.shape[1]:] for ids in agree_ids]
    own = [default(ids, cfg.agreement_tokens)().tokens for ids in agree_ids]
    agreement = {"generate": 1.0,
                 "default": float(torch.cat([(a == r).float().flatten() for a, r in zip(own, refs)]).mean())}
    for mode, dec in decoders.items():
        picks = [dec.generate(ids, cfg.agreement_tokens, forced=r) for ids, r in zip(agree_ids, refs)]
        agreement[mode] = float(torch.cat([(p == r).float().flatten() for p, r in zip(picks, refs)]).mean())

    # ms/token at the first prompt length, every method interleaved.
    ids = _prompt_ids(lm, cfg.prompt_lengths[0], cfg.seed)
    makers: dict[str, Callable[[torch.Tensor, int], Callable[[], Any]]] = {"generate": hf_generate, "default": default}
    for mode in cfg.modes:
        makers[mode] = lambda i, n, mode=mode: fast(mode, i, n)
    methods = {}
    for name, make in makers.items():
        methods[f"{name}:long"] = make(ids, cfg.new_tokens)
        methods[f"{name}:one"] = make(ids, 1)
    _progress(f"ms/token: {len(makers)} methods, {cfg.repeats} interleaved rounds after a warm-up")
    runs = interleave(methods, repeats=cfg.repeats, warmup=1)
    ms = {name: (median(runs[f"{name}:long"]) - median(runs[f"{name}:one"])) / (cfg.new_tokens - 1) * 1e3
          for name in makers}
    weights = {"generate": weight_bytes_per_token(lm.model), "default": weight_bytes_per_token(lm.model)}
    weights.update({mode: weight_bytes_per_token(dec.model) for mode, dec in decoders.items()})
    rows = []
    for name in makers:
        bound_ms = weights[name] / (bw["GB_per_s"] * 1e9) * 1e3
        rows.append({"mode": name, "ms_per_token": ms[name], "vs_generate": ms[name] / ms["generate"],
                     "greedy_agreement": agreement[name], "weight_MB_per_token": weights[name] / 1e6,
                     "roofline_ms": bound_ms, "roofline_fraction": bound_ms / ms[name] if ms[name] > 0 else float("nan")})

    # The default path against generate, end to end (prefill + new tokens), at every prompt length.
    e2e = {}
    for length in cfg.prompt_lengths:
        _progress(f"default vs generate at a {length}-token prompt")
        p = _prompt_ids(lm, length, cfg.seed)
        e2e[length] = interleave({"generate": hf_generate(p, cfg.new_tokens), "default": default(p, cfg.new_tokens)},
                                 repeats=cfg.repeats, warmup=1)
    length_rows = [{"prompt_tokens": n, "generate_s": median(r["generate"]), "default_s": median(r["default"]),
                    "default_vs_generate": r.paired_ratio("default", "generate"),
                    "cpu_default_vs_generate": r.paired_ratio("default", "generate", "cpu")} for n, r in e2e.items()]

    good = [r for r in rows if r["mode"] not in ("generate", "default") and r["greedy_agreement"] >= TARGET_AGREEMENT]
    fastest = min(good, key=lambda r: r["ms_per_token"]) if good else None
    worst = max(length_rows, key=lambda r: r["default_vs_generate"])
    targets = [
        Target(f"fastest mode with >= {TARGET_AGREEMENT:.0%} agreement ({fastest['mode'] if fastest else 'none'}): "
               "ms/token / generate's", fastest["vs_generate"] if fastest else float("nan"), "<=", TARGET_FAST),
        Target(f"default / generate end to end, worst prompt length ({worst['prompt_tokens']} tokens)",
               worst["default_vs_generate"], "<=", TARGET_DEFAULT),
    ]
    return BenchResult(
        name=NAME, title=(f"Batch-1 greedy decoding, {lm.name}, {cfg.dtype}, prompt {cfg.prompt_lengths[0]} tokens, "
                          f"{cfg.new_tokens} new, {torch.get_num_threads()} thread(s)"),
        config=asdict(cfg),
        columns=["mode", "ms_per_token", "vs_generate", "greedy_agreement", "weight_MB_per_token", "roofline_ms",
                 "roofline_fraction"],
        rows=rows, summary={"bandwidth": bw},
        extra_tables={"Default path vs transformers' generate, end to end": (
            ["prompt_tokens", "generate_s", "default_s", "default_vs_generate", "cpu_default_vs_generate"],
            length_rows)},
        targets=targets,
        notes=[f"memory bandwidth, one thread: copy {bw['copy_GB_per_s']:.1f} GB/s (read + written), sum "
               f"{bw['read_GB_per_s']:.1f} GB/s (read); the roofline uses the faster, {bw['GB_per_s']:.1f} GB/s",
               f"greedy agreement: teacher-forced, {cfg.agreement_prompts} prompts x {cfg.agreement_tokens} tokens "
               "against transformers' generate (fp32 eager); 'default' is free-running (it must be identical)",
               "compile modes include no compilation time (it happens in the warm-up round)"])
