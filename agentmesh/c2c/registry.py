"""Projector registry: projector classes plug in by name, so checkpoints can say which class to build.

The published `projector_i.json` files name their class ("C2CProjector"); our own checkpoints do the
same. The registry is write-once, filled by `@register_projector` at import time.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, TypeVar

from torch import nn

from agentmesh.errors import ConfigError

_P = TypeVar("_P", bound=type[nn.Module])

_CLASSES: dict[str, type[nn.Module]] = {}  # name or alias -> class (write-once)
_CANONICAL: dict[type[nn.Module], str] = {}  # class -> its canonical name
# Modules whose import registers the built-in projectors (imported lazily to avoid import cycles).
_BUILTIN_MODULES = ("agentmesh.c2c.projector",)


def register_projector(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[_P], _P]:
    """Class decorator: register a projector class under `name` (canonical) and `aliases`."""

    def decorate(cls: _P) -> _P:
        for key in (name, *aliases):
            other = _CLASSES.get(key)
            if other is not None and other is not cls:
                raise ConfigError(f"projector name {key!r} is already registered to {other.__qualname__}; "
                                  f"pick another name for {cls.__qualname__}")
            _CLASSES[key] = cls
        _CANONICAL.setdefault(cls, name)
        return cls

    return decorate


def _ensure_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def known_projectors() -> tuple[str, ...]:
    """All registered names and aliases, sorted."""
    _ensure_builtins()
    return tuple(sorted(_CLASSES))


def projector_class(name: str) -> type[nn.Module]:
    """The class registered under `name` (canonical name or alias)."""
    _ensure_builtins()
    cls = _CLASSES.get(name)
    if cls is None:
        raise ConfigError(f"unknown projector class {name!r}; known: {', '.join(sorted(_CLASSES))}")
    return cls


def projector_name(cls_or_instance: type[nn.Module] | nn.Module) -> str:
    """The canonical registered name of a projector class or instance (what checkpoints record)."""
    _ensure_builtins()
    cls = cls_or_instance if isinstance(cls_or_instance, type) else type(cls_or_instance)
    name = _CANONICAL.get(cls)
    if name is None:
        raise ConfigError(f"projector class {cls.__qualname__} is not registered; "
                          f"decorate it with @register_projector(name)")
    return name


def build_projector(name: str, init_args: dict[str, Any]) -> nn.Module:
    """Build a projector from its registered name and constructor arguments (e.g. a projector_i.json)."""
    cls = projector_class(name)
    try:
        inspect.signature(cls).bind(**init_args)
    except TypeError as exc:
        raise ConfigError(f"bad init_args for projector {name!r}: {exc}; "
                          f"expected arguments of {cls.__qualname__}{inspect.signature(cls)}") from None
    return cls(**init_args)
