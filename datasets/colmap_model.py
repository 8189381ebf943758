"""What a COLMAP reconstruction says, read with pycolmap: views, lens undistortion, sparse points, region of interest.

Shared by the ``colmap`` loader and the capture scripts (``imgs2poses.py``,
``gen_cameras.py``), so that both see the same cameras and the same
undistorted pinhole images. COLMAP's conventions: OpenCV camera axes
(x right, y down, z forward), ``cam_from_world`` poses, pixel centres at
(x + 0.5, y + 0.5) — the same pixel convention as ``datasets.rays``.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from datasets.base import DatasetError, has_model, other_layout_hint

PINHOLE_MODELS = ("SIMPLE_PINHOLE", "PINHOLE")


def registered_image_count(model_dir: str) -> int:
    """How many images a COLMAP model registered: ``images.bin``'s header (the model is not read), else the text
    model read whole; 0 for a model that cannot be read."""
    binary = os.path.join(model_dir, "images.bin")
    if os.path.isfile(binary):
        with open(binary, "rb") as f:
            header = f.read(8)
        return int.from_bytes(header, "little") if len(header) == 8 else 0
    try:
        return read_reconstruction(model_dir).num_reg_images()
    except DatasetError:
        return 0


def find_sparse_dir(root: str) -> tuple[str, str]:
    """(the folder holding the model, a sentence on the models left out or ""). COLMAP's mapper writes one numbered
    model ``<root>/sparse/N`` per group of images it could not join to the others, and ``sparse/0`` is not
    always the largest: the one with the most registered images is taken. Else ``<root>/sparse`` or ``root``."""
    sparse = os.path.join(root, "sparse")
    numbered = sorted((d for d in (os.listdir(sparse) if os.path.isdir(sparse) else [])
                       if d.isdigit() and has_model(os.path.join(sparse, d))), key=int)
    if numbered:
        counts = {d: registered_image_count(os.path.join(sparse, d)) for d in numbered}
        chosen = max(numbered, key=lambda d: counts[d])  # the first of equals
        others = [f"sparse/{d} has {counts[d]}" for d in numbered if d != chosen]
        note = (f"COLMAP model: {os.path.join(sparse, chosen)}, the largest of the {len(numbered)} models COLMAP "
                f"made, with {counts[chosen]} registered images ({', '.join(others)}).") if others else ""
        return os.path.join(sparse, chosen), note
    for candidate in (sparse, root):
        if has_model(candidate):
            return candidate, ""
    capture = capture_of_photos(root)
    if capture == root:
        hint = other_layout_hint(root, "colmap")  # a scene with cameras of its own: no SfM to run
        raise DatasetError(f"No COLMAP model under {root} (looked for sparse/0/cameras.bin|txt);"
                           f"{hint or f' run python scripts/imgs2poses.py {root} first.'}")
    try:
        find_sparse_dir(capture)
    except DatasetError:
        raise DatasetError(f"{root} holds a capture's photos, and there is no COLMAP model for them yet; make it "
                           f"with python scripts/imgs2poses.py {capture}, then give the capture folder, "
                           f"{capture}.") from None
    raise DatasetError(f"{root} holds a capture's photos; give the capture folder, {capture}, which holds them in "
                       "images/ and the COLMAP model in sparse/.")


def capture_of_photos(folder: str) -> str:
    """The capture folder meant by ``folder``: its parent when ``folder`` is a capture's ``images/`` given in its
    place (``load/mug/images`` for ``load/mug``), holding the photos or a rig's folders of them (``images/left/``,
    but no ``images/`` of its own, which a capture folder named images would hold), else ``folder`` itself."""
    from datasets.images import IMAGE_EXTENSIONS

    def holds_photos(path: str) -> bool:
        return os.path.isdir(path) and any(os.path.splitext(f)[1] in IMAGE_EXTENSIONS for f in os.listdir(path))

    path = os.path.normpath(folder)
    if os.path.basename(path) != "images" or not os.path.isdir(path):
        return folder
    entries = [e for e in os.listdir(path) if not e.startswith(".")]
    rig = "images" not in entries and any(holds_photos(os.path.join(path, e)) for e in entries)
    return os.path.dirname(path) or "." if holds_photos(path) or rig else folder


def import_pycolmap():
    """pycolmap, keeping the process's SIGTERM handler: importing it installs glog's, which prints a stack dump and
    ends the process, so a run's clean stop at a scheduler's SIGTERM (temporary files removed) would be lost."""
    if "pycolmap" in sys.modules:
        return sys.modules["pycolmap"]
    handler = signal.getsignal(signal.SIGTERM)
    import pycolmap

    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
    return pycolmap


def read_reconstruction(sparse_dir: str):
    """pycolmap.Reconstruction from a binary or text model folder."""
    try:
        pycolmap = import_pycolmap()
    except ImportError:
        raise DatasetError("Reading COLMAP models needs pycolmap: pip install pycolmap.") from None
    try:
        rec = pycolmap.Reconstruction(sparse_dir)
    except Exception as err:  # pycolmap raises plain runtime errors for unreadable files
        raise DatasetError(f"{sparse_dir} is not a readable COLMAP model ({str(err).splitlines()[0]}).") from None
    if rec.num_reg_images() == 0:
        raise DatasetError(f"The COLMAP model in {sparse_dir} has no registered images.")
    return rec


@dataclass
class View:
    """One registered image. c2w: (4, 4) OpenCV camera-to-world in the COLMAP frame."""

    name: str
    camera: object  # pycolmap.Camera
    c2w: np.ndarray


def registered_views(rec) -> List[View]:
    """Registered images sorted by name (the order a video's frames were taken in)."""
    views = []
    for image_id in rec.reg_image_ids():
        image = rec.images[image_id]
        pose = image.cam_from_world() if callable(image.cam_from_world) else image.cam_from_world
        R, t = pose.rotation.matrix(), np.asarray(pose.translation)
        c2w = np.eye(4)
        c2w[:3, :3] = R.T
        c2w[:3, 3] = -R.T @ t
        views.append(View(name=image.name, camera=rec.cameras[image.camera_id], c2w=c2w))
    return sorted(views, key=lambda v: v.name)


def sightlines(rec, min_track: int) -> np.ndarray:
    """(S, 2, 3) (camera centre, point) for each sparse point seen by at least ``min_track`` images and each image
    that sees it: the space between them is empty, or the image could not have seen the point."""
    lines = []
    for point in rec.points3D.values():
        if point.track.length() >= min_track:
            lines += [(rec.images[e.image_id].projection_center(), point.xyz) for e in point.track.elements]
    return np.array(lines, dtype=np.float64).reshape(-1, 2, 3)


def sparse_points(rec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P, 3) positions, (P, 3) uint8 colours and (P,) track lengths (how many images see each point)."""
    pts = list(rec.points3D.values())
    if not pts:
        return np.zeros((0, 3)), np.zeros((0, 3), np.uint8), np.zeros(0, int)
    xyz = np.array([p.xyz for p in pts], dtype=np.float64)
    rgb = np.array([p.color for p in pts], dtype=np.uint8)
    track = np.array([p.track.length() for p in pts], dtype=int)
    return xyz, rgb, track


class Undistorter:
    """Maps an image of a COLMAP camera (any model pycolmap knows) to an ideal pinhole image.

    The pinhole camera is COLMAP's own choice (``pycolmap.undistort_camera``
    with no blank pixels: only what the lens saw). Pinhole cameras pass
    through untouched. ``K``: (3, 3); ``size``: (width, height).
    """

    def __init__(self, camera):
        pycolmap = import_pycolmap()
        self.camera = camera
        self.identity = camera.model.name in PINHOLE_MODELS
        target = camera if self.identity else pycolmap.undistort_camera(pycolmap.UndistortCameraOptions(), camera)
        self.K = np.asarray(target.calibration_matrix(), dtype=np.float64)
        self.size = (int(target.width), int(target.height))
        self._maps = None

    def crop(self, size: tuple) -> None:
        """Keep only the top-left ``size`` (w, h) of the pinhole image: ``K`` is unchanged."""
        if size[0] > self.size[0] or size[1] > self.size[1]:
            raise ValueError(f"cannot crop a {self.size[0]}x{self.size[1]} image to {size[0]}x{size[1]}")
        self.size = (int(size[0]), int(size[1]))
        self._maps = None

    def _remap_tables(self):
        if self._maps is None:
            w, h = self.size
            v, u = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
            rays = np.stack([(u - self.K[0, 2]) / self.K[0, 0], (v - self.K[1, 2]) / self.K[1, 1]], -1).reshape(-1, 2)
            src = np.asarray(self.camera.img_from_cam(np.concatenate([rays, np.ones((len(rays), 1))], 1)))
            src = src.reshape(h, w, 2) - 0.5  # pixel centre (x + 0.5) -> array index x for cv2.remap
            self._maps = (src[..., 0].astype(np.float32), src[..., 1].astype(np.float32))
        return self._maps

    def __call__(self, image: np.ndarray, nearest: bool = False) -> np.ndarray:
        """(H, W[, C]) image at the camera's size -> the pinhole image at ``self.size``."""
        if self.identity:
            return image[:self.size[1], :self.size[0]]
        import cv2

        map_x, map_y = self._remap_tables()
        return cv2.remap(image, map_x, map_y, cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)


def nearly_one_size(sizes: list, tolerance: float = 0.02) -> tuple | None:
    """The (w, h) that every one of ``sizes`` covers when they differ, but by at most ``tolerance`` of it on each
    side: one phone's cameras, fitted apart, undistort to sizes a few pixels apart. None when they are one size
    already or differ more (another device, or another zoom)."""
    if len(set(sizes)) < 2:
        return None
    smallest = tuple(min(size[k] for size in sizes) for k in (0, 1))
    if all(size[k] - smallest[k] <= tolerance * smallest[k] for size in sizes for k in (0, 1)):
        return smallest
    return None


def lookat_point(c2w: np.ndarray) -> np.ndarray:
    """(3,) least-squares point nearest to all optical axes (OpenCV c2w (N, 4, 4), axis = +z)."""
    A, b = np.zeros((3, 3)), np.zeros(3)
    for pose in c2w:
        d = pose[:3, 2] / np.linalg.norm(pose[:3, 2])
        P = np.eye(3) - np.outer(d, d)
        A += P
        b += P @ pose[:3, 3]
    return np.linalg.lstsq(A, b, rcond=None)[0]


def region_of_interest(xyz: np.ndarray, track: np.ndarray, c2w: np.ndarray, low: float = 2.0, high: float = 98.0,
                       margin: float = 1.1, inside: float = 0.75) -> tuple[np.ndarray, float, np.ndarray]:
    """Where the object is, estimated from the sparse points of an object-centric capture.

    The cameras (OpenCV c2w (N, 4, 4)) circle the object and look at it, so
    the object lies well inside the ring they form, the background beyond it:
    points nearer to the cameras' look-at point than ``inside`` times the
    cameras' median distance from it are candidates. Of those, the ones seen
    by at least the median number of images (stable points) are cut to their
    ``low``-``high`` percentile box on every axis. Returns (centre (3,),
    radius: half the box diagonal times ``margin``, (P,) bool mask of the
    points kept).
    """
    if len(xyz) < 10:
        raise DatasetError(f"Only {len(xyz)} sparse points: too few to find the region of interest; give "
                           "sparse_points_interest.ply or recompute the poses with more overlap between images.")
    focus = lookat_point(c2w)
    reach = inside * np.median(np.linalg.norm(c2w[:, :3, 3] - focus, axis=1))
    near = np.linalg.norm(xyz - focus, axis=1) < reach
    if near.sum() < 10:  # not an object-centric capture (e.g. a forward-facing one): all points
        near = np.ones(len(xyz), bool)
    stable = near & (track >= np.median(track[near]))
    lo = np.percentile(xyz[stable], low, axis=0)
    hi = np.percentile(xyz[stable], high, axis=0)
    keep = stable & np.all((xyz >= lo) & (xyz <= hi), axis=1)
    return (lo + hi) / 2, float(np.linalg.norm(hi - lo) / 2 * margin), keep


def box_from_points(xyz: np.ndarray, margin: float = 1.1) -> tuple[np.ndarray, float]:
    """(centre, radius) of the sphere about the box of a hand-made point selection (NeuS's rule)."""
    lo, hi = xyz.min(0), xyz.max(0)
    return (lo + hi) / 2, float(np.linalg.norm(hi - lo) / 2 * margin)


def write_points_ply(path: str, xyz: np.ndarray, rgb: Optional[np.ndarray] = None) -> None:
    """Coloured point cloud as PLY (MeshLab, trimesh), written atomically."""
    import trimesh

    from utils.io import atomic_path

    colors = None if rgb is None else np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], 1)
    with atomic_path(path) as tmp:
        trimesh.PointCloud(np.asarray(xyz, dtype=np.float64), colors=colors).export(tmp, file_type="ply")


def read_points_ply(path: str) -> np.ndarray:
    import trimesh

    cloud = trimesh.load(path, process=False)
    xyz = np.asarray(getattr(cloud, "vertices", np.zeros((0, 3))))
    if len(xyz) < 2:
        raise DatasetError(f"{path} holds {len(xyz)} points; it should be the sparse points around the object "
                           "(crop sparse_points.ply in MeshLab and save the selection).")
    return xyz


def camera_glyphs(c2w: np.ndarray, size: float) -> np.ndarray:
    """(N * 60, 3) points tracing each camera's frustum (centre to the four corners of its image plane)."""
    t = np.linspace(0, 1, 15)[:, None]
    out = []
    for pose in c2w:
        centre = pose[:3, 3]
        for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
            corner = centre + size * (pose[:3, :3] @ np.array([0.6 * sx, 0.45 * sy, 1.0]))
            out.append(centre + t * (corner - centre))
    return np.concatenate(out) if out else np.zeros((0, 3))


def box_glyph(centre: np.ndarray, half: float, n: int = 30) -> np.ndarray:
    """(12 n, 3) points along the edges of an axis-aligned cube."""
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64)
    t = np.linspace(0, 1, n)[:, None]
    edges = [(a, b) for a in range(8) for b in range(a + 1, 8) if np.abs(corners[a] - corners[b]).sum() == 2]
    return np.concatenate([centre + half * (corners[a] + t * (corners[b] - corners[a])) for a, b in edges])
