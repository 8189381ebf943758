"""Marching-cubes mesh extraction from a field, and mesh writers.

Extraction evaluates the field on a grid in two passes (a coarse grid finds
the box that holds the surface, the fine grid covers only that box), in
chunks of points, so a 512^3 grid fits on a 24 GiB CPU machine.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Tuple

import mcubes
import numpy as np
import torch
import trimesh
from tqdm import tqdm

from utils.io import atomic_path

log = logging.getLogger("nsr")

FieldFn = Callable[[torch.Tensor], torch.Tensor]

# On a CPU a field query is fastest on a few ten thousand points: its intermediates (per level, per corner) then
# stay in cache and the allocator reuses their memory. Queries of 2^21 points (the GPU-sized chunks of the
# configs) allocate and fault in fresh pages every call: a NeRF density query ran at 0.2-0.3 M points/s with
# 2^21 and 0.9 M with 2^15 on 2 cores, and the 384^3 grid of an export took 165 s instead of under a minute.
CPU_POINTS_PER_CALL = 2 ** 15


def points_per_call(chunk: int, device: torch.device | str) -> int:
    """Points per field query: the config's ``chunk`` (a memory bound, sized for a GPU), at most
    ``CPU_POINTS_PER_CALL`` on a CPU."""
    return min(chunk, CPU_POINTS_PER_CALL) if torch.device(device).type == "cpu" else chunk


class MeshError(RuntimeError):
    """The field has no extractable surface; the message says why."""


def evaluate_grid(field: FieldFn, lo: np.ndarray, hi: np.ndarray, resolution: int, chunk: int,
                  device: torch.device) -> np.ndarray:
    """Field values on a resolution^3 grid spanning [lo, hi] (inclusive), ``points_per_call(chunk)`` points per
    query. Returns (R, R, R) float32, [x, y, z]."""
    chunk = points_per_call(chunk, device)
    axes = [torch.linspace(float(lo[d]), float(hi[d]), resolution, device=device) for d in range(3)]
    volume = np.empty((resolution,) * 3, dtype=np.float32)
    plane = resolution * resolution
    slabs = max(1, chunk // plane)
    yy, zz = torch.meshgrid(axes[1], axes[2], indexing="ij")
    yz = torch.stack([yy.reshape(-1), zz.reshape(-1)], dim=-1)
    with torch.no_grad():
        for i in tqdm(range(0, resolution, slabs), desc=f"marching cubes {resolution}^3", leave=False,
                      disable=resolution < 256):
            xs = axes[0][i:i + slabs]
            pts = torch.cat([xs.repeat_interleave(plane)[:, None], yz.repeat(len(xs), 1)], dim=-1)
            vals = torch.cat([field(pts[j:j + chunk]).reshape(-1).float() for j in range(0, len(pts), chunk)])
            volume[i:i + len(xs)] = vals.view(len(xs), resolution, resolution).cpu().numpy()
    return volume


def marching_cubes(field: FieldFn, bounds: np.ndarray, resolution: int, threshold: float,
                   inside_is_greater: bool, chunk: int = 2 ** 21, device: torch.device | str = "cpu",
                   coarse_resolution: int = 64, distance_field: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Surface ``field == threshold`` inside ``bounds`` (2, 3).

    inside_is_greater: True for densities (inside where field > threshold),
    False for signed distances. Returns (vertices (V, 3) float32, faces (F, 3)
    int64), faces wound so normals point out of the solid. Raises MeshError on
    an empty or non-finite field.

    A coarse grid first finds the box that holds the surface, and the fine grid of ``resolution`` points a side
    covers only that box (a finer mesh than over all of ``bounds``). A part thinner than the coarse cells falls
    between their points; so that it is not cut off at the box:
    - ``distance_field`` (an SDF, whose value bounds the distance to the surface): the box also covers the coarse
      points within half a cell's diagonal of the surface, not only those inside;
    - any field: a side of the box that the inside reaches on the fine grid is moved out to ``bounds`` and the
      fine grid evaluated again.
    """
    device = torch.device(device)
    sign = 1.0 if inside_is_greater else -1.0
    lo, hi = np.asarray(bounds[0], np.float64), np.asarray(bounds[1], np.float64)

    def inside_volume(lo_, hi_, res):
        vol = evaluate_grid(field, lo_, hi_, res, chunk, device)
        bad = ~np.isfinite(vol)
        if bad.any():
            raise MeshError(f"The field is not finite at {int(bad.sum())} of {vol.size} grid points "
                            "(the model has diverged); no mesh was written.")
        return sign * (vol - threshold)

    coarse_res = min(coarse_resolution, resolution)
    coarse = inside_volume(lo, hi, coarse_res)
    cell = (hi - lo) / (coarse_res - 1)
    inside_points = np.argwhere(coarse > 0)
    # an SDF's surface lies within half a cell's diagonal of some coarse point, whose value is then at most that
    near_points = np.argwhere(coarse > -0.5 * float(np.linalg.norm(cell))) if distance_field else inside_points[:0]
    if len(inside_points) == 0 and len(near_points) == 0:
        raise MeshError(f"The field has no surface at threshold {threshold} inside the box "
                        f"{lo.round(3).tolist()} - {hi.round(3).tolist()} (field range "
                        f"{float(sign * coarse.min() + threshold):.4g} to {float(sign * coarse.max() + threshold):.4g}); "
                        "train longer or change isosurface.threshold.")
    # cells: 2 around the inside points (a heuristic margin), 1 around those near an SDF's surface (enough there)
    boxes = [(points.min(0) - margin, points.max(0) + margin)
             for points, margin in ((inside_points, 2), (near_points, 1)) if len(points)]
    first, last = np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)
    tight_lo = np.maximum(lo, lo + first * cell)
    tight_hi = np.minimum(hi, lo + last * cell)
    while True:
        fine = inside_volume(tight_lo, tight_hi, resolution)
        inside = fine > 0
        reached_lo = [tight_lo[d] > lo[d] and inside.take(0, axis=d).any() for d in range(3)]
        reached_hi = [tight_hi[d] < hi[d] and inside.take(-1, axis=d).any() for d in range(3)]
        if not any(reached_lo) and not any(reached_hi):
            break
        tight_lo = np.where(reached_lo, lo, tight_lo)
        tight_hi = np.where(reached_hi, hi, tight_hi)
        log.debug("Marching cubes: the surface reaches past the box the coarse grid found (a part thinner than its "
                  f"cells); evaluating again over {tight_lo.round(3).tolist()} - {tight_hi.round(3).tolist()}")
    if not inside.any() or inside.all():
        raise MeshError(f"The field has no surface at threshold {threshold}: it is "
                        f"{'everywhere inside' if inside.all() else 'nowhere inside'} the box; no mesh was written.")
    verts, faces = mcubes.marching_cubes(fine, 0.0)
    verts = tight_lo + verts / (resolution - 1) * (tight_hi - tight_lo)
    faces = faces.astype(np.int64)  # PyMCubes winds them outward from the positive (inside) region
    return verts.astype(np.float32), faces


def face_components(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F,) the edge-connected piece each face belongs to, numbered from 0."""
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    return trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(faces))


def largest_component(vertices: np.ndarray, faces: np.ndarray,
                      colors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Keep the connected component with the most faces (edge-connected); unused vertices dropped.

    vertices (V, 3), faces (F, 3), colors (V, C) or None -> the same, smaller.
    """
    labels = face_components(vertices, faces)
    keep = labels == np.bincount(labels).argmax()
    kept_faces = faces[keep]
    used = np.unique(kept_faces)
    remap = np.full(len(vertices), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return vertices[used], remap[kept_faces], None if colors is None else colors[used]


GLTF_UP = np.array([0.0, 1.0, 0.0])  # glTF's up: viewers and Blender's importer stand a model on +y

# glTF reads a primitive without a material, or a material without metallicFactor, as metallic 1: three.js, Babylon
# and model-viewer then show a scan as dark rough metal (no diffuse part). Ours are matte, and double-sided, so a
# surface cut open by the bounding box shows its inside instead of a hole.
MATTE = {"baseColorFactor": [1.0, 1.0, 1.0, 1.0], "metallicFactor": 0.0, "roughnessFactor": 1.0}


def give_primitives_a_matte_material(tree: dict) -> None:
    """A trimesh ``tree_postprocessor`` for GLB: a matte material for every primitive without one (COLOR_0, the
    vertex colours, multiplies its white base colour). trimesh 4.0 writes no material for a mesh without UVs."""
    tree.setdefault("materials", []).append({"name": "matte", "pbrMetallicRoughness": dict(MATTE),
                                             "doubleSided": True})
    for mesh in tree.get("meshes", []):
        for primitive in mesh["primitives"]:
            primitive.setdefault("material", len(tree["materials"]) - 1)


def write_mesh(path: str, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None) -> None:
    """Write OBJ, PLY or GLB (glTF binary: COLOR_0 and a matte material) by extension, with optional per-vertex
    colours in [0, 1], atomically. trimesh reads such a GLB's colours as vertex colours with
    ``skip_materials=True`` (trimesh 4.0.6+); otherwise the material makes the scene's mesh a texture visual that
    keeps them in ``visual.vertex_attributes["color"]`` (which ``force="mesh"`` drops)."""
    visual = None
    if colors is not None:
        rgba = np.concatenate([np.clip(colors, 0, 1), np.ones((len(colors), 1))], axis=1)
        visual = trimesh.visual.ColorVisuals(vertex_colors=(rgba * 255).round().astype(np.uint8))
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, visual=visual, process=False)
    ext = path.rsplit(".", 1)[-1].lower()
    with atomic_path(path) as tmp:
        if ext == "obj":
            text = trimesh.exchange.obj.export_obj(mesh, include_color=colors is not None, include_normals=False,
                                                   include_texture=False)
            with open(tmp, "w") as f:
                f.write(text)
        elif ext == "glb":
            mesh.export(tmp, file_type=ext, tree_postprocessor=give_primitives_a_matte_material)
        else:
            mesh.export(tmp, file_type=ext)


def write_textured_mesh(path: str, mesh: trimesh.Trimesh) -> None:
    """A mesh with ``TextureVisuals`` as GLB (the texture inside) or as OBJ with ``<stem>.mtl`` and the texture
    ``<stem>.png`` beside it (written before the OBJ that names them), each file atomically."""
    import io
    import re

    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    if ext.lower() == ".glb":  # matte (see MATTE)
        material = trimesh.visual.material.PBRMaterial(name=stem, baseColorTexture=mesh.visual.material.image,
                                                       baseColorFactor=[255, 255, 255, 255], doubleSided=True,
                                                       metallicFactor=MATTE["metallicFactor"],
                                                       roughnessFactor=MATTE["roughnessFactor"])
        matte = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False,
                                visual=trimesh.visual.TextureVisuals(uv=mesh.visual.uv, material=material))
        with atomic_path(path) as tmp:
            matte.export(tmp, file_type="glb")
        return
    text = trimesh.exchange.obj.export_obj(mesh, include_normals=False, include_texture=True, write_texture=False,
                                           mtl_name=f"{stem}.mtl")
    material = re.search(r"^usemtl (\S+)", text, re.MULTILINE).group(1)  # trimesh's name for it varies by version
    png = io.BytesIO()
    mesh.visual.material.image.save(png, format="PNG")
    # white reflectances: viewers that multiply the texture by Kd (0.4 by default in some) show it as it is
    mtl = f"newmtl {material}\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nillum 1\nmap_Kd {stem}.png\n"
    for file_name, data in ((f"{stem}.png", png.getvalue()), (f"{stem}.mtl", mtl.encode()), (name, text.encode())):
        with atomic_path(os.path.join(folder, file_name)) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
