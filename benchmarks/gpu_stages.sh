#!/usr/bin/env bash
# Every GPU figure the benchmarks give, in stages that each fit a 10-minute slot:
#
#   bash benchmarks/gpu_stages.sh OUT_DIR env parity encoding step     # parity tests, encoding and step profiles
#   bash benchmarks/gpu_stages.sh OUT_DIR render                       # NeRF and NeuS step per rendering backend
#   bash benchmarks/gpu_stages.sh OUT_DIR mlp                          # fused Triton MLPs vs cuBLAS, in NeRF and NeuS steps
#   bash benchmarks/gpu_stages.sh OUT_DIR neus-20k nerf-20k            # launch.py as a user runs it, 800x800 demo scene
#   bash benchmarks/gpu_stages.sh OUT_DIR train-fast                   # NeRF + NeuS, 20k steps, fastest grid (table)
#   bash benchmarks/gpu_stages.sh OUT_DIR train-torch                  # the same with the PyTorch grid, 2k steps
#
# BUDGET_S=570 ends the whole call within that many seconds (a lease's slot): each stage runs under `timeout`
# of what is left, and of its own cap (STAGE_CAP_S, e.g. PARITY_CAP_S=150). A launch.py stage stopped by the
# timeout saves a checkpoint and its log keeps the progress bar's rates, so a cut run still gives steps/s.
# Each stage tees its output to OUT_DIR/<stage>.log. Wheels in .whl/ (for a machine without the registries)
# are installed to /tmp/site first. The demo scene at 800x800 is rendered into load/demo-800 on first use.
#
# A leased machine reaches nothing outside, and its image has torch and Lightning but not the rest: make both
# here first with `bash benchmarks/prepare_gpu_carry.sh` (about 3 minutes on 2 cores, 34 MB) and carry them.
# nerfacc compiles its kernels on first use (minutes): leave it out unless measured.
set -o pipefail
out=${1:?usage: gpu_stages.sh OUT_DIR STAGE...}; shift
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then  # by name: pip takes the wheel for this Python (PyMCubes: cp310-312)
    names=$(ls .whl/*.whl | sed 's|.*/||; s|-.*||' | sort -u)
    python3 -m pip install -q --no-index --find-links .whl --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site $names && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
        || echo "== the wheels in .whl/ did not install (for Python $(python3 -V)): stages that need them will fail"
fi
export PYTHONUNBUFFERED=1
budget=${BUDGET_S:-100000}  # against bash's SECONDS, from the script's start: the wheels' install counts
demo="--demo-resolution 800"
scene="dataset.name=demo +dataset.layout=blender +dataset.render_resolution=800 dataset.root_dir=load/demo-800"
scene="$scene dataset.img_wh=[800,800] trainer.max_steps=20000 trainer.val_check_interval=20000"
# LPIPS fetches AlexNet's weights on first use: a machine that reaches nothing outside could wait for the connection
scene="$scene +system.lpips=false"
exp=/tmp/nsr-gpu-stages
# launch.py on the demo scene, then the scores it wrote
user_run() {
    echo "python3 launch.py --config configs/$1.yaml --train --exp_dir $exp --runs_dir $exp/runs $scene; \
cat $exp/$1-*/*/save/*-metrics.json 2>/dev/null"
}
# the progress bar's lines: kept for launch.py's stages (it draws 100 times into a file), dropped elsewhere
progress_lines() {
    case $1 in *-20k) cat ;; *) grep --line-buffered -v "it/s\]" ;; esac
}
status=0
for stage in "$@"; do
    case $stage in
        env) cmd="nvidia-smi; python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'; python3 -c 'from models import backends; print({k: f() for k, f in backends._STATUS.items()})'" ;;
        parity) cmd="python3 -m pytest -q -rs tests/test_triton_hashgrid.py tests/test_triton_rendering.py tests/test_triton_mlp.py tests/test_triton_sdf_network.py tests/test_nerfacc_parity.py tests/test_hashgrid.py tests/test_host_syncs.py" ;;
        render) cmd="for b in torch triton nerfacc; do python3 benchmarks/bench_step.py --configs configs/nerf-blender.yaml configs/neus-blender.yaml $demo --steps 100 -- model.rendering_backend=\$b; done; python3 benchmarks/bench_render.py --size 800 800" ;;
        mlp) cmd="python3 benchmarks/bench_mlp.py; python3 benchmarks/bench_step.py --configs configs/nerf-blender.yaml $demo --steps 100 -- +model.geometry.mlp_network_config.backend=triton +model.texture.mlp_network_config.backend=triton; python3 benchmarks/bench_step.py --configs configs/neus-blender.yaml $demo --steps 100 -- +model.geometry.mlp_network_config.backend=triton +model.texture.mlp_network_config.backend=triton" ;;
        encoding) cmd="python3 benchmarks/bench_encoding.py" ;;
        step) cmd="python3 benchmarks/bench_step.py --configs configs/nerf-blender.yaml configs/neus-blender.yaml $demo --steps 100" ;;
        neus-20k) cmd=$(user_run neus-blender) ;;
        nerf-20k) cmd=$(user_run nerf-blender) ;;
        train-fast) cmd="python3 benchmarks/bench_train.py --steps 20000 --backends triton tcnn -- +system.lpips=false" ;;
        train-torch) cmd="python3 benchmarks/bench_train.py --steps 2000 --backends torch -- +system.lpips=false" ;;
        *) echo "unknown stage $stage"; exit 2 ;;
    esac
    cap_name=$(echo "${stage}_CAP_S" | tr 'a-z-' 'A-Z_')
    left=$((budget - SECONDS))
    limit=$(( ${!cap_name:-$left} < left ? ${!cap_name:-$left} : left ))
    if [ "$limit" -le 5 ]; then
        echo "== $stage: skipped, the budget is spent" | tee "$out/$stage.log"; status=1; continue
    fi
    echo "== $stage (at most ${limit}s): $cmd" | tee "$out/$stage.log"
    timeout --kill-after=20 "$limit" bash -c "$cmd" 2>&1 | progress_lines "$stage" | tee -a "$out/$stage.log" || status=1
    echo "== $stage ended after ${SECONDS}s of the budget" | tee -a "$out/$stage.log"
done
exit $status
