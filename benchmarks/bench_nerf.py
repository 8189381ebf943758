"""Throughput figures (printed, never asserted): hash-grid encoding and NeRF training steps.

    python benchmarks/bench_nerf.py            # torch backend on this machine, plus any fast backend present
    python benchmarks/bench_nerf.py --steps 100 --points 262144
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import backends  # noqa: E402
from models.encodings import HashGrid  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_encoding(backend: str, device: torch.device, n_points: int, config: dict, repeats: int = 5):
    grid = HashGrid(3, config, backend=backend).to(device)
    x = torch.rand(n_points, 3, device=device)
    with torch.no_grad():
        grid(x)
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        for _ in range(repeats):
            grid(x)
    sync(device)
    fwd = repeats * n_points / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(repeats):
        grid(x).square().sum().backward()
    sync(device)
    fwd_bwd = repeats * n_points / (time.perf_counter() - t)
    return fwd, fwd_bwd


def bench_nerf_steps(config_path: str, overrides: list, steps: int, device: torch.device):
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
    warmup = int(cfg.model.get("grid_warmup_steps", 256)) + 50  # time the steady state, after grid warm-up
    samples, t0 = 0, None
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            t0, samples = time.perf_counter(), 0
        update_module_step(model, 0, step)
        rays = {k: v.to(device) for k, v in data.train_rays(n_rays, True).items()}
        out = model(rays["rays_o"], rays["rays_d"])
        loss = torch.nn.functional.smooth_l1_loss(out["comp_rgb"], rays["rgb"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        n = int(out["num_samples"])
        samples += n
        n_rays = min(int(n_rays * 0.9 + 0.1 * n_rays * target / max(n, 1)), int(cfg.model.max_train_num_rays))
    sync(device)
    dt = time.perf_counter() - t0
    return steps / dt, samples / dt, samples / steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=2 ** 18)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--config", default="configs/nerf-demo.yaml")
    args, overrides = parser.parse_known_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    encoders = ["torch"] + (["tcnn"] if backends.tcnn_status()[0] else [])
    configs = {
        "demo grid (L=8, T=2^16)": dict(n_levels=8, n_features_per_level=2, log2_hashmap_size=16, base_resolution=16,
                                        per_level_scale=1.486),
        "instant-ngp grid (L=16, T=2^19)": dict(n_levels=16, n_features_per_level=2, log2_hashmap_size=19,
                                                base_resolution=16, per_level_scale=1.447269237440378),
    }
    print(f"\nhash-grid encoding, {args.points} points")
    print(f"{'grid':34s} {'backend':8s} {'fwd pts/s':>12s} {'fwd+bwd pts/s':>14s}")
    for name, cfg in configs.items():
        for backend in encoders:
            fwd, fb = bench_encoding(backend, device, args.points, cfg)
            print(f"{name:34s} {backend:8s} {fwd:12.3e} {fb:14.3e}")
    print(f"\nNeRF training step ({args.config}, steady state after grid warm-up, {args.steps} steps)")
    steps_s, samples_s, per_step = bench_nerf_steps(args.config, overrides, args.steps, device)
    print(f"steps/s {steps_s:.2f}   samples/s {samples_s:.3e}   samples/step {per_step:.0f}")


if __name__ == "__main__":
    main()
