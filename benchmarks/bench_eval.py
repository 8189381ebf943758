"""Wall time of scoring a mesh with the DTU protocol (printed only).

    python benchmarks/bench_eval.py                  # a 20 mm object lost inside a 35 mm background shell
    python benchmarks/bench_eval.py --gt-points 2000000 --shell-radius 50

The ground truth is a 20 mm sphere sampled with ``--gt-points`` points, in DTU's millimetres. The mesh is
what a short NeuS run without masks can export: the object absorbed by the background, a closed surface of
``--shell-radius`` mm around it. Completeness then asks, for every ground-truth point, for its nearest mesh
point from inside a surface that is everywhere about as far: the worst case of a k-d tree, which made SciPy's
default tree slow. Printed: the time to sample the mesh at 0.2 mm, the nearest-neighbour query of 20k
ground-truth points with SciPy's default tree and with ``utils.mesh_metrics.nearest_tree``, and the whole
score.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.mesh_metrics import dtu_protocol, nearest_tree, sample_surface, uniform_surface_points  # noqa: E402


def scene(gt_points: int, shell_radius: float):
    import trimesh

    centre = np.array([3.0, -2.0, 650.0])
    mesh = trimesh.creation.icosphere(subdivisions=6, radius=shell_radius)
    mesh.vertices += centre
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=20.0)
    gt = sample_surface(sphere.vertices + centre, sphere.faces, gt_points, seed=1)
    lo, hi = centre - shell_radius - 10, centre + shell_radius + 10
    shape = np.ceil((hi - lo) / 4.0).astype(int) + 1
    truth = (gt, np.ones(shape, bool), np.stack([lo, hi]), 4.0, np.array([0.0, 0.0, 1.0, -(lo[2] - 1.0)]))
    return mesh, truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gt-points", type=int, default=400_000)
    parser.add_argument("--shell-radius", type=float, default=35.0)
    args = parser.parse_args()
    from scipy.spatial import cKDTree

    mesh, truth = scene(args.gt_points, args.shell_radius)
    t = time.perf_counter()
    points = uniform_surface_points(np.asarray(mesh.vertices), np.asarray(mesh.faces), 0.2)
    sampled = time.perf_counter() - t
    print(f"mesh: {len(mesh.faces)} faces, {mesh.area:.0f} mm^2; {len(points)} points at 0.2 mm in {sampled:.1f} s")
    queries = truth[0][:20_000]
    for name, build in (("scipy default", cKDTree), ("nearest_tree", nearest_tree)):
        t = time.perf_counter()
        tree = build(points)
        built = time.perf_counter() - t
        t = time.perf_counter()
        tree.query(queries, workers=-1)
        print(f"{name:>14s}: build {built:.1f} s, 20k ground-truth queries {time.perf_counter() - t:.2f} s")
    t = time.perf_counter()
    scores = dtu_protocol(points, *truth)
    print(f"dtu_protocol: {time.perf_counter() - t:.1f} s (accuracy {scores['accuracy']:.3f}, completeness "
          f"{scores['completeness']:.3f} mm, {args.gt_points} ground-truth points)")


if __name__ == "__main__":
    main()
