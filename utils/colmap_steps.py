"""COLMAP's feature extraction and matching (pycolmap) in parts sized to take about a second each, so that a
progress bar with the time left follows them: one call each said nothing for as long as they took (300 phone
photos: 44850 pairs to match exhaustively, about 0.4 s each on 2 cores at 1600 pixels).

The pairs matched are COLMAP's own (its exhaustive and sequential pair generators, read before matching), and
each part is matched by ``match_image_pairs`` with the same options, so the matches are those of one call.
COLMAP's pair lists name images by name, split at spaces: a folder with such names is matched in one call, as
before, without a progress bar.

A stop (Ctrl-C, a scheduler's SIGTERM) is taken between two parts, a second or so after it came, so the script
removes its work folder and says so; only inside the incremental mapping, one call of minutes,
``sigterm_ends_at_once`` lets SIGTERM end the process at once (the next run removes the folder it left).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable, List, Sequence, Tuple

SECONDS_PER_PART = 1.0  # what a part of the work aims to take: the bar moves about this often


def in_timed_parts(items: Sequence, work: Callable[[Sequence], None], bar, first: int = 4, most: int = 4096) -> None:
    """Run ``work`` on consecutive parts of ``items``, each sized from the last one's rate to take about
    ``SECONDS_PER_PART`` (at most 4 times the last size, so one slow item does not start a huge part), and advance
    the tqdm ``bar`` by each part's length."""
    done, size = 0, first
    while done < len(items):
        part = items[done:done + size]
        start = time.monotonic()
        work(part)
        elapsed = time.monotonic() - start
        done += len(part)
        bar.update(len(part))
        size = int(min(max(size * SECONDS_PER_PART / max(elapsed, 1e-3), 1), 4 * size, most))


def extract_features(db: str, image_dir: str, names: List[str], shared_camera: bool, reader, extraction) -> None:
    """SIFT features of ``names`` into the database ``db``, with a progress bar. One camera for all images when
    ``shared_camera``: the one the first part made, given to the next parts as their existing camera."""
    import pycolmap
    from tqdm import tqdm

    mode = pycolmap.CameraMode.SINGLE if shared_camera else pycolmap.CameraMode.PER_IMAGE

    def extract(part):
        pycolmap.extract_features(db, image_dir, image_names=list(part), camera_mode=mode, reader_options=reader,
                                  extraction_options=extraction, device=pycolmap.Device.auto)
        if shared_camera and reader.existing_camera_id < 0:
            with pycolmap.Database.open(db) as database:
                reader.existing_camera_id = database.read_all_cameras()[0].camera_id

    with tqdm(total=len(names), desc="[1/3] SIFT features", unit="img") as bar:
        in_timed_parts(names, extract, bar, first=2)


def colmap_pairs(db: str, sequential_overlap: int | None) -> List[Tuple[str, str]]:
    """The image pairs (by name) COLMAP's sequential matcher (``sequential_overlap`` neighbours, quadratic) or,
    with None, its exhaustive matcher would match, in its order."""
    import pycolmap

    with pycolmap.Database.open(db) as database:
        name_of = {image.image_id: image.name for image in database.read_all_images()}
        if sequential_overlap is None:
            generator = pycolmap.ExhaustivePairGenerator(pycolmap.ExhaustivePairingOptions(), database)
        else:
            options = pycolmap.SequentialPairingOptions()
            options.overlap = sequential_overlap
            options.quadratic_overlap = True
            generator = pycolmap.SequentialPairGenerator(options, database)
        return [(name_of[a], name_of[b]) for a, b in generator.all_pairs()]


def match_pairs(db: str, pairs: List[Tuple[str, str]], work_dir: str, desc: str, **match_options) -> None:
    """Match and verify ``pairs`` of image names, with a progress bar; ``match_options`` are
    ``pycolmap.match_image_pairs``'s (matching, verification, device)."""
    import pycolmap
    from tqdm import tqdm

    pair_file = os.path.join(work_dir, "pairs.txt")
    pairing = pycolmap.ImportedPairingOptions()
    pairing.match_list_path = pair_file

    def match(part):
        with open(pair_file, "w") as f:
            f.writelines(f"{a} {b}\n" for a, b in part)
        pycolmap.match_image_pairs(db, pairing_options=pairing, **match_options)

    with tqdm(total=len(pairs), desc=desc, unit="pair") as bar:
        in_timed_parts(pairs, match, bar, first=8)
    os.remove(pair_file)


def listable(names: List[str]) -> bool:
    """Whether COLMAP's pair lists can name these images (no whitespace in a name)."""
    return not any(len(name.split()) != 1 for name in names)


@contextmanager
def sigterm_ends_at_once():
    """SIGTERM's default action (the process ends at once) inside one long COLMAP call, where a Python handler
    would wait for the call to return, minutes on; the handler before is put back after it."""
    if threading.current_thread() is not threading.main_thread():  # signal.signal refuses other threads
        yield
        return
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
