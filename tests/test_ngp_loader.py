"""instant-ngp / nerfstudio ``transforms.json`` captures against the renderer's known cameras.

The renderer's cameras are written in a frame moved, turned and scaled by a
known similarity (as nerfstudio leaves COLMAP's frame); the loader must find
the same normalised scene whatever the similarity, and its rays, taken back
with ``world_from_scene``, must be the file's. Lenses (OPENCV with k3,
OPENCV_FISHEYE) are rendered through a forward model written here, and the
undistorted images must show what the loader's pinhole rays see.
"""
import json
import logging
import os

import numpy as np
import pytest
import torch
import trimesh
from omegaconf import OmegaConf

import datasets
from datasets.base import DatasetError
from datasets.rays import opencv_to_opengl
from datasets.synthetic import DemoScene, demo_surface, orbit_cameras, render_rays
from helpers import fisheye_distort, fisheye_undistort, max_ray_angle_deg, opencv_distort, opencv_undistort
from utils.io import to_uint8, write_image

W, H = 64, 48
LENSES = {"OPENCV": (opencv_distort, opencv_undistort), "OPENCV_FISHEYE": (fisheye_distort, fisheye_undistort)}


def similarity(scale: float, seed: int) -> np.ndarray:
    """(4, 4) file_from_world: a random rotation, ``scale`` and an offset far from the origin."""
    q = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))[0]
    q *= np.sign(np.linalg.det(q))
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = scale * q, [4.0, -2.0, 7.0]
    return out


def render(cam, lens=None, coeffs=()):
    """(H, W, 3) uint8 view of the demo scene through ``lens`` (None: pinhole) with the camera's K."""
    fx, fy, cx, cy = cam.K[0, 0], cam.K[1, 1], cam.K[0, 2], cam.K[1, 2]
    v, u = np.meshgrid(np.arange(cam.height) + 0.5, np.arange(cam.width) + 0.5, indexing="ij")
    xy = np.stack([(u.ravel() - cx) / fx, (v.ravel() - cy) / fy], -1)
    if lens is not None:
        xy = LENSES[lens][1](xy, coeffs)
    d = np.concatenate([xy, np.ones((len(xy), 1))], 1) @ cam.c2w[:3, :3].T
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    o = np.broadcast_to(cam.c2w[:3, 3], d.shape).copy()
    rgb = render_rays(DemoScene(), torch.from_numpy(o).float(), torch.from_numpy(d).float())
    return to_uint8(rgb.view(cam.height, cam.width, 3).numpy())


def write_capture(root, cams, file_from_world=np.eye(4), images=None, **fields):
    """images/frame_XXXX.png and a transforms.json whose OpenGL c2w are the cameras moved by file_from_world."""
    os.makedirs(root / "images", exist_ok=True)
    frames = []
    for i, cam in enumerate(cams):
        write_image(str(root / "images" / f"frame_{i:04d}.png"), images[i] if images is not None else render(cam))
        c2w = file_from_world @ opencv_to_opengl(torch.from_numpy(cam.c2w)).numpy()
        c2w[:3, :3] /= np.cbrt(np.linalg.det(file_from_world[:3, :3]))
        frames.append({"file_path": f"images/frame_{i:04d}.png", "transform_matrix": c2w.tolist()})
    k = cams[0].K
    meta = {"fl_x": k[0, 0], "fl_y": k[1, 1], "cx": k[0, 2], "cy": k[1, 2], "w": cams[0].width,
            "h": cams[0].height, "frames": frames, **fields}
    with open(root / "transforms.json", "w") as f:
        json.dump(meta, f)


def load(root, **overrides):
    return datasets.make("blender", OmegaConf.create({"name": "blender", "root_dir": str(root), **overrides}))


def to_world(data, k):
    """Loader rays of view k mapped back to the file's frame: (origins, unit directions) as float64 arrays."""
    rays, m = data.image_rays(k), data.world_from_scene
    o = rays["rays_o"].double().numpy() @ m[:3, :3].T + m[:3, 3]
    d = rays["rays_d"].double().numpy() @ m[:3, :3].T
    return o, d / np.linalg.norm(d, axis=1, keepdims=True)


def test_any_frame_normalises_to_one_scene_and_rays_map_back(tmp_path):
    cams = orbit_cameras(6, 2.6, [20, 45], W, H, fov_x_deg=50)
    images, heights = [render(c) for c in cams], []
    for seed, scale in ((0, 1.0), (1, 0.31), (2, 7.5)):
        root = tmp_path / f"s{seed}"
        file_from_world = np.eye(4) if seed == 0 else similarity(scale, seed)
        write_capture(root, cams, file_from_world, images=images)
        data = load(root, holdout_every=0).split("train")
        assert data.n_images == 6 and (data.width, data.height) == (W, H) and not data.has_mask
        for k, cam in enumerate(cams):
            o, d = to_world(data, k)
            o_true, d_true = (t.double().numpy() for t in cam.rays())
            o_file = o_true @ file_from_world[:3, :3].T + file_from_world[:3, 3]
            d_file = d_true @ file_from_world[:3, :3].T
            assert np.abs(o - o_file).max() < 1e-4 * scale
            angle = max_ray_angle_deg(torch.from_numpy(d), torch.from_numpy(d_file))
            assert angle < 1e-3, f"view {k}: rays off by {angle:.4f} degrees"
        # the normalised scene: the cameras look at the origin from mean distance 4, +z up, whatever the frame
        centres = data.c2w[:, :, 3].double().numpy()
        assert abs(np.linalg.norm(centres, axis=1).mean() - 4.0) < 1e-4
        object_centre = np.linalg.inv(data.world_from_scene) @ file_from_world @ np.array([0, 0, 0, 1.0])
        assert np.abs(object_centre[:3]).max() < 1e-4
        up = data.c2w[:, :, 1].double().numpy().mean(0)
        assert np.abs(up[:2]).max() < 1e-5 and up[2] > 0.5
        assert all(np.array_equal(data.images[k].numpy(), images[k]) for k in range(6))
        heights.append(np.sort(centres[:, 2]))
    for h in heights[1:]:  # the same scene up to a turn about +z: the same camera heights
        np.testing.assert_allclose(h, heights[0], atol=1e-4)
    # cameras on one side of the object, looking down on it: +z is the world's up, square to their level x axes
    # (their mean up leaned 26 degrees towards the object, and the video's frames rolled with it)
    one_side = orbit_cameras(14, 2.6, [30], W, H)[:5]  # 103 degrees of azimuth
    write_capture(tmp_path / "one-side", one_side, similarity(1.7, 3),
                  images=[np.zeros((H, W, 3), np.uint8)] * len(one_side))
    data = load(tmp_path / "one-side", holdout_every=0).split("train")
    scene_up = np.linalg.inv(similarity(1.7, 3)) @ data.world_from_scene @ [0.0, 0.0, 1.0, 0.0]
    assert scene_up[2] / np.linalg.norm(scene_up) > 1 - 1e-9
    # normalize=false keeps the file's frame; its video stays upright about the world's up there (it turned about
    # the file's z, whatever that was)
    data = load(tmp_path / "s1", holdout_every=0, normalize=False).split("train")
    np.testing.assert_allclose(data.world_from_scene, np.eye(4))
    o, _ = to_world(data, 0)
    assert np.abs(o[0] - similarity(0.31, 1)[:3] @ np.append(cams[0].c2w[:3, 3], 1)).max() < 1e-4
    video = load(tmp_path / "s1", normalize=False, n_test_traj_steps=6).split("trajectory").c2w.double().numpy()
    up = similarity(0.31, 1)[:3, :3] @ [0.0, 0.0, 1.0]
    assert np.abs(video[:, :3, 0] @ up).max() < 1e-5 * np.linalg.norm(up)  # level: every x axis square to up
    assert (video[:, :3, 1] @ up).min() > 0  # and its image's top towards it


def test_radius_sizes_the_scene_by_the_sparse_points_in_any_frame(tmp_path, caplog):
    """nerfstudio's sparse_pc.ply (``ply_file_path``) is in the frames' frame; ``dataset.radius`` puts the
    object's region of interest inside that radius whatever the file's scale, as the colmap loader does."""
    cams = orbit_cameras(6, 2.6, [20, 45], W, H, fov_x_deg=50)
    images = [render(c) for c in cams]
    surface = demo_surface(48)[0]
    surface = surface[np.random.default_rng(0).choice(len(surface), 500, replace=False)]
    distances = []
    for seed, scale in ((1, 0.31), (2, 7.5)):
        root = tmp_path / f"s{seed}"
        file_from_world = similarity(scale, seed)
        write_capture(root, cams, file_from_world, images=images, ply_file_path="sparse_pc.ply")
        trimesh.PointCloud(surface @ file_from_world[:3, :3].T + file_from_world[:3, 3]).export(root / "sparse_pc.ply")
        with caplog.at_level(logging.INFO, logger="nsr"):
            dm = load(root, holdout_every=0, radius=0.8)
            data = dm.split("train")
        scene_from_file = np.linalg.inv(data.world_from_scene)
        points = (surface @ file_from_world[:3, :3].T + file_from_world[:3, 3]) @ scene_from_file[:3, :3].T \
            + scene_from_file[:3, 3]
        np.testing.assert_allclose(dm.sparse_points(), points, atol=1e-5)  # lambda_sparse_points' points
        reach = np.linalg.norm(points, axis=1).max()
        assert 0.5 < reach < 0.8, f"the object reaches {reach:.3f} from the centre, radius 0.8 asked"
        distances.append(np.linalg.norm(data.c2w[:, :, 3].double().numpy(), axis=1))
    # one scene whatever the file's scale and frame; the percentile box is axis-aligned in the upright scene,
    # so the arbitrary turn about +z between the two frames moves its diagonal by a little (1.4% here)
    np.testing.assert_allclose(distances[0], distances[1], rtol=0.03)
    assert abs(distances[0].mean() - 4.0) > 0.5  # not the camera_distance rule
    assert (f"normalised by the sparse points' region of interest inside radius 0.8: cameras at mean distance "
            f"{distances[1].mean():.2f}") in caplog.text
    with pytest.raises(DatasetError, match="names no ply_file_path; set dataset.camera_distance instead"):
        write_capture(tmp_path / "none", cams[:2], images=images[:2])
        load(tmp_path / "none", radius=0.8).split("train")
    assert load(tmp_path / "none").sparse_points() is None


def test_smaller_images_than_declared_scale_the_intrinsics(tmp_path):
    """nerfstudio's images_2/: the file declares the full size and its focal length; the images are half."""
    cams = orbit_cameras(3, 2.6, [30], W, H, fov_x_deg=50)
    write_capture(tmp_path, cams)
    meta = json.load(open(tmp_path / "transforms.json"))
    meta.update(w=2 * W, h=2 * H, fl_x=2 * meta["fl_x"], fl_y=2 * meta["fl_y"], cx=2 * meta["cx"], cy=2 * meta["cy"])
    json.dump(meta, open(tmp_path / "transforms.json", "w"))
    data = load(tmp_path, holdout_every=0).split("train")
    for k, cam in enumerate(cams):
        _, d = to_world(data, k)
        assert max_ray_angle_deg(torch.from_numpy(d), cam.rays()[1].double()) < 1e-3
    meta.update(w=2 * W, h=W)
    json.dump(meta, open(tmp_path / "transforms.json", "w"))
    with pytest.raises(DatasetError, match="frame_0000.png is 64x48 but the transforms file declares 128x64"):
        load(tmp_path, holdout_every=0).split("train")


@pytest.mark.parametrize("lens,coeffs,fields", [
    ("OPENCV", (-0.28, 0.07, 0.002, -0.003, 0.01),
     {"camera_model": "OPENCV", "k1": -0.28, "k2": 0.07, "p1": 0.002, "p2": -0.003, "k3": 0.01}),
    ("OPENCV_FISHEYE", (0.05, -0.02, 0.01, -0.004),
     {"camera_model": "OPENCV_FISHEYE", "k1": 0.05, "k2": -0.02, "k3": 0.01, "k4": -0.004}),
    ("OPENCV_FISHEYE", (0.05, -0.02, 0.0, 0.0), {"is_fisheye": True, "k1": 0.05, "k2": -0.02}),  # instant-ngp
])
def test_lenses_are_undistorted_at_load(tmp_path, lens, coeffs, fields):
    w, h = 128, 96  # finer pixels: interpolation error well below the lens' displacement
    cams = orbit_cameras(4, 2.6, [25, 45], w, h, fov_x_deg=70)
    for cam in cams:
        cam.K[0, 2], cam.K[1, 2] = 63.0, 47.5
    distort, undistort = LENSES[lens]
    xy_d = distort(np.random.default_rng(0).uniform(-0.6, 0.6, (100, 2)), *coeffs)
    assert np.abs(distort(undistort(xy_d, coeffs), *coeffs) - xy_d).max() < 1e-9  # the inversion holds
    raw = [render(cam, lens, coeffs) for cam in cams]
    write_capture(tmp_path, cams, images=raw, **fields)
    data = load(tmp_path, holdout_every=0).split("train")
    errors, ignored = [], []
    for k, cam in enumerate(cams):
        o, d = to_world(data, k)
        seen = render_rays(DemoScene(), torch.from_numpy(o).float(), torch.from_numpy(d).float()).numpy()
        errors.append(np.abs(data.images[k].numpy().reshape(-1, 3) / 255.0 - seen).mean())
        # what a loader ignoring the lens would train on: the raw image against the pinhole view
        ignored.append(np.abs(raw[k].reshape(-1, 3) / 255.0 - render(cam).reshape(-1, 3) / 255.0).mean())
    assert np.mean(errors) < 0.012, f"undistorted images vs their rays: mean colour error {np.mean(errors):.4f}"
    assert np.mean(ignored) > 3 * np.mean(errors), (np.mean(ignored), np.mean(errors))


def test_frames_of_two_sizes_give_every_split_and_the_video_one_size(tmp_path):
    """Frames 0 and 3 photographed at twice the resolution (their own w, h and focal length, as nerfstudio writes
    per-frame intrinsics), and held out: each split used to take the size most of its own frames had, so the test
    views were scored at 128x96 against a model trained at 64x48, and the video took frame 0's size."""
    import dataclasses

    cams = orbit_cameras(6, 2.6, [20, 45], W, H, fov_x_deg=50)
    big = {k: dataclasses.replace(cams[k], K=cams[k].K * np.array([[2], [2], [1]]), width=2 * W, height=2 * H)
           for k in (0, 3)}
    write_capture(tmp_path, cams, images=[render(big.get(k, cam)) for k, cam in enumerate(cams)])
    meta = json.load(open(tmp_path / "transforms.json"))
    for k, cam in big.items():
        meta["frames"][k].update(w=cam.width, h=cam.height, fl_x=cam.K[0, 0], fl_y=cam.K[1, 1], cx=cam.K[0, 2],
                                 cy=cam.K[1, 2])
    json.dump(meta, open(tmp_path / "transforms.json", "w"))
    dm = load(tmp_path, holdout_every=3, n_test_traj_steps=2)
    train, test, orbit = dm.split("train"), dm.split("test"), dm.trajectory()
    assert test.names == ["images/frame_0000.png", "images/frame_0003.png"]
    assert (train.width, train.height) == (test.width, test.height) == (orbit.width, orbit.height) == (W, H)
    for data, views in ((train, [1, 2, 4, 5]), (test, [0, 3])):
        for k, view in enumerate(views):  # each frame scaled by its own size: the rays of the camera at 64x48
            _, d = to_world(data, k)
            assert max_ray_angle_deg(torch.from_numpy(d), cams[view].rays()[1].double()) < 1e-3


def test_holdout_and_the_video_orbit(tmp_path):
    cams = orbit_cameras(6, 2.6, [20, 45], W, H, fov_x_deg=50)
    write_capture(tmp_path, cams, similarity(0.5, 3))
    dm = load(tmp_path, holdout_every=3, n_test_traj_steps=5)
    train, test = dm.split("train"), dm.split("test")
    assert (train.n_images, test.n_images) == (4, 2) and test.has_gt
    assert test.names == ["images/frame_0000.png", "images/frame_0003.png"]
    orbit = dm.trajectory()
    assert orbit.n_images == 5 and not orbit.has_gt
    centres = orbit.c2w[:, :, 3].double().numpy()
    seen = train.c2w[:, :, 3].double().numpy()  # the orbit: at the training cameras' mean elevation and distance
    np.testing.assert_allclose(centres[:, 2] / np.linalg.norm(centres, axis=1),
                               (seen[:, 2] / np.linalg.norm(seen, axis=1)).mean(), atol=0.02)
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), np.linalg.norm(seen, axis=1).mean(), atol=1e-5)
    looking = -orbit.c2w[:, :, 2].double().numpy()  # OpenGL cameras look down -z, here at the origin
    assert np.abs((looking * -centres / np.linalg.norm(centres, axis=1, keepdims=True)).sum(1) - 1).max() < 1e-5
    no_holdout = load(tmp_path, holdout_every=0, n_test_traj_steps=5)
    assert no_holdout.trajectory() is None and not no_holdout.split("test").has_gt
    with pytest.raises(DatasetError, match="holds out all 6 view.s., leaving none to train on"):
        load(tmp_path, holdout_every=1).split("train")
    os.replace(tmp_path / "transforms.json", tmp_path / "transforms_ns.json")  # named as nerfstudio's --data takes
    by_file = load(tmp_path / "transforms_ns.json", holdout_every=3, n_test_traj_steps=5)
    assert by_file.split("test").names == test.names and by_file.trajectory().n_images == 5
    torch.testing.assert_close(by_file.split("train").image_rays(1), train.image_rays(1), rtol=0, atol=0)


def test_bad_cameras_are_one_clear_sentence(tmp_path):
    cams = orbit_cameras(3, 2.6, [30], W, H)
    write_capture(tmp_path, cams)
    meta = json.load(open(tmp_path / "transforms.json"))

    def expect(message, **changes):
        json.dump({**meta, **changes}, open(tmp_path / "transforms.json", "w"))
        with pytest.raises(DatasetError, match=message):
            load(tmp_path, holdout_every=0).split("train")

    expect("camera_model EQUIRECTANGULAR is not supported", camera_model="EQUIRECTANGULAR")
    expect("k4 is set for a perspective .OPENCV. camera", camera_model="OPENCV", k1=0.1, k4=0.01)
    expect("fisheye camera with tangential distortion", camera_model="OPENCV_FISHEYE", p1=0.01)
    expect("Frame 'images/frame_0001.png' of .* has no finite 4x4 transform_matrix",
           frames=[meta["frames"][0], {"file_path": "images/frame_0001.png", "transform_matrix": [[1, 0]]}])
    expect("gives no focal length", fl_x=None, fl_y=None)
    first = meta["frames"][0]
    upside_down = (np.array(first["transform_matrix"]) * [1, -1, -1, 1]).tolist()  # the same place, turned over
    expect("cannot tell which way is up",
           frames=[first, {"file_path": "images/frame_0001.png", "transform_matrix": upside_down}])


MAGENTA = np.array([255, 0, 255], np.uint8)


def test_mask_path_pixels_are_never_trained_on(tmp_path):
    """nerfstudio's per-frame mask_path (0: do not train here; ns-process-data writes one for a crop, people
    paint out the photographer) was ignored: training sampled the masked pixels, here painted magenta. Now no
    training ray lands on one, and the rays stay uniform over the trained pixels (each view's share of the rays
    follows its count of them); held-out views keep their whole image."""
    cams = orbit_cameras(4, 2.6, [25, 40], W, H, fov_x_deg=50)
    images = [render(cam) for cam in cams]
    assert not any((image == MAGENTA).all(-1).any() for image in images), "the scene itself shows no magenta"
    keep = np.full((4, H, W), 255, np.uint8)
    keep[1, :, : W // 2] = 0  # the left half of view 1
    keep[2, -H // 4:] = 0  # a crop's bottom quarter in view 2; view 3 has no mask_path
    os.makedirs(tmp_path / "masks")
    for k in (1, 2):
        images[k][keep[k] == 0] = MAGENTA
        small = keep[k, ::2, ::2] if k == 2 else keep[k]  # nerfstudio's masks_2: half size, same aspect
        write_image(str(tmp_path / "masks" / f"mask_{k}.png"), (small > 0).astype(np.uint8))  # 0/1, as ns writes
    write_capture(tmp_path, cams, similarity(2.0, 5), images=images)
    meta = json.load(open(tmp_path / "transforms.json"))
    for k in (1, 2):
        meta["frames"][k]["mask_path"] = f"masks/mask_{k}.png"
    json.dump(meta, open(tmp_path / "transforms.json", "w"))

    dm = load(tmp_path, holdout_every=4)  # view 0 is held out
    train = dm.split("train")
    assert train.trained_pixels is not None and dm.split("test").trained_pixels is None
    np.testing.assert_array_equal(train.trained_pixels.numpy(), keep[1:] > 0)
    half = load(tmp_path, holdout_every=4, img_wh=[W // 2, H // 2]).split("train")  # masks resized with images
    np.testing.assert_array_equal(half.trained_pixels.numpy(), keep[1:, ::2, ::2] > 0)
    generator = torch.Generator().manual_seed(0)
    rays = train.train_rays(30000, True, generator)
    on_magenta = (rays["rgb"] == torch.tensor([1.0, 0.0, 1.0])).all(1)
    assert not bool(on_magenta.any()), f"{int(on_magenta.sum())} training rays on masked pixels"
    centres = train.c2w[:, :, 3]
    view = torch.cdist(rays["rays_o"], centres).argmin(1)
    share = torch.bincount(view, minlength=3).double() / len(view)
    kept = torch.tensor([(keep[k] > 0).sum() for k in (1, 2, 3)], dtype=torch.float64)
    np.testing.assert_allclose(share.numpy(), (kept / kept.sum()).numpy(), atol=0.015)

    one_image = train.train_rays(4096, False, generator)  # instant-nsr-pl's batch_image_sampling: false
    assert not bool((one_image["rgb"] == torch.tensor([1.0, 0.0, 1.0])).all(1).any())
    assert len(torch.cdist(one_image["rays_o"], centres).argmin(1).unique()) == 1


def test_a_mask_that_keeps_a_sliver_or_nothing(tmp_path):
    """A mask that keeps three pixels of one view still gives rays there (not a thousand rounds of redraws, nor
    rays on masked pixels); one that keeps none, or a missing mask file, is one sentence naming it."""
    cams = orbit_cameras(2, 2.6, [30], W, H)
    write_capture(tmp_path, cams)
    meta = json.load(open(tmp_path / "transforms.json"))
    os.makedirs(tmp_path / "masks")
    sliver = np.zeros((H, W), np.uint8)
    sliver[10, [5, 6, 40]] = 255
    write_image(str(tmp_path / "masks" / "sliver.png"), sliver)
    meta["frames"][0]["mask_path"] = "masks/sliver.png"
    json.dump(meta, open(tmp_path / "transforms.json", "w"))
    train = load(tmp_path, holdout_every=0).split("train")
    for batch_image_sampling in (True, False):
        rays = train.train_rays(2000, batch_image_sampling, torch.Generator().manual_seed(1))
        full = train.image_rays(0)
        in_view_0 = torch.cdist(rays["rays_o"], train.c2w[:, :, 3]).argmin(1) == 0
        angles = rays["rays_d"][in_view_0] @ full["rays_d"].T  # each ray is one of view 0's pixel rays
        pixels = angles.argmax(1)
        assert set(pixels.tolist()) <= {10 * W + 5, 10 * W + 6, 10 * W + 40}
        assert batch_image_sampling or len(pixels) in (0, 2000)

    write_image(str(tmp_path / "masks" / "sliver.png"), np.zeros((H, W), np.uint8))
    with pytest.raises(DatasetError, match="The mask of view images/frame_0000.png leaves no pixel to train on"):
        load(tmp_path, holdout_every=0).split("train")
    os.remove(tmp_path / "masks" / "sliver.png")
    with pytest.raises(DatasetError, match=r"The mask .*sliver.png \(the mask_path of images/frame_0000.png\) is "
                                           "missing"):
        load(tmp_path, holdout_every=0).split("train")
