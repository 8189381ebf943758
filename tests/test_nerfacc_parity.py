"""nerfacc vs the PyTorch reference: packed volume rendering and occupancy-grid marching.

``rendering_backend: auto`` picks nerfacc on a GPU where it is installed; these
tests hold it to the PyTorch functions. They need CUDA and nerfacc, and are
skipped (with the reason) everywhere else, CI included.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("nerfacc's kernels need a CUDA GPU", allow_module_level=True)
pytest.importorskip("nerfacc", reason="nerfacc is not installed (pip install nerfacc==0.5.3)")

from models.occupancy import OccupancyGrid  # noqa: E402
from models.rendering import accumulate_along_rays, render_weight_from_alpha, render_weight_from_density  # noqa: E402

DEVICE = "cuda"


def random_pack(n_rays=64, max_samples=200):
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, max_samples, (n_rays,), generator=g)
    counts[3] = 0  # an empty ray
    ray_indices = torch.repeat_interleave(torch.arange(n_rays), counts)
    edges = [torch.sort(torch.rand(int(c) + 1, generator=g) * 4 + 1).values for c in counts]
    t_starts = torch.cat([e[:-1] for e in edges])
    t_ends = torch.cat([e[1:] for e in edges])
    return ray_indices.to(DEVICE), t_starts.to(DEVICE), t_ends.to(DEVICE), n_rays


def test_weights_from_density_and_alpha_match_the_reference():
    ray_indices, t_starts, t_ends, n = random_pack()
    sigmas = torch.rand(len(t_starts), device=DEVICE) * 5
    alphas = torch.rand(len(t_starts), device=DEVICE) * 0.3
    for ref, fast in zip(render_weight_from_density(t_starts, t_ends, sigmas, ray_indices, n, "torch"),
                         render_weight_from_density(t_starts, t_ends, sigmas, ray_indices, n, "nerfacc")):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    for ref, fast in zip(render_weight_from_alpha(alphas, ray_indices, n, "torch"),
                         render_weight_from_alpha(alphas, ray_indices, n, "nerfacc")):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_marching_samples_the_same_occupied_space():
    """Both start each ray at its own entry into the box, so positions agree up to rounding (a sample whose
    midpoint lies on a cell border may go either way): the test compares what they cover, only occupied
    cells, about as many samples per ray, and the same opacity of a smooth field rendered from them."""
    grid = OccupancyGrid([-1, -1, -1, 1, 1, 1], resolution=32).to(DEVICE)
    centre = (grid.grid_coords.float() + 0.5) / 32 * 2 - 1
    grid.binaries.copy_((centre.norm(dim=-1) < 0.6).view(grid.binaries.shape))  # a ball of occupied cells
    g = torch.Generator().manual_seed(1)
    eye = torch.nn.functional.normalize(torch.randn(512, 3, generator=g), dim=-1) * 3
    rays_d = torch.nn.functional.normalize(torch.randn(512, 3, generator=g) * 0.2 - eye, dim=-1)
    rays_o, rays_d = eye.to(DEVICE), rays_d.to(DEVICE)
    step = 0.005
    results = {}
    for backend in ("torch", "nerfacc"):
        ray_indices, t_starts, t_ends = grid.march(rays_o, rays_d, 0.0, 1e10, step, backend=backend)
        ray_indices = ray_indices.long()
        mid = (t_starts + t_ends) / 2
        assert grid.occupied_at(rays_o[ray_indices] + rays_d[ray_indices] * mid[:, None]).all(), backend
        counts = torch.bincount(ray_indices, minlength=512)
        density = 20.0 * torch.relu(0.5 - (rays_o[ray_indices] + rays_d[ray_indices] * mid[:, None]).norm(dim=-1))
        weights, _, _ = render_weight_from_density(t_starts, t_ends, density, ray_indices, 512)
        results[backend] = counts, accumulate_along_rays(weights, None, ray_indices, 512)[:, 0]
    (counts_ref, opacity_ref), (counts_fast, opacity_fast) = results["torch"], results["nerfacc"]
    assert counts_ref.sum() > 10000
    assert (counts_fast - counts_ref).abs().max() <= 3  # about a step at either end of the occupied run
    assert float((opacity_fast - opacity_ref).abs().max()) < 0.02
