"""Training wall time and quality per encoding backend (printed, never asserted).

    python benchmarks/bench_train.py                         # NeRF + NeuS on the demo scene, 800x800 on a GPU
    python benchmarks/bench_train.py --resolution 128 --steps 500 -- model.num_samples_per_ray=64   # a CPU
    python benchmarks/bench_train.py --configs configs/neus-blender.yaml --scene-root load/nerf_synthetic/lego
    python benchmarks/bench_train.py --mesh ../shared/data/bunny.obj   # a real scan rendered as the scene

The project renders its demo scene in the Blender/NeRF-synthetic layout at
``--resolution`` (once, into load/demo-<res>) and trains nerf-blender and
neus-blender on it for ``--steps`` steps through launch.py, once per hash-grid
backend usable here (torch, triton, tcnn). The table: steps, wall time
(training, test and export), steps/s over the whole run, held-out PSNR, and
the mesh's Chamfer distance to the known surface as % of its diagonal.
``--scene-root`` trains on any Blender-format scene instead (no Chamfer); ``--mesh`` renders a mesh file
(y-up, as instant-ngp's bunny) in the demo's place and scores the meshes against it.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import demo_scene_overrides, describe_device  # noqa: E402
from quality import run_config  # noqa: E402

from models import backends  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["configs/nerf-blender.yaml", "configs/neus-blender.yaml"])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--resolution", type=int, help="demo render size (default 800 on a GPU, 128 on a CPU)")
    parser.add_argument("--scene-root", help="a Blender-format scene to use instead of the demo")
    parser.add_argument("--mesh", help="a mesh file (y-up) to render as the scene instead of the demo")
    parser.add_argument("--backends", nargs="+", choices=["torch", "triton", "tcnn"],
                        help="hash-grid backends to run (default: every one usable here)")
    args, rest = parser.parse_known_args()
    overrides = [a for a in rest if a != "--"]
    cuda = torch.cuda.is_available()
    print(describe_device(torch.device("cuda" if cuda else "cpu")))
    res = args.resolution or (800 if cuda else 128)
    if args.scene_root:
        data = [f"dataset.root_dir={args.scene_root}"]
    else:
        data = demo_scene_overrides(res, args.mesh)
    present = ["torch"] + [b for b in ("triton", "tcnn") if backends._STATUS[b]()[0]]
    for name in ("triton", "tcnn"):
        if name not in present:
            print(f"{name}: not measured ({backends._STATUS[name]()[1]})")
    if args.backends:
        present = [b for b in present if b in args.backends]
    rows = []
    with tempfile.TemporaryDirectory(prefix="nsr-bench-train-") as exp_dir:
        for config in args.configs:
            for backend in present:
                print(f"running {config} with the {backend} hash grid ...", flush=True)
                row = run_config(config, [*data, f"trainer.max_steps={args.steps}",
                                          f"trainer.val_check_interval={args.steps}",
                                          f"+model.geometry.xyz_encoding_config.backend={backend}", *overrides],
                                 os.path.join(exp_dir, str(len(rows))))
                row["backend"] = backend
                rows.append(row)
    print(f"\n{'config':20s} {'backend':8s} {'steps':>6s} {'wall':>8s} {'steps/s':>8s} {'PSNR':>7s} {'% diag':>7s}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:20s} {r['backend']:8s} failed: {r['error']}")
            continue
        steps = r.get("steps", 0)
        chamfer = format(r["chamfer_percent_of_diagonal"], "7.2f") if "chamfer_percent_of_diagonal" in r else "-"
        psnr = format(r["psnr"], "7.2f") if "psnr" in r else "-"
        print(f"{r['config']:20s} {r['backend']:8s} {steps:6d} {r['wall_s'] / 60:7.2f}m {steps / r['wall_s']:8.2f} "
              f"{psnr:>7s} {chamfer:>7s}")


if __name__ == "__main__":
    main()
