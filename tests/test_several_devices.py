"""Training and testing on several devices (DDP), as on a machine with several GPUs: two CPU processes over gloo,
which run the code a two-GPU run does (ranks, the shared trial, rank 0's outputs, the test split shared out)."""
import csv
import glob
import json
import os
import subprocess
import sys

import imageio.v2 as imageio
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# launch.py with its device choice answered "two CPU processes": Lightning's DDP launcher starts the second rank by
# running this same script again, as it reruns launch.py on a GPU machine
TWO_PROCESSES = """import sys
sys.path.insert(0, {root!r})
import launch
launch.choose_devices = lambda gpu: ("cpu", 2)
sys.exit(launch.main(sys.argv[1:]))
"""


def run(script, tmp, *args):
    cmd = [sys.executable, str(script), "--exp_dir", str(tmp / "exp"), "--runs_dir", str(tmp / "runs"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


def logged_test_psnr(trial):
    """The test PSNR the latest run in ``trial`` logged."""
    files = sorted(glob.glob(os.path.join(trial, "csv_logs", "**", "metrics.csv"), recursive=True),
                   key=os.path.getmtime)
    return [float(r["test/psnr"]) for r in csv.DictReader(open(files[-1])) if r.get("test/psnr")][-1]


@pytest.mark.parametrize("n, world_size", [(3, 2), (24, 2), (7, 4), (1, 3), (0, 2)])
def test_the_ranks_share_the_views_out_each_once_in_the_same_number_of_steps(n, world_size):
    from datasets.base import _EvalIndices

    shares = [[_EvalIndices(n, rank, world_size)[i]["index"] for i in range(len(_EvalIndices(n, rank, world_size)))]
              for rank in range(world_size)]
    assert len({len(share) for share in shares}) == 1, shares
    assert sorted(i for share in shares for i in share if i >= 0) == list(range(n))
    assert all(i == -1 for share in shares for i in share[len([j for j in share if j >= 0]):]), shares


@pytest.fixture(scope="module")
def odd_scene(tmp_path_factory):
    """The demo scene at 64 pixels with a test split of 3 views: an odd number, which two ranks cannot share
    evenly (Lightning's DistributedSampler repeats one view to even them out)."""
    from datasets.synthetic import ensure_demo_scene

    root = str(tmp_path_factory.mktemp("scene") / "demo64")
    ensure_demo_scene(root, 64, "blender")
    with open(os.path.join(root, "transforms_test.json")) as f:
        meta = json.load(f)
    meta["frames"] = meta["frames"][:3]
    with open(os.path.join(root, "transforms_odd.json"), "w") as f:
        json.dump(meta, f)
    return root


@pytest.mark.slow
def test_two_devices_train_test_and_continue_as_one(tmp_path, odd_scene):
    script = tmp_path / "launch_two.py"
    script.write_text(TWO_PROCESSES.format(root=ROOT))
    scene = [f"dataset.root_dir={odd_scene}", "dataset.render_resolution=64", "dataset.img_wh=[64,64]",
             "dataset.test_split=odd", "model.geometry.isosurface.resolution=32",
             "model.geometry.isosurface.threshold=1"]
    out = run(script, tmp_path, "--config", "configs/nerf-demo.yaml", "--train", "trainer.max_steps=20",
              "trainer.val_check_interval=20", "trainer.limit_val_batches=1", "tag=ddp", *scene)
    [trial] = glob.glob(str(tmp_path / "exp" / "nerf-demo" / "ddp@*"))
    # each line said once, by rank 0, not once per rank
    for line in ("[nsr] Trial folder:", "[nsr] Model: NeRFModel", "[nsr] Test video:"):
        assert out.count(line) == 1, (line, out[-3000:])
    assert "DistributedSampler" not in out
    save = os.path.join(trial, "save")
    assert sorted(os.listdir(os.path.join(save, "it20-test"))) == ["0.png", "1.png", "2.png"]
    assert imageio.get_reader(os.path.join(save, "it20-test.mp4")).count_frames() == 3
    ddp_psnr = logged_test_psnr(trial)

    # the same checkpoint tested in one process scores each view once: the two ranks' score is the same
    ckpt = os.path.join(trial, "ckpt", "epoch=0-step=20.ckpt")
    parsed = os.path.join(trial, "config", "parsed.yaml")
    run(os.path.join(ROOT, "launch.py"), tmp_path, "--config", parsed, "--resume", ckpt, "--test")
    assert logged_test_psnr(trial) == pytest.approx(ddp_psnr, abs=1e-4)

    # continued on two devices: each rank's ray stream is reseeded, the run goes on to its new total
    out = run(script, tmp_path, "--config", parsed, "--resume", ckpt, "--train", "trainer.max_steps=30", "--skip_test")
    assert out.count("[nsr] Continuing the run from") == 1, out[-3000:]
    assert os.path.isfile(os.path.join(trial, "ckpt", "epoch=0-step=30.ckpt")), os.listdir(os.path.join(trial, "ckpt"))
