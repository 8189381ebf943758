"""Occupancy grid: EMA/threshold update, and marching that never skips occupied cells."""
import torch

from models.occupancy import OccupancyGrid
from models.rendering import ray_aabb_intersect
from utils.host_sync import HostSyncCounter


def test_update_keeps_ema_maximum_and_thresholds_by_mean():
    grid = OccupancyGrid([-1, -1, -1, 1, 1, 1], resolution=8, warmup_steps=10, update_every_n_steps=1, occ_thre=0.5)
    blob = lambda x: (x.norm(dim=-1) < 0.5).float()  # noqa: E731
    grid.update(0, blob)
    inside = grid.grid_coords.float().add(0.5).div(8).mul(2).sub(1).norm(dim=-1) < 0.3
    assert grid.binaries.view(-1)[inside].all()
    assert not grid.binaries.view(-1)[~(grid.grid_coords.float().add(0.5).div(8).mul(2).sub(1).norm(dim=-1) < 0.8)].any()
    before = grid.occs.clone()
    grid.update(1, lambda x: torch.zeros(len(x)))  # nothing new: occupancy decays by ema_decay
    torch.testing.assert_close(grid.occs, before * 0.95)
    assert grid.update(2, blob) is True  # every step is due at update_every_n_steps=1
    grid.update_every_n_steps = 4
    assert grid.update(3, blob) is False and grid.update(4, blob) is True


def test_occupied_at_finds_the_finest_level_and_cell_of_each_point():
    """Against a per-point reference, on an off-centre, non-cubic box with one level (bounded scenes: its own
    code path) and with three; points inside, outside and on the box's faces."""
    import math

    for levels in (1, 3):
        grid = OccupancyGrid([-1.0, -0.5, -2.0, 1.0, 1.5, 0.0], resolution=8, levels=levels)
        grid.binaries.copy_(torch.rand_like(grid.binaries, dtype=torch.float) < 0.5)
        grid.binaries[0, 0, 2, 4] = grid.binaries[0, 7, 7, 7] = grid.binaries[0, 7, 0, 0] = True  # the faces' cells
        faces = torch.tensor([[-1.0, 0.0, -1.0], [1.0, 1.5, 0.0], [1.0, -0.5, -2.0], [1.0001, 0.0, -1.0]])
        pts = torch.cat([torch.randn(3000, 3) * 1.5 + torch.tensor([0.0, 0.5, -1.0]), faces])
        expected = []
        for p in pts.tolist():
            hit = False
            for level in range(levels):
                lo, hi = grid.aabbs[level, :3].tolist(), grid.aabbs[level, 3:].tolist()
                if all(a <= v <= b for a, v, b in zip(lo, p, hi)):
                    cell = [min(max(math.floor((v - a) / (b - a) * 8), 0), 7) for a, v, b in zip(lo, p, hi)]
                    hit = bool(grid.binaries[level, cell[0], cell[1], cell[2]])
                    break
            expected.append(hit)
        assert grid.occupied_at(pts).tolist() == expected
        assert 0 < sum(expected) < len(expected)


def brute_force_cells(grid, rays_o, rays_d, t0, t1, n=20000):
    """Occupied cells each ray passes through, with the length of ray inside each (fine sampling)."""
    t = torch.linspace(0, 1, n)
    result = []
    for o, d, a, b in zip(rays_o, rays_d, t0, t1):
        ts = a + (b - a) * t
        pts = o + ts[:, None] * d
        occ = grid.occupied_at(pts)
        cell = ((pts + 1) / 2 * grid.resolution).floor().long().clamp(0, grid.resolution - 1)
        ids = cell[:, 0] * grid.resolution ** 2 + cell[:, 1] * grid.resolution + cell[:, 2]
        lengths = {}
        for i in torch.nonzero(occ)[:, 0].tolist():
            lengths[ids[i].item()] = lengths.get(ids[i].item(), 0.0) + float(b - a) / n
        result.append(lengths)
    return result


def test_marching_never_skips_occupied_cells():
    grid = OccupancyGrid([-1, -1, -1, 1, 1, 1], resolution=16)
    grid.binaries.copy_(torch.rand_like(grid.binaries, dtype=torch.float) < 0.1)
    rays_o = torch.randn(40, 3)
    rays_o = rays_o / rays_o.norm(dim=-1, keepdim=True) * 3
    rays_d = torch.nn.functional.normalize(torch.randn(40, 3) * 0.3 - rays_o, dim=-1)
    step = 0.01
    ray_idx, ts, te = grid.march(rays_o, rays_d, near_plane=0.0, far_plane=10.0, render_step_size=step,
                                 stratified=True)
    assert (ts[1:] >= ts[:-1])[ray_idx[1:] == ray_idx[:-1]].all(), "samples sorted along each ray"
    from models.rendering import ray_aabb_intersect
    t0, t1 = ray_aabb_intersect(rays_o, rays_d, grid.aabbs[0])
    truth = brute_force_cells(grid, rays_o, rays_d, t0.clamp(min=0), t1)
    checked = 0
    for r, cells in enumerate(truth):
        mids = ((ts + te) / 2)[ray_idx == r]
        pts = rays_o[r] + mids[:, None] * rays_d[r]
        assert grid.occupied_at(pts).all(), "every kept sample is in an occupied cell"
        c = ((pts + 1) / 2 * 16).floor().long().clamp(0, 15)
        got = set((c[:, 0] * 256 + c[:, 1] * 16 + c[:, 2]).tolist())
        for cell, length in cells.items():
            if length > 2.5 * step:
                assert cell in got, f"ray {r} skipped occupied cell {cell} (length {length:.3f})"
                checked += 1
    assert checked > 20


def test_cone_marching_through_multilevel_grid_reaches_far_plane():
    grid = OccupancyGrid([-1, -1, -1, 1, 1, 1], resolution=8, levels=4)
    rays_o = torch.zeros(3, 3)
    rays_d = torch.nn.functional.normalize(torch.randn(3, 3), dim=-1)
    with HostSyncCounter() as syncs:
        ray_idx, ts, te = grid.march(rays_o, rays_d, near_plane=0.1, far_plane=100.0, render_step_size=0.01,
                                     cone_angle=0.02)
    assert syncs.by_kind == {"nonzero": 1}  # the step count is bounded on the host: only the packing waits
    for r in range(3):
        t = te[ray_idx == r]
        assert t.max() > 7.9  # level 3 spans 8 units from the centre
        steps = (te - ts)[ray_idx == r]
        assert steps.max() > 5 * steps.min(), "cone stepping grows the interval with distance"


def test_cone_boundaries_match_their_recurrence_and_the_count_covers_every_ray():
    """Each ray's closed-form boundaries equal t_{k+1} = t_k + max(t_k * cone_angle, step) from its own start,
    and the host-side count reaches past t0 + longest for every start >= near_plane."""
    for near, longest, step, cone in [(0.1, 1000.0, 0.01, 0.027), (0.5, 50.0, 0.01, 0.02), (2.0, 27.7, 0.01, 0.0367),
                                      (0.1, 0.3, 0.01, 0.027), (0.2, 13.9, 0.01, 0.009)]:
        n = OccupancyGrid._cone_step_count(near, longest, step, cone)
        starts = torch.tensor([near, near + 0.37 * step, step / cone, 3.3, 1.5 * step / cone], dtype=torch.float64)
        got = OccupancyGrid._cone_boundaries(starts[:, None], torch.arange(n + 1, dtype=torch.float64), step, cone)
        for t0, row in zip(starts.tolist(), got.double()):
            ts = [t0]
            while len(ts) < n + 1:
                ts.append(ts[-1] + max(ts[-1] * cone, step))
            torch.testing.assert_close(row, torch.tensor(ts, dtype=torch.float64), rtol=1e-6, atol=1e-6)
            assert row[-1] >= t0 + longest, (t0, longest)


def test_uniform_marching_starts_each_ray_at_its_entry_and_waits_only_for_its_packing():
    """Uniform steps: every ray's samples start where it enters the box (as nerfacc's) and tile it to its exit;
    the number of candidates comes from the box's diagonal, so the one host sync is the packing nonzero."""
    grid = OccupancyGrid([-1, -1, -1, 1, 1, 1], resolution=8)  # every cell occupied
    g = torch.Generator().manual_seed(3)
    rays_o = torch.nn.functional.normalize(torch.randn(64, 3, generator=g), dim=-1) * 3
    rays_d = torch.nn.functional.normalize(torch.randn(64, 3, generator=g) * 0.6 - rays_o, dim=-1)
    step = 0.01
    with HostSyncCounter() as syncs:
        ray_idx, ts, te = grid.march(rays_o, rays_d, near_plane=0.0, far_plane=1e10, render_step_size=step)
    assert syncs.by_kind == {"nonzero": 1}
    t_near, t_far = ray_aabb_intersect(rays_o, rays_d, grid.aabbs[0])
    hits = 0
    for r in range(64):
        mine_s, mine_e = ts[ray_idx == r], te[ray_idx == r]
        if t_far[r] - t_near[r] < 2 * step:
            continue
        hits += 1
        assert abs(float(mine_s[0] - t_near[r])) < 1e-5
        torch.testing.assert_close(mine_s[1:], mine_e[:-1])  # contiguous steps of render_step_size
        torch.testing.assert_close(mine_e - mine_s, torch.full_like(mine_s, step))
        assert float(t_far[r]) - step / 2 <= float(mine_e[-1]) < float(t_far[r]) + step / 2 + 1e-5
    assert hits > 30


def test_a_cell_sampled_twice_keeps_its_larger_sample_on_every_run():
    """After warm-up a cell can be drawn both uniformly and among the occupied ones. An indexed assignment kept
    whichever write landed last, which varied between runs on several CPU threads (same seed, other grids)."""
    grid = OccupancyGrid([-1, -1, -1, 1, 1, 1], resolution=8, warmup_steps=0, update_every_n_steps=1)
    grid.binaries.fill_(True)  # every cell occupied: the second half of the draw repeats cells of the first
    drawn, values = [], []
    draw = grid._cells_to_update
    grid._cells_to_update = lambda level, step: drawn.append(draw(level, step)) or drawn[-1]
    grid.update(0, lambda x: values.append(x[:, 0] + 2.0) or values[-1])  # differs within a cell: x is jittered
    cells, samples = drawn[0], values[0]
    assert len(torch.unique(cells)) < len(cells)
    expected = torch.zeros(grid.cells_per_level).scatter_reduce(0, cells, samples, "amax", include_self=False)
    torch.testing.assert_close(grid.occs, expected, rtol=0, atol=0)
