"""The published C2C pair-folder layout (`nics-efc/C2C_Fuser/<pair>`), read only::

    config.json                       training recipe: model.base_model (receiver id), model.teacher_model
                                      (sharer id), model.is_do_alignment, model.alignment_strategy, ...
    final/projector_config.json       {"0": {"1": {"<receiver layer>": [[<sharer layer>, <projector idx>]]}}}
    final/projector_{i}.json          {"class": "C2CProjector", "init_args": {...}}
    final/projector_{i}.pt            torch-saved state dict (read with weights_only=True, never unpickled)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch
from torch import nn

from agentmesh.c2c.checkpoints.common import (DEFAULT_ALIGNMENT, MAX_LAYERS, PROJECTOR_DIMS, FuserRef,
                                              check_projector_dims, count, describe, inferred_signature,
                                              load_strict, local_signature, make_fuser, materialise, meta_projector, normalise_args,
                                              ranges, read_json, short)
from agentmesh.c2c.fuser import Fuser, FuserConfig, Route
from agentmesh.c2c.layer_map import LAYER_MAPS
from agentmesh.c2c.registry import projector_class, projector_name
from agentmesh.cache.kv import ModelSignature
from agentmesh.errors import CheckpointError, ConfigError, error_line

PUBLISHED_REPO = "nics-efc/C2C_Fuser"
DEFAULT_SUBFOLDER = "final"
ALIGNMENT_STRATEGIES = ("first", "longest")
_PROJECTOR_FILE = re.compile(r"^projector_(\d+)\.(pt|json)$")


@dataclass(frozen=True)
class PublishedPair:
    """One pair folder of the published repo: receiver <- sharer, as hub ids."""

    folder: str
    receiver: str
    sharer: str

    @property
    def ref(self) -> str:
        return f"hf://{PUBLISHED_REPO}/{self.folder}"


PUBLISHED_PAIRS: Mapping[str, PublishedPair] = MappingProxyType({p.folder: p for p in (
    PublishedPair("qwen3_0.6b+qwen2.5_0.5b_Fuser", "Qwen/Qwen3-0.6B", "Qwen/Qwen2.5-0.5B-Instruct"),
    PublishedPair("qwen3_0.6b+llam3.2_1b_Fuser", "Qwen/Qwen3-0.6B", "meta-llama/Llama-3.2-1B-Instruct"),
    PublishedPair("qwen3_0.6b+qwen2.5_1.5b_math_Fuser", "Qwen/Qwen3-0.6B", "Qwen/Qwen2.5-Math-1.5B"),
    PublishedPair("qwen3_0.6b+qwen3_4b_Fuser", "Qwen/Qwen3-0.6B", "Qwen/Qwen3-4B"),
    PublishedPair("qwen3_0.6b+qwen3_4b_base_Fuser", "Qwen/Qwen3-0.6B", "Qwen/Qwen3-4B-Base"),
    PublishedPair("qwen3_1.7b+qwen2.5_1.5b_Fuser", "Qwen/Qwen3-1.7B", "Qwen/Qwen2.5-1.5B-Instruct"),
    PublishedPair("qwen3_8b+qwen2.5_7b_Fuser", "Qwen/Qwen3-8B", "Qwen/Qwen2.5-7B-Instruct"),
)})


def model_ids(config: Any, path: Path) -> tuple[str, str]:
    """(receiver id, sharer id) from a published config.json."""
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        raise CheckpointError(f"{path} has no 'model' section; expected the published training recipe with "
                              "model.base_model and model.teacher_model")
    receiver, sharer = model.get("base_model"), model.get("teacher_model")
    if isinstance(sharer, list):
        if len(sharer) != 1:
            raise CheckpointError(
                f"{path}: model.teacher_model lists {len(sharer)} sharers {sharer}; agentmesh loads one fuser per "
                "(receiver, sharer) pair — load each pair folder and pass them together to from_pretrained")
        sharer = sharer[0]
    for key, value in (("base_model", receiver), ("teacher_model", sharer)):
        if not isinstance(value, str) or not value.strip():
            raise CheckpointError(f"{path}: model.{key} is {value!r}; expected a model id or path (a non-empty string)")
    return receiver.strip(), sharer.strip()


def alignment_of(config: dict[str, Any], path: Path) -> str:
    model = config["model"]
    if not model.get("is_do_alignment", False):
        return DEFAULT_ALIGNMENT
    strategy = model.get("alignment_strategy", "first")
    if strategy not in ALIGNMENT_STRATEGIES:
        raise CheckpointError(f"{path}: model.alignment_strategy is {strategy!r}; expected one of "
                              f"{', '.join(ALIGNMENT_STRATEGIES)}")
    return strategy


def _routes(path: Path) -> tuple[Route, ...]:
    data = read_json(path, 'the layer routes {"0": {"1": {"<receiver layer>": [[<sharer layer>, <projector>]]}}}')
    expected = 'expected {"0": {"1": {"<receiver layer>": [[<sharer layer>, <projector index>]]}}}'
    if not isinstance(data, dict) or set(data) != {"0"} or not isinstance(data["0"], dict):
        raise CheckpointError(f"{path}: top level is {short(data)}; {expected} (receiver is model 0)")
    sharers = data["0"]
    if set(sharers) != {"1"} or not isinstance(sharers["1"], dict):
        raise CheckpointError(f"{path}: routes for sharers {sorted(sharers)}; {expected} (exactly one sharer, "
                              "model 1; a multi-sharer fuser is loaded as one folder per pair)")
    routes: list[Route] = []
    for layer, entries in sharers["1"].items():
        if not (isinstance(layer, str) and layer.isdigit() and int(layer) < MAX_LAYERS):
            raise CheckpointError(f"{path}: receiver layer key {layer!r} is not a layer number below {MAX_LAYERS}; "
                                  f"{expected}")
        ok = (isinstance(entries, list) and all(
            isinstance(e, list) and len(e) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < MAX_LAYERS for x in e) for e in entries))
        if not ok or not entries:
            raise CheckpointError(f"{path}: receiver layer {layer} maps to {short(entries)}; expected a list like "
                                  f"[[<sharer layer>, <projector index>]] of integers below {MAX_LAYERS}")
        if len(entries) > 1:
            raise CheckpointError(f"{path}: receiver layer {layer} reads {len(entries)} sharer layers {entries}; "
                                  "agentmesh fuses exactly one sharer layer into each receiver layer")
        routes.append(Route(int(layer), entries[0][0], entries[0][1]))
    if not routes:
        raise CheckpointError(f"{path}: no routes; {expected}")
    return tuple(sorted(routes, key=lambda r: r.receiver_layer))


def _projector_files(folder: Path) -> dict[str, set[int]]:
    found: dict[str, set[int]] = {"pt": set(), "json": set()}
    for p in folder.iterdir():
        m = _PROJECTOR_FILE.match(p.name)
        if m:
            found[m[2]].add(int(m[1]))
    return found


def _check_routes(routes: tuple[Route, ...], path: Path, receiver: ModelSignature, sharer: ModelSignature,
                  mapping: Any) -> None:
    layers = [r.receiver_layer for r in routes]
    if len(set(layers)) != len(layers) or sorted(layers) != list(range(receiver.num_layers)):
        trained = (f"this fuser was trained for a receiver with {len(layers)} layers"
                   if sorted(layers) == list(range(len(layers))) else "expected one route per receiver layer")
        raise CheckpointError(
            f"{path} routes receiver layers {ranges(layers)} but the receiver {describe(receiver)} has layers "
            f"0-{receiver.num_layers - 1}; {trained}")
    for r in routes:
        if r.sharer_layer >= sharer.num_layers:
            raise CheckpointError(
                f"{path}: receiver layer {r.receiver_layer} reads sharer layer {r.sharer_layer}, but the sharer "
                f"{describe(sharer)} has layers 0-{sharer.num_layers - 1}; this fuser was trained for another sharer")
    if mapping == "last_aligned":
        # last_aligned always joins the two last layers, so the deepest sharer layer read is L_s - 1.
        deepest = max(r.sharer_layer for r in routes)
        if deepest != sharer.num_layers - 1:
            raise CheckpointError(
                f"{path}: the deepest sharer layer read is {deepest}, but with the 'last_aligned' map it is the "
                f"sharer's last layer; the sharer {describe(sharer)} has {sharer.num_layers} layers, the fuser "
                f"was trained for a sharer with {deepest + 1}")


@dataclass(frozen=True)
class _Checked:
    """What a published pair folder describes, checked against the models and its files' sizes."""

    receiver_id: str
    sharer_id: str
    receiver: ModelSignature
    sharer: ModelSignature
    alignment: str
    mapping: str | None
    routes: tuple[Route, ...]
    sub: Path
    name: str
    args: tuple[dict[str, Any], ...]
    projectors: tuple[nn.Module, ...]  # on the meta device: nothing allocated yet


def check_published(folder: FuserRef, *, receiver_signature: ModelSignature | None = None,
                    sharer_signature: ModelSignature | None = None, subfolder: str = DEFAULT_SUBFOLDER) -> _Checked:
    """Everything a published pair folder claims (model ids, routes, projector classes and sizes),
    checked against the given signatures (the models the fuser will actually join) and against
    the sizes of its weight files; no weight is read. Without a signature, the model's config.json
    is read if it is on this machine (a local folder or the HF cache), else the shape the
    checkpoint implies is used (no fingerprint)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"fuser folder {folder} does not exist; expected a published pair folder with "
                              f"config.json and {subfolder}/")
    config_path = folder / "config.json"
    config = read_json(config_path, "the published training recipe (config.json) of a C2C pair folder")
    receiver_id, sharer_id = model_ids(config, config_path)
    alignment = alignment_of(config, config_path)
    mapping = config["model"].get("mapping")
    if mapping is not None and mapping not in LAYER_MAPS:
        raise CheckpointError(f"{config_path}: model.mapping is {short(mapping)}; expected one of "
                              f"{', '.join(LAYER_MAPS)} (or no mapping key)")
    sub = folder / subfolder
    if not sub.is_dir():
        others = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise CheckpointError(f"missing folder {sub}; expected the projector files (projector_i.pt/.json, "
                              f"projector_config.json) there" + (f" (found folders: {', '.join(others)})" if others else ""))
    routes_path = sub / "projector_config.json"
    routes = _routes(routes_path)
    indices = sorted({r.projector for r in routes})
    files = _projector_files(sub)
    for i in indices:
        for ext in ("json", "pt"):
            if i not in files[ext]:
                layers = [r.receiver_layer for r in routes if r.projector == i]
                raise CheckpointError(f"missing {sub / f'projector_{i}.{ext}'}; {routes_path.name} routes receiver "
                                      f"layer {ranges(layers)} through projector {i}")
    if indices != list(range(len(indices))) or files["pt"] != set(indices):
        raise CheckpointError(
            f"{sub} holds projector files {ranges(sorted(files['pt']))} but {routes_path.name} uses projectors "
            f"{ranges(indices)}; expected one projector_i.pt per routed projector, numbered from 0")

    specs: list[tuple[str, dict[str, Any]]] = []
    for i in indices:
        path = sub / f"projector_{i}.json"
        spec = read_json(path, '{"class": "C2CProjector", "init_args": {...}}')
        if not isinstance(spec, dict) or not isinstance(spec.get("class"), str) or not isinstance(spec.get("init_args"), dict):
            raise CheckpointError(f"{path} is {short(spec)}; expected {{\"class\": \"C2CProjector\", \"init_args\": {{...}}}}")
        try:
            projector_class(spec["class"])
            args = normalise_args(spec["init_args"])
        except ConfigError as e:
            raise CheckpointError(f"{path}: {e.message}") from None
        for key in PROJECTOR_DIMS:
            if key in args:
                count(args[key], f"init_args.{key}", str(path))
        specs.append((spec["class"], args))
    names = {name for name, _ in specs}
    if len(names) > 1:
        raise CheckpointError(f"{sub}: projectors use several classes {sorted(names)}; agentmesh expects one class "
                              "per fuser")
    name = specs[0][0]

    # Signatures the checkpoint implies, used only where the caller gave none and no config.json is here.
    first = specs[0][1]
    receiver = receiver_signature or local_signature(receiver_id, folder) or inferred_signature(
        receiver_id, max(r.receiver_layer for r in routes) + 1, int(first.get("target_num_heads", 0)),
        int(first.get("target_dim", 0)))
    sharer = sharer_signature or local_signature(sharer_id, folder) or inferred_signature(
        sharer_id, max(r.sharer_layer for r in routes) + 1, int(first.get("source_num_heads", 0)),
        int(first.get("source_dim", 0)))
    _check_routes(routes, routes_path, receiver, sharer, mapping)
    if len(indices) > receiver.num_layers:
        raise CheckpointError(
            f"{sub} holds {len(indices)} projectors but the receiver {describe(receiver)} has only "
            f"{receiver.num_layers} layers; expected at most one projector per receiver layer")

    projectors = []
    for i, (_, args) in zip(indices, specs):
        spec_path, weights_path = sub / f"projector_{i}.json", sub / f"projector_{i}.pt"
        check_projector_dims(args, receiver, sharer, str(spec_path))
        projectors.append(meta_projector(name, args, str(spec_path), stored=None,
                                         stored_bytes=weights_path.stat().st_size, file=str(weights_path)))
    return _Checked(receiver_id, sharer_id, receiver, sharer, alignment, mapping, routes, sub, name,
                    tuple(args for _, args in specs), tuple(projectors))


def load_published(folder: FuserRef, *, receiver_signature: ModelSignature | None = None,
                   sharer_signature: ModelSignature | None = None, subfolder: str = DEFAULT_SUBFOLDER) -> Fuser:
    """A `Fuser` from a published pair folder (the one holding config.json and `subfolder`/), after
    `check_published`: projectors are rebuilt from `projector_i.json` through the registry and
    loaded strictly from `projector_i.pt` (`torch.load(weights_only=True)`)."""
    c = check_published(folder, receiver_signature=receiver_signature, sharer_signature=sharer_signature,
                        subfolder=subfolder)
    folder = Path(folder).expanduser()
    projectors: list[nn.Module] = []
    for i, (meta, args) in enumerate(zip(c.projectors, c.args)):
        spec_path, weights_path = c.sub / f"projector_{i}.json", c.sub / f"projector_{i}.pt"
        module = materialise(meta, c.name, args, str(spec_path))
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:  # zip/pickle/EOF errors of a truncated or foreign file
            raise CheckpointError(f"{weights_path} is not a torch-saved state dict ({error_line(e)}); expected "
                                  f"the weights of projector {i} saved with torch.save(state_dict)") from None
        load_strict(module, state, str(weights_path))
        projectors.append(module.eval())

    provenance = {"format": "published", "source": str(folder.resolve()), "subfolder": subfolder,
                  "base_model": c.receiver_id, "teacher_model": c.sharer_id}
    return make_fuser(FuserConfig(
        receiver=c.receiver, sharer=c.sharer, projector=projector_name(projectors[0]), projector_args=c.args,
        routes=c.routes, layer_map=c.mapping if c.mapping is not None else "custom", alignment=c.alignment,
        provenance=provenance), projectors, str(c.sub))

