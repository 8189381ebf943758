"""DTU, BlendedMVS and any NeuS/IDR-format capture.

Layout: ``<root>/cameras_sphere.npz`` (or ``dataset.cameras_file``) with
``world_mat_i`` (the 4x4 projection K [R | t], world -> pixels, OpenCV) and
``scale_mat_i`` (normalised sphere -> world), ``<root>/image/*`` and,
optionally, ``<root>/mask/*``. Image and mask files are matched to camera
``i`` by the number in their name, whatever its padding (DTU ``000000.png`` +
``000.png``, BlendedMVS ``000.png``), unless ``image_pattern`` /
``mask_pattern`` (e.g. ``"{:06d}.png"``) say otherwise.

The model works in the normalised frame (P = world_mat @ scale_mat, object
inside the unit sphere); ``world_from_scene`` is ``scale_mat``, so meshes go
back to the DTU world frame. ``holdout_every: k`` holds out every k-th view
for val/test metrics; otherwise the test split is the video's path about the
cameras (video only, no metrics): ``orbit_trajectory``, ``n_test_traj_steps``
frames, which the video follows in both cases (split ``trajectory``).
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional

import cv2
import numpy as np
import torch

import datasets
from datasets.base import (DatasetError, SceneData, SceneDataModule, holdout_split, other_layout_hint,
                           video_trajectory, where_the_scene_is)
from datasets.images import (common_target_size, load_images, mask_for_image, missing_root_message, read_image,
                             stored_size)
from datasets.rays import level_up, opencv_to_opengl, video_path
from utils.config import number_at_least
from utils.mesh_metrics import (dtu_evaluation_files, dtu_protocol, inside_mask_hull, load_dtu_evaluation,
                                uniform_surface_points)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")


def decompose_projection(P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(3, 4) projection -> (K (3, 3) with K[2, 2] = 1, c2w (4, 4) OpenCV)."""
    K, R, t = cv2.decomposeProjectionMatrix(P)[:3]
    K = K / K[2, 2]
    c2w = np.eye(4)
    c2w[:3, :3] = R.T
    c2w[:3, 3] = (t[:3] / t[3])[:, 0]
    return K, c2w


def numbered_files(folder: str, pattern: Optional[str], indices: List[int]) -> Dict[int, str]:
    """Map camera index -> file in ``folder``: by ``pattern.format(i)``, or by the number in each file name."""
    if pattern:
        return {i: os.path.join(folder, pattern.format(i)) for i in indices if
                os.path.isfile(os.path.join(folder, pattern.format(i)))}
    found: Dict[int, str] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext in IMAGE_SUFFIXES and re.fullmatch(r"\d+", stem):
            found.setdefault(int(stem), os.path.join(folder, name))
    return found


def camera_arrays(path: str) -> Dict[str, np.ndarray]:
    """The named arrays of a cameras .npz file; a file that is not one (a .npy or pickle under that name, a copy
    cut short) is a DatasetError that says which."""
    with open(path, "rb") as f:
        magic = f.read(6)
    reason = ("it holds one array (.npy), not named arrays" if magic == b"\x93NUMPY"
              else "it is not a zip archive, as .npz files are" if not magic.startswith(b"PK") else None)
    if reason is None:
        try:
            with np.load(path, allow_pickle=False) as archive:
                return dict(archive)
        except Exception as err:
            reason = f"the archive is damaged or cut short: {str(err).split('. ')[0] or type(err).__name__}"
    raise DatasetError(f"{path} cannot be read as a NumPy .npz cameras file ({reason}); copy it again from the "
                       "dataset, or write it with scripts/gen_cameras.py.")


def read_cameras(path: str) -> tuple[List[int], Dict[str, np.ndarray]]:
    if not os.path.isfile(path):
        root, name = os.path.split(path)
        hint = (where_the_scene_is(root, lambda folder: os.path.isfile(os.path.join(folder, name)))
                or other_layout_hint(root, "dtu"))
        raise DatasetError(f"Cameras file {path} does not exist;{hint}" if hint else
                           f"Cameras file {path} does not exist; set dataset.cameras_file (cameras_sphere.npz for "
                           "NeuS data, cameras.npz for IDR data).")
    cams = camera_arrays(path)
    indices = sorted(int(k[len("world_mat_"):]) for k in cams if re.fullmatch(r"world_mat_\d+", k))
    if not indices:
        raise DatasetError(f"{path} has no world_mat_<i> entries; it is not a NeuS/IDR cameras file.")
    missing = [f"scale_mat_{i}" for i in indices if f"scale_mat_{i}" not in cams]
    if missing:
        raise DatasetError(f"{path} has world_mat entries without scale_mat, the first being {missing[0]}; each "
                           "view needs the scale_mat that maps the unit sphere to the object's bounding sphere "
                           "(scripts/gen_cameras.py writes both for a COLMAP capture).")
    return indices, cams


def stored_views(root: str, cameras_file: Optional[str] = None, image_pattern: Optional[str] = None
                 ) -> tuple[List[int], list]:
    """A NeuS-format scene's cameras at its images' stored size: (camera indices, [(K, c2w OpenCV, width,
    height)] in the world frame of its ``world_mat``). ``cameras_file`` defaults to
    ``cameras_sphere.npz``, else ``cameras.npz``; images are matched as the loader does (``numbered_files``).
    A camera without its image is a DatasetError."""
    if cameras_file is None:
        cameras_file = next((name for name in ("cameras_sphere.npz", "cameras.npz")
                             if os.path.isfile(os.path.join(root, name))), "cameras_sphere.npz")
    image_dir = os.path.join(root, "image")
    if not os.path.isdir(image_dir):
        raise DatasetError(f"{image_dir} does not exist; a NeuS-format scene keeps its images in image/ beside "
                           f"{cameras_file}.")
    indices, cams = read_cameras(os.path.join(root, cameras_file))
    images = numbered_files(image_dir, image_pattern, indices)
    lacking = [i for i in indices if i not in images]
    if lacking:
        raise DatasetError(f"camera {lacking[0]} has no image ({len(lacking)} of {len(indices)} cameras lack one).")
    views = []
    for i in indices:
        K, c2w = decompose_projection(cams[f"world_mat_{i}"][:3, :4].astype(np.float64))
        views.append((K, c2w, *stored_size(images[i])))
    return indices, views


def masked_views(root: str, cameras_file: Optional[str] = None, image_pattern: Optional[str] = None,
                 mask_pattern: Optional[str] = None) -> tuple[list, list]:
    """``stored_views`` with each view's mask: ([(K, c2w, width, height)], [(h, w) bool]). A camera without its
    mask is a DatasetError: each view's silhouette bounds the object (``inside_mask_hull``)."""
    mask_dir = os.path.join(root, "mask")
    if not os.path.isdir(mask_dir):
        raise DatasetError(f"{mask_dir} does not exist; the scene has no masks.")
    indices, views = stored_views(root, cameras_file, image_pattern)
    masks = numbered_files(mask_dir, mask_pattern, indices)
    lacking = [i for i in indices if i not in masks]
    if lacking:
        raise DatasetError(f"camera {lacking[0]} has no mask ({len(lacking)} of {len(indices)} cameras lack one); "
                           "every view's mask takes part.")
    return views, [read_image(masks[i])[..., :3].max(axis=-1) > 127 for i in indices]


def orbit_trajectory(c2w_cv: np.ndarray, n_frames: int, kind: str = "auto", log_path: bool = True) -> np.ndarray:
    """(n, 4, 4) OpenCV c2w of the test video from the capture's cameras (N, 4, 4): ``video_path`` upright about
    the capture's up (``level_up``), for the format does not say which way is up. (A circle in the plane fitted
    through the centres went round a horizontal axis for cameras all about the object, the demo's, under the
    object and over it, and for DTU's cap of cameras rose 23 degrees above its top row; with the plane's normal as
    up, both videos rolled.)"""
    return video_path(c2w_cv, level_up(c2w_cv), n_frames, kind, log_path)


def load_dtu_split(config: Any, split: str) -> SceneData:
    root = config.root_dir
    if not os.path.isdir(root):
        raise DatasetError(missing_root_message(root, "NeuS/IDR format: <root>/cameras_sphere.npz, image/, mask/",
                                                demo="neus-demo"))
    indices, cams = read_cameras(os.path.join(root, config.get("cameras_file", "cameras_sphere.npz")))
    image_dir = os.path.join(root, "image")
    if not os.path.isdir(image_dir):
        raise DatasetError(f"{image_dir} does not exist; NeuS-format data keeps its images in image/.")
    images = numbered_files(image_dir, config.get("image_pattern"), indices)
    absent = [i for i in indices if i not in images]
    if absent:
        pattern = config.get("image_pattern") or "<number>.png"
        raise DatasetError(f"{len(absent)} of {len(indices)} cameras have no image, the first being camera "
                           f"{absent[0]} ({os.path.join(image_dir, pattern.format(absent[0]) if '{' in pattern else pattern)}); "
                           "set dataset.image_pattern if the files are named differently.")
    mask_dir = os.path.join(root, "mask")
    masks: Dict[int, str] = {}
    if os.path.isdir(mask_dir):
        masks = numbered_files(mask_dir, config.get("mask_pattern"), indices)
        absent = [i for i in indices if i not in masks]
        if absent:
            raise DatasetError(f"{len(absent)} of {len(indices)} cameras have no mask in {mask_dir}, the first being "
                               f"camera {absent[0]}; give every image a mask or remove mask/.")

    # [] for the video trajectory, and for the test/val split when no views are held out: no ground truth
    chosen = [indices[p] for p in holdout_split(len(indices), split, config.get("holdout_every"))]

    scale_mat = cams[f"scale_mat_{indices[0]}"].astype(np.float64)
    Ks, c2ws = [], []
    for i in indices:
        P = (cams[f"world_mat_{i}"].astype(np.float64) @ cams[f"scale_mat_{i}"].astype(np.float64))[:3, :4]
        K, c2w = decompose_projection(P)
        Ks.append(K)
        c2ws.append(c2w)
    sizes = {i: stored_size(images[i]) for i in indices}  # (w, h); headers only
    w, h = common_target_size(config, [sizes[i] for i in indices], [images[i] for i in indices],
                              say=split == "train")

    def intrinsics(i: int) -> List[float]:
        """fx, fy, cx, cy of camera ``i`` at the training size: each camera scales with its own image."""
        sx, sy = w / sizes[i][0], h / sizes[i][1]
        K = Ks[indices.index(i)]
        return [K[0, 0] * sx, K[1, 1] * sy, K[0, 2] * sx, K[1, 2] * sy]

    if chosen:
        def at_training_size(a: np.ndarray) -> np.ndarray:
            return a if a.shape[:2] == (h, w) else cv2.resize(a, (w, h), interpolation=cv2.INTER_AREA)

        raw_masks = load_images([masks[i] for i in chosen], same_size=False) if masks else None
        rgb, alpha = [], []
        for k, img in enumerate(load_images([images[i] for i in chosen], same_size=False)):
            rgb.append(at_training_size(img[..., :3]))
            if raw_masks is not None:
                alpha.append(at_training_size(mask_for_image(raw_masks[k][..., 0], img.shape[:2], masks[chosen[k]])))
            else:
                alpha.append(np.full((h, w), 255, np.uint8))
        intr = np.array([intrinsics(i) for i in chosen])
        c2w_cv = np.stack([c2ws[indices.index(i)] for i in chosen])
        images_t, masks_t, has_gt = torch.from_numpy(np.stack(rgb)), torch.from_numpy(np.stack(alpha)), True
        names = [os.path.relpath(images[i], root) for i in chosen]
    else:
        n = number_at_least(config.get("n_test_traj_steps", 60), "dataset.n_test_traj_steps", 1)
        c2w_cv = orbit_trajectory(np.stack(c2ws), n, video_trajectory(config), log_path=split != "val")
        intr = np.tile(intrinsics(indices[0]), (n, 1))
        images_t = torch.full((n, h, w, 3), 255, dtype=torch.uint8)
        masks_t = torch.full((n, h, w), 255, dtype=torch.uint8)
        has_gt, names = False, [f"orbit_{k}" for k in range(n)]
    c2w = opencv_to_opengl(torch.from_numpy(c2w_cv[:, :3, :4]).float())
    return SceneData(images=images_t, masks=masks_t, c2w=c2w, intrinsics=torch.from_numpy(intr).float(),
                     has_mask=bool(masks), names=names, world_from_scene=scale_mat, has_gt=has_gt)


@datasets.register("dtu")
class DTUDataModule(SceneDataModule):
    load_split = staticmethod(load_dtu_split)

    def __init__(self, config: Any):
        super().__init__(config)
        if config.get("eval_dir"):  # asked for: found missing before training, not in a warning after it
            scan = self.eval_scan()
            if scan is None:
                raise DatasetError(f"dataset.eval_dir is set but the scan number is unknown: the scene folder "
                                   f"{config.root_dir} does not end in one (dtu_scan24); set dataset.eval_scan.")
            try:
                dtu_evaluation_files(config.eval_dir, scan)
            except FileNotFoundError as err:
                raise DatasetError(f"dataset.eval_dir: {err}") from None

    def has_orbit(self) -> bool:
        return True

    def eval_scan(self) -> int | None:
        """``dataset.eval_scan``, or the number ending the scene folder's name (dtu_scan24 -> 24); None if neither."""
        if self.config.get("eval_scan") is not None:
            return number_at_least(self.config.eval_scan, "dataset.eval_scan", 1)
        digits = re.search(r"(\d+)$", os.path.basename(os.path.normpath(self.config.root_dir)))
        return int(digits.group(1)) if digits else None

    def score_mesh(self, vertices, faces):
        """The DTU protocol when ``dataset.eval_dir`` points at the DTU evaluation data (checked at start-up); when
        the scene has masks for every view, also of the mesh cut to their visual hull (``*_culled``, as the
        published figures of MonoSDF and 2DGS are)."""
        if not self.config.get("eval_dir"):
            return None
        truth = load_dtu_evaluation(self.config.eval_dir, self.eval_scan())
        scores = dtu_protocol(uniform_surface_points(vertices, faces, 0.2), *truth)
        try:
            views, masks = masked_views(self.config.root_dir, self.config.get("cameras_file", "cameras_sphere.npz"),
                                        self.config.get("image_pattern"), self.config.get("mask_pattern"))
        except DatasetError:  # no masks (or not one per view): the uncut figures only
            return scores
        kept = inside_mask_hull(vertices, views, masks)[faces].all(axis=1)
        scores["culled_faces"] = int((~kept).sum())
        if not kept.any():
            return scores
        try:
            culled = dtu_protocol(uniform_surface_points(vertices, faces[kept], 0.2), *truth)
        except ValueError:  # nothing of the mesh is left inside the hull and the observation mask
            return scores
        scores.update({f"{key}_culled": value for key, value in culled.items()})
        return scores
