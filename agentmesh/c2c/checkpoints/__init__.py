"""Fuser checkpoints: the published C2C layout in (`published`), our own safetensors layout in and
out (`native`), hf:// references and downloads (`hub`), and one entry point for any reference
(`dispatch`: `locate`, `load_any`, `pair_models`).

Every problem is a one-line `CheckpointError` naming the file and what was expected; nothing from
deep inside torch reaches the user.
"""
from agentmesh.c2c.checkpoints.common import (FuserRef, bind_models, check_models, fuser_model_ids, local_signature,
                                              resolve_model_path)
from agentmesh.c2c.checkpoints.dispatch import FuserLocation, fuser_info, load_any, locate, pair_models, size_on_disk
from agentmesh.c2c.checkpoints.hub import download_pair, parse_hub_ref
from agentmesh.c2c.checkpoints.native import FORMAT_NAME, FORMAT_VERSION, FUSER_JSON, WEIGHTS_FILE, load_fuser, save_fuser
from agentmesh.c2c.checkpoints.published import (DEFAULT_SUBFOLDER, PUBLISHED_PAIRS, PUBLISHED_REPO, PublishedPair,
                                                 load_published)

__all__ = [
    "DEFAULT_SUBFOLDER", "FORMAT_NAME", "FORMAT_VERSION", "FUSER_JSON", "FuserLocation", "FuserRef", "PUBLISHED_PAIRS",
    "PUBLISHED_REPO", "PublishedPair", "WEIGHTS_FILE", "bind_models", "check_models", "download_pair",
    "fuser_info", "fuser_model_ids", "load_any", "load_fuser", "load_published", "local_signature", "locate", "pair_models",
    "parse_hub_ref", "resolve_model_path", "save_fuser", "size_on_disk",
]
