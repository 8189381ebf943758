"""Score a reconstructed mesh against ground truth with the protocols papers quote.

    python scripts/eval_mesh.py MESH --protocol dtu --dtu-dir DIR --scan N [--cull-masks SCENE]
    python scripts/eval_mesh.py MESH --protocol scene --gt GT_MESH [--threshold 0.05] [--crop-margin 0.1]
                                [--frusta SCANNET_SCENE_OR_CAMERAS_NPZ] [--max-depth 3]

dtu: the DTU MVS object evaluation. DIR is the DTU evaluation data
(``Points/stl/stl{scan:03d}_total.ply``, ``ObsMask/ObsMask{scan}_10.mat``,
``ObsMask/Plane{scan}.mat``); the mesh must be in the DTU world frame (this
project's meshes are). The mesh is sampled at ``--density`` (0.2 mm), points
outside the observation mask are not scored for accuracy, ground-truth points
below the table not for completeness, distances of ``--max-dist`` (20 mm) or
more are left out as outliers. Units: millimetres. ``--cull-masks SCENE``
first cuts the mesh to the visual hull of a NeuS-format scene's masks
(``cameras_sphere.npz``, ``image/``, ``mask/``): a vertex stays when in every
view it projects outside the image or onto the mask dilated by
``--cull-dilation`` (12) pixels of a 1600-pixel-wide image (DTU's; scaled to
the images' width), a face when its three vertices stay. This is
the culling MonoSDF and 2DGS (after UNISURF) apply before the DTU figures
they publish; without it, background a run without masks reconstructs is
scored too.

scene: mesh to mesh (NeuralRecon / TransformerFusion style): both surfaces
sampled uniformly by area, accuracy / completeness / Chamfer, and precision /
recall / F-score at ``--threshold`` (scene units, default 0.05 = 5 cm).
``--crop-margin m`` first drops predicted points farther than m outside the
ground truth's bounding box (e.g. the walls of an unbounded reconstruction);
``--frusta CAMS`` keeps only predicted and ground-truth points that some
camera saw (inside its image, up to ``--max-depth``): CAMS is a ScanNet-layout
folder (``intrinsic/intrinsic_depth.txt``, ``pose/*.txt``, ``depth/*.png`` for
the image size) or a NeuS ``cameras_sphere.npz`` (with ``image/`` beside it).

Prints a table, then one JSON object as the last line (``--json FILE`` also
writes it, atomically).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.config import argument_at_least, script_parser  # noqa: E402
from utils.mesh_metrics import (dtu_protocol, in_any_frustum, inside_mask_hull, load_dtu_evaluation,  # noqa: E402
                                sample_surface, surface_distances, uniform_surface_points)
from utils.stops import stops_cleanly  # noqa: E402


class EvalError(RuntimeError):
    """Bad input, said in one sentence."""


def load_mesh(path: str):
    import trimesh

    if not os.path.isfile(path):
        raise EvalError(f"Mesh {path} does not exist.")
    try:
        mesh = trimesh.load(path, process=False, force="mesh")
    except Exception as err:
        raise EvalError(f"{path} cannot be read as a mesh ({type(err).__name__}: {str(err).splitlines()[0][:100]}); "
                        "give a triangle mesh (OBJ/PLY/GLB/OFF).") from None
    if len(mesh.faces) == 0:
        raise EvalError(f"{path} has no faces; give a triangle mesh (OBJ/PLY/GLB/OFF).")
    return gltf_turned_back(path, np.asarray(mesh.vertices, dtype=np.float64)), np.asarray(mesh.faces)


def gltf_turned_back(path: str, vertices: np.ndarray) -> np.ndarray:
    """(V, 3) vertices of a GLB export in the frame its OBJ would have: a run writes GLB turned y-up (glTF's up),
    by the rotation its normalization.json beside it records (``gltf_from_world``; ``gltf_from_scene`` for a
    -normalized.glb). Other meshes, and a GLB without that file, as they are."""
    frames = os.path.join(os.path.dirname(os.path.abspath(path)), "normalization.json")
    if not path.lower().endswith(".glb") or not os.path.isfile(frames):
        return vertices
    key = "gltf_from_scene" if path.lower().endswith("-normalized.glb") else "gltf_from_world"
    with open(frames) as f:
        turn = json.load(f).get(key)
    if turn is None:
        return vertices
    print(f"eval_mesh: {os.path.basename(path)} turned back from glTF's y-up by {frames}'s {key}", file=sys.stderr)
    return vertices @ np.asarray(turn, dtype=np.float64)[:3, :3]  # the rotation's inverse, on row vectors


def read_frusta(path: str) -> list:
    """[(K, c2w OpenCV, width, height)] from a ScanNet-layout folder or a NeuS cameras_sphere.npz."""
    import imageio.v2 as imageio

    if path.endswith(".npz"):
        from datasets.base import DatasetError
        from datasets.dtu import stored_views

        try:
            return stored_views(os.path.dirname(path) or ".", os.path.basename(path))[1]
        except DatasetError as err:
            raise EvalError(f"--frusta {path}: {err}") from None
    pose_dir, depth_dir = os.path.join(path, "pose"), os.path.join(path, "depth")
    K_path = os.path.join(path, "intrinsic", "intrinsic_depth.txt")
    if not (os.path.isdir(pose_dir) and os.path.isdir(depth_dir) and os.path.isfile(K_path)):
        raise EvalError(f"{path} is neither a cameras_sphere.npz nor a ScanNet-layout folder (intrinsic/, pose/, "
                        "depth/).")
    K = np.loadtxt(K_path)[:3, :3]
    depths = sorted(f for f in os.listdir(depth_dir) if f.endswith(".png"))
    if not depths:
        raise EvalError(f"{depth_dir} has no depth images to tell the image size.")
    h, w = imageio.imread(os.path.join(depth_dir, depths[0])).shape[:2]
    out = []
    for name in sorted(os.listdir(pose_dir)):
        c2w = np.loadtxt(os.path.join(pose_dir, name)).reshape(4, 4)
        if np.isfinite(c2w).all():
            out.append((K, c2w, w, h))
    return out


def cull_to_masks(verts: np.ndarray, faces: np.ndarray, scene: str, dilation_px: float) -> tuple[np.ndarray, int]:
    """The faces of the mesh inside the visual hull of ``scene``'s masks, and how many were culled."""
    from datasets.base import DatasetError
    from datasets.dtu import masked_views

    try:
        views, silhouettes = masked_views(scene)
    except DatasetError as err:
        raise EvalError(f"--cull-masks {scene}: {err}") from None
    keep = inside_mask_hull(verts, views, silhouettes, dilation_px)[faces].all(axis=1)
    if not keep.any():
        raise EvalError(f"No face of the mesh lies inside the masks of {scene}; are the mesh and the cameras in "
                        "the same frame (this project's meshes are in the DTU world frame)?")
    return faces[keep], int((~keep).sum())


def evaluate(args) -> dict:
    verts, faces = load_mesh(args.mesh)
    culled = {}
    if args.cull_masks is not None:
        faces, n_culled = cull_to_masks(verts, faces, args.cull_masks, args.cull_dilation)
        culled = {"culled_faces": n_culled}
    return {**culled, **score(args, verts, faces)}


def score(args, verts: np.ndarray, faces: np.ndarray) -> dict:
    if args.protocol == "dtu":
        if args.dtu_dir is None or args.scan is None:
            raise EvalError("--protocol dtu needs --dtu-dir and --scan.")
        try:
            gt, obs_mask, bounds, res, plane = load_dtu_evaluation(args.dtu_dir, args.scan)
        except FileNotFoundError as err:
            raise EvalError(str(err)) from None
        pred = uniform_surface_points(verts, faces, args.density)
        try:
            return dtu_protocol(pred, gt, obs_mask, bounds, res, plane, args.max_dist)
        except ValueError as err:
            raise EvalError(str(err)) from None
    if args.gt is None:
        raise EvalError("--protocol scene needs --gt GT_MESH.")
    gt_v, gt_f = load_mesh(args.gt)
    pred = sample_surface(verts, faces, args.samples, seed=0)
    gt = sample_surface(gt_v, gt_f, args.samples, seed=1)
    if args.frusta is not None:
        cameras = read_frusta(args.frusta)
        pred = pred[in_any_frustum(pred, cameras, args.max_depth)]
        gt = gt[in_any_frustum(gt, cameras, args.max_depth)]
        if len(pred) == 0 or len(gt) == 0:
            raise EvalError(f"No {'predicted' if len(pred) == 0 else 'ground-truth'} point lies inside the camera "
                            f"frusta of {args.frusta}; are the mesh and the cameras in the same frame?")
    if args.crop_margin is not None:
        lo, hi = gt_v.min(0) - args.crop_margin, gt_v.max(0) + args.crop_margin
        pred = pred[np.all((pred >= lo) & (pred <= hi), axis=1)]
        if len(pred) == 0:
            raise EvalError("No predicted point lies within --crop-margin of the ground truth's bounding box.")
    return surface_distances(pred, gt, threshold=args.threshold)


@stops_cleanly("eval_mesh")
def main(argv=None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("mesh",
                        help="the mesh to score (OBJ, PLY or GLB), e.g. exp/<name>/<trial>/save/it20000-mc512.obj")
    parser.add_argument("--protocol", choices=["dtu", "scene"], required=True,
                        help="dtu: the DTU MVS evaluation (mm); scene: mesh to mesh, against --gt")
    parser.add_argument("--dtu-dir", help="dtu: the DTU evaluation data (Points/, ObsMask/)")
    parser.add_argument("--scan", type=int, help="dtu: the scan number (24 for scan24)")
    positive = argument_at_least(0, float, exclusive=True)
    parser.add_argument("--density", type=positive, default=0.2, help="dtu: sampling distance (mm)")
    parser.add_argument("--max-dist", type=positive, default=20.0, help="dtu: outlier distance (mm)")
    parser.add_argument("--gt", help="scene: ground-truth mesh")
    parser.add_argument("--threshold", type=positive, default=0.05, help="scene: F-score distance")
    parser.add_argument("--samples", type=argument_at_least(1, int), default=200_000,
                        help="scene: points sampled on each mesh")
    parser.add_argument("--crop-margin", type=argument_at_least(0), help="scene: drop predicted points this far "
                        "outside the GT box")
    parser.add_argument("--frusta", help="scene: keep points seen by these cameras (ScanNet folder or .npz)")
    parser.add_argument("--max-depth", type=positive, help="scene: with --frusta, the cameras' depth range")
    parser.add_argument("--cull-masks", metavar="SCENE", help="first cut the mesh to the visual hull of this "
                        "NeuS-format scene's masks (cameras_sphere.npz, image/, mask/)")
    parser.add_argument("--cull-dilation", type=argument_at_least(0, float), default=12.0,
                        help="with --cull-masks: the masks' dilation in pixels of a 1600-pixel-wide image "
                        "(DTU's), scaled to the images' width")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    try:
        result = evaluate(args)
    except EvalError as err:
        print(f"eval_mesh: {err}", file=sys.stderr)
        return 2
    result = {"protocol": args.protocol, "mesh": args.mesh, **result}
    for key, value in result.items():
        print(f"{key:>18s}  {value:.5g}" if isinstance(value, float) else f"{key:>18s}  {value}")
    if args.json:
        from utils.io import access_problem, disk_full_error, write_json

        try:
            write_json(args.json, result)
        except OSError as err:
            problem = disk_full_error(err, args.json)
            problem = problem.strerror if problem is not None else access_problem(err)
            if problem is None:
                raise
            print(f"eval_mesh: {problem}; the result is the JSON line below.", file=sys.stderr)
            print(json.dumps(result))
            return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
