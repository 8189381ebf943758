"""Volume rendering over packed samples (nerfacc's functional API, in PyTorch).

Samples of all rays are packed into flat tensors: ``ray_indices`` (S,) int64,
sorted so each ray's samples are contiguous and in marching order, with
``t_starts`` and ``t_ends`` (S,) bounding each sample's interval. The PyTorch
functions here are the reference; with ``backend='nerfacc'`` the same calls
go to nerfacc's CUDA kernels, and with ``backend='triton'`` ``composite_alpha`` /
``composite_density`` run as one fused kernel per pass (``models.triton_rendering``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def segment_exclusive_cumsum(values: torch.Tensor, ray_indices: torch.Tensor, n_rays: int) -> torch.Tensor:
    """Exclusive cumulative sum within each ray.

    values: (S,), ray_indices: (S,) sorted. Returns (S,): for each sample the
    sum of the earlier samples of the same ray. Accumulates in float64 so long
    packs keep their precision. No host sync: each sample finds its ray's
    first sample by a running maximum over the segment starts.
    """
    if values.numel() == 0:
        return values
    v = values.double()
    exclusive = torch.cumsum(v, dim=0) - v
    return (exclusive - exclusive[segment_first_index(ray_indices)]).to(values.dtype)


def segment_first_index(ray_indices: torch.Tensor) -> torch.Tensor:
    """(S,) sorted ray indices -> (S,) int64: the position of the first sample of each sample's ray."""
    position = torch.arange(len(ray_indices), device=ray_indices.device)
    starts = torch.ones_like(ray_indices, dtype=torch.bool)
    starts[1:] = ray_indices[1:] != ray_indices[:-1]
    return torch.cummax(torch.where(starts, position, 0), dim=0).values


def render_weight_from_density(t_starts: torch.Tensor, t_ends: torch.Tensor, sigmas: torch.Tensor,
                               ray_indices: torch.Tensor, n_rays: int, backend: str = "torch"
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights w_i = T_i (1 - exp(-sigma_i dt_i)) with T_i = exp(-sum_{j<i} sigma_j dt_j).

    All inputs (S,). Returns (weights, transmittance, alphas), each (S,).
    """
    if backend == "nerfacc":
        from nerfacc.volrend import render_weight_from_density as nerfacc_weights

        return nerfacc_weights(t_starts, t_ends, sigmas, ray_indices=ray_indices, n_rays=n_rays)
    tau = sigmas * (t_ends - t_starts)
    transmittance = torch.exp(-segment_exclusive_cumsum(tau, ray_indices, n_rays))
    alphas = 1.0 - torch.exp(-tau)
    return transmittance * alphas, transmittance, alphas


def render_weight_from_alpha(alphas: torch.Tensor, ray_indices: torch.Tensor, n_rays: int,
                             backend: str = "torch") -> Tuple[torch.Tensor, torch.Tensor]:
    """Weights w_i = alpha_i prod_{j<i} (1 - alpha_j). alphas: (S,). Returns (weights, transmittance)."""
    if backend == "nerfacc":
        from nerfacc.volrend import render_weight_from_alpha as nerfacc_weights

        return nerfacc_weights(alphas, ray_indices=ray_indices, n_rays=n_rays)
    log_survive = torch.log(torch.clamp(1.0 - alphas, min=1e-10))
    transmittance = torch.exp(segment_exclusive_cumsum(log_survive, ray_indices, n_rays))
    return transmittance * alphas, transmittance


def accumulate_along_rays(weights: torch.Tensor, values: Optional[torch.Tensor], ray_indices: torch.Tensor,
                          n_rays: int) -> torch.Tensor:
    """Sum of ``weights * values`` per ray.

    weights: (S,), values: (S, C) or None (then the weights themselves, C=1).
    Returns (n_rays, C).
    """
    return _sum_per_ray(weights[:, None] if values is None else weights[:, None] * values, ray_indices, n_rays)


def _sum_per_ray(src: torch.Tensor, ray_indices: torch.Tensor, n_rays: int) -> torch.Tensor:
    """(S, C) per-sample values -> (n_rays, C) sums, in one scatter."""
    return torch.zeros((n_rays, src.shape[-1]), dtype=src.dtype, device=src.device).index_add(0, ray_indices, src)


def composite_alpha(alphas: torch.Tensor, values: torch.Tensor, ray_indices: torch.Tensor, n_rays: int,
                    backend: str = "torch") -> Tuple[torch.Tensor, torch.Tensor]:
    """Weights from opacities and the per-ray sums a renderer needs, in one call.

    alphas: (S,); values: (S, C), e.g. rgb, depth and normal side by side. Returns weights (S,) and
    (n_rays, 1 + C): column 0 the opacity (sum of weights), then the weighted sums of the values.
    """
    if backend == "triton":
        from models.triton_rendering import composite

        return composite(alphas, values, ray_indices, n_rays)
    weights, _ = render_weight_from_alpha(alphas, ray_indices, n_rays, backend)
    return weights, accumulate_with_opacity(weights, values, ray_indices, n_rays)


def composite_density(t_starts: torch.Tensor, t_ends: torch.Tensor, sigmas: torch.Tensor, values: torch.Tensor,
                      ray_indices: torch.Tensor, n_rays: int, backend: str = "torch"
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """As ``composite_alpha``, from densities (S,) over the intervals [t_starts, t_ends) (S,) each."""
    if backend == "triton":
        from models.triton_rendering import composite

        return composite(-torch.expm1(-sigmas * (t_ends - t_starts)), values, ray_indices, n_rays)
    weights, _, _ = render_weight_from_density(t_starts, t_ends, sigmas, ray_indices, n_rays, backend)
    return weights, accumulate_with_opacity(weights, values, ray_indices, n_rays)


def accumulate_with_opacity(weights: torch.Tensor, values: torch.Tensor, ray_indices: torch.Tensor,
                            n_rays: int) -> torch.Tensor:
    """(S,) weights, (S, C) values -> (n_rays, 1 + C): the sums of [w, w * values] per ray, in one scatter."""
    w = weights[:, None]
    return _sum_per_ray(torch.cat([w, w * values], dim=-1), ray_indices, n_rays)


def visibility_from_density(t_starts: torch.Tensor, t_ends: torch.Tensor, sigmas: torch.Tensor,
                            ray_indices: torch.Tensor, n_rays: int, early_stop_eps: float = 1e-4,
                            alpha_thre: float = 0.0, backend: str = "torch") -> torch.Tensor:
    """(S,) bool: samples still visible (transmittance >= eps) and not transparent (alpha >= thre).
    backend 'triton': one fused walk along each ray (models.triton_rendering)."""
    if backend == "triton":
        from models.triton_rendering import visible_by_density

        return visible_by_density(t_starts, t_ends, sigmas, ray_indices, n_rays, early_stop_eps, alpha_thre)
    _, transmittance, alphas = render_weight_from_density(t_starts, t_ends, sigmas, ray_indices, n_rays)
    visible = transmittance >= early_stop_eps
    if alpha_thre > 0:
        visible = visible & (alphas >= alpha_thre)
    return visible


def distortion_loss(weights: torch.Tensor, t_starts: torch.Tensor, t_ends: torch.Tensor,
                    ray_indices: torch.Tensor, n_rays: int) -> torch.Tensor:
    """mip-NeRF 360 distortion loss over packed samples, averaged over rays.

    sum_{i,j} w_i w_j |m_i - m_j| + 1/3 sum_i w_i^2 (t_e - t_s), with the double
    sum in O(S) through per-ray prefix sums (samples sorted by t within a ray).
    """
    mid = 0.5 * (t_starts + t_ends)
    w_before = segment_exclusive_cumsum(weights, ray_indices, n_rays)
    wm_before = segment_exclusive_cumsum(weights * mid, ray_indices, n_rays)
    pairwise = 2.0 * weights * (mid * w_before - wm_before)
    uni = weights.square() * (t_ends - t_starts) / 3.0
    return (pairwise + uni).sum() / max(n_rays, 1)


def ray_aabb_intersect(rays_o: torch.Tensor, rays_d: torch.Tensor, aabb: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances of rays through an axis-aligned box.

    rays_o, rays_d: (N, 3); aabb: (6,) = (min xyz, max xyz). Returns (t_near,
    t_far), each (N,); t_far < t_near where the ray misses.
    """
    safe_d = torch.where(rays_d.abs() < 1e-12, torch.full_like(rays_d, 1e-12), rays_d)
    t0 = (aabb[:3] - rays_o) / safe_d
    t1 = (aabb[3:] - rays_o) / safe_d
    t_near = torch.minimum(t0, t1).amax(dim=-1)
    t_far = torch.maximum(t0, t1).amin(dim=-1)
    return t_near, t_far


def contract_to_unisphere(x: torch.Tensor, radius: float, unbounded: bool) -> torch.Tensor:
    """World points -> [0, 1]^3 network inputs.

    Bounded: [-radius, radius]^3 maps linearly to [0, 1]^3. Unbounded
    (mip-NeRF 360): the radius-ball maps to the inner half, all of space
    beyond it to the shell out to the unit ball, then to [0, 1]^3. x: (..., 3).
    """
    x = x / (2.0 * radius) + 0.5
    if not unbounded:
        return x
    x = x * 2.0 - 1.0
    mag = x.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    x = torch.where(mag > 1.0, (2.0 - 1.0 / mag) * (x / mag), x)
    return x / 4.0 + 0.5
