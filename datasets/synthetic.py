"""The project's own ground truth: an analytic scene, its cameras, and renders of it.

``DemoScene`` is a few solid primitives (rounded slab, sphere, torus,
capsule) with procedural colour and a known signed distance. It is rendered
by sphere tracing in PyTorch, with 2x2 supersampling for anti-aliased alpha,
and written in the formats the loaders read (Blender/NeRF-synthetic here).
Cameras are made and used in the OpenCV convention (K, x right, y down, z
forward), independently of the loaders' code, so a loader test that matches
these rays checks the loader's conventions for real.

The scene lives in the ball of radius 0.85 about the origin, z up.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
import torch
from tqdm import tqdm

from datasets.rays import opencv_to_opengl
from utils.io import atomic_folder, files_not_written_by, first_few, folder_lock, to_uint8, write_image

log = logging.getLogger("nsr")

SCENE_VERSION = 3  # bump when the scene or its renders change: cached renders are then redone
ENVIRONMENT_RADIUS = 5.0  # the surroundings in the DTU-layout renders: a sphere about the scene


@dataclass
class Camera:
    """Pinhole camera, OpenCV convention. K: (3, 3); c2w: (4, 4)."""

    K: np.ndarray
    c2w: np.ndarray
    width: int
    height: int

    def rays(self, supersample: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(H*s * W*s, 3) origins and unit directions through sub-pixel centres, row-major."""
        s = supersample
        v, u = np.meshgrid((np.arange(self.height * s) + 0.5) / s, (np.arange(self.width * s) + 0.5) / s, indexing="ij")
        pix = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], axis=-1)
        d_cam = pix @ np.linalg.inv(self.K).T
        d = d_cam @ self.c2w[:3, :3].T
        d /= np.linalg.norm(d, axis=-1, keepdims=True)
        o = np.broadcast_to(self.c2w[:3, 3], d.shape)
        return torch.from_numpy(o.copy()).float(), torch.from_numpy(d).float()


def look_at(eye: np.ndarray, target: np.ndarray, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """OpenCV c2w (4, 4) of a camera at ``eye`` looking at ``target`` with z-up world."""
    forward = target - eye
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, np.asarray(up, dtype=np.float64))
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, eye
    return c2w


def orbit_cameras(n: int, distance: float, elevations_deg: Sequence[float], width: int, height: int,
                  fov_x_deg: float = 40.0, azimuth_offset_deg: float = 0.0) -> List[Camera]:
    """``n`` cameras evenly spaced in azimuth, cycling through ``elevations_deg``, looking at the origin."""
    fx = 0.5 * width / math.tan(math.radians(fov_x_deg) / 2)
    K = np.array([[fx, 0, width / 2], [0, fx, height / 2], [0, 0, 1]])
    cams = []
    for i in range(n):
        az = math.radians(azimuth_offset_deg + 360.0 * i / n)
        el = math.radians(elevations_deg[i % len(elevations_deg)])
        eye = distance * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        cams.append(Camera(K=K.copy(), c2w=look_at(eye, np.zeros(3)), width=width, height=height))
    return cams


def _sd_round_box(p, center, half, r):
    q = (p - center).abs() - (half - r)
    return q.clamp(min=0).norm(dim=-1) + q.amax(dim=-1).clamp(max=0) - r


def _sd_sphere(p, center, r):
    return (p - center).norm(dim=-1) - r


def _sd_torus(p, center, major, minor):
    q = p - center
    ring = torch.stack([q[:, :2].norm(dim=-1) - major, q[:, 2]], dim=-1)
    return ring.norm(dim=-1) - minor


def _sd_capsule(p, a, b, r):
    pa, ba = p - a, b - a
    h = ((pa @ ba) / (ba @ ba)).clamp(0, 1)
    return (pa - h[:, None] * ba).norm(dim=-1) - r


class DemoScene:
    """Analytic demo scene. All methods take (N, 3) float32 world points."""

    def __init__(self):
        t = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
        self.slab = (t(0.0, 0.0, -0.32), t(0.5, 0.5, 0.1), 0.04)
        self.sphere = (t(-0.18, -0.16, 0.04), 0.26)
        self.torus = (t(0.24, 0.22, -0.14), 0.2, 0.07)
        self.capsule = (t(0.26, -0.26, -0.2), t(0.26, -0.26, 0.3), 0.09)
        self.light = torch.nn.functional.normalize(t(0.4, -0.5, 0.8), dim=0)

    def _parts(self, p: torch.Tensor) -> torch.Tensor:
        """(N, 4) signed distance to each primitive."""
        return torch.stack([
            _sd_round_box(p, *self.slab),
            _sd_sphere(p, *self.sphere),
            _sd_torus(p, *self.torus),
            _sd_capsule(p, *self.capsule),
        ], dim=-1)

    def sdf(self, p: torch.Tensor) -> torch.Tensor:
        """(N,) signed distance (negative inside) of the union."""
        return self._parts(p).amin(dim=-1)

    def normal(self, p: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
        offsets = torch.eye(3) * eps
        grad = torch.stack([self.sdf(p + o) - self.sdf(p - o) for o in offsets], dim=-1)
        return torch.nn.functional.normalize(grad, dim=-1)

    def albedo(self, p: torch.Tensor) -> torch.Tensor:
        """(N, 3) procedural colour in [0, 1]: checker slab, striped sphere, hue-wheel torus, ringed capsule."""
        part = self._parts(p).argmin(dim=-1)
        x, y, z = p.unbind(-1)
        checker = ((torch.floor(x * 5) + torch.floor(y * 5)) % 2)[:, None]
        slab = checker * torch.tensor([0.9, 0.85, 0.7]) + (1 - checker) * torch.tensor([0.25, 0.35, 0.55])
        stripes = (0.5 + 0.5 * torch.sin(z * 30.0))[:, None]
        sphere = stripes * torch.tensor([0.9, 0.3, 0.2]) + (1 - stripes) * torch.tensor([0.95, 0.9, 0.3])
        angle = torch.atan2(y - self.torus[0][1], x - self.torus[0][0])
        torus = 0.5 + 0.45 * torch.stack([torch.cos(angle), torch.cos(angle - 2.1), torch.cos(angle + 2.1)], dim=-1)
        rings = (torch.sin(z * 25.0) > 0).float()[:, None]
        capsule = rings * torch.tensor([0.2, 0.7, 0.35]) + (1 - rings) * torch.tensor([0.9, 0.9, 0.9])
        colours = torch.stack([slab, sphere, torus, capsule], dim=1)  # (N, 4, 3)
        return colours[torch.arange(len(p)), part]

    def environment(self, rays_o: torch.Tensor, rays_d: torch.Tensor) -> torch.Tensor:
        """(N, 3) colour of the surroundings seen along rays (N, 3; unit directions, origins inside them).

        The surroundings are a sphere of radius ``ENVIRONMENT_RADIUS`` (a room
        about the object, like the walls and floor of a DTU capture) painted
        with a sky-to-ground gradient and a coarse checker. At a finite
        distance they show parallax between views, so only a background
        model, not colour painted onto the foreground, explains them.
        """
        b = (rays_o * rays_d).sum(-1)
        c = (rays_o * rays_o).sum(-1) - ENVIRONMENT_RADIUS ** 2
        t = -b + (b * b - c).clamp(min=0).sqrt()
        p = torch.nn.functional.normalize(rays_o + t[:, None] * rays_d, dim=-1)
        azimuth = torch.atan2(p[:, 1], p[:, 0])
        elevation = torch.asin(p[:, 2].clamp(-1, 1))
        checker = ((torch.floor(azimuth * 8 / math.pi) + torch.floor(elevation * 8 / math.pi)) % 2)[:, None]
        sky = (0.5 + 0.5 * torch.sin(elevation))[:, None]
        base = sky * torch.tensor([0.55, 0.65, 0.8]) + (1 - sky) * torch.tensor([0.45, 0.35, 0.25])
        return (base * (0.7 + 0.3 * checker)).clamp(0, 1)

    def shade(self, p: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
        """(N, 3) view-independent radiance at (N, 3) surface points with unit normals: albedo under ambient +
        one directional light."""
        lambert = (normal @ self.light).clamp(min=0)
        return (self.albedo(p) * (0.35 + 0.65 * lambert[:, None])).clamp(0, 1)

    def trace(self, rays_o: torch.Tensor, rays_d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """First surface hit along (N, 3) rays (unit directions): hit (N,) bool, t (N,) and the unit normal (N, 3)
        there (zero where nothing is hit)."""
        hit, t = sphere_trace(self, rays_o, rays_d)
        normal = torch.zeros_like(rays_o)
        normal[hit] = self.normal(rays_o[hit] + t[hit, None] * rays_d[hit])
        return hit, t, normal


@torch.no_grad()
def sphere_trace(scene: DemoScene, rays_o: torch.Tensor, rays_d: torch.Tensor, t_max: float = 10.0,
                 iterations: int = 128, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """First hit of each ray. rays: (N, 3). Returns (hit (N,) bool, t (N,))."""
    # start at the bounding sphere (radius 1) to save iterations
    b = (rays_o * rays_d).sum(-1)
    c = (rays_o * rays_o).sum(-1) - 1.0
    disc = b * b - c
    t = torch.where(disc > 0, (-b - disc.clamp(min=0).sqrt()).clamp(min=0), torch.full_like(b, t_max))
    active = disc > 0
    for _ in range(iterations):
        if not bool(active.any()):
            break
        idx = torch.nonzero(active)[:, 0]
        d = scene.sdf(rays_o[idx] + t[idx, None] * rays_d[idx])
        t[idx] = t[idx] + d
        active[idx] = (d > eps) & (t[idx] < t_max)
    p = rays_o + t[:, None] * rays_d
    hit = (scene.sdf(p).abs() < 1e-3) & (t < t_max)
    return hit, t


@torch.no_grad()
def render(scene: DemoScene, cam: Camera, supersample: int = 2) -> Dict[str, np.ndarray]:
    """Render the scene seen by ``cam``, anti-aliased by ``supersample``^2 rays per pixel.

    Returns "rgba" (H, W, 4) in [0, 1] (colour not premultiplied), "rgb_env"
    (H, W, 3) the scene over its environment (``DemoScene.environment``) and
    "depth" (H, W) z-depth (0 where nothing is hit).
    """
    s = supersample
    rays_o, rays_d = cam.rays(s)
    hit, t, normal = scene.trace(rays_o, rays_d)
    rgb = torch.zeros_like(rays_o)
    rgb[hit] = scene.shade(rays_o[hit] + t[hit, None] * rays_d[hit], normal[hit])
    forward = torch.from_numpy(cam.c2w[:3, 2]).float()
    z = torch.where(hit, t * (rays_d @ forward), torch.zeros_like(t))

    def pool(x):  # (H*s*W*s, C) -> (H, W, C) box filter
        x = x.view(cam.height, s, cam.width, s, -1)
        return x.mean(dim=(1, 3))

    alpha = pool(hit.float()[:, None])
    colour = pool(rgb) / alpha.clamp(min=1e-6)
    depth = pool(z[:, None]) / alpha.clamp(min=1e-6)
    over_env = pool(torch.where(hit[:, None], rgb, scene.environment(rays_o, rays_d)))
    return {"rgba": torch.cat([colour.clamp(0, 1), alpha], -1).numpy(), "rgb_env": over_env.clamp(0, 1).numpy(),
            "depth": depth[..., 0].numpy()}


def write_blender(root: str, scene: DemoScene, splits: Dict[str, List[Camera]], supersample: int = 2,
                  progress: bool = False) -> None:
    """Write a NeRF-synthetic scene: ``transforms_{split}.json`` and RGBA PNGs under ``{split}/r_{i}.png``.

    No depth maps: no loader reads them, and as float32 they were 97 % of the scene's bytes (167 of 172 MB at
    800x800). Tests that need the true depth take it from ``render`` in memory.
    """
    for split, cams in splits.items():
        os.makedirs(os.path.join(root, split), exist_ok=True)
        frames = []
        for i, cam in enumerate(tqdm(cams, desc=f"rendering {split} views", leave=False, disable=not progress)):
            out = render(scene, cam, supersample)
            write_image(os.path.join(root, split, f"r_{i}.png"), to_uint8(out["rgba"]))
            c2w_gl = opencv_to_opengl(torch.from_numpy(cam.c2w)).numpy()
            frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": c2w_gl.tolist()})
        fov_x = 2 * math.atan(0.5 * cams[0].width / cams[0].K[0, 0])
        with open(os.path.join(root, f"transforms_{split}.json"), "w") as f:
            json.dump({"camera_angle_x": fov_x, "frames": frames}, f, indent=2)


def write_dtu(root: str, scene: DemoScene, cams: List[Camera], world_from_scene: np.ndarray,
              image_padding: int = 6, mask_padding: int = 3, background="environment", supersample: int = 2,
              with_masks: bool = True, progress: bool = False) -> None:
    """Write a NeuS/IDR-format scene: ``cameras_sphere.npz``, ``image/`` and ``mask/``.

    The scene's own frame is the normalised one; ``world_from_scene`` (4, 4,
    a similarity) places it in the "world" the cameras are written in, and is
    stored as every ``scale_mat_i``. DTU pads images to 6 digits and masks to
    3 (the defaults); BlendedMVS uses 3 for both. ``background``:
    "environment" (the scene's textured surroundings, as in a real capture)
    or an RGB triple in [0, 1].
    """
    os.makedirs(os.path.join(root, "image"), exist_ok=True)
    if with_masks:
        os.makedirs(os.path.join(root, "mask"), exist_ok=True)
    entries = {}
    for i, cam in enumerate(tqdm(cams, desc="rendering views", leave=False, disable=not progress)):
        out = render(scene, cam, supersample)
        alpha = out["rgba"][..., 3:]
        if isinstance(background, str):
            rgb = out["rgb_env"]
        else:
            rgb = out["rgba"][..., :3] * alpha + np.asarray(background) * (1 - alpha)
        write_image(os.path.join(root, "image", f"{i:0{image_padding}d}.png"), to_uint8(rgb))
        if with_masks:
            write_image(os.path.join(root, "mask", f"{i:0{mask_padding}d}.png"),
                        to_uint8(np.repeat((alpha > 0.5).astype(np.float32), 3, axis=-1)))
        c2w_world = world_from_scene @ cam.c2w
        c2w_world[:3, :3] /= np.cbrt(np.linalg.det(c2w_world[:3, :3]))  # keep a rotation (drop the scale)
        K = np.eye(4)
        K[:3, :3] = cam.K
        entries[f"world_mat_{i}"] = K @ np.linalg.inv(c2w_world)
        entries[f"scale_mat_{i}"] = world_from_scene
    np.savez(os.path.join(root, "cameras_sphere.npz"), **entries)


# Where the DTU-format demo puts the scene: millimetres, off the origin, as a DTU scale_mat does.
DEMO_WORLD_FROM_SCENE = np.array([[200.0, 0, 0, 12.0], [0, 200.0, 0, -35.0], [0, 0, 200.0, 610.0], [0, 0, 0, 1]])


def demo_cameras(resolution: int = 128, n_train: int = 40, n_val: int = 4, n_test: int = 24) -> Dict[str, List[Camera]]:
    """Cameras of the demo scene: a train spiral, val views and a held-out test orbit (the video trajectory)."""
    return {
        "train": orbit_cameras(n_train, 2.6, [15, 30, 45, 60, 75, 35, 50, 20], resolution, resolution),
        "val": orbit_cameras(n_val, 2.6, [25, 55], resolution, resolution, azimuth_offset_deg=17.0),
        "test": orbit_cameras(n_test, 2.6, [30], resolution, resolution, azimuth_offset_deg=7.5),
    }


def demo_dtu_cameras(resolution: int = 128, n_views: int = 48) -> List[Camera]:
    """One spiral of views all around the object, two of its seven elevations from below (so the underside
    is observed too); the loader holds out every k-th view, and 7 elevations make the held-out views vary."""
    return orbit_cameras(n_views, 2.6, [15, 45, -20, 60, 30, -35, 75], resolution, resolution)


def ensure_demo_scene(root: str, resolution: int = 128, layout: str = "blender", mesh: str | None = None,
                      mesh_up: str = "y") -> str:
    """Render the demo scene (or, given ``mesh``, that mesh as a ``MeshScene`` with up axis ``mesh_up``) into
    ``root`` unless a current, whole render of it is there (the marker names the mesh by its content's hash).

    layout: "blender" (NeRF-synthetic: RGBA on transparent background, train/
    val/test splits) or "dtu" (NeuS format: images over the textured
    environment, masks, cameras in a millimetre world frame given by
    ``DEMO_WORLD_FROM_SCENE``, or in a mesh's own frame). Renders into a temporary folder beside
    ``root`` and renames it into place, so an interrupted render never leaves
    a half-filled scene, and under a lock on the parent folder, so that runs started
    together render it once. The marker file lists what the render wrote; a render
    with a file missing is redone. ``root`` is replaced only when it is empty or
    holds a demo render and nothing else: a folder of other files (a ``dataset.root_dir`` given
    to a demo config by mistake) is refused, never deleted.
    """
    if layout not in ("blender", "dtu"):
        raise ValueError(f"unknown demo layout {layout!r}")
    # runs started together (a sweep on a fresh checkout) render it once: the others wait, then find it there
    with folder_lock(os.path.dirname(os.path.abspath(root)),
                     f"Waiting for another run to finish rendering the demo scene into {root}"):
        return _ensure_demo_scene_locked(root, resolution, layout, mesh, mesh_up)


def mesh_identity(path: str, up: str) -> dict:
    """What a mesh scene's render depends on: the file's content (SHA-1) and its up axis."""
    with open(path, "rb") as f:
        return {"sha1": hashlib.sha1(f.read()).hexdigest(), "up": up}


def _ensure_demo_scene_locked(root: str, resolution: int, layout: str, mesh: str | None, mesh_up: str) -> str:
    from datasets.base import DatasetError

    marker = os.path.join(root, "demo_scene.json")
    expected = {"version": SCENE_VERSION, "resolution": resolution, "layout": layout,
                "mesh": mesh_identity(mesh, mesh_up) if mesh else None}
    if os.path.isfile(marker):
        with open(marker) as f:
            written = json.load(f)
        missing = [name for name in written.get("files", []) if not os.path.isfile(os.path.join(root, name))]
        if {key: written.get(key) for key in expected} == expected and not missing:
            return root
        rendered = set(written.get("files", [])) | {"demo_scene.json"}
        others = files_not_written_by(root, rendered.__contains__) if "files" in written else []
        if others:
            raise DatasetError(f"The demo scene in {root} must be rendered again, but the folder also holds files "
                               f"the demo did not write ({first_few(others)}); move them out, or give the demo "
                               "another folder (dataset.root_dir=...).")
        if missing:
            log.warning(f"The demo scene in {root} lacks {len(missing)} of its files ({first_few(missing, 1)}): "
                        "rendering it again.")
    elif os.path.isdir(root) and os.listdir(root):
        raise DatasetError(f"{root} holds files that are not the demo scene (no demo_scene.json), and the demo "
                           "would replace them; give the demo a folder of its own (dataset.root_dir=...) or use "
                           "the loader for your data (dataset.name=blender, dtu or colmap).")
    with atomic_folder(root, prefix=".demo-") as tmp:
        scene = MeshScene(mesh, mesh_up) if mesh else DemoScene()
        what = f"the mesh {mesh}" if mesh else "the demo scene"
        log.info(f"Rendering {what} ({layout} layout) into {root} (first use only)")
        if layout == "blender":
            write_blender(tmp, scene, demo_cameras(resolution), progress=True)
        else:
            # a mesh's own frame and units are the world its cameras are written in (its scale_mat), so exports
            # come out where the mesh is: the two open together in a mesh viewer
            world = np.linalg.inv(scene.scene_from_mesh) if mesh else DEMO_WORLD_FROM_SCENE
            write_dtu(tmp, scene, demo_dtu_cameras(resolution), world, progress=True)
        files = sorted(os.path.relpath(os.path.join(parent, name), tmp)
                       for parent, _, names in os.walk(tmp) for name in names)
        with open(os.path.join(tmp, "demo_scene.json"), "w") as f:
            json.dump({**expected, "files": files}, f)
    return root


def demo_surface(resolution: int = 256, world_from_scene: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The demo scene's true surface as a mesh (vertices (V, 3), faces (F, 3)), optionally in a world frame."""
    from utils.mesh import marching_cubes

    verts, faces = marching_cubes(DemoScene().sdf, np.array([[-1.0] * 3, [1.0] * 3]), resolution, 0.0,
                                  inside_is_greater=False, distance_field=True)
    if world_from_scene is not None:
        verts = verts @ world_from_scene[:3, :3].T + world_from_scene[:3, 3]
    return verts, faces


# ------------------------------------------------------------------------------------- a scanned surface
class MeshSceneError(ValueError):
    """A mesh that cannot be rendered as a scene; the message says why in one sentence."""


class MeshScene(DemoScene):
    """A triangle mesh (a real range scan such as the Stanford bunny) as a scene with a known surface.

    The mesh is placed in the demo's frame: its bounding box centred on the origin, ``up`` (its up axis, as a
    letter: instant-ngp's bunny is y-up) turned to +z, and scaled so its farthest vertex is ``radius`` from the
    origin. Rays are traced by trimesh (Embree through ``embreex`` when installed: 40k rays in about 15 ms;
    otherwise trimesh's own tracer, which needs ``rtree``). Normals are the vertices' interpolated and face
    the camera, so the holes of a scan show its inside lit, as a photo would. Colour: a smooth procedural
    albedo in 3-D, so every view agrees on it."""

    UP_AXES = {"x": [[0, 1, 0], [0, 0, 1], [1, 0, 0]], "y": [[1, 0, 0], [0, 0, -1], [0, 1, 0]],
               "z": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}  # scene_from_mesh rotations: that axis to +z

    def __init__(self, path: str, up: str = "y", radius: float = 0.8):
        import importlib.util

        import trimesh

        super().__init__()
        if up not in self.UP_AXES:
            raise MeshSceneError(f"The mesh's up axis is {up!r}; use x, y or z.")
        if not any(importlib.util.find_spec(name) for name in ("embreex", "rtree")):
            raise MeshSceneError("Rendering a mesh needs a ray tracer for trimesh: pip install embreex (or rtree).")
        try:
            mesh = trimesh.load(path, process=False, force="mesh")
        except Exception as err:  # trimesh raises many kinds for a file it cannot read
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise MeshSceneError(f"{path} cannot be read as a mesh ({reason}).") from None
        if len(getattr(mesh, "faces", ())) == 0:
            raise MeshSceneError(f"{path} holds no triangles; give a surface mesh (OBJ, PLY, STL, ...).")
        rotation = np.array(self.UP_AXES[up], dtype=np.float64)
        centred = (mesh.vertices - mesh.bounds.mean(axis=0)) @ rotation.T
        scale = radius / np.linalg.norm(centred, axis=1).max()
        self.scene_from_mesh = np.eye(4)
        self.scene_from_mesh[:3, :3] = scale * rotation
        self.scene_from_mesh[:3, 3] = -scale * rotation @ mesh.bounds.mean(axis=0)
        self.mesh = trimesh.Trimesh(centred * scale, mesh.faces, process=False)

    def sdf(self, p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("A MeshScene has no signed distance (a scan need not be closed): use trace and "
                                  "surface, not the analytic scene's sdf it would otherwise inherit.")

    def surface(self, world_from_scene: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The true surface: vertices (V, 3) in the scene's frame (or a world frame), faces (F, 3)."""
        verts = self.mesh.vertices
        if world_from_scene is not None:
            verts = verts @ world_from_scene[:3, :3].T + world_from_scene[:3, 3]
        return np.asarray(verts), np.asarray(self.mesh.faces)

    def trace(self, rays_o: torch.Tensor, rays_d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import trimesh

        o, d = rays_o.double().numpy(), rays_d.double().numpy()
        hit = torch.zeros(len(o), dtype=torch.bool)
        t = torch.zeros(len(o))
        normal = torch.zeros(len(o), 3)
        points, ray_index, face_index = self.mesh.ray.intersects_location(o, d, multiple_hits=False)
        if len(ray_index):
            corners = self.mesh.triangles[face_index]
            weights = trimesh.triangles.points_to_barycentric(corners, points)
            n = (self.mesh.vertex_normals[self.mesh.faces[face_index]] * weights[:, :, None]).sum(axis=1)
            n *= -np.sign((n * d[ray_index]).sum(axis=1, keepdims=True) + 1e-12)  # facing the camera
            hit[ray_index] = True
            t[ray_index] = torch.from_numpy(((points - o[ray_index]) * d[ray_index]).sum(axis=1)).float()
            normal[ray_index] = torch.nn.functional.normalize(torch.from_numpy(n).float(), dim=-1)
        return hit, t, normal

    def albedo(self, p: torch.Tensor) -> torch.Tensor:
        """(N, 3) colour in [0, 1]: three slow waves across the object, one per channel."""
        waves = torch.stack([torch.sin(7.0 * p[:, 0] + 1.0), torch.sin(9.0 * p[:, 1] + 2.0),
                             torch.sin(8.0 * p[:, 2] + 0.5)], dim=-1)
        return (0.55 + 0.35 * waves).clamp(0, 1)


# ------------------------------------------------------------------------------------------- captures (COLMAP)
class TexturedDemoScene(DemoScene):
    """The demo scene with fine, non-repeating detail on every surface and on the surroundings.

    Structure from motion needs it: SIFT finds few distinctive features on
    the plain demo scene's smooth gradients and regular checkers. The detail
    is a fixed sum of sinusoids in 3-D (deterministic, view-independent).
    """

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        wavenumber = torch.linspace(6.0, 40.0, 48)
        self._freq = torch.nn.functional.normalize(torch.randn(48, 3, generator=g), dim=1) * wavenumber[:, None]
        self._phase = torch.rand(48, generator=g) * 2 * math.pi
        self._amp = wavenumber ** -0.5

    def detail(self, p: torch.Tensor) -> torch.Tensor:
        """(N, 1) texture in [-1, 1] at (N, 3) points."""
        n = (torch.sin(p @ self._freq.T + self._phase) * self._amp).sum(-1)
        return (n / self._amp.norm() / 1.5).clamp(-1, 1)[:, None]

    def albedo(self, p: torch.Tensor) -> torch.Tensor:
        return (super().albedo(p) * (0.75 + 0.25 * self.detail(p))).clamp(0, 1)

    def environment(self, rays_o: torch.Tensor, rays_d: torch.Tensor) -> torch.Tensor:
        b = (rays_o * rays_d).sum(-1)
        c = (rays_o * rays_o).sum(-1) - ENVIRONMENT_RADIUS ** 2
        t = -b + (b * b - c).clamp(min=0).sqrt()
        hit = rays_o + t[:, None] * rays_d
        return (super().environment(rays_o, rays_d) * (0.6 + 0.4 * self.detail(hit * 0.4))).clamp(0, 1)


@torch.no_grad()
def render_rays(scene: DemoScene, rays_o: torch.Tensor, rays_d: torch.Tensor) -> torch.Tensor:
    """(N, 3) colour of the scene over its surroundings along (N, 3) rays (unit directions), one sample each."""
    hit, t, normal = scene.trace(rays_o, rays_d)
    rgb = scene.environment(rays_o, rays_d)
    rgb[hit] = scene.shade(rays_o[hit] + t[hit, None] * rays_d[hit], normal[hit])
    return rgb


def handheld_orbit(n: int, width: int, height: int, fov_x_deg: float = 50.0, seed: int = 0, radius: float = 2.4,
                   elevation: float = 0.9, start_deg: float = 0.0, clockwise: bool = False) -> List[Camera]:
    """A phone walked once around the object from azimuth ``start_deg``, at about ``radius`` from its axis and
    ``elevation`` above its base: radius and height wobble, aim jitters (OpenCV cameras)."""
    rng = np.random.default_rng(seed)
    fx = 0.5 * width / math.tan(math.radians(fov_x_deg) / 2)
    K = np.array([[fx, 0, width / 2], [0, fx, height / 2], [0, 0, 1]])
    cams = []
    for i in range(n):
        a = math.radians(start_deg) + (-1 if clockwise else 1) * 2 * math.pi * i / n
        r = radius + 0.15 * math.sin(3 * a) + rng.normal(0, 0.03)
        z = elevation + 0.2 * math.sin(2 * a) + rng.normal(0, 0.03)
        eye = np.array([r * math.cos(a), r * math.sin(a), z])
        cams.append(Camera(K=K, c2w=look_at(eye, np.array([0.0, 0.0, -0.1]) + rng.normal(0, 0.03, 3)),
                           width=width, height=height))
    return cams


def write_colmap_text(folder: str, cameras: List[tuple], views: List[tuple], points: np.ndarray,
                      colours: np.ndarray | None = None, project=None) -> None:
    """A COLMAP text model (``cameras.txt``, ``images.txt``, ``points3D.txt``) from known cameras.

    cameras: [(model name, width, height, params list)], ids 1, 2, ...;
    views: [(image name, camera index, OpenCV c2w (4, 4))]; points: (P, 3).
    ``project(camera index, (P, 3) camera-frame points) -> (P, 2) pixels``
    places each point's observations (default: pinhole with the first four
    params as fx, fy, cx, cy, or f, cx, cy for SIMPLE_PINHOLE); points in front
    of a camera and inside its image are observed by it.
    """
    from scipy.spatial.transform import Rotation

    os.makedirs(folder, exist_ok=True)
    colours = np.full((len(points), 3), 128, np.uint8) if colours is None else colours

    def pinhole(cam_index, pts):
        model, _, _, params = cameras[cam_index]
        f = (params[0], params[0], params[1], params[2]) if model == "SIMPLE_PINHOLE" else params[:4]
        return np.stack([f[0] * pts[:, 0] / pts[:, 2] + f[2], f[1] * pts[:, 1] / pts[:, 2] + f[3]], -1)

    project = project or pinhole
    seen_uv = []
    for name, cam_index, c2w in views:
        w2c = np.linalg.inv(c2w)
        cam_pts = points @ w2c[:3, :3].T + w2c[:3, 3]
        _, width, height, _ = cameras[cam_index]
        front = cam_pts[:, 2] > 1e-6
        uv = np.full((len(points), 2), -1.0)
        uv[front] = project(cam_index, cam_pts[front])
        seen_uv.append((front & (uv[:, 0] >= 0) & (uv[:, 0] < width) & (uv[:, 1] >= 0) & (uv[:, 1] < height), uv))
    tracked = np.sum([seen for seen, _ in seen_uv], axis=0) >= 2  # COLMAP keeps points seen twice or more
    observations = [[] for _ in points]
    image_lines = []
    for image_id, ((name, cam_index, c2w), (seen, uv)) in enumerate(zip(views, seen_uv), start=1):
        obs = []
        for p in np.nonzero(seen & tracked)[0]:
            observations[p].append((image_id, len(obs)))
            obs.append(f"{uv[p, 0]:.6f} {uv[p, 1]:.6f} {p + 1}")
        w2c = np.linalg.inv(c2w)
        qx, qy, qz, qw = Rotation.from_matrix(w2c[:3, :3]).as_quat()
        t = w2c[:3, 3]
        image_lines += [f"{image_id} {qw:.17g} {qx:.17g} {qy:.17g} {qz:.17g} {t[0]:.17g} {t[1]:.17g} {t[2]:.17g} "
                        f"{cam_index + 1} {name}", " ".join(obs)]
    with open(os.path.join(folder, "cameras.txt"), "w") as f:
        f.write("# CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]\n")
        for k, (model, width, height, params) in enumerate(cameras, start=1):
            f.write(f"{k} {model} {width} {height} {' '.join(f'{p:.17g}' for p in params)}\n")
    with open(os.path.join(folder, "images.txt"), "w") as f:
        f.write("# IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME / POINTS2D[] as (X, Y, POINT3D_ID)\n")
        f.write("\n".join(image_lines) + "\n")
    with open(os.path.join(folder, "points3D.txt"), "w") as f:
        f.write("# POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)\n")
        for p, (xyz, rgb) in enumerate(zip(points, colours)):
            if not tracked[p]:
                continue
            track = " ".join(f"{i} {j}" for i, j in observations[p])
            f.write(f"{p + 1} {xyz[0]:.9g} {xyz[1]:.9g} {xyz[2]:.9g} {rgb[0]} {rgb[1]} {rgb[2]} 0.5 {track}\n")
