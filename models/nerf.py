"""NeRF on a hash grid with occupancy-grid ray marching (instant-nsr-pl ``nerf``)."""
from __future__ import annotations

import math
from typing import Any, Dict

import numpy as np
import torch
import trimesh

import models
from models import backends
from models.base import BaseModel, export_chunk, in_slices
from models.occupancy import OccupancyGrid, grid_update_options
from models.rendering import composite_density
from utils.config import number_at_least
from utils.mesh import marching_cubes


@models.register("nerf")
class NeRFModel(BaseModel):
    """forward(rays_o (N, 3), rays_d (N, 3) unit) -> comp_rgb (N, 3), opacity (N, 1), depth (N, 1), ...

    Bounded scenes march the AABB [-radius, radius]^3 with a uniform step of
    ``sqrt(3) * 2 * radius / num_samples_per_ray``. With
    ``learned_background`` the field covers all of space (contracted) and
    marching uses a multi-level grid with cone stepping out to ``far_plane``.
    ``background_color`` (3,) is set by the system for each stage.
    """

    def setup(self) -> None:
        cfg = self.config
        self.geometry = models.make(cfg.geometry.name, cfg.geometry)
        self.texture = models.make(cfg.texture.name, cfg.texture)
        self.radius = number_at_least(cfg.radius, "model.radius", 0, kind=float, exclusive=True)
        n_samples = number_at_least(cfg.num_samples_per_ray, "model.num_samples_per_ray", 1)
        self.learned_background = bool(cfg.get("learned_background", False))
        self.geometry.unbounded = self.learned_background
        r = self.radius
        aabb = [-r, -r, -r, r, r, r]
        self.register_buffer("scene_aabb", torch.tensor(aabb, dtype=torch.float32), persistent=False)
        self.near_plane = number_at_least(cfg.get("near_plane", 0.2 if self.learned_background else 0.0),
                                          "model.near_plane", 0, kind=float)
        self.far_plane = number_at_least(cfg.get("far_plane", 1e4 if self.learned_background else 1e10),
                                         "model.far_plane", self.near_plane, kind=float, exclusive=True)
        if self.learned_background:
            self.cone_angle = 10 ** (math.log10(self.far_plane) / n_samples) - 1.0
            self.render_step_size = number_at_least(cfg.get("render_step_size", 0.01), "model.render_step_size", 0,
                                                    kind=float, exclusive=True)
            levels = number_at_least(cfg.get("grid_levels", 4), "model.grid_levels", 1)
        else:
            self.cone_angle = 0.0
            self.render_step_size = 1.732 * 2 * r / n_samples
            levels = 1
        self.grid_prune = bool(cfg.get("grid_prune", True))
        resolution = number_at_least(cfg.get("grid_resolution", 128), "model.grid_resolution", 1)
        self.occupancy_grid = OccupancyGrid(aabb, resolution=resolution, levels=levels, **grid_update_options(cfg))
        self.early_stop_eps = float(cfg.get("early_stop_eps", 1e-4))
        self.randomized = bool(cfg.get("randomized", True))
        self.ray_chunk = number_at_least(cfg.get("ray_chunk", 65536), "model.ray_chunk", 1)
        self.backend = backends.resolve("rendering", cfg.get("rendering_backend", "auto"), ("nerfacc", "triton"))
        self.register_buffer("background_color", torch.ones(3), persistent=False)

    # --------------------------------------------------------------- training
    def update_step(self, epoch: int, global_step: int) -> None:
        if self.grid_prune:
            self.occupancy_grid.update(global_step, lambda x: self.geometry.density(x) * self.render_step_size)

    # -------------------------------------------------------------- rendering
    def _march(self, rays_o: torch.Tensor, rays_d: torch.Tensor):
        chunk = self.samples_per_query(rays_o.device)

        def density(t_starts, t_ends, ray_indices):
            mid = 0.5 * (t_starts + t_ends)
            return self.geometry.density(rays_o[ray_indices] + rays_d[ray_indices] * mid[:, None])

        def sigma_fn(t_starts, t_ends, ray_indices):  # the early-stop pass: every sample the grid leaves
            if self.training:
                return density(t_starts, t_ends, ray_indices)
            return in_slices(density, chunk, t_starts, t_ends, ray_indices)

        ray_indices, t_starts, t_ends = self.occupancy_grid.march(
            rays_o, rays_d, self.near_plane, self.far_plane, self.render_step_size, self.cone_angle,
            stratified=self.training and self.randomized, sigma_fn=sigma_fn if self.early_stop_eps > 0 else None,
            early_stop_eps=self.early_stop_eps, use_grid=self.grid_prune, backend=self.backend)
        return ray_indices.long(), t_starts, t_ends

    def _shade(self, rays_o, rays_d, ray_indices, t_starts, t_ends) -> Dict[str, Any]:
        n_rays = rays_o.shape[0]
        mid = 0.5 * (t_starts + t_ends)
        dirs = rays_d[ray_indices]
        positions = rays_o[ray_indices] + dirs * mid[:, None]
        density, feature = self.geometry(positions)
        rgb = self.texture(feature, dirs)
        weights, sums = composite_density(t_starts, t_ends, density, torch.cat([rgb, mid[:, None]], dim=-1),
                                          ray_indices, n_rays, self.backend)  # opacity | rgb | depth
        opacity, depth = sums[:, :1], sums[:, 4:5]
        comp_rgb = sums[:, 1:4] + self.background_color * (1.0 - opacity)
        out = {"comp_rgb": comp_rgb, "opacity": opacity, "depth": depth, "rays_valid": opacity > 0,
               "num_samples": len(t_starts)}  # a host int: no device read
        if self.training:
            out.update({"weights": weights, "t_starts": t_starts, "t_ends": t_ends, "ray_indices": ray_indices})
        return out

    # ----------------------------------------------------------------- export
    @torch.no_grad()
    def export(self, config: Any) -> Dict[str, np.ndarray]:
        """Marching-cubes mesh of the density field with vertex colours, in the model's frame.

        Returns v_pos (V, 3), t_pos_idx (F, 3), v_rgb (V, 3). Raises MeshError when there is no surface.
        """
        iso = self.config.geometry.isosurface
        r = self.radius
        device = self.scene_aabb.device
        verts, faces = marching_cubes(self.geometry.density, np.array([[-r] * 3, [r] * 3]), int(iso.resolution),
                                      float(iso.threshold), inside_is_greater=True,
                                      chunk=int(iso.get("chunk", 2 ** 21)), device=device)
        out = {"v_pos": verts, "t_pos_idx": faces}
        if config.get("export_vertex_color", True):
            normals = trimesh.Trimesh(verts, faces, process=False).vertex_normals
            out["v_rgb"] = self.surface_colours(verts, normals, export_chunk(config, self.ray_chunk, device))
        return out

    def surface_colours(self, points: np.ndarray, normals: np.ndarray, chunk: int) -> np.ndarray:
        """(P, 3) colours in [0, 1] at (P, 3) surface points (model frame) seen from outside, along their (P, 3)
        outward unit ``normals``, ``chunk`` points per query."""
        device = self.scene_aabb.device
        v = torch.from_numpy(np.asarray(points, np.float32)).to(device)
        n = torch.from_numpy(np.asarray(normals, np.float32)).to(device)
        colours = []
        for i in range(0, len(v), chunk):
            _, feature = self.geometry(v[i:i + chunk])
            colours.append(self.texture(feature, -n[i:i + chunk]).detach().clamp(0, 1))
        return torch.cat(colours).cpu().numpy() if colours else np.zeros((0, 3), np.float32)
