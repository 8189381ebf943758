"""Shared test measurements and set-up."""
import torch


def max_ray_angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest angle in degrees between corresponding (N, 3) directions (atan2 form: exact near zero)."""
    a, b = a.double(), b.double()
    return float(torch.rad2deg(torch.atan2(torch.cross(a, b, dim=-1).norm(dim=-1), (a * b).sum(-1))).max())


def rays_from_orbit(n: int, generator: torch.Generator, spread: float, radius: float = 2.5):
    """(origins (n, 3), unit directions (n, 3)): from random points on a sphere of ``radius`` towards random points
    around the centre (normal, standard deviation ``spread``), drawn from ``generator`` on its device."""
    device = generator.device
    origins = torch.nn.functional.normalize(torch.randn(n, 3, generator=generator, device=device), dim=-1) * radius
    targets = torch.randn(n, 3, generator=generator, device=device) * spread
    return origins, torch.nn.functional.normalize(targets - origins, dim=-1)


def training_system(config: str, save_dir, *overrides):
    """(system, datamodule) ready for ``Trainer.fit``: a config plus dotlist overrides, outputs under save_dir."""
    from omegaconf import open_dict

    import datasets
    import systems
    from utils.config import load_config

    cfg = load_config(config, list(overrides))
    with open_dict(cfg):
        cfg.save_dir = str(save_dir)
    dm = datasets.make(cfg.dataset.name, cfg.dataset)
    dm.setup("fit")
    return systems.make(cfg.system.name, cfg, mode="train"), dm
