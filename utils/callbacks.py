"""Lightning plumbing: trial-folder snapshots, atomic checkpoint writes, a progress bar that waits for nothing,
a clean stop on Ctrl-C."""
from __future__ import annotations

import copy
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any

import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback, Checkpoint, TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from utils.io import atomic_path

log = logging.getLogger("nsr")

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_FOLDERS = ("configs", "datasets", "models", "systems", "utils", "scripts")


COUNTER_KEY = "__counts__"  # a collections.Counter is saved as {COUNTER_KEY: dict(counter)}


def _map_items(value: Any, fn) -> Any:
    """``value`` (a dict, list or tuple) with ``fn`` applied to its items; the same object when nothing changed,
    else a copy of its own class (Lightning's AttributeDict, an OrderedDict, a namedtuple)."""
    items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
    mapped = [(k, fn(v)) for k, v in items]
    if all(new is old for (_, new), (_, old) in zip(mapped, items)):
        return value
    if isinstance(value, dict):
        out = copy.copy(value)
        out.update(mapped)
        return out
    values = [v for _, v in mapped]
    return type(value)(*values) if hasattr(value, "_fields") else type(value)(values)  # a namedtuple, or not


def counters_as_dicts(value: Any) -> Any:
    """``value`` with every ``collections.Counter`` (MultiStepLR keeps its milestones in one) replaced by a tagged
    dict: torch before 2.4 refuses Counters in ``torch.load(weights_only=True)``, and so could not resume. Tensors
    and other leaves are kept as they are, not copied."""
    if isinstance(value, Counter):
        return {COUNTER_KEY: dict(value)}
    if isinstance(value, (dict, list, tuple)):
        return _map_items(value, counters_as_dicts)
    return value


def counters_restored(value: Any) -> Any:
    """The inverse of ``counters_as_dicts`` (a checkpoint holding real Counters passes through)."""
    if isinstance(value, dict) and len(value) == 1 and COUNTER_KEY in value:
        return Counter(value[COUNTER_KEY])
    if isinstance(value, (dict, list, tuple)) and not isinstance(value, Counter):
        return _map_items(value, counters_restored)
    return value


def load_checkpoint_file(path: str, map_location: Any = "cpu") -> Any:
    """A checkpoint this project wrote, loaded with ``weights_only=True`` (no code runs from the file)."""
    return counters_restored(torch.load(path, map_location=map_location or "cpu", weights_only=True))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed, so a crash never leaves a truncated one; every torch
    the requirements allow loads them with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any = None) -> None:
        with atomic_path(str(path)) as tmp:
            torch.save(counters_as_dicts(checkpoint), tmp)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return load_checkpoint_file(path, map_location)


class AtomicCSVLogger(CSVLogger):
    """Lightning's CSV logger, its ``metrics.csv`` replaced whole at every save. Lightning rewrites the file in
    place whenever a new column appears (the first validation's metrics, the test's), so a full disk or a kill
    during that rewrite left it short and the rows logged before were lost. Here each save works on a copy in
    the same folder (a few KiB) and renames it over the file; a full disk is a ``DiskFullError``."""

    @rank_zero_only
    def save(self) -> None:
        writer = self.experiment
        if not writer.metrics:  # nothing new: Lightning writes no row either (but still the hparams)
            return super().save()
        path, columns = writer.metrics_file_path, list(writer.metrics_keys)
        try:
            with atomic_path(path) as tmp:
                if os.path.exists(path):
                    shutil.copyfile(path, tmp)
                else:
                    os.remove(tmp)  # Lightning writes the header only into a file that does not exist yet
                writer.metrics_file_path = tmp
                super().save()
        except BaseException:
            writer.metrics_keys[:] = columns  # the file kept its old header: a later save adds the new columns
            raise
        finally:
            writer.metrics_file_path = path


class TrialSnapshot(Callback):
    """At the start of training: config/parsed.yaml, config/raw.yaml and a copy of the code. ``keep_raw``: a run
    that reuses the trial's parsed.yaml keeps the trial's raw.yaml, the config as first written, whose
    interpolations the parsed one has resolved."""

    def __init__(self, config, raw_config, config_dir: str, code_dir: str, keep_raw: bool = False):
        self.config, self.raw_config = config, raw_config
        self.config_dir, self.code_dir = config_dir, code_dir
        self.keep_raw = keep_raw

    @rank_zero_only
    def on_fit_start(self, trainer, pl_module):
        os.makedirs(self.config_dir, exist_ok=True)
        written = [("parsed.yaml", self.config)] + ([] if self.keep_raw else [("raw.yaml", self.raw_config)])
        for name, cfg in written:
            with atomic_path(os.path.join(self.config_dir, name)) as tmp:
                OmegaConf.save(cfg, tmp)
        os.makedirs(self.code_dir, exist_ok=True)
        shutil.copy2(os.path.join(PROJECT_ROOT, "launch.py"), self.code_dir)
        for folder in CODE_FOLDERS:
            src = os.path.join(PROJECT_ROOT, folder)
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(self.code_dir, folder), dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


class ProgressBar(TQDMProgressBar):
    """Lightning's bar, plus the system's ``progress_bar_values``: Python floats the system reads every few
    steps (``BaseSystem.show_on_progress_bar``), so refreshing the bar never reads the device.

    Written to a file or a pipe (a cluster job's log, ``> train.log``) rather than a terminal, it redraws about
    ``REDRAWS_INTO_A_FILE`` times per stage instead of at every step: every redraw stays in such a log (the
    3-minute demo's was 356 KB of them, a 20k-step run's megabytes). ``TQDM_MINITERS=n`` (Lightning's variable)
    sets every n-th step instead, wherever the output goes."""

    REDRAWS_INTO_A_FILE = 100

    @property
    def refresh_rate(self) -> int:
        rate = self._refresh_rate
        if rate > 0 and "TQDM_MINITERS" in os.environ:  # Lightning 2.1 ignores it; later ones apply it as here
            return max(int(os.environ["TQDM_MINITERS"]), rate)
        trainer = getattr(self, "_trainer", None)
        if rate <= 0 or trainer is None or _is_terminal(sys.stdout):
            return rate
        steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else 0
        return max(rate, steps // self.REDRAWS_INTO_A_FILE)

    @property
    def total_train_batches(self):
        """``max_steps`` for the endless ray sampler: training is one epoch, whose batch index the bar shows, and
        a continued run's goes on from the checkpoint's step. Lightning 2.1 showed no total (so no percentage and
        no time left); later ones show the steps left, which a continued run's count overshoots."""
        total = super().total_train_batches
        max_steps = self.trainer.max_steps
        if max_steps is not None and max_steps > 0 and (total == float("inf") or self.trainer.max_epochs == -1):
            return max_steps
        return total

    def init_train_tqdm(self):
        """Lightning's training bar, first drawn once the epoch names it: Lightning drew 'Training: 0/?' as it made
        the bar and again as the epoch began, so every log started with both before 'Epoch 0: 0/N'. (Lightning's
        own arguments, and a delay that skips only the draw at creation.)"""
        return Tqdm(desc=self.train_description, position=(2 * self.process_position), disable=self.is_disabled,
                    leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT,
                    delay=1e-9)

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        if _batches_done(trainer):  # continued mid-epoch: Lightning >= 2.2 calls no on_train_epoch_start
            self._continue_bar(trainer)

    def on_train_epoch_start(self, trainer, *args):
        bar = self.train_progress_bar
        if _batches_done(trainer) and bar is not None and not getattr(self, "_leave", False):
            self._continue_bar(trainer)  # Lightning 2.1 calls it when continuing, and would set the bar to 0
        elif bar is not None and bar.n == 0 and not getattr(self, "_leave", False):  # the bar on_train_start made
            total = self.total_train_batches
            bar.total = None if total == float("inf") else total
            bar.initial = 0
            bar.set_description(f"Epoch {trainer.current_epoch}")  # its first draw (Lightning's reset drew too)
        else:
            super().on_train_epoch_start(trainer, *args)

    def _continue_bar(self, trainer) -> None:
        """Name the bar and start it at the batch a continued run (--train --resume) goes on from: it read
        'Training: 11/?', with no percentage or time left (Lightning 2.1: '0/20', then 11/20 at a negative rate)."""
        bar, total = self.train_progress_bar, self.total_train_batches
        bar.total = None if total == float("inf") else total
        bar.initial = bar.n = bar.last_print_n = _batches_done(trainer)  # the rate counts this run's batches
        bar.start_t = bar.last_print_t = time.time()
        bar.set_description(f"Epoch {trainer.current_epoch}")  # draws it

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the last 4 characters of the logger's version: "logs", meaningless here
        if trainer.training:
            metrics.update({k: f"{v:.4g}" for k, v in getattr(pl_module, "progress_bar_values", {}).items()})
        return metrics

    def on_exception(self, trainer, pl_module, exception):
        """Close the bars a stopped stage leaves open (Lightning closes them only when a stage ends), so that the
        message which follows starts on a line of its own."""
        for bar in (self._train_progress_bar, self._val_progress_bar, self._test_progress_bar,
                    self._predict_progress_bar):
            if bar is not None:
                bar.close()


def _batches_done(trainer) -> int:
    """Batches of the current epoch done before this fit: a continued run's (training is one endless epoch)."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.completed)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class StopOnSignal(Callback):
    """Ctrl-C (SIGINT) or SIGTERM while training: finish the step under way, then stop training cleanly instead of
    at once (Lightning alone exits mid-step). ``received`` names the signal. This class saves nothing: it is the
    one used where no checkpoint may be written (``trainer.enable_checkpointing: false``) and outside training;
    ``SaveOnSignal`` also saves the stop checkpoint.

    On several devices (DDP) each rank's handler only notes the signal (Lightning's own handler runs a collective
    inside the handler, which deadlocks when the signal lands mid-step); every ``PROGRESS_EVERY`` steps, at the
    progress bar's read, the ranks agree whether any received one, so all stop after the same step and save
    one checkpoint together. A job scheduler signals every rank; ``kill`` of rank 0 alone stops them all too.

    Outside training (a test, validation or export), SIGTERM stops the stage after the view under way, raising
    Lightning's ``SIGTERMException`` as its own handler would; on several devices the ranks agree after every
    view, so all stop after the same one (Lightning's handler, a collective inside the handler, left the rank
    that had not yet reached it to fail with a traceback once the other had exited). Ctrl-C there, and a
    second Ctrl-C while training, are Lightning's: the stage ends at once and the process exits with status 1.
    ``interrupted`` records that it happened, so the caller can say what was left unfinished and exit with a
    shell's status for Ctrl-C (130) instead.
    """

    saves = False

    def __init__(self):
        self.received: str | None = None
        self.received_at = 0.0
        self.stopped = False  # training stopped at a step's end because of the signal
        self.saved: str | None = None
        self.interrupted = False
        self._previous: dict = {}
        self._speaks = True  # on several devices, only rank 0 says a signal was received
        self._evaluating = False  # SIGTERM is ours in a test, validation or export outside training
        self._at_once = False  # ... and stops at once, in the video and mesh export after the last view

    def on_train_start(self, trainer, pl_module):  # after Lightning has set its own SIGTERM handler, to replace it
        if threading.current_thread() is not threading.main_thread():
            return
        self._speaks = trainer.is_global_zero
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt
        self.received, self.received_at = signal.Signals(signum).name, time.time()
        if not self._speaks:
            return
        if self.saves:
            again = " (Ctrl-C again quits without one)" if signum == signal.SIGINT else ""
            say_now(f"{self.received} received: finishing the step under way, then saving a checkpoint{again}.")
        else:
            again = " (Ctrl-C again quits at once)" if signum == signal.SIGINT else ""
            say_now(f"{self.received} received: finishing the step under way, then stopping; checkpointing is off "
                    f"(trainer.enable_checkpointing: false), so nothing is saved{again}.")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.world_size > 1:
            if trainer.global_step % getattr(pl_module, "PROGRESS_EVERY", 10):
                return
            self.received = signal_on_any_rank(self.received, pl_module.device)
            if self.received and not self.received_at:  # received by another rank only
                self.received_at = time.time()
        if self.received and not trainer.should_stop:
            trainer.should_stop = self.stopped = True
            self.stop_checkpoint(trainer)
            # Lightning validates before stopping early; rendering full views can take minutes on a CPU, past the
            # grace period a job scheduler gives after SIGTERM, and the kill would then lose the exit message.
            trainer.limit_val_batches = 0

    def stop_checkpoint(self, trainer) -> None:
        """Where the stop checkpoint is saved (none here)."""

    def on_test_start(self, trainer, pl_module):
        self._take_sigterm_outside_training(trainer)

    def on_validation_start(self, trainer, pl_module):
        self._take_sigterm_outside_training(trainer)

    def _take_sigterm_outside_training(self, trainer) -> None:
        """Replace Lightning's SIGTERM handler for a stage run on its own (``--test``, ``--validate``, the test
        after training); inside ``fit``, training's handlers (from ``on_train_start``) are the ones."""
        fitting = trainer.state.fn == "fit"  # the sanity check before training, and validation inside it
        if fitting or self._previous or threading.current_thread() is not threading.main_thread():
            return
        self._speaks, self._evaluating = trainer.is_global_zero, True
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm_outside_training)

    def _on_sigterm_outside_training(self, signum, frame):
        self.received, self.received_at = "SIGTERM", time.time()
        if self._at_once:
            if self._speaks:
                say_now("SIGTERM received: stopping the export.")
            raise SIGTERMException  # the atomic writers remove what they had begun
        if self._speaks:
            say_now("SIGTERM received: stopping after the batch under way.")

    def on_test_epoch_end(self, trainer, pl_module):
        """Called before the module's own, which renders the video trajectory, writes the video and extracts the
        mesh (on a CPU, a minute or more of the demo's test): no view ends there to stop after, so on one device
        SIGTERM stops it at once. On several, rank 0 exports alone while the others end their test, and its
        export runs to the end (a stop there would leave the others in a collective)."""
        self._at_once = self._evaluating and trainer.world_size == 1
        if self._at_once and self.received == "SIGTERM":  # came after the last view's check
            raise SIGTERMException

    def on_test_batch_end(self, trainer, pl_module, *args):
        self._stop_evaluation_if_signalled(trainer, pl_module)

    def on_validation_batch_end(self, trainer, pl_module, *args):
        self._stop_evaluation_if_signalled(trainer, pl_module)

    def _stop_evaluation_if_signalled(self, trainer, pl_module) -> None:
        """After each view: every rank has as many (``datasets.base._EvalIndices``), so on several devices the
        ranks agree here whether any received SIGTERM, and all stop after the same view."""
        if not self._evaluating:
            return
        received = self.received
        if trainer.world_size > 1:
            received = signal_on_any_rank(received, pl_module.device)
        if received == "SIGTERM":
            self.received = received
            raise SIGTERMException

    def on_test_end(self, trainer, pl_module):
        self._end_evaluation()

    def on_validation_end(self, trainer, pl_module):
        self._end_evaluation()

    def _end_evaluation(self) -> None:
        if self._evaluating:
            self._evaluating = self._at_once = False
            self._restore()

    def on_train_end(self, trainer, pl_module):
        self._restore()

    def on_exception(self, trainer, pl_module, exception):
        self.interrupted = isinstance(exception, KeyboardInterrupt)
        self._evaluating = self._at_once = False
        self._restore()

    def _restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class SaveOnSignal(StopOnSignal, Checkpoint):
    """``StopOnSignal`` that also saves a checkpoint to resume from at the stop, instead of losing every step since
    the last one. ``saved`` is its path.

    The checkpoint is written at the end of the step, as ModelCheckpoint writes its own: the run resumes inside
    the same epoch, so its last checkpoint keeps instant-nsr-pl's name ``epoch=0-step=N`` (saved after ``fit``
    returns, the epoch would count as finished and the resumed run end in epoch 1). The class is a ``Checkpoint``
    only so that Lightning calls it after the ModelCheckpoint listed before it: when that one has just saved this
    step under the same name, its file is the stop checkpoint (saving again would add a copy named ``…-v1.ckpt``).
    """

    saves = True

    def __init__(self, ckpt_dir: str):
        super().__init__()
        self.ckpt_dir = ckpt_dir

    def stop_checkpoint(self, trainer) -> None:
        path = os.path.join(self.ckpt_dir, f"epoch={trainer.current_epoch}-step={trainer.global_step}.ckpt")
        if not (os.path.isfile(path) and os.path.getmtime(path) >= self.received_at):
            trainer.save_checkpoint(path, weights_only=False)
        self.saved = path


SIGNAL_CODES = (None, "SIGINT", "SIGTERM")


def signal_on_any_rank(received: str | None, device) -> str | None:
    """The signal some rank of a run on several devices received (SIGTERM before SIGINT; None: none did), agreed
    by every rank: a collective every rank calls after the same step."""
    import torch

    from utils.distributed import largest_across_devices

    return SIGNAL_CODES[int(largest_across_devices(torch.tensor(SIGNAL_CODES.index(received), device=device)))]


def say_now(message: str) -> None:
    """Print a line of the "nsr" log from a signal handler, at once (a step can take seconds). Written straight to
    the file descriptor: a handler that wrote through sys.stdout while the interrupted code was in the middle of
    writing to it would raise "reentrant call" (a Python stream is not reentrant)."""
    try:
        os.write(sys.stdout.fileno(), f"\n[nsr] {message}\n".encode())
    except (AttributeError, OSError, ValueError):  # no file descriptor (a notebook, captured output): stay quiet
        pass
