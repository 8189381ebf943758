"""The colmap loader on COLMAP text models written from the renderer's known cameras.

SIMPLE_PINHOLE / PINHOLE: the loader's rays, taken back to the COLMAP frame
with ``world_from_scene``, are the renderer's rays. OPENCV with distortion:
the images are rendered through a lens model written here (forward model and
its inversion, independent of pycolmap), and the loader's undistorted pixels
must show what its own pinhole rays see.
"""
import logging
import os
import shutil

import numpy as np
import pytest
import torch
import trimesh
from omegaconf import OmegaConf

import datasets
from datasets.base import DatasetError
from datasets.rays import turn_intrinsics_clockwise, turn_pose_clockwise
from datasets.synthetic import Camera, DemoScene, demo_surface, orbit_cameras, render_rays, write_colmap_text
from helpers import max_ray_angle_deg, opencv_distort, opencv_undistort
from utils.config import ConfigError
from utils.io import to_uint8, write_image

W, H = 64, 48


def scene_points(n=400):
    verts, _ = demo_surface(64)
    return verts[np.random.default_rng(0).choice(len(verts), n, replace=False)]


def cameras_with(fx, fy, n=10):
    cams = orbit_cameras(n, 2.6, [20, 40, 60], W, H)
    for cam in cams:
        cam.K = np.array([[fx, 0, 31.0], [0, fy, 25.5], [0, 0, 1]])
    return cams


def write_capture(root, cams, model, params, render_image, project=None, image_ext=".png"):
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    views = []
    for i, cam in enumerate(cams):
        name = f"img_{i:03d}{image_ext}"
        write_image(os.path.join(root, "images", name), render_image(cam))
        views.append((name, 0, cam.c2w))
    write_colmap_text(os.path.join(root, "sparse", "0"), [(model, W, H, params)], views, scene_points(),
                      project=project)


def pinhole_render(cam):
    o, d = cam.rays()
    return to_uint8(render_rays(DemoScene(), o, d).view(cam.height, cam.width, 3).numpy())


def load(root, **overrides):
    cfg = OmegaConf.create({"name": "colmap", "root_dir": str(root), "up_est_method": "camera",
                            "center_est_method": "lookat", **overrides})
    return datasets.make("colmap", cfg)


def world_rays(data, k, world_from_scene):
    rays = data.image_rays(k)
    o = rays["rays_o"].double().numpy() @ world_from_scene[:3, :3].T + world_from_scene[:3, 3]
    d = rays["rays_d"].double().numpy() @ world_from_scene[:3, :3].T
    return o, d / np.linalg.norm(d, axis=1, keepdims=True)


@pytest.mark.parametrize("model,fx,fy", [("SIMPLE_PINHOLE", 50.0, 50.0), ("PINHOLE", 52.0, 47.0)])
def test_pinhole_models_give_the_renderers_rays(tmp_path, model, fx, fy):
    cams = cameras_with(fx, fy)
    params = [fx, 31.0, 25.5] if model == "SIMPLE_PINHOLE" else [fx, fy, 31.0, 25.5]
    write_capture(tmp_path, cams, model, params, pinhole_render)
    dm = load(tmp_path)
    data = dm.split("train")
    assert data.images.shape == (len(cams), H, W, 3)
    for k, cam in enumerate(cams):
        o, d = world_rays(data, k, data.world_from_scene)
        o_true, d_true = (t.double().numpy() for t in cam.rays())
        assert np.abs(o - o_true).max() < 1e-4
        angle = max_ray_angle_deg(torch.from_numpy(d), torch.from_numpy(d_true))
        assert angle < 1e-3, f"view {k}: rays off by {angle:.4f} degrees"
        assert np.array_equal(data.images[k].numpy(), np.asarray(pinhole_render(cam)))
    # normalised frame: up is +z, the look-at point at the origin, the nearest camera at distance 1
    c2w = data.c2w.numpy()
    assert abs(np.linalg.norm(c2w[:, :3, 3], axis=1).min() - 1.0) < 1e-5
    # up_est_method=camera: +z is square to every camera's x axis (the renderer's cameras are level), and up
    assert np.abs(c2w[:, 2, 0]).max() < 1e-5 and c2w[:, 2, 1].mean() > 0.5
    # instant-nsr-pl's cam_downscale divides the centred capture instead: the cameras orbit at distance 2.6
    fixed = load(tmp_path, cam_downscale=2.5).split("train").c2w.numpy()
    np.testing.assert_allclose(np.linalg.norm(fixed[:, :3, 3], axis=1), 2.6 / 2.5, atol=1e-5)
    for bad in ("radius", "cam_downscale"):
        with pytest.raises(ConfigError, match=f"dataset.{bad} must be a number > 0, not -1"):
            load(tmp_path, **{bad: -1}).split("train")
    # the test video: an orbit at the cameras' mean elevation and distance, every camera looking at the origin
    orbit = load(tmp_path, n_test_traj_steps=8).split("trajectory").c2w.numpy()
    assert orbit.shape[0] == 8

    def elevation(poses):
        return np.arcsin(poses[:, 2, 3] / np.linalg.norm(poses[:, :3, 3], axis=1))

    np.testing.assert_allclose(elevation(orbit), elevation(c2w).mean(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(orbit[:, :3, 3], axis=1),
                               np.linalg.norm(c2w[:, :3, 3], axis=1).mean(), atol=1e-5)
    looking = -orbit[:, :3, 2]  # OpenGL cameras look down -z
    to_origin = -orbit[:, :3, 3] / np.linalg.norm(orbit[:, :3, 3], axis=1, keepdims=True)
    assert np.abs((looking * to_origin).sum(1) - 1).max() < 1e-5
    # the overview PLY: sparse points, 60 points per camera frustum (red), the region-of-interest box (green)
    path = tmp_path / "overview.ply"
    assert dm.write_overview(str(path))
    cloud = trimesh.load(path)
    red = (cloud.colors[:, :3] == [255, 0, 0]).all(1).sum()
    assert red == 60 * len(cams)


def test_sparse_points_come_in_the_model_s_frame_those_seen_by_three_images_or_more(tmp_path, monkeypatch):
    """What system.loss.lambda_sparse_points pulls the SDF to: the model's points, normalised as the cameras are;
    points seen by two images (mostly mismatches in a real capture) are left out. The sightlines of
    lambda_free_space join each point to the cameras that see it."""
    import pycolmap

    from datasets import colmap

    cams = cameras_with(50.0, 50.0)
    write_capture(tmp_path, cams, "PINHOLE", [50.0, 50.0, 31.0, 25.5], pinhole_render)
    dm = load(tmp_path)
    w = dm.split("train").world_from_scene
    points = dm.sparse_points()
    tracks = [p.track.length() for p in pycolmap.Reconstruction(str(tmp_path / "sparse" / "0")).points3D.values()]
    assert len(points) == len(tracks) == 400 and min(tracks) == 10  # every point is seen by all ten cameras
    monkeypatch.setattr(colmap, "MIN_TRACK", 11)
    assert len(dm.sparse_points()) == 0
    monkeypatch.undo()
    world = points @ w[:3, :3].T + w[:3, 3]
    nearest = np.linalg.norm(world[:, None] - scene_points()[None], axis=2).min(1)
    assert nearest.max() < 1e-5 * np.linalg.norm(w[:3, 0])
    assert np.abs(points).max() < 1.0  # the demo object fits the model's box
    # lambda_free_space's sightlines: each image that sees a point, from its camera to the point, normalised
    lines = dm.free_sightlines()
    assert lines.shape == (sum(tracks), 2, 3)
    world = lines @ w[:3, :3].T + w[:3, 3]
    centres = np.array([cam.c2w[:3, 3] for cam in cams])
    tolerance = 1e-5 * np.linalg.norm(w[:3, 0])
    assert np.linalg.norm(world[:, 0, None] - centres[None], axis=2).min(1).max() < tolerance
    assert np.linalg.norm(world[:, 1, None] - scene_points()[None], axis=2).min(1).max() < tolerance


def test_a_capture_from_one_side_sweeps_its_video_across_the_cameras_arc(tmp_path, caplog):
    """Photos from the front half of an object only: the video goes out and back across the cameras' arc (in the
    normalised frame the loader builds), not round the back; dataset.video_trajectory=orbit still turns all round,
    and a value that is neither is refused at start-up."""
    cams = [cam for k, cam in enumerate(cameras_with(50.0, 50.0, n=16)) if k in (14, 15, 0, 1, 2, 3)]  # 135 degrees
    write_capture(tmp_path, cams, "SIMPLE_PINHOLE", [50.0, 31.0, 25.5], lambda cam: np.zeros((H, W, 3), np.uint8))

    def azimuths(poses):
        return np.degrees(np.arctan2(poses[:, 1, 3], poses[:, 0, 3]))

    train = load(tmp_path).split("train").c2w.numpy()
    first = azimuths(train)[0]
    seen = np.mod(azimuths(train) - first + 180, 360) - 180  # about the first camera: no wrap inside the arc
    video = np.mod(azimuths(load(tmp_path, n_test_traj_steps=16).split("trajectory").c2w.numpy()) - first + 180,
                   360) - 180
    assert np.isclose(video.min(), seen.min(), atol=1e-3) and np.isclose(video.max(), seen.max(), atol=1e-3)
    assert abs(seen.max() - seen.min() - 112.5) < 1e-3  # about the world's up: the estimated one is that
    nothing_held_out = load(tmp_path, holdout_every=0)  # val and test are the video's path: said once, for the test
    caplog.clear()  # the loads above may have logged (at INFO where an earlier test left the logger so)
    with caplog.at_level("INFO", logger="nsr"):
        nothing_held_out.split("val")
        assert "Test video" not in caplog.text
        nothing_held_out.split("test")
    assert caplog.text.count("Test video: back and forth across the") == 1  # 112.5 degrees, a loop over 20-60
    assert "degrees of azimuth the cameras cover, looping over their 40 degrees of elevation" in caplog.text
    orbit = azimuths(load(tmp_path, n_test_traj_steps=16, video_trajectory="orbit").split("trajectory").c2w.numpy())
    np.testing.assert_allclose(np.diff(np.sort(np.mod(orbit, 360))), 22.5, atol=1e-3)
    with pytest.raises(ConfigError, match="dataset.video_trajectory is 'spiral'; use auto"):
        load(tmp_path, video_trajectory="spiral")


def test_opencv_lens_is_undistorted_at_load(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "W", 128)  # finer pixels: interpolation error well below the lens' displacement
    monkeypatch.setitem(globals(), "H", 96)
    fx, fy, cx, cy = 100.0, 100.0, 63.0, 47.5
    coeffs = (-0.3, 0.08, 0.002, -0.003)
    cams = cameras_with(fx, fy, n=6)
    for cam in cams:
        cam.K, cam.width, cam.height = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]]), W, H

    def distorted_render(cam):
        v, u = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
        xy_d = np.stack([(u.ravel() - cx) / fx, (v.ravel() - cy) / fy], -1)
        xy = opencv_undistort(xy_d, coeffs)
        assert np.abs(opencv_distort(xy, *coeffs) - xy_d).max() < 1e-9
        d_cam = np.concatenate([xy, np.ones((len(xy), 1))], 1)
        d = d_cam @ cam.c2w[:3, :3].T
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        o = np.broadcast_to(cam.c2w[:3, 3], d.shape).copy()
        rgb = render_rays(DemoScene(), torch.from_numpy(o).float(), torch.from_numpy(d).float())
        return to_uint8(rgb.view(H, W, 3).numpy())

    def project(_, pts):
        xy = opencv_distort(pts[:, :2] / pts[:, 2:], *coeffs)
        return np.stack([fx * xy[:, 0] + cx, fy * xy[:, 1] + cy], -1)

    write_capture(tmp_path, cams, "OPENCV", [fx, fy, cx, cy, *coeffs], distorted_render, project=project)
    data = load(tmp_path).split("train")
    errors, ignored = [], []
    for k, cam in enumerate(cams):
        o, d = world_rays(data, k, data.world_from_scene)
        seen = render_rays(DemoScene(), torch.from_numpy(o).float(), torch.from_numpy(d).float()).numpy()
        loaded = data.images[k].numpy().reshape(-1, 3) / 255.0
        errors.append(np.abs(loaded - seen).mean())
        # the same image read as if the lens had no distortion: what a loader ignoring it would train on
        raw = distorted_render(cam).reshape(-1, 3) / 255.0
        ignored.append(np.abs(raw - pinhole_render(Camera(K=np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]]),
                                                          c2w=cam.c2w, width=W, height=H)).reshape(-1, 3) / 255.0
                              ).mean())
    assert np.mean(errors) < 0.03, f"undistorted images vs their rays: mean colour error {np.mean(errors):.4f}"
    assert np.mean(ignored) > 3 * np.mean(errors), (np.mean(ignored), np.mean(errors))


def test_a_mask_is_brought_to_its_images_stored_pixels_and_size():
    from datasets.images import mask_for_image

    stored = np.zeros((48, 64), np.uint8)  # a landscape sensor image whose top rows (as stored) are foreground
    stored[:12] = 255
    shown = np.ascontiguousarray(np.rot90(stored, -1))  # the photo shown a quarter turn clockwise: 64x48
    half_shown = shown[::2, ::2]
    for mask, turns in ((stored, 0), (stored, 1), (shown, 1), (half_shown, 1), (stored[::2, ::2], 1)):
        np.testing.assert_array_equal(mask_for_image(mask, (48, 64), "m.png", turns), stored)
    square = np.zeros((32, 32), np.uint8)
    assert mask_for_image(square[::2, ::2], (32, 32), "m.png", 1).shape == (32, 32)  # no turn to tell: as stored
    with pytest.raises(DatasetError, match=r"^Mask m.png is 64x64 but its image is 64x48, another aspect ratio"):
        mask_for_image(np.zeros((64, 64), np.uint8), (48, 64), "m.png", 1)


def test_masks_by_stem_and_the_clear_errors(tmp_path):
    cams = cameras_with(50.0, 50.0, n=4)
    write_capture(tmp_path, cams, "PINHOLE", [50.0, 50.0, 31.0, 25.5], pinhole_render, image_ext=".jpg")
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(4):  # COLMAP's own naming for two, the plain stem for the others
        name = f"img_{i:03d}.jpg.png" if i < 2 else f"img_{i:03d}.png"
        mask = np.zeros((H, W), np.uint8)
        mask[10:30, 20:40] = 255
        write_image(str(masks / name), mask)
    data = load(tmp_path).split("train")
    assert data.has_mask and data.masks.shape == (4, H, W)
    assert int(data.masks[2, 20, 30]) == 255 and int(data.masks[2, 5, 5]) == 0

    os.remove(masks / "img_003.png")
    with pytest.raises(DatasetError, match="1 of 4 images have no mask.*img_003.jpg"):
        load(tmp_path).split("train")
    for f in os.listdir(masks):
        os.rename(masks / f, masks / ("other_" + f))
    with pytest.raises(DatasetError, match="matches an image name"):
        load(tmp_path).split("train")


def test_a_rig_s_images_in_folders_take_the_masks_at_their_own_paths(tmp_path):
    """COLMAP names a rig's images by folder (``left/img_000.png``, ``right/img_000.png``) and finds their masks at
    the same paths under the mask folder. Masks in folders were not found at all, and flat masks named by the base
    name, which both share, gave both one mask without a word."""
    cams = cameras_with(50.0, 50.0, n=4)
    views = []
    for i, cam in enumerate(cams):
        name = f"{'left' if i % 2 == 0 else 'right'}/img_{i // 2:03d}.png"
        os.makedirs(tmp_path / "images" / os.path.dirname(name), exist_ok=True)
        write_image(str(tmp_path / "images" / name), pinhole_render(cam))
        views.append((name, 0, cam.c2w))
    write_colmap_text(str(tmp_path / "sparse" / "0"), [("PINHOLE", W, H, [50.0, 50.0, 31.0, 25.5])], views,
                      scene_points())
    masks = tmp_path / "masks"
    for name, _, _ in views:  # COLMAP's naming for the left camera, the plain stem for the right one
        mask = np.zeros((H, W), np.uint8)
        mask[:, :W // 2 if name.startswith("left") else W] = 255
        path = masks / (name + ".png" if name.startswith("left") else name)
        os.makedirs(path.parent, exist_ok=True)
        write_image(str(path), mask)
    data = load(tmp_path).split("train")
    left = [k for k, n in enumerate(data.names) if n.startswith("left")]
    right = [k for k, n in enumerate(data.names) if n.startswith("right")]
    assert len(left) == len(right) == 2
    assert all(int(data.masks[k, 5, W - 5]) == 0 for k in left) and all(int(data.masks[k, 5, W - 5]) == 255
                                                                        for k in right)
    shutil.rmtree(masks)  # flat masks named by the base name alone: which image's is which?
    masks.mkdir()
    for i in range(2):
        write_image(str(masks / f"img_{i:03d}.png"), np.full((H, W), 255, np.uint8))
    with pytest.raises(DatasetError, match=r"Images left/img_000.png and right/img_000.png would both take the mask"):
        load(tmp_path).split("train")


def test_mixed_image_sizes_train_at_one_size_and_other_aspect_ratios_need_img_wh(tmp_path, caplog):
    """A rig's cameras of one aspect ratio train at the most common size (or img_wh), each view's camera scaled
    with its image; another aspect ratio is refused unless img_wh is given."""
    cams = cameras_with(50.0, 50.0, n=4)
    root = tmp_path
    os.makedirs(root / "images")
    views = []
    small = Camera(K=np.array([[25.0, 0, 15.5], [0, 25.0, 12.75], [0, 0, 1]]), c2w=cams[0].c2w, width=32, height=24)
    for i, cam in enumerate(cams):
        use = small if i == 3 else cam
        use = Camera(K=use.K, c2w=cam.c2w, width=use.width, height=use.height)
        write_image(str(root / "images" / f"img_{i}.png"), pinhole_render(use))
        views.append((f"img_{i}.png", 1 if i == 3 else 0, cam.c2w))
    write_colmap_text(str(root / "sparse" / "0"), [("PINHOLE", W, H, [50.0, 50.0, 31.0, 25.5]),
                                                  ("PINHOLE", 32, 24, [25.0, 25.0, 15.5, 12.75])],
                      views, scene_points())
    with caplog.at_level(logging.INFO, logger="nsr"):
        for data in (load(root).split("train"), load(root, img_wh=[W, H]).split("train")):
            assert data.images.shape[1:3] == (H, W)
            o, d = world_rays(data, 3, data.world_from_scene)
            o_true, d_true = (t.double().numpy() for t in cams[3].rays())
            assert max_ray_angle_deg(torch.from_numpy(d), torch.from_numpy(d_true)) < 1e-3
    assert "are of 2 sizes with one aspect ratio (3 at 64x48, 1 at 32x24): each is scaled to 64x48" in caplog.text
    write_image(str(root / "images" / "img_3.png"), np.zeros((32, 32, 3), np.uint8))  # square: another aspect
    write_colmap_text(str(root / "sparse" / "0"), [("PINHOLE", W, H, [50.0, 50.0, 31.0, 25.5]),
                                                  ("PINHOLE", 32, 32, [25.0, 25.0, 15.5, 15.5])],
                      views, scene_points())
    with pytest.raises(DatasetError, match="mixed sizes of different aspect ratios: img_3.png is 32x32 but "
                                           r"img_0.png is 64x48; set dataset.img_wh=\[W,H\]"):
        load(root).split("train")
    assert load(root, img_wh=[W, H]).split("train").images.shape[1:3] == (H, W)


def test_missing_model_and_image_are_one_sentence(tmp_path):
    os.makedirs(tmp_path / "images")
    with pytest.raises(DatasetError, match="No COLMAP model.*imgs2poses"):
        load(tmp_path).split("train")
    cams = cameras_with(50.0, 50.0, n=3)
    write_capture(tmp_path, cams, "PINHOLE", [50.0, 50.0, 31.0, 25.5], pinhole_render)
    os.remove(tmp_path / "images" / "img_001.png")
    with pytest.raises(DatasetError, match="img_001.png"):
        load(tmp_path).split("train")


def test_a_scene_of_another_layout_names_the_configs_that_read_it(tmp_path):
    """A DTU folder given to a COLMAP config was told to run SfM on it, a Blender scene given to a DTU config to set
    dataset.cameras_file; each names what the folder is and the configs of its loader instead."""
    from datasets.blender import load_blender_split
    from datasets.dtu import load_dtu_split

    dtu, blender, colmap = tmp_path / "dtu_scan24", tmp_path / "lego", tmp_path / "mug"
    (dtu / "image").mkdir(parents=True)
    (dtu / "cameras_sphere.npz").write_bytes(b"")
    blender.mkdir()
    (blender / "transforms_train.json").write_text("{}")
    write_capture(colmap, cameras_with(50.0, 50.0, n=3), "PINHOLE", [50.0, 50.0, 31.0, 25.5], pinhole_render)
    with pytest.raises(DatasetError, match=rf"No COLMAP model under {dtu} \(.*\); {dtu} is a NeuS/IDR \(DTU-format\) "
                                           r"scene .*: run it with --config configs/neus-dtu.yaml \(or configs/"
                                           r"neus-dtu-wmask.yaml, configs/neuralangelo-dtu-wmask.yaml\)\.$"):
        load(dtu).split("train")
    with pytest.raises(DatasetError, match=rf"{blender}/cameras_sphere.npz does not exist; {blender} is a Blender/"
                                           r".* run it with --config configs/nerf-blender.yaml \(or configs/"
                                           r"neus-blender.yaml\)\.$"):
        load_dtu_split(OmegaConf.create({"root_dir": str(blender)}), "train")
    with pytest.raises(DatasetError, match=rf"Neither .*; {colmap} is a COLMAP capture .*: run it with --config "
                                           r"configs/nerf-colmap.yaml \(or configs/neus-colmap.yaml\)\.$"):
        load_blender_split(OmegaConf.create({"root_dir": str(colmap)}), "train")
    with pytest.raises(DatasetError, match=r"NeuS/IDR \(DTU-format\) scene"):  # the data module's check of splits
        datasets.make("blender", OmegaConf.create({"root_dir": str(dtu)}))
    # a folder of such a scene (a DTU scan's image/): the scene folder is named, to give as dataset.root_dir
    with pytest.raises(DatasetError, match=rf"{dtu}/image lies inside {dtu}, which is a NeuS/IDR \(DTU-format\) scene "
                                           rf".*: run it with --config configs/neus-dtu.yaml dataset.root_dir={dtu} "
                                           r"\(or "):
        load(dtu / "image").split("train")
    (dtu / "cameras_sphere.npz").unlink()  # a folder of none of them: the advice of before
    with pytest.raises(DatasetError, match=rf"sparse/0/cameras.bin\|txt\); run python scripts/imgs2poses.py {dtu} "
                                           r"first\.$"):
        load(dtu).split("train")


def test_of_several_models_the_largest_is_used_and_named(tmp_path, caplog):
    """COLMAP's mapper leaves one model per group of images it could not join, and sparse/0 is not always the
    largest: sparse/0 (text, 3 images) was taken over sparse/1 (binary, 7 images), silently training on 3."""
    from datasets.colmap_model import import_pycolmap

    cams = cameras_with(50.0, 50.0, n=10)
    write_capture(tmp_path, cams, "PINHOLE", [50.0, 50.0, 31.0, 25.5], pinhole_render)  # sparse/0: all 10
    views = [(f"img_{i:03d}.png", 0, cam.c2w) for i, cam in enumerate(cams)]
    write_colmap_text(str(tmp_path / "text1"), [("PINHOLE", W, H, [50.0, 50.0, 31.0, 25.5])], views[3:],
                      scene_points())
    os.makedirs(tmp_path / "sparse" / "1")
    import_pycolmap().Reconstruction(str(tmp_path / "text1")).write_binary(str(tmp_path / "sparse" / "1"))
    write_colmap_text(str(tmp_path / "sparse" / "0"), [("PINHOLE", W, H, [50.0, 50.0, 31.0, 25.5])], views[:3],
                      scene_points())
    with caplog.at_level("INFO", logger="nsr"):
        data = load(tmp_path).split("train")
    assert data.n_images == 7
    said = caplog.text
    assert f"COLMAP model: {tmp_path / 'sparse' / '1'}, the largest of the 2 models COLMAP made, with 7 " \
           "registered images (sparse/0 has 3)." in said, said
    assert f"COLMAP capture: 7 of the 10 images in {tmp_path / 'images'} registered, " in said, said


def phone_held_upright(n=8):
    """Portrait photos (48x64 as shown) stored as the sensor reads them (64x48) with EXIF orientation 6.

    Half an orbit (the front of an object against a wall). Returns the upright cameras (as the photos are
    shown) and the stored ones (what COLMAP solves for)."""
    shown = orbit_cameras(2 * n, 2.6, [20, 40, 60], H, W)[:n]
    stored = []
    for cam in shown:
        K, (w, h) = turn_intrinsics_clockwise(cam.K, cam.width, cam.height, quarter_turns=3)
        stored.append(Camera(K=K, c2w=turn_pose_clockwise(cam.c2w, quarter_turns=3), width=w, height=h))
    return shown, stored


def write_phone_capture(root, stored, orientation):
    from PIL import Image

    os.makedirs(root / "images")
    for i, cam in enumerate(stored):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(pinhole_render(cam)).save(root / "images" / f"IMG_{i:04d}.png", exif=exif)
    K = stored[0].K
    write_colmap_text(str(root / "sparse" / "0"), [("PINHOLE", W, H, [K[0, 0], K[1, 1], K[0, 2], K[1, 2]])],
                      [(f"IMG_{i:04d}.png", 0, cam.c2w) for i, cam in enumerate(stored)], scene_points())


def test_a_camera_turned_a_quarter_sees_the_image_turned_a_quarter():
    shown, stored = phone_held_upright(n=2)
    for up, side in zip(shown, stored):
        assert (side.width, side.height) == (W, H)
        turned = np.rot90(pinhole_render(side), -1)  # a quarter clockwise, as a viewer shows orientation 6
        assert np.abs(turned.astype(int) - pinhole_render(up).astype(int)).max() <= 1


def test_phone_photos_shown_turned_are_used_as_shown_with_the_world_up(tmp_path):
    shown, stored = phone_held_upright()
    up_in_world, loaded = {}, {}
    for orientation in (6, 1):  # 1: the same pixels without the tag
        root = tmp_path / f"orientation{orientation}"
        write_phone_capture(root, stored, orientation)
        loaded[orientation] = data = load(root, n_test_traj_steps=6).split("train")
        scene_z = data.world_from_scene[:3, :3] @ [0.0, 0.0, 1.0]
        up_in_world[orientation] = scene_z / np.linalg.norm(scene_z)
    # up_est_method=camera: square to the photos' rows as shown, the world's +z, for the phone was held level;
    # the photos' mean up, which it was, leans 27 degrees towards the object they look down on. Without the tag,
    # the sensors' rows are all upright and span no plane: their mean up, which points sideways
    shown_up = -np.stack([cam.c2w[:3, 1] for cam in shown]).mean(0)  # OpenCV y points down
    shown_up /= np.linalg.norm(shown_up)
    assert up_in_world[6][2] > 1 - 1e-9 and 0.85 < shown_up[2] < 0.9
    assert abs(up_in_world[1] @ shown_up) < 0.2

    # with the tag: the photos as shown (portrait) and the rays of the upright cameras; without: as stored
    for orientation, cams in ((6, shown), (1, stored)):
        data = loaded[orientation]
        assert data.images.shape == (len(cams), cams[0].height, cams[0].width, 3)
        for k in (0, 5):
            assert np.abs(data.images[k].numpy().astype(int) - pinhole_render(cams[k]).astype(int)).max() <= 1
            o, d = world_rays(data, k, data.world_from_scene)
            o_true, d_true = (t.double().numpy() for t in cams[k].rays())
            assert np.abs(o - o_true).max() < 1e-5
            assert max_ray_angle_deg(torch.from_numpy(d), torch.from_numpy(d_true)) < 1e-3

    orbit = load(tmp_path / "orientation6", n_test_traj_steps=6).split("trajectory")
    assert orbit.images.shape == (6, W, H, 3)  # portrait, as the photos are shown
    np.testing.assert_allclose(orbit.intrinsics[0].numpy(), [shown[0].K[0, 0], shown[0].K[1, 1], H / 2, W / 2],
                               atol=1e-4)
    image_up = orbit.c2w[:, :3, 1].numpy()  # OpenGL camera y in the scene, whose +z is the world's up
    assert image_up[:, 2].min() > 0.45 and np.abs(orbit.c2w[:, 2, 0].numpy()).max() < 1e-5  # upright, level
    # img_wh is the size as shown
    half = load(tmp_path / "orientation6", img_wh=[H // 2, W // 2]).split("train")
    assert half.images.shape[1:3] == (W // 2, H // 2)

    # a mask may be drawn on the photo as shown (portrait) or as stored (landscape)
    masks = tmp_path / "orientation6" / "masks"
    masks.mkdir()
    shown_mask = np.zeros((W, H), np.uint8)
    shown_mask[:20] = 255  # the top of the photo as shown
    for i in range(len(stored)):
        write_image(str(masks / f"IMG_{i:04d}.png"), shown_mask if i % 2 else np.rot90(shown_mask, 1))
    data = load(tmp_path / "orientation6").split("train")
    for k in (0, 1):
        np.testing.assert_array_equal(data.masks[k].numpy(), shown_mask)

    # one photo without the tag: orientations disagree, so all are used as stored; the up still counts each
    # photo the way it is shown (seven upright, one sideways: it pulls the up 6 degrees off the world's)
    write_image(str(tmp_path / "orientation6" / "images" / "IMG_0000.png"), pinhole_render(stored[0]))
    mixed = load(tmp_path / "orientation6").split("train")
    assert mixed.images.shape[1:3] == (H, W)
    scene_z = mixed.world_from_scene[:3, :3] @ [0.0, 0.0, 1.0]
    assert scene_z[2] / np.linalg.norm(scene_z) > 0.99
