"""A COLMAP capture -> a NeuS/IDR-format scene (``image/``, ``mask/``, ``cameras_sphere.npz``).

    python scripts/gen_cameras.py load/mug        # -> load/mug/preprocessed/
    python launch.py --config configs/neus-dtu.yaml --train dataset.root_dir=load/mug/preprocessed

Images are undistorted to COLMAP's pinhole camera (the format has no lens
model) and renamed ``000.png``, ``001.png``, ... (``--padding``) in the order
of their names; ``names.txt`` lists the originals. Cameras that undistort to
sizes at most 2 % apart (one phone, fitted per folder) are cut to one size at
the right and bottom edges, as NeuS's own code needs. Masks come from
``--masks DIR`` (matched by stem) or are all foreground. ``world_mat_i`` is
K [R | t] in the COLMAP frame; ``scale_mat_i`` maps the unit sphere onto the
region of interest: the box of ``<root>/sparse_points_interest.ply`` when the
user cropped one (NeuS's workflow), otherwise estimated from the sparse points
seen by most cameras (robust percentiles) and written to
``<out>/sparse_points_interest.ply`` for inspection. The output folder is
written whole or not at all, and ``--overwrite`` replaces only a folder that
holds nothing but those files.

Phone photos that a viewer shows turned (EXIF orientation, e.g. portrait
shots stored as landscape sensor rows) are written as shown, with their
cameras turned to match, when all are shown the same way: the format has no
orientation tag, and upright images give an upright scene and video. Photos
shown in different ways are written as stored, with a note. A mask drawn on a
photo as shown (width and height swapped) is taken as such.
"""
from __future__ import annotations

import os
import re
import shlex
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.base import DatasetError  # noqa: E402
from utils.config import argument_at_least, script_parser  # noqa: E402
from utils.io import files_not_written_by, first_few, script_status_for_os_error  # noqa: E402
from utils.stops import REPOSITORY, launch_command, stops_cleanly, typed_path  # noqa: E402


# What gen_cameras writes: --overwrite replaces only a folder that holds nothing else
OUTPUT_NAME = re.compile(r"(image|mask)/\d+\.png|cameras_sphere\.npz|names\.txt|sparse_points_interest\.ply")


def scale_matrix(centre: np.ndarray, radius: float) -> np.ndarray:
    """(4, 4) map from the unit sphere to the sphere (centre, radius)."""
    m = np.diag([radius, radius, radius, 1.0])
    m[:3, 3] = centre
    return m


def generate(root: str, out: str, masks_dir: str | None, padding: int, mask_padding: int) -> dict:
    import imageio.v2 as imageio
    from tqdm import tqdm

    from datasets.images import (EXIF_QUARTER_TURNS, exif_orientation, load_images, mask_for_image,
                                 quarter_turns_to_apply, read_image)
    from datasets.rays import turn_intrinsics_clockwise, turn_pose_clockwise
    from datasets.colmap import match_masks
    from datasets.colmap_model import (Undistorter, box_from_points, find_sparse_dir, read_points_ply,
                                       nearly_one_size, read_reconstruction, region_of_interest,
                                       registered_views, sparse_points, write_points_ply)

    sparse_dir, models_note = find_sparse_dir(root)
    if models_note:
        print(models_note)
    rec = read_reconstruction(sparse_dir)
    views = registered_views(rec)
    image_dir = os.path.join(root, "images")
    names = [v.name for v in views]
    masks = match_masks(masks_dir, names) if masks_dir else {}
    undistorters = {}
    for v in views:
        undistorters.setdefault(v.camera.camera_id, Undistorter(v.camera))
    undistorted_sizes = [und.size for und in undistorters.values()]
    cropped_to = nearly_one_size(undistorted_sizes)
    if cropped_to:  # NeuS's own code stacks the images, so it needs one size
        for und in undistorters.values():
            und.crop(cropped_to)
    turns = [EXIF_QUARTER_TURNS[exif_orientation(os.path.join(image_dir, n))] for n in names]
    upright = quarter_turns_to_apply(turns)  # clockwise quarter turns given to every image and camera
    interest = os.path.join(root, "sparse_points_interest.ply")
    xyz, rgb, track = sparse_points(rec)
    if os.path.isfile(interest):
        centre, radius = box_from_points(read_points_ply(interest))
        source = interest
    else:
        centre, radius, keep = region_of_interest(xyz, track, np.stack([v.c2w for v in views]))
        source = "estimated from the sparse points seen by most cameras"
    scale_mat = scale_matrix(centre, radius)

    from utils.io import atomic_folder

    with atomic_folder(out, prefix=".gen-cameras-") as tmp:
        os.makedirs(os.path.join(tmp, "image"))
        os.makedirs(os.path.join(tmp, "mask"))
        cams, sizes = {}, []
        for i, view in enumerate(tqdm(views, desc="undistorting images", unit="img")):
            und = undistorters[view.camera.camera_id]
            image = load_images([os.path.join(image_dir, view.name)])[0][..., :3]
            if image.shape[:2] != (view.camera.height, view.camera.width):
                raise DatasetError(f"{view.name} is {image.shape[1]}x{image.shape[0]} but COLMAP's camera for it is "
                                   f"{view.camera.width}x{view.camera.height}; use the images the poses came from.")
            if masks:
                mask = read_image(masks[view.name])[..., 0]
                mask = und(mask_for_image(mask, image.shape[:2], masks[view.name], turns[i]), nearest=True)
            else:
                mask = np.full(und.size[::-1], 255, np.uint8)
            imageio.imwrite(os.path.join(tmp, "image", f"{i:0{padding}d}.png"), np.rot90(und(image), -upright))
            imageio.imwrite(os.path.join(tmp, "mask", f"{i:0{mask_padding}d}.png"),
                            np.repeat(np.rot90(mask, -upright)[..., None], 3, axis=-1))
            K = np.eye(4)
            K[:3, :3], size = turn_intrinsics_clockwise(und.K, *und.size, upright)
            sizes.append(size)
            cams[f"world_mat_{i}"] = K @ np.linalg.inv(turn_pose_clockwise(view.c2w, upright))
            cams[f"scale_mat_{i}"] = scale_mat
        np.savez(os.path.join(tmp, "cameras_sphere.npz"), **cams)
        with open(os.path.join(tmp, "names.txt"), "w") as f:
            f.writelines(f"{i:0{padding}d} {n}\n" for i, n in enumerate(names))
        if not os.path.isfile(interest):
            write_points_ply(os.path.join(tmp, "sparse_points_interest.ply"), xyz[keep], rgb[keep])
    return {"images": len(views), "sizes": sizes, "centre": centre.tolist(), "radius": radius,
            "roi": source, "masks": bool(masks), "turned": upright, "shown_turned": sum(t != 0 for t in turns),
            "cropped_from": sorted({size[::-1] if upright % 2 else size for size in undistorted_sizes}) if cropped_to
            else []}


@stops_cleanly("gen_cameras")
def main(argv=None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("root", help="capture folder with images/ and sparse/0 (from imgs2poses.py)")
    parser.add_argument("--out", help="output folder (default <root>/preprocessed)")
    parser.add_argument("--masks", help="folder of masks named after the images (default: all foreground)")
    parser.add_argument("--padding", type=argument_at_least(1, int), default=3, help="digits in image file names (DTU: 6)")
    parser.add_argument("--mask-padding", type=argument_at_least(1, int), help="digits in mask file names (default: --padding)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.root, "preprocessed")
    try:
        if not os.path.isdir(args.root):
            raise DatasetError(f"{args.root} {'is a file' if os.path.exists(args.root) else 'does not exist'}; give the "
                               "capture folder (images/ and sparse/0).")
        if os.path.exists(out) and not args.overwrite:
            raise DatasetError(f"{out} already exists; pass --overwrite to replace it.")
        others = files_not_written_by(out, lambda name: OUTPUT_NAME.fullmatch(name) is not None)
        if others:
            raise DatasetError(f"{out} holds files gen_cameras did not write ({first_few(others)}), and --overwrite "
                               "replaces that folder whole: give --out a folder of its own.")
        if args.masks and not os.path.isdir(args.masks):
            raise DatasetError(f"Mask folder {args.masks} does not exist.")
        info = generate(args.root, out, args.masks, args.padding, args.mask_padding or args.padding)
    except DatasetError as err:
        print(f"gen_cameras: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        status = script_status_for_os_error(err, out, "gen_cameras")
        if status is None:
            raise
        return status
    from datasets.images import img_wh_override, sizes_said

    sizes = [tuple(size) for size in info["sizes"]]
    mixed = len(set(sizes)) > 1
    sized = sizes_said(sizes) if mixed else "{}x{}".format(*sizes[0])
    print(f"Wrote {info['images']} views ({sized}, {'given masks' if info['masks'] else 'all-foreground masks'}) "
          f"to {out}; region of interest: centre {np.round(info['centre'], 4).tolist()}, radius "
          f"{info['radius']:.4g} ({info['roi']}).")
    if info["turned"]:
        print(f"The photos are shown turned (EXIF orientation): written as shown, {90 * info['turned']} degrees "
              "clockwise from the stored pixels, with their cameras turned to match.")
    elif info["shown_turned"]:
        print(f"{info['shown_turned']} of {info['images']} photos are shown turned (EXIF orientation) and the others "
              "not: all are written as stored, so some look sideways; the cameras match the pixels either way.")
    if info["cropped_from"]:
        apart = ", ".join(f"{w}x{h}" for w, h in info["cropped_from"])
        print(f"The cameras undistort to sizes a few pixels apart ({apart}): each image is cut to {sized} at its "
              "right and bottom edges, so that all are one size.")
    if mixed:
        print("The cameras' images are of different sizes: NeuS's own code needs one; this project's dtu loader "
              "scales each view to one, its camera with it.")
    config_path = os.path.join(REPOSITORY, "configs", f"neus-dtu{'-wmask' if info['masks'] else ''}.yaml")
    config, size = typed_path(config_path), img_wh_override(sizes, config_path)
    # a phone's exposure changes from frame to frame (the neus-dtu configs leave the correction off for DTU)
    arguments = (f"--config {shlex.quote(config)} --train dataset.root_dir={shlex.quote(out)}{size} "
                 "model.exposure_correction=true")
    print(f"Next: {launch_command(arguments)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
