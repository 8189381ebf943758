"""Blender / NeRF-synthetic scenes, and the dispatch to instant-ngp / nerfstudio ``transforms.json``.

NeRF-synthetic: ``transforms_{train,val,test}.json`` with ``camera_angle_x``
(optionally ``camera_angle_y``) and RGBA images whose alpha is the mask. The
cameras are OpenGL camera-to-world matrices, the project's own convention, in
the frame the scene was made in (no normalisation: ``model.radius`` 1.5 holds
the objects). A folder with one ``transforms.json`` instead is an instant-ngp
or nerfstudio capture, read by ``datasets.ngp`` (lens undistortion,
normalisation); ``dataset.root_dir`` may also name that file itself (any name,
as nerfstudio's ``--data`` takes it).
"""
from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import cv2
import numpy as np
import torch

import datasets
from datasets.base import (DatasetError, SceneData, SceneDataModule, holds_transforms, other_layout_hint,
                           where_the_scene_is)
from datasets.images import load_images, missing_root_message, target_size
from datasets.ngp import (capture_file, frame_intrinsics, image_path, load_ngp_split, ply_file_points,
                          read_frames_file)


BLENDER_LAYOUT = ("NeRF-synthetic: unpack nerf_synthetic.zip into load/ so that "
                  "load/nerf_synthetic/<scene>/transforms_train.json exists")


def scene_source(root_dir: str) -> Tuple[str, Optional[str]]:
    """(scene folder, its one-file capture or None) for ``dataset.root_dir``: a scene folder or, as nerfstudio's
    ``--data`` takes, a capture's transforms JSON file itself (a NeRF-synthetic scene's ``transforms_train.json``
    stands for its folder)."""
    if os.path.isfile(root_dir) and root_dir.lower().endswith(".json"):
        folder = os.path.dirname(root_dir) or "."
        if os.path.isfile(os.path.join(folder, "transforms_train.json")):
            return folder, None
        return folder, root_dir
    return root_dir, capture_file(root_dir)


def load_blender_split(config: Any, split: str) -> SceneData:
    root, single = scene_source(config.root_dir)
    if single:
        return load_ngp_split(config, single, split)
    if not os.path.isdir(root):
        raise DatasetError(missing_root_message(root, BLENDER_LAYOUT))
    per_split = os.path.join(root, f"transforms_{split}.json")
    if not os.path.isfile(per_split):
        hint = where_the_scene_is(root, holds_transforms) or other_layout_hint(root, "blender")
        raise DatasetError(f"Neither {per_split} nor {os.path.join(root, 'transforms.json')} exists;{hint}" if hint
                           else f"Neither {per_split} nor {os.path.join(root, 'transforms.json')} exists; is "
                           "dataset.root_dir a Blender/NeRF-synthetic or instant-ngp / nerfstudio scene folder?")
    meta, frames = read_frames_file(per_split)
    paths = [image_path(root, fr["file_path"]) for fr in frames]
    raw = load_images(paths)
    height, width = raw[0].shape[:2]
    w, h = target_size(config, width, height)
    images, masks, intrinsics, c2ws = [], [], [], []
    for fr, img in zip(frames, raw):
        if (w, h) != (width, height):
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
        images.append(img[..., :3])
        masks.append(img[..., 3] if img.shape[-1] == 4 else np.full((h, w), 255, np.uint8))
        k = frame_intrinsics(meta, fr, width, height) * np.array([w / width, h / height, w / width, h / height])
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

    def __init__(self, config: Any):
        super().__init__(config)
        root, single = scene_source(config.root_dir)
        if os.path.isdir(root) and not single:  # the test split is read after training: check it now
            for stage in ("train", "val", "test"):
                name = self.split_name(stage)
                if not os.path.isfile(os.path.join(root, f"transforms_{name}.json")):
                    found = sorted(f[len("transforms_"):-len(".json")] for f in os.listdir(root)
                                   if f.startswith("transforms_") and f.endswith(".json"))
                    hint = where_the_scene_is(root, holds_transforms) or other_layout_hint(root, "blender")
                    raise DatasetError(f"dataset.{stage}_split={name!r}: {root} has no transforms_{name}.json "
                                       f"(its splits: {', '.join(found) or 'none'}).{hint}")

    def has_orbit(self) -> bool:
        """A transforms.json capture has one (its test split is held-out frames)."""
        return scene_source(self.config.root_dir)[1] is not None

    def sparse_points(self) -> Optional[np.ndarray]:
        """A transforms.json capture's ``ply_file_path`` points (nerfstudio's sparse_pc.ply), normalised as its
        cameras are; None for a NeRF-synthetic scene or a capture without them."""
        root, capture = scene_source(self.config.root_dir)
        meta = read_frames_file(capture)[0] if capture else {}
        if not meta.get("ply_file_path"):
            return None
        points = ply_file_points(root, meta)
        scene_from_world = np.linalg.inv(self.split("train").world_from_scene)
        return points @ scene_from_world[:3, :3].T + scene_from_world[:3, 3]
