"""Damaged and hostile fuser checkpoints: every claim in their JSON is checked before anything is
allocated, every problem is one line (exit status 2 in the CLI), and `graph check` validates a
fuse edge's fuser from its metadata without reading a weight."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from typer.testing import CliRunner

from agentmesh.c2c.checkpoints import fuser_info, load_any, load_fuser, save_fuser
from agentmesh.c2c.fuser import Fuser
from agentmesh.c2c.fuser_cli import app as fuser_app
from agentmesh.cache.kv import ModelSignature
from agentmesh.errors import CheckpointError
from agentmesh.graph.cli import app as graph_app

RECEIVER = ModelSignature(name="recv", model_type="qwen3", num_layers=2, num_kv_heads=1, head_dim=8, vocab_size=64,
                          fingerprint="")
SHARER = ModelSignature(name="share", model_type="qwen2", num_layers=3, num_kv_heads=2, head_dim=4, vocab_size=64,
                        fingerprint="")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    fuser = Fuser.build(RECEIVER, SHARER, hidden_dim=8, intermediate_dim=8, num_layers=3)
    return save_fuser(fuser, tmp_path_factory.mktemp("fusers") / "good")


def copy_with(saved: Path, dst: Path, edit: Callable[[dict[str, Any]], Any] | None = None, *,
              text: str | None = None) -> Path:
    """A copy of the saved fuser whose fuser.json is `edit`ed (or replaced by `text`)."""
    dst.mkdir()
    (dst / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    doc = json.loads((saved / "fuser.json").read_text())
    if edit is not None:
        edit(doc)
    (dst / "fuser.json").write_text(text if text is not None else json.dumps(doc))
    return dst


@pytest.fixture
def no_allocation(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every projector given real storage or weights read: a refused file must do neither."""
    events: list[str] = []
    to_empty = torch.nn.Module.to_empty

    def recording(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        events.append("to_empty")
        return to_empty(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to_empty", recording)
    return events


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


BAD_DOCS = {
    "duplicate route": (lambda d: d["routes"].append(dict(d["routes"][0])), r"routes\[2\] routes receiver layer 0 a second time"),
    "empty routes": (_set(("routes",), []), "routes is empty"),
    "unknown alignment": (_set(("alignment",), "sideways"), "alignment is 'sideways'; expected one of last, first, longest"),
    "unknown layer map": (_set(("layer_map",), "zigzag"), "layer_map is 'zigzag'; expected one of last_aligned, k_nearest"),
    "non-numeric layers": (_set(("receiver", "signature", "num_layers"), "many"),
                           "receiver.signature: num_layers is 'many'; expected an integer from 1 to 1024"),
    "absurd layer count": (_set(("receiver", "signature", "num_layers"), 10**9),
                           "num_layers is 1000000000; expected an integer from 1 to 1024"),
    "string route index": (lambda d: d["routes"][0].update(receiver_layer="0"), r"routes\.0\.receiver_layer"),
    "non-numeric dim": (lambda d: d["projector"]["init_args"][0].update(target_dim="wide"),
                        "target_dim is 'wide'; expected an integer"),
    "sizes unlike the weights": (lambda d: [a.update(hidden_dim=10**6) for a in d["projector"]["init_args"]],
                                 r"model\.safetensors: tensor projectors\.0\.\S+ has shape"),
    "unrouted projector": (lambda d: d["projector"]["init_args"].append(dict(d["projector"]["init_args"][0])),
                           r"projectors 2 are in projector\.init_args but no route uses them"),
}


@pytest.mark.parametrize("case", list(BAD_DOCS))
def test_bad_fuser_json_is_refused_before_allocation(saved: Path, tmp_path: Path, no_allocation: list[str],
                                                     case: str) -> None:
    edit, message = BAD_DOCS[case]
    folder = copy_with(saved, tmp_path / "f", edit)
    with pytest.raises(CheckpointError, match=message) as err:
        load_fuser(folder)
    assert "\n" not in str(err.value) and no_allocation == []
    with pytest.raises(CheckpointError, match=message):
        fuser_info(folder)  # the metadata check finds the same problem


def test_the_good_fuser_loads_and_its_metadata_reads(saved: Path) -> None:
    fuser = load_fuser(saved)
    assert fuser.receiver == RECEIVER and len(fuser.config.routes) == 2
    assert fuser_info(saved) == ("recv", "share")


def test_sizes_are_checked_against_the_models_before_allocation(saved: Path, no_allocation: list[str]) -> None:
    other = ModelSignature(**{**RECEIVER.to_dict(), "num_layers": 5})
    with pytest.raises(CheckpointError, match=r"was trained for receiver 'recv' \(2 layers.*but the receiver is .*5 layers"):
        load_any(saved, receiver_signature=other)
    assert no_allocation == []
    assert load_any(saved, receiver_signature=RECEIVER, sharer_signature=SHARER).sharer == SHARER


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "nests more than 32 levels deep"),
    ('{"format": "agentmesh-fuser", "format": "agentmesh-fuser"}', "key 'format' appears twice"),
    ('{"format": NaN}', "NaN is not a number JSON allows"),
])
def test_unparseable_fuser_json_is_one_line(saved: Path, tmp_path: Path, text: str, message: str) -> None:
    folder = copy_with(saved, tmp_path / "f", text=text)
    with pytest.raises(CheckpointError, match=message) as err:
        load_fuser(folder)
    assert "\n" not in str(err.value)


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    fuser = Fuser.build(RECEIVER, SHARER, hidden_dim=8, intermediate_dim=8, num_layers=3)
    with torch.no_grad():
        max(fuser.projectors[1].parameters(), key=lambda p: p.numel()).view(-1)[3] = float("nan")
    folder = save_fuser(fuser, tmp_path / "nan")
    with pytest.raises(CheckpointError, match=r"tensor projectors\.1\.\S+ holds NaN or Inf values"):
        load_fuser(folder)


def test_published_layout_claims_are_checked(tmp_path: Path) -> None:
    folder = tmp_path / "pair"
    (folder / "final").mkdir(parents=True)
    config = {"model": {"base_model": "Qwen/Qwen3-0.6B", "teacher_model": "Qwen/Qwen2.5-0.5B-Instruct",
                        "mapping": "last_aligned"}}
    (folder / "config.json").write_text(json.dumps(config))
    routes = folder / "final" / "projector_config.json"
    routes.write_text('{"0": {"1": {"99999999": [[0, 0]]}}}')
    with pytest.raises(CheckpointError, match="receiver layer key '99999999' is not a layer number below 1024"):
        load_any(folder)
    routes.write_text('{"0": {"1": {"0": [[0, 0]], "0": [[1, 0]]}}}')
    with pytest.raises(CheckpointError, match="key '0' appears twice"):
        fuser_info(folder)
    routes.write_text('{"0": {"1": {"0": [[0, 0]]}}}')
    (folder / "final" / "projector_0.pt").write_bytes(b"x" * 64)
    (folder / "final" / "projector_0.json").write_text(json.dumps(
        {"class": "C2CProjector", "init_args": {"source_dim": "four", "target_dim": 8, "source_num_heads": 1,
                                                "target_num_heads": 1}}))
    with pytest.raises(CheckpointError, match="init_args.source_dim is 'four'; expected an integer"):
        fuser_info(folder)
    (folder / "final" / "projector_0.json").write_text(json.dumps(
        {"class": "C2CProjector", "init_args": {"source_dim": 4, "target_dim": 8, "source_num_heads": 1,
                                                "target_num_heads": 1, "hidden_dim": 4096}}))
    with pytest.raises(CheckpointError, match=r"describe [\d,]+ weights, but .*projector_0\.pt holds only 64 bytes"):
        fuser_info(folder)
    config["model"]["mapping"] = "zigzag"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model.mapping is 'zigzag'; expected one of last_aligned, k_nearest"):
        fuser_info(folder)


def test_fuser_cli_reports_a_damaged_checkpoint_in_one_line(saved: Path, tmp_path: Path) -> None:
    folder = copy_with(saved, tmp_path / "f", _set(("routes",), []))
    result = CliRunner().invoke(fuser_app, ["inspect", str(folder)])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "routes is empty" in result.output


PIPELINE = """\
version: 1
name: fused
agents:
  sharer: {{context: facts}}
  receiver: {{}}
edges:
  - {{from: sharer, to: receiver, type: cache, mode: fuse, fuser: {fuser}}}
"""


def test_graph_check_validates_fuser_metadata_without_reading_weights(saved: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("graph check read the weights")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    good = tmp_path / "good.yaml"
    good.write_text(PIPELINE.format(fuser=saved))
    missing = tmp_path / "missing.yaml"
    missing.write_text(PIPELINE.format(fuser=tmp_path / "no_such_fuser"))
    damaged = tmp_path / "damaged.yaml"
    damaged.write_text(PIPELINE.format(fuser=copy_with(saved, tmp_path / "bad", _set(("alignment",), "sideways"))))

    # The fuser was trained for "recv"/"share", not the graph's default model: the check compares them.
    result = CliRunner().invoke(graph_app, ["check", str(good)])
    assert result.exit_code == 2 and "fuser" in result.output and "was trained for receiver recv" in result.output
    for path, message in ((missing, f"fuser folder {tmp_path / 'no_such_fuser'} does not exist"),
                          (damaged, "alignment is 'sideways'")):
        result = CliRunner().invoke(graph_app, ["check", str(path)])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert lines[0].startswith(f"{path}:7: edges[0].fuser: ") and message in lines[0]


def test_graph_check_accepts_the_shipped_fuser_edge() -> None:
    root = Path(__file__).resolve().parents[1]
    result = CliRunner().invoke(graph_app, ["check", str(root / "graphs" / "fuse_by_path.yaml")])
    assert result.exit_code == 0 and result.output.startswith("ok "), result.output
    assert textwrap.dedent(result.output).count("\n") == 1
