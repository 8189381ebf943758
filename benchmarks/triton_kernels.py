"""What the Triton kernels (hash grid, fused rendering, fused MLP) compile to on each GPU architecture, on any machine.

    python benchmarks/triton_kernels.py                 # sm_80 (A100), 86 (RTX 30), 89 (RTX 40), 90 (H100),
                                                        # 100 (B200), 120 (RTX 50)
    python benchmarks/triton_kernels.py --arch 90

Per kernel and variant (fp32/fp16 table reads; backward with or without the
input gradient): registers and spill stores per thread (``ptxas -v``), shared
memory, and the PTX's global loads, relaxed reductions (the scatter-adds),
ordered atomics, block barriers and tensor-core products, per program of 128
points and one level (hash grid), 256 samples (NeuS opacity), 64 rays
(compositing) or 64 rows (MLP forward; 16 rows a step for its backward).
Figures, not timings: a GPU measures those (bench_encoding.py).
"""
from __future__ import annotations

import argparse
import os
import sys

if os.environ.pop("TRITON_INTERPRET", None) == "1":  # Triton reads it when a kernel is defined: restart without it
    os.execv(sys.executable, [sys.executable, *sys.argv])

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.triton_aot import (compile_hash_grid_kernels, compile_mlp_kernels, compile_rendering_kernels,  # noqa: E402
                              compile_sdf_network_kernels)

COLUMNS = ("arch", "kernel", "variant", "registers", "spilled_bytes", "shared_bytes", "global_loads", "reductions",
           "ordered_atomics", "barriers", "fused_multiply_adds", "tensor_core_products", "ptx_lines")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 86, 89, 90, 100, 120],
                        help="compute capabilities x10 (90 = sm_90)")
    args = parser.parse_args()
    import triton

    print(f"triton {triton.__version__}; per program")
    reports = [r for arch in args.arch for r in compile_hash_grid_kernels(arch) + compile_rendering_kernels(arch)
               + compile_mlp_kernels(arch) + compile_sdf_network_kernels(arch)]
    rows = [[str(getattr(r, c)) for c in COLUMNS] for r in reports]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(COLUMNS)]
    print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


if __name__ == "__main__":
    main()
