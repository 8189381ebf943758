"""System registry: `systems.make(name, ...)` builds the class a config names."""
from utils.registry import Registry

_registry = Registry("system")
register = _registry.register
make = _registry.make

from systems import nerf, neus  # noqa: E402,F401  (registration)
