"""Train, test and export neural surface / radiance-field models (instant-nsr-pl command line).

    python launch.py --config configs/neus-demo.yaml --train        # NeuS on the embedded demo scene, no download
    python launch.py --config configs/nerf-demo.yaml --train        # NeRF on it
    python launch.py --config configs/neus-dtu-wmask.yaml --gpu 0 --train dataset.root_dir=load/DTU-neus/dtu_scan24
    python launch.py --config configs/nerf-blender.yaml --gpu 0 --train dataset.scene=lego tag=example
    python launch.py --config exp/<name>/<trial>/config/parsed.yaml --resume exp/<name>/<trial>/ckpt/<file>.ckpt --test
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from utils.devices import DeviceError, choose_devices, devices_asked, missing_requirement
from utils.distributed import launched_rank
from utils.resume import CheckpointError, check_resume, final_checkpoint, start_from_checkpoint
from utils.stops import repeat_run_options
from utils.trial import (csv_log_version, remove_empty, report_stale_temporaries, reuse_trial_folder,
                         start_beside_trial, trial_of, trial_paths)

log = logging.getLogger("nsr")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    home = os.path.expanduser  # --resume=~/x.ckpt: a shell expands ~ only at the start of a word
    parser.add_argument("--config", required=True, type=home, help="path to a YAML config")
    parser.add_argument("--gpu", default=None, type=gpu_list,
                        help="CUDA devices, e.g. 0 or 0,1 (default: 0 when CUDA is present)")
    parser.add_argument("--resume", default=None, type=home,
                        help="checkpoint to resume training from, or to test/export")
    parser.add_argument("--resume_weights_only", action="store_true",
                        help="with --train --resume: load the weights only, start a fresh optimiser and step count")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--train", action="store_true", help="train, then test and export")
    group.add_argument("--validate", action="store_true", help="render the validation views of a checkpoint")
    group.add_argument("--test", action="store_true", help="metrics, test images, video and mesh of a checkpoint")
    group.add_argument("--predict", action="store_true", help="same as --export")
    group.add_argument("--export", action="store_true", help="video and mesh of a checkpoint, no metrics")
    parser.add_argument("--skip_test", action="store_true", help="with --train: do not test/export afterwards")
    parser.add_argument("--exp_dir", default="./exp", type=home,
                        help="where trial folders go: <exp_dir>/<name>/<tag>@<time>/ (default ./exp)")
    parser.add_argument("--runs_dir", default="./runs", type=home, help="TensorBoard logs (default ./runs)")
    parser.add_argument("--verbose", action="store_true", help="also Lightning's start-up lines and model summary")
    parser.epilog = ("Config options follow as key=value (system.loss.lambda_mask=0.1 trainer.max_steps=5000);\n"
                     "+key=value adds a key the config does not have.")
    args, overrides = parser.parse_known_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    args.exp_dir_given, args.runs_dir_given = (any(a == option or a.startswith(option + "=") for a in given)
                                               for option in ("--exp_dir", "--runs_dir"))
    unknown = [o for o in overrides if o.startswith("--")]
    if unknown:
        parser.error(f"unknown option {unknown[0]}; config overrides are written key=value, without dashes")
    if args.resume_weights_only and not args.resume:
        parser.error("--resume_weights_only loads the weights of the checkpoint given by --resume; add --resume "
                     "exp/<name>/<trial>/ckpt/<file>.ckpt")
    return args, overrides


def gpu_list(text: str) -> str:
    """``--gpu``'s value: CUDA device numbers separated by commas (``0``, ``0,1``), as CUDA_VISIBLE_DEVICES."""
    devices = text.replace(" ", "").split(",")
    if not all(d.isdigit() for d in devices) or len(set(devices)) != len(devices):
        raise argparse.ArgumentTypeError(f"takes CUDA device numbers such as 0 or 0,1 (each once), not {text!r}")
    return ",".join(devices)


class BarAwareHandler(logging.StreamHandler):
    """Log lines printed above the progress bars (tqdm clears and redraws them), not glued to a bar's line."""

    def emit(self, record) -> None:
        try:
            from tqdm import tqdm
        except ImportError:  # not installed yet: the line that says so still gets out
            return super().emit(record)
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def setup_logging(verbose: bool, devices_per_node: int = 1) -> None:
    """Our lines as ``[nsr] ...`` on stdout. On several devices every rank runs this script; rank 0 says what
    the run does, the others only their errors (``[nsr rank N] ...``), so each line is said once."""
    rank = launched_rank(devices_per_node)
    handler = BarAwareHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[nsr rank {rank}] %(message)s" if rank else "[nsr] %(message)s"))
    if rank:
        handler.setLevel(logging.ERROR)
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    logging.getLogger("pytorch_lightning.trainer.connectors.signal_connector").addFilter(acknowledge_lightning_sigterm)
    if not verbose:
        import warnings

        for pattern in (".*does not have many workers.*", ".*LightningModule.*log.*", ".*sync_dist.*",
                        ".*TensorBoard support.*", ".*You called `self.log.*",
                        ".*isinstance\\(treespec, LeafSpec\\).*",  # Lightning's own use of torch's pytree
                        "TypedStorage is deprecated",  # torch 2.1's own weights-only loading
                        ".*Checkpoint directory .* exists and is not empty.*"):  # a continued trial's, named
            warnings.filterwarnings("ignore", message=pattern)
        # Lightning advertises its cloud services ("Tip: ... try installing litlogger / litmodels") at every run,
        # says "`Trainer.fit` stopped: `max_steps=N` reached." on the bar's line when training ends as planned,
        # "GPU available: False, used: False" / "TPU available ..." (our Device line says it) and
        # "`Trainer(limit_train_batches=1.0)` was configured so 100% of the batches ..." (the configs' default),
        # and "Restoring states from the checkpoint path at ..." / "Restored all states ..." (ours says it first)
        logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
            lambda record: not str(record.msg).startswith(("💡 Tip", "`Trainer.fit` stopped: `max_steps=",
                                                           "GPU available:", "TPU available:", "HPU available:",
                                                           "IPU available:",  # Lightning < 2.2
                                                           "`Trainer(limit_", "Restoring states from the checkpoint",
                                                           "Restored all states from the checkpoint")))


def acknowledge_lightning_sigterm(record) -> bool:
    """Lightning's handler logs "[rank: 0] Received SIGTERM: 15" outside training (where ours is not installed),
    onto the progress bar's line; say it as Ctrl-C is said, on a line of its own, instead."""
    if str(record.msg).startswith("[rank: ") and "Received SIGTERM" in str(record.msg):
        from utils.callbacks import say_now

        say_now("SIGTERM received: stopping after the batch under way.")
        return False
    return True


def folder_problem(path: str) -> str | None:
    """Why the folder ``path`` cannot be made or written into (None when it can), found without making it."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable by this user"
    return None


class UserError(RuntimeError):
    """A problem with the user's input; printed as one sentence, no traceback."""


@contextlib.contextmanager
def lightning_refusals(section: str, taker: str):
    """Lightning's refusal of an option the config's ``section`` passes to its ``taker`` (an unknown keyword, a
    value it rejects) as one sentence instead of a traceback from inside Lightning."""
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    try:
        yield
    except TypeError as err:
        raise UserError(f"The config's {section} has an option Lightning's {taker} does not take ({err}).") from None
    except MisconfigurationException as err:
        raise UserError(f"Lightning's {taker} refuses the config's {section}: {err}") from None


def main(argv=None) -> int:
    """Exit status of one run. What a run sets for itself is put back when it returns, so that a later run or
    code in the same process (a notebook, a sweep script, the tests) starts clean: the trial name passed to DDP
    child processes through NSR_TRIAL_NAME, the "nsr" logger's handler (bound to this run's stdout), and the options
    the commands it prints repeat."""
    inherited = os.environ.get("NSR_TRIAL_NAME")
    logger_state = (log.handlers[:], log.level, log.propagate)
    try:
        return run(argv)
    except ModuleNotFoundError as err:  # a package of requirements.txt missing: pip install not run, or another Python
        problem = missing_requirement(err)
        if problem is None:
            raise
        log.error(problem)
        return 2
    finally:
        if inherited is None:
            os.environ.pop("NSR_TRIAL_NAME", None)
        log.handlers[:], log.level, log.propagate = logger_state
        repeat_run_options()


def seed_quietly(seed: int) -> None:
    """Lightning's seed_everything without its "Seed set to" line (its ``verbose`` flag only exists from 2.3)."""
    import pytorch_lightning as pl

    seed_logger = logging.getLogger("lightning_fabric.utilities.seed")
    level = seed_logger.level
    seed_logger.setLevel(logging.WARNING)
    try:
        pl.seed_everything(seed, workers=True)
    finally:
        seed_logger.setLevel(level)


def run(argv=None) -> int:
    args, overrides = parse_args(argv)
    setup_logging(args.verbose, devices_asked(args.gpu))
    repeat_run_options(args.gpu, args.runs_dir if args.runs_dir_given else None)
    from utils.config import ConfigError, check_sections, check_trainer_options, load_config

    try:  # before torch and Lightning are imported (seconds): a mistyped option is answered at once
        raw_config = load_config(args.config, overrides, resolve=False)
        config = load_config(args.config, overrides)
        check_sections(config)
        check_trainer_options(config)
    except ConfigError as err:
        log.error(str(err))
        return 2
    exp_dir = ("exp_dir (in the config)", config.exp_dir) if config.get("exp_dir") else ("--exp_dir", args.exp_dir)
    for option, folder in (exp_dir, ("--runs_dir", args.runs_dir)):
        problem = folder_problem(folder)
        if problem:  # found before anything runs, not as a traceback from a logger after the model is built
            log.error(f"{option} {folder} cannot be written: {problem}; give a folder you can write to.")
            return 2
    mode = "train" if args.train else "validate" if args.validate else "test" if args.test else "export"
    try:
        accelerator, n_devices = choose_devices(args.gpu)
        # before the scene's images are read and the model built
        check_resume(args.resume, mode, args.config, os.path.join(exp_dir[1], str(config.get("name", ""))))
    except (DeviceError, CheckpointError) as err:
        log.error(str(err))
        return 2
    if accelerator == "cpu":  # a CPU step's tensors are host memory, freed and allocated again every step
        from utils.host_memory import keep_freed_host_memory

        log.info(keep_freed_host_memory())

    import pytorch_lightning as pl
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    import datasets
    import systems
    from datasets.base import DatasetError
    from systems.finite_guard import NonFiniteLossError
    from systems.optim import check_optimization_config
    from utils.callbacks import (AtomicCheckpointIO, AtomicCSVLogger, ProgressBar, SaveOnSignal, StopOnSignal,
                                 TrialSnapshot)
    from utils.config import to_primitive, whole_step_counts
    from utils.config_keys import describe as describe_unread, keys_interpolated_in, unread_keys
    from utils.mesh import MeshError
    from utils.stops import (SigtermRaises, Terminated, failed_stage, memory_exhausted, report_disk_full,
                             report_non_finite, report_out_of_memory, report_quit, report_stopped,
                             report_stopped_output, report_trained)

    created, trainer = [], None
    sigterm = SigtermRaises()  # until Lightning's stages, whose own handling (and StopOnSignal's) ends them cleanly
    try:
        trial = trial_of(args.config)
        raw_yaml = os.path.join(trial, "config", "raw.yaml") if trial else None
        kept_raw = bool(raw_yaml and os.path.isfile(raw_yaml))
        # keys the trial's config as written used in interpolations, resolved away in its parsed.yaml
        interpolated = keys_interpolated_in(raw_yaml) if kept_raw else set()
        unread = unread_keys(raw_config, also_referenced=interpolated)
        if unread:
            log.warning(describe_unread(unread))
        reusing_trial = bool(trial and config.get("trial_name"))
        if reusing_trial:
            if args.train and args.resume_weights_only:
                start_beside_trial(config, trial, args)
                reusing_trial = False
                kept_raw = False  # the new trial's raw.yaml: the config this run was given
            else:
                reuse_trial_folder(config, trial, args)
        created = trial_paths(config, args)
        if not created:  # a trial run before: what a killed write of it left behind goes
            report_stale_temporaries(os.path.join(config.exp_dir, config.trial_name))
        seed_quietly(int(config.get("seed", 42)))
        # the model first: a wrong model option is refused before the scene's images are read (or the demo
        # rendered); the data module draws nothing from the seeded generators, so the weights are the same
        system = systems.make(config.system.name, config, mode=mode)
        if mode == "train":
            check_optimization_config(config.system, system.model)
        nothing_to_train = False
        if args.resume:  # a full --train --resume checks the checkpoint here, then Lightning restores all of it
            continued = mode == "train" and not args.resume_weights_only
            nothing_to_train = start_from_checkpoint(system, config, args.resume, continued, args.skip_test)
        # the scene last: a checkpoint that does not fit the config is said before its images are read
        dm = datasets.make(config.dataset.name, config.dataset)
        dm.setup({"train": "fit", "validate": "validate"}.get(mode, "test"))

        trainer_cfg = whole_step_counts(dict(to_primitive(config.get("trainer", {})) or {}))
        trainer_cfg.setdefault("inference_mode", False)  # SDF normals need autograd while testing
        # on several devices the data module shares the views out itself, each scored once (datasets.base)
        trainer_cfg.setdefault("use_distributed_sampler", False)
        # Lightning's table (with a FLOPs column of zeros) only with --verbose; one line of ours otherwise
        trainer_cfg.setdefault("enable_model_summary", args.verbose)
        if not trainer_cfg["enable_model_summary"]:
            n_params = sum(p.numel() for p in system.parameters() if p.requires_grad)
            log.info(f"Model: {type(system.model).__name__}, {n_params / 1e6:.2f} M trainable parameters")
        if accelerator == "cpu":
            trainer_cfg["precision"] = "32-true"
        elif str(trainer_cfg.get("precision", "32")) in ("16", "16-mixed"):
            trainer_cfg["precision"] = "16-mixed"
        checkpointing = bool(trainer_cfg.get("enable_checkpointing", True))  # false: no checkpoint is written
        if mode == "train" and args.skip_test and not checkpointing:
            log.warning("With --skip_test and trainer.enable_checkpointing: false, nothing of the trained field is "
                        "kept: no checkpoint, test images or mesh, only the logs.")
        callbacks, stop_on_signal = [], StopOnSignal()
        if mode == "train":
            if checkpointing:
                with lightning_refusals("checkpoint section", "ModelCheckpoint"):
                    callbacks.append(ModelCheckpoint(dirpath=config.ckpt_dir,
                                                     **dict(to_primitive(config.get("checkpoint", {})) or {})))
                stop_on_signal = SaveOnSignal(config.ckpt_dir)  # after ModelCheckpoint: it may reuse that one's file
            callbacks.append(LearningRateMonitor(logging_interval="step"))
            if not (nothing_to_train and reusing_trial):  # the trial's record stays that of its checkpoints
                callbacks.append(TrialSnapshot(config, raw_config, config.config_dir, config.code_dir,
                                               keep_raw=kept_raw))
        callbacks.append(stop_on_signal)
        if trainer_cfg.get("enable_progress_bar", True):
            callbacks.append(ProgressBar())
        loggers = [TensorBoardLogger(args.runs_dir, name=config.name, version=config.trial_name),
                   AtomicCSVLogger(config.exp_dir, name=config.trial_name, version=csv_log_version(config, mode))]
        strategy = "auto"
        if n_devices > 1:
            from pytorch_lightning.strategies import DDPStrategy

            strategy = DDPStrategy(find_unused_parameters=False)
        with lightning_refusals("trainer section", "Trainer"):
            trainer = pl.Trainer(accelerator=accelerator, devices=n_devices, strategy=strategy, callbacks=callbacks,
                                 logger=loggers, plugins=[AtomicCheckpointIO()], **trainer_cfg)
        log.info(f"Trial folder: {os.path.join(config.exp_dir, config.trial_name)}")
        sigterm.restore()

        if mode == "train":
            ckpt_path = args.resume if args.resume and not args.resume_weights_only else None
            try:
                trainer.fit(system, datamodule=dm, ckpt_path=ckpt_path)  # AtomicCheckpointIO loads weights only
            except NonFiniteLossError as err:
                return report_non_finite(err, trainer, system, config, checkpointing)
            except SystemExit:  # Lightning's exit at a second Ctrl-C
                if not stop_on_signal.interrupted:
                    raise
            # Lightning < 2.2 returns from the stage it ended at Ctrl-C instead of exiting; either way, unless the
            # first signal's stop happened (reported just below), nothing more runs
            if stop_on_signal.interrupted and not stop_on_signal.stopped:
                return report_quit(trainer.global_step, config, checkpointing)
            if stop_on_signal.stopped:
                return report_stopped(stop_on_signal.received, trainer.global_step, int(trainer.max_steps),
                                      stop_on_signal.saved, config)
            tested_ckpt = final_checkpoint(trainer, config.ckpt_dir) if checkpointing else None
            if args.skip_test:
                return report_trained(trainer.global_step, tested_ckpt, config)
        else:
            tested_ckpt = args.resume
        try:
            if mode == "validate":
                trainer.validate(system, datamodule=dm)
            else:
                trainer.test(system, datamodule=dm, verbose=mode in ("train", "test"))
            if stop_on_signal.interrupted:  # Lightning < 2.2 returns from a test ended by Ctrl-C
                return report_stopped_output("SIGINT", mode, tested_ckpt, config)
            if mode == "export" and system.mesh_error:  # the mesh is what --export is for: a script must see it
                log.error("--export wrote the video but no mesh (see above).")
                return 1
        except SIGTERMException:  # Lightning ends its test loop at SIGTERM, then exits with status 0
            return report_stopped_output("SIGTERM", mode, tested_ckpt, config)
        except SystemExit:  # Lightning's exit at Ctrl-C, with status 1
            if not stop_on_signal.interrupted:
                raise
            return report_stopped_output("SIGINT", mode, tested_ckpt, config)
    except (UserError, CheckpointError, ConfigError, DatasetError, MeshError) as err:
        log.error(str(err))
        remove_empty(created)
        return 2
    except (ConfigAttributeError, ConfigKeyError) as err:  # a key the YAML lacks, read where it has no default
        if args.verbose:
            raise
        key = err.full_key
        if "." not in key:
            log.error(f"The config has no top-level {key}, which every run needs; start from one of the shipped "
                      "configs/*.yaml, which have every section.")
        else:
            log.error(f"The config has no {key}, which this run needs; add it to the YAML (the shipped "
                      f"configs/*.yaml have every key) or on the command line as +{key}=VALUE.")
        remove_empty(created)
        return 2
    except OSError as err:  # a full disk, a read-only or forbidden folder: said, not a traceback
        from utils.io import access_problem, disk_full_error

        remove_empty(created)
        full = disk_full_error(err, err.filename or os.path.join(config.get("exp_dir") or args.exp_dir, "x"),
                               atomic=False)
        problem = access_problem(err)
        if args.verbose or (full is None and problem is None):
            raise
        if full is not None:
            return report_disk_full(full, mode, config, args.resume)
        log.error(f"{problem}; give paths this user can read, and folders it can write to "
                  "(--exp_dir, --runs_dir, and dataset.root_dir, where the demo scene is rendered on first use).")
        return 2
    except (MemoryError, RuntimeError) as err:  # RuntimeError: torch's OutOfMemoryError, a CPU allocation refused
        device = memory_exhausted(err)
        remove_empty(created)
        if device is None or args.verbose:
            raise
        return report_out_of_memory(err, device, failed_stage(err, trainer), mode, config, args.resume)
    except Terminated:
        log.error("Stopped by SIGTERM before training or testing began; every file written so far is whole.")
        remove_empty(created)
        return 143
    except KeyboardInterrupt:  # outside Lightning's stages: while loading, building, or between training and test
        log.error("Stopped by SIGINT (Ctrl-C); every file written so far is whole.")
        remove_empty(created)
        return 130
    except BaseException:  # a bug's traceback, or an exit re-raised above: still no empty trial folder left
        remove_empty(created)
        raise
    finally:
        sigterm.restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
