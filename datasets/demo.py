"""The embedded demo scene: rendered by the project itself on first use, then read by a real loader.

``dataset.layout: blender`` (default) writes and reads NeRF-synthetic data;
``dataset.layout: dtu`` writes NeuS/IDR data (textured surroundings, masks, a
millimetre world frame) and reads it with the ``dtu`` loader, holding out
every ``holdout_every``-th view (default 8) for metrics.

``dataset.mesh: <file>`` renders that mesh instead (a scan, a CAD model: any surface with a known truth;
``dataset.mesh_up``: its up axis, x, y or z, default y) with the same cameras, and scores exported meshes
against it, so a change can be judged on a real surface as well as on the analytic one.
"""
from __future__ import annotations

import os
from typing import Any

from omegaconf import OmegaConf

import datasets
from datasets.base import DatasetError, SceneData, SceneDataModule
from datasets.blender import load_blender_split
from datasets.dtu import load_dtu_split
from datasets.synthetic import MeshScene, MeshSceneError, demo_surface, ensure_demo_scene
from utils.mesh_metrics import score_against_surface


def load_demo_split(config: Any, split: str) -> SceneData:
    layout = str(config.get("layout", "blender"))
    if layout not in ("blender", "dtu"):
        raise DatasetError(f"dataset.layout is '{layout}'; the demo scene can be written as 'blender' or 'dtu'.")
    mesh, up = mesh_option(config)
    try:
        ensure_demo_scene(config.root_dir, int(config.get("render_resolution", 128)), layout, mesh, up)
    except MeshSceneError as err:
        raise DatasetError(f"dataset.mesh: {err}") from None
    if layout == "blender":
        return load_blender_split(config, split)
    if config.get("holdout_every") is None:
        config = OmegaConf.merge(config, {"holdout_every": 8})
    return load_dtu_split(config, split)


def mesh_option(config: Any) -> tuple:
    """(the mesh file ``dataset.mesh`` names, or None for the analytic scene; its up axis ``dataset.mesh_up``)."""
    mesh = config.get("mesh")
    if not mesh:
        return None, "y"
    path = os.path.expanduser(str(mesh))
    if not os.path.isfile(path):
        raise DatasetError(f"dataset.mesh={mesh!r} is not a file; name a mesh (OBJ, PLY, STL, ...) to render as the "
                           "scene, or null for the demo scene.")
    return path, str(config.get("mesh_up", "y"))


@datasets.register("demo")
class DemoDataModule(SceneDataModule):
    load_split = staticmethod(load_demo_split)

    def has_orbit(self) -> bool:
        """The DTU layout holds out views for metrics; its video follows an orbit (the Blender test split is one)."""
        return str(self.config.get("layout", "blender")) == "dtu"

    def score_mesh(self, vertices, faces):
        """Against the true surface in the world frame: the mesh of ``dataset.mesh``, or the analytic scene's
        (marching cubes at 256^3 of its exact SDF)."""
        mesh, up = mesh_option(self.config)
        world_from_scene = self.world_from_scene()
        truth = MeshScene(mesh, up).surface(world_from_scene) if mesh else demo_surface(256, world_from_scene)
        return score_against_surface(vertices, faces, *truth)
