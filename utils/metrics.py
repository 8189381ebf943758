"""Image metrics on held-out views (torchmetrics: per image, averaged, synchronised under DDP).

PSNR and SSIM always; LPIPS (AlexNet, as the NeRF papers report it) when torchmetrics can build it here,
which needs torchvision and the network weights (downloaded once into torch's hub cache). Otherwise LPIPS is
skipped with one log line saying why.
"""
from __future__ import annotations

import logging

import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

log = logging.getLogger("nsr")
_lpips_note_given = False


def build_lpips() -> torch.nn.Module | None:
    """torchmetrics' LPIPS (AlexNet), or None with a one-time note when it cannot be built offline/here."""
    global _lpips_note_given
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        return LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    except Exception as err:  # ImportError (no torchvision), or the weights cannot be fetched
        if not _lpips_note_given:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            if "torchvision" in reason:
                reason = "torchvision is not installed"
            log.info("LPIPS skipped (%s); PSNR and SSIM are reported. With torchvision installed LPIPS is "
                     "computed (its AlexNet weights are fetched once into torch's hub cache).", reason[:160])
            _lpips_note_given = True
        return None


class ImageMetrics(torch.nn.Module):
    """Accumulates PSNR, SSIM (and LPIPS when available) over (H, W, 3) images in [0, 1]."""

    def __init__(self, lpips: bool = True):
        super().__init__()
        self.psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean")
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        # Kept out of the module tree: its weights must not enter checkpoints (they would then only load where
        # torchvision is installed).
        self._lpips = [build_lpips() if lpips else None]

    @property
    def lpips(self):
        return self._lpips[0]

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> float:
        """Add one image pair; returns its PSNR."""
        p = pred.clamp(0, 1).permute(2, 0, 1)[None].float()
        t = target.permute(2, 0, 1)[None].float()
        self.psnr.update(p, t)
        self.ssim.update(p, t)
        if self.lpips is not None:
            self.lpips.to(p.device).update(p, t.clamp(0, 1))
        return float(-10.0 * torch.log10(torch.mean((p - t) ** 2).clamp(min=1e-10)))

    def compute(self) -> dict:
        scores = {"psnr": float(self.psnr.compute()), "ssim": float(self.ssim.compute())}
        if self.lpips is not None:
            scores["lpips"] = float(self.lpips.compute())
        return scores

    def reset(self) -> None:
        self.psnr.reset()
        self.ssim.reset()
        if self.lpips is not None:
            self.lpips.reset()
