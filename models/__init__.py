"""Model registry: `models.make(name, ...)` builds the class a config names."""
from utils.registry import Registry

_registry = Registry("model")
register = _registry.register
make = _registry.make

from models import geometry, nerf, neus, texture  # noqa: E402,F401  (registration)
