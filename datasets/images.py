"""Reading a scene's images and choosing the training size: shared by every loader.

Images come back as uint8 (16-bit files rescaled, grey expanded to RGB).
The training size is ``dataset.img_wh`` (same aspect as the images) or the
images' size divided by ``dataset.img_downscale``; intrinsics scale with it.

Pixels are read as stored, as COLMAP reads them: a phone photo's EXIF
orientation tag is not applied. ``exif_orientation`` reads the tag, for the
loaders and scripts that need to know which way the photo is shown.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any, List, Tuple

import cv2
import imageio.v2 as imageio
import numpy as np

from datasets.base import DatasetError
from utils.config import ConfigError, number_at_least

log = logging.getLogger("nsr")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")

# EXIF orientation (tag 0x0112) -> clockwise quarter turns a viewer gives the stored pixels to show the photo.
# Phones store the sensor's rows and set 6 (shown turned a quarter clockwise: held upright, "portrait"), 8 or 3.
# The mirrored values (2, 4, 5, 7), which no phone's main camera writes, count as their turn without the mirror.
EXIF_QUARTER_TURNS = {1: 0, 2: 0, 3: 2, 4: 2, 5: 1, 6: 1, 7: 3, 8: 3}


def exif_orientation(path: str) -> int:
    """The photo's EXIF orientation, 1 to 8; 1 (as stored) when it has no tag or cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            value = image.getexif().get(0x0112, 1)
    except Exception:  # unreadable files are reported by whoever reads their pixels
        return 1
    return value if value in EXIF_QUARTER_TURNS else 1


def quarter_turns_to_apply(quarter_turns) -> int:
    """The turn loaders and scripts give every image and camera of a capture: the photos' own turn when all are
    shown the same way, else 0 (a mix of portrait and landscape photos is used as stored: one image size)."""
    turns = {int(q) % 4 for q in quarter_turns}
    return turns.pop() if len(turns) == 1 else 0


def mask_for_image(mask: np.ndarray, image_hw: Tuple[int, int], path: str, quarter_turns: int = 0) -> np.ndarray:
    """(H, W) uint8 mask on its image's stored pixels, at the image's size ``image_hw``.

    A mask drawn on a photo shown turned ``quarter_turns`` (clockwise) an odd number of times (width and height
    swapped) is turned back; a mask saved at another resolution of the same aspect ratio (half-size masks) is
    resized. A mask of another aspect ratio would be stretched over the wrong pixels: a DatasetError naming it.
    """
    h, w = image_hw

    def aspect_is(hw: Tuple[int, int], ratio: float) -> bool:
        return abs(hw[1] / hw[0] - ratio) <= 0.01 * ratio

    if quarter_turns % 2 and aspect_is(mask.shape[:2], h / w) and not aspect_is(mask.shape[:2], w / h):
        mask = np.ascontiguousarray(np.rot90(mask, quarter_turns))
    if mask.shape[:2] == (h, w):
        return mask
    if not aspect_is(mask.shape[:2], w / h):
        raise DatasetError(f"Mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image is {w}x{h}, another aspect "
                           "ratio; give each image a mask of its size (or a scaled copy).")
    shrink = mask.shape[1] > w
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_NEAREST)


def missing_root_message(root: str, layout: str, demo: str = "nerf-demo") -> str:
    """``demo``: the demo config in this loader's format (neus-demo is a DTU-format scene). The other loaders,
    which NeuS configs read too, name neus-demo beside nerf-demo: a NeuS user is not sent to a NeRF."""
    what = "is a file, not a folder" if os.path.isfile(root) else "does not exist"  # transforms.json, say
    other = "" if demo == "neus-demo" else " (configs/neus-demo.yaml for NeuS)"
    return (f"Dataset folder '{root}' {what}. Put the scene there ({layout}) or set dataset.root_dir=..., "
            f"or try the embedded demo: python launch.py --config configs/{demo}.yaml --train{other}")


def requested_size(config: Any) -> Tuple[int, int] | None:
    """``dataset.img_wh`` as (w, h), checked; None when the config does not set it."""
    wh = config.get("img_wh")
    if wh is None:
        return None
    if isinstance(wh, (str, int, float)) or len(wh) != 2:
        raise ConfigError(f"dataset.img_wh must be [width, height], not {wh}.")
    w, h = (number_at_least(v, "dataset.img_wh's width and height", 1) for v in wh)
    return w, h


def target_size(config: Any, width: int, height: int) -> Tuple[int, int]:
    """(w, h) after ``img_wh`` or ``img_downscale``; img_wh must keep the aspect ratio."""
    if config.get("img_wh") is not None:
        w, h = requested_size(config)
        if abs(w / h - width / height) > 0.01 * width / height:
            raise DatasetError(f"dataset.img_wh={[w, h]} has aspect {w / h:.3f} but the images are {width}x{height} "
                               f"(aspect {width / height:.3f}); give a size with the same aspect or use img_downscale.")
        return w, h
    scale = number_at_least(config.get("img_downscale") or 1.0, "dataset.img_downscale", 0, kind=float, exclusive=True)
    return int(round(width / scale)), int(round(height / scale))


def read_image(path: str) -> np.ndarray:
    """One image file as uint8 (H, W, 3|4): 16-bit and float rescaled, grey expanded to RGB (grey + alpha to RGBA). A file
    that cannot be decoded (truncated by an interrupted download, not an image) is a DatasetError naming it."""
    try:
        img = np.asarray(imageio.imread(path))
    except Exception as err:  # imageio/Pillow raise OSError, ValueError, struct.error, SyntaxError... by format
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DatasetError(f"{path} cannot be read as an image ({reason}); download or extract it again, "
                           "or remove it (and its camera, for a cameras file that names it).") from None
    if np.issubdtype(img.dtype, np.floating):  # float TIFF/EXR: linear values in [0, 1]
        img = (np.clip(np.nan_to_num(img), 0.0, 1.0) * 255).round().astype(np.uint8)
    elif img.dtype != np.uint8:
        # Pillow before 10 gives 16-bit grey PNGs as int32 ("I" mode): values up to 65535 are 16-bit ones
        sixteen_bit = img.dtype.itemsize > 2 and img.size and 0 <= img.min() and img.max() <= 65535
        full_scale = 65535 if sixteen_bit else np.iinfo(img.dtype).max
        img = (img.astype(np.float32) / full_scale * 255).round().astype(np.uint8)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] in (1, 2):  # grey, grey + alpha
        img = np.concatenate([np.repeat(img[..., :1], 3, axis=-1), img[..., 1:]], axis=-1)
    return img


def reading(items: List, what: str = "reading images"):
    """``items`` to iterate over, behind a progress bar that appears only when the reading takes a while."""
    from utils.io import late_bar

    return late_bar(items, desc=what, unit="img", disable=len(items) < 2)


def check_present(paths: List[str]) -> None:
    """Refuse, in one sentence, image files named by a cameras file that are not there."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetError(f"{len(missing)} of {len(paths)} images named by the cameras file are missing, "
                           f"the first being {missing[0]}.")


def load_images(paths: List[str], same_size: bool = True) -> List[np.ndarray]:
    """Read images, checking that all exist (and, unless told otherwise, have one size). Returns uint8 arrays
    (H, W, 3|4)."""
    check_present(paths)
    images = []
    for p in reading(paths):
        img = read_image(p)
        if same_size and images and img.shape[:2] != images[0].shape[:2]:
            raise DatasetError(f"Images have mixed sizes: {p} is {img.shape[1]}x{img.shape[0]} but {paths[0]} is "
                               f"{images[0].shape[1]}x{images[0].shape[0]}; resize them to one size.")
        images.append(img)
    return images


def stored_size(path: str) -> Tuple[int, int]:
    """(width, height) of an image file as stored, from its header (the pixels are not decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except Exception:  # a format Pillow does not know, or a damaged file: read_image decodes it or names it
        img = read_image(path)
        return img.shape[1], img.shape[0]


def most_common_size(sizes: List[tuple]) -> tuple:
    """The (w, h) most of ``sizes`` have; of equally common ones, the largest."""
    counts = Counter(sizes)
    return max(counts, key=lambda size: (counts[size], size[0] * size[1]))


def sizes_said(sizes: List[tuple]) -> str:
    """'24 at 380x285, 24 at 319x239' for a message: each (w, h) of ``sizes`` with its count, commonest first."""
    return ", ".join(f"{n} at {w}x{h}" for (w, h), n in Counter(sizes).most_common())


def same_aspect(size: tuple, other: tuple) -> bool:
    """Whether two (w, h) sizes have one aspect ratio, to 1 % (sizes rounded to whole pixels, undistorted)."""
    return abs(size[0] / size[1] - other[0] / other[1]) <= 0.01 * other[0] / other[1]


def img_wh_override(sizes: List[tuple], config_path: str) -> str:
    """What a training command on images of ``sizes`` adds for the config file ``config_path``: '' when they have
    one aspect ratio (the loaders choose the size), else ``' dataset.img_wh=[W,H]'``, the most common size scaled
    by the config's ``img_downscale``."""
    from omegaconf import OmegaConf

    if not sizes:
        return ""
    base = most_common_size(sizes)
    if all(same_aspect(size, base) for size in sizes):
        return ""
    downscale = OmegaConf.load(config_path).dataset.get("img_downscale") or 1
    return f" dataset.img_wh=[{round(base[0] / downscale)},{round(base[1] / downscale)}]"


def common_target_size(config: Any, sizes: List[tuple], names: List[str], whose: str = "Images",
                       say: bool = True) -> tuple[int, int]:
    """One training size for images of sizes ``sizes`` ((w, h) each), each image scaled on its own (its camera with
    it): ``img_wh`` when given; for sizes of one aspect ratio (a rig's cameras, a photo at another resolution), the
    most common size (of equal counts, the largest) after ``img_downscale``; mixed aspect ratios need ``img_wh``.
    ``whose`` starts the messages; ``say``: log the size chosen for mixed sizes (once per scene, not per split)."""
    if config.get("img_wh") is not None and len(set(sizes)) > 1:
        return requested_size(config)
    base = most_common_size(sizes)
    odd = [k for k, size in enumerate(sizes) if not same_aspect(size, base)]
    if odd:
        k, b = odd[0], sizes.index(base)
        raise DatasetError(f"{whose} have mixed sizes of different aspect ratios: {names[k]} is {sizes[k][0]}x"
                           f"{sizes[k][1]} but {names[b]} is {base[0]}x{base[1]}; set dataset.img_wh=[W,H] to train "
                           "on one size.")
    size = target_size(config, *base)
    if len(set(sizes)) > 1 and say:
        log.info(f"{whose} are of {len(set(sizes))} sizes with one aspect ratio ({sizes_said(sizes)}): each is "
                 f"scaled to {size[0]}x{size[1]}, its camera with it (dataset.img_wh=[W,H] to choose).")
    return size
