"""Our own fuser layout, read and written::

    fuser.json                        format, version, receiver/sharer ids and signatures, projector class and
                                      init args, routes, layer map, alignment, provenance
    model.safetensors                 every projector's tensors as "projectors.{i}.{key}", any dtype
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from agentmesh.c2c.checkpoints.common import (FuserRef, check_projector_dims, first_line, fuser_model_ids,
                                              instantiate, load_strict, make_fuser, normalise_args, read_json, short)
from agentmesh.c2c.fuser import Fuser, FuserConfig, Route
from agentmesh.c2c.projector import dtype_name
from agentmesh.c2c.registry import projector_name
from agentmesh.cache.kv import ModelSignature
from agentmesh.errors import AgentMeshError, CheckpointError, ConfigError

FORMAT_NAME = "agentmesh-fuser"
# 2: `layout` records the fusion mode and where the sharer's keys are rotated to (version-1 files
# predate key re-rotation: their fusers read the sharer's keys at the sharer's own positions).
FORMAT_VERSION = 2
FUSER_JSON = "fuser.json"
WEIGHTS_FILE = "model.safetensors"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _ModelEntry(_Strict):
    id: str
    signature: dict[str, Any]


class _ProjectorEntry(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    class_: str = Field(alias="class")  # "class" is a Python keyword
    init_args: list[dict[str, Any]]


class _RouteEntry(_Strict):
    receiver_layer: int
    sharer_layer: int
    projector: int


class _Layout(_Strict):
    fusion: Literal["prompt", "prompt+response"]
    key_positions: Literal["receiver", "sharer"]


# How a format-1 file is read: the only layout that existed then.
_V1_LAYOUT = _Layout(fusion="prompt", key_positions="sharer")


class _FuserDoc(_Strict):
    format: Literal["agentmesh-fuser"]
    format_version: int
    receiver: _ModelEntry
    sharer: _ModelEntry
    projector: _ProjectorEntry
    routes: list[_RouteEntry]
    layer_map: str
    alignment: str
    layout: _Layout | None = None
    fusion: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    provenance: dict[str, Any] = {}


_FUSION_NOTES = {
    "span": "layout.fusion 'prompt': every prompt token but the last; the receiver prefills it, then its K/V are "
            "rewritten. 'prompt+response': every token the receiver reads, fused before its attention reads it",
    "keys": "post-RoPE; layout.key_positions 'receiver': the sharer's keys are rotated to the receiver's positions "
            "with the sharer's rotary parameters (sharer.signature.rotary) before the projector sees them",
    "residual": "K = K_r + g * w * P(K_s, K_r), the same for V; g is a hard per-layer gate at inference",
    "modes": ["parallel", "sequential"],
}


def read_fuser_json(folder: Path) -> _FuserDoc:
    path = folder / FUSER_JSON
    raw = read_json(path, f"an agentmesh fuser description (format {FORMAT_NAME!r})")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        got = raw.get("format") if isinstance(raw, dict) else raw
        raise CheckpointError(f"{path}: format is {short(got)}; expected {FORMAT_NAME!r}")
    version = raw.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: format_version is {version!r}; expected {FORMAT_VERSION}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {version}, newer than the {FORMAT_VERSION} this agentmesh "
                              "reads", hint="upgrade agentmesh")
    try:
        doc = _FuserDoc.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]).replace("class_", "class")
        raise CheckpointError(f"{path}: {loc or 'document'}: {err['msg']}") from None
    if version == 1:
        if doc.layout is not None:
            raise CheckpointError(f"{path}: format_version 1 has no 'layout'; expected format_version 2 with it")
        return doc.model_copy(update={"layout": _V1_LAYOUT})
    if doc.layout is None:
        raise CheckpointError(f"{path}: format_version {version} needs 'layout' ({{fusion, key_positions}})")
    return doc


def _jsonable(value: Any, where: str) -> Any:
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise CheckpointError(f"{where}: value {value!r} of type {type(value).__name__} cannot be written to "
                          f"{FUSER_JSON}; expected JSON values (str, numbers, lists, dicts)")


def _atomic_write(folder: Path, name: str, write: Any) -> Path:
    """Write `folder/name` via a temporary file in `folder` and an atomic rename; returns the temp
    path left to rename by the caller (so several files can be renamed only after all are written)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def save_fuser(fuser: Fuser, folder: FuserRef, *, provenance: Mapping[str, Any] | None = None) -> Path:
    """Save `fuser` as `folder/fuser.json` and `folder/model.safetensors` (tensors in their own dtype).

    Each file is written to a temporary file in `folder` first and renamed only when both are
    complete, so a failure leaves whatever was there before intact.
    """
    from safetensors.torch import save_file

    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create fuser folder {folder}: {first_line(e)}") from None
    cfg = fuser.config
    receiver_id, sharer_id = fuser_model_ids(fuser)
    prov = dict(cfg.provenance)
    if "source" in prov:  # where it was loaded from becomes where it came from
        prov.setdefault("origin", prov.pop("source"))
    prov.update(provenance or {})
    args = []
    for i, p in enumerate(fuser.projectors):
        raw = p.init_args if hasattr(p, "init_args") else cfg.projector_args[i]
        args.append(normalise_args(dict(raw)))
    tensors: dict[str, torch.Tensor] = {}
    dtypes: dict[str, int] = {}
    for i, p in enumerate(fuser.projectors):
        for key, t in p.state_dict().items():
            tensors[f"projectors.{i}.{key}"] = t.detach().to("cpu").contiguous()
            dtypes[dtype_name(t.dtype)] = dtypes.get(dtype_name(t.dtype), 0) + t.numel()
    doc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "receiver": {"id": receiver_id, "signature": cfg.receiver.to_dict()},
        "sharer": {"id": sharer_id, "signature": cfg.sharer.to_dict()},
        "projector": {"class": projector_name(fuser.projectors[0]), "init_args": args},
        "routes": [{"receiver_layer": r.receiver_layer, "sharer_layer": r.sharer_layer, "projector": r.projector}
                   for r in cfg.routes],
        "layer_map": cfg.layer_map,
        "alignment": cfg.alignment,
        "layout": {"fusion": cfg.fusion, "key_positions": cfg.key_positions},
        "fusion": _FUSION_NOTES,
        "tensors": {"file": WEIGHTS_FILE, "key": "projectors.{index}.{state_dict key}", "numel_by_dtype": dtypes},
        "provenance": prov,
    }
    text = json.dumps(_jsonable(doc, FUSER_JSON), indent=2) + "\n"
    temps: list[tuple[Path, Path]] = []
    try:
        temps.append((_atomic_write(folder, WEIGHTS_FILE, lambda tmp: save_file(
            tensors, tmp, metadata={"format": "pt", "agentmesh": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})),
            folder / WEIGHTS_FILE))
        temps.append((_atomic_write(folder, FUSER_JSON, lambda tmp: Path(tmp).write_text(text, encoding="utf-8")),
                      folder / FUSER_JSON))
        umask = os.umask(0o022)
        os.umask(umask)
        for tmp, final in temps:
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600; a saved fuser is an ordinary file
            os.replace(tmp, final)
    except AgentMeshError:
        raise
    except Exception as e:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write the fuser to {folder}: {first_line(e)}") from None
    return folder


def load_fuser(folder: FuserRef) -> Fuser:
    """A `Fuser` from our own layout, loaded strictly (every tensor present, none extra, same shapes)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"fuser folder {folder} does not exist; expected a folder with {FUSER_JSON} and "
                              f"{WEIGHTS_FILE}")
    doc = read_fuser_json(folder)
    json_path, weights_path = folder / FUSER_JSON, folder / WEIGHTS_FILE
    try:
        receiver = ModelSignature.from_dict(doc.receiver.signature)
        sharer = ModelSignature.from_dict(doc.sharer.signature)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{json_path}: a model signature lacks {first_line(e)}; expected the fields "
                              f"{', '.join(ModelSignature.__dataclass_fields__)}") from None
    except ValueError as e:
        raise CheckpointError(f"{json_path}: a model signature is malformed: {e}") from None
    if not doc.projector.init_args:
        raise CheckpointError(f"{json_path}: projector.init_args is empty; expected one entry per projector")
    projectors: list[nn.Module] = []
    for i, raw in enumerate(doc.projector.init_args):
        where = f"{json_path} (projector {i})"
        try:
            args = normalise_args(raw)
        except ConfigError as e:
            raise CheckpointError(f"{where}: {e.message}") from None
        check_projector_dims(args, receiver, sharer, where)
        projectors.append(instantiate(doc.projector.class_, args, where))
    if not weights_path.is_file():
        raise CheckpointError(f"missing {weights_path}; expected the fuser's tensors next to {FUSER_JSON}")
    try:
        tensors = load_file(weights_path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file ({first_line(e)})") from None
    grouped: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(len(projectors))}
    for key, t in tensors.items():
        m = re.match(r"^projectors\.(\d+)\.(.+)$", key)
        if m is None or int(m[1]) not in grouped:
            raise CheckpointError(f"{weights_path}: unexpected tensor {key}; expected keys projectors.<i>.<name> with "
                                  f"i in 0-{len(projectors) - 1}")
        grouped[int(m[1])][m[2]] = t
    for i, module in enumerate(projectors):
        load_strict(module, grouped[i], str(weights_path), prefix=f"projectors.{i}.")
        module.eval()
    routes = tuple(Route(r.receiver_layer, r.sharer_layer, r.projector) for r in doc.routes)
    provenance = {**doc.provenance, "format": "agentmesh", "source": str(folder.resolve()),
                  "base_model": doc.receiver.id, "teacher_model": doc.sharer.id}
    try:
        config = FuserConfig(receiver=receiver, sharer=sharer, projector=doc.projector.class_,
                             projector_args=tuple(normalise_args(a) for a in doc.projector.init_args),
                             routes=routes, layer_map=doc.layer_map, alignment=doc.alignment,
                             fusion=doc.layout.fusion, key_positions=doc.layout.key_positions,
                             provenance=provenance)
    except ConfigError as e:
        raise CheckpointError(f"{json_path}: {e.message}") from None
    return make_fuser(config, projectors, str(json_path))

