"""Occupancy-grid ray marching in Triton: two launches instead of ~60 operators.

The same samples as ``OccupancyGrid.march`` (the PyTorch reference): each
ray enters the grid's outer box at ``t_near = max(entry, near_plane)``, steps
``render_step_size`` from there, or with ``cone_angle > 0`` steps of
``max(t * cone_angle, render_step_size)`` (boundaries in float64 from the
reference's closed form, one exp per step), shifted by the ray's jitter when
stratified, and keeps the intervals whose
midpoint lies before its exit and, with ``use_grid``, in an occupied cell of
the finest level that holds it. One lane per ray walks its candidates twice:
the first launch counts the kept samples, a cumulative sum places each ray's
run in the packed output (reading the total is the march's one host sync, as
the reference's ``nonzero``), and the second launch writes them. Nothing of
size rays x candidates is ever built.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from models.triton_rendering import BLOCK_RAYS, RAY_LANE_OPTIONS as LAUNCH_OPTIONS  # one ray per thread

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the backend switch reports it
    triton = None


if triton is not None:

    @triton.jit
    def _cone_boundary(k, t0, n_uniform, t_geo, step, growth):
        """float32 boundary k (float64 numbers) of rays starting at t0, as OccupancyGrid._cone_boundaries."""
        uniform = t0 + step * k
        geometric = t_geo * tl.exp((k - n_uniform) * growth)
        return tl.where(k < n_uniform, uniform, geometric).to(tl.float32)

    @triton.jit
    def _march_kernel(rays_o_ptr, rays_d_ptr, jitter_ptr, aabbs_ptr, binaries_ptr, counts_ptr, starts_ptr,
                      ray_indices_ptr, t_starts_ptr, t_ends_ptr, n_rays, n_candidates, step, near_plane, far_plane,
                      step_64: tl.float64, cone_switch: tl.float64, cone_growth: tl.float64,
                      LEVELS: tl.constexpr, RES: tl.constexpr, USE_GRID: tl.constexpr, CONE: tl.constexpr,
                      FILL: tl.constexpr, BLOCK_R: tl.constexpr):
        """FILL == False: counts[ray] = kept samples. FILL == True: writes them from starts[ray] on.
        CONE: steps of max(t * cone_angle, step) from cone_switch = step / cone_angle on, growing by
        exp(cone_growth) = 1 + cone_angle; the boundaries in float64 (step_64 is step in float64)."""
        rays = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = rays < n_rays
        # entry and exit of the outer box, as models.rendering.ray_aabb_intersect computes them
        outer = (LEVELS - 1) * 6
        t_near = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        t_far = tl.full((BLOCK_R,), float("inf"), tl.float32)
        o = ()
        d = ()
        for a in tl.static_range(3):
            oa = tl.load(rays_o_ptr + rays * 3 + a, mask=rm, other=0.0)
            da = tl.load(rays_d_ptr + rays * 3 + a, mask=rm, other=1.0)
            safe = tl.where(tl.abs(da) < 1e-12, 1e-12, da)
            t0 = (tl.load(aabbs_ptr + outer + a) - oa) / safe
            t1 = (tl.load(aabbs_ptr + outer + 3 + a) - oa) / safe
            t_near = tl.maximum(t_near, tl.minimum(t0, t1))
            t_far = tl.minimum(t_far, tl.maximum(t0, t1))
            o = o + (oa,)
            d = d + (da,)
        t_near = tl.maximum(t_near, near_plane)
        t_far = tl.minimum(t_far, far_plane)
        hit = rm & (t_far > t_near)
        jitter = tl.load(jitter_ptr + rays, mask=rm, other=0.0)
        shift = jitter * step
        if CONE:  # boundaries b_k, b_k+1 carried along; b_k+2 computed per candidate
            t0 = t_near.to(tl.float64)
            n_uniform = tl.maximum(tl.ceil((cone_switch - t0) / step_64), 0.0)
            t_geo = t0 + step_64 * n_uniform
            zero = tl.zeros((BLOCK_R,), tl.float64)
            b0 = _cone_boundary(zero, t0, n_uniform, t_geo, step_64, cone_growth)
            b1 = _cone_boundary(zero + 1.0, t0, n_uniform, t_geo, step_64, cone_growth)
        centre = ()
        half = ()
        for a in tl.static_range(3):
            lo0 = tl.load(aabbs_ptr + a)
            hi0 = tl.load(aabbs_ptr + 3 + a)
            centre = centre + ((lo0 + hi0) / 2,)
            half = half + ((hi0 - lo0) / 2,)
        kept = tl.zeros((BLOCK_R,), tl.int32)
        if FILL:
            first = tl.load(starts_ptr + rays, mask=rm, other=0)
        k = tl.zeros((BLOCK_R,), tl.float32)  # the candidate's number, as a float (exact up to 2^24)
        for _ in range(0, n_candidates):
            if CONE:
                b2 = _cone_boundary(k.to(tl.float64) + 2.0, t0, n_uniform, t_geo, step_64, cone_growth)
                ts = b0 + jitter * (b1 - b0)
                te = b1 + jitter * (b2 - b1)
                b0 = b1
                b1 = b2
            else:
                ts = t_near + (k * step + shift)
                te = ts + step
            mid = 0.5 * (ts + te)
            keep = hit & (mid >= t_near) & (mid < t_far)
            if USE_GRID:
                extent = tl.zeros((BLOCK_R,), tl.float32)
                p = ()
                for a in tl.static_range(3):
                    pa = o[a] + d[a] * mid
                    p = p + (pa,)
                    extent = tl.maximum(extent, tl.abs(pa - centre[a]) / half[a])
                level = tl.maximum(tl.ceil(tl.log2(tl.maximum(extent, 1e-12))), 0.0).to(tl.int32)
                keep = keep & (level < LEVELS)
                level = tl.minimum(level, LEVELS - 1)
                cell = level  # level * R^3 + x * R^2 + y * R + z, as the reference's binaries[level, x, y, z]
                for a in tl.static_range(3):
                    lo = tl.load(aabbs_ptr + level * 6 + a, mask=keep, other=0.0)
                    hi = tl.load(aabbs_ptr + level * 6 + 3 + a, mask=keep, other=1.0)
                    c = tl.floor((p[a] - lo) / (hi - lo) * RES).to(tl.int32)
                    cell = cell * RES + tl.minimum(tl.maximum(c, 0), RES - 1)
                keep = keep & (tl.load(binaries_ptr + cell, mask=keep, other=0) != 0)
            if FILL:
                at = first + kept
                tl.store(ray_indices_ptr + at, rays.to(tl.int64), mask=keep)
                tl.store(t_starts_ptr + at, ts, mask=keep)
                tl.store(t_ends_ptr + at, te, mask=keep)
            kept += keep.to(tl.int32)
            k += 1.0
        if not FILL:
            tl.store(counts_ptr + rays, kept, mask=rm)


class GridMarch:
    """The two launches of one march, sharing their arguments: ``count()`` then ``fill(starts, total)``."""

    def __init__(self, rays_o, rays_d, aabbs, binaries, jitter, n_candidates, step, near_plane, far_plane, use_grid,
                 cone_angle=0.0):
        self.n_rays = rays_o.shape[0]
        self.device = rays_o.device
        levels, res = binaries.shape[0], binaries.shape[1]
        self.tensors = (rays_o.float().contiguous(), rays_d.float().contiguous(), jitter.float().contiguous(),
                        aabbs.float().contiguous(), binaries.reshape(-1).view(torch.uint8))
        self.grid = (max(1, triton.cdiv(self.n_rays, BLOCK_RAYS)),)
        self.options = dict(n_rays=self.n_rays, n_candidates=n_candidates, step=step, near_plane=near_plane,
                            far_plane=far_plane, step_64=step, cone_switch=step / cone_angle if cone_angle > 0 else 0.0,
                            cone_growth=math.log1p(cone_angle), LEVELS=levels, RES=res, USE_GRID=bool(use_grid),
                            CONE=cone_angle > 0, BLOCK_R=BLOCK_RAYS, **LAUNCH_OPTIONS)

    def count(self) -> torch.Tensor:
        """(N,) int32: the samples each ray keeps."""
        counts = torch.empty(self.n_rays, dtype=torch.int32, device=self.device)
        _march_kernel[self.grid](*self.tensors, counts, counts, counts, counts, counts, FILL=False, **self.options)
        return counts

    def fill(self, starts: torch.Tensor, total: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """starts: (N,) where each ray's run begins in the packed output of ``total`` samples."""
        ray_indices = torch.empty(total, dtype=torch.int64, device=self.device)
        t_starts = torch.empty(total, dtype=torch.float32, device=self.device)
        t_ends = torch.empty(total, dtype=torch.float32, device=self.device)
        if total:
            _march_kernel[self.grid](*self.tensors, starts, starts, ray_indices, t_starts, t_ends, FILL=True,
                                     **self.options)
        return ray_indices, t_starts, t_ends


def march(rays_o: torch.Tensor, rays_d: torch.Tensor, aabbs: torch.Tensor, binaries: torch.Tensor,
          jitter: torch.Tensor, n_candidates: int, step: float, near_plane: float, far_plane: float, use_grid: bool,
          cone_angle: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed samples of marching through an occupancy grid.

    rays_o, rays_d: (N, 3) float32, unit directions; aabbs: (levels, 6) float32 (level l covers the base box
    scaled by 2^l); binaries: (levels, R, R, R) bool; jitter: (N,) in [0, 1) (zeros: not stratified);
    n_candidates: intervals tried per ray (the host's bound); cone_angle > 0: steps of max(t * cone_angle, step).
    Returns (ray_indices (S,) int64, t_starts (S,), t_ends (S,)), sorted by ray then t. Reads the sample count
    on the host once.
    """
    launches = GridMarch(rays_o, rays_d, aabbs, binaries, jitter, n_candidates, step, near_plane, far_plane,
                         use_grid, cone_angle)
    counts = launches.count()
    ends = torch.cumsum(counts, 0)
    total = int(ends[-1]) if launches.n_rays else 0  # the one host read: how much to allocate
    return launches.fill(ends - counts, total)
