"""Truncated signed distance fusion of depth maps (Curless & Levoy; KinectFusion's running average).

Voxels store the projective signed distance to the observed surface,
truncated to [-1, 1] in units of ``truncation``, averaged over frames with
their weights, and optionally a colour averaged the same way. Frames are
integrated in chunks of voxels so a large volume fits in memory; the mesh is
the zero level set of the observed voxels (never-observed voxels count as
empty space).
"""
from __future__ import annotations

import math

import mcubes
import numpy as np
import torch

from utils.mesh import MeshError


class TSDFVolume:
    """bounds (2, 3) world box; voxel_size; truncation (default 3 voxels); device for the arithmetic."""

    def __init__(self, bounds: np.ndarray, voxel_size: float, truncation: float | None = None,
                 with_color: bool = True, device: str | torch.device = "cpu", chunk: int = 2 ** 21):
        self.origin = np.asarray(bounds[0], dtype=np.float64)
        self.voxel_size = float(voxel_size)
        self.truncation = float(truncation) if truncation else 3.0 * self.voxel_size
        self.shape = tuple(int(math.ceil(e / self.voxel_size)) + 1 for e in np.asarray(bounds[1]) - self.origin)
        n = int(np.prod(self.shape))
        self.device = torch.device(device)
        self.chunk = chunk
        self.tsdf = torch.ones(n, dtype=torch.float32, device=self.device)
        self.weight = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.color = torch.zeros(n, 3, dtype=torch.float32, device=self.device) if with_color else None

    def _voxel_centres(self, start: int, stop: int) -> torch.Tensor:
        """(n, 3) world positions of flat voxel indices [start, stop)."""
        idx = torch.arange(start, stop, device=self.device)
        ny, nz = self.shape[1], self.shape[2]
        ijk = torch.stack([idx // (ny * nz), (idx // nz) % ny, idx % nz], dim=-1).double()
        return torch.from_numpy(self.origin).to(self.device) + ijk * self.voxel_size

    @torch.no_grad()
    def integrate(self, depth: np.ndarray, K: np.ndarray, c2w: np.ndarray, color: np.ndarray | None = None,
                  weight: float = 1.0) -> None:
        """Fuse one frame. depth (H, W) z-depth in world units (0 / inf / NaN = no measurement);
        K (3, 3); c2w (4, 4) OpenCV (x right, y down, z forward); color (H, W, 3) in [0, 1] or None."""
        h, w = depth.shape
        depth_t = torch.as_tensor(np.nan_to_num(depth, nan=0.0, posinf=0.0), dtype=torch.float32, device=self.device)
        color_t = None if color is None or self.color is None else torch.as_tensor(
            color, dtype=torch.float32, device=self.device).reshape(h, w, 3)
        w2c = torch.as_tensor(np.linalg.inv(c2w), dtype=torch.float64, device=self.device)
        K_t = torch.as_tensor(K, dtype=torch.float64, device=self.device)
        for start in range(0, self.tsdf.numel(), self.chunk):
            stop = min(start + self.chunk, self.tsdf.numel())
            cam = self._voxel_centres(start, stop) @ w2c[:3, :3].T + w2c[:3, 3]
            z = cam[:, 2]
            pix = cam @ K_t.T
            u = torch.floor(pix[:, 0] / z.clamp(min=1e-9)).long()
            v = torch.floor(pix[:, 1] / z.clamp(min=1e-9)).long()
            seen = (z > 0) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
            rows = torch.nonzero(seen)[:, 0]
            d = depth_t[v[rows], u[rows]]
            sdf = d.double() - z[rows]
            keep = (d > 0) & (sdf >= -self.truncation)
            rows, sdf = rows[keep], sdf[keep]
            flat = rows + start
            new = (sdf / self.truncation).clamp(max=1.0).float()
            w_old = self.weight[flat]
            w_sum = w_old + weight
            self.tsdf[flat] = (self.tsdf[flat] * w_old + new * weight) / w_sum
            if color_t is not None:
                c = color_t[v[rows], u[rows]]
                self.color[flat] = (self.color[flat] * w_old[:, None] + c * weight) / w_sum[:, None]
            self.weight[flat] = w_sum

    def extract_mesh(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Zero level set -> (vertices (V, 3) world, faces (F, 3) wound outward, colours (V, 3) or None)."""
        tsdf = self.tsdf.view(self.shape).cpu().numpy()
        observed = self.weight.view(self.shape).cpu().numpy() > 0
        inside = np.where(observed, -tsdf, -1.0)  # positive inside the surface; unobserved counts as empty
        if not (inside > 0).any():
            raise MeshError("The fused volume has no surface: no depth fell inside the volume's bounds.")
        verts, faces = mcubes.marching_cubes(inside, 0.0)  # PyMCubes winds outward from the positive side
        # a vertex lies on a grid edge; where one end was never observed the crossing is the truncation
        # boundary behind a surface, not a surface: drop the faces that use such vertices
        shape = np.asarray(self.shape) - 1
        ends_seen = (observed[tuple(np.clip(np.floor(verts).astype(np.int64), 0, shape).T)]
                     & observed[tuple(np.clip(np.ceil(verts).astype(np.int64), 0, shape).T)])
        faces = faces[ends_seen[faces].all(axis=1)]
        used = np.unique(faces)
        if len(used) == 0:
            raise MeshError("The fused volume has no surface between observed voxels.")
        remap = np.full(len(verts), -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        verts, faces = verts[used], remap[faces]
        colors = None
        if self.color is not None:
            ijk = np.clip(np.round(verts).astype(np.int64), 0, np.asarray(self.shape) - 1)
            flat = np.ravel_multi_index(tuple(ijk.T), self.shape)
            colors = self.color[torch.from_numpy(flat).to(self.device)].cpu().numpy()
        return (self.origin + verts * self.voxel_size).astype(np.float32), faces.astype(np.int64), colors
