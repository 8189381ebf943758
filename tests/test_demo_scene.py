"""The embedded demo scene's folder: rendered once, rendered again when a file of it is missing, and never put in
place of a folder that holds something else."""
import json
import os

import pytest

from datasets.base import DatasetError
from datasets.synthetic import ensure_demo_scene


def test_a_demo_render_missing_a_file_is_rendered_again_and_a_whole_one_is_kept(tmp_path):
    root = str(tmp_path / "demo-dtu")
    ensure_demo_scene(root, resolution=16, layout="dtu")
    with open(os.path.join(root, "demo_scene.json")) as f:
        files = json.load(f)["files"]
    assert "cameras_sphere.npz" in files and len([f for f in files if f.startswith("image")]) == 48
    image = os.path.join(root, files[-1])
    written_at = os.stat(image).st_mtime_ns
    ensure_demo_scene(root, resolution=16, layout="dtu")  # whole: left as it is
    assert os.stat(image).st_mtime_ns == written_at

    os.remove(os.path.join(root, "cameras_sphere.npz"))  # before: "set dataset.cameras_file", with no way out
    os.remove(image)
    ensure_demo_scene(root, resolution=16, layout="dtu")
    assert all(os.path.isfile(os.path.join(root, name)) for name in files)


def test_the_demo_refuses_a_folder_of_other_files_and_leaves_it_as_it_was(tmp_path):
    """A dataset.root_dir pointed at the user's own scene with a demo config deleted that scene before."""
    root = tmp_path / "my_capture"
    (root / "images").mkdir(parents=True)
    (root / "images" / "0001.jpg").write_bytes(b"not a demo file")
    with pytest.raises(DatasetError, match="not the demo scene"):
        ensure_demo_scene(str(root), resolution=16, layout="blender")
    assert (root / "images" / "0001.jpg").read_bytes() == b"not a demo file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_capture"]  # no temporary left beside it

    empty = tmp_path / "empty"
    empty.mkdir()
    ensure_demo_scene(str(empty), resolution=16, layout="blender")  # an empty folder is the demo's to fill
    assert (empty / "transforms_train.json").is_file()


def test_a_demo_render_to_redo_keeps_a_file_the_user_added(tmp_path):
    """A render to redo (a file of it gone, or an older version) replaces the folder whole: not with the user's
    file in it."""
    root = tmp_path / "demo"
    ensure_demo_scene(str(root), resolution=16, layout="blender")
    (root / "notes.txt").write_text("mine")
    (root / ".DS_Store").write_bytes(b"")  # a file browser's: not the user's work
    ensure_demo_scene(str(root), resolution=16, layout="blender")  # whole: nothing to redo, no question asked
    os.remove(root / "transforms_test.json")
    with pytest.raises(DatasetError, match=r"did not write \(notes.txt\)"):
        ensure_demo_scene(str(root), resolution=16, layout="blender")
    assert (root / "notes.txt").read_text() == "mine"
    os.remove(root / "notes.txt")
    ensure_demo_scene(str(root), resolution=16, layout="blender")
    assert (root / "transforms_test.json").is_file()


def render_counting(root, barrier, results):
    """A run started with others (spawned): ensure the demo scene once all are ready; report whether it rendered."""
    import datasets.synthetic as synthetic

    rendered = []
    real_write = synthetic.write_blender

    def counted_write(*args, **kwargs):
        rendered.append(True)
        return real_write(*args, **kwargs)

    synthetic.write_blender = counted_write
    barrier.wait()
    try:
        synthetic.ensure_demo_scene(root, resolution=32, layout="blender")
        with open(os.path.join(root, "demo_scene.json")) as f:
            whole = all(os.path.isfile(os.path.join(root, name)) for name in json.load(f)["files"])
        results.put(("rendered" if rendered else "reused", whole))
    except Exception as err:
        results.put((f"{type(err).__name__}: {err}", False))


def test_runs_started_together_render_the_demo_once_and_all_find_it_whole(tmp_path):
    """A sweep started on a fresh checkout: each run rendered the scene and replaced the others' render, one of
    them failing with 'Directory not empty' when two replaced it at once (1 time in 3 with 6 runs)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # fresh interpreters, as separate launch.py runs are
    runs = 3
    barrier, results = context.Barrier(runs), context.Queue()
    root = str(tmp_path / "demo")
    processes = [context.Process(target=render_counting, args=(root, barrier, results)) for _ in range(runs)]
    for process in processes:
        process.start()
    outcomes = sorted(results.get(timeout=300) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert outcomes == [("rendered", True)] + [("reused", True)] * (runs - 1)
    assert sorted(os.listdir(tmp_path)) == ["demo"]  # no render left beside it


BUNNY = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "bunny.obj")


def bunny_scene():
    """The Stanford bunny (a real range scan, ../shared/data) as a MeshScene; skipped, saying why, when absent."""
    from datasets.synthetic import MeshScene, MeshSceneError

    if not os.path.isfile(BUNNY):
        pytest.skip("../shared/data/bunny.obj is absent (the shared test data)")
    try:
        return MeshScene(BUNNY, up="y")
    except MeshSceneError as err:  # no ray tracer: requirements-dev.txt installs embreex
        pytest.skip(str(err))


def test_a_mesh_scene_is_placed_upright_in_the_demo_ball_and_traced_onto_its_surface():
    """The bunny (y-up) stands on +z inside radius 0.8; traced rays end on its triangles, with normals facing the
    camera, and the depth the render writes is that hit's distance along the camera's axis."""
    import numpy as np
    import torch
    import trimesh

    from datasets.synthetic import demo_dtu_cameras, render

    scene = bunny_scene()
    original = trimesh.load(BUNNY, process=False)
    verts, faces = scene.surface()
    placed = original.vertices @ scene.scene_from_mesh[:3, :3].T + scene.scene_from_mesh[:3, 3]
    assert np.allclose(placed, verts, atol=1e-9) and np.array_equal(faces, original.faces)
    assert np.linalg.norm(verts, axis=1).max() == pytest.approx(0.8)
    assert np.argmax(verts[:, 2]) == np.argmax(original.vertices[:, 1])  # an ear tip, the highest point, on top
    assert np.allclose(verts.min(0) + verts.max(0), 0, atol=1e-9)  # the bounding box centred on the origin

    cam = demo_dtu_cameras(32)[1]
    rays_o, rays_d = cam.rays()
    hit, t, normal = scene.trace(rays_o, rays_d)
    assert 0.1 < hit.float().mean() < 0.9  # the object and its surroundings both in view
    points = (rays_o[hit] + t[hit, None] * rays_d[hit]).double().numpy()
    triangles = scene.mesh.triangles
    distance = [np.linalg.norm(trimesh.triangles.closest_point(triangles, np.repeat(p[None], len(triangles), 0)) - p,
                               axis=1).min() for p in points]  # to every triangle: no rtree needed
    assert max(distance) < 1e-5
    assert (normal[hit] * rays_d[hit]).sum(-1).max() < 0 and torch.allclose(normal[hit].norm(dim=-1), torch.ones(1))
    assert (normal[~hit] == 0).all()

    with pytest.raises(NotImplementedError, match="no signed distance"):  # not the analytic scene's, inherited
        scene.normal(torch.zeros(1, 3))
    depth = render(scene, cam, supersample=1)["depth"].reshape(-1)
    forward = torch.from_numpy(cam.c2w[:3, 2]).float()
    assert np.allclose(depth[hit.numpy()], (t[hit] * (rays_d[hit] @ forward)).numpy(), atol=1e-5)


def test_the_demo_loader_renders_a_mesh_it_is_given_and_names_a_bad_one_in_one_sentence(tmp_path):
    """dataset.mesh: the demo's cameras and layout around a mesh of the user's, in the DTU layout with the mesh's
    own frame as the world (exports land on it); the render is redone when the mesh changes (its content's hash in
    the marker), and a missing file, a file of no triangles or a wrong up axis is one sentence."""
    import numpy as np
    from omegaconf import OmegaConf

    from datasets.demo import load_demo_split

    bunny_scene()
    root = str(tmp_path / "bunny")
    config = OmegaConf.create({"root_dir": root, "render_resolution": 16, "img_wh": [16, 16], "layout": "dtu",
                               "mesh": BUNNY, "mesh_up": "y", "apply_mask": True})
    data = load_demo_split(config, "train")
    assert np.allclose(data.world_from_scene, np.linalg.inv(bunny_scene().scene_from_mesh))  # the mesh's frame
    marker = json.load(open(os.path.join(root, "demo_scene.json")))
    assert marker["mesh"]["up"] == "y" and len(marker["mesh"]["sha1"]) == 40
    assert data.n_images == 42 and 0.05 < float((data.masks > 127).float().mean()) < 0.6  # 48 views, every 8th held out
    ensure_demo_scene(root, resolution=16, layout="dtu")  # the analytic scene asked for: rendered in its place
    assert json.load(open(os.path.join(root, "demo_scene.json")))["mesh"] is None

    not_a_mesh = tmp_path / "notes.obj"
    not_a_mesh.write_text("# no vertices, no faces\n")
    for mesh, up, words in ((str(tmp_path / "missing.obj"), "y", "is not a file; name a mesh"),
                            (str(not_a_mesh), "y", "holds no triangles"),
                            (BUNNY, "w", "up axis is 'w'; use x, y or z")):
        bad = OmegaConf.merge(config, {"mesh": mesh, "mesh_up": up, "root_dir": str(tmp_path / "other")})
        with pytest.raises(DatasetError, match="dataset.mesh.*" + words.replace("(", r"\(")):
            load_demo_split(bad, "train")
    assert not os.path.exists(tmp_path / "other")
