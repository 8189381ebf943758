"""Parameters kept per training image: exposure and white balance (``model.exposure_correction``) and camera
pose corrections (``model.pose_refinement``), learned with the field and used only on training rays.

A phone's auto-exposure and white balance change from one frame to the next: the same surface is brighter in
one image than in the next. A field trained on such images explains the changes with view-dependent colour
or with floaters. ``ExposureCorrection`` gives each training image a gain and an offset per colour channel,
applied to the colour the fields render for its rays; the field keeps the images' average exposure (the
gains' logarithms and the offsets are centred over the images), which is what validation, test images, the
video and the mesh's colours show: those never apply a correction.

Structure from motion leaves each camera a fraction of a degree and of a percent off; the field then blurs what
the cameras disagree on. ``PoseRefinement`` gives each training image a small rotation about its camera's centre
and a shift of that centre, applied to its rays before they are rendered, centred over the images so that the
scene's frame stays the cameras' (held-out views and the exported mesh use the poses as given). The cameras stay
as given for the first ``model.pose_refinement_start`` steps, while the field takes shape.

The number of training images is known only once the data is read, after the model is built (a wrong model
option is said before the images load); the tables start empty and take their size from the data
(``size_for``) or from a checkpoint (loading resizes them).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

log = logging.getLogger("nsr")

# Training steps before the cameras move (model.pose_refinement_start): until the field has taken shape, its
# errors pull the cameras one way and another (on exact cameras, 0.36 degrees rms at lr 1e-3 from step 0, 0.12
# from step 500: benchmarks/bench_poses.py).
POSES_START = 500


class PerImageTable(nn.Module):
    """``columns``: the names of (N, 3) parameters, one row per training image, zero (no change) at the start."""

    columns: tuple = ()
    what = "per-image table"

    def __init__(self):
        super().__init__()
        for name in self.columns:
            setattr(self, name, nn.Parameter(torch.zeros(0, 3)))

    @property
    def n_images(self) -> int:
        return len(getattr(self, self.columns[0]))

    def _resize(self, n_images: int) -> None:
        device = getattr(self, self.columns[0]).device
        for name in self.columns:
            setattr(self, name, nn.Parameter(torch.zeros(n_images, 3, device=device)))

    def size_for(self, n_images: int) -> None:
        """One row per training image; a table of another size (a checkpoint of another scene, with
        ``--resume_weights_only``) starts again from no change."""
        if self.n_images == n_images:
            return
        if self.n_images:
            log.info(f"The checkpoint's {self.what} is for {self.n_images} images, this data has {n_images}; it "
                     "starts again from no change.")
        self._resize(n_images)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + self.columns[0])
        if saved is not None and len(saved) != self.n_images:
            self._resize(len(saved))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def centred(self) -> tuple[torch.Tensor, ...]:
        """Each column less its mean over the images: (N, 3) each."""
        return tuple(getattr(self, name) - getattr(self, name).mean(0, keepdim=True) for name in self.columns)


class ExposureCorrection(PerImageTable):
    """log_gain, offset: (N, 3) per training image."""

    columns = ("log_gain", "offset")
    what = "exposure correction"

    def gains_and_offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3) gains and (N, 3) offsets, centred: the gains' geometric mean is 1 and the offsets' mean 0."""
        log_gain, offset = self.centred()
        return torch.exp(log_gain), offset

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


class PoseRefinement(PerImageTable):
    """rotation (N, 3) axis-angle about each camera's centre, translation (N, 3) of that centre, in the model's
    frame, per training image; applied (and learned: their gradients are zero before) from step ``start_step``."""

    columns = ("rotation", "translation")
    what = "pose refinement"

    def __init__(self, start_step: int = 0):
        super().__init__()
        self.start_step = start_step
        self.moving = start_step <= 0

    def update_step(self, epoch: int, global_step: int) -> None:
        self.moving = global_step >= self.start_step

    def forward(self, rays_o: torch.Tensor, rays_d: torch.Tensor,
                image_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rays (R, 3) origins and unit directions of the given (R,) training images -> the same from the refined
        cameras. The rotation is taken to second order (R = I + [w] + [w]^2 / 2, renormalised): within 1e-5 radians of
        the exact turn at 2 degrees, and smooth at zero, where Rodrigues' axis is undefined."""
        rotation, translation = (column * float(self.moving) for column in self.centred())  # zero gradients before
        w = rotation[image_index]
        turned = torch.cross(w, rays_d, dim=-1)
        rays_d = torch.nn.functional.normalize(rays_d + turned + 0.5 * torch.cross(w, turned, dim=-1), dim=-1)
        return rays_o + translation[image_index], rays_d


def size_from_checkpoint(module: nn.Module, state: dict) -> None:
    """Size every PerImageTable in ``module`` as ``state`` (a checkpoint's state_dict) holds it, so that the
    shapes match before the state is compared with the config's model."""
    for name, sub in module.named_modules():
        if isinstance(sub, PerImageTable):
            saved = state.get(f"{name}.{sub.columns[0]}" if name else sub.columns[0])
            if saved is not None:
                sub._resize(len(saved))
