"""A non-finite loss stops training and leaves the weights as they were before that step, whichever way the
optimiser steps: fused at fp32 and under fp16 with a gradient scaler (the device flag, read every few steps,
no read per step), or unfused (the loss read before each step)."""
import pytest
import pytorch_lightning as pl
import torch

from helpers import lightning_mixed_precision, needs_cpu_grad_scaler, needs_fused_cpu_adam, training_system
from systems.finite_guard import FiniteLossGuard, NonFiniteLossError
from utils.host_sync import HostSyncCounter

BAD_STEP = 6


class OneBadStep(pl.Callback):
    """The rgb weight is 1e39 at step BAD_STEP only (the fp32 loss is inf there, finite again after it);
    ``after``: the parameters after every optimiser step, keyed by the number of steps taken."""

    def __init__(self):
        self.after = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        module.config.system.loss.lambda_rgb = 1e39 if trainer.global_step == BAD_STEP else 1.0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = [p.detach().clone() for p in module.parameters()]


def train_into_a_bad_loss(tmp_path, *overrides, plugins=()):
    system, dm = training_system("configs/nerf-demo.yaml", tmp_path, "model.grid_resolution=16",
                                 "model.grid_warmup_steps=4", *overrides)
    snapshots = OneBadStep()
    trainer = pl.Trainer(accelerator="cpu", max_steps=40, callbacks=[snapshots], plugins=list(plugins), logger=False,
                         enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                         enable_model_summary=False, enable_progress_bar=False)
    with pytest.raises(NonFiniteLossError, match=rf"not finite at step {BAD_STEP} \(rgb=0\.\d+ \(weight 1e\+39\)\)"):
        trainer.fit(system, datamodule=dm)
    return system, trainer, snapshots


def assert_weights_from_before_the_bad_step(system, snapshots):
    good = snapshots.after[BAD_STEP]  # BAD_STEP optimiser steps taken: steps 0 .. BAD_STEP - 1
    assert any(float((g - b).abs().max()) > 0 for g, b in zip(good, snapshots.after[BAD_STEP - 1]))  # it trained
    for p, g in zip(system.parameters(), good):
        assert torch.equal(p.detach(), g)


@needs_fused_cpu_adam
@pytest.mark.parametrize("mixed", [False, pytest.param(True, marks=needs_cpu_grad_scaler)])
def test_fused_optimiser_skips_every_update_from_the_bad_step_until_the_check(tmp_path, mixed):
    plugins = ()
    if mixed:  # a GPU's 16-mixed: the scaler's own flag is combined with the guard's
        plugins = (lightning_mixed_precision(torch.amp.GradScaler("cpu")),)
    system, trainer, snapshots = train_into_a_bad_loss(tmp_path, plugins=plugins)
    assert system.loss_guard.deferred
    assert trainer.global_step == 10  # found at the first read after the bad step; 7-9 (finite) skipped too
    assert_weights_from_before_the_bad_step(system, snapshots)
    assert not hasattr(trainer.optimizers[0], "found_inf")  # nothing left on the optimiser


def test_unfused_optimiser_stops_before_the_bad_step_is_applied(tmp_path):
    system, trainer, snapshots = train_into_a_bad_loss(tmp_path, "+system.optimizer.args.foreach=true")
    assert not system.loss_guard.deferred
    assert trainer.global_step == BAD_STEP  # read before each step: stopped at once
    assert_weights_from_before_the_bad_step(system, snapshots)


def test_a_bad_loss_in_the_last_steps_is_found_when_training_ends(tmp_path):
    system, dm = training_system("configs/nerf-demo.yaml", tmp_path, "model.grid_resolution=16",
                                 "model.grid_warmup_steps=4", "system.loss.lambda_rgb=[11,1.0,1e39,12]")
    trainer = pl.Trainer(accelerator="cpu", max_steps=13, logger=False, enable_checkpointing=False,
                         limit_val_batches=0, num_sanity_val_steps=0, enable_model_summary=False,
                         enable_progress_bar=False)
    with pytest.raises(NonFiniteLossError, match="not finite at step 12"):
        trainer.fit(system, datamodule=dm)


@needs_fused_cpu_adam
def test_deferred_record_reads_nothing_and_the_check_names_the_first_bad_step():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([weight], lr=0.1, fused=True)
    guard = FiniteLossGuard()
    guard.attach(optimizer)
    assert guard.deferred
    with HostSyncCounter() as syncs:
        for step, scale in enumerate([1.0, 1.0, float("nan"), 1.0, float("inf")]):
            loss = (weight * scale).sum()
            loss.backward()
            guard.record(step, loss, {"a": loss * 2}, {"a": 0.5})
            optimizer.step()
            optimizer.zero_grad()
    assert syncs.total == 0
    assert not hasattr(optimizer, "found_inf")
    moved = weight.detach().clone()
    with pytest.raises(NonFiniteLossError, match=r"at step 2 \(a=nan \(weight 0.5\)\)"):
        guard.check()
    assert torch.all(moved < 1) and torch.isfinite(moved).all()  # two updates, then none
