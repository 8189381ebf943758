"""Shared test measurements."""
import torch


def max_ray_angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest angle in degrees between corresponding (N, 3) directions (atan2 form: exact near zero)."""
    a, b = a.double(), b.double()
    return float(torch.rad2deg(torch.atan2(torch.cross(a, b, dim=-1).norm(dim=-1), (a * b).sum(-1))).max())
