"""NeuS system: the instant-nsr-pl NeuS losses, each computed only when its weight is non-zero."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

import systems
from models.rendering import distortion_loss
from systems.base import masked_mean, mean_or_zero
from systems.nerf import NeRFSystem
from utils.config import ConfigError, number_at_least, peak

log = logging.getLogger("nsr")


@systems.register("neus-system")
class NeuSSystem(NeRFSystem):
    """Rays, background and dynamic ray count as the NeRF system; the losses are NeuS's."""

    rgb_key = "comp_rgb_full"
    loss_weights = ("lambda_rgb_mse", "lambda_rgb_l1", "lambda_eikonal", "lambda_mask", "lambda_opaque",
                    "lambda_sparsity", "lambda_curvature", "lambda_distortion", "lambda_distortion_bg",
                    "lambda_sparse_points", "lambda_free_space")
    free_sightlines = None  # (S, 2, 3) (camera, point) pairs, normalised, on the model's device
    surface_points = None  # (P, 3) SfM points inside the model's box, on its device, for lambda_sparse_points
    sparse_points_per_step = 1024

    def check_loss_weights(self, loss_cfg):
        super().check_loss_weights(loss_cfg)
        self.sparse_points_per_step = number_at_least(loss_cfg.get("sparse_points_per_step", 1024),
                                                       "system.loss.sparse_points_per_step", 1)
        if peak(loss_cfg.get("lambda_curvature", 0.0)) > 0 and self.model.geometry.grad_type != "finite_difference":
            raise ConfigError("system.loss.lambda_curvature needs model.geometry.grad_type=finite_difference "
                              "(the Laplacian comes from the finite differences); set that, or "
                              "system.loss.lambda_curvature=0.")

    def on_fit_start(self):
        super().on_fit_start()
        data = self.data("train")
        if self.C(self.config.system.loss.get("lambda_mask", 0.0)) > 0 and not data.has_mask:
            log.warning("system.loss.lambda_mask is set but the dataset has no masks: the mask loss is off.")
        if peak(self.config.system.loss.get("lambda_sparse_points", 0.0)) > 0:
            self.surface_points = self.points_inside(self.trainer.datamodule.sparse_points())
        if peak(self.config.system.loss.get("lambda_free_space", 0.0)) > 0:
            self.free_sightlines = self.sightlines_on_device(self.trainer.datamodule.free_sightlines())

    def sightlines_on_device(self, lines):
        """(S, 2, 3) sightlines -> a tensor on the model's device; None (and a warning) when there are none."""
        if lines is None or not len(lines):
            log.warning("system.loss.lambda_free_space is set but the dataset has no sightlines (a COLMAP capture "
                        "has them): the free-space loss is off.")
            return None
        log.info(f"Free-space loss: {len(lines)} sightlines from cameras to the sparse points they see; "
                 f"{self.sparse_points_per_step} of them each step.")
        return torch.as_tensor(lines, dtype=torch.float32, device=self.device)

    def points_inside(self, points):
        """(P, 3) sparse points -> those inside the model's box [-radius, radius]^3, as a tensor on its device;
        None (and a warning) when there are none."""
        if points is None or not len(points):
            log.warning("system.loss.lambda_sparse_points is set but the dataset has no sparse points (a COLMAP "
                        "capture, or a transforms.json naming a ply_file_path, has them): the sparse-point loss is "
                        "off.")
            return None
        inside = points[(abs(points) < self.model.radius).all(1)]
        log.info(f"Sparse-point loss: {len(inside)} of the {len(points)} sparse points lie inside the scene's box "
                 f"(model.radius {self.model.radius:g}); the SDF is pulled to zero at "
                 f"{self.sparse_points_per_step} of them each step.")
        if not len(inside):
            log.warning("No sparse point lies inside the scene's box: the sparse-point loss is off.")
            return None
        return torch.as_tensor(inside, dtype=torch.float32, device=self.device)

    def sparse_point_loss(self) -> torch.Tensor:
        """Mean |SDF| at a random batch of the SfM points (Geo-NeuS's explicit SDF supervision): they lie on
        surfaces, so the zero level set is pulled through them, where photometric losses alone are slow to put
        it without masks."""
        return self.model.geometry.sdf(self.random_batch(self.surface_points)).abs().mean()

    def random_batch(self, rows: torch.Tensor) -> torch.Tensor:
        """``sparse_points_per_step`` of ``rows`` (or all, if fewer) drawn at random with replacement."""
        return rows[torch.randint(len(rows), (min(self.sparse_points_per_step, len(rows)),), device=rows.device)]

    def free_space_loss(self) -> torch.Tensor:
        """Mean relu(-SDF) at one point per sightline of a random batch, drawn on the part of the line from the
        camera to its sparse point that lies in the box [-radius, radius]^3 and stops 0.1 radius short of the
        point: space a camera saw through is outside every surface, the surroundings painted inside the box too."""
        chosen = self.random_batch(self.free_sightlines)
        camera, point = chosen[:, 0], chosen[:, 1]
        d = point - camera
        r = self.model.radius
        reach = (1.0 - 0.1 * r / d.norm(dim=-1)).clamp(min=0.0)  # the part of camera -> point short of the point
        safe = torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
        near, far = (-r - camera) / safe, (r - camera) / safe  # where the line crosses each pair of box faces
        enter = torch.minimum(near, far).amax(-1).clamp(min=0.0)
        leave = torch.minimum(torch.maximum(near, far).amin(-1), reach)
        inside = leave > enter
        t = enter + torch.rand_like(enter) * (leave - enter).clamp(min=0.0)
        sdf = self.model.geometry.sdf(camera + t[:, None] * d)
        return (torch.relu(-sdf) * inside).sum() / inside.sum().clamp(min=1)

    def losses(self, out, rays, rgb):
        """(total loss, {name: term}, {name: its weight}) of one step: the terms whose weight is above 0 now."""
        loss_cfg = self.config.system.loss
        n_rays = len(rgb)
        valid = out["rays_valid_full"][:, 0]
        terms, weights = {}, {}

        def add(name, weight_key, fn):
            w = self.C(loss_cfg.get(weight_key, 0.0))
            if w > 0:
                terms[name], weights[name] = fn(), w

        add("rgb_mse", "lambda_rgb_mse", lambda: masked_mean((out[self.rgb_key] - rgb).square(), valid))
        add("rgb_l1", "lambda_rgb_l1", lambda: masked_mean((out[self.rgb_key] - rgb).abs(), valid))
        add("eikonal", "lambda_eikonal",  # the gradient's norm as the model took it for the normals
            lambda: mean_or_zero((out["sdf_grad_norm_samples"] - 1.0) ** 2))
        opacity = out["opacity"][:, 0].clamp(1e-3, 1.0 - 1e-3)
        if self.data("train").has_mask:
            add("mask", "lambda_mask", lambda: F.binary_cross_entropy(opacity, rays["fg_mask"]))
        add("opaque", "lambda_opaque", lambda: F.binary_cross_entropy(opacity, opacity))
        add("sparsity", "lambda_sparsity",
            lambda: mean_or_zero(torch.exp(-float(loss_cfg.get("sparsity_scale", 1.0)) * out["sdf_samples"].abs())))
        add("curvature", "lambda_curvature", lambda: mean_or_zero(out["sdf_laplace_samples"].abs()))
        if self.surface_points is not None:
            add("sparse_points", "lambda_sparse_points", self.sparse_point_loss)
        if self.free_sightlines is not None:
            add("free_space", "lambda_free_space", self.free_space_loss)
        add("distortion", "lambda_distortion",
            lambda: distortion_loss(out["weights"], out["t_starts"], out["t_ends"], out["ray_indices"], n_rays))
        if "weights_bg" in out:
            add("distortion_bg", "lambda_distortion_bg",
                lambda: distortion_loss(out["weights_bg"], out["t_starts_bg"], out["t_ends_bg"],
                                        out["ray_indices_bg"], n_rays))
        loss = sum(terms[k] * weights[k] for k in terms)
        self.show_on_progress_bar(inv_s=self.model.variance.inv_s.detach())
        if self.is_logging_step:
            self.log("train/inv_s", self.model.variance.inv_s.detach())
        return loss, terms, weights
