"""End-to-end through launch.py on the demo scene, as a user runs it (CPU, small sizes)."""
import codecs
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import trimesh
from omegaconf import OmegaConf

from helpers import demo_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = ["dataset.render_resolution=64", "dataset.img_wh=[64,64]", "trainer.max_steps=400",
         "trainer.val_check_interval=400", "model.geometry.isosurface.resolution=64", "trainer.limit_val_batches=1"]


def launch(tmp, *args, expect=0):
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), "--exp_dir", str(tmp / "exp"), "--runs_dir",
           str(tmp / "runs"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, out[-3000:]
    return out


def metrics_from_csv(trial):
    """Test PSNR of the latest run in a trial (a later run logs under csv_logs/<mode>@<time>/)."""
    import csv
    files = sorted(glob.glob(os.path.join(trial, "csv_logs", "**", "metrics.csv"), recursive=True),
                   key=os.path.getmtime)
    rows = list(csv.DictReader(open(files[-1])))
    psnr = [float(r["test/psnr"]) for r in rows if r.get("test/psnr")]
    return psnr[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    data = str(tmp / "demo64")
    out = launch(tmp, "--config", "configs/nerf-demo.yaml", "--train", f"dataset.root_dir={data}", "tag=e2e", *SMALL)
    trials = glob.glob(str(tmp / "exp" / "nerf-demo" / "e2e@*"))
    assert len(trials) == 1, out[-2000:]
    return tmp, data, trials[0], out


@pytest.mark.slow
def test_train_writes_the_instant_nsr_pl_tree(trained):
    tmp, _, trial, out = trained
    for sub in ("ckpt", "save", "code", "csv_logs", "config/parsed.yaml", "config/raw.yaml"):
        assert os.path.exists(os.path.join(trial, sub)), sub
    assert "no effect" not in out  # no config key went unread
    assert glob.glob(str(tmp / "runs" / "nerf-demo" / os.path.basename(trial) / "events.out.tfevents*"))
    save = os.path.join(trial, "save")
    assert os.path.isfile(os.path.join(save, "it400-0.png"))
    assert len(glob.glob(os.path.join(save, "it400-test", "*.png"))) == 24
    assert "Device: CPU" in out
    # the log says device and model once, in our words: not Lightning's GPU/TPU lines and summary table
    assert re.search(r"\[nsr\] Model: NeRFModel, \d+\.\d\d M trainable parameters", out)
    assert "GPU available" not in out and "Total params" not in out and "was configured so 100%" not in out
    assert [os.path.basename(p) for p in glob.glob(os.path.join(trial, "ckpt", "*.ckpt"))] == ["epoch=0-step=400.ckpt"]
    # the mesh's pieces (floaters) are said, with the option that keeps the largest, as the OBJ has them
    mesh = trimesh.load(glob.glob(os.path.join(save, "it400-mc*.obj"))[0], process=False)
    sizes = np.bincount(trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces)))
    said = re.search(r"\[nsr\] Mesh: \S+ \(\d+ vertices, (\d+) faces(?:, (\d+) pieces, (\d+) faces outside the "
                     r"largest: export\.largest_component_only=true keeps only it)?\)", out)
    assert said and int(said.group(1)) == len(mesh.faces), out[-3000:]
    assert int(said.group(2) or 1) == len(sizes) and int(said.group(3) or 0) == len(mesh.faces) - sizes.max()


@pytest.mark.slow
def test_quality_beats_constant_colour_and_outputs_open(trained):
    tmp, data, trial, _ = trained
    psnr = metrics_from_csv(trial)
    # best constant colour for the held-out images (white background composited)
    imgs = [imageio.imread(p).astype(np.float32) / 255 for p in sorted(glob.glob(os.path.join(data, "test", "*.png")))]
    rgb = np.stack([i[..., :3] * i[..., 3:] + (1 - i[..., 3:]) for i in imgs])
    baseline = -10 * np.log10(((rgb - rgb.mean(axis=(0, 1, 2))) ** 2).mean())
    assert psnr > baseline + 8, f"test PSNR {psnr:.2f} vs constant-colour {baseline:.2f}"
    mesh = trimesh.load(os.path.join(trial, "save", "it400-mc64.obj"), process=False)
    assert len(mesh.faces) > 1000 and mesh.visual.kind == "vertex"
    # the mesh lies on the known surface (accuracy) and covers it (completeness)
    from scipy.spatial import cKDTree

    from datasets.synthetic import DemoScene
    from utils.mesh import marching_cubes
    scene = DemoScene()
    dist = scene.sdf(torch.from_numpy(np.asarray(mesh.vertices)).float()).abs()
    assert float(dist.median()) < 0.03, f"median distance to the true surface {float(dist.median()):.3f}"
    gt_v, gt_f = marching_cubes(scene.sdf, np.array([[-1.0] * 3, [1.0] * 3]), 128, 0.0, inside_is_greater=False,
                               distance_field=True)
    gt_points = trimesh.Trimesh(gt_v, gt_f).sample(20000)
    covered = cKDTree(mesh.sample(50000)).query(gt_points)[0] < 0.05
    assert covered.mean() > 0.9, f"only {covered.mean():.2f} of the true surface is within 0.05 of the mesh"
    reader = imageio.get_reader(os.path.join(trial, "save", "it400-test.mp4"))
    frames = [frame for frame in reader]  # list() would trust the reader's unknown (infinite) length
    assert len(frames) == 24 and frames[0].shape[0] % 16 == 0 and frames[0].shape[1] % 16 == 0


@pytest.mark.slow
def test_resume_then_test_equals_test_after_training(trained):
    tmp, data, trial, _ = trained
    save = os.path.join(trial, "save")
    before_mesh = trimesh.load(os.path.join(save, "it400-mc64.obj"), process=False)
    before_img = imageio.imread(os.path.join(save, "it400-test", "3.png"))
    before_psnr = metrics_from_csv(trial)
    ckpt = glob.glob(os.path.join(trial, "ckpt", "*.ckpt"))[0]
    for name in ("it400-mc64.obj", "it400-test.mp4", "it400-test/3.png"):
        os.remove(os.path.join(save, name))
    launch(tmp, "--config", os.path.join(trial, "config", "parsed.yaml"), "--resume", ckpt, "--test")
    assert os.path.isfile(os.path.join(save, "it400-test.mp4"))
    assert os.path.isfile(os.path.join(trial, "csv_logs", "metrics.csv")), "the training run's log is kept"
    after_mesh = trimesh.load(os.path.join(save, "it400-mc64.obj"), process=False)
    assert len(after_mesh.vertices) == len(before_mesh.vertices)
    np.testing.assert_allclose(after_mesh.vertices, before_mesh.vertices, atol=1e-5)
    after_img = imageio.imread(os.path.join(save, "it400-test", "3.png"))
    assert np.abs(after_img.astype(int) - before_img.astype(int)).max() <= 1
    assert abs(metrics_from_csv(trial) - before_psnr) < 1e-3


def logged(trial, key):
    """Every value of ``key`` in the trial's CSV logs, oldest run first."""
    import csv
    files = sorted(glob.glob(os.path.join(trial, "csv_logs", "**", "metrics.csv"), recursive=True),
                   key=os.path.getmtime)
    return [float(r[key]) for f in files for r in csv.DictReader(open(f)) if r.get(key)]


@pytest.mark.slow
def test_validate_reproduces_the_training_runs_validation(trained):
    tmp, data, trial, _ = trained
    ckpt = glob.glob(os.path.join(trial, "ckpt", "*.ckpt"))[0]
    during_training = logged(trial, "val/psnr")
    out = launch(tmp, "--config", os.path.join(trial, "config", "parsed.yaml"), "--resume", ckpt, "--validate")
    after = logged(trial, "val/psnr")
    assert len(after) == len(during_training) + 1
    assert abs(after[-1] - during_training[-1]) < 1e-3
    said = re.search(r"Validation: (\d+) held-out views, PSNR ([\d.]+): (\S+)it400-<view>\.png", out)
    assert said and abs(float(said.group(2)) - after[-1]) < 0.01
    assert len(glob.glob(said.group(3) + "it400-*.png")) == int(said.group(1))  # limit_val_batches' number


@pytest.mark.slow
def test_resume_weights_only_starts_a_fresh_run_from_the_weights(trained, tmp_path):
    """From the trial's own parsed.yaml, as a fine-tune is usually started: the new run gets a trial folder beside
    the old one. It used to write into the old one: its config over the old run's record, its it{step} outputs
    over the old run's of the same step."""
    tmp, data, trial, _ = trained
    ckpt = glob.glob(os.path.join(trial, "ckpt", "*.ckpt"))[0]
    moved = tmp_path / "results" / os.path.basename(trial)  # beside the trial wherever it is, not under ./exp
    shutil.copytree(trial, moved)
    before = {path: open(path, "rb").read() for path in glob.glob(str(moved / "**" / "*"), recursive=True)
              if os.path.isfile(path)}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), "--config",
                           str(moved / "config" / "parsed.yaml"), "--train", "--resume", ckpt, "--resume_weights_only",
                           "--runs_dir", str(tmp_path / "runs"), "tag=again", "trainer.max_steps=5",
                           "trainer.val_check_interval=5", "model.geometry.isosurface.resolution=32",
                           "system.optimizer.args.lr=0.001"],  # a fine-tune's rate
                          cwd=tmp_path, capture_output=True, text=True, timeout=1200)  # no --exp_dir
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"--resume_weights_only starts a new trial in {tmp_path / 'results'}; {moved} is left as it is." in out
    after = {path: open(path, "rb").read() for path in glob.glob(str(moved / "**" / "*"), recursive=True)
             if os.path.isfile(path)}
    assert after == before
    again = glob.glob(str(tmp_path / "results" / "again@*"))[0]
    fresh = glob.glob(os.path.join(again, "ckpt", "*.ckpt"))
    assert [os.path.basename(f) for f in fresh] == ["epoch=0-step=5.ckpt"], "the step count starts at 0"
    assert os.path.isfile(os.path.join(again, "save", "it5-test.mp4"))
    assert OmegaConf.load(os.path.join(again, "config", "parsed.yaml")).trainer.max_steps == 5
    assert OmegaConf.load(os.path.join(again, "config", "raw.yaml")).trainer.max_steps == 5
    # 5 steps from scratch give about 11 dB on this scene. From the trained weights (28.7 dB) a fresh Adam's first
    # steps move every weight by about the learning rate: at parsed.yaml's 0.01 (its schedule resolved for 400
    # steps, so no decay within 5) they cost up to 6 dB, at a fine-tune's 0.001 0.02 to 0.09 dB
    assert logged(again, "test/psnr")[-1] > logged(trial, "test/psnr")[0] - 1.0


@pytest.mark.slow
def test_continuing_a_run_to_a_step_count_it_has_reached_says_so(trained):
    """--train --resume with trainer.max_steps at or below the checkpoint's step trains nothing; Lightning says
    nothing about it, so a user who meant "1000 more steps" saw the old test figures again without a word."""
    tmp, data, trial, _ = trained
    ckpt = glob.glob(os.path.join(trial, "ckpt", "*.ckpt"))[0]
    before = sorted(os.listdir(os.path.join(trial, "ckpt")))
    record = open(os.path.join(trial, "config", "parsed.yaml")).read()
    out = launch(tmp, "--config", os.path.join(trial, "config", "parsed.yaml"), "--train", "--resume", ckpt,
                 "--skip_test", "trainer.max_steps=300")
    assert ("The checkpoint is at step 400, already trainer.max_steps=300 or past it: nothing to train. Continue "
            "training with a larger trainer.max_steps (the total, e.g. 1400).") in out
    assert sorted(os.listdir(os.path.join(trial, "ckpt"))) == before
    assert open(os.path.join(trial, "config", "parsed.yaml")).read() == record  # it said max_steps: 300 after


@pytest.mark.slow
def test_export_writes_video_and_mesh_without_metrics(trained, tmp_path):
    tmp, data, trial, _ = trained
    ckpt = glob.glob(os.path.join(trial, "ckpt", "*.ckpt"))[0]
    # what a kill mid-write (the out-of-memory killer) leaves in the trial goes at its next run, unless fresh
    left = [os.path.join(trial, "ckpt", ".tmp-cut.ckpt"), os.path.join(trial, "save", ".tmp-frames")]
    os.makedirs(left[1])
    for path in (left[0], os.path.join(left[1], "0.png"), os.path.join(trial, "ckpt", ".tmp-writing.ckpt")):
        with open(path, "wb") as f:
            f.write(b"x" * 4096)
    for path in (*left, os.path.join(left[1], "0.png")):
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    out = launch(tmp, "--config", os.path.join(trial, "config", "parsed.yaml"), "--resume", ckpt, "--export",
                 f"save_dir={tmp_path}")
    assert not any(os.path.exists(path) for path in left) and os.path.isfile(os.path.join(trial, "ckpt",
                                                                                        ".tmp-writing.ckpt"))
    assert f"Removed 2 temporary file(s) (0.0 MiB) left in {trial} by a run killed while writing them" in out
    os.remove(os.path.join(trial, "ckpt", ".tmp-writing.ckpt"))
    assert os.path.isfile(tmp_path / "it400-test.mp4") and os.path.isfile(tmp_path / "it400-mc64.obj")
    assert "test/psnr" not in out
    assert "no effect" not in out  # the trial's parsed.yaml (paths and trial name added) is read in full

    obj = trimesh.load(tmp_path / "it400-mc64.obj", process=False)
    # another format (PLY's writing is held in tests/test_outputs.py): GLB stands the capture on glTF's +y (it lay
    # on its side in viewers, AR and Blender). The demo's world is z-up, so the GLB is the OBJ turned
    # (x, y, z) -> (x, z, -y); eval_mesh turns it back by normalization.json
    launch(tmp, "--config", os.path.join(trial, "config", "parsed.yaml"), "--resume", ckpt, "--export",
           f"save_dir={tmp_path / 'glb'}", "export.mesh_format=glb", "+trainer.limit_test_batches=1",
           "export.textured=true", "export.texture_size=256", "export.texture_faces=3000")
    from test_outputs import glb_vertex_colours, texture_samples

    glb = trimesh.load(tmp_path / "glb" / "it400-mc64.glb", force="mesh", process=False)
    np.testing.assert_allclose(glb.vertices, obj.vertices[:, [0, 2, 1]] * [1, 1, -1], atol=1e-4)
    assert np.array_equal(glb.faces, obj.faces)
    glb_colours = glb_vertex_colours(tmp_path / "glb" / "it400-mc64.glb")  # COLOR_0, under the matte material
    assert np.abs(glb_colours.astype(int) - obj.visual.vertex_colors.astype(int)).max() <= 1
    # its textured copy is turned the same way, and its texture holds the colours of the vertices near each point
    from scipy.spatial import cKDTree

    textured = trimesh.load(tmp_path / "glb" / "it400-mc64-textured.glb", force="mesh", process=False)
    assert textured.visual.kind == "texture" and len(textured.faces) <= 3000
    points, sampled = texture_samples(textured)
    distance, nearest = cKDTree(glb.vertices).query(points)
    assert np.median(distance) < 0.01 * np.linalg.norm(np.ptp(glb.vertices, axis=0))  # on the mesh, turned alike
    # 0.05 (NeRF's colour depends on the normal it is seen along: the decimated mesh's differ); 0.20 between the
    # colours of points drawn at random, as a texture read upside down gives
    assert np.abs(sampled - glb_colours[nearest, :3] / 255.0).mean() < 0.1
    scores, said = {}, {}
    for mesh in (tmp_path / "glb" / "it400-mc64.glb", tmp_path / "it400-mc64.obj"):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "eval_mesh.py"), str(mesh), "--protocol",
                               "scene", "--gt", str(tmp_path / "it400-mc64.obj")], capture_output=True, text=True)
        scores[mesh.suffix], said[mesh.suffix] = json.loads(proc.stdout.splitlines()[-1])["chamfer"], proc.stderr
    assert "it400-mc64.glb turned back from glTF's y-up" in said[".glb"] and not said[".obj"]
    assert scores[".glb"] < 2 * scores[".obj"] + 1e-3, scores  # the same surface
    # no surface at the threshold: the video is written, and the exit status says the mesh is not (it was 0)
    out = launch(tmp, "--config", os.path.join(trial, "config", "parsed.yaml"), "--resume", ckpt, "--export",
                 f"save_dir={tmp_path / 'none'}", "model.geometry.isosurface.threshold=1e9",
                 "+trainer.limit_test_batches=1", expect=1)
    assert "Mesh export skipped: The field has no surface at threshold 1000000000.0" in out
    assert "--export wrote the video but no mesh (see above)." in out
    assert sorted(os.listdir(tmp_path / "none")) == ["it400-test", "it400-test.mp4"]


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_good_weights(tmp_path):
    data = str(tmp_path / "demo64")
    out = launch(tmp_path, "--config", "configs/nerf-demo.yaml", "--train", f"dataset.root_dir={data}",
                 *SMALL[:2], "trainer.max_steps=50", "system.loss.lambda_rgb=[3,1.0,1e39,4]", expect=3)
    # 1e39 overflows float32: a finite term, an infinite loss; the error names the weight that did it
    assert re.search(r"not finite at step 4 \(rgb=0\.\d+ \(weight 1e\+39\)\)", out), out[-3000:]
    assert "Traceback" not in out
    good = glob.glob(str(tmp_path / "exp" / "nerf-demo" / "*" / "ckpt" / "last-good-step*.ckpt"))
    assert good
    state = torch.load(good[0], weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert int(state["trained_steps"]) == 4  # the run's count is at the check after it (fused: up to step 10)
    # the way on it gives: --resume alone would restore the learning rate with the optimiser, and say so
    lower = re.search(r"half the learning rate [^:]*: python launch.py (.*?) ; or", out)
    assert lower and "--resume_weights_only system.optimizer.args.lr=0.005" in lower.group(1), out[-3000:]
    assert "continue the run as it was (its learning rate restored with the optimiser): python launch.py" in out
    out = launch(tmp_path, *shlex.split(lower.group(1)), "system.loss.lambda_rgb=1.0", "trainer.max_steps=10",
                 "--skip_test")
    assert "no effect" not in out and "Trained to step 10" in out, out[-3000:]
    assert re.search(r"Loaded weights from \S+last-good-step4.ckpt \((step 4|weights of step 4, run's step 10: .*)\)",
                     out), out[-3000:]
    again = re.search(r"Trained to step 10: (\S+\.ckpt)", out).group(1)
    groups = torch.load(again, weights_only=True)["optimizer_states"][0]["param_groups"]
    assert [(g["name"], g["initial_lr"]) for g in groups] == [("geometry", 0.005), ("texture", 0.005)]  # at args.lr


def launch_then_signal(tmp, sig, after_step: int, *args, bar: str = "Epoch 0", again_after: str = "",
                       delay: float = 0.0):
    """Run launch.py and send it ``sig`` ``delay`` seconds after its progress bar (``bar``: training's, or
    "Testing DataLoader 0") has passed ``after_step``, and, with ``again_after``, a second time once the output
    shows that text. Returns (exit status, output)."""
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), "--exp_dir", str(tmp / "exp"), "--runs_dir",
           str(tmp / "runs"), *args]
    # every step's bar redraw, as on a terminal, though the output is a pipe: the signal goes at the step asked
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, TQDM_MINITERS="1"))
    chunks = []
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def read():  # whatever the pipe holds, as soon as it holds it (a buffered read would wait for more)
        while data := os.read(proc.stdout.fileno(), 65536):
            chunks.append(decoder.decode(data))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        steps = [int(n) for n in re.findall(re.escape(bar) + r":\s+\d+%\|[^|]*\|\s*(\d+)/", "".join(chunks))]
        if steps and max(steps) >= after_step:
            time.sleep(delay)
            proc.send_signal(sig)
            break
        time.sleep(0.2)
    while again_after and proc.poll() is None and time.monotonic() < deadline:
        if again_after in "".join(chunks):
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    proc.wait(timeout=600)
    reader.join(timeout=10)
    return proc.returncode, "".join(chunks)


@pytest.mark.slow
@pytest.mark.parametrize("sig, status, said", [
    (signal.SIGINT, 130, "Stopped by SIGINT (Ctrl-C); every file written so far is whole."),
    (signal.SIGTERM, 143, "Stopped by SIGTERM before training or testing began; every file written so far is whole."),
])
def test_a_signal_while_the_demo_scene_renders_leaves_no_half_rendered_folder(tmp_path, sig, status, said):
    """SIGTERM outside Lightning's stages ended the process at once (Python's default): the demo scene's
    temporary .demo-* folder and an empty trial folder stayed behind."""
    data = tmp_path / "data" / "demo"
    code, out = launch_then_signal(tmp_path, sig, 3, "--config", "configs/nerf-demo.yaml", "--train",
                                   f"dataset.root_dir={data}", bar="rendering train views")
    assert code == status and f"[nsr] {said}" in out and "Traceback" not in out, out[-2000:]
    assert not (tmp_path / "data").exists() or os.listdir(tmp_path / "data") == []
    assert not (tmp_path / "exp").exists() or not any(files for _, _, files in os.walk(tmp_path / "exp"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_saves_a_checkpoint_that_resumes_the_run(tmp_path, sig):
    """Lightning alone exits at Ctrl-C saving nothing; here the step under way finishes, a resumable checkpoint
    is written, validation and the test are skipped, and the message gives the command that continues the run.
    With Ctrl-C, ModelCheckpoint also saves every step: the stop checkpoint is then its file, not a second copy."""
    data = str(tmp_path / "demo64")
    every_step = ["checkpoint.every_n_train_steps=1"] if sig == signal.SIGINT else []
    status, out = launch_then_signal(tmp_path, sig, 3, "--config", "configs/nerf-demo.yaml", "--train",
                                     f"dataset.root_dir={data}", "tag=stop", *SMALL[:2], "trainer.max_steps=1000",
                                     "trainer.val_check_interval=1000", *every_step)
    assert status == 128 + sig, out[-3000:]
    stopped = re.search(r"Stopped by (\w+) at step (\d+) of 1000; the checkpoint (\S+) holds it\. Continue with: "
                        r"python launch.py --config (\S+) --resume \3 --runs_dir \S+/runs --train", out)
    assert stopped and stopped.group(1) == sig.name and "Traceback" not in out, out[-3000:]
    step, ckpt, parsed = int(stopped.group(2)), stopped.group(3), stopped.group(4)
    assert 3 <= step < 1000
    assert os.path.basename(ckpt) == f"epoch=0-step={step}.ckpt"
    assert not glob.glob(os.path.join(os.path.dirname(ckpt), "*-v1.ckpt")), "no second copy of the same step"
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == step and state["optimizer_states"], "resumable: optimiser state saved"
    trial = os.path.dirname(os.path.dirname(ckpt))
    assert not glob.glob(os.path.join(trial, "save", "*-test*")), "the test is skipped"
    assert not glob.glob(os.path.join(trial, "save", f"it{step}-*.png")), "and so is Lightning's validation"

    # The same signal during a later --test: Lightning alone ends it with status 0 (SIGTERM) or 1 (Ctrl-C).
    status, out = launch_then_signal(tmp_path, sig, 2, "--config", parsed, "--resume", ckpt, "--test",
                                     bar="Testing DataLoader 0")
    assert status == 128 + sig and "Traceback" not in out, out[-3000:]
    assert re.search(rf"\n\[nsr\] Stopped by {sig.name} during the test: its outputs in \S+ are incomplete; the "
                     rf"checkpoint {re.escape(ckpt)} is whole\. Redo the test with: python launch.py --config \S+ "
                     rf"--resume {re.escape(ckpt)} --runs_dir \S+/runs --test", out), out[-3000:]  # on its own line
    if sig != signal.SIGINT:  # Lightning's handler, acknowledged on a line of its own, not on the bar's
        assert "\n[nsr] SIGTERM received: stopping after the batch under way.\n" in out, out[-3000:]
        assert "Received SIGTERM" not in out
        return
    out = launch(tmp_path, "--config", parsed, "--resume", ckpt, "--train", f"trainer.max_steps={step + 10}",
                 "model.geometry.isosurface.resolution=32")
    assert (f"[nsr] Continuing the run from {ckpt} (step {step}: weights, optimiser, schedule and random "
            "streams)") in out
    assert "have no effect" not in out  # nothing the checkpoint restores is set otherwise by parsed.yaml
    final = glob.glob(os.path.join(trial, "ckpt", f"*step={step + 10}.ckpt"))
    assert final and torch.load(final[0], weights_only=True)["global_step"] == step + 10
    assert os.path.basename(final[0]) == f"epoch=0-step={step + 10}.ckpt", "the name of an uninterrupted run"
    assert os.path.isfile(os.path.join(trial, "save", f"it{step + 10}-test.mp4"))


@pytest.mark.slow
def test_second_ctrl_c_quits_at_once_and_names_the_last_checkpoint(tmp_path):
    """Ctrl-C is acknowledged at once; a second one within the (deliberately slow) step quits without finishing it,
    and the message names the newest checkpoint (ModelCheckpoint writes one every step here) and exits 130, not
    Lightning's 1."""
    data = str(tmp_path / "demo64")
    status, out = launch_then_signal(tmp_path, signal.SIGINT, 1, "--config", "configs/nerf-demo.yaml", "--train",
                                     f"dataset.root_dir={data}", "tag=quit", *SMALL[:2], "trainer.max_steps=1000",
                                     "checkpoint.every_n_train_steps=1", "model.train_num_rays=16384",
                                     "model.dynamic_ray_sampling=false", "model.grid_prune=false",
                                     again_after="SIGINT received: finishing the step under way, then saving a "
                                                 "checkpoint (Ctrl-C again quits without one).",
                                     delay=1.0)  # into the next step: the bar moves before the step's callbacks end
    assert status == 130 and "Traceback" not in out, out[-3000:]
    quit_ = re.search(r"Quit by Ctrl-C after step (\d+), saving nothing\. The last checkpoint is (\S+); "
                      r"continue with: python launch.py --config \S+ --resume \2 --runs_dir \S+/runs --train", out)
    assert quit_, out[-3000:]
    step, ckpt = int(quit_.group(1)), quit_.group(2)
    assert os.path.basename(ckpt) == f"epoch=0-step={step}.ckpt" and os.path.isfile(ckpt)
    steps = [int(re.search(r"step=(\d+)", f).group(1)) for f in os.listdir(os.path.dirname(ckpt))]
    assert max(steps) == step, "nothing saved after the second Ctrl-C"


@pytest.mark.slow
def test_checkpointing_off_trains_tests_and_stops_without_writing_a_checkpoint(tmp_path):
    """``trainer.enable_checkpointing: false`` (a sweep saving disk) is honoured: Lightning alone refuses it with a
    traceback, since a ModelCheckpoint is always added. The run trains, tests and exports; Ctrl-C still stops at
    the step's end and says that nothing could be saved."""
    data = str(tmp_path / "demo64")
    off = "+trainer.enable_checkpointing=false"
    launch(tmp_path, "--config", "configs/nerf-demo.yaml", "--train", f"dataset.root_dir={data}", "tag=off",
           *SMALL[:2], "trainer.max_steps=5", "+trainer.limit_test_batches=2", off)
    trial = glob.glob(str(tmp_path / "exp" / "nerf-demo" / "off@*"))[0]
    assert os.path.isfile(os.path.join(trial, "save", "it5-test.mp4")), "the test ran"
    assert not glob.glob(str(tmp_path / "exp" / "**" / "*.ckpt"), recursive=True)

    status, out = launch_then_signal(tmp_path, signal.SIGINT, 2, "--config", "configs/nerf-demo.yaml", "--train",
                                     f"dataset.root_dir={data}", "tag=nockptstop", *SMALL[:2], "trainer.max_steps=1000",
                                     off)
    assert status == 130 and "Traceback" not in out, out[-3000:]
    assert re.search(r"Stopped by SIGINT at step \d+ of 1000; checkpointing is off \(trainer.enable_checkpointing: "
                     r"false\), so no checkpoint holds it\.", out), out[-3000:]
    assert not glob.glob(str(tmp_path / "exp" / "**" / "*.ckpt"), recursive=True)


def test_stop_message_is_a_command_to_paste(caplog):
    """The command printed after Ctrl-C survives a space in the experiment folder."""
    from omegaconf import OmegaConf

    from utils.stops import report_stopped

    ckpt = "/data/my runs/neus/t@1/ckpt/epoch=0-step=5.ckpt"
    config = OmegaConf.create({"config_dir": "/data/my runs/neus/t@1/config"})
    with caplog.at_level("ERROR", logger="nsr"):
        status = report_stopped("SIGINT", 5, 100, ckpt, config)
    assert status == 130
    command = caplog.text.split("Continue with: ", 1)[1].strip()
    assert shlex.split(command) == ["python", "launch.py", "--config", "/data/my runs/neus/t@1/config/parsed.yaml",
                                    "--resume", ckpt, "--train"]


def test_the_printed_command_finds_launch_py_from_another_folder(monkeypatch, tmp_path):
    """Run from the repository's root, the commands say ``python launch.py``; from another folder (``python
    ~/nsr/launch.py``, outputs under that folder's ./exp) they said the same, which is not there: now its path."""
    from omegaconf import OmegaConf

    from utils.stops import resume_command

    config = OmegaConf.create({"config_dir": "exp/neus/t@1/config"})
    assert resume_command(config, "exp/neus/t@1/ckpt/a.ckpt", "--test").startswith("python launch.py --config exp/")
    monkeypatch.chdir(tmp_path)
    assert resume_command(config, "exp/neus/t@1/ckpt/a.ckpt", "--test") == (
        f"python {shlex.quote(os.path.join(ROOT, 'launch.py'))} --config exp/neus/t@1/config/parsed.yaml "
        "--resume exp/neus/t@1/ckpt/a.ckpt --test")


def test_bad_command_lines_are_one_sentence(tmp_path):
    out = launch(tmp_path, "--config", "configs/nerf-demo.yaml", "--train", "system.loss.lamda_rgb=2", expect=2)
    assert "did you mean system.loss.lambda_rgb?" in out and "Traceback" not in out
    out = launch(tmp_path, "--config", "configs/missing.yaml", "--train", expect=2)
    assert "does not exist" in out and "Traceback" not in out
    out = launch(tmp_path, "--config", "configs/nerf-blender.yaml", "--train", "dataset.scene=nothere", expect=2)
    assert "load/nerf_synthetic/nothere" in out and "nerf-demo" in out and "Traceback" not in out
    out = launch(tmp_path, "--config", "configs/nerf-demo.yaml", "--test", "--resume", str(tmp_path / "no.ckpt"),
                 f"dataset.root_dir={tmp_path / 'scene'}", expect=2)
    assert "no.ckpt' does not exist" in out and "Traceback" not in out
    assert not (tmp_path / "scene").exists(), "refused before the scene is read (or the demo rendered)"
    out = launch(tmp_path, "--config", "configs/nerf-demo.yaml", "--train", "model.num_samples_per_ray=0",
                 f"dataset.root_dir={tmp_path / 'scene'}", expect=2)
    assert "model.num_samples_per_ray must be a whole number >= 1, not 0." in out and "Traceback" not in out
    assert not (tmp_path / "scene").exists(), "a model option is checked before the scene is read"
    out = launch(tmp_path, "--config", "configs/nerf-demo.yaml", "--train", "system.optimizer.args.lr=-1",
                 f"dataset.root_dir={tmp_path / 'scene'}", expect=2)
    assert "torch.optim.Adam refuses the config's system.optimizer: Invalid learning rate: -1." in out
    assert not (tmp_path / "scene").exists(), "and so is the optimiser's"
    out = launch(tmp_path, "--config", "configs/nerf-demo.yaml", "--gpu", "0", "--train", "trainer.max_stepz=1",
                 expect=2)
    assert "did you mean trainer.max_steps?" in out and "Device" not in out, "answered before torch is imported"
    out = launch(tmp_path, "--config", "configs/nerf-demo.yaml", "--gpu", "0", "--test", expect=2)
    assert "running on the CPU instead" in out and "--test needs a checkpoint" in out
    out = launch(tmp_path, "--config", "configs/nerf-demo.yaml", "--train", "trainer.max_steps=2.5", expect=2)
    assert "trainer.max_steps must be a whole number >= 1, not 2.5." in out and "Traceback" not in out
    partial = tmp_path / "partial.yaml"
    partial.write_text("name: partial\nseed: 1\n")
    out = launch(tmp_path, "--config", str(partial), "--train", expect=2)
    assert "The config has no top-level dataset, model and system, which every run needs" in out
    assert "Traceback" not in out and "Device" not in out, "answered before torch is imported"
    assert not os.path.exists(tmp_path / "exp" / "partial"), "no empty trial folder left behind"


@pytest.mark.parametrize("argv, message", [
    (["--gpu", "abc"], "--gpu: takes CUDA device numbers such as 0 or 0,1 (each once), not 'abc'"),
    (["--gpu", "0,0"], "(each once), not '0,0'"),
    (["--resume_weights_only"], "--resume_weights_only loads the weights of the checkpoint given by --resume"),
])
def test_command_line_mistakes_argparse_can_see_are_refused_before_anything_runs(argv, message, capsys):
    import launch as launch_module

    with pytest.raises(SystemExit) as stop:
        launch_module.parse_args(["--config", "configs/nerf-demo.yaml", "--train", *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    args, _ = launch_module.parse_args(["--config", "c.yaml", "--train", "--gpu", "0, 1"])
    assert args.gpu == "0,1"


def test_a_tilde_the_shell_left_in_a_path_option_is_the_home_folder(monkeypatch, tmp_path):
    import launch as launch_module

    monkeypatch.setenv("HOME", str(tmp_path))
    args, _ = launch_module.parse_args(["--config=~/c.yaml", "--test", "--resume=~/last.ckpt", "--exp_dir=~/exp",
                                        "--runs_dir=~/runs"])
    assert (args.config, args.resume) == (str(tmp_path / "c.yaml"), str(tmp_path / "last.ckpt"))
    assert (args.exp_dir, args.runs_dir) == (str(tmp_path / "exp"), str(tmp_path / "runs"))


@pytest.mark.slow
def test_incompatible_checkpoint_is_refused(trained):
    tmp, data, trial, _ = trained
    ckpt = glob.glob(os.path.join(trial, "ckpt", "*.ckpt"))[0]
    never = tmp / "never-rendered"
    out = launch(tmp, "--config", "configs/nerf-demo.yaml", "--test", "--resume", ckpt, f"dataset.root_dir={never}",
                 "model.geometry.xyz_encoding_config.n_levels=4", expect=2)
    assert "does not match this config" in out and "Traceback" not in out
    parsed = os.path.join(trial, "config", "parsed.yaml")  # the config that fits it, named
    assert out.rstrip().endswith(f"use the config its trial trained with: --config {parsed}."), out[-500:]
    assert not never.exists()  # said before the scene is read (here: rendered)
    # the trial folder instead of a file in it: the newest checkpoint there is suggested
    out = launch(tmp, "--config", "configs/nerf-demo.yaml", "--test", "--resume", trial, f"dataset.root_dir={data}",
                 expect=2)
    newest = max(glob.glob(os.path.join(trial, "ckpt", "*.ckpt")), key=os.path.getmtime)
    assert f"Checkpoint '{trial}' is a folder; give a checkpoint file, e.g. --resume {newest}" in out


@pytest.mark.slow
def test_a_continued_run_names_the_options_its_checkpoint_overrides(trained, tmp_path):
    """--train --resume restores the optimiser and the schedule whole (Lightning): a learning rate changed on the
    command line was dropped without a word. Parameter groups that differ were a traceback from torch, after
    the scene had loaded."""
    _, data, trial, _ = trained
    copy = tmp_path / os.path.basename(trial)  # the run below writes its parsed.yaml into the trial
    shutil.copytree(trial, copy)
    ckpt = glob.glob(str(copy / "ckpt" / "*.ckpt"))[0]
    out = launch(tmp_path, "--config", str(copy / "config" / "parsed.yaml"), "--train", "--resume", ckpt,
                 "--skip_test", "system.optimizer.args.lr=0.02", "seed=5", "trainer.max_steps=405")
    assert ("so these options of this config have no effect: system.optimizer.args.lr: 0.02 here, 0.01 restored; "
            "seed: 5 here, 42 restored. The trial's config/parsed.yaml records the restored values.") in out
    parsed, last = shlex.quote(str(copy / "config" / "parsed.yaml")), copy / "ckpt" / "epoch=0-step=405.ckpt"
    assert (f"[nsr] Trained to step 405: {last}. Test and export it with: python launch.py --config {parsed} "
            f"--resume {shlex.quote(str(last))} --runs_dir {tmp_path / 'runs'} --test") in out  # --skip_test's end
    record = OmegaConf.load(copy / "config" / "parsed.yaml")  # written by this run, which trained 5 steps
    assert record.trainer.max_steps == 405 and record.system.optimizer.args.lr == 0.01 and record.seed == 42
    out = launch(tmp_path, "--config", str(copy / "config" / "parsed.yaml"), "--train", "--resume", ckpt,
                 "--skip_test")
    assert "have no effect" not in out  # the trial's own config: nothing differs
    never = tmp_path / "never-rendered"
    out = launch(tmp_path, "--config", str(copy / "config" / "parsed.yaml"), "--train", "--resume", ckpt,
                 f"dataset.root_dir={never}", "system.optimizer.params=null", expect=2)
    assert ("The checkpoint's optimiser has the parameter groups ['geometry', 'texture'], this config's "
            "system.optimizer.params gives ['all']: continue the run with its trial's config/parsed.yaml") in out
    assert "Traceback" not in out and not never.exists()


@pytest.mark.slow
def test_tsdf_export_is_as_close_to_the_true_surface_as_marching_cubes(trained, tmp_path):
    tmp, data, trial, _ = trained
    ckpt = glob.glob(os.path.join(trial, "ckpt", "*.ckpt"))[0]
    save = os.path.join(trial, "save")
    mc_before = open(os.path.join(save, "it400-mc64-metrics.json")).read()
    launch(tmp, "--config", os.path.join(trial, "config", "parsed.yaml"), "--resume", ckpt, "--export",
           "model.geometry.isosurface.method=tsdf")
    mc = json.load(open(os.path.join(save, "it400-mc64-metrics.json")))
    tsdf = json.load(open(os.path.join(save, "it400-tsdf64-metrics.json")))
    assert open(os.path.join(save, "it400-mc64-metrics.json")).read() == mc_before  # each mesh keeps its figures
    assert (mc["mesh"], tsdf["mesh"]) == ("it400-mc64.obj", "it400-tsdf64.obj")
    assert trimesh.load(os.path.join(save, "it400-tsdf64.obj"), process=False).visual.kind == "vertex"
    assert tsdf["chamfer"] < 1.5 * mc["chamfer"], (tsdf, mc)  # same order, without a density threshold


def test_lightning_refusing_a_trainer_or_checkpoint_option_is_one_sentence():
    from pytorch_lightning.callbacks import ModelCheckpoint

    import launch as launcher

    with pytest.raises(launcher.UserError, match=r"^Lightning's ModelCheckpoint refuses the config's checkpoint "
                                                 r"section: `mode` can be min, max but got sideways$"):
        with launcher.lightning_refusals("checkpoint section", "ModelCheckpoint"):
            ModelCheckpoint(monitor="val/psnr", mode="sideways")
    with pytest.raises(launcher.UserError, match=r"^The config's checkpoint section has an option Lightning's "
                                                 r"ModelCheckpoint does not take \(.*'every_n_step'\)\.$"):
        with launcher.lightning_refusals("checkpoint section", "ModelCheckpoint"):
            ModelCheckpoint(every_n_step=5)


def test_a_failed_run_removes_the_folders_it_made_only_while_they_hold_no_file(tmp_path):
    """A run refused in configure_optimizers (lr: -1) has had its loggers make csv_logs/ by then."""
    import launch as launcher

    exp, trial = tmp_path / "exp" / "nerf-demo", tmp_path / "exp" / "nerf-demo" / "@20260102-030405"
    (trial / "csv_logs").mkdir(parents=True)
    launcher.remove_empty([str(trial), str(exp)])
    assert not exp.exists()
    (trial / "config").mkdir(parents=True)
    (trial / "config" / "parsed.yaml").write_text("name: nerf-demo\n")
    launcher.remove_empty([str(trial), str(exp)])
    assert (trial / "config" / "parsed.yaml").is_file()


def test_output_folders_that_cannot_be_written_are_refused_before_anything_runs(tmp_path, capsys):
    """A file where --exp_dir or --runs_dir needs a folder was a NotADirectoryError traceback from the trial's
    makedirs, or from TensorBoard's logger once the model was built."""
    import launch as launcher

    blocker = tmp_path / "afile"
    blocker.write_text("")
    for option in ("--exp_dir", "--runs_dir"):
        others = {"--exp_dir": str(tmp_path / "exp"), "--runs_dir": str(tmp_path / "runs"), option: str(blocker / "x")}
        argv = ["--config", "configs/nerf-demo.yaml", "--train", *[v for kv in others.items() for v in kv]]
        assert launcher.main(argv) == 2
        said = "".join(capsys.readouterr())
        assert f"{option} {blocker / 'x'} cannot be written: {blocker} is a file, not a folder" in said
    assert sorted(os.listdir(tmp_path)) == ["afile"]
    assert launcher.folder_problem(str(tmp_path / "new" / "deeper")) is None


def test_gpu_asked_for_but_unusable_says_why(monkeypatch):
    """--gpu on a machine where CUDA has no device fell back to the CPU with "no CUDA device is available", whatever
    the cause; the commonest on a GPU machine, a CPU-only PyTorch wheel, went unnamed."""
    from types import SimpleNamespace

    import utils.devices as devices

    cpu_build = SimpleNamespace(__version__="2.13.0+cpu", version=SimpleNamespace(cuda=None))
    assert "this PyTorch (2.13.0+cpu) is a CPU-only build; install a CUDA build" in devices.why_no_cuda(cpu_build)
    cuda_build = SimpleNamespace(__version__="2.13.0+cu128", version=SimpleNamespace(cuda="12.8"))
    monkeypatch.setattr(devices.os.path, "exists", lambda path: False)
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)
    assert devices.why_no_cuda(cuda_build) == "no NVIDIA driver is loaded on this machine"
    monkeypatch.setattr(devices.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert devices.why_no_cuda(cuda_build).startswith("CUDA sees no device among CUDA_VISIBLE_DEVICES='3'; give "
                                                      "device numbers that nvidia-smi lists")


@pytest.mark.parametrize("preset, gpu, visible, expected, said", [
    (None, "1", 2, 1, None),
    (None, "0,1", 1, 1, "--gpu 0,1 asks for 2 GPUs but CUDA shows 1: training on 1."),
    ("3", "0,1", 1, 1, "CUDA_VISIBLE_DEVICES=3 was set before launch and is kept; --gpu 0,1 only says how many"),
    ("3,5", "0,1", 2, 2, "CUDA_VISIBLE_DEVICES=3,5 was set before launch and is kept"),
    ("0,1", "0,1", 2, 2, None),
])
def test_gpu_count_fits_the_devices_cuda_shows(monkeypatch, caplog, preset, gpu, visible, expected, said):
    """A scheduler's CUDA_VISIBLE_DEVICES (SLURM's allocation) is kept, so --gpu 0,1 on a one-GPU allocation asked
    Lightning for two devices and stopped in its device check; it now trains on what CUDA shows, and says so."""
    import utils.devices as devices

    if preset is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", preset)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"GPU{i}")
    monkeypatch.setattr(devices.log, "propagate", True)  # an in-process launch before this one turned it off
    monkeypatch.setattr(devices, "unusable_gpu", lambda torch: None)  # its kernel would need a real GPU
    with caplog.at_level("INFO", logger="nsr"):
        assert devices.choose_devices(gpu) == ("gpu", expected)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == (preset or gpu)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert (said is None and not warnings) or (said is not None and any(said in w for w in warnings)), warnings
    assert f"Device: {expected} CUDA GPU(s)" in caplog.text


def test_a_checkpoint_write_cut_short_by_a_kill_is_never_suggested(tmp_path):
    """A SIGKILL mid-write leaves the atomic writer's .tmp-*.ckpt; --resume given the folder suggested it as the
    newest checkpoint."""
    from utils.resume import missing_checkpoint_message

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "epoch=0-step=100.ckpt").write_bytes(b"whole")
    time.sleep(0.05)
    (ckpt / ".tmp-k2j4x.ckpt").write_bytes(b"cut")
    assert missing_checkpoint_message(str(tmp_path)) == (
        f"Checkpoint '{tmp_path}' is a folder; give a checkpoint file, e.g. --resume {ckpt / 'epoch=0-step=100.ckpt'} "
        "(the newest there).")


def test_a_gpu_this_pytorch_cannot_run_is_named_before_anything_is_built(monkeypatch, tmp_path, capsys):
    """An old GPU with a new PyTorch wheel (or a GPU held in exclusive mode) failed at the model's first kernel with
    "CUDA error: no kernel image is available for execution on the device", as a traceback."""
    from types import SimpleNamespace

    import launch as launcher
    import utils.devices as devices

    def fake_torch(error, capability):
        def ones(*args, **kwargs):
            raise RuntimeError(error)
        return SimpleNamespace(__version__="2.13.0+cu128", ones=ones, cuda=SimpleNamespace(
            get_device_name=lambda i: "Tesla P100-PCIE-16GB", get_device_capability=lambda i: capability,
            get_arch_list=lambda: ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]))

    old = fake_torch("CUDA error: no kernel image is available for execution on the device\nCUDA kernel errors...",
                     (6, 0))
    assert devices.unusable_gpu(old) == (
        "GPU Tesla P100-PCIE-16GB (compute capability 6.0) is older than this PyTorch 2.13.0+cu128 supports (sm_75 "
        "and newer); install a PyTorch build for it (https://pytorch.org/get-started/previous-versions/), or, to run "
        "on the CPU instead, start with CUDA_VISIBLE_DEVICES= (empty).")
    busy = fake_torch("CUDA error: CUDA-capable device(s) is/are busy or unavailable", (8, 0))
    assert devices.unusable_gpu(busy).startswith("CUDA cannot run on GPU Tesla P100-PCIE-16GB (CUDA error: "
                                                 "CUDA-capable device(s) is/are busy or unavailable); check nvidia-smi")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices, "unusable_gpu", lambda torch: "GPU X is older than this PyTorch supports.")
    assert launcher.main(["--config", "configs/nerf-demo.yaml", "--exp_dir", str(tmp_path / "exp"), "--runs_dir",
                          str(tmp_path / "runs"), "--train", demo_data("configs/nerf-demo.yaml")]) == 2
    assert "GPU X is older than this PyTorch supports." in capsys.readouterr().out
    assert not (tmp_path / "exp").exists(), "refused before any folder is made"


@pytest.mark.parametrize("torch_version, numpy_version, refused", [
    ("2.1.2+cu121", "2.2.6", True), ("2.2.0a0+git8ac9b20", "2.0.0rc1", True),
    ("2.1.2+cu121", "1.26.4", False), ("2.3.0", "2.2.6", False), ("2.13.0+cpu", "2.4.1", False),
])
def test_a_pytorch_too_old_for_the_installed_numpy_is_one_sentence(monkeypatch, tmp_path, capsys, torch_version,
                                                                   numpy_version, refused):
    """README invites keeping an installed PyTorch >= 2.1; with 2.1 or 2.2, pip install -r requirements.txt brings
    NumPy 2, which those cannot read: a page of import warnings, then "RuntimeError: Numpy is not available" from
    the first loader (seen in a venv of torch 2.1.2 and numpy 2.2.6). Now one sentence says what to install."""
    from importlib import metadata

    import launch as launcher
    import utils.devices as devices

    versions = {"torch": torch_version, "numpy": numpy_version}
    real_version = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: versions.get(name) or real_version(name))
    problem = devices.numpy_too_new_for_torch()
    if not refused:
        assert problem is None
        return
    assert problem == (f"PyTorch {torch_version} was built for NumPy 1 and cannot use the installed NumPy "
                       f"{numpy_version} (PyTorch reads NumPy 2 from 2.3 on); run pip install 'numpy<2' "
                       "'opencv-python-headless<4.12', or install PyTorch 2.3 or newer.")
    assert launcher.main(["--config", "configs/nerf-demo.yaml", "--exp_dir", str(tmp_path / "exp"), "--runs_dir",
                          str(tmp_path / "runs"), "--train", demo_data("configs/nerf-demo.yaml")]) == 2
    assert problem in capsys.readouterr().out
    assert not (tmp_path / "exp").exists(), "refused before any folder is made"


def test_a_required_package_not_installed_is_one_sentence_naming_the_python_that_lacks_it():
    """launch.py run by a Python without the requirements (pip install not run, or run with another Python than
    the venv's) ended in a traceback at "No module named 'omegaconf'"; now one sentence names the pip package,
    the interpreter and the command that installs them into it."""
    start = ("import runpy, sys; sys.modules['omegaconf'] = None; "  # None in sys.modules: its import fails
             "sys.argv = ['launch.py', '--config', 'configs/neus-demo.yaml', '--train']; "
             "runpy.run_path('launch.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", start], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out
    assert out.strip() == (f"[nsr] omegaconf is not installed for Python {sys.version_info.major}."
                           f"{sys.version_info.minor} at {sys.executable}; install the requirements into it with: "
                           f"{sys.executable} -m pip install -r requirements.txt (or activate the environment they "
                           "were installed in).")


def test_every_required_package_is_known_by_the_modules_it_installs():
    """The names the sentence above gives: each package of requirements.txt, under each module it installs."""
    from importlib import metadata

    from utils.devices import REQUIRED_MODULES

    from packaging.requirements import Requirement

    with open(os.path.join(ROOT, "requirements.txt")) as f:
        required = [Requirement(line.split("#")[0].strip()) for line in f if line.strip()[:1].isalpha()]
    assert {r.name for r in required} == set(REQUIRED_MODULES.values())
    not_for_this_python = {r.name for r in required if r.marker is not None and not r.marker.evaluate()}
    for module, package in REQUIRED_MODULES.items():
        if package in not_for_this_python:  # xatlas on Python 3.14 (no wheel yet): export.textured says so
            continue
        if module == "yaml":  # PyYAML, which OmegaConf requires
            assert any(r.lower().startswith("pyyaml") for r in metadata.requires("omegaconf")), module
        else:  # the files pip recorded for it (packages_distributions misses NumPy on 3.10: no top_level.txt)
            top_levels = {str(f).split("/")[0].split(".")[0] for f in metadata.files(package) or []}
            assert module in top_levels, (module, package)


def test_a_folder_that_cannot_be_written_is_named_not_a_traceback(monkeypatch, tmp_path, capsys):
    """The demo scene is rendered into dataset.root_dir on first use: on a read-only checkout (or a folder of
    another user) that was a traceback from tempfile.mkdtemp."""
    import errno
    import tempfile

    import launch as launcher

    real_mkdtemp = tempfile.mkdtemp

    def read_only(*args, **kwargs):
        if kwargs.get("prefix", "").startswith(".demo"):
            raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "ro" / ".demo-x1y2"))
        return real_mkdtemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    status = launcher.main(["--config", "configs/nerf-demo.yaml", "--exp_dir", str(tmp_path / "exp"), "--runs_dir",
                            str(tmp_path / "runs"), "--train", f"dataset.root_dir={tmp_path / 'ro' / 'demo'}"])
    out = "".join(capsys.readouterr())
    assert status == 2 and "Traceback" not in out
    assert f"[nsr] {tmp_path / 'ro'}: Read-only file system; give paths this user can read, and folders it can " \
           "write to (--exp_dir, --runs_dir, and dataset.root_dir, where the demo scene" in out, out[-1500:]
    assert not (tmp_path / "exp").exists() or not os.listdir(tmp_path / "exp")


def test_a_run_that_fails_with_a_bug_still_leaves_no_empty_trial_folder(tmp_path, monkeypatch):
    """Only the errors launch.py words used to clean up; a traceback left an empty exp/<name>/<trial>/ behind."""
    import datasets
    import launch as launcher

    def broken_loader(name, config):
        raise RuntimeError("a bug in a loader")

    monkeypatch.setattr(datasets, "make", broken_loader)
    with pytest.raises(RuntimeError, match="a bug in a loader"):
        launcher.main(["--config", "configs/nerf-demo.yaml", "--exp_dir", str(tmp_path / "exp"), "--runs_dir",
                       str(tmp_path / "runs"), "--train", demo_data("configs/nerf-demo.yaml")])
    assert not (tmp_path / "exp").exists() or not os.listdir(tmp_path / "exp"), os.listdir(tmp_path / "exp")


def test_runs_started_in_the_same_second_get_their_own_trial(tmp_path, monkeypatch):
    """A sweep launched in parallel used to have every run of a tag write into one trial folder."""
    import argparse
    from datetime import datetime

    import utils.trial as trial_folders

    class FrozenClock:
        @staticmethod
        def now():
            return datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(trial_folders, "datetime", FrozenClock)
    monkeypatch.setenv("NSR_TRIAL_NAME", "unset at teardown")  # trial_paths sets it; later launches must not see it
    args = argparse.Namespace(exp_dir=str(tmp_path / "exp"))
    trials = []
    for _ in range(3):
        monkeypatch.delenv("NSR_TRIAL_NAME", raising=False)  # each run is its own process
        config = OmegaConf.create({"name": "sweep", "tag": "lr"})
        created = trial_folders.trial_paths(config, args)
        trials.append(config.trial_name)
        assert os.path.isdir(created[0]) and created[0].endswith(config.trial_name)
    assert trials == ["lr@20260102-030405", "lr@20260102-030405-2", "lr@20260102-030405-3"]
    assert created[1:] == [], "exp/sweep existed by then"
    # a DDP child process re-runs launch.py: it joins its parent's trial
    config = OmegaConf.create({"name": "sweep", "tag": "lr"})
    trial_folders.trial_paths(config, args)
    assert config.trial_name == trials[-1]
