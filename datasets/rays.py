"""Camera conventions and rays: the one place where axes are flipped.

Internally every camera-to-world matrix is OpenGL/Blender (x right, y up, the
camera looks down -z) and pixel centres sit at (x + 0.5, y + 0.5). Loaders of
OpenCV-convention data (DTU, COLMAP) call ``opencv_to_opengl`` once at load.
"""
from __future__ import annotations

import numpy as np
import torch

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
