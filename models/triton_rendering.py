"""Fused packed volume rendering in Triton: NeuS opacity, and compositing along rays, each one launch per pass.

The PyTorch reference (``models.rendering``, ``models.neus.neus_alpha``)
spends ~60 device operators per step on these (the segment scan alone is a
cast, two cumsums, a cummax, gathers, a log and an exp, each forward and
backward); a GPU step at the sizes we train is bound by launches, not
arithmetic. Here:

- ``neus_alpha``: per sample, cos = dir . normal, the annealed cosine, the two
  logistic CDFs and alpha, in one elementwise kernel; the backward gives the
  gradients to the SDF, the normal (and the direction, distance when they need
  one) and the per-block partial sums of the gradient to ``inv_s``.
- ``composite``: one lane per ray walks its samples in order (as nerfacc's
  CUDA kernels do), keeping the transmittance T_i = prod_{j<i} (1 - alpha_j)
  as a running product, and writes the weights w_i = alpha_i T_i and the
  per-ray sums of [w, w * values]. The backward walks each ray from its end:
  dL/dalpha_i = T_i (G_i - R_i), with G_i = dL/dw_i + sum_c dL/dout_c v_ic and
  R_i = sum_{k>i} G_k alpha_k prod_{i<j<k} (1 - alpha_j) carried backwards as
  R_{i-1} = G_i alpha_i + (1 - alpha_i) R_i: no division by 1 - alpha, so an
  opaque sample does not blow the gradient up.
- ``visible_by_density``: the same walk along each ray, for the early-stop
  pass before rendering (which samples still see the camera).
- ``unit_normal``: NeuS's normal, the SDF gradient over its length, and that
  length (for the eikonal loss), one launch each way in place of the ~20
  operators of ``F.normalize`` and a norm with their backward.

Samples are packed as everywhere else: ``ray_indices`` (S,) sorted, each
ray's samples contiguous. On a CPU the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1``) in the parity tests.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch.autograd.function import once_differentiable

from models.triton_hashgrid import LAUNCH_OPTIONS  # fused multiply-add and warps, stated in one place

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the backend switch reports it
    triton = None

BLOCK_SAMPLES = 256
BLOCK_RAYS = 64
RAY_LANE_OPTIONS = dict(LAUNCH_OPTIONS, num_warps=BLOCK_RAYS // 32)  # 1-D walks along rays: one ray per thread

if triton is not None:

    @triton.jit
    def _neus_alpha_parts(sdf_ptr, dir_ptr, normal_ptr, dist_ptr, inv_s_ptr, ratio_ptr, rows, m):
        """Per sample: direction, normal (tuples of 3), sdf, distance, inv_s, the anneal ratio, cos, and the
        annealed cosine."""
        sdf = tl.load(sdf_ptr + rows, mask=m, other=0.0).to(tl.float32)
        dist = tl.load(dist_ptr + rows, mask=m, other=0.0).to(tl.float32)
        d = ()
        n = ()
        cos = tl.zeros_like(sdf)
        for k in tl.static_range(3):
            dk = tl.load(dir_ptr + rows * 3 + k, mask=m, other=0.0).to(tl.float32)
            nk = tl.load(normal_ptr + rows * 3 + k, mask=m, other=0.0).to(tl.float32)
            d = d + (dk,)
            n = n + (nk,)
            cos += dk * nk
        s = tl.load(inv_s_ptr).to(tl.float32)
        r = tl.load(ratio_ptr).to(tl.float32)
        iter_cos = -(tl.maximum(0.5 - 0.5 * cos, 0.0) * (1.0 - r) + tl.maximum(-cos, 0.0) * r)
        return d, n, sdf, dist, s, r, cos, iter_cos

    @triton.jit
    def _neus_alpha_forward_kernel(sdf_ptr, dir_ptr, normal_ptr, dist_ptr, inv_s_ptr, ratio_ptr, alpha_ptr, S,
                                   BLOCK: tl.constexpr):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = rows < S
        d, n, sdf, dist, s, r, cos, iter_cos = _neus_alpha_parts(sdf_ptr, dir_ptr, normal_ptr, dist_ptr, inv_s_ptr,
                                                                 ratio_ptr, rows, m)
        half = iter_cos * dist * 0.5
        prev_cdf = tl.sigmoid((sdf - half) * s)
        next_cdf = tl.sigmoid((sdf + half) * s)
        alpha = tl.minimum(tl.maximum((prev_cdf - next_cdf + 1e-5) / (prev_cdf + 1e-5), 0.0), 1.0)
        tl.store(alpha_ptr + rows, alpha, mask=m)

    @triton.jit
    def _neus_alpha_backward_kernel(sdf_ptr, dir_ptr, normal_ptr, dist_ptr, inv_s_ptr, ratio_ptr, g_alpha_ptr,
                                    g_sdf_ptr, g_dir_ptr, g_normal_ptr, g_dist_ptr, g_inv_s_partial_ptr, S,
                                    NEED_DIR: tl.constexpr, NEED_DIST: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = rows < S
        d, n, sdf, dist, s, r, cos, iter_cos = _neus_alpha_parts(sdf_ptr, dir_ptr, normal_ptr, dist_ptr, inv_s_ptr,
                                                                 ratio_ptr, rows, m)
        g = tl.load(g_alpha_ptr + rows, mask=m, other=0.0).to(tl.float32)
        half = iter_cos * dist * 0.5
        u = (sdf - half) * s
        v = (sdf + half) * s
        p = tl.sigmoid(u)
        q = tl.sigmoid(v)
        raw = (p - q + 1e-5) / (p + 1e-5)
        # the clamp passes the gradient inside its bounds, bounds included, as torch's (with iter_cos <= 0 and
        # non-negative distances, raw lies in [0, 1] anyway)
        g = tl.where((raw >= 0.0) & (raw <= 1.0), g, 0.0)
        g_u = g * q / ((p + 1e-5) * (p + 1e-5)) * p * (1.0 - p)  # d raw/dp = q / (p + eps)^2
        g_v = -g / (p + 1e-5) * q * (1.0 - q)  # d raw/dq = -1 / (p + eps)
        tl.store(g_sdf_ptr + rows, (g_u + g_v) * s, mask=m)
        g_inv_s = tl.where(m, g_u * (sdf - half) + g_v * (sdf + half), 0.0)
        tl.store(g_inv_s_partial_ptr + tl.program_id(0), tl.sum(g_inv_s, axis=0))
        g_half = (g_v - g_u) * s
        # d iter_cos / d cos: the relus pass where their argument is positive (cos < 1, cos < 0)
        g_cos = g_half * dist * 0.5 * (tl.where(cos < 1.0, 0.5 * (1.0 - r), 0.0) + tl.where(cos < 0.0, r, 0.0))
        for k in tl.static_range(3):
            tl.store(g_normal_ptr + rows * 3 + k, g_cos * d[k], mask=m)
            if NEED_DIR:
                tl.store(g_dir_ptr + rows * 3 + k, g_cos * n[k], mask=m)
        if NEED_DIST:
            tl.store(g_dist_ptr + rows, g_half * iter_cos * 0.5, mask=m)

    @triton.jit
    def _ray_block(starts_ptr, n_rays, BLOCK_R: tl.constexpr):
        """This program's rays, in-range mask, first sample and sample count of each, and the longest count."""
        rays = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = rays < n_rays
        first = tl.load(starts_ptr + rays, mask=rm, other=0)
        count = tl.load(starts_ptr + rays + 1, mask=rm, other=0) - first
        return rays, rm, first, count, tl.max(count, axis=0)

    @triton.jit
    def _values_row(values_ptr, i, mk, cols, C: tl.constexpr):
        """(rays, CP) block of [1, v_i0, ..., v_i(C-1)] for sample i of each ray (0 beyond C and off-mask)."""
        v = tl.load(values_ptr + i[:, None] * C + (cols[None, :] - 1),
                    mask=mk[:, None] & (cols[None, :] >= 1) & (cols[None, :] <= C), other=0.0).to(tl.float32)
        return tl.where(cols[None, :] == 0, 1.0, v)

    @triton.jit
    def _composite_forward_kernel(alpha_ptr, values_ptr, starts_ptr, weights_ptr, trans_ptr, out_ptr, n_rays,
                                  C: tl.constexpr, CP: tl.constexpr, BLOCK_R: tl.constexpr):
        rays, rm, first, count, longest = _ray_block(starts_ptr, n_rays, BLOCK_R)
        cols = tl.arange(0, CP)
        trans = tl.full((BLOCK_R,), 1.0, tl.float32)
        acc = tl.zeros((BLOCK_R, CP), tl.float32)
        for k in range(0, longest):
            mk = rm & (k < count)
            i = first + k
            a = tl.load(alpha_ptr + i, mask=mk, other=0.0).to(tl.float32)
            w = a * trans
            tl.store(weights_ptr + i, w, mask=mk)
            tl.store(trans_ptr + i, trans, mask=mk)
            acc += w[:, None] * _values_row(values_ptr, i, mk, cols, C)
            trans = trans * (1.0 - a)
        tl.store(out_ptr + rays[:, None] * (C + 1) + cols[None, :], acc,
                 mask=rm[:, None] & (cols[None, :] <= C))

    @triton.jit
    def _visibility_kernel(t_starts_ptr, t_ends_ptr, sigma_ptr, starts_ptr, visible_ptr, n_rays, early_stop_eps,
                           alpha_thre, BLOCK_R: tl.constexpr):
        """visible[i] = T_i >= early_stop_eps and alpha_i >= alpha_thre, T_i = exp(-sum_{j<i} sigma_j dt_j); the
        optical depth is summed in float64 (as the reference's scan) and exponentiated in float32."""
        rays, rm, first, count, longest = _ray_block(starts_ptr, n_rays, BLOCK_R)
        depth = tl.zeros((BLOCK_R,), tl.float64)
        for k in range(0, longest):
            mk = rm & (k < count)
            i = first + k
            t_start = tl.load(t_starts_ptr + i, mask=mk, other=0.0).to(tl.float32)
            t_end = tl.load(t_ends_ptr + i, mask=mk, other=0.0).to(tl.float32)
            tau = tl.load(sigma_ptr + i, mask=mk, other=0.0).to(tl.float32) * (t_end - t_start)
            visible = (tl.exp(-depth.to(tl.float32)) >= early_stop_eps) & (1.0 - tl.exp(-tau) >= alpha_thre)
            tl.store(visible_ptr + i, visible.to(tl.int8), mask=mk)
            depth += tau.to(tl.float64)

    @triton.jit
    def _composite_backward_kernel(alpha_ptr, values_ptr, starts_ptr, trans_ptr, g_weights_ptr, g_out_ptr,
                                   g_alpha_ptr, g_values_ptr, n_rays, HAS_G_WEIGHTS: tl.constexpr,
                                   C: tl.constexpr, BLOCK_R: tl.constexpr):
        """Per ray, from its last sample to its first. The channels are separate (rays,) vectors, a tuple
        loaded once: the dot product with the values is per-lane arithmetic, no reduction across lanes."""
        rays, rm, first, count, longest = _ray_block(starts_ptr, n_rays, BLOCK_R)
        g_opacity = tl.load(g_out_ptr + rays * (C + 1), mask=rm, other=0.0).to(tl.float32)
        g_channels = ()
        for c in tl.static_range(C):
            g_channels = g_channels + (tl.load(g_out_ptr + rays * (C + 1) + 1 + c, mask=rm, other=0.0).to(tl.float32),)
        behind = tl.zeros((BLOCK_R,), tl.float32)  # R: what the samples behind this one owe to its transmittance
        for k in range(0, longest):
            mk = rm & (k < count)
            i = first + count - 1 - k
            a = tl.load(alpha_ptr + i, mask=mk, other=0.0).to(tl.float32)
            trans = tl.load(trans_ptr + i, mask=mk, other=0.0)
            w = a * trans
            g_w = g_opacity
            if HAS_G_WEIGHTS:
                g_w += tl.load(g_weights_ptr + i, mask=mk, other=0.0).to(tl.float32)
            for c in tl.static_range(C):
                g_w += g_channels[c] * tl.load(values_ptr + i * C + c, mask=mk, other=0.0).to(tl.float32)
                tl.store(g_values_ptr + i * C + c, w * g_channels[c], mask=mk)
            tl.store(g_alpha_ptr + i, trans * (g_w - behind), mask=mk)
            behind = g_w * a + (1.0 - a) * behind

    @triton.jit
    def _unit_normal_forward_kernel(grad_ptr, normal_ptr, norm_ptr, S, EPS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = rows < S
        g = ()
        squared = tl.zeros((BLOCK,), tl.float32)
        for k in tl.static_range(3):
            gk = tl.load(grad_ptr + rows * 3 + k, mask=m, other=0.0).to(tl.float32)
            g = g + (gk,)
            squared += gk * gk
        norm = tl.sqrt(squared)
        inv = 1.0 / tl.maximum(norm, EPS)
        for k in tl.static_range(3):
            tl.store(normal_ptr + rows * 3 + k, g[k] * inv, mask=m)
        tl.store(norm_ptr + rows, norm, mask=m)

    @triton.jit
    def _unit_normal_backward_kernel(grad_ptr, g_normal_ptr, g_norm_ptr, g_grad_ptr, S, HAS_G_NORMAL: tl.constexpr,
                                     HAS_G_NORM: tl.constexpr, EPS: tl.constexpr, BLOCK: tl.constexpr):
        """normal = g / c with c = max(|g|, EPS), norm = |g|: dg = dn / c - [|g| >= EPS] (g . dn) g / (c^2 |g|)
        + dnorm g / |g| (0 where g = 0, as torch's norm)."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = rows < S
        g = ()
        dn = ()
        squared = tl.zeros((BLOCK,), tl.float32)
        dot = tl.zeros((BLOCK,), tl.float32)
        for k in tl.static_range(3):
            gk = tl.load(grad_ptr + rows * 3 + k, mask=m, other=0.0).to(tl.float32)
            dk = tl.zeros_like(gk)
            if HAS_G_NORMAL:
                dk = tl.load(g_normal_ptr + rows * 3 + k, mask=m, other=0.0).to(tl.float32)
            g = g + (gk,)
            dn = dn + (dk,)
            squared += gk * gk
            dot += gk * dk
        norm = tl.sqrt(squared)
        c = tl.maximum(norm, EPS)
        safe_norm = tl.where(norm > 0.0, norm, 1.0)
        along = tl.where(norm >= EPS, dot / (c * c * safe_norm), 0.0)  # the clamp passes its bound, as torch's
        if HAS_G_NORM:
            along -= tl.where(norm > 0.0, tl.load(g_norm_ptr + rows, mask=m, other=0.0).to(tl.float32) / safe_norm,
                              0.0)
        for k in tl.static_range(3):
            tl.store(g_grad_ptr + rows * 3 + k, dn[k] / c - along * g[k], mask=m)


def _blocks(n: int, block: int) -> Tuple[int]:
    return (max(1, triton.cdiv(n, block)),)


class _NeuSAlpha(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sdf, dirs, normal, dists, inv_s, ratio):
        S = sdf.shape[0]
        alpha = torch.empty(S, dtype=torch.float32, device=sdf.device)
        if S:
            _neus_alpha_forward_kernel[_blocks(S, BLOCK_SAMPLES)](sdf, dirs, normal, dists, inv_s, ratio, alpha, S,
                                                                  BLOCK=BLOCK_SAMPLES, **LAUNCH_OPTIONS)
        ctx.save_for_backward(sdf, dirs, normal, dists, inv_s, ratio)
        return alpha

    @staticmethod
    def backward(ctx, g_alpha):
        sdf, dirs, normal, dists, inv_s, ratio = ctx.saved_tensors
        S = sdf.shape[0]
        need_dir, need_dist = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        g_sdf = torch.empty(S, dtype=torch.float32, device=sdf.device)
        g_normal = torch.empty(S, 3, dtype=torch.float32, device=sdf.device)
        g_dir = torch.empty(S, 3, dtype=torch.float32, device=sdf.device) if need_dir else g_normal
        g_dist = torch.empty(S, dtype=torch.float32, device=sdf.device) if need_dist else g_sdf
        grid = _blocks(S, BLOCK_SAMPLES)
        partial = torch.zeros(grid[0], dtype=torch.float32, device=sdf.device)
        if S:
            _neus_alpha_backward_kernel[grid](sdf, dirs, normal, dists, inv_s, ratio, g_alpha.contiguous(), g_sdf,
                                              g_dir, g_normal, g_dist, partial, S, NEED_DIR=need_dir,
                                              NEED_DIST=need_dist, BLOCK=BLOCK_SAMPLES, **LAUNCH_OPTIONS)
        g_inv_s = partial.sum().to(inv_s.dtype).reshape(inv_s.shape) if ctx.needs_input_grad[4] else None
        return (g_sdf.to(sdf.dtype), g_dir.to(dirs.dtype) if need_dir else None, g_normal.to(normal.dtype),
                g_dist.to(dists.dtype) if need_dist else None, g_inv_s, None)


def neus_alpha(sdf: torch.Tensor, dirs: torch.Tensor, normal: torch.Tensor, dists: torch.Tensor,
               inv_s: torch.Tensor, cos_anneal_ratio: torch.Tensor) -> torch.Tensor:
    """NeuS opacity per interval, as ``models.neus.neus_alpha(sdf, (dirs * normal).sum(-1), dists, ...)``.

    sdf, dists: (S,); dirs, normal: (S, 3); inv_s, cos_anneal_ratio: 0-d tensors on the same device (read
    by the kernel: no host sync). Returns (S,) float32 in [0, 1]; differentiable in everything but the ratio.
    """
    ratio = cos_anneal_ratio if torch.is_tensor(cos_anneal_ratio) else torch.full((), cos_anneal_ratio, device=sdf.device)
    return _NeuSAlpha.apply(sdf.contiguous(), dirs.contiguous(), normal.contiguous(), dists.contiguous(),
                            inv_s.reshape(()), ratio.reshape(()))


NORMAL_EPS = 1e-12  # F.normalize's


class _UnitNormal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad):
        S = grad.shape[0]
        normal = torch.empty_like(grad)
        norm = torch.empty(S, dtype=grad.dtype, device=grad.device)
        if S:
            _unit_normal_forward_kernel[_blocks(S, BLOCK_SAMPLES)](grad, normal, norm, S, EPS=NORMAL_EPS,
                                                                   BLOCK=BLOCK_SAMPLES, **LAUNCH_OPTIONS)
        ctx.save_for_backward(grad)
        ctx.set_materialize_grads(False)  # an unused output reaches backward as None, not as zeros
        return normal, norm

    @staticmethod
    @once_differentiable
    def backward(ctx, g_normal, g_norm):
        (grad,) = ctx.saved_tensors
        S = grad.shape[0]
        g_grad = torch.empty(S, 3, dtype=torch.float32, device=grad.device)
        if S and (g_normal is not None or g_norm is not None):
            _unit_normal_backward_kernel[_blocks(S, BLOCK_SAMPLES)](
                grad, g_normal.contiguous() if g_normal is not None else grad,
                g_norm.contiguous() if g_norm is not None else grad, g_grad, S, HAS_G_NORMAL=g_normal is not None,
                HAS_G_NORM=g_norm is not None, EPS=NORMAL_EPS, BLOCK=BLOCK_SAMPLES, **LAUNCH_OPTIONS)
        elif S:
            g_grad.zero_()
        return g_grad.to(grad.dtype)


def unit_normal(grad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """grad (S, 3) -> (normal (S, 3), norm (S,)), grad's dtype: ``F.normalize(grad, dim=-1)`` and
    ``grad.norm(dim=-1)`` in one launch (and one backward launch for both). Differentiable once."""
    return _UnitNormal.apply(grad.contiguous())


def ray_starts(ray_indices: torch.Tensor, n_rays: int) -> torch.Tensor:
    """(S,) sorted ray indices -> (n_rays + 1,) int64: where each ray's samples begin (and the total at the end).

    A sorted search, not a count: no host sync, and rays without samples get an empty range."""
    bounds = torch.arange(n_rays + 1, device=ray_indices.device, dtype=ray_indices.dtype)
    return torch.searchsorted(ray_indices, bounds)


class _Composite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, alphas, values, starts, n_rays):
        S, C = values.shape
        weights = torch.empty(S, dtype=torch.float32, device=alphas.device)
        trans = torch.empty(S, dtype=torch.float32, device=alphas.device)
        out = torch.empty(n_rays, C + 1, dtype=torch.float32, device=alphas.device)
        cp = triton.next_power_of_2(C + 1)
        _composite_forward_kernel[_blocks(n_rays, BLOCK_RAYS)](alphas, values, starts, weights, trans, out, n_rays,
                                                               C=C, CP=cp, BLOCK_R=BLOCK_RAYS, **LAUNCH_OPTIONS)
        ctx.save_for_backward(alphas, values, starts, trans)
        ctx.n_rays = n_rays
        ctx.set_materialize_grads(False)  # unused weights reach backward as None, not as a buffer of zeros
        return weights, out

    @staticmethod
    def backward(ctx, g_weights, g_out):
        alphas, values, starts, trans = ctx.saved_tensors
        S, C = values.shape
        g_alpha = torch.empty(S, dtype=torch.float32, device=alphas.device)
        g_values = torch.empty(S, C, dtype=torch.float32, device=alphas.device)
        if g_out is None:
            g_out = torch.zeros(ctx.n_rays, C + 1, dtype=torch.float32, device=alphas.device)
        has_g_weights = g_weights is not None
        _composite_backward_kernel[_blocks(ctx.n_rays, BLOCK_RAYS)](
            alphas, values, starts, trans, g_weights.contiguous() if has_g_weights else g_alpha, g_out.contiguous(),
            g_alpha, g_values, ctx.n_rays, HAS_G_WEIGHTS=has_g_weights, C=C, BLOCK_R=BLOCK_RAYS, **RAY_LANE_OPTIONS)
        return g_alpha.to(alphas.dtype), g_values.to(values.dtype), None, None


def composite(alphas: torch.Tensor, values: torch.Tensor, ray_indices: torch.Tensor, n_rays: int
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Front-to-back compositing of packed samples.

    alphas: (S,); values: (S, C); ray_indices: (S,) sorted. Returns weights (S,) float32 (alpha_i times the
    transmittance before sample i) and (n_rays, 1 + C) float32: per ray, the opacity (sum of weights) and
    the weighted sums of the C values. Differentiable in alphas and values (weights included).
    """
    return _Composite.apply(alphas.contiguous(), values.contiguous(), ray_starts(ray_indices, n_rays), n_rays)


def visible_by_density(t_starts: torch.Tensor, t_ends: torch.Tensor, sigmas: torch.Tensor, ray_indices: torch.Tensor,
                       n_rays: int, early_stop_eps: float, alpha_thre: float) -> torch.Tensor:
    """(S,) bool: samples still visible (transmittance >= early_stop_eps) and not transparent (alpha >= alpha_thre).

    All inputs (S,), ray_indices sorted. One launch in place of the reference's ~20-operator scan
    (``models.rendering.visibility_from_density``)."""
    visible = torch.empty(len(sigmas), dtype=torch.int8, device=sigmas.device)
    _visibility_kernel[_blocks(n_rays, BLOCK_RAYS)](
        t_starts.contiguous(), t_ends.contiguous(), sigmas.contiguous(), ray_starts(ray_indices, n_rays), visible,
        n_rays, early_stop_eps, alpha_thre, BLOCK_R=BLOCK_RAYS, **RAY_LANE_OPTIONS)
    return visible.view(torch.bool)


def selftest(device: str) -> None:
    """Compile and run every kernel here once (raises if this device cannot run one of them)."""
    sdf = torch.tensor([0.1, -0.05, 0.2], device=device, requires_grad=True)
    normal = torch.tensor([[0.0, 0.0, 1.0]] * 3, device=device, requires_grad=True)
    dirs = torch.tensor([[0.0, 0.0, -1.0]] * 3, device=device)
    inv_s = torch.tensor(20.0, device=device, requires_grad=True)
    alpha = neus_alpha(sdf, dirs, normal, torch.full((3,), 0.1, device=device), inv_s, torch.tensor(1.0, device=device))
    unit, norm = unit_normal(normal * 2.0)
    weights, out = composite(alpha, unit + norm[:, None], torch.tensor([0, 0, 1], device=device), 2)
    (weights.sum() + out.sum()).backward()
    visible_by_density(weights.detach(), weights.detach() + 0.1, alpha.detach(), torch.tensor([0, 0, 1], device=device),
                       2, 1e-4, 0.0)
