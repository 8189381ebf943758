"""System registry: ``systems.make(config.system.name, config)``."""
from __future__ import annotations

from typing import Any, Callable, Dict

_REGISTRY: Dict[str, Callable[..., Any]] = {}


def register(name: str):
    def wrap(cls):
        _REGISTRY[name] = cls
        return cls

    return wrap


def make(name: str, config: Any, **kwargs):
    if name not in _REGISTRY:
        raise ValueError(f"Unknown system '{name}'; known: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name](config, **kwargs)


from systems import nerf  # noqa: E402,F401  (registration)
