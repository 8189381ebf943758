"""The benchmarks run and print their figures, here on a CPU at toy sizes.

They are what a GPU session (lent rarely, for 15 minutes) runs through ``benchmarks/gpu_stages.sh``, so a
refactor that breaks one, or a config that lacks a key a stage overrides, must show here rather than there:
``model.rendering_backend``, which the render stage sets, was missing from every NeuS config. Figures are read
back and checked to be positive and finite; their size is never asserted (speed is for the benchmarks to print).
"""
import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["+model.grid_warmup_steps=4", "model.train_num_rays=64", "model.max_train_num_rays=128"]


def bench(script: str, *args) -> str:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def positive(figures) -> bool:
    return bool(figures) and all(math.isfinite(float(f)) and float(f) > 0 for f in figures)


@pytest.mark.slow
def test_step_benchmark_with_the_render_stage_s_override(tmp_path):
    out = bench("bench_step.py", "--configs", "configs/nerf-blender.yaml", "configs/neus-blender.yaml",
                "--demo-resolution", 32, "--steps", 3, "--profile-steps", 1, "--", "model.rendering_backend=torch",
                f"dataset.root_dir={tmp_path / 'demo-32'}", *TOY, "+model.grid_resolution=16")
    rates = re.findall(r"^steps/s ([\d.]+) over 3 steps after 24, median step ([\d.]+) ms", out, re.M)
    assert len(rates) == 2 and all(positive(r) for r in rates), out[-3000:]
    assert len(re.findall(r"^host syncs per step: mean [\d.]+, max \d+; drains mean [\d.]+; device operators per "
                          r"step .*: mean \d+$", out, re.M)) == 2, out[-3000:]
    assert out.count("top operators over 1 steps by self_cpu_time_total:") == 2


@pytest.mark.slow
def test_train_benchmark_prints_wall_time_psnr_and_chamfer(tmp_path):
    out = bench("bench_train.py", "--resolution", 32, "--steps", 20, "--backends", "torch",
                "--scene-root", tmp_path / "demo-32", "--", "dataset.name=demo", "+dataset.layout=blender",
                "+dataset.render_resolution=32", "dataset.img_wh=[32,32]", "model.num_samples_per_ray=32",
                "model.geometry.isosurface.resolution=32", "+system.lpips=false", *TOY)
    rows = re.findall(r"^(nerf|neus)-blender\.yaml +torch +20 +([\d.]+)m +([\d.]+) +([\d.]+) +(\S+)$", out, re.M)
    assert [r[0] for r in rows] == ["nerf", "neus"], out[-3000:]
    assert all(positive(r[1:4]) for r in rows)
    assert positive([rows[1][4]])  # NeuS's mesh scored against the demo's true surface (% of the diagonal)


@pytest.mark.slow
def test_encoding_mlp_and_render_benchmarks_print_their_tables():
    out = bench("bench_encoding.py", "--log2-points", 10, "--repeats", 1)
    rows = re.findall(r"^(torch|torch-pm) +1024 +(\S+) \( *\S+\) +(\S+) \( *\S+\) +(\S+) \( *\S+\)$", out, re.M)
    assert [r[0] for r in rows] == ["torch", "torch-pm"] and all(positive(r[1:]) for r in rows), out
    out = bench("bench_mlp.py", "--log2-rows", 8, "--repeats", 1)
    rows = re.findall(r"^(colour|density|sdf) .* torch +256 +(\S+) \( *\S+\) +(\S+) \( *\S+\)$", out, re.M)
    assert [r[0] for r in rows] == ["colour", "density", "sdf"] and all(positive(r[1:]) for r in rows), out
    out = bench("bench_render.py", "--size", 16, 16, "--grids", "sphere", "--configs", "configs/neus-blender.yaml")
    rows = re.findall(r"^configs/neus-blender\.yaml +sphere +([\d,]+) +([\d.]+) +(\d+)$", out, re.M)
    assert len(rows) == 1 and int(rows[0][0].replace(",", "")) > 0, out


@pytest.mark.slow
def test_exposure_benchmark_trains_with_the_correction_off_and_on():
    out = bench("bench_exposure.py", "--resolution", 32, "--cases", "nomask-changed", "--seeds", 7, "--",
                "trainer.max_steps=20",
                "model.geometry.isosurface.resolution=32", "dataset.n_test_traj_steps=2")
    gains = re.search(r"^exposure gains of the 42 training images: ([\d.]+) to ([\d.]+)$", out, re.M)
    assert gains and 0.5 < float(gains.group(1)) < 1 < float(gains.group(2)) < 2, out
    rows = re.findall(r"^nomask-changed +(off|on) +7 +20 +[\d.]+m +([\d.]+) +([\d.]+) +([\d.]+)$", out, re.M)
    assert [r[0] for r in rows] == ["off", "on"] and all(positive(r[1:3]) for r in rows), out


def test_benchmark_tables_give_each_seed_a_line_then_the_mean_and_range_of_each_figure(capsys):
    """print_runs: a case run with several seeds gets their mean and spread; a case run once gets neither; a failed
    run says why and is left out of its case's mean."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from quality import print_runs

    runs = [(("moved", "off"), {"seed": 1, "steps": 20, "wall_s": 60.0, "psnr": 20.0,
                                "chamfer_percent_of_diagonal": 1.0, "fscore": 0.5, "turn_left": 0.9}),
            (("moved", "off"), {"seed": 2, "steps": 20, "wall_s": 120.0, "psnr": 22.0,
                                "chamfer_percent_of_diagonal": 1.5, "fscore": 0.4, "turn_left": 0.9}),
            (("moved", "off"), {"seed": 3, "wall_s": 1.0, "error": "ConfigError: no such key"}),
            (("exact", "lr 0.001"), {"seed": 1, "steps": 20, "wall_s": 60.0, "psnr": 27.0, "fscore": 0.9})]
    print_runs({"cameras": 14, "refinement": 10}, runs, extra=(("turn_left", "turn left", "10.2f"),))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["cameras", "refinement", "seed", "steps", "wall", "PSNR", "Chamfer", "%", "F-score",
                                "turn", "left"]
    assert lines[1].split() == ["moved", "off", "1", "20", "1.0m", "20.00", "1.000", "0.500", "0.90"]
    assert lines[3] == "moved off seed 3 failed: ConfigError: no such key"
    assert lines[4].split() == ["moved", "off", "mean", "20", "1.5m", "21.00", "1.250", "0.450", "0.90"]
    assert lines[5].split() == ["moved", "off", "range", "0", "1.0m", "2.00", "0.500", "0.100", "0.00"]
    assert lines[6].split() == ["exact", "lr", "0.001", "1", "20", "1.0m", "27.00", "-", "0.900", "-"]
    assert len(lines) == 7


def test_the_pose_benchmark_turns_each_training_camera_about_its_centre_by_the_turn_it_reports(tmp_path):
    """bench_poses.move_cameras: read back through the DTU loader's decomposition, each training camera is the
    true one turned by the returned rotation (world frame) with its centre moved about 1 % of its distance; the
    held-out views are untouched."""
    import cv2
    import numpy as np

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_poses import move_cameras, rms_degrees

    from datasets.base import holdout_split
    from datasets.dtu import decompose_projection
    from datasets.synthetic import ensure_demo_scene

    root = ensure_demo_scene(str(tmp_path / "scene"), 16, "dtu")
    exact = dict(np.load(os.path.join(root, "cameras_sphere.npz")))
    turns = move_cameras(root, degrees=1.0, shift=0.01)
    moved = dict(np.load(os.path.join(root, "cameras_sphere.npz")))
    n_views = sum(key.startswith("world_mat_") for key in exact)
    train = holdout_split(n_views, "train", 8)
    assert turns.shape == (len(train), 3) and 0.7 < rms_degrees(turns) < 1.3
    shifts = []
    for k, i in enumerate(train):
        K0, c2w0 = decompose_projection(exact[f"world_mat_{i}"][:3, :4])
        K1, c2w1 = decompose_projection(moved[f"world_mat_{i}"][:3, :4])
        np.testing.assert_allclose(K1, K0, atol=1e-6 * K0.max())
        np.testing.assert_allclose(c2w1[:3, :3], cv2.Rodrigues(turns[k])[0] @ c2w0[:3, :3], atol=1e-9)
        distance = np.linalg.norm(c2w0[:3, 3] - exact[f"scale_mat_{i}"][:3, 3])
        shifts.append(np.linalg.norm(c2w1[:3, 3] - c2w0[:3, 3]) / distance)
    assert 0.006 < np.sqrt(np.mean(np.square(shifts))) < 0.014
    for i in sorted(set(range(n_views)) - set(train)):
        np.testing.assert_array_equal(moved[f"world_mat_{i}"], exact[f"world_mat_{i}"])


@pytest.mark.slow
def test_pose_benchmark_trains_with_refinement_off_and_on_and_reads_the_learned_turns():
    out = bench("bench_poses.py", "--resolution", 32, "--cases", "moved", "--rates", "off", "1e-3", "--",
                "trainer.max_steps=20", "model.pose_refinement_start=10", "model.geometry.isosurface.resolution=32",
                "dataset.n_test_traj_steps=2")
    applied = re.search(r"^42 training cameras turned by ([\d.]+) degrees rms \(centred\)$", out, re.M)
    assert applied and 0.6 < float(applied.group(1)) < 1.2, out
    rows = re.findall(r"^moved +(off|lr 0.001) +42 +20 +[\d.]+m +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+)$", out,
                      re.M)
    assert [r[0] for r in rows] == ["off", "lr 0.001"] and all(positive(r[1:3]) for r in rows), out
    assert rows[0][4] == applied.group(1)  # off: the whole turn is left
    assert 0 < abs(float(rows[1][4]) - float(applied.group(1))) < 0.2  # 10 steps of about 1e-3 rad (0.06 deg) each


@pytest.mark.slow
def test_pose_benchmark_poses_a_capture_with_sfm_and_scores_its_mesh_in_the_true_frame():
    out = bench("bench_poses.py", "--resolution", 16, "--cases", "capture", "--rates", "off", "1e-3",
                "--capture-frames", 32, "--", "trainer.max_steps=20",
                "trainer.val_check_interval=20", "model.pose_refinement_start=10",
                "model.geometry.isosurface.resolution=32")
    posed = re.search(r"^(\d+) of 32 frames posed by imgs2poses: rotations ([\d.]+) degrees rms off, centres "
                      r"([\d.]+) % of their distance rms$", out, re.M)
    assert posed and int(posed.group(1)) >= 20 and float(posed.group(2)) < 2 and float(posed.group(3)) < 3, out
    rows = re.findall(r"^capture +(off|lr 0.001) +42 +20 +[\d.]+m +([\d.]+) +([\d.]+) +([\d.]+) +-$", out, re.M)
    assert [r[0] for r in rows] == ["off", "lr 0.001"] and all(positive(r[1:]) for r in rows), out


def test_texture_benchmark_times_each_step_of_the_textured_export():
    out = bench("bench_texture.py", "--resolution", 48, "--faces", 500, "--size", 64)
    said = re.search(r"^mesh: (\d+) faces \(demo surface at 48\^3\) -> (\d+) faces, 64x64 texture, (\d+) texels "
                     r"covered$", out, re.M)
    assert said and int(said.group(1)) > 10000 and 400 < int(said.group(2)) <= 500 and int(said.group(3)) > 0, out
    steps = re.findall(r"^(decimate|UV charts|texel -> face|chart padding|total).* ([\d.]+) s$", out, re.M)
    assert [s[0] for s in steps] == ["decimate", "UV charts", "texel -> face", "chart padding", "total"], out
    assert positive([steps[-1][1]]) and re.search(r"^peak memory \(this process\) \d+ MB$", out, re.M), out


def test_the_benchmarks_mesh_option_renders_that_mesh_as_the_scene(tmp_path, monkeypatch):
    """bench_train.py --mesh: the overrides name the mesh (absolute, so launch.py finds it from any folder) and a
    folder of its own, and the configs the benchmark runs load it as the scene."""
    import datasets
    from datasets.synthetic import mesh_identity
    from test_demo_scene import BUNNY, bunny_scene
    from utils.config import load_config

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from common import demo_scene_overrides

    bunny_scene()  # skips, saying why, without the file or a ray tracer
    overrides = demo_scene_overrides(16, BUNNY)
    assert f"+dataset.mesh={os.path.abspath(BUNNY)}" in overrides
    assert f"dataset.root_dir={os.path.join(ROOT, 'load', 'demo-bunny-16')}" in overrides
    for config in ("configs/nerf-blender.yaml", "configs/neus-blender.yaml"):
        cfg = load_config(os.path.join(ROOT, config), [*overrides, f"dataset.root_dir={tmp_path / 'bunny-16'}"])
        data = datasets.make(cfg.dataset.name, cfg.dataset)
        data.setup("fit")
        foreground = data.split("train").masks.float() / 255
        assert 0.05 < float(foreground.mean()) < 0.6  # the bunny, from its RGBA renders' alpha
    with open(tmp_path / "bunny-16" / "demo_scene.json") as f:
        assert json.load(f)["mesh"] == mesh_identity(BUNNY, "y")
