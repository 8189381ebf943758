"""Geometry fields: position -> (density or SDF, feature)."""
from __future__ import annotations

from typing import Any, Tuple

import torch
import torch.nn as nn

import models
from models.encodings import get_encoding
from models.networks import get_activation, get_mlp
from models.rendering import contract_to_unisphere


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
        self.n_output_dims = int(config.feature_dim)
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
