"""Geometry fields: position -> (density or SDF, feature)."""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn

import models
from models.encodings import get_encoding
from models.networks import VanillaMLP, get_activation, get_mlp, get_sdf_network, is_identity
from models.rendering import contract_to_unisphere
from utils.config import ConfigError, number_at_least


@models.register("volume-density")
class VolumeDensity(nn.Module):
    """Density field on a hash grid (instant-ngp / instant-nsr-pl ``volume-density``).

    forward(points (N, 3) world) -> (density (N,), feature (N, feature_dim)).
    The first network output, plus ``density_bias`` and through
    ``density_activation``, is the density; the feature is the whole output.
    Points are mapped to [0, 1]^3 by ``contract_to_unisphere`` (bounded, or
    unbounded when the model learns a background).
    """

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.radius = float(config.radius)
        self.unbounded = False  # set by the model
        self.n_output_dims = number_at_least(config.feature_dim, "model.geometry.feature_dim", 1)
        self.encoding = get_encoding(3, config.xyz_encoding_config)
        self.network = get_mlp(self.encoding.n_output_dims, self.n_output_dims, config.mlp_network_config)
        self.density_activation = get_activation(config.get("density_activation", "trunc_exp"))
        self.density_bias = float(config.get("density_bias", 0.0))
        self.feature_activation = get_activation(config.get("feature_activation", None))

    def forward(self, points: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = contract_to_unisphere(points.reshape(-1, 3), self.radius, self.unbounded)
        out = self.network(self.encoding(x)).float()
        density = self.density_activation(out[:, 0] + self.density_bias)
        return density, self.feature_activation(out)

    def density(self, points: torch.Tensor) -> torch.Tensor:
        return self.forward(points)[0]


def _cpu_autocast() -> bool:
    """Whether CPU autocast is on (launch.py trains fp32 on a CPU; tests run fp16 there as a GPU would)."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled()


@models.register("volume-sdf")
class VolumeSDF(nn.Module):
    """Signed distance field on a hash grid (instant-nsr-pl / NeuS ``volume-sdf``).

    forward(points (N, 3), with_grad, with_laplace) -> dict with ``sdf`` (N,),
    ``feature`` (N, feature_dim) and, when asked, ``grad`` (N, 3) (``analytic``:
    autograd, differentiable again for the eikonal loss; ``finite_difference``:
    central differences of step ``eps``) and ``laplace`` (N,) (finite differences
    only). ``finite_difference_eps: progressive`` sets eps to the cell size of the
    finest active level of a ProgressiveBandHashGrid, as Neuralangelo.
    """

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.radius = float(config.radius)
        self.unbounded = False
        self.n_output_dims = number_at_least(config.feature_dim, "model.geometry.feature_dim", 1)
        self.encoding = get_encoding(3, config.xyz_encoding_config)
        self.grad_type = str(config.get("grad_type", "analytic"))
        if self.grad_type not in ("analytic", "finite_difference"):
            raise ConfigError(f"model.geometry.grad_type must be analytic or finite_difference, not '{self.grad_type}'.")
        self.network = get_sdf_network(self.encoding.n_output_dims, self.n_output_dims, config.mlp_network_config,
                                       analytic_gradient=self.grad_type == "analytic")
        # the network gives its own input gradient (fused kernels): the SDF must be its channel 0 as it is
        self.fused_gradient = hasattr(self.network, "value_and_input_gradient")
        if self.fused_gradient and not is_identity(config.get("sdf_activation")):
            raise ConfigError("geometry mlp_network_config.backend: triton needs the SDF to be the network's output "
                              f"(got sdf_activation: {config.get('sdf_activation')}); use backend=auto or torch.")
        # on a CPU in fp32 a VanillaMLP writes out its own input gradient, when the SDF is its channel 0 as it is:
        # the eikonal loss then differentiates that once instead of autograd differentiating its backward
        self.written_gradient = (isinstance(self.network, VanillaMLP) and self.network.linear_output
                                 and is_identity(config.get("sdf_activation")))
        eps = config.get("finite_difference_eps", 1e-3)
        self.progressive_eps = eps == "progressive"
        if self.progressive_eps and not hasattr(self.encoding.encoding, "current_level"):
            raise ConfigError("finite_difference_eps: progressive needs xyz_encoding_config.otype: ProgressiveBandHashGrid.")
        self.fixed_eps = None if self.progressive_eps else float(eps)
        self.sdf_activation = get_activation(config.get("sdf_activation", None))
        self.sdf_bias = float(config.get("sdf_bias", 0.0))
        self.feature_activation = get_activation(config.get("feature_activation", None))

    @property
    def finite_difference_eps(self) -> float:
        """Step of the central differences, in world units."""
        if not self.progressive_eps:
            return self.fixed_eps
        grid = self.encoding.encoding
        level = max(grid.active_levels, 1)
        cell = 1.0 / (grid.base_resolution * grid.per_level_scale ** (level - 1))  # in [0, 1] input units
        return 2.0 * self.radius * cell

    def _network(self, points: torch.Tensor) -> torch.Tensor:
        x = contract_to_unisphere(points, self.radius, self.unbounded)
        return self.network(self.encoding(x)).float()

    def _sdf_of(self, out: torch.Tensor) -> torch.Tensor:
        """Network output (N, C) -> (N,) signed distance (channel 0, bias, activation)."""
        return self.sdf_activation(out[:, 0] + self.sdf_bias)

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        """(N, 3) -> (N,) signed distance only (no gradients): for marching cubes and grid updates."""
        return self._sdf_of(self._network(points.reshape(-1, 3)))

    def forward(self, points: torch.Tensor, with_grad: bool = True, with_laplace: bool = False) -> Dict[str, torch.Tensor]:
        points = points.reshape(-1, 3)
        analytic = with_grad and self.grad_type == "analytic"
        with torch.enable_grad() if analytic else contextlib.nullcontext():
            if analytic and not points.requires_grad:
                points = points.detach().requires_grad_(True)
            written = self.written_gradient and points.device.type == "cpu" and not _cpu_autocast()
            # the network's own input gradient (fused kernels, or written out on a CPU), back through the encoding
            if analytic and (self.fused_gradient or written):
                feature = self.encoding(contract_to_unisphere(points, self.radius, self.unbounded))
                out, feature_grad = (self.network.value_and_input_gradient(feature) if self.fused_gradient
                                     else self.network.value_and_first_input_gradient(feature))
                sdf = self._sdf_of(out)
                (grad,) = torch.autograd.grad(feature, points, feature_grad.to(feature.dtype), create_graph=True)
            else:
                out = self._network(points)
                sdf = self._sdf_of(out)
                if analytic:
                    (grad,) = torch.autograd.grad(sdf, points, torch.ones_like(sdf), create_graph=True)
            result = {"sdf": sdf, "feature": self.feature_activation(out)}
            if analytic:
                result["grad"] = grad
            elif with_grad:
                eps = self.finite_difference_eps
                offsets = torch.eye(3, device=points.device, dtype=points.dtype) * eps
                offsets = torch.stack([offsets, -offsets], dim=1).reshape(6, 3)  # +x, -x, +y, -y, +z, -z
                shifted = (points[:, None, :] + offsets).reshape(-1, 3)
                if not self.unbounded:  # stay inside the grid's box, as instant-nsr-pl does
                    shifted = shifted.clamp(-self.radius, self.radius)
                around = self._sdf_of(self._network(shifted)).view(-1, 3, 2)
                result["grad"] = (around[..., 0] - around[..., 1]) / (2 * eps)
                if with_laplace:
                    result["laplace"] = (around.sum(-1) - 2 * sdf[:, None]).sum(-1) / eps ** 2
        return result

