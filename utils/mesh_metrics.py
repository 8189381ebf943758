"""Distances between a reconstructed surface and a reference one (point samples, nearest neighbours).

Accuracy: mean distance from the prediction to the reference; completeness:
from the reference to the prediction; Chamfer: their mean (the figure DTU
papers quote). Precision / recall / F-score count the distances under a
threshold.
"""
from __future__ import annotations

import os
from typing import Dict, Tuple

import numpy as np
import trimesh
from scipy.spatial import cKDTree


def sample_surface(vertices: np.ndarray, faces: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """(n, 3) points spread uniformly by area over a triangle mesh (deterministic for a seed)."""
    mesh = trimesh.Trimesh(np.asarray(vertices), np.asarray(faces), process=False)
    points, _ = trimesh.sample.sample_surface(mesh, n, seed=seed)
    return np.asarray(points)


def nearest_tree(points: np.ndarray) -> cKDTree:
    """A k-d tree for nearest-neighbour distances to surface samples. SciPy's default ``compact_nodes`` made
    queries from points inside a surrounding surface (an object a NeuS run without masks lost to its
    background) 8 to 20 times slower: a DTU score of 400k ground-truth points ran over 7 minutes against a
    2.7M-point mesh, and takes 25 s with this tree (``benchmarks/bench_eval.py``)."""
    return cKDTree(points, balanced_tree=False, compact_nodes=False)


QUERY_CHUNK = 65536  # points per nearest-neighbour query between two redraws of the bar


def distances_bar(total: int, what: str):
    """A bar over ``total`` query points that appears only when scoring takes a while (a DTU scan's worst case:
    a minute); use it as a context."""
    from utils.io import late_bar

    return late_bar(total=total, desc=what, unit="pt", unit_scale=True)


def nearest_distances(tree: cKDTree, points: np.ndarray, bar=None, max_dist: float = np.inf) -> np.ndarray:
    """points (P, 3) -> (P,) distance to the tree's nearest point (inf where none lies nearer than max_dist),
    queried in chunks of QUERY_CHUNK that advance ``bar`` (a ``distances_bar``)."""
    out = np.empty(len(points))
    for start in range(0, len(points), QUERY_CHUNK):
        part = points[start:start + QUERY_CHUNK]
        out[start:start + len(part)] = tree.query(part, workers=-1, distance_upper_bound=max_dist)[0]
        if bar is not None:
            bar.update(len(part))
    return out


def surface_distances(pred: np.ndarray, gt: np.ndarray, threshold: float | None = None) -> Dict[str, float]:
    """pred (N, 3), gt (M, 3) surface samples -> accuracy, completeness, chamfer (+ precision, recall, fscore)."""
    with distances_bar(len(pred) + len(gt), "surface distances") as bar:
        d_pred = nearest_distances(nearest_tree(gt), pred, bar)
        d_gt = nearest_distances(nearest_tree(pred), gt, bar)
    out = {"accuracy": float(d_pred.mean()), "completeness": float(d_gt.mean())}
    out["chamfer"] = 0.5 * (out["accuracy"] + out["completeness"])
    if threshold is not None:
        precision, recall = float((d_pred < threshold).mean()), float((d_gt < threshold).mean())
        out.update({"precision": precision, "recall": recall,
                    "fscore": 2 * precision * recall / max(precision + recall, 1e-12)})
    return out


def bbox_diagonal(points: np.ndarray) -> float:
    return float(np.linalg.norm(points.max(0) - points.min(0)))


def uniform_surface_points(vertices: np.ndarray, faces: np.ndarray, spacing: float, seed: int = 0,
                           max_points: int = 50_000_000) -> np.ndarray:
    """Points covering a mesh at about one per ``spacing``-sized cell (DTU evaluates at 0.2 mm).

    Oversamples by area (4 points per spacing^2), then keeps one point per
    voxel of side ``spacing`` so dense and sparse parts of the mesh weigh the same.
    """
    area = trimesh.Trimesh(vertices, faces, process=False).area
    n = int(min(max(4 * area / spacing ** 2, 1000), max_points))
    points = sample_surface(vertices, faces, n, seed)
    cells = np.floor(points / spacing).astype(np.int64)
    cells -= cells.min(axis=0)
    extent = cells.max(axis=0) + 1
    if float(np.prod(extent.astype(np.float64))) < 2.0 ** 62:  # one int64 per voxel: a 1-D unique, ~10x faster
        _, keep = np.unique((cells[:, 0] * extent[1] + cells[:, 1]) * extent[2] + cells[:, 2], return_index=True)
    else:
        _, keep = np.unique(cells, axis=0, return_index=True)
    return points[np.sort(keep)]


def dtu_protocol(pred_points: np.ndarray, gt_points: np.ndarray, obs_mask: np.ndarray, bounds: np.ndarray,
                 resolution: float, plane: np.ndarray, max_dist: float = 20.0) -> Dict[str, float]:
    """The DTU MVS object evaluation on point sets in the DTU world frame (millimetres).

    pred_points (N, 3); gt_points (M, 3) (the ``stl{scan}_total.ply`` cloud);
    obs_mask (X, Y, Z) bool on the grid whose voxel centres start at bounds[0]
    (bounds (2, 3)), voxel side ``resolution`` (``ObsMask{scan}_10.mat``: ObsMask,
    BB, Res); plane (4,) the table
    (``Plane{scan}.mat``, points with [x, 1] . plane > 0 are above it).
    Accuracy averages the prediction's distances to the ground truth over the
    predicted points inside the observation mask; completeness averages the
    ground truth's distances to the prediction over the ground-truth points
    above the table; in both, distances of ``max_dist`` or more are outliers
    left out of the mean, as the official evaluation does.
    """
    near_box = np.all((pred_points >= bounds[0] - 60.0) & (pred_points < bounds[1] + 120.0), axis=1)
    pred_near = pred_points[near_box]  # the official script's margin about the observation box
    cell = np.round((pred_near - bounds[0]) / resolution).astype(np.int64)
    inside = np.all((cell >= 0) & (cell < np.asarray(obs_mask.shape)), axis=1)
    observed = np.zeros(len(pred_near), dtype=bool)
    observed[inside] = obs_mask[tuple(cell[inside].T)]
    pred_obs = pred_near[observed]
    above = np.concatenate([gt_points, np.ones((len(gt_points), 1))], axis=1) @ np.asarray(plane).reshape(4) > 0
    gt_above = gt_points[above]
    if len(pred_obs) == 0:
        raise ValueError("no predicted point lies inside the observation mask: is the mesh in the DTU world frame?")
    # a search never looks past max_dist: a point with no neighbour nearer is an outlier (inf) either way
    with distances_bar(len(pred_obs) + len(gt_above), "DTU distances") as bar:
        d_pred = nearest_distances(nearest_tree(gt_points), pred_obs, bar, max_dist)
        d_gt = nearest_distances(nearest_tree(pred_near), gt_above, bar, max_dist)
    accuracy = float(d_pred[d_pred < max_dist].mean()) if np.any(d_pred < max_dist) else float("inf")
    completeness = float(d_gt[d_gt < max_dist].mean()) if np.any(d_gt < max_dist) else float("inf")
    return {"accuracy": accuracy, "completeness": completeness, "chamfer": 0.5 * (accuracy + completeness),
            "n_pred_observed": int(len(pred_obs)), "n_gt_above_table": int(len(gt_above))}


def fit_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The (4, 4) similarity (scale, rotation, shift) that maps the (N, 3) points ``src`` closest to ``dst`` in
    least squares (Umeyama's closed form): to bring a reconstruction's arbitrary frame (COLMAP's) onto the true one
    by its camera centres."""
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    U, S, Vt = np.linalg.svd((dst - dst_mean).T @ (src - src_mean) / len(src))
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])  # a rotation, not a reflection
    scale = np.trace(np.diag(S) @ D) / (src - src_mean).var(0).sum()
    M = np.eye(4)
    M[:3, :3] = scale * U @ D @ Vt
    M[:3, 3] = dst_mean - M[:3, :3] @ src_mean
    return M


def camera_errors(est_c2w: np.ndarray, true_c2w: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pose errors of estimated cameras (SfM's, in an arbitrary frame) against the true ones.

    est_c2w, true_c2w: (N, 3 or 4, 4) world-from-camera matrices of the same N cameras. The similarity that best maps
    the estimated centres onto the true ones is applied first. Returns (that (4, 4) similarity, (N,) rotation errors
    in degrees, (N,) centre errors in the true frame's units)."""
    est_c2w, true_c2w = np.asarray(est_c2w, dtype=float), np.asarray(true_c2w, dtype=float)
    M = fit_similarity(est_c2w[:, :3, 3], true_c2w[:, :3, 3])
    centre_errors = np.linalg.norm(est_c2w[:, :3, 3] @ M[:3, :3].T + M[:3, 3] - true_c2w[:, :3, 3], axis=1)
    rotation = M[:3, :3] / np.cbrt(np.linalg.det(M[:3, :3]))
    relative = np.einsum("nji,jk,nkl->nil", true_c2w[:, :3, :3], rotation, est_c2w[:, :3, :3])  # true^T R est
    # the angle from 2 cos = trace - 1 and 2 sin = |skew part|: precise near 0, where arccos alone is not
    skew = relative[:, [2, 0, 1], [1, 2, 0]] - relative[:, [1, 2, 0], [2, 0, 1]]
    angles = np.arctan2(np.linalg.norm(skew, axis=1), np.trace(relative, axis1=1, axis2=2) - 1)
    return M, np.degrees(angles), centre_errors


def score_against_surface(verts: np.ndarray, faces: np.ndarray, gt_verts: np.ndarray, gt_faces: np.ndarray,
                          n_samples: int = 100_000) -> Dict[str, float]:
    """Mesh vs a known true surface: distances from n_samples area-uniform points on each, F-score at 1 %
    of the true surface's bounding-box diagonal, and the Chamfer distance as a percentage of that diagonal."""
    diag = bbox_diagonal(gt_verts)
    scores = surface_distances(sample_surface(verts, faces, n_samples), sample_surface(gt_verts, gt_faces, n_samples, 1),
                               threshold=0.01 * diag)
    scores["chamfer_percent_of_diagonal"] = 100.0 * scores["chamfer"] / diag
    scores["bbox_diagonal"] = diag
    scores["fscore_threshold"] = 0.01 * diag
    return scores


def dtu_evaluation_files(dtu_dir: str, scan: int) -> dict:
    """The files of one scan's DTU evaluation data by role (stl, obs, plane). Raises FileNotFoundError naming the
    first missing one."""
    paths = {"stl": os.path.join(dtu_dir, "Points", "stl", f"stl{scan:03d}_total.ply"),
             "obs": os.path.join(dtu_dir, "ObsMask", f"ObsMask{scan}_10.mat"),
             "plane": os.path.join(dtu_dir, "ObsMask", f"Plane{scan}.mat")}
    for path in paths.values():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing; the DTU evaluation folder holds Points/stl/stl<scan>_total.ply "
                                    "and ObsMask/ObsMask<scan>_10.mat, Plane<scan>.mat.")
    return paths


def load_dtu_evaluation(dtu_dir: str, scan: int):
    """The DTU evaluation data of one scan -> (gt points (M, 3), obs_mask (X, Y, Z) bool, bounds (2, 3),
    resolution, plane (4,)). Raises FileNotFoundError naming the first missing file."""
    from scipy.io import loadmat

    paths = dtu_evaluation_files(dtu_dir, scan)
    gt = np.asarray(trimesh.load(paths["stl"], process=False).vertices, dtype=np.float64)
    obs = loadmat(paths["obs"])
    plane = loadmat(paths["plane"])["P"].astype(np.float64).reshape(4)
    return (gt, obs["ObsMask"].astype(bool), obs["BB"].astype(np.float64), float(np.asarray(obs["Res"]).ravel()[0]),
            plane)


def project(points: np.ndarray, K: np.ndarray, c2w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """points (P, 3) world -> (uv (P, 2) pixel coordinates, pixel centres at whole numbers as OpenCV has them;
    depth (P,)) for a camera K (3, 3), c2w (4, 4) OpenCV. The uv of a point at or behind the camera (depth
    <= 1e-6) means nothing."""
    w2c = np.linalg.inv(c2w)
    p = points @ w2c[:3, :3].T + w2c[:3, 3]
    uvw = p @ K.T
    return uvw[:, :2] / np.where(p[:, 2] > 1e-6, uvw[:, 2], 1.0)[:, None], p[:, 2]


def in_any_frustum(points: np.ndarray, cameras, max_depth: float | None = None, chunk: int = 200_000) -> np.ndarray:
    """(P,) bool: the point projects inside the image of at least one camera (in front of it, within max_depth).

    points: (P, 3); cameras: iterable of (K (3, 3), c2w (4, 4) OpenCV, width, height).
    """
    seen = np.zeros(len(points), bool)
    for K, c2w, width, height in cameras:
        for s in range(0, len(points), chunk):
            uv, z = project(points[s:s + chunk], K, c2w)
            front = z > 1e-6 if max_depth is None else (z > 1e-6) & (z < max_depth)
            inside = front & (uv[:, 0] >= 0) & (uv[:, 0] < width) & (uv[:, 1] >= 0) & (uv[:, 1] < height)
            seen[s:s + chunk] |= inside
    return seen


# the DTU culling's mask dilation: 12 pixels of DTU's 1600-pixel-wide images, scaled to other image sizes
DTU_DILATION_PX, DTU_IMAGE_WIDTH = 12.0, 1600


def inside_mask_hull(points: np.ndarray, cameras, masks, dilation_px: float = DTU_DILATION_PX,
                     chunk: int = 200_000) -> np.ndarray:
    """(P,) bool: in every view the point projects outside the image or onto the view's mask dilated by
    ``dilation_px`` pixels of a 1600-pixel-wide image (scaled to each image's width: 12 at DTU's 1600x1200, 6 at
    800x600): the visual hull DTU meshes are culled to before scoring (MonoSDF and 2DGS, after UNISURF), which
    removes what lies outside the object's silhouette.

    points: (P, 3); cameras: (K (3, 3), c2w (4, 4) OpenCV, width, height) per view; masks: (h, w) bool per view,
    at the image's size or a scaled copy (a half-size mask). A point behind a camera is outside its image.
    """
    import cv2

    keep = np.ones(len(points), bool)
    for (K, c2w, width, height), mask in zip(cameras, masks):
        mh, mw = mask.shape
        radius = int(round(dilation_px * mw / DTU_IMAGE_WIDTH))  # in the mask's pixels
        if radius > 0:
            disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
            mask = cv2.dilate(mask.astype(np.uint8), disk) > 0
        for s in range(0, len(points), chunk):
            uv, z = project(points[s:s + chunk], K, c2w)
            # the mask pixel holding uv (a scaled mask's pixel covers several of the image's)
            col = np.floor((uv[:, 0] + 0.5) * mw / width).astype(np.int64)
            row = np.floor((uv[:, 1] + 0.5) * mh / height).astype(np.int64)
            seen = (z > 1e-6) & (col >= 0) & (col < mw) & (row >= 0) & (row < mh)
            on_mask = np.zeros(len(uv), bool)
            on_mask[seen] = mask[row[seen], col[seen]]
            keep[s:s + chunk] &= ~seen | on_mask
    return keep
