"""Fuser training (agentmesh.c2c.train): tiny random-weight models, a few steps each.

The synthetic task: the sharer privately reads "The secret word is W."; the receiver is asked for
the secret word and must answer W. Tiny models are built with a large initializer range so that
the fuser's cache edits move the receiver's output enough to learn in a few dozen steps.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from agentmesh.c2c.checkpoints import load_fuser
from agentmesh.c2c.model import C2CModel, SharerInput
from agentmesh.models.reading import reading_ids
from agentmesh.c2c.train import (
    IGNORE_INDEX,
    ChatRow,
    DataRecipe,
    TrainRecipe,
    batch_loss,
    chat_row,
    checkpointed_projectors,
    collate,
    data_fingerprint,
    load_rows,
    lr_factor,
    prepend_context,
    tokenize_rows,
    train,
)
from agentmesh.c2c.fuser import Fuser
from agentmesh.errors import ConfigError
from agentmesh.models.pool import ModelPool
from agentmesh.models.tiny import save_tiny_model

WORDS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "flame"]
TINY = dict(initializer_range=0.3)  # sensitive random models: cache edits visibly move the logits
PROJ = dict(hidden_dim=32, intermediate_dim=32, dropout=0.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls on a shared 2-core box: a second thread only adds contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def secret_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice(WORDS)
        rows.append({"messages": [{"role": "user", "content": "What is the secret word?"},
                                  {"role": "assistant", "content": w}],
                     "context": f"The secret word is {w}."})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def models(tiny_model_factory):
    receiver = tiny_model_factory("qwen3", "tiny", seed=0, name="train-rec", **TINY)
    sharer = tiny_model_factory("llama", "tiny", seed=1, name="train-sha", num_layers=3, **TINY)
    return receiver, sharer


@pytest.fixture(scope="module")
def pool(models):
    p = ModelPool()
    p.put("rec", models[0])
    p.put("sha", models[1])
    return p


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_jsonl(d / "train.jsonl", secret_rows(48, 0)), write_jsonl(d / "eval.jsonl", secret_rows(16, 1))


def recipe(files, out: Path, **over) -> TrainRecipe:
    base = dict(receiver="rec", sharer="sha", sharer_context=True, projector=PROJ,
                data=dict(path=str(files[0]), eval_path=str(files[1])), steps=30, lr=1e-2, batch_size=8,
                eval_every=10, save_every=0, output=str(out), seed=0)
    for key, value in over.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return TrainRecipe.parse(base)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def trained(models, pool, data, tmp_path_factory):
    receiver, sharer = models
    before = (snapshot(receiver.model), snapshot(sharer.model))
    r = recipe(data, tmp_path_factory.mktemp("run") / "out")
    result = train(r, pool=pool, progress=False, resume=False)
    return r, result, before


# ---- learning ----------------------------------------------------------------------------------
def test_held_out_loss_goes_down(trained):
    _, result, _ = trained
    assert result.completed and result.steps == 30 and len(result.losses) == 30
    steps = [s for s, _ in result.eval_losses]
    assert steps == [0, 10, 20, 30]
    first, last = result.eval_losses[0][1], result.final_eval_loss
    assert last < 0.6 * first, result.eval_losses
    head, tail = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert tail < head - 1.0, (head, tail)


def test_frozen_models_unchanged_and_only_projectors_trained(trained, models):
    r, result, (rec_before, sha_before) = trained
    receiver, sharer = models
    for before, lm in ((rec_before, receiver), (sha_before, sharer)):
        after = lm.model.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert not any(p.requires_grad for p in lm.model.parameters())
    # The fuser's initial weights come from the seed; every trained matrix moved away from them.
    torch.manual_seed(r.seed)
    from agentmesh.c2c.train.loop import _build_fuser
    initial = _build_fuser(r, receiver, sharer, result.total_steps).state_dict()
    final = load_fuser(result.fuser_dir).state_dict()
    assert initial.keys() == final.keys()
    moved = [k for k in initial if initial[k].dim() >= 2 and not torch.equal(initial[k], final[k])]
    matrices = [k for k in initial if initial[k].dim() >= 2]
    assert moved == matrices


def test_gradients_reach_the_projectors_through_the_hf_cache(models, data):
    receiver, sharer = models
    torch.manual_seed(0)
    fuser = Fuser.build(receiver.signature, sharer.signature, hidden_dim=16, intermediate_dim=16, dropout=0.1)
    c2c = C2CModel(receiver, [sharer], [fuser])
    fuser.train()
    rows = [chat_row(x) for x in secret_rows(3, 5)]
    ex, _ = tokenize_rows(rows, receiver, sharer, sharer_context=True, max_length=512)
    batch = collate(ex, c2c, sharer_context=True)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        fuser.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        with checkpointed_projectors(fuser, checkpointing):
            batch_loss(c2c, batch, checkpoint_receiver=checkpointing).backward()
        return {n: p.grad.clone() for n, p in fuser.named_parameters() if p.grad is not None}

    plain = grads(False)
    assert set(plain) == {n for n, _ in fuser.named_parameters()}  # every projector parameter gets a gradient
    assert all(g.abs().sum() > 0 for n, g in plain.items() if n.endswith(("key_in.weight", "value_proj_out.weight")))
    assert all(p.grad is None for p in (*receiver.model.parameters(), *sharer.model.parameters()))
    # Checkpointing projectors and the receiver's pass replays the same Gumbel noise and
    # dropout: the same gradients.
    again = grads(True)
    assert all(torch.allclose(plain[n], again[n], atol=1e-6, rtol=1e-4) for n in plain)


def test_temperature_annealed_per_optimizer_step(trained, data, pool, tmp_path):
    r, result, _ = trained
    fuser = load_fuser(result.fuser_dir)
    args = json.loads((result.fuser_dir / "fuser.json").read_text())["projector"]["init_args"]
    assert all(a["anneal_steps"] == 30 for a in args)  # defaults to the run's optimizer steps
    assert all(float(p.gate_temperature) == pytest.approx(1e-3) for p in fuser.projectors)
    # Midway: tau = 1.0 * (1e-3 / 1.0) ** (3 / 12), read from the step-3 checkpoint.
    out = tmp_path / "mid"
    train(recipe(data, out, steps=12, eval_every=0), pool=pool, progress=False, resume=False, stop_at=3)
    state = load_file(str(out / "checkpoints" / "step-0000003" / "state.safetensors"))
    temps = [v for k, v in state.items() if k.endswith("gate_temperature")]
    assert len(temps) == 2 and all(float(t) == pytest.approx(1e-3 ** 0.25, rel=1e-5) for t in temps)


# ---- resuming ----------------------------------------------------------------------------------
def test_resume_continues_the_same_schedule(data, pool, tmp_path):
    over = dict(steps=6, batch_size=4, grad_accum=2, eval_every=0, projector=dict(dropout=0.1))
    full = train(recipe(data, tmp_path / "a", **over), pool=pool, progress=False, resume=False)
    part = train(recipe(data, tmp_path / "b", **over), pool=pool, progress=False, resume=False, stop_at=3)
    assert part.steps == 3 and not part.completed and part.fuser_dir is None
    rest = train(recipe(data, tmp_path / "b", **over), pool=pool, progress=False, resume=True)
    assert rest.steps == 6 and rest.completed
    assert rest.lrs == pytest.approx(full.lrs, rel=1e-12)
    assert rest.lrs[3:] == pytest.approx([lr_factor(k, 6, 1) * 1e-2 for k in range(3, 6)])
    assert rest.losses == pytest.approx(full.losses, rel=1e-5)
    a, b = load_fuser(full.fuser_dir).state_dict(), load_fuser(rest.fuser_dir).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # A checkpoint made with another recipe is refused, not silently continued.
    with pytest.raises(ConfigError, match="another recipe"):
        train(recipe(data, tmp_path / "b", **{**over, "lr": 2e-2}), pool=pool, progress=False, resume=True)


# ---- the saved fuser ---------------------------------------------------------------------------
def test_saved_fuser_reloads_and_generates(trained, models, data):
    r, result, _ = trained
    receiver, sharer = models
    doc = json.loads((result.fuser_dir / "fuser.json").read_text())
    prov = doc["provenance"]
    rows = [chat_row(json.loads(line)) for line in data[0].read_text().splitlines()]
    assert prov["data_sha256"] == data_fingerprint(rows) == result.data_sha256
    assert prov["steps"] == 30 and prov["recipe"]["lr"] == r.lr and prov["recipe"]["sharer_context"] is True
    assert prov["final_eval_loss"] == pytest.approx(result.final_eval_loss)
    assert prov["final_train_loss"] == pytest.approx(result.final_train_loss)
    assert (result.output_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    fuser = load_fuser(result.fuser_dir)
    model = C2CModel(receiver, [sharer], [fuser])
    prompt = receiver.chat_ids([{"role": "user", "content": "What is the secret word?"}])
    ids = torch.tensor([prompt])
    row = torch.tensor([reading_ids(sharer, context="The secret word is tiger.") + prompt[:-1]])
    out = model.generate(ids, max_new_tokens=6, sharer_inputs=[SharerInput(row, torch.ones_like(row))])
    assert out.shape[0] == 1 and 1 <= out.shape[1] <= 6
    # The fused cache changes what the receiver says compared with the receiver alone.
    alone = C2CModel(receiver).generate(ids, max_new_tokens=6)
    assert not torch.equal(out, alone)


# ---- data and batches --------------------------------------------------------------------------
def test_openhermes_rows_and_labels_on_final_turn_only(models):
    receiver, sharer = models
    hermes = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Name a fruit"},
                                {"from": "gpt", "value": "pear"}]}
    row = chat_row(hermes)
    assert row.prompt[0] == {"role": "system", "content": "Be brief."} and row.answer == "pear"
    assert chat_row({"messages": [{"role": "user", "content": "no answer"}]}) is None
    ex, _ = tokenize_rows([row, ChatRow(({"role": "user", "content": "x"},), "a much longer answer here")],
                          receiver, sharer, sharer_context=False, max_length=512)
    c2c = C2CModel(receiver, [sharer], [Fuser.build(receiver.signature, sharer.signature, hidden_dim=8,
                                                     intermediate_dim=8)])
    batch = collate(ex, c2c, sharer_context=False)
    first = batch.labels[0][batch.labels[0] != IGNORE_INDEX].tolist()
    assert receiver.decode(first, skip_special_tokens=False) == "pear<|im_end|>"
    assert "Hello" in receiver.decode(batch.input_ids[0]) and batch.sharer is None
    assert batch.attention_mask[:, -1].all()  # prompts left-padded, answers right-padded
    assert (batch.labels[0] == IGNORE_INDEX).sum() == batch.labels.shape[1] - len(first)
    with pytest.raises(ConfigError, match="conversations\\[0\\]"):
        chat_row({"conversations": [{"from": "robot", "value": "x"}]})


def test_context_task_rows_are_generated_and_fingerprinted():
    d = DataRecipe(context_task={"n": 10, "seed": 3}, eval_fraction=0.1)
    train_rows, held = load_rows(d, seed=0)
    assert len(train_rows) == 9 and len(held) == 1
    assert all(r.context and r.answer in r.context for r in train_rows + held)
    assert all(r.prompt[-1]["role"] == "user" and "Question:" in r.prompt[-1]["content"] for r in train_rows)
    again, _ = load_rows(d, seed=0)
    assert data_fingerprint(again) == data_fingerprint(train_rows)
    other, _ = load_rows(DataRecipe(context_task={"n": 10, "seed": 4}, eval_fraction=0.1), seed=0)
    assert data_fingerprint(other) != data_fingerprint(train_rows)


def test_prepend_context_shifts_gather_indices():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])          # left-padded sharer rows
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    gather = torch.tensor([[-1, 2, 3], [1, 2, 3]])             # receiver span -> sharer positions
    out = prepend_context(SharerInput(ids, mask, gather), [[1, 2, 3], []], pad_id=0)
    assert out.input_ids.tolist() == [[1, 2, 3, 5, 6], [0, 7, 8, 9, 10]]
    for b in range(2):  # every gathered token is the same token as before
        for j in range(3):
            if gather[b, j] >= 0:
                assert out.input_ids[b, out.gather_index[b, j]] == ids[b, gather[b, j]]
    assert out.gather_index[0, 0] == -1


def test_cross_tokenizer_pair_trains(tiny_model_factory, data, tmp_path):
    receiver = tiny_model_factory("qwen3", "tiny", seed=0, name="train-rec", **TINY)
    sharer = tiny_model_factory("qwen2", "smol", seed=2, num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1)
    p = ModelPool()
    p.put("rec", receiver)
    p.put("smol", sharer)
    result = train(recipe(data, tmp_path / "x", sharer="smol", steps=2, eval_every=0,
                          data=dict(limit=8, eval_limit=4)), pool=p, progress=False, resume=False)
    assert result.completed and all(torch.isfinite(torch.tensor(result.losses)))
    assert load_fuser(result.fuser_dir).sharer.num_kv_heads == 1


# ---- recipe and CLI ----------------------------------------------------------------------------
def test_recipe_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"projector\.hidden_dmi"):
        TrainRecipe.parse({"data": {"path": "x.jsonl"}, "projector": {"hidden_dmi": 3}})
    with pytest.raises(ConfigError, match="exactly one of data.path"):
        TrainRecipe.parse({"data": {}})
    with pytest.raises(ConfigError, match="steps or epochs"):
        TrainRecipe.parse({"data": {"path": "x"}, "steps": 3, "epochs": 1})
    bad = tmp_path / "r.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainRecipe.from_yaml(bad)


def test_cli_trains_from_yaml_and_reports_errors(tiny_tokenizer, data, tmp_path):
    from agentmesh.c2c.train.cli import app

    rec = save_tiny_model(tmp_path / "rec", "qwen3", tiny_tokenizer, seed=0, **TINY)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"receiver": str(rec), "sharer": str(rec), "sharer_context": True,
                                    "projector": PROJ, "data": {"path": str(data[0]), "eval_fraction": 0.25},
                                    "epochs": 1, "batch_size": 8, "save_dtype": "bfloat16",
                                    "output": str(tmp_path / "unused")}))
    runner = CliRunner()
    res = runner.invoke(app, [str(path), "--steps", "2", "--out", str(tmp_path / "cli"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "trained 2/2 steps" in res.output
    fuser = load_fuser(tmp_path / "cli" / "fuser")
    assert fuser.receiver.num_layers == 2
    assert all(p.dtype == torch.bfloat16 and p.gate_temperature.dtype == torch.float32 for p in fuser.projectors)
    assert not (tmp_path / "unused").exists()
    path.write_text("data: {path: x.jsonl}\nlr: -1\n")
    res = runner.invoke(app, [str(path)])
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0 and "lr" in res.output
