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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from agentmesh.c2c.checkpoints.common import (ALIGNMENTS, MAX_LAYERS, FuserRef, check_projector_dims, check_signatures,
                                              count, fuser_model_ids, load_strict, make_fuser, materialise,
                                              meta_projector, normalise_args, ranges, read_json, short,
                                              signature_from_json)
from agentmesh.c2c.fuser import Fuser, FuserConfig, Route
from agentmesh.c2c.layer_map import LAYER_MAPS
from agentmesh.c2c.projector import dtype_name
from agentmesh.c2c.registry import projector_name
from agentmesh.cache.kv import ModelSignature
from agentmesh.errors import AgentMeshError, CheckpointError, ConfigError, error_line

FORMAT_NAME = "agentmesh-fuser"
# 2: `layout` records the fusion mode and where the sharer's keys are rotated to (version-1 files
# predate key re-rotation: their fusers read the sharer's keys at the sharer's own positions).
FORMAT_VERSION = 2
FUSER_JSON = "fuser.json"
WEIGHTS_FILE = "model.safetensors"
# Bytes per element of the safetensors dtypes (unknown ones count one byte: the bound stays safe).
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "3" is not a layer number


class _ModelEntry(_Strict):
    id: str
    signature: dict[str, Any]


class _ProjectorEntry(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

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
        raise CheckpointError(f"cannot create fuser folder {folder}: {error_line(e)}") from None
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
        raise CheckpointError(f"could not write the fuser to {folder}: {error_line(e)}") from None
    return folder


def _check_layout(doc: _FuserDoc, json_path: Path, receiver: ModelSignature) -> tuple[Route, ...]:
    """Routes, layer map and alignment as a fuser can use them: at least one route, one per
    receiver layer at most, every projector routed."""
    if doc.alignment not in ALIGNMENTS:
        raise CheckpointError(f"{json_path}: alignment is {short(doc.alignment)}; expected one of {', '.join(ALIGNMENTS)}")
    if doc.layer_map not in (*LAYER_MAPS, "custom"):
        raise CheckpointError(f"{json_path}: layer_map is {short(doc.layer_map)}; expected one of "
                              f"{', '.join(LAYER_MAPS)} or 'custom'")
    n = len(doc.projector.init_args)
    if n == 0:
        raise CheckpointError(f"{json_path}: projector.init_args is empty; expected one entry per projector")
    if not doc.routes:
        raise CheckpointError(f"{json_path}: routes is empty; expected one route per fused receiver layer")
    seen: set[int] = set()
    for i, r in enumerate(doc.routes):
        where = f"{json_path}: routes[{i}]"
        count(r.receiver_layer, "receiver_layer", where, low=0, high=receiver.num_layers - 1)
        count(r.sharer_layer, "sharer_layer", where, low=0, high=MAX_LAYERS - 1)
        count(r.projector, "projector", where, low=0, high=n - 1)
        if r.receiver_layer in seen:
            raise CheckpointError(f"{where} routes receiver layer {r.receiver_layer} a second time; expected one route "
                                  "per receiver layer")
        seen.add(r.receiver_layer)
    unused = sorted(set(range(n)) - {r.projector for r in doc.routes})
    if unused:
        raise CheckpointError(f"{json_path}: projectors {ranges(unused)} are in projector.init_args but no route uses "
                              "them; expected every projector routed")
    return tuple(Route(r.receiver_layer, r.sharer_layer, r.projector) for r in doc.routes)


def _stored_tensors(weights_path: Path, n: int) -> dict[int, dict[str, tuple[tuple[int, ...], int]]]:
    """Per projector, each stored tensor's (shape, bytes), read from the safetensors header alone."""
    from safetensors import SafetensorError, safe_open

    grouped: dict[int, dict[str, tuple[tuple[int, ...], int]]] = {i: {} for i in range(n)}
    try:
        with safe_open(weights_path, framework="pt", device="cpu") as f:
            for key in f.keys():
                m = re.match(r"^projectors\.(\d+)\.(.+)$", key)
                if m is None or int(m[1]) not in grouped:
                    raise CheckpointError(f"{weights_path}: unexpected tensor {key}; expected keys "
                                          f"projectors.<i>.<name> with i in 0-{n - 1}")
                piece = f.get_slice(key)
                shape = tuple(int(d) for d in piece.get_shape())
                size = _DTYPE_BYTES.get(piece.get_dtype(), 1)
                for d in shape:
                    size *= d
                grouped[int(m[1])][m[2]] = (shape, size)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file ({error_line(e)})") from None
    return grouped


@dataclass(frozen=True)
class _Checked:
    """What fuser.json describes, checked against the models and the weights file's header."""

    doc: _FuserDoc
    receiver: ModelSignature
    sharer: ModelSignature
    routes: tuple[Route, ...]
    args: tuple[dict[str, Any], ...]
    projectors: tuple[nn.Module, ...]  # on the meta device: nothing allocated yet


def check_fuser(folder: FuserRef, *, receiver_signature: ModelSignature | None = None,
                sharer_signature: ModelSignature | None = None, check_fingerprints: bool = False) -> _Checked:
    """Everything fuser.json claims (signatures, routes, layer map, alignment, projector sizes),
    checked against the given models and the safetensors header; no weight is read."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"fuser folder {folder} does not exist; expected a folder with {FUSER_JSON} and "
                              f"{WEIGHTS_FILE}")
    doc = read_fuser_json(folder)
    json_path, weights_path = folder / FUSER_JSON, folder / WEIGHTS_FILE
    receiver = signature_from_json(doc.receiver.signature, f"{json_path}: receiver.signature")
    sharer = signature_from_json(doc.sharer.signature, f"{json_path}: sharer.signature")
    check_signatures(str(folder.resolve()), (receiver, sharer), (receiver_signature, sharer_signature),
                     fingerprints=check_fingerprints)
    routes = _check_layout(doc, json_path, receiver)
    if not weights_path.is_file():
        raise CheckpointError(f"missing {weights_path}; expected the fuser's tensors next to {FUSER_JSON}")
    stored = _stored_tensors(weights_path, len(doc.projector.init_args))
    args, projectors = [], []
    for i, raw in enumerate(doc.projector.init_args):
        where = f"{json_path} (projector {i})"
        try:
            args.append(normalise_args(raw))
        except ConfigError as e:
            raise CheckpointError(f"{where}: {e.message}") from None
        check_projector_dims(args[-1], receiver, sharer, where)
        projectors.append(meta_projector(doc.projector.class_, args[-1], where,
                                         stored={k: shape for k, (shape, _) in stored[i].items()},
                                         stored_bytes=sum(b for _, b in stored[i].values()), file=str(weights_path),
                                         prefix=f"projectors.{i}."))
    return _Checked(doc, receiver, sharer, routes, tuple(args), tuple(projectors))


def load_fuser(folder: FuserRef, *, receiver_signature: ModelSignature | None = None,
               sharer_signature: ModelSignature | None = None, check_fingerprints: bool = False) -> Fuser:
    """A `Fuser` from our own layout, loaded strictly (every tensor present, none extra, same shapes,
    all finite), after `check_fuser` has checked what fuser.json claims: nothing is allocated for
    a file that lies about its sizes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    checked = check_fuser(folder, receiver_signature=receiver_signature, sharer_signature=sharer_signature,
                          check_fingerprints=check_fingerprints)
    folder = Path(folder).expanduser()
    doc, json_path, weights_path = checked.doc, folder / FUSER_JSON, folder / WEIGHTS_FILE
    projectors = [materialise(m, doc.projector.class_, a, f"{json_path} (projector {i})")
                  for i, (m, a) in enumerate(zip(checked.projectors, checked.args))]
    try:
        tensors = load_file(weights_path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file ({error_line(e)})") from None
    grouped: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(len(projectors))}
    for key, t in tensors.items():
        index, _, name = key.removeprefix("projectors.").partition(".")
        grouped[int(index)][name] = t  # names were checked against the header
    for i, module in enumerate(projectors):
        load_strict(module, grouped[i], str(weights_path), prefix=f"projectors.{i}.")
        module.eval()
    provenance = {**doc.provenance, "format": "agentmesh", "source": str(folder.resolve()),
                  "base_model": doc.receiver.id, "teacher_model": doc.sharer.id}
    try:
        config = FuserConfig(receiver=checked.receiver, sharer=checked.sharer, projector=doc.projector.class_,
                             projector_args=checked.args, routes=checked.routes, layer_map=doc.layer_map,
                             alignment=doc.alignment, fusion=doc.layout.fusion,
                             key_positions=doc.layout.key_positions, provenance=provenance)
    except ConfigError as e:
        raise CheckpointError(f"{json_path}: {e.message}") from None
    return make_fuser(config, projectors, str(json_path))
