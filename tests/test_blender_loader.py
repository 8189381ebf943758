"""Blender / transforms.json loader against the renderer's own cameras, and its bad-input errors."""
import os
import re
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from datasets.base import DatasetError
from datasets.blender import load_blender_split
from datasets.synthetic import DemoScene, orbit_cameras, write_blender
from helpers import max_ray_angle_deg
from utils.config import ConfigError


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("blender"))
    cams = orbit_cameras(3, 2.6, [20, 50], 40, 30, fov_x_deg=45)
    write_blender(root, DemoScene(), {"train": cams, "val": cams[:1], "test": cams[:1]}, supersample=1)
    return root, cams


def cfg(root, **kw):
    return OmegaConf.create({"root_dir": root, **kw})


def test_rays_match_renderer_cameras(scene_dir):
    root, cams = scene_dir
    data = load_blender_split(cfg(root), "train")
    assert (data.width, data.height) == (40, 30) and data.n_images == 3 and data.has_mask
    for i, cam in enumerate(cams):
        ref_o, ref_d = cam.rays()
        rays = data.image_rays(i)
        torch.testing.assert_close(rays["rays_o"], ref_o, atol=1e-5, rtol=0)
        angle = max_ray_angle_deg(rays["rays_d"], ref_d)
        assert angle < 1e-3, f"max ray angle error {angle:.5f} deg"
    # a split file given for the scene stands for its folder (read as NeRF-synthetic, not as a one-file capture)
    by_file = load_blender_split(cfg(os.path.join(root, "transforms_train.json")), "test")
    torch.testing.assert_close(by_file.c2w, load_blender_split(cfg(root), "test").c2w, rtol=0, atol=0)


def test_alpha_is_mask_and_background_is_empty(scene_dir):
    root, _ = scene_dir
    data = load_blender_split(cfg(root), "train")
    from datasets.synthetic import render
    out = render(DemoScene(), orbit_cameras(3, 2.6, [20, 50], 40, 30, fov_x_deg=45)[0], supersample=1)
    np.testing.assert_array_equal(data.masks[0].numpy() > 127, out["rgba"][..., 3] > 0.5)


def test_downscale_scales_intrinsics(scene_dir):
    root, cams = scene_dir
    data = load_blender_split(cfg(root, img_wh=[20, 15]), "train")
    assert (data.width, data.height) == (20, 15)
    torch.testing.assert_close(data.intrinsics[0, 0], torch.tensor(cams[0].K[0, 0] / 2).float())


def test_bad_inputs_are_one_clear_sentence(scene_dir, tmp_path):
    root, _ = scene_dir
    # a scene's train/ given for the scene, or the dataset's folder with the scene left out: the scene is named
    lego = tmp_path / "nerf_synthetic" / "lego"
    (lego / "train").mkdir(parents=True)
    (lego / "transforms_train.json").write_text("{}")
    with pytest.raises(DatasetError, match=rf"lego/train lies inside the scene folder {re.escape(str(lego))}: give "
                                           rf"that, dataset.root_dir={re.escape(str(lego))}\.$"):
        load_blender_split(cfg(str(lego / "train")), "train")
    with pytest.raises(DatasetError, match=r"nerf_synthetic holds 1 scene \(lego\): give it, dataset.root_dir="):
        load_blender_split(cfg(str(lego.parent)), "train")
    (lego.parent / "ship").mkdir()
    (lego.parent / "ship" / "transforms_train.json").write_text("{}")
    with pytest.raises(DatasetError, match=r"holds 2 scenes \(lego, ship\): give one, e.g. dataset.root_dir="):
        load_blender_split(cfg(str(lego.parent)), "train")
    with pytest.raises(DatasetError, match=r"does not exist.*configs/nerf-demo.yaml --train \(configs/neus-demo.yaml "
                                           r"for NeuS\)$"):
        load_blender_split(cfg(str(tmp_path / "nope")), "train")
    with pytest.raises(DatasetError, match="aspect"):
        load_blender_split(cfg(root, img_wh=[40, 40]), "train")
    with pytest.raises(ConfigError, match="img_wh's width and height must be a whole number >= 1, not 0"):
        load_blender_split(cfg(root, img_wh=[0, 0]), "train")  # was a ZeroDivisionError
    with pytest.raises(ConfigError, match=r"img_wh must be \[width, height\], not 40"):
        load_blender_split(cfg(root, img_wh=40), "train")
    with pytest.raises(ConfigError, match="img_downscale must be a number > 0"):
        load_blender_split(cfg(root, img_downscale=-2), "train")
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    os.remove(bad / "train" / "r_1.png")
    with pytest.raises(DatasetError, match="1 of 3 images .* missing, the first being .*r_1.png"):
        load_blender_split(cfg(str(bad)), "train")
    import imageio.v2 as imageio
    imageio.imwrite(bad / "train" / "r_1.png", np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(DatasetError, match="mixed sizes"):
        load_blender_split(cfg(str(bad)), "train")


def test_a_split_name_with_no_file_is_refused_before_training(scene_dir):
    """The test split is read after training: a mistyped test_split used to fail only then."""
    from datasets.blender import BlenderDataModule

    root, _ = scene_dir
    BlenderDataModule(cfg(root, test_split="val"))  # any split the folder has
    with pytest.raises(DatasetError, match=rf"^dataset.test_split='tset': {root} has no transforms_tset.json "
                                           r"\(its splits: test, train, val\)\.$"):
        BlenderDataModule(cfg(root, test_split="tset"))


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_an_image_that_cannot_be_decoded_is_named(scene_dir, tmp_path, damage):
    """An interrupted download or unzip used to end in a traceback from Pillow (image file is truncated)."""
    root, _ = scene_dir
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    path = bad / "train" / "r_2.png"
    whole = path.read_bytes()
    path.write_bytes({"truncated": whole[:len(whole) // 2], "empty": b"", "text": b"<html>404</html>"}[damage])
    with pytest.raises(DatasetError, match=rf"^{path} cannot be read as an image \(.+\); download or extract it "
                                           "again, or remove it"):
        load_blender_split(cfg(str(bad)), "train")


def test_grey_grey_alpha_16_bit_and_float_images_load_as_the_rgb_they_show(tmp_path):
    import imageio.v2 as imageio

    from datasets.images import read_image

    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    alpha = np.full((3, 4), 200, np.uint8)
    imageio.imwrite(tmp_path / "grey.png", grey)
    imageio.imwrite(tmp_path / "grey_alpha.png", np.stack([grey, alpha], -1))
    imageio.imwrite(tmp_path / "grey16.png", grey.astype(np.uint16) * 257)
    np.testing.assert_array_equal(read_image(str(tmp_path / "grey.png")), np.stack([grey] * 3, -1))
    np.testing.assert_array_equal(read_image(str(tmp_path / "grey_alpha.png")), np.stack([grey] * 3 + [alpha], -1))
    np.testing.assert_array_equal(read_image(str(tmp_path / "grey16.png")), np.stack([grey] * 3, -1))
    imageio.imwrite(tmp_path / "float.tif", np.stack([grey] * 3, -1).astype(np.float32) / 255)
    np.testing.assert_array_equal(read_image(str(tmp_path / "float.tif")), np.stack([grey] * 3, -1))


@pytest.mark.parametrize("corrupt", ["nan pose", "inf pose", "negative focal"])
def test_a_camera_that_is_not_finite_is_named_at_load(scene_dir, tmp_path, corrupt):
    """A NaN in one transform_matrix used to load, then fail in the first steps with an IndexError."""
    import json

    root, _ = scene_dir
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    meta = json.load(open(bad / "transforms_train.json"))
    if corrupt == "negative focal":
        meta["camera_angle_x"] = -float(meta["camera_angle_x"])
    else:
        meta["frames"][1]["transform_matrix"][0][3] = float(corrupt.split()[0])
    json.dump(meta, open(bad / "transforms_train.json", "w"))
    view = "train/r_0.png" if corrupt == "negative focal" else "train/r_1.png"
    with pytest.raises(DatasetError, match=f"The camera of view {view} has a pose or intrinsics that is not finite"):
        load_blender_split(cfg(str(bad)), "train")
