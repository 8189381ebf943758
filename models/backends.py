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


_STATUS = {"tcnn": tcnn_status, "nerfacc": nerfacc_status}


def resolve(piece: str, requested: str, fast: str) -> str:
    """Backend to use for ``piece`` ('encoding', 'network', 'rendering').

    requested: 'auto', 'torch' or the name of the fast backend ``fast``.
    """
    requested = (requested or "auto").lower()
    if requested not in ("auto", "torch", fast):
        raise ConfigError(f"Unknown backend '{requested}' for {piece}; choose auto, torch or {fast}.")
    if requested == "torch":
        _announce(piece, f"{piece}: PyTorch backend (asked for)")
        return "torch"
    usable, reason = _STATUS[fast]()
    if usable:
        _announce(piece, f"{piece}: {fast} backend ({reason})")
        return fast
    if requested == fast:
        raise ConfigError(f"Backend '{fast}' was asked for {piece} but is not usable: {reason}; use backend=auto or torch.")
    _announce(piece, f"{piece}: PyTorch backend ({fast} unavailable: {reason})")
    return "torch"
