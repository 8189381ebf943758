"""What model.pose_refinement does to a scene whose training cameras are slightly wrong (printed only).

    python benchmarks/bench_poses.py                          # the README's table: neus-demo, 8 runs of 1500 steps
    python benchmarks/bench_poses.py --rates off 1e-4 1e-3 -- model.pose_refinement_start=0   # its rows from step 0
    python benchmarks/bench_poses.py --cases moved --rates 1e-3 -- trainer.max_steps=3000

The DTU-layout demo scene is rendered once; a copy has each training camera turned about its centre and its centre
moved, by random amounts whose rms is ``--degrees`` and ``--shift`` (a fraction of its distance to the scene), as
structure from motion leaves them; the held-out views (every 8th) keep their true cameras, so the test PSNR
measures the field the corrected cameras learned. Each case trains neus-demo once per entry of ``--rates``: off, or
refinement at that system.optimizer.params.poses.lr, through launch.py. The table has the test PSNR, the mesh's Chamfer
distance and F-score against the true surface, and, from the last checkpoint, the rms of the learned rotations
(``moved``: the error they leave, rms over the cameras after both are centred, beside the error applied; ``exact``:
how far they wandered from the true cameras). Arguments after ``--`` go to every run.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from quality import demo_scene_and_copy, run_config  # noqa: E402

from datasets.base import holdout_split  # noqa: E402
from datasets.dtu import decompose_projection  # noqa: E402

CONFIG = "configs/neus-demo.yaml"
CASES = ["moved", "exact"]


def move_cameras(root: str, degrees: float, shift: float, seed: int = 1) -> np.ndarray:
    """Turn each training camera of the DTU-layout scene in ``root`` (in place) about its centre and move that
    centre; returns the (N, 3) turns applied to the training cameras, axis-angle in radians in the world frame (the
    model's frame up to the scene's scale and offset), by training-image order."""
    path = os.path.join(root, "cameras_sphere.npz")
    cams = dict(np.load(path))
    n_views = sum(key.startswith("world_mat_") for key in cams)
    rng = np.random.default_rng(seed)
    turns = []
    for i in holdout_split(n_views, "train", 8):
        K, c2w = decompose_projection(cams[f"world_mat_{i}"][:3, :4])
        turn = rng.normal(0.0, np.radians(degrees) / np.sqrt(3), 3)  # rms angle: ``degrees``
        distance = np.linalg.norm(c2w[:3, 3] - cams[f"scale_mat_{i}"][:3, 3])
        c2w[:3, :3] = cv2.Rodrigues(turn)[0] @ c2w[:3, :3]  # a turn in the world frame about the camera's centre
        c2w[:3, 3] += rng.normal(0.0, shift * distance / np.sqrt(3), 3)
        P = np.eye(4)
        P[:3, :3] = K
        cams[f"world_mat_{i}"] = P @ np.linalg.inv(c2w)
        turns.append(turn)
    np.savez(path, **cams)
    return np.array(turns)


def centred(a: np.ndarray) -> np.ndarray:
    return a - a.mean(0, keepdims=True)


def learned_turns(exp_dir: str) -> np.ndarray | None:
    """The (N, 3) rotations the run's last checkpoint learned, centred as the model applies them (None: off)."""
    checkpoints = glob.glob(os.path.join(exp_dir, "*", "*@*", "ckpt", "*.ckpt"))
    if not checkpoints:
        return None
    state = torch.load(max(checkpoints, key=os.path.getmtime), map_location="cpu", weights_only=True)["state_dict"]
    rotation = state.get("model.poses.rotation")
    return None if rotation is None else centred(rotation.double().numpy())


def rms_degrees(turns: np.ndarray) -> float:
    return float(np.degrees(np.sqrt((np.linalg.norm(turns, axis=1) ** 2).mean())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--rates", nargs="+", default=["off", "1e-4", "3e-4", "1e-3"],
                        help="poses' learning rates; off: no refinement")
    parser.add_argument("--degrees", type=float, default=1.0, help="the cameras' rotation errors, rms")
    parser.add_argument("--shift", type=float, default=0.01,
                        help="the errors of their centres, rms, as a fraction of their distance to the scene")
    parser.add_argument("--resolution", type=int, default=128, help="the demo's images, pixels a side")
    args, rest = parser.parse_known_args()
    overrides = [a for a in rest if a != "--"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="nsr-poses-") as tmp:
        exact, moved, size = demo_scene_and_copy(tmp, args.resolution, "moved")
        turns = centred(move_cameras(moved, args.degrees, args.shift))
        print(f"{len(turns)} training cameras turned by {rms_degrees(turns):.2f} degrees rms (centred)")
        for case in args.cases:
            for rate in (None if r == "off" else float(r) for r in args.rates):
                setting = "off" if rate is None else f"lr {rate:g}"
                print(f"running {case} cameras, refinement {setting} ...", flush=True)
                run = [f"dataset.root_dir={moved if case == 'moved' else exact}", *size,
                       f"model.pose_refinement={rate is not None}", *overrides]
                if rate is not None:
                    run.append(f"system.optimizer.params.poses.lr={rate}")
                exp_dir = os.path.join(tmp, f"{case}-{setting.replace(' ', '')}")
                row = run_config(CONFIG, run, exp_dir)
                learned = learned_turns(exp_dir)
                if learned is not None:  # the turn that undoes the camera's is the opposite one
                    row["turn_left"] = rms_degrees(learned + turns if case == "moved" else learned)
                rows.append((case, setting, row))
    print(f"\n{'cameras':8s} {'refinement':>10s} {'steps':>6s} {'wall':>7s} {'PSNR':>7s} {'Chamfer %':>10s} "
          f"{'F-score':>8s} {'turn error left (deg rms)':>26s}")
    for case, setting, r in rows:
        if "error" in r:
            print(f"{case:8s} {setting:>10s} failed: {r['error']}")
            continue
        left = r.get("turn_left", rms_degrees(turns) if case == "moved" else 0.0)
        print(f"{case:8s} {setting:>10s} {r.get('steps', 0):6d} {r['wall_s'] / 60:6.1f}m {r.get('psnr', 0):7.2f} "
              f"{r.get('chamfer_percent_of_diagonal', 0):10.3f} {r.get('fscore', 0):8.3f} {left:26.2f}")


if __name__ == "__main__":
    main()
