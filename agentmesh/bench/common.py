"""What every benchmark shares: timing (interleaved, warmed up, medians), the embedded model,
targets, the result record, its table and its JSON file.

Ratios are only ever taken between figures measured in the same process, with the compared
methods interleaved round-robin (a slow moment on a shared machine then hits every method alike)
and after a warm-up round that is thrown away.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch

from agentmesh.errors import ConfigError

if TYPE_CHECKING:
    from agentmesh.c2c.fuser import Fuser
    from agentmesh.cache.kv import KVCache, ModelSignature
    from agentmesh.models.loaded_model import LoadedModel
    from agentmesh.models.pool import ModelPool
    from agentmesh.models.protocol import LanguageModel

RESULTS_DIR = Path("bench") / "results"
# Quick runs land beside the published figures, in a folder git ignores.
QUICK_RESULTS_DIR = RESULTS_DIR / "quick"
# Where the shipped fuser of the embedded model lives (the first that exists is timed).
TRAINED_FUSERS = (Path("fusers") / "smollm2_context", Path("runs") / "smollm2_context" / "fuser")


@dataclass(frozen=True)
class ModelBench:
    """The settings every benchmark of a receiver-sharer pair has: where the models run, their
    dtype, the fuser's width and the seed."""

    device: str = "cpu"
    dtype: str = "auto"                  # model dtype ("auto": float32 on CPU, bfloat16 on GPU)
    hidden_dim: int | None = None        # fuser width (None: the shipped recipe's)
    seed: int = 0


@dataclass(frozen=True)
class CacheShape:
    """A synthetic cache in the embedded model's shape (SmolLM2-135M: 30 layers, 3 KV heads of dim 64)."""

    tokens: int = 256
    num_layers: int = 30
    num_kv_heads: int = 3
    head_dim: int = 64
    seed: int = 0


def make_cache(shape: CacheShape, dtype: torch.dtype, signature: ModelSignature | None = None) -> KVCache:
    """A KVCache of `shape` with values spread like real keys (a few units)."""
    from agentmesh.cache.kv import KVCache

    g = torch.Generator().manual_seed(shape.seed)
    dims = (1, shape.num_kv_heads, shape.tokens, shape.head_dim)
    keys = tuple((torch.randn(dims, generator=g) * 3).to(dtype) for _ in range(shape.num_layers))
    values = tuple(torch.randn(dims, generator=g).to(dtype) for _ in range(shape.num_layers))
    ids = torch.randint(0, 49152, (1, shape.tokens), generator=g)
    positions = torch.arange(shape.tokens)[None]
    return KVCache(keys=keys, values=values, signature=signature, token_ids=ids, positions=positions,
                   attention_mask=torch.ones(1, shape.tokens, dtype=torch.long))


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it (a no-op on CPU)."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[float, Any]:
    """(seconds, result) of one call of `fn`, GPU work included."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def median(values: Iterable[float]) -> float:
    vals = list(values)
    return statistics.median(vals) if vals else float("nan")


@dataclass
class Runs:
    """Seconds per method and round: wall-clock time, and this process's CPU time (all threads).

    On a shared machine the wall clock also counts the moments another process held the core; with
    one torch thread, CPU time counts only this process's own work, so its ratios are steadier.
    `runs[name]` is the wall-clock list.
    """

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]

    def __getitem__(self, name: str) -> list[float]:
        return self.wall[name]

    def paired_ratio(self, num: str, den: str, clock: str = "wall") -> float:
        """Median over rounds of time(num) / time(den): each pair ran back to back."""
        t = self.wall if clock == "wall" else self.cpu
        return median(a / b for a, b in zip(t[num], t[den]) if b > 0)


def interleave(methods: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
               device: torch.device | str | None = None) -> Runs:
    """Run every method `warmup` times (discarded), then `repeats` rounds of all of them.

    Each round starts with the next method in turn (round r begins at method r mod M), so no
    method is always the one that runs first after a pause.
    """
    names = list(methods)
    for _ in range(warmup):
        for name in names:
            timed(methods[name], device)
    runs = Runs({n: [] for n in names}, {n: [] for n in names})
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            c0 = time.process_time()
            wall, _ = timed(methods[name], device)
            runs.cpu[name].append(time.process_time() - c0)
            runs.wall[name].append(wall)
    return runs


@dataclass(frozen=True)
class Target:
    """A performance target: `value op threshold` (op is ">=" or "<=")."""

    name: str
    value: float
    op: str
    threshold: float
    unit: str = ""

    @property
    def met(self) -> bool:
        if self.value != self.value:  # nan: not measured
            return False
        return self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}

    def describe(self) -> str:
        mark = "met" if self.met else "NOT met"
        return f"{self.name}: {self.value:.3g}{self.unit} (target {self.op} {self.threshold:g}{self.unit}) {mark}"


@dataclass
class BenchResult:
    """What a benchmark returns: its settings, rows for the table, summary figures and targets."""

    name: str
    title: str
    config: dict[str, Any]
    columns: list[str]
    rows: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra_tables: dict[str, tuple[list[str], list[dict[str, Any]]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.name, "title": self.title, "machine": machine_info(self.config.get("device", "cpu")),
            "config": self.config, "columns": self.columns, "rows": self.rows, "summary": self.summary,
            "targets": [t.to_dict() for t in self.targets], "notes": self.notes,
            "tables": {k: {"columns": c, "rows": r} for k, (c, r) in self.extra_tables.items()},
        }


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """The facts a reader needs to compare figures between machines."""
    dev = torch.device(device)
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(dev),
        "cpu": _cpu_name(),
    }
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if dev.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "-"
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


def print_result(result: BenchResult, console: Any = None) -> None:
    """The result as rich tables on `console` (stdout by default)."""
    from rich.console import Console
    from rich.table import Table

    # Wide enough for every column; a pipe would otherwise get 80 columns and truncated cells.
    console = console or Console(width=max(Console().width, 150))
    for title, (columns, rows) in [(result.title, (result.columns, result.rows)), *result.extra_tables.items()]:
        table = Table(title=title, title_justify="left")
        for col in columns:
            table.add_column(col, justify="left" if col == columns[0] else "right")
        for row in rows:
            table.add_row(*(fmt(row.get(c, "")) for c in columns))
        console.print(table)
    for t in result.targets:
        console.print(("[green]" if t.met else "[red]") + t.describe() + "[/]")
    for note in result.notes:
        console.print(f"[dim]- {note}[/]")


def default_json_path(name: str, *, quick: bool = False) -> Path:
    """`bench/results/NAME.json` for a full run, `bench/results/quick/NAME.json` for a quick one."""
    return (QUICK_RESULTS_DIR if quick else RESULTS_DIR) / f"{name.replace('-', '_')}.json"


def write_json(result: BenchResult, path: str | Path | None) -> Path:
    """Write the result as JSON (default `default_json_path`); returns the path."""
    out = Path(path) if path is not None else default_json_path(result.name, quick=bool(result.config.get("quick")))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result.to_dict(), indent=2, default=_json_default) + "\n")
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def bench_cache_dir() -> Path:
    root = os.environ.get("AGENTMESH_BENCH_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()) / "agentmesh" / "bench"


def embedded_model(pool: ModelPool | None = None, *, device: str = "cpu", dtype: str = "auto") -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct, from one `ModelPool`.

    Reading the GGUF file dequantizes it (about 25 s, over a minute on a busy machine), which
    alone would spend half of a `--quick` run; so the first call also saves the dequantized
    weights as a safetensors folder under `bench_cache_dir()`, and later runs load that in a
    second or two. The weights are the same numbers either way.
    """
    from agentmesh.models import DEFAULT_MODEL, builtin_gguf_path, default_pool

    pool = pool if pool is not None else default_pool()
    gguf = builtin_gguf_path(DEFAULT_MODEL)
    stat = gguf.stat()
    folder = bench_cache_dir() / f"{DEFAULT_MODEL}-{stat.st_size}-{stat.st_mtime_ns}"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return _named(pool.get(str(folder), device=device, dtype=dtype), DEFAULT_MODEL)
    loaded = pool.get(DEFAULT_MODEL, device="cpu", dtype="float32")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=folder.parent))
    try:
        _save_plain(loaded, tmp)
        tmp.rename(folder)
    except OSError:  # another run converted it first, or the disk is read-only: use the GGUF load
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").is_file():
            return pool.get(DEFAULT_MODEL, device=device, dtype=dtype)
    if device == "cpu" and dtype in ("auto", "float32"):
        return loaded
    return _named(pool.get(str(folder), device=device, dtype=dtype), DEFAULT_MODEL)


def _named(loaded: LoadedModel, name: str) -> LoadedModel:
    """`loaded` under its built-in name (the cache folder's name is an implementation detail)."""
    from dataclasses import replace

    return replace(loaded, name=name, signature=replace(loaded.signature, name=name))


def _save_plain(loaded: LoadedModel, folder: Path) -> None:
    """Save a GGUF-loaded model as a plain float32 safetensors folder.

    transformers refuses `save_pretrained` on a model that came from GGUF (it is marked as
    quantized, although its weights are already dequantized), so the weights, config (without
    the quantization marker) and tokenizer are written one by one.
    """
    import copy

    from safetensors.torch import save_model

    config = copy.deepcopy(loaded.model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    if getattr(loaded.model, "generation_config", None) is not None:
        loaded.model.generation_config.save_pretrained(folder)
    save_model(loaded.model, str(folder / "model.safetensors"))  # drops the tied lm_head copy
    loaded.tokenizer.save_pretrained(folder)


def fuser_size(default: int = 128) -> int:
    """The projector width of the shipped fuser recipe (`recipes/smollm2_context.yaml`), if any."""
    recipe = Path("recipes") / "smollm2_context.yaml"
    if not recipe.is_file():
        return default
    import yaml

    try:
        data = yaml.safe_load(recipe.read_text()) or {}
    except yaml.YAMLError:
        return default
    found = _find_key(data, "hidden_dim")
    return int(found) if isinstance(found, int) and found > 0 else default


def _find_key(data: Any, key: str) -> Any:
    if isinstance(data, dict):
        if key in data:
            return data[key]
        for v in data.values():
            hit = _find_key(v, key)
            if hit is not None:
                return hit
    elif isinstance(data, list):
        for v in data:
            hit = _find_key(v, key)
            if hit is not None:
                return hit
    return None


def bench_fuser(receiver: LanguageModel, sharer: LanguageModel, *, hidden_dim: int | None = None, seed: int = 0
                ) -> tuple[Fuser, str]:
    """(fuser, where it came from): the trained one (`TRAINED_FUSERS`) when it exists and fits the
    models, else a fresh one of the shipped size (latency depends on shapes and on how
    many tokens are generated, not on weight values).

    A fresh fuser's gates are opened so its output really differs from the receiver's own cache;
    a closed gate would cost the same (the projector still runs, its output is multiplied by 0).
    """
    from agentmesh.c2c.fuser import Fuser

    for trained in TRAINED_FUSERS:
        if not trained.is_dir() or hidden_dim is not None:
            continue
        try:
            from agentmesh.c2c.checkpoints import bind_models, load_fuser

            fuser = load_fuser(trained)
            if fuser.receiver.same_shape(receiver.signature) and fuser.sharer.same_shape(sharer.signature):
                fuser = bind_models(fuser, receiver.signature, sharer.signature)
                return _to_model(fuser.eval(), receiver), f"trained:{trained}"
        except Exception:  # noqa: BLE001 - an unreadable or mismatched fuser: time a fresh one
            continue
    width = hidden_dim or fuser_size()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fuser = Fuser.build(receiver.signature, sharer.signature, hidden_dim=width, intermediate_dim=width,
                            num_layers=3)
    with torch.no_grad():
        for p in fuser.projectors:
            for name in ("key_gate_logit", "value_gate_logit"):
                getattr(p, name).fill_(1.0)
    return _to_model(fuser.eval(), receiver), f"fresh:hidden_dim={width}"


def _to_model(fuser: Fuser, lm: LanguageModel) -> Fuser:
    return fuser.to(device=lm.device)


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads {threads} must be >= 1")
        torch.set_num_threads(threads)


def pct(values: Sequence[float], q: float) -> float:
    vals = sorted(values)
    if not vals:
        return float("nan")
    k = (len(vals) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def bench_models(cfg: Any, receiver: LoadedModel | None = None, sharer: LoadedModel | None = None,
                 fuser: Fuser | None = None, pool: ModelPool | None = None
                 ) -> tuple[LoadedModel, LoadedModel, Fuser, str]:
    """(receiver, sharer, fuser, where the fuser came from) for a model benchmark: the embedded
    model on both ends unless given, and `bench_fuser` unless a fuser is given."""
    if receiver is None:
        receiver = embedded_model(pool, device=cfg.device, dtype=cfg.dtype)
    sharer = sharer if sharer is not None else receiver
    if fuser is not None:
        return receiver, sharer, fuser, "given"
    fuser, source = bench_fuser(receiver, sharer, hidden_dim=cfg.hidden_dim, seed=cfg.seed)
    return receiver, sharer, fuser, source
