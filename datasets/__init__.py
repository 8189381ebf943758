"""Dataset registry: ``datasets.make(config.dataset.name, config.dataset)``."""
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
        raise ValueError(f"Unknown dataset '{name}'; known: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name](config)


from datasets import blender, demo  # noqa: E402,F401  (registration)
