"""Shared pieces of the benchmarks: device sync and a timed training loop without Lightning."""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(step: Callable[[], None], device: torch.device, repeats: int) -> tuple[float, float]:
    """(seconds per call, peak MiB on a GPU, else nan) of ``step`` over ``repeats`` calls after one warm-up call."""
    step()  # compile / warm up
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(repeats):
        step()
    sync(device)
    seconds = (time.perf_counter() - t) / repeats
    return seconds, torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else float("nan")


def describe_device(device: torch.device) -> str:
    """The benchmark's device in one line; on a CPU it first keeps freed host memory, as launch.py does."""
    if device.type == "cuda":
        return f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    from utils.host_memory import keep_freed_host_memory

    return f"device: CPU, torch {torch.__version__}, threads {torch.get_num_threads()}; {keep_freed_host_memory()}"


def demo_scene_overrides(resolution: int, mesh: str | None = None) -> list:
    """Config overrides that train on the project's demo scene rendered in the Blender layout at
    ``resolution`` (rendered once into load/demo-<resolution>), or on the mesh file ``mesh`` rendered as the
    scene (``dataset.mesh``, into load/demo-<its name>-<resolution>)."""
    folder = f"demo-{os.path.splitext(os.path.basename(mesh))[0]}-{resolution}" if mesh else f"demo-{resolution}"
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "load", folder)
    return ["dataset.name=demo", "+dataset.layout=blender", f"+dataset.render_resolution={resolution}",
            f"dataset.root_dir={root}", f"dataset.img_wh=[{resolution},{resolution}]",
            *([f"+dataset.mesh={os.path.abspath(mesh)}"] if mesh else [])]


def bench_train_steps(config_path: str, overrides: list, steps: int, device: torch.device,
                      loss_fn: Callable[[dict, dict], torch.Tensor]) -> tuple[float, float, float]:
    """Steady-state (after the occupancy grid's warm-up) steps/s, samples/s and samples/step of a model.

    loss_fn(model output, rays batch on device) -> scalar loss. The ray count adapts as in training.
    """
    import datasets
    import models
    from models.base import update_module_step
    from systems.optim import make_optimizer
    from utils.config import load_config

    cfg = load_config(config_path, overrides)
    dm = datasets.make(cfg.dataset.name, cfg.dataset)
    dm.setup("fit")
    data = dm.train_data
    model = models.make(cfg.model.name, cfg.model).to(device).train()
    opt = make_optimizer(cfg.system.optimizer, model)
    n_rays, target = int(cfg.model.train_num_rays), int(cfg.model.train_num_rays) * int(cfg.model.num_samples_per_ray)
    warmup = int(cfg.model.get("grid_warmup_steps", 256)) + 50
    samples, t0 = 0, None
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            t0, samples = time.perf_counter(), 0
        update_module_step(model, 0, step)
        rays = {k: v.to(device) for k, v in data.train_rays(n_rays, True).items()}
        out = model(rays["rays_o"], rays["rays_d"])
        loss = loss_fn(out, rays)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n = out["num_samples"] + out.get("num_samples_bg", 0)
        samples += n
        n_rays = min(int(n_rays * 0.9 + 0.1 * n_rays * target / max(n, 1)), int(cfg.model.max_train_num_rays))
    sync(device)
    dt = time.perf_counter() - t0
    return steps / dt, samples / dt, samples / steps
