"""NeRF model plumbing: step updates reach the occupancy grid, rendering shapes, backend choice on CPU."""
import re

import pytest
import torch

import models
from helpers import needs_fused_cpu_adam
from models.base import update_module_step
from utils.config import load_config


def small_model():
    cfg = load_config("configs/nerf-demo.yaml", ["model.grid_resolution=16", "model.grid_warmup_steps=1"])
    return models.make(cfg.model.name, cfg.model)


@pytest.mark.parametrize("overrides, message", [
    (["model.learned_background=true", "+model.far_plane=0.1"], "model.far_plane must be a number > 0.2, not 0.1"),
    (["+model.near_plane=-1"], "model.near_plane must be a number >= 0, not -1"),
    (["model.learned_background=true", "+model.render_step_size=0"], "model.render_step_size must be a number > 0"),
    (["model.grid_warmup_steps=-5"], "model.grid_warmup_steps must be a whole number >= 0, not -5"),
])
def test_marching_options_that_cannot_work_are_refused_naming_the_key(overrides, message):
    from utils.config import ConfigError

    cfg = load_config("configs/nerf-demo.yaml", overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        models.make(cfg.model.name, cfg.model)


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


def test_learned_background_marches_beyond_the_box():
    cfg = load_config("configs/nerf-demo.yaml", ["model.learned_background=true", "model.grid_resolution=16"])
    model = models.make(cfg.model.name, cfg.model).eval()
    assert model.occupancy_grid.levels == 4 and model.geometry.unbounded
    rays_o = torch.tensor([[0.0, 0.0, 0.5]])
    rays_d = torch.tensor([[1.0, 0.0, 0.0]])
    idx, ts, te = model.occupancy_grid.march(rays_o, rays_d, model.near_plane, model.far_plane,
                                             model.render_step_size, model.cone_angle)
    assert float(te.max()) > 7.0  # out to the outermost level (radius 1 * 2^3)
    out = model(rays_o, rays_d)
    assert torch.isfinite(out["comp_rgb"]).all()


def test_optimizer_groups_and_sequential_scheduler():
    from omegaconf import OmegaConf

    from systems.optim import make_optimizer, make_scheduler
    model = small_model()
    opt_cfg = OmegaConf.create({"name": "Adam", "args": {"lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-15},
                                "params": {"geometry": {"lr": 0.02}, "texture": {"lr": 0.005}}})
    opt = make_optimizer(opt_cfg, model)
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.005]
    sched_cfg = OmegaConf.create({"name": "SequentialLR", "interval": "step", "milestones": [10], "schedulers": [
        {"name": "LinearLR", "args": {"start_factor": 0.01, "end_factor": 1.0, "total_iters": 10}},
        {"name": "ExponentialLR", "args": {"gamma": 0.5}}]})
    sched = make_scheduler(sched_cfg, opt)
    assert sched["interval"] == "step"
    for _ in range(12):
        opt.step()
        sched["scheduler"].step()
    assert abs(opt.param_groups[0]["lr"] - 0.02 * 0.25) < 1e-9


def test_a_misspelt_optimizer_or_scheduler_name_gets_the_closest_torch_class():
    from omegaconf import OmegaConf

    from systems.optim import make_optimizer, make_scheduler
    from utils.config import ConfigError

    with pytest.raises(ConfigError, match=r"^Unknown optimizer 'adamw' .*class name \(did you mean AdamW\?\)\.$"):
        make_optimizer(OmegaConf.create({"name": "adamw", "args": {"lr": 0.01}}), small_model())
    opt = make_optimizer(OmegaConf.create({"name": "Adam", "args": {"lr": 0.01}}), small_model())
    with pytest.raises(ConfigError, match=r"\(did you mean ExponentialLR\?\)\.$"):
        make_scheduler(OmegaConf.create({"name": "ExponentialLr", "args": {"gamma": 0.9}}), opt)
    with pytest.raises(ConfigError, match=r"use a torch.optim.lr_scheduler class name\.$"):
        make_scheduler(OmegaConf.create({"name": "Sideways", "args": {}}), opt)


def test_a_misspelt_group_option_is_an_error_not_the_default_rate():
    """torch stores any key of a parameter group, so ``lrr: 0.02`` would train geometry at args.lr."""
    from omegaconf import OmegaConf

    from systems.optim import make_optimizer
    from utils.config import ConfigError

    cfg = OmegaConf.create({"name": "AdamW", "args": {"lr": 0.01}, "params": {"geometry": {"lrr": 0.02}}})
    with pytest.raises(ConfigError, match="params.geometry.lrr is not an option of AdamW; did you mean lr"):
        make_optimizer(cfg, small_model())
    cfg.params.geometry = {"lr": 0.02, "weight_decay": 0.1}  # any option the optimiser takes is fine
    assert make_optimizer(cfg, small_model()).param_groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize("args, message", [
    ({"lr": -1}, "torch.optim.Adam refuses the config's system.optimizer: Invalid learning rate: -1."),
    ({"lr": 0.01, "betas": [0.9, 1.5]}, "Invalid beta parameter at index 1: 1.5."),
    ({"lr": 0.01, "foo": 1}, "unexpected keyword argument 'foo'."),
])
def test_values_torch_refuses_are_one_sentence_fused_or_not(args, message):
    """The fused attempt used to take torch's ValueError for 'no fused kernel here' and retry, then fail with a
    traceback."""
    from omegaconf import OmegaConf

    from systems.optim import make_optimizer
    from utils.config import ConfigError

    for fused_default in (True, False):
        with pytest.raises(ConfigError, match=re.escape(message)):
            make_optimizer(OmegaConf.create({"name": "Adam", "args": args}), small_model(), fused_default)


@needs_fused_cpu_adam
def test_adam_is_fused_unless_the_config_says_otherwise_and_steps_like_the_reference():
    """The fused optimiser (one kernel per group on a GPU) is chosen by default and takes the same steps as
    torch's for-loop implementation; ``fused``/``foreach`` in the config are the user's choice and kept."""
    from omegaconf import OmegaConf

    from systems.optim import make_optimizer

    def trained(extra_args):
        torch.manual_seed(0)
        model = small_model()
        cfg = OmegaConf.create({"name": "AdamW", "args": {"lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-15,
                                                          **extra_args}})
        opt = make_optimizer(cfg, model)
        initial = torch.cat([p.detach().flatten() for p in model.parameters()])
        rays_o, rays_d = torch.zeros(64, 3), torch.nn.functional.normalize(torch.randn(64, 3), dim=-1)
        for _ in range(5):
            opt.zero_grad()
            model(rays_o, rays_d)["comp_rgb"].square().mean().backward()
            opt.step()
        return opt, torch.cat([p.detach().flatten() for p in model.parameters()]), initial

    fused, fused_params, initial = trained({})
    assert fused.defaults["fused"] is True and all(g["fused"] is True for g in fused.param_groups)  # groups decide
    reference, reference_params, _ = trained({"foreach": False})
    assert not reference.defaults["fused"] and reference.defaults["foreach"] is False
    assert (reference_params - initial).abs().max() > 0.01  # five steps of lr 0.01 moved the weights
    torch.testing.assert_close(fused_params, reference_params, rtol=1e-4, atol=1e-5)
