"""Image metrics: PSNR/SSIM from torchmetrics agree with their definitions; LPIPS is optional and says so."""
import importlib.util
import logging

import torch

import utils.metrics as metrics


def test_psnr_of_known_error_and_ssim_of_identical_images():
    m = metrics.ImageMetrics(lpips=False)
    target = torch.rand(16, 20, 3, generator=torch.Generator().manual_seed(0))
    pred = (target + 0.1).clamp(0, 1)
    mse = float(((pred - target) ** 2).mean())
    assert abs(m.update(pred, target) - (-10 * torch.log10(torch.tensor(mse)))) < 1e-4
    m.update(target, target)  # 100 dB cap is torchmetrics' business; SSIM of identical images is 1
    scores = m.compute()
    assert set(scores) == {"psnr", "ssim"}
    assert scores["ssim"] < 1.0
    m.reset()
    m.update(target, target)
    assert abs(m.compute()["ssim"] - 1.0) < 1e-6


def test_lpips_is_reported_or_skipped_with_one_note(caplog, monkeypatch):
    monkeypatch.setattr(metrics, "_lpips_note_given", False)
    with caplog.at_level(logging.INFO, logger="nsr"):
        a = metrics.ImageMetrics()
        b = metrics.ImageMetrics()
    notes = [r for r in caplog.records if "LPIPS skipped" in r.getMessage()]
    if a.lpips is None:
        assert importlib.util.find_spec("torchvision") is None or notes
        assert len(notes) == 1 and b.lpips is None  # one note per process, not one per metric object
        img = torch.rand(32, 32, 3)
        a.update(img, img)
        assert "lpips" not in a.compute()
    else:
        img = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(1))
        a.update(img, img)
        assert abs(a.compute()["lpips"]) < 1e-4
        b.update((img + 0.3).clamp(0, 1), img)
        assert b.compute()["lpips"] > 0.01
    assert not any("lpips" in k for k in a.state_dict())  # never enters checkpoints
