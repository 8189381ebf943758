"""Shared model plumbing: step updates and chunked evaluation."""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch
import torch.nn as nn

from utils.config import number_at_least
from utils.mesh import points_per_call


def update_module_step(module: nn.Module, epoch: int, global_step: int) -> None:
    """Call ``update_step(epoch, global_step)`` on ``module`` and every submodule that has one (outermost first)."""
    for m in module.modules():
        if hasattr(m, "update_step"):
            m.update_step(epoch, global_step)


def chunk_batch(fn: Callable[..., Dict[str, Any]], chunk: int, *tensors: torch.Tensor) -> Dict[str, Any]:
    """Run ``fn`` over row chunks of ``tensors`` and concatenate tensor outputs (sums for scalars)."""
    n = tensors[0].shape[0]
    parts: Dict[str, list] = {}
    for i in range(0, n, chunk):
        out = fn(*(t[i:i + chunk] for t in tensors))
        for k, v in out.items():
            parts.setdefault(k, []).append(v)
    merged: Dict[str, Any] = {}
    for k, vs in parts.items():
        if torch.is_tensor(vs[0]) and vs[0].dim() > 0:
            merged[k] = torch.cat(vs, dim=0)
        else:
            merged[k] = sum(vs)
    return merged


def export_chunk(export_config: Any, default: int, device: torch.device) -> int:
    """Points per field query when colouring an exported mesh's vertices: ``export.chunk_size``, as in
    instant-nsr-pl (larger is faster on a GPU, smaller needs less memory), else ``default``; on a CPU at most
    ``utils.mesh.CPU_POINTS_PER_CALL``, which is faster there."""
    chunk = export_config.get("chunk_size")
    return points_per_call(default if chunk is None else number_at_least(chunk, "export.chunk_size", 1), device)


class BaseModel(nn.Module):
    """A radiance-field model: ``forward(rays_o, rays_d) -> dict``, ``export() -> mesh``.

    Subclasses implement ``_render`` for one batch of rays; evaluation renders in
    chunks of ``self.ray_chunk`` rays.
    """

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.setup()

    def setup(self) -> None:
        raise NotImplementedError

    def update_step(self, epoch: int, global_step: int) -> None:
        pass

    def forward(self, rays_o: torch.Tensor, rays_d: torch.Tensor) -> Dict[str, Any]:
        if self.training:
            return self._render(rays_o, rays_d)
        return chunk_batch(self._render, self.ray_chunk, rays_o, rays_d)

    def _render(self, rays_o: torch.Tensor, rays_d: torch.Tensor) -> Dict[str, Any]:
        raise NotImplementedError
