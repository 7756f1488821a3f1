"""Fuser checkpoints: the published C2C layout in, our own layout in/out, hf:// refs, from_pretrained
and the `fuser` CLI. Checkpoints are written in the exact published layout for tiny local models."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from agentmesh.c2c.checkpoints import (
    PUBLISHED_PAIRS, load_any, load_fuser, load_published, pair_models, save_fuser,
)
from agentmesh.c2c.fuser import Fuser
from agentmesh.c2c.fuser_cli import app
from agentmesh.c2c.layer_map import layer_map
from agentmesh.c2c.model import C2CModel
from agentmesh.c2c.projector import C2CProjector
from agentmesh.errors import CheckpointError, ConfigError
from agentmesh.models import ModelPool
from agentmesh.models.tiny import save_tiny_model

PAIR = "qwen3_0.6b+qwen2.5_0.5b_Fuser"
# Receiver and sharers differ in layer count, KV heads and head dim.
RECEIVER = dict(arch="qwen3", seed=0, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16)
SHARER = dict(arch="qwen2", seed=1, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=32)
SHARER2 = dict(arch="llama", seed=2, num_layers=5, num_heads=4, num_kv_heads=2, head_dim=8)
BF16 = {"__type__": "torch.dtype", "value": "bfloat16"}


def _dims(cfg: dict[str, Any]) -> tuple[int, int, int]:
    return cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"]


def write_published(folder: Path, receiver: Path, sharer: Path, rcfg: dict[str, Any], scfg: dict[str, Any], *,
                    seed: int = 0, alignment: bool = False) -> Path:
    """A pair folder byte-for-byte in the published layout, bf16 projectors of width 32."""
    (lt, ht, dt), (ls, hs, ds) = _dims(rcfg), _dims(scfg)
    final = folder / "final"
    final.mkdir(parents=True)
    params = dict(hidden_dim=32, intermediate_dim=32, num_layers=3, dropout=0.1, initial_temperature=1.0,
                  final_temperature=0.001, anneal_steps=1929)
    (folder / "config.json").write_text(json.dumps({
        "model": {"base_model": str(receiver), "teacher_model": str(sharer), "include_response": False,
                  "is_do_alignment": alignment, "alignment_strategy": "longest",
                  "projector": {"type": "C2CProjector", "params": params}, "mapping": "last_aligned"},
        "training": {"learning_rate": 1e-4, "num_epochs": 1}, "output": {"output_dir": "local/x"}}, indent=4))
    routes = {str(t): [[s, t]] for t, s in enumerate(layer_map("last_aligned", lt, ls))}
    (final / "projector_config.json").write_text(json.dumps({"0": {"1": routes}}))
    for t in range(lt):
        init_args = dict(source_dim=ds, target_dim=dt, source_num_heads=hs, target_num_heads=ht, **params, dtype=BF16)
        (final / f"projector_{t}.json").write_text(json.dumps({"class": "C2CProjector", "init_args": init_args}))
        torch.manual_seed(seed * 100 + t)
        p = C2CProjector(**init_args)
        with torch.no_grad():  # every key gate open, value gates open except on layer 1
            p.key_gate_logit.fill_(1.0)
            p.value_gate_logit.fill_(-1.0 if t == 1 else 0.5)
        # The reference casts the whole module, buffer included, to bf16 before saving.
        torch.save({k: v.to(torch.bfloat16) for k, v in p.state_dict().items()}, final / f"projector_{t}.pt")
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ckpt")
    models = {}
    for name, cfg in (("receiver", RECEIVER), ("sharer", SHARER), ("sharer2", SHARER2), ("receiver_b", RECEIVER)):
        cfg = dict(cfg, seed=cfg["seed"] + (7 if name == "receiver_b" else 0))
        models[name] = save_tiny_model(root / name, cfg.pop("arch"), tiny_tokenizer, **cfg)
    return {
        "root": root, **models,
        "pub": write_published(root / "pubs" / PAIR, models["receiver"], models["sharer"], RECEIVER, SHARER),
        "pub2": write_published(root / "pubs" / "r+s2", models["receiver"], models["sharer2"], RECEIVER, SHARER2,
                                seed=1),
        "pub_b": write_published(root / "pubs" / "rb+s", models["receiver_b"], models["sharer"], RECEIVER, SHARER,
                                 seed=2),
        "pool": ModelPool(),
    }


@pytest.fixture
def pub_copy(env: dict[str, Any], tmp_path: Path) -> Path:
    return Path(shutil.copytree(env["pub"], tmp_path / PAIR))


def no_torch_traceback(exc: BaseException) -> bool:
    return exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


def prompt(model: C2CModel) -> torch.Tensor:
    return torch.tensor([model.receiver.encode("The capital of France is Paris. The answer is")])


# ---- the published layout -------------------------------------------------------------------------
def test_published_folder_loads_strictly_and_generates(env):
    model = C2CModel.from_pretrained(env["pub"], pool=env["pool"])
    assert [s.source for s in model.sharers] == [str(env["sharer"])] and model.receiver.source == str(env["receiver"])
    fuser = model.fusers[0]
    assert len(fuser.projectors) == RECEIVER["num_layers"]
    assert [r.sharer_layer for r in fuser.config.routes] == [0, 0, 1, 2]  # last_aligned, 4 <- 3 layers
    assert fuser.config.provenance["base_model"] == str(env["receiver"])
    assert fuser.config.alignment == "last" and fuser.config.layer_map == "last_aligned"
    # Every weight is the file's, bit for bit.
    for t, p in enumerate(fuser.projectors):
        state = torch.load(env["pub"] / "final" / f"projector_{t}.pt", weights_only=True)
        for k, v in p.state_dict().items():
            assert torch.equal(v.to(state[k].dtype), state[k]), (t, k)
        assert p.key_in.weight.dtype == torch.bfloat16
    ids = prompt(model)
    fused = model.prefill_fused(ids, torch.ones_like(ids))
    alone = C2CModel(model.receiver).prefill_fused(ids, torch.ones_like(ids))
    assert not torch.equal(fused.keys[0], alone.keys[0])  # open gates: the fuser changes the cache
    assert torch.equal(fused.values[1], alone.values[1])  # closed value gate on layer 1: untouched
    out = model.generate(ids, max_new_tokens=5)
    assert out.shape == (1, 5)


def test_pair_models_reads_only_config(env, tmp_path):
    folder = write_published(tmp_path / "p", env["receiver"], env["sharer"], RECEIVER, SHARER, alignment=True)
    shutil.rmtree(folder / "final")
    assert pair_models(folder) == (str(env["receiver"]), str(env["sharer"]), "longest")
    config = json.loads((folder / "config.json").read_text())
    config["model"]["teacher_model"] = [str(env["sharer"])]  # multi-sharer recipes write a list
    (folder / "config.json").write_text(json.dumps(config))
    assert pair_models(folder)[1] == str(env["sharer"])
    assert set(PUBLISHED_PAIRS) >= {PAIR, "qwen3_0.6b+llam3.2_1b_Fuser"} and len(PUBLISHED_PAIRS) == 7
    assert PUBLISHED_PAIRS["qwen3_8b+qwen2.5_7b_Fuser"].sharer == "Qwen/Qwen2.5-7B-Instruct"


def _edit_pt(path: Path, change) -> None:
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


CORRUPTIONS = {
    "missing_pt": (lambda f: (f / "final/projector_3.pt").unlink(), r"missing .*final/projector_3\.pt"),
    "truncated_pt": (lambda f: (f / "final/projector_1.pt").write_bytes((f / "final/projector_1.pt").read_bytes()[:300]),
                     r"projector_1\.pt is not a torch-saved state dict"),
    "extra_key": (lambda f: _edit_pt(f / "final/projector_0.pt", lambda s: s.update(extra=torch.zeros(2))),
                  r"projector_0\.pt: unexpected keys extra"),
    "missing_key": (lambda f: _edit_pt(f / "final/projector_2.pt", lambda s: s.pop("value_proj_out.bias")),
                    r"projector_2\.pt: missing keys value_proj_out\.bias"),
    "wrong_shape": (lambda f: _edit_pt(f / "final/projector_0.pt", lambda s: s.update(
        {"key_in.weight": torch.zeros(32, 10, dtype=torch.bfloat16)})),
        r"projector_0\.pt: tensor key_in\.weight has shape \(32, 10\), expected \(32, 64\)"),
    "route_to_missing_sharer_layer": (lambda f: _edit_json(f / "final/projector_config.json", lambda d: d["0"]["1"].update(
        {"3": [[7, 3]]})), r"projector_config\.json: receiver layer 3 reads sharer layer 7.*layers 0-2"),
    "route_to_missing_receiver_layer": (lambda f: _edit_json(f / "final/projector_config.json", lambda d: d["0"]["1"].update(
        {"9": [[2, 3]]})), r"projector_config\.json routes receiver layers \[0, 1, 2, 3, 9\]"),
    "wrong_class": (lambda f: _edit_json(f / "final/projector_0.json", lambda d: d.update({"class": "NotAProjector"})),
                    r"projector_0\.json: unknown projector class 'NotAProjector'"),
    "wrong_dims": (lambda f: _edit_json(f / "final/projector_2.json", lambda d: d["init_args"].update(source_dim=16)),
                   r"projector_2\.json: source_dim=16 but the sharer .* has head dim 32"),
    "bad_init_args": (lambda f: _edit_json(f / "final/projector_1.json", lambda d: d["init_args"].update(wings=2)),
                      r"projector_1\.json: bad init_args for projector 'C2CProjector'"),
    "no_config": (lambda f: (f / "config.json").unlink(), r"holds neither fuser\.json .* nor config\.json"),
    "no_final": (lambda f: shutil.rmtree(f / "final"), r"missing folder .*final"),
    "corrupt_config": (lambda f: (f / "config.json").write_text("{not json"), r"config\.json is not valid JSON"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupted_published_checkpoint_is_a_clear_error(env, pub_copy, name):
    corrupt, message = CORRUPTIONS[name]
    corrupt(pub_copy)
    with pytest.raises(CheckpointError, match=message) as info:
        C2CModel.from_pretrained(pub_copy, pool=env["pool"])
    assert no_torch_traceback(info.value)
    assert "\n" not in str(info.value)


def test_receiver_with_other_layer_count_is_rejected(env, tiny_model_factory):
    cfg = dict(RECEIVER, num_layers=3)
    other = tiny_model_factory(cfg.pop("arch"), **cfg)
    with pytest.raises(CheckpointError, match=r"projector_config\.json routes receiver layers 0-3 but the receiver "
                                              r".*3 layers.*trained for a receiver with 4 layers"):
        C2CModel.from_pretrained(env["pub"], receiver=other, pool=env["pool"])
    cfg = dict(SHARER, num_layers=4)  # last_aligned: a 4-layer sharer would be read from layer 3
    sharer = tiny_model_factory(cfg.pop("arch"), **cfg)
    with pytest.raises(CheckpointError, match=r"trained for a sharer with 3"):
        C2CModel.from_pretrained(env["pub"], sharers=[sharer], pool=env["pool"])


def test_checkpoint_subfolder_and_final_folder_refs(env, pub_copy):
    shutil.copytree(pub_copy / "final", pub_copy / "checkpoint-100")
    _edit_pt(pub_copy / "checkpoint-100/projector_0.pt", lambda s: s.update(key_gate_logit=-s["key_gate_logit"]))
    fuser = load_any(pub_copy, subfolder="checkpoint-100")
    assert fuser.projectors[0].gate_status()["key"] is False
    assert load_any(pub_copy).projectors[0].gate_status()["key"] is True
    assert load_any(pub_copy / "checkpoint-100").config.provenance["subfolder"] == "checkpoint-100"


# ---- our own layout -------------------------------------------------------------------------------
def _same_tensors(a: Fuser, b: Fuser) -> None:
    for pa, pb in zip(a.projectors, b.projectors, strict=True):
        sa, sb = pa.state_dict(), pb.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_own_format_round_trip_is_exact(env, tmp_path, dtype):
    source = load_published(env["pub"])
    if dtype != "bfloat16":  # any dtype: a fuser retrained/converted in another precision
        source = Fuser(source.config, [C2CProjector(**{**p.init_args, "dtype": dtype}) for p in source.projectors])
    save_fuser(source, tmp_path / "own", provenance={"note": "test"})
    assert sorted(p.name for p in (tmp_path / "own").iterdir()) == ["fuser.json", "model.safetensors"]
    doc = json.loads((tmp_path / "own/fuser.json").read_text())
    assert doc["format"] == "agentmesh-fuser" and doc["format_version"] == 2
    assert doc["receiver"]["id"] == str(env["receiver"]) and doc["receiver"]["signature"]["fingerprint"]
    assert doc["projector"]["init_args"][0]["dtype"] == dtype and doc["provenance"]["note"] == "test"
    loaded = load_fuser(tmp_path / "own")
    _same_tensors(source, loaded)
    assert loaded.config.routes == source.config.routes and loaded.config.receiver == source.config.receiver
    assert loaded.config.projector_args == tuple(p.init_args for p in source.projectors)
    assert pair_models(tmp_path / "own") == (str(env["receiver"]), str(env["sharer"]), "last")


def _edit_safetensors(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("change,message", [
    (lambda t: t.update({"projectors.0.extra": torch.zeros(1)}), r"model\.safetensors: unexpected keys projectors\.0\.extra"),
    (lambda t: t.update({"stray": torch.zeros(1)}), r"model\.safetensors: unexpected tensor stray"),
    (lambda t: t.pop("projectors.3.key_in.bias"), r"model\.safetensors: missing keys projectors\.3\.key_in\.bias"),
    (lambda t: t.update({"projectors.1.key_in.bias": torch.zeros(3)}),
     r"model\.safetensors: tensor projectors\.1\.key_in\.bias has shape \(3,\), expected \(32,\)"),
])
def test_own_format_strict_load_errors(env, tmp_path, change, message):
    save_fuser(load_published(env["pub"]), tmp_path / "own")
    _edit_safetensors(tmp_path / "own/model.safetensors", change)
    with pytest.raises(CheckpointError, match=message) as info:
        load_fuser(tmp_path / "own")
    assert no_torch_traceback(info.value)


def test_own_format_version_and_corrupt_weights(env, tmp_path):
    folder = save_fuser(load_published(env["pub"]), tmp_path / "own")
    _edit_json(folder / "fuser.json", lambda d: d.update(format_version=3))
    with pytest.raises(CheckpointError, match=r"fuser\.json has format_version 3, newer than the 2"):
        load_fuser(folder)
    _edit_json(folder / "fuser.json", lambda d: d.update(format_version=1))  # format 1 had no layout
    with pytest.raises(CheckpointError, match=r"format_version 1 has no 'layout'"):
        load_fuser(folder)
    _edit_json(folder / "fuser.json", lambda d: d.update(format_version=2, surprise=True))
    with pytest.raises(CheckpointError, match=r"fuser\.json: surprise: Extra inputs"):
        load_fuser(folder)
    _edit_json(folder / "fuser.json", lambda d: d.pop("surprise"))
    (folder / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        load_fuser(folder)


def test_save_is_atomic(env, tmp_path, monkeypatch):
    import safetensors.torch

    fuser = load_published(env["pub"])
    folder = save_fuser(fuser, tmp_path / "own")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(CheckpointError, match=r"could not write the fuser to .*disk full"):
        save_fuser(fuser, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # old files intact, no temp files left
    monkeypatch.undo()
    _same_tensors(fuser, load_fuser(folder))


def test_own_format_checks_model_fingerprints(env, tmp_path, tiny_model_factory):
    folder = save_fuser(load_published(env["pub"]), tmp_path / "own")
    model = C2CModel.from_pretrained(folder, pool=env["pool"])  # fingerprints of the real configs match
    assert model.generate(prompt(model), max_new_tokens=3).shape == (1, 3)
    cfg = dict(RECEIVER, intermediate_size=96)  # same cache shape, another model
    lookalike = tiny_model_factory(cfg.pop("arch"), **cfg)
    with pytest.raises(CheckpointError, match=r"fingerprint .* \(same shape, different model config\)"):
        C2CModel.from_pretrained(folder, receiver=lookalike, pool=env["pool"])
    loose = C2CModel.from_pretrained(folder, receiver=lookalike, pool=env["pool"], strict_models=False)
    assert loose.generate(prompt(loose), max_new_tokens=2).shape == (1, 2)


# ---- the CLI ----------------------------------------------------------------------------------------
def test_cli_convert_is_lossless_and_generates_the_same_tokens(env, tmp_path):
    runner = CliRunner()
    dst = tmp_path / "converted"
    result = runner.invoke(app, ["convert", str(env["pub"]), str(dst)])
    assert result.exit_code == 0, result.output
    _same_tensors(load_published(env["pub"]), load_fuser(dst))
    published = C2CModel.from_pretrained(env["pub"], pool=env["pool"])
    converted = C2CModel.from_pretrained(dst, pool=env["pool"])
    ids = prompt(published)
    assert torch.equal(published.generate(ids, max_new_tokens=8), converted.generate(ids, max_new_tokens=8))
    fused = published.prefill_fused(ids, torch.ones_like(ids))
    assert torch.equal(fused.keys[3], converted.prefill_fused(ids, torch.ones_like(ids)).keys[3])
    # A non-empty destination is refused unless --force.
    again = runner.invoke(app, ["convert", str(env["pub"]), str(dst)])
    assert again.exit_code == 2 and "not empty; pass --force" in again.stderr
    assert "Traceback" not in again.output and len(again.stderr.strip().splitlines()) == 1
    assert runner.invoke(app, ["convert", str(env["pub"]), str(dst), "--force"]).exit_code == 0


def test_cli_inspect_shows_pair_size_and_gates(env):
    result = CliRunner().invoke(app, ["inspect", str(env["pub"])], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    expected_params = load_published(env["pub"]).num_parameters()
    assert PAIR in out and str(env["receiver"]) in out and f"{expected_params:,}" in out and "bfloat16" in out
    assert "open gates: key 4/4, value 3/4" in out and " kB" in out
    bad = CliRunner().invoke(app, ["inspect", str(env["root"] / "nowhere")])
    assert bad.exit_code == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.output


# ---- hf:// refs -------------------------------------------------------------------------------------
def test_hf_ref_offline_without_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    cache = re.escape(str(tmp_path / "hf" / "hub"))
    with pytest.raises(CheckpointError, match=rf"not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is set") as info:
        load_any(f"hf://nics-efc/C2C_Fuser/{PAIR}")
    assert no_torch_traceback(info.value)
    result = CliRunner().invoke(app, ["pull", PAIR])
    assert result.exit_code == 2 and "HF_HUB_OFFLINE is set" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    unknown = CliRunner().invoke(app, ["pull", "no-such-pair"])
    assert unknown.exit_code == 2 and "known pairs" in unknown.stderr


def test_hf_ref_served_from_the_cache_offline(env, tmp_path, monkeypatch):
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--nics-efc--C2C_Fuser"
    shutil.copytree(env["pub"], repo / "snapshots" / sha / PAIR)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    model = C2CModel.from_pretrained(f"hf://nics-efc/C2C_Fuser/{PAIR}", pool=env["pool"])
    assert model.fusers[0].config.provenance["source"] == str((repo / "snapshots" / sha / PAIR).resolve())
    reference = C2CModel.from_pretrained(env["pub"], pool=env["pool"])
    ids = prompt(model)
    assert torch.equal(model.generate(ids, max_new_tokens=4), reference.generate(ids, max_new_tokens=4))
    assert load_any(PAIR).num_parameters() == reference.fusers[0].num_parameters()  # a bare pair name
    assert load_any(Path(f"hf://nics-efc/C2C_Fuser/{PAIR}")).num_parameters() > 0  # "hf:/..." once a Path
    assert load_any(f"hf://nics-efc/C2C_Fuser/{PAIR}@main").config.routes == reference.fusers[0].config.routes
    pulled = CliRunner().invoke(app, ["pull", PAIR])
    assert pulled.exit_code == 0 and pulled.stdout.strip() == str(repo / "snapshots" / sha / PAIR)


# ---- several pairs at once --------------------------------------------------------------------------
def test_several_pair_folders_share_one_receiver(env):
    one = C2CModel.from_pretrained(env["pub"], pool=env["pool"])
    ids = prompt(one)
    mask = torch.ones_like(ids)
    single = one.prefill_fused(ids, mask)
    caches = {}
    for mode in ("parallel", "sequential"):
        both = C2CModel.from_pretrained([env["pub"], env["pub2"]], mode=mode, pool=env["pool"])
        assert both.mode == mode and [s.source for s in both.sharers] == [str(env["sharer"]), str(env["sharer2"])]
        assert both.receiver is one.receiver  # loaded once through the pool
        caches[mode] = both.prefill_fused(ids, mask)
        assert not torch.equal(caches[mode].keys[2], single.keys[2])
        assert both.generate(ids, max_new_tokens=4).shape == (1, 4)
    assert not torch.equal(caches["parallel"].keys[2], caches["sequential"].keys[2])


def test_pair_folders_for_different_receivers_are_rejected(env):
    e = {k: re.escape(str(env[k])) for k in ("pub", "pub_b", "receiver", "receiver_b")}
    with pytest.raises(CheckpointError, match=rf"fuser {e['pub']} was trained for receiver '{e['receiver']}', "
                                              rf"fuser {e['pub_b']} for receiver '{e['receiver_b']}'"):
        C2CModel.from_pretrained([env["pub"], env["pub_b"]], pool=env["pool"])


def test_c2c_model_build_takes_models_from_the_fuser_unless_given(env):
    recorded = C2CModel.build(None, fusers=[str(env["pub"])], pool=env["pool"])
    assert recorded.receiver.source == str(env["receiver"]) and recorded.sharers[0].source == str(env["sharer"])
    given = C2CModel.build(str(env["receiver"]), sharers=[str(env["sharer"])], fusers=[str(env["pub"])],
                           pool=env["pool"])
    assert given.receiver is recorded.receiver and given.sharers[0] is recorded.sharers[0]
    with pytest.raises(ConfigError, match="no fuser"):
        C2CModel.build(str(env["receiver"]), sharers=[str(env["sharer"])], pool=env["pool"])
    with pytest.raises(CheckpointError, match=r"was trained for receiver .*4 layers.* but the receiver is .*5 layers"):
        C2CModel.build(str(env["sharer2"]), sharers=[str(env["sharer"])], fusers=[load_published(env["pub"])],
                       pool=env["pool"])
