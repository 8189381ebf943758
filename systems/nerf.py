"""NeRF system: dynamic ray sampling, background handling and the instant-nsr-pl NeRF losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import systems
from models.rendering import distortion_loss
from systems.base import BaseSystem, masked_mean
from utils.config import ConfigError, number_at_least


@systems.register("nerf-system")
class NeRFSystem(BaseSystem):
    loss_weights = ("lambda_rgb", "lambda_distortion")

    def __init__(self, config, mode: str = "train"):
        super().__init__(config, mode)
        m = config.model
        self.train_num_rays = number_at_least(m.train_num_rays, "model.train_num_rays", 1)
        number_at_least(m.max_train_num_rays, "model.max_train_num_rays", 1)
        self.train_num_samples = self.train_num_rays * int(m.num_samples_per_ray)

    def background(self) -> torch.Tensor:
        """Training background: 'white', 'black' or 'random' (a new colour every step)."""
        kind = str(self.config.model.get("background_color", "random")).lower()
        if kind == "white":
            return torch.ones(3, device=self.device)
        if kind == "black":
            return torch.zeros(3, device=self.device)
        if kind == "random":
            return torch.rand(3, device=self.device)
        raise ConfigError(f"model.background_color must be white, black or random, not '{kind}'.")

    def losses(self, out, rays, rgb):
        """(total loss, {name: term}, {name: its weight}) of one step: smooth-L1 colour on rays that hit
        something, distortion."""
        loss_cfg = self.config.system.loss
        valid = out["rays_valid"][:, 0]
        terms = {"rgb": masked_mean(F.smooth_l1_loss(out[self.rgb_key], rgb, reduction="none"), valid)}
        weights = {"rgb": self.C(loss_cfg.lambda_rgb)}
        loss = terms["rgb"] * weights["rgb"]
        if self.C(loss_cfg.get("lambda_distortion", 0.0)) > 0:
            terms["distortion"] = distortion_loss(out["weights"], out["t_starts"], out["t_ends"], out["ray_indices"],
                                                  len(rgb))
            weights["distortion"] = self.C(loss_cfg.lambda_distortion)
            loss = loss + terms["distortion"] * weights["distortion"]
        return loss, terms, weights

    def training_step(self, batch, batch_idx):
        data = self.data("train")
        rays = self.to_device(data.train_rays(self.train_num_rays,
                                              bool(self.config.model.get("batch_image_sampling", True)),
                                              self.ray_generator))
        bg = self.background()
        self.model.background_color = bg
        rgb = rays["rgb"]
        if data.has_mask and self.config.dataset.get("apply_mask", True):
            m = rays["fg_mask"][:, None]
            rgb = rgb * m + bg * (1.0 - m)
        rays_o, rays_d = rays["rays_o"], rays["rays_d"]
        if self.model.poses is not None:  # each training camera's correction, before its rays are rendered
            rays_o, rays_d = self.model.poses(rays_o, rays_d, rays["index"])
        out = self.model(rays_o, rays_d)
        if self.model.exposure is not None:  # each image's gain and offset on what the fields render for it
            alpha = out.get("opacity_full", out["opacity"])
            out[self.rgb_key] = self.model.exposure(out[self.rgb_key], alpha, bg, rays["index"])

        n_samples = out["num_samples"] + out.get("num_samples_bg", 0)  # host ints: no device read
        if self.config.model.get("dynamic_ray_sampling", True):
            wanted = int(self.train_num_rays * self.train_num_samples / max(n_samples, 1))
            self.train_num_rays = max(1, min(int(self.train_num_rays * 0.9 + wanted * 0.1),
                                             int(self.config.model.max_train_num_rays)))

        loss, terms, weights = self.losses(out, rays, rgb)
        self.loss_guard.record(self.global_step, loss, terms, weights)  # stops training at a non-finite loss
        self.log("train/loss", loss)  # no prog_bar: see show_on_progress_bar
        self.show_on_progress_bar(loss=loss.detach(), rays=self.train_num_rays)
        if self.is_logging_step:  # the rest only when Lightning writes logs: each self.log costs host time
            for name, value in terms.items():
                self.log(f"train/loss_{name}", value)
            for name, value in self.config.system.loss.items():
                if name.startswith("lambda"):
                    self.log(f"train_params/{name}", self.C(value))
            self.log("train/num_rays", float(self.train_num_rays))
            self.log("train/num_samples", float(n_samples))
        return loss
