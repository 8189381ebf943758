"""Writes that fail for the machine's reasons. A disk (or quota) that fills up: one sentence naming the folder, no
partial file, and every file written before, the one being replaced included, left whole. A folder this user may
not write (read-only, another user's): one sentence naming it."""
import csv
import errno
import glob
import os
import shutil
import subprocess
from collections import namedtuple

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from helpers import demo_data
from utils.callbacks import AtomicCheckpointIO
from utils.io import DiskFullError, access_problem, write_image, write_video

DiskUsage = namedtuple("DiskUsage", "total used free")
TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 8320 vs 8216"  # how torch.save says it


@pytest.fixture
def disk_reports_full(monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(1 << 30, (1 << 30) - 4096, 4096))


def noise_frames(n, size=128, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_torch_cut_short_on_a_full_disk_is_said_as_a_full_disk_and_the_old_checkpoint_stays(
        tmp_path, monkeypatch, disk_reports_full):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)

    def cut_short(obj, f):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 partial")
        raise RuntimeError(TORCH_FULL_DISK)

    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(DiskFullError) as caught:
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    assert caught.value.strerror == (f"The disk holding {tmp_path} is full (0.0 MiB free): last.ckpt could not be "
                                     "written, and no file written before was touched")
    assert caught.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == ["last.ckpt"] and torch.load(path, weights_only=True) == {"step": 1}


def test_a_failure_with_space_left_is_not_called_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", lambda obj, f: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="^a bug$"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, tmp_path / "a.ckpt")
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")  # a quota fills with the disk half empty
    monkeypatch.setattr(torch, "save", lambda obj, f: (_ for _ in ()).throw(quota))
    with pytest.raises(DiskFullError, match="a.ckpt could not be written"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, tmp_path / "a.ckpt")
    assert os.listdir(tmp_path) == []


def test_a_video_ffmpeg_could_not_finish_is_not_put_in_place(tmp_path, monkeypatch, disk_reports_full):
    """imageio does not report ffmpeg's exit status: on a full disk a truncated MP4 was renamed into place."""
    import imageio_ffmpeg

    path = str(tmp_path / "orbit.mp4")
    assert write_video(path, noise_frames(5)) == 5
    before = open(path, "rb").read()
    real_count = imageio_ffmpeg.count_frames_and_secs
    monkeypatch.setattr(imageio_ffmpeg, "count_frames_and_secs", lambda p: (real_count(p)[0] - 2, 0.0))
    with pytest.raises(DiskFullError, match="orbit.mp4 could not be written"):
        write_video(path, noise_frames(5, seed=1))
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["orbit.mp4"]


@pytest.fixture
def small_disk(tmp_path):
    """A real 384 KiB file system (tmpfs), where the machine lets this user mount one."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=384k", "tmpfs", str(folder)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("mounting a small tmpfs needs root; the simulated full disks above are still tested")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)  # detached now, freed once nothing holds it


def test_writes_on_a_disk_that_really_fills_up(small_disk):
    image = noise_frames(1, 64)[0]
    write_image(str(small_disk / "small.png"), image)
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(8)}, small_disk / "last.ckpt")
    with pytest.raises(DiskFullError, match=rf"^\[Errno 28\] The disk holding {small_disk} is full"):
        write_image(str(small_disk / "large.png"), noise_frames(1, 512)[0])  # 768 KiB of noise
    with pytest.raises(DiskFullError, match="last.ckpt could not be written"):
        AtomicCheckpointIO().save_checkpoint({"w": torch.randn(200_000)}, small_disk / "last.ckpt")
    with pytest.raises(DiskFullError, match="orbit.mp4 could not be written"):
        write_video(str(small_disk / "orbit.mp4"), noise_frames(30, 256))
    assert sorted(os.listdir(small_disk)) == ["last.ckpt", "small.png"]
    assert np.array_equal(imageio.imread(small_disk / "small.png"), image)
    assert torch.equal(torch.load(small_disk / "last.ckpt", weights_only=True)["w"], torch.ones(8))


def test_launch_says_the_disk_is_full_and_how_to_redo_the_test(tmp_path, monkeypatch, capsys, disk_reports_full):
    import imageio_ffmpeg

    import launch as launcher

    monkeypatch.setattr(imageio_ffmpeg, "count_frames_and_secs", lambda p: (0, 0.0))  # the video is cut short
    status = launcher.main(["--config", "configs/nerf-demo.yaml", "--exp_dir", str(tmp_path / "exp"), "--runs_dir",
                            str(tmp_path / "runs"), "--train", demo_data("configs/nerf-demo.yaml"), "trainer.max_steps=2",
                            "+trainer.limit_test_batches=1",
                            "model.geometry.isosurface.resolution=32"])
    said = "".join(capsys.readouterr())
    assert status == 1 and "Traceback" not in said, said[-2000:]
    ckpt = glob.glob(str(tmp_path / "exp" / "nerf-demo" / "*" / "ckpt" / "*.ckpt"))
    assert len(ckpt) == 1 and torch.load(ckpt[0], weights_only=True)["global_step"] == 2
    line = [ln for ln in said.splitlines() if "is full" in ln]
    assert len(line) == 1, said[-2000:]
    assert ("-test.mp4 could not be written, and no file written before was touched. Free some space or give "
            "--exp_dir/--runs_dir on another disk; then redo it with: python launch.py --config ") in line[0]
    assert line[0].endswith(f"--resume {ckpt[0]} --runs_dir {tmp_path / 'runs'} --test."), line[0]
    assert not glob.glob(str(tmp_path / "exp" / "**" / ".tmp-*"), recursive=True)


def test_a_capture_script_on_a_disk_that_fills_up_says_so_and_leaves_no_half_filled_folder(small_disk, tmp_path,
                                                                                             capsys):
    from scripts import imgs2poses

    rng = np.random.default_rng(0)
    video = str(tmp_path / "noise.mp4")
    write_video(video, (rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(60)))
    assert imgs2poses.main([str(small_disk / "scene"), "--video", video, "--fps", "10"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"imgs2poses: The disk holding {small_disk / 'scene'} is full (0.0 MiB free): images could not be "
                   "written, and no file written before was touched; free some space and run it again."), err
    assert os.listdir(small_disk / "scene") == []


def test_a_folder_that_may_not_be_written_is_named_and_a_temporary_name_is_its_folder():
    assert access_problem(OSError(errno.EROFS, "Read-only file system", "/mnt/ro/.tmp-abc.json")) == \
        "/mnt/ro: Read-only file system"
    assert access_problem(PermissionError(errno.EACCES, "Permission denied", "/data/alice/scan24")) == \
        "/data/alice/scan24: Permission denied"
    assert access_problem(OSError(errno.ENOENT, "No such file or directory", "/x")) is None
    assert access_problem(OSError(errno.EACCES, "Permission denied")) is None, "no path to name"


def test_capture_scripts_into_a_read_only_folder_say_so(tmp_path, capsys):
    from scripts import eval_mesh, imgs2poses

    folder = tmp_path / "ro"
    folder.mkdir()
    if not shutil.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                                                   capture_output=True).returncode != 0:
        pytest.skip("mounting a read-only tmpfs needs root; access_problem is tested above")
    try:
        rng = np.random.default_rng(0)
        video = str(tmp_path / "noise.mp4")
        write_video(video, (rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(60)))
        assert imgs2poses.main([str(folder / "scene"), "--video", video, "--fps", "10"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"imgs2poses: {folder / 'scene'}: Read-only file system; give a folder this user can write to.")
        bunny = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "bunny.obj")
        if os.path.isfile(bunny):  # the score is still printed, as the JSON line scripts read
            assert eval_mesh.main([bunny, "--protocol", "scene", "--gt", bunny, "--samples", "500", "--json",
                                   str(folder / "r.json")]) == 1
            out, err = capsys.readouterr()
            assert err.strip() == f"eval_mesh: {folder}: Read-only file system; the result is the JSON line below."
            assert '"fscore": 1.0' in out.strip().splitlines()[-1]
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def test_only_stale_temporaries_are_removed(tmp_path):
    """A kill mid-write leaves .tmp-* behind (no ``finally`` runs); one still being written is kept."""
    import time

    from utils.io import remove_stale_temporaries

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "save" / ".tmp-scene" / "images").mkdir(parents=True)
    files = {"ckpt/.tmp-a1.ckpt": 1000, "ckpt/.tmp-b2.ckpt": 10, "ckpt/epoch=0-step=5.ckpt": 7,
             "save/.tmp-scene/images/0.png": 300, "save/it5-0.png": 5}
    for name, size in files.items():
        (tmp_path / name).write_bytes(b"x" * size)
    old = time.time() - 7200
    for name in ("ckpt/.tmp-a1.ckpt", "ckpt/epoch=0-step=5.ckpt", "save/.tmp-scene", "save/it5-0.png"):
        os.utime(tmp_path / name, (old, old))
    assert remove_stale_temporaries(str(tmp_path)) == (1, 1000)  # the folder's file is still new
    os.utime(tmp_path / "save/.tmp-scene/images/0.png", (old, old))
    assert remove_stale_temporaries(str(tmp_path)) == (1, 300)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "ckpt/.tmp-b2.ckpt", "ckpt/epoch=0-step=5.ckpt", "save/it5-0.png"]


def test_a_csv_log_rewritten_on_a_full_disk_keeps_its_rows_and_takes_the_new_ones_later(small_disk):
    """Lightning rewrites metrics.csv in place when a column appears: on a full disk that left the file short."""
    from utils.callbacks import AtomicCSVLogger

    logger = AtomicCSVLogger(str(small_disk), name="trial", version="csv_logs")
    for step in range(2100):  # the rewrite below adds two commas a row: more than a 4 KiB block
        logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    logger.save()
    path = small_disk / "trial" / "csv_logs" / "metrics.csv"
    before = path.read_text()
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as handle:  # fill the disk to its last block
        with pytest.raises(OSError):
            while True:
                handle.write(b"\0" * 4096)
    logger.log_metrics({"val/psnr": 25.0, "val/ssim": 0.9}, step=2100)  # new columns: the whole file is rewritten
    with pytest.raises(DiskFullError, match="metrics.csv could not be written"):
        logger.save()
    assert path.read_text() == before
    assert not glob.glob(str(small_disk / "trial" / "csv_logs" / ".tmp-*"))
    os.remove(filler)
    logger.save()
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2101 and set(rows[0]) == {"step", "train/loss", "val/psnr", "val/ssim"}
    assert [float(row["train/loss"]) for row in rows[:2100]] == [1.0 / (step + 1) for step in range(2100)]
    assert rows[2100] == {"step": "2100", "train/loss": "", "val/psnr": "25.0", "val/ssim": "0.9"}


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_atomic_outputs_get_the_modes_a_plain_write_would_give(tmp_path, mask):
    """The temporary files and folders the atomic writers rename into place are owner-only (mkstemp, mkdtemp);
    what they become is readable as the user's umask allows, like any file the user writes, not 0600 / 0700."""
    from utils.io import atomic_folder, umask

    previous = os.umask(mask)
    try:
        assert umask() == mask
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
        write_image(str(tmp_path / "view.png"), np.zeros((4, 4, 3), np.uint8))
        with atomic_folder(str(tmp_path / "scene")) as folder:
            write_image(os.path.join(folder, "0.png"), np.zeros((4, 4, 3), np.uint8))
        with open(tmp_path / "plain.txt", "w"):
            pass
        os.mkdir(tmp_path / "plain")
    finally:
        os.umask(previous)
    mode = {name: os.stat(tmp_path / name).st_mode & 0o777
            for name in ("last.ckpt", "view.png", "scene", "scene/0.png", "plain.txt", "plain")}
    assert mode == {"last.ckpt": 0o666 & ~mask, "view.png": 0o666 & ~mask, "scene": 0o777 & ~mask,
                    "scene/0.png": 0o666 & ~mask, "plain.txt": 0o666 & ~mask, "plain": 0o777 & ~mask}
