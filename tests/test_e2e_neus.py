"""NeuS end to end on the DTU-format demo scene, as a user runs it: surface accuracy in the world frame,
and `--test --resume` reproducing the export (also with the Neuralangelo progressive grid)."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest
import trimesh
from scipy.spatial import cKDTree

from datasets.synthetic import DEMO_WORLD_FROM_SCENE, demo_surface
from helpers import demo_root
from test_e2e import ROOT, launch, metrics_from_csv
from test_outputs import texture_samples
from utils.mesh_metrics import bbox_diagonal, sample_surface, surface_distances


def chamfer_to_demo_surface(mesh_path):
    """(Chamfer distance, bbox diagonal) of a world-frame mesh against the demo scene's true surface."""
    gt_v, gt_f = demo_surface(256, DEMO_WORLD_FROM_SCENE)
    mesh = trimesh.load(mesh_path, process=False)
    d = surface_distances(sample_surface(mesh.vertices, mesh.faces, 100000),
                          sample_surface(gt_v, gt_f, 100000, seed=1))
    return d["chamfer"], bbox_diagonal(gt_v)


@pytest.fixture(scope="module")
def data_root():
    return demo_root("configs/neus-demo.yaml")


@pytest.fixture(scope="module")
def neus_demo(tmp_path_factory, data_root):
    """The README's main command (neus-demo, masks on), full length."""
    tmp = tmp_path_factory.mktemp("neus")
    out = launch(tmp, "--config", "configs/neus-demo.yaml", "--train", f"dataset.root_dir={data_root}", "tag=e2e")
    trials = glob.glob(str(tmp / "exp" / "neus-demo" / "e2e@*"))
    assert len(trials) == 1, out[-2000:]
    return tmp, trials[0]


@pytest.mark.slow
def test_neus_demo_mesh_is_within_one_percent_of_the_true_surface(neus_demo):
    tmp, trial = neus_demo
    save = os.path.join(trial, "save")
    chamfer, diag = chamfer_to_demo_surface(os.path.join(save, "it1500-mc128.obj"))
    assert chamfer < 0.01 * diag, f"Chamfer {chamfer:.3f} = {100 * chamfer / diag:.2f}% of the diagonal {diag:.1f}"
    reported = json.load(open(os.path.join(save, "it1500-mc128-metrics.json")))  # the test stage's own figure
    assert reported["mesh"] == "it1500-mc128.obj" and reported["fscore_threshold"] == pytest.approx(0.01 * diag)
    assert reported["chamfer"] == pytest.approx(chamfer, rel=0.1) and reported["fscore"] > 0.5
    world = np.array(json.load(open(os.path.join(save, "normalization.json")))["world_from_scene"])
    np.testing.assert_allclose(world, DEMO_WORLD_FROM_SCENE)
    assert metrics_from_csv(trial) > 24.0  # held-out views (every 8th of 48)
    assert len(glob.glob(os.path.join(save, "it1500-test", "*.png"))) == 6
    frames = [f for f in imageio.get_reader(os.path.join(save, "it1500-test-orbit.mp4"))]
    assert len(frames) == 24  # the video follows the fitted orbit, not the 6 held-out views


@pytest.mark.slow
def test_neus_resume_then_test_reproduces_the_export(neus_demo, tmp_path, capsys):
    """From the trial's parsed.yaml, in a copy of the trial moved elsewhere (results brought back from a cluster)
    and run from another folder: the outputs go to that copy (they went to ./exp/... under the working folder,
    a new half-filled trial), and system.warmup_steps, read through an interpolation that parsed.yaml has
    resolved, is not called unread (it was, on every --test of the demo). With export.textured, a decimated copy
    whose texture holds the field's colours is written beside the mesh."""
    _, trial = neus_demo
    moved = tmp_path / "results" / "neus-demo" / os.path.basename(trial)
    shutil.copytree(trial, moved)
    save = moved / "save"
    before = trimesh.load(save / "it1500-mc128.obj", process=False)
    os.remove(save / "it1500-mc128.obj")
    ckpt = glob.glob(str(moved / "ckpt" / "*.ckpt"))[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), "--config",
                           os.path.join("..", "results", "neus-demo", moved.name, "config", "parsed.yaml"),
                           "--resume", ckpt, "--test", "--runs_dir", str(tmp_path / "runs"),
                           "dataset.n_test_traj_steps=4",  # the mesh is what is compared: a short video saves ~25 s
                           "export.textured=true", "export.texture_size=512", "export.texture_faces=8000"],
                          cwd=elsewhere, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "no effect" not in out
    assert os.listdir(elsewhere) == []
    after = trimesh.load(save / "it1500-mc128.obj", process=False)
    assert len(after.vertices) == len(before.vertices)
    np.testing.assert_allclose(after.vertices, before.vertices, atol=1e-4)  # world frame: millimetres

    # export.textured: a copy decimated to 8000 faces whose texture holds the colours the vertices carry
    said = re.search(r"Textured mesh: \S+/save/it1500-mc128-textured\.obj \((\d+) faces, a 512x512 texture with "
                     r"it1500-mc128-textured\.mtl and \.png beside it\)", out)
    textured = trimesh.load(save / "it1500-mc128-textured.obj", force="mesh", process=False)
    chamfer, diag = chamfer_to_demo_surface(save / "it1500-mc128-textured.obj")
    with capsys.disabled():
        print(f"\ntextured copy: Chamfer {100 * chamfer / diag:.3f} % of the diagonal", end="")
    assert said and int(said.group(1)) == len(textured.faces) and 7900 <= len(textured.faces) <= 8000
    assert chamfer < 0.01 * diag
    points, sampled = texture_samples(textured)
    nearest = cKDTree(after.vertices).query(points)[1]
    difference = np.abs(sampled - after.visual.vertex_colors[nearest, :3] / 255.0).mean()
    with capsys.disabled():
        print(f"; its texture against the nearest vertex's colour: mean difference {difference:.4f}", end="")
    assert difference < 0.03


NEURALANGELO_ON_DEMO = [  # instant-nsr-pl's config, pointed at the demo and sized for a CPU test
    "dataset.name=demo", "+dataset.layout=dtu", "+dataset.holdout_every=16", "dataset.n_test_traj_steps=4",
    "model.num_samples_per_ray=128", "model.train_num_rays=128", "model.max_train_num_rays=512",
    "+model.grid_resolution=64", "model.geometry.isosurface.resolution=64",
    "model.geometry.xyz_encoding_config.n_levels=8", "model.geometry.xyz_encoding_config.log2_hashmap_size=16",
    "model.geometry.xyz_encoding_config.base_resolution=16", "model.geometry.xyz_encoding_config.start_level=2",
    "model.geometry.xyz_encoding_config.update_steps=30", "system.loss.lambda_curvature=[0,0.0,1.e-4,100]",
    "trainer.max_steps=200", "trainer.val_check_interval=200", "system.warmup_steps=100",
    "+export.save_normalized=true", "+export.largest_component_only=true", "tag=e2e",
]


@pytest.mark.slow
def test_neuralangelo_progressive_grid_resumes_to_the_same_export(tmp_path, data_root):
    out = launch(tmp_path, "--config", "configs/neuralangelo-dtu-wmask.yaml", "--train",
                 f"dataset.root_dir={data_root}", *NEURALANGELO_ON_DEMO)
    assert "Kept the largest connected component" in out
    trial = glob.glob(str(tmp_path / "exp" / "neuralangelo-dtu-wmask-demo-dtu" / "e2e@*"))[0]
    save = os.path.join(trial, "save")
    world_mesh = trimesh.load(os.path.join(save, "it200-mc64.obj"), process=False)
    normalised = trimesh.load(os.path.join(save, "it200-mc64-normalized.obj"), process=False)
    np.testing.assert_allclose(normalised.vertices * 200.0 + DEMO_WORLD_FROM_SCENE[:3, 3], world_mesh.vertices,
                               atol=1e-3)
    assert np.abs(normalised.vertices).max() < 1.0
    components = trimesh.graph.connected_components(world_mesh.face_adjacency, nodes=np.arange(len(world_mesh.faces)))
    assert len(components) == 1
    chamfer, diag = chamfer_to_demo_surface(os.path.join(save, "it200-mc64.obj"))
    assert chamfer < 0.05 * diag, f"Chamfer {100 * chamfer / diag:.2f}% of the diagonal after 200 steps"

    os.remove(os.path.join(save, "it200-mc64.obj"))
    ckpt = glob.glob(os.path.join(trial, "ckpt", "*.ckpt"))[0]
    launch(tmp_path, "--config", os.path.join(trial, "config", "parsed.yaml"), "--resume", ckpt, "--test")
    again = trimesh.load(os.path.join(save, "it200-mc64.obj"), process=False)
    assert len(again.vertices) == len(world_mesh.vertices)
    np.testing.assert_allclose(again.vertices, world_mesh.vertices, atol=1e-4)


BUNNY_STEPS = ["trainer.max_steps=500", "system.warmup_steps=100", "trainer.val_check_interval=500",
               "model.geometry.isosurface.resolution=96", "dataset.n_test_traj_steps=4"]


@pytest.mark.slow
def test_neus_reconstructs_a_scanned_bunny_ears_included(tmp_path):
    """A real range scan, not an analytic shape: the Stanford bunny (../shared/data) rendered by the demo loader
    (dataset.mesh) with the demo's cameras. The exported mesh lands on the bunny's own file, in its frame and units:
    after 500 steps it is within 0.8 % of the diagonal in Chamfer distance (0.42 % measured), F-score > 0.85
    (0.93), and the thin ears, the top tenth of its height, are there: their true surface is on average within
    1 % of the diagonal of the mesh (0.50 % measured). The run's own metrics.json agrees with this measure, made
    from the two OBJ files as a user's tool reads them."""
    from test_demo_scene import BUNNY, bunny_scene
    from utils.mesh_metrics import nearest_distances, nearest_tree

    bunny_scene()  # skips, saying why, without the file or a ray tracer
    bunny = trimesh.load(BUNNY, process=False)
    gt_v, gt_f = bunny.vertices, bunny.faces
    launch(tmp_path, "--config", "configs/neus-demo.yaml", "--train", f"dataset.mesh={BUNNY}",
           f"dataset.root_dir={tmp_path / 'bunny'}", "tag=bunny", *BUNNY_STEPS)
    save = glob.glob(str(tmp_path / "exp" / "neus-demo" / "bunny@*" / "save"))[0]
    mesh = trimesh.load(os.path.join(save, "it500-mc96.obj"), process=False)
    pred, gt = sample_surface(mesh.vertices, mesh.faces, 100000), sample_surface(gt_v, gt_f, 100000, seed=1)
    diag = bbox_diagonal(gt_v)
    d = surface_distances(pred, gt, threshold=0.01 * diag)
    assert d["chamfer"] < 0.008 * diag and d["fscore"] > 0.85, (100 * d["chamfer"] / diag, d)
    ears = gt[:, 1] > gt_v[:, 1].max() - 0.1 * np.ptp(gt_v[:, 1])  # the file's up axis is y
    to_mesh = nearest_distances(nearest_tree(pred), gt[ears])
    assert to_mesh.mean() < 0.01 * diag, f"the ears' surface is {100 * to_mesh.mean() / diag:.2f}% of the diagonal away"
    reported = json.load(open(os.path.join(save, "it500-mc96-metrics.json")))
    assert reported["chamfer"] == pytest.approx(d["chamfer"], rel=0.1) and reported["fscore"] > 0.85
