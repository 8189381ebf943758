"""Hash-grid encoding throughput per backend present (printed, never asserted).

    python benchmarks/bench_encoding.py                      # N = 2^16 .. 2^22 on a GPU, 2^16 .. 2^18 on a CPU
    python benchmarks/bench_encoding.py --log2-points 16 18 20 --base-resolution 32

Points/s for forward, forward+backward (table and input gradients) and
forward+backward with the second-order term (eikonal loss through analytic
normals), for L=16, F=2, T=2^19, per backend: torch always, tcnn and triton
where usable (triton twice: reading the table in fp32, and in fp16 with
``table_dtype: float16``). On a CPU, ``torch-pm`` is the torch backend in the
point-major layout it uses on CUDA (every gradient by autograd), against which
the CPU's corner-major layout (``torch``) is measured. Prints the device and the
peak memory of each run (GPU only).
"""
from __future__ import annotations

import argparse

import torch

from common import describe_device, time_calls
from models import backends
from models.encodings import HashGrid


def step(grid: HashGrid, x: torch.Tensor, mode: str) -> None:
    if mode == "fwd":
        with torch.no_grad():
            grid(x)
        return
    x = x.requires_grad_(mode == "second")
    y = grid(x)
    if mode == "fwd+bwd":
        y.square().sum().backward()
        return
    normals, = torch.autograd.grad(y.sum(), x, create_graph=True)  # as NeuS's analytic gradient
    ((normals.norm(dim=-1) - 1) ** 2).mean().backward()


def measure(grid, n: int, device, mode: str, repeats: int) -> tuple[float, float]:
    """(points/s, peak MiB)."""
    x = torch.rand(n, 3, device=device)
    seconds, peak = time_calls(lambda: step(grid, x.clone(), mode), device, repeats)
    return n / seconds, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log2-points", type=int, nargs="+")
    parser.add_argument("--base-resolution", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = args.log2_points or (list(range(16, 23, 2)) if device.type == "cuda" else [16, 18])
    print(describe_device(device))
    present = ["torch"] + [b for b in ("triton", "tcnn") if backends._STATUS[b]()[0]]
    absent = {b: backends._STATUS[b]()[1] for b in ("triton", "tcnn") if b not in present}
    for name, reason in absent.items():
        print(f"{name}: not measured ({reason})")
    config = dict(n_levels=16, n_features_per_level=2, log2_hashmap_size=19, base_resolution=args.base_resolution,
                  per_level_scale=1.447269237440378)
    print(f"\nhash grid L=16 F=2 T=2^19 base {args.base_resolution}; points/s (peak MiB)")
    print(f"{'backend':10s} {'N':>9s} {'fwd':>20s} {'fwd+bwd':>20s} {'fwd+bwd+2nd order':>20s}")
    variants = [(b, "float32", b) for b in present]  # (backend, table dtype, label)
    if "triton" in present:
        variants.append(("triton", "float16", "triton-16"))
    if device.type == "cpu":
        variants.insert(1, ("torch", "float32", "torch-pm"))
    for backend, table_dtype, label in variants:
        grid = HashGrid(3, {**config, "table_dtype": table_dtype}, backend=backend).to(device)
        if label == "torch-pm":
            grid._forward_torch = grid._forward_autograd
        for log2n in sizes:
            cells = []
            for mode in ("fwd", "fwd+bwd", "second"):
                rate, peak = measure(grid, 2 ** log2n, device, mode, args.repeats)
                cells.append(f"{rate:10.3e} ({peak:6.0f})")
            print(f"{label:10s} {2 ** log2n:9d} {cells[0]:>20s} {cells[1]:>20s} {cells[2]:>20s}")


if __name__ == "__main__":
    main()
