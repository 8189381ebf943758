"""Radiance (colour) networks."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

import models
from models.encodings import get_encoding
from models.networks import get_activation, get_mlp


@models.register("volume-radiance")
class VolumeRadiance(nn.Module):
    """Colour from a geometry feature and the view direction.

    forward(features (N, C), dirs (N, 3) unit) -> (N, 3). Directions go to the
    encoding as (d + 1) / 2, tcnn's input domain.
    """

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.n_dir_dims = int(config.get("n_dir_dims", 3))
        self.encoding = get_encoding(self.n_dir_dims, config.dir_encoding_config)
        n_input = int(config.input_feature_dim) + self.encoding.n_output_dims
        self.network = get_mlp(n_input, 3, config.mlp_network_config)
        self.color_activation = get_activation(config.get("color_activation", None))

    def forward(self, features: torch.Tensor, dirs: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        dirs_embd = self.encoding((dirs.reshape(-1, self.n_dir_dims) + 1.0) / 2.0)
        inputs = torch.cat([features.reshape(-1, features.shape[-1]), dirs_embd, *extra], dim=-1)
        return self.color_activation(self.network(inputs).float())
