"""Distances between a reconstructed surface and a reference one (point samples, nearest neighbours).

Accuracy: mean distance from the prediction to the reference; completeness:
from the reference to the prediction; Chamfer: their mean (the figure DTU
papers quote). Precision / recall / F-score count the distances under a
threshold.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import trimesh
from scipy.spatial import cKDTree


def sample_surface(vertices: np.ndarray, faces: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """(n, 3) points spread uniformly by area over a triangle mesh (deterministic for a seed)."""
    mesh = trimesh.Trimesh(np.asarray(vertices), np.asarray(faces), process=False)
    points, _ = trimesh.sample.sample_surface(mesh, n, seed=seed)
    return np.asarray(points)


def surface_distances(pred: np.ndarray, gt: np.ndarray, threshold: float | None = None) -> Dict[str, float]:
    """pred (N, 3), gt (M, 3) surface samples -> accuracy, completeness, chamfer (+ precision, recall, fscore)."""
    d_pred = cKDTree(gt).query(pred, workers=-1)[0]
    d_gt = cKDTree(pred).query(gt, workers=-1)[0]
    out = {"accuracy": float(d_pred.mean()), "completeness": float(d_gt.mean())}
    out["chamfer"] = 0.5 * (out["accuracy"] + out["completeness"])
    if threshold is not None:
        precision, recall = float((d_pred < threshold).mean()), float((d_gt < threshold).mean())
        out.update({"precision": precision, "recall": recall,
                    "fscore": 2 * precision * recall / max(precision + recall, 1e-12)})
    return out


def bbox_diagonal(points: np.ndarray) -> float:
    return float(np.linalg.norm(points.max(0) - points.min(0)))
