"""Feature extraction and matching throughput of scripts/imgs2poses.py's COLMAP steps (printed only).

    python benchmarks/bench_sfm.py                          # 12 photos of 1600x1200
    python benchmarks/bench_sfm.py --images 24 --size 1024 --threads 1

The photos are views of a flat, finely textured poster (multi-scale noise, as busy as a photo of gravel or
foliage), each through a random homography: a high-texture case, so the SIFT feature count is near the
extractor's limit, which is what makes matching slow. A flat scene cannot be posed by structure from motion,
so only the two steps that grow with the photo count are timed: extraction (seconds per image) and exhaustive
matching (seconds per pair), the latter once as a plain call and once as imgs2poses runs it (pair lists of at
least 64 pairs, about 20 of them, each a call in a worker thread with a cancellation token, the progress bar
moved between calls), whose cost is printed too.
Multiply the seconds per pair by n (n - 1) / 2 for a folder of n photos.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import colmap_steps  # noqa: E402
from utils.config import argument_at_least  # noqa: E402


def write_photos(folder: str, n: int, width: int, height: int, seed: int = 0) -> list[str]:
    """``n`` views (width x height JPEGs) of a textured poster through random homographies; their names."""
    import cv2

    rng = np.random.default_rng(seed)
    poster_h, poster_w = 2 * height, 2 * width
    poster = np.zeros((poster_h, poster_w, 3), np.float32)
    for cell in (4, 16, 64):  # noise at three scales: features at every octave
        noise = rng.random((poster_h // cell + 1, poster_w // cell + 1, 3)).astype(np.float32)
        poster += cv2.resize(noise, (poster_w, poster_h), interpolation=cv2.INTER_CUBIC) / 3
    poster = (np.clip(poster, 0, 1) * 255).astype(np.uint8)
    seen = np.float32([[width / 2, height / 2], [1.5 * width, height / 2], [1.5 * width, 1.5 * height],
                       [width / 2, 1.5 * height]])
    frame = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
    names = []
    for k in range(n):
        shift = rng.normal(0, 0.025 * width, (1, 2)).astype(np.float32)
        warp = cv2.getPerspectiveTransform(seen + shift, frame + rng.normal(0, 0.04 * width, (4, 2)).astype(np.float32))
        names.append(f"IMG_{k:04d}.jpg")
        cv2.imwrite(os.path.join(folder, names[-1]), cv2.warpPerspective(poster, warp, (width, height)))
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=argument_at_least(2, int), default=12)
    parser.add_argument("--size", type=argument_at_least(64, int), default=1600, help="width; height is 3/4 of it")
    parser.add_argument("--threads", type=int, default=-1, help="COLMAP's threads (-1: all)")
    args = parser.parse_args()
    from tqdm import tqdm

    from datasets.colmap_model import import_pycolmap

    pycolmap = import_pycolmap()
    pycolmap.logging.minloglevel = 2
    width, height = args.size, args.size * 3 // 4
    pairs = args.images * (args.images - 1) // 2
    print(f"{args.images} photos of {width}x{height}, {pairs} pairs; {os.cpu_count()} CPU cores, COLMAP threads "
          f"{args.threads}, pycolmap {pycolmap.__version__}")
    with tempfile.TemporaryDirectory() as work:
        image_dir = os.path.join(work, "images")
        os.makedirs(image_dir)
        names = write_photos(image_dir, args.images, width, height)
        db = os.path.join(work, "database.db")
        reader, extraction = pycolmap.ImageReaderOptions(), pycolmap.FeatureExtractionOptions()
        extraction.num_threads = args.threads
        start = time.perf_counter()
        pycolmap.extract_features(db, image_dir, image_names=names, camera_mode=pycolmap.CameraMode.SINGLE,
                                  reader_options=reader, extraction_options=extraction)
        extracted = time.perf_counter() - start
        with pycolmap.Database.open(db) as database:
            features = [database.num_keypoints_for_image(image.image_id) for image in database.read_all_images()]
        print(f"extraction: {extracted / args.images:.2f} s per image, {np.mean(features):.0f} SIFT features per "
              "image")
        matching = pycolmap.FeatureMatchingOptions()
        matching.num_threads = args.threads
        start = time.perf_counter()
        pycolmap.match_exhaustive(db, matching_options=matching)
        one_call = time.perf_counter() - start
        with pycolmap.Database.open(db) as database:
            database.clear_matches()
            database.clear_two_view_geometries()
        start = time.perf_counter()
        with tqdm(total=pairs, desc="matching as imgs2poses does", unit="pair") as bar:
            colmap_steps.match_pairs(db, colmap_steps.every_pair(names), work, dict(matching_options=matching), bar)
        behind_bar = time.perf_counter() - start
        print(f"exhaustive matching: {one_call / pairs:.3f} s per pair in a plain call, {behind_bar / pairs:.3f} s "
              f"behind the progress bar ({100 * (behind_bar / one_call - 1):+.1f} %)")
        for n in (100, 300):
            print(f"  {n} photos: {n * (n - 1) // 2} pairs, about {n * (n - 1) / 2 * one_call / pairs / 60:.0f} min "
                  "of matching on this machine")


if __name__ == "__main__":
    main()
