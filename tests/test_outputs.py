"""Marching cubes on a known surface, mesh/video writers that ordinary tools read back."""
import inspect
import os
import re
import sys

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import trimesh

from utils.io import write_video
from utils.mesh import MeshError, largest_component, marching_cubes, write_mesh


def sphere_density(x):
    return 10.0 * (x.norm(dim=-1) < 0.5).float() + 10.0 * (0.5 - x.norm(dim=-1)).clamp(min=-0.05, max=0.05)


def test_marching_cubes_sphere_outward_and_accurate():
    bounds = np.array([[-1, -1, -1], [1, 1, 1]], dtype=np.float32)
    sdf = lambda x: x.norm(dim=-1) - 0.5  # noqa: E731
    v, f = marching_cubes(sdf, bounds, 96, 0.0, inside_is_greater=False, chunk=10000, coarse_resolution=24)
    radii = np.linalg.norm(v, axis=1)
    assert np.abs(radii - 0.5).max() < 0.01
    mesh = trimesh.Trimesh(v, f)
    assert mesh.volume > 0 and abs(mesh.volume - 4 / 3 * np.pi * 0.125) < 0.01  # outward normals, right size
    v2, f2 = marching_cubes(lambda x: -sdf(x), bounds, 96, 0.0, inside_is_greater=True, chunk=10000)
    assert trimesh.Trimesh(v2, f2).volume > 0


def needle_on_a_ball(x):
    """SDF of a ball (radius 0.5) with a needle (radius 0.01) up to z = 0.9, off the 64^3 coarse grid's points."""
    radial = torch.sqrt(x[:, 0] ** 2 + (x[:, 1] - 0.013) ** 2)
    needle = torch.maximum(radial - 0.01, torch.maximum(x[:, 2] - 0.9, -x[:, 2]))
    return torch.minimum(x.norm(dim=-1) - 0.5, needle)


@pytest.mark.parametrize("field, kind", [(needle_on_a_ball, {"inside_is_greater": False, "distance_field": True}),
                                         (lambda x: -needle_on_a_ball(x), {"inside_is_greater": True})])
def test_a_part_thinner_than_the_coarse_cells_is_not_cut_off(field, kind):
    """The fine grid covers the box the coarse grid finds; a needle between its points was cut where that box
    ended (z 0.556 of 0.9), leaving an open stump. An SDF's box takes the points near the surface too (one fine
    pass); for any field, a box side the inside reaches is moved out and the fine grid evaluated again."""
    evaluated = []

    def counted(x):
        evaluated.append(len(x))
        return field(x)

    bounds = np.array([[-1.0] * 3, [1.0] * 3])
    v, f = marching_cubes(counted, bounds, 96, 0.0, chunk=10 ** 6, **kind)
    assert v[:, 2].max() > 0.9 - 2 / 95 and trimesh.Trimesh(v, f).is_watertight
    assert sum(evaluated) == 64 ** 3 + 96 ** 3 * (1 if kind.get("distance_field") else 2)
    side = v[(v[:, 2] > 0.6) & (v[:, 2] < 0.85)]  # the needle's side, whole: at its radius all round
    np.testing.assert_allclose(np.linalg.norm(side[:, :2] - [0, 0.013], axis=1), 0.01, atol=0.005)


def test_grid_queries_on_a_cpu_are_cache_sized_whatever_the_configs_gpu_chunk():
    """The configs' isosurface.chunk (2^21) bounds memory on a GPU; on a CPU calls of that size ran 3x slower."""
    from utils.mesh import CPU_POINTS_PER_CALL, evaluate_grid, points_per_call

    sizes = []

    def sdf(x):
        sizes.append(len(x))
        return x.norm(dim=-1) - 0.5

    lo, hi = np.array([-1.0] * 3), np.array([1.0] * 3)
    whole = evaluate_grid(sdf, lo, hi, 48, 2 ** 21, torch.device("cpu"))
    assert CPU_POINTS_PER_CALL // 2 < max(sizes) <= CPU_POINTS_PER_CALL and sum(sizes) == 48 ** 3  # whole planes
    sizes.clear()
    small = evaluate_grid(sdf, lo, hi, 48, 1000, torch.device("cpu"))  # a smaller chunk is kept
    assert max(sizes) == 1000 and np.array_equal(small, whole)
    axis = np.linspace(-1, 1, 48)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    np.testing.assert_allclose(whole, np.sqrt(x ** 2 + y ** 2 + z ** 2) - 0.5, atol=1e-6)
    assert points_per_call(2 ** 21, "cuda") == 2 ** 21 and points_per_call(2 ** 21, "cpu") == CPU_POINTS_PER_CALL


def test_empty_and_nan_fields_raise_clear_errors():
    bounds = np.array([[-1, -1, -1], [1, 1, 1]], dtype=np.float32)
    with pytest.raises(MeshError, match="no surface at threshold"):
        marching_cubes(lambda x: torch.zeros(len(x)), bounds, 32, 1.0, inside_is_greater=True)
    with pytest.raises(MeshError, match="not finite"):
        marching_cubes(lambda x: torch.full((len(x),), float("nan")), bounds, 32, 1.0, inside_is_greater=True)


def test_obj_with_vertex_colours_reads_back(tmp_path):
    mesh = trimesh.creation.icosphere(subdivisions=2)
    colours = np.random.rand(len(mesh.vertices), 3)
    path = str(tmp_path / "m.obj")
    write_mesh(path, mesh.vertices, mesh.faces, colours)
    back = trimesh.load(path, process=False)
    assert len(back.vertices) == len(mesh.vertices) and len(back.faces) == len(mesh.faces)
    np.testing.assert_allclose(back.visual.vertex_colors[:, :3] / 255.0, colours, atol=1 / 255 + 1e-6)
    with open(path) as f:
        first_v = next(line for line in f if line.startswith("v "))
    assert len(first_v.split()) == 7, "MeshLab reads colours from 'v x y z r g b'"


def read_glb_json(path) -> dict:
    import json
    import struct

    with open(path, "rb") as f:
        magic, version, _, json_length, _ = struct.unpack("<4sIIII", f.read(20))
        assert magic == b"glTF" and version == 2
        return json.loads(f.read(json_length))


def glb_vertex_colours(path) -> np.ndarray:
    """COLOR_0 (V, 4) uint8 of a one-mesh GLB with a material, where every trimesh from 4.0 keeps it: beside the
    texture visual of the scene's mesh (``force="mesh"`` drops it; ``skip_materials=True`` from 4.0.6)."""
    (mesh,) = trimesh.load(path, process=False).geometry.values()
    return mesh.visual.vertex_attributes["color"]


@pytest.mark.parametrize("coloured", [True, False])
def test_glb_keeps_the_vertex_colours_as_gltf_color_0_under_a_matte_material(tmp_path, coloured):
    mesh = trimesh.creation.icosphere(subdivisions=2)
    colours = np.random.default_rng(0).random((len(mesh.vertices), 3))
    path = str(tmp_path / "m.glb")
    write_mesh(path, mesh.vertices * 300.0, mesh.faces, colours if coloured else None)  # a DTU world: millimetres
    back = trimesh.load(path, force="mesh", process=False)
    np.testing.assert_allclose(back.vertices, mesh.vertices * 300.0, rtol=1e-6, atol=1e-4)  # float32 in glTF
    np.testing.assert_array_equal(back.faces, mesh.faces)
    tree = read_glb_json(path)
    primitive = tree["meshes"][0]["primitives"][0]
    assert set(primitive["attributes"]) == ({"POSITION", "COLOR_0"} if coloured else {"POSITION"})
    # without a material glTF means metallicFactor 1: three.js shows the colours as dark rough metal
    material = tree["materials"][primitive["material"]]
    assert material["pbrMetallicRoughness"]["metallicFactor"] == 0.0 and material["doubleSided"]
    assert material["pbrMetallicRoughness"]["baseColorFactor"] == [1.0, 1.0, 1.0, 1.0]  # COLOR_0 multiplies it
    if coloured:
        np.testing.assert_allclose(glb_vertex_colours(path)[:, :3] / 255.0, colours, atol=1 / 255 + 1e-6)
        if "skip_materials" in inspect.signature(trimesh.exchange.gltf.load_glb).parameters:  # trimesh 4.0.6+
            plain = trimesh.load(path, force="mesh", process=False, skip_materials=True)
            np.testing.assert_allclose(plain.visual.vertex_colors[:, :3] / 255.0, colours, atol=1 / 255 + 1e-6)


def test_ply_keeps_the_vertex_colours_and_the_float32_positions(tmp_path):
    mesh = trimesh.creation.icosphere(subdivisions=2)
    colours = np.random.default_rng(0).random((len(mesh.vertices), 3))
    path = str(tmp_path / "m.ply")
    write_mesh(path, mesh.vertices * 300.0, mesh.faces, colours)
    back = trimesh.load(path, process=False)
    assert back.visual.kind == "vertex" and np.array_equal(back.faces, mesh.faces)
    np.testing.assert_allclose(back.vertices, mesh.vertices * 300.0, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(back.visual.vertex_colors[:, :3] / 255.0, colours, atol=1 / 255 + 1e-6)
    with open(path, "rb") as f:
        assert f.read(64).startswith(b"ply\nformat binary_little_endian 1.0")


def test_the_turn_that_stands_a_capture_on_gltfs_up_is_the_smallest_rotation():
    """A run's GLB is its world frame turned so that the capture's up is glTF's +y (datasets.rays.rotation_between):
    z-up (the demo, NeRF-synthetic) is the usual (x, y, z) -> (x, z, -y); any up, even one opposite to +y, turns
    to +y by a proper rotation that moves the directions square to both up and +y not at all."""
    from datasets.rays import rotation_between
    from utils.mesh import GLTF_UP

    np.testing.assert_allclose(rotation_between(np.array([0.0, 0.0, 2.0]), GLTF_UP),
                               [[1, 0, 0], [0, 0, 1], [0, -1, 0]], atol=1e-12)
    rng = np.random.default_rng(1)
    for up in [*rng.normal(size=(5, 3)), np.array([0.0, -1.0, 0.0]), np.array([1e-9, -1.0, 0.0]), GLTF_UP]:
        turn = rotation_between(up, GLTF_UP)
        np.testing.assert_allclose(turn @ (up / np.linalg.norm(up)), GLTF_UP, atol=1e-9)
        np.testing.assert_allclose(turn.T @ turn, np.eye(3), atol=1e-9)
        assert np.isclose(np.linalg.det(turn), 1.0)
        square = np.cross(up, GLTF_UP)
        if np.linalg.norm(square) > 1e-6:
            np.testing.assert_allclose(turn @ square, square, atol=1e-9)


def test_mesh_and_video_options_are_checked_before_training():
    """A typo in an export option fails at start-up in one sentence, not after hours of training."""
    from omegaconf import OmegaConf

    from systems.base import check_export_options
    from utils.config import ConfigError

    def config(iso=None, export=None):
        return OmegaConf.create({"model": {"geometry": {"isosurface": {"resolution": 64, **(iso or {})}}},
                                 "export": export or {}})

    check_export_options(config({"method": "mc-cuda"}, {"mesh_format": "PLY", "video_fps": 12,
                                                         "video_max_width": 0}))  # accepted
    for bad, words in ((({"method": "tdsf"}, None), "isosurface.method='tdsf' is not a meshing method"),
                       ((None, {"mesh_format": "stl"}), "export.mesh_format='stl'; use obj, ply or glb"),
                       ((None, {"video_fps": 0}), "export.video_fps"),
                       ((None, {"video_max_width": -1}), "export.video_max_width must be a whole number >= 0"),
                       ((None, {"chunk_size": "big"}), "export.chunk_size"),
                       (({"threshold": "abc"}, None), "isosurface.threshold must be a finite number, not 'abc'"),
                       (({"chunk": 0}, None), "isosurface.chunk must be a whole number >= 1, not 0"),
                       (({"tsdf_truncation": -3}, None), "isosurface.tsdf_truncation must be a number > 0"),
                       ((None, {"textured": "yes"}), "export.textured='yes'; use true or false"),
                       ((None, {"texture_size": 8}), "export.texture_size must be a whole number >= 16, not 8")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            check_export_options(config(*bad))
    check_export_options(config(None, {"textured": True}))
    with pytest.MonkeyPatch.context() as patch:  # a textured mesh without its packages: said before training
        patch.setitem(sys.modules, "xatlas", None)
        with pytest.raises(ConfigError, match=re.escape("A textured mesh needs the xatlas package: pip install "
                                                        "xatlas fast-simplification")):
            check_export_options(config(None, {"textured": True}))


def texture_image(mesh):
    """The PIL image of a textured mesh as trimesh reads it: an OBJ's material image, a GLB's base colour."""
    material = mesh.visual.material
    return material.image if hasattr(material, "image") else material.baseColorTexture


def texture_samples(mesh, n=20000, seed=0):
    """(n, 3) points drawn uniformly over a textured mesh's faces and (n, 3) its texture's colours there, read
    as a renderer does: bilinear, texel centres at (i + 0.5) / size, v up."""
    import cv2

    rng = np.random.default_rng(seed)
    face = rng.integers(0, len(mesh.faces), n)
    w = rng.dirichlet([1, 1, 1], n)[..., None]
    points = (np.asarray(mesh.vertices)[mesh.faces[face]] * w).sum(1)
    uv = (np.asarray(mesh.visual.uv)[mesh.faces[face]] * w).sum(1)
    image = np.asarray(texture_image(mesh).convert("RGB"), np.float32) / 255
    h, w_ = image.shape[:2]
    x, y = (uv[:, 0] * w_ - 0.5).astype(np.float32), ((1 - uv[:, 1]) * h - 0.5).astype(np.float32)
    return points, cv2.remap(image, x[None], y[None], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[0]


def test_a_textured_mesh_keeps_the_surface_and_the_colour_field_in_its_texture(tmp_path):
    """export.textured: the mesh decimated (a ball of 53k faces to 4000), cut into UV charts and its texture
    filled with the colour field at each texel's surface point, then written as OBJ + MTL + PNG and as GLB.
    Read back by trimesh as a renderer reads a texture (bilinear), the colour anywhere on the surface is the
    field's to within the PNG's rounding (mean error 0.0006, 99th percentile 0.0017); texels just outside a chart
    hold its colours, so that filtering at chart borders does not blend in the background (without them, the 99th
    percentile was 0.064)."""
    from utils.mesh import write_textured_mesh
    from utils.mesh_texture import textured_mesh

    def colour(points, normals):
        return 0.5 + 0.5 * np.sin(8 * points)

    v, f = marching_cubes(lambda x: x.norm(dim=-1) - 0.5, np.array([[-1.0] * 3, [1.0] * 3]), 96, 0.0,
                          inside_is_greater=False, distance_field=True)
    mesh = textured_mesh(v, f, colour, 512, 4000, name="ball-textured")
    assert len(f) > 50000 and len(mesh.faces) == 4000
    write_textured_mesh(str(tmp_path / "ball-textured.obj"), mesh)
    write_textured_mesh(str(tmp_path / "ball-textured.glb"), mesh)
    assert sorted(os.listdir(tmp_path)) == ["ball-textured.glb", "ball-textured.mtl", "ball-textured.obj",
                                            "ball-textured.png"]
    assert "map_Kd ball-textured.png" in (tmp_path / "ball-textured.mtl").read_text()
    for name in ("ball-textured.obj", "ball-textured.glb"):
        back = trimesh.load(tmp_path / name, force="mesh", process=False)
        assert back.visual.kind == "texture" and texture_image(back).size == (512, 512)
        if name.endswith(".glb"):  # matte: an unstated metallicFactor is 1 in glTF, a dark mirror in viewers
            assert back.visual.material.metallicFactor == 0.0 and back.visual.material.doubleSided
        assert np.abs(np.linalg.norm(back.vertices, axis=1) - 0.5).max() < 0.005  # 1 % of the radius
        points, sampled = texture_samples(back)
        error = np.abs(sampled - colour(points, None))
        assert error.mean() < 0.002 and np.percentile(error, 99) < 0.01, (name, error.mean(), error.max())
    image = np.asarray(mesh.visual.material.image)
    uncovered = (image == image.reshape(-1, 3).mean(0).round().astype(np.uint8)).all(-1).mean()
    assert 0.1 < uncovered < 0.6  # the space between charts: their mean colour


def test_depth_colours_span_the_view_whatever_a_few_stray_pixels_hold():
    """The jet map ran from the nearest to the farthest pixel, so one floater put the whole object in one colour;
    it now spans the 1st to the 99th percentile of the masked pixels, and the background is white."""
    from utils.io import colorize_depth

    depth = np.linspace(2.0, 3.0, 400).reshape(20, 20)
    depth[0, 0] = 0.1  # a floater near the camera
    mask = np.ones_like(depth)
    mask[-1, -1] = 0.0
    rgb = colorize_depth(depth, mask)
    jet_ends = colorize_depth(np.array([[0.0, 1.0]]))[0]
    assert np.abs(rgb[1, 0].astype(int) - jet_ends[0]).max() <= 40  # the near end of the object: blue
    assert np.abs(rgb[-1, -2].astype(int) - jet_ends[1]).max() <= 40  # its far end: red
    assert len({tuple(c) for c in rgb.reshape(-1, 3)}) > 50  # spread over the map, not one colour
    assert rgb[-1, -1].tolist() == [255, 255, 255]


def test_video_of_odd_size_plays(tmp_path):
    frames = (np.full((37, 50, 3), i * 20, np.uint8) for i in range(10))  # a generator: encoded as they come
    path = str(tmp_path / "v.mp4")
    assert write_video(path, frames, fps=10) == 10
    reader = imageio.get_reader(path)
    got = [frame for frame in reader]
    assert len(got) == 10 and got[0].shape == (48, 64, 3)
    assert abs(float(got[5][:37, :50].mean()) - 100) < 3


def test_a_video_wider_than_players_decode_is_scaled_down_and_zero_keeps_full_width(tmp_path):
    """A NeuS test grid of five 1600-pixel DTU panels is 8000 pixels wide, past the 4096 where many hardware
    decoders stop: the MP4 is scaled to the cap (a multiple of 16, aspect kept); max_width=0 keeps the grid's size."""
    from utils.io import video_frame_size

    frame = np.zeros((120, 800, 3), np.uint8)
    frame[:, 400:] = 200  # left half dark, right half bright: the scaled frame must keep the split
    capped, full = str(tmp_path / "capped.mp4"), str(tmp_path / "full.mp4")
    assert write_video(capped, [frame] * 3, fps=10, max_width=410) == 3
    assert write_video(full, [frame] * 3, fps=10, max_width=0) == 3
    got = imageio.get_reader(capped).get_data(1)
    assert video_frame_size(800, 120, 410) == (400, 60) and got.shape == (64, 400, 3)  # 60 padded to 64
    assert float(got[:60, :190].mean()) < 10 and abs(float(got[:60, 210:].mean()) - 200) < 6
    assert imageio.get_reader(full).get_data(1).shape == (128, 800, 3)
    assert video_frame_size(8000, 1200) == (4096, 614) and video_frame_size(4096, 1200) == (4096, 1200)


def test_a_video_whose_frames_fail_midway_or_never_come_leaves_the_old_one_whole(tmp_path):
    path = str(tmp_path / "v.mp4")
    write_video(path, [np.full((32, 32, 3), 90, np.uint8)] * 4, fps=10)
    before = open(path, "rb").read()

    def broken():
        yield np.zeros((32, 32, 3), np.uint8)
        raise OSError("frame 1 cannot be read")

    with pytest.raises(OSError, match="frame 1"):
        write_video(path, broken())
    with pytest.raises(ValueError, match="No frames to write"):
        write_video(path, iter(()))
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["v.mp4"]


def test_largest_component_drops_the_smaller_piece_and_keeps_colours():
    big = trimesh.creation.icosphere(subdivisions=3)
    small = trimesh.creation.icosphere(subdivisions=1, radius=0.2)
    small.vertices += [3.0, 0, 0]
    both = trimesh.util.concatenate([small, big])  # the small piece first: order must not matter
    colours = np.concatenate([np.zeros((len(small.vertices), 3)), np.ones((len(big.vertices), 3))])
    v, f, c = largest_component(np.asarray(both.vertices), np.asarray(both.faces), colours)
    assert len(f) == len(big.faces) and len(v) == len(big.vertices)
    assert np.all(c == 1.0) and np.linalg.norm(v, axis=1).max() < 1.01
    kept = trimesh.Trimesh(v, f, process=False)
    assert kept.is_watertight and abs(kept.area - big.area) < 1e-9


def test_a_multistep_schedulers_checkpoint_loads_weights_only_and_resumes_its_steps(tmp_path):
    """MultiStepLR keeps its milestones in a collections.Counter, which torch before 2.4 refuses to load with
    weights_only=True: every --resume and --test of such a run failed there. Checkpoints now hold no Counter,
    and loading gives the scheduler its Counter back (it reads missing epochs as 0)."""
    import zipfile
    from collections import Counter

    from utils.callbacks import AtomicCheckpointIO, load_checkpoint_file

    def scheduler():
        weight = torch.nn.Parameter(torch.ones(2))
        optimizer = torch.optim.Adam([weight], lr=0.1)
        return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[4, 6, 6], gamma=0.5)

    optimizer, running = scheduler()
    for _ in range(3):
        optimizer.step()
        running.step()
    path = tmp_path / "epoch=0-step=3.ckpt"
    AtomicCheckpointIO().save_checkpoint({"lr_schedulers": [running.state_dict()], "state_dict": {}}, path)
    with zipfile.ZipFile(path) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert b"Counter" not in pickled  # the name torch before 2.4 refuses

    state = load_checkpoint_file(str(path))["lr_schedulers"][0]
    assert state["milestones"] == Counter({4: 1, 6: 2}) and isinstance(state["milestones"], Counter)
    resumed_optimizer, resumed = scheduler()
    resumed.load_state_dict(state)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    rates = []
    for opt, sched in ((optimizer, running), (resumed_optimizer, resumed)):
        for _ in range(5):
            opt.step()
            sched.step()
        rates.append([group["lr"] for group in opt.param_groups])
    assert rates[0] == rates[1] == [0.1 * 0.5 ** 3]  # halved at 4 and twice at 6

    legacy = tmp_path / "legacy.ckpt"  # written before this change: torch >= 2.4 reads its Counter as it is
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.save({"lr_schedulers": [running.state_dict()]}, legacy)
        assert isinstance(load_checkpoint_file(str(legacy))["lr_schedulers"][0]["milestones"], Counter)
