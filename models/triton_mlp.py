"""A fully fused MLP in Triton: tiny-cuda-nn's ``FullyFusedMLP`` without the build.

The network is ``VanillaMLP``'s: ``n_hidden_layers`` ReLU layers of width
``n_neurons`` (a power of two, 16 to 128), then a linear output (the output
activation stays in PyTorch). The parameters are the ``nn.Linear`` weights
and biases, used as they are, so checkpoints interchange with ``VanillaMLP``.

- ``forward``: each program takes ``BLOCK_ROWS`` rows through every layer with
  the activations in registers; only the input and the output touch memory
  (PyTorch writes and reads every hidden activation, twice over in the
  backward).
- ``backward``: one launch per layer. Each program walks the row blocks
  p, p + P, p + 2P, ..., recomputes the forward for a block (cheaper than
  storing activations), carries the output gradient down to its layer and
  accumulates that layer's weight and bias gradients in registers. The first
  layer's programs also write the input gradient. Each program writes its
  partial sums to its own row of a (P, n_params) buffer, summed in one
  operation: no atomics, so the gradients are the same on every run.

On a GPU the matrix products run on tensor cores in TF32 (10-bit mantissa,
fp32 range and accumulation: tiny-cuda-nn's FullyFusedMLP runs fp16); under
Triton's interpreter (``TRITON_INTERPRET=1``, the parity tests on a CPU) in
full fp32. Inputs may be fp16 (autocast); the arithmetic and the output are
fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

from models.backends import triton_interpreted as backends_interpreted
from models.triton_hashgrid import LAUNCH_OPTIONS  # fused multiply-add and warps, stated in one place

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the backend switch reports it
    triton = None

BLOCK_ROWS = 64
BACKWARD_BLOCK_ROWS = 16
WIDTHS = (16, 32, 64, 128)  # hidden widths the kernels take (tl.dot needs 16 or more; tcnn's FullyFusedMLP: 16-128)
PROGRAMS_PER_SM = 4  # backward programs per multiprocessor: enough to fill the GPU, few partial rows to sum
INTERPRETED_PROGRAMS = 4
BACKWARD_OPTIONS = dict(LAUNCH_OPTIONS, num_warps=4)  # the backward holds a layer's weight gradient in registers

if triton is not None:

    @triton.jit
    def _weight(p_ptr, BASE: tl.constexpr, IN: tl.constexpr, IN_PAD: tl.constexpr, OUT: tl.constexpr,
                OUT_PAD: tl.constexpr):
        """Linear layer's weight (OUT, IN), row-major at p_ptr + BASE, as an (OUT_PAD, IN_PAD) tile, 0-padded."""
        o = tl.arange(0, OUT_PAD)
        i = tl.arange(0, IN_PAD)
        return tl.load(p_ptr + BASE + o[:, None] * IN + i[None, :], mask=(o[:, None] < OUT) & (i[None, :] < IN),
                       other=0.0)

    @triton.jit
    def _linear(h, p_ptr, BASE: tl.constexpr, IN: tl.constexpr, IN_PAD: tl.constexpr, OUT: tl.constexpr,
                OUT_PAD: tl.constexpr, PRECISION: tl.constexpr):
        """h (BLOCK, IN_PAD) -> h W^T + b (BLOCK, OUT_PAD); the bias follows the weight in the packed buffer."""
        w = _weight(p_ptr, BASE, IN, IN_PAD, OUT, OUT_PAD)
        o = tl.arange(0, OUT_PAD)
        b = tl.load(p_ptr + BASE + OUT * IN + o, mask=o < OUT, other=0.0)
        return tl.dot(h, tl.trans(w), input_precision=PRECISION) + b[None, :]

    @triton.jit
    def _hidden(x, p_ptr, DEPTH: tl.constexpr, D_IN: tl.constexpr, IN_PAD: tl.constexpr, WIDTH: tl.constexpr,
                PRECISION: tl.constexpr):
        """x (BLOCK, IN_PAD) -> the activations after hidden layers 1..DEPTH, a tuple of DEPTH (BLOCK, WIDTH)."""
        h = tl.maximum(_linear(x, p_ptr, 0, D_IN, IN_PAD, WIDTH, WIDTH, PRECISION), 0.0)
        hs = (h,)
        for k in tl.static_range(1, DEPTH):
            base = D_IN * WIDTH + WIDTH + (k - 1) * (WIDTH * WIDTH + WIDTH)
            h = tl.maximum(_linear(h, p_ptr, base, WIDTH, WIDTH, WIDTH, WIDTH, PRECISION), 0.0)
            hs = hs + (h,)
        return hs

    @triton.jit
    def _load_rows(ptr, rows, m, COLS: tl.constexpr, COLS_PAD: tl.constexpr):
        """(BLOCK, COLS_PAD) fp32 tile of a row-major (n, COLS) tensor, 0 outside."""
        c = tl.arange(0, COLS_PAD)
        return tl.load(ptr + rows[:, None] * COLS + c[None, :], mask=m[:, None] & (c[None, :] < COLS),
                       other=0.0).to(tl.float32)

    @triton.jit
    def _store_partial(partial_ptr, n_params, acc_w, acc_b, BASE: tl.constexpr, IN: tl.constexpr,
                       IN_PAD: tl.constexpr, OUT: tl.constexpr, OUT_PAD: tl.constexpr):
        """This program's row of the (programs, n_params) partial sums: one layer's weight (OUT, IN) and bias (OUT,)
        gradients, from (OUT_PAD, IN_PAD) and (OUT_PAD,) accumulators, at BASE."""
        o = tl.arange(0, OUT_PAD)
        i = tl.arange(0, IN_PAD)
        row = partial_ptr + tl.program_id(0).to(tl.int64) * n_params + BASE
        tl.store(row + o[:, None] * IN + i[None, :], acc_w, mask=(o[:, None] < OUT) & (i[None, :] < IN))
        tl.store(row + OUT * IN + o, acc_b, mask=o < OUT)

    @triton.jit
    def _mlp_forward_kernel(x_ptr, p_ptr, out_ptr, n_rows, D_IN: tl.constexpr, IN_PAD: tl.constexpr,
                            WIDTH: tl.constexpr, N_HIDDEN: tl.constexpr, D_OUT: tl.constexpr,
                            OUT_PAD: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # 64-bit offsets: rows x channels > 2^31
        m = rows < n_rows
        h = _hidden(_load_rows(x_ptr, rows, m, D_IN, IN_PAD), p_ptr, N_HIDDEN, D_IN, IN_PAD, WIDTH, PRECISION)[-1]
        last = D_IN * WIDTH + WIDTH + (N_HIDDEN - 1) * (WIDTH * WIDTH + WIDTH)
        out = _linear(h, p_ptr, last, WIDTH, WIDTH, D_OUT, OUT_PAD, PRECISION)
        c = tl.arange(0, OUT_PAD)
        tl.store(out_ptr + rows[:, None] * D_OUT + c[None, :], out, mask=m[:, None] & (c[None, :] < D_OUT))

    @triton.jit
    def _mlp_backward_kernel(x_ptr, p_ptr, gout_ptr, gx_ptr, partial_ptr, n_rows, n_params,
                             LAYER: tl.constexpr, D_IN: tl.constexpr, IN_PAD: tl.constexpr, WIDTH: tl.constexpr,
                             N_HIDDEN: tl.constexpr, D_OUT: tl.constexpr, OUT_PAD: tl.constexpr,
                             NEED_X: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
        """Gradients of linear LAYER's weight and bias (this program's partial sums), and of the input when
        LAYER is 0 and NEED_X."""
        HIDDEN_SIZE: tl.constexpr = WIDTH * WIDTH + WIDTH
        FIRST_SIZE: tl.constexpr = D_IN * WIDTH + WIDTH
        LAST: tl.constexpr = FIRST_SIZE + (N_HIDDEN - 1) * HIDDEN_SIZE
        if LAYER == 0:
            L_IN: tl.constexpr = D_IN
            L_IN_PAD: tl.constexpr = IN_PAD
            L_BASE: tl.constexpr = 0
        else:
            L_IN: tl.constexpr = WIDTH
            L_IN_PAD: tl.constexpr = WIDTH
            L_BASE: tl.constexpr = FIRST_SIZE + (LAYER - 1) * HIDDEN_SIZE
        if LAYER == N_HIDDEN:
            L_OUT: tl.constexpr = D_OUT
            L_OUT_PAD: tl.constexpr = OUT_PAD
        else:
            L_OUT: tl.constexpr = WIDTH
            L_OUT_PAD: tl.constexpr = WIDTH
        pid = tl.program_id(0)
        acc_w = tl.zeros((L_OUT_PAD, L_IN_PAD), dtype=tl.float32)
        acc_b = tl.zeros((L_OUT_PAD,), dtype=tl.float32)
        for start in range(pid * BLOCK, n_rows, tl.num_programs(0) * BLOCK):
            rows = start + tl.arange(0, BLOCK).to(tl.int64)
            m = rows < n_rows
            x = _load_rows(x_ptr, rows, m, D_IN, IN_PAD)
            delta = _load_rows(gout_ptr, rows, m, D_OUT, OUT_PAD)  # gradient of the output, 0 on padded rows
            if LAYER == N_HIDDEN:  # the output layer's input: the last hidden activation
                layer_input = _hidden(x, p_ptr, N_HIDDEN, D_IN, IN_PAD, WIDTH, PRECISION)[-1]
            else:  # the forward to this layer's output (tuple of activations), then its output gradient back to it
                hs = _hidden(x, p_ptr, N_HIDDEN, D_IN, IN_PAD, WIDTH, PRECISION)
                w = _weight(p_ptr, LAST, WIDTH, WIDTH, D_OUT, OUT_PAD)
                delta = tl.where(hs[N_HIDDEN - 1] > 0, tl.dot(delta, w, input_precision=PRECISION), 0.0)
                for k in tl.static_range(N_HIDDEN - 1, LAYER, -1):  # down through hidden linears N_HIDDEN-1..LAYER+1
                    w = _weight(p_ptr, FIRST_SIZE + (k - 1) * HIDDEN_SIZE, WIDTH, WIDTH, WIDTH, WIDTH)
                    delta = tl.where(hs[k - 1] > 0, tl.dot(delta, w, input_precision=PRECISION), 0.0)
                if LAYER == 0:
                    layer_input = x
                else:
                    layer_input = hs[LAYER - 1]
            acc_w += tl.dot(tl.trans(delta), layer_input, input_precision=PRECISION)
            acc_b += tl.sum(delta, axis=0)
            if LAYER == 0 and NEED_X:
                w = _weight(p_ptr, 0, D_IN, IN_PAD, WIDTH, WIDTH)
                gx = tl.dot(delta, w, input_precision=PRECISION)
                c = tl.arange(0, IN_PAD)
                tl.store(gx_ptr + rows[:, None] * D_IN + c[None, :], gx, mask=m[:, None] & (c[None, :] < D_IN))
        _store_partial(partial_ptr, n_params, acc_w, acc_b, L_BASE, L_IN, L_IN_PAD, L_OUT, L_OUT_PAD)


@dataclass(frozen=True)
class MLPShape:
    """d_in -> n_hidden x (width, ReLU) -> d_out."""

    d_in: int
    width: int
    n_hidden: int
    d_out: int

    @property
    def dims(self) -> list:
        """Widths from input to output: [d_in, width, ..., width, d_out]."""
        return [self.d_in] + [self.width] * self.n_hidden + [self.d_out]

    @property
    def in_pad(self) -> int:
        return max(16, triton.next_power_of_2(self.d_in))

    @property
    def out_pad(self) -> int:
        return max(16, triton.next_power_of_2(self.d_out))

    def zero_params(self, device="cpu", requires_grad: bool = False) -> list:
        """(W0, b0, W1, b1, ...) of this shape, all zeros: for self-tests and compile checks."""
        dims = self.dims
        return [torch.zeros(size, device=device, requires_grad=requires_grad)
                for a, b in zip(dims[:-1], dims[1:]) for size in ((b, a), (b,))]

    def constants(self, block: int) -> dict:
        return dict(D_IN=self.d_in, IN_PAD=self.in_pad, WIDTH=self.width, N_HIDDEN=self.n_hidden, D_OUT=self.d_out,
                    OUT_PAD=self.out_pad, BLOCK=block, PRECISION=_precision())


def unsupported(d_in: int, width: int, n_hidden: int, d_out: int) -> str:
    """Why the fused kernels cannot run this network ('' when they can)."""
    if width not in WIDTHS:
        return f"n_neurons must be one of {', '.join(map(str, WIDTHS))} (got {width})"
    if n_hidden < 1:
        return "n_hidden_layers must be at least 1"
    if max(d_in, d_out) > 256:  # the first and last layers' weight tiles are held whole in registers
        return f"inputs and outputs of at most 256 channels (got {d_in} -> {d_out})"
    return ""


def _precision() -> str:
    return "tf32" if torch.cuda.is_available() and not backends_interpreted() else "ieee"


def _backward_programs(n_rows: int, device: torch.device) -> int:
    blocks = triton.cdiv(n_rows, BACKWARD_BLOCK_ROWS)
    if device.type == "cuda":
        cap = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        cap = INTERPRETED_PROGRAMS
    return max(1, min(blocks, cap))


def sum_partials(n_rows: int, packed: torch.Tensor, launch) -> torch.Tensor:
    """The parameters' gradient (n_params,): ``launch(programs, partial)`` runs the backward kernels, each program
    writing its partial sums to its row of ``partial`` (programs, n_params); summed here in one operation."""
    programs = _backward_programs(n_rows, packed.device)
    partial = torch.empty(programs, packed.numel(), device=packed.device, dtype=torch.float32)
    launch(programs, partial)
    return partial[0] if programs == 1 else partial.sum(0)


def pack(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Weights and biases, layer by layer (W0, b0, W1, b1, ...), as one flat fp32 buffer: the kernels' layout."""
    return torch.cat([p.reshape(-1) for p in params]).float()


def fused_forward(x: torch.Tensor, packed: torch.Tensor, shape: MLPShape) -> torch.Tensor:
    """x (N, d_in) -> (N, d_out) fp32."""
    out = torch.empty(x.shape[0], shape.d_out, device=x.device, dtype=torch.float32)
    if x.shape[0]:
        grid = (triton.cdiv(x.shape[0], BLOCK_ROWS),)
        _mlp_forward_kernel[grid](x, packed, out, x.shape[0], **shape.constants(BLOCK_ROWS), **LAUNCH_OPTIONS)
    return out


def fused_backward(x: torch.Tensor, packed: torch.Tensor, grad_out: torch.Tensor, shape: MLPShape,
                   need_x: bool) -> Tuple[torch.Tensor | None, torch.Tensor]:
    """(grad of x (N, d_in) in x's dtype or None, grad of the packed parameters (n_params,))."""
    n = x.shape[0]
    grad_x = torch.empty(n, shape.d_in, device=x.device, dtype=torch.float32) if need_x else None
    if n == 0:
        return grad_x, torch.zeros_like(packed)
    constants = shape.constants(BACKWARD_BLOCK_ROWS)

    def launch(programs, partial):
        for layer in range(shape.n_hidden + 1):
            _mlp_backward_kernel[(programs,)](x, packed, grad_out, grad_x if need_x else partial, partial, n,
                                              packed.numel(), LAYER=layer, NEED_X=need_x, **constants,
                                              **BACKWARD_OPTIONS)

    grad_params = sum_partials(n, packed, launch)
    return (grad_x.to(x.dtype) if need_x else None), grad_params


class _FusedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shape: MLPShape, *params: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        packed = pack(params)
        ctx.save_for_backward(x, packed)
        ctx.shape = shape
        ctx.param_shapes = [p.shape for p in params]
        return fused_forward(x, packed, shape)

    @staticmethod
    @once_differentiable  # the kernels' gradients carry no graph: differentiating them again must fail loudly
    def backward(ctx, grad_out: torch.Tensor):
        x, packed = ctx.saved_tensors
        grad_x, grad_packed = fused_backward(x, packed, grad_out.contiguous().float(), ctx.shape,
                                             ctx.needs_input_grad[0])
        pieces = grad_packed.split([size.numel() for size in ctx.param_shapes])
        return (grad_x, None, *(piece.view(size) for piece, size in zip(pieces, ctx.param_shapes)))


def fused_mlp(x: torch.Tensor, shape: MLPShape, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """x (N, d_in) -> (N, d_out) fp32 through the network whose (W0, b0, W1, b1, ...) are ``params``."""
    return _FusedMLP.apply(x, shape, *params)


def selftest(device: str) -> None:
    """Compile and run the kernels once (raises if this device cannot run them)."""
    shape = MLPShape(d_in=5, width=16, n_hidden=2, d_out=3)
    params = shape.zero_params(device, requires_grad=True)
    x = torch.zeros(3, 5, device=device, requires_grad=True)
    fused_mlp(x, shape, params).sum().backward()
