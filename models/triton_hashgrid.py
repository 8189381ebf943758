"""Multiresolution hash grid in Triton: forward, both gradients, and the second-order term, all levels per launch.

Same parametrisation as ``models.encodings.HashGrid`` (tiny-cuda-nn's): per
level, position = x * scale + 0.5, linear interpolation between the 2^D
corners, dense levels index ``sum_d coord_d * res^d`` modulo the level size,
hashed levels ``xor_d(coord_d * prime_d)`` masked to the power-of-two size;
the table is the same flat (entries, F) array, so weights move freely
between backends. Kernels run over a (point blocks, levels) grid.

Gradients, as tiny-cuda-nn provides them:

- to the table (scatter-add with atomics, accumulated in fp32 whatever the
  table's dtype). The atomics are relaxed: a sum needs no ordering, and
  Triton's default (acquire-release) compiles to ordered atomics with a
  block-wide barrier after each one (``utils/triton_aot.py`` shows it);
- to the input positions (analytic normals);
- second order, for the eikonal loss through analytic normals: the
  gradient of the input gradient with respect to the table and to the
  upstream gradient (the MLP's side). Like tiny-cuda-nn, the input gradient
  is treated as piecewise constant in x within a cell (no x-x Hessian).

On a CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``),
which is how the parity tests check them against the PyTorch reference.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the backend switch reports it
    triton = None

BLOCK = 128
# Compile options stated at every launch. Fused multiply-add is on, as in tiny-cuda-nn (nvcc's default): Triton
# 3.9 warns when it is left to its default, and 3.10 turns that default off, which would slow the kernels and
# change their rounding against the weights a user trained. The interpreter ignores these.
LAUNCH_OPTIONS = dict(num_warps=4, enable_fp_fusion=True)

if triton is not None:

    @triton.jit
    def _block_and_level(scale_ptr, size_ptr, offset_ptr, hashed_ptr, N, BLOCK_N: tl.constexpr):
        """This program's points (rows, in-range mask), its level and the level's constants."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        lvl = tl.program_id(1)
        return (rows, rows < N, lvl, tl.load(scale_ptr + lvl), tl.load(size_ptr + lvl), tl.load(offset_ptr + lvl),
                tl.load(hashed_ptr + lvl))

    @triton.jit
    def _cell(x_ptr, rows, m, lvl, scale, stride_ptr, primes_ptr, D: tl.constexpr):
        """Each point's cell on this level, per dimension (tuples of D): lower grid coordinate, fraction, and
        the level's dense stride and hash prime. Loaded once per program: reloading them per corner costs
        loads the compiler cannot merge across the atomics in between."""
        lo = ()
        frac = ()
        stride = ()
        prime = ()
        for d in tl.static_range(D):
            pos = tl.load(x_ptr + rows * D + d, mask=m, other=0.0).to(tl.float32) * scale + 0.5
            fl = tl.floor(pos)
            lo = lo + (fl.to(tl.int32),)
            frac = frac + (pos - fl,)
            stride = stride + (tl.load(stride_ptr + lvl * D + d),)
            prime = prime + (tl.load(primes_ptr + d),)
        return lo, frac, stride, prime

    @triton.jit
    def _level_index(lo, frac, stride, prime, size, offset, hashed, c: tl.constexpr, D: tl.constexpr):
        """Table row of corner c for every point of the block, and the corner's interpolation weight.

        32-bit integers that wrap, as tiny-cuda-nn's (and the reference's) indices: 64-bit remainders are a
        subroutine on the GPU. Dense levels wrap with a floored modulo (as torch.remainder), so that points
        outside the unit cube read inside the level, never outside the table."""
        idx_dense = tl.zeros_like(lo[0])
        idx_hash = tl.zeros_like(lo[0])
        w = tl.full(frac[0].shape, 1.0, tl.float32)
        for d in tl.static_range(D):
            bit = (c >> (D - 1 - d)) & 1
            coord = lo[d] + bit
            if bit == 1:
                w = w * frac[d]
            else:
                w = w * (1.0 - frac[d])
            idx_dense += coord * stride[d]
            idx_hash = idx_hash ^ (coord * prime[d])
        dense = idx_dense % size
        dense = tl.where(dense < 0, dense + size, dense)
        idx = tl.where(hashed != 0, idx_hash & (size - 1), dense) + offset
        return idx, w

    @triton.jit
    def _weight_partial(frac, c: tl.constexpr, d: tl.constexpr, D: tl.constexpr):
        """d w_c / d frac_d: the product of the other dimensions' weights, signed by the corner's bit."""
        out = tl.full(frac[0].shape, 1.0, tl.float32)
        for e in tl.static_range(D):
            bit = (c >> (D - 1 - e)) & 1
            if e == d:
                if bit == 0:
                    out = -out
            elif bit == 1:
                out = out * frac[e]
            else:
                out = out * (1.0 - frac[e])
        return out

    @triton.jit
    def _scatter_add(ptr, idx, vals, m, F: tl.constexpr, VECTOR: tl.constexpr):
        """ptr[idx[n] * F + f] += vals[n, f] for the block's points, as relaxed atomics (a sum needs no order).

        VECTOR: one (F,)-wide reduction per point (red.global.add.v2.f32 needs sm_90); otherwise one per
        feature on (points,) vectors: on older GPUs the (points, F) form costs a shared-memory layout change
        and four block barriers per call."""
        feat = tl.arange(0, F)
        if VECTOR:
            tl.atomic_add(ptr + idx[:, None] * F + feat[None, :], vals, mask=m[:, None], sem="relaxed")
        else:
            for f in tl.static_range(F):
                column = tl.sum(tl.where(feat[None, :] == f, vals, 0.0), axis=1)
                tl.atomic_add(ptr + idx * F + f, column, mask=m, sem="relaxed")

    @triton.jit
    def _forward_kernel(x_ptr, table_ptr, out_ptr, scale_ptr, size_ptr, offset_ptr, hashed_ptr, stride_ptr,
                        primes_ptr, N, L, D: tl.constexpr, F: tl.constexpr, BLOCK_N: tl.constexpr):
        rows, m, lvl, scale, size, offset, hashed = _block_and_level(scale_ptr, size_ptr, offset_ptr, hashed_ptr, N,
                                                                     BLOCK_N)
        lo, frac, stride, prime = _cell(x_ptr, rows, m, lvl, scale, stride_ptr, primes_ptr, D)
        feat = tl.arange(0, F)
        acc = tl.zeros((BLOCK_N, F), tl.float32)
        for c in tl.static_range(2 ** D):
            idx, w = _level_index(lo, frac, stride, prime, size, offset, hashed, c, D)
            vals = tl.load(table_ptr + idx[:, None] * F + feat[None, :], mask=m[:, None], other=0.0)
            acc += w[:, None] * vals.to(tl.float32)
        tl.store(out_ptr + rows[:, None] * (L * F) + lvl * F + feat[None, :], acc, mask=m[:, None])

    @triton.jit
    def _backward_kernel(x_ptr, table_ptr, gy_ptr, gtable_ptr, gx_ptr, scale_ptr, size_ptr, offset_ptr, hashed_ptr,
                         stride_ptr, primes_ptr, N, L, D: tl.constexpr, DP: tl.constexpr, F: tl.constexpr,
                         NEED_X: tl.constexpr, VECTOR: tl.constexpr, BLOCK_N: tl.constexpr):
        """gtable[row] += w * gy (fp32 atomics); gx[n, d] += scale * sum_c dw_c/dfrac_d <table[row_c], gy>.

        DP is D padded to a power of two (the width of the gx accumulator)."""
        rows, m, lvl, scale, size, offset, hashed = _block_and_level(scale_ptr, size_ptr, offset_ptr, hashed_ptr, N,
                                                                     BLOCK_N)
        feat = tl.arange(0, F)
        gy = tl.load(gy_ptr + rows[:, None] * (L * F) + lvl * F + feat[None, :], mask=m[:, None], other=0.0)
        gy = gy.to(tl.float32)  # (BLOCK_N, F): the upstream gradient of this level's features
        lo, frac, stride, prime = _cell(x_ptr, rows, m, lvl, scale, stride_ptr, primes_ptr, D)
        dims = tl.arange(0, DP)
        gx = tl.zeros((BLOCK_N, DP), tl.float32)  # summed over the corners here: one atomic per point and dim
        for c in tl.static_range(2 ** D):
            idx, w = _level_index(lo, frac, stride, prime, size, offset, hashed, c, D)
            _scatter_add(gtable_ptr, idx, w[:, None] * gy, m, F, VECTOR)
            if NEED_X:
                vals = tl.load(table_ptr + idx[:, None] * F + feat[None, :], mask=m[:, None], other=0.0)
                dot = tl.sum(vals.to(tl.float32) * gy, axis=1)
                for d in tl.static_range(D):
                    part = _weight_partial(frac, c, d, D)
                    gx += tl.where(dims[None, :] == d, (part * dot)[:, None], 0.0)
        if NEED_X:
            tl.atomic_add(gx_ptr + rows[:, None] * D + dims[None, :], scale * gx, mask=m[:, None] & (dims[None, :] < D),
                          sem="relaxed")

    @triton.jit
    def _double_backward_kernel(x_ptr, table_ptr, gy_ptr, ggx_ptr, gtable_ptr, ggy_ptr, scale_ptr, size_ptr,
                                offset_ptr, hashed_ptr, stride_ptr, primes_ptr, N, L, D: tl.constexpr,
                                F: tl.constexpr, VECTOR: tl.constexpr, BLOCK_N: tl.constexpr):
        """Adjoint of the input gradient gx = J(table, gy) for an upstream ggx (N, D):
        gtable[row_c] += s * a_c * gy and ggy[n, l] = s * sum_c a_c table[row_c], a_c = sum_d ggx_d dw_c/dfrac_d."""
        rows, m, lvl, scale, size, offset, hashed = _block_and_level(scale_ptr, size_ptr, offset_ptr, hashed_ptr, N,
                                                                     BLOCK_N)
        feat = tl.arange(0, F)
        gy = tl.load(gy_ptr + rows[:, None] * (L * F) + lvl * F + feat[None, :], mask=m[:, None], other=0.0)
        gy = gy.to(tl.float32)  # (BLOCK_N, F): the upstream gradient of this level's features
        lo, frac, stride, prime = _cell(x_ptr, rows, m, lvl, scale, stride_ptr, primes_ptr, D)
        ggx = ()
        for d in tl.static_range(D):
            ggx = ggx + (tl.load(ggx_ptr + rows * D + d, mask=m, other=0.0).to(tl.float32),)
        acc = tl.zeros((BLOCK_N, F), tl.float32)
        for c in tl.static_range(2 ** D):
            idx, _ = _level_index(lo, frac, stride, prime, size, offset, hashed, c, D)
            a = tl.zeros(rows.shape, tl.float32)
            for d in tl.static_range(D):
                a += ggx[d] * _weight_partial(frac, c, d, D)
            a = a * scale
            _scatter_add(gtable_ptr, idx, a[:, None] * gy, m, F, VECTOR)
            vals = tl.load(table_ptr + idx[:, None] * F + feat[None, :], mask=m[:, None], other=0.0)
            acc += a[:, None] * vals.to(tl.float32)
        tl.store(ggy_ptr + rows[:, None] * (L * F) + lvl * F + feat[None, :], acc, mask=m[:, None])


def has_vector_reductions(capability: tuple[int, int]) -> bool:
    """Whether a CUDA GPU of this compute capability has red.global.add.v2.f32 (Hopper, sm_90, and later)."""
    return tuple(capability) >= (9, 0)


def _wrap_int32(values: torch.Tensor) -> torch.Tensor:
    """int64 -> int32 keeping the low 32 bits (two's complement), as a C cast would."""
    return ((values.long() + 2 ** 31) % 2 ** 32 - 2 ** 31).int().contiguous()


class GridConstants:
    """Per-level constants on a device, as the kernels read them."""

    def __init__(self, scale, size, offset, hashed, dense_stride, primes, n_levels: int, n_dims: int, n_feats: int):
        self.scale = scale.float().contiguous()
        self.size = size.int().contiguous()
        self.offset = offset.int().contiguous()
        self.hashed = hashed.int().contiguous()
        self.stride = _wrap_int32(dense_stride)  # (L, D); only dense levels use it, and theirs fit
        self.primes = _wrap_int32(primes)  # 2654435761 > 2^31: the same low 32 bits, as a signed int
        self.L, self.D, self.F = n_levels, n_dims, n_feats
        if (int(offset[-1]) + int(size[-1])) * n_feats >= 2 ** 31:
            raise ValueError("hash grid table too large for the Triton kernels' 32-bit indices")
        self.DP = 1 << (n_dims - 1).bit_length()  # D padded to a power of two, for (points, dims) blocks
        # vector float reductions (one atomic per point for all F features) exist from sm_90 on; ROCm builds
        # report AMD architectures as capabilities too, so only NVIDIA ones count
        self.vector_atomics = (self.scale.is_cuda and torch.version.hip is None
                               and has_vector_reductions(torch.cuda.get_device_capability(self.scale.device)))

    def args(self):
        return self.scale, self.size, self.offset, self.hashed, self.stride, self.primes


def _grid(n: int, L: int):
    return (triton.cdiv(n, BLOCK), L)


def encode_forward(x: torch.Tensor, table: torch.Tensor, k: GridConstants) -> torch.Tensor:
    """(N, D) in [0, 1] and (entries, F) table -> (N, L * F) float32."""
    n = x.shape[0]
    out = torch.empty(n, k.L * k.F, device=x.device, dtype=torch.float32)
    if n:
        _forward_kernel[_grid(n, k.L)](x, table, out, *k.args(), n, k.L, D=k.D, F=k.F, BLOCK_N=BLOCK,
                                       **LAUNCH_OPTIONS)
    return out


def encode_backward(x, table, gy, k: GridConstants, need_x: bool):
    """(gradient to the table (entries, F) float32, gradient to x (N, D) float32 or None)."""
    n = x.shape[0]
    gtable = torch.zeros(table.shape, device=x.device, dtype=torch.float32)
    gx = torch.zeros(n, k.D, device=x.device, dtype=torch.float32) if need_x else gtable  # dummy pointer if unused
    if n:
        _backward_kernel[_grid(n, k.L)](x, table, gy, gtable, gx, *k.args(), n, k.L, D=k.D, DP=k.DP, F=k.F,
                                        NEED_X=need_x, VECTOR=k.vector_atomics, BLOCK_N=BLOCK, **LAUNCH_OPTIONS)
    return gtable, (gx if need_x else None)


def encode_double_backward(x, table, gy, ggx, k: GridConstants):
    """(gradient to the table float32, gradient to gy) of <ggx, input gradient>."""
    n = x.shape[0]
    gtable = torch.zeros(table.shape, device=x.device, dtype=torch.float32)
    ggy = torch.empty(n, k.L * k.F, device=x.device, dtype=torch.float32)
    if n:
        _double_backward_kernel[_grid(n, k.L)](x, table, gy, ggx, gtable, ggy, *k.args(), n, k.L, D=k.D, F=k.F,
                                               VECTOR=k.vector_atomics, BLOCK_N=BLOCK, **LAUNCH_OPTIONS)
    return gtable, ggy


class _Encode(torch.autograd.Function):
    """``table`` is the trained tensor (gradients come back in its dtype); the kernels gather from ``read``,
    the same values in the table dtype the kernels should read (e.g. an fp16 copy of an fp32 table)."""

    @staticmethod
    def forward(ctx, x, table, read, k):
        ctx.save_for_backward(x, table, read)
        ctx.k = k
        return encode_forward(x, read, k)

    @staticmethod
    def backward(ctx, gy):
        x, table, read = ctx.saved_tensors
        gtable, gx = _EncodeBackward.apply(x, table, read, gy.contiguous(), ctx.k, ctx.needs_input_grad[0])
        return gx, gtable, None, None


class _EncodeBackward(torch.autograd.Function):
    """The backward pass as a differentiable function, so the eikonal loss reaches the table and the MLP."""

    @staticmethod
    def forward(ctx, x, table, read, gy, k, need_x):
        ctx.save_for_backward(x, table, read, gy)
        ctx.k = k
        gtable, gx = encode_backward(x, read, gy, k, need_x)
        return gtable.to(table.dtype), gx

    @staticmethod
    def backward(ctx, g_gtable, g_gx):
        x, table, read, gy = ctx.saved_tensors
        k = ctx.k
        grad_table = grad_gy = None
        if g_gx is not None:
            grad_table, grad_gy = encode_double_backward(x, read, gy, g_gx.contiguous(), k)
            grad_table = grad_table.to(table.dtype)
        if g_gtable is not None:  # gtable is a scatter of gy: its adjoint gathers, i.e. the forward pass
            gathered = encode_forward(x, g_gtable.contiguous(), k)
            grad_gy = gathered if grad_gy is None else grad_gy + gathered
        return None, grad_table, None, grad_gy, None, None


def hash_encode(x: torch.Tensor, table: torch.Tensor, k: GridConstants, read_dtype: torch.dtype | None = None
                ) -> torch.Tensor:
    """Differentiable hash encoding: (N, D) positions in [0, 1], (entries, F) table -> (N, L * F) float32.

    ``read_dtype`` (e.g. torch.float16): the kernels gather from a copy of the table in that dtype (half
    the bytes per lookup, the whole table twice as likely to stay in cache); gradients still accumulate in
    fp32 and come back in the table's own dtype.
    """
    table = table.contiguous()
    read = table if read_dtype is None or read_dtype == table.dtype else table.detach().to(read_dtype)
    return _Encode.apply(x.contiguous(), table, read, k)


def selftest(device: str) -> None:
    """Compile and run every kernel once on a tiny grid (raises if this device cannot run one of them).

    Includes the second-order kernel (the eikonal loss through analytic normals), so that 'auto' falls back to
    PyTorch at start-up rather than failing at the first NeuS step."""
    scale = torch.tensor([3.0, 7.0], device=device)
    size = torch.tensor([64, 64], device=device)
    k = GridConstants(scale, size, torch.tensor([0, 64], device=device), torch.tensor([0, 1], device=device),
                      torch.tensor([[1, 5, 25], [1, 9, 81]], device=device),
                      torch.tensor([1, 2654435761, 805459861], device=device), 2, 3, 2)
    table = torch.zeros(128, 2, device=device, requires_grad=True)
    x = torch.rand(5, 3, device=device, requires_grad=True)
    y = hash_encode(x, table, k)
    dx, = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True)
    (y.sum() + dx.square().sum()).backward()
