"""Per-image exposure and white balance (``model.exposure_correction``).

A phone's auto-exposure and white balance change from one frame to the next: the same surface is brighter in
one image than in the next. A field trained on such images explains the changes with view-dependent colour
or with floaters. Here each training image gets a gain and an offset per colour channel, learned with the field
and applied to the colour the fields render for its rays; the field keeps the images' average exposure (the
gains' logarithms and the offsets are centred over the images), which is what validation, test images, the
video and the mesh's colours show: those never apply a correction.

The number of training images is known only once the data is read, after the model is built (a wrong model
option is said before the images load); the tables start empty and take their size from the data
(``size_for``) or from a checkpoint (loading resizes them).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

log = logging.getLogger("nsr")


class ExposureCorrection(nn.Module):
    """log_gain, offset: (N, 3) per training image, zero (no change) at the start."""

    def __init__(self):
        super().__init__()
        self.log_gain = nn.Parameter(torch.zeros(0, 3))
        self.offset = nn.Parameter(torch.zeros(0, 3))

    @property
    def n_images(self) -> int:
        return len(self.log_gain)

    def _resize(self, n_images: int) -> None:
        device = self.log_gain.device
        self.log_gain = nn.Parameter(torch.zeros(n_images, 3, device=device))
        self.offset = nn.Parameter(torch.zeros(n_images, 3, device=device))

    def size_for(self, n_images: int) -> None:
        """One gain and offset per training image; a table of another size (a checkpoint of another scene, with
        ``--resume_weights_only``) starts again from no change."""
        if self.n_images == n_images:
            return
        if self.n_images:
            log.info(f"Exposure correction: the checkpoint's is for {self.n_images} images, this data has "
                     f"{n_images}; it starts again from no change.")
        self._resize(n_images)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "log_gain")
        if saved is not None and saved.shape != self.log_gain.shape:
            self._resize(len(saved))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def gains_and_offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3) gains and (N, 3) offsets, centred: the gains' geometric mean is 1 and the offsets' mean 0."""
        gain = torch.exp(self.log_gain - self.log_gain.mean(0, keepdim=True))
        return gain, self.offset - self.offset.mean(0, keepdim=True)

    def forward(self, rgb: torch.Tensor, alpha: torch.Tensor, background: torch.Tensor,
                image_index: torch.Tensor) -> torch.Tensor:
        """The colour of rays of the given images as their cameras saw it.

        rgb: (R, 3) rendered colour, the fields' part over ``background`` (3,) (a colour the system paints where
        the fields leave the ray open, which no camera saw, so it is not corrected); alpha: (R, 1) the fields'
        total opacity; image_index: (R,) each ray's training image. Returns (R, 3).
        """
        gain, offset = self.gains_and_offsets()
        open_part = background * (1.0 - alpha)
        return gain[image_index] * (rgb - open_part) + offset[image_index] * alpha + open_part


def size_from_checkpoint(module: nn.Module, state: dict) -> None:
    """Size every ExposureCorrection in ``module`` as ``state`` (a checkpoint's state_dict) holds it, so that the
    shapes match before the state is compared with the config's model."""
    for name, sub in module.named_modules():
        saved = state.get(f"{name}.log_gain" if name else "log_gain")
        if isinstance(sub, ExposureCorrection) and saved is not None:
            sub._resize(len(saved))
