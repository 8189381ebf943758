"""Packed volume rendering against a plain per-ray loop."""
import torch

from models.rendering import (accumulate_along_rays, distortion_loss, render_weight_from_alpha,
                              render_weight_from_density)


def random_pack(n_rays=7, max_samples=30):
    counts = torch.randint(0, max_samples, (n_rays,))
    counts[2] = 0  # an empty ray
    ray_indices = torch.repeat_interleave(torch.arange(n_rays), counts)
    t_starts, t_ends = [], []
    for c in counts.tolist():
        edges = torch.sort(torch.rand(c + 1) * 4 + 1).values
        t_starts.append(edges[:-1])
        t_ends.append(edges[1:])
    return ray_indices, torch.cat(t_starts), torch.cat(t_ends), counts


def test_density_weights_and_accumulation_match_dense_loop():
    ray_indices, t_starts, t_ends, counts = random_pack()
    sigmas = torch.rand(len(t_starts)) * 5
    rgb = torch.rand(len(t_starts), 3)
    weights, trans, alphas = render_weight_from_density(t_starts, t_ends, sigmas, ray_indices, len(counts))
    colour = accumulate_along_rays(weights, rgb, ray_indices, len(counts))
    opacity = accumulate_along_rays(weights, None, ray_indices, len(counts))
    start = 0
    for r, c in enumerate(counts.tolist()):
        T, ref_c, ref_o = 1.0, torch.zeros(3), 0.0
        for i in range(start, start + c):
            a = 1 - torch.exp(-sigmas[i] * (t_ends[i] - t_starts[i]))
            assert torch.isclose(trans[i], torch.tensor(T), atol=1e-6)
            assert torch.isclose(weights[i], T * a, atol=1e-6)
            ref_c += T * a * rgb[i]
            ref_o += T * a
            T = T * (1 - a)
        torch.testing.assert_close(colour[r], ref_c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(opacity[r, 0], torch.as_tensor(ref_o).float(), atol=1e-5, rtol=1e-5)
        start += c


def test_alpha_weights_match_dense_loop():
    ray_indices, t_starts, _, counts = random_pack()
    alphas = torch.rand(len(t_starts)) * 0.5
    weights, trans = render_weight_from_alpha(alphas, ray_indices, len(counts))
    start = 0
    for c in counts.tolist():
        T = 1.0
        for i in range(start, start + c):
            assert torch.isclose(weights[i], T * alphas[i], atol=1e-6)
            T *= 1 - float(alphas[i])
        start += c


def test_distortion_loss_matches_quadratic_formula():
    ray_indices, t_starts, t_ends, counts = random_pack()
    w = torch.rand(len(t_starts)) * 0.2
    loss = distortion_loss(w, t_starts, t_ends, ray_indices, len(counts))
    total, start = 0.0, 0
    mid = (t_starts + t_ends) / 2
    for c in counts.tolist():
        s = slice(start, start + c)
        ww, mm = w[s], mid[s]
        total += (ww[:, None] * ww[None] * (mm[:, None] - mm[None]).abs()).sum() + (ww ** 2 * (t_ends[s] - t_starts[s])).sum() / 3
        start += c
    torch.testing.assert_close(loss, total / len(counts), rtol=1e-4, atol=1e-6)


def test_gradients_flow_to_densities():
    ray_indices, t_starts, t_ends, counts = random_pack()
    sigmas = (torch.rand(len(t_starts)) * 5).requires_grad_()
    weights, _, _ = render_weight_from_density(t_starts, t_ends, sigmas, ray_indices, len(counts))
    accumulate_along_rays(weights, None, ray_indices, len(counts)).sum().backward()
    assert torch.isfinite(sigmas.grad).all() and sigmas.grad.abs().sum() > 0
