"""COLMAP's long steps (pycolmap's feature extraction, matching and incremental mapping) behind progress bars,
and stoppable: each was one call that said nothing for as long as it took (300 photos are 44850 pairs to match
exhaustively, about 0.4 s each at 1600 pixels on 2 cores: hours) and that a Ctrl-C or a scheduler's SIGTERM could
not stop cleanly.

``run_cancellable`` runs a step in a worker thread (pycolmap releases the GIL) with a cancellation token. The
main thread reads the step's progress from the database every half second for the bar; at Ctrl-C or SIGTERM
(raised in the main thread) it cancels the token, waits for COLMAP to stop, and lets the stop go on, so the
script removes its work folder and says so. The calls are COLMAP's own, with their options: the results are
those of one call, as before.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from contextlib import closing, contextmanager
from typing import Callable, Optional

POLL_S = 0.5  # how often the bar reads the database, and how soon a stop is seen


def run_cancellable(step: Callable, progress: Optional[Callable[[], int]] = None, bar=None):
    """``step(token)`` (a pycolmap call given ``cancellation_token=token``) in a worker thread; returns its result
    or raises its error. Every ``POLL_S`` the tqdm ``bar`` is set to ``progress()``. An exception in the main
    thread while waiting (KeyboardInterrupt, utils.stops.Terminated) cancels the token and is raised once the
    step has returned."""
    from datasets.colmap_model import import_pycolmap

    token = import_pycolmap().CancellationToken()  # the import keeps the process's SIGTERM handler
    outcome = {}
    threads_before = native_threads()
    go, abandoned = threading.Event(), threading.Event()  # the step starts once the main thread waits for it
    finished = threading.Event()  # not Thread.join: interrupted by a signal, Python 3.11's marks the thread ended

    def work():
        go.wait()
        try:
            if not abandoned.is_set():
                outcome["result"] = step(token)
        except BaseException as err:  # said in the main thread
            outcome["error"] = err
        finally:
            finished.set()

    worker = threading.Thread(target=work, name="colmap", daemon=True)
    try:
        worker.start()
        go.set()
        while not finished.wait(POLL_S):  # a signal's handler runs here, in the main thread
            show_progress(progress, bar)
        show_progress(progress, bar)
    except BaseException:
        token.cancel()
        if not go.is_set():  # stopped before the step began: it never will
            abandoned.set()
            go.set()
            raise
        finished.wait()
        # COLMAP's own threads end a moment after the call returns, releasing Python objects (the callbacks): an
        # interpreter that finishes first aborts them (status 134, a stack dump)
        wait_for_native_threads(threads_before)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")


def show_progress(progress: Optional[Callable[[], int]], bar) -> None:
    """Move the tqdm ``bar`` up to ``progress()`` (never back, never past its total)."""
    if progress is not None and bar is not None:
        done = progress()
        if done > bar.n:
            bar.update(min(done, bar.total or done) - bar.n)


def native_threads() -> Optional[int]:
    """How many threads the process has, Python's and native ones (Linux's /proc); None where it cannot tell."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def wait_for_native_threads(count: Optional[int], timeout: float = 5.0) -> None:
    """Wait until the process is back to ``count`` threads (at most ``timeout`` seconds; 1 s where the count is
    unknown)."""
    deadline = time.monotonic() + timeout
    if count is None or native_threads() is None:
        time.sleep(1.0)
        return
    while native_threads() > count and time.monotonic() < deadline:
        time.sleep(0.05)


def rows_in(db: str, table: str) -> Callable[[], int]:
    """A progress reader: how many rows ``table`` of the COLMAP database ``db`` holds (0 while it cannot be
    read: not created yet, or locked by COLMAP's write under way)."""
    def count() -> int:
        if not os.path.isfile(db):
            return 0
        try:
            with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.05)) as connection:
                return int(connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
        except sqlite3.Error:
            return 0
    return count


def sequential_pairs(db: str, overlap: int) -> int:
    """How many pairs COLMAP's sequential matcher (``overlap`` neighbours, quadratic) matches: the bar's total."""
    from datasets.colmap_model import import_pycolmap

    pycolmap = import_pycolmap()
    options = pycolmap.SequentialPairingOptions()
    options.overlap = overlap
    options.quadratic_overlap = True
    with pycolmap.Database.open(db) as database:
        return len(pycolmap.SequentialPairGenerator(options, database).all_pairs())


def listable(name: str) -> bool:
    """Whether a line of COLMAP's pair lists (``match_image_pairs``) can hold this image name: it splits at spaces
    and trims what it reads."""
    return len(name.split()) == 1 and name == name.strip()


@contextmanager
def listed_names(db: str):
    """A name for each image of the database ``db`` that a pair list can hold: as it is, or, for a name with a
    space (a copy a Mac made, "IMG_0001 2.jpg"), an alias the database holds until the block ends, when the
    images get their own names back."""
    from datasets.colmap_model import import_pycolmap

    pycolmap = import_pycolmap()

    def rename(renamed: dict) -> None:
        with pycolmap.Database.open(db) as database:
            for image in database.read_all_images():
                if image.name in renamed:
                    image.name = renamed[image.name]
                    database.update_image(image)

    with pycolmap.Database.open(db) as database:
        ids = {image.name: image.image_id for image in database.read_all_images()}
    aliases = {}
    for name, image_id in ids.items():
        if not listable(name):
            alias = f"image-{image_id}"
            while alias in ids or alias in aliases.values():
                alias += "_"
            aliases[name] = alias
    rename(aliases)
    try:
        yield {name: aliases.get(name, name) for name in ids}
    finally:
        rename({alias: name for name, alias in aliases.items()})


def match_listed_pairs(db: str, pairs, list_path: str, match_options: dict, progress=None, bar=None) -> None:
    """COLMAP's matching and geometric verification of the image ``pairs`` ((name, name), ...), listed in the
    file ``list_path``, stoppable and behind ``bar`` as ``run_cancellable``; any image name will do."""
    from datasets.colmap_model import import_pycolmap

    pycolmap = import_pycolmap()
    with listed_names(db) as listed:
        with open(list_path, "w") as f:
            f.writelines(f"{listed[a]} {listed[b]}\n" for a, b in pairs)
        imported = pycolmap.ImportedPairingOptions()
        imported.match_list_path = list_path
        run_cancellable(lambda token: pycolmap.match_image_pairs(db, pairing_options=imported,
                                                                 cancellation_token=token, **match_options),
                        progress, bar)
