"""One entry point for every fuser reference: find it on disk (a folder of either layout, a
published pair name, an hf:// ref), read its models from metadata alone, or load it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agentmesh.c2c.checkpoints.common import FuserRef, read_json
from agentmesh.c2c.checkpoints.hub import download_pair, parse_hub_ref
from agentmesh.c2c.checkpoints.native import FUSER_JSON, WEIGHTS_FILE, check_fuser, load_fuser, read_fuser_json
from agentmesh.c2c.checkpoints.published import (DEFAULT_SUBFOLDER, PUBLISHED_PAIRS, PUBLISHED_REPO, alignment_of,
                                                 check_published, load_published, model_ids)
from agentmesh.c2c.fuser import Fuser
from agentmesh.cache.kv import ModelSignature
from agentmesh.errors import CheckpointError, ConfigError


def pair_models(folder: FuserRef) -> tuple[str, str, str]:
    """(receiver id, sharer id, alignment) of a fuser folder, from its metadata only (no weights).

    Works for a published pair folder (config.json) and for our own layout (fuser.json); the
    alignment is the published `alignment_strategy` when `is_do_alignment`, else the default.
    """
    folder = Path(folder)
    if (folder / FUSER_JSON).is_file():
        doc = read_fuser_json(folder)
        return doc.receiver.id, doc.sharer.id, doc.alignment
    path = folder / "config.json"
    config = read_json(path, "a published C2C pair folder's config.json (the training recipe)")
    receiver, sharer = model_ids(config, path)
    return receiver, sharer, alignment_of(config, path)


@dataclass(frozen=True)
class FuserLocation:
    """A fuser on local disk: its folder, layout and (for the published layout) the subfolder."""

    folder: Path
    layout: Literal["agentmesh", "published"]
    subfolder: str = DEFAULT_SUBFOLDER


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
    return load_fuser(where.folder, receiver_signature=receiver_signature, sharer_signature=sharer_signature,
                      check_fingerprints=check_fingerprints)


def size_on_disk(location: FuserLocation) -> int:
    """Bytes of the files a fuser is loaded from."""
    if location.layout == "agentmesh":
        files = [location.folder / FUSER_JSON, location.folder / WEIGHTS_FILE]
    else:
        sub = location.folder / location.subfolder
        files = [location.folder / "config.json", *(p for p in sub.iterdir() if p.is_file())] if sub.is_dir() else []
    return sum(f.stat().st_size for f in files if f.is_file())


def fuser_info(ref: FuserRef) -> tuple[str, str] | None:
    """(receiver id, sharer id) a fuser was trained for, after checking all its metadata (JSON
    files, routes, projector sizes against the weight files) without reading a weight.

    This is what `agentmesh graph check` asks of every fuse edge. A local folder that does not
    exist or whose metadata is damaged is a `CheckpointError`; a hub reference is None (checking
    it would mean downloading it).
    """
    text = str(ref)
    if text.startswith(("hf://", "hf:/")) or (text in PUBLISHED_PAIRS and not Path(text).exists()):
        return None
    where = locate(ref)
    if where.layout == "agentmesh":
        checked = check_fuser(where.folder)
        return checked.doc.receiver.id, checked.doc.sharer.id
    published = check_published(where.folder, subfolder=where.subfolder)
    return published.receiver_id, published.sharer_id
