"""Fuser checkpoints: the published C2C layout in (spec §6), our own safetensors layout in and out.

Published pair folder (`nics-efc/C2C_Fuser/<pair>`)::

    config.json                       training recipe: model.base_model (receiver id), model.teacher_model
                                      (sharer id), model.is_do_alignment, model.alignment_strategy, ...
    final/projector_config.json       {"0": {"1": {"<receiver layer>": [[<sharer layer>, <projector idx>]]}}}
    final/projector_{i}.json          {"class": "C2CProjector", "init_args": {...}}
    final/projector_{i}.pt            torch-saved state dict (read with weights_only=True, never unpickled)

Own folder::

    fuser.json                        format, version, receiver/sharer ids and signatures, projector class and
                                      init args, routes, layer map, alignment, provenance
    model.safetensors                 every projector's tensors as "projectors.{i}.{key}", any dtype

Every problem is a one-line `CheckpointError` naming the file and what was expected; nothing from
deep inside torch reaches the user.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from agentmesh.c2c.fuser import Fuser, FuserConfig, Route
from agentmesh.c2c.layer_map import LAYER_MAPS
from agentmesh.c2c.projector import dtype_name, parse_dtype
from agentmesh.c2c.registry import build_projector, projector_class, projector_name
from agentmesh.cache.kv import ModelSignature
from agentmesh.errors import AgentMeshError, CheckpointError, ConfigError

FuserRef = str | Path

PUBLISHED_REPO = "nics-efc/C2C_Fuser"
FORMAT_NAME = "agentmesh-fuser"
# 2: `layout` records the fusion mode and where the sharer's keys are rotated to (version-1 files
# predate key re-rotation: their fusers read the sharer's keys at the sharer's own positions).
FORMAT_VERSION = 2
FUSER_JSON = "fuser.json"
WEIGHTS_FILE = "model.safetensors"
DEFAULT_SUBFOLDER = "final"
DEFAULT_ALIGNMENT: str = FuserConfig.__dataclass_fields__["alignment"].default
ALIGNMENT_STRATEGIES = ("first", "longest")

_PROJECTOR_FILE = re.compile(r"^projector_(\d+)\.(pt|json)$")
_SHOW = 4  # how many keys an error lists before "..."


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


# ---- small helpers ----------------------------------------------------------------------------------
def _first_line(error: BaseException) -> str:
    """The error's first sentence, short enough for a one-line message."""
    lines = str(error).strip().splitlines()
    text = lines[0].split(". ")[0] if lines else ""
    return f"{type(error).__name__}: {text if len(text) <= 160 else text[:157] + '...'}"


def _keys(keys: Sequence[str]) -> str:
    shown = ", ".join(sorted(keys)[:_SHOW])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _SHOW else "")


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"missing {path}; expected {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({_first_line(e)}); expected {what}") from None


def _describe(sig: ModelSignature) -> str:
    return (f"{sig.name!r} ({sig.num_layers} layers, {sig.num_kv_heads} KV heads of dim {sig.head_dim})")


def _model_ids(config: Any, path: Path) -> tuple[str, str]:
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


def _alignment(config: dict[str, Any], path: Path) -> str:
    model = config["model"]
    if not model.get("is_do_alignment", False):
        return DEFAULT_ALIGNMENT
    strategy = model.get("alignment_strategy", "first")
    if strategy not in ALIGNMENT_STRATEGIES:
        raise CheckpointError(f"{path}: model.alignment_strategy is {strategy!r}; expected one of "
                              f"{', '.join(ALIGNMENT_STRATEGIES)}")
    return strategy


def pair_models(folder: FuserRef) -> tuple[str, str, str]:
    """(receiver id, sharer id, alignment) of a fuser folder, from its metadata only (no weights).

    Works for a published pair folder (config.json) and for our own layout (fuser.json); the
    alignment is the published `alignment_strategy` when `is_do_alignment`, else the default.
    """
    folder = Path(folder)
    if (folder / FUSER_JSON).is_file():
        doc = _read_fuser_json(folder)
        return doc.receiver.id, doc.sharer.id, doc.alignment
    path = folder / "config.json"
    config = _read_json(path, "a published C2C pair folder's config.json (the training recipe)")
    receiver, sharer = _model_ids(config, path)
    return receiver, sharer, _alignment(config, path)


def fuser_model_ids(fuser: Fuser) -> tuple[str, str]:
    """(receiver id, sharer id) a loaded fuser was trained with (hub ids or paths)."""
    prov = fuser.config.provenance
    return str(prov.get("base_model") or fuser.receiver.name), str(prov.get("teacher_model") or fuser.sharer.name)


# ---- signatures -----------------------------------------------------------------------------------
def resolve_model_path(model_id: str, base: Path) -> str:
    """A relative local path in a checkpoint is read relative to the checkpoint folder when it
    does not exist relative to the working directory; anything else is returned unchanged."""
    if model_id.startswith("hf://") or Path(model_id).expanduser().exists():
        return model_id
    candidate = base / model_id
    return str(candidate.resolve()) if not Path(model_id).is_absolute() and candidate.exists() else model_id


def local_signature(model_id: str, base: Path | None = None) -> ModelSignature | None:
    """The signature of `model_id` from a config.json already on this machine (a local folder, or
    the Hugging Face cache), without loading weights or touching the network; None if unknown."""
    ref = resolve_model_path(model_id, base) if base is not None else model_id
    config_file: Path | None = None
    path = Path(ref).expanduser()
    if (path / "config.json").is_file():
        config_file = path / "config.json"
    elif re.fullmatch(r"(hf://)?[\w.\-]+/[\w.\-]+(@[\w.\-/]+)?", ref) and not path.exists():
        from huggingface_hub import try_to_load_from_cache

        from agentmesh.models import hub_cache_dir

        repo, _, rev = ref.removeprefix("hf://").partition("@")
        try:
            found = try_to_load_from_cache(repo, "config.json", cache_dir=hub_cache_dir(), revision=rev or None)
        except Exception:  # a malformed cache is the same as no cache here
            found = None
        if isinstance(found, str):
            config_file = Path(found)
    if config_file is None:
        return None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(config_file.parent, local_files_only=True)
    except Exception:  # an unreadable or unknown config: fall back to what the checkpoint says
        return None
    return ModelSignature.from_config(config, model_id)


def _inferred_signature(model_id: str, num_layers: int, num_kv_heads: int, head_dim: int) -> ModelSignature:
    # No config.json to read: only the shape the checkpoint itself implies, no fingerprint.
    return ModelSignature(name=model_id, model_type="", num_layers=num_layers, num_kv_heads=num_kv_heads,
                          head_dim=head_dim, vocab_size=0, fingerprint="")


# ---- building and loading projectors ----------------------------------------------------------------
def _normalise_args(args: dict[str, Any]) -> dict[str, Any]:
    """Init args with the dtype as a plain name ("bfloat16"), so they are JSON and hashable-friendly."""
    out = dict(args)
    if "dtype" in out:
        out["dtype"] = dtype_name(parse_dtype(out["dtype"]))
    return out


def _instantiate(name: str, args: dict[str, Any], where: str) -> nn.Module:
    """Build a projector whose every tensor is about to be overwritten by a strict load.

    Built on the meta device and then given uninitialised CPU storage, which skips random init
    (seconds for a 478 M-parameter fuser); classes with non-persistent buffers (which a state dict
    would not restore) are built normally.
    """
    try:
        with torch.device("meta"):
            module = build_projector(name, args)
        if any(m._non_persistent_buffers_set for m in module.modules()):
            module = build_projector(name, args)
        else:
            module = module.to_empty(device="cpu")
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e.message}") from None
    except Exception as e:  # a projector class rejecting its arguments in its own way
        raise CheckpointError(f"{where}: projector {name!r} could not be built from its init_args "
                              f"({_first_line(e)})") from None
    return module


def _load_strict(module: nn.Module, state: Any, file: str, prefix: str = "") -> None:
    """`load_state_dict(strict=True)`, with missing/unexpected keys and wrong shapes reported
    against `file` before torch sees them."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file} does not hold a state dict (a mapping of names to tensors)")
    expected = module.state_dict()
    missing = [prefix + k for k in expected if k not in state]
    unexpected = [prefix + k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"missing keys {_keys(missing)}"] if missing else []) + (
            [f"unexpected keys {_keys(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{file}: {'; '.join(parts)}; expected exactly the {len(expected)} keys of "
                              f"{type(module).__name__}")
    for key, want in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"{file}: tensor {prefix + key} has shape {tuple(got.shape)}, expected "
                                  f"{tuple(want.shape)}")
    try:
        module.load_state_dict(dict(state), strict=True)
    except Exception as e:
        raise CheckpointError(f"{file}: the weights could not be loaded ({_first_line(e)})") from None


def _check_projector_dims(args: dict[str, Any], receiver: ModelSignature, sharer: ModelSignature,
                          where: str) -> None:
    """The projector's declared K/V sizes against the models it will join (args it lacks are skipped)."""
    wants = (("source_dim", sharer.head_dim, "sharer", "head dim {}"),
             ("source_num_heads", sharer.num_kv_heads, "sharer", "{} KV heads"),
             ("target_dim", receiver.head_dim, "receiver", "head dim {}"),
             ("target_num_heads", receiver.num_kv_heads, "receiver", "{} KV heads"))
    for key, want, role, what in wants:
        if key in args and args[key] != want:
            sig = sharer if role == "sharer" else receiver
            raise CheckpointError(
                f"{where}: {key}={args[key]!r} but the {role} {sig.name!r} has {what.format(want)}; "
                f"this fuser was trained for another {role}")


# ---- the published layout -------------------------------------------------------------------------
def _routes(path: Path) -> tuple[Route, ...]:
    data = _read_json(path, 'the layer routes {"0": {"1": {"<receiver layer>": [[<sharer layer>, <projector>]]}}}')
    expected = 'expected {"0": {"1": {"<receiver layer>": [[<sharer layer>, <projector index>]]}}}'
    if not isinstance(data, dict) or set(data) != {"0"} or not isinstance(data["0"], dict):
        raise CheckpointError(f"{path}: top level is {_short(data)}; {expected} (receiver is model 0)")
    sharers = data["0"]
    if set(sharers) != {"1"} or not isinstance(sharers["1"], dict):
        raise CheckpointError(f"{path}: routes for sharers {sorted(sharers)}; {expected} (exactly one sharer, "
                              "model 1; a multi-sharer fuser is loaded as one folder per pair)")
    routes: list[Route] = []
    for layer, entries in sharers["1"].items():
        if not (isinstance(layer, str) and layer.isdigit()):
            raise CheckpointError(f"{path}: receiver layer key {layer!r} is not a layer number; {expected}")
        ok = (isinstance(entries, list) and all(
            isinstance(e, list) and len(e) == 2 and all(isinstance(x, int) and x >= 0 for x in e) for e in entries))
        if not ok or not entries:
            raise CheckpointError(f"{path}: receiver layer {layer} maps to {_short(entries)}; expected a list like "
                                  "[[<sharer layer>, <projector index>]]")
        if len(entries) > 1:
            raise CheckpointError(f"{path}: receiver layer {layer} reads {len(entries)} sharer layers {entries}; "
                                  "agentmesh fuses exactly one sharer layer into each receiver layer")
        routes.append(Route(int(layer), entries[0][0], entries[0][1]))
    if not routes:
        raise CheckpointError(f"{path}: no routes; {expected}")
    return tuple(sorted(routes, key=lambda r: r.receiver_layer))


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
            f"{path} routes receiver layers {_ranges(layers)} but the receiver {_describe(receiver)} has layers "
            f"0-{receiver.num_layers - 1}; {trained}")
    for r in routes:
        if r.sharer_layer >= sharer.num_layers:
            raise CheckpointError(
                f"{path}: receiver layer {r.receiver_layer} reads sharer layer {r.sharer_layer}, but the sharer "
                f"{_describe(sharer)} has layers 0-{sharer.num_layers - 1}; this fuser was trained for another sharer")
    if mapping == "last_aligned":
        # last_aligned always joins the two last layers, so the deepest sharer layer read is L_s - 1.
        deepest = max(r.sharer_layer for r in routes)
        if deepest != sharer.num_layers - 1:
            raise CheckpointError(
                f"{path}: the deepest sharer layer read is {deepest}, but with the 'last_aligned' map it is the "
                f"sharer's last layer; the sharer {_describe(sharer)} has {sharer.num_layers} layers, the fuser "
                f"was trained for a sharer with {deepest + 1}")


def _ranges(values: Sequence[int]) -> str:
    vs = sorted(set(values))
    if vs and vs == list(range(vs[0], vs[-1] + 1)):
        return f"{vs[0]}-{vs[-1]}" if len(vs) > 1 else str(vs[0])
    return str(vs)


def load_published(folder: FuserRef, *, receiver_signature: ModelSignature | None = None,
                   sharer_signature: ModelSignature | None = None, subfolder: str = DEFAULT_SUBFOLDER) -> Fuser:
    """A `Fuser` from a published pair folder (the one holding config.json and `subfolder`/).

    Projectors are rebuilt from `projector_i.json` through the registry and loaded strictly from
    `projector_i.pt` (`torch.load(weights_only=True)`). Dims, head counts and layer counts are
    checked against the given signatures — the models the fuser will actually join. Without a
    signature, the model's config.json is read if it is on this machine (a local folder or the HF
    cache), else the shape the checkpoint implies is used (no fingerprint).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"fuser folder {folder} does not exist; expected a published pair folder with "
                              f"config.json and {subfolder}/")
    config_path = folder / "config.json"
    config = _read_json(config_path, "the published training recipe (config.json) of a C2C pair folder")
    receiver_id, sharer_id = _model_ids(config, config_path)
    alignment = _alignment(config, config_path)
    mapping = config["model"].get("mapping")
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
                                      f"layer {_ranges(layers)} through projector {i}")
    if indices != list(range(len(indices))) or files["pt"] != set(indices):
        raise CheckpointError(
            f"{sub} holds projector files {_ranges(sorted(files['pt']))} but {routes_path.name} uses projectors "
            f"{_ranges(indices)}; expected one projector_i.pt per routed projector, numbered from 0")

    specs: list[tuple[str, dict[str, Any]]] = []
    for i in indices:
        path = sub / f"projector_{i}.json"
        spec = _read_json(path, '{"class": "C2CProjector", "init_args": {...}}')
        if not isinstance(spec, dict) or not isinstance(spec.get("class"), str) or not isinstance(spec.get("init_args"), dict):
            raise CheckpointError(f"{path} is {_short(spec)}; expected {{\"class\": \"C2CProjector\", \"init_args\": {{...}}}}")
        try:
            projector_class(spec["class"])
            args = _normalise_args(spec["init_args"])
        except ConfigError as e:
            raise CheckpointError(f"{path}: {e.message}") from None
        specs.append((spec["class"], args))
    names = {name for name, _ in specs}
    if len(names) > 1:
        raise CheckpointError(f"{sub}: projectors use several classes {sorted(names)}; agentmesh expects one class "
                              "per fuser")
    name = specs[0][0]

    # Signatures the checkpoint implies, used only where the caller gave none and no config.json is here.
    first = specs[0][1]
    receiver = receiver_signature or local_signature(receiver_id, folder) or _inferred_signature(
        receiver_id, max(r.receiver_layer for r in routes) + 1, int(first.get("target_num_heads", 0)),
        int(first.get("target_dim", 0)))
    sharer = sharer_signature or local_signature(sharer_id, folder) or _inferred_signature(
        sharer_id, max(r.sharer_layer for r in routes) + 1, int(first.get("source_num_heads", 0)),
        int(first.get("source_dim", 0)))
    _check_routes(routes, routes_path, receiver, sharer, mapping)
    if len(indices) > receiver.num_layers:
        raise CheckpointError(
            f"{sub} holds {len(indices)} projectors but the receiver {_describe(receiver)} has only "
            f"{receiver.num_layers} layers; expected at most one projector per receiver layer")

    projectors: list[nn.Module] = []
    for i, (_, args) in zip(indices, specs):
        spec_path, weights_path = sub / f"projector_{i}.json", sub / f"projector_{i}.pt"
        _check_projector_dims(args, receiver, sharer, str(spec_path))
        module = _instantiate(name, args, str(spec_path))
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:  # zip/pickle/EOF errors of a truncated or foreign file
            raise CheckpointError(f"{weights_path} is not a torch-saved state dict ({_first_line(e)}); expected "
                                  f"the weights of projector {i} saved with torch.save(state_dict)") from None
        _load_strict(module, state, str(weights_path))
        projectors.append(module.eval())

    provenance = {"format": "published", "source": str(folder.resolve()), "subfolder": subfolder,
                  "base_model": receiver_id, "teacher_model": sharer_id}
    return _make_fuser(FuserConfig(
        receiver=receiver, sharer=sharer, projector=projector_name(projectors[0]),
        projector_args=tuple(args for _, args in specs), routes=routes,
        layer_map=mapping if isinstance(mapping, str) and mapping in LAYER_MAPS else "custom",
        alignment=alignment, provenance=provenance), projectors, str(sub))


def _make_fuser(config: FuserConfig, projectors: list[nn.Module], where: str) -> Fuser:
    try:
        return Fuser(config, projectors)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e.message}") from None


# ---- our own layout -------------------------------------------------------------------------------
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


def _read_fuser_json(folder: Path) -> _FuserDoc:
    path = folder / FUSER_JSON
    raw = _read_json(path, f"an agentmesh fuser description (format {FORMAT_NAME!r})")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        got = raw.get("format") if isinstance(raw, dict) else raw
        raise CheckpointError(f"{path}: format is {_short(got)}; expected {FORMAT_NAME!r}")
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
        raise CheckpointError(f"cannot create fuser folder {folder}: {_first_line(e)}") from None
    cfg = fuser.config
    receiver_id, sharer_id = fuser_model_ids(fuser)
    prov = dict(cfg.provenance)
    if "source" in prov:  # where it was loaded from becomes where it came from
        prov.setdefault("origin", prov.pop("source"))
    prov.update(provenance or {})
    args = []
    for i, p in enumerate(fuser.projectors):
        raw = p.init_args if hasattr(p, "init_args") else cfg.projector_args[i]
        args.append(_normalise_args(dict(raw)))
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
        raise CheckpointError(f"could not write the fuser to {folder}: {_first_line(e)}") from None
    return folder


def load_fuser(folder: FuserRef) -> Fuser:
    """A `Fuser` from our own layout, loaded strictly (every tensor present, none extra, same shapes)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"fuser folder {folder} does not exist; expected a folder with {FUSER_JSON} and "
                              f"{WEIGHTS_FILE}")
    doc = _read_fuser_json(folder)
    json_path, weights_path = folder / FUSER_JSON, folder / WEIGHTS_FILE
    try:
        receiver = ModelSignature.from_dict(doc.receiver.signature)
        sharer = ModelSignature.from_dict(doc.sharer.signature)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{json_path}: a model signature lacks {_first_line(e)}; expected the fields "
                              f"{', '.join(ModelSignature.__dataclass_fields__)}") from None
    except ValueError as e:
        raise CheckpointError(f"{json_path}: a model signature is malformed: {e}") from None
    if not doc.projector.init_args:
        raise CheckpointError(f"{json_path}: projector.init_args is empty; expected one entry per projector")
    projectors: list[nn.Module] = []
    for i, raw in enumerate(doc.projector.init_args):
        where = f"{json_path} (projector {i})"
        try:
            args = _normalise_args(raw)
        except ConfigError as e:
            raise CheckpointError(f"{where}: {e.message}") from None
        _check_projector_dims(args, receiver, sharer, where)
        projectors.append(_instantiate(doc.projector.class_, args, where))
    if not weights_path.is_file():
        raise CheckpointError(f"missing {weights_path}; expected the fuser's tensors next to {FUSER_JSON}")
    try:
        tensors = load_file(weights_path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file ({_first_line(e)})") from None
    grouped: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(len(projectors))}
    for key, t in tensors.items():
        m = re.match(r"^projectors\.(\d+)\.(.+)$", key)
        if m is None or int(m[1]) not in grouped:
            raise CheckpointError(f"{weights_path}: unexpected tensor {key}; expected keys projectors.<i>.<name> with "
                                  f"i in 0-{len(projectors) - 1}")
        grouped[int(m[1])][m[2]] = t
    for i, module in enumerate(projectors):
        _load_strict(module, grouped[i], str(weights_path), prefix=f"projectors.{i}.")
        module.eval()
    routes = tuple(Route(r.receiver_layer, r.sharer_layer, r.projector) for r in doc.routes)
    provenance = {**doc.provenance, "format": "agentmesh", "source": str(folder.resolve()),
                  "base_model": doc.receiver.id, "teacher_model": doc.sharer.id}
    try:
        config = FuserConfig(receiver=receiver, sharer=sharer, projector=doc.projector.class_,
                             projector_args=tuple(_normalise_args(a) for a in doc.projector.init_args),
                             routes=routes, layer_map=doc.layer_map, alignment=doc.alignment,
                             fusion=doc.layout.fusion, key_positions=doc.layout.key_positions,
                             provenance=provenance)
    except ConfigError as e:
        raise CheckpointError(f"{json_path}: {e.message}") from None
    return _make_fuser(config, projectors, str(json_path))


def check_models(fuser: Fuser, receiver: ModelSignature | None, sharer: ModelSignature | None, *,
                 fingerprints: bool = False) -> None:
    """Raise `CheckpointError` unless the fuser's receiver/sharer shapes (and, with `fingerprints`,
    their config fingerprints where the checkpoint records one) match the given models."""
    source = fuser.config.provenance.get("source", "fuser")
    for role, want, have in (("receiver", fuser.receiver, receiver), ("sharer", fuser.sharer, sharer)):
        if have is None:
            continue
        if not want.same_shape(have):
            raise CheckpointError(f"{source} was trained for {role} {_describe(want)}, but the {role} is "
                                  f"{_describe(have)}")
        if fingerprints and want.fingerprint and want.fingerprint != have.fingerprint:
            raise CheckpointError(
                f"{source} was saved for {role} {want.name!r} with config fingerprint {want.fingerprint}, but "
                f"{have.name!r} has fingerprint {have.fingerprint} (same shape, different model config)",
                hint="pass strict_models=False to use it anyway")


def bind_models(fuser: Fuser, receiver: ModelSignature, sharer: ModelSignature) -> Fuser:
    """The same fuser (same projector modules) whose config names the given, actual models, so the
    caches those models make pass its signature checks."""
    if fuser.receiver == receiver and fuser.sharer == sharer:
        return fuser
    config = replace(fuser.config, receiver=receiver, sharer=sharer)
    return Fuser(config, list(fuser.projectors))


# ---- references: folders, published pairs, hf:// ----------------------------------------------------
@dataclass(frozen=True)
class FuserLocation:
    """A fuser on local disk: its folder, layout and (for the published layout) the subfolder."""

    folder: Path
    layout: Literal["agentmesh", "published"]
    subfolder: str = DEFAULT_SUBFOLDER


def parse_hub_ref(ref: str) -> tuple[str, str, str | None]:
    """("org/repo", pair, revision) of "hf://org/repo/<pair>[@revision]"."""
    body = ref.removeprefix("hf://")
    revision = None
    if "@" in body:
        body, revision = body.rsplit("@", 1)
    parts = [p for p in body.split("/") if p]
    if len(parts) < 3 or ("@" in ref and not revision):
        raise CheckpointError(f"fuser reference {ref!r} is malformed; expected hf://{PUBLISHED_REPO}/<pair>[@revision], "
                              f"e.g. {PUBLISHED_PAIRS['qwen3_0.6b+qwen2.5_0.5b_Fuser'].ref}")
    return f"{parts[0]}/{parts[1]}", "/".join(parts[2:]), revision


def download_pair(repo_id: str, pair: str, *, revision: str | None = None, subfolder: str | None = DEFAULT_SUBFOLDER,
                  local_dir: FuserRef | None = None) -> Path:
    """The local folder of pair folder `pair` of hub repo `repo_id`, downloaded if needed.

    Only config.json and `subfolder` are fetched (every file of the pair when `subfolder` is None).
    Honours HF_HUB_OFFLINE (read now) and the HF cache location (HF_HUB_CACHE / HF_HOME).
    """
    from huggingface_hub import snapshot_download

    from agentmesh.models import hub_cache_dir, hub_offline

    offline, cache = hub_offline(), hub_cache_dir()
    patterns = [f"{pair}/*"] if subfolder is None else [f"{pair}/config.json", f"{pair}/{subfolder}/*"]
    where = f"{repo_id}/{pair} (revision {revision or 'main'})"
    try:
        root = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, cache_dir=cache,
                                 local_files_only=offline, local_dir=None if local_dir is None else str(local_dir))
    except Exception as e:  # cache misses, network, auth and missing repos all land here
        if offline:
            raise CheckpointError(
                f"fuser {where} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is set, so it cannot "
                "be downloaded", hint="download it once with network access (agentmesh fuser pull), point "
                "HF_HOME/HF_HUB_CACHE at a cache that has it, or pass a local pair folder") from None
        raise CheckpointError(f"fuser {where} could not be downloaded and is not in the cache {cache} "
                              f"({_first_line(e)})", hint="check the network and the pair name") from None
    folder = Path(root) / pair
    if not (folder / "config.json").is_file():
        known = "" if pair in PUBLISHED_PAIRS else f"; known pairs: {', '.join(PUBLISHED_PAIRS)}"
        state = " (HF_HUB_OFFLINE is set; it is not in the cache)" if offline else ""
        raise CheckpointError(f"the snapshot of {repo_id} in {Path(root)} has no pair folder {pair!r} with a "
                              f"config.json{state}{known}")
    return folder


def locate(ref: FuserRef, *, subfolder: str | None = None) -> FuserLocation:
    """Where fuser `ref` is on disk: a folder of either layout, the published `final/` (or
    `checkpoint-N/`) folder itself, a published pair name, or "hf://org/repo/<pair>[@revision]"."""
    sub = subfolder or DEFAULT_SUBFOLDER
    if str(ref).startswith("hf:/") and not str(ref).startswith("hf://"):
        ref = "hf://" + str(ref)[len("hf:/"):]  # what Path() makes of "hf://...", e.g. a typer Path option
    if isinstance(ref, str) and (ref.startswith("hf://") or (ref in PUBLISHED_PAIRS and not Path(ref).exists())):
        repo_id, pair, revision = parse_hub_ref(ref if ref.startswith("hf://") else PUBLISHED_PAIRS[ref].ref)
        return FuserLocation(download_pair(repo_id, pair, revision=revision, subfolder=sub), "published", sub)
    if not isinstance(ref, (str, Path)):
        raise ConfigError(f"fuser reference {ref!r} is a {type(ref).__name__}; expected a folder path or an hf:// ref")
    folder = Path(ref).expanduser()
    if not folder.is_dir():
        raise CheckpointError(
            f"fuser folder {folder} does not exist; expected a folder with {FUSER_JSON} (agentmesh layout) or "
            f"config.json and {sub}/ (published layout), or hf://{PUBLISHED_REPO}/<pair>")
    if (folder / FUSER_JSON).is_file():
        return FuserLocation(folder, "agentmesh")
    if (folder / "config.json").is_file():
        return FuserLocation(folder, "published", sub)
    if (folder / "projector_config.json").is_file() and (folder.parent / "config.json").is_file():
        return FuserLocation(folder.parent, "published", folder.name)
    raise CheckpointError(f"{folder} holds neither {FUSER_JSON} (agentmesh layout) nor config.json (published "
                          "layout); expected a fuser folder")


def load_any(ref: FuserRef, *, receiver_signature: ModelSignature | None = None,
             sharer_signature: ModelSignature | None = None, subfolder: str | None = None,
             check_fingerprints: bool = False) -> Fuser:
    """A `Fuser` from any reference `locate` understands, in either layout, checked against the
    given model signatures where given."""
    where = locate(ref, subfolder=subfolder)
    if where.layout == "published":
        return load_published(where.folder, receiver_signature=receiver_signature,
                              sharer_signature=sharer_signature, subfolder=where.subfolder)
    fuser = load_fuser(where.folder)
    check_models(fuser, receiver_signature, sharer_signature, fingerprints=check_fingerprints)
    return fuser


def size_on_disk(location: FuserLocation) -> int:
    """Bytes of the files a fuser is loaded from."""
    if location.layout == "agentmesh":
        files = [location.folder / FUSER_JSON, location.folder / WEIGHTS_FILE]
    else:
        sub = location.folder / location.subfolder
        files = [location.folder / "config.json", *(p for p in sub.iterdir() if p.is_file())] if sub.is_dir() else []
    return sum(f.stat().st_size for f in files if f.is_file())
