"""NeuS/IDR (DTU, BlendedMVS) loader against the renderer's cameras, with a non-identity scale_mat."""
import os
import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from datasets.base import DatasetError
from datasets.dtu import load_dtu_split, orbit_trajectory
from datasets.synthetic import DemoScene, look_at, orbit_cameras, write_dtu
from helpers import max_ray_angle_deg
from utils.io import write_image

WORLD_FROM_SCENE = np.array([[1.7, 0, 0, 0.3], [0, 1.7, 0, -0.2], [0, 0, 1.7, 0.5], [0, 0, 0, 1.0]])


def cameras():
    cams = orbit_cameras(5, 2.6, [20, 50], 40, 32, fov_x_deg=45)
    cams[1].K[0, 2] += 2.5  # per-image intrinsics: an off-centre principal point
    return cams


@pytest.fixture(scope="module", params=[(6, 3), (3, 3)], ids=["dtu-padding", "blendedmvs-padding"])
def scene_dir(request, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dtu"))
    write_dtu(root, DemoScene(), cameras(), WORLD_FROM_SCENE, image_padding=request.param[0],
              mask_padding=request.param[1], supersample=1)
    return root


def cfg(root, **kw):
    return OmegaConf.create({"root_dir": root, **kw})


def test_rays_match_renderer_cameras_in_the_normalised_frame(scene_dir):
    data = load_dtu_split(cfg(scene_dir), "train")
    assert data.n_images == 5 and data.has_mask and (data.width, data.height) == (40, 32)
    np.testing.assert_allclose(data.world_from_scene, WORLD_FROM_SCENE)
    for i, cam in enumerate(cameras()):
        ref_o, ref_d = cam.rays()
        rays = data.image_rays(i)
        torch.testing.assert_close(rays["rays_o"], ref_o, atol=1e-4, rtol=0)
        angle = max_ray_angle_deg(rays["rays_d"], ref_d)
        assert angle < 1e-3, f"camera {i}: max ray angle error {angle:.5f} deg"


def test_holdout_and_orbit_splits(scene_dir):
    held = load_dtu_split(cfg(scene_dir, holdout_every=2), "test")
    train = load_dtu_split(cfg(scene_dir, holdout_every=2), "train")
    assert held.n_images == 3 and train.n_images == 2 and held.has_gt
    # holding out every view once fell back to the (white, imageless) orbit as the training split
    with pytest.raises(DatasetError, match="holdout_every=1 holds out all 5 view.s., leaving none to train on"):
        load_dtu_split(cfg(scene_dir, holdout_every=1), "train")
    orbit = load_dtu_split(cfg(scene_dir, n_test_traj_steps=12), "test")
    assert orbit.n_images == 12 and not orbit.has_gt
    with pytest.raises(DatasetError, match=r"does not exist.*--config configs/neus-demo.yaml --train$"):
        load_dtu_split(cfg(os.path.join(scene_dir, "nothere")), "train")  # the demo in this format
    with pytest.raises(DatasetError, match=r"cameras_sphere.npz' is a file, not a folder\. Put the scene there"):
        load_dtu_split(cfg(os.path.join(scene_dir, "cameras_sphere.npz")), "train")  # the scene's file given
    # its image/ given for the scene: "set dataset.cameras_file" was the advice; now the scene folder is named
    with pytest.raises(DatasetError, match=rf"image lies inside the scene folder {re.escape(scene_dir)}: give that, "
                                           rf"dataset.root_dir={re.escape(scene_dir)}\.$"):
        load_dtu_split(cfg(os.path.join(scene_dir, "image")), "train")
    # a video of no frames was a numpy error at the test after training; the data module refuses it at once
    from datasets.dtu import DTUDataModule
    from utils.config import ConfigError
    with pytest.raises(ConfigError, match="dataset.n_test_traj_steps must be a whole number >= 1, not 0"):
        DTUDataModule(cfg(scene_dir, holdout_every=2, n_test_traj_steps=0))
    # with views held out, the video still follows the orbit
    trajectory = load_dtu_split(cfg(scene_dir, holdout_every=2, n_test_traj_steps=12), "trajectory")
    assert not trajectory.has_gt
    torch.testing.assert_close(trajectory.c2w, orbit.c2w)
    centres = orbit.c2w[:, :, 3]
    assert float(centres.norm(dim=-1).std()) < 1e-4, "a circle about an axis through the origin"
    flat = torch.linalg.svdvals(centres - centres.mean(0))
    assert float(flat[-1]) < 1e-4 * float(flat[0]), "the orbit is planar"
    # every orbit camera looks at the origin (OpenGL: -z forward)
    forward = -orbit.c2w[:, :, 2]
    cos = (forward * -centres).sum(-1) / centres.norm(dim=-1)
    assert float(cos.min()) > 0.9999


def test_mismatched_counts_name_the_first_missing_file(scene_dir, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(scene_dir, bad)
    first_mask = sorted(os.listdir(bad / "mask"))[2]
    os.remove(bad / "mask" / first_mask)
    with pytest.raises(DatasetError, match="1 of 5 cameras have no mask .* camera 2"):
        load_dtu_split(cfg(str(bad)), "train")
    shutil.rmtree(bad / "mask")
    assert not load_dtu_split(cfg(str(bad)), "train").has_mask  # no mask/ folder: masks off
    os.remove(bad / "image" / sorted(os.listdir(bad / "image"))[4])
    with pytest.raises(DatasetError, match="1 of 5 cameras have no image, the first being camera 4"):
        load_dtu_split(cfg(str(bad)), "train")
    with pytest.raises(DatasetError, match="no world_mat"):
        np.savez(bad / "empty.npz", foo=np.eye(4))
        load_dtu_split(cfg(str(bad), cameras_file="empty.npz"), "train")
    cams = dict(np.load(bad / "cameras_sphere.npz"))
    np.savez(bad / "unscaled.npz", **{k: v for k, v in cams.items() if k != "scale_mat_3"})
    with pytest.raises(DatasetError, match="without scale_mat, the first being scale_mat_3; each view needs"):
        load_dtu_split(cfg(str(bad), cameras_file="unscaled.npz"), "train")


@pytest.mark.parametrize("damage, reason", [("truncated", "the archive is damaged or cut short: "),
                                            ("npy", "it holds one array"),
                                            ("pickle", "it is not a zip archive, as .npz files are")])
def test_a_cameras_file_numpy_cannot_read_is_one_sentence(scene_dir, tmp_path, damage, reason):
    """An interrupted copy of cameras_sphere.npz (or a .npy or pickle under its name) used to end in a traceback
    from inside numpy or zipfile."""
    import pickle

    path = tmp_path / "cameras_sphere.npz"
    whole = open(os.path.join(scene_dir, "cameras_sphere.npz"), "rb").read()
    if damage == "truncated":
        path.write_bytes(whole[:len(whole) // 2])
    elif damage == "npy":
        with open(path, "wb") as f:
            np.save(f, np.eye(4))
    else:
        path.write_bytes(pickle.dumps({"world_mat_0": np.eye(4)}))
    with pytest.raises(DatasetError, match=rf"^{path} cannot be read as a NumPy .npz cameras file \({reason}.*\); "
                                           "copy it again"):
        load_dtu_split(cfg(scene_dir, cameras_file=str(path)), "train")


def test_masks_saved_at_another_resolution_are_fitted_to_their_images(scene_dir, tmp_path):
    """Half-size masks (as some BlendedMVS and hand-made sets have) used to end in an IndexError at the first
    step; a mask of another aspect ratio would cover the wrong pixels and is refused."""
    import shutil

    import cv2
    import imageio.v2 as imageio

    whole = load_dtu_split(cfg(scene_dir), "train")
    half = tmp_path / "half"
    shutil.copytree(scene_dir, half)
    for name in os.listdir(half / "mask"):
        m = imageio.imread(half / "mask" / name)
        imageio.imwrite(half / "mask" / name, cv2.resize(m, (m.shape[1] // 2, m.shape[0] // 2),
                                                         interpolation=cv2.INTER_AREA))
    fitted = load_dtu_split(cfg(str(half)), "train")
    assert fitted.masks.shape == whole.masks.shape
    a, b = fitted.masks > 127, whole.masks > 127
    iou = ((a & b).sum() / (a | b).sum()).item()
    assert iou > 0.9 and (a != b).float().mean().item() < 0.05, iou  # only the silhouettes' edge pixels differ
    name = sorted(os.listdir(half / "mask"))[2]
    imageio.imwrite(half / "mask" / name, np.zeros((32, 20, 3), np.uint8))
    with pytest.raises(DatasetError, match=rf"^Mask .*{name} is 20x32 but its image is 40x32, another aspect"):
        load_dtu_split(cfg(str(half)), "train")


def test_images_of_mixed_sizes_train_at_one_size_each_camera_scaled_by_its_own(tmp_path):
    """A view photographed at twice the resolution: its intrinsics used to be scaled by the first image's size, so
    when it was not the first, its rays were silently wrong. Now every image's size is read and each camera is
    scaled from its own image: sizes of one aspect ratio train at the most common one, img_wh at any size, and
    another aspect ratio needs img_wh."""
    import dataclasses

    cams = cameras()
    big = cams[2]
    cams[2] = dataclasses.replace(big, K=big.K * np.array([[2], [2], [1]]), width=2 * big.width,
                                  height=2 * big.height)
    write_dtu(str(tmp_path), DemoScene(), cams, WORLD_FROM_SCENE, supersample=1)
    for data in (load_dtu_split(cfg(str(tmp_path)), "train"), load_dtu_split(cfg(str(tmp_path), img_wh=[40, 32]),
                                                                            "train")):
        assert (data.width, data.height) == (40, 32) and data.masks.shape == (5, 32, 40)
        for i, cam in enumerate(cameras()):  # the same rays as the cameras at 40x32
            angle = max_ray_angle_deg(data.image_rays(i)["rays_d"], cam.rays()[1])
            assert angle < 1e-3, f"camera {i}: max ray angle error {angle:.5f} deg"
    same = load_dtu_split(cfg(str(tmp_path), img_wh=[40, 32], holdout_every=3), "test")  # views 0 and 3
    torch.testing.assert_close(same.intrinsics, data.intrinsics[[0, 3]])
    orbit = load_dtu_split(cfg(str(tmp_path), img_wh=[20, 16], n_test_traj_steps=4), "test")
    torch.testing.assert_close(orbit.intrinsics[0], data.intrinsics[0] / 2)
    write_image(str(tmp_path / "image" / "000002.png"), np.zeros((32, 48, 3), np.uint8))  # another aspect ratio
    with pytest.raises(DatasetError, match=r"^Images have mixed sizes of different aspect ratios: .*000002.png is "
                                           r"48x32 but .*000000.png is 40x32; set dataset.img_wh=\[W,H\]"):
        load_dtu_split(cfg(str(tmp_path)), "train")


def test_orbit_trajectory_up_follows_the_cameras():
    cams = orbit_cameras(8, 3.0, [40], 10, 10)
    poses = orbit_trajectory(np.stack([c.c2w for c in cams]), 16)
    heights = poses[:, 2, 3]
    np.testing.assert_allclose(heights, 3.0 * np.sin(np.radians(40)), atol=1e-6)
    assert (poses[:, 2, 1] < 0).all(), "camera 'down' axis points down in a z-up world"


def test_a_capture_from_one_side_gets_a_video_across_its_arc_not_round_the_back(caplog):
    """A phone walked half round an object (or a facade): a full turn spent half the video on the side no camera
    saw. Cameras leaving a gap wider than 120 degrees get a sweep out and back across their arc instead (from its
    middle, a sine: it loops without a jump); cameras all round keep the full turn. The same path for every
    loader: about the DTU format's level up, about +z in the normalised COLMAP and transforms.json scenes."""
    from datasets.rays import covered_arc, video_path

    start, span = covered_arc(np.radians([350.0, 10.0, 40.0, 300.0]))  # across 0: from 300 to 40 degrees
    assert np.isclose(np.degrees(start), 300.0) and np.isclose(np.degrees(span), 100.0)

    def on_azimuths(azimuths_deg, elevations_deg=(20,)):
        return np.stack([look_at(3 * np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)]), np.zeros(3))
                         for e in np.radians(elevations_deg) for a in np.radians(azimuths_deg)])

    def azimuths_deg(poses):
        return np.degrees(np.arctan2(poses[:, 1, 3], poses[:, 0, 3]))

    three = azimuths_deg(video_path(on_azimuths([300.0, 350.0, 40.0]), np.array([0, 0, 1.0]), 12))
    np.testing.assert_allclose(np.mod(three[[0, 3, 9]], 360), [350.0, 40.0, 300.0])  # the middle, each end
    assert np.abs(np.mod(np.diff(np.concatenate([three, three[:1]])) + 180, 360) - 180).max() < 30.0  # a loop

    half_round = on_azimuths(np.linspace(-90, 90, 13))
    z_up = np.array([0.0, 0.0, 1.0])
    for name, orbit in (("dtu", orbit_trajectory), ("normalised", lambda c, n, *kind: video_path(c, z_up, n, *kind))):
        caplog.clear()
        with caplog.at_level("INFO", logger="nsr"):
            video = azimuths_deg(orbit(half_round, 24))
        assert np.abs(video).max() <= 90.0 + 1e-6 and video.min() < -89.9 and video.max() > 89.9, name
        assert "across the 180 degrees of azimuth the cameras cover (180 degrees of it unseen;" in caplog.text
        np.testing.assert_allclose(np.sort(np.mod(np.round(azimuths_deg(orbit(half_round, 24, "orbit")), 6), 360)),
                                   np.arange(24) * 15.0, atol=1e-6)  # asked for: the full turn
        all_round = on_azimuths(np.arange(0, 360, 30))
        np.testing.assert_array_equal(orbit(all_round, 24), orbit(all_round, 24, "orbit"))


def elevations_deg(poses):
    """(N,) elevation in degrees of (N, 4, 4) camera centres above the z = 0 plane, seen from the origin."""
    return np.degrees(np.arcsin(poses[:, 2, 3] / np.linalg.norm(poses[:, :3, 3], axis=1)))


def rolls_deg(poses_cv):
    """(N,) degrees by which each OpenCV camera's image is turned from upright (the world's +z shown up)."""
    rolls = []
    for pose in poses_cv:
        forward = pose[:3, 2]
        z = np.array([0.0, 0.0, 1.0]) - forward[2] * forward
        rolls.append(np.degrees(np.arctan2(z @ pose[:3, 0], z @ -pose[:3, 1])))
    return np.array(rolls)


def test_a_dtu_cap_gets_an_upright_video_inside_the_cap_and_cameras_all_round_an_orbit_at_their_height(caplog):
    """DTU's cameras are a wide, short cap in front of the object (rows at a few heights). The circle fitted in
    the plane through them rose 23 degrees above the top row, and with that plane's normal (the cap's axis) as
    up the video turned a full roll. Cameras all about the object, at heights from below it to above (the demo's),
    got a circle round a horizontal axis, under the object and over it, every frame on its side. Now: a loop
    inside the cap, and a turn at the cameras' mean elevation, upright, in a world of any up (DTU's is not +z)."""
    def cameras(azimuths_deg, elevations_deg):
        return np.stack([look_at(3 * np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)]), np.zeros(3))
                         for e in np.radians(elevations_deg) for a in np.radians(azimuths_deg)])

    cap = cameras(np.linspace(-50, 50, 7), np.linspace(15, 45, 7))
    with caplog.at_level("INFO", logger="nsr"):
        video = orbit_trajectory(cap, 48)
    assert "across the 100 degrees of azimuth the cameras cover, looping over their 30 degrees of elevation (260 " \
        "degrees of it unseen" in caplog.text
    azimuths, elevations = np.degrees(np.arctan2(video[:, 1, 3], video[:, 0, 3])), elevations_deg(video)
    assert 14.99 < elevations.min() < 15.5 and 44.5 < elevations.max() < 45.01  # from the bottom row to the top
    assert -50.01 < azimuths.min() < -49.5 and 49.5 < azimuths.max() < 50.01
    assert np.abs(rolls_deg(video)).max() < 1e-6 and np.abs(rolls_deg(cap)).max() < 1e-6
    np.testing.assert_allclose(np.linalg.norm(video[:, :3, 3], axis=1), 3.0)
    steps = np.linalg.norm(np.diff(np.concatenate([video, video[:1]])[:, :3, 3], axis=0), axis=1)
    assert steps.max() < 2.5 * steps.mean()  # a loop: no jump back at the end
    looking = video[:, :3, 2]  # OpenCV: +z forward, at the origin
    np.testing.assert_allclose((looking * -video[:, :3, 3]).sum(1) / 3.0, 1.0, atol=1e-9)
    q = np.linalg.qr(np.random.default_rng(4).normal(size=(3, 3)))[0]
    turn = np.eye(4)
    turn[:3, :3] = q * np.sign(np.linalg.det(q))  # a rotation: the world's up anywhere
    np.testing.assert_allclose(orbit_trajectory(turn @ cap, 48), turn @ video, atol=1e-9)  # the same path, turned

    all_about = cameras(np.arange(0, 360, 45), [-35, -20, 15, 30, 45, 60, 75])  # the demo's heights
    video = orbit_trajectory(all_about, 24)
    np.testing.assert_allclose(elevations_deg(video), elevations_deg(all_about).mean(), atol=1e-6)
    assert np.abs(rolls_deg(video)).max() < 1e-6
    np.testing.assert_allclose(np.sort(np.mod(np.round(np.degrees(np.arctan2(video[:, 1, 3], video[:, 0, 3])), 6),
                                              360)), np.arange(24) * 15.0, atol=1e-6)


def test_images_show_the_textured_surroundings_outside_the_mask(scene_dir):
    data = load_dtu_split(cfg(scene_dir), "train")
    rgb = data.images.float() / 255
    outside = data.masks == 0
    assert 0.1 < float(outside.float().mean()) < 0.9
    background = rgb[outside]
    assert float(background.std(0).min()) > 0.03, "the surroundings are textured, not a flat colour"
    assert float(background.mean()) > 0.2


def test_reading_images_shows_progress_once_it_takes_a_while(scene_dir, capsys, monkeypatch):
    """A few hundred full-size photos took a minute to read with nothing shown; the bar appears after
    utils.io.PROGRESS_DELAY_S (0 here) and not for a quick read."""
    import utils.io

    load_dtu_split(cfg(scene_dir), "train")
    assert "reading images" not in capsys.readouterr().err  # 5 small images: no bar
    monkeypatch.setattr(utils.io, "PROGRESS_DELAY_S", 0.0)
    load_dtu_split(cfg(scene_dir), "train")
    shown = capsys.readouterr().err
    assert "reading images:   0%|          | 0/5" in shown, shown
