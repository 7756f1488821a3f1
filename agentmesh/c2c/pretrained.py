"""The parts of a `C2CModel` from fuser checkpoints: the receiver and sharers are loaded from the
ids the checkpoints record (hub ids or local paths) through a `ModelPool`, unless given, and every
fuser is checked against the models it actually joins. `C2CModel.from_pretrained` and
`C2CModel.build` assemble the model from what these functions return."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from agentmesh.c2c.checkpoints import (
    FuserRef, bind_models, check_models, load_any, locate, pair_models, resolve_model_path,
)
from agentmesh.c2c.fuser import Fuser
from agentmesh.errors import CheckpointError, ConfigError, ModelLoadError
from agentmesh.models.pool import ModelPool
from agentmesh.models.protocol import LanguageModel

# A loaded model, or a reference ModelPool.get understands (built-in name, folder, .gguf, hub id).
ModelLike = LanguageModel | str | Path
Parts = tuple[LanguageModel, list[LanguageModel], list[Fuser]]  # (receiver, sharers, one fuser per sharer)


def _same_model_id(a: str, b: str) -> bool:
    """Whether two checkpoint model ids name the same model (hub ids case-insensitively, paths resolved)."""
    def norm(ref: str) -> str:
        ref = ref.strip().removeprefix("hf://").rstrip("/")
        path = Path(ref).expanduser()
        return str(path.resolve()) if path.exists() else ref.lower()
    return norm(a) == norm(b)


def _get_model(pool: ModelPool, ref: ModelLike, *, role: str, fuser: str | None, dtype: Any, device: Any
               ) -> LanguageModel:
    """`ref` loaded; a failure names the fuser that asked for the model, when one did."""
    from agentmesh.models import LoadedModel

    if isinstance(ref, LoadedModel):
        return ref
    try:
        return pool.get(ref, dtype=dtype, device=device)
    except ModelLoadError as e:
        if fuser is None:
            raise
        raise ModelLoadError(f"fuser {fuser} needs {role} {str(ref)!r}: {e.message}",
                             hint=e.hint or f"pass {role}=... (a loaded model or a local folder) to use a copy "
                                            "you have") from None


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load_pretrained(
    ref: FuserRef | Sequence[FuserRef],
    *,
    receiver: ModelLike | None = None,
    sharers: Sequence[ModelLike | None] | ModelLike | None = None,
    pool: ModelPool | None = None,
    dtype: Any = "auto",
    device: str | torch.device = "cpu",
    subfolder: str | None = None,
    strict_models: bool = True,
) -> Parts:
    """The receiver, sharers and fusers of one fuser reference or several (one per sharer of the
    same receiver).

    Each `ref` is a fuser folder in the published layout (config.json + final/) or ours
    (fuser.json), a published pair name, or ``hf://nics-efc/C2C_Fuser/<pair>[@revision]``;
    `subfolder` picks e.g. ``checkpoint-100`` instead of ``final``. The receiver and sharers come
    from the ids the checkpoints record unless `receiver` / `sharers` (one per ref; None entries
    keep the recorded id) are given. All refs must be for the same receiver. `strict_models`
    also checks config fingerprints (our layout records them) and the recorded receiver ids.
    """
    from agentmesh.models import default_pool

    refs = _as_list(ref)
    if not refs:
        raise ConfigError("from_pretrained needs at least one fuser reference")
    given_sharers = [None] * len(refs) if sharers is None else _as_list(sharers)
    if len(given_sharers) != len(refs):
        raise ConfigError(f"from_pretrained got {len(refs)} fusers but {len(given_sharers)} sharers; give one sharer "
                          "per fuser (None keeps the one the fuser records)")
    pool = pool if pool is not None else default_pool()

    locations = [locate(r, subfolder=subfolder) for r in refs]
    ids = [pair_models(loc.folder) for loc in locations]
    ids = [(resolve_model_path(r, loc.folder), resolve_model_path(s, loc.folder), a)
           for loc, (r, s, a) in zip(locations, ids)]
    if strict_models:
        for loc, (rid, _, _) in zip(locations[1:], ids[1:]):
            if not _same_model_id(rid, ids[0][0]):
                raise CheckpointError(
                    f"fuser {locations[0].folder} was trained for receiver {ids[0][0]!r}, fuser {loc.folder} for "
                    f"receiver {rid!r}; several fusers must share one receiver",
                    hint="pass strict_models=False if these ids name the same model")

    first = str(locations[0].folder)
    recv = _get_model(pool, receiver if receiver is not None else ids[0][0], role="receiver", fuser=first,
                      dtype=dtype, device=device)
    loaded_sharers, fusers = [], []
    for loc, (_, sid, _), given in zip(locations, ids, given_sharers):
        sharer = _get_model(pool, given if given is not None else sid, role="sharer", fuser=str(loc.folder),
                            dtype=dtype, device=device)
        fuser = load_any(loc.folder, receiver_signature=recv.signature, sharer_signature=sharer.signature,
                         subfolder=loc.subfolder, check_fingerprints=strict_models)
        loaded_sharers.append(sharer)
        fusers.append(bind_models(fuser, recv.signature, sharer.signature).to(device))
    return recv, loaded_sharers, fusers


def build_parts(
    model: ModelLike | None = None,
    *,
    sharers: Sequence[ModelLike] = (),
    fusers: Sequence[FuserRef | Fuser] = (),
    dtype: Any = "auto",
    device: str | torch.device = "cpu",
    pool: ModelPool | None = None,
    subfolder: str | None = None,
) -> Parts:
    """What `agentmesh generate` builds from its options.

    No fusers: `model` alone (the default model when None). With fusers: `load_pretrained(fusers)`,
    the receiver being `model` when given and the one the first fuser records otherwise, and the
    sharers `sharers` when given (one per fuser) and the recorded ones otherwise. Already loaded
    `Fuser` objects are used as they are (then `model` and `sharers` are required).
    """
    from agentmesh.models import DEFAULT_MODEL, default_pool

    pool = pool if pool is not None else default_pool()
    sharers, fusers = list(sharers), list(fusers)
    if not fusers:
        if sharers:
            raise ConfigError(f"{len(sharers)} sharer(s) given but no fuser; give one --fuser per sharer")
        return _get_model(pool, model or DEFAULT_MODEL, role="receiver", fuser=None, dtype=dtype,
                          device=device), [], []
    if sharers and len(sharers) != len(fusers):
        raise ConfigError(f"{len(sharers)} sharers but {len(fusers)} fusers; give one fuser per sharer, in order")
    if all(isinstance(f, Fuser) for f in fusers):
        if model is None or not sharers:
            raise ConfigError("loaded Fuser objects need the receiver and the sharers they join")
        recv = _get_model(pool, model, role="receiver", fuser=None, dtype=dtype, device=device)
        loaded = [_get_model(pool, s, role="sharer", fuser=None, dtype=dtype, device=device) for s in sharers]
        for f, s in zip(fusers, loaded):
            check_models(f, recv.signature, s.signature)
        return recv, loaded, [bind_models(f, recv.signature, s.signature) for f, s in zip(fusers, loaded)]
    if any(isinstance(f, Fuser) for f in fusers):
        raise ConfigError("give fusers either all as references or all as loaded Fuser objects")
    return load_pretrained(fusers, receiver=model, sharers=sharers or None, pool=pool, dtype=dtype, device=device,
                           subfolder=subfolder)


__all__ = ["build_parts", "load_pretrained"]
