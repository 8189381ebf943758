"""Shared test measurements and set-up."""
import os

import numpy as np
import pytest
import torch

DEMO_DATA = None  # a session's temporary folder for the demo scenes (set by conftest)


def demo_root(config: str) -> str:
    """Where the tests keep the demo scene a demo config trains on: its own folder under the session's temporary
    folder, rendered on first use (as ``load/demo`` and ``load/demo-dtu`` would be for a user)."""
    return os.path.join(DEMO_DATA, "demo-dtu" if "neus-demo" in config else "demo")


def demo_data(config: str) -> str:
    """The override that points a demo config at ``demo_root``, for a launch.py command line."""
    return f"dataset.root_dir={demo_root(config)}"


def max_ray_angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest angle in degrees between corresponding (N, 3) directions (atan2 form: exact near zero)."""
    a, b = a.double(), b.double()
    return float(torch.rad2deg(torch.atan2(torch.cross(a, b, dim=-1).norm(dim=-1), (a * b).sum(-1))).max())


def rays_from_orbit(n: int, generator: torch.Generator, spread: float, radius: float = 2.5):
    """(origins (n, 3), unit directions (n, 3)): from random points on a sphere of ``radius`` towards random points
    around the centre (normal, standard deviation ``spread``), drawn from ``generator`` on its device."""
    device = generator.device
    origins = torch.nn.functional.normalize(torch.randn(n, 3, generator=generator, device=device), dim=-1) * radius
    targets = torch.randn(n, 3, generator=generator, device=device) * spread
    return origins, torch.nn.functional.normalize(targets - origins, dim=-1)


def training_system(config: str, save_dir, *overrides):
    """(system, datamodule) ready for ``Trainer.fit``: a config plus dotlist overrides, outputs under save_dir."""
    from omegaconf import open_dict

    import datasets
    import systems
    from utils.config import load_config

    cfg = load_config(config, [demo_data(config), *overrides] if "-demo" in config else list(overrides))
    with open_dict(cfg):
        cfg.save_dir = str(save_dir)
    dm = datasets.make(cfg.dataset.name, cfg.dataset)
    dm.setup("fit")
    return systems.make(cfg.system.name, cfg, mode="train"), dm


def opencv_distort(xy: np.ndarray, k1, k2, p1, p2, k3=0.0) -> np.ndarray:
    """OpenCV's (COLMAP's OPENCV / FULL_OPENCV) lens on normalised image points (N, 2): ideal -> distorted."""
    x, y = xy[:, 0], xy[:, 1]
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2 * r2 + k3 * r2 ** 3
    return np.stack([x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
                     y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y], -1)


def opencv_undistort(xy_d: np.ndarray, coeffs, iterations: int = 50) -> np.ndarray:
    """Inverse of ``opencv_distort`` by fixed-point iteration (the lens written here, not pycolmap's)."""
    xy = xy_d.copy()
    for _ in range(iterations):  # fixed point of xy = xy_d - (distort(xy) - xy)
        xy = xy_d - (opencv_distort(xy, *coeffs) - xy)
    return xy


def fisheye_distort(xy: np.ndarray, k1, k2, k3, k4) -> np.ndarray:
    """OpenCV's fisheye lens (COLMAP's OPENCV_FISHEYE): theta_d = theta (1 + k1 theta^2 + ... + k4 theta^8)."""
    r = np.linalg.norm(xy, axis=1, keepdims=True)
    theta = np.arctan(r)
    t2 = theta * theta
    theta_d = theta * (1 + k1 * t2 + k2 * t2 ** 2 + k3 * t2 ** 3 + k4 * t2 ** 4)
    return xy * np.where(r > 1e-12, theta_d / np.maximum(r, 1e-12), 1.0)


def fisheye_undistort(xy_d: np.ndarray, coeffs, iterations: int = 50) -> np.ndarray:
    """Inverse of ``fisheye_distort``: theta from theta_d by fixed-point iteration, then r = tan(theta)."""
    k1, k2, k3, k4 = coeffs
    theta_d = np.linalg.norm(xy_d, axis=1, keepdims=True)
    theta = theta_d.copy()
    for _ in range(iterations):
        t2 = theta * theta
        theta = theta_d / (1 + k1 * t2 + k2 * t2 ** 2 + k3 * t2 ** 3 + k4 * t2 ** 4)
    return xy_d * np.where(theta_d > 1e-12, np.tan(theta) / np.maximum(theta_d, 1e-12), 1.0)


def import_triton_or_skip(interpreted: bool = True):
    """triton, or a skip saying why: not installed, or older than the kernels need (torch < 2.7 ships one), or,
    for tests that run the kernels in Triton's interpreter (``interpreted``, without CUDA), older than its
    interpreter needs (``models.backends.MIN_TRITON_INTERPRETER``)."""
    from models.backends import MIN_TRITON, MIN_TRITON_INTERPRETER, triton_interpreted

    triton = pytest.importorskip("triton", minversion=".".join(map(str, MIN_TRITON)),
                                 reason="triton is not installed (pip install triton; it ships with CUDA torch)")
    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if interpreted and triton_interpreted() and version < MIN_TRITON_INTERPRETER:
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run the kernels' per-ray loops (from "
                    f"{'.'.join(map(str, MIN_TRITON_INTERPRETER))} it can); test_triton_compile.py still builds "
                    "them for GPUs", allow_module_level=True)
    return triton


def fused_adam_runs_on_the_cpu() -> bool:
    """torch's fused Adam has a CPU kernel from 2.4; before, the optimiser falls back and the loss guard reads the
    loss every step (both what users of those versions get, tested on their own)."""
    try:
        torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True)
    except RuntimeError:
        return False
    return True


needs_fused_cpu_adam = pytest.mark.skipif(not fused_adam_runs_on_the_cpu(),
                                          reason=f"torch {torch.__version__} has no fused Adam on the CPU (2.4 has)")
needs_cpu_grad_scaler = pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"),
                                           reason=f"torch {torch.__version__} has no GradScaler for the CPU (2.3 has)")


def lightning_mixed_precision(scaler):
    """Lightning's 16-mixed plugin on the CPU with ``scaler`` (named MixedPrecisionPlugin before Lightning 2.2)."""
    from pytorch_lightning.plugins import precision

    plugin = getattr(precision, "MixedPrecision", None) or precision.MixedPrecisionPlugin
    return plugin("16-mixed", "cpu", scaler)


def set_sample_chunk(model, sample_chunk: int, monkeypatch) -> None:
    """Every model inside ``model`` (a NeuS background too) shades ``sample_chunk`` samples per group, not capped
    on a CPU."""
    import models.base

    monkeypatch.setattr(models.base, "points_per_call", lambda chunk, device: chunk)
    for module in model.modules():
        if isinstance(module, models.base.BaseModel):
            module.sample_chunk = sample_chunk
