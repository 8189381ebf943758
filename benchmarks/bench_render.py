"""Peak memory and wall time to render one image, per config (printed only).

    python benchmarks/bench_render.py                      # the shipped configs, 500x375, on this machine
    python benchmarks/bench_render.py --size 800 800 --configs configs/nerf-blender.yaml -- model.sample_chunk=262144

An image is rendered as validation, test and the video render it (eval mode,
no gradient), from a camera 2.5 radii from the centre, by a model built from
the config and not trained. Two states of the occupancy grid:

- ``full``: every cell occupied, as before the grid's first update (a
  validation early in training, an untrained model): each ray takes every
  step the config's ``num_samples_per_ray`` allows, the worst case;
- ``sphere``: only the cells within half the radius occupied, about what a
  trained object leaves.

Each case runs in a fresh process; "peak" is the growth of the process's
resident memory (CPU) or of torch's allocated memory (GPU) while rendering.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import describe_device  # noqa: E402  (also puts the project on the path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["configs/nerf-colmap.yaml", "configs/neus-colmap.yaml", "configs/nerf-blender.yaml",
           "configs/neus-dtu.yaml"]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def render_once(config: str, width: int, height: int, grid: str, device: str, overrides: list) -> dict:
    import numpy as np
    import torch

    import models
    from datasets.rays import get_rays, image_directions, opencv_to_opengl
    from datasets.synthetic import look_at
    from models.occupancy import OccupancyGrid
    from utils.config import load_config

    torch.manual_seed(0)
    cfg = load_config(os.path.join(ROOT, config), list(overrides))
    model = models.make(cfg.model.name, cfg.model).to(device).eval()
    r = float(cfg.model.radius)
    for occupancy in [m for m in model.modules() if isinstance(m, OccupancyGrid)]:
        occupancy.binaries.fill_(grid == "full")
        if grid == "sphere":  # level 0's cells within half its box's half-width of the centre
            res = occupancy.resolution
            cell = torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing="ij"), -1).float()
            occupancy.binaries[0] = (((cell + 0.5) / res * 2 - 1).norm(dim=-1) < 0.5).to(device)
    c2w = opencv_to_opengl(torch.from_numpy(look_at(np.array([2.5, 0.3, 0.8]) * r, np.zeros(3))).float())
    focal = 0.9 * width
    intr = torch.tensor([focal, focal, width / 2, height / 2])
    rays_o, rays_d = get_rays(image_directions(width, height, intr), c2w[:3, :4])
    rays_o, rays_d = rays_o.to(device), rays_d.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    before = rss_mib()
    t = time.perf_counter()
    with torch.no_grad():
        out = model(rays_o, rays_d)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    samples = int(out["num_samples"]) + int(out.get("num_samples_bg", 0))
    return {"seconds": time.perf_counter() - t, "peak_mib": peak, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--size", nargs=2, type=int, default=[500, 375], metavar=("W", "H"))
    parser.add_argument("--grids", nargs="+", default=["sphere", "full"], choices=["sphere", "full"])
    parser.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # (config, grid): run one case in this process
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    w, h = args.size
    if args.one:
        print(json.dumps(render_once(args.one[0], w, h, args.one[1], args.device, args.overrides)))
        return
    import torch

    print(f"{describe_device(torch.device(args.device))}, image {w}x{h}, overrides {args.overrides or 'none'}")
    print(f"{'config':<34}{'grid':<8}{'samples':>12}{'seconds':>10}{'peak MiB':>10}")
    for config in args.configs:
        for grid in args.grids:
            cmd = [sys.executable, __file__, "--one", config, grid, "--size", str(w), str(h), "--device",
                   args.device, "--", *args.overrides]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
                print(f"{config:<34}{grid:<8} failed: {tail[:120]} (status {done.returncode})")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{config:<34}{grid:<8}{row['samples']:>12,}{row['seconds']:>10.1f}{row['peak_mib']:>10.0f}")


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
