"""Distributed fuser training: `torchrun -m agentmesh train` with 2 CPU processes (gloo) on a tiny
pair, against one process; resuming across a stop and across a change of process count; rank 0
alone writes; the memory budget; the published recipe's dry run.

Equality across batch splits is meaningful only without randomness that depends on the split:
the recipe sets dropout 0 and gate_noise false (deterministic training gates).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from agentmesh.c2c.checkpoints import load_fuser
from agentmesh.c2c.train import TrainRecipe, shard, stream_rows, train
from agentmesh.c2c.train.memory import MemoryBudget, check_fits
from agentmesh.errors import ConfigError
from agentmesh.models.tiny import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "flame"]
STEPS = 4
# Records, from inside every process of a run, each file-system write under the watched folder.
AUDIT = '''
import os, sys
_watch, _log = os.environ.get("AUDIT_WATCH"), os.environ.get("AUDIT_LOG")
_WRITES = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.replace"}
def _hook(event, args):
    if not _watch or not args:
        return
    if event == "open":
        mode, flags = args[1], args[2] or 0
        writing = any(c in mode for c in "wax+") if mode else flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if not writing or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
    elif event not in _WRITES:
        return
    path = os.fsdecode(args[0]) if isinstance(args[0], (str, bytes, os.PathLike)) else ""
    if path.startswith(_watch):
        with open(f"{_log}.{os.environ.get('RANK', '-')}", "a") as f:  # outside the watched folder
            f.write(f"{event} {path}\\n")
sys.addaudithook(_hook)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = rng.choice(WORDS)
        out.append({"messages": [{"role": "user", "content": "What is the secret word?"},
                                 {"role": "assistant", "content": w}], "context": f"The secret word is {w}."})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("dist")
    rec = save_tiny_model(d / "rec", "qwen3", tiny_tokenizer, seed=0, initializer_range=0.3)
    sha = save_tiny_model(d / "sha", "llama", tiny_tokenizer, seed=1, num_layers=3, initializer_range=0.3)
    for name, n, seed in (("train", 40, 0), ("eval", 6, 1)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n, seed)), encoding="utf-8")
    recipe = dict(receiver=str(rec), sharer=str(sha), sharer_context=True, gate_noise=False,
                  projector=dict(hidden_dim=16, intermediate_dim=16, dropout=0.0),
                  data=dict(path=str(d / "train.jsonl"), eval_path=str(d / "eval.jsonl")), steps=STEPS, lr=1e-2,
                  batch_size=2, global_batch=8, eval_every=2, save_every=2, output=str(d / "unused"), seed=0)
    path = d / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    site = d / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT, encoding="utf-8")
    return d, path, recipe, site


def torchrun(setup, out: Path, *args: str) -> subprocess.CompletedProcess:
    d, path, _, site = setup
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": "lo", "AUDIT_WATCH": str(out), "AUDIT_LOG": str(d / f"audit-{out.name}")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "agentmesh", "train", str(path), "--out", str(out), "--no-progress", "--threads", "1", *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _rank_main(rank: int, world: int, port: int, recipe: dict, stop_at: int | None) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    train(TrainRecipe.parse(recipe), progress=False, stop_at=stop_at)


def forked(recipe: dict, *, stop_at: int | None = None, world: int = 2) -> None:
    """The ranks of a run as forked copies of this process (no interpreter start-up per rank);
    torchrun sets the same environment variables."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, recipe, stop_at)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0] * world


def audit(setup, out: Path) -> dict[str, list[str]]:
    d = setup[0]
    return {p.suffix[1:]: p.read_text().splitlines() for p in d.glob(f"audit-{out.name}.*")}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_fuser(folder / "fuser").state_dict()


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def history(folder: Path) -> dict:
    return json.loads((folder / "history.json").read_text())


@pytest.fixture(scope="module")
def two_procs(setup):
    """An uninterrupted 2-process run (torchrun), and one stopped after 2 of its 4 steps."""
    d, _, recipe, _ = setup
    full = torchrun(setup, d / "full")
    forked({**recipe, "output": str(d / "part")}, stop_at=2)
    stopped = d / "stopped-copy"
    shutil.copytree(d / "part", stopped)  # for the resume on one process
    return full, stopped


def test_two_processes_match_one_process_with_the_same_global_batch(setup, two_procs):
    d, _, recipe, _ = setup
    full, _ = two_procs
    assert full.stdout.count("trained 4/4 steps (global batch 8)") == 1  # rank 0 alone prints
    # One process, the same 8 chats a step as 2 x (2 per micro-batch x 2 micro-batches).
    one = train(TrainRecipe.parse({**recipe, "output": str(d / "one")}), progress=False, resume=False)
    assert one.global_batch == 8 and one.completed
    assert max_diff(weights(d / "full"), weights(d / "one")) < 1e-5
    h = history(d / "full")
    assert h["lrs"] == pytest.approx(one.lrs, rel=1e-12) and h["global_batch"] == 8 and h["samples"] == 32
    assert h["losses"] == pytest.approx(one.losses, rel=1e-5)
    assert [s for s, _ in h["eval_losses"]] == [0, 2, 4]
    assert [v for _, v in h["eval_losses"]] == pytest.approx([v for _, v in one.eval_losses], rel=1e-5)
    prov = json.loads((d / "full" / "fuser" / "fuser.json").read_text())["provenance"]
    assert prov["processes"] == 2 and prov["global_batch"] == 8
    # The fuser learnt something, so equality is not that of two untouched initialisations.
    assert h["eval_losses"][-1][1] < h["eval_losses"][0][1]


def test_a_stopped_two_process_run_resumes_on_two_or_one_processes(setup, two_procs):
    d, _, recipe, _ = setup
    _, stopped = two_procs
    assert sorted(p.name for p in (d / "part" / "checkpoints").iterdir()) == ["step-0000002"]
    assert not (d / "part" / "fuser").exists() and history(d / "part")["step"] == 2
    forked({**recipe, "output": str(d / "part")})  # resumes from step 2 on 2 processes
    assert max_diff(weights(d / "full"), weights(d / "part")) < 1e-5
    assert history(d / "part")["lrs"] == pytest.approx(history(d / "full")["lrs"], rel=1e-12)
    # One process, twice the micro-batch: the same global batch, so the same schedule goes on.
    rest = train(TrainRecipe.parse({**recipe, "batch_size": 4, "output": str(stopped)}), progress=False)
    assert rest.steps == STEPS and rest.losses[:2] == pytest.approx(history(d / "full")["losses"][:2], rel=1e-12)
    assert max_diff(weights(d / "full"), weights(stopped)) < 1e-5
    # Another global batch would silently change the schedule: refused, with the fix named.
    (stopped / "fuser").rename(stopped / "done")
    shutil.rmtree(stopped / "checkpoints" / "step-0000004")
    with pytest.raises(ConfigError, match="global batch of 8 .* set global_batch: 8"):
        train(TrainRecipe.parse({**recipe, "global_batch": 16, "output": str(stopped)}), progress=False)


def test_fsdp_shards_the_fuser_and_matches_ddp(setup, two_procs):
    """FSDP: parameters, gradients and AdamW state sharded over 2 processes for 2 steps, then
    checkpointed whole and resumed under DDP: the same fuser as DDP's all along."""
    d, _, recipe, _ = setup
    sharded = {**recipe, "fsdp": True, "output": str(d / "fsdp")}
    forked(sharded, stop_at=2)
    forked({**sharded, "fsdp": False})
    assert max_diff(weights(d / "full"), weights(d / "fsdp")) < 1e-5
    assert history(d / "fsdp")["losses"] == pytest.approx(history(d / "full")["losses"], rel=1e-5)


def test_only_rank_zero_writes(setup, two_procs):
    d = setup[0]
    writes = audit(setup, d / "full")
    assert writes.get("0"), "the audit hook saw no write at all"
    assert "1" not in writes, writes.get("1")
    names = {Path(line.split(" ", 1)[1]).name for line in writes["0"]}
    assert {"recipe.yaml", "history.json", "loss_curve.png"} <= names
    assert any("fuser.json" in n for n in names) and any("step-0000002" in n for n in names)
    assert sorted(p.name for p in (d / "full").iterdir()) == ["checkpoints", "fuser", "history.json",
                                                               "loss_curve.png", "recipe.yaml"]


def test_the_data_stream_is_split_whatever_the_process_count():
    n, seed = 10, 3
    for start in (0, 8, 16):  # steps crossing epoch boundaries too
        one = [i for at, k in shard(start, 4, 2, 0, 1) for i in stream_rows(n, seed, at, k)]
        two = [i for r in range(2) for at, k in shard(start, 2, 2, r, 2) for i in stream_rows(n, seed, at, k)]
        four = [i for r in range(4) for at, k in shard(start, 1, 2, r, 4) for i in stream_rows(n, seed, at, k)]
        assert sorted(one) == sorted(two) == sorted(four) and len(one) == 8
    epoch = stream_rows(n, seed, 0, n)
    assert sorted(epoch) == list(range(n)) and stream_rows(n, seed, n, n) != epoch  # reshuffled per epoch


def test_global_batch_sets_accumulation_or_names_the_conflict():
    r = TrainRecipe.parse({"data": {"path": "x.jsonl"}, "batch_size": 4, "global_batch": 256})
    assert r.accumulation(8) == 8 and r.accumulation(1) == 64
    with pytest.raises(ConfigError, match="not a multiple of batch_size=4 x 3"):
        r.accumulation(3)
    with pytest.raises(ConfigError, match="grad_accum=2 contradicts global_batch=256"):
        TrainRecipe.parse({"data": {"path": "x.jsonl"}, "batch_size": 4, "grad_accum": 2,
                           "global_batch": 256}).accumulation(8)


def test_memory_check_fails_fast_with_what_to_change():
    gb = 10 ** 9  # SI units, as every size the CLI prints
    budget = MemoryBudget(device="cuda:0", frozen_models=2 * gb, fuser=2 * gb, fuser_parameters=478_000_000,
                          gradients=2 * gb, optimizer=4 * gb, activations=30 * gb, tokens="batch 8 x 2048")
    assert budget.total == 40 * gb and "40.0 GB" in budget.lines()[0]
    check_fits(budget, 80 * gb, processes=8)
    with pytest.raises(ConfigError, match=r"needs about 40.0 GB .* only 24.0 GB .*gradient_checkpointing: true.*fsdp"):
        check_fits(budget, 24 * gb, processes=8)


def test_published_recipe_dry_run(tmp_path):
    """The shipped recipe as a user with GPUs runs it, shrunk to tiny stand-ins: two steps."""
    from typer.testing import CliRunner

    from agentmesh.c2c.train.cli import app

    path = ROOT / "recipes" / "c2c_qwen3-0.6b_qwen2.5-0.5b.yaml"
    r = TrainRecipe.from_yaml(path)
    assert (r.receiver, r.sharer) == ("Qwen/Qwen3-0.6B", "Qwen/Qwen2.5-0.5B-Instruct")
    p = r.projector
    assert (p.hidden_dim, p.intermediate_dim, p.num_layers, p.initial_temperature, p.final_temperature,
            p.anneal_steps) == (1024, 1024, 3, 1.0, 0.001, 1929)
    assert (r.layer_map, r.lr, r.weight_decay, r.warmup_ratio, r.grad_clip, r.global_batch) == \
        ("last_aligned", 1e-4, 0.01, 0.1, 1.0, 256)
    assert (r.data.dataset, r.data.limit, r.data.max_length, r.data.eval_fraction) == \
        ("teknium/OpenHermes-2.5", 500_000, 2048, 0.01)
    res = CliRunner().invoke(app, [str(path), "--dry-run", "--out", str(tmp_path / "dry"), "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "trained 2/2 steps (global batch 4)" in res.output
    assert "memory per process on cpu (estimate)" in res.output
    fuser = load_fuser(tmp_path / "dry" / "fuser")
    assert fuser.receiver.model_type == "qwen3" and fuser.sharer.model_type == "qwen2"
    assert fuser.receiver.num_layers == 4 and all(p.dtype == torch.bfloat16 for p in fuser.projectors)
