"""NeRF model plumbing: step updates reach the occupancy grid, rendering shapes, backend choice on CPU."""
import torch

import models
from models.base import update_module_step
from utils.config import load_config


def small_model():
    cfg = load_config("configs/nerf-demo.yaml", ["model.grid_resolution=16", "model.grid_warmup_steps=1"])
    return models.make(cfg.model.name, cfg.model)


def test_step_updates_reach_the_occupancy_grid():
    model = small_model()
    assert float(model.occupancy_grid.occs.abs().sum()) == 0
    update_module_step(model, 0, 0)
    assert float(model.occupancy_grid.occs.abs().sum()) > 0


def test_render_shapes_and_background():
    model = small_model().eval()
    model.background_color = torch.tensor([0.0, 1.0, 0.0])
    rays_o = torch.tensor([[0.0, 0.0, 3.0], [5.0, 5.0, 5.0]])
    rays_d = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, 1.0]])  # the second misses the scene box
    out = model(rays_o, rays_d)
    assert out["comp_rgb"].shape == (2, 3) and out["opacity"].shape == (2, 1) and out["depth"].shape == (2, 1)
    assert float(out["opacity"][1]) == 0 and torch.equal(out["comp_rgb"][1], torch.tensor([0.0, 1.0, 0.0]))
    assert model.backend == "torch"  # no CUDA here: the PyTorch renderer
