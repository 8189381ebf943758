"""Training and testing on several devices (DDP), as on a machine with several GPUs: two CPU processes over gloo,
which run the code a two-GPU run does (ranks, the shared trial, rank 0's outputs, the test split shared out)."""
import csv
import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import imageio.v2 as imageio
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# launch.py with its device choice answered "two CPU processes": Lightning's DDP launcher starts the second rank by
# running this same script again, as it reruns launch.py on a GPU machine
TWO_PROCESSES = """import sys
sys.path.insert(0, {root!r})
import launch
launch.choose_devices = lambda gpu: ("cpu", 2)
{before}
sys.exit(launch.main(sys.argv[1:]))
"""

# the loss of rank 1 alone is NaN at step 5 (rank 0's is finite): the averaged gradients carry it to both
NAN_ON_RANK_1_AT_STEP_5 = """from systems.nerf import NeRFSystem
finite_losses = NeRFSystem.losses
def losses(self, *args):
    loss, terms, weights = finite_losses(self, *args)
    return (loss * float("nan") if (self.global_rank, self.global_step) == (1, 5) else loss), terms, weights
NeRFSystem.losses = losses
"""


def two_process_launcher(tmp, before=""):
    script = tmp / "launch_two.py"
    script.write_text(TWO_PROCESSES.format(root=ROOT, before=before))
    return script


def run(script, tmp, *args, expect=0, timeout=600):
    """Output of the command; its process group is killed if it outlives ``timeout`` (a rank left waiting for
    another in a collective waits for 30 minutes)."""
    cmd = [sys.executable, str(script), "--exp_dir", str(tmp / "exp"), "--runs_dir", str(tmp / "runs"), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"still running after {timeout} s (a rank waiting for another):\n{out[-3000:]}")
    assert proc.returncode == expect, out[-3000:]
    return out


def logged_test_psnr(trial):
    """The test PSNR the latest run in ``trial`` logged."""
    files = sorted(glob.glob(os.path.join(trial, "csv_logs", "**", "metrics.csv"), recursive=True),
                   key=os.path.getmtime)
    return [float(r["test/psnr"]) for r in csv.DictReader(open(files[-1])) if r.get("test/psnr")][-1]


def run_then_signal(script, tmp, args, bar, after, sig, to_the_group):
    """(exit status, output) of ``script`` with ``args``, sent ``sig`` once its progress bar ``bar`` has passed
    ``after`` batches: to its whole process group (a terminal's Ctrl-C, a scheduler's SIGTERM to every rank) or to
    rank 0 alone (``kill PID``)."""
    cmd = [sys.executable, str(script), "--exp_dir", str(tmp / "exp"), "--runs_dir", str(tmp / "runs"), *args]
    log = tmp / "out.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, TQDM_MINITERS="1"))  # every batch's bar, into the file
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            done = [int(n) for n in re.findall(re.escape(bar) + r":\s+\d+%\|[^|]*\|\s*(\d+)/", log.read_text())]
            if done and max(done) >= after:
                break
            time.sleep(0.1)
        os.killpg(proc.pid, sig) if to_the_group else proc.send_signal(sig)
        status = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return status, log.read_text()


@pytest.mark.parametrize("n, world_size", [(3, 2), (24, 2), (7, 4), (1, 3), (0, 2)])
def test_the_ranks_share_the_views_out_each_once_in_the_same_number_of_steps(n, world_size):
    """In the order given (validation's: far-apart views first), so the first views of every rank's share, the
    ones trainer.limit_val_batches keeps, are the first of that order."""
    from datasets.base import _EvalIndices, spread_positions

    views = spread_positions(n, n)
    shares = [[_EvalIndices(views, rank, world_size)[i]["index"]
               for i in range(len(_EvalIndices(views, rank, world_size)))] for rank in range(world_size)]
    assert len({len(share) for share in shares}) == 1, shares
    assert sorted(i for share in shares for i in share if i >= 0) == list(range(n))
    assert all(i == -1 for share in shares for i in share[len([j for j in share if j >= 0]):]), shares
    assert [share[0] for share in shares if share and share[0] >= 0] == views[:world_size]


@pytest.mark.parametrize("environment, per_node, rank", [
    ({}, 1, 0),
    ({"RANK": "3", "LOCAL_RANK": "1"}, 2, 3),  # torchrun's
    ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, 2, 1),  # the second process Lightning starts for --gpu 0,1
    ({"NODE_RANK": "1"}, 2, 2),  # the second machine's first process, launched by hand: it was taken for rank 0
    ({"NODE_RANK": "1", "LOCAL_RANK": "1"}, 2, 3),
    ({"SLURM_PROCID": "2"}, 1, 2),  # srun's tasks, one a device
    ({"SLURM_PROCID": "0", "LOCAL_RANK": "1"}, 2, 1)])  # one SLURM task, whose processes Lightning starts
def test_each_process_knows_its_rank_before_anything_runs(monkeypatch, environment, per_node, rank):
    import launch
    from utils.distributed import launched_rank

    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert launched_rank(per_node) == rank
    with pytest.MonkeyPatch.context() as undo:  # launch.main puts the logger back; setup_logging alone does not
        undo.setattr(launch.log, "handlers", launch.log.handlers[:])  # setup_logging fills the list in place
        undo.setattr(launch.log, "level", launch.log.level)
        undo.setattr(launch.log, "propagate", launch.log.propagate)
        launch.setup_logging(False, per_node)
        [handler] = launch.log.handlers
        said = handler.format(logging.LogRecord("nsr", logging.INFO, "", 0, "a line", None, None))
    assert said == (f"[nsr rank {rank}] a line" if rank else "[nsr] a line")  # only rank 0 says what the run does
    assert handler.level == (logging.ERROR if rank else logging.NOTSET)


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
    script = two_process_launcher(tmp_path)
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
    out = run(script, tmp_path, "--config", parsed, "--resume", ckpt, "--gpu", "0,1", "--train",
              "trainer.max_steps=30", "--skip_test")
    assert out.count("[nsr] Continuing the run from") == 1, out[-3000:]
    last = os.path.join(trial, "ckpt", "epoch=0-step=30.ckpt")
    assert os.path.isfile(last), os.listdir(os.path.join(trial, "ckpt"))
    # the command it ends with runs on as many devices (it named none, and a pasted one then ran on the first GPU)
    assert (f"Test and export it with: python launch.py --config {parsed} --resume {last} --gpu 0,1 --runs_dir "
            f"{tmp_path / 'runs'} --test") in out


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["fused", "foreach"])
def test_a_non_finite_loss_on_one_device_stops_every_device_at_that_step(tmp_path, odd_scene, optimizer):
    """Rank 1 stopped at its NaN loss; rank 0, whose own loss was finite, stepped on with the NaN gradients
    and waited for rank 1 at the next step's gradient exchange (30 minutes, then a traceback), leaving rank 1
    waiting for it in the checkpoint's barrier. Now the flag is every device's: with a fused optimiser (the
    flag read every 10 steps) and an unfused one (the loss read every step), both stop at step 5 with the same
    weights, and the weights from before it are saved once."""
    from helpers import fused_adam_runs_on_the_cpu
    from utils.callbacks import load_checkpoint_file

    script = two_process_launcher(tmp_path, NAN_ON_RANK_1_AT_STEP_5)
    extra = [] if optimizer == "fused" else ["+system.optimizer.args.foreach=true"]
    out = run(script, tmp_path, "--config", "configs/nerf-demo.yaml", "--train", "trainer.max_steps=30",
              f"dataset.root_dir={odd_scene}", "dataset.render_resolution=64", "dataset.img_wh=[64,64]", "tag=nan",
              *extra, expect=3, timeout=300)
    [trial] = glob.glob(str(tmp_path / "exp" / "nerf-demo" / "nan@*"))
    saved = os.path.join(trial, "ckpt", "last-good-step5.ckpt")
    assert "[nsr rank 1] Stopped: The training loss is not finite at step 5 (rgb=" in out, out[-3000:]
    assert f"[nsr] Stopped: The training loss is not finite at step 5 (on another device). The weights from " \
           f"before that step are saved in {saved}." in out, out[-3000:]
    ckpt = load_checkpoint_file(saved)
    deferred = optimizer == "fused" and fused_adam_runs_on_the_cpu()  # read every 10 steps, 5-9 skipped
    assert ckpt["global_step"] == (10 if deferred else 5) and int(ckpt["state_dict"]["trained_steps"]) == 5
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize("sig, to_the_group", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_a_signal_stops_every_device_after_the_same_step_with_one_checkpoint(tmp_path, odd_scene, sig, to_the_group):
    """Lightning's SIGTERM handler runs a collective inside the handler: a job scheduler's SIGTERM mid-step left
    both ranks waiting for each other, with no checkpoint (seen: still running 45 s later, then killed), and the
    first Ctrl-C quit without saving. Now each rank notes the signal and the ranks agree at the progress read:
    a SIGTERM to rank 0 alone (``kill PID``) or Ctrl-C to the whole process group (a terminal's) stops both after
    the same step, with one resumable checkpoint and the shell's exit status."""
    status, said = run_then_signal(two_process_launcher(tmp_path), tmp_path, [
        "--config", "configs/nerf-demo.yaml", "--train", "trainer.max_steps=3000", "tag=stop",
        f"dataset.root_dir={odd_scene}", "dataset.render_resolution=64", "dataset.img_wh=[64,64]"],
        "Epoch 0", 15, sig, to_the_group)
    assert status == 128 + sig, said[-3000:]
    stopped = re.search(rf"\[nsr\] Stopped by {sig.name} at step (\d+) of 3000; the checkpoint (\S+) holds it\.",
                        said)
    assert stopped, said[-3000:]
    step, ckpt = int(stopped.group(1)), stopped.group(2)
    assert step % 10 == 0 and step >= 15  # the ranks agree at the progress read, every 10 steps
    assert os.path.basename(ckpt) == f"epoch=0-step={step}.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == step
    assert said.count(f"[nsr] {sig.name} received") == 1, said[-3000:]  # said by rank 0 only
    assert said.count("Stopped by") == 1, said[-3000:]  # and so is the stop: rank 1's line was the same


@pytest.mark.slow
@pytest.mark.parametrize("mode, stage, bar, outputs", [
    ("--test", "test", "Testing DataLoader 0", "it2-test/*.png"),
    ("--validate", "validation", "Validation DataLoader 0", "it2-*.png")])
def test_sigterm_during_a_test_or_validation_on_several_devices_stops_every_rank_after_the_same_view(
        tmp_path, odd_scene, mode, stage, bar, outputs):
    """Outside training Lightning's SIGTERM handler was in place: a collective run inside the handler. A job
    scheduler's SIGTERM to every rank during ``--test`` left rank 1 in that broadcast after rank 0 had exited,
    ending it in a gloo traceback ("Connection closed by peer"), and "SIGTERM received" was said once per rank
    and once more for the signal Lightning forwards. Now the ranks agree after each view and stop together;
    ``--validate`` takes the same path, over the test split's 24 views here so that there is a part-way."""
    run(os.path.join(ROOT, "launch.py"), tmp_path, "--config", "configs/nerf-demo.yaml", "--train", "--skip_test",
        "trainer.max_steps=2", "tag=sig", f"dataset.root_dir={odd_scene}", "dataset.render_resolution=64",
        "dataset.img_wh=[64,64]")
    [trial] = glob.glob(str(tmp_path / "exp" / "nerf-demo" / "sig@*"))
    ckpt = os.path.join(trial, "ckpt", "epoch=0-step=2.ckpt")
    status, said = run_then_signal(two_process_launcher(tmp_path), tmp_path, [
        "--config", os.path.join(trial, "config", "parsed.yaml"), "--resume", ckpt, mode,
        "dataset.val_split=test", "trainer.limit_val_batches=1.0"],  # 24 views, 12 a rank
        bar, 2, signal.SIGTERM, True)  # as a scheduler does: every rank
    assert status == 143 and "Traceback" not in said, said[-3000:]
    assert said.count("SIGTERM received") == 1 and said.count("Stopped by") == 1, said[-3000:]  # by rank 0, once
    assert re.search(rf"\[nsr\] Stopped by SIGTERM during the {stage}: its outputs in \S+ are incomplete; the "
                     rf"checkpoint {re.escape(ckpt)} is whole\. Redo the {stage} with: \S.*{mode}", said), said[-3000:]
    written = glob.glob(os.path.join(trial, "save", outputs))
    assert 2 <= len(written) < 24, written  # stopped part-way, after the view under way
