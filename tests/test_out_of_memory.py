"""Memory that runs out (GPU or CPU): one sentence saying where, how much was asked for, the option that bounds
it with a value to try, and the command that goes on from the newest checkpoint; the command works."""
import glob
import shlex

import numpy as np
import pytest
import torch

from utils.stops import allocation_size, memory_exhausted

CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
            "1.06 GiB is free. Of the allocated memory 75.1 GiB is allocated by PyTorch")


def test_what_counts_as_running_out_of_memory_and_how_much_was_asked_for():
    assert memory_exhausted(torch.cuda.OutOfMemoryError(CUDA_OOM)) == "GPU" and allocation_size(
        torch.cuda.OutOfMemoryError(CUDA_OOM)) == "2 GiB"
    with pytest.raises(RuntimeError) as cpu:
        torch.empty(2 ** 50, dtype=torch.uint8)  # 1 PiB: more than any address space
    assert memory_exhausted(cpu.value) == "CPU" and allocation_size(cpu.value) == f"{2 ** 20:.2f} GiB"
    with pytest.raises(MemoryError) as numpy_cpu:
        np.empty(2 ** 50, dtype=np.uint8)
    assert memory_exhausted(numpy_cpu.value) == "CPU" and allocation_size(numpy_cpu.value) == "1 PiB"
    assert memory_exhausted(RuntimeError("a bug")) is None and memory_exhausted(ValueError("x")) is None


def launch_main(tmp_path, *argv):
    import launch as launcher

    return launcher.main(["--exp_dir", str(tmp_path / "exp"), "--runs_dir", str(tmp_path / "runs"), *argv])


def error_line(said: str) -> str:
    lines = [line for line in said.splitlines() if line.startswith("[nsr] Out of")]
    assert len(lines) == 1 and "Traceback" not in said, said[-3000:]
    return lines[0][len("[nsr] "):]


def test_gpu_memory_running_out_in_training_names_the_ray_budget_and_the_command_continues(
        tmp_path, monkeypatch, capsys):
    from systems.nerf import NeRFSystem

    real_step = NeRFSystem.training_step

    def step_that_runs_out_at_step_3(self, batch, batch_idx):
        if self.global_step == 3:
            raise torch.cuda.OutOfMemoryError(CUDA_OOM)
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(NeRFSystem, "training_step", step_that_runs_out_at_step_3)
    demo = str(tmp_path / "demo")
    common = [f"dataset.root_dir={demo}", "dataset.n_test_traj_steps=2", "+trainer.limit_test_batches=1",
              "model.geometry.isosurface.resolution=32"]
    status = launch_main(tmp_path, "--config", "configs/neus-demo.yaml", "--train", "trainer.max_steps=5",
                         "checkpoint.every_n_train_steps=2", *common)
    line = error_line("".join(capsys.readouterr()))
    assert status == 1
    ckpt = glob.glob(str(tmp_path / "exp" / "neus-demo" / "*" / "ckpt" / "epoch=0-step=2.ckpt"))[0]
    assert line.startswith("Out of GPU memory while training (it asked for 2 GiB more); lower "
                           "model.max_train_num_rays (now 1024) or model.num_samples_per_ray (now 128), e.g. "
                           "model.max_train_num_rays=512; then continue with: python launch.py --config "), line
    command = f"--resume {ckpt} --runs_dir {tmp_path / 'runs'} --train model.max_train_num_rays=512."
    assert line.endswith(command), line

    monkeypatch.setattr(NeRFSystem, "training_step", real_step)  # with the memory: the printed command goes on
    argv = shlex.split(line.split("continue with: python launch.py ")[1].rstrip("."))
    assert launch_main(tmp_path, *argv, "--skip_test", *common) == 0
    assert glob.glob(str(tmp_path / "exp" / "neus-demo" / "*" / "ckpt" / "epoch=0-step=5.ckpt"))

    # the mesh's grid (NeuS's sphere-initialised field has a surface from the start), a NumPy array of
    # resolution^3 values: larger than any machine's address space
    status = launch_main(tmp_path, "--config", "configs/neus-demo.yaml", "--export", "--resume", ckpt, *common[:3],
                         "model.geometry.isosurface.resolution=65536")
    line = error_line("".join(capsys.readouterr()))
    assert status == 1 and line.startswith("Out of CPU memory while extracting the mesh (it asked for 1 PiB more); "
                                           "lower model.geometry.isosurface.resolution (now 65536), e.g. "
                                           "model.geometry.isosurface.resolution=32768; then redo it with: "), line
    assert line.endswith(f"--resume {ckpt} --runs_dir {tmp_path / 'runs'} --export "
                         "model.geometry.isosurface.resolution=32768."), line
    assert not glob.glob(str(tmp_path / "exp" / "**" / ".tmp-*"), recursive=True)


def test_rendering_and_mesh_stages_name_their_own_chunk(caplog):
    """Where it ran out is read from the traceback (Lightning resets its stage before re-raising)."""
    from omegaconf import OmegaConf

    from utils.stops import failed_stage, report_out_of_memory

    config = OmegaConf.create({"config_dir": "/x/config", "ckpt_dir": "/x/ckpt", "export": {"chunk_size": 65536},
                               "model": {"ray_chunk": 4096, "geometry": {"isosurface": {"chunk": 2097152}}}})

    def test_step():
        raise torch.cuda.OutOfMemoryError(CUDA_OOM)

    def export_mesh():
        raise torch.cuda.OutOfMemoryError(CUDA_OOM)

    def on_test_epoch_end():
        export_mesh()

    said = {}
    for name, stage_fn in (("render", test_step), ("mesh", on_test_epoch_end)):
        try:
            stage_fn()
        except torch.cuda.OutOfMemoryError as err:
            assert failed_stage(err, None) == "test"
            caplog.clear()
            with caplog.at_level("ERROR", logger="nsr"):
                assert report_out_of_memory(err, "GPU", "test", "test", config, "/x/ckpt/a.ckpt") == 1
            said[name] = caplog.records[-1].getMessage()
    assert said["render"] == ("Out of GPU memory while rendering the test images and video (it asked for 2 GiB more); "
                              "lower model.ray_chunk (now 4096), e.g. model.ray_chunk=2048; then redo it with: python "
                              "launch.py --config /x/config/parsed.yaml --resume /x/ckpt/a.ckpt --test "
                              "model.ray_chunk=2048.")
    config.model.sample_chunk = 1048576  # the shipped configs' bound on the samples per query comes first
    try:
        test_step()
    except torch.cuda.OutOfMemoryError as err:
        with caplog.at_level("ERROR", logger="nsr"):
            report_out_of_memory(err, "GPU", "test", "test", config, "/x/ckpt/a.ckpt")
        assert "; lower model.sample_chunk (now 1048576) or model.ray_chunk (now 4096), e.g. model.sample_chunk=" \
               "524288; then" in caplog.records[-1].getMessage()
    assert said["mesh"].startswith("Out of GPU memory while extracting the mesh (it asked for 2 GiB more); lower "
                                   "model.geometry.isosurface.chunk (now 2097152) or export.chunk_size (now 65536), "
                                   "e.g. model.geometry.isosurface.chunk=1048576; then redo it with: "), said["mesh"]
