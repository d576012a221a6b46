"""The registry of pruning methods: `@register` a `PruningMethod` subclass, `get(name)`,
`from_config(config.pruning)`. A method defined outside the package registers the same way."""
from __future__ import annotations

from typing import Any, TypeVar

from covipal_jax.pruning.base import PruningMethod

_REGISTRY: dict[str, type[PruningMethod]] = {}
M = TypeVar("M", bound=type[PruningMethod])


def register(cls: M) -> M:
    """Class decorator: make `cls` selectable by `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if cls.where not in ("pre_llm", "in_llm"):
        raise ValueError(f"{cls.__name__}.where={cls.where!r} not in (pre_llm, in_llm)")
    old = _REGISTRY.get(cls.name)
    if old is not None and old.__qualname__ != cls.__qualname__:
        raise ValueError(f"pruning method {cls.name!r} already registered by {old}")
    _REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type[PruningMethod]:
    """The class registered as `name`; a ValueError lists the valid names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}; valid: {names()}") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


def from_config(p: Any) -> PruningMethod:
    """`config.pruning` -> a method value (validated)."""
    return get(p.method).from_config(p)
