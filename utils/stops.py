"""What a run that ends early says: the reason in one sentence, what was kept, and the command that goes on.

Ctrl-C or SIGTERM during training or its outputs, a non-finite loss, a full disk, memory that ran out. Each
report logs one line and returns the run's exit status; checkpoints and outputs are written atomically, so
whatever a report names is whole.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import signal
import sys
import threading

log = logging.getLogger("nsr")


class Terminated(BaseException):
    """SIGTERM (a job scheduler's stop, ``kill``) outside Lightning's stages: loading data, rendering the demo
    scene, building the model. Raised so that the atomic writers clean up their temporary files and folders,
    where Python's default would end the process at once and leave them."""


class SigtermRaises:
    """While on (from creation until ``restore``), SIGTERM raises Terminated; main thread only."""

    def __init__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self.raise_terminated)

    @staticmethod
    def raise_terminated(signum, frame):
        raise Terminated

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


def stops_cleanly(program: str):
    """Decorator for a script's ``main(argv) -> int``: SIGTERM raises Terminated, so its atomic writers clean up,
    and Ctrl-C or SIGTERM end it with one line and a shell's status (130, 143) instead of a traceback."""
    def decorate(main):
        @functools.wraps(main)
        def stoppable(argv=None) -> int:
            sigterm = SigtermRaises()
            try:
                return main(argv)
            except (KeyboardInterrupt, Terminated) as stop:
                name = "SIGINT (Ctrl-C)" if isinstance(stop, KeyboardInterrupt) else "SIGTERM"
                print(f"{program}: stopped by {name}; nothing half-written was left.", file=sys.stderr)
                return 130 if isinstance(stop, KeyboardInterrupt) else 143
            finally:
                sigterm.restore()
        return stoppable
    return decorate


CHECKPOINTING_OFF = "checkpointing is off (trainer.enable_checkpointing: false)"


def say_stop(message: str) -> None:
    """A stop every rank of a run on several devices reports alike (a signal, Ctrl-C): rank 0 says it; the
    others log it below the ERROR level they print (``launch.setup_logging``), so it is said once."""
    from utils.distributed import launched_rank

    log.log(logging.INFO if launched_rank() else logging.ERROR, message)


def report_stopped(signal_name: str, step: int, max_steps: int, ckpt: str | None, config) -> int:
    """The message and exit status (128 + the signal's number, as a shell reports it) of a run stopped
    by Ctrl-C or SIGTERM; ``ckpt`` is None when checkpointing is off."""
    message = f"Stopped by {signal_name} at step {step} of {max_steps}; "
    if ckpt is None:
        message += f"{CHECKPOINTING_OFF}, so no checkpoint holds it."
    else:
        action = "--train" if step < max_steps else "--test"
        message += (f"the checkpoint {ckpt} holds it. {'Continue' if action == '--train' else 'Test'} with: "
                    f"{resume_command(config, ckpt, action)}")
    say_stop(message)
    return 128 + int(getattr(signal, signal_name))


def report_stopped_output(signal_name: str, mode: str, ckpt: str | None, config) -> int:
    """Message and exit status (128 + the signal's number) of a test, validation or export stopped by Ctrl-C or
    SIGTERM; the checkpoint is whole (None: checkpointing was off), the outputs of the stopped stage are not all
    written."""
    stage = {"train": "test", "test": "test", "validate": "validation"}.get(mode, "export")
    action = {"train": "--test", "validate": "--validate"}.get(mode, f"--{mode}")
    message = f"Stopped by {signal_name} during the {stage}: its outputs in {config.save_dir} are incomplete; "
    if ckpt is None:
        message += f"{CHECKPOINTING_OFF}, so the {stage} cannot be redone without training again."
    else:
        message += f"the checkpoint {ckpt} is whole. Redo the {stage} with: {resume_command(config, ckpt, action)}"
    say_stop(message)
    return 128 + int(getattr(signal, signal_name))


def report_quit(step: int, config, checkpointing: bool = True) -> int:
    """Message and exit status (130) of a training run quit at once by a second Ctrl-C: the steps since its last
    checkpoint are lost, and that checkpoint is what it continues from."""
    last = newest_checkpoint(config)
    message = f"Quit by Ctrl-C after step {step}, saving nothing."
    if last:
        message += f" The last checkpoint is {last}; continue with: {resume_command(config, last, '--train')}"
    elif not checkpointing:
        message += f" No checkpoint exists: {CHECKPOINTING_OFF}."
    else:
        message += " No checkpoint had been written yet."
    say_stop(message)
    return 130


def report_trained(step: int, ckpt: str | None, config) -> int:
    """The last line of a ``--skip_test`` run: the checkpoint it ended with and the command that tests and exports
    it (None: checkpointing was off, and nothing holds the weights). Exit status 0."""
    if ckpt is None:
        log.warning(f"Trained to step {step}; {CHECKPOINTING_OFF} and --skip_test was given, so nothing holds the "
                    "trained weights.")
    else:
        log.info(f"Trained to step {step}: {ckpt}. Test and export it with: {resume_command(config, ckpt, '--test')}")
    return 0


def newest_checkpoint(config) -> str | None:
    """The trial's newest checkpoint file; None when there is none (or no trial folder yet)."""
    from utils.resume import newest_in

    return newest_in(config.ckpt_dir) if config.get("ckpt_dir") else None


def report_disk_full(err: OSError, mode: str, config, resumed: str | None) -> int:
    """Message and exit status (1) of a run whose disk filled up: every file already written is whole (the writes
    are atomic); say what to run once there is space, from the newest checkpoint."""
    ckpt = (newest_checkpoint(config) if mode == "train" else None) or resumed
    message = f"{err.strerror}. Free some space or give --exp_dir/--runs_dir on another disk"
    if ckpt:
        step = re.search(r"step=(\d+)", os.path.basename(ckpt))
        trained = mode == "train" and step is not None and int(step.group(1)) >= int(config.trainer.max_steps)
        action = ("--test" if trained else "--train") if mode == "train" else f"--{mode}"
        message += then_run(config, ckpt, action)
    log.error(message + ".")
    return 1


def then_run(config, ckpt: str, action: str, override: str = "") -> str:
    """"; then continue with: <command>" (or "redo it", for a test or export) with ``override`` appended."""
    what = "continue" if action == "--train" else "redo it"
    return f"; then {what} with: {resume_command(config, ckpt, action)} {override}".rstrip()


REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_SCRIPT = os.path.join(REPOSITORY, "launch.py")
_run_options = ""  # this run's " --gpu 0,1 --runs_dir X", repeated in the commands it prints (repeat_run_options)


def repeat_run_options(gpu: str | None = None, runs_dir: str | None = None) -> None:
    """Have the commands this run prints run as it was started: on the devices ``--gpu`` gave, so that a run on
    several GPUs goes on on as many, not on the first alone, and logging to the ``--runs_dir`` it gave, so that
    TensorBoard's curves go on in the same place (None: not given, the default)."""
    import shlex

    global _run_options
    _run_options = (f" --gpu {gpu}" if gpu else "") + (f" --runs_dir {shlex.quote(runs_dir)}" if runs_dir else "")


def resume_command(config, ckpt: str, action: str) -> str:
    """The command line that runs ``action`` on the trial's checkpoint ``ckpt``, quoted to paste (spaces and all)."""
    import shlex

    parsed = os.path.join(config.config_dir, "parsed.yaml")
    return launch_command(f"--config {shlex.quote(parsed)} --resume {shlex.quote(ckpt)}{_run_options} {action}")


def launch_command(arguments: str) -> str:
    """``python launch.py <arguments>`` as typed in the current folder: launch.py from the repository's root, its
    path from elsewhere."""
    import shlex

    return f"python {shlex.quote(typed_path(LAUNCH_SCRIPT))} {arguments}"


def typed_path(path: str) -> str:
    """``path`` as a command typed in the current folder names it: relative below that folder, else absolute."""
    relative = os.path.relpath(path)
    return os.path.abspath(path) if relative.startswith("..") else relative


def report_non_finite(err, trainer, system, config, checkpointing: bool) -> int:
    """Message and exit status (3) of a run stopped by a NaN or infinite loss; the weights from before it are
    saved to go on from, unless checkpointing is off. The commands it gives go on from them (or from the newest
    checkpoint, when the weights are no longer finite) with half the learning rate, which ``--resume`` alone
    would not do (it restores the optimiser's rate with the rest of its state), or as the run was."""
    import torch

    from systems.optim import learning_rate_overrides

    if not checkpointing:
        log.error(f"Stopped: {err} Nothing was saved: {CHECKPOINTING_OFF}. "
                  "Lower the learning rate or check the data, then train again.")
        return 3
    message = f"Stopped: {err}"
    if all(torch.isfinite(p).all() for p in system.parameters()):
        good = os.path.join(config.ckpt_dir, f"last-good-step{err.step}.ckpt")
        trainer.save_checkpoint(good, weights_only=False)  # optimiser state too, so --resume continues the run
        message += f" The weights from before that step are saved in {good}."
    else:
        good = newest_checkpoint(config)
        message += f" Earlier checkpoints are untouched; the newest is {good}." if good else \
            " No earlier checkpoint exists: lower the learning rate or check the data, then train again."
    if good:
        halved = " ".join(learning_rate_overrides(trainer.optimizers[0], config, 0.5))
        afresh = resume_command(config, good, "--train --resume_weights_only")
        message += (" To go on from those weights with half the learning rate (a fresh optimiser and schedule from "
                    f"step 0, in a new trial): {afresh} {halved} ; "
                    "or, once the data or the loss is fixed, continue the run as it was (its learning rate "
                    f"restored with the optimiser): {resume_command(config, good, '--train')}")
    log.error(message)
    return 3


MESH_FUNCTIONS = ("evaluate_grid", "marching_cubes", "fuse_mesh", "export_mesh")


def memory_exhausted(err: BaseException) -> str | None:
    """'GPU' or 'CPU' when ``err`` is an allocation that did not fit in that memory, else None."""
    import torch

    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "GPU"
    if isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and "can't allocate memory" in str(err)):
        return "CPU"
    return None


def allocation_size(err: BaseException) -> str | None:
    """How much the failed allocation asked for, as its message says it (torch on CUDA or CPU, NumPy)."""
    text = str(err)
    found = re.search(r"(?:[Tt]ried|Unable) to allocate ([\d.]+) ?([KMGTP]iB)", text)
    if found:  # NumPy writes "256. GiB"
        return f"{float(found.group(1)):g} {found.group(2)}"
    found = re.search(r"tried to allocate (\d+) bytes", text)
    return f"{int(found.group(1)) / 2 ** 30:.2f} GiB" if found else None


def raised_in(err: BaseException, functions: tuple) -> bool:
    """Whether a function of one of these names is on ``err``'s traceback."""
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in functions:
            return True
        tb = tb.tb_next
    return False


def failed_stage(err: BaseException, trainer) -> str | None:
    """The stage ``err`` was raised in: 'train', 'validate', 'test' or 'predict' (as Lightning names them), from
    the functions on its traceback (Lightning resets its own stage before re-raising); None outside them."""
    if raised_in(err, ("validation_step", "on_validation_epoch_end")):
        return "validate"
    if raised_in(err, ("test_step", "on_test_epoch_end")):
        return "test"
    if raised_in(err, ("predict_step", "on_predict_epoch_end")):
        return "predict"
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return "train" if fn is not None and fn.value == "fit" else None


def memory_options(err: BaseException, device: str, stage: str | None, config) -> list:
    """(option, value now) pairs that bound the memory of what ran out, the first being the one to halve."""
    model = config.model
    if stage == "train":
        rays = "model.max_train_num_rays" if model.get("dynamic_ray_sampling") else "model.train_num_rays"
        return [(rays, model.get(rays.split(".")[1])), ("model.num_samples_per_ray", model.get("num_samples_per_ray"))]
    if stage is None:
        return []
    if raised_in(err, MESH_FUNCTIONS):
        iso = model.geometry.get("isosurface") or {}
        if device == "CPU":  # the grid of field values is a NumPy array of resolution^3 floats
            return [("model.geometry.isosurface.resolution", iso.get("resolution"))]
        return [("model.geometry.isosurface.chunk", iso.get("chunk")), ("export.chunk_size",
                                                                       config.get("export", {}).get("chunk_size"))]
    rendering = [("model.sample_chunk", model.get("sample_chunk")), ("model.ray_chunk", model.get("ray_chunk"))]
    # a CPU's queries are already small (utils.mesh.CPU_POINTS_PER_CALL): what is left grows with the rays
    return rendering[::-1] if device == "CPU" else rendering


def report_out_of_memory(err: BaseException, device: str, stage: str | None, mode: str, config,
                         resumed: str | None) -> int:
    """Message and exit status (1) of a run that ran out of GPU or CPU memory: where, how much was asked for,
    which option bounds it (with half its value to try), and the command that goes on from the newest checkpoint.
    ``stage``: Lightning's stage when it happened ('train', 'validate', 'test', ...; None before any)."""
    doing = {"train": "training", "validate": "rendering the validation images",
             "test": "rendering the test images and video", "predict": "rendering the test images and video"
             }.get(stage, "loading the data and building the model")
    if stage in ("test", "predict") and raised_in(err, MESH_FUNCTIONS):
        doing = "extracting the mesh"
    asked = allocation_size(err)
    message = f"Out of {device} memory while {doing}{f' (it asked for {asked} more)' if asked else ''}"
    options = [(key, value) for key, value in memory_options(err, device, stage, config) if value is not None]
    override = ""
    if options:
        key, value = options[0]
        override = f"{key}={max(int(value) // 2, 1)}"
        others = "".join(f" or {k} (now {v})" for k, v in options[1:])
        message += f"; lower {key} (now {value}){others}, e.g. {override}"
    ckpt = (newest_checkpoint(config) if mode == "train" else None) or resumed
    if ckpt:
        during_fit = mode == "train" and stage in ("train", "validate")
        action = "--train" if during_fit else "--test" if mode == "train" else f"--{mode}"
        message += then_run(config, ckpt, action, override)
    log.error(message + ".")
    return 1
