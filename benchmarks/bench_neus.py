"""NeuS training-step throughput (printed, never asserted): analytic vs finite-difference normals.

    python benchmarks/bench_neus.py                       # neus-demo on the DTU-format demo scene
    python benchmarks/bench_neus.py --steps 100 --config configs/neus-demo.yaml model.num_samples_per_ray=256

Each step is the NeuS forward (SDF, normals, NeuS alpha, colour) on the
adaptive ray batch plus the colour, eikonal and (finite differences only)
curvature losses, backward and the optimiser step; analytic normals need a
second backward through the hash grid, finite differences six more SDF
evaluations per sample.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import bench_train_steps, describe_device


def neus_loss(out: dict, rays: dict) -> torch.Tensor:
    target = rays["rgb"] * rays["fg_mask"][:, None] + (1.0 - rays["fg_mask"][:, None])  # white background
    loss = 10.0 * F.mse_loss(out["comp_rgb_full"], target)
    loss = loss + 0.1 * ((out["sdf_grad_norm_samples"] - 1.0) ** 2).mean()
    if "sdf_laplace_samples" in out:
        loss = loss + 1e-4 * out["sdf_laplace_samples"].abs().mean()
    return loss


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--config", default="configs/neus-demo.yaml")
    args, overrides = parser.parse_known_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(describe_device(device))
    print(f"\nNeuS training step ({args.config}, steady state after grid warm-up, {args.steps} steps)")
    print(f"{'normals':20s} {'steps/s':>8s} {'samples/s':>10s} {'samples/step':>13s}")
    for grad_type in ("analytic", "finite_difference"):
        steps_s, samples_s, per_step = bench_train_steps(
            args.config, [f"model.geometry.grad_type={grad_type}", *overrides], args.steps, device, neus_loss)
        print(f"{grad_type:20s} {steps_s:8.2f} {samples_s:10.3e} {per_step:13.0f}")


if __name__ == "__main__":
    main()
