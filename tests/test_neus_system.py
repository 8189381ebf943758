"""NeuS system set-up: loss weights it cannot honour are refused or reported, optional background parts."""
import glob
import logging

import pytest
import torch
from omegaconf import OmegaConf

import systems
from helpers import lightning_mixed_precision, needs_cpu_grad_scaler, needs_fused_cpu_adam, training_system
from systems.optim import make_optimizer
from utils.config import ConfigError, load_config


def neus_system(*overrides):
    cfg = load_config("configs/neus-demo.yaml", ["model.grid_resolution=16", *overrides])
    return systems.make(cfg.system.name, cfg, mode="train")


def test_curvature_needs_finite_difference_normals():
    with pytest.raises(ConfigError, match="lambda_curvature needs model.geometry.grad_type=finite_difference"):
        neus_system("+system.loss.lambda_curvature=[0,0.0,1.e-4,100]")
    neus_system("+system.loss.lambda_curvature=1.e-4", "model.geometry.grad_type=finite_difference")


@pytest.mark.parametrize("override, message", [
    ("model.num_samples_per_ray=0", "model.num_samples_per_ray must be a whole number >= 1, not 0"),
    ("model.radius=-1", "model.radius must be a number > 0"),
    ("model.train_num_rays=0", "model.train_num_rays must be a whole number >= 1"),
    ("model.geometry.isosurface.resolution=1", "isosurface.resolution must be a whole number >= 2"),
    ("model.geometry.xyz_encoding_config.n_levels=0", "n_levels must be a whole number >= 1"),
    ("model.geometry.feature_dim=0", "model.geometry.feature_dim must be a whole number >= 1, not 0"),
    ("model.geometry.mlp_network_config.n_neurons=0", "mlp_network_config.n_neurons must be a whole number >= 1"),
    ("model.texture.mlp_network_config.n_hidden_layers=-1", "n_hidden_layers must be a whole number >= 0, not -1"),
    ("+model.grid_update_every=0", "model.grid_update_every must be a whole number >= 1, not 0"),
    ("model.geometry.xyz_encoding_config.otype=ProgressiveBandHashGrid "
     "+model.geometry.xyz_encoding_config.update_steps=0", "xyz_encoding_config.update_steps must be a whole number"),
    ("model.geometry.xyz_encoding_config.n_features_per_level=3", "must be 1, 2, 4 or 8"),
    ("model.geometry.xyz_encoding_config.per_level_scale=0.9", "per_level_scale must be a number >= 1"),
    ("model.geometry.xyz_encoding_config.log2_hashmap_size=40 model.geometry.xyz_encoding_config.n_levels=16",
     r"keep it under 2\^31: log2_hashmap_size <= 25"),
])
def test_sizes_that_cannot_work_fail_at_start_up_naming_the_key(override, message):
    """Each of these used to fail deep in a step or at the mesh export after training (ZeroDivisionError,
    an empty torch.cat, a modulo by zero), or trained on a grid the fast backends cannot run."""
    with pytest.raises(ConfigError, match=message):
        neus_system(*override.split())


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


def test_loss_weights_are_checked_at_start_up_not_mid_training():
    with pytest.raises(ConfigError, match=r"system.loss.lambda_eikonal = -0.1 is negative, which would reward"):
        neus_system("system.loss.lambda_eikonal=-0.1")
    with pytest.raises(ConfigError, match=r"lambda_mask = \[0, 0.0, -1.0, 100\] is negative"):
        neus_system("system.loss.lambda_mask=[0,0.0,-1.0,100]")  # a schedule's end counts too
    with pytest.raises(ConfigError, match=r"system.loss.lambda_eikonal = nan is not a finite number; give a "):
        neus_system("system.loss.lambda_eikonal=.nan")  # NeuS dropped the term (nan > 0 is false); NeRF's loss was nan
    with pytest.raises(ConfigError, match=r"lambda_mask = \[0, 0.1, inf, 100\] is not a finite number"):
        neus_system("system.loss.lambda_mask=[0,0.1,.inf,100]")
    with pytest.raises(ConfigError, match=r"system.loss.lambda_rgb_l1 = 'abc' must be a number or \[start_step, "):
        neus_system("system.loss.lambda_rgb_l1=abc")  # used to fail at the first step, after the data had loaded
    with pytest.raises(ConfigError, match=r"model.cos_anneal_end must be a whole number >= 0, not -1"):
        neus_system("model.cos_anneal_end=-1")  # used to leave the anneal at 0 for good


def test_background_parts_are_optimised_only_when_the_background_is_learned():
    for learned, expected in ((False, {"geometry", "texture", "variance"}),
                              (True, {"geometry", "texture", "geometry_bg", "texture_bg", "variance"})):
        system = neus_system(f"model.learned_background={str(learned).lower()}")
        optimizer = make_optimizer(system.config.system.optimizer, system.model)
        assert {g["name"] for g in optimizer.param_groups} == expected
        n_optimised = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        assert n_optimised == sum(p.numel() for p in system.model.parameters())


@pytest.mark.parametrize("config", ["configs/neus-demo.yaml", "configs/nerf-demo.yaml"])
def test_training_runs_under_mixed_precision(tmp_path, config):
    """Every config asks for precision 16 (16-mixed on a GPU). bfloat16 autocast on the CPU runs the same
    code paths with half-precision matmuls, so dtype mismatches (index_add, packed rendering, losses) show here."""
    import pytorch_lightning as pl
    import torch

    system, dm = training_system(config, tmp_path, "model.grid_resolution=16", "model.grid_warmup_steps=4",
                                 "model.learned_background=true")
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=12, logger=False, enable_checkpointing=False,
                         limit_val_batches=0, num_sanity_val_steps=0, enable_model_summary=False,
                         enable_progress_bar=False)
    trainer.fit(system, datamodule=dm)
    assert trainer.global_step == 12 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(torch.isfinite(p).all() for p in system.parameters())


@needs_cpu_grad_scaler
@needs_fused_cpu_adam
@pytest.mark.parametrize("clip", [None, 1.0])
def test_fp16_with_a_gradient_scaler_as_on_a_gpu(tmp_path, clip):
    """A GPU trains configs' precision 16 as 16-mixed: fp16 autocast and a gradient scaler. Lightning's plugin
    runs that on the CPU too. The optimiser is fused (it unscales inside its step) unless gradients are clipped,
    which needs them unscaled before the step: Lightning refuses clipping with a fused one."""
    import pytorch_lightning as pl
    import torch

    def train(*overrides, steps=8):
        system, dm = training_system("configs/neus-demo.yaml", tmp_path, "model.grid_resolution=16",
                                     "model.grid_warmup_steps=4", *overrides)
        before = [p.detach().clone() for p in system.parameters()]
        scaler = torch.amp.GradScaler("cpu")
        trainer = pl.Trainer(accelerator="cpu", plugins=[lightning_mixed_precision(scaler)], max_steps=steps,
                             gradient_clip_val=clip, logger=False, enable_checkpointing=False, limit_val_batches=0,
                             num_sanity_val_steps=0, enable_model_summary=False, enable_progress_bar=False)
        trainer.fit(system, datamodule=dm)
        moved = max(float((p - b).abs().max()) for p, b in zip(system.parameters(), before))
        return trainer, system, moved

    trainer, system, moved = train()
    assert bool(trainer.optimizers[0].defaults["fused"]) == (clip is None)
    assert trainer.global_step == 8 and moved > 1e-3
    assert all(torch.isfinite(p).all() for p in system.parameters())
    if clip:
        with pytest.raises(ConfigError, match="cannot clip gradients under 16-bit mixed precision"):
            train("+system.optimizer.args.fused=true", steps=1)


def test_progress_bar_shows_loss_rays_and_inv_s_without_prog_bar_logging(tmp_path):
    import math

    import pytorch_lightning as pl

    from utils.callbacks import ProgressBar

    system, dm = training_system("configs/neus-demo.yaml", tmp_path, "model.grid_resolution=16",
                                 "model.grid_warmup_steps=4")
    bar = ProgressBar()
    trainer = pl.Trainer(accelerator="cpu", max_steps=20, callbacks=[bar], logger=False, enable_checkpointing=False,
                         limit_val_batches=0, num_sanity_val_steps=0, enable_model_summary=False)
    trainer.fit(system, datamodule=dm)
    assert set(system.progress_bar_values) == {"loss", "rays", "inv_s"}
    assert 0 < system.progress_bar_values["loss"] < 1 and math.isfinite(system.progress_bar_values["inv_s"])
    assert not trainer.progress_bar_metrics  # nothing logged with prog_bar=True while training
    trainer.training = True  # get_metrics as during training (fit has ended)
    shown = bar.get_metrics(trainer, system)
    assert float(shown["loss"]) == pytest.approx(system.progress_bar_values["loss"], rel=1e-3)


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bar_into_a_log_file_redraws_a_few_times_not_every_step(tmp_path, capsys, monkeypatch, terminal):
    import re

    import pytorch_lightning as pl

    import utils.callbacks as callbacks

    system, dm = training_system("configs/nerf-demo.yaml", tmp_path, "model.grid_resolution=16",
                                 "model.grid_warmup_steps=4")
    monkeypatch.setattr(callbacks.ProgressBar, "REDRAWS_INTO_A_FILE", 4)  # 20 steps: every 5th
    monkeypatch.setattr(callbacks, "_is_terminal", lambda stream: terminal)
    trainer = pl.Trainer(accelerator="cpu", max_steps=20, callbacks=[callbacks.ProgressBar()], logger=False,
                         enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                         enable_model_summary=False)
    trainer.fit(system, datamodule=dm)
    out = capsys.readouterr().out
    shown = {int(n) for n in re.findall(r"(\d+)/20\b", out)}
    assert shown == (set(range(21)) if terminal else {0, 5, 10, 15, 20})
    # the first draw is the epoch's, once: Lightning drew "Training: 0/?" twice before it, into every log
    assert out.lstrip("\r").startswith("Epoch 0:   0%|          | 0/20 ") and "Training" not in out, out[:300]
    assert out.count("| 0/20 ") == 1
    if not terminal:  # Lightning's TQDM_MINITERS sets the rate itself, into a file too
        monkeypatch.setenv("TQDM_MINITERS", "2")
        assert callbacks.ProgressBar().refresh_rate == 2
        bar = callbacks.ProgressBar()
        bar._trainer = trainer
        assert bar.refresh_rate == 2
        monkeypatch.delenv("TQDM_MINITERS")
        assert callbacks.ProgressBar().refresh_rate == 1 and bar.refresh_rate == 5


def test_a_continued_run_shows_its_steps_out_of_max_steps(tmp_path, capsys, monkeypatch):
    """--train --resume: Lightning calls no on_train_epoch_start when it continues mid-epoch (training is one
    endless epoch), so the bar read 'Training: 11/?' with no percentage or time left, and Lightning >= 2.2's total
    (the steps left) would have been overshot by the step count, which goes on from the checkpoint's."""
    import re

    import pytorch_lightning as pl

    import utils.callbacks as callbacks

    monkeypatch.setattr(callbacks, "_is_terminal", lambda stream: True)

    def fit(max_steps, ckpt_path=None):
        system, dm = training_system("configs/nerf-demo.yaml", tmp_path, "model.grid_resolution=16",
                                     "model.grid_warmup_steps=4")
        trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, callbacks=[callbacks.ProgressBar()],
                             logger=False, default_root_dir=tmp_path, limit_val_batches=0, num_sanity_val_steps=0,
                             enable_model_summary=False)
        trainer.fit(system, datamodule=dm, ckpt_path=ckpt_path)
        return trainer

    fit(10)
    capsys.readouterr()
    trainer = fit(20, ckpt_path=glob.glob(str(tmp_path / "**" / "*step=10.ckpt"), recursive=True)[0])
    assert trainer.global_step == 20
    redraws = [line for line in re.split(r"[\r\n]", capsys.readouterr().out) if "it/s" in line]
    assert redraws and all(line.startswith("Epoch 0:") for line in redraws), redraws[:3]  # no "Training: 0/?"
    shown = {int(n) for n in re.findall(r"(\d+)/20\b", "\n".join(redraws))}
    assert shown == set(range(10, 21)) and "/?" not in "".join(redraws)
    assert "100%" in redraws[-1]


def test_a_step_whose_rays_all_miss_has_finite_zero_sample_losses():
    """Rays that miss every occupied cell leave no samples; per-sample means (eikonal, sparsity, curvature)
    over nothing were NaN and stopped training with a non-finite loss (seen with 4 rays per step)."""
    import types

    import pytorch_lightning as pl
    import torch

    system = neus_system("+system.loss.lambda_sparsity=0.01", "model.geometry.grad_type=finite_difference",
                         "+system.loss.lambda_curvature=1e-4")
    system.trainer = pl.Trainer(accelerator="cpu", logger=False)
    system.data = lambda stage: types.SimpleNamespace(has_mask=True)
    system.train()
    rays_o = torch.full((8, 3), 5.0)  # outside the scene box, looking away from it
    rays_d = torch.nn.functional.normalize(torch.ones(8, 3), dim=-1)
    out = system.model(rays_o, rays_d)
    assert out["sdf_grad_samples"].shape[0] == 0 and out["sdf_samples"].numel() == 0
    loss, terms, _ = system.losses(out, {"fg_mask": torch.zeros(8)}, torch.zeros(8, 3))
    assert {"eikonal", "sparsity", "curvature"} <= set(terms)
    assert all(float(terms[k]) == 0.0 for k in ("eikonal", "sparsity", "curvature"))
    assert torch.isfinite(loss)


def test_the_same_seed_trains_the_same_weights_on_several_threads(tmp_path):
    """Two NeuS runs with one seed on 2 CPU threads trained different weights (0.37 apart after 100 steps): the
    occupancy update's indexed assignment kept whichever write of a cell drawn twice came last, which depended on
    how the threads interleaved, and the grids then marched different samples."""
    import pytorch_lightning as pl

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = []
        for run in range(2):
            pl.seed_everything(7)
            system, dm = training_system("configs/neus-demo.yaml", tmp_path / str(run), "model.grid_warmup_steps=8")
            pl.Trainer(accelerator="cpu", max_steps=100, logger=False, enable_checkpointing=False, limit_val_batches=0,
                       num_sanity_val_steps=0, enable_model_summary=False, enable_progress_bar=False).fit(system, dm)
            runs.append(system.state_dict())
    finally:
        torch.set_num_threads(threads)
    moved = [k for k in runs[0] if runs[0][k].is_floating_point() and not torch.equal(runs[0][k], runs[1][k])]
    assert moved == [], moved


def test_a_run_stopped_and_continued_trains_the_weights_of_one_that_ran_through(tmp_path):
    """A cluster job preempted at step 12 and requeued (--train --resume) drew its rays, random backgrounds and
    occupancy samples from the start of their streams again, and restarted the dynamic ray count: its weights
    ended up to 1.0 apart from an uninterrupted run's. The checkpoint now carries those streams and the count."""
    import pytorch_lightning as pl

    def fit(steps, folder, ckpt_path=None):
        pl.seed_everything(3)  # launch.py seeds every process so
        system, dm = training_system("configs/neus-demo.yaml", tmp_path / folder, "model.grid_resolution=16",
                                     "model.grid_warmup_steps=4", "+model.grid_update_every=4")
        pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, default_root_dir=tmp_path / folder,
                   limit_val_batches=0, num_sanity_val_steps=0, enable_model_summary=False,
                   enable_progress_bar=False).fit(system, datamodule=dm, ckpt_path=ckpt_path)
        return system

    through = fit(24, "through")
    fit(12, "stopped")
    continued = fit(24, "continued", glob.glob(str(tmp_path / "stopped" / "**" / "*step=12.ckpt"), recursive=True)[0])
    assert continued.train_num_rays == through.train_num_rays
    a, b = through.state_dict(), continued.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.parametrize("override, message", [
    ("system.scheduler.schedulers.1.args.gamma=abc",
     r"ExponentialLR cannot step with system.scheduler.schedulers.1.args \{'gamma': 'abc'\} \(can't multiply"),
    ("system.scheduler={name: StepLR, args: {step_size: 0}}",
     r"StepLR cannot step with system.scheduler.args \{'step_size': 0\} \(integer (division or )?modulo by zero\)"),
])
def test_a_scheduler_value_its_first_step_cannot_use_is_refused_at_start_up(override, message):
    """torch builds these schedulers without a word and fails at their first step: training stopped at step 1
    with a traceback, after the data had loaded. launch.py's check builds and steps them on a throwaway
    optimiser."""
    from systems.optim import check_optimization_config

    system = neus_system(override)
    with pytest.raises(ConfigError, match=message):
        check_optimization_config(system.config.system, system.model)
    system = neus_system()
    check_optimization_config(system.config.system, system.model)  # the demo's own schedule steps


def test_a_continued_run_names_a_schedule_the_checkpoint_overrides_and_records_the_restored_one():
    """neus-demo's decay rate follows trainer.max_steps: continuing a 1500-step run to 3000 from the shipped
    config keeps the checkpoint's rate (Lightning restores the scheduler whole). The options that differ are
    named, and the config (which parsed.yaml is written from) is set to what the run trains with."""
    from systems.optim import make_scheduler, options_a_continued_run_ignores
    from utils.resume import keep_what_the_checkpoint_restores

    trained = neus_system()
    optimizer = make_optimizer(trained.config.system.optimizer, trained.model)
    scheduler = make_scheduler(trained.config.system.scheduler, optimizer)["scheduler"]
    ckpt = {"optimizer_states": [optimizer.state_dict()], "lr_schedulers": [scheduler.state_dict()]}
    assert options_a_continued_run_ignores(trained.config.system, trained.model, ckpt) == []

    longer = neus_system("trainer.max_steps=3000", "system.optimizer.params.geometry.lr=0.02")
    ignored = options_a_continued_run_ignores(longer.config.system, longer.model, ckpt)
    restored_gamma = trained.config.system.scheduler.schedulers[1].args.gamma
    assert [key for key, _, _ in ignored] == ["system.optimizer.params.geometry.lr",
                                              "system.scheduler.schedulers.1.args.gamma"]
    assert ignored[0][1:] == (0.02, 0.01) and ignored[1][2] == pytest.approx(restored_gamma)
    keep_what_the_checkpoint_restores(longer.config, ignored)
    assert longer.config.system.optimizer.params.geometry.lr == 0.01
    assert longer.config.system.scheduler.schedulers[1].args.gamma == pytest.approx(restored_gamma)
    assert options_a_continued_run_ignores(longer.config.system, longer.model, ckpt) == []


def test_the_learning_rate_a_non_finite_loss_suggests_halves_each_configured_rate_under_its_own_key():
    """After a non-finite loss the run names the overrides that halve its learning rates: each part's own key
    (neus-demo's variance has 0.001, the others 0.01), the configured rate rather than where the warm-up has taken
    it, args.lr for a part that sets none, and ``+`` where the config leaves the rate to torch's default."""
    from systems.optim import learning_rate_overrides

    def system_without(*keys, overrides=()):
        cfg = load_config("configs/neus-demo.yaml", ["model.grid_resolution=16", *overrides])
        for key in keys:
            parent, name = key.rsplit(".", 1)
            del OmegaConf.select(cfg, parent)[name]
        return systems.make(cfg.system.name, cfg, mode="train")

    system = system_without("system.optimizer.params.texture.lr")
    optimizer = make_optimizer(system.config.system.optimizer, system.model)
    torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=100)  # sets initial_lr, lr / 100
    overrides = learning_rate_overrides(optimizer, system.config, 0.5)
    assert sorted(overrides) == ["system.optimizer.args.lr=0.005", "system.optimizer.params.geometry.lr=0.005",
                                 "system.optimizer.params.variance.lr=0.0005"]  # no background parts in the demo
    halved = system_without("system.optimizer.params.texture.lr", overrides=overrides)
    rates = {g["name"]: g["lr"] for g in make_optimizer(halved.config.system.optimizer, halved.model).param_groups}
    assert rates == {"geometry": 0.005, "texture": 0.005, "variance": 0.0005}

    no_args = system_without("system.optimizer.args.lr", "system.optimizer.params.texture.lr")
    optimizer = make_optimizer(no_args.config.system.optimizer, no_args.model)  # texture: AdamW's default 0.001
    assert "+system.optimizer.args.lr=0.0005" in learning_rate_overrides(optimizer, no_args.config, 0.5)


def test_neus_test_images_show_the_surface_normal_between_render_and_depth():
    """instant-nsr-pl's NeuS images show the normal map, which is how a surface is judged before meshing; ours
    showed render, depth and opacity only. The normal panel is (n + 1) / 2 over white by opacity."""
    from types import SimpleNamespace

    import numpy as np

    from utils.io import colorize_depth

    system = neus_system()
    h, w = 2, 3
    normal = torch.nn.functional.normalize(torch.tensor([[0.0, 0, 1], [1, 0, 0], [0, -1, 0], [0.6, 0.8, 0],
                                                         [0, 0, -1], [1, 1, 1]]), dim=-1)
    opacity = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.0, 1.0])[:, None]
    out = {system.rgb_key: torch.full((6, 3), 0.25), "opacity": opacity, "depth": torch.linspace(1, 2, 6)[:, None],
           "comp_normal": normal}
    panels = system.eval_panels(out, SimpleNamespace(height=h, width=w), True, torch.zeros(6, 3))
    assert len(panels) == 5  # ground truth | render | normal | depth | opacity
    shown = panels[2].reshape(-1, 3).astype(int)
    expected = np.round(255 * ((normal.numpy() * 0.5 + 0.5) * opacity.numpy() + 1 - opacity.numpy()))
    assert np.abs(shown - expected).max() <= 1
    assert shown[0].tolist() == [128, 128, 255] and shown[4].tolist() == [255, 255, 255]  # facing +z; nothing hit
    assert np.array_equal(panels[4][..., 0] if panels[4].ndim == 3 else panels[4],
                          np.round(255 * opacity.numpy().reshape(h, w)).astype(np.uint8))
    # depth: the surface's distance (depth / opacity), so a pixel of opacity 0.7 at weighted depth 1.96 shows 2.8,
    # not the nearest depth of the view (which took the colour map's whole near end)
    out["opacity"] = torch.tensor([1.0, 1.0, 1.0, 0.7, 0.0, 1.0])[:, None]
    out["depth"] = torch.tensor([2.0, 2.2, 2.4, 0.7 * 2.8, 0.0, 3.0])[:, None]
    depth = system.eval_panels(out, SimpleNamespace(height=h, width=w), False, None)[2]
    surface = colorize_depth(np.array([2.0, 2.2, 2.4, 2.8, 0.0, 3.0]).reshape(h, w),
                             out["opacity"].numpy().reshape(h, w))
    assert np.abs(depth.astype(int) - surface.astype(int)).max() <= 1
    del out["comp_normal"]  # NeRF's output: no normal panel
    assert len(system.eval_panels(out, SimpleNamespace(height=h, width=w), True, torch.zeros(6, 3))) == 4


def test_with_no_view_held_out_validation_scores_training_views_spread_over_the_capture(tmp_path, caplog):
    """neus-dtu and the COLMAP configs hold no view out. Validation then rendered the video path: no image beside
    the render and no val/psnr in TensorBoard for the whole run. It now renders training views, far apart first
    (trainer.limit_val_batches: 2 is two views half the capture apart, not two neighbours), and scores them."""
    import imageio.v2 as imageio
    import numpy as np
    import pytorch_lightning as pl

    with caplog.at_level("INFO", logger="nsr"):
        system, dm = training_system("configs/neus-demo.yaml", tmp_path, "model.grid_resolution=16",
                                     "dataset.holdout_every=0", "dataset.img_wh=[24,24]")
    train, val = dm.train_data, dm.val_data
    assert train.n_images == 48 and val.n_images == 8 and val.has_gt and val.trained_on
    assert "Validation renders 8 of the 48 training views (no view is held out" in caplog.text
    for k, position in enumerate(range(0, 48, 6)):
        assert val.names[k] == train.names[position]
        assert torch.equal(val.c2w[k], train.c2w[position]) and torch.equal(val.images[k], train.images[position])
    assert [int(b["index"]) for b in dm.val_dataloader()] == [0, 4, 2, 6, 1, 5, 3, 7]  # training views 0, 24, ...
    trainer = pl.Trainer(accelerator="cpu", logger=False, limit_val_batches=2, enable_progress_bar=False,
                         enable_model_summary=False, inference_mode=False)  # NeuS's normals need gradients
    with caplog.at_level("INFO", logger="nsr"):
        trainer.validate(system, datamodule=dm)  # sets the data up again: the same views, not said twice
    assert caplog.text.count("Validation renders 8 of the 48") == 1 and dm.val_data is val
    assert torch.isfinite(trainer.callback_metrics["val/psnr"])
    assert sorted(p.name for p in tmp_path.glob("it0-*.png")) == ["it0-0.png", "it0-4.png"]  # half the capture apart
    for k in (0, 4):
        grid = imageio.imread(tmp_path / f"it0-{k}.png")
        assert grid.shape[:2] == (24, 5 * 24)  # ground truth | render | normal | depth | opacity
        rays = val.image_rays(k)
        m = rays["fg_mask"][:, None]  # the demo's masks applied, as to every rendered view's ground truth
        gt = np.round(255 * (rays["rgb"] * m + 1 - m).view(24, 24, 3).numpy())
        assert np.abs(grid[:, :24].astype(int) - gt).max() <= 1
    # with views held out, validation is those views, as before
    held = training_system("configs/neus-demo.yaml", tmp_path, "dataset.img_wh=[24,24]")[1]
    assert held.val_data.n_images == 6 and not held.val_data.trained_on
    assert held.val_data.names[:2] == ["image/000000.png", "image/000008.png"]  # every 8th view, in capture order
    assert [int(b["index"]) for b in held.val_dataloader()] == [0, 4, 2, 1, 5, 3]  # rendered far-apart first


def train_geometry_on(loss, system, steps=150):
    """``steps`` Adam steps (lr 0.01) of the system's geometry on ``loss()`` alone."""
    optimiser = torch.optim.Adam(system.model.geometry.parameters(), lr=0.01)
    torch.manual_seed(0)
    for _ in range(steps):
        optimiser.zero_grad()
        loss().backward()
        optimiser.step()


def test_the_sparse_point_loss_pulls_the_zero_level_set_through_the_points(caplog):
    """lambda_sparse_points: the SfM points inside the scene's box, |SDF| at a batch of them each step. Trained on
    that term alone, the zero level set moves from the initial sphere (radius 0.5) onto points on a sphere of
    radius 0.3; the points outside the box are left out, and data without points switches the term off."""
    import numpy as np

    system = neus_system("+system.loss.lambda_sparse_points=1.0", "+system.loss.sparse_points_per_step=256")
    rng = np.random.default_rng(0)
    on_sphere = rng.normal(size=(2000, 3))
    on_sphere = 0.3 * on_sphere / np.linalg.norm(on_sphere, axis=1, keepdims=True)
    far = rng.uniform(-4, 4, (300, 3)) + np.array([6.0, 0.0, 0.0])  # the surroundings, outside the box
    with caplog.at_level(logging.INFO, logger="nsr"):
        system.surface_points = system.points_inside(np.concatenate([on_sphere, far]))
        assert system.points_inside(None) is None
    assert len(system.surface_points) == 2000
    assert "Sparse-point loss: 2000 of the 2300 sparse points lie inside the scene's box" in caplog.text
    assert ("the dataset has no sparse points (a COLMAP capture, or a transforms.json naming a ply_file_path, has "
            "them): the sparse-point loss is off") in caplog.text
    points = torch.as_tensor(on_sphere, dtype=torch.float32)
    with torch.no_grad():
        before = system.model.geometry.sdf(points).abs().mean().item()
    train_geometry_on(system.sparse_point_loss, system)
    with torch.no_grad():
        after = system.model.geometry.sdf(points).abs().mean().item()
    print(f"\nmean |SDF| at the points: {before:.4f} before, {after:.4f} after")
    assert before > 0.15 and after < 0.02
    with pytest.raises(ConfigError, match=r"system.loss.sparse_points_per_step must be a whole number >= 1, not 0"):
        neus_system("+system.loss.sparse_points_per_step=0")  # a batch of none: the mean of nothing, a NaN loss


@pytest.mark.parametrize("config", ["configs/neus-colmap.yaml", "configs/neus-dtu.yaml", "configs/neus-dtu-wmask.yaml",
                                    "configs/neuralangelo-dtu-wmask.yaml", "configs/neus-blender.yaml"])
def test_the_cosine_anneal_ends_with_a_shortened_run(config):
    """neus-colmap and the DTU configs ended the anneal at step 20000 whatever trainer.max_steps was: a run of
    1500 steps (the capture's CPU budget) finished 7.5 % of the way, its surface rendered as early in training."""
    assert load_config(config, ["trainer.max_steps=1500"]).model.cos_anneal_end == 1500
    assert load_config(config).model.cos_anneal_end == 20000  # instant-nsr-pl's, at its length


def test_an_anneal_beyond_the_last_step_is_said_at_start_up(caplog):
    with caplog.at_level(logging.WARNING, logger="nsr"):
        neus_system("trainer.max_steps=1500", "model.cos_anneal_end=20000")
    assert "model.cos_anneal_end=20000 is beyond trainer.max_steps=1500: the cosine anneal stops at 8%" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nsr"):
        neus_system("trainer.max_steps=1500", "model.cos_anneal_end=1500")
    assert "cos_anneal_end" not in caplog.text


def test_the_free_space_loss_clears_what_lies_between_a_camera_and_the_points_it_sees(caplog):
    """lambda_free_space: along each sightline (a camera, a sparse point it sees), inside the box and short of the
    point, nothing may be inside a surface. Sightlines from cameras at distance 2 to points within 0.2 of the
    centre cross the initial sphere (radius 0.5, inside it the SDF is negative); trained on that term alone, the
    negative SDF along them is cleared."""
    import numpy as np

    system = neus_system("+system.loss.lambda_free_space=1.0", "+system.loss.sparse_points_per_step=256")
    rng = np.random.default_rng(0)
    azimuth = rng.uniform(0, 2 * np.pi, 400)
    cameras = np.stack([2 * np.cos(azimuth), 2 * np.sin(azimuth), rng.uniform(0.2, 1.0, 400)], 1)
    points = rng.uniform(-0.2, 0.2, (400, 3))
    with caplog.at_level(logging.INFO, logger="nsr"):
        system.free_sightlines = system.sightlines_on_device(np.stack([cameras, points], 1))
        assert system.sightlines_on_device(None) is None  # a NeRF-synthetic scene: said, and off
    assert "Free-space loss: 400 sightlines from cameras to the sparse points they see; 256 of them" in caplog.text
    assert "the dataset has no sightlines (a COLMAP capture has them): the free-space loss is off" in caplog.text

    def inside_along_the_lines():  # mean negative SDF at 20 places on each line, from the box's face to the stop
        t = torch.linspace(0.55, 0.9, 20)[:, None, None]
        lines = system.free_sightlines
        x = lines[None, :, 0] + t * (lines[None, :, 1] - lines[None, :, 0])
        with torch.no_grad():
            return torch.relu(-system.model.geometry.sdf(x.reshape(-1, 3))).mean().item()

    before = inside_along_the_lines()
    train_geometry_on(system.free_space_loss, system)
    after = inside_along_the_lines()
    print(f"\nmean negative SDF along the sightlines: {before:.4f} before, {after:.4f} after")
    assert before > 0.03 and after < 0.1 * before
