"""Occupancy grid and ray marching over it (nerfacc 0.5 ``OccGridEstimator`` semantics).

The grid has ``levels`` nested cubes, level l covering the base AABB scaled
by 2^l about its centre (one level for a bounded object, several for an
unbounded scene). Each cell keeps an occupancy value updated as instant-ngp
does: every ``update_every_n_steps`` steps, cells (all of them during warm-up,
then a quarter: half uniformly, half among occupied ones) are evaluated at a
random point inside, ``occ = max(occ * ema_decay, new)``, and a cell is
occupied when ``occ > min(occ_thre, mean(occ))``. The buffers are saved in
checkpoints, so a resumed model marches exactly the same grid.

Marching emits intervals of length ``max(t * cone_angle, render_step_size)``
along each ray and keeps those whose midpoint lies in an occupied cell.
Each ray starts at its entry into the grid (as nerfacc); the number of
candidate intervals is bounded from the grid's diagonal on the host, so
marching waits for the device only to pack the kept samples. With
``backend='triton'`` marching runs as two fused launches
(``models.triton_marching``: count, then fill), with the same samples.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

from models.rendering import ray_aabb_intersect, visibility_from_density
from utils.config import number_at_least

SigmaFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def grid_update_options(cfg) -> dict:
    """``OccupancyGrid``'s update schedule from a model config (``grid_update_every`` >= 1 step,
    ``grid_warmup_steps`` >= 0), checked: 0 was a modulo by zero at the first step."""
    return {"update_every_n_steps": number_at_least(cfg.get("grid_update_every", 16), "model.grid_update_every", 1),
            "warmup_steps": number_at_least(cfg.get("grid_warmup_steps", 256), "model.grid_warmup_steps", 0)}


class OccupancyGrid(nn.Module):
    def __init__(self, aabb, resolution: int = 128, levels: int = 1, ema_decay: float = 0.95,
                 occ_thre: float = 0.01, warmup_steps: int = 256, update_every_n_steps: int = 16):
        super().__init__()
        aabb = torch.as_tensor(aabb, dtype=torch.float32)
        center, half = (aabb[:3] + aabb[3:]) / 2, (aabb[3:] - aabb[:3]) / 2
        aabbs = torch.stack([torch.cat([center - half * 2 ** l, center + half * 2 ** l]) for l in range(levels)])
        self.resolution, self.levels = int(resolution), int(levels)
        self.ema_decay, self.occ_thre = ema_decay, occ_thre
        self.warmup_steps, self.update_every_n_steps = warmup_steps, update_every_n_steps
        self.cells_per_level = self.resolution ** 3
        self.register_buffer("aabbs", aabbs)  # (levels, 6)
        self.outer_diagonal = float((aabbs[-1, 3:] - aabbs[-1, :3]).norm())  # a host float: no device read
        self.register_buffer("occs", torch.zeros(levels * self.cells_per_level))
        self.register_buffer("binaries", torch.ones(levels, resolution, resolution, resolution, dtype=torch.bool))
        r = torch.arange(resolution)
        coords = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)
        self.register_buffer("grid_coords", coords, persistent=False)  # (R^3, 3), cell index = x*R^2 + y*R + z

    # ----------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, step: int, occ_eval_fn: Callable[[torch.Tensor], torch.Tensor], chunk: int = 2 ** 18) -> bool:
        """Refresh the grid when ``step`` is due. occ_eval_fn: (M, 3) world points -> (M,) opacity."""
        if step % self.update_every_n_steps != 0:
            return False
        for level in range(self.levels):
            cells = self._cells_to_update(level, step)
            x = (self.grid_coords[cells] + torch.rand(len(cells), 3, device=cells.device)) / self.resolution
            lo, hi = self.aabbs[level, :3], self.aabbs[level, 3:]
            x = lo + x * (hi - lo)
            occ = torch.cat([occ_eval_fn(x[i:i + chunk]).reshape(-1).float() for i in range(0, len(x), chunk)])
            ids = level * self.cells_per_level + cells
            # a cell drawn twice (uniformly and among the occupied) keeps the larger of its samples: an assignment
            # would keep whichever write came last, which differs from run to run on several threads
            self.occs.scatter_reduce_(0, ids, torch.maximum(self.occs[ids] * self.ema_decay, occ), "amax",
                                      include_self=False)
        threshold = torch.clamp(self.occs.mean(), max=self.occ_thre)  # occs >= 0: no cell is marked invalid
        self.binaries.copy_((self.occs > threshold).view(self.binaries.shape))
        return True

    def _cells_to_update(self, level: int, step: int) -> torch.Tensor:
        device = self.occs.device
        if step < self.warmup_steps:
            return torch.arange(self.cells_per_level, device=device)
        n = self.cells_per_level // 4
        uniform = torch.randint(self.cells_per_level, (n,), device=device)
        occupied = torch.nonzero(self.binaries[level].reshape(-1))[:, 0]
        if n < len(occupied):
            occupied = occupied[torch.randint(len(occupied), (n,), device=device)]
        return torch.cat([uniform, occupied])

    # ---------------------------------------------------------------- queries
    def occupied_at(self, x: torch.Tensor) -> torch.Tensor:
        """(M, 3) world points -> (M,) bool: inside the grid and in an occupied cell of the finest level holding it."""
        if self.levels == 1:  # a bounded scene: no level to search (2-3x faster on a NeRF step's 264k candidates)
            lo, hi = self.aabbs[0, :3], self.aabbs[0, 3:]
            inside = ((x >= lo) & (x <= hi)).all(dim=-1)
            cell = ((x - lo) / (hi - lo) * self.resolution).floor().long().clamp(0, self.resolution - 1)
            flat = (cell[:, 0] * self.resolution + cell[:, 1]) * self.resolution + cell[:, 2]
            return self.binaries.view(-1)[flat] & inside
        base = self.aabbs[0]
        center, half = (base[:3] + base[3:]) / 2, (base[3:] - base[:3]) / 2
        extent = ((x - center).abs() / half).amax(dim=-1)  # <= 1 inside level 0
        level = torch.ceil(torch.log2(extent.clamp(min=1e-12))).clamp(min=0).long()
        inside = level < self.levels
        level = level.clamp(max=self.levels - 1)
        lo = self.aabbs[level, :3]
        hi = self.aabbs[level, 3:]
        cell = ((x - lo) / (hi - lo) * self.resolution).floor().long().clamp(0, self.resolution - 1)
        occupied = self.binaries[level, cell[:, 0], cell[:, 1], cell[:, 2]]
        return occupied & inside

    def outer_aabb(self) -> torch.Tensor:
        return self.aabbs[-1]

    # ---------------------------------------------------------------- marching
    @torch.no_grad()
    def march(self, rays_o: torch.Tensor, rays_d: torch.Tensor, near_plane: float, far_plane: float,
              render_step_size: float, cone_angle: float = 0.0, stratified: bool = False,
              sigma_fn: Optional[SigmaFn] = None, early_stop_eps: float = 1e-4, alpha_thre: float = 0.0,
              use_grid: bool = True, backend: str = "torch", max_candidates: int = 2 ** 22
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample rays where the grid is occupied.

        rays_o, rays_d: (N, 3), unit directions. Returns packed
        (ray_indices (S,) int64, t_starts (S,), t_ends (S,)), sorted by ray then t.
        ``sigma_fn(t_starts, t_ends, ray_indices) -> (S,)`` optionally drops
        samples behind opaque matter (transmittance < early_stop_eps).
        """
        if backend == "nerfacc":
            return self._march_nerfacc(rays_o, rays_d, near_plane, far_plane, render_step_size, cone_angle,
                                       stratified, sigma_fn, early_stop_eps, alpha_thre, use_grid)
        n_rays = rays_o.shape[0]
        empty = torch.zeros(0, dtype=torch.long, device=rays_o.device)
        if n_rays == 0:
            return empty, empty.float(), empty.float()
        # each ray is marched from its own entry (as nerfacc); no chord through the box is longer than its
        # diagonal, so the number of candidate intervals is bounded on the host without reading the device
        longest = min(self.outer_diagonal, far_plane - near_plane)
        if cone_angle > 0:
            n_candidates = self._cone_step_count(near_plane, longest, render_step_size, cone_angle)
        else:
            n_candidates = int(math.ceil(longest / render_step_size)) + 1
        if backend == "triton":
            from models import triton_marching

            jitter = torch.rand(n_rays, device=rays_o.device) if stratified else torch.zeros(n_rays, device=rays_o.device)
            ray_indices, t_starts, t_ends = triton_marching.march(
                rays_o, rays_d, self.aabbs, self.binaries, jitter, n_candidates, render_step_size, near_plane,
                far_plane, use_grid, cone_angle)
            return self._early_stop(ray_indices, t_starts, t_ends, n_rays, sigma_fn, early_stop_eps, alpha_thre,
                                    backend)
        t_near, t_far = ray_aabb_intersect(rays_o, rays_d, self.outer_aabb())
        t_near = t_near.clamp(min=near_plane)
        t_far = t_far.clamp(max=far_plane)
        hit = t_far > t_near
        jitter = torch.rand(n_rays, 1, device=rays_o.device) if stratified else torch.zeros(n_rays, 1, device=rays_o.device)
        if cone_angle > 0:
            k = torch.arange(n_candidates + 2, device=rays_o.device, dtype=torch.float64)

            def intervals(sl: slice) -> Tuple[torch.Tensor, torch.Tensor]:
                bounds = self._cone_boundaries(t_near[sl, None], k, render_step_size, cone_angle)  # (n, K+2)
                steps = bounds[:, 1:] - bounds[:, :-1]
                return bounds[:, :-2] + jitter[sl] * steps[:, :-1], bounds[:, 1:-1] + jitter[sl] * steps[:, 1:]
        else:
            offsets = render_step_size * torch.arange(n_candidates, device=rays_o.device, dtype=torch.float32)

            def intervals(sl: slice) -> Tuple[torch.Tensor, torch.Tensor]:
                ts = t_near[sl, None] + (offsets[None] + jitter[sl] * render_step_size)
                return ts, ts + render_step_size
        chunk = max(1, max_candidates // n_candidates)
        out_idx, out_ts, out_te = [], [], []
        for start in range(0, n_rays, chunk):
            sl = slice(start, start + chunk)
            ts, te = intervals(sl)  # (n, K) candidate intervals
            mid = 0.5 * (ts + te)
            keep = (mid >= t_near[sl, None]) & (mid < t_far[sl, None]) & hit[sl, None]
            if use_grid:  # every candidate is looked up, so that one nonzero (one host sync) packs the chunk
                pts = rays_o[sl, None, :] + rays_d[sl, None, :] * mid[..., None]
                keep &= self.occupied_at(pts.view(-1, 3)).view_as(keep)
            rows, cols = torch.nonzero(keep, as_tuple=True)
            out_idx.append(rows + start)
            out_ts.append(ts[rows, cols])
            out_te.append(te[rows, cols])
        ray_indices, t_starts, t_ends = torch.cat(out_idx), torch.cat(out_ts), torch.cat(out_te)
        return self._early_stop(ray_indices, t_starts, t_ends, n_rays, sigma_fn, early_stop_eps, alpha_thre)

    def _early_stop(self, ray_indices, t_starts, t_ends, n_rays, sigma_fn, early_stop_eps, alpha_thre,
                    backend="torch"):
        """Drops the samples behind opaque matter (and transparent ones), when a sigma_fn is given."""
        if sigma_fn is not None and (early_stop_eps > 0 or alpha_thre > 0) and len(t_starts) > 0:
            sigmas = sigma_fn(t_starts, t_ends, ray_indices)
            if alpha_thre > 0:  # as nerfacc: never cull more than the grid's mean occupancy would
                alpha_thre = min(alpha_thre, float(self.occs.mean()))
            visible = visibility_from_density(t_starts, t_ends, sigmas, ray_indices, n_rays, early_stop_eps,
                                              alpha_thre, backend)
            kept = torch.nonzero(visible)[:, 0]
            ray_indices, t_starts, t_ends = ray_indices[kept], t_starts[kept], t_ends[kept]
        return ray_indices, t_starts, t_ends

    @staticmethod
    def _cone_boundaries(t0: torch.Tensor, k: torch.Tensor, step: float, cone_angle: float) -> torch.Tensor:
        """Interval boundaries t_0 = t0, t_{k+1} = t_k + max(t_k * cone_angle, step) of each ray, in closed form.

        t0: (n, 1) each ray's start; k: (K,) boundary numbers (float64). Returns (n, K) float32: uniform
        steps while t < step / cone_angle, then geometric growth by (1 + cone_angle). Built in float64.
        """
        t0 = t0.double()
        t_switch = step / cone_angle
        n_uniform = torch.ceil((t_switch - t0) / step).clamp(min=0)  # boundaries below t_switch
        t_geo = t0 + step * n_uniform  # the first boundary at or past t_switch
        geometric = t_geo * torch.exp((k - n_uniform) * math.log1p(cone_angle))
        return torch.where(k < n_uniform, t0 + step * k, geometric).float()

    @staticmethod
    def _cone_step_count(near_plane: float, longest: float, step: float, cone_angle: float) -> int:
        """Intervals enough for any ray starting at t0 >= near_plane and ending by t0 + longest: the
        uniform steps up to step / cone_angle, plus the geometric ones from there over ``longest``."""
        t_switch = step / cone_angle
        n_uniform = max(int(math.ceil((t_switch - near_plane) / step)), 0)
        n_geometric = int(math.ceil(math.log1p(longest / t_switch) / math.log1p(cone_angle)))
        return n_uniform + n_geometric + 1

    def _march_nerfacc(self, rays_o, rays_d, near_plane, far_plane, render_step_size, cone_angle, stratified,
                       sigma_fn, early_stop_eps, alpha_thre, use_grid):
        import nerfacc

        if "_estimator" not in self.__dict__:
            est = nerfacc.OccGridEstimator(roi_aabb=self.aabbs[0].tolist(), resolution=self.resolution,
                                           levels=self.levels).to(rays_o.device)
            self.__dict__["_estimator"] = est
        est = self.__dict__["_estimator"]
        est.binaries.copy_(self.binaries if use_grid else torch.ones_like(self.binaries))
        est.occs.copy_(self.occs)
        return est.sampling(rays_o, rays_d, sigma_fn=sigma_fn, near_plane=near_plane, far_plane=far_plane,
                            render_step_size=render_step_size, stratified=stratified, cone_angle=cone_angle,
                            alpha_thre=alpha_thre, early_stop_eps=early_stop_eps)
