"""scripts/eval_mesh.py on synthetic data in the DTU evaluation layout and mesh-to-mesh, with known answers."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import trimesh
from scipy.io import savemat

from utils.mesh_metrics import dtu_protocol, inside_mask_hull

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CENTRE = np.array([3.0, -2.0, 650.0])  # millimetres, as DTU


def run(*args, expect=0):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "eval_mesh.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, proc.stdout + proc.stderr
    return proc


def sphere(radius, centre=CENTRE, subdivisions=5):
    mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    mesh.vertices += centre
    return mesh


@pytest.fixture(scope="module")
def dtu_dir(tmp_path_factory):
    """Scan 1: a 20 mm sphere; observed only where x < CENTRE.x + 10; the table at z = 640."""
    root = tmp_path_factory.mktemp("dtu_eval")
    os.makedirs(root / "Points" / "stl")
    os.makedirs(root / "ObsMask")
    points, _ = trimesh.sample.sample_surface(sphere(20.0), 300_000, seed=3)
    trimesh.PointCloud(points).export(root / "Points" / "stl" / "stl001_total.ply")
    bounds = np.stack([CENTRE - 30, CENTRE + 30])
    res = 1.0
    axis = [np.arange(bounds[0, k], bounds[1, k] + res / 2, res) for k in range(3)]
    x = np.meshgrid(*axis, indexing="ij")[0]
    savemat(root / "ObsMask" / "ObsMask1_10.mat", {"ObsMask": (x < CENTRE[0] + 10).astype(np.uint8),
                                                  "BB": bounds, "Res": np.array([[res]])})
    savemat(root / "ObsMask" / "Plane1.mat", {"P": np.array([[0.0], [0.0], [1.0], [-640.0]])})
    return root


def test_dtu_protocol_measures_a_known_offset_and_ignores_what_it_should(dtu_dir, tmp_path):
    offset = sphere(20.5)
    offset.export(tmp_path / "offset.obj")
    result = json.loads(run(tmp_path / "offset.obj", "--protocol", "dtu", "--dtu-dir", dtu_dir, "--scan", 1)
                        .stdout.strip().splitlines()[-1])
    assert result["accuracy"] == pytest.approx(0.5, abs=0.03)
    assert result["completeness"] == pytest.approx(0.5, abs=0.03)
    assert result["chamfer"] == pytest.approx(0.5, abs=0.03)
    # a floater where nothing was observed, one more than 20 mm from the object (an outlier), and the
    # bottom cut away below the table: none of them changes the figures
    unobserved = sphere(2.0, CENTRE + [25.0, 0, 0], 2)
    outlier = sphere(2.0, CENTRE + [-25.0, -25.0, 25.0], 2)
    keep = offset.triangles_center[:, 2] > CENTRE[2] - 12.0
    cut = trimesh.Trimesh(offset.vertices, offset.faces[keep], process=False)
    trimesh.util.concatenate([cut, unobserved, outlier]).export(tmp_path / "messy.obj")
    messy = json.loads(run(tmp_path / "messy.obj", "--protocol", "dtu", "--dtu-dir", dtu_dir, "--scan", 1,
                           "--json", tmp_path / "r.json").stdout.strip().splitlines()[-1])
    assert messy["accuracy"] == pytest.approx(result["accuracy"], abs=0.02)
    assert messy["completeness"] == pytest.approx(result["completeness"], abs=0.02)
    assert json.load(open(tmp_path / "r.json"))["chamfer"] == messy["chamfer"]


def test_dtu_protocol_counts_observed_points_within_the_outlier_distance():
    gt = np.array([[0.0, 0, 0], [1.0, 0, 0]])
    pred = np.array([[0.0, 0, 0.5], [1.0, 0, 0.5], [0.0, 0, 5.0], [0.0, 0, 30.0]])  # 0.5, 0.5, 5, (30: outlier)
    mask = np.ones((41, 41, 41), dtype=bool)
    d = dtu_protocol(pred, gt, mask, np.array([[-20.0] * 3, [20.0] * 3]), 1.0, np.array([0, 0, 1.0, 1.0]))
    assert d["accuracy"] == pytest.approx((0.5 + 0.5 + 5.0) / 3)
    assert d["completeness"] == pytest.approx(0.5)


def test_dtu_scoring_shows_progress_and_chunked_queries_change_no_figure(capsys, monkeypatch):
    """The DTU score of a real scan can take minutes (400k ground-truth points inside a background shell: 43 s
    on 2 cores) with nothing shown. Its nearest-point queries now run in chunks behind a bar that appears after
    utils.io.PROGRESS_DELAY_S (0 here); the distances are those of one query."""
    import utils.io
    import utils.mesh_metrics as mm
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(0)
    gt, pred = rng.normal(size=(3000, 3)) * 5, rng.normal(size=(2000, 3)) * 5
    mask, bounds, plane = np.ones((41, 41, 41), bool), np.array([[-20.0] * 3, [20.0] * 3]), np.array([0, 0, 1, 30.0])
    whole = dtu_protocol(pred, gt, mask, bounds, 1.0, plane, max_dist=1.0)
    assert "DTU distances" not in capsys.readouterr().err  # quick: no bar
    monkeypatch.setattr(utils.io, "PROGRESS_DELAY_S", 0.0)
    monkeypatch.setattr(mm, "QUERY_CHUNK", 700)
    chunked = dtu_protocol(pred, gt, mask, bounds, 1.0, plane, max_dist=1.0)
    shown = capsys.readouterr().err
    assert "DTU distances:   0%|          | 0.00/5.00k" in shown, shown  # 2000 predicted + 3000 ground truth
    assert chunked == whole
    d_ref = cKDTree(gt).query(pred, distance_upper_bound=1.0)[0]
    assert whole["accuracy"] == pytest.approx(d_ref[d_ref < 1.0].mean(), rel=1e-12)

    class Counted:
        steps = []

        def update(self, n):
            self.steps.append(n)

    bar = Counted()
    assert np.array_equal(mm.nearest_distances(mm.nearest_tree(gt), pred, bar), cKDTree(gt).query(pred)[0])
    assert bar.steps == [700, 700, 600]


def test_scene_protocol_fscore_and_cropping(tmp_path):
    sphere(1.0, np.zeros(3)).export(tmp_path / "gt.obj")
    sphere(1.02, np.zeros(3)).export(tmp_path / "pred.obj")
    last = run(tmp_path / "pred.obj", "--protocol", "scene", "--gt", tmp_path / "gt.obj").stdout.strip().splitlines()
    result = json.loads(last[-1])
    assert result["chamfer"] == pytest.approx(0.02, abs=0.003) and result["fscore"] == 1.0
    assert any(line.strip().startswith("fscore") for line in last[:-1])  # the readable table
    tight = json.loads(run(tmp_path / "pred.obj", "--protocol", "scene", "--gt", tmp_path / "gt.obj",
                           "--threshold", 0.01).stdout.strip().splitlines()[-1])
    assert tight["fscore"] == 0.0
    wall = trimesh.creation.box(extents=[0.1, 6.0, 6.0])
    wall.vertices += [4.0, 0, 0]
    trimesh.util.concatenate([sphere(1.02, np.zeros(3)), wall]).export(tmp_path / "walled.obj")
    walled = json.loads(run(tmp_path / "walled.obj", "--protocol", "scene", "--gt", tmp_path / "gt.obj")
                        .stdout.strip().splitlines()[-1])
    cropped = json.loads(run(tmp_path / "walled.obj", "--protocol", "scene", "--gt", tmp_path / "gt.obj",
                             "--crop-margin", 0.2).stdout.strip().splitlines()[-1])
    assert walled["precision"] < 0.5 and cropped["precision"] == 1.0 and cropped["recall"] == 1.0


def test_bad_input_is_one_sentence(tmp_path, dtu_dir):
    out = run(tmp_path / "none.obj", "--protocol", "scene", "--gt", tmp_path / "gt.obj", expect=2)
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr
    sphere(1.0, np.zeros(3)).export(tmp_path / "m.obj")
    out = run(tmp_path / "m.obj", "--protocol", "dtu", "--dtu-dir", dtu_dir, "--scan", 7, expect=2)
    assert "stl007_total.ply is missing" in out.stderr and "Traceback" not in out.stderr
    out = run(tmp_path / "m.obj", "--protocol", "dtu", "--dtu-dir", dtu_dir, "--scan", 1, expect=2)
    assert "DTU world frame" in out.stderr  # a mesh at the origin is nowhere near the observed volume
    (tmp_path / "photo.png").write_bytes(b"not a mesh")
    out = run(tmp_path / "m.obj", "--protocol", "scene", "--gt", tmp_path / "photo.png", expect=2)
    assert "photo.png cannot be read as a mesh" in out.stderr and "Traceback" not in out.stderr
    out = run(tmp_path / "m.obj", "--protocol", "scene", "--gt", tmp_path / "m.obj", "--threshold", "-1", expect=2)
    assert "argument --threshold: must be a number > 0, not -1" in out.stderr  # was an F-score of 0
    out = run(tmp_path / "m.obj", "--protocol", "scene", "--gt", tmp_path / "m.obj", "--samples", "0", expect=2)
    assert "argument --samples: must be a whole number >= 1, not 0" in out.stderr  # was NaN, invalid JSON


def test_dtu_data_scores_its_meshes_when_given_the_evaluation_folder(dtu_dir, tmp_path):
    from omegaconf import OmegaConf

    from datasets.dtu import DTUDataModule

    mesh = sphere(20.5)
    scene = DTUDataModule(OmegaConf.create({"root_dir": str(tmp_path / "dtu_scan1"), "eval_dir": str(dtu_dir)}))
    scores = scene.score_mesh(np.asarray(mesh.vertices), np.asarray(mesh.faces))  # scan number from the folder
    assert scores["chamfer"] == pytest.approx(0.5, abs=0.03)
    assert DTUDataModule(OmegaConf.create({"root_dir": str(tmp_path)})).score_mesh(mesh.vertices, mesh.faces) is None
    # an evaluation asked for but not there is refused before training, not a warning after it
    from datasets.base import DatasetError
    with pytest.raises(DatasetError, match=r"^dataset.eval_dir: .*stl007_total.ply is missing"):
        DTUDataModule(OmegaConf.create({"root_dir": str(tmp_path / "dtu_scan7"), "eval_dir": str(dtu_dir)}))
    with pytest.raises(DatasetError, match=r"scan number is unknown: the scene folder .*mug does not end in one"):
        DTUDataModule(OmegaConf.create({"root_dir": str(tmp_path / "mug"), "eval_dir": str(dtu_dir)}))
    named = DTUDataModule(OmegaConf.create({"root_dir": str(tmp_path / "mug"), "eval_dir": str(dtu_dir),
                                            "eval_scan": 1}))
    assert named.score_mesh(np.asarray(mesh.vertices), np.asarray(mesh.faces)) == scores
    # a scene with masks for every view: the figures of the mesh cut to their visual hull too
    eyes = [CENTRE + d for d in ([-200.0, 0, 60], [0, -200.0, 80], [150.0, 150.0, 100], [0, 30, 200])]
    write_masked_scene(tmp_path / "dtu_scan1", CENTRE, 20.0, eyes)
    floater = sphere(2.0, CENTRE + [0.0, -27.0, 0.0], 2)
    messy = trimesh.util.concatenate([mesh, floater])
    masked = scene.score_mesh(np.asarray(messy.vertices), np.asarray(messy.faces))
    assert masked["culled_faces"] == len(floater.faces) and masked["accuracy"] > scores["accuracy"] + 0.05
    assert {key: masked[f"{key}_culled"] for key in scores} == scores


def test_scene_protocol_culls_to_the_camera_frusta(tmp_path):
    """GT: a sphere the cameras see and one off to the side they never see; the prediction: the seen sphere plus a
    wall behind it, beyond the cameras' depth range. Culled to the frusta, both precision and recall are 1."""
    from datasets.synthetic import look_at

    trimesh.util.concatenate([sphere(1.0, np.zeros(3)), sphere(1.0, np.array([0.0, 10.0, 0.0]))]).export(
        tmp_path / "gt.obj")
    wall = trimesh.creation.box(extents=[0.1, 6.0, 6.0])
    wall.vertices += [4.0, 0, 0]
    trimesh.util.concatenate([sphere(1.02, np.zeros(3)), wall]).export(tmp_path / "pred.obj")
    scan = tmp_path / "scan"
    for sub in ("intrinsic", "pose", "depth"):
        os.makedirs(scan / sub)
    K = np.eye(4)
    K[:3, :3] = [[40.0, 0, 32.0], [0, 40.0, 24.0], [0, 0, 1]]
    np.savetxt(scan / "intrinsic" / "intrinsic_depth.txt", K)
    for i, eye in enumerate([(-3.0, 0.3, 0.2), (-3.0, -0.3, -0.2), (-2.8, 0.0, 0.8)]):
        np.savetxt(scan / "pose" / f"{i}.txt", look_at(np.array(eye), np.zeros(3)))
        import imageio.v2 as imageio
        imageio.imwrite(scan / "depth" / f"{i}.png", np.zeros((48, 64), np.uint16))
    np.savetxt(scan / "pose" / "3.txt", np.full((4, 4), -np.inf))  # an invalid pose, as ScanNet has: skipped
    plain = json.loads(run(tmp_path / "pred.obj", "--protocol", "scene", "--gt", tmp_path / "gt.obj")
                       .stdout.strip().splitlines()[-1])
    culled = json.loads(run(tmp_path / "pred.obj", "--protocol", "scene", "--gt", tmp_path / "gt.obj",
                            "--frusta", scan, "--max-depth", 5.0).stdout.strip().splitlines()[-1])
    assert plain["recall"] < 0.6 and plain["precision"] < 0.5
    assert culled["recall"] == 1.0 and culled["precision"] == 1.0
    run(tmp_path / "pred.obj", "--protocol", "scene", "--gt", tmp_path / "gt.obj", "--frusta", tmp_path, expect=2)


def write_masked_scene(root, centre, radius, eyes, size=(640, 480), focal=1000.0):
    """A NeuS-format scene of a sphere: cameras_sphere.npz (world frame, scale_mat the identity), image/ and
    mask/ (the sphere's silhouette, ray-cast per pixel). Returns the views [(K, c2w, width, height)] and masks."""
    import imageio.v2 as imageio

    from datasets.synthetic import look_at

    width, height = size
    K = np.array([[focal, 0, (width - 1) / 2], [0, focal, (height - 1) / 2], [0, 0, 1]])
    os.makedirs(root / "image")
    os.makedirs(root / "mask")
    cameras, views, masks = {}, [], []
    u, v = np.meshgrid(np.arange(width), np.arange(height))
    for i, eye in enumerate(eyes):
        c2w = look_at(np.asarray(eye, float), centre)  # OpenCV
        dirs = np.stack([(u - K[0, 2]) / focal, (v - K[1, 2]) / focal, np.ones_like(u, float)], -1) @ c2w[:3, :3].T
        dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
        to_centre = centre - c2w[:3, 3]
        along = dirs @ to_centre
        hit = (along > 0) & (np.linalg.norm(to_centre) ** 2 - along ** 2 <= radius ** 2)
        imageio.imwrite(root / "image" / f"{i:03d}.png", np.zeros((height, width, 3), np.uint8))
        imageio.imwrite(root / "mask" / f"{i:03d}.png", np.repeat(hit[..., None] * np.uint8(255), 3, -1))
        P = np.eye(4)
        P[:3, :3] = K
        cameras[f"world_mat_{i}"] = P @ np.linalg.inv(c2w)
        cameras[f"scale_mat_{i}"] = np.eye(4)
        views.append((K, c2w, width, height))
        masks.append(hit)
    np.savez(root / "cameras_sphere.npz", **cameras)
    return views, masks


def test_dtu_protocol_culled_to_the_masks_drops_a_floater_outside_the_silhouettes(dtu_dir, tmp_path):
    """A floater 5 mm off the 20 mm sphere, where the observation mask counts it: it spoils the accuracy, and
    culling to the masks of views that see it beside the sphere removes it and nothing else."""
    eyes = [CENTRE + d for d in ([-200.0, 0, 60], [0, -200.0, 80], [150.0, 150.0, 100], [0, 30, 200])]
    views, masks = write_masked_scene(tmp_path / "scan1", CENTRE, 20.0, eyes)
    clean = sphere(20.5)
    floater = sphere(2.0, CENTRE + [0.0, -27.0, 0.0], 2)
    trimesh.util.concatenate([clean, floater]).export(tmp_path / "floater.obj")
    clean.export(tmp_path / "clean.obj")

    def score(mesh, *options):
        return json.loads(run(tmp_path / mesh, "--protocol", "dtu", "--dtu-dir", dtu_dir, "--scan", 1, *options)
                          .stdout.strip().splitlines()[-1])

    reference, spoilt = score("clean.obj"), score("floater.obj")
    culled = score("floater.obj", "--cull-masks", tmp_path / "scan1")
    assert spoilt["accuracy"] > reference["accuracy"] + 0.05
    assert culled["culled_faces"] == len(floater.faces)
    assert culled["accuracy"] == pytest.approx(reference["accuracy"], abs=1e-9)
    assert inside_mask_hull(clean.vertices, views, masks).all()  # the hull holds the sphere
    assert not inside_mask_hull(floater.vertices, views, masks).any()
    # undilated, the silhouettes are cut to whole pixels and the sphere's own rim starts to go
    assert not inside_mask_hull(clean.vertices, views, masks, dilation_px=0).all()
    half = [cv2.resize(m.astype(np.uint8), (320, 240), interpolation=cv2.INTER_AREA) > 0 for m in masks]
    assert inside_mask_hull(clean.vertices, views, half).all()  # half-size masks cover the same image pixels
    assert not inside_mask_hull(floater.vertices, views, half).any()
    os.remove(tmp_path / "scan1" / "mask" / "002.png")
    said = run(tmp_path / "floater.obj", "--protocol", "dtu", "--dtu-dir", dtu_dir, "--scan", 1, "--cull-masks",
               tmp_path / "scan1", expect=2).stderr
    assert said == (f"eval_mesh: --cull-masks {tmp_path / 'scan1'}: camera 2 has no mask (1 of 4 cameras lack one); "
                    "every view's mask takes part.\n")
