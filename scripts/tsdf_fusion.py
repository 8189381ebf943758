"""Fuse an RGB-D capture in the ScanNet export layout into meshes, one per voxel size.

    python scripts/tsdf_fusion.py SCENE_DIR [--voxel-sizes 0.04 0.08 0.16] [--every 1] [--max-depth 3.0]

SCENE_DIR holds ``color/<i>.jpg|png``, ``depth/<i>.png`` (uint16, millimetres),
``pose/<i>.txt`` (4x4 camera-to-world, OpenCV axes) and
``intrinsic/intrinsic_depth.txt`` (4x4 or 3x3; colour images of another
size are resized to the depth images, which they are registered to). Frames whose pose is not finite
(ScanNet marks lost tracking with -inf) are skipped and counted. Writes
``<out>/tsdf_<size in cm>cm.ply`` (default out: SCENE_DIR/tsdf) for each
voxel size, as NeuralRecon's ground-truth generation does at 4, 8 and 16 cm;
each file is written atomically.
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.config import argument_at_least, script_parser  # noqa: E402
from utils.io import script_status_for_os_error  # noqa: E402
from utils.stops import stops_cleanly  # noqa: E402


class FusionError(RuntimeError):
    """Bad input, said in one sentence."""


def read_intrinsics(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FusionError(f"{path} is missing; ScanNet exports keep the depth intrinsics in intrinsic/.")
    K = np.loadtxt(path)
    return K[:3, :3]


def list_frames(scene: str) -> list[str]:
    from datasets.base import where_the_scene_is

    for sub in ("color", "depth", "pose"):
        if not os.path.isdir(os.path.join(scene, sub)):
            hint = where_the_scene_is(scene, lambda folder: all(os.path.isdir(os.path.join(folder, s))
                                                                for s in ("color", "depth", "pose")), option="")
            raise FusionError(f"{os.path.join(scene, sub)} does not exist;{hint}" if hint else
                              f"{os.path.join(scene, sub)} does not exist; the scene needs color/, depth/, pose/ "
                              "and intrinsic/ (ScanNet export layout).")
    stems = sorted((os.path.splitext(f)[0] for f in os.listdir(os.path.join(scene, "depth")) if f.endswith(".png")),
                   key=lambda s: (len(s), s))
    if not stems:
        raise FusionError(f"{os.path.join(scene, 'depth')} has no .png depth images.")
    return stems


def color_path(scene: str, stem: str) -> str | None:
    for ext in (".jpg", ".png", ".jpeg"):
        path = os.path.join(scene, "color", stem + ext)
        if os.path.isfile(path):
            return path
    return None


def load_frames(scene: str, every: int, max_depth: float):
    """Yield (depth (H, W) metres, K_depth, c2w, colour (H, W, 3) in [0, 1]) for frames with a finite pose."""
    import cv2
    import imageio.v2 as imageio

    if not os.path.isdir(scene):
        raise FusionError(f"{scene} {'is a file' if os.path.exists(scene) else 'does not exist'}; give a scene folder in "
                          "the ScanNet export layout.")
    stems = list_frames(scene)  # first: it names the scene folder when a folder of it was given
    K_depth = read_intrinsics(os.path.join(scene, "intrinsic", "intrinsic_depth.txt"))
    for stem in stems[::every]:
        pose_path = os.path.join(scene, "pose", stem + ".txt")
        if not os.path.isfile(pose_path):
            raise FusionError(f"Frame {stem} has a depth image but no pose ({pose_path}).")
        c2w = np.loadtxt(pose_path).reshape(4, 4)
        if not np.isfinite(c2w).all():
            yield None
            continue
        depth = imageio.imread(os.path.join(scene, "depth", stem + ".png")).astype(np.float32) / 1000.0
        depth[(depth <= 0) | (depth > max_depth)] = 0.0
        color = None
        path = color_path(scene, stem)
        if path is not None:
            color = imageio.imread(path)[..., :3].astype(np.float32) / 255.0
            if color.shape[:2] != depth.shape:  # ScanNet's colour and depth cameras are registered
                color = cv2.resize(color, (depth.shape[1], depth.shape[0]), interpolation=cv2.INTER_AREA)
        yield depth, K_depth, c2w, color


def scene_bounds(frames, margin: float) -> np.ndarray:
    """(2, 3) box around the back-projected depth of all frames (1st-99th percentile, plus a margin)."""
    points = []
    for depth, K, c2w, _ in frames:
        v, u = np.nonzero(depth)
        if len(u) == 0:
            continue
        sel = np.random.default_rng(0).choice(len(u), min(len(u), 5000), replace=False)
        z = depth[v[sel], u[sel]]
        cam = np.stack([(u[sel] + 0.5 - K[0, 2]) / K[0, 0] * z, (v[sel] + 0.5 - K[1, 2]) / K[1, 1] * z, z], -1)
        points.append(cam @ c2w[:3, :3].T + c2w[:3, 3])
    if not points:
        raise FusionError("No frame has both a valid pose and depth within --max-depth; nothing to fuse.")
    points = np.concatenate(points)
    return np.stack([np.percentile(points, 1, axis=0) - margin, np.percentile(points, 99, axis=0) + margin])


@stops_cleanly("tsdf_fusion")
def main(argv=None) -> int:
    from tqdm import tqdm

    from utils.mesh import MeshError, write_mesh
    from utils.tsdf import TSDFVolume

    parser = script_parser(__doc__)
    parser.add_argument("scene")
    parser.add_argument("--voxel-sizes", type=argument_at_least(0, float, exclusive=True), nargs="+", default=[0.04, 0.08, 0.16])
    parser.add_argument("--truncation", type=argument_at_least(0, float, exclusive=True), default=3.0, help="in voxels")
    parser.add_argument("--every", type=argument_at_least(1, int), default=1, help="use every k-th frame")
    parser.add_argument("--max-depth", type=argument_at_least(0, float, exclusive=True), default=3.0, help="metres; farther depth is ignored")
    parser.add_argument("--out", help="output folder (default SCENE/tsdf)")
    args = parser.parse_args(argv)
    try:
        def frames():  # streamed: a long capture does not fit in memory
            return load_frames(args.scene, max(1, args.every), args.max_depth)

        counts = {"all": 0, "skipped": 0}

        def counted(stream):
            for frame in stream:
                counts["all"] += 1
                counts["skipped"] += frame is None
                if frame is not None:
                    yield frame

        bounds = scene_bounds(counted(frames()), margin=2 * max(args.voxel_sizes))
        print(f"{counts['all']} frames, {counts['skipped']} skipped for an invalid pose")
        volumes = {size: TSDFVolume(bounds, size, args.truncation * size) for size in args.voxel_sizes}
        for frame in tqdm(frames(), total=counts["all"], desc="fusing"):  # one read per frame, every volume
            if frame is not None:
                for volume in volumes.values():
                    volume.integrate(*frame)
        out_dir = args.out or os.path.join(args.scene, "tsdf")
        for size, volume in volumes.items():
            verts, faces, colors = volume.extract_mesh()
            path = os.path.join(out_dir, f"tsdf_{size * 100:g}cm.ply")
            write_mesh(path, verts, faces, colors)
            print(f"{path}: {len(verts)} vertices, {len(faces)} faces, volume {volume.shape}")
    except (FusionError, MeshError) as err:
        print(f"tsdf_fusion: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        status = script_status_for_os_error(err, os.path.join(args.out or os.path.join(args.scene, "tsdf"), "x"),
                                            "tsdf_fusion")
        if status is None:
            raise
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
