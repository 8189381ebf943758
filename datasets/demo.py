"""The embedded demo scene: rendered by the project itself on first use, then read by a real loader.

``dataset.layout: blender`` (default) writes and reads NeRF-synthetic data;
``dataset.layout: dtu`` writes NeuS/IDR data (textured surroundings, masks, a
millimetre world frame) and reads it with the ``dtu`` loader, holding out
every ``holdout_every``-th view (default 8) for metrics.
"""
from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

import datasets
from datasets.base import DatasetError, SceneData, SceneDataModule
from datasets.blender import load_blender_split
from datasets.dtu import load_dtu_split
from datasets.synthetic import demo_surface, ensure_demo_scene
from utils.mesh_metrics import score_against_surface


def load_demo_split(config: Any, split: str) -> SceneData:
    layout = str(config.get("layout", "blender"))
    if layout not in ("blender", "dtu"):
        raise DatasetError(f"dataset.layout is '{layout}'; the demo scene can be written as 'blender' or 'dtu'.")
    ensure_demo_scene(config.root_dir, int(config.get("render_resolution", 128)), layout)
    if layout == "blender":
        return load_blender_split(config, split)
    if config.get("holdout_every") is None:
        config = OmegaConf.merge(config, {"holdout_every": 8})
    return load_dtu_split(config, split)


@datasets.register("demo")
class DemoDataModule(SceneDataModule):
    load_split = staticmethod(load_demo_split)

    def has_orbit(self) -> bool:
        """The DTU layout holds out views for metrics; its video follows an orbit (the Blender test split is one)."""
        return str(self.config.get("layout", "blender")) == "dtu"

    def score_mesh(self, vertices, faces):
        """Against the analytic scene's surface (marching cubes at 256^3 of its exact SDF), in the world frame."""
        return score_against_surface(vertices, faces, *demo_surface(256, self.world_from_scene()))
