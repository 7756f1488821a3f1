"""`load_model`: a causal LM and its tokenizer from a built-in name, a folder, a GGUF file or the Hub.

Reference kinds (`resolve_ref` tells them apart without loading anything):

* a built-in name, e.g. ``"smollm2-135m-instruct"`` (see `agentmesh.models.builtin`);
* a local folder in transformers layout: ``config.json``, weights (``*.safetensors``) and
  tokenizer files (``tokenizer.json`` / ``tokenizer_config.json``); a folder holding no
  ``config.json`` but exactly one ``.gguf`` file is read as that file;
* a path to a ``.gguf`` file (weights are dequantized; needs the `gguf` and `accelerate` packages);
* a Hugging Face Hub id, ``"org/name"`` or ``"hf://org/name[@revision]"``, fetched with
  `huggingface_hub.snapshot_download`; ``HF_HUB_OFFLINE`` and the cache location
  (``HF_HUB_CACHE`` / ``HF_HOME``) are read from the environment at call time.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib.util
import os
import re
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import torch

from agentmesh.cache.kv import ModelSignature
from agentmesh.errors import ConfigError, ModelLoadError, error_line
from agentmesh.models.builtin import DEFAULT_MODEL, builtin_gguf_path, builtin_names, is_builtin
from agentmesh.models.loaded_model import LoadedModel

DTypeLike = str | torch.dtype

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Files fetched from the Hub: configs, safetensors weights, tokenizer files, chat templates.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@(?P<rev>[\w.\-/]+))?$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_FOLDER_EXPECTED = "config.json, weights (model.safetensors or shards) and tokenizer files (tokenizer.json)"


@dataclass(frozen=True)
class ModelRef:
    """A resolved model reference. `key` identifies the model for pooling (same key, same files)."""

    kind: Literal["builtin", "folder", "gguf", "hub"]
    name: str
    key: str
    path: Path | None = None  # folder or .gguf file (None for builtin and hub refs until fetched)
    repo_id: str | None = None
    revision: str | None = None


def resolve_ref(ref: str | Path) -> ModelRef:
    """Classify `ref` without loading it. Raises `ModelLoadError` for a missing path or an
    unrecognisable reference."""
    if isinstance(ref, str) and is_builtin(ref):
        return ModelRef("builtin", ref, f"builtin:{ref}")
    if isinstance(ref, str) and ref.startswith("hf://"):
        m = _HUB_ID.match(ref[len("hf://"):])
        if m is None:
            raise ModelLoadError(f"hub reference {ref!r} is malformed; expected hf://org/name or hf://org/name@revision")
        return _hub_ref(m["repo"], m["rev"])
    if not isinstance(ref, (str, Path)):
        raise ConfigError(f"model reference {ref!r} is a {type(ref).__name__}; expected a str or a Path")
    path = Path(ref).expanduser()
    if path.exists():
        return _path_ref(path.resolve())
    if isinstance(ref, str) and not _looks_like_path(ref):
        m = _HUB_ID.match(ref)
        if m is not None:
            return _hub_ref(m["repo"], m["rev"])
    if path.suffix == ".gguf":
        raise ModelLoadError(f"no model at {ref}: the GGUF file does not exist")
    if isinstance(ref, Path) or _looks_like_path(ref) or "/" in ref:
        raise ModelLoadError(f"no model at {ref}: the folder does not exist; expected a folder with {_FOLDER_EXPECTED}")
    close = difflib.get_close_matches(ref, builtin_names(), n=1)
    raise ModelLoadError(
        f"unknown model {ref!r}: not a built-in ({', '.join(builtin_names())}), an existing folder or "
        ".gguf file, or a hub id like org/name", hint=f"did you mean {close[0]!r}?" if close else None)


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or "\\" in ref or ref.endswith(".gguf")


def _hub_ref(repo: str, revision: str | None) -> ModelRef:
    return ModelRef("hub", repo, f"hf://{repo}@{revision or 'main'}", repo_id=repo, revision=revision)


def _path_ref(path: Path) -> ModelRef:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf file; expected a .gguf file or a model folder")
        return ModelRef("gguf", path.stem, str(path), path=path)
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").is_file() and len(ggufs) == 1:
        return ModelRef("gguf", ggufs[0].stem, str(ggufs[0]), path=ggufs[0])
    return ModelRef("folder", path.name, str(path), path=path)


def model_size(ref: str | Path = DEFAULT_MODEL) -> int | None:
    """Bytes of weights `ref` names on disk, without loading it (None for a hub id not yet fetched).
    Raises `ModelLoadError` as `resolve_ref` does, so a bad reference fails before any work."""
    mref = resolve_ref(ref)
    path = builtin_gguf_path(mref.name) if mref.kind == "builtin" else mref.path
    if path is None:
        return None
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) or None


def resolve_dtype(dtype: DTypeLike = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """The torch dtype `dtype` names. ``"auto"`` is float32 on CPU (where half precision is slow
    and GGUF dequantizes to float32 anyway) and bfloat16 (float16 where unsupported) elsewhere."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype {dtype} is not supported; use auto, float32, bfloat16 or float16")
        return dtype
    if not isinstance(dtype, str):
        raise ConfigError(f"dtype {dtype!r} is not supported; use auto, float32, bfloat16 or float16")
    name = dtype.strip().lower().removeprefix("torch.")
    if name == "auto":
        dev = resolve_device(device)
        if dev.type == "cpu":
            return torch.float32
        if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    if name not in _DTYPE_NAMES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use auto, float32, bfloat16 or float16")
    return _DTYPE_NAMES[name]


def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None


def _check_device_available(dev: torch.device) -> None:
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(dev)!r} was requested but CUDA is not available; use device='cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {str(dev)!r} was requested but MPS is not available; use device='cpu'")


# Per-context switch (not process state): a quiet load in one thread leaves another's bars alone.
_QUIET_PROGRESS: ContextVar[bool] = ContextVar("agentmesh_quiet_progress", default=False)


def _install_quiet_hooks() -> None:
    """Route transformers' progress bars through `_QUIET_PROGRESS` (idempotent).

    transformers draws "Loading weights" through its own tqdm wrapper (which accepts a hook) and
    the GGUF "de-quantizing" bar through plain `tqdm.auto`, so both are wrapped. When not quiet
    they behave exactly as before, including any hook installed earlier.
    """
    from transformers.utils import logging as hf_logging

    def quiet_or(call: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return hf_logging.EmptyTqdm(*args, **kwargs) if _QUIET_PROGRESS.get() else call(*args, **kwargs)
        wrapper._agentmesh_quiet = True  # type: ignore[attr-defined]
        return wrapper

    previous = getattr(hf_logging, "_tqdm_hook", None)
    if hasattr(hf_logging, "set_tqdm_hook") and not getattr(previous, "_agentmesh_quiet", False):
        def hook(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if _QUIET_PROGRESS.get():
                return hf_logging.EmptyTqdm(*args, **kwargs)
            return previous(factory, args, kwargs) if previous else factory(*args, **kwargs)
        hook._agentmesh_quiet = True  # type: ignore[attr-defined]
        hf_logging.set_tqdm_hook(hook)
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # gguf support missing: nothing to wrap
        return
    if not getattr(gguf_utils.tqdm, "_agentmesh_quiet", False):
        gguf_utils.tqdm = quiet_or(gguf_utils.tqdm)


@contextlib.contextmanager
def progress_bars(verbose: bool) -> Iterator[None]:
    """Within this block (this thread/task only), transformers' load/save progress bars show only
    if `verbose`."""
    _install_quiet_hooks()
    token = _QUIET_PROGRESS.set(not verbose)
    try:
        yield
    finally:
        _QUIET_PROGRESS.reset(token)


def load_model(
    ref: str | Path = DEFAULT_MODEL,
    *,
    dtype: DTypeLike = "auto",
    device: str | torch.device = "cpu",
    verbose: bool = False,
    adapter: str | Path | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode with gradients off.

    `ref` is a built-in name, a folder, a ``.gguf`` path or a hub id (see the module docstring).
    `adapter` is a PEFT adapter folder (e.g. LoRA) merged into this load's weights; the model is
    then named ``"<base>+<adapter folder name>"``. `verbose` shows transformers' loading progress
    bars (hidden by default). Raises `ModelLoadError` for missing files, failed loads or an
    adapter made for another base model, `ConfigError` for a bad dtype/device.
    """
    torch_dtype = resolve_dtype(dtype, device)
    dev = resolve_device(device)
    _check_device_available(dev)
    mref = resolve_ref(ref)
    if adapter is not None:
        from agentmesh.models.adapters import check_adapter_folder

        check_adapter_folder(adapter)  # before the (slow) base load
    with progress_bars(verbose):
        if mref.kind == "builtin":
            gguf = builtin_gguf_path(mref.name)
            model, tokenizer = _load_gguf(gguf, torch_dtype)
            source = str(gguf)
        elif mref.kind == "gguf":
            assert mref.path is not None
            model, tokenizer = _load_gguf(mref.path, torch_dtype)
            source = str(mref.path)
        elif mref.kind == "folder":
            assert mref.path is not None
            model, tokenizer = _load_folder(mref.path, torch_dtype)
            source = str(mref.path)
        else:
            assert mref.repo_id is not None
            snapshot = _hub_snapshot(mref.repo_id, mref.revision)
            inner = _path_ref(snapshot)
            assert inner.path is not None
            loader = _load_gguf if inner.kind == "gguf" else _load_folder
            model, tokenizer = loader(inner.path, torch_dtype)
            source = mref.key
    name = mref.name
    if adapter is not None:
        from agentmesh.models.adapters import adapter_key, apply_adapter

        model = apply_adapter(model, adapter, ModelSignature.from_config(model.config, mref.name))
        name, source = f"{mref.name}+{Path(adapter_key(adapter)).name}", f"{source}+adapter:{adapter_key(adapter)}"
    return finish_loaded(model, tokenizer, name=name, source=source, device=dev)


def finish_loaded(model: torch.nn.Module, tokenizer: Any, *, name: str, source: str,
                  device: str | torch.device = "cpu") -> LoadedModel:
    """Freeze `model` (eval, no grad), give `tokenizer` a pad token and wrap both.

    `tokenizer` is changed in place when it lacks a pad token: pass a copy if it is shared.
    """
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(resolve_device(device))
    model.eval()
    model.requires_grad_(False)
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "pad_token_id", None) is None:
        gen.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(name=name, model=model, tokenizer=tokenizer,
                       signature=ModelSignature.from_config(model.config, name), source=source)


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist; expected a folder with {_FOLDER_EXPECTED}")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model folder {folder} has no config.json; expected a folder with {_FOLDER_EXPECTED}, "
                             "or a single .gguf file")
    has_weights = any(folder.glob("*.safetensors")) or any(
        (folder / f).is_file() for f in ("model.safetensors.index.json", "pytorch_model.bin"))
    if not has_weights:
        raise ModelLoadError(f"model folder {folder} has no weights; expected model.safetensors "
                             "(or model.safetensors.index.json and its shards)")
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(f"model folder {folder} has no tokenizer; expected one of {', '.join(_TOKENIZER_FILES)}")


def _load_folder(folder: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_folder(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises many kinds for unreadable tokenizers
        raise ModelLoadError(f"could not load the tokenizer in {folder}: {error_line(e)}") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"could not load the model in {folder}: {error_line(e)}") from e
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist; expected a path to a .gguf model file")
    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise ModelLoadError(f"loading the GGUF file {path} needs the packages {' and '.join(missing)}; "
                             f"install them with `pip install {' '.join(missing)}`")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except Exception as e:
        raise ModelLoadError(f"could not load the GGUF file {path}: {error_line(e)}") from e
    head = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and head is not None and head.weight.is_meta:
        # A GGUF file stores the tied embedding matrix once; after some earlier loads in the same
        # process transformers leaves lm_head on the meta device (and tie_weights() then does
        # nothing), so tie it here as the config asks.
        head.weight = model.get_input_embeddings().weight
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise ModelLoadError(f"the GGUF file {path} left {len(left)} parameters unloaded (e.g. {left[0]}); "
                             "expected a complete causal LM")
    return model, tokenizer


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether Hub downloads are disabled, read from the environment now (huggingface_hub reads
    it once at import, which misses later changes)."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache folder, from the environment as it is now."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    offline, cache = hub_offline(), hub_cache_dir()
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=offline,
                                   allow_patterns=_HUB_PATTERNS)
    except Exception as e:  # network, auth, missing repo and cache misses all land here
        if offline:
            raise ModelLoadError(
                f"model {repo_id!r} (revision {revision or 'main'}) is not in the Hugging Face cache {cache} and "
                "HF_HUB_OFFLINE is set, so it cannot be downloaded",
                hint="download it once with network access, point HF_HOME/HF_HUB_CACHE at a cache that has it, "
                     "or pass a local folder") from e
        raise ModelLoadError(
            f"model {repo_id!r} (revision {revision or 'main'}) could not be fetched from the Hugging Face Hub "
            f"and is not in the cache {cache} (no network?): {error_line(e)}",
            hint="check the network and the repo id, or pass a local folder") from e
    return Path(folder)
