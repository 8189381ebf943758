"""Small MLPs and the activations configs name.

``VanillaMLP`` is the PyTorch network (with NeuS sphere initialisation and
weight norm); ``FullyFusedMLP``/``CutlassMLP`` configs run on tiny-cuda-nn when
it is usable and fall back to the same architecture in PyTorch otherwise.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import backends
from utils.config import ConfigError, number_at_least, to_primitive

# the hidden activation of a VanillaMLP with sphere_init is Softplus(beta): one place for the layers, the written
# input gradient and the fused Triton SDF network
SPHERE_INIT_SOFTPLUS_BETA = 100.0


class _TruncExp(torch.autograd.Function):
    """exp(x) with the gradient clamped at x = 15 (instant-ngp's density activation)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    return _TruncExp.apply(x)


def is_identity(activation: Any) -> bool:
    """Whether a config's activation name (None, 'none', 'identity', any case) leaves its input as it is."""
    return activation is None or str(activation).lower() in ("none", "identity")


def get_activation(name: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """Activation by config name (case-insensitive); None/'none' is the identity."""
    if name is None:
        return lambda x: x
    key = str(name).lower()
    table = {
        "none": lambda x: x,
        "identity": lambda x: x,
        "relu": F.relu,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "exp": torch.exp,
        "exponential": torch.exp,
        "trunc_exp": trunc_exp,
        "softplus": F.softplus,
        "shifted_softplus": lambda x: F.softplus(x - 1.0),
        "scale_-11_01": lambda x: x * 0.5 + 0.5,
    }
    if key not in table:
        raise ConfigError(f"Unknown activation '{name}'; known: {', '.join(sorted(table))}.")
    return table[key]


def mlp_size(config: Any) -> tuple[int, int]:
    """(n_neurons >= 1, n_hidden_layers >= 0) of an ``mlp_network_config``, checked (0 neurons was a division by
    zero in the initialisation)."""
    return (number_at_least(config.get("n_neurons", 64), "mlp_network_config.n_neurons", 1),
            number_at_least(config.get("n_hidden_layers", 1), "mlp_network_config.n_hidden_layers", 0))


class VanillaMLP(nn.Module):
    """Fully connected network: (N, dim_in) -> (N, dim_out).

    ``n_hidden_layers`` hidden layers of ``n_neurons`` with ReLU (Softplus(SPHERE_INIT_SOFTPLUS_BETA = 100)
    when ``sphere_init``), then ``output_activation``.
    """

    def __init__(self, dim_in: int, dim_out: int, config: Dict[str, Any]):
        super().__init__()
        self.n_neurons, self.n_hidden_layers = mlp_size(config)
        self.sphere_init = bool(config.get("sphere_init", False))
        self.sphere_init_radius = float(config.get("sphere_init_radius", 0.5))
        self.inside_out = bool(config.get("inside_out", False))
        self.weight_norm = bool(config.get("weight_norm", False))
        dims = [dim_in] + [self.n_neurons] * self.n_hidden_layers + [dim_out]
        layers = []
        for i in range(len(dims) - 1):
            layers.append(self._make_linear(dims[i], dims[i + 1], is_first=i == 0, is_last=i == len(dims) - 2))
            if i < len(dims) - 2:
                layers.append(nn.Softplus(beta=SPHERE_INIT_SOFTPLUS_BETA) if self.sphere_init
                              else nn.ReLU(inplace=True))
        self.layers = nn.Sequential(*layers)
        self.output_activation = get_activation(config.get("output_activation", None))
        self.linear_output = is_identity(config.get("output_activation"))

    def value_and_first_input_gradient(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x (N, dim_in) -> (output (N, dim_out), d output[:, 0] / d x (N, dim_in)), with a linear output.

        The input gradient is written out layer by layer (the hidden activations' slopes times the weights),
        so a loss on it (the eikonal term) is differentiated once, instead of autograd differentiating its own
        backward graph: a 40k-point step of the NeuS demo's network takes 26-28 ms instead of 35-47 (2 cores)."""
        h, slopes = x.float(), []
        linears = [m for m in self.layers if isinstance(m, nn.Linear)]
        for linear in linears[:-1]:
            weight = linear.weight  # computed once: weight norm recomputes it at every access
            z = F.linear(h, weight, linear.bias)
            if self.sphere_init:  # Softplus(beta), whose slope is sigmoid(beta z)
                beta = SPHERE_INIT_SOFTPLUS_BETA
                h, slope = F.softplus(z, beta=beta), torch.sigmoid(beta * z)
            else:
                h, slope = F.relu(z), (z > 0).to(z.dtype)
            slopes.append((weight, slope))
        weight = linears[-1].weight
        out = F.linear(h, weight, linears[-1].bias)
        grad = weight[0].expand(x.shape[0], -1)
        for weight, slope in reversed(slopes):
            grad = (grad * slope) @ weight
        return out, grad

    def _make_linear(self, dim_in: int, dim_out: int, is_first: bool, is_last: bool) -> nn.Module:
        layer = nn.Linear(dim_in, dim_out, bias=True)
        if self.sphere_init:  # geometric initialisation (SAL / IDR): SDF of a sphere at start
            if is_last:
                sign = -1.0 if self.inside_out else 1.0
                nn.init.normal_(layer.weight, mean=sign * math.sqrt(math.pi) / math.sqrt(dim_in), std=1e-4)
                nn.init.constant_(layer.bias, -sign * self.sphere_init_radius)
            elif is_first:
                nn.init.constant_(layer.bias, 0.0)
                nn.init.constant_(layer.weight[:, 3:], 0.0)
                nn.init.normal_(layer.weight[:, :3], 0.0, math.sqrt(2) / math.sqrt(dim_out))
            else:
                nn.init.constant_(layer.bias, 0.0)
                nn.init.normal_(layer.weight, 0.0, math.sqrt(2) / math.sqrt(dim_out))
        if self.weight_norm:
            layer = nn.utils.parametrizations.weight_norm(layer)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_activation(self.layers(x.float()))


class TCNNMLP(nn.Module):
    """tiny-cuda-nn fully fused network with the same architecture; output in float32."""

    def __init__(self, dim_in: int, dim_out: int, config: Dict[str, Any]):
        super().__init__()
        import tinycudann as tcnn

        n_neurons, n_hidden_layers = mlp_size(config)
        tcnn_config = {
            "otype": config.get("otype", "FullyFusedMLP"),
            "activation": config.get("activation", "ReLU"),
            "output_activation": "None",
            "n_neurons": n_neurons,
            "n_hidden_layers": n_hidden_layers,
        }
        self.network = tcnn.Network(dim_in, dim_out, tcnn_config)
        self.output_activation = get_activation(config.get("output_activation", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_activation(self.network(x).float())


class TritonMLP(VanillaMLP):
    """``VanillaMLP`` (ReLU, no sphere init; weight norm allowed) run by the fused Triton kernels
    (``models.triton_mlp``), which take the weights weight norm makes and pass their gradients back to it.

    Same parameters under the same names, so checkpoints interchange with ``VanillaMLP``; output fp32.
    """

    def __init__(self, dim_in: int, dim_out: int, config: Dict[str, Any]):
        super().__init__(dim_in, dim_out, config)
        from models import triton_mlp

        self.shape = triton_mlp.MLPShape(dim_in, self.n_neurons, self.n_hidden_layers, dim_out)
        self.linears = [m for m in self.layers if isinstance(m, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from models.triton_mlp import fused_mlp

        params = [t for layer in self.linears for t in (layer.weight, layer.bias)]
        return self.output_activation(fused_mlp(x, self.shape, params))


class TritonSDFNetwork(VanillaMLP):
    """``VanillaMLP`` as an SDF network: ``value_and_input_gradient`` gives the output and the gradient of its
    channel 0 (the SDF) with respect to the input from one fused Triton function (``models.triton_sdf_network``),
    differentiable once, which is what analytic normals and the eikonal loss need. ``forward`` (SDF queries without
    gradients: marching cubes, occupancy updates) is VanillaMLP's. Same parameters under the same names."""

    def __init__(self, dim_in: int, dim_out: int, config: Dict[str, Any]):
        super().__init__(dim_in, dim_out, config)
        from models import triton_mlp, triton_sdf_network

        self.shape = triton_mlp.MLPShape(dim_in, self.n_neurons, self.n_hidden_layers, dim_out)
        self.beta = SPHERE_INIT_SOFTPLUS_BETA if self.sphere_init else triton_sdf_network.RELU
        self.linears = [m for m in self.layers if isinstance(m, nn.Linear)]

    def value_and_input_gradient(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x (N, dim_in) -> (output (N, dim_out), d output[:, 0] / d x (N, dim_in)), fp32."""
        from models.triton_sdf_network import sdf_network_with_gradient

        params = [t for layer in self.linears for t in (layer.weight, layer.bias)]  # weight norm applied here
        return sdf_network_with_gradient(x, self.shape, params, self.beta)


def get_sdf_network(dim_in: int, dim_out: int, config: Any, analytic_gradient: bool) -> nn.Module:
    """The network of an SDF field. With ``backend: triton`` and analytic gradients (whatever ``otype``) it is a
    ``TritonSDFNetwork``: the network fused with its input gradient. With analytic gradients a ``FullyFusedMLP``
    never goes to tiny-cuda-nn, whose networks cannot be differentiated twice. Everything else is ``get_mlp``'s."""
    config = dict(to_primitive(config))
    requested = str(config.get("backend", "auto")).lower()
    if analytic_gradient and requested in ("auto", "tcnn") and config.get("otype") in ("FullyFusedMLP", "CutlassMLP"):
        # tiny-cuda-nn's networks have no second derivative: the eikonal loss would fail at its first backward
        if requested == "tcnn":
            raise ConfigError("geometry mlp_network_config.backend: tcnn cannot train with grad_type: analytic: "
                              "tiny-cuda-nn's networks have no second derivative, which the eikonal loss needs; use "
                              "backend=auto (PyTorch), backend=triton (the fused SDF network) or grad_type: "
                              "finite_difference.")
        backends._announce("sdf network", "SDF network: PyTorch (analytic normals need the network's second "
                                          "derivative, which tiny-cuda-nn's networks do not have)")
        return VanillaMLP(dim_in, dim_out, config)
    if requested != "triton":
        return get_mlp(dim_in, dim_out, config)
    if not analytic_gradient:  # finite differences query the plain network: the fused MLP, if it can run it
        why = _triton_unsupported(dim_in, dim_out, config)
        if why:
            raise ConfigError(f"geometry mlp_network_config.backend: triton with grad_type: finite_difference runs "
                              f"the fused MLP, which cannot run this network: {why}; use grad_type: analytic (the "
                              "fused SDF network) or backend=auto.")
        return get_mlp(dim_in, dim_out, config)
    from models.triton_mlp import unsupported

    why = unsupported(dim_in, *mlp_size(config), dim_out)
    if not is_identity(config.get("output_activation")):
        why = f"its output must be linear (got output_activation: {config.get('output_activation')})"
    if why:
        raise ConfigError(f"geometry mlp_network_config.backend: triton cannot run this network: {why}; use "
                          "backend=auto or torch.")
    backends.resolve("network", "triton", ("tcnn", "triton"), auto="tcnn")  # says why when Triton cannot run
    return TritonSDFNetwork(dim_in, dim_out, config)


def _triton_unsupported(dim_in: int, dim_out: int, config: Dict[str, Any]) -> str:
    """Why the fused Triton MLP cannot run this network ('' when it can)."""
    from models.triton_mlp import unsupported

    if config.get("sphere_init"):
        return "it has ReLU hidden layers only (sphere_init uses Softplus(100))"
    if str(config.get("activation", "ReLU")).lower() != "relu":
        return f"it has ReLU hidden layers only (got activation: {config.get('activation')})"
    return unsupported(dim_in, *mlp_size(config), dim_out)


def get_mlp(dim_in: int, dim_out: int, config: Any) -> nn.Module:
    """Build the network a config names (``otype``).

    ``VanillaMLP``: PyTorch. ``FullyFusedMLP``/``CutlassMLP``: tiny-cuda-nn when usable, else ``VanillaMLP``.
    ``backend: triton``, whatever the ``otype``, runs the fused Triton kernels instead (asked for by name: ``auto``
    does not pick them until a GPU benchmark shows they beat cuBLAS at these sizes), and is a config error for a
    network they cannot run rather than a silent fallback.
    """
    config = dict(to_primitive(config))
    otype = config.get("otype", "VanillaMLP")
    if otype not in ("VanillaMLP", "FullyFusedMLP", "CutlassMLP"):
        raise ConfigError(f"Unknown network otype '{otype}'; known: VanillaMLP, FullyFusedMLP, CutlassMLP.")
    requested = str(config.get("backend", "auto")).lower()
    known = ("auto", "torch", "triton") if otype == "VanillaMLP" else ("auto", "torch", "tcnn", "triton")
    if requested not in known:
        raise ConfigError(f"mlp_network_config.backend: {requested} is not a backend of otype {otype}; choose "
                          f"{', '.join(known)}" + (" (tiny-cuda-nn runs otype: FullyFusedMLP)." if otype ==
                                                   "VanillaMLP" else "."))
    if requested == "triton":
        why = _triton_unsupported(dim_in, dim_out, config)
        if why:
            raise ConfigError(f"mlp_network_config.backend: triton cannot run this network: {why}; use "
                              "backend=auto or torch.")
        backends.resolve("network", "triton", ("tcnn", "triton"), auto="tcnn")  # says why when Triton cannot run
        return TritonMLP(dim_in, dim_out, config)
    if otype == "VanillaMLP":
        return VanillaMLP(dim_in, dim_out, config)
    needs_torch = config.get("sphere_init") or config.get("weight_norm")  # tiny-cuda-nn has neither
    chosen = backends.resolve("network", "torch" if needs_torch else requested, ("tcnn", "triton"), auto="tcnn")
    return TCNNMLP(dim_in, dim_out, config) if chosen == "tcnn" else VanillaMLP(dim_in, dim_out, config)
