"""PEFT adapters as model references, and the `kind: finetune` recipe that builds them (tiny models)."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from agentmesh.errors import ModelLoadError
from agentmesh.models.load import load_model
from agentmesh.models.pool import ModelPool
from agentmesh.models.tiny import save_tiny_model


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("base") / "llama", "llama", tiny_tokenizer, seed=0)


def make_lora(base_dir: Path, out: Path, *, targets: list[str], seed: int = 0) -> Path:
    """A peft LoRA adapter with random (non-zero) B matrices, so it changes the model's outputs."""
    from peft import LoraConfig, get_peft_model

    model = load_model(base_dir).model
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft asks a deprecated transformers property
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def lora(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora(base, tmp_path_factory.mktemp("lora") / "spec", targets=["q_proj", "v_proj", "down_proj"])


def _logits(lm: Any, text: str = "What is the capital of France?") -> torch.Tensor:
    ids = torch.tensor([lm.chat_ids(text)])
    with torch.no_grad():
        return lm.model(input_ids=ids).logits[0, -1]


def test_adapter_is_merged_into_a_private_copy(base: Path, lora: Path) -> None:
    from peft import PeftModel

    plain = load_model(base)
    adapted = load_model(base, adapter=lora)
    assert adapted.name == "llama+spec" and "adapter:" in adapted.source
    assert adapted.signature.same_shape(plain.signature)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        reference = PeftModel.from_pretrained(load_model(base).model, str(lora))  # unmerged, computed by peft
    ids = torch.tensor([plain.chat_ids("What is the capital of France?")])
    with torch.no_grad():
        want = reference(input_ids=ids).logits[0, -1]
    torch.testing.assert_close(_logits(adapted), want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_logits(adapted), _logits(plain), atol=1e-3)


def test_pool_keys_models_by_ref_and_adapter(base: Path, lora: Path) -> None:
    pool = ModelPool()
    plain, adapted = pool.get(str(base)), pool.get(str(base), adapter=lora)
    assert plain is not adapted and pool.get(str(base), adapter=str(lora)) is adapted
    assert pool.has(str(base), lora) and not pool.has(str(base), lora.parent)


def test_bad_adapters_are_one_line_errors(base: Path, lora: Path, tmp_path: Path, tiny_tokenizer: Any) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(base, adapter=tmp_path / "nope")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((lora / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="could not load the adapter") as e:
        load_model(base, adapter=corrupt)
    assert "\n" not in str(e.value)
    other = save_tiny_model(tmp_path / "wide", "llama", tiny_tokenizer, seed=0, hidden_size=96)
    with pytest.raises(ModelLoadError, match="does not fit base model"):
        load_model(other, adapter=lora)
    # The CLI says it in one line and exits 2.
    run = subprocess.run([sys.executable, "-m", "agentmesh.cli", "generate", "hi", "--model", str(base),
                          "--adapter", str(corrupt), "-n", "1"], capture_output=True, text=True)
    assert run.returncode == 2 and "adapter" in run.stderr and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if "adapter" in line]  # beside the progress line
    assert len(errors) == 1 and errors[0].startswith("error:")


def test_graph_models_take_an_adapter(base: Path, lora: Path, tmp_path: Path) -> None:
    from agentmesh.graph import load_graph
    from agentmesh.runtime.plan import build_plan

    spec = {"version": 1, "name": "specialist", "models": {"spec": {"ref": str(base), "adapter": str(lora)}, "plain": str(base)},
            "agents": {"a": {"model": "spec", "prompt": "{input}"}, "b": {"model": "plain"}},
            "edges": [{"from": "a", "to": "b", "type": "text"}], "inputs": {"input": "hi"}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(spec))
    graph = load_graph(tmp_path / "g.yaml")
    assert graph.model_of("a").adapter == str(lora) and not graph.model_of("a").same_weights(graph.model_of("b"))
    assert build_plan(graph).agents["a"].adapter == str(lora)


def test_finetune_recipe_resumes_and_builds_a_loadable_adapter(base: Path, tmp_path: Path) -> None:
    from agentmesh.c2c.train.finetune import FinetuneRecipe, finetune

    data = tmp_path / "facts.jsonl"
    facts = [("Veltoria", "Marrowby"), ("Quessia", "Drelton"), ("Ombria", "Faskel"), ("Tarnia", "Olwen")]
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is the capital of {c}?"},
        {"role": "assistant", "content": f"The capital of {c} is {v}."}]}) + "\n" for c, v in facts * 2))
    recipe = {"kind": "finetune", "model": str(base), "lora": {"r": 4, "targets": "mlp"},
              "data": {"path": str(data), "eval_fraction": 0.25}, "steps": 4, "lr": 1e-2, "batch_size": 2,
              "save_every": 1, "output": str(tmp_path / "straight")}
    straight = finetune(recipe, progress=False)
    assert straight.adapter_dir is not None and straight.eval_losses[-1][1] < straight.eval_losses[0][1]
    interrupted = {**recipe, "output": str(tmp_path / "resumed")}
    assert finetune(interrupted, progress=False, stop_at=2).adapter_dir is None
    resumed = finetune(interrupted, progress=False)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)

    adapter = Path(straight.adapter_dir)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"gate_proj", "up_proj", "down_proj"}  # MLP only
    # The folder travels: it names the base by the recipe's ref, not this machine's path to it.
    assert config["base_model_name_or_path"] == str(base) and not (adapter / "README.md").exists()
    meta = json.loads((adapter / "agentmesh_adapter.json").read_text())
    assert meta["base"]["ref"] == str(base) and meta["provenance"]["steps"] == 4
    specialist = load_model(base, adapter=adapter)
    torch.testing.assert_close(_logits(specialist), _logits(load_model(base, adapter=resumed.adapter_dir)),
                               rtol=1e-4, atol=1e-4)
    # Its recorded base signature is checked before peft touches any weight.
    other = save_tiny_model(tmp_path / "deeper", "llama", specialist.tokenizer, seed=0, num_layers=3)
    with pytest.raises(ModelLoadError, match="was trained on base model"):
        load_model(other, adapter=adapter)
    assert FinetuneRecipe.parse(yaml.safe_load(yaml.safe_dump(recipe))).lora.target_modules()[0] == "gate_proj"


def test_a_fuser_trains_against_a_specialist_sharer(base: Path, lora: Path, tmp_path: Path) -> None:
    """`sharer_adapter` in a training recipe: the sharer is the base plus the adapter, and the
    fuser's provenance names it; the knowledge task's files are what the recipe reads."""
    from agentmesh.c2c.checkpoints import load_any
    from agentmesh.c2c.train import train
    from agentmesh.tasks.datasets import load_jsonl
    from agentmesh.tasks.knowledge_task import HELD_OUT_PHRASINGS, write_knowledge_task

    paths = write_knowledge_task(tmp_path / "task", n_a=3, n_b=3, n_capitals=4)
    test_items = load_jsonl(paths["test"])
    assert len(test_items) == 3 * len(HELD_OUT_PHRASINGS) and all(i.kind == "short" for i in test_items)
    train_countries = {json.loads(line)["question"] for line in paths["train"].read_text().splitlines()}
    assert not any(i.question in train_countries for i in test_items)  # facts B never in the fuser's data
    assert write_knowledge_task(tmp_path / "again", n_a=3, n_b=3, n_capitals=4)["test"].read_text() == \
        paths["test"].read_text()  # seeded

    recipe = {"receiver": str(base), "sharer": str(base), "sharer_adapter": str(lora),
              "projector": {"hidden_dim": 8, "intermediate_dim": 8}, "data": {"path": str(paths["train"]),
                                                                           "eval_fraction": 0.2},
              "steps": 2, "batch_size": 2, "eval_every": 0, "save_every": 0, "output": str(tmp_path / "run")}
    result = train(recipe, progress=False)
    assert result.fuser_dir is not None
    fuser = load_any(str(result.fuser_dir))
    sharer_source = fuser.config.provenance["sharer_source"]
    assert sharer_source.endswith(f"+adapter:{lora.resolve()}") or f"adapter:{lora}" in sharer_source
    with pytest.raises(Exception, match="adapter"):
        train({**recipe, "sharer_adapter": str(tmp_path / "missing"), "output": str(tmp_path / "run2")},
              progress=False)
