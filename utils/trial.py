"""The trial folder of a run, as instant-nsr-pl lays it out: ``<exp_dir>/<name>/<tag>@<YYYYmmdd-HHMMSS>/`` with
``config/``, ``code/``, ``ckpt/``, ``save/`` and ``csv_logs/``; which folder a run writes to (a new one, or the one
whose ``config/parsed.yaml`` it was given), and what a run that failed early leaves of it (nothing)."""
from __future__ import annotations

import logging
import os
import shutil
from datetime import datetime

log = logging.getLogger("nsr")


def trial_of(config_path: str) -> str | None:
    """The trial folder whose ``config/parsed.yaml`` ``config_path`` is, as a path like the one given; None for
    any other config file."""
    folder = os.path.dirname(os.path.normpath(config_path))
    if os.path.basename(config_path) != "parsed.yaml" or os.path.basename(folder) != "config":
        return None
    return os.path.dirname(folder) or "."


def reuse_trial_folder(config, trial: str, args) -> None:
    """A trial's parsed.yaml names its folders as they were written (``./exp/...``, relative to where that run
    started, or absolute on the machine it ran on); the trial's outputs go to the folder the file is in, wherever
    the command runs from and wherever the trial was moved to."""
    exp_dir, trial_name = os.path.split(os.path.normpath(trial))
    if args.exp_dir_given and os.path.abspath(args.exp_dir) != os.path.abspath(os.path.dirname(exp_dir) or "."):
        log.warning(f"--exp_dir {args.exp_dir} is not used: the config is the parsed.yaml of the trial {trial}, "
                    "which takes this run's outputs.")
    recorded = os.path.join(str(config.get("exp_dir") or ""), str(config.trial_name))
    config.exp_dir, config.trial_name = exp_dir or ".", trial_name
    for key in ("save", "ckpt", "code", "config"):
        if config.get(f"{key}_dir") in (None, os.path.join(recorded, key)):  # not set otherwise (save_dir=...)
            config[f"{key}_dir"] = os.path.join(trial, key)


def start_beside_trial(config, trial: str, args) -> None:
    """``--train --resume_weights_only`` from a trial's parsed.yaml is a new run (its steps count from 0 again):
    it gets a trial folder of its own, beside that one (or under ``--exp_dir``), instead of writing its
    it{step} outputs over the old run's and its config over the record of how the old weights were trained."""
    recorded = os.path.join(str(config.get("exp_dir") or ""), str(config.trial_name))
    config.exp_dir = (os.path.join(args.exp_dir, config.name) if args.exp_dir_given
                      else os.path.dirname(os.path.normpath(trial)) or ".")
    config.trial_name = None
    for key in ("save", "ckpt", "code", "config"):
        if config.get(f"{key}_dir") == os.path.join(recorded, key):  # the old trial's, not set otherwise
            config[f"{key}_dir"] = None
    log.info(f"--resume_weights_only starts a new trial in {config.exp_dir}; {trial} is left as it is.")


def trial_paths(config, args) -> list:
    """instant-nsr-pl's trial layout; a parsed.yaml that already names its trial keeps it. A new trial's
    folder is created here, so that a second run started in the same second (a sweep launched in parallel)
    gets ``<tag>@<time>-2`` instead of writing into the first one's. Returns the folders it created, the
    innermost first."""
    config.exp_dir = config.get("exp_dir") or os.path.join(args.exp_dir, config.name)
    created = []
    if not config.get("trial_name"):
        # DDP child processes re-run this script: they inherit the trial's name through the environment
        name = os.environ.get("NSR_TRIAL_NAME")
        if name is None:
            name = base = str(config.get("tag") or "") + datetime.now().strftime("@%Y%m%d-%H%M%S")
            missing = os.path.abspath(config.exp_dir)
            while not os.path.isdir(missing):  # ./exp and ./exp/<name> on a first run
                created.append(missing)
                missing = os.path.dirname(missing)
            for n in range(2, 1000):
                try:
                    os.makedirs(os.path.join(config.exp_dir, name))
                    break
                except FileExistsError:
                    name = f"{base}-{n}"
            created.insert(0, os.path.join(config.exp_dir, name))
            os.environ["NSR_TRIAL_NAME"] = name
        config.trial_name = name
    trial = os.path.join(config.exp_dir, config.trial_name)
    for key in ("save", "ckpt", "code", "config"):
        config[f"{key}_dir"] = config.get(f"{key}_dir") or os.path.join(trial, key)
    return created


def report_stale_temporaries(trial: str) -> None:
    from utils.io import remove_stale_temporaries

    removed, freed = remove_stale_temporaries(trial)
    if removed:
        log.info(f"Removed {removed} temporary file(s) ({freed / 2 ** 20:.1f} MiB) left in {trial} by a run "
                 "killed while writing them (the finished files were never touched).")


def csv_log_version(config, mode: str) -> str:
    """``csv_logs`` for a trial's first run; a later run in the same trial (resumed training, --test) gets
    ``csv_logs/<mode>@<time>``, because Lightning's CSV logger deletes the metrics.csv it finds."""
    if not os.path.isfile(os.path.join(config.exp_dir, config.trial_name, "csv_logs", "metrics.csv")):
        return "csv_logs"
    return os.path.join("csv_logs", mode + datetime.now().strftime("@%Y%m%d-%H%M%S"))


def remove_empty(folders) -> None:
    """Remove the trial folders this run created and left without a file (it failed before writing anything;
    the loggers may have made their empty folders by then)."""
    for folder in folders:
        if os.path.isdir(folder) and not any(files for _, _, files in os.walk(folder)):
            shutil.rmtree(folder)
