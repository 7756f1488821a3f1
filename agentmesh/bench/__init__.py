"""Benchmarks, run as `agentmesh bench NAME` (`agentmesh.bench.cli`); their figures and write-ups
live in the repository's `bench/` folder (`bench/results/NAME.json`, `bench/RESULTS.md`).

Each module has `NAME`, a frozen `Config` dataclass (defaults = the full run, `Config.quick()`
= a run under two minutes on two CPU cores) and `run(cfg, ...) -> BenchResult`. `run_named`
builds the config, runs, prints the table and writes JSON. Quick runs write to
`bench/results/quick/` (not tracked), so they never replace the published full-run figures.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import typing
from pathlib import Path
from typing import Any, Sequence

from agentmesh.errors import ConfigError

DEFAULT_THREADS = 1
BENCHMARKS: tuple[str, ...] = ("c2c_vs_t2t", "fusion_overhead", "batching", "codec", "mqtt", "scheduler", "decode",
                               "response_fusion", "edge_cloud")
DESCRIPTIONS = {
    "c2c_vs_t2t": "End-to-end latency per question: text-to-text vs cache-to-cache vs prefix (target >= 2.5x).",
    "fusion_overhead": "C2C prefill over plain prefills at 256 tokens (target <= 1.15x); projector share per layer.",
    "batching": "Fused generation throughput at batch 8 vs batch 1 (target >= 3x).",
    "codec": "Cache codec encode+decode throughput per wire dtype beside memcpy (target >= 2 GB/s bf16, one core).",
    "mqtt": "A 256-token cache of the embedded model over a loopback mosquitto (target >= 100 MB/s).",
    "scheduler": "Per-agent scheduler overhead on a ten-agent graph, model time excluded (target <= 2 ms).",
    "decode": "Batch-1 decode ms/token per mode vs transformers' generate and the bandwidth roofline (target <= 0.6x).",
    "response_fusion": "Decode ms/token of prompt+response fusion (sharer reads every token) vs prompt fusion.",
    "edge_cloud": "Envelope seal and AES-256-GCM cost on a multi-MB cache (one core); bytes on the wire per edge-cloud run.",
}


def module(name: str) -> Any:
    """The benchmark module called `name` (dashes or underscores)."""
    key = name.replace("-", "_")
    if key not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"agentmesh.bench.{key}")


def make_config(name: str, *, quick: bool = False, device: str | None = None,
                overrides: Sequence[str] = ()) -> Any:
    """The `Config` of benchmark `name`: full or quick, with `key=value` overrides applied."""
    mod = module(name)
    changes = _parse_overrides(mod.Config, overrides)
    fields = {f.name for f in dataclasses.fields(mod.Config)}
    if device is not None:
        if "device" not in fields:
            raise ConfigError(f"benchmark {name!r} runs on the CPU only; drop --device")
        changes["device"] = device
    return mod.Config.quick(**changes) if quick else mod.Config(**changes)


def _parse_overrides(cls: Any, overrides: Sequence[str]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with KEY one of {known}")
        out[key] = _coerce(hints[key], raw.strip(), key)
    return out


def _coerce(hint: Any, raw: str, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if raw.lower() in ("none", "null", ""):
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if origin is tuple:
            inner = args[0] if args else str
            return tuple(_coerce(inner, part.strip(), key) for part in raw.split(",") if part.strip())
        if hint is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        return hint(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"--set {key}={raw!r}: expected a value of type {hint}") from None


def run_named(name: str, *, quick: bool = False, json_path: str | Path | None = None, device: str | None = None,
              threads: int | None = None, overrides: Sequence[str] = (), console: Any = None) -> Any:
    """Run benchmark `name`, print its tables and write its JSON; returns the `BenchResult`."""
    from agentmesh.bench.common import default_json_path, print_result, set_threads, write_json

    cfg = make_config(name, quick=quick, device=device, overrides=overrides)
    # One thread unless told otherwise: on a shared machine a second intra-op thread waits for a busy
    # core at every op (milliseconds each; see bench/NOTES.md), which would swamp the figures.
    set_threads(threads if threads is not None else DEFAULT_THREADS)
    load_at_start = _load_average()
    result = module(name).run(cfg)
    if load_at_start is not None:  # beside the machine's load at the end: how crowded the cores were
        result.summary["load_average_at_start"] = load_at_start
    result.config["quick"] = quick
    result.config["overrides"] = list(overrides)  # so the report can print the command that made it
    print_result(result, console)
    path = write_json(result, json_path if json_path is not None else default_json_path(name, quick=quick))
    if console is not None:
        console.print(f"[dim]wrote {path}[/]")
    else:
        print(f"wrote {path}")
    return result


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not on every platform
        return None
