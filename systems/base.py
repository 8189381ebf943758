"""The LightningModule every system builds on: steps, outputs, test stage and export.

Step-dependent state (occupancy grid, progressive levels, annealing) lives in
module buffers and is saved with the weights; ``update_step`` runs only while
training, so a test after ``--resume`` sees exactly the state the test after
training saw.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, List

import imageio.v2 as imageio
import numpy as np
import pytorch_lightning as pl
import torch
from tqdm import tqdm

import models
from datasets.base import SceneData
from datasets.rays import opencv_to_opengl, rotation_between
from models.base import export_chunk, update_module_step
from systems.finite_guard import FiniteLossGuard
from systems.optim import make_optimizer, make_scheduler
from utils.config import ConfigError, finite_number, number_at_least, schedule_values, scheduled, to_primitive
from utils.io import (VIDEO_MAX_WIDTH, colorize_depth, image_grid, to_uint8, video_frame_size, write_image, write_json,
                      write_video)
from utils.mesh import GLTF_UP, MeshError, face_components, largest_component, write_mesh, write_textured_mesh
from utils.mesh_texture import TextureError, import_texture_tools, textured_mesh
from utils.metrics import ImageMetrics

log = logging.getLogger("nsr")
TRAINING_STREAMS = "nsr_training_streams"  # the checkpoint key of BaseSystem.training_streams


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of values (N, C) over the rows where valid (N,) bool holds; 0 when none does.

    The same as ``values[valid].mean()`` without the boolean indexing, which waits for the device.
    """
    kept = torch.where(valid[:, None], values, torch.zeros_like(values))
    return kept.sum() / (valid.sum() * values.shape[1]).clamp(min=1)


def mean_or_zero(values: torch.Tensor) -> torch.Tensor:
    """Mean of all elements; 0 for an empty tensor (a step whose rays all missed the occupied cells), where
    ``.mean()`` gives NaN and would stop training. The count is a host int: no device read."""
    return values.sum() / max(values.numel(), 1)


def host_values(values: Dict[str, Any]) -> Dict[str, float]:
    """Python floats of tensors (0-d, one device) and numbers, with a single device read for all the tensors."""
    out = {k: float(v) for k, v in values.items() if not torch.is_tensor(v)}
    keys = [k for k, v in values.items() if torch.is_tensor(v)]
    if keys:
        out.update(zip(keys, torch.stack([values[k].detach().float().reshape(()) for k in keys]).tolist()))
    return out


MESH_METHODS = {"mc": "mc", "mc-cuda": "mc", "tsdf": "tsdf"}  # instant-nsr-pl's mc-cuda: the same zero level set
MESH_FORMATS = ("obj", "ply", "glb")


def check_export_options(config: Any) -> None:
    """A ConfigError for a mesh or video option the export after training could not use."""
    iso = config.model.get("geometry", {}).get("isosurface")
    if iso is not None:
        number_at_least(iso.get("resolution"), "model.geometry.isosurface.resolution", 2)
        finite_number(iso.get("threshold", 0.0), "model.geometry.isosurface.threshold")
        if iso.get("chunk") is not None:
            number_at_least(iso.get("chunk"), "model.geometry.isosurface.chunk", 1)
        if iso.get("tsdf_truncation") is not None:
            number_at_least(iso.get("tsdf_truncation"), "model.geometry.isosurface.tsdf_truncation", 0, kind=float,
                            exclusive=True)
        method = str(iso.get("method", "mc"))
        if method not in MESH_METHODS:
            raise ConfigError(f"model.geometry.isosurface.method={method!r} is not a meshing method; use mc "
                              "(marching cubes on the field) or tsdf (fusion of rendered depth).")
    export_cfg = config.get("export") or {}
    fmt = str(export_cfg.get("mesh_format", "obj")).lower()
    if fmt not in MESH_FORMATS:
        raise ConfigError(f"export.mesh_format={fmt!r}; use obj, ply or glb.")
    for key, minimum in (("chunk_size", 1), ("video_fps", 1), ("video_max_width", 0), ("texture_size", 16),
                         ("texture_faces", 4)):
        if export_cfg.get(key) is not None:
            number_at_least(export_cfg.get(key), f"export.{key}", minimum)
    if export_cfg.get("textured", False) not in (True, False):
        raise ConfigError(f"export.textured={export_cfg.get('textured')!r}; use true or false.")
    if export_cfg.get("textured", False) and iso is not None:
        try:  # before training, not after it
            import_texture_tools()
        except TextureError as err:
            raise ConfigError(str(err)) from None


class BaseSystem(pl.LightningModule):
    """mode: 'train' (fit then test), 'test' (metrics + video + mesh) or 'export' (video + mesh only)."""

    rgb_key = "comp_rgb"  # the model output compared with the images
    loss_weights: tuple = ()  # the system.loss.lambda_* keys this system implements

    def __init__(self, config: Any, mode: str = "train"):
        super().__init__()
        self.config = config
        self.mode = mode
        self.mesh_error: str | None = None  # why the export wrote no mesh (launch's --export exits non-zero)
        self.model = models.make(config.model.name, config.model)
        self.metrics = ImageMetrics(lpips=False)  # validation: PSNR for the progress bar
        self.test_metrics = None  # built as the test starts (LPIPS may load a network), on the model's device
        self.validated_views = 0  # in the validation under way (trainer.limit_val_batches may cut it short)
        self.register_buffer("trained_steps", torch.tensor(0, dtype=torch.long))
        self.progress_bar_values: Dict[str, float] = {}  # what utils.callbacks.ProgressBar shows while training
        self._progress_pending: Dict[str, Any] = {}
        self.loss_guard = FiniteLossGuard()  # systems record each step's loss in it
        self.seed = int(config.get("seed", 42))
        self._continued_streams = None  # a checkpoint's training_streams, applied at on_train_start
        check_export_options(config)  # now, not when the mesh is due after training
        if mode == "train":
            self.check_loss_weights(config.system.get("loss", {}))
            steps = config.get("trainer", {}).get("max_steps")
            if steps is not None and int(steps) > 0:  # Lightning's -1: no step limit
                self.model.check_schedule(int(steps))
            params = config.system.optimizer.get("params")
            for part, key, what, lr in (("exposure", "exposure_correction", "a gain and an offset", 0.01),
                                        ("poses", "pose_refinement", "a rotation and a shift", 0.0003)):
                if getattr(self.model, part) is not None and params is not None and part not in params:
                    raise ConfigError(f"model.{key} learns {what} per image, which needs a learning rate: add "
                                      f"system.optimizer.params.{part} (e.g. +system.optimizer.params.{part}.lr={lr}, "
                                      "the shipped configs' rate).")

    def check_loss_weights(self, loss_cfg: Any) -> None:
        """Every weight is a finite number or schedule, none negative (that would reward its loss); warn once about
        non-zero weights of losses this system does not have (an instant-nsr-pl YAML may carry some), rather
        than silently training without them."""
        for key, value in loss_cfg.items():
            if not key.startswith("lambda_"):
                continue
            try:
                values = schedule_values(value)
            except ConfigError:
                raise ConfigError(f"system.loss.{key} = {to_primitive(value)!r} must be a number or "
                                  "[start_step, start_value, end_value, end_step].") from None
            if not all(math.isfinite(v) for v in values):  # nan dropped NeuS's term and made NeRF's loss nan
                raise ConfigError(f"system.loss.{key} = {to_primitive(value)} is not a finite number; give a weight "
                                  ">= 0 (0 switches a loss off).")
            if min(values) < 0:
                raise ConfigError(f"system.loss.{key} = {to_primitive(value)} is negative, which would reward "
                                  "that loss instead of penalising it; 0 switches a loss off.")
            if key not in self.loss_weights and max(values) > 0:
                log.warning(f"system.loss.{key} = {to_primitive(value)} is not a loss of {type(self).__name__}; "
                            f"it is ignored (known: {', '.join(self.loss_weights)}).")

    # ------------------------------------------------------------------ plumbing
    @property
    def save_dir(self) -> str:
        return self.config.save_dir

    @property
    def step(self) -> int:
        """Optimisation steps behind the current weights (restored from checkpoints)."""
        return int(self.trained_steps)

    def C(self, value: Any) -> float:
        return scheduled(value, self.global_step)

    def data(self, stage: str) -> SceneData:
        return getattr(self.trainer.datamodule, f"{stage}_data")

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        n_images = self.data("train").n_images  # the training images are known now: size the per-image tables
        if self.model.exposure is not None:
            self.model.exposure.size_for(n_images)
            log.info(f"Exposure correction: a gain and an offset per colour channel for each of the {n_images} "
                     "training images; evaluation renders the field's own colours, the images' average exposure.")
        if self.model.poses is not None:
            self.model.poses.size_for(n_images)
            log.info(f"Pose refinement: a rotation and a shift of each of the {n_images} training cameras, centred "
                     f"over them, from step {self.model.poses.start_step}; held-out views and the mesh keep the poses "
                     "as given.")

    def configure_optimizers(self):
        clipping = bool(self._trainer is not None and self.trainer.gradient_clip_val)
        optimizer = make_optimizer(self.config.system.optimizer, self.model, fused_default=not clipping)
        if clipping and optimizer.defaults.get("fused") and str(self.trainer.precision) == "16-mixed":
            raise ConfigError("system.optimizer.args.fused=true cannot clip gradients under 16-bit mixed precision "
                              "(it unscales them inside its step); drop trainer.gradient_clip_val or the fused flag.")
        self.loss_guard.attach(optimizer)
        if self.config.system.get("scheduler") is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": make_scheduler(self.config.system.scheduler, optimizer)}

    def on_fit_start(self):
        # rays are drawn on the CPU from this generator; one stream per DDP rank, so ranks see different rays
        self.ray_generator = torch.Generator().manual_seed(self.seed + self.global_rank)
        if self.trainer.is_global_zero and self.trainer.datamodule.write_overview(self.save_path("scene-overview.ply")):
            log.info(f"Cameras, sparse points and region of interest: {self.save_path('scene-overview.ply')}")

    def on_train_batch_start(self, batch, batch_idx):
        update_module_step(self.model, self.current_epoch, self.global_step)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.trained_steps.fill_(self.global_step)
        if self.global_step % self.PROGRESS_EVERY == 0:  # one read, after the whole step was queued
            values = dict(self._progress_pending)
            self._progress_pending.clear()
            if self.loss_guard.deferred:
                values["non-finite loss"] = self.loss_guard.flag
            values = host_values(values)
            self.loss_guard.check(values.pop("non-finite loss", None))
            self.progress_bar_values.update(values)

    def on_train_end(self):
        self.loss_guard.check()  # the steps since the last progress read

    def on_save_checkpoint(self, checkpoint):
        # callbacks save before this module's on_train_batch_end: record the step the weights are at (behind the
        # run's count after a non-finite loss, whose updates the optimiser skipped)
        weights_step = self.loss_guard.weights_step
        checkpoint["state_dict"]["trained_steps"] = torch.tensor(
            checkpoint.get("global_step", self.global_step) if weights_step is None else weights_step)
        if self._trainer is not None:
            checkpoint[TRAINING_STREAMS] = self.training_streams()

    def training_streams(self) -> Dict[str, Any]:
        """What a continued run needs, beyond what Lightning restores, to go on as if it had not stopped: the ray
        sampler's and torch's random streams (the rays, the random background, the occupancy grid's samples) and
        the dynamic ray count. With them, a run stopped at step k and continued trains the same weights as one
        that ran through (bit for bit on a CPU)."""
        streams = {"torch": torch.get_rng_state(), "seed": self.seed}
        if getattr(self, "ray_generator", None) is not None:
            streams["rays"] = self.ray_generator.get_state()
        if self.device.type == "cuda":
            streams["cuda"] = torch.cuda.get_rng_state(self.device)
        if hasattr(self, "train_num_rays"):
            streams["train_num_rays"] = int(self.train_num_rays)
        return streams

    def on_load_checkpoint(self, checkpoint):
        self._continued_streams = checkpoint.get(TRAINING_STREAMS)

    def on_train_start(self):
        streams, self._continued_streams = self._continued_streams, None
        if not streams:  # a fresh run, or a checkpoint of an older version
            return
        if self.trainer.world_size > 1:  # only rank 0's streams are saved: each rank draws a stream of its own
            self.ray_generator.manual_seed(self.seed + self.global_rank + 1_000_003 * self.global_step)
        else:
            torch.set_rng_state(streams["torch"])
            if "rays" in streams:
                self.ray_generator.set_state(streams["rays"])
            if "cuda" in streams and self.device.type == "cuda":
                torch.cuda.set_rng_state(streams["cuda"], self.device)
        if "train_num_rays" in streams and hasattr(self, "train_num_rays"):
            self.train_num_rays = int(streams["train_num_rays"])

    @property
    def is_logging_step(self) -> bool:
        """Whether Lightning writes this training step's logs (every ``trainer.log_every_n_steps``)."""
        n = self.trainer.log_every_n_steps
        return n > 0 and (self.global_step + 1) % n == 0

    PROGRESS_EVERY = 10  # steps between updates of the values on the progress bar

    def show_on_progress_bar(self, **values) -> None:
        """Values (tensors or numbers) for the progress bar, taken every ``PROGRESS_EVERY`` steps and read
        at the step's end (``utils.callbacks.ProgressBar`` shows them). Lightning's ``prog_bar=True``
        turns every such value logged in the epoch into a Python float at every step: a device read that
        makes the host wait for the GPU, costing the overlap of one step's end with the next one's start."""
        if (self.global_step + 1) % self.PROGRESS_EVERY == 0:  # read in on_train_batch_end, after the step
            self._progress_pending.update(values)

    def to_device(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Host tensors -> this module's device; to a GPU through pinned memory, without blocking the host."""
        if self.device.type == "cpu":
            return batch
        if self.device.type == "cuda":
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        return {k: v.to(self.device) for k, v in batch.items()}

    def on_before_optimizer_step(self, optimizer):
        """Stop before a non-finite loss reaches the weights, where the optimiser cannot skip its update on a
        device flag (``systems.finite_guard``). Read here, after the backward has been queued, so the read
        does not stall the device between forward and backward."""
        self.loss_guard.check_now()

    # ------------------------------------------------------------------ outputs
    def save_path(self, name: str) -> str:
        return os.path.join(self.save_dir, name)

    def eval_panels(self, out: Dict[str, torch.Tensor], data: SceneData, with_gt: bool, gt: torch.Tensor | None
                    ) -> List[np.ndarray]:
        """uint8 panels of one image: [ground truth,] render, [normal,] depth (jet), opacity. The normal panel
        (NeuS) shows the composited surface normal in the model's frame as colour, (n + 1) / 2, over white where
        the ray meets nothing: the way instant-nsr-pl and NeuS users judge a surface before meshing it."""
        h, w = data.height, data.width
        rgb = to_uint8(out[self.rgb_key].view(h, w, 3).cpu().numpy())
        opacity = out["opacity"].view(h, w).cpu().numpy()
        # the distance of the surface the ray sees: "depth" is weighted by opacity, which put a silhouette's edge
        # nearest and squeezed the rest of the image into one colour
        depth = colorize_depth(out["depth"].view(h, w).cpu().numpy() / np.maximum(opacity, 1e-6), opacity)
        panels = [rgb, depth, to_uint8(opacity)]
        if "comp_normal" in out:
            normal = out["comp_normal"].view(h, w, 3).cpu().numpy() * 0.5 + 0.5
            panels.insert(1, to_uint8(normal * opacity[..., None] + (1.0 - opacity[..., None])))
        if with_gt and gt is not None:
            panels.insert(0, to_uint8(gt.view(h, w, 3).cpu().numpy()))
        return panels

    def render_image(self, stage: str | SceneData, index: int) -> tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Render image ``index`` of a split (a stage name or the data) on a white background;
        returns (model output, rays/gt batch)."""
        data = self.data(stage) if isinstance(stage, str) else stage
        batch = {k: v.to(self.device) for k, v in data.image_rays(index).items()}
        self.model.background_color = torch.ones(3, device=self.device)
        if data.has_mask and self.config.dataset.get("apply_mask", True):
            m = batch["fg_mask"][:, None]
            batch["rgb"] = batch["rgb"] * m + (1.0 - m)
        return self.model(batch["rays_o"], batch["rays_d"]), batch

    def validation_step(self, batch, batch_idx):
        index = int(batch["index"][0])
        if index < 0:  # on several devices, a rank whose share of the views is one short (datasets.base)
            return
        data = self.data("val")  # held-out views, or training views when none is (datasets.base.validation_split)
        out, rays = self.render_image("val", index)
        self.metrics.update(out[self.rgb_key].view(data.height, data.width, 3),
                            rays["rgb"].view(data.height, data.width, 3))
        write_image(self.save_path(f"it{self.step}-{index}.png"),
                    image_grid(self.eval_panels(out, data, True, rays["rgb"])))
        self.validated_views += 1

    def on_validation_epoch_end(self):
        scores = self.metrics.compute()
        self.log("val/psnr", scores["psnr"], prog_bar=True, sync_dist=True)
        self.metrics.reset()
        if self.mode == "validate":  # training's validations show on the bar
            views = int(self.trainer.strategy.reduce(torch.tensor(self.validated_views, device=self.device),
                                                     reduce_op="sum"))  # every rank's share
            what = "training views (none is held out)" if self.data("val").trained_on else "held-out views"
            if self.trainer.is_global_zero:
                log.info(f"Validation: {views} {what}, PSNR {float(scores['psnr']):.2f}: "
                         f"{self.save_path(f'it{self.step}-<view>.png')}")
        self.validated_views = 0

    def on_test_epoch_start(self):
        if self.mode != "export" and self.data("test").has_gt and self.test_metrics is None:
            # torchmetrics keeps its sums where the module is: on the GPU with the images it scores
            self.test_metrics = ImageMetrics(lpips=self.config.system.get("lpips", True)).to(self.device)

    def test_step(self, batch, batch_idx):
        index = int(batch["index"][0])
        if index < 0:  # on several devices, a rank whose share of the views is one short (datasets.base)
            return
        data = self.data("test")
        out, rays = self.render_image("test", index)
        with_gt = self.mode != "export" and data.has_gt
        if with_gt:
            h, w = data.height, data.width
            self.test_metrics.update(out[self.rgb_key].view(h, w, 3), rays["rgb"].view(h, w, 3))
        write_image(self.save_path(f"it{self.step}-test/{index}.png"),
                    image_grid(self.eval_panels(out, data, with_gt, rays["rgb"])))

    def on_test_epoch_end(self):
        if self.mode != "export" and self.data("test").has_gt:
            scores = self.test_metrics.compute()
            self.test_metrics.reset()
            for key, value in scores.items():
                self.log(f"test/{key}", value, prog_bar=True, sync_dist=True)
        self.trainer.strategy.barrier()
        if self.trainer.is_global_zero:
            trajectory = self.trainer.datamodule.trajectory()
            if trajectory is not None:
                self.render_trajectory(trajectory)
            self.write_test_video("test-orbit" if trajectory is not None else "test")
            self.export_mesh()

    @torch.no_grad()
    def render_trajectory(self, data: SceneData) -> None:
        """Frames along the video trajectory when the test split is held-out views rather than an orbit."""
        for index in tqdm(range(data.n_images), desc="rendering the video trajectory", leave=False):
            out, _ = self.render_image(data, index)
            write_image(self.save_path(f"it{self.step}-test-orbit/{index}.png"),
                        image_grid(self.eval_panels(out, data, False, None)))

    @torch.no_grad()
    def fuse_mesh(self, iso: Any) -> Dict[str, np.ndarray]:
        """``isosurface.method: tsdf``: depth and colour rendered at the training views, fused into a
        truncated signed distance volume over the model's box at ``isosurface.resolution`` voxels a side
        (truncation ``isosurface.tsdf_truncation`` voxels, default 3), then marching cubes. Needs no
        density threshold, so it also suits NeRF fields. Model frame, as ``model.export``."""
        from utils.tsdf import TSDFVolume

        r = float(self.config.model.radius)
        voxel = 2 * r / int(iso.resolution)
        volume = TSDFVolume(np.array([[-r] * 3, [r] * 3]), voxel, float(iso.get("tsdf_truncation", 3)) * voxel,
                            device=self.device)
        data = self.trainer.datamodule.split("train")
        for index in tqdm(range(data.n_images), desc="fusing rendered depth", leave=False):
            out, rays = self.render_image(data, index)
            c2w = data.c2w[index].double()
            forward = -c2w[:, 2].to(rays["rays_d"])
            opacity = out["opacity"].view(-1)
            t = out["depth"].view(-1) / opacity.clamp(min=1e-6)  # expected distance of the visible surface
            z = torch.where(opacity > 0.5, t * (rays["rays_d"] @ forward), torch.zeros_like(t))
            z = z.view(data.height, data.width)
            fx, fy, cx, cy = data.intrinsics[index].tolist()
            c2w_cv = np.eye(4)
            c2w_cv[:3] = opencv_to_opengl(c2w).numpy()  # the flip is its own inverse: OpenGL -> OpenCV
            volume.integrate(z.cpu().numpy(), np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]]), c2w_cv,
                             out[self.rgb_key].view(data.height, data.width, 3).clamp(0, 1).cpu().numpy())
        verts, faces, colours = volume.extract_mesh()
        return {"v_pos": verts, "t_pos_idx": faces, "v_rgb": colours}

    def export_textured_mesh(self, name: str, verts: np.ndarray, faces: np.ndarray, file_from_scene: np.ndarray):
        """export.textured: a copy of the mesh (model frame (V, 3), (F, 3)) decimated to export.texture_faces,
        with the model's surface colours in a texture of export.texture_size texels a side, written as ``name``
        (OBJ + MTL + PNG, or GLB) with its vertices mapped by the (4, 4) ``file_from_scene``."""
        export_cfg = self.config.get("export") or {}
        size = int(export_cfg.get("texture_size", 2048))
        chunk = export_chunk(export_cfg, self.model.ray_chunk, self.device)
        path = self.save_path(name)
        try:
            mesh = textured_mesh(verts, faces, lambda p, n: self.model.surface_colours(p, n, chunk), size,
                                 int(export_cfg.get("texture_faces", 100000)), name=os.path.splitext(name)[0])
        except TextureError as err:
            log.error(f"Textured mesh skipped: {err}")
            return
        mesh.vertices = np.asarray(mesh.vertices) @ file_from_scene[:3, :3].T + file_from_scene[:3, 3]
        write_textured_mesh(path, mesh)
        also = f" with {os.path.splitext(name)[0]}.mtl and .png beside it" if path.endswith(".obj") else ""
        log.info(f"Textured mesh: {path} ({len(mesh.faces)} faces, a {size}x{size} texture{also})")

    def write_test_video(self, kind: str) -> None:
        """The frames in it{step}-{kind}/, in order, as it{step}-{kind}.mp4 (read back from disk: under DDP
        each rank wrote some)."""
        folder = self.save_path(f"it{self.step}-{kind}")
        names = sorted((f for f in os.listdir(folder) if f[:-4].isdigit() and f.endswith(".png")),
                       key=lambda f: int(f[:-4]))
        if names:  # read one frame at a time as it is encoded: 200 grids of 800x3200 would be 1.5 GB at once
            export_cfg = self.config.get("export") or {}
            max_width = int(export_cfg.get("video_max_width", VIDEO_MAX_WIDTH))
            path = self.save_path(f"it{self.step}-{kind}.mp4")
            count = write_video(path, (imageio.imread(os.path.join(folder, f)) for f in names),
                                fps=int(export_cfg.get("video_fps", 30)), max_width=max_width)
            height, width = imageio.imread(os.path.join(folder, names[0])).shape[:2]
            size = video_frame_size(width, height, max_width)
            scaled = f", scaled from {width}x{height}: export.video_max_width={max_width}" if size[0] < width else ""
            log.info(f"Test video: {path} ({count} frame{'s' * (count != 1)}, {size[0]}x{size[1]}{scaled})")

    def export_mesh(self) -> None:
        """Marching-cubes mesh in the dataset's world frame (and, with export.save_normalized, the model's frame).

        export.largest_component_only keeps the biggest connected piece (drops floaters).
        """
        export_cfg = self.config.get("export", {})
        iso = self.config.model.get("geometry", {}).get("isosurface")
        if iso is None:
            log.info("No mesh: the config has no model.geometry.isosurface.")
            return
        res = int(iso.resolution)
        tsdf = MESH_METHODS[str(iso.get("method", "mc"))] == "tsdf"
        try:
            mesh = self.fuse_mesh(iso) if tsdf else self.model.export(export_cfg)
        except MeshError as err:
            self.mesh_error = str(err)
            log.error(f"Mesh export skipped: {err}")
            return
        verts, faces, colours = mesh["v_pos"], mesh["t_pos_idx"], mesh.get("v_rgb")
        pieces = ""
        if export_cfg.get("largest_component_only", False):
            n_before = len(faces)
            verts, faces, colours = largest_component(verts, faces, colours)
            log.info(f"Kept the largest connected component: {len(faces)} of {n_before} faces")
        else:  # floaters said, with the option that drops them
            sizes = np.bincount(face_components(verts, faces))
            if len(sizes) > 1:
                pieces = (f", {len(sizes)} pieces, {len(faces) - sizes.max()} faces outside the largest: "
                          "export.largest_component_only=true keeps only it")
        world = self.trainer.datamodule.world_from_scene()
        world_verts = verts @ world[:3, :3].T + world[:3, 3]
        fmt = str(export_cfg.get("mesh_format", "obj")).lower()
        stem = f"it{self.step}-{'tsdf' if tsdf else 'mc'}{res}"  # instant-nsr-pl's it{step}-{method}{resolution}
        path = self.save_path(f"{stem}.{fmt}")
        frames = {"world_from_scene": np.asarray(world).tolist()}
        note = "x_scene = inverse(world_from_scene) @ x_world"
        if fmt == "glb":  # glTF is y-up: turned so that the capture stands upright in viewers, AR and Blender
            up = self.trainer.datamodule.world_up()
            gltf_from_world, gltf_from_scene = np.eye(4), np.eye(4)
            gltf_from_world[:3, :3] = rotation_between(up, GLTF_UP)
            gltf_from_scene[:3, :3] = rotation_between(np.linalg.solve(world[:3, :3], up), GLTF_UP)
            frames.update(gltf_from_world=gltf_from_world.tolist(), gltf_from_scene=gltf_from_scene.tolist())
            note = (f"glTF is y-up: the GLB meshes are the world frame turned by gltf_from_world (*-normalized.glb: "
                    f"the model's frame by gltf_from_scene), the capture's up along +y; {note}")
        else:
            gltf_from_world = gltf_from_scene = np.eye(4)
        write_mesh(path, world_verts @ gltf_from_world[:3, :3].T, faces, colours)
        if export_cfg.get("save_normalized", False):
            write_mesh(self.save_path(f"{stem}-normalized.{fmt}"), verts @ gltf_from_scene[:3, :3].T, faces,
                       colours)
        write_json(self.save_path("normalization.json"), {
            **frames, "note": f"meshes are in the dataset's world frame (*-normalized.{fmt}: the model's frame); "
                              f"{note}"})
        log.info(f"Mesh: {path} ({len(verts)} vertices, {len(faces)} faces{pieces})")
        if export_cfg.get("textured", False):
            self.export_textured_mesh(f"{stem}-textured.{'glb' if fmt == 'glb' else 'obj'}", verts, faces,
                                      gltf_from_world @ world)
        scores = self.trainer.datamodule.score_mesh(world_verts, faces)
        if scores is not None:  # named after its mesh: meshes of other resolutions or methods keep their own
            write_json(self.save_path(f"{stem}-metrics.json"), {"mesh": os.path.basename(path), **scores})
            log.info("Mesh vs ground truth: " + ", ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4g}"
                                                          for k, v in scores.items()))
