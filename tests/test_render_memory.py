"""Rendering an image (validation, test, video) queries the field on bounded numbers of samples.

With the occupancy grid still full (an early validation, an untrained
model) every ray takes every step of ``num_samples_per_ray``; one chunk of
``ray_chunk`` rays then asked for tens of millions of samples at once, and
the shipped nerf-colmap config was killed by the OS (24 GB) at its first
validation image on a CPU. The samples are now shaded in groups of rays
holding about ``model.sample_chunk`` samples; the image must be the one
rendered whole.
"""
import pytest
import torch

import models
from datasets.rays import get_rays, image_directions
from helpers import set_sample_chunk
from models.base import ray_groups
from utils.config import load_config


def test_ray_groups_cover_every_ray_once_with_bounded_samples():
    generator = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 40, (500,), generator=generator)
    counts[100:180] = 0  # rays that miss the scene
    counts[-1] = 0
    ray_indices = torch.repeat_interleave(torch.arange(500), counts)
    for budget in (1, 39, 40, 100, 1000, 10 ** 6):
        groups = ray_groups(ray_indices, 500, budget)
        assert groups[0][:3:2] == (0, 0) and groups[-1][1::2] == (500, len(ray_indices))
        for (r0, r1, s0, s1), following in zip(groups, groups[1:] + [(500, None, len(ray_indices), None)]):
            assert r0 < r1 and (r1, s1) == following[::2]  # consecutive, nothing skipped
            assert s1 - s0 == int(counts[r0:r1].sum())
            assert s1 - s0 <= budget + int(counts.max()) or r1 - r0 == 1
            assert torch.equal(ray_indices[s0:s1].unique(), torch.nonzero(counts[r0:r1])[:, 0] + r0)
        if budget >= int(counts.max()):
            assert len(groups) <= 2 * len(ray_indices) // budget + 1


class LargestQuery:
    """Records the most points one call of a field network was given."""

    def __init__(self, model):
        self.rows = 0
        for part in (model, getattr(model, "background", model)):  # every query goes through the encoding
            part.geometry.encoding.register_forward_pre_hook(self.hook)

    def hook(self, module, inputs):
        self.rows = max(self.rows, inputs[0].shape[0])


@pytest.mark.parametrize("config, overrides", [
    ("configs/nerf-demo.yaml", ["model.early_stop_eps=1e-4"]),  # the early-stop pass queries every sample too
    ("configs/nerf-demo.yaml", ["model.early_stop_eps=1e-4", "model.learned_background=true"]),  # cone steps
    ("configs/neus-demo.yaml", ["model.learned_background=true", "+model.num_samples_per_ray_bg=64"]),
])
def test_an_image_is_shaded_in_bounded_groups_and_matches_the_whole_render(config, overrides, monkeypatch):
    cfg = load_config(config, ["model.num_samples_per_ray=128", *overrides])
    torch.manual_seed(0)
    model = models.make(cfg.model.name, cfg.model).eval()  # untrained: the grid is full, the worst case
    w, h = 48, 36
    c2w = torch.tensor([[1.0, 0.0, 0.0, 0.1], [0.0, 0.0, -1.0, -2.5], [0.0, 1.0, 0.0, 0.2]])  # looks along +y
    rays_o, rays_d = get_rays(image_directions(w, h, torch.tensor([40.0, 40.0, w / 2, h / 2])), c2w)

    def render(sample_chunk):
        set_sample_chunk(model, sample_chunk, monkeypatch)
        largest = LargestQuery(model)
        with torch.no_grad():
            return model(rays_o, rays_d), largest.rows

    whole, whole_rows = render(10 ** 9)
    grouped, rows = render(1000)
    per_ray = 400  # more than any ray's samples at 128 steps (the background's cone steps included)
    assert whole_rows > 20 * 1000 and rows <= 1000 + per_ray
    assert whole["num_samples"] == grouped["num_samples"] > 20 * 1000
    for key, value in whole.items():
        if torch.is_tensor(value) and value.dim() > 0:
            assert torch.allclose(value.float(), grouped[key].float(), atol=1e-5), key
        else:
            assert value == grouped[key], key
