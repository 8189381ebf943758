"""Wall time and memory of export.textured's steps on a mesh of a known size (printed only).

    python benchmarks/bench_texture.py                          # the demo surface at 384^3: 1.4M faces
    python benchmarks/bench_texture.py --resolution 512 --faces 200000 --size 4096

The mesh is the demo scene's true surface, marching cubes at ``--resolution``. ``utils.mesh_texture.textured_mesh``
decimates it to ``--faces`` and makes a ``--size`` texture; its steps are timed as it calls them. The colours come
from a NumPy function of position, so the figure for them is the texel bookkeeping alone: a model's
``surface_colours`` adds its own field queries (the log of a real export shows how many texels).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils.mesh_texture as mesh_texture  # noqa: E402
from datasets.synthetic import demo_surface  # noqa: E402

STEPS = {"decimate": "decimate (fast-simplification)", "unwrap": "UV charts and packing (xatlas)",
         "rasterize_uv": "texel -> face table", "pad_charts": "chart padding"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=384, help="marching-cubes points a side")
    parser.add_argument("--faces", type=int, default=100_000, help="export.texture_faces")
    parser.add_argument("--size", type=int, default=2048, help="export.texture_size")
    args = parser.parse_args()

    vertices, faces = demo_surface(args.resolution)
    seconds = {}
    for name in STEPS:  # each step timed where textured_mesh calls it
        def timed(*a, _step=getattr(mesh_texture, name), _name=name, **k):
            start = time.perf_counter()
            result = _step(*a, **k)
            seconds[_name] = seconds.get(_name, 0.0) + time.perf_counter() - start
            return result
        setattr(mesh_texture, name, timed)
    texels = []

    def colour(points, normals):
        texels.append(len(points))
        return 0.5 + 0.5 * np.sin(8 * points)

    start = time.perf_counter()
    mesh = mesh_texture.textured_mesh(vertices, faces, colour, args.size, args.faces)
    total = time.perf_counter() - start
    print(f"mesh: {len(faces)} faces (demo surface at {args.resolution}^3) -> {len(mesh.faces)} faces, "
          f"{args.size}x{args.size} texture, {sum(texels)} texels covered")
    for name, what in STEPS.items():
        print(f"{what:<32} {seconds[name]:8.2f} s")
    print(f"{'total':<32} {total:8.2f} s")
    print(f"peak memory (this process) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
