#!/usr/bin/env bash
# Every GPU figure the benchmarks give, in stages that each fit a 10-minute slot:
#
#   bash benchmarks/gpu_stages.sh OUT_DIR env parity encoding step     # ~8 min on an H100
#   bash benchmarks/gpu_stages.sh OUT_DIR render                       # NeRF and NeuS step per rendering backend
#   bash benchmarks/gpu_stages.sh OUT_DIR mlp                          # fused Triton MLPs vs cuBLAS, in NeRF and NeuS steps
#   bash benchmarks/gpu_stages.sh OUT_DIR train-fast                   # NeRF + NeuS, 20k steps, fastest grid
#   bash benchmarks/gpu_stages.sh OUT_DIR train-torch                  # the same with the PyTorch grid, 2k steps
#
# Each stage tees its output to OUT_DIR/<stage>.log. Wheels in .whl/ (for a machine without the
# registries) are installed to /tmp/site first.
set -o pipefail
out=${1:?usage: gpu_stages.sh OUT_DIR STAGE...}; shift
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
demo="--demo-resolution 800"
status=0
for stage in "$@"; do
    case $stage in
        env) cmd="nvidia-smi; python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'; python3 -c 'from models import backends; print({k: f() for k, f in backends._STATUS.items()})'" ;;
        parity) cmd="python3 -m pytest -q -rs tests/test_triton_hashgrid.py tests/test_triton_rendering.py tests/test_triton_mlp.py tests/test_triton_sdf_network.py tests/test_nerfacc_parity.py tests/test_hashgrid.py tests/test_host_syncs.py" ;;
        render) cmd="for b in torch triton nerfacc; do python3 benchmarks/bench_step.py --configs configs/nerf-blender.yaml configs/neus-blender.yaml $demo --steps 100 -- model.rendering_backend=\$b; done; python3 benchmarks/bench_render.py --size 800 800" ;;
        mlp) cmd="python3 benchmarks/bench_mlp.py; python3 benchmarks/bench_step.py --configs configs/nerf-blender.yaml $demo --steps 100 -- +model.geometry.mlp_network_config.backend=triton +model.texture.mlp_network_config.backend=triton; python3 benchmarks/bench_step.py --configs configs/neus-blender.yaml $demo --steps 100 -- +model.geometry.mlp_network_config.backend=triton +model.texture.mlp_network_config.backend=triton" ;;
        encoding) cmd="python3 benchmarks/bench_encoding.py" ;;
        step) cmd="python3 benchmarks/bench_step.py --configs configs/nerf-blender.yaml configs/neus-blender.yaml $demo --steps 100" ;;
        train-fast) cmd="python3 benchmarks/bench_train.py --steps 20000 --backends triton tcnn" ;;
        train-torch) cmd="python3 benchmarks/bench_train.py --steps 2000 --backends torch" ;;
        *) echo "unknown stage $stage"; exit 2 ;;
    esac
    echo "== $stage: $cmd" | tee "$out/$stage.log"
    bash -c "$cmd" 2>&1 | grep --line-buffered -v "it/s\]" | tee -a "$out/$stage.log" || status=1
done
exit $status
