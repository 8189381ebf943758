"""volume-sdf: finite differences against autograd on a smooth field, sphere init, progressive eps."""
import pytest
import torch
from omegaconf import OmegaConf

import models


def sdf_config(**geometry):
    cfg = {
        "name": "volume-sdf", "radius": 1.0, "feature_dim": 8, "grad_type": "analytic",
        "xyz_encoding_config": {"otype": "VanillaFrequency", "n_frequencies": 2, "include_xyz": True},
        "mlp_network_config": {"otype": "VanillaMLP", "n_neurons": 64, "n_hidden_layers": 1, "sphere_init": True,
                               "sphere_init_radius": 0.5, "weight_norm": True, "output_activation": "none"},
    }
    cfg.update(geometry)
    return OmegaConf.create(cfg)


def test_sphere_initialisation_gives_a_sphere_sdf():
    geo = models.make("volume-sdf", sdf_config())
    dirs = torch.nn.functional.normalize(torch.randn(200, 3), dim=-1)
    radii = torch.linspace(0.0, 0.95, 20)
    values = torch.stack([geo.sdf(dirs * r) for r in radii]).detach()  # (20, 200)
    assert (values[1:] > values[:-1]).float().mean() > 0.95, "grows outwards along every direction"
    assert float(values[0].max()) < -0.3 and float(values[-1].min()) > 0.0
    zero = radii[(values < 0).sum(0).clamp(max=19)]  # first radius with sdf >= 0, per direction
    assert abs(float(zero.mean()) - 0.5) < 0.1, f"zero level at mean radius {float(zero.mean()):.3f}"


def test_finite_difference_gradient_and_laplacian_match_autograd():
    torch.manual_seed(1)
    analytic = models.make("volume-sdf", sdf_config())
    with torch.no_grad():  # a less trivial smooth field than the initial sphere
        for p in analytic.network.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    fd = models.make("volume-sdf", sdf_config(grad_type="finite_difference", finite_difference_eps=1e-2))
    fd.load_state_dict(analytic.state_dict())
    x = (torch.rand(300, 3) * 2 - 1) * 0.8
    a = analytic(x, with_grad=True)
    f = fd(x, with_grad=True, with_laplace=True)
    torch.testing.assert_close(f["sdf"], a["sdf"].detach())
    torch.testing.assert_close(f["grad"], a["grad"].detach(), atol=2e-3, rtol=1e-2)
    # Laplacian by autograd: trace of the Hessian
    xi = x.clone().requires_grad_()
    g = torch.autograd.grad(analytic(xi, with_grad=False)["sdf"].sum(), xi, create_graph=True)[0]
    lap = sum(torch.autograd.grad(g[:, d].sum(), xi, retain_graph=True)[0][:, d] for d in range(3))
    err = (f["laplace"] - lap.detach()).abs()
    assert float(err.median()) < 0.05 * float(lap.abs().median()) + 0.05, (float(err.median()), float(lap.abs().median()))


def test_analytic_gradient_is_differentiable_for_the_eikonal_loss():
    geo = models.make("volume-sdf", sdf_config())
    x = torch.rand(64, 3) - 0.5
    out = geo(x, with_grad=True)
    ((out["grad"].norm(dim=-1) - 1) ** 2).mean().backward()
    with_grad = [name for name, p in geo.network.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    # every parameter but the output bias (a constant shift leaves the gradient unchanged) is trained by it
    assert len(with_grad) == len(list(geo.network.parameters())) - 1, with_grad


def test_progressive_eps_follows_the_active_level():
    cfg = sdf_config(grad_type="finite_difference", finite_difference_eps="progressive",
                     xyz_encoding_config={"otype": "ProgressiveBandHashGrid", "n_levels": 8, "n_features_per_level": 2,
                                          "log2_hashmap_size": 12, "base_resolution": 16, "per_level_scale": 1.5,
                                          "start_level": 2, "start_step": 0, "update_steps": 10,
                                          "include_xyz": True})
    geo = models.make("volume-sdf", cfg)
    assert geo.finite_difference_eps == pytest.approx(2.0 / (16 * 1.5))
    geo.encoding.encoding.update_step(0, 45)  # level 2 + 4
    assert geo.finite_difference_eps == pytest.approx(2.0 / (16 * 1.5 ** 5))
    with pytest.raises(Exception, match="ProgressiveBandHashGrid"):
        models.make("volume-sdf", sdf_config(finite_difference_eps="progressive"))


def test_a_fully_fused_sdf_network_never_goes_to_tiny_cuda_nn_with_analytic_normals(monkeypatch):
    """tiny-cuda-nn's networks have no second derivative: with tcnn installed, a FullyFusedMLP geometry network
    with analytic normals would fail at the first eikonal backward. It runs on PyTorch instead (or, asked for
    tcnn by name, is a config error)."""
    from models import backends
    from models.networks import VanillaMLP
    from utils.config import ConfigError

    monkeypatch.setitem(backends._STATUS, "tcnn", lambda: (True, "pretended for the test"))
    assert backends.resolve("network", "auto", ("tcnn", "triton"), auto="tcnn") == "tcnn"  # a colour network's
    fused = {"otype": "FullyFusedMLP", "activation": "ReLU", "output_activation": "none", "n_neurons": 64,
             "n_hidden_layers": 1}
    geo = models.make("volume-sdf", sdf_config(mlp_network_config=fused))
    assert type(geo.network) is VanillaMLP
    x = torch.rand(64, 3) * 1.6 - 0.8
    out = geo(x, with_grad=True)
    (out["grad"].norm(dim=-1) - 1).square().mean().backward()
    assert float(geo.network.layers[0].weight.grad.abs().max()) > 0  # the eikonal term reaches the network
    with pytest.raises(ConfigError, match="no second derivative"):
        models.make("volume-sdf", sdf_config(mlp_network_config={**fused, "backend": "tcnn"}))


@pytest.mark.parametrize("network", [
    {},  # Softplus(100) hidden layers with weight norm, as the NeuS configs
    {"sphere_init": False, "weight_norm": False, "n_hidden_layers": 2, "activation": "ReLU"},
    {"n_hidden_layers": 0},
])
def test_the_written_out_network_gradient_trains_as_autograd_twice(network):
    """On a CPU the SDF network writes out its input gradient (``value_and_first_input_gradient``): the SDF,
    its gradient and every parameter's gradient of an eikonal + SDF + feature loss are autograd's, through a
    hash grid (its own input gradient) and the raw xyz."""
    torch.manual_seed(0)
    mlp = dict(sdf_config().mlp_network_config, **network)
    hash_grid = {"otype": "HashGrid", "n_levels": 4, "n_features_per_level": 2, "log2_hashmap_size": 10,
                 "base_resolution": 4, "per_level_scale": 1.5, "include_xyz": True}
    geo = models.make("volume-sdf", sdf_config(xyz_encoding_config=hash_grid, mlp_network_config=mlp))
    with torch.no_grad():
        for p in geo.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert geo.written_gradient
    x = (torch.rand(500, 3) * 2 - 1) * 0.9

    def train_once(written: bool):
        geo.written_gradient = written
        geo.zero_grad()
        out = geo(x, with_grad=True)
        loss = (out["grad"].norm(dim=-1) - 1).square().mean() + out["sdf"].square().mean() + out["feature"].mean()
        loss.backward()
        return [out["sdf"].detach(), out["grad"].detach(), out["feature"].detach()] + \
            [p.grad.clone() for p in geo.parameters()]

    for written, reference in zip(train_once(True), train_once(False)):
        torch.testing.assert_close(written, reference, rtol=1e-4, atol=1e-6 * float(reference.abs().max()) + 1e-9)
    assert not models.make("volume-sdf", sdf_config(sdf_activation="relu")).written_gradient  # not channel 0 as it is
