"""Loading causal LMs and tokenizers (built-in names, folders, GGUF files, the Hub) and sharing them."""
from agentmesh.models.builtin import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    BuiltinModel,
    builtin_gguf_path,
    builtin_names,
    is_builtin,
)
from agentmesh.models.loaded_model import LoadedModel, plain_chat_text
from agentmesh.models.load import (
    ModelRef,
    finish_loaded,
    hub_cache_dir,
    hub_offline,
    load_model,
    progress_bars,
    resolve_device,
    resolve_dtype,
    resolve_ref,
)
from agentmesh.models.pool import ModelPool, default_pool

__all__ = [
    "BUILTIN_MODELS", "DEFAULT_MODEL", "BuiltinModel", "LoadedModel", "ModelPool", "ModelRef",
    "builtin_gguf_path", "builtin_names", "default_pool", "finish_loaded", "hub_cache_dir", "hub_offline",
    "is_builtin", "load_model", "plain_chat_text", "progress_bars", "resolve_device", "resolve_dtype", "resolve_ref",
]
