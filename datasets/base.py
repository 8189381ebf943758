"""What every loader produces, and the Lightning data module around it.

A loader turns its format into a ``SceneData`` per split: images, masks,
OpenGL camera-to-world matrices and per-image intrinsics, all on the CPU.
The system samples rays from it (``train_rays``, ``image_rays``); the data
loaders only hand out image indices, as in instant-nsr-pl.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from datasets.rays import (VIDEO_TRAJECTORIES, get_rays, image_directions, level_up, opencv_to_opengl,
                          pixel_directions)
from utils.config import ConfigError, number_at_least

log = logging.getLogger("nsr")


class DatasetError(ValueError):
    """Bad or missing input data; the message says what is wrong and what to do."""


def where_the_scene_is(root: str, holds_scene: Callable[[str], bool], option: str = "dataset.root_dir=") -> str:
    """The sentence that ends a "not a scene" error for ``dataset.root_dir=root``: the scene folder it lies in (a
    scene's ``image/`` or ``train/`` given in its place), or the scenes it holds (the dataset's own folder, the
    scene left out), by ``holds_scene(folder)``; "" when neither. ``option`` precedes the folder named: "" for a
    script's argument."""
    path = os.path.normpath(root)
    parent = os.path.dirname(path)
    if parent and holds_scene(parent):
        return f" {root} lies inside the scene folder {parent}: give that, {option}{parent}."
    scenes = sorted(d for d in os.listdir(path) if holds_scene(os.path.join(path, d))) if os.path.isdir(path) else []
    if not scenes:
        return ""
    listed = ", ".join(scenes[:4]) + (", ..." if len(scenes) > 4 else "")
    return (f" {root} holds {len(scenes)} scene{'s' if len(scenes) > 1 else ''} ({listed}): give "
            f"{'one, e.g.' if len(scenes) > 1 else 'it,'} {option}{os.path.join(root, scenes[0])}.")


CAMERAS_FILES = ("cameras_sphere.npz", "cameras.npz")  # NeuS's and IDR's names for a DTU-format scene's cameras


def holds_transforms(folder: str) -> bool:
    """Whether ``folder`` is a Blender-format scene (NeRF-synthetic's per-split files, or one transforms.json)."""
    return any(os.path.isfile(os.path.join(folder, f"transforms{name}.json")) for name in ("_train", ""))


def has_model(folder: str) -> bool:
    """Whether ``folder`` holds a COLMAP model (binary or text)."""
    return any(os.path.isfile(os.path.join(folder, f"cameras.{ext}")) for ext in ("bin", "txt"))


# dataset.name -> (what a scene folder of that loader is, by what it holds; whether a folder is one). Here, not in
# the loaders: a loader's own code is what utils.config_keys takes as reading its options, so none imports another
SCENE_LAYOUTS = {
    "blender": ("a Blender/NeRF-synthetic or instant-ngp scene (transforms*.json)", holds_transforms),
    "dtu": ("a NeuS/IDR (DTU-format) scene (cameras_sphere.npz or cameras.npz)",
            lambda folder: any(os.path.isfile(os.path.join(folder, f)) for f in CAMERAS_FILES)),
    "colmap": ("a COLMAP capture (a model in sparse/)",
               lambda folder: any(has_model(os.path.join(folder, *sub)) for sub in (("sparse", "0"), ("sparse",)))),
}


def other_layout_hint(root: str, loader: str) -> str:
    """The sentence that ends a "not a scene" error of the ``loader`` (a ``dataset.name``) when ``root`` is a scene
    of another loader's layout (a DTU folder given to a COLMAP config, a Blender scene to a DTU one): what it is and
    the configs that read it; "" when it is none of them."""
    parent = os.path.dirname(os.path.normpath(root))
    for folder, inside in ((root, False), (parent, True)):  # the scene, or a folder of it (its image/, train/)
        for name, (what, holds) in SCENE_LAYOUTS.items():
            if name != loader and folder and os.path.isdir(folder) and holds(folder):
                configs = configs_reading(name)
                others = f" (or {', '.join(configs[1:])})" if configs[1:] else ""
                given = f" dataset.root_dir={folder}" if inside else ""
                run_it = f": run it with --config {configs[0]}{given}{others}" if configs else f" (dataset.name={name})"
                return f" {root} lies inside {folder}, which is {what}{run_it}." if inside else \
                    f" {root} is {what}{run_it}."
    return ""


def configs_reading(loader: str) -> List[str]:
    """The project's configs (as a user types their paths) whose dataset is read by ``loader``."""
    import glob

    from omegaconf import OmegaConf

    from utils.stops import REPOSITORY, typed_path

    paths = sorted(glob.glob(os.path.join(REPOSITORY, "configs", "*.yaml")), key=lambda p: (len(p), p))  # plain first
    return [typed_path(path) for path in paths
            if OmegaConf.select(OmegaConf.load(path), "dataset.name", default=None) == loader]


def spread_positions(n: int, k: int) -> List[int]:
    """``min(n, k)`` distinct positions in ``range(n)`` spread evenly over it, ordered so that every prefix is spread
    too (0, n/2, n/4, 3n/4, ...): a validation limited to its first views (``trainer.limit_val_batches``) still
    sees the capture from far-apart cameras, not two neighbours."""
    k = min(n, k)
    bits = max(k - 1, 0).bit_length()
    order = sorted(range(1 << bits), key=lambda i: int(format(i, f"0{bits}b")[::-1] or "0", 2))
    return [i * n // k for i in order if i < k]


def video_trajectory(config: Any) -> str:
    """``dataset.video_trajectory`` (default auto): how the test video moves about the object
    (``datasets.rays.video_path``); a ConfigError names the choices."""
    kind = str(config.get("video_trajectory", "auto"))
    if kind not in VIDEO_TRAJECTORIES:
        raise ConfigError(f"dataset.video_trajectory is {kind!r}; use auto (a full orbit, or a loop across the "
                          "region the cameras cover when they were all on one side), orbit or sweep.")
    return kind


def holdout_split(n_views: int, split: str, holdout_every: Any) -> List[int]:
    """Positions (in file order) of the views that make ``split``: every ``holdout_every``-th view (0, k, 2k,
    ...) is held out for val/test, the others train. ``holdout_every`` 0 or None holds none out, and val/test
    then get [] (the loaders render a camera trajectory instead, without metrics). An empty training split
    is an error, never a silent fallback."""
    k = number_at_least(holdout_every or 0, "dataset.holdout_every", 0)
    if split == "train":
        chosen = [i for i in range(n_views) if k == 0 or i % k != 0]
        if not chosen:
            raise DatasetError(f"dataset.holdout_every={k} holds out all {n_views} view(s), leaving none to train on; "
                               "set dataset.holdout_every=0 to train on every view.")
        return chosen
    return list(range(0, n_views, k)) if k > 0 and split != "trajectory" else []


@dataclass
class SceneData:
    """One split of a scene.

    images: (N, H, W, 3) uint8; masks: (N, H, W) uint8 (255 = foreground);
    c2w: (N, 3, 4) float32 OpenGL; intrinsics: (N, 4) (fx, fy, cx, cy).
    ``world_from_scene`` (4, 4) maps the normalised frame the model works in
    back to the dataset's own world frame (identity when none was applied).
    ``trained_pixels``: (N, H, W) bool, the pixels training may sample (a
    nerfstudio ``mask_path``: a car's hood, the photographer, a crop's border
    are never trained on); None: all. Unlike a foreground mask, it says
    nothing about what is there.
    """

    images: torch.Tensor
    masks: torch.Tensor
    c2w: torch.Tensor
    intrinsics: torch.Tensor
    has_mask: bool
    names: List[str]
    world_from_scene: np.ndarray = field(default_factory=lambda: np.eye(4))
    has_gt: bool = True  # False for a camera trajectory without images (video only, no metrics)
    trained_pixels: Optional[torch.Tensor] = None
    trained_on: bool = False  # True for views the model trains on (validation when no view is held out)

    def __post_init__(self) -> None:
        """A camera with a NaN or infinite entry, or a focal length <= 0, would fail deep inside training;
        every loader's split is checked here, naming the first such view."""
        bad = ~(torch.isfinite(self.c2w).flatten(1).all(1) & torch.isfinite(self.intrinsics).all(1)
                & (self.intrinsics[:, :2] > 0).all(1))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            name = self.names[i] if i < len(self.names) else f"#{i}"
            raise DatasetError(f"The camera of view {name} has a pose or intrinsics that is not finite, or a focal "
                               "length <= 0; fix that camera in the scene's cameras file or remove the view.")
        if self.trained_pixels is not None:
            empty = ~self.trained_pixels.flatten(1).any(1)
            if bool(empty.any()):
                name = self.names[int(empty.nonzero()[0])]
                raise DatasetError(f"The mask of view {name} leaves no pixel to train on (0 everywhere); a mask "
                                   "is 0 where training must not look and 255 elsewhere: fix it or remove the view.")

    @property
    def n_images(self) -> int:
        return self.images.shape[0]

    def views(self, positions: List[int]) -> "SceneData":
        """The views at ``positions`` (copies of their images and cameras), without ``trained_pixels``: evaluation
        scores every pixel of a view, as nerfstudio does."""
        at = torch.as_tensor(positions, dtype=torch.long)
        return replace(self, images=self.images[at], masks=self.masks[at], c2w=self.c2w[at],
                       intrinsics=self.intrinsics[at], names=[self.names[i] for i in positions], trained_pixels=None)

    @property
    def height(self) -> int:
        return self.images.shape[1]

    @property
    def width(self) -> int:
        return self.images.shape[2]

    def train_rays(self, n_rays: int, batch_image_sampling: bool, generator: Optional[torch.Generator] = None
                   ) -> Dict[str, torch.Tensor]:
        """Random rays: (n_rays, 3) origins and unit directions, rgb (n_rays, 3), fg_mask (n_rays,), index (n_rays,)
        each ray's image in this split."""
        n_idx = n_rays if batch_image_sampling else 1
        index = torch.randint(0, self.n_images, (n_idx,), generator=generator).expand(n_rays)
        x = torch.randint(0, self.width, (n_rays,), generator=generator)
        y = torch.randint(0, self.height, (n_rays,), generator=generator)
        if self.trained_pixels is not None:
            index, x, y = self._resample_untrained(index, x, y, batch_image_sampling, generator)
        return self._rays_at(index, x, y)

    def _resample_untrained(self, index: torch.Tensor, x: torch.Tensor, y: torch.Tensor, batch_image_sampling: bool,
                            generator: Optional[torch.Generator], rounds: int = 64):
        """(index, x, y) (n_rays,) each, every ray on a trained pixel: rays that fell outside ``trained_pixels``
        are drawn again (from any image, or from the batch's one image), so the rays stay uniform over the
        trained pixels. Rays still outside after ``rounds`` (a mask that keeps a sliver) are drawn from their
        image's trained pixels directly."""
        index = index.clone()
        redo = (~self.trained_pixels[index, y, x]).nonzero()[:, 0]
        for _ in range(rounds):
            if len(redo) == 0:
                return index, x, y
            if batch_image_sampling:
                index[redo] = torch.randint(0, self.n_images, (len(redo),), generator=generator)
            x[redo] = torch.randint(0, self.width, (len(redo),), generator=generator)
            y[redo] = torch.randint(0, self.height, (len(redo),), generator=generator)
            redo = redo[~self.trained_pixels[index[redo], y[redo], x[redo]]]  # only the redrawn rays are checked
        for image in index[redo].unique():
            rays = redo[index[redo] == image]
            ys, xs = self.trained_pixels[image].nonzero(as_tuple=True)
            pick = torch.randint(0, len(ys), (len(rays),), generator=generator)
            x[rays], y[rays] = xs[pick], ys[pick]
        return index, x, y

    def image_rays(self, index: int) -> Dict[str, torch.Tensor]:
        """All rays of image ``index``, row-major: (H*W, 3) origins/directions, rgb, fg_mask."""
        dirs = image_directions(self.width, self.height, self.intrinsics[index])
        rays_o, rays_d = get_rays(dirs, self.c2w[index])
        return {
            "rays_o": rays_o, "rays_d": rays_d,
            "rgb": self.images[index].reshape(-1, 3).float() / 255.0,
            "fg_mask": self.masks[index].reshape(-1).float() / 255.0,
        }

    def _rays_at(self, index: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        dirs = pixel_directions(x, y, self.intrinsics[index])
        rays_o, rays_d = get_rays(dirs, self.c2w[index])
        return {
            "rays_o": rays_o, "rays_d": rays_d,
            "rgb": self.images[index, y, x].float() / 255.0,
            "fg_mask": self.masks[index, y, x].float() / 255.0,
            "index": index.contiguous(),
        }


class _TrainIndices(IterableDataset):
    """Endless stream of empty batches: the system samples the rays itself."""

    def __iter__(self):
        while True:
            yield {}


class _EvalIndices(Dataset):
    """The views of an evaluation split one rank renders, as ``{"index": i}``, from ``views`` (the split's view
    indices in the order to render them). On several devices rank r of w takes the r-th, (r + w)-th, ... of them;
    the ranks with one view fewer end with index -1 (nothing to render), so every rank runs the same number of
    steps and each view is scored once. (Lightning's DistributedSampler evens the shares by repeating views, which
    then count twice in the metrics.)"""

    def __init__(self, views: List[int], rank: int = 0, world_size: int = 1):
        share = list(views[rank::world_size])
        self.indices = share + [-1] * (-(-len(views) // world_size) - len(share))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return {"index": self.indices[i]}


class SceneDataModule(pl.LightningDataModule):
    """Data module over a ``load_split(config, split) -> SceneData`` function.

    Splits come from ``train_split``/``val_split``/``test_split`` in the config
    (defaults train/val/test); ``predict`` renders the test split.
    """

    load_split: Callable[[Any, str], SceneData]

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.splits: Dict[str, SceneData] = {}
        if config.get("n_test_traj_steps") is not None:  # read at the test after training: checked before it
            number_at_least(config.n_test_traj_steps, "dataset.n_test_traj_steps", 1)
        video_trajectory(config)

    def split_name(self, stage: str) -> str:
        """The split a stage reads: ``dataset.<stage>_split`` (instant-nsr-pl's keys), else the stage's own name.
        The keys are spelt out: the unread-key check finds the options the code reads by their names."""
        key = {"train": "train_split", "val": "val_split", "test": "test_split"}.get(stage)
        return str(self.config.get(key, stage)) if key else stage

    def split(self, stage: str) -> SceneData:
        name = self.split_name(stage)
        if name not in self.splits:
            self.splits[name] = self.load_split(self.config, name)
        return self.splits[name]

    VALIDATION_TRAINING_VIEWS = 8  # validated when no view is held out

    def validation_split(self) -> SceneData:
        """The val split. When no view is held out (``dataset.holdout_every: 0``, as DTU's and COLMAP configs
        train), its views are the video path, with no image to compare with: validation then renders training
        views evenly spaced over the capture instead (in capture order; ``val_dataloader`` takes them far-apart
        first), so it still shows a ground truth beside the render and a PSNR (of the fit, not of new views), as
        instant-nsr-pl's validation on training views does."""
        val = self.split("val")
        if val.has_gt:
            return val
        if "training views" not in self.splits:  # made once: setup runs before Lightning's and again in it
            train = self.split("train")
            chosen = train.views(sorted(spread_positions(train.n_images, self.VALIDATION_TRAINING_VIEWS)))
            log.info(f"Validation renders {chosen.n_images} of the {train.n_images} training views (no view is held "
                     "out; dataset.holdout_every: k > 0 holds out every k-th): its PSNR measures the fit, not new "
                     "views.")
            self.splits["training views"] = replace(chosen, trained_on=True)
        return self.splits["training views"]

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit"):
            self.train_data, self.val_data = self.split("train"), self.validation_split()
        if stage == "validate":
            self.val_data = self.validation_split()
        if stage in (None, "test", "predict"):
            self.test_data = self.split("test")

    def has_orbit(self) -> bool:
        """Whether the format has a video orbit of its own (captures); NeRF-synthetic's test split is one."""
        return False

    def trajectory(self) -> Optional[SceneData]:
        """Camera path for the test video when the test split is held-out views (with images); None when the
        test split is the path itself."""
        return self.split("trajectory") if self.has_orbit() and self.split("test").has_gt else None

    def score_mesh(self, vertices: np.ndarray, faces: np.ndarray) -> Optional[Dict[str, float]]:
        """Geometry metrics of a world-frame mesh (V, 3) / (F, 3) when the data has ground truth; else None."""
        return None

    def write_overview(self, path: str) -> bool:
        """Write a PLY showing cameras and scene bounds (for data whose normalisation was estimated); False if none."""
        return False

    def sparse_points(self) -> Optional[np.ndarray]:
        """(P, 3) points on the scene's surfaces found by structure from motion, in the model's (normalised) frame;
        None for data without them."""
        return None

    def free_sightlines(self) -> Optional[np.ndarray]:
        """(S, 2, 3) (camera centre, sparse point it sees) pairs, normalised: the space between is empty; None for
        data without them."""
        return None

    def world_from_scene(self) -> np.ndarray:
        return next(iter(self.splits.values())).world_from_scene if self.splits else np.eye(4)

    def scene_up(self) -> np.ndarray:
        """(3,) unit up of the model's frame: its cameras' level up (``datasets.rays.level_up``), +z for
        NeRF-synthetic, the demo and a normalised transforms.json; a loader that knows better says so. The
        cameras of any split read already (a --test reads no training images; the video's are level too)."""
        data = self.splits.get(self.split_name("train")) or next(iter(self.splits.values()), None) \
            or self.split("train")
        return level_up(opencv_to_opengl(data.c2w.double()).numpy())  # the flip is its own inverse: OpenCV axes

    def world_up(self) -> np.ndarray:
        """(3,) unit up of the capture in the dataset's world frame: ``scene_up`` through world_from_scene."""
        up = self.world_from_scene()[:3, :3] @ self.scene_up()
        return up / np.linalg.norm(up)

    def train_dataloader(self):
        return DataLoader(_TrainIndices(), batch_size=None, num_workers=0)

    def val_dataloader(self):
        """Far-apart views first (``spread_positions``): held-out views come in capture order, so the first two of
        a video's frames (``trainer.limit_val_batches: 2``) showed the same side twice."""
        n = self.val_data.n_images
        return self._views_of_this_rank(spread_positions(n, n))

    def test_dataloader(self):
        return self._views_of_this_rank(list(range(self.test_data.n_images)))

    def _views_of_this_rank(self, views: List[int]) -> DataLoader:
        """The loader of this rank's share of ``views`` (all of them on one device), in their order. The trainer is
        made with ``use_distributed_sampler=False``, so Lightning leaves the shares as they are."""
        trainer = getattr(self, "trainer", None)
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return DataLoader(_EvalIndices(views, rank, world_size), batch_size=1, num_workers=0)

    def predict_dataloader(self):
        return self.test_dataloader()
