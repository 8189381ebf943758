"""Small-MLP throughput per backend present (printed, never asserted): does the fused Triton MLP beat cuBLAS?

    python benchmarks/bench_mlp.py                       # N = 2^16 .. 2^22 on a GPU, 2^14 .. 2^16 on a CPU
    python benchmarks/bench_mlp.py --log2-rows 18 20

Rows/s for forward and forward+backward (input and parameter gradients) of
the networks the configs train: the colour network (32 -> 64 -> 64 -> 3) and
NeRF's density network (32 -> 64 -> 16); and NeuS's geometry network
(35 -> 64 -> 13, Softplus(100), weight norm) with the SDF's input gradient
(forward) and a loss on both, the eikonal term included (forward+backward:
autograd's double backward against the fused ``TritonSDFNetwork``). Backends: ``VanillaMLP`` in fp32 and
under fp16 autocast (what 16-mixed training runs), the fused Triton kernels
(TF32 products) and tiny-cuda-nn's FullyFusedMLP, where usable. Prints the
device and the peak memory of each run. The answer decides whether
``backend: auto`` should pick Triton for ``FullyFusedMLP`` networks.
"""
from __future__ import annotations

import argparse
import contextlib

import torch

from common import describe_device, time_calls
from models import backends
from models.networks import TCNNMLP, TritonMLP, TritonSDFNetwork, VanillaMLP

NETWORKS = {"colour 32-64-64-3": (32, 3, 2), "density 32-64-16": (32, 16, 1)}


def build(backend: str, d_in: int, d_out: int, n_hidden: int) -> torch.nn.Module:
    config = {"otype": "FullyFusedMLP", "activation": "ReLU", "output_activation": "none", "n_neurons": 64,
              "n_hidden_layers": n_hidden}
    cls = {"torch": VanillaMLP, "torch-16": VanillaMLP, "triton": TritonMLP, "tcnn": TCNNMLP}[backend]
    return cls(d_in, d_out, config)


def fp16_autocast(device: torch.device, half: bool):
    """fp16 autocast when ``half``, else nothing: torch 2.1 refuses an fp16 CPU autocast even when it is disabled."""
    return torch.autocast(device.type, dtype=torch.float16) if half else contextlib.nullcontext()


SDF_NETWORK = {"otype": "VanillaMLP", "output_activation": "none", "n_neurons": 64, "n_hidden_layers": 1,
               "sphere_init": True, "weight_norm": True}


def measure_sdf(net, x: torch.Tensor, backward: bool, half: bool, repeats: int) -> tuple[float, float]:
    """(rows/s, peak MiB) of the SDF network's output and input gradient, and of a loss on both."""

    def step():
        inputs = x.detach().requires_grad_(True)
        with fp16_autocast(x.device, half):
            if isinstance(net, TritonSDFNetwork):
                out, grad = net.value_and_input_gradient(inputs)
            else:
                out = net(inputs).float()
                (grad,) = torch.autograd.grad(out[:, 0].sum(), inputs, create_graph=backward)
            if backward:
                (out.square().sum() + (grad.float().norm(dim=-1) - 1).square().sum()).backward()

    seconds, peak = time_calls(step, x.device, repeats)
    return x.shape[0] / seconds, peak


def measure(net, x: torch.Tensor, backward: bool, half: bool, repeats: int) -> tuple[float, float]:
    """(rows/s, peak MiB)."""
    device = x.device

    def step():
        with fp16_autocast(device, half):
            if not backward:
                with torch.no_grad():
                    net(x)
                return
            inputs = x.detach().requires_grad_(True)
            net(inputs).float().square().sum().backward()

    seconds, peak = time_calls(step, device, repeats)
    return x.shape[0] / seconds, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log2-rows", type=int, nargs="+")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = args.log2_rows or (list(range(16, 23, 2)) if device.type == "cuda" else [14, 16])
    print(describe_device(device))
    present = ["torch"] + (["torch-16"] if device.type == "cuda" else [])
    for name in ("triton", "tcnn"):
        usable, reason = backends._STATUS[name]()
        if usable:
            present.append(name)
        else:
            print(f"{name}: not measured ({reason})")
    print("\nrows/s (peak MiB)")
    print(f"{'network':18s} {'backend':9s} {'N':>9s} {'fwd':>20s} {'fwd+bwd':>20s}")
    for label, (d_in, d_out, n_hidden) in NETWORKS.items():
        for backend in present:
            net = build(backend, d_in, d_out, n_hidden).to(device)
            for log2n in sizes:
                x = torch.randn(2 ** log2n, d_in, device=device)
                cells = [measure(net, x, backward, backend == "torch-16", args.repeats) for backward in (False, True)]
                print(f"{label:18s} {backend:9s} {2 ** log2n:9d} "
                      + " ".join(f"{rate:10.3e} ({peak:6.0f})".rjust(20) for rate, peak in cells))
    for backend in [name for name in present if name != "tcnn"]:  # tcnn has no SDF network of this kind
        net = (TritonSDFNetwork if backend == "triton" else VanillaMLP)(35, 13, SDF_NETWORK).to(device)
        for log2n in sizes:
            x = torch.randn(2 ** log2n, 35, device=device) * 0.05
            cells = [measure_sdf(net, x, backward, backend == "torch-16", args.repeats) for backward in (False, True)]
            print(f"{'sdf 35-64-13':18s} {backend:9s} {2 ** log2n:9d} "
                  + " ".join(f"{rate:10.3e} ({peak:6.0f})".rjust(20) for rate, peak in cells))


if __name__ == "__main__":
    main()
