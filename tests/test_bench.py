"""Benchmarks: every benchmark's smallest configuration runs on tiny models and writes the JSON
it promises. No timing is asserted here; the speed targets live in the benchmarks' own output."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from agentmesh.bench import BENCHMARKS, make_config, module
from agentmesh.bench.common import BenchResult, Target, interleave, write_json
from agentmesh.errors import ConfigError

pytestmark = pytest.mark.timeout(120)
TOP_KEYS = {"benchmark", "title", "machine", "config", "columns", "rows", "summary", "targets", "notes", "tables"}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """Tiny models run hundreds of tiny ops; on a busy machine a second intra-op thread makes each wait
    for a core (milliseconds per op). Timings are not asserted, so one thread only saves time."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pair(tiny_model_factory: Any) -> tuple[Any, Any]:
    return tiny_model_factory("qwen3", "tiny", seed=0), tiny_model_factory("qwen3", "tiny", seed=1)


def _check(result: BenchResult, tmp_path: Path, summary_keys: set[str]) -> dict[str, Any]:
    """The result's JSON file has every promised key, a value for every column, and real numbers."""
    path = write_json(result, tmp_path / f"{result.name}.json")
    data = json.loads(path.read_text())
    assert TOP_KEYS <= set(data), TOP_KEYS - set(data)
    assert data["benchmark"] == result.name and data["rows"]
    for row in data["rows"]:
        assert set(data["columns"]) <= set(row), set(data["columns"]) - set(row)
    assert summary_keys <= set(data["summary"]), summary_keys - set(data["summary"])
    for t in data["targets"]:
        assert {"name", "value", "op", "threshold", "met"} <= set(t)
        assert isinstance(t["value"], (int, float)) and t["met"] == Target(
            t["name"], t["value"], t["op"], t["threshold"]).met
    assert data["machine"]["torch_threads"] >= 1
    return data


def test_c2c_vs_t2t_smallest(pair: tuple[Any, Any], tmp_path: Path) -> None:
    mod = module("c2c_vs_t2t")
    cfg = mod.Config(questions=2, answer_tokens=2, background_tokens=3, breakdown_questions=1, sweep=(3,),
                     sweep_questions=1, hidden_dim=8)
    data = _check(mod.run(cfg, receiver=pair[0], sharer=pair[1]), tmp_path,
                  {"t2t_over_c2c_median", "t2t_eos_over_c2c_median", "prefix_over_c2c_median", "per_question_s"})
    methods = {r["method"]: r for r in data["rows"]}
    assert set(methods) == {"t2t", "t2t_eos", "c2c", "prefix", "receiver"}
    # Every method wrote exactly the forced answer length; t2t wrote the whole background.
    assert all(r["answer_tokens"] == 2 for r in methods.values())
    assert methods["t2t"]["background_tokens"] == 3
    assert 1 <= methods["t2t_eos"]["background_tokens"] <= 3
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in data["summary"]["per_question_s"].values())
    assert {r["stage"] for r in data["tables"]["Stages (median seconds)"]["rows"]} >= {"fusion", "sharer_prefill"}
    assert data["tables"]["T2T / C2C by answer length"]["rows"][0]["answer_tokens"] == 3


def test_fusion_overhead_smallest(pair: tuple[Any, Any], tmp_path: Path) -> None:
    mod = module("fusion_overhead")
    cfg = mod.Config(tokens=16, repeats=1, layer_repeats=1, hidden_dim=8)
    data = _check(mod.run(cfg, receiver=pair[0], sharer=pair[1]), tmp_path,
                  {"c2c_over_plain_median", "fuse_ms", "projectors_ms", "host_syncs_in_fuse"})
    layers = data["tables"]["Projector calls per receiver layer"]["rows"]
    assert [r["layer"] for r in layers] == list(range(pair[0].signature.num_layers))
    assert all(r["ms"] > 0 and 0 < r["share_of_fuse"] for r in layers)
    # The fuse layer loop is pure tensor work (the engine promises it; the benchmark checks it).
    assert sum(data["summary"]["host_syncs_in_fuse"].values()) == 0


def test_batching_smallest(pair: tuple[Any, Any], tmp_path: Path) -> None:
    mod = module("batching")
    cfg = mod.Config(batch=2, new_tokens=2, repeats=1, hidden_dim=8)
    data = _check(mod.run(cfg, receiver=pair[0], sharer=pair[1]), tmp_path,
                  {"e2e_throughput_ratio", "decode_throughput_ratio"})
    assert [r["batch"] for r in data["rows"]] == [1, 2]
    assert all(r["e2e_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in data["rows"])


def test_codec_smallest(tiny_tokenizer: Any, tmp_path: Path) -> None:
    mod = module("codec")
    cfg = mod.Config(tokens=8, num_layers=2, repeats=1)
    data = _check(mod.run(cfg, tokenizer=tiny_tokenizer), tmp_path, {"text_bytes_per_token"})
    rows = {(r["source"], r["wire"]): r for r in data["rows"]}
    assert ("bfloat16", "bf16") in rows and ("float32", "int8") in rows
    # bf16 -> bf16 is lossless; int8 is half the bytes of bf16 (plus scales).
    assert rows[("bfloat16", "bf16")]["max_abs_error_keys"] == 0
    assert rows[("float32", "int8")]["payload_MB"] < rows[("float32", "bf16")]["payload_MB"]
    assert rows[("float32", "fp32")]["vs_text"] > rows[("float32", "bf16")]["vs_text"] > 1


@pytest.mark.mqtt
def test_mqtt_smallest(tmp_path: Path) -> None:
    from agentmesh.errors import TransportError
    from agentmesh.transport.broker import find_mosquitto

    try:
        find_mosquitto()
    except TransportError as exc:
        pytest.skip(str(exc))
    mod = module("mqtt")
    cfg = mod.Config(tokens=16, num_layers=2, repeats=1, chunk_sizes=(1024, 256 * 1024))
    data = _check(mod.run(cfg), tmp_path, {"payload_bytes", "cache_to_cache_ms", "best_MB_per_s"})
    small, default = data["rows"]
    assert small["chunks"] > 1 and default["chunks"] == 1
    assert small["wire_overhead_pct"] > default["wire_overhead_pct"] > 0  # more chunks, more frame headers


def test_scheduler_smallest(tmp_path: Path) -> None:
    mod = module("scheduler")
    data = _check(mod.run(mod.Config(repeats=1, tiny_repeats=1)), tmp_path, {"worst_wall_ms_per_agent_no_model"})
    assert [(r["graph"], r["endpoints"]) for r in data["rows"]] == [
        ("chain", "no model"), ("mixed", "no model"), ("chain", "tiny model")]
    assert all(r["agents"] == 10 and r["run_wall_ms"] > 0 for r in data["rows"])
    assert data["rows"][2]["model_ms"] > 0


# ---- plumbing --------------------------------------------------------------------------------------
def test_interleave_rotates_and_discards_warmup() -> None:
    calls: list[str] = []
    times = interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(times[n]) for n in "ab"] == [3, 3] and [len(times.cpu[n]) for n in "ab"] == [3, 3]
    assert all(t >= 0 for clock in (times.wall, times.cpu) for v in clock.values() for t in v)
    times.wall, times.cpu = {"a": [2.0, 4.0, 9.0], "b": [1.0, 1.0, 3.0]}, {"a": [1.0, 1.0, 1.0], "b": [2.0, 2.0, 2.0]}
    assert times.paired_ratio("a", "b") == 3.0 and times.paired_ratio("a", "b", "cpu") == 0.5


def test_configs_quick_overrides_and_errors() -> None:
    for name in BENCHMARKS:
        full, quick = make_config(name), make_config(name, quick=True)
        assert full != quick, name
    cfg = make_config("c2c_vs_t2t", quick=True, device="cpu", overrides=["answer_tokens=4", "sweep=8,16"])
    assert cfg.questions == 5 and cfg.answer_tokens == 4 and cfg.sweep == (8, 16) and cfg.device == "cpu"
    assert make_config("c2c-vs-t2t", overrides=["hidden_dim=none"]).hidden_dim is None
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        make_config("codec", overrides=["nope=1"])
    with pytest.raises(ConfigError, match="runs on the CPU only"):
        make_config("codec", device="cuda")
    with pytest.raises(ConfigError, match="unknown benchmark"):
        module("warp_speed")
    assert math.isnan(float("nan")) and not Target("x", float("nan"), ">=", 1.0).met


def test_quick_runs_never_replace_the_published_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agentmesh.bench.cli import app

    monkeypatch.chdir(tmp_path)
    args = ["--threads", "1", "--set", "repeats=1", "--set", "tiny_repeats=1"]
    published = tmp_path / "bench" / "results" / "scheduler.json"
    published.parent.mkdir(parents=True)
    published.write_text('{"published": true}')
    r = CliRunner().invoke(app, ["scheduler", "--quick", *args])
    assert r.exit_code == 0, r.output
    assert "Scheduler overhead per agent" in r.output
    quick = json.loads((tmp_path / "bench" / "results" / "quick" / "scheduler.json").read_text())
    assert quick["config"]["quick"] is True
    assert json.loads(published.read_text()) == {"published": True}
    r = CliRunner().invoke(app, ["scheduler", "--json", str(tmp_path / "full.json"), *args])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "full.json").read_text())["config"]["quick"] is False
    bad = CliRunner().invoke(app, ["codec", "--set", "tokens=many"])
    assert bad.exit_code == 2 and "tokens" in bad.output


def test_report_renders_every_result_with_targets_and_command(tiny_tokenizer: Any, tmp_path: Path) -> None:
    from agentmesh.bench.cli import app

    mod = module("codec")
    result = mod.run(mod.Config(tokens=8, num_layers=2, repeats=1, wires=("bf16", "int8")), tokenizer=tiny_tokenizer)
    write_json(result, tmp_path / "codec.json")
    out = tmp_path / "RESULTS.md"
    r = CliRunner().invoke(app, ["report", "--results", str(tmp_path), "--out", str(out),
                                 "--machine", "2-core CPU, no GPU"])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert result.title in text and "Machine: 2-core CPU, no GPU" in text
    assert "`agentmesh bench codec`" in text and "| bfloat16 | bf16 |" in text
    target = result.targets[0]
    assert f"| codec | {target.name} |" in text and ("| yes |" if target.met else "| no |") in text


def test_decode_smallest(pair: tuple[Any, Any], tmp_path: Path) -> None:
    mod = module("decode")
    cfg = mod.Config(modes=("fp32+static", "int8+static"), new_tokens=3, prompt_lengths=(8,), agreement_prompts=1,
                     agreement_tokens=3, repeats=1, bandwidth_mb=8)
    data = _check(mod.run(cfg, lm=pair[0]), tmp_path, {"bandwidth"})
    rows = {r["mode"]: r for r in data["rows"]}
    assert list(rows) == ["generate", "default", "fp32+static", "int8+static"]
    # the default path and fp32 with a static cache pick exactly what generate picks
    assert rows["default"]["greedy_agreement"] == rows["fp32+static"]["greedy_agreement"] == 1.0
    assert rows["int8+static"]["weight_MB_per_token"] < rows["generate"]["weight_MB_per_token"]
    assert all(r["roofline_ms"] > 0 for r in rows.values())
    assert data["summary"]["bandwidth"]["GB_per_s"] > 0
    assert [r["prompt_tokens"] for r in data["tables"]["Default path vs transformers' generate, end to end"]["rows"]] == [8]
    with pytest.raises(ConfigError, match="decode mode 'int4' is unknown"):
        mod.parse_mode("int4")
