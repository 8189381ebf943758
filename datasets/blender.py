"""Blender / NeRF-synthetic scenes, and instant-ngp / nerfstudio ``transforms.json``.

NeRF-synthetic: ``transforms_{train,val,test}.json`` with ``camera_angle_x``
(optionally ``camera_angle_y``) and RGBA images whose alpha is the mask.
instant-ngp / nerfstudio: one ``transforms.json`` with ``fl_x, fl_y, cx, cy,
w, h`` globally or per frame; every ``holdout_every``-th frame (default 8) is
held out as the val/test split. Both store OpenGL camera-to-world matrices,
the project's own convention, so no axis is flipped here.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Tuple

import cv2
import imageio.v2 as imageio
import numpy as np
import torch

import datasets
from datasets.base import DatasetError, SceneData, SceneDataModule, holdout_split
from utils.config import ConfigError, number_at_least

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")


BLENDER_LAYOUT = ("NeRF-synthetic: unpack nerf_synthetic.zip into load/ so that "
                  "load/nerf_synthetic/<scene>/transforms_train.json exists")


def missing_root_message(root: str, layout: str = BLENDER_LAYOUT) -> str:
    return (f"Dataset folder '{root}' does not exist. Put the scene there ({layout}) or set dataset.root_dir=..., "
            "or try the embedded demo: python launch.py --config configs/nerf-demo.yaml --train")


def _read_transforms(root: str, split: str, holdout_every: Any) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """(meta, frames of this split) from either layout."""
    per_split = os.path.join(root, f"transforms_{split}.json")
    single = os.path.join(root, "transforms.json")
    if os.path.isfile(per_split):
        path = per_split
    elif os.path.isfile(single):
        path = single
    else:
        raise DatasetError(f"Neither {per_split} nor {single} exists; is dataset.root_dir a Blender/NeRF-synthetic "
                           "or instant-ngp scene folder?")
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path} is not valid JSON ({err}).") from None
    frames = meta.get("frames")
    if not frames:
        raise DatasetError(f"{path} has no 'frames' list.")
    if path == single and holdout_every:
        frames = sorted(frames, key=lambda fr: fr.get("file_path", ""))
        frames = [frames[i] for i in holdout_split(len(frames), "train" if split == "train" else "test", holdout_every)]
    return meta, frames


def _image_path(root: str, file_path: str) -> str:
    path = os.path.normpath(os.path.join(root, file_path))
    if os.path.splitext(path)[1] in IMAGE_EXTENSIONS:
        return path
    for ext in IMAGE_EXTENSIONS:
        if os.path.isfile(path + ext):
            return path + ext
    return path + ".png"


def _intrinsics(meta: Dict[str, Any], frame: Dict[str, Any], width: int, height: int) -> np.ndarray:
    """(fx, fy, cx, cy) at the original image size, from per-frame, global or camera_angle fields."""
    def get(key):
        return frame.get(key, meta.get(key))

    if get("fl_x") is not None:
        fx = float(get("fl_x"))
        fy = float(get("fl_y") if get("fl_y") is not None else fx)
    elif get("camera_angle_x") is not None:
        fx = 0.5 * width / np.tan(0.5 * float(get("camera_angle_x")))
        fy = 0.5 * height / np.tan(0.5 * float(get("camera_angle_y"))) if get("camera_angle_y") is not None else fx
    else:
        raise DatasetError("The transforms file gives no focal length (camera_angle_x or fl_x).")
    cx = float(get("cx")) if get("cx") is not None else width / 2.0
    cy = float(get("cy")) if get("cy") is not None else height / 2.0
    return np.array([fx, fy, cx, cy], dtype=np.float64)


def requested_size(config: Any) -> Tuple[int, int] | None:
    """``dataset.img_wh`` as (w, h), checked; None when the config does not set it."""
    wh = config.get("img_wh")
    if wh is None:
        return None
    if isinstance(wh, (str, int, float)) or len(wh) != 2:
        raise ConfigError(f"dataset.img_wh must be [width, height], not {wh}.")
    w, h = (number_at_least(v, "dataset.img_wh's width and height", 1) for v in wh)
    return w, h


def target_size(config: Any, width: int, height: int) -> Tuple[int, int]:
    """(w, h) after ``img_wh`` or ``img_downscale``; img_wh must keep the aspect ratio."""
    if config.get("img_wh") is not None:
        w, h = requested_size(config)
        if abs(w / h - width / height) > 0.01 * width / height:
            raise DatasetError(f"dataset.img_wh={[w, h]} has aspect {w / h:.3f} but the images are {width}x{height} "
                               f"(aspect {width / height:.3f}); give a size with the same aspect or use img_downscale.")
        return w, h
    scale = number_at_least(config.get("img_downscale") or 1.0, "dataset.img_downscale", 0, kind=float, exclusive=True)
    return int(round(width / scale)), int(round(height / scale))


def load_images(paths: List[str]) -> List[np.ndarray]:
    """Read images, checking that all exist and have one size. Returns uint8 arrays (H, W, 3|4)."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetError(f"{len(missing)} of {len(paths)} images named by the cameras file are missing, "
                           f"the first being {missing[0]}.")
    images = []
    for p in paths:
        img = imageio.imread(p)
        if img.dtype != np.uint8:
            img = (img.astype(np.float32) / np.iinfo(img.dtype).max * 255).round().astype(np.uint8)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        if images and img.shape[:2] != images[0].shape[:2]:
            raise DatasetError(f"Images have mixed sizes: {p} is {img.shape[1]}x{img.shape[0]} but {paths[0]} is "
                               f"{images[0].shape[1]}x{images[0].shape[0]}; resize them to one size.")
        images.append(img)
    return images


def load_blender_split(config: Any, split: str) -> SceneData:
    root = config.root_dir
    if not os.path.isdir(root):
        raise DatasetError(missing_root_message(root))
    meta, frames = _read_transforms(root, split, config.get("holdout_every", 8))
    paths = [_image_path(root, fr["file_path"]) for fr in frames]
    raw = load_images(paths)
    height, width = raw[0].shape[:2]
    w, h = target_size(config, width, height)
    images, masks, intrinsics, c2ws = [], [], [], []
    for fr, img in zip(frames, raw):
        if (w, h) != (width, height):
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
        images.append(img[..., :3])
        masks.append(img[..., 3] if img.shape[-1] == 4 else np.full((h, w), 255, np.uint8))
        k = _intrinsics(meta, fr, width, height) * np.array([w / width, h / height, w / width, h / height])
        intrinsics.append(k)
        c2ws.append(np.asarray(fr["transform_matrix"], dtype=np.float64)[:3, :4])
    return SceneData(
        images=torch.from_numpy(np.stack(images)),
        masks=torch.from_numpy(np.stack(masks)),
        c2w=torch.from_numpy(np.stack(c2ws)).float(),
        intrinsics=torch.from_numpy(np.stack(intrinsics)).float(),
        has_mask=raw[0].shape[-1] == 4,
        names=[os.path.relpath(p, root) for p in paths],
    )


@datasets.register("blender")
class BlenderDataModule(SceneDataModule):
    load_split = staticmethod(load_blender_split)
