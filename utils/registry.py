"""Name -> class registries: the YAML names the class, nothing else does."""
from __future__ import annotations

from typing import Any, Callable, Dict

from utils.config import ConfigError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self.classes: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str):
        def wrap(cls):
            self.classes[name] = cls
            return cls

        return wrap

    def make(self, name: str, *args, **kwargs):
        if name not in self.classes:
            raise ConfigError(f"Unknown {self.kind} '{name}'; known: {', '.join(sorted(self.classes))}.")
        return self.classes[name](*args, **kwargs)
