"""What both checkpoint layouts share: reading JSON with one-line errors, model signatures (from
a config.json on this machine, or the shape a checkpoint implies), building projectors and loading
their weights strictly, and checking a fuser against the models it will join."""
from __future__ import annotations

import json
import re
from itertools import accumulate
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from agentmesh.c2c.fuser import Fuser, FuserConfig
from agentmesh.c2c.projector import dtype_name, parse_dtype
from agentmesh.c2c.registry import build_projector
from agentmesh.cache.kv import ModelSignature
from agentmesh.errors import CheckpointError, ConfigError, error_line

FuserRef = str | Path

DEFAULT_ALIGNMENT: str = FuserConfig.__dataclass_fields__["alignment"].default
ALIGNMENTS = ("last", "first", "longest")  # how a sharer's tokens are gathered onto the receiver's
# A fuser's JSON files are kilobytes and no transformer has a thousand layers: a file that claims
# more is damaged or hostile, and is refused before it can make anything allocate.
MAX_JSON_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 32
MAX_LAYERS = 1024
PROJECTOR_DIMS = ("source_dim", "source_num_heads", "target_dim", "target_num_heads")
# Elements a projector may hold beyond its stored weights (non-persistent buffers).
_UNSTORED_ELEMENTS = 1 << 20
_SHOW = 4  # how many keys an error lists before "..."


def list_keys(keys: Sequence[str]) -> str:
    shown = ", ".join(sorted(keys)[:_SHOW])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _SHOW else "")


def short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def ranges(values: Sequence[int]) -> str:
    vs = sorted(set(values))
    if vs and vs == list(range(vs[0], vs[-1] + 1)):
        return f"{vs[0]}-{vs[-1]}" if len(vs) > 1 else str(vs[0])
    return str(vs)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # JSON readers keep the last of two equal keys; in a checkpoint that hides a second route.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _depth(text: str) -> int:
    """How deeply `text`'s arrays and objects nest (strings ignored), found without recursing:
    a parser recursing into a hostile file would exhaust the interpreter's stack."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(1 if c in "[{" else -1 for c in brackets), default=0)


def read_json(path: Path, what: str) -> Any:
    """The parsed JSON file; every problem (size, duplicate keys, nesting, syntax) is one line."""
    if not path.is_file():
        raise CheckpointError(f"missing {path}; expected {what}")
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path} is {size:,} bytes; expected {what}, at most {MAX_JSON_BYTES:,} bytes")
        text = path.read_text(encoding="utf-8")
        if _depth(text) > MAX_JSON_DEPTH:
            raise CheckpointError(f"{path} nests more than {MAX_JSON_DEPTH} levels deep; expected {what}")
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except _DuplicateKey as e:
        raise CheckpointError(f"{path}: key {e.args[0]!r} appears twice in one object; expected {what} with "
                              "each key once") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({error_line(e)}); expected {what}") from None


def count(value: Any, what: str, where: str, *, low: int = 1, high: int | None = None) -> int:
    """`value` as an integer in [low, high], or a one-line error naming `what` and `where`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise CheckpointError(f"{where}: {what} is {short(value)}; expected an integer {bounds}")
    return value


def signature_from_json(data: Any, where: str) -> ModelSignature:
    """A model signature written in a checkpoint, every field checked (kinds and sizes)."""
    fields = ModelSignature.__dataclass_fields__
    required = set(fields) - {"rotary"}  # records written before `rotary` existed lack it
    if not isinstance(data, dict) or not required <= set(data) <= set(fields):
        got = sorted(data) if isinstance(data, dict) else short(data)
        raise CheckpointError(f"{where} is {got}; expected the fields {', '.join(fields)}")
    for key in ("name", "model_type", "fingerprint"):
        if not isinstance(data[key], str):
            raise CheckpointError(f"{where}.{key} is {short(data[key])}; expected a string")
    for key, low, high in (("num_layers", 1, MAX_LAYERS), ("num_kv_heads", 1, None), ("head_dim", 1, None),
                           ("vocab_size", 0, None)):
        count(data[key], key, where, low=low, high=high)
    try:
        return ModelSignature.from_dict(data)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{where}: rotary is malformed ({error_line(e)})") from None


def describe(sig: ModelSignature) -> str:
    return (f"{sig.name!r} ({sig.num_layers} layers, {sig.num_kv_heads} KV heads of dim {sig.head_dim})")


def fuser_model_ids(fuser: Fuser) -> tuple[str, str]:
    """(receiver id, sharer id) a loaded fuser was trained with (hub ids or paths)."""
    prov = fuser.config.provenance
    return str(prov.get("base_model") or fuser.receiver.name), str(prov.get("teacher_model") or fuser.sharer.name)


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


def inferred_signature(model_id: str, num_layers: int, num_kv_heads: int, head_dim: int) -> ModelSignature:
    # No config.json to read: only the shape the checkpoint itself implies, no fingerprint.
    return ModelSignature(name=model_id, model_type="", num_layers=num_layers, num_kv_heads=num_kv_heads,
                          head_dim=head_dim, vocab_size=0, fingerprint="")


def normalise_args(args: dict[str, Any]) -> dict[str, Any]:
    """Init args with the dtype as a plain name ("bfloat16"), so they are JSON and hashable-friendly."""
    out = dict(args)
    if "dtype" in out:
        out["dtype"] = dtype_name(parse_dtype(out["dtype"]))
    return out


def meta_projector(name: str, args: dict[str, Any], where: str, *, stored: Mapping[str, tuple[int, ...]] | None,
                   stored_bytes: int, file: str, prefix: str = "") -> nn.Module:
    """A projector built on the meta device, which allocates nothing, so the sizes its init_args
    claim are checked before any memory is taken: against the tensor shapes `stored` in the
    weights file when those are known without reading it (safetensors), and always against the
    file's size, `stored_bytes` (every stored element takes at least one byte)."""
    try:
        with torch.device("meta"):
            module = build_projector(name, args)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e.message}") from None
    except Exception as e:  # a projector class rejecting its arguments in its own way
        raise CheckpointError(f"{where}: projector {name!r} could not be built from its init_args "
                              f"({error_line(e)})") from None
    if stored is not None:
        check_shapes({k: tuple(t.shape) for k, t in module.state_dict().items()}, stored, file, prefix,
                     type(module).__name__)
    elements = sum(t.numel() for t in (*module.parameters(), *module.buffers()))
    if elements > stored_bytes + _UNSTORED_ELEMENTS:
        raise CheckpointError(f"{where}: its init_args describe {elements:,} weights, but {file} holds only "
                              f"{stored_bytes:,} bytes; expected init_args that match the stored weights")
    return module


def materialise(module: nn.Module, name: str, args: dict[str, Any], where: str) -> nn.Module:
    """A checked meta projector with uninitialised CPU storage, about to be overwritten by a strict
    load: this skips random init (seconds for a 478 M-parameter fuser). Classes with non-persistent
    buffers (which a state dict would not restore) are built again normally."""
    try:
        if any(m._non_persistent_buffers_set for m in module.modules()):
            return build_projector(name, args)
        return module.to_empty(device="cpu")
    except Exception as e:  # a projector class failing in its own way
        raise CheckpointError(f"{where}: projector {name!r} could not be built from its init_args "
                              f"({error_line(e)})") from None


def check_shapes(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]], file: str,
                 prefix: str, owner: str) -> None:
    """Exactly the expected tensor names, each of the expected shape; else one line against `file`."""
    missing = [prefix + k for k in expected if k not in got]
    unexpected = [prefix + k for k in got if k not in expected]
    if missing or unexpected:
        parts = ([f"missing keys {list_keys(missing)}"] if missing else []) + (
            [f"unexpected keys {list_keys(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{file}: {'; '.join(parts)}; expected exactly the {len(expected)} keys of {owner}")
    for key, want in expected.items():
        if tuple(got[key]) != tuple(want):
            raise CheckpointError(f"{file}: tensor {prefix + key} has shape {tuple(got[key])}, expected {tuple(want)}")


def load_strict(module: nn.Module, state: Any, file: str, prefix: str = "") -> None:
    """`load_state_dict(strict=True)`, with missing/unexpected keys, wrong shapes and non-finite
    values (NaN, Inf) reported against `file` before torch sees them."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file} does not hold a state dict (a mapping of names to tensors)")
    check_shapes({k: tuple(t.shape) for k, t in module.state_dict().items()},
                 {k: tuple(t.shape) for k, t in state.items()}, file, prefix, type(module).__name__)
    for key, t in state.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{file}: tensor {prefix + key} holds NaN or Inf values; expected finite weights")
    try:
        module.load_state_dict(dict(state), strict=True)
    except Exception as e:
        raise CheckpointError(f"{file}: the weights could not be loaded ({error_line(e)})") from None


def check_projector_dims(args: dict[str, Any], receiver: ModelSignature, sharer: ModelSignature,
                          where: str) -> None:
    """The projector's declared K/V sizes against the models it will join (args it lacks are skipped)."""
    wants = (("source_dim", sharer.head_dim, "sharer", "head dim {}"),
             ("source_num_heads", sharer.num_kv_heads, "sharer", "{} KV heads"),
             ("target_dim", receiver.head_dim, "receiver", "head dim {}"),
             ("target_num_heads", receiver.num_kv_heads, "receiver", "{} KV heads"))
    for key, want, role, what in wants:
        if key in args:
            count(args[key], key, where)
        if key in args and args[key] != want:
            sig = sharer if role == "sharer" else receiver
            raise CheckpointError(
                f"{where}: {key}={args[key]!r} but the {role} {sig.name!r} has {what.format(want)}; "
                f"this fuser was trained for another {role}")


def make_fuser(config: FuserConfig, projectors: list[nn.Module], where: str) -> Fuser:
    try:
        return Fuser(config, projectors)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e.message}") from None


def check_models(fuser: Fuser, receiver: ModelSignature | None, sharer: ModelSignature | None, *,
                 fingerprints: bool = False) -> None:
    """Raise `CheckpointError` unless the fuser's receiver/sharer shapes (and, with `fingerprints`,
    their config fingerprints where the checkpoint records one) match the given models."""
    check_signatures(fuser.config.provenance.get("source", "fuser"), (fuser.receiver, fuser.sharer),
                     (receiver, sharer), fingerprints=fingerprints)


def check_signatures(source: str, trained: tuple[ModelSignature, ModelSignature],
                     given: tuple[ModelSignature | None, ModelSignature | None], *, fingerprints: bool = False) -> None:
    """The (receiver, sharer) a checkpoint was trained for against the models given (None: unknown)."""
    for role, want, have in zip(("receiver", "sharer"), trained, given):
        if have is None:
            continue
        if not want.same_shape(have):
            raise CheckpointError(f"{source} was trained for {role} {describe(want)}, but the {role} is "
                                  f"{describe(have)}")
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

