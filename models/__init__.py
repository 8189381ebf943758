"""Model registry: ``models.make(config.model.name, config.model)``."""
from __future__ import annotations

from typing import Any, Callable, Dict

_REGISTRY: Dict[str, Callable[..., Any]] = {}


def register(name: str):
    def wrap(cls):
        _REGISTRY[name] = cls
        return cls

    return wrap


def make(name: str, config: Any):
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model '{name}'; known: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name](config)


from models import geometry, nerf, texture  # noqa: E402,F401  (registration)
