"""Fuser checkpoints on the Hugging Face hub: `hf://org/repo/<pair>[@revision]` references and
downloads of one pair folder (honouring HF_HUB_OFFLINE and the HF cache location)."""
from __future__ import annotations

from pathlib import Path

from agentmesh.c2c.checkpoints.common import FuserRef
from agentmesh.c2c.checkpoints.published import DEFAULT_SUBFOLDER, PUBLISHED_PAIRS, PUBLISHED_REPO
from agentmesh.errors import CheckpointError, error_line


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
                              f"({error_line(e)})", hint="check the network and the pair name") from None
    folder = Path(root) / pair
    if not (folder / "config.json").is_file():
        known = "" if pair in PUBLISHED_PAIRS else f"; known pairs: {', '.join(PUBLISHED_PAIRS)}"
        state = " (HF_HUB_OFFLINE is set; it is not in the cache)" if offline else ""
        raise CheckpointError(f"the snapshot of {repo_id} in {Path(root)} has no pair folder {pair!r} with a "
                              f"config.json{state}{known}")
    return folder

