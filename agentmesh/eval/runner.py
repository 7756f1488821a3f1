"""`agentmesh eval`: run every method on the same items in one run, then write the report.

Items are visited one at a time and every method answers each item before the next item starts,
so slow drifts of the machine (thermal, other load) hit all methods alike. An exception in one
method on one item is recorded as that item's error and counted wrong; it never ends the run and
never leaves the denominator.
"""
from __future__ import annotations

import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agentmesh.errors import ConfigError, error_line
from agentmesh.progress import progress_bar
from agentmesh.tasks.datasets import DatasetConfig, Item, load_items
from agentmesh.eval.extract import grade
from agentmesh.eval.methods import (
    CacheToCache, Method, Prefix, ReceiverOnly, SharerOnly, TextToText, run_safely)
from agentmesh.eval.metrics import ItemResult, Summary, summarize
from agentmesh.eval.report import write_report
from agentmesh.yaml_file import read_yaml

if TYPE_CHECKING:
    from agentmesh.c2c.fuser import Fuser
    from agentmesh.models.pool import ModelPool
    from agentmesh.models.protocol import LanguageModel

MethodName = Literal["receiver", "sharer", "t2t", "c2c", "prefix", "oracle", "oracle-response"]
_NEEDS_SHARER = {"sharer", "t2t", "c2c", "prefix", "oracle", "oracle-response"}
# The replacement oracles and the fusion whose ceiling each measures.
_ORACLES = {"oracle": "prompt", "oracle-response": "prompt+response"}
_WIRE_DTYPES = ("float32", "float16", "bfloat16")


class EvalConfig(BaseModel):
    """An evaluation run (the YAML file given to `agentmesh eval`). Relative paths are relative to
    the working directory."""

    model_config = ConfigDict(extra="forbid")

    receiver: str = Field(default="smollm2-135m-instruct", description="model ref of the receiver")
    sharer: str | None = Field(default=None, description="model ref of the sharer")
    receiver_adapter: str | None = Field(default=None, description="PEFT adapter folder merged into the receiver")
    sharer_adapter: str | None = Field(default=None, description="PEFT adapter folder merged into the sharer "
                                       "(a specialist fine-tune of a base model)")
    fuser: str | None = Field(default=None, description="fuser folder for c2c")
    methods: list[MethodName] = Field(default_factory=lambda: ["receiver"], min_length=1)
    dataset: DatasetConfig
    max_new_tokens: int = Field(default=64, ge=1)
    t2t_background_tokens: int = Field(default=256, ge=1)
    output: Path = Path("runs/eval")
    dtype: str = "auto"
    device: str = "cpu"
    wire_dtype: str | None = Field(default=None, description="dtype caches are counted in (default: the model's)")

    @model_validator(mode="after")
    def _consistent(self) -> "EvalConfig":
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods {self.methods} lists a method twice")
        needs = sorted(set(self.methods) & _NEEDS_SHARER)
        if needs and not self.sharer:
            raise ValueError(f"methods {needs} need a 'sharer' model")
        if "c2c" in self.methods and not self.fuser:
            raise ValueError("method c2c needs a 'fuser' (a trained fuser folder)")
        if self.wire_dtype is not None and self.wire_dtype not in _WIRE_DTYPES:
            raise ValueError(f"wire_dtype {self.wire_dtype!r} is unknown; expected one of {', '.join(_WIRE_DTYPES)}")
        return self


def _first_validation_error(e: ValidationError) -> str:
    """The first problem, as `key.path: what is wrong` (unknown keys list the allowed ones)."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        model: Any = EvalConfig
        for part in err["loc"][:-1]:
            model = model.model_fields[str(part)].annotation if hasattr(model, "model_fields") else model
        allowed = ", ".join(getattr(model, "model_fields", {}))
        return f"unknown key {loc!r}; allowed keys: {allowed}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{loc}: {msg}" if err["loc"] else msg


def parse_config(data: Any, *, source: str = "eval config") -> EvalConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping of settings, got {type(data).__name__}")
    try:
        return EvalConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_first_validation_error(e)}") from None


def load_config(path: str | Path) -> EvalConfig:
    """An `EvalConfig` from a YAML file; every problem is a one-line ConfigError naming the file."""
    return parse_config(read_yaml(path, "eval config"), source=str(path))


def load_fuser(ref: str, receiver: LanguageModel, sharer: LanguageModel) -> Fuser:
    """The trained fuser at `ref`, checked against (receiver, sharer)."""
    from agentmesh.c2c.checkpoints import load_any

    return load_any(ref, receiver_signature=receiver.signature, sharer_signature=sharer.signature)


def build_methods(config: EvalConfig, pool: ModelPool | None = None) -> list[Method]:
    """The configured methods over models from `pool` (the process-wide pool by default)."""
    import torch

    from agentmesh.eval.adapters import C2CGenerator, ModelGenerator, PrefixGenerator

    if pool is None:
        from agentmesh.models.pool import default_pool

        pool = default_pool()
    receiver = pool.get(config.receiver, dtype=config.dtype, device=config.device, adapter=config.receiver_adapter)
    sharer = pool.get(config.sharer, dtype=config.dtype, device=config.device,
                      adapter=config.sharer_adapter) if config.sharer else None
    wire = getattr(torch, config.wire_dtype) if config.wire_dtype else None
    rgen = ModelGenerator(receiver)
    sgen = ModelGenerator(sharer) if sharer is not None else None
    n = config.max_new_tokens
    methods: list[Method] = []
    for name in config.methods:
        if name == "receiver":
            methods.append(ReceiverOnly(rgen, n))
        elif name == "sharer":
            methods.append(SharerOnly(sgen, n))  # type: ignore[arg-type]  # validated: sharer is set
        elif name == "t2t":
            methods.append(TextToText(sgen, rgen, n, config.t2t_background_tokens))  # type: ignore[arg-type]
        elif name == "c2c":
            from agentmesh.c2c.model import C2CModel

            fuser = load_fuser(config.fuser or "", receiver, sharer)
            methods.append(CacheToCache(C2CGenerator(C2CModel(receiver, [sharer], [fuser]), wire_dtype=wire), n))
        elif name == "prefix":
            methods.append(Prefix(PrefixGenerator(sharer, receiver, wire_dtype=wire), n))
        elif name in _ORACLES:
            from agentmesh.c2c.fuser import Fuser
            from agentmesh.c2c.model import C2CModel

            oracle = Fuser.oracle(receiver.signature, sharer.signature, fusion=_ORACLES[name])  # type: ignore[union-attr]
            model = C2CModel(receiver, [sharer], [oracle])
            methods.append(CacheToCache(C2CGenerator(model, wire_dtype=wire, name=name), n, name=name))
    return methods


def run_item(method: Method, item: Item) -> ItemResult:
    """One method on one item, graded; never raises for the method's own failures."""
    out = run_safely(method, item)
    if out.error is None:
        try:
            g = grade(item, out.text)
            prediction, correct = g.prediction, g.correct
        except Exception as e:  # grading a strange output is still that item's failure, not the run's
            out = replace(out, error=error_line(e))
            prediction, correct = None, False
    else:
        prediction, correct = None, False
    return ItemResult(
        item_id=item.id, subject=item.subject, method=method.name, answer=item.answer, prediction=prediction,
        correct=correct, latency_s=out.latency_s, ttft_s=out.ttft_s, bytes_exchanged=out.bytes_exchanged,
        error=out.error, output=out.text, prompt_tokens=out.prompt_tokens, prefill_s=out.prefill_s)


def run_methods(items: Sequence[Item], methods: Sequence[Method], *, progress: bool = True) -> list[ItemResult]:
    """Every method on every item (item-major), with a progress bar showing running accuracy."""
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"method names {names} must be unique")
    results: list[ItemResult] = []
    correct = {m: 0 for m in names}
    with progress_bar(total=len(items) * len(methods), enabled=progress, unit="answer", desc="eval") as bar:
        for done, item in enumerate(items, 1):
            for method in methods:
                r = run_item(method, item)
                results.append(r)
                correct[r.method] += int(r.correct)
                bar.update(1)
            bar.set_postfix_str(" ".join(f"{m}={correct[m] / done:.2f}" for m in names), refresh=False)
    return results


def evaluate(config: EvalConfig, *, pool: ModelPool | None = None, progress: bool = True,
             methods: Sequence[Method] | None = None) -> Summary:
    """Run `config`: load items, build the methods (or use `methods`), answer, summarize, and write
    `summary.json`, `items.csv` and the plots into `config.output`."""
    items = load_items(config.dataset)
    built = list(methods) if methods is not None else build_methods(config, pool)
    started = time.time()
    results = run_methods(items, built, progress=progress)
    meta = {
        "receiver": config.receiver, "sharer": config.sharer, "fuser": config.fuser,
        "receiver_adapter": config.receiver_adapter, "sharer_adapter": config.sharer_adapter,
        "methods": [m.name for m in built], "items": len(items),
        "dataset": config.dataset.model_dump(mode="json"), "max_new_tokens": config.max_new_tokens,
        "t2t_background_tokens": config.t2t_background_tokens, "device": config.device, "dtype": config.dtype,
        "wire_dtype": config.wire_dtype, "started_unix": round(started, 3),
        "wall_s": round(time.time() - started, 3), "platform": platform.platform(), "python": platform.python_version(),
    }
    summary = summarize(results, meta=meta)
    write_report(summary, config.output)
    return summary
