"""Writers for what the project produces: atomically, in formats ordinary tools open.

Every file is first written next to its destination and then renamed over
it, so an interrupted run never leaves a truncated checkpoint, mesh, image or
video where a good one was.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import sys
import tempfile
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import imageio.v2 as imageio
import numpy as np

log = logging.getLogger("nsr")


class DiskFullError(OSError):
    """A write stopped because its disk (or the user's quota) is full; the message names the folder."""


NEARLY_FULL_BYTES = 1 << 20


def disk_full_error(err: BaseException, path: str, atomic: bool = True) -> DiskFullError | None:
    """The DiskFullError to raise for ``err``, a failed write of ``path``, when a full disk caused it; else None.

    The cause is an ENOSPC/EDQUOT OSError, or a failure without an errno while the disk has under 1 MiB free:
    torch's zip writer words a full disk as "unexpected pos 8320 vs 8216", and ffmpeg only prints it.
    ``atomic``: the write was to a temporary file (``atomic_path``), so the message can say that nothing written
    before was touched."""
    if isinstance(err, DiskFullError):
        return err
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    code = getattr(err, "errno", None)  # an errno says the cause; only errors without one are judged by the space
    if (code is not None and code not in (errno.ENOSPC, errno.EDQUOT)) or (
            code is None and (free is None or free >= NEARLY_FULL_BYTES)):
        return None
    left = f" ({free / 2 ** 20:.1f} MiB free)" if free is not None else ""
    untouched = ", and no file written before was touched" if atomic else ""
    return DiskFullError(errno.ENOSPC, f"The disk holding {folder} is full{left}: {os.path.basename(path)} could not "
                                       f"be written{untouched}")


def raise_if_disk_full(err: Exception, path: str) -> None:
    """Raise the DiskFullError ``err`` amounts to (see ``disk_full_error``), if it does."""
    full = disk_full_error(err, path)
    if full is not None and full is not err:
        raise full from err


def umask() -> int:
    """The process's file-mode creation mask: read from /proc where Linux has it (setting it to read it back
    opens a moment in which other threads, TensorBoard's writer, create files with another mask)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_usual_mode(tmp: str) -> None:
    """Give a temporary file or folder the mode a plain ``open`` or ``mkdir`` would have: ``mkstemp`` and ``mkdtemp``
    make them owner-only (0600, 0700), which the rename would carry to every checkpoint, mesh and image, so that
    others who share the machine or the results (a cluster's group, a web server) could not open them."""
    os.chmod(tmp, (0o777 if os.path.isdir(tmp) else 0o666) & ~umask())


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path in the destination folder; rename it to ``path`` on success. A write that fails
    for want of disk space is a DiskFullError (see ``disk_full_error``)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        give_usual_mode(tmp)
        os.replace(tmp, path)
    except Exception as err:
        raise_if_disk_full(err, path)  # asked while the partial file still fills the disk
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_folder(path: str, prefix: str = ".tmp-") -> Iterator[str]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole, on failure it vanishes.

    For outputs made of many files (a rendered scene, extracted frames, a NeuS-format scene): a failed or
    interrupted run never leaves a half-filled folder, and the old one stays until the new one is complete.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        give_usual_mode(tmp)
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except Exception as err:
        raise_if_disk_full(err, path)
        raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)


@contextlib.contextmanager
def folder_lock(folder: str, waiting_message: str = "") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (created if missing) for the block: runs started together (a sweep)
    take turns at making what they share, instead of each making it and replacing the others'. An advisory
    ``flock`` on the folder itself, so no lock file is left; where the system or the file system has none
    (Windows, some network mounts) the block runs unlocked. ``waiting_message`` is logged when another process
    holds the lock."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY) if fcntl else None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting_message:
                    log.info(waiting_message)
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # ENOLCK, EOPNOTSUPP: no locks here
                pass
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


# Files an operating system's file browser leaves in any folder it shows: never the user's work
OS_LITTER = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


def files_not_written_by(folder: str, ours: Callable[[str], bool]) -> list[str]:
    """The files under ``folder`` (paths relative to it, '/'-separated, sorted) that ``ours`` does not claim.

    Ask this before ``atomic_folder`` replaces ``folder`` whole: a tool replaces only what it wrote itself, and
    refuses (naming the first of these) a folder the user pointed it at by mistake. A missing folder gives [],
    a file in its place [its name]. ``OS_LITTER`` counts as ours."""
    if not os.path.isdir(folder):
        return [os.path.basename(folder)] if os.path.exists(folder) else []
    found = []
    for parent, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            relative = os.path.relpath(os.path.join(parent, name), folder).replace(os.sep, "/")
            if name not in OS_LITTER and not ours(relative):
                found.append(relative)
    return found


def first_few(names: Sequence[str], count: int = 2) -> str:
    """'a, b, ...' for a message: the first ``count`` of ``names``, then whether more follow."""
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


STALE_TEMPORARY_SECONDS = 3600


def remove_stale_temporaries(folder: str, older_than: float = STALE_TEMPORARY_SECONDS) -> tuple[int, int]:
    """Remove the ``.tmp-*`` files and folders under ``folder`` that nothing has written for ``older_than``
    seconds (a folder counts as written when any file in it is): what ``atomic_path`` / ``atomic_folder`` leave
    when a run is killed mid-write (SIGKILL, the out-of-memory killer, a power cut), where no ``finally`` runs.
    A write in progress keeps its file's time recent, so a run still writing into the same trial is left alone.
    Returns (entries removed, bytes freed)."""
    import time

    removed, freed = 0, 0
    now = time.time()
    for parent, dirs, files in os.walk(folder):
        for name in [d for d in dirs if d.startswith(".tmp-")] + [f for f in files if f.startswith(".tmp-")]:
            path = os.path.join(parent, name)
            try:
                inside = [os.path.join(p, f) for p, _, fs in os.walk(path) for f in fs]  # [] for a file
                if now - max(os.path.getmtime(f) for f in [path, *inside]) < older_than:
                    continue
                size = sum(os.path.getsize(f) for f in inside or [path])
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
            except OSError:  # gone meanwhile, or not ours to remove: nothing to do
                continue
            removed, freed = removed + 1, freed + size
        dirs[:] = [d for d in dirs if not d.startswith(".tmp-")]
    return removed, freed


def access_problem(err: BaseException) -> str | None:
    """"<path>: <reason>" for an OSError from a path this user may not read or write (read-only file system,
    another user's folder), naming the folder when the path is a temporary name (.tmp-*); else None."""
    if getattr(err, "errno", None) not in (errno.EACCES, errno.EPERM, errno.EROFS) or not err.filename:
        return None
    path = str(err.filename)
    return f"{os.path.dirname(path) if os.path.basename(path).startswith('.') else path}: {err.strerror}"


def script_status_for_os_error(err: Exception, path: str, program: str) -> int | None:
    """For a script's main: when ``err`` comes of a full disk where ``path`` is written, or of a folder it may not
    write, print that in one sentence and return the exit status (1, or 2); None for any other error, which the
    script raises on."""
    full = disk_full_error(err, path)
    if full is not None:
        print(f"{program}: {full.strerror}; free some space and run it again.", file=sys.stderr)
        return 1
    problem = access_problem(err)
    if problem is not None:
        print(f"{program}: {problem}; give a folder this user can write to.", file=sys.stderr)
        return 2
    return None


def write_json(path: str, data) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2)


def write_image(path: str, image: np.ndarray) -> None:
    """Write an (H, W, 3) or (H, W) uint8 image (PNG/JPG by extension)."""
    encoded = imageio.imwrite("<bytes>", image, format=os.path.splitext(path)[1][1:] or "png")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # imageio's own file, failing to close on a full disk,
        f.write(encoded)                                 # raised again from its finaliser, after the report


PROGRESS_DELAY_S = 2.0  # work that may be long shows a bar once it has taken this long (300 photos read: ~1 min)


def late_bar(iterable=None, **options):
    """A tqdm bar (over ``iterable``, or ``total=`` to update by hand) that appears only once the work has taken
    PROGRESS_DELAY_S, and is erased when it ends: quick work says nothing."""
    from tqdm import tqdm

    return tqdm(iterable, leave=False, delay=PROGRESS_DELAY_S, **options)


def to_uint8(img: np.ndarray, data_range=(0.0, 1.0)) -> np.ndarray:
    lo, hi = data_range
    img = (np.nan_to_num(img.astype(np.float32)) - lo) / max(hi - lo, 1e-12)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def colorize_depth(depth: np.ndarray, mask: np.ndarray | None = None, clip_percent: float = 1.0) -> np.ndarray:
    """(H, W) depth -> (H, W, 3) uint8 jet colour map over the depth range of ``mask`` (or all), from its
    ``clip_percent``-th to its (100 - ``clip_percent``)-th percentile, so that a few stray pixels (a floater, a
    silhouette's edge) do not squeeze the rest into one colour; white outside ``mask``."""
    valid = depth[mask > 0.5] if mask is not None and (mask > 0.5).any() else depth.reshape(-1)
    lo, hi = (float(v) for v in np.percentile(valid, [clip_percent, 100 - clip_percent])) if valid.size else (0.0, 1.0)
    gray = to_uint8(depth, (lo, hi if hi > lo else lo + 1.0))
    rgb = cv2.applyColorMap(gray, cv2.COLORMAP_JET)[..., ::-1]
    if mask is not None:
        rgb = np.where(mask[..., None] > 0.5, rgb, 255).astype(np.uint8)
    return rgb


def image_grid(panels: Sequence[np.ndarray]) -> np.ndarray:
    """Side-by-side concatenation of (H, W, 3) or (H, W) uint8 panels."""
    rgb = [p if p.ndim == 3 else np.repeat(p[..., None], 3, axis=-1) for p in panels]
    return np.concatenate(rgb, axis=1)


def pad_to_macro_block(frame: np.ndarray, block: int = 16) -> np.ndarray:
    """Pad (H, W, 3) with edge pixels so H and W are multiples of ``block`` (what H.264 players expect)."""
    h, w = frame.shape[:2]
    ph, pw = (-h) % block, (-w) % block
    if ph == 0 and pw == 0:
        return frame
    return np.pad(frame, ((0, ph), (0, pw), (0, 0)), mode="edge")


VIDEO_MAX_WIDTH = 4096  # H.264 level 5.1, where many hardware decoders and browsers stop


def video_frame_size(width: int, height: int, max_width: int = VIDEO_MAX_WIDTH) -> tuple:
    """(width, height) a ``width`` x ``height`` frame is encoded at: when it is wider than ``max_width`` (a NeuS
    test grid of five 1600-pixel DTU panels is 8000 wide), scaled down, aspect kept, to the widest multiple of 16
    (the macro block) not over it; 0 keeps every size."""
    if max_width <= 0 or width <= max_width:
        return width, height
    scaled = max(16, max_width - max_width % 16)
    return scaled, max(1, int(round(height * scaled / width)))


def write_video(path: str, frames: Iterable[np.ndarray], fps: int = 30, max_width: int = VIDEO_MAX_WIDTH) -> int:
    """H.264/yuv420p MP4 from (H, W, 3) uint8 frames, sizes padded to the 16-pixel macro block, frames wider than
    ``max_width`` scaled down to it (``video_frame_size``). ``frames`` may be a generator: each frame is encoded
    as it comes, so a long trajectory is never all in memory. Returns the count.

    ffmpeg's exit status is not reported by imageio (a full disk left a truncated MP4 that looked written), so
    the file's frames are counted before it takes ``path``'s place."""
    import imageio_ffmpeg

    count = 0
    with atomic_path(path) as tmp:
        writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                    pixelformat="yuv420p", macro_block_size=1, quality=8,
                                    ffmpeg_log_level="error")
        try:
            for frame in frames:
                size = video_frame_size(frame.shape[1], frame.shape[0], max_width)
                if size != (frame.shape[1], frame.shape[0]):
                    frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
                writer.append_data(pad_to_macro_block(frame))
                count += 1
        finally:
            writer.close()
        if count == 0:
            raise ValueError(f"No frames to write to {path}.")
        try:
            readable = imageio_ffmpeg.count_frames_and_secs(tmp)[0]
        except RuntimeError:
            readable = 0
        if readable != count:
            raise OSError(f"ffmpeg did not finish {path}: {readable} of its {count} frames can be read back.")
    return count
