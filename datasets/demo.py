"""The embedded demo scene: rendered by the project itself on first use, then read as Blender data."""
from __future__ import annotations

from typing import Any

import datasets
from datasets.base import SceneData, SceneDataModule
from datasets.blender import load_blender_split
from datasets.synthetic import ensure_demo_scene


def load_demo_split(config: Any, split: str) -> SceneData:
    ensure_demo_scene(config.root_dir, int(config.get("render_resolution", 128)))
    return load_blender_split(config, split)


@datasets.register("demo")
class DemoDataModule(SceneDataModule):
    load_split = staticmethod(load_demo_split)
