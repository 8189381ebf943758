"""What a run that ends early says: the reason in one sentence, what was kept, and the command that goes on.

Ctrl-C or SIGTERM during training or its outputs, a non-finite loss, a full disk, memory that ran out. Each
report logs one line and returns the run's exit status; checkpoints and outputs are written atomically, so
whatever a report names is whole.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import signal

log = logging.getLogger("nsr")


CHECKPOINTING_OFF = "checkpointing is off (trainer.enable_checkpointing: false)"


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
    log.error(message)
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
    log.error(message)
    return 128 + int(getattr(signal, signal_name))


def report_quit(step: int, config, checkpointing: bool = True) -> int:
    """Message and exit status (130) of a training run quit at once by Ctrl-C (a second one; on several GPUs, the
    first): the steps since its last checkpoint are lost, and that checkpoint is what it continues from."""
    ckpts = glob.glob(os.path.join(glob.escape(config.ckpt_dir), "*.ckpt"))
    message = f"Quit by Ctrl-C after step {step}, saving nothing."
    if ckpts:
        last = max(ckpts, key=os.path.getmtime)
        message += f" The last checkpoint is {last}; continue with: {resume_command(config, last, '--train')}"
    elif not checkpointing:
        message += f" No checkpoint exists: {CHECKPOINTING_OFF}."
    else:
        message += " No checkpoint had been written yet."
    log.error(message)
    return 130


def report_disk_full(err: OSError, mode: str, config, resumed: str | None) -> int:
    """Message and exit status (1) of a run whose disk filled up: every file already written is whole (the writes
    are atomic); say what to run once there is space, from the newest checkpoint."""
    ckpts = glob.glob(os.path.join(glob.escape(config.get("ckpt_dir", "")), "*.ckpt")) if mode == "train" else []
    ckpt = max(ckpts, key=os.path.getmtime) if ckpts else resumed
    message = f"{err.strerror}. Free some space or give --exp_dir/--runs_dir on another disk"
    if ckpt:
        step = re.search(r"step=(\d+)", os.path.basename(ckpt))
        trained = mode == "train" and step is not None and int(step.group(1)) >= int(config.trainer.max_steps)
        action = ("--test" if trained else "--train") if mode == "train" else f"--{mode}"
        what = "continue" if action == "--train" else "redo it"
        message += f"; then {what} with: {resume_command(config, ckpt, action)}"
    log.error(message + ".")
    return 1


def resume_command(config, ckpt: str, action: str) -> str:
    """The command line that runs ``action`` on the trial's checkpoint ``ckpt``, quoted to paste (spaces and all)."""
    import shlex

    parsed = os.path.join(config.config_dir, "parsed.yaml")
    return f"python launch.py --config {shlex.quote(parsed)} --resume {shlex.quote(ckpt)} {action}"


def report_non_finite(err, trainer, system, ckpt_dir: str | None) -> int:
    """Message and exit status (3) of a run stopped by a NaN or infinite loss; the weights from before it are
    saved to resume from, unless checkpointing is off (``ckpt_dir`` None)."""
    import torch

    if ckpt_dir is None:
        log.error(f"Stopped: {err} Nothing was saved: {CHECKPOINTING_OFF}. "
                  "Lower the learning rate or check the data, then train again.")
        return 3
    params_ok = all(torch.isfinite(p).all() for p in system.parameters())
    message = f"Stopped: {err}"
    if params_ok:
        path = os.path.join(ckpt_dir, f"last-good-step{err.step}.ckpt")
        trainer.save_checkpoint(path, weights_only=False)  # optimiser state too, so --resume continues the run
        message += f" The weights from before that step are saved in {path}."
    existing = sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".ckpt")) if os.path.isdir(ckpt_dir) else []
    if existing and not params_ok:
        message += f" Earlier checkpoints are untouched in {ckpt_dir}."
    message += " Lower the learning rate or check the data, then --resume."
    log.error(message)
    return 3
