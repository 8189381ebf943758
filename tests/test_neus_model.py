"""NeuS model pieces: the NeuS alpha, rendering with and without a learned background, variance ramp."""
import torch
from omegaconf import OmegaConf

import models
from models.base import update_module_step
from models.neus import VarianceNetwork, neus_alpha
from utils.config import load_config


def test_neus_alpha_of_a_plane_matches_the_logistic_density():
    # a ray hitting the plane z = 0 head-on: the SDF falls by dt per step, so the opacity over the whole
    # crossing is the full drop of the logistic CDF from far outside to far inside
    inv_s = torch.tensor(64.0)
    t = torch.linspace(-1, 1, 401)
    dt = t[1] - t[0]
    sdf = -(t[:-1] + dt / 2)  # midpoints
    alpha = neus_alpha(sdf, -torch.ones_like(sdf), torch.full_like(sdf, dt), inv_s, 1.0)
    transmittance = torch.cumprod(1 - alpha, 0)
    assert float(transmittance[-1]) < 1e-3  # opaque after the crossing
    assert float(alpha[sdf > 0.2].max()) < 1e-3  # empty well in front of the surface
    weights = alpha * torch.cat([torch.ones(1), transmittance[:-1]])
    peak = sdf[weights.argmax()]
    assert abs(float(peak)) <= float(dt), "the weight peaks at the zero crossing (unbiased)"


def small_neus(*overrides):
    cfg = load_config("configs/neus-demo.yaml", ["model.grid_resolution=16", *overrides])
    return models.make(cfg.model.name, cfg.model)


def test_render_without_and_with_learned_background():
    rays_o = torch.tensor([[0.0, 0.0, 3.0], [0.0, 3.0, 0.0]])
    rays_d = torch.tensor([[0.0, 0.0, -1.0], [0.0, -1.0, 0.0]])
    model = small_neus().eval()
    model.background_color = torch.tensor([0.0, 0.0, 1.0])
    out = model(rays_o, rays_d)
    assert out["comp_rgb_full"].shape == (2, 3) and float(out["opacity"].min()) > 0.5  # sphere init: hits
    expected = out["comp_rgb"] + torch.tensor([0.0, 0.0, 1.0]) * (1 - out["opacity"])
    torch.testing.assert_close(out["comp_rgb_full"], expected)
    cfg = load_config("configs/neus-demo.yaml", ["model.grid_resolution=16", "model.learned_background=true"])
    bg_model = models.make(cfg.model.name, cfg.model)
    assert bg_model.background.geometry.unbounded
    bg_model.train()
    update_module_step(bg_model, 0, 0)
    out = bg_model(rays_o, rays_d)
    assert "num_samples_bg" in out and torch.isfinite(out["comp_rgb_full"]).all()
    assert set(out["ray_indices_bg"].tolist()) == {0, 1}


def test_variance_modulation_ramps_and_is_saved():
    var = VarianceNetwork(OmegaConf.create({"init_val": 0.3, "modulate": True, "mod_start_steps": 10,
                                            "reach_max_steps": 100, "max_inv_s": 1000.0}))
    var.update_step(0, 5)
    assert float(var.inv_s) == float(torch.exp(torch.tensor(3.0)))
    var.update_step(0, 50)
    assert float(var.inv_s) <= float(var.mod_val) < 1000.0
    state = var.state_dict()
    assert "mod_val" in state and "prev_inv_s" in state


def test_export_colours_the_vertices_in_chunks_of_export_chunk_size():
    """instant-nsr-pl's ``export.chunk_size``: points per field query when colouring the mesh; the colours do not
    depend on it."""
    import pytest

    from utils.config import ConfigError

    model = small_neus("model.geometry.isosurface.resolution=24").eval()
    queries = []
    texture_forward = model.texture.forward
    model.texture.forward = lambda feature, *args: queries.append(len(feature)) or texture_forward(feature, *args)
    whole = model.export(OmegaConf.create({"chunk_size": 10 ** 6}))
    n_vertices = len(whole["v_pos"])
    assert n_vertices > 100 and queries == [n_vertices]  # the sphere of the initialisation, in one query
    queries.clear()
    chunked = model.export(OmegaConf.create({"chunk_size": 97}))
    assert queries == [97] * (n_vertices // 97) + [n_vertices % 97] * (n_vertices % 97 > 0)
    torch.testing.assert_close(torch.from_numpy(chunked["v_rgb"]), torch.from_numpy(whole["v_rgb"]))
    with pytest.raises(ConfigError, match="export.chunk_size must be a whole number >= 1, not 0"):
        model.export(OmegaConf.create({"chunk_size": 0}))


def test_near_and_far_planes_bound_the_samples_of_the_surface_and_the_background():
    """Rays from z = 3 straight down through the radius-1 box (entered at t = 2, left at t = 4)."""
    rays_o = torch.tensor([[0.0, 0.0, 3.0], [0.3, -0.2, 3.0]])
    rays_d = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])
    model = small_neus("model.learned_background=true").eval()
    ray_indices, t_starts, t_ends = model._march(rays_o, rays_d)
    assert float(t_starts.min()) < 2.01 and float(t_ends.max()) > 3.99  # the whole box by default
    model = small_neus("model.learned_background=true", "+model.near_plane=2.5", "+model.far_plane=3.25").eval()
    ray_indices, t_starts, t_ends = model._march(rays_o, rays_d)
    mid = 0.5 * (t_starts + t_ends)
    assert set(ray_indices.tolist()) == {0, 1}
    step = model.render_step_size
    assert 2.5 <= float(mid.min()) < 2.5 + step and 3.25 - step < float(mid.max()) < 3.25
    _, bg_starts, bg_ends = model.background._march(rays_o, rays_d)  # inside the box too: see _background_config
    assert float(bg_starts.min()) >= 2.5 - 1e-6 and float(bg_ends.max()) <= 3.25 + 1e-6 and len(bg_starts) > 0
    out = model(rays_o, rays_d)
    assert torch.isfinite(out["comp_rgb_full"]).all() and float(out["depth"].max()) < 3.25


class SphereField(torch.nn.Module):
    """The geometry network's interface over an exact sphere: sdf = |x| - radius, grad = x / |x|."""

    grad_type = "analytic"

    def __init__(self, radius: float, feature_dim: int):
        super().__init__()
        self.radius, self.feature_dim = radius, feature_dim

    def forward(self, x, with_grad=True, with_laplace=False):
        norm = x.norm(dim=-1)
        return {"sdf": norm - self.radius, "grad": x / norm[:, None], "feature": torch.zeros(len(x), self.feature_dim)}

    def sdf(self, x):
        return x.norm(dim=-1) - self.radius


def test_rendered_normals_and_depth_of_a_sphere_are_the_surface_s():
    """The composited normal (the NeuS test images' normal panel) and depth of an exact sphere, seen from a
    camera 2.5 away, against the ray-sphere intersection: within 0.5 degree and 0.01 where the ray is opaque."""
    model = small_neus("model.variance.init_val=0.5").eval()  # inv_s = e^5: as sharp as a trained surface
    model.geometry = SphereField(0.5, int(model.config.geometry.feature_dim))
    model.cos_anneal_ratio.fill_(1.0)
    ys, xs = torch.meshgrid(torch.linspace(-0.25, 0.25, 32), torch.linspace(-0.25, 0.25, 32), indexing="ij")
    rays_d = torch.nn.functional.normalize(torch.stack([xs, -ys, -torch.ones_like(xs)], -1).view(-1, 3), dim=-1)
    rays_o = torch.tensor([0.0, 0.0, 2.5]).expand_as(rays_d).contiguous()
    with torch.no_grad():
        out = model(rays_o, rays_d)
    b = (rays_o * rays_d).sum(-1)
    disc = b * b - ((rays_o * rays_o).sum(-1) - 0.25)
    t_hit = -b - disc.clamp(min=0).sqrt()
    opacity = out["opacity"].view(-1)
    hit = (disc > 0) & (opacity > 0.99)
    assert int(hit.sum()) > 0.8 * int((disc > 0).sum())  # all but the rays grazing the silhouette
    true_normal = torch.nn.functional.normalize(rays_o + rays_d * t_hit[:, None], dim=-1)
    angle = torch.rad2deg(torch.acos((out["comp_normal"][hit] * true_normal[hit]).sum(-1).clamp(-1, 1)))
    assert float(angle.max()) < 0.5, float(angle.max())
    assert float((out["depth"].view(-1)[hit] / opacity[hit] - t_hit[hit]).abs().max()) < 0.01
    assert float(opacity[disc < -0.05].max()) < 0.01  # rays that miss it see nothing
