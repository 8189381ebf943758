"""What model.exposure_correction does to a scene whose images differ in exposure (printed only).

    python benchmarks/bench_exposure.py                       # the README's table: neus-demo, 8 runs of 1500 steps
    python benchmarks/bench_exposure.py --cases nomask-changed -- trainer.max_steps=3000

The DTU-layout demo scene is rendered once; a copy has each training image's exposure scaled by a factor drawn
from exp(U(-0.4, 0.4)) (0.67 to 1.49) and each colour channel by exp(U(-0.1, 0.1)), as a phone's auto-exposure
and white balance change from frame to frame; the held-out views (every 8th) stay as rendered, so the test PSNR
measures the colours the field keeps. Each case trains neus-demo with the correction off, then on, through
launch.py, and the table has the test PSNR and the mesh's Chamfer distance and F-score against the true surface.
Cases: ``{mask,nomask}-{changed,rendered}``; ``nomask`` trains without masks, the surroundings learned by the
background NeRF (the way neus-demo.yaml's header describes). Arguments after ``--`` go to every run; ``--seeds``
trains each run once per training seed and adds each figure's mean and range.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import imageio.v2 as imageio
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from quality import demo_scene_and_copy, print_runs, run_config  # noqa: E402

from datasets.base import holdout_split  # noqa: E402

CONFIG = "configs/neus-demo.yaml"
NO_MASKS = ["model.learned_background=true", "system.loss.lambda_mask=0", "dataset.apply_mask=false"]
CASES = ["mask-changed", "mask-rendered", "nomask-changed", "nomask-rendered"]


def change_exposures(root: str, seed: int = 1, spread: float = 0.4) -> np.ndarray:
    """Scale each training image of the DTU-layout scene in ``root`` (in place) by a random exposure and white
    balance; returns the (N, 3) gains applied, by file order (held-out views: 1)."""
    folder = os.path.join(root, "image")
    names = sorted(os.listdir(folder))
    rng = np.random.default_rng(seed)
    gains = np.ones((len(names), 3))
    for i in holdout_split(len(names), "train", 8):
        gains[i] = np.exp(rng.uniform(-spread, spread) + rng.uniform(-0.1, 0.1, 3))
        path = os.path.join(folder, names[i])
        image = imageio.imread(path).astype(np.float64)
        image[..., :3] = np.clip(image[..., :3] * gains[i], 0, 255)
        imageio.imwrite(path, image.round().astype(np.uint8))
    return gains


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--resolution", type=int, default=128, help="the demo's images, pixels a side")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="each run once per training seed")
    args, rest = parser.parse_known_args()
    overrides = [a for a in rest if a != "--"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="nsr-exposure-") as tmp:
        rendered, changed, size = demo_scene_and_copy(tmp, args.resolution, "changed")
        gains = change_exposures(changed)
        trained = gains[holdout_split(len(gains), "train", 8)]
        print(f"exposure gains of the {len(trained)} training images: {trained.min():.2f} to {trained.max():.2f}")
        for case in args.cases:
            masks, scene = case.split("-")
            for correction in ("false", "true"):
                for seed in args.seeds:
                    print(f"running {case}, exposure_correction={correction}, seed {seed} ...", flush=True)
                    run = [f"dataset.root_dir={changed if scene == 'changed' else rendered}", *size,
                           f"model.exposure_correction={correction}", *(NO_MASKS if masks == "nomask" else []),
                           f"seed={seed}", *overrides]
                    row = run_config(CONFIG, run, os.path.join(tmp, f"{case}-{correction}-seed{seed}"))
                    rows.append(((case, "on" if correction == "true" else "off"), {**row, "seed": seed}))
    print_runs({"case": 16, "correction": 10}, rows)


if __name__ == "__main__":
    main()
