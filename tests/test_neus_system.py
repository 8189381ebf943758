"""NeuS system set-up: loss weights it cannot honour are refused or reported, optional background parts."""
import logging

import pytest

import systems
from systems.optim import make_optimizer
from utils.config import ConfigError, load_config


def neus_system(*overrides):
    cfg = load_config("configs/neus-demo.yaml", ["model.grid_resolution=16", *overrides])
    return systems.make(cfg.system.name, cfg, mode="train")


def test_curvature_needs_finite_difference_normals():
    with pytest.raises(ConfigError, match="lambda_curvature needs model.geometry.grad_type=finite_difference"):
        neus_system("+system.loss.lambda_curvature=[0,0.0,1.e-4,100]")
    neus_system("+system.loss.lambda_curvature=1.e-4", "model.geometry.grad_type=finite_difference")


def test_unknown_loss_weights_are_reported_not_silently_dropped(caplog):
    logger = logging.getLogger("nsr")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="nsr"):
            neus_system("+system.loss.lambda_entropy=0.01", "+system.loss.lambda_adaptive=0.0")
    finally:
        logger.removeHandler(caplog.handler)
    assert "system.loss.lambda_entropy = 0.01 is not a loss of NeuSSystem" in caplog.text
    assert "lambda_adaptive" not in caplog.text  # a zero weight is no surprise


def test_background_parts_are_optimised_only_when_the_background_is_learned():
    for learned, expected in ((False, {"geometry", "texture", "variance"}),
                              (True, {"geometry", "texture", "geometry_bg", "texture_bg", "variance"})):
        system = neus_system(f"model.learned_background={str(learned).lower()}")
        optimizer = make_optimizer(system.config.system.optimizer, system.model)
        assert {g["name"] for g in optimizer.param_groups} == expected
        n_optimised = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        assert n_optimised == sum(p.numel() for p in system.model.parameters())
