"""Train configs on the demo scene(s) and print one quality table (figures, never asserted).

    python benchmarks/quality.py                                   # nerf-demo and neus-demo on this machine
    python benchmarks/quality.py --configs configs/neus-demo.yaml -- trainer.max_steps=3000
    python benchmarks/quality.py --configs configs/neus-blender.yaml -- dataset.scene=lego   # any scene

Each config runs through launch.py (train, then test and export) in a
temporary experiment folder; the table has steps, wall time, PSNR/SSIM on the
held-out views and, where the data knows its true surface, the mesh's
Chamfer distance (absolute and as % of the bounding-box diagonal) and F-score
(at 1 % of the diagonal). Arguments after ``--`` are overrides for every config.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/neus-colmap.yaml cut to CPU size, the demo's sampling and smaller grids: the capture tests and
# bench_poses.py add the image size, the run's length and the mesh's resolution
NEUS_COLMAP_CPU = [
    "dataset.holdout_every=16", "dataset.n_test_traj_steps=2",
    "model.num_samples_per_ray=64", "model.max_train_num_rays=512", "+model.grid_resolution=32",
    "model.num_samples_per_ray_bg=16", "model.ray_chunk=4096",
    "model.geometry.xyz_encoding_config.n_levels=8", "model.geometry.xyz_encoding_config.log2_hashmap_size=15",
    "model.geometry.xyz_encoding_config.base_resolution=16", "model.geometry.xyz_encoding_config.per_level_scale=1.486",
    "model.geometry_bg.xyz_encoding_config.n_levels=4", "model.geometry_bg.xyz_encoding_config.log2_hashmap_size=12",
    "model.geometry_bg.xyz_encoding_config.base_resolution=8",
    "trainer.limit_val_batches=1", "system.warmup_steps=20", "trainer.precision=32",
]


def run_config(config: str, overrides: list[str], exp_dir: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), "--config", config, "--train",
                           "--exp_dir", exp_dir, "--runs_dir", os.path.join(exp_dir, "runs"), *overrides],
                          cwd=ROOT, capture_output=True, text=True)
    row = {"config": os.path.basename(config), "wall_s": time.perf_counter() - start}
    if proc.returncode != 0:
        row["error"] = (proc.stdout + proc.stderr).strip().splitlines()[-1]
        return row
    trial = max(glob.glob(os.path.join(exp_dir, "*", "*@*")), key=os.path.getmtime)
    rows = list(csv.DictReader(open(os.path.join(trial, "csv_logs", "metrics.csv"))))
    tested = [r for r in rows if r.get("test/psnr")]
    if tested:
        row["psnr"], row["ssim"] = float(tested[-1]["test/psnr"]), float(tested[-1]["test/ssim"])
    tests = glob.glob(os.path.join(trial, "save", "it*-test"))
    if tests:  # it{step}-test: the step the tested weights are at
        row["steps"] = int(os.path.basename(tests[0])[2:-len("-test")])
    metrics = glob.glob(os.path.join(trial, "save", "*-metrics.json"))
    if metrics:
        scores = json.load(open(metrics[0]))
        row.update({k: scores[k] for k in ("chamfer", "chamfer_percent_of_diagonal", "fscore") if k in scores})
    return row


def demo_scene_and_copy(tmp: str, resolution: int, copy: str) -> tuple[str, str, list[str]]:
    """The DTU-layout demo scene rendered into ``tmp``/rendered at ``resolution`` pixels a side, a copy of it in
    ``tmp``/``copy`` (for a benchmark to alter), and the overrides that train neus-demo at that size."""
    from datasets.synthetic import ensure_demo_scene

    rendered, altered = os.path.join(tmp, "rendered"), os.path.join(tmp, copy)
    ensure_demo_scene(rendered, resolution, "dtu")
    shutil.copytree(rendered, altered)
    size = [f"dataset.render_resolution={resolution}", f"dataset.img_wh=[{resolution},{resolution}]"]
    return rendered, altered, size


# the figures of a training run in a benchmark's table: row key, title, format (the title's width)
RUN_COLUMNS = (("psnr", "PSNR", "7.2f"), ("chamfer_percent_of_diagonal", "Chamfer %", "10.3f"),
               ("fscore", "F-score", "8.3f"))


def print_runs(labels: dict[str, int], runs: list[tuple[tuple[str, ...], dict]],
               extra: tuple[tuple[str, str, str], ...] = ()) -> None:
    """The table of a benchmark's runs: one line each, its labels (title -> width) and seed, steps, wall time,
    test PSNR, Chamfer % and F-score, then the ``extra`` columns (key, title, format); a failed run says why.
    Runs with the same labels (several seeds) are followed by their mean and range (max - min) of each figure:
    at CPU size a second seed can move a Chamfer figure by a few tenths of a percent."""
    columns = RUN_COLUMNS + tuple(extra)
    print("\n" + " ".join(f"{title:{width}s}" for title, width in labels.items())
          + f" {'seed':>5s} {'steps':>6s} {'wall':>7s} " + " ".join(f"{title:>{len(format(0.0, spec))}s}"
                                                              for _, title, spec in columns))

    def line(label, seed, row):
        cells = [f"{format(row[key], spec) if key in row else '-':>{len(format(0.0, spec))}s}"
                 for key, _, spec in columns]
        print(" ".join(f"{text:{width}s}" if k == 0 else f"{text:>{width}s}"
                       for k, (text, width) in enumerate(zip(label, labels.values())))
              + f" {seed:>5s} {int(row.get('steps', 0)):6d} {row['wall_s'] / 60:6.1f}m " + " ".join(cells))

    groups: dict[tuple[str, ...], list[dict]] = {}
    for label, row in runs:
        groups.setdefault(tuple(label), []).append(row)
    for label, rows in groups.items():
        for row in rows:
            if "error" in row:
                print(" ".join(label) + f" seed {row.get('seed', '-')} failed: {row['error']}")
            else:
                line(label, str(row.get("seed", "-")), row)
        done = [row for row in rows if "error" not in row]
        if len(done) > 1:
            keys = [key for key in ("steps", "wall_s", *(key for key, _, _ in columns))
                    if all(key in row for row in done)]
            line(label, "mean", {key: sum(row[key] for row in done) / len(done) for key in keys})
            line(label, "range", {key: max(row[key] for row in done) - min(row[key] for row in done)
                                  for key in keys})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", default=["configs/nerf-demo.yaml", "configs/neus-demo.yaml"])
    args, rest = parser.parse_known_args()
    overrides = [a for a in rest if a != "--"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="nsr-quality-") as exp_dir:
        for config in args.configs:
            print(f"running {config} ...", flush=True)
            rows.append(run_config(config, overrides, os.path.join(exp_dir, str(len(rows)))))
    print(f"\n{'config':22s} {'steps':>6s} {'wall':>8s} {'PSNR':>7s} {'SSIM':>6s} {'Chamfer':>9s} "
          f"{'% diag':>7s} {'F-score':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:22s} failed: {r['error']}")
            continue

        def fmt(key, spec):
            return format(r[key], spec) if key in r else "-"
        print(f"{r['config']:22s} {r.get('steps', 0):6d} {r['wall_s'] / 60:7.1f}m {fmt('psnr', '7.2f'):>7s} "
              f"{fmt('ssim', '6.3f'):>6s} {fmt('chamfer', '9.4g'):>9s} {fmt('chamfer_percent_of_diagonal', '7.2f'):>7s} "
              f"{fmt('fscore', '8.3f'):>8s}")


if __name__ == "__main__":
    main()
