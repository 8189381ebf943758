"""NeuS's geometry network fused with its input gradient (``models.triton_sdf_network``) against ``VanillaMLP``
differentiated twice by autograd: the output, the SDF's gradient, and every gradient of a loss on both (the
eikonal term) with respect to the input and the parameters, weight norm included.

Without a GPU the kernels run under Triton's interpreter in fp32 (conftest.py sets TRITON_INTERPRET=1), held
to fp32 rounding; on a GPU they run TF32 tensor-core products, held to TF32's 10-bit mantissa, at full size too.
"""
import pytest
import torch

from helpers import import_triton_or_skip, rays_from_orbit

triton = import_triton_or_skip()

import models  # noqa: E402
from models.networks import TritonMLP, TritonSDFNetwork, VanillaMLP, get_sdf_network  # noqa: E402
from models.triton_mlp import MLPShape, fused_mlp  # noqa: E402
from models.triton_sdf_network import sdf_network_with_gradient  # noqa: E402
from utils.config import ConfigError, load_config  # noqa: E402
from utils.host_sync import HostSyncCounter  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = 2e-2 if DEVICE == "cuda" else 1e-4  # TF32 products on a GPU, fp32 under the interpreter


def network_config(width=64, n_hidden=1, sphere_init=True, **extra):
    """NeuS's geometry network (instant-nsr-pl's neus-*.yaml) with the fused backend."""
    return {"otype": "VanillaMLP", "backend": "triton", "output_activation": "none", "n_neurons": width,
            "n_hidden_layers": n_hidden, "sphere_init": sphere_init, "sphere_init_radius": 0.5,
            "weight_norm": True, **extra}


def reference_and_fused(d_in, width, n_hidden, d_out, sphere_init=True):
    """A VanillaMLP perturbed away from its sphere initialisation, and the fused network with the same state."""
    torch.manual_seed(2)
    config = network_config(width, n_hidden, sphere_init)
    ref = VanillaMLP(d_in, d_out, config).to(DEVICE)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    fused = get_sdf_network(d_in, d_out, config, analytic_gradient=True).to(DEVICE)
    assert isinstance(fused, TritonSDFNetwork)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def with_input_gradient(net, x):
    """(output, d output[:, 0] / d x) by the fused function, or by autograd for a VanillaMLP."""
    if isinstance(net, TritonSDFNetwork):
        return net.value_and_input_gradient(x)
    out = net(x)
    (grad,) = torch.autograd.grad(out[:, 0], x, torch.ones_like(out[:, 0]), create_graph=True)
    return out, grad


def outputs_and_gradients(net, x, grad_out, grad_g):
    """Output, input gradient, and the gradients of a loss on both (linear terms and an eikonal term)."""
    x = x.detach().requires_grad_(True)
    net.zero_grad()
    out, g = with_input_gradient(net, x)
    loss = (out * grad_out).sum() + (g * grad_g).sum() + (g.norm(dim=-1) - 1).square().sum()
    loss.backward()
    return out.detach(), g.detach(), x.grad, {name: p.grad for name, p in net.named_parameters()}


def assert_close(got, expected, what):
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=RTOL * 0.1 * max(scale, 1e-6),
                               msg=lambda m: f"{what}: {m}")


def compare(ref, fused, x, grad_out, grad_g):
    out_ref, g_ref, gx_ref, grads_ref = outputs_and_gradients(ref, x, grad_out, grad_g)
    out, g, gx, grads = outputs_and_gradients(fused, x, grad_out, grad_g)
    assert out.dtype == g.dtype == torch.float32 and out.shape == out_ref.shape and g.shape == x.shape
    assert_close(out, out_ref, "output")
    assert_close(g, g_ref, "input gradient of the SDF")
    assert_close(gx, gx_ref, "gradient of the input")
    assert grads.keys() == grads_ref.keys() and any("original0" in name for name in grads)  # weight norm's g
    for name, expected in grads_ref.items():
        assert_close(grads[name], expected, name)


# NeuS's 32 (+3 xyz) -> 64 -> 13; 2 and 3 hidden layers; widths 16 to 128; several 16-row backward blocks per
# program (4 programs under the interpreter), a partial last block, one row; inputs and outputs not multiples of 16
SHAPES = [(35, 64, 1, 13, 200), (32, 16, 2, 4, 70), (5, 128, 1, 1, 1), (20, 32, 3, 16, 45)]


@pytest.mark.parametrize("d_in,width,n_hidden,d_out,n", SHAPES)
def test_fused_sdf_network_gives_autograds_double_backward(d_in, width, n_hidden, d_out, n):
    """Inputs spread so that every hidden layer has units in the Softplus's curved part (|100 h| < 20), where the
    second derivative matters, and in its linear part above 20, where torch's Softplus is the identity."""
    ref, fused = reference_and_fused(d_in, width, n_hidden, d_out)
    g = torch.Generator(device=DEVICE).manual_seed(n)
    x = torch.randn(n, d_in, generator=g, device=DEVICE) * torch.rand(n, 1, generator=g, device=DEVICE)
    with torch.no_grad():
        h = ref.layers[0](x) * 100
    if n > 1:
        assert bool(((h.abs() < 20).float().mean() > 0.05) & ((h > 20).float().mean() > 0.05))
    compare(ref, fused, x, torch.randn(n, d_out, generator=g, device=DEVICE),
            torch.randn(n, d_in, generator=g, device=DEVICE))


def test_relu_hidden_layers_without_sphere_init():
    ref, fused = reference_and_fused(32, 64, 2, 13, sphere_init=False)
    assert fused.beta == 0.0
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(80, 32, generator=g, device=DEVICE)
    compare(ref, fused, x, torch.randn(80, 13, generator=g, device=DEVICE),
            torch.randn(80, 32, generator=g, device=DEVICE))


@pytest.mark.skipif(DEVICE != "cuda", reason="full size needs a GPU (the interpreter takes minutes)")
def test_fused_sdf_network_at_full_size_on_the_gpu():
    ref, fused = reference_and_fused(35, 64, 1, 13)
    n = 1 << 18
    x = torch.randn(n, 35, device=DEVICE) * torch.rand(n, 1, device=DEVICE)
    compare(ref, fused, x, torch.randn(n, 13, device=DEVICE), torch.randn(n, 35, device=DEVICE))


def test_a_hand_set_network_has_the_known_gradient():
    """1 -> 16 -> 1 with one live unit: f(x) = 2 softplus_100(3 x) + 1, f'(x) = 6 sigmoid(300 x)."""
    shape = MLPShape(d_in=1, width=16, n_hidden=1, d_out=1)
    w0, b0 = torch.zeros(16, 1, device=DEVICE), torch.zeros(16, device=DEVICE)
    w1, b1 = torch.zeros(1, 16, device=DEVICE), torch.ones(1, device=DEVICE)
    w0[0, 0], w1[0, 0] = 3.0, 2.0
    x = torch.tensor([[-0.02], [0.0], [0.005], [0.5]], device=DEVICE)
    out, grad = sdf_network_with_gradient(x, shape, [w0, b0, w1, b1])
    expected_out = 2 * torch.nn.functional.softplus(3 * x, beta=100) + 1
    torch.testing.assert_close(out, expected_out, rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(grad, 6 * torch.sigmoid(300 * x), rtol=RTOL, atol=1e-6)
    assert float(grad[1]) == pytest.approx(3.0, rel=RTOL) and float(grad[3]) == pytest.approx(6.0, rel=RTOL)


def test_no_rows_and_fp16_features():
    ref, fused = reference_and_fused(35, 64, 1, 13)
    out, g, gx, grads = outputs_and_gradients(fused, torch.zeros(0, 35, device=DEVICE),
                                              torch.zeros(0, 13, device=DEVICE), torch.zeros(0, 35, device=DEVICE))
    assert out.shape == (0, 13) and g.shape == gx.shape == (0, 35)
    assert all(float(p.abs().max()) == 0.0 for p in grads.values())
    x = (torch.randn(40, 35, device=DEVICE) * 0.1).half()  # the hash grid's output under 16-mixed
    x_ref = x.float().requires_grad_(True)
    x = x.requires_grad_(True)
    out_ref, g_ref = with_input_gradient(ref, x_ref)
    out, g = fused.value_and_input_gradient(x)
    assert_close(out, out_ref, "output from fp16 features")
    assert_close(g, g_ref, "input gradient from fp16 features")
    (g.square().sum() + out.sum()).backward()
    assert x.grad.dtype == torch.float16


def test_differentiating_twice_is_an_error_not_a_silent_zero():
    """The kernels' gradients carry no graph: a third derivative must fail loudly (here and for the fused MLP)."""
    _, fused = reference_and_fused(32, 64, 1, 4)
    x = torch.randn(8, 32, device=DEVICE, requires_grad=True)
    _, g = fused.value_and_input_gradient(x)
    (gx,) = torch.autograd.grad(g.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        gx.sum().backward()
    shape = MLPShape(32, 16, 1, 1)
    params = [torch.randn(16, 32, device=DEVICE), torch.zeros(16, device=DEVICE),
              torch.randn(1, 16, device=DEVICE), torch.zeros(1, device=DEVICE)]
    (gx,) = torch.autograd.grad(fused_mlp(x, shape, params).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        gx.sum().backward()


@pytest.mark.parametrize("overrides,message", [
    # finite differences need no input gradient: the plain fused MLP, which has ReLU hidden layers only
    (("model.geometry.grad_type=finite_difference",), "finite_difference runs the fused MLP.*Softplus"),
    (("model.geometry.grad_type=finite_difference", "model.geometry.mlp_network_config.sphere_init=false"), None),
    (("model.geometry.mlp_network_config.n_neurons=48",), "n_neurons must be one of 16, 32, 64, 128"),
    (("model.geometry.mlp_network_config.output_activation=sigmoid",), "output must be linear"),
    (("+model.geometry.sdf_activation=softplus",), "SDF to be the network's output"),
])
def test_what_the_fused_sdf_network_cannot_run_is_a_config_error(overrides, message):
    cfg = load_config("configs/neus-demo.yaml", ["+model.geometry.mlp_network_config.backend=triton", *overrides])
    if message is None:
        geometry = models.make("volume-sdf", cfg.model.geometry)
        assert isinstance(geometry.network, TritonMLP) and not geometry.fused_gradient
        return
    with pytest.raises(ConfigError, match=message):
        models.make("volume-sdf", cfg.model.geometry)


def neus_pair(*overrides):
    """NeuS demo models with Triton rendering, the geometry network PyTorch or fused, the same state."""
    base = ["model.grid_resolution=16", "model.randomized=false", "model.rendering_backend=triton", *overrides]
    ref = models.make("neus", load_config("configs/neus-demo.yaml", base).model).to(DEVICE).train()
    ref.geometry.written_gradient = False  # autograd twice, as on a GPU (a CPU writes the gradient out)
    fast_cfg = load_config("configs/neus-demo.yaml", [*base, "+model.geometry.mlp_network_config.backend=triton"])
    fast = models.make("neus", fast_cfg.model).to(DEVICE).train()
    assert isinstance(fast.geometry.network, TritonSDFNetwork) and fast.geometry.fused_gradient
    fast.load_state_dict(ref.state_dict())
    for m in (ref, fast):
        m.update_step(0, 100)
    return ref, fast


@pytest.mark.parametrize("half", [False, True])
def test_a_neus_model_with_the_fused_geometry_network_renders_and_learns_the_same(half):
    """Through the config as a user sets it: the same colours, normals and SDF gradients, and the same gradients
    for every parameter (the hash table's through the fused input gradient included), with fewer operators.
    half: under fp16 autocast, as 16-mixed trains on a GPU."""
    ref, fast = neus_pair()
    g = torch.Generator(device=DEVICE).manual_seed(4)
    rays_o, rays_d = rays_from_orbit(48, g, spread=0.3)
    results = []
    for model in (ref, fast):
        model.zero_grad()
        with torch.autocast(DEVICE, dtype=torch.float16, enabled=half), HostSyncCounter(record_sites=False) as c:
            out = model(rays_o, rays_d)
            loss = (out["comp_rgb_full"].square().sum() + out["opacity"].sum() + out["comp_normal"].sum()
                    + (out["sdf_grad_samples"].norm(dim=-1) - 1).square().mean())
            loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, c))
    (out_ref, grads_ref, count_ref), (out_fast, grads_fast, count_fast) = results
    assert out_ref["num_samples"] == out_fast["num_samples"] > 100
    # under autocast the reference's products run in fp16 and the fused kernels' in fp32 (TF32 on a GPU)
    rtol, atol = (2e-3, 2e-3) if half else (1e-4, 1e-5)
    for key in ("comp_rgb_full", "opacity", "depth", "comp_normal", "sdf_grad_samples"):
        torch.testing.assert_close(out_fast[key], out_ref[key], rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")
    assert grads_fast.keys() == grads_ref.keys() and any("encoding" in n for n in grads_ref)
    for name, e in grads_ref.items():
        torch.testing.assert_close(grads_fast[name], e, rtol=10 * rtol, atol=atol * max(1.0, float(e.abs().max())),
                                   msg=lambda m: f"{name}: {m}")
    assert count_fast.total == count_ref.total  # no host sync added
    # operators of a render and its backward, measured 312 -> 291 (with the Triton grid and fused colour network
    # too, 200 -> 179): autograd's double backward through the network is two launches and a sum
    assert count_fast.operators <= count_ref.operators - 20, (count_fast.operators, count_ref.operators)
