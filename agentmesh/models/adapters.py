"""PEFT adapters (LoRA and kin) on top of a base model: a specialist fine-tune as a model reference.

An adapter folder is what `peft` saves: ``adapter_config.json`` and ``adapter_model.safetensors``.
Adapters built by `agentmesh train` (a ``kind: finetune`` recipe) also hold ``agentmesh_adapter.json``:
the base model's signature (so a base mismatch is caught before any weight is touched) and the
provenance of the run. The adapter is merged into a private copy of the base weights, so the
result is an ordinary model that every code path (caches, fusion, graphs) uses unchanged.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentmesh.cache.kv import ModelSignature
from agentmesh.errors import ModelLoadError

if TYPE_CHECKING:
    from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
AGENTMESH_ADAPTER = "agentmesh_adapter.json"


def adapter_key(adapter: str | Path | None) -> str:
    """How the model pool tells adapters apart: the folder's absolute path ("" for none)."""
    return "" if adapter is None else str(Path(os.path.expanduser(str(adapter))).resolve())


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"adapter file {path} is not readable JSON ({_first_line(e)}); expected {what}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"adapter file {path} holds a {type(data).__name__}; expected {what}")
    return data


def check_adapter_folder(adapter: str | Path) -> Path:
    """The adapter folder, checked for the files peft needs; `ModelLoadError` names what is missing."""
    folder = Path(os.path.expanduser(str(adapter)))
    if not folder.is_dir():
        raise ModelLoadError(f"adapter folder {folder} does not exist; expected a folder with {ADAPTER_CONFIG} and "
                             f"{ADAPTER_WEIGHTS[0]} (as saved by peft or `agentmesh train` with kind: finetune)")
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ModelLoadError(f"adapter folder {folder} has no {ADAPTER_CONFIG}; expected a peft adapter folder")
    if not any((folder / w).is_file() for w in ADAPTER_WEIGHTS):
        raise ModelLoadError(f"adapter folder {folder} has no weights; expected {ADAPTER_WEIGHTS[0]}")
    _read_json(folder / ADAPTER_CONFIG, "a peft adapter config")
    return folder


def check_base(folder: Path, base: ModelSignature) -> None:
    """Raise `ModelLoadError` when the adapter records a base model other than `base`."""
    meta_path = folder / AGENTMESH_ADAPTER
    if not meta_path.is_file():
        return  # a foreign peft adapter: peft's own shape checks decide
    meta = _read_json(meta_path, "agentmesh adapter metadata")
    try:
        want = ModelSignature.from_dict(meta["base"]["signature"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{meta_path} lacks base.signature ({_first_line(e)}); expected the base model's "
                             "signature as written by `agentmesh train`") from None
    if want.fingerprint != base.fingerprint or not want.same_shape(base):
        raise ModelLoadError(
            f"adapter {folder} was trained on base model {want.name!r} ({want.model_type}, {want.num_layers} layers, "
            f"fingerprint {want.fingerprint}), not on {base.name!r} ({base.model_type}, {base.num_layers} layers, "
            f"fingerprint {base.fingerprint}); load it on its own base model")


def apply_adapter(model: nn.Module, adapter: str | Path, base: ModelSignature) -> nn.Module:
    """`model` with the adapter at `adapter` merged into its weights (`model` itself is changed)."""
    folder = check_adapter_folder(adapter)
    check_base(folder, base)
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelLoadError(f"loading the adapter {folder} needs the package peft; install it with "
                             "`pip install peft`") from None
    try:
        with warnings.catch_warnings():
            # peft asks transformers a deprecated question (is_gradient_checkpointing); not ours to act on
            warnings.simplefilter("ignore", FutureWarning)
            wrapped = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
        return wrapped.merge_and_unload()
    except Exception as e:  # peft raises many kinds: size mismatches, missing modules, bad files
        detail, full = _first_line(e), str(e)
        if "size mismatch" in full or "not found in the base model" in full or "Target modules" in full:
            shapes = next((line.strip() for line in full.splitlines() if "size mismatch" in line), detail)
            raise ModelLoadError(f"adapter {folder} does not fit base model {base.name!r} ({shapes}); "
                                 "load it on the base model it was trained on") from None
        raise ModelLoadError(f"could not load the adapter {folder} onto {base.name!r}: {detail}") from None
