"""COLMAP's long steps (pycolmap's feature extraction, matching and incremental mapping) behind progress bars,
and stoppable: each was one call that said nothing for as long as it took (300 photos are 44850 pairs to match
exhaustively, about 0.4 s each at 1600 pixels on 2 cores: hours) and that a Ctrl-C or a scheduler's SIGTERM could
not stop cleanly.

``run_cancellable`` runs a step in a worker thread (pycolmap releases the GIL) with a cancellation token; at
Ctrl-C or SIGTERM (raised in the main thread) it cancels the token, waits for COLMAP to stop, and lets the stop go
on, so the script removes its work folder and says so. Extraction and matching are split into about
``STEP_CALLS`` COLMAP calls, on batches of images or of pairs, and the bar moves between calls.

Nothing reads the database while COLMAP writes it. The bars used to count its rows every half second through
Python's sqlite3, a second SQLite library in the process: POSIX locks belong to the process, so a file one library
closes drops the locks the other holds (SQLite's "How To Corrupt An SQLite Database File", 2.2.1). COLMAP then lost
an image's features or a pair's matches without a word (an image of the test capture went unregistered in 1 run of
4), or stopped on "database is locked", or crashed (SIGBUS in its WAL index) when read more often. pycolmap's own
``Database`` is no way round it: it opens for writing, and COLMAP's writer stops on the lock it takes.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Tuple

POLL_S = 0.5  # how soon a stop is seen while COLMAP runs
STEP_CALLS = 20  # extraction and matching are split into about this many COLMAP calls: the bar moves between them
# but no call gets fewer images or pairs than these, so that a call's own cost (opening the database, starting the
# extractor or matcher, reading the features to match) stays small beside its work
MIN_IMAGES_PER_CALL = 8
MIN_PAIRS_PER_CALL = 64


def run_cancellable(step: Callable):
    """``step(token)`` (a pycolmap call given ``cancellation_token=token``) in a worker thread; returns its result
    or raises its error. An exception in the main thread while waiting (KeyboardInterrupt, utils.stops.Terminated)
    cancels the token and is raised once the step has returned."""
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
            pass
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


def batches(items: list, least: int = 1, total: Optional[int] = None) -> list:
    """``items`` in consecutive batches of at least ``least`` each: about ``STEP_CALLS`` of them for ``total``
    items (default: ``len(items)``; a camera's share of all the images gets its share of the calls)."""
    size = max(least, -(-(len(items) if total is None else total) // STEP_CALLS))
    return [items[k:k + size] for k in range(0, len(items), size)]


def folder_of(name: str) -> str:
    """The folder of an image name as COLMAP writes it ('left/a.jpg' -> 'left'; 'a.jpg' -> '')."""
    return name.rpartition("/")[0]


def by_folder(names: List[str]) -> Dict[str, List[str]]:
    """``names`` grouped by their folder, in order of first appearance: one camera each in COLMAP's per-folder mode
    (``single_camera_per_folder``)."""
    groups: Dict[str, List[str]] = {}
    for name in names:
        groups.setdefault(folder_of(name), []).append(name)
    return groups


def extract_features(db: str, image_dir: str, names: List[str], camera_mode, camera_model: str, extraction,
                     bar) -> None:
    """SIFT features of the images ``names`` (of ``image_dir``) into the database ``db``: one COLMAP call per
    batch of images, ``bar`` moved after each. ``camera_mode`` is pycolmap's: SINGLE (one camera for all),
    PER_FOLDER (one per folder of ``names``, a rig's cameras) or PER_IMAGE. A camera's images after its first batch
    are given the camera that batch made, so the result is one call's: the same features, one camera each."""
    from datasets.colmap_model import import_pycolmap

    pycolmap = import_pycolmap()
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = camera_model
    modes = pycolmap.CameraMode
    groups = by_folder(names).values() if camera_mode == modes.PER_FOLDER else [names]
    call_mode = modes.PER_IMAGE if camera_mode == modes.PER_IMAGE else modes.SINGLE  # per group
    for group in groups:
        reader.existing_camera_id = -1
        for batch in batches(group, least=MIN_IMAGES_PER_CALL, total=len(names)):
            run_cancellable(lambda token: pycolmap.extract_features(
                db, image_dir, image_names=batch, camera_mode=call_mode, reader_options=reader,
                extraction_options=extraction, device=pycolmap.Device.auto, cancellation_token=token))
            if call_mode == modes.SINGLE and reader.existing_camera_id < 0:
                with pycolmap.Database.open(db) as database:
                    made = {image.name: image.camera_id for image in database.read_all_images()}
                reader.existing_camera_id = made[batch[0]]
            bar.update(len(batch))


def sequential_pairs(db: str, overlap: int) -> List[Tuple[str, str]]:
    """The image pairs, by name, that COLMAP's sequential matcher matches (``overlap`` neighbours, quadratic)."""
    from datasets.colmap_model import import_pycolmap

    pycolmap = import_pycolmap()
    options = pycolmap.SequentialPairingOptions()
    options.overlap = overlap
    options.quadratic_overlap = True
    with pycolmap.Database.open(db) as database:
        names = {image.image_id: image.name for image in database.read_all_images()}
        return [(names[a], names[b]) for a, b in pycolmap.SequentialPairGenerator(options, database).all_pairs()]


def every_pair(names: List[str]) -> List[Tuple[str, str]]:
    """Each pair of ``names`` once, in order: what exhaustive matching compares."""
    return [(a, b) for k, a in enumerate(names) for b in names[k + 1:]]


def distinct_pairs(pairs) -> List[Tuple[str, str]]:
    """``pairs`` in their order, each unordered pair once (a loop-closing pair may also be a neighbour)."""
    seen, kept = set(), []
    for a, b in pairs:
        if a != b and frozenset((a, b)) not in seen:
            seen.add(frozenset((a, b)))
            kept.append((a, b))
    return kept


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


def match_pairs(db: str, pairs, work: str, match_options: dict, bar) -> None:
    """COLMAP's matching and geometric verification of the image ``pairs`` ((name, name), ...) of the database
    ``db``: one COLMAP call per batch of pairs, listed in a file in ``work``, ``bar`` moved after each. Any image
    name will do (``listed_names``)."""
    from datasets.colmap_model import import_pycolmap

    pycolmap = import_pycolmap()
    with listed_names(db) as listed:
        for k, batch in enumerate(batches(list(pairs), least=MIN_PAIRS_PER_CALL)):
            imported = pycolmap.ImportedPairingOptions()
            imported.match_list_path = os.path.join(work, f"pairs-{k}.txt")
            with open(imported.match_list_path, "w") as f:
                f.writelines(f"{listed[a]} {listed[b]}\n" for a, b in batch)
            run_cancellable(lambda token: pycolmap.match_image_pairs(db, pairing_options=imported,
                                                                     cancellation_token=token, **match_options))
            bar.update(len(batch))
