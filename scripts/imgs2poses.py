"""Photos or a video of an object -> COLMAP camera poses, with pycolmap (no COLMAP binary needed).

    python scripts/imgs2poses.py load/mug                           # load/mug/images/* -> load/mug/sparse/0
    python scripts/imgs2poses.py load/mug --video mug.mp4 --fps 3   # frames into load/mug/images/ first
    python scripts/imgs2poses.py load/mug --video low.mp4 --video high.mp4  # into images/low/ and images/high/

Video: the sharpest frame of every window of 1/fps seconds is kept (variance
of the Laplacian), then frames much blurrier than the others and
near-duplicates (the camera stood still) are dropped. Structure from motion:
SIFT features, matching (``--matcher auto``: sequential for video frames,
with loop-closing pairs found by image similarity, exhaustive for a photo
folder: its pairs grow with the square of the photo count, so photos taken
in order are quicker with ``--matcher sequential``), incremental mapping,
each behind a progress bar. Cameras (``--camera-mode auto``): one shared by all
the photos at the top of ``images/`` (one phone), or one per folder where ``images/``
holds only folders of photos (a rig's cameras, or two devices: ``images/left/``,
``images/right/``; COLMAP's ``single_camera_per_folder``; several ``--video``, a
folder each); ``per-image`` for photos from many devices. The largest model is written to
``<root>/sparse/0`` (binary), plus ``<root>/database.db`` and
``<root>/sparse_points.ply`` (crop it in MeshLab and save the selection as
``<root>/sparse_points_interest.ply`` to fix the region of interest for
gen_cameras.py). Existing frames and poses are reused unless ``--overwrite``
(poses only while ``images/`` holds the images they were computed from);
nothing is left half-written when a step fails. ``--video`` refuses an
``images/`` folder holding anything but frames it extracted (your photos).
"""
from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.colmap_model import capture_of_photos  # noqa: E402
from datasets.images import IMAGE_EXTENSIONS  # noqa: E402
from utils import colmap_steps  # noqa: E402
from utils.config import argument_at_least, script_parser  # noqa: E402
from utils.io import files_not_written_by, first_few, script_status_for_os_error  # noqa: E402
from utils.stops import REPOSITORY, launch_command, stops_cleanly, typed_path  # noqa: E402

MANY_PHOTOS = 150  # more, and --matcher auto's exhaustive matching is worth a word on the sequential one
SEED = 0  # COLMAP's random seed (RANSAC in matching and mapping): the same images give the same poses
FRAME_PATTERN = "frame_{:05d}.jpg"  # the frames taken from a video; --video replaces only a folder of these
FRAME_NAME = re.compile(r"(?:[^/]+/)?frame_\d{5,}\.jpg")  # in images/, or in a folder of it (one per video)
FRAMES_SOURCE = "frames.json"  # in the scene folder: the video and options the frames in images/ came from
VIDEO_EXTENSIONS = {".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm", ".mts"}  # to name a folder's videos, lower case


class CaptureError(RuntimeError):
    """Bad input or a failed reconstruction, said in one sentence."""


def list_images(folder: str) -> list[str]:
    """The photos in ``folder``: PNG and JPEG files, but not hidden ones (macOS writes ``._IMG_0001.jpg`` beside
    each photo copied to a FAT or exFAT drive, holding no image)."""
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder)
                  if os.path.splitext(f)[1] in IMAGE_EXTENSIONS and not f.startswith("."))


def camera_folders(folder: str) -> dict[str, list[str]]:
    """The folders of ``folder`` (one level, not hidden ones) that hold photos: {folder name: its photos' names as
    COLMAP gives them, 'left/a.jpg'}. A rig's cameras, or two devices, one folder each."""
    if not os.path.isdir(folder):
        return {}
    found = {}
    for sub in sorted(os.listdir(folder)):
        photos = list_images(os.path.join(folder, sub)) if not sub.startswith(".") else []
        if photos:
            found[sub] = [f"{sub}/{name}" for name in photos]
    return found


def holds_images(folder: str) -> bool:
    """Whether ``folder`` holds a photo, at its top or in one of its folders."""
    return bool(list_images(folder) or camera_folders(folder))


# ---------------------------------------------------------------------------------------------------- video
def sharpness(gray: np.ndarray) -> float:
    """Variance of the Laplacian: high for sharp frames, low for motion-blurred ones."""
    import cv2

    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def thumbnail(image: np.ndarray, size=(32, 24)) -> np.ndarray:
    """(size[1] * size[0],) zero-mean, unit-norm grey thumbnail, for comparing frames."""
    import cv2

    gray = cv2.cvtColor(image[..., :3], cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    t = cv2.resize(gray, size, interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
    t -= t.mean()
    return t / max(np.linalg.norm(t), 1e-9)


def select_frames(frames, video_fps: float, fps: float, max_size: int, blur_ratio: float = 0.35,
                  duplicate_similarity: float = 0.995, total_frames: int | None = None):
    """Pick frames from an iterator of (H, W, 3) uint8 frames.

    Returns (kept frames, stats dict). One frame per window of
    ``video_fps / fps`` frames: the sharpest. Then frames below
    ``blur_ratio`` times the median sharpness are dropped, and a frame whose
    thumbnail correlates above ``duplicate_similarity`` with the last kept one.
    """
    import cv2
    from tqdm import tqdm

    window = max(1, int(round(video_fps / fps))) if fps > 0 else 1
    picked, best, best_score, n_read = [], None, -1.0, 0
    for i, frame in enumerate(tqdm(frames, desc="reading video", unit="frame", total=total_frames)):
        n_read += 1
        frame = np.ascontiguousarray(frame[..., :3])
        h, w = frame.shape[:2]
        if max(h, w) > max_size:
            s = max_size / max(h, w)
            frame = cv2.resize(frame, (int(round(w * s)), int(round(h * s))), interpolation=cv2.INTER_AREA)
        score = sharpness(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY))
        if score > best_score:
            best, best_score = frame, score
        if (i + 1) % window == 0:
            picked.append((best, best_score))
            best, best_score = None, -1.0
    if best is not None:
        picked.append((best, best_score))
    if n_read == 0:
        raise CaptureError("The video has no frames that could be decoded.")
    median = float(np.median([s for _, s in picked]))
    sharp = [f for f, s in picked if s >= blur_ratio * median]
    kept, last = [], None
    for f in sharp:
        t = thumbnail(f)
        if last is not None and float(t @ last) > duplicate_similarity:
            continue
        kept.append(f)
        last = t
    stats = {"read": n_read, "windows": len(picked), "blurred": len(picked) - len(sharp),
             "duplicates": len(sharp) - len(kept), "kept": len(kept)}
    return kept, stats


def read_video(video: str, fps: float, max_size: int) -> tuple[list, dict]:
    """The selected frames of ``video`` (in memory) and select_frames' stats, with the video's frame rate."""
    import imageio.v2 as imageio

    try:
        quiet = logging.getLogger("imageio_ffmpeg")  # its warning on a rotated video, said below in our words
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            reader = imageio.get_reader(video, format="FFMPEG")
        finally:
            quiet.setLevel(level)
        meta = reader.get_meta_data()
        if meta.get("source_size") and tuple(meta["source_size"]) != tuple(meta.get("size") or ()):
            stored, shown = ("x".join(map(str, meta[key])) for key in ("source_size", "size"))
            print(f"{os.path.basename(video)} is stored {stored} and shown {shown} (a rotation tag, as phones write "
                  "it): its frames are extracted as shown.")
        video_fps = float(meta.get("fps") or 30.0)
        duration = meta.get("duration")
        total = int(round(duration * video_fps)) if duration and np.isfinite(duration) else None
    except Exception as err:
        raise CaptureError(f"Could not decode {video} ({str(err).splitlines()[0][:120]}); give a video file "
                           "ffmpeg can read (MP4/MOV/...).") from None
    try:
        frames, stats = select_frames(reader, video_fps, fps, max_size, total_frames=total)
    except CaptureError:  # select_frames' "no frames"
        raise CaptureError(f"No frame of {video} could be decoded; give a video file ffmpeg can read "
                           "(MP4/MOV/...).") from None
    except Exception as err:
        raise CaptureError(f"Could not decode {video} ({str(err).splitlines()[0][:120]}); give a video file "
                           "ffmpeg can read (MP4/MOV/...).") from None
    finally:
        reader.close()
    if len(frames) < 3:
        raise CaptureError(f"Only {len(frames)} usable frames in {video}; raise --fps or film longer.")
    stats["video_fps"] = video_fps
    return frames, stats


def video_folders(videos: list[str]) -> list[str]:
    """Where each video's frames go in images/: the top for one video; for several, a folder each named after
    the video (``high.mp4`` -> ``high``, a second ``clip.mp4`` from elsewhere -> ``clip-2``), one camera each."""
    if len(videos) == 1:
        return [""]
    folders = []
    for video in videos:
        stem = os.path.splitext(os.path.basename(video))[0].strip().lstrip(".") or "video"  # no hidden folder
        folder, k = stem, 2
        while folder in folders:
            folder, k = f"{stem}-{k}", k + 1
        folders.append(folder)
    return folders


def check_videos(videos: list[str]) -> None:
    """Each --video a file and given once, said before the first is read; a folder of videos gets its videos
    named, as --video takes them."""
    import shlex

    seen = {}
    for video in videos:
        if os.path.isdir(video):
            held = sorted(os.path.join(video, f) for f in os.listdir(video)
                          if os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS and not f.startswith("."))
            if held:
                raise CaptureError(f"--video {video} is a folder; give its videos one by one: " + " ".join(
                    f"--video {shlex.quote(v)}" for v in held[:4]) + (" ..." if len(held) > 4 else ""))
            raise CaptureError(f"--video {video} is a folder; give the video file (photos go in <root>/images, "
                               "without --video).")
        if not os.path.isfile(video):
            raise CaptureError(f"Video {video} does not exist.")
        if os.path.realpath(video) in seen:
            raise CaptureError(f"--video {video} is given twice (also as {seen[os.path.realpath(video)]}); give "
                               "each video once.")
        seen[os.path.realpath(video)] = video


def extract_frames(videos: list[str], image_dir: str, fps: float, max_size: int) -> list[dict]:
    """Write the selected frames of each of ``videos`` to ``image_dir`` (its top for one video, a folder each for
    several: ``video_folders``), all of them or none. Returns each video's stats."""
    import imageio.v2 as imageio

    from utils.io import atomic_folder

    check_videos(videos)
    all_stats, encoded = [], {}  # every video decoded before anything is written: a bad one writes nothing
    for video, folder in zip(videos, video_folders(videos)):
        frames, stats = read_video(video, fps, max_size)
        for k, frame in enumerate(frames):  # as JPEG: one video's frames held decoded at a time, not all
            encoded[os.path.join(folder, FRAME_PATTERN.format(k))] = imageio.imwrite("<bytes>", frame, format="jpg",
                                                                                     quality=95)
        all_stats.append(stats)
    with atomic_folder(image_dir, prefix=".frames-") as tmp:
        for name, data in encoded.items():
            os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
    return all_stats


def frames_source(videos: list[str], fps: float, max_size: int) -> dict:
    """What the frames in images/ are taken from, as ``<root>/frames.json`` records it: the videos (their names
    and sizes in bytes, which tell a re-filmed capture from a moved file; a name and a size for one video, lists
    for several) and the extraction's options. The sizes are None where a video is gone."""
    names = [os.path.basename(video) for video in videos]
    sizes = None if not all(os.path.isfile(video) for video in videos) else [os.path.getsize(v) for v in videos]
    one = len(videos) == 1
    return {"video": names[0] if one else names, "bytes": sizes and (sizes[0] if one else sizes),
            "fps": fps, "max_size": max_size}


def check_frames_source(root: str, wanted: dict) -> None:
    """Refuse to reuse frames taken from another video, or with other options, than this run asks for: their
    poses would be reused too, so the scene would silently stay the old capture. Frames without a record (an
    older version's, or your own ``frame_*.jpg``) are reused as before."""
    import json

    try:
        with open(os.path.join(root, FRAMES_SOURCE)) as f:
            found = json.load(f)
    except (OSError, ValueError):
        return
    compared = [key for key in wanted if wanted[key] is not None]  # a video gone since: its name still counts
    if any(found.get(key) != wanted[key] for key in compared):
        def said(source):
            videos = source.get("video")
            videos = " and ".join(map(str, videos)) if isinstance(videos, list) else videos
            return f"{videos} at {source.get('fps')} fps, --max-size {source.get('max_size')}"

        raise CaptureError(f"The frames in {os.path.join(root, 'images')} were taken from {said(found)}, not from "
                           f"{said(wanted)}; pass --overwrite to extract them again (and compute their poses again).")


def check_posed_images(root: str, sparse: str, names: list[str]) -> None:
    """Refuse to reuse poses computed from another set of images than ``images/`` holds now: photos added since
    would be left out of the scene without a word, and removed ones break the loaders. The set is the one COLMAP's
    ``database.db`` holds (every image fed to it, registered or not); poses without it are reused as before."""
    import sqlite3

    database = os.path.join(root, "database.db")
    if not os.path.isfile(database):
        return
    try:
        connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        try:
            posed = {row[0] for row in connection.execute("SELECT name FROM images")}
        finally:
            connection.close()
    except sqlite3.Error:
        return
    added, removed = sorted(set(names) - posed), sorted(posed - set(names))
    if added or removed:
        changes = ([f"{len(added)} added since ({first_few(added)})"] if added else []) + \
                  ([f"{len(removed)} gone ({first_few(removed)})"] if removed else [])
        raise CaptureError(f"The poses in {sparse} were computed from other images than {os.path.join(root, 'images')}"
                           f" holds now ({'; '.join(changes)}); pass --overwrite to compute them again.")


# ---------------------------------------------------------------------------------------------------- SfM
def check_images(image_dir: str, names: list[str], camera_mode: str) -> None:
    """Every image readable; one size for the images of each shared camera (all of them, or each folder's)."""
    import cv2

    sizes = {}
    for name in names:
        img = cv2.imread(os.path.join(image_dir, name), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise CaptureError(f"{os.path.join(image_dir, name)} cannot be read as an image; remove it.")
        sizes[name] = (img.shape[1], img.shape[0])
    if camera_mode == "per-image":
        return
    for folder, group in (colmap_steps.by_folder(names) if camera_mode == "per-folder" else {"": names}).items():
        first = sizes[group[0]]
        odd = [n for n in group if sizes[n] != first]
        if odd:
            held = f" in {os.path.join(image_dir, folder)}, one camera's" if folder else ""
            raise CaptureError(f"Images of mixed sizes{held}: {odd[0]} is {sizes[odd[0]][0]}x{sizes[odd[0]][1]} but "
                               f"{group[0]} is {first[0]}x{first[1]}; resize them to one size, or pass "
                               "--camera-mode per-image (each image its own camera).")


def colour_signature(image: np.ndarray) -> np.ndarray:
    """(16 * 12 * 3,) zero-mean, unit-norm blurred colour thumbnail: coarse enough to recognise a viewpoint."""
    import cv2

    t = cv2.resize(cv2.GaussianBlur(image[..., :3], (0, 0), 3), (16, 12), interpolation=cv2.INTER_AREA)
    t = t.astype(np.float64).ravel()
    t -= t.mean()
    return t / max(np.linalg.norm(t), 1e-9)


def loop_pairs(image_dir: str, names: list[str], overlap: int, per_image: int = 3, relative: float = 0.8):
    """Pairs of frames far apart in time that look alike (the video came back to where it was), and pairs across
    the sequences of several folders (videos, or a rig's cameras) that look alike.

    A far pair in one sequence is a candidate when its signatures correlate at least ``relative`` times as well as
    consecutive frames typically do; at most ``per_image`` per frame. Each frame is also paired with the
    ``per_image`` most alike frames of every other folder, however alike: two passes round an object at different
    heights, or two cameras, may look less alike than neighbouring frames, and these pairs are what joins them.
    Geometric verification then keeps the true ones: this replaces COLMAP's vocabulary-tree loop detection (no
    download).
    """
    import imageio.v2 as imageio

    from datasets.images import reading

    sig = np.stack([colour_signature(imageio.imread(os.path.join(image_dir, n)))
                    for n in reading(names, "frames' signatures for loop closing")])
    sim = sig @ sig.T
    folder = np.array([colmap_steps.folder_of(n) for n in names])
    same = folder[:, None] == folder[None, :]
    index = np.arange(len(names))
    far = same & (np.abs(index[:, None] - index[None, :]) > overlap)
    neighbours = sim[index[:-1], index[1:]][same[index[:-1], index[1:]]]  # consecutive frames of one sequence
    threshold = relative * float(np.median(neighbours)) if len(neighbours) else np.inf
    pairs = set()
    for i in range(len(names)):
        order = np.argsort(-sim[i])  # the most alike first
        chosen = list(order[far[i, order] & (sim[i, order] >= threshold)][:per_image])
        for other in set(folder) - {folder[i]}:
            chosen += list(order[folder[order] == other][:per_image])
        pairs.update((min(i, int(j)), max(i, int(j))) for j in chosen)
    return [(names[i], names[j]) for i, j in sorted(pairs)]


def same_moment_pairs(cameras: dict[str, list[str]], reach: int) -> list[tuple[str, str]]:
    """Pairs across the cameras of a rig: each image with the other cameras' images at the same place in their
    sequence (the same moment for a rig's synchronised cameras; for folders of different lengths, the same share of
    the way through), ``reach`` either side. Sequential matching pairs images of one camera only."""
    pairs = []
    folders = list(cameras.values())
    for i, first in enumerate(folders):
        for second in folders[i + 1:]:
            for k, name in enumerate(first):
                at = round(k * (len(second) - 1) / max(len(first) - 1, 1))
                pairs += [(name, other) for other in second[max(0, at - reach):at + reach + 1]]
    return pairs


def run_sfm(root: str, image_dir: str, names: list[str], work: str, matcher: str, camera_model: str,
            camera_mode: str, overlap: int, threads: int, synchronised: bool = True):
    """Features, matches and incremental mapping in ``work``; returns the largest pycolmap.Reconstruction.
    ``synchronised``: folders of images are a rig's cameras, whose sequences run together (not several videos)."""
    import pycolmap
    from tqdm import tqdm

    db = os.path.join(work, "database.db")
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.num_threads = threads
    mode = {"single": pycolmap.CameraMode.SINGLE, "per-folder": pycolmap.CameraMode.PER_FOLDER,
            "per-image": pycolmap.CameraMode.PER_IMAGE}[camera_mode]
    t0 = time.time()
    with tqdm(total=len(names), desc="[1/3] SIFT features", unit="img") as bar:
        colmap_steps.extract_features(db, image_dir, names, mode, camera_model, extraction, bar)
    print(f"      done in {time.time() - t0:.1f} s", flush=True)
    # COLMAP seeds its geometric verification from the clock unless told otherwise: a fixed seed makes the
    # same images give the same poses, run after run.
    pycolmap.set_random_seed(SEED)
    matching = pycolmap.FeatureMatchingOptions()
    matching.num_threads = threads
    verification = pycolmap.TwoViewGeometryOptions()
    verification.ransac.random_seed = SEED
    match_options = dict(matching_options=matching, verification_options=verification, device=pycolmap.Device.auto)
    t0 = time.time()
    if matcher == "sequential":  # COLMAP's sequential matcher's pairs, and those the video came back to
        loops = loop_pairs(image_dir, names, overlap)
        sequential = colmap_steps.sequential_pairs(db, overlap)
        cameras = colmap_steps.by_folder(names)
        across = []
        if len(cameras) > 1:  # each camera's own sequence (COLMAP's runs on from one folder into the next)
            folder = colmap_steps.folder_of
            sequential = [(a, b) for a, b in sequential if folder(a) == folder(b)]
            across = same_moment_pairs(cameras, reach=max(1, overlap // 5)) if synchronised else []
        pairs = colmap_steps.distinct_pairs(sequential + across + loops)
        rig = f", {len(across)} pairs across its {len(cameras)} cameras" if across else ""
        desc = f"[2/3] sequential matching (overlap {overlap}{rig}, {len(loops)} loop-closing pairs)"
    else:
        pairs = colmap_steps.every_pair(names)
        desc = "[2/3] exhaustive matching"
    with tqdm(total=len(pairs), desc=desc, unit="pair") as bar:
        colmap_steps.match_pairs(db, pairs, work, match_options, bar)
    print(f"      done in {time.time() - t0:.1f} s", flush=True)
    t0 = time.time()
    options = pycolmap.IncrementalPipelineOptions()
    options.num_threads = threads
    options.random_seed = SEED
    out = os.path.join(work, "models")
    os.makedirs(out)
    with tqdm(total=len(names), desc="[3/3] registering images", unit="img") as bar:
        def registered(count: int) -> None:  # a model given up and begun again registers its images again
            bar.update(max(0, min(count, bar.total - bar.n)))

        reconstructions = colmap_steps.run_cancellable(lambda token: pycolmap.incremental_mapping(
            db, image_dir, out, options=options, initial_image_pair_callback=lambda: registered(2),
            next_image_callback=lambda: registered(1), cancellation_token=token))
    print(f"      done in {time.time() - t0:.1f} s", flush=True)
    if not reconstructions:
        raise CaptureError(f"COLMAP could not register any image pair among {len(names)} images: the images "
                           "share too few features (texture-less object, too little overlap between views?).")
    return max(reconstructions.values(), key=lambda r: r.num_reg_images())


def report(rec, names: list[str]) -> dict:
    registered = {rec.images[i].name for i in rec.reg_image_ids()}
    sizes = [(rec.images[i].camera.width, rec.images[i].camera.height) for i in rec.reg_image_ids()]
    return {"images": len(names), "registered": len(registered), "sizes": sizes,
            "unregistered": [n for n in names if n not in registered],
            "points": rec.num_points3D(), "mean_reprojection_error_px": float(rec.compute_mean_reprojection_error())}


def print_report(stats: dict) -> None:
    print(f"Registered {stats['registered']} of {stats['images']} images; {stats['points']} sparse points; mean "
          f"reprojection error {stats['mean_reprojection_error_px']:.3f} px.")


def print_cameras(rec) -> None:
    """One line per camera shared by a folder of images (a rig's), with the focal length COLMAP found: a camera
    given the other's photos by mistake shows here."""
    folders = {}
    for image_id in rec.reg_image_ids():
        image = rec.images[image_id]
        folders.setdefault(image.camera_id, set()).add(colmap_steps.folder_of(image.name))
    if len(folders) < 2 or len(folders) > 8 or any(len(f) != 1 for f in folders.values()):
        return
    for camera_id, (folder,) in sorted(folders.items(), key=lambda item: sorted(item[1])):
        camera = rec.cameras[camera_id]
        print(f"  camera of {folder}/: {camera.width}x{camera.height}, focal length "
              f"{camera.mean_focal_length():.1f} px ({camera.model.name})")


@stops_cleanly("imgs2poses")
def main(argv=None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("root", help="scene folder: images in <root>/images (or made from --video)")
    parser.add_argument("--video", action="append", help="extract frames from this video into <root>/images "
                        "first; given again for more videos (a second pass higher up, another phone), each "
                        "video's frames go in a folder of images/ named after it, one camera each")
    parser.add_argument("--fps", type=argument_at_least(0, float, exclusive=True), default=3.0,
                        help="frames kept per second of video")
    parser.add_argument("--max-size", type=argument_at_least(1, int), default=1600,
                        help="longest side of extracted frames (px)")
    parser.add_argument("--matcher", choices=["auto", "exhaustive", "sequential"], default="auto")
    parser.add_argument("--overlap", type=argument_at_least(1, int), default=10,
                        help="sequential matching: neighbours matched per frame")
    parser.add_argument("--camera-model", default="SIMPLE_RADIAL", help="COLMAP camera model (OPENCV, PINHOLE, ...)")
    parser.add_argument("--camera-mode", choices=["auto", "single", "per-folder", "per-image"], default="auto",
                        help="the cameras COLMAP fits: auto is one per folder where images/ holds folders of photos "
                        "(a rig's cameras), else one for all (one phone); per-image for photos from many devices")
    parser.add_argument("--per-image-cameras", action="store_true", help="the same as --camera-mode per-image")
    parser.add_argument("--min-registered", type=argument_at_least(0), default=0.6,
                        help="fail below this fraction registered")
    parser.add_argument("--threads", type=int, default=-1,
                        help="CPU threads for COLMAP (-1: all); 1 gives the same poses on every run, as "
                        "multi-threaded matching and bundle adjustment do not")
    parser.add_argument("--overwrite", action="store_true", help="redo frames and poses that already exist")
    parser.add_argument("--verbose", action="store_true", help="show COLMAP's own log")
    args = parser.parse_args(argv)
    if args.per_image_cameras:
        if args.camera_mode not in ("auto", "per-image"):
            parser.error(f"--per-image-cameras contradicts --camera-mode {args.camera_mode}; give one of them.")
        args.camera_mode = "per-image"
    try:
        stats = run(args)
        print(f"Next: {train_command(args.root, stats['sizes'])}")
    except CaptureError as err:
        print(f"imgs2poses: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # frames, COLMAP's database and model are written under the scene folder
        status = script_status_for_os_error(err, os.path.join(args.root, "images"), "imgs2poses")
        if status is None:
            raise
        return status
    return 0


def train_command(root: str, sizes: list[tuple[int, int]]) -> str:
    """The command that trains NeuS on the posed capture of images of ``sizes`` (with its masks when
    ``<root>/masks`` holds them, and a training size when the cameras' aspect ratios differ)."""
    import shlex

    from datasets.images import img_wh_override

    masked = " dataset.apply_mask=true system.loss.lambda_mask=0.1" if holds_images(os.path.join(root, "masks")) else ""
    config_path = os.path.join(REPOSITORY, "configs", "neus-colmap.yaml")
    size = img_wh_override(sizes, config_path)
    return launch_command(f"--config {shlex.quote(typed_path(config_path))} --train "
                          f"dataset.root_dir={shlex.quote(root)}{masked}{size}")


def run(args) -> dict:
    root = args.root
    if os.path.isfile(root):  # the video (or a photo) given where the scene folder goes
        import shlex

        if os.path.splitext(root)[1] in IMAGE_EXTENSIONS:
            holder = os.path.dirname(root) or "."
            capture = capture_of_photos(holder)
            raise CaptureError(f"{root} is a photo; give the scene folder, whose images/ holds the photos" + (
                f": python scripts/imgs2poses.py {shlex.quote(capture)}" if capture != holder else "."))
        stem = os.path.splitext(root)[0]
        folder = stem if stem != root else f"{root}_scene"
        raise CaptureError(f"{root} is a file, not a scene folder; give a folder for the scene (created if missing) "
                           f"and the video with --video, e.g. python scripts/imgs2poses.py {shlex.quote(folder)} "
                           f"--video {shlex.quote(args.video[0] if args.video else root)}")
    image_dir = os.path.join(root, "images")
    if args.video:
        others = files_not_written_by(image_dir, lambda name: FRAME_NAME.fullmatch(name) is not None)
        if others:
            raise CaptureError(f"{image_dir} holds files that were not extracted from a video ({first_few(others)}), "
                               "and --video would replace them: move them out, or give the video a scene folder of "
                               "its own.")
        source = frames_source(args.video, args.fps, args.max_size)
        if holds_images(image_dir) and not args.overwrite:
            check_frames_source(root, source)
            found = len(list_images(image_dir)) + sum(map(len, camera_folders(image_dir).values()))
            print(f"Reusing the {found} frames in {image_dir} (--overwrite to extract again).")
        else:
            all_stats = extract_frames(args.video, image_dir, args.fps, args.max_size)
            from utils.io import write_json

            write_json(os.path.join(root, FRAMES_SOURCE), source)
            for video, folder, stats in zip(args.video, video_folders(args.video), all_stats):
                kept = f"{os.path.basename(video)}: kept" if folder else "Kept"
                print(f"{kept} {stats['kept']} frames of {stats['read']} ({stats['windows']} windows at {args.fps} "
                      f"fps; dropped {stats['blurred']} blurred and {stats['duplicates']} near-duplicates) -> "
                      f"{os.path.join(image_dir, folder) if folder else image_dir}")
    names = list_images(image_dir)
    cameras = camera_folders(image_dir)
    rig = bool(cameras) and not names
    if names and cameras:  # photos beside folders of photos: which are the capture is not ours to guess
        print(f"Left out of the poses: the folders of {image_dir} ({first_few(list(cameras), 3)}); imgs2poses reads "
              "the photos at the top of images/, or, where it holds only folders of photos, those (one camera each).")
    elif rig:  # a rig's cameras (or two devices), one folder each
        names = [name for photos in cameras.values() for name in photos]
        print(f"{len(names)} {'frames' if args.video else 'photos'} in {len(cameras)} folders of {image_dir} "
              f"({first_few(list(cameras), 3)})" + (
            ", one camera each." if args.camera_mode in ("auto", "per-folder") else "."))
    if not names:
        others = sorted({os.path.splitext(f)[1] for f in os.listdir(image_dir)} - {""}) if os.path.isdir(image_dir) \
            else []
        found = f" (found {', '.join(others[:4])} files: convert them to JPEG or PNG first)" if others else ""
        capture = capture_of_photos(root)
        if capture != root and not args.video:  # load/mug/images given for load/mug
            held = "itself" if list_images(root) else "in its folders"
            raise CaptureError(f"No images (.png/.jpg) in {image_dir}: {root} holds the photos {held}, and is the "
                               f"images/ folder of the capture folder {capture}; give that: python "
                               f"scripts/imgs2poses.py {capture}")
        raise CaptureError(f"No images (.png/.jpg) in {image_dir}{found}; put the photos there or pass --video.")
    left_out = [f for f in files_not_written_by(image_dir, lambda name: os.path.splitext(name)[1] in IMAGE_EXTENSIONS)
                if not os.path.basename(f).startswith(".")]
    if left_out:  # an iPhone's HEIC photos beside JPEG ones: said, not dropped without a word
        print(f"Left out of the poses: {len(left_out)} file(s) in {image_dir} that are not PNG or JPEG "
              f"({first_few(left_out, 3)}); convert photos to JPEG to include them.")
    if len(names) < 3:
        raise CaptureError(f"Only {len(names)} images in {image_dir}; structure from motion needs at least 3 "
                           "(20 or more all around the object work well).")
    sparse = os.path.join(root, "sparse", "0")
    try:
        from datasets.colmap_model import import_pycolmap

        pycolmap = import_pycolmap()  # without glog's SIGTERM handler, which would end the process with a stack dump
    except ImportError:
        raise CaptureError("pycolmap is not installed: pip install pycolmap.") from None
    if os.path.isfile(os.path.join(sparse, "cameras.bin")) and not args.overwrite:
        check_posed_images(root, sparse, names)
        rec = pycolmap.Reconstruction(sparse)
        stats = report(rec, names)
        print(f"Reusing the poses in {sparse} (--overwrite to recompute).")
        print_report(stats)
        print_cameras(rec)
        return stats
    camera_mode = args.camera_mode
    if camera_mode == "auto" or (camera_mode == "per-folder" and not rig):
        camera_mode = "per-folder" if rig else "single"
    check_images(image_dir, names, camera_mode)
    matcher = args.matcher
    if matcher == "auto":
        frames = all(os.path.basename(n).startswith("frame_") for n in names)
        matcher = "sequential" if args.video or frames else "exhaustive"
        if matcher == "exhaustive" and len(names) > MANY_PHOTOS:
            print(f"{len(names)} photos: exhaustive matching takes {len(colmap_steps.every_pair(names))} pairs, "
                  "which grow with the square of their count. Photos taken in order around the object match far "
                  "quicker with --matcher sequential.")
    if not args.verbose:
        pycolmap.logging.minloglevel = 2  # COLMAP's info lines would bury the progress bars
    for stale in glob.glob(os.path.join(glob.escape(root), ".colmap-*")):
        shutil.rmtree(stale, ignore_errors=True)
        print(f"Removed {stale}, left by an interrupted run.")
    work = tempfile.mkdtemp(prefix=".colmap-", dir=root)
    try:
        rec = run_sfm(root, image_dir, names, work, matcher, args.camera_model, camera_mode, args.overlap,
                      args.threads, synchronised=not args.video)
        stats = report(rec, names)
        print_report(stats)
        print_cameras(rec)
        if stats["registered"] < args.min_registered * len(names):
            missing = stats["unregistered"]
            raise CaptureError(f"Only {stats['registered']} of {len(names)} images registered (needs "
                               f"{args.min_registered:.0%}); not registered: {', '.join(missing[:8])}"
                               f"{' ...' if len(missing) > 8 else ''}. Remove blurred or unrelated images, add views "
                               "with more overlap, or lower --min-registered.")
        if stats["unregistered"]:
            print(f"Not registered (left out of the poses): {', '.join(stats['unregistered'][:8])}"
                  f"{' ...' if len(stats['unregistered']) > 8 else ''}")
        model = os.path.join(work, "sparse0")
        os.makedirs(model)
        rec.write_binary(model)
        from datasets.colmap_model import sparse_points, write_points_ply

        xyz, rgb, _ = sparse_points(rec)
        write_points_ply(os.path.join(work, "sparse_points.ply"), xyz, rgb)
        # everything computed: put it in place (the old model goes only now)
        if os.path.isdir(os.path.join(root, "sparse")):
            shutil.rmtree(os.path.join(root, "sparse"))
        os.makedirs(os.path.join(root, "sparse"))
        os.replace(model, sparse)
        os.replace(os.path.join(work, "database.db"), os.path.join(root, "database.db"))
        os.replace(os.path.join(work, "sparse_points.ply"), os.path.join(root, "sparse_points.ply"))
        print(f"Poses: {sparse}; sparse points: {os.path.join(root, 'sparse_points.ply')}")
        return stats
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
