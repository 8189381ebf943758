"""COLMAP captures: ``<root>/images/*`` and a sparse model in ``<root>/sparse/0`` (binary or text); of several
numbered models (COLMAP's mapper makes one per group of images it could not join), the largest.

Every camera model pycolmap knows is read; lenses with distortion are
undistorted at load to COLMAP's own pinhole camera (already undistorted data,
e.g. COLMAP's ``image_undistorter`` output, passes through). Per-image
intrinsics are kept. Optional masks live in ``<root>/masks/`` (``mask_dir``)
and match their image by stem, whatever the extension (``img_0012.png`` or
COLMAP's ``img_0012.jpg.png`` for ``img_0012.jpg``).

Normalisation (instant-nsr-pl's keys): the up direction from the cameras
(``up_est_method: camera``, the direction square to every photo's rows as it
is shown, which a level camera keeps horizontal whatever its pitch: for phone
photos with an EXIF orientation, the rows a viewer shows, not the sensor's;
``datasets.rays.level_up``) or from a plane
fitted to the sparse points about the object (``ground``) becomes +z; the
centre is the cameras' mean (``center_est_method: camera``), the point their
optical axes pass closest to (``lookat``) or the centre of the region of
interest of the sparse points (``point``); the scale puts the nearest camera
at distance 1, or, with ``radius: r``, the region of interest inside radius r, or, with
instant-nsr-pl's ``cam_downscale: s``, divides the centred capture by s.
``world_from_scene`` undoes it, so meshes come out in the capture's frame.

``holdout_every: k`` holds out every k-th image for val/test metrics; the test
video (``n_test_traj_steps`` frames) is an orbit at the cameras' mean elevation, or a loop across the region they
cover when they were all on one side (``datasets.rays.video_path``, ``dataset.video_trajectory``),
framed as most photos are shown (portrait for phone photos held upright).
Photos that are all shown turned the same way are used as shown, their
cameras turned to match (``img_wh`` is then the size as shown); photos of
mixed orientations are used as stored, as COLMAP read them. A mask may be
drawn on the photo as stored or as shown (its width and height swapped).
``write_overview(path)`` writes cameras, sparse points and the region of
interest as one PLY in the normalised frame (the trial's ``save/`` folder).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional

import cv2
import numpy as np
import torch

import datasets
from datasets.base import DatasetError, SceneData, SceneDataModule, holdout_split, video_trajectory
from datasets.images import (EXIF_QUARTER_TURNS, IMAGE_EXTENSIONS, common_target_size, exif_orientation, load_images,
                             mask_for_image, missing_root_message, quarter_turns_to_apply, read_image, reading)
from datasets.colmap_model import (Undistorter, box_glyph, camera_glyphs, find_sparse_dir, lookat_point,
                                   read_reconstruction, region_of_interest, registered_views, sightlines, sparse_points,
                                   write_points_ply)
from datasets.rays import (level_up, opencv_to_opengl, rotation_between, turn_intrinsics_clockwise,
                          turn_pose_clockwise, video_path)
from utils.config import number_at_least

log = logging.getLogger("nsr")


def fit_plane(points: np.ndarray, threshold: float, iterations: int = 500, seed: int = 0) -> np.ndarray:
    """(3,) unit normal of the plane with most points within ``threshold`` (RANSAC, then least squares)."""
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(iterations):
        p = points[rng.choice(len(points), 3, replace=False)]
        n = np.cross(p[1] - p[0], p[2] - p[0])
        if np.linalg.norm(n) < 1e-12:
            continue
        n /= np.linalg.norm(n)
        inliers = np.abs((points - p[0]) @ n) < threshold
        if best is None or inliers.sum() > best.sum():
            best = inliers
    sel = points[best]
    return np.linalg.svd(sel - sel.mean(0))[2][-1]


def normalisation(c2w: np.ndarray, xyz: np.ndarray, track: np.ndarray, config: Any,
                  quarter_turns: Optional[np.ndarray] = None) -> np.ndarray:
    """(4, 4) similarity scene_from_world: up -> +z, centre -> origin, scaled (see module docstring).

    c2w: (N, 4, 4) OpenCV; quarter_turns: (N,) how each photo is turned to be shown (EXIF), for the cameras' up.
    """
    centres = c2w[:, :3, 3]
    camera_up = level_up(c2w, quarter_turns)
    roi_centre, roi_radius, roi_keep = region_of_interest(xyz, track, c2w)
    method = config.get("up_est_method", "camera")
    if method == "ground":
        up = fit_plane(xyz[roi_keep], threshold=0.01 * roi_radius)
        if up @ camera_up < 0:
            up = -up
        angle = np.degrees(np.arccos(np.clip(up @ camera_up, -1, 1)))
        if angle > 45:
            log.warning(f"The plane fitted to the sparse points is {angle:.0f} degrees from the cameras' up "
                        "direction (no ground in view?); using the cameras' up (dataset.up_est_method=camera).")
            up = camera_up
    elif method == "camera":
        up = camera_up
    else:
        raise DatasetError(f"dataset.up_est_method={method!r}; use 'camera' or 'ground'.")
    method = config.get("center_est_method", "lookat")
    centre = {"camera": lambda: centres.mean(0), "lookat": lambda: lookat_point(c2w),
              "point": lambda: roi_centre}.get(method)
    if centre is None:
        raise DatasetError(f"dataset.center_est_method={method!r}; use 'camera', 'lookat' or 'point'.")
    centre = centre()
    if config.get("radius") is not None:
        scale = number_at_least(config.radius, "dataset.radius", 0, float, exclusive=True) / roi_radius
    elif config.get("cam_downscale"):  # instant-nsr-pl's fixed divisor, in the capture's own units
        scale = 1.0 / number_at_least(config.cam_downscale, "dataset.cam_downscale", 0, float, exclusive=True)
    else:
        scale = 1.0 / np.linalg.norm(centres - centre, axis=1).min()
    return z_up_similarity(up, centre, scale)


Z_UP = np.array([0.0, 0.0, 1.0])  # the normalised scene's up: z_up_similarity turns the estimated one to it
MIN_TRACK = 3  # sparse points seen by fewer images are mostly mismatches: the SDF is not pulled to them


def z_up_similarity(up: np.ndarray, centre: np.ndarray, scale: float) -> np.ndarray:
    """(4, 4) scene_from_world turning unit vector ``up`` to +z, moving ``centre`` to the origin, scaling by
    ``scale``."""
    out = np.eye(4)
    out[:3, :3] = scale * rotation_between(up, np.array([0.0, 0.0, 1.0]))
    out[:3, 3] = -out[:3, :3] @ centre
    return out


def transform_poses(scene_from_world: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """Apply a similarity to (N, 4, 4) c2w (OpenCV or OpenGL), keeping the rotations orthonormal."""
    out = scene_from_world @ c2w
    out[:, :3, :3] /= np.cbrt(np.linalg.det(scene_from_world[:3, :3]))
    return out


def match_masks(mask_dir: str, names: List[str]) -> Dict[str, str]:
    """image name -> mask path; every image needs one.

    A COLMAP image name may hold folders (``left/a.jpg``, a rig's cameras); its mask is found at the same
    relative path, by COLMAP's naming (``left/a.jpg.png``) or the same stem (``left/a.png``), else by the base
    name alone in ``mask_dir`` itself, which two images in different folders cannot share.
    """
    files = sorted(os.path.relpath(os.path.join(folder, f), mask_dir).replace(os.sep, "/")
                   for folder, _, found in os.walk(mask_dir) for f in found
                   if os.path.splitext(f)[1] in IMAGE_EXTENSIONS)
    by_key: Dict[str, str] = {}
    for f in files:
        by_key.setdefault(os.path.splitext(f)[0], f)
    found = {}
    for name in names:
        base = os.path.basename(name)
        for key in (name, os.path.splitext(name)[0], base, os.path.splitext(base)[0]):
            if key in by_key:
                found[name] = os.path.join(mask_dir, by_key[key])
                break
    if not found:
        raise DatasetError(f"None of the {len(files)} files in {mask_dir} matches an image name (e.g. "
                           f"{files[0] if files else 'none'} vs {names[0]}); name each mask after "
                           "its image (same stem, any extension) or remove the folder.")
    missing = [n for n in names if n not in found]
    if missing:
        raise DatasetError(f"{len(missing)} of {len(names)} images have no mask in {mask_dir}, the first being "
                           f"{missing[0]}; give every image a mask or remove the folder.")
    taker: Dict[str, str] = {}  # mask path -> the image that takes it
    for name, path in found.items():
        if path in taker:
            raise DatasetError(f"Images {taker[path]} and {name} would both take the mask {path}; put each image's "
                               f"mask at its own path under {mask_dir} (e.g. {os.path.splitext(name)[0]}.png).")
        taker[path] = name
    return found


class Capture:
    """The parts of a COLMAP capture every split needs (no pixels): views, points, normalisation."""

    def __init__(self, config: Any):
        root = config.root_dir
        if not os.path.isdir(root):
            raise DatasetError(missing_root_message(root, "COLMAP: <root>/images/ and <root>/sparse/0/"))
        self.config = config
        self.image_dir = os.path.join(root, config.get("images_dir", "images"))
        sparse_dir, self.models_note = find_sparse_dir(root)
        rec = read_reconstruction(sparse_dir)
        self.views = registered_views(rec)
        self.sparse_dir = sparse_dir
        self.xyz, self.rgb, self.track = sparse_points(rec)
        c2w = np.stack([v.c2w for v in self.views])
        # Phone photos shown turned (EXIF orientation): their up is the way they are shown, not their top row.
        # When all are shown the same way, images and cameras are turned that way too (``upright`` quarter turns
        # clockwise): renders look like the photos, and img_wh is the size as shown.
        self.quarter_turns = np.array([EXIF_QUARTER_TURNS[exif_orientation(os.path.join(self.image_dir, v.name))]
                                       for v in self.views])
        self.upright = quarter_turns_to_apply(self.quarter_turns)
        self.scene_from_world = normalisation(c2w, self.xyz, self.track, config, self.quarter_turns)
        self.c2w = np.stack([turn_pose_clockwise(pose, self.upright)  # normalised, OpenCV
                             for pose in transform_poses(self.scene_from_world, c2w)])
        self.undistorters = {}
        for v in self.views:
            key = v.camera.camera_id
            if key not in self.undistorters:
                self.undistorters[key] = Undistorter(v.camera)
        self.names = [v.name for v in self.views]
        sizes = [self.undistorters[v.camera.camera_id].size for v in self.views]
        if self.upright % 2:
            sizes = [(h, w) for w, h in sizes]
        # (w, h) as the images are used
        self.size = common_target_size(config, sizes, self.names, "Images after undistortion")
        self.stored_size = self.size[::-1] if self.upright % 2 else self.size  # before turning
        mask_dir = os.path.join(root, config.get("mask_dir", "masks"))
        self.masks = match_masks(mask_dir, self.names) if os.path.isdir(mask_dir) else {}

    def intrinsics(self, k: int) -> np.ndarray:
        """(fx, fy, cx, cy) of view k at the training size."""
        und = self.undistorters[self.views[k].camera.camera_id]
        scale = np.diag([self.stored_size[0] / und.size[0], self.stored_size[1] / und.size[1], 1.0])
        K, _ = turn_intrinsics_clockwise(scale @ und.K, *self.stored_size, self.upright)
        return np.array([K[0, 0], K[1, 1], K[0, 2], K[1, 2]])

    def load(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 undistorted image and (H, W) uint8 mask of view k at the training size, turned
        ``upright``."""
        view = self.views[k]
        image = load_images([os.path.join(self.image_dir, view.name)])[0][..., :3]
        cam = view.camera
        if image.shape[:2] != (cam.height, cam.width):
            raise DatasetError(f"{view.name} is {image.shape[1]}x{image.shape[0]} but COLMAP's camera for it is "
                               f"{cam.width}x{cam.height}; use the images the poses were computed from.")
        und = self.undistorters[cam.camera_id]
        image = und(image)
        mask = np.full(image.shape[:2], 255, np.uint8)
        if self.masks:
            path = self.masks[view.name]
            raw = mask_for_image(read_image(path)[..., 0], (cam.height, cam.width), path, int(self.quarter_turns[k]))
            mask = und(raw, nearest=True)
        if image.shape[1::-1] != self.stored_size:
            image = cv2.resize(image, self.stored_size, interpolation=cv2.INTER_AREA)
            mask = cv2.resize(mask, self.stored_size, interpolation=cv2.INTER_AREA)
        return (np.ascontiguousarray(np.rot90(image, -self.upright)),
                np.ascontiguousarray(np.rot90(mask, -self.upright)))


def load_colmap_split(config: Any, split: str, capture: Optional[Capture] = None) -> SceneData:
    capture = capture or Capture(config)
    n = len(capture.views)
    chosen = holdout_split(n, split, config.get("holdout_every"))
    world_from_scene = np.linalg.inv(capture.scene_from_world)
    w, h = capture.size
    if chosen:
        loaded = [capture.load(k) for k in reading(chosen, f"reading and undistorting the {split} images")]
        images = torch.from_numpy(np.stack([im for im, _ in loaded]))
        masks = torch.from_numpy(np.stack([m for _, m in loaded]))
        intr = np.stack([capture.intrinsics(k) for k in chosen])
        c2w_cv = capture.c2w[chosen]
        names, has_gt = [capture.names[k] for k in chosen], True
    else:
        steps = number_at_least(config.get("n_test_traj_steps", 60), "dataset.n_test_traj_steps", 1)
        c2w_cv = video_path(capture.c2w, Z_UP, steps, video_trajectory(config), log_path=split != "val")
        fx, fy, cx, cy = capture.intrinsics(0)
        # framed as most photos are shown (photos of mixed orientations are used as stored)
        turns = int(np.bincount((capture.quarter_turns - capture.upright) % 4, minlength=4).argmax())
        K, (w, h) = turn_intrinsics_clockwise(np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]]), w, h, turns)
        intr = np.tile([K[0, 0], K[1, 1], K[0, 2], K[1, 2]], (steps, 1))
        images = torch.full((steps, h, w, 3), 255, dtype=torch.uint8)
        masks = torch.full((steps, h, w), 255, dtype=torch.uint8)
        names, has_gt = [f"orbit_{k}" for k in range(steps)], False
    c2w = opencv_to_opengl(torch.from_numpy(c2w_cv[:, :3, :4]).float())
    return SceneData(images=images, masks=masks, c2w=c2w, intrinsics=torch.from_numpy(intr).float(),
                     has_mask=bool(capture.masks), names=names, world_from_scene=world_from_scene, has_gt=has_gt)


@datasets.register("colmap")
class ColmapDataModule(SceneDataModule):
    def __init__(self, config: Any):
        super().__init__(config)
        self._capture: Optional[Capture] = None

    @property
    def capture(self) -> Capture:
        if self._capture is None:
            self._capture = Capture(self.config)
            cap = self._capture
            found = sum(os.path.splitext(f)[1] in IMAGE_EXTENSIONS for _, _, files in os.walk(cap.image_dir)
                        for f in files)
            registered = f"{len(cap.views)} of the {found} images in {cap.image_dir} registered" \
                if found > len(cap.views) else f"{len(cap.views)} registered images"
            if cap.models_note:
                log.info(cap.models_note)
            log.info(f"COLMAP capture: {registered}, {len(cap.undistorters)} camera(s) "
                     f"({', '.join(sorted({u.camera.model.name for u in cap.undistorters.values()}))}), "
                     f"{len(cap.xyz)} sparse points, training size {cap.size[0]}x{cap.size[1]}")
            turned, n = int((cap.quarter_turns != 0).sum()), len(cap.views)
            if cap.upright:
                log.info(f"The photos are shown turned (EXIF orientation): used as shown, {90 * cap.upright} "
                         "degrees clockwise from the stored pixels COLMAP read, with their cameras turned to match.")
            elif turned:
                log.info(f"{turned} of {n} photos are shown turned (EXIF orientation) and the others not: all are used "
                         "as stored, so some look sideways; up is the way each is shown.")
        return self._capture

    def scene_up(self) -> np.ndarray:
        return Z_UP  # the normalisation turned the estimated up (up_est_method: camera or ground) to +z

    def load_split(self, config: Any, split: str) -> SceneData:  # a method: all splits share one Capture
        return load_colmap_split(config, split, self.capture)

    def has_orbit(self) -> bool:
        return True

    def sparse_points(self) -> np.ndarray:
        """The sparse points seen by at least ``MIN_TRACK`` images (fewer are mostly mismatches), normalised."""
        cap = self.capture
        xyz = cap.xyz[cap.track >= MIN_TRACK]
        return xyz @ cap.scene_from_world[:3, :3].T + cap.scene_from_world[:3, 3]

    def free_sightlines(self) -> np.ndarray:
        """(S, 2, 3) (camera centre, sparse point it sees) pairs, normalised: the space between is empty."""
        cap = self.capture  # read again, only for the loss that asks: a point's track holds an entry per image
        m = cap.scene_from_world
        return sightlines(read_reconstruction(cap.sparse_dir), MIN_TRACK) @ m[:3, :3].T + m[:3, 3]

    def write_overview(self, path: str) -> bool:
        """Cameras (red frusta), sparse points (their colours), region of interest (green box) as one PLY."""
        cap = self.capture
        xyz = cap.xyz @ cap.scene_from_world[:3, :3].T + cap.scene_from_world[:3, 3]
        centre, radius, _ = region_of_interest(xyz, cap.track, cap.c2w)
        frusta = camera_glyphs(cap.c2w, 0.1 * np.linalg.norm(cap.c2w[:, :3, 3], axis=1).mean())
        box = box_glyph(centre, radius / np.sqrt(3))
        points = np.concatenate([xyz, frusta, box])
        colours = np.concatenate([cap.rgb, np.tile([[255, 0, 0]], (len(frusta), 1)),
                                  np.tile([[0, 255, 0]], (len(box), 1))]).astype(np.uint8)
        write_points_ply(path, points, colours)
        return True
