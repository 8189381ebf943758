#!/usr/bin/env bash
# Make, on this machine (CPU, with the package registries), what a leased GPU machine needs carried to it for
# benchmarks/gpu_stages.sh, since it reaches nothing outside:
#
#   bash benchmarks/prepare_gpu_carry.sh        # then run(..., carry=[".whl", "load/demo-800"])
#
# .whl/          the wheels the leased image lacks (it has torch, Triton and Lightning): OmegaConf and its parser,
#                trimesh, imageio-ffmpeg 0.4.9 (0.8's wheel is 68 MB, over what a call carries) and PyMCubes
#                for CPython 3.10 to 3.12, whichever the image runs (about 28 MB)
# load/demo-800  the demo scene rendered at 800x800 in the Blender layout (5.7 MB; about 3 minutes on 2 cores)
#
# Both are git-ignored, so a new checkout lacks them: run this first in a session that has a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platform="--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64"
for version in 3.10 3.11 3.12; do
    python3 -m pip download -q --no-deps --only-binary=:all: $platform --python-version "$version" -d .whl PyMCubes
done
python3 -m pip download -q --no-deps --only-binary=:all: $platform --python-version 3.12 -d .whl \
    omegaconf==2.3.0 trimesh imageio-ffmpeg==0.4.9
python3 -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w .whl  # OmegaConf's parser: an sdist only
python3 - <<'EOF'
from datasets.synthetic import ensure_demo_scene

print("demo scene:", ensure_demo_scene("load/demo-800", 800, "blender"))
EOF
ls .whl
du -sh .whl load/demo-800
