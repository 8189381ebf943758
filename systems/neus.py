"""NeuS system: the instant-nsr-pl NeuS losses, each computed only when its weight is non-zero."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

import systems
from models.rendering import distortion_loss
from systems.base import masked_mean, mean_or_zero
from systems.nerf import NeRFSystem
from utils.config import ConfigError, peak

log = logging.getLogger("nsr")


@systems.register("neus-system")
class NeuSSystem(NeRFSystem):
    """Rays, background and dynamic ray count as the NeRF system; the losses are NeuS's."""

    rgb_key = "comp_rgb_full"
    loss_weights = ("lambda_rgb_mse", "lambda_rgb_l1", "lambda_eikonal", "lambda_mask", "lambda_opaque",
                    "lambda_sparsity", "lambda_curvature", "lambda_distortion", "lambda_distortion_bg")

    def check_loss_weights(self, loss_cfg):
        super().check_loss_weights(loss_cfg)
        if peak(loss_cfg.get("lambda_curvature", 0.0)) > 0 and self.model.geometry.grad_type != "finite_difference":
            raise ConfigError("system.loss.lambda_curvature needs model.geometry.grad_type=finite_difference "
                              "(the Laplacian comes from the finite differences); set that, or "
                              "system.loss.lambda_curvature=0.")

    def on_fit_start(self):
        super().on_fit_start()
        data = self.data("train")
        if self.C(self.config.system.loss.get("lambda_mask", 0.0)) > 0 and not data.has_mask:
            log.warning("system.loss.lambda_mask is set but the dataset has no masks: the mask loss is off.")

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
