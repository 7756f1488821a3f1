"""`ModelPool`: load each model once and share it between agents, graphs and threads."""
from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Callable

import torch

from agentmesh.errors import ConfigError
from agentmesh.models.adapters import adapter_key
from agentmesh.models.loaded_model import LoadedModel
from agentmesh.models.load import DTypeLike, load_model, resolve_device, resolve_dtype, resolve_ref

Loader = Callable[..., LoadedModel]  # loader(ref, *, dtype=..., device=...[, adapter=...]) -> LoadedModel
_Key = tuple[str, str, torch.dtype, str]


class ModelPool:
    """Thread-safe cache of loaded models, keyed by (resolved reference, adapter, dtype, device).

    Each key has its own lock, so two different models load concurrently while two requests for
    the same model wait for one load. A failed load is not remembered: the next `get` retries.
    Models registered with `put` are found by name before any file is looked at.
    """

    def __init__(self, loader: Loader = load_model):
        self._loader = loader
        self._lock = threading.Lock()  # guards the three dicts below, never held while loading
        self._loaded: dict[_Key, LoadedModel] = {}
        self._key_locks: dict[_Key, threading.Lock] = {}
        self._named: dict[str, LoadedModel] = {}

    def get(self, ref: str | Path, *, dtype: DTypeLike = "auto", device: str | torch.device = "cpu",
            adapter: str | Path | None = None) -> LoadedModel:
        """The model for `ref` (with the PEFT `adapter` folder merged in, if given), loaded on first use.

        A name registered with `put` returns that model; asking it for another dtype or device
        than it has raises `ConfigError` (a registered model is never converted behind your back).
        A registered name cannot take an adapter: register the adapted model under its own name.
        """
        torch_dtype = resolve_dtype(dtype, device)
        dev = resolve_device(device)
        if isinstance(ref, str) and adapter is None:
            with self._lock:
                named = self._named.get(ref)
            if named is not None:
                self._check_named(ref, named, dtype, torch_dtype, dev)
                return named
        key: _Key = (resolve_ref(ref).key, adapter_key(adapter), torch_dtype, str(dev))
        with self._lock:
            if key in self._loaded:
                return self._loaded[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._loaded:  # loaded by the thread we waited for
                    return self._loaded[key]
            extra = {} if adapter is None else {"adapter": adapter}
            loaded = self._loader(ref, dtype=torch_dtype, device=dev, **extra)
            with self._lock:
                self._loaded[key] = loaded
            return loaded

    @staticmethod
    def _check_named(name: str, loaded: LoadedModel, dtype: DTypeLike, torch_dtype: torch.dtype,
                     dev: torch.device) -> None:
        wrong_dtype = not (isinstance(dtype, str) and dtype == "auto") and loaded.dtype != torch_dtype
        if wrong_dtype or loaded.device.type != dev.type:
            raise ConfigError(f"model {name!r} was registered on {loaded.device} as {loaded.dtype}; "
                              f"it cannot be served on {dev} as {torch_dtype}")

    def put(self, name: str, loaded: LoadedModel, *, replace: bool = False) -> None:
        """Register an in-memory model under `name` (e.g. a tiny test model) so graphs can refer
        to it. Re-registering a name with another model raises `ConfigError` unless `replace`."""
        if not isinstance(loaded, LoadedModel):
            raise ConfigError(f"ModelPool.put({name!r}, ...) needs a LoadedModel, not {type(loaded).__name__}")
        with self._lock:
            current = self._named.get(name)
            if current is not None and current is not loaded and not replace:
                raise ConfigError(f"model name {name!r} is already registered in this pool; pass replace=True "
                                  "to swap it")
            self._named[name] = loaded

    def __contains__(self, ref: object) -> bool:
        """Whether `ref` (without an adapter) is registered by name or already loaded."""
        return self.has(ref)

    def has(self, ref: object, adapter: str | Path | None = None) -> bool:
        """Whether `ref` with `adapter` is registered by name or already loaded (any dtype/device)."""
        if not isinstance(ref, (str, Path)):
            return False
        with self._lock:
            if isinstance(ref, str) and adapter is None and ref in self._named:
                return True
            loaded_keys = {k[:2] for k in self._loaded}
        try:
            return (resolve_ref(ref).key, adapter_key(adapter)) in loaded_keys
        except Exception:  # an unresolvable ref is simply not in the pool
            return False

    def names(self) -> list[str]:
        """Registered names, then the names of loaded models, sorted, without duplicates."""
        with self._lock:
            names = set(self._named) | {m.name for m in self._loaded.values()}
        return sorted(names)

    def clear(self) -> None:
        """Forget every model (they are freed once no one else holds them)."""
        with self._lock:
            self._loaded.clear()
            self._named.clear()


@functools.cache
def default_pool() -> ModelPool:
    """The process-wide pool (created on first use) that the CLI and runtime share."""
    return ModelPool()
