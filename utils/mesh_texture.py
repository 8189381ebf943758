"""A mesh with a UV texture atlas besides the one with vertex colours: what game engines, Blender and web viewers
take.

A marching-cubes mesh at 512^3 has a million faces or more, coloured per vertex. ``textured_mesh`` decimates it
(quadric edge collapse, ``fast_simplification``), cuts it into charts laid out in one square image (``xatlas``),
and fills each texel of that image with the field's colour at the surface point it covers: the texture keeps the
colour detail that decimation would take from vertex colours. Texels around each chart are padded with its
colours, so that bilinear filtering and mipmaps at a chart's border do not blend in the empty background.
"""
from __future__ import annotations

import logging
from typing import Callable, Tuple

import numpy as np

log = logging.getLogger("nsr")

# (P, 3) surface points and (P, 3) unit normals (model frame) -> (P, 3) colours in [0, 1]
ColourFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

CHART_PADDING_PX = 4  # texels between charts in the packed atlas
BORDER_PX = 2  # texels about each chart that take its colours (texture filtering reads them)


class TextureError(RuntimeError):
    """The texture atlas cannot be made: the message says why and what to do, in one sentence."""


def import_texture_tools():
    """(fast_simplification, xatlas), or a TextureError that says how to install them."""
    try:
        import fast_simplification
        import xatlas
    except ImportError as err:
        raise TextureError(f"A textured mesh needs the {err.name} package: pip install xatlas fast-simplification "
                           "(xatlas has no wheel for Python 3.14 yet: pip builds it there, which needs a C++ compiler "
                           "and CMake), or set export.textured=false.") from None
    return fast_simplification, xatlas


def decimate(vertices: np.ndarray, faces: np.ndarray, target_faces: int) -> Tuple[np.ndarray, np.ndarray]:
    """(V, 3), (F, 3) -> about ``target_faces`` faces by quadric edge collapse; a mesh already that small is kept."""
    fast_simplification, _ = import_texture_tools()
    if len(faces) <= target_faces:
        return vertices, faces
    v, f = fast_simplification.simplify(np.asarray(vertices, np.float64), np.asarray(faces, np.int32),
                                        target_reduction=1.0 - target_faces / len(faces))
    return v.astype(np.float32), f.astype(np.int64)


def unwrap(vertices: np.ndarray, faces: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """UV charts packed into one square atlas of about ``size`` texels a side.

    Returns (vertex_index (V',) into ``vertices``: a vertex on a seam is split, one copy per chart; faces (F, 3)
    into those copies; uv (V', 2) in [0, 1], read with v up, as OBJ and trimesh read it)."""
    _, xatlas = import_texture_tools()
    # at the size asked, else (charts that did not fit one image of it) one atlas of whatever size they need
    for resolution in (int(size), 0):
        atlas = xatlas.Atlas()
        atlas.add_mesh(np.asarray(vertices, np.float32), np.asarray(faces, np.uint32))
        pack = xatlas.PackOptions()
        pack.padding, pack.resolution, pack.bilinear = CHART_PADDING_PX, resolution, True
        atlas.generate(pack_options=pack)
        if atlas.atlas_count == 1:
            break
    vertex_index, uv_faces, uv = atlas[0]
    return vertex_index.astype(np.int32), uv_faces.astype(np.int64), uv.astype(np.float64)


def rasterize_uv(uv: np.ndarray, faces: np.ndarray, size: int,
                 max_candidates: int = 1 << 21) -> Tuple[np.ndarray, np.ndarray]:
    """Which face covers each texel centre of a ``size`` x ``size`` image, and where on it.

    uv: (V, 2) in [0, 1] (v up: image row 0 is v = 1); faces: (F, 3). Returns (face (size, size) int32, -1 where
    no face covers the texel centre; barycentric (size, size, 3) float32 weights of the face's corners). Faces are
    taken in batches whose bounding boxes hold about ``max_candidates`` texels."""
    corners = np.stack([uv[:, 0] * size, (1.0 - uv[:, 1]) * size], -1)[faces]  # (F, 3, 2) in pixels
    lo = np.clip(np.floor(corners.min(1) - 0.5).astype(np.int64), 0, size - 1)  # texel centres at i + 0.5
    hi = np.clip(np.ceil(corners.max(1) - 0.5).astype(np.int64), 0, size - 1)
    extent = hi - lo + 1
    counts = extent[:, 0] * extent[:, 1]
    face_of = np.full((size, size), -1, np.int32)  # 4 + 12 bytes a texel: 1 GiB at 8192 a side
    weights = np.zeros((size, size, 3), np.float32)
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    area2 = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])  # signed, twice
    ends = np.cumsum(counts)
    start = 0
    while start < len(faces):
        stop = max(start + 1, int(np.searchsorted(ends, (ends[start - 1] if start else 0) + max_candidates)))
        batch = np.arange(start, min(stop, len(faces)))
        batch = batch[np.abs(area2[batch]) > 1e-12]  # faces of no area in the atlas cover no texel
        n = counts[batch]
        face = np.repeat(batch, n)
        offset = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        x = lo[face, 0] + offset % extent[face, 0]
        y = lo[face, 1] + offset // extent[face, 0]
        px, py = x + 0.5, y + 0.5
        w_a = ((b[face, 0] - px) * (c[face, 1] - py) - (b[face, 1] - py) * (c[face, 0] - px)) / area2[face]
        w_b = ((c[face, 0] - px) * (a[face, 1] - py) - (c[face, 1] - py) * (a[face, 0] - px)) / area2[face]
        w = np.stack([w_a, w_b, 1.0 - w_a - w_b], -1)
        inside = (w >= -1e-9).all(-1)
        face_of[y[inside], x[inside]] = face[inside]
        weights[y[inside], x[inside]] = w[inside].clip(min=0.0)
        start = stop
    return face_of, weights


def pad_charts(image: np.ndarray, covered: np.ndarray, pixels: int = BORDER_PX) -> np.ndarray:
    """(H, W, 3) image whose ``covered`` (H, W) texels hold colours -> the same with each chart's colours carried
    ``pixels`` texels outwards (the mean of the covered neighbours), and the rest the mean colour."""
    import cv2

    image, covered = image.astype(np.float32).copy(), covered.copy()
    kernel = np.ones((3, 3), np.float32)
    for _ in range(pixels):
        total = cv2.filter2D(image * covered[..., None], -1, kernel, borderType=cv2.BORDER_CONSTANT)
        count = cv2.filter2D(covered.astype(np.float32), -1, kernel, borderType=cv2.BORDER_CONSTANT)
        grown = ~covered & (count > 0)
        image[grown] = total[grown] / count[grown, None]
        covered |= grown
    if covered.any():
        image[~covered] = image[covered].mean(0)
    return image


def textured_mesh(vertices: np.ndarray, faces: np.ndarray, colour_fn: ColourFn, size: int, target_faces: int,
                  name: str = "mesh", texel_chunk: int = 1 << 18):
    """A decimated, UV-unwrapped copy of (V, 3) ``vertices`` and (F, 3) ``faces`` whose ``size`` x ``size``
    texture holds ``colour_fn`` at the surface point of each texel (queried ``texel_chunk`` at a time).

    Returns a ``trimesh.Trimesh`` with ``TextureVisuals`` (its material and image called ``name``)."""
    import trimesh
    from PIL import Image

    from utils.io import late_bar

    if size < 16 or target_faces < 4:
        raise TextureError(f"export.texture_size ({size}) must be at least 16 and export.texture_faces "
                           f"({target_faces}) at least 4.")
    verts, tris = decimate(vertices, faces, target_faces)
    log.info(f"Textured mesh: {len(faces)} faces decimated to {len(tris)}; UV charts (xatlas) for a {size}x{size} "
             "atlas...")
    vertex_index, uv_faces, uv = unwrap(verts, tris, size)
    face_of, weights = rasterize_uv(uv, uv_faces, size)
    covered = face_of >= 0
    corners = vertex_index[uv_faces[face_of[covered]]]  # (T, 3) decimated vertices of each covered texel's face
    texel_weights = weights[covered][..., None]
    del face_of, weights
    normals = np.asarray(trimesh.Trimesh(verts, tris, process=False).vertex_normals, np.float32)
    colours = np.zeros((len(corners), 3), np.float32)
    bar = late_bar(total=len(corners), desc="colouring texels", unit="texel", unit_scale=True)
    for i in range(0, len(corners), texel_chunk):  # the surface point and normal of each texel, a chunk at a time
        corner, w = corners[i:i + texel_chunk], texel_weights[i:i + texel_chunk]
        texel_normals = (normals[corner] * w).sum(1)
        texel_normals /= np.linalg.norm(texel_normals, axis=-1, keepdims=True).clip(min=1e-12)
        colours[i:i + texel_chunk] = colour_fn((verts[corner] * w).sum(1), texel_normals)
        bar.update(len(corner))
    bar.close()
    image = np.zeros((size, size, 3), np.float32)
    image[covered] = colours
    image = pad_charts(image, covered)
    texture = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    material = trimesh.visual.material.SimpleMaterial(image=texture, name=name, diffuse=(255, 255, 255, 255),
                                                      ambient=(255, 255, 255, 255), specular=(0, 0, 0, 255))
    visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    return trimesh.Trimesh(verts[vertex_index], uv_faces, visual=visual, process=False)
