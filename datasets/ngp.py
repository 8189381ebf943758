"""instant-ngp / nerfstudio captures: one ``transforms.json`` for every frame.

Camera fields, global or per frame (a frame's own value wins): ``fl_x``,
``fl_y`` (or ``camera_angle_x``/``_y``), ``cx``, ``cy``, ``w``, ``h`` and the
lens: ``camera_model`` ``OPENCV`` (``k1 k2 k3 p1 p2``) or ``OPENCV_FISHEYE``
(``k1``..``k4``; instant-ngp's ``is_fisheye: true`` says the same). Lenses with
distortion are undistorted at load to COLMAP's pinhole camera (pycolmap), as
the ``colmap`` loader does. Images smaller than the declared ``w`` x ``h``
(nerfstudio's ``images_2/``) get their intrinsics scaled to fit. Frames are
``file_path`` + ``transform_matrix`` (OpenGL camera-to-world); an RGBA
image's alpha is its mask. Every ``holdout_every``-th frame (default 8, in
file-name order) is held out for val/test. A frame's ``mask_path`` (nerfstudio:
one channel, 0 where training must not look, e.g. the photographer or a
crop's border) keeps those pixels out of the training rays; it is not a
foreground mask (that is the RGBA image's alpha), and held-out frames are
scored on their whole image, as nerfstudio does.

Normalisation (``normalize``, default true). Such files come in whatever
frame their tool left: nerfstudio's ``ns-process-data`` keeps COLMAP's, whose
origin sits at a camera and whose scale is arbitrary. So the cameras' up
(``datasets.rays.level_up``: square to every photo's horizontal) becomes +z,
the point their optical axes pass closest to becomes the origin, and the
scale puts the cameras at mean distance ``camera_distance`` (default 4, where
NeRF-synthetic's cameras are and where instant-ngp's colmap2nerf puts them,
so the Blender configs' ``model.radius`` fits), or, with ``radius: r``,
the region of interest of the sparse points (nerfstudio's ``ply_file_path``,
found as the ``colmap`` loader finds it) inside radius r. ``world_from_scene``
undoes it: meshes come out in the file's frame. ``normalize: false`` keeps
the file's frame (then set ``model.radius`` to hold the object). The test
video goes about the origin (``datasets.rays.video_path``: an orbit, or a
loop across the cameras' side; ``dataset.video_trajectory``), upright about +z,
or in a kept frame, about the cameras' level up (``datasets.rays.level_up``).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch

from datasets.base import DatasetError, SceneData, holdout_split, video_trajectory
from datasets.images import (IMAGE_EXTENSIONS, check_present, common_target_size, load_images, mask_for_image,
                             read_image, stored_size)
from datasets.colmap import Z_UP, transform_poses, z_up_similarity
from datasets.colmap_model import Undistorter, import_pycolmap, lookat_point, region_of_interest
from datasets.rays import level_up, opencv_to_opengl, video_path
from utils.config import number_at_least

log = logging.getLogger("nsr")

LENS_MODELS = ("PINHOLE", "SIMPLE_PINHOLE", "OPENCV", "OPENCV_FISHEYE")


def capture_file(root: str) -> Optional[str]:
    """``<root>/transforms.json`` when the folder is a one-file capture (no NeRF-synthetic per-split files)."""
    single = os.path.join(root, "transforms.json")
    return single if os.path.isfile(single) and not os.path.isfile(os.path.join(root, "transforms_train.json")) \
        else None


def read_frames_file(path: str) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """(meta, its non-empty 'frames' list) of a transforms JSON file, either layout."""
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path} is not valid JSON ({err}).") from None
    if not meta.get("frames"):
        raise DatasetError(f"{path} has no 'frames' list.")
    return meta, meta["frames"]


def read_transforms(path: str) -> Tuple[Dict[str, Any], List[Dict[str, Any]], np.ndarray]:
    """(meta, frames sorted by file_path, (N, 4, 4) OpenGL c2w in the file's frame)."""
    meta, frames = read_frames_file(path)
    frames = sorted(frames, key=lambda fr: fr.get("file_path", ""))
    c2w = []
    for fr in frames:
        m = np.asarray(fr.get("transform_matrix", []), dtype=np.float64)
        if m.shape not in ((4, 4), (3, 4)) or not np.isfinite(m).all():
            raise DatasetError(f"Frame {fr.get('file_path')!r} of {path} has no finite 4x4 transform_matrix.")
        c2w.append(np.vstack([m[:3], [0, 0, 0, 1]]))
    return meta, frames, np.stack(c2w)


def image_path(root: str, file_path: str) -> str:
    """A frame's image file; NeRF-synthetic's ``file_path`` has no extension."""
    path = os.path.normpath(os.path.join(root, file_path))
    if os.path.splitext(path)[1] in IMAGE_EXTENSIONS:
        return path
    for ext in IMAGE_EXTENSIONS:
        if os.path.isfile(path + ext):
            return path + ext
    return path + ".png"


def frame_intrinsics(meta: Dict[str, Any], frame: Dict[str, Any], width: int, height: int) -> np.ndarray:
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
        raise DatasetError(f"The transforms file gives no focal length for {frame.get('file_path', 'a frame')}; "
                           "add camera_angle_x (Blender) or fl_x (instant-ngp, nerfstudio) to it.")
    cx = float(get("cx")) if get("cx") is not None else width / 2.0
    cy = float(get("cy")) if get("cy") is not None else height / 2.0
    return np.array([fx, fy, cx, cy], dtype=np.float64)


def lens_camera(meta: Dict[str, Any], frame: Dict[str, Any], width: int, height: int):
    """pycolmap.Camera of a frame's lens at its image's actual size (width, height)."""
    pycolmap = import_pycolmap()

    def get(key, default=None):
        value = frame.get(key, meta.get(key))
        return default if value is None else value

    declared = (int(get("w", width)), int(get("h", height)))
    if abs(declared[0] / declared[1] - width / height) > 0.01 * width / height:
        raise DatasetError(f"{frame.get('file_path')} is {width}x{height} but the transforms file declares "
                           f"{declared[0]}x{declared[1]}, another aspect; use the images the cameras were made for.")
    sx, sy = width / declared[0], height / declared[1]  # a downscaled copy of the images (nerfstudio's images_2/)
    fx, fy, cx, cy = frame_intrinsics(meta, frame, *declared) * np.array([sx, sy, sx, sy])
    model = str(get("camera_model", "OPENCV_FISHEYE" if get("is_fisheye", False) else "OPENCV")).upper()
    if model not in LENS_MODELS:
        raise DatasetError(f"camera_model {model} is not supported ({', '.join(LENS_MODELS)} are); export the "
                           "capture with a perspective or fisheye camera.")
    k = {name: float(get(name, 0.0)) for name in ("k1", "k2", "k3", "k4", "p1", "p2")}
    if model == "OPENCV_FISHEYE":
        if k["p1"] or k["p2"]:
            raise DatasetError("A fisheye camera with tangential distortion (p1, p2) is not a model COLMAP knows; "
                               "calibrate it as OPENCV_FISHEYE (k1..k4) or OPENCV.")
        return pycolmap.Camera(model="OPENCV_FISHEYE", width=width, height=height,
                               params=[fx, fy, cx, cy, k["k1"], k["k2"], k["k3"], k["k4"]])
    if k["k4"]:
        raise DatasetError("k4 is set for a perspective (OPENCV) camera, a term COLMAP's OPENCV models do not "
                           "have; set camera_model to OPENCV_FISHEYE if the lens is a fisheye.")
    if not any(k.values()):
        return pycolmap.Camera(model="PINHOLE", width=width, height=height, params=[fx, fy, cx, cy])
    if k["k3"]:
        return pycolmap.Camera(model="FULL_OPENCV", width=width, height=height,
                               params=[fx, fy, cx, cy, k["k1"], k["k2"], k["p1"], k["p2"], k["k3"], 0, 0, 0])
    return pycolmap.Camera(model="OPENCV", width=width, height=height,
                           params=[fx, fy, cx, cy, k["k1"], k["k2"], k["p1"], k["p2"]])


def ply_file_points(root: str, meta: Dict[str, Any]) -> np.ndarray:
    """(P, 3) points of the capture's ``ply_file_path`` (nerfstudio's sparse_pc.ply), in the file's frame."""
    name = meta.get("ply_file_path")
    if not name:
        raise DatasetError("dataset.radius sizes the scene from the capture's sparse points, but transforms.json "
                           "names no ply_file_path; set dataset.camera_distance instead.")
    path = os.path.join(root, name)
    try:
        import trimesh

        points = np.asarray(trimesh.load(path).vertices, dtype=np.float64)
    except Exception as err:  # missing, or not a point cloud
        raise DatasetError(f"The sparse points {path} (transforms.json's ply_file_path) cannot be read "
                           f"({type(err).__name__}); fix the file or set dataset.camera_distance instead.") from None
    if len(points) < 10:
        raise DatasetError(f"The sparse points {path} hold {len(points)} points, too few to size the scene by; "
                           "set dataset.camera_distance instead.")
    return points


def camera_normalisation(c2w: np.ndarray, distance: float, points: Optional[np.ndarray] = None,
                         radius: Optional[float] = None) -> np.ndarray:
    """(4, 4) similarity scene_from_world for OpenGL c2w (N, 4, 4): the cameras' level up -> +z, the optical axes'
    nearest point -> origin, mean camera distance from it -> ``distance``; or, given sparse ``points``
    (P, 3) and ``radius``, their region of interest (the ``colmap`` loader's) scaled to ``radius``."""
    centres = c2w[:, :3, 3]
    if np.linalg.norm(c2w[:, :3, 1].mean(0)) < 1e-6:
        raise DatasetError("The cameras' up directions cancel out; cannot tell which way is up "
                           "(set dataset.normalize=false and model.radius).")
    up = level_up(opencv_to_opengl(torch.from_numpy(c2w)).numpy())  # the flip is its own inverse: OpenCV axes
    centre = lookat_point(c2w)  # an optical axis is the same line in OpenGL and OpenCV axes
    ahead = np.einsum("nk,nk->n", centre - centres, -c2w[:, :3, 2])  # OpenGL cameras look down -z
    if len(c2w) < 2 or (ahead > 0).mean() < 0.5:
        log.warning("The cameras do not look at a common point (a forward-facing capture?); centring the scene "
                    "on their mean position instead.")
        centre = centres.mean(0)
    spread = np.linalg.norm(centres - centre, axis=1).mean()
    if spread < 1e-9:
        raise DatasetError("All cameras sit at one point; cannot normalise the scene (set dataset.normalize=false).")
    if points is None:
        return z_up_similarity(up, centre, distance / spread)
    upright = z_up_similarity(up, centre, 1.0)  # the box about the points is axis-aligned in the scene's frame
    _, roi_radius, _ = region_of_interest(points @ upright[:3, :3].T + upright[:3, 3], np.ones(len(points)),
                                          transform_poses(upright, c2w))
    return z_up_similarity(up, centre, radius / roi_radius)


def framing(config: Any, c2w_scene: np.ndarray) -> str:
    """How the scene was normalised, for the log: the rule, and where the cameras ended up."""
    if not config.get("normalize", True):
        return "the file's frame kept (dataset.normalize=false)"
    rule = (f"the sparse points' region of interest inside radius {float(config.radius):g}"
            if config.get("radius") is not None else "dataset.camera_distance")
    distance = np.linalg.norm(c2w_scene[:, :3, 3], axis=1).mean()
    return f"normalised by {rule}: cameras at mean distance {distance:.2f}"


def load_ngp_split(config: Any, path: str, split: str) -> SceneData:
    """One split of the capture in ``path`` (its transforms.json); see the module docstring."""
    root = os.path.dirname(path)
    meta, frames, c2w_file = read_transforms(path)
    scene_from_world = np.eye(4)
    if config.get("normalize", True):
        distance = number_at_least(config.get("camera_distance", 4.0), "dataset.camera_distance", 0, kind=float,
                                   exclusive=True)
        radius, points = config.get("radius"), None
        if radius is not None:
            radius = number_at_least(radius, "dataset.radius", 0, kind=float, exclusive=True)
            points = ply_file_points(root, meta)
        scene_from_world = camera_normalisation(c2w_file, distance, points, radius)
    c2w_scene = transform_poses(scene_from_world, c2w_file)  # either camera convention
    world_from_scene = np.linalg.inv(scene_from_world)
    chosen = holdout_split(len(frames), split, config.get("holdout_every", 8))
    if not chosen:  # the video trajectory, or val/test when nothing is held out
        return _orbit(config, root, meta, frames, c2w_scene, world_from_scene, log_path=split != "val")
    paths = [image_path(root, frames[i].get("file_path", "")) for i in chosen]
    undistorters: Dict[tuple, Undistorter] = {}
    pinhole = []  # (undistorted image, its undistorted mask_path mask or None, its Undistorter)
    for i, image in zip(chosen, load_images(paths, same_size=False)):
        cam = lens_camera(meta, frames[i], image.shape[1], image.shape[0])
        und = undistorters.setdefault((cam.model.name, cam.width, cam.height, tuple(cam.params)), Undistorter(cam))
        keep = frame_mask(root, frames[i], image.shape[:2]) if split == "train" else None
        pinhole.append((und(image), None if keep is None else und(keep, nearest=True), und))
    w, h = training_size(config, root, meta, frames, say=split == "train")
    images, masks, kept, intrinsics = [], [], [], []
    for image, keep, und in pinhole:
        if und.size != (w, h):
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
            keep = None if keep is None else cv2.resize(keep, (w, h), interpolation=cv2.INTER_AREA)
        images.append(image[..., :3])
        masks.append(image[..., 3] if image.shape[-1] == 4 else np.full((h, w), 255, np.uint8))
        kept.append(np.ones((h, w), bool) if keep is None else keep > 127)
        intrinsics.append(pinhole_intrinsics(und, w, h))
    n_masked = sum(keep is not None for _, keep, _ in pinhole)
    if split == "train":
        lenses = sorted({key[0] for key in undistorters})
        masked = f", {n_masked} with a mask_path (its 0 pixels not trained on)" if n_masked else ""
        log.info(f"transforms.json: {len(frames)} frames, {len(chosen)} to train on{masked}, lens "
                 f"{', '.join(lenses)}{' (undistorted to pinhole)' if lenses != ['PINHOLE'] else ''}, training size "
                 f"{w}x{h}, {framing(config, c2w_scene)}")
    return SceneData(images=torch.from_numpy(np.stack(images)), masks=torch.from_numpy(np.stack(masks)),
                     c2w=torch.from_numpy(c2w_scene[chosen, :3, :4]).float(),
                     intrinsics=torch.tensor(np.stack(intrinsics), dtype=torch.float32),
                     has_mask=pinhole[0][0].shape[-1] == 4, names=[os.path.relpath(p, root) for p in paths],
                     world_from_scene=world_from_scene, trained_pixels=torch.from_numpy(np.stack(kept)) if n_masked
                     else None)


def frame_mask(root: str, frame: Dict[str, Any], image_hw: Tuple[int, int]) -> Optional[np.ndarray]:
    """(H, W) uint8 of a frame's ``mask_path`` at its image's stored size ``image_hw``: 255 where training may
    look (any non-zero value in the file, as nerfstudio reads it), 0 where not; None when the frame has none."""
    name = frame.get("mask_path")
    if not name:
        return None
    path = os.path.normpath(os.path.join(root, name))
    if not os.path.isfile(path):
        raise DatasetError(f"The mask {path} (the mask_path of {frame.get('file_path')}) is missing; put it "
                           "there or remove mask_path from that frame in transforms.json.")
    keep = np.where(read_image(path)[..., 0] > 0, 255, 0).astype(np.uint8)
    return mask_for_image(keep, image_hw, path)


def pinhole_intrinsics(und: Undistorter, width: int, height: int) -> np.ndarray:
    """(fx, fy, cx, cy) of an undistorted pinhole image resized to (width, height)."""
    sx, sy = width / und.size[0], height / und.size[1]
    return np.array([und.K[0, 0] * sx, und.K[1, 1] * sy, und.K[0, 2] * sx, und.K[1, 2] * sy])


def training_size(config: Any, root: str, meta: Dict[str, Any], frames: List[Dict[str, Any]],
                  say: bool = False) -> Tuple[int, int]:
    """(w, h) every split and the video train or render at: the shared rule (``common_target_size``) over all the
    frames' undistorted sizes, read from the image files' headers, so that a split holding other sizes than the
    rest is not given a size of its own. ``say``: log the size chosen for mixed sizes."""
    paths = [image_path(root, frame.get("file_path", "")) for frame in frames]
    check_present(paths)
    sizes, lenses = [], {}
    for frame, path in zip(frames, paths):
        cam = lens_camera(meta, frame, *stored_size(path))
        key = (cam.model.name, cam.width, cam.height, tuple(cam.params))
        if key not in lenses:
            lenses[key] = Undistorter(cam).size
        sizes.append(lenses[key])
    return common_target_size(config, sizes, paths, say=say)


def _orbit(config, root, meta, frames, c2w_scene, world_from_scene, log_path: bool = True) -> SceneData:
    """Video cameras (no images): ``video_path`` (a turn, or a loop across the cameras' side) about +z, or about
    the cameras' level up in a frame kept as the file has it, with the first frame's lens."""
    w, h = training_size(config, root, meta, frames)  # checks that every frame's image is there
    und = Undistorter(lens_camera(meta, frames[0], *stored_size(image_path(root, frames[0].get("file_path", "")))))
    steps = number_at_least(config.get("n_test_traj_steps", 60), "dataset.n_test_traj_steps", 1)
    c2w_cv = opencv_to_opengl(torch.from_numpy(c2w_scene)).numpy()  # the axis flip is its own inverse
    up = Z_UP if config.get("normalize", True) else level_up(c2w_cv)  # the file's own frame: its up unknown
    poses = video_path(c2w_cv, up, steps, video_trajectory(config), log_path)
    orbit = opencv_to_opengl(torch.from_numpy(poses[:, :3, :4]).float())
    intrinsics = torch.tensor(pinhole_intrinsics(und, w, h), dtype=torch.float32).expand(steps, 4).clone()
    return SceneData(images=torch.full((steps, h, w, 3), 255, dtype=torch.uint8),
                     masks=torch.full((steps, h, w), 255, dtype=torch.uint8), c2w=orbit, intrinsics=intrinsics,
                     has_mask=False, names=[f"orbit_{k}" for k in range(steps)], world_from_scene=world_from_scene,
                     has_gt=False)
