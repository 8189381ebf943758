"""Compile the Triton hash-grid kernels for a CUDA GPU on a machine without one.

Triton's interpreter (how the parity tests run on a CPU) executes the kernels
as NumPy: it never checks a launch's keyword arguments against the kernel's
signature, never lowers to PTX, and says nothing of registers, spills or the
instructions a GPU would run. This module goes through Triton's own launch
path (argument binding, specialisation, compilation to PTX and, with the
``ptxas`` that ships in Triton's wheel, to a cubin) with a driver that only
reports a target architecture, and stops before anything is launched. Every
kernel is reached through the same Python wrappers the encoding calls, so a
wrong launch argument fails here as it would on the GPU.

What it reports per kernel, read from the compiled code: registers and spill
stores (``ptxas -v``), shared memory, and the PTX's global loads, atomics and
block barriers.

Run it in a process where ``TRITON_INTERPRET`` is unset: Triton decides
between interpreter and compiler when a kernel is defined, at import.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import torch


@dataclass
class KernelReport:
    kernel: str
    variant: str
    arch: int
    registers: int
    spilled_bytes: int  # ptxas's spill stores per thread: anything but 0 costs throughput
    shared_bytes: int
    num_warps: int
    global_loads: int  # ld.global instructions in the PTX (each one per thread, per program)
    reductions: int  # relaxed atomics (red.*, or atom.relaxed): the scatter-adds of the backward passes
    ordered_atomics: int  # atomics with acquire/release semantics: each one waits, and Triton adds barriers
    barriers: int  # bar.sync: the whole block waits
    fused_multiply_adds: int  # fma.rn.f32 in the PTX: none means multiply-add fusion was off for this launch
    tensor_core_products: int  # mma.sync / wgmma / tcgen05.mma instructions: matrix products on tensor cores
    ptx_lines: int

    def as_dict(self) -> dict:
        return asdict(self)


class CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: names a target, owns no device, launches nothing."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch  # Triton caches compiled kernels per device: one 'device' per architecture

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class _CompileInsteadOfLaunch:
    """Replaces a kernel in its module: ``kernel[grid](...)`` compiles (Triton's warmup) and records the result."""

    def __init__(self, kernel, name: str, sink: list):
        self.kernel, self.name, self.sink = kernel, name, sink

    def __getitem__(self, grid):
        def compile_only(*args, **kwargs):
            self.sink.append((self.name, self.kernel.warmup(*args, grid=grid, **kwargs)))

        return compile_only


def _ptxas_usage(ptx: str) -> dict:
    """Registers and spill stores of a kernel, from ``ptxas -v`` (the ptxas Triton itself compiles with)."""
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    from triton.backends.nvidia import compiler

    if hasattr(compiler, "get_ptxas"):  # newer Tritons pick a ptxas per architecture (a newer one for sm_90 on)
        try:
            found = compiler.get_ptxas(int(re.sub(r"\D", "", arch)))
        except TypeError:
            found = compiler.get_ptxas()
        ptxas = found[0] if isinstance(found, tuple) else found.path
    else:  # Triton 3.2
        ptxas = compiler._path_to_binary("ptxas")[0]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o",
                              os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {"registers": int(registers.group(1)), "spill": int(spills.group(1)) if spills else 0}


def _report(name: str, variant: str, arch: int, compiled) -> KernelReport:
    ptx = compiled.asm["ptx"]
    ops = collections.Counter()
    for op in re.findall(r"^\s*(?:@%p\d+\s+)?((?:ld\.global|red\.|atom\.|bar\.sync)\S*)", ptx, re.M):
        if op.startswith(("red.", "atom.")):  # older Tritons (3.2) write relaxed atomics as atom.relaxed
            op = "relaxed" if op.startswith("red.") or ".relaxed." in op else "ordered"
        ops[op.split(".")[0] if op.startswith("ld.") else op] += 1
    usage = _ptxas_usage(ptx)
    return KernelReport(kernel=name, variant=variant, arch=arch, registers=usage["registers"],
                        spilled_bytes=usage["spill"], shared_bytes=compiled.metadata.shared,
                        num_warps=compiled.metadata.num_warps, global_loads=ops["ld"], reductions=ops["relaxed"],
                        ordered_atomics=ops["ordered"], barriers=ops["bar.sync"],
                        fused_multiply_adds=len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
                        tensor_core_products=len(re.findall(r"\b(?:mma\.sync|wgmma\.mma_async|tcgen05\.mma)\b", ptx)),
                        ptx_lines=ptx.count("\n"))


def _compile_launches(module, names: tuple, launches, arch: int) -> list[KernelReport]:
    """Runs each (variant, launch) with ``module``'s kernels ``names`` swapped for compile-only stand-ins
    and a driver that targets sm_<arch>: the kernels each launch reaches, compiled and reported."""
    from triton.runtime.driver import driver

    if module.triton is None:
        raise RuntimeError("triton is not installed")
    if getattr(module, names[0]).__class__.__name__ == "InterpretedFunction":
        raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels were defined for the interpreter; unset it")
    originals = {name: getattr(module, name) for name in names}
    compiled: list = []
    reports: list[KernelReport] = []
    state = vars(driver)  # Triton >= 3.3 keeps '_active' (None until first use), 3.2 'active' (a lazy proxy)
    previous = state.get("_active", state.get("active"))
    driver.set_active(CompileOnlyDriver(arch))
    try:
        for name in names:
            setattr(module, name, _CompileInsteadOfLaunch(originals[name], name, compiled))
        for variant, launch in launches():
            compiled.clear()
            launch()
            reports += [_report(name, variant, arch, kernel) for name, kernel in compiled]
    finally:
        driver.set_active(previous)
        for name, kernel in originals.items():
            setattr(module, name, kernel)
    return reports


def compile_hash_grid_kernels(arch: int = 90) -> list[KernelReport]:
    """Every kernel the Triton encoding launches, compiled for sm_<arch>, through the encoding's own wrappers.

    Variants: fp32 and fp16 table reads; the backward with and without the input gradient.
    """
    import models.triton_hashgrid as th

    def launches():
        L, D, F = 2, 3, 2
        k = th.GridConstants(torch.tensor([3.0, 7.0]), torch.tensor([64, 64]), torch.tensor([0, 64]),
                             torch.tensor([0, 1]), torch.tensor([[1, 5, 25], [1, 9, 81]]),
                             torch.tensor([1, 2654435761, 805459861]), L, D, F)
        k.vector_atomics = th.has_vector_reductions(divmod(arch, 10))  # as the constants would say on that GPU
        n = 5
        x, gy, ggx = torch.rand(n, D), torch.zeros(n, L * F), torch.zeros(n, D)
        for dtype in (torch.float32, torch.float16):
            table = torch.zeros(128, F, dtype=dtype)
            tag = str(dtype).removeprefix("torch.")
            yield f"{tag} table", lambda: th.encode_forward(x, table, k)
            yield f"{tag} table, with input gradient", lambda: th.encode_backward(x, table, gy, k, True)
            yield f"{tag} table, table gradient only", lambda: th.encode_backward(x, table, gy, k, False)
            yield f"{tag} table", lambda: th.encode_double_backward(x, table, gy, ggx, k)

    return _compile_launches(th, ("_forward_kernel", "_backward_kernel", "_double_backward_kernel"), launches, arch)


def compile_rendering_kernels(arch: int = 90) -> list[KernelReport]:
    """The fused rendering kernels (``models.triton_rendering``), compiled for sm_<arch> through their wrappers.

    Variants: NeuS opacity backward with and without the direction/distance gradients; compositing NeuS's 7
    channels with the weights' gradient and NeRF's 4 without it; the unit normal; NeRF's early-stop pass; marching.
    """
    import models.triton_rendering as tr

    def launches():
        S = 6
        sdf, dists, inv_s = torch.zeros(S, requires_grad=True), torch.full((S,), 0.01), torch.tensor(20.0)
        dirs, normal, ratio = torch.zeros(S, 3), torch.zeros(S, 3, requires_grad=True), torch.tensor(1.0)
        yield "forward", lambda: tr.neus_alpha(sdf, dirs, normal, dists, inv_s, ratio)
        yield "backward, sdf and normal", lambda: tr.neus_alpha(sdf, dirs, normal, dists, inv_s, ratio).sum().backward()
        yield "backward, all inputs", lambda: tr.neus_alpha(sdf, dirs.requires_grad_(), normal, dists.requires_grad_(),
                                                            inv_s.requires_grad_(), ratio).sum().backward()
        ray_indices = torch.tensor([0, 0, 0, 1, 1, 3])
        for channels, use_weights in ((7, True), (4, False)):
            alphas, values = torch.zeros(S, requires_grad=True), torch.zeros(S, channels, requires_grad=True)

            def both_passes(alphas=alphas, values=values, use_weights=use_weights):
                weights, sums = tr.composite(alphas, values, ray_indices, 4)
                (sums.sum() + (weights.sum() if use_weights else 0)).backward()

            yield f"{channels} channels, {'with' if use_weights else 'without'} weight gradient", both_passes
        grad = torch.zeros(S, 3, requires_grad=True)
        yield "unit normal", lambda: tr.unit_normal(grad)
        yield "unit normal, both outputs used", lambda: sum(t.sum() for t in tr.unit_normal(grad)).backward()
        t = torch.zeros(S)
        yield "early stop", lambda: tr.visible_by_density(t, t, t, ray_indices, 4, 1e-4, 0.0)

    names = ("_neus_alpha_forward_kernel", "_neus_alpha_backward_kernel", "_composite_forward_kernel",
             "_composite_backward_kernel", "_visibility_kernel", "_unit_normal_forward_kernel",
             "_unit_normal_backward_kernel")
    return _compile_launches(tr, names, launches, arch) + _compile_marching_kernels(arch)


def _compile_marching_kernels(arch: int) -> list[KernelReport]:
    """Marching's count and fill passes, through the grid, over one level and over several, uniform and cone."""
    import models.triton_marching as tm

    def launches():
        rays_o, rays_d = torch.zeros(4, 3), torch.ones(4, 3)
        for levels, use_grid, cone_angle in ((1, True, 0.0), (4, True, 0.0), (1, False, 0.0), (4, True, 0.004)):
            aabbs = torch.tensor([[-1.0, -1, -1, 1, 1, 1]]).repeat(levels, 1)
            march = tm.GridMarch(rays_o, rays_d, aabbs, torch.ones(levels, 8, 8, 8, dtype=torch.bool),
                                 torch.zeros(4), 10, 0.1, 0.0, 1e10, use_grid, cone_angle)
            tag = (f"{levels} level{'s' if levels > 1 else ''}{'' if use_grid else ', grid off'}"
                   f"{', cone' if cone_angle else ''}")
            yield f"count, {tag}", march.count
            yield f"fill, {tag}", lambda march=march: march.fill(torch.zeros(4, dtype=torch.int64), 4)

    return _compile_launches(tm, ("_march_kernel",), launches, arch)


def compile_mlp_kernels(arch: int = 90) -> list[KernelReport]:
    """The fused MLP's forward and per-layer backward (``models.triton_mlp``), compiled for sm_<arch>.

    Variants: the shapes the configs train, the colour network (32 -> 64 -> 64 -> 3) and NeRF's density network
    (32 -> 64 -> 16), with the TF32 products a GPU runs (fp32 products are for the interpreter).
    """
    from unittest import mock

    import models.triton_mlp as tm

    def launches():
        for name, shape in (("colour", tm.MLPShape(32, 64, 2, 3)), ("density", tm.MLPShape(32, 64, 1, 16))):
            x, packed, grad_out = torch.zeros(5, shape.d_in), tm.pack(shape.zero_params()), torch.zeros(5, shape.d_out)
            tag = f"{name} {'-'.join(map(str, shape.dims))}"
            yield tag, lambda x=x, packed=packed, shape=shape: tm.fused_forward(x, packed, shape)
            yield tag, lambda x=x, packed=packed, grad_out=grad_out, shape=shape: tm.fused_backward(
                x, packed, grad_out, shape, True)

    with mock.patch.object(tm, "_precision", lambda: "tf32"):
        return _compile_launches(tm, ("_mlp_forward_kernel", "_mlp_backward_kernel"), launches, arch)


def compile_sdf_network_kernels(arch: int = 90) -> list[KernelReport]:
    """NeuS's geometry network fused with its input gradient (``models.triton_sdf_network``): the forward and the
    per-layer backward for the shape the configs train, 35 (32 grid features + xyz) -> 64 -> 13, Softplus(100),
    with TF32 products, compiled for sm_<arch>."""
    from unittest import mock

    import models.triton_mlp as tm
    import models.triton_sdf_network as tsn

    def launches():
        shape = tm.MLPShape(35, 64, 1, 13)
        x, packed = torch.zeros(5, shape.d_in), tm.pack(shape.zero_params())
        tag = f"sdf {'-'.join(map(str, shape.dims))}"
        yield tag, lambda: tsn.sdf_forward(x, packed, shape, tsn.SOFTPLUS_BETA)
        yield tag, lambda: tsn.sdf_backward(x, packed, torch.zeros(5, shape.d_out), torch.zeros(5, shape.d_in), shape,
                                            tsn.SOFTPLUS_BETA, True)

    with mock.patch.object(tm, "_precision", lambda: "tf32"):
        return _compile_launches(tsn, ("_sdf_forward_kernel", "_sdf_backward_kernel"), launches, arch)
