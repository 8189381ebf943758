"""Surface distances against known answers: two concentric spheres are their radius difference apart."""
import numpy as np
import pytest
import trimesh

from utils.mesh_metrics import bbox_diagonal, sample_surface, surface_distances


def sphere_points(radius, n=40000, seed=0):
    mesh = trimesh.creation.icosphere(subdivisions=5, radius=radius)
    return sample_surface(mesh.vertices, mesh.faces, n, seed=seed)


def test_concentric_spheres_are_their_offset_apart():
    inner, outer = sphere_points(1.0), sphere_points(1.05, seed=1)
    d = surface_distances(inner, outer, threshold=0.1)
    assert d["accuracy"] == pytest.approx(0.05, abs=0.003)
    assert d["completeness"] == pytest.approx(0.05, abs=0.003)
    assert d["chamfer"] == pytest.approx(0.05, abs=0.003)
    assert d["precision"] == d["recall"] == d["fscore"] == 1.0
    tight = surface_distances(inner, outer, threshold=0.01)
    assert tight["fscore"] == 0.0


def test_missing_half_hurts_completeness_not_accuracy():
    full = sphere_points(1.0)
    half = full[full[:, 2] > 0]
    d = surface_distances(half, full, threshold=0.05)
    assert d["accuracy"] < 0.01 and d["precision"] == 1.0
    # a point at angle phi below the equator is 2 sin(phi / 2) from the kept half; its area-weighted mean
    # over the lower half (density cos phi) is 4 (sqrt(2) - 1) / 3, and the upper half adds zeros
    expected = 0.5 * 4 * (np.sqrt(2) - 1) / 3
    assert d["completeness"] == pytest.approx(expected, abs=0.005)
    assert 0.45 < d["recall"] < 0.55
    assert bbox_diagonal(full) == pytest.approx(2 * np.sqrt(3), rel=0.01)
