"""TSDF fusion of the demo scene's rendered depth: the fused surface lies on the known one."""
import os
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest
import trimesh

from datasets.synthetic import DemoScene, demo_surface, orbit_cameras, render
from utils.mesh_metrics import score_against_surface
from utils.tsdf import TSDFVolume

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rgbd_frames(n=16, size=64):
    """(depth with 0 where nothing is hit, colour, camera) of orbit views from above and below."""
    scene = DemoScene()
    for cam in orbit_cameras(n, 2.6, [15, 45, -20, 60, -35], size, size):
        out = render(scene, cam, 1)
        depth = np.where(out["rgba"][..., 3] > 0.5, out["depth"], 0.0)
        yield depth, out["rgba"][..., :3], cam


def test_fused_surface_matches_the_known_surface_within_a_voxel():
    voxel = 0.02
    volume = TSDFVolume(np.array([[-1.0] * 3, [1.0] * 3]), voxel)
    for depth, colour, cam in rgbd_frames():
        volume.integrate(depth, cam.K, cam.c2w, colour)
    verts, faces, colours = volume.extract_mesh()
    scores = score_against_surface(verts, faces, *demo_surface(256))
    assert scores["accuracy"] < 0.5 * voxel and scores["completeness"] < 0.5 * voxel, scores
    assert scores["fscore"] > 0.95  # at 1.6 cm: no shell behind the surface where observation stops
    assert colours.shape == verts.shape and 0.1 < colours.mean() < 0.9
    assert trimesh.Trimesh(verts, faces).volume > 0  # wound outward


def write_scannet(root, frames, bad_pose_index=3):
    for sub in ("color", "depth", "pose", "intrinsic"):
        os.makedirs(os.path.join(root, sub))
    for i, (depth, colour, cam) in enumerate(frames):
        imageio.imwrite(os.path.join(root, "depth", f"{i}.png"), np.round(depth * 1000).astype(np.uint16))
        big = np.repeat(np.repeat((colour * 255).round().astype(np.uint8), 2, 0), 2, 1)  # colour at 2x
        imageio.imwrite(os.path.join(root, "color", f"{i}.jpg"), big, quality=95)
        pose = np.full((4, 4), -np.inf) if i == bad_pose_index else cam.c2w
        np.savetxt(os.path.join(root, "pose", f"{i}.txt"), pose)
    K = np.eye(4)
    K[:3, :3] = frames[0][2].K  # one camera for the whole capture, as ScanNet
    np.savetxt(os.path.join(root, "intrinsic", "intrinsic_depth.txt"), K)


@pytest.mark.slow
def test_scannet_layout_fuses_at_several_voxel_sizes(tmp_path):
    scene = tmp_path / "scene0000_00"
    write_scannet(str(scene), list(rgbd_frames(n=17)))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "tsdf_fusion.py"), str(scene),
                           "--voxel-sizes", "0.04", "0.02"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "17 frames, 1 skipped for an invalid pose" in proc.stdout
    gt = demo_surface(256)
    chamfers = {}
    for size in ("4", "2"):
        mesh = trimesh.load(scene / "tsdf" / f"tsdf_{size}cm.ply", process=False)
        chamfers[size] = score_against_surface(mesh.vertices, mesh.faces, *gt)["chamfer"]
    print("TSDF Chamfer by voxel size (cm):", chamfers)
    assert chamfers["2"] < 0.01 and chamfers["2"] < chamfers["4"] < 0.02, chamfers
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "tsdf_fusion.py"), str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
    # the scene's color/ given for it (tab completion): the scene folder is named
    inner = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "tsdf_fusion.py"), str(scene / "color")],
                           capture_output=True, text=True, timeout=60)
    assert inner.returncode == 2 and inner.stderr.strip().endswith(
        f"color lies inside the scene folder {scene}: give that, {scene}."), inner.stderr
