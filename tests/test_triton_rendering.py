"""Fused Triton rendering (NeuS opacity, compositing along rays, uniform marching) against the PyTorch reference.

Without a GPU the kernels run under Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1); with one, on the device at larger sizes too.
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import import_triton_or_skip, rays_from_orbit, set_sample_chunk

triton = import_triton_or_skip()

import models  # noqa: E402
from models import triton_rendering  # noqa: E402
from models.base import update_module_step  # noqa: E402
from models.neus import neus_alpha  # noqa: E402
from models.occupancy import OccupancyGrid  # noqa: E402
from models.rendering import (composite_alpha, composite_density, ray_aabb_intersect,  # noqa: E402
                              render_weight_from_density, visibility_from_density)
from utils.config import load_config  # noqa: E402
from utils.host_sync import HostSyncCounter  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def packed_rays(n_rays, max_samples, seed=0):
    """Sorted ray indices (S,) with empty rays first, last and in between, and rays across kernel blocks."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_samples, (n_rays,), generator=g)
    counts[0] = counts[-1] = counts[n_rays // 2] = 0
    counts[1] = max_samples + 40  # longer than any other ray of its block: the others idle while it runs
    return torch.repeat_interleave(torch.arange(n_rays), counts).to(DEVICE), counts


def composite_with_gradients(backend, alphas, values, ray_indices, n_rays, g_weights, g_sums):
    a = alphas.clone().requires_grad_(True)
    v = values.clone().requires_grad_(True)
    weights, sums = composite_alpha(a, v, ray_indices, n_rays, backend)
    loss = (sums * g_sums).sum() + ((weights * g_weights).sum() if g_weights is not None else 0.0)
    loss.backward()
    return weights.detach(), sums.detach(), a.grad, v.grad


@pytest.mark.parametrize("n_rays,max_samples,channels,weights_used", [
    (150, 60, 7, True),  # NeuS: rgb | depth | normal; the weights feed the distortion loss
    (150, 60, 4, False),  # NeRF: rgb | depth; only the per-ray sums are used
    (3, 5, 1, True),
] + ([(4096, 300, 7, True)] if DEVICE == "cuda" else []))
def test_composite_matches_the_reference_values_and_gradients(n_rays, max_samples, channels, weights_used):
    ray_indices, _ = packed_rays(n_rays, max_samples)
    S = len(ray_indices)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    alphas = torch.rand(S, generator=g, device=DEVICE) * 0.6  # below 1: the reference's log clamp never binds
    values = torch.randn(S, channels, generator=g, device=DEVICE)
    g_weights = torch.randn(S, generator=g, device=DEVICE) if weights_used else None
    g_sums = torch.randn(n_rays, channels + 1, generator=g, device=DEVICE)
    expected = composite_with_gradients("torch", alphas, values, ray_indices, n_rays, g_weights, g_sums)
    got = composite_with_gradients("triton", alphas, values, ray_indices, n_rays, g_weights, g_sums)
    for name, e, x in zip(["weights", "per-ray sums", "alpha gradient", "value gradient"], expected, got):
        assert x.shape == e.shape and x.dtype == torch.float32, name
        torch.testing.assert_close(x, e, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_composite_gradient_is_exact_at_an_opaque_sample():
    """An alpha of exactly 1 still passes gradient to itself and (through 1 - alpha) from the samples behind
    it: checked against autograd through an explicit product, where the log-space reference clamps it away."""
    alphas = torch.tensor([0.3, 1.0, 0.5, 0.2, 0.0, 0.9], device=DEVICE)
    values = torch.randn(6, 2, device=DEVICE)
    ray_indices = torch.tensor([0, 0, 0, 0, 1, 1], device=DEVICE)
    g_weights = torch.randn(6, device=DEVICE)
    g_sums = torch.randn(2, 3, device=DEVICE)
    a = alphas.clone().requires_grad_(True)
    weights = []
    for lo, hi in [(0, 4), (4, 6)]:
        survive = torch.cat([torch.ones(1, device=DEVICE), torch.cumprod(1 - a[lo:hi], 0)[:-1]])
        weights.append(a[lo:hi] * survive)
    w = torch.cat(weights)
    sums = torch.zeros(2, 3, device=DEVICE).index_add(0, ray_indices, torch.cat([w[:, None], w[:, None] * values], 1))
    ((sums * g_sums).sum() + (w * g_weights).sum()).backward()
    _, _, got, _ = composite_with_gradients("triton", alphas, values, ray_indices, 2, g_weights, g_sums)
    torch.testing.assert_close(got, a.grad, rtol=1e-5, atol=1e-6)
    assert float(got[1].abs()) > 1e-3 and float(got[0].abs()) > 1e-3  # the opaque sample and the one before it


def test_composite_density_matches_the_reference():
    ray_indices, counts = packed_rays(90, 40, seed=3)
    S = len(ray_indices)
    t_starts = torch.rand(S, device=DEVICE) * 3
    t_ends = t_starts + torch.rand(S, device=DEVICE) * 0.05
    sigmas = torch.rand(S, device=DEVICE) * 30
    values = torch.randn(S, 4, device=DEVICE)
    out = {}
    for backend in ("torch", "triton"):
        s = sigmas.clone().requires_grad_(True)
        weights, sums = composite_density(t_starts, t_ends, s, values, ray_indices, len(counts), backend)
        (sums[:, :1].sum() + sums[:, 1:].square().sum()).backward()
        out[backend] = weights.detach(), sums.detach(), s.grad
    for e, x in zip(out["torch"], out["triton"]):
        torch.testing.assert_close(x, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("alpha_thre", [0.0, 0.01])
def test_early_stop_visibility_matches_the_reference(alpha_thre):
    """NeRF's pass before rendering: which samples still see the camera (T >= 1e-4) and are not transparent.
    Densities from clear to opaque, so that most rays cross the threshold part way along."""
    ray_indices, counts = packed_rays(130, 80, seed=5)
    S = len(ray_indices)
    g = torch.Generator(device=DEVICE).manual_seed(5)
    t_starts = torch.sort(torch.rand(S, generator=g, device=DEVICE) * 3).values  # any order: dt is what counts
    t_ends = t_starts + torch.rand(S, generator=g, device=DEVICE) * 0.05
    sigmas = torch.rand(S, generator=g, device=DEVICE) ** 4 * 60
    expected = visibility_from_density(t_starts, t_ends, sigmas, ray_indices, len(counts), 1e-4, alpha_thre)
    with HostSyncCounter() as counter:
        got = visibility_from_density(t_starts, t_ends, sigmas, ray_indices, len(counts), 1e-4, alpha_thre, "triton")
    assert got.dtype == torch.bool and got.shape == (S,) and counter.total == 0
    assert 0.2 * S < int((~expected).sum()) < 0.8 * S  # the threshold binds for many samples, not all
    _, transmittance, alphas = render_weight_from_density(t_starts, t_ends, sigmas, ray_indices, len(counts))
    # a sample whose transmittance lies within float32 rounding of the threshold may go either way
    at_threshold = ((transmittance / 1e-4).log().abs() < 1e-5) | ((alphas - alpha_thre).abs() < 1e-6)
    differ = got != expected
    assert not (differ & ~at_threshold).any(), torch.nonzero(differ & ~at_threshold)[:5]
    assert int(differ.sum()) <= 2


@pytest.mark.parametrize("ratio", [0.0, 0.4, 1.0])
def test_neus_alpha_matches_the_reference_values_and_gradients(ratio):
    S = 700  # several blocks, the last one partial
    g = torch.Generator(device=DEVICE).manual_seed(2)
    sdf = torch.randn(S, generator=g, device=DEVICE) * 0.05
    dirs = F.normalize(torch.randn(S, 3, generator=g, device=DEVICE), dim=-1)
    normal = F.normalize(torch.randn(S, 3, generator=g, device=DEVICE), dim=-1)
    normal[:50] = -dirs[:50]  # head-on (cos = -1) and grazing (cos = 0) samples
    normal[50:100] = F.normalize(torch.cross(dirs[50:100], torch.randn(50, 3, device=DEVICE), dim=-1), dim=-1)
    dists = torch.rand(S, generator=g, device=DEVICE) * 0.02 + 1e-3
    inv_s = torch.tensor(40.0, device=DEVICE)
    g_alpha = torch.randn(S, generator=g, device=DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        inputs = [t.clone().requires_grad_(True) for t in (sdf, dirs, normal, dists, inv_s)]
        s, d, n, dt, k = inputs
        ratio_t = torch.tensor(ratio, device=DEVICE)
        if backend == "torch":
            alpha = neus_alpha(s, (d * n).sum(-1), dt, k, ratio_t)
        else:
            alpha = triton_rendering.neus_alpha(s, d, n, dt, k, ratio_t)
        (alpha * g_alpha).sum().backward()
        results[backend] = [alpha.detach()] + [t.grad for t in inputs]
    names = ["alpha", "sdf gradient", "direction gradient", "normal gradient", "distance gradient", "inv_s gradient"]
    for name, e, x in zip(names, results["torch"], results["triton"]):
        assert x.shape == e.shape, name
        torch.testing.assert_close(x, e, rtol=1e-4, atol=1e-5 * max(1.0, float(e.abs().max())),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("use_normal,use_norm", [(True, True), (True, False), (False, True)])
def test_unit_normal_matches_normalize_and_norm_values_and_gradients(use_normal, use_norm):
    """NeuS's normal and the eikonal term's norm from one launch: F.normalize's values and gradients, at zero
    gradients (normal 0, gradient 0 through the norm, as torch), below F.normalize's eps and across blocks."""
    S = 700
    g = torch.Generator(device=DEVICE).manual_seed(3)
    grad = torch.randn(S, 3, generator=g, device=DEVICE) * torch.rand(S, 1, generator=g, device=DEVICE) * 3
    grad[:5] = 0.0
    grad[5:10] *= 1e-14  # shorter than eps = 1e-12: divided by eps, its gradient too
    g_normal = torch.randn(S, 3, generator=g, device=DEVICE)
    g_norm = torch.randn(S, generator=g, device=DEVICE)
    results = []
    for fused in (False, True):
        x = grad.clone().requires_grad_(True)
        normal, norm = (triton_rendering.unit_normal(x) if fused else (F.normalize(x, dim=-1), x.norm(dim=-1)))
        loss = (normal * g_normal).sum() * use_normal + (norm * g_norm).sum() * use_norm
        loss.backward()
        results.append((normal.detach(), norm.detach(), x.grad))
    for name, e, got in zip(("normal", "norm", "gradient"), *results):
        assert got.dtype == e.dtype and torch.isfinite(got).all(), name
        torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-6 * max(1.0, float(e.abs().max())),
                                   msg=lambda m: f"{name}: {m}")
    assert float(results[1][2][5:10].abs().max()) > 1e6 * use_normal  # the eps branch was exercised


def test_unit_normal_keeps_half_precision():
    x = torch.randn(40, 3, device=DEVICE).half().requires_grad_(True)
    normal, norm = triton_rendering.unit_normal(x)
    assert normal.dtype == norm.dtype == torch.float16
    (normal.float().sum() + norm.float().sum()).backward()
    assert x.grad.dtype == torch.float16
    torch.testing.assert_close(normal.float(), F.normalize(x.detach().float(), dim=-1), rtol=2e-3, atol=2e-3)


def test_half_precision_inputs_give_float32_results_and_gradients_in_their_own_dtype():
    """tiny-cuda-nn's networks hand fp16 to the renderer: the kernels read it, compute in fp32."""
    ray_indices, counts = packed_rays(20, 12, seed=5)
    S = len(ray_indices)
    sdf = (torch.randn(S, device=DEVICE) * 0.05).half().requires_grad_(True)
    dirs = F.normalize(torch.randn(S, 3, device=DEVICE), dim=-1)
    normal = F.normalize(torch.randn(S, 3, device=DEVICE), dim=-1).half().requires_grad_(True)
    rgb = torch.rand(S, 3, device=DEVICE).half().requires_grad_(True)
    alpha = triton_rendering.neus_alpha(sdf, dirs, normal, torch.full((S,), 0.01, device=DEVICE),
                                        torch.tensor(40.0, device=DEVICE), torch.tensor(1.0, device=DEVICE))
    weights, sums = triton_rendering.composite(alpha, rgb, ray_indices, len(counts))
    assert alpha.dtype == weights.dtype == sums.dtype == torch.float32
    sums.sum().backward()
    assert sdf.grad.dtype == normal.grad.dtype == rgb.grad.dtype == torch.float16
    expected = neus_alpha(sdf.detach().float(), (dirs * normal.detach().float()).sum(-1),
                          torch.full((S,), 0.01, device=DEVICE), torch.tensor(40.0, device=DEVICE), 1.0)
    torch.testing.assert_close(alpha.detach(), expected, rtol=1e-4, atol=1e-5)


def neus_pair(*overrides):
    cfg = load_config("configs/neus-demo.yaml", ["model.grid_resolution=16", "model.randomized=false", *overrides])
    ref = models.make(cfg.model.name, cfg.model).to(DEVICE).train()
    cfg.model.rendering_backend = "triton"
    fast = models.make(cfg.model.name, cfg.model).to(DEVICE).train()
    fast.load_state_dict(ref.state_dict())
    for m in (ref, fast):
        update_module_step(m, 0, 100)
    return ref, fast


def render_and_backward(model, rays_o, rays_d):
    """Forward, a loss over everything a NeuS step uses (colour, opacity, depth, normals, weights, eikonal),
    backward. Returns the outputs and every parameter's gradient, and the operators it dispatched."""
    model.zero_grad()
    with HostSyncCounter(record_sites=False) as counter:
        out = model(rays_o, rays_d)
        loss = (out["comp_rgb_full"].square().sum() + out["opacity"].sum() + 0.1 * out["depth"].sum()
                + out["comp_normal"].sum() + out["weights"].square().sum()
                + (out["sdf_grad_norm_samples"] - 1).square().mean())  # the eikonal term, as the system takes it
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads, counter.operators


@pytest.mark.parametrize("overrides,half", [((), False), (("model.learned_background=true",), False), ((), True)])
def test_neus_model_renders_and_learns_the_same_on_both_backends(overrides, half):
    """half: under fp16 autocast, as 16-mixed trains on a GPU."""
    ref, fast = neus_pair(*overrides)
    g = torch.Generator(device=DEVICE).manual_seed(4)
    rays_o, rays_d = rays_from_orbit(64, g, spread=0.3)
    with torch.autocast(DEVICE, dtype=torch.float16, enabled=half):
        out_ref, grads_ref, ops_ref = render_and_backward(ref, rays_o, rays_d)
        out_fast, grads_fast, ops_fast = render_and_backward(fast, rays_o, rays_d)
    assert out_ref["num_samples"] == out_fast["num_samples"] > 64
    for key in ("comp_rgb_full", "opacity", "depth", "comp_normal", "weights"):
        torch.testing.assert_close(out_fast[key], out_ref[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
    assert grads_fast.keys() == grads_ref.keys() and "variance.variance" in grads_ref
    for name, e in grads_ref.items():
        torch.testing.assert_close(grads_fast[name], e, rtol=1e-3, atol=1e-5 * max(1.0, float(e.abs().max())),
                                   msg=lambda m: f"{name}: {m}")
    # forward and backward of one render, operators dispatched: measured 471 -> 306 (709 -> 443 with the
    # background and its cone-step march): NeuS opacity, compositing, marching and the unit normal are fused
    assert ops_fast <= ops_ref - (240 if overrides else 150), (ops_fast, ops_ref)


def test_nerf_model_renders_and_learns_the_same_on_both_backends():
    """NeRF with its early-stop pass on, densities high enough from the start (bias 3) that rays go opaque part
    way through the box: the same samples kept, the same outputs and gradients."""
    cfg = load_config("configs/nerf-demo.yaml", ["model.grid_resolution=16", "model.randomized=false",
                                                 "model.early_stop_eps=1e-4", "model.geometry.density_bias=3"])
    ref = models.make(cfg.model.name, cfg.model).to(DEVICE).train()
    cfg.model.rendering_backend = "triton"
    fast = models.make(cfg.model.name, cfg.model).to(DEVICE).train()
    fast.load_state_dict(ref.state_dict())
    g = torch.Generator(device=DEVICE).manual_seed(4)
    rays_o, rays_d = rays_from_orbit(64, g, spread=0.3)
    results = []
    for model in (ref, fast):
        with HostSyncCounter(record_sites=False) as counter:
            out = model(rays_o, rays_d)
            (out["comp_rgb"].square().sum() + out["depth"].sum() + out["weights"].square().sum()).backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}, counter.operators))
    (out_ref, grads_ref, ops_ref), (out_fast, grads_fast, ops_fast) = results
    no_early_stop = fast.occupancy_grid.march(rays_o, rays_d, 0.0, 1e10, fast.render_step_size, backend="triton")[0]
    assert 64 < out_ref["num_samples"] == out_fast["num_samples"] < 0.8 * len(no_early_stop)  # the pass culls
    for key in ("comp_rgb", "opacity", "depth", "weights"):
        torch.testing.assert_close(out_fast[key], out_ref[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
    for name, e in grads_ref.items():
        torch.testing.assert_close(grads_fast[name], e, rtol=1e-3, atol=1e-5 * max(1.0, float(e.abs().max())),
                                   msg=lambda m: f"{name}: {m}")
    # forward and backward of one render, operators dispatched: measured 297 -> 193 (211 with the early-stop
    # pass left to PyTorch): marching, the early-stop pass and compositing are fused
    assert ops_fast <= ops_ref - 90, (ops_fast, ops_ref)


@pytest.mark.parametrize("levels,use_grid,near_plane,cone_angle", [
    (1, True, 0.0, 0.0), (1, False, 0.0, 0.0), (3, True, 0.0, 0.0), (1, True, 2.2, 0.0),
    (1, True, 0.0, 0.02),  # steps grow from t = 3 (step / cone_angle): uniform, then geometric inside the box
    (4, True, 0.2, 0.1), (4, False, 0.0, 0.1)])  # an unbounded scene's grid: geometric steps in the outer levels
def test_marching_gives_the_reference_samples(levels, use_grid, near_plane, cone_angle):
    """Rays from all sides (some missing the box, one along an axis, one starting inside), stratified, through a
    random grid: the same packed samples as the PyTorch march, and one host sync (the total) to pack them."""
    grid = OccupancyGrid([-1, -1, -1, 1, 1, 1], resolution=16, levels=levels).to(DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(6)
    grid.binaries.copy_(torch.rand(grid.binaries.shape, generator=g, device=DEVICE) > 0.6)
    n = 160  # interpreted kernels: a few hundred candidates per ray at most
    step = 0.06 if cone_angle else 0.06 * 2 ** (levels - 1)
    rays_o, rays_d = rays_from_orbit(n, g, spread=0.6)
    rays_o[0], rays_d[0] = torch.tensor([0.3, 0.2, -3.0]), torch.tensor([0.0, 0.0, 1.0])
    rays_o[1] = torch.tensor([0.1, -0.2, 0.3])  # inside the box
    marched = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(7)  # the same jitter
        with HostSyncCounter() as syncs:
            marched[backend] = grid.march(rays_o, rays_d, near_plane, 1e10, step, cone_angle, stratified=True,
                                          use_grid=use_grid, backend=backend)
        assert syncs.total == 1, syncs.report()
    (ref_idx, ref_ts, ref_te), (idx, ts, te) = marched["torch"], marched["triton"]
    assert idx.dtype == torch.int64 and ts.dtype == te.dtype == torch.float32
    ref_counts = torch.bincount(ref_idx, minlength=n)
    # the axis ray hits; the one from inside marches unless the near plane lies past its exit
    exit_from_inside = float(ray_aabb_intersect(rays_o[1:2], rays_d[1:2], grid.outer_aabb())[1])
    assert int(ref_counts[0]) > 0 and (int(ref_counts[1]) > 0) == (near_plane < exit_from_inside)
    assert float(ts.min()) >= near_plane
    if levels == 1:
        assert int((ref_counts == 0).sum()) > 0  # some rays miss the box (the 3-level grid's box holds them all)
    if DEVICE == "cpu":  # the interpreter rounds as PyTorch does: the same samples, bit for bit
        assert torch.equal(idx, ref_idx) and torch.equal(ts, ref_ts) and torch.equal(te, ref_te)
    else:  # a GPU fuses multiply-adds: a sample at a cell's or the box's edge may go either way
        counts = torch.bincount(idx, minlength=n)
        assert int((counts - ref_counts).abs().max()) <= 1 and abs(len(idx) - len(ref_idx)) <= 0.002 * len(ref_idx)


def test_an_interpreted_launch_counts_as_one_operator():
    ray_indices = torch.tensor([0, 0, 1], device=DEVICE)
    alphas, values = torch.rand(3, device=DEVICE), torch.rand(3, 2, device=DEVICE)
    with HostSyncCounter() as counter:
        triton_rendering.composite(alphas, values, ray_indices, 2)
    # arange + searchsorted, three output buffers, one kernel; no sync
    assert counter.operators == 6 and counter.total == 0


@pytest.mark.parametrize("config", ["configs/neus-demo.yaml", "configs/nerf-demo.yaml"])
def test_an_image_shaded_in_groups_is_the_whole_render_on_the_triton_backend(config, monkeypatch):
    """Evaluation shades each chunk's samples in groups of rays (``model.sample_chunk``); the kernels are handed
    the groups' slices, re-indexed from their first ray."""
    cfg = load_config(config, ["model.grid_resolution=16", "model.learned_background=true",
                               "model.rendering_backend=triton"])
    torch.manual_seed(0)
    model = models.make(cfg.model.name, cfg.model).to(DEVICE).eval()
    g = torch.Generator(device=DEVICE).manual_seed(5)
    rays_o, rays_d = rays_from_orbit(48, g, spread=0.3)
    outs = []
    for sample_chunk in (10 ** 9, 300):
        set_sample_chunk(model, sample_chunk, monkeypatch)
        with torch.no_grad():
            outs.append(model(rays_o, rays_d))
    whole, grouped = outs
    assert whole["num_samples"] == grouped["num_samples"] > 3 * 300
    for key, value in whole.items():
        if torch.is_tensor(value) and value.dim() > 0:
            torch.testing.assert_close(grouped[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
