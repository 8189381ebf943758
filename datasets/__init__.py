"""Dataset registry: `datasets.make(name, ...)` builds the class a config names."""
from utils.registry import Registry

_registry = Registry("dataset")
register = _registry.register
make = _registry.make

from datasets import blender, colmap, demo, dtu  # noqa: E402,F401  (registration)
