"""Per-item results and their per-method summary: accuracy with a Wilson 95 % interval, latency,
time to first token, bytes exchanged and the receiver's prefill (the prompt tokens it read itself and
how long that took). A failed item counts as wrong and is listed by id."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


@dataclass(frozen=True)
class ItemResult:
    """One method's attempt at one item."""

    item_id: str
    subject: str
    method: str
    answer: str
    prediction: str | None
    correct: bool
    latency_s: float | None
    ttft_s: float | None
    bytes_exchanged: int
    error: str | None = None
    output: str = ""
    prompt_tokens: int | None = None  # the receiver's prefill, as in `MethodOutput` (None: not reported)
    prefill_s: float | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


@dataclass(frozen=True)
class MethodSummary:
    method: str
    n: int
    correct: int
    accuracy: float
    ci95: tuple[float, float]
    latency_mean_s: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None
    ttft_mean_s: float | None
    prompt_tokens_mean: float | None  # over the items that reported a count
    prefill_mean_s: float | None
    bytes_mean: float
    failed: list[str]
    per_subject: dict[str, float] = field(default_factory=dict)


@dataclass
class Summary:
    """Every method's summary (in run order), every item result, and facts about the run."""

    methods: dict[str, MethodSummary]
    results: list[ItemResult]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        methods = {}
        for name, s in self.methods.items():
            d = asdict(s)
            d["ci95"] = list(s.ci95)
            methods[name] = d
        return {"meta": dict(self.meta), "methods": methods}


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (0, 1) when there are no trials."""
    if n <= 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, center - half), min(1.0, center + half))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between order statistics."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize_method(method: str, results: Sequence[ItemResult]) -> MethodSummary:
    """One method's summary. Failed items stay in the denominator; their timings are left out of
    the latency statistics (they did not run to the end)."""
    n = len(results)
    correct = sum(1 for r in results if r.correct and not r.failed)
    ok = [r for r in results if not r.failed]
    latencies = [r.latency_s for r in ok if r.latency_s is not None]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    read = [float(r.prompt_tokens) for r in ok if r.prompt_tokens is not None]
    prefills = [r.prefill_s for r in ok if r.prefill_s is not None]
    by_subject: dict[str, list[bool]] = {}
    for r in results:
        by_subject.setdefault(r.subject or "-", []).append(r.correct and not r.failed)
    return MethodSummary(
        method=method, n=n, correct=correct, accuracy=correct / n if n else 0.0,
        ci95=wilson_interval(correct, n),
        latency_mean_s=_mean(latencies), latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95), ttft_mean_s=_mean(ttfts),
        prompt_tokens_mean=_mean(read), prefill_mean_s=_mean(prefills),
        bytes_mean=float(_mean([float(r.bytes_exchanged) for r in ok]) or 0.0),
        failed=[r.item_id for r in results if r.failed],
        per_subject={s: sum(v) / len(v) for s, v in sorted(by_subject.items())})


def summarize(results: Sequence[ItemResult], *, meta: dict[str, Any] | None = None) -> Summary:
    """Group `results` by method (in order of first appearance) and summarize each."""
    groups: dict[str, list[ItemResult]] = {}
    for r in results:
        groups.setdefault(r.method, []).append(r)
    return Summary(methods={m: summarize_method(m, rs) for m, rs in groups.items()},
                   results=list(results), meta=dict(meta or {}))
