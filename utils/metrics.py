"""Image metrics on held-out views (torchmetrics: per image, averaged, synchronised under DDP)."""
from __future__ import annotations

import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure


class ImageMetrics(torch.nn.Module):
    """Accumulates PSNR and SSIM over (H, W, 3) images in [0, 1]; ``compute()`` gives their means."""

    def __init__(self):
        super().__init__()
        self.psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean")
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> float:
        """Add one image pair; returns its PSNR."""
        p = pred.clamp(0, 1).permute(2, 0, 1)[None].float()
        t = target.permute(2, 0, 1)[None].float()
        self.psnr.update(p, t)
        self.ssim.update(p, t)
        return float(-10.0 * torch.log10(torch.mean((p - t) ** 2).clamp(min=1e-10)))

    def compute(self) -> dict:
        return {"psnr": float(self.psnr.compute()), "ssim": float(self.ssim.compute())}

    def reset(self) -> None:
        self.psnr.reset()
        self.ssim.reset()
