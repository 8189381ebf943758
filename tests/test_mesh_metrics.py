"""Surface distances against known answers: two concentric spheres are their radius difference apart."""
import numpy as np
import pytest
import trimesh

from utils.mesh_metrics import (bbox_diagonal, camera_errors, fit_similarity, nearest_tree, sample_surface,
                                surface_distances, uniform_surface_points)


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


def test_uniform_samples_keep_one_point_per_cell_of_every_cell_the_surface_crosses():
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=20.0)
    mesh.vertices += [3.0, -2.0, 650.0]  # DTU-like millimetres, far from the origin
    points = uniform_surface_points(mesh.vertices, mesh.faces, 0.5)
    cells = np.floor(points / 0.5).astype(np.int64)
    assert len(np.unique(cells, axis=0)) == len(points)  # one point per cell
    # the reference: the first of the 4-per-cell area samples in each cell, by a row-wise unique
    dense = sample_surface(mesh.vertices, mesh.faces, int(4 * mesh.area / 0.25), seed=0)
    first = np.unique(np.floor(dense / 0.5).astype(np.int64), axis=0, return_index=True)[1]
    np.testing.assert_array_equal(points, dense[np.sort(first)])


def test_nearest_distances_are_exact_for_points_near_and_far_from_the_surface():
    rng = np.random.default_rng(0)
    surface = sphere_points(1.0, n=5000)
    queries = np.concatenate([sphere_points(1.02, n=200, seed=3), rng.uniform(-0.5, 0.5, (200, 3)),
                              rng.normal(0, 5.0, (200, 3))])  # on it, inside it, far off
    brute = np.sqrt(((queries[:, None, :] - surface[None]) ** 2).sum(-1)).min(axis=1)
    np.testing.assert_allclose(nearest_tree(surface).query(queries)[0], brute, rtol=1e-12)


def test_the_similarity_fit_recovers_a_known_scale_rotation_and_shift():
    """Camera centres in an arbitrary frame (COLMAP's) -> the true frame: the fit finds the similarity that made
    them, a rotation (never a reflection) times a scale plus a shift."""
    import cv2

    rng = np.random.default_rng(0)
    true = rng.normal(size=(40, 3))
    rotation = cv2.Rodrigues(np.array([0.3, -1.2, 2.0]))[0]
    made = np.eye(4)
    made[:3, :3], made[:3, 3] = 0.37 * rotation, [4.0, -2.0, 0.5]
    arbitrary = (true - made[:3, 3]) @ np.linalg.inv(made[:3, :3]).T  # made maps these onto true
    M = fit_similarity(arbitrary, true)
    np.testing.assert_allclose(M, made, atol=1e-9)
    noisy = fit_similarity(arbitrary + rng.normal(scale=0.01, size=arbitrary.shape), true)
    assert np.linalg.det(noisy[:3, :3]) > 0 and abs(np.cbrt(np.linalg.det(noisy[:3, :3])) - 0.37) < 0.01


def test_camera_errors_measure_each_cameras_turn_and_shift_in_the_true_frame():
    """Cameras given in an arbitrary frame, some turned and moved by known amounts before that frame was applied:
    the errors are those amounts, whatever the frame (its rotation must not count as an error)."""
    import cv2

    rng = np.random.default_rng(1)
    true = np.tile(np.eye(4), (30, 1, 1))
    for c2w in true:
        c2w[:3, :3] = cv2.Rodrigues(rng.normal(size=3))[0]
        c2w[:3, 3] = rng.normal(scale=3.0, size=3)
    turns = np.zeros(30)
    turns[::3] = rng.uniform(0.5, 3.0, size=10)  # degrees, a third of the cameras
    shifts = np.zeros(30)
    shifts[1::3] = rng.uniform(0.01, 0.05, size=10)
    moved = true.copy()
    for k in range(30):
        axis = rng.normal(size=3)
        moved[k, :3, :3] = cv2.Rodrigues(np.radians(turns[k]) * axis / np.linalg.norm(axis))[0] @ true[k, :3, :3]
        direction = rng.normal(size=3)
        moved[k, :3, 3] += shifts[k] * direction / np.linalg.norm(direction)
    frame = np.eye(4)  # true -> arbitrary: scale 2.5, a turn, a shift
    frame[:3, :3], frame[:3, 3] = 2.5 * cv2.Rodrigues(np.array([1.0, 0.4, -2.2]))[0], [10.0, 0.0, -3.0]
    arbitrary = np.einsum("ij,njk->nik", frame, moved)
    arbitrary[:, :3, :3] /= 2.5  # rotations stay rotations
    M, angles, centre_errors = camera_errors(arbitrary, true)
    np.testing.assert_allclose(angles, turns, atol=0.1)  # the shifted centres tilt the fitted frame by 0.03 degrees
    exact_centres = arbitrary.copy()  # the turns alone: then the fitted frame is exact, and so are the angles
    exact_centres[:, :3, 3] = true[:, :3, 3] @ frame[:3, :3].T + frame[:3, 3]
    np.testing.assert_allclose(camera_errors(exact_centres, true)[1], turns, atol=1e-6)
    # the fit spreads the shifted centres' error over all, so centre errors match the shifts only roughly
    assert np.abs(centre_errors - shifts).max() < 0.02 and centre_errors[1::3].mean() > 3 * centre_errors[::3].mean()
    assert abs(np.cbrt(np.linalg.det(M[:3, :3])) - 1 / 2.5) < 1e-3
