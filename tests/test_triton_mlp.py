"""The fused Triton MLP (``models.triton_mlp``) against ``VanillaMLP``: outputs and every gradient.

Without a GPU the kernels run under Triton's interpreter in fp32 (conftest.py
sets TRITON_INTERPRET=1), held to fp32 rounding; on a GPU they run TF32
tensor-core products, held to TF32's 10-bit mantissa, at full size too.
"""
import pytest
import torch

from helpers import import_triton_or_skip, rays_from_orbit

triton = import_triton_or_skip()

from models.networks import TritonMLP, VanillaMLP, get_mlp  # noqa: E402
from models.triton_mlp import MLPShape, fused_mlp  # noqa: E402
from utils.config import ConfigError  # noqa: E402
from utils.host_sync import HostSyncCounter  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = 2e-2 if DEVICE == "cuda" else 1e-4  # TF32 products on a GPU, fp32 under the interpreter


def network_config(width=64, n_hidden=2, **extra):
    return {"otype": "FullyFusedMLP", "backend": "triton", "activation": "ReLU", "output_activation": "none",
            "n_neurons": width, "n_hidden_layers": n_hidden, **extra}


def reference_and_fused(d_in, width, n_hidden, d_out):
    """A VanillaMLP with random weights and biases, and the Triton network with the same state."""
    torch.manual_seed(1)
    ref = VanillaMLP(d_in, d_out, network_config(width, n_hidden)).to(DEVICE)
    with torch.no_grad():
        for p in ref.parameters():  # biases of both signs, so some ReLUs are off and some on in every layer
            p.normal_(0.0, 0.5 / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.3)
    fused = get_mlp(d_in, d_out, network_config(width, n_hidden)).to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def outputs_and_gradients(net, x, grad_out):
    x = x.detach().requires_grad_(True)
    net.zero_grad()
    out = net(x)
    out.backward(grad_out)
    return out.detach(), x.grad, {name: p.grad for name, p in net.named_parameters()}


def assert_close(got, expected, what):
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=RTOL * 0.1 * max(scale, 1e-6),
                               msg=lambda m: f"{what}: {m}")


# rows: several 16-row backward blocks per program (4 programs under the interpreter) and a partial last block;
# one row; widths 16 to 128; 1 to 3 hidden layers; inputs and outputs not multiples of 16
SHAPES = [(32, 64, 2, 3, 200), (32, 64, 1, 16, 130), (5, 16, 3, 1, 70), (20, 128, 1, 3, 1)]


@pytest.mark.parametrize("d_in,width,n_hidden,d_out,n", SHAPES)
def test_fused_mlp_gives_the_reference_outputs_and_gradients(d_in, width, n_hidden, d_out, n):
    ref, fused = reference_and_fused(d_in, width, n_hidden, d_out)
    g = torch.Generator(device=DEVICE).manual_seed(n)
    x = torch.randn(n, d_in, generator=g, device=DEVICE)
    grad_out = torch.randn(n, d_out, generator=g, device=DEVICE)
    out_ref, gx_ref, grads_ref = outputs_and_gradients(ref, x, grad_out)
    out, gx, grads = outputs_and_gradients(fused, x, grad_out)
    assert out.dtype == torch.float32 and out.shape == (n, d_out)
    assert_close(out, out_ref, "output")
    assert_close(gx, gx_ref, "input gradient")
    assert grads.keys() == grads_ref.keys()
    for name, expected in grads_ref.items():
        assert_close(grads[name], expected, name)


@pytest.mark.skipif(DEVICE != "cuda", reason="full size needs a GPU (the interpreter takes minutes)")
def test_fused_mlp_at_full_size_on_the_gpu():
    ref, fused = reference_and_fused(32, 64, 2, 3)
    x, grad_out = torch.randn(1 << 18, 32, device=DEVICE), torch.randn(1 << 18, 3, device=DEVICE)
    out_ref, gx_ref, grads_ref = outputs_and_gradients(ref, x, grad_out)
    out, gx, grads = outputs_and_gradients(fused, x, grad_out)
    assert_close(out, out_ref, "output")
    assert_close(gx, gx_ref, "input gradient")
    for name, expected in grads_ref.items():
        assert_close(grads[name], expected, name)


def test_fp16_inputs_as_under_autocast():
    """Features arrive in fp16 under 16-mixed: the kernels read them as they are, compute in fp32, and give the
    input's gradient back in fp16."""
    ref, fused = reference_and_fused(32, 64, 2, 3)
    x = torch.randn(90, 32, device=DEVICE).half()
    grad_out = torch.randn(90, 3, device=DEVICE)
    out_ref, gx_ref, grads_ref = outputs_and_gradients(ref, x.float(), grad_out)
    out, gx, grads = outputs_and_gradients(fused, x, grad_out)
    assert gx.dtype == torch.float16
    assert_close(out, out_ref, "output")
    torch.testing.assert_close(gx.float(), gx_ref, rtol=2e-3, atol=2e-3 * float(gx_ref.abs().max()))
    for name, expected in grads_ref.items():
        assert_close(grads[name], expected, name)


def test_no_rows():
    _, fused = reference_and_fused(32, 64, 2, 3)
    out, gx, grads = outputs_and_gradients(fused, torch.zeros(0, 32, device=DEVICE), torch.zeros(0, 3, device=DEVICE))
    assert out.shape == (0, 3) and gx.shape == (0, 32)
    assert all(float(g.abs().max()) == 0.0 for g in grads.values())


def test_the_network_interchanges_with_vanilla_mlp_in_two_launches_and_a_few_operators():
    """backend: triton builds a TritonMLP with VanillaMLP's parameter names (checkpoints load either way), the
    output activation applied after; forward and backward dispatch a handful of operators (one launch forward,
    one per layer backward) where VanillaMLP dispatches one or more per layer and pass, and read nothing back."""
    ref, fused = reference_and_fused(32, 64, 2, 3)
    assert isinstance(fused, TritonMLP) and list(fused.state_dict()) == list(ref.state_dict())
    x, grad_out = torch.randn(50, 32, device=DEVICE), torch.randn(50, 3, device=DEVICE)
    counts = []
    for net in (ref, fused):
        with HostSyncCounter(record_sites=False) as counter:
            outputs_and_gradients(net, x, grad_out)
        counts.append(counter)
    assert counts[1].total == 0
    # measured 16 -> 9: forward, the packed parameters, the output and a launch; backward, two buffers, 3 launches
    # and one sum (each parameter's gradient is a view of it)
    assert counts[1].operators <= counts[0].operators - 6, (counts[1].operators, counts[0].operators)
    sigmoid = get_mlp(32, 3, network_config(output_activation="sigmoid")).to(DEVICE)
    sigmoid.load_state_dict(ref.state_dict())
    assert_close(sigmoid(x), torch.sigmoid(ref(x)), "sigmoid output")


def test_a_vanilla_mlp_with_weight_norm_asked_for_triton_runs_the_kernels_with_its_gradients():
    """``backend: triton`` is honoured whatever the otype (it used to be ignored for VanillaMLP, silently): the
    kernels take the weights weight norm makes, and autograd carries their gradients back to its g and v."""
    config = network_config(width=32, n_hidden=2, otype="VanillaMLP", weight_norm=True)
    torch.manual_seed(3)
    ref = VanillaMLP(20, 4, {**config, "backend": "torch"}).to(DEVICE)
    with torch.no_grad():
        for name, p in ref.named_parameters():  # g away from ||v||, so the normalisation matters
            p.normal_(0.0, 0.4 / p.shape[-1] ** 0.5 if p.dim() == 2 and "original1" in name else 0.3)
    fused = get_mlp(20, 4, config).to(DEVICE)
    assert isinstance(fused, TritonMLP)
    fused.load_state_dict(ref.state_dict())
    g = torch.Generator(device=DEVICE).manual_seed(7)
    x, grad_out = torch.randn(70, 20, generator=g, device=DEVICE), torch.randn(70, 4, generator=g, device=DEVICE)
    out_ref, gx_ref, grads_ref = outputs_and_gradients(ref, x, grad_out)
    out, gx, grads = outputs_and_gradients(fused, x, grad_out)
    assert_close(out, out_ref, "output")
    assert_close(gx, gx_ref, "input gradient")
    assert any("original0" in n for n in grads_ref) and grads.keys() == grads_ref.keys()
    for name, expected in grads_ref.items():
        assert float(expected.abs().max()) > 0, name
        assert_close(grads[name], expected, name)


@pytest.mark.parametrize("config,message", [
    (network_config(width=48), "n_neurons must be one of 16, 32, 64, 128"),
    (network_config(activation="Tanh"), "ReLU hidden layers only"),
    (network_config(otype="VanillaMLP", sphere_init=True), r"ReLU hidden layers only \(sphere_init"),
    (network_config(otype="FullyFusedMLP", sphere_init=True), r"ReLU hidden layers only \(sphere_init"),
    (network_config(otype="VanillaMLP", backend="tritn"), "tritn is not a backend of otype VanillaMLP"),
    (network_config(otype="VanillaMLP", backend="tcnn"), "tiny-cuda-nn runs otype: FullyFusedMLP"),
    (network_config(otype="FullyFusedMLP", backend="tcn", weight_norm=True), "tcn is not a backend"),
])
def test_a_network_the_kernels_cannot_run_is_a_config_error(config, message):
    """Also a misspelt backend: no otype ignores it silently."""
    with pytest.raises(ConfigError, match=message):
        get_mlp(32, 3, config)


def test_fused_mlp_takes_the_parameters_in_layer_order():
    """fused_mlp with hand-set weights: 2 -> 16 (ReLU) -> 1, where only a negative bias switches a unit off."""
    shape = MLPShape(d_in=2, width=16, n_hidden=1, d_out=1)
    w0 = torch.zeros(16, 2, device=DEVICE)
    w0[0, 0], w0[1, 1] = 1.0, 1.0
    b0 = torch.zeros(16, device=DEVICE)
    b0[1] = -5.0  # unit 1 is on only where x1 > 5
    w1 = torch.zeros(1, 16, device=DEVICE)
    w1[0, 0], w1[0, 1] = 2.0, 3.0
    b1 = torch.full((1,), 0.5, device=DEVICE)
    x = torch.tensor([[1.0, 1.0], [-1.0, 7.0], [2.0, 6.0]], device=DEVICE)
    out = fused_mlp(x, shape, [w0, b0, w1, b1])
    expected = torch.tensor([[2.5], [6.5], [7.5]], device=DEVICE)  # 2 relu(x0) + 3 relu(x1 - 5) + 0.5
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=1e-3)


def test_a_nerf_with_fused_networks_renders_and_learns_as_with_vanilla_ones():
    """Both of NeRF's networks as FullyFusedMLP with backend: triton (through the config, as a user sets them),
    loaded from a PyTorch-network model: the same colours, depths and gradients for every parameter."""
    import models
    from utils.config import load_config

    overrides = ["model.grid_resolution=16", "model.randomized=false"]
    for net in ("geometry", "texture"):
        overrides += [f"model.{net}.mlp_network_config.otype=FullyFusedMLP"]
    ref = models.make("nerf", load_config("configs/nerf-demo.yaml", overrides).model).to(DEVICE).train()
    for net in ("geometry", "texture"):
        overrides += [f"+model.{net}.mlp_network_config.backend=triton"]
    fused = models.make("nerf", load_config("configs/nerf-demo.yaml", overrides).model).to(DEVICE).train()
    assert isinstance(fused.geometry.network, TritonMLP) and isinstance(fused.texture.network, TritonMLP)
    fused.load_state_dict(ref.state_dict())
    g = torch.Generator(device=DEVICE).manual_seed(4)
    rays_o, rays_d = rays_from_orbit(16, g, spread=0.3)
    results = []
    for model in (ref, fused):
        out = model(rays_o, rays_d)
        (out["comp_rgb"].square().sum() + out["depth"].sum() + out["weights"].square().sum()).backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (out_ref, grads_ref), (out_fused, grads_fused) = results
    assert out_ref["num_samples"] == out_fused["num_samples"] > 100
    for key in ("comp_rgb", "opacity", "depth"):
        assert_close(out_fused[key], out_ref[key], key)
    assert grads_fused.keys() == grads_ref.keys() and any("texture.network" in n for n in grads_ref)
    for name, expected in grads_ref.items():
        assert_close(grads_fused[name], expected, name)
