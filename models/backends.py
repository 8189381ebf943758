"""Which implementation runs each accelerated piece.

Every piece has a pure-PyTorch reference (``torch``) that runs everywhere.
``auto`` picks the fastest backend that is installed *and* works on the
current device, and says which in the log, once per piece. A backend that
fails to import or to build its kernels falls back to ``torch`` with one log
line; asking explicitly for an unusable backend is an error.
"""
from __future__ import annotations

import functools
import logging

import torch

from utils.config import ConfigError

log = logging.getLogger("nsr")

_announced: set = set()


def _announce(piece: str, message: str) -> None:
    if (piece, message) not in _announced:
        _announced.add((piece, message))
        log.info(message)


@functools.lru_cache(maxsize=None)
def tcnn_status() -> tuple[bool, str]:
    """(usable, reason) for tiny-cuda-nn on this machine."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import tinycudann  # noqa: F401
    except Exception as err:  # ImportError, or a broken build raising OSError/RuntimeError
        return False, f"tinycudann not importable ({type(err).__name__}: {err})"
    return True, "tinycudann importable"


@functools.lru_cache(maxsize=None)
def nerfacc_status() -> tuple[bool, str]:
    """(usable, reason) for nerfacc's CUDA kernels (built on first use by nerfacc 0.5)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import nerfacc
        from nerfacc.volrend import render_weight_from_density

        t = torch.tensor([0.0, 0.1], device="cuda")
        render_weight_from_density(
            t, t + 0.1, torch.ones(2, device="cuda"), ray_indices=torch.zeros(2, dtype=torch.long, device="cuda"), n_rays=1
        )
        return True, f"nerfacc {nerfacc.__version__}"
    except Exception as err:
        return False, f"nerfacc not usable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"


def triton_interpreted() -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on the CPU: slow, for tests only."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


MIN_TRITON = (3, 3)  # tuples inside kernels (Triton 3.2 compiles none of them)
# loops bounded by a reduced value (a block's longest ray): 3.6's interpreter stops at them ("only 0-dimensional
# arrays can be converted to Python scalars"); compiled for a GPU they build from 3.3
MIN_TRITON_INTERPRETER = (3, 7)


@functools.lru_cache(maxsize=None)
def triton_status(explicit: bool = False) -> tuple[bool, str]:
    """(usable, reason) for this project's Triton kernels (Triton ships with PyTorch's CUDA wheels).

    Without CUDA only an explicit request under the interpreter counts ('auto' never picks the interpreter)."""
    if not torch.cuda.is_available() and not (explicit and triton_interpreted()):
        return False, "no CUDA device"
    try:
        import triton

        version = tuple(int(part) for part in triton.__version__.split(".")[:2])
        if version < MIN_TRITON:
            return False, (f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))} (the "
                           "kernels build tuples); PyTorch >= 2.7 ships a newer one")
        if triton_interpreted() and version < MIN_TRITON_INTERPRETER:
            return False, (f"triton {triton.__version__}'s interpreter cannot run the kernels' per-ray loops (from "
                           f"{'.'.join(map(str, MIN_TRITON_INTERPRETER))} it can)")
        from models import triton_hashgrid, triton_mlp, triton_rendering, triton_sdf_network

        device = "cuda" if torch.cuda.is_available() and not triton_interpreted() else "cpu"
        triton_hashgrid.selftest(device)
        triton_rendering.selftest(device)
        triton_mlp.selftest(device)
        triton_sdf_network.selftest(device)
        return True, f"triton {triton.__version__}{', interpreter' if triton_interpreted() else ''}"
    except Exception as err:  # ImportError, or a kernel that fails to compile on this GPU
        return False, f"triton not usable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"


_STATUS = {"tcnn": tcnn_status, "nerfacc": nerfacc_status, "triton": triton_status}


# the config key that chooses each piece's backend, as errors name it
OPTION = {"encoding": "xyz_encoding_config.backend", "network": "mlp_network_config.backend",
          "rendering": "model.rendering_backend"}


def resolve(piece: str, requested: str, fast, auto=None) -> str:
    """Backend to use for ``piece`` ('encoding', 'network', 'rendering').

    fast: the accelerated backend's name, or a tuple of them in order of preference ('auto' takes the first
    usable one). requested: 'auto', 'torch' or one of ``fast``. auto: the names in ``fast`` that 'auto' may
    pick (all of them when None); the others run only when asked for by name.
    """
    fast = (fast,) if isinstance(fast, str) else tuple(fast)
    auto = fast if auto is None else ((auto,) if isinstance(auto, str) else tuple(auto))
    requested = (requested or "auto").lower()
    if requested not in ("auto", "torch", *fast):
        raise ConfigError(f"Unknown backend '{requested}' for {piece} ({OPTION[piece]}); choose auto, torch or "
                          f"{' or '.join(fast)}.")
    if requested == "torch":
        _announce(piece, f"{piece}: PyTorch backend (asked for)")
        return "torch"
    reasons = []
    for name in auto if requested == "auto" else (requested,):
        usable, reason = _STATUS[name](True) if name == "triton" and requested == name else _STATUS[name]()
        if usable:
            _announce(piece, f"{piece}: {name} backend ({reason})")
            return name
        if requested == name:
            raise ConfigError(f"Backend '{name}' was asked for {piece} but is not usable: {reason}; set "
                              f"{OPTION[piece]}=auto or torch.")
        reasons.append(f"{name} unavailable: {reason}")
    _announce(piece, f"{piece}: PyTorch backend ({'; '.join(reasons)})")
    return "torch"
