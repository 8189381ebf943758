"""Per-image tables (models/per_image.py): model.exposure_correction, a gain and an offset per training image and
colour channel; model.pose_refinement, a rotation and a shift per training camera."""
import pytest
import torch

import systems
from models.per_image import ExposureCorrection, PoseRefinement, size_from_checkpoint
from utils.config import ConfigError, load_config


def test_the_correction_changes_what_the_fields_render_not_the_painted_background():
    torch.manual_seed(0)
    table = ExposureCorrection()
    table.size_for(4)
    with torch.no_grad():
        table.log_gain.copy_(torch.randn(4, 3) * 0.3)
        table.offset.copy_(torch.randn(4, 3) * 0.05)
    gain, offset = table.gains_and_offsets()
    torch.testing.assert_close(gain.log().mean(0), torch.zeros(3), atol=1e-6, rtol=0)  # the field keeps the average
    torch.testing.assert_close(offset.mean(0), torch.zeros(3), atol=1e-6, rtol=0)
    field = torch.rand(5, 3)  # the fields' premultiplied colour of 5 rays
    alpha = torch.tensor([[0.0], [1.0], [0.5], [1.0], [0.25]])
    background = torch.tensor([0.2, 0.9, 0.4])  # painted where the fields leave the ray open: no camera saw it
    index = torch.tensor([0, 1, 2, 3, 3])
    out = table(field * alpha + background * (1 - alpha), alpha, background, index)
    expected = (gain[index] * field + offset[index]) * alpha + background * (1 - alpha)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out[0], background)


def test_learned_gains_and_offsets_are_those_of_the_cameras():
    """Rays of 6 images whose cameras scaled and shifted the field's colours (about the images' average, which
    the field keeps): fitting only the tables, the field's colours given, finds each image's gain and offset."""
    torch.manual_seed(0)
    true_log_gain, true_offset = torch.randn(6, 3) * 0.3, torch.randn(6, 3) * 0.03
    true_log_gain, true_offset = true_log_gain - true_log_gain.mean(0), true_offset - true_offset.mean(0)
    colour, index = torch.rand(4096, 3) * 0.7, torch.randint(0, 6, (4096,))
    seen = torch.exp(true_log_gain[index]) * colour + true_offset[index]
    table = ExposureCorrection()
    table.size_for(6)
    optimiser = torch.optim.Adam(table.parameters(), lr=0.02)
    ones = torch.ones(len(index), 1)
    for _ in range(600):
        optimiser.zero_grad()
        (table(colour, ones, torch.zeros(3), index) - seen).square().mean().backward()
        optimiser.step()
    gain, offset = table.gains_and_offsets()
    torch.testing.assert_close(gain.log(), true_log_gain, atol=0.01, rtol=0)
    torch.testing.assert_close(offset, true_offset, atol=0.005, rtol=0)


def test_tables_take_their_size_from_the_data_or_from_a_checkpoint():
    table = ExposureCorrection()
    assert table.n_images == 0  # the model is built before the images are read
    state = {"exposure.log_gain": torch.full((7, 3), 0.1), "exposure.offset": torch.zeros(7, 3)}
    holder = torch.nn.Module()
    holder.exposure = table
    size_from_checkpoint(holder, state)
    holder.load_state_dict(state)
    assert table.n_images == 7 and float(table.log_gain[3, 1]) == pytest.approx(0.1)
    table.size_for(7)  # the same scene: kept
    assert float(table.log_gain[3, 1]) == pytest.approx(0.1)
    table.size_for(9)  # weights of another scene (--resume_weights_only): no change for each new image
    assert table.n_images == 9 and float(table.log_gain.abs().max()) == 0.0
    fresh = torch.nn.Module()
    fresh.exposure = ExposureCorrection()
    fresh.load_state_dict(state)  # Lightning's restore goes through load_state_dict alone
    assert fresh.exposure.n_images == 7


def test_an_exposure_table_without_a_learning_rate_is_refused_at_start_up():
    cfg = load_config("configs/neus-demo.yaml", ["model.exposure_correction=true", "model.grid_resolution=16"])
    del cfg.system.optimizer.params["exposure"]
    with pytest.raises(ConfigError, match=r"needs a learning rate: add system.optimizer.params.exposure"):
        systems.make(cfg.system.name, cfg, mode="train")
    assert systems.make(cfg.system.name, cfg, mode="test").model.exposure is not None  # testing trains nothing
    poses = load_config("configs/nerf-demo.yaml", ["model.pose_refinement=true", "model.grid_resolution=16"])
    del poses.system.optimizer.params["poses"]
    with pytest.raises(ConfigError, match=r"model.pose_refinement learns a rotation and a shift per image, which "
                                          r"needs a learning rate: add system.optimizer.params.poses"):
        systems.make(poses.system.name, poses, mode="train")
    off = load_config("configs/neus-demo.yaml", ["model.grid_resolution=16"])
    del off.system.optimizer.params["exposure"]
    assert systems.make(off.system.name, off, mode="train").model.exposure is None


@pytest.mark.parametrize("config, overrides", [
    ("configs/nerf-demo.yaml", ()),
    ("configs/neus-demo.yaml",
     ("model.learned_background=true", "system.loss.lambda_mask=0", "dataset.apply_mask=false")),
])
def test_training_learns_each_images_exposure_where_the_fields_are_seen(tmp_path, config, overrides):
    """The demo's training images, each darkened or brightened (a gain per channel, as a phone's auto-exposure
    and white balance change): the learned gains follow the applied ones. NeRF: over a painted random background,
    which the gains leave alone; NeuS: without masks, the surroundings learned by the background NeRF, which
    they correct too. After 300 steps at 64x64 the gains have come 0.31 (NeuS) and 0.44 (NeRF) of the way,
    correlation 0.91 and 0.94 (neus-demo with masks, 1500 steps at 128x128: correlation 0.94, median error 0.043
    in the log gain); a table that the training did not use, or used with the wrong image's rays, stays at 0 or
    correlates not at all."""
    import pytorch_lightning as pl

    from helpers import training_system

    steps = 300
    system, dm = training_system(config, tmp_path, "model.exposure_correction=true", "dataset.render_resolution=64",
                                 "dataset.img_wh=[64,64]", f"trainer.max_steps={steps}", *overrides)
    images = dm.train_data.images  # (N, H, W, 3) uint8, changed in place
    exposure = torch.empty(len(images), 1).uniform_(0.6, 1.4, generator=torch.Generator().manual_seed(0))
    balance = torch.empty(len(images), 3).uniform_(0.9, 1.1, generator=torch.Generator().manual_seed(1))
    true_log_gain = torch.log(exposure * balance)
    images.copy_((images.float() * true_log_gain.exp()[:, None, None, :]).clamp(0, 255).round().to(torch.uint8))
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         limit_val_batches=0, num_sanity_val_steps=0, enable_model_summary=False,
                         enable_progress_bar=False)
    trainer.fit(system, datamodule=dm)
    gain, _ = system.model.exposure.gains_and_offsets()
    learned, truth = gain.detach().log(), true_log_gain - true_log_gain.mean(0)
    correlation = float(torch.corrcoef(torch.stack([learned.flatten(), truth.flatten()]))[0, 1])
    error = float((learned - truth).abs().median())
    slope = float((learned * truth).sum() / truth.square().sum())
    print(f"{config}: correlation {correlation:.3f}, median |log gain error| {error:.3f} (without the correction "
          f"{float(truth.abs().median()):.3f}), slope {slope:.2f}")
    assert correlation > 0.75 and 0.2 < slope < 1.3 and error < float(truth.abs().median())


def test_a_pose_correction_turns_each_camera_s_rays_about_its_centre_and_moves_the_centre():
    torch.manual_seed(0)
    poses = PoseRefinement()
    poses.size_for(3)
    w = torch.tensor([0.3, -0.5, 0.8]) / torch.tensor([0.3, -0.5, 0.8]).norm() * torch.deg2rad(torch.tensor(2.0))
    with torch.no_grad():  # camera 1 turned by 2 degrees and moved; the rows are centred, so the others are too
        poses.rotation[1] = w * 1.5
        poses.translation[1] = torch.tensor([0.03, 0.0, -0.015])
    rotation, translation = poses.centred()
    assert torch.allclose(rotation.sum(0), torch.zeros(3), atol=1e-7) and torch.allclose(rotation[1], w)
    rays_o = torch.randn(64, 3)
    rays_d = torch.nn.functional.normalize(torch.randn(64, 3), dim=-1)
    index = torch.randint(0, 3, (64,))
    moved_o, moved_d = poses(rays_o, rays_d, index)
    torch.testing.assert_close(moved_o, rays_o + translation[index])
    skew = torch.zeros(64, 3, 3)  # the exact turn: exp of the skew matrix of each ray's camera's rotation
    r = rotation[index].double()
    skew[:, 0, 1], skew[:, 0, 2], skew[:, 1, 2] = -r[:, 2], r[:, 1], -r[:, 0]
    skew = (skew - skew.transpose(1, 2)).double()
    exact = (torch.linalg.matrix_exp(skew) @ rays_d.double()[:, :, None])[:, :, 0]
    error = torch.atan2(torch.cross(moved_d.double(), exact, dim=-1).norm(dim=-1), (moved_d.double() * exact).sum(-1))
    assert float(error.max()) < 1e-5 and torch.allclose(moved_d.norm(dim=-1), torch.ones(64))
    same = PoseRefinement()  # every camera moved alike is the scene's frame moved: centred away
    same.size_for(3)
    with torch.no_grad():
        same.rotation += torch.tensor([0.01, 0.02, -0.03])
        same.translation += 0.1
    torch.testing.assert_close(same(rays_o, rays_d, index), (rays_o, rays_d))
    fresh = PoseRefinement()  # at zero (the start) the gradient is finite, where Rodrigues' axis is not
    fresh.size_for(3)
    o, d = fresh(rays_o, rays_d, index)
    (o.sum() + d.square().sum() + (d * torch.randn(64, 3)).sum()).backward()
    assert torch.isfinite(fresh.rotation.grad).all() and float(fresh.rotation.grad.abs().sum()) > 0


def test_training_moves_the_training_cameras_from_the_start_step_and_nothing_else_does(tmp_path):
    """20 steps of nerf-demo with pose refinement from step 12: the cameras stay exactly as given for 12 steps,
    then the rays a step renders go through the table (the rotations and shifts get gradients and move, centred
    over the cameras), and evaluation renders the poses as given."""
    import pytorch_lightning as pl

    from helpers import training_system

    system, dm = training_system("configs/nerf-demo.yaml", tmp_path, "model.pose_refinement=true",
                                 "model.pose_refinement_start=12", "dataset.render_resolution=32",
                                 "dataset.img_wh=[32,32]", "trainer.max_steps=20", "model.grid_resolution=16")
    before_start = {}

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 12:
                before_start.update({name: getattr(module.model.poses, name).detach().clone()
                                     for name in ("rotation", "translation")})

    trainer = pl.Trainer(accelerator="cpu", max_steps=20, logger=False, enable_checkpointing=False,
                         limit_val_batches=0, num_sanity_val_steps=0, enable_model_summary=False,
                         enable_progress_bar=False, callbacks=[Watch()])
    trainer.fit(system, datamodule=dm)
    assert before_start and all(float(table.abs().max()) == 0 for table in before_start.values())
    rotation, translation = system.model.poses.centred()
    assert system.model.poses.n_images == dm.train_data.n_images
    assert 0 < float(rotation.abs().max()) < 8 * 3e-4 * 1.01  # 8 steps; Adam moves each at most about lr a step
    assert 0 < float(translation.abs().max()) < 8 * 3e-4 * 1.01
    system.model.eval()
    rays = dm.val_data.image_rays(0)
    with torch.no_grad():  # a held-out view renders from its given pose whatever the table holds
        before = system.model(rays["rays_o"], rays["rays_d"])["comp_rgb"]
        system.model.poses.rotation.add_(torch.randn_like(system.model.poses.rotation))
        after = system.model(rays["rays_o"], rays["rays_d"])["comp_rgb"]
    torch.testing.assert_close(before, after)


def test_a_start_step_at_or_past_the_end_of_training_is_warned_about_and_a_negative_one_refused(caplog):
    config = load_config("configs/neus-demo.yaml", ["model.pose_refinement=true", "trainer.max_steps=400"])
    systems.make(config.system.name, config, mode="train")
    assert "model.pose_refinement_start=500 is not before trainer.max_steps=400: the cameras are never refined" \
        in caplog.text
    caplog.clear()
    config.trainer.max_steps = -1  # Lightning's "no limit"
    systems.make(config.system.name, config, mode="train")
    assert "pose_refinement_start" not in caplog.text and "cos_anneal_end" not in caplog.text
    config = load_config("configs/nerf-demo.yaml", ["model.pose_refinement=true", "model.pose_refinement_start=0",
                                                    "model.grid_resolution=16"])
    systems.make(config.system.name, config, mode="train")
    assert "pose_refinement_start" not in caplog.text
    config.model.pose_refinement_start = -5
    with pytest.raises(ConfigError, match=r"model.pose_refinement_start must be a whole number >= 0, not -5"):
        systems.make(config.system.name, config, mode="train")
