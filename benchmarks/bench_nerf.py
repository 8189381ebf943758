"""Throughput figures (printed, never asserted): hash-grid encoding and NeRF training steps.

    python benchmarks/bench_nerf.py            # torch backend on this machine, plus any fast backend present
    python benchmarks/bench_nerf.py --steps 100 --points 262144
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from common import bench_train_steps, describe_device, sync
from models import backends
from models.encodings import HashGrid


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=2 ** 18)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--config", default="configs/nerf-demo.yaml")
    args, overrides = parser.parse_known_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(describe_device(device))
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
    steps_s, samples_s, per_step = bench_train_steps(args.config, overrides, args.steps, device,
                                                     lambda out, rays: F.smooth_l1_loss(out["comp_rgb"], rays["rgb"]))
    print(f"steps/s {steps_s:.2f}   samples/s {samples_s:.3e}   samples/step {per_step:.0f}")


if __name__ == "__main__":
    main()
