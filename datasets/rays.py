"""Camera conventions and rays: the one place where axes are flipped.

Internally every camera-to-world matrix is OpenGL/Blender (x right, y up, the
camera looks down -z) and pixel centres sit at (x + 0.5, y + 0.5). Loaders of
OpenCV-convention data (DTU, COLMAP) call ``opencv_to_opengl`` once at load.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger("nsr")

_CV_TO_GL = torch.tensor([1.0, -1.0, -1.0])


def opencv_to_opengl(c2w: torch.Tensor) -> torch.Tensor:
    """Flip the camera y and z axes: (..., 3, 4|4) OpenCV c2w -> OpenGL c2w (same camera centre)."""
    out = c2w.clone()
    out[..., :3, :3] = out[..., :3, :3] * _CV_TO_GL.to(c2w)
    return out


def opencv_look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray) -> np.ndarray:
    """(4, 4) OpenCV camera-to-world at ``eye`` looking at ``target``, image up along ``up`` (x right, y down)."""
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, np.cross(forward, right), forward, eye
    return pose


VIDEO_TRAJECTORIES = ("auto", "orbit", "sweep")  # dataset.video_trajectory
# Cameras that leave a wider gap than this around the video's orbit were all on one side of the object (a DTU scan,
# a facade, a statue against a wall): a full turn would spend the video on a side no camera saw.
MAX_ORBIT_GAP_DEG = 120.0


def rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(3, 3) the smallest rotation taking direction ``a`` (3,) onto direction ``b`` (3,); half a turn about an
    axis square to them when they are opposite."""
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    v, c = np.cross(a, b), float(a @ b)
    if c < -1 + 1e-9:
        axis = np.cross(a, [1.0, 0, 0] if abs(a[0]) < 0.9 else [0, 1.0, 0])
        axis /= np.linalg.norm(axis)
        return 2 * np.outer(axis, axis) - np.eye(3)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1 + c)


def covered_arc(azimuths: np.ndarray) -> tuple[float, float]:
    """(start, span) in radians of the shortest arc that holds every azimuth (N,) (radians, any range): it runs
    from ``start`` counter-clockwise over ``span``, which is 2 pi less the widest gap between neighbours."""
    a = np.sort(np.mod(azimuths, 2 * np.pi))
    gaps = np.diff(np.concatenate([a, a[:1] + 2 * np.pi]))
    widest = int(np.argmax(gaps))
    return float(a[(widest + 1) % len(a)]), float(2 * np.pi - gaps[widest])


def video_path(c2w_cv: np.ndarray, up: np.ndarray, n_frames: int, kind: str = "auto", log_path: bool = True
               ) -> np.ndarray:
    """(n_frames, 4, 4) OpenCV c2w of the test video: upright about ``up`` (3,), looking at the origin from the
    capture cameras' (N, 4, 4) mean distance, moving in azimuth and elevation about ``up``.

    ``orbit``: a full turn at the cameras' mean elevation, from the first camera. ``sweep``: a loop across the
    region the cameras cover, the ellipse inscribed in their box of azimuth (over the arc they cover) and
    elevation: out and back from the middle of that arc to each end (a sine, so the video loops without a jump and
    slows at the ends), from their highest to their lowest and back. Cameras at one height make it a sweep along
    their arc; DTU's rows of cameras a loop that stays among them. ``auto``: the loop when the cameras leave a gap
    in azimuth wider than MAX_ORBIT_GAP_DEG (a walk half round the object, a facade, a DTU scan's cap in front of
    it), else the turn. The loop is said in the log with ``log_path`` (the loaders' val split, the same path when
    nothing is held out, says nothing).
    """
    if kind not in VIDEO_TRAJECTORIES:
        raise ValueError(f"video trajectory {kind!r} is not one of {VIDEO_TRAJECTORIES}")
    up = up / np.linalg.norm(up)
    e1 = np.linalg.svd(up[None])[2][-1]  # any horizontal direction
    e2 = np.cross(up, e1)
    centres = c2w_cv[:, :3, 3]
    directions = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    azimuth = np.arctan2(directions @ e2, directions @ e1)
    elevation = np.arcsin(np.clip(directions @ up, -1.0, 1.0))
    arc_start, span = covered_arc(azimuth)
    gap = 2 * np.pi - span
    turns = 2 * np.pi * np.arange(n_frames) / n_frames
    if kind == "orbit" or (kind == "auto" and gap <= np.radians(MAX_ORBIT_GAP_DEG)):
        azimuth, elevation = azimuth[0] + turns, np.full(n_frames, elevation.mean())
    else:
        low, high = elevation.min(), elevation.max()
        azimuth = arc_start + span / 2 + span / 2 * np.sin(turns)
        elevation = (low + high) / 2 + (high - low) / 2 * np.cos(turns)
        if log_path:
            how = "dataset.video_trajectory=sweep" if kind == "sweep" else \
                f"{np.degrees(gap):.0f} degrees of it unseen; dataset.video_trajectory=orbit turns all round"
            tall = np.degrees(high - low)
            log.info(f"Test video: back and forth across the {np.degrees(span):.0f} degrees of azimuth the cameras "
                     f"cover{f', looping over their {tall:.0f} degrees of elevation' if tall >= 1 else ''} ({how})")
    elevation = np.clip(elevation, -np.radians(89), np.radians(89))  # never straight along up: no roll to keep
    eyes = np.cos(elevation)[:, None] * (np.cos(azimuth)[:, None] * e1 + np.sin(azimuth)[:, None] * e2) \
        + np.sin(elevation)[:, None] * up
    distance = np.linalg.norm(centres, axis=1).mean()
    return np.stack([opencv_look_at(distance * eye, np.zeros(3), up) for eye in eyes])


def turn_pose_clockwise(c2w_cv: np.ndarray, quarter_turns: int = 1) -> np.ndarray:
    """(4, 4) OpenCV camera-to-world of the camera that sees its image turned ``quarter_turns`` times a quarter
    clockwise (``np.rot90(image, -quarter_turns)``): same centre and rays, rolled about the optical axis. Each
    turn makes the new x axis the old -y and the new y axis the old x."""
    c2w_cv = c2w_cv.copy()
    for _ in range(quarter_turns % 4):
        c2w_cv[:3, 0], c2w_cv[:3, 1] = -c2w_cv[:3, 1].copy(), c2w_cv[:3, 0].copy()
    return c2w_cv


def turn_intrinsics_clockwise(K: np.ndarray, width: int, height: int, quarter_turns: int = 1):
    """(3, 3) intrinsics and (width, height) of a width x height image turned ``quarter_turns`` times a quarter
    clockwise, with ``turn_pose_clockwise``'s pose. Each turn takes the pixel (u, v) to (height - v, u)."""
    K = K.copy()
    for _ in range(quarter_turns % 4):
        fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
        K[0, 0], K[1, 1], K[0, 2], K[1, 2] = fy, fx, height - cy, cx
        width, height = height, width
    return K, (width, height)


def cameras_up(c2w_cv: np.ndarray, quarter_turns=None) -> np.ndarray:
    """(3,) unit mean, in the world, of the direction each photo is shown as up: the -y axis of its camera
    turned as the photo is shown.

    c2w_cv: (N, 4, 4) OpenCV camera-to-world; quarter_turns: (N,) ints, how each photo is turned clockwise to be
    shown (EXIF; None: as stored).
    """
    turns = np.zeros(len(c2w_cv), int) if quarter_turns is None else np.asarray(quarter_turns)
    up = -sum(turn_pose_clockwise(pose, int(q))[:3, 1] for pose, q in zip(c2w_cv, turns))
    return up / max(np.linalg.norm(up), 1e-12)


def level_up(c2w_cv: np.ndarray, quarter_turns=None) -> np.ndarray:
    """(3,) unit up of the world the cameras were held level in: the direction closest to perpendicular to every
    photo's horizontal (its camera's x axis, turned as the photo is shown), which a level camera keeps horizontal
    whatever its pitch, oriented along ``cameras_up``. The mean of the photos' up directions leans towards what
    they look down on: 26 degrees for photos 30 degrees down over a 100-degree arc, which tilted the scene's
    frame and rolled its video. When the horizontals do not span a plane (every camera facing the same way),
    ``cameras_up``.

    c2w_cv: (N, 4, 4) OpenCV camera-to-world; quarter_turns: (N,) ints, how each photo is turned clockwise to be
    shown (EXIF; None: as stored).
    """
    turns = np.zeros(len(c2w_cv), int) if quarter_turns is None else np.asarray(quarter_turns)
    rights = np.stack([turn_pose_clockwise(pose, int(q))[:3, 0] for pose, q in zip(c2w_cv, turns)])
    spread, axes = np.linalg.eigh(rights.T @ rights)  # ascending
    mean_up = cameras_up(c2w_cv, quarter_turns)
    if spread[1] < 1e-3 * spread[2]:
        return mean_up
    up = axes[:, 0]
    return up if up @ mean_up >= 0 else -up


def pixel_directions(x: torch.Tensor, y: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """Camera-space ray directions through pixel centres, OpenGL convention (z = -1).

    x, y: (M,) pixel column/row (integer or float); intrinsics: (M, 4) or (4,)
    as (fx, fy, cx, cy). Returns (M, 3), not normalised.
    """
    fx, fy, cx, cy = intrinsics.unbind(-1)
    dx = (x.float() + 0.5 - cx) / fx
    dy = -(y.float() + 0.5 - cy) / fy
    return torch.stack([dx, dy, -torch.ones_like(dx)], dim=-1)


def image_directions(width: int, height: int, intrinsics: torch.Tensor) -> torch.Tensor:
    """(H * W, 3) directions for every pixel of an image, row-major. intrinsics: (4,)."""
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return pixel_directions(x.reshape(-1), y.reshape(-1), intrinsics)


def get_rays(directions: torch.Tensor, c2w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """World rays from camera-space directions.

    directions: (M, 3); c2w: (M, 3, 4) or (3, 4). Returns (origins (M, 3),
    unit directions (M, 3)).
    """
    if c2w.dim() == 2:
        rays_d = directions @ c2w[:, :3].T
        rays_o = c2w[:, 3].expand_as(rays_d)
    else:
        rays_d = (c2w[:, :3, :3] @ directions[..., None])[..., 0]
        rays_o = c2w[:, :3, 3]
    return rays_o.contiguous(), torch.nn.functional.normalize(rays_d, dim=-1)
