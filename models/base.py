"""Shared model plumbing: step updates and chunked evaluation."""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn as nn

from models.per_image import POSES_START, ExposureCorrection, PoseRefinement
from utils.config import number_at_least
from utils.mesh import points_per_call

log = logging.getLogger("nsr")


def update_module_step(module: nn.Module, epoch: int, global_step: int) -> None:
    """Call ``update_step(epoch, global_step)`` on ``module`` and every submodule that has one (outermost first)."""
    for m in module.modules():
        if hasattr(m, "update_step"):
            m.update_step(epoch, global_step)


def chunk_batch(fn: Callable[..., Dict[str, Any]], chunk: int, *tensors: torch.Tensor) -> Dict[str, Any]:
    """Run ``fn`` over row chunks of ``tensors`` and concatenate tensor outputs (sums for scalars)."""
    n = tensors[0].shape[0]
    return merge_outputs([fn(*(t[i:i + chunk] for t in tensors)) for i in range(0, n, chunk)])


def merge_outputs(parts: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per-ray outputs of consecutive groups of rays as one: tensors concatenated, counts (ints, 0-d) summed."""
    merged: Dict[str, Any] = {}
    for k in parts[0]:
        vs = [part[k] for part in parts]
        merged[k] = torch.cat(vs, dim=0) if torch.is_tensor(vs[0]) and vs[0].dim() > 0 else sum(vs)
    return merged


def in_slices(fn: Callable[..., torch.Tensor], rows: int, *tensors: torch.Tensor) -> torch.Tensor:
    """``fn(*tensors)`` computed ``rows`` rows at a time and concatenated (for work without a gradient, whose
    memory grows with the rows)."""
    n = tensors[0].shape[0]
    if n <= rows:
        return fn(*tensors)
    return torch.cat([fn(*(t[i:i + rows] for t in tensors)) for i in range(0, n, rows)])


def ray_groups(ray_indices: torch.Tensor, n_rays: int, samples: int) -> List[Tuple[int, int, int, int]]:
    """Consecutive groups of rays holding about ``samples`` packed samples each (at most that plus one ray's).

    ray_indices: (S,) sorted, each sample's ray in [0, n_rays). Returns [(first ray, end ray, first sample,
    end sample)] covering every ray, those without samples included."""
    ends = torch.bincount(ray_indices, minlength=n_rays).cumsum(0)  # (n_rays,) samples of rays 0..i
    multiples = torch.arange(samples, max(len(ray_indices), samples), samples, device=ends.device)
    cuts = torch.searchsorted(ends, multiples, right=True)  # the first ray past each multiple
    bounds = sorted({0, n_rays, *cuts.tolist()})
    offsets = torch.cat([ends.new_zeros(1), ends])[bounds].tolist()
    return [(bounds[g], bounds[g + 1], offsets[g], offsets[g + 1]) for g in range(len(bounds) - 1)]


def export_chunk(export_config: Any, default: int, device: torch.device) -> int:
    """Points per field query when colouring an exported mesh's vertices: ``export.chunk_size``, as in
    instant-nsr-pl (larger is faster on a GPU, smaller needs less memory), else ``default``; on a CPU at most
    ``utils.mesh.CPU_POINTS_PER_CALL``, which is faster there."""
    chunk = export_config.get("chunk_size")
    return points_per_call(default if chunk is None else number_at_least(chunk, "export.chunk_size", 1), device)


class BaseModel(nn.Module):
    """A radiance-field model: ``forward(rays_o, rays_d) -> dict``, ``export() -> mesh``.

    Subclasses implement ``_march`` (where along each ray to sample) and ``_shade`` (the field at those samples,
    composited per ray). Training renders its batch in one piece. Evaluation renders in chunks of
    ``self.ray_chunk`` rays, and shades each chunk's samples in groups of rays holding about
    ``model.sample_chunk`` samples: memory stays bounded however many samples the rays take (every step of
    ``num_samples_per_ray`` while the occupancy grid is still full, in an early validation).
    """

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        sample_chunk = config.get("sample_chunk")
        self.sample_chunk = None if sample_chunk is None else number_at_least(sample_chunk, "model.sample_chunk", 1)
        # per training image: a gain and offset, a pose correction; sized when the data is known (models/per_image.py)
        self.exposure = ExposureCorrection() if bool(config.get("exposure_correction", False)) else None
        self.poses = (PoseRefinement(number_at_least(config.get("pose_refinement_start", POSES_START),
                                                     "model.pose_refinement_start", 0))
                      if bool(config.get("pose_refinement", False)) else None)
        self.setup()

    def setup(self) -> None:
        raise NotImplementedError

    def update_step(self, epoch: int, global_step: int) -> None:
        pass

    def check_schedule(self, max_steps: int) -> None:
        """Warn about a schedule of the model's that cannot finish within ``max_steps`` training steps."""
        if self.poses is not None and self.poses.start_step >= max_steps:
            log.warning(f"model.pose_refinement_start={self.poses.start_step} is not before trainer.max_steps="
                        f"{max_steps}: the cameras are never refined; lower it (the shipped configs start at "
                        f"{POSES_START}) or set model.pose_refinement=false.")

    def forward(self, rays_o: torch.Tensor, rays_d: torch.Tensor) -> Dict[str, Any]:
        if self.training:
            return self._render(rays_o, rays_d)
        return chunk_batch(self._render, self.ray_chunk, rays_o, rays_d)

    def samples_per_query(self, device: torch.device) -> int:
        """Samples per field query outside training: ``model.sample_chunk`` (default 2^20, a GPU's memory
        bound), at most ``utils.mesh.CPU_POINTS_PER_CALL`` on a CPU, which is faster there."""
        return points_per_call(self.sample_chunk or 2 ** 20, device)

    def _render(self, rays_o: torch.Tensor, rays_d: torch.Tensor) -> Dict[str, Any]:
        """rays_o, rays_d (N, 3) -> per-ray outputs (N, ...) and sample counts."""
        ray_indices, t_starts, t_ends = self._march(rays_o, rays_d)
        group = self.samples_per_query(rays_o.device)
        if self.training or len(t_starts) <= group:  # a host int: no device read
            return self._shade(rays_o, rays_d, ray_indices, t_starts, t_ends)
        return merge_outputs([self._shade(rays_o[r0:r1], rays_d[r0:r1], ray_indices[s0:s1] - r0, t_starts[s0:s1],
                                          t_ends[s0:s1])
                              for r0, r1, s0, s1 in ray_groups(ray_indices, len(rays_o), group)])

    def _march(self, rays_o: torch.Tensor, rays_d: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed samples: (ray_indices (S,) integers, sorted; t_starts (S,); t_ends (S,))."""
        raise NotImplementedError

    def _shade(self, rays_o: torch.Tensor, rays_d: torch.Tensor, ray_indices: torch.Tensor, t_starts: torch.Tensor,
               t_ends: torch.Tensor) -> Dict[str, Any]:
        """The rays' outputs (N, ...) from their packed samples (ray_indices index rays_o)."""
        raise NotImplementedError
