"""Starting from a checkpoint (``--resume``): the file checked before anything is built, its weights loaded with
clear errors, a continued run's options that the checkpoint's restored state overrides named, and the checkpoint a
finished training run is tested from."""
from __future__ import annotations

import glob
import logging
import os

log = logging.getLogger("nsr")


class CheckpointError(RuntimeError):
    """A ``--resume`` checkpoint that is missing, unreadable or does not fit the config; said as one sentence."""


def check_resume(resume: str | None, mode: str, config_path: str = "", runs_folder: str | None = None) -> None:
    """Refuse (CheckpointError) an action without the checkpoint it needs, or a ``--resume`` that names no file.
    Without one, a trial's config (``--config <trial>/config/parsed.yaml``) gets that trial's newest checkpoint
    named; another config the newest of its runs', in ``runs_folder`` (``<exp_dir>/<name>``)."""
    if mode != "train" and not resume:
        from utils.stops import typed_path

        if os.path.basename(config_path) == "parsed.yaml":
            trial = os.path.dirname(os.path.dirname(os.path.abspath(config_path)))
            newest = newest_in(typed_path(os.path.join(trial, "ckpt")))
            whose = "the newest checkpoint of this config's trial"
        else:  # a shipped config, tested after training with it (as instant-nsr-pl's users do)
            newest, whose = newest_under(runs_folder) if runs_folder else None, "the newest of this config's runs"
        suggestion = f"{newest} ({whose})" if newest else "exp/<name>/<trial>/ckpt/<file>.ckpt"
        raise CheckpointError(f"--{mode} needs a checkpoint: add --resume {suggestion}.")
    if resume and not os.path.isfile(resume):
        raise CheckpointError(missing_checkpoint_message(resume))
    if resume and resume.endswith((".yaml", ".yml")):
        raise CheckpointError(f"'{resume}' is a config, not a checkpoint: give it to --config, and a checkpoint of "
                              "the trial (its ckpt/<file>.ckpt) to --resume.")


def missing_checkpoint_message(path: str) -> str:
    """What to say when ``--resume path`` is not a file: a folder (a trial, its ckpt/) or a mistyped name gets the
    newest checkpoint found there as the suggestion."""
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    newest = newest_under(folder)
    what = "is a folder" if os.path.isdir(path) else "does not exist"
    if newest:
        return f"Checkpoint '{path}' {what}; give a checkpoint file, e.g. --resume {newest} (the newest there)."
    return f"Checkpoint '{path}' {what}; the trial's checkpoints are in exp/<name>/<trial>/ckpt/."


def newest_in(folder: str) -> str | None:
    """The newest checkpoint file in ``folder`` (not a write cut short by a kill, ``.tmp-*``); None if none."""
    found = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".ckpt") and not f.startswith(".tmp-")] \
        if os.path.isdir(folder) else []
    return max(found, key=os.path.getmtime) if found else None


def newest_under(folder: str) -> str | None:
    """The newest checkpoint in ``folder``, its ``ckpt/``, or the ``ckpt/`` of a trial in it (``exp/<name>``)."""
    places = [folder, os.path.join(folder, "ckpt")] + glob.glob(os.path.join(glob.escape(folder), "*", "ckpt"))
    found = [ckpt for ckpt in map(newest_in, places) if ckpt]
    return max(found, key=os.path.getmtime) if found else None


def load_weights(system, path: str) -> dict:
    """Load a checkpoint's weights into ``system`` with clear errors (a missing file was refused by ``check_resume``
    at start-up). Returns the checkpoint."""
    from models.per_image import size_from_checkpoint
    from utils.callbacks import load_checkpoint_file

    try:
        ckpt = load_checkpoint_file(path)
    except Exception as err:
        raise CheckpointError(f"Checkpoint '{path}' cannot be read ({type(err).__name__}); is it a file this project "
                        "wrote, and complete?") from None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if state is None:
        raise CheckpointError(f"Checkpoint '{path}' has no state_dict; it was not written by this project.")
    size_from_checkpoint(system, state)  # per-image tables take their size from the data or the checkpoint
    own = system.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape of {mismatched[0]} is {tuple(state[mismatched[0]].shape)}, config gives "
                       f"{tuple(own[mismatched[0]].shape)}")
        raise CheckpointError(f"Checkpoint '{path}' does not match this config ({detail}); {config_of_trial(path)}")
    system.load_state_dict(state)  # with trained_steps, the step the weights are at, which names the outputs
    return ckpt


def config_of_trial(checkpoint: str) -> str:
    """The advice for a checkpoint that does not fit the config given: the config of the trial it lies in
    (``<trial>/ckpt/x.ckpt`` -> ``<trial>/config/parsed.yaml``), named when it is there."""
    from utils.stops import typed_path

    parsed = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))), "config", "parsed.yaml")
    if os.path.isfile(parsed):
        return f"use the config its trial trained with: --config {typed_path(parsed)}."
    return "use the config/parsed.yaml of the trial that wrote it."


def start_from_checkpoint(system, config, path: str, continued: bool, skip_test: bool) -> bool:
    """Load the weights of the checkpoint at ``path`` into ``system`` and say so. ``continued`` (``--train --resume``
    without ``--resume_weights_only``): Lightning restores the rest of it afterwards, so the options of ``config``
    that its restored state overrides are named and set to the restored values. Returns whether a continued run has
    nothing left to train (the checkpoint is at ``trainer.max_steps`` or past it)."""
    from systems.base import TRAINING_STREAMS
    from systems.optim import options_a_continued_run_ignores

    ckpt = load_weights(system, path)
    restored = ": weights, optimiser, schedule and random streams" if continued else ""
    run_step, weights_step = int(ckpt.get("global_step", system.step)), system.step
    at = f"step {run_step}" if weights_step == run_step else \
        f"weights of step {weights_step}, run's step {run_step}: the updates after a non-finite loss were skipped"
    log.info(f"{'Continuing the run from' if continued else 'Loaded weights from'} {path} ({at}{restored})")
    if not continued:
        return False
    ignored = options_a_continued_run_ignores(config.system, system.model, ckpt)
    seed = (ckpt.get(TRAINING_STREAMS) or {}).get("seed")  # the streams go on from the checkpoint's
    if seed is not None and seed != system.seed:
        ignored.append(("seed", system.seed, seed))
    keep_what_the_checkpoint_restores(config, ignored)
    reached = int(ckpt.get("global_step", 0))
    if reached < int(config.trainer.max_steps):
        return False
    log.warning(f"The checkpoint is at step {reached}, already trainer.max_steps={config.trainer.max_steps} or past "
                f"it: nothing to train{'' if skip_test else ', testing it'}. Continue training with a larger "
                f"trainer.max_steps (the total, e.g. {reached + 1000}).")
    return True


def keep_what_the_checkpoint_restores(config, ignored: list) -> None:
    """Say which options of ``config`` a continued run ignores ((key, this config's value, the checkpoint's): the
    optimiser's and scheduler's from ``systems.optim.options_a_continued_run_ignores``, and the seed, whose streams
    go on from the checkpoint's), and set them in ``config`` to the values restored, so that the trial's
    parsed.yaml records what the run trained with."""
    from omegaconf import OmegaConf

    from systems.optim import shown_option

    if not ignored:
        return
    said = "; ".join(f"{key}: {shown_option(ours)} here, {shown_option(restored)} restored"
                     for key, ours, restored in ignored)
    log.warning("Continuing the run restores the checkpoint's optimiser, learning-rate schedule and random streams "
                f"whole, so these options of this config have no effect: {said}. The trial's config/parsed.yaml "
                "records the restored values. To train with them, start afresh from the weights with "
                "--resume_weights_only (steps from 0).")
    for key, _, restored in ignored:
        if OmegaConf.select(config, key, default=None) is not None:
            OmegaConf.update(config, key, restored, merge=False)


def final_checkpoint(trainer, ckpt_dir: str) -> str:
    """The checkpoint of the step training ended at: ModelCheckpoint's, or written here when its interval did not
    fall on that step (e.g. a resumed run whose parsed.yaml fixed the interval)."""
    step = trainer.global_step
    saved = glob.glob(os.path.join(glob.escape(ckpt_dir), f"*step={step}.ckpt"))
    if saved:
        return saved[0]
    epoch = max(trainer.current_epoch - 1, 0)  # fit's end has already counted the epoch as done
    path = os.path.join(ckpt_dir, f"epoch={epoch}-step={step}.ckpt")
    trainer.save_checkpoint(path, weights_only=False)
    return path
