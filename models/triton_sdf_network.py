"""NeuS's geometry network and its input gradient, fused in Triton: the SDF, its normal and the eikonal term in
two kinds of launch instead of autograd's double backward.

The network is ``VanillaMLP``'s with ``sphere_init``: ``n_hidden_layers`` Softplus(beta=100) layers of width
``n_neurons`` (16 to 128), then a linear output whose channel 0 is the SDF (weight norm, when on, stays in
PyTorch: the kernels take the weights it produces). Without ``sphere_init`` the hidden layers are ReLU.

Notation, for linear layers k = 0..H (H = n_hidden): h_k = W_k a_k + b_k, a_0 = x, a_{k+1} = softplus(h_k),
out = h_H; s_k = softplus'(h_k) = sigmoid(beta h_k).

- ``forward``: out (N, d_out) and g = d out[:, 0] / d x (N, d_in), the input gradient by the chain
  r_H = W_H[0], u_k = r_{k+1} * s_k, r_k = u_k W_k, g = r_0. Each program takes ``BLOCK_ROWS`` rows through all
  of it with the activations in registers.
- ``backward`` (first order only: what the eikonal loss needs; differentiating it again is an error): given
  out-bar and g-bar, the gradients of x and of every weight and bias. Going up the gradient chain,
  r-bar_0 = g-bar, u-bar_k = r-bar_k W_k^T, W-bar_k += u_k^T r-bar_k, r-bar_{k+1} = u-bar_k * s_k, and h_k gets
  u-bar_k * u_k * beta (1 - s_k) (the softplus's second derivative); W-bar_H[0] += sum r-bar_H. Then down the
  network as an ordinary backward from out-bar with those extra h-gradients added. One launch per linear layer,
  each recomputing the block's forward and accumulating its own layer's gradients, partial sums per program
  summed once, as in ``models.triton_mlp``: no atomics, the same gradients on every run.

Precision as ``models.triton_mlp``: TF32 products on a GPU, fp32 under the interpreter.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

from models.networks import SPHERE_INIT_SOFTPLUS_BETA as SOFTPLUS_BETA
from models.triton_hashgrid import LAUNCH_OPTIONS
from models.triton_mlp import BACKWARD_BLOCK_ROWS, BACKWARD_OPTIONS, BLOCK_ROWS, MLPShape, pack, sum_partials

try:
    import triton
    import triton.language as tl
    from models.triton_mlp import _linear, _load_rows, _store_partial, _weight
except ImportError:  # pragma: no cover - the backend switch reports it
    triton = None

RELU = 0.0  # beta 0 in the kernels: ReLU hidden layers (slope 0 or 1, no second derivative)

if triton is not None:

    @triton.jit
    def _activation_and_slope(h, BETA: tl.constexpr):
        """(activation, its derivative) of h: Softplus(BETA) as torch computes it (linear above BETA h = 20),
        or ReLU when BETA is 0."""
        if BETA == 0.0:
            return tl.maximum(h, 0.0), tl.where(h > 0, 1.0, 0.0)
        z = h * BETA
        linear = z > 20.0
        e = tl.exp(tl.minimum(z, 20.0))
        return tl.where(linear, h, tl.log(1.0 + e) / BETA), tl.where(linear, 1.0, e / (1.0 + e))

    @triton.jit
    def _forward_with_chain(x, p_ptr, D_IN: tl.constexpr, IN_PAD: tl.constexpr, WIDTH: tl.constexpr,
                            N_HIDDEN: tl.constexpr, BETA: tl.constexpr, PRECISION: tl.constexpr):
        """x (BLOCK, IN_PAD) -> (inputs a_0..a_H, slopes s_0..s_{H-1}, chain u_0..u_{H-1}, g (BLOCK, IN_PAD)):
        tuples of (BLOCK, WIDTH) tiles but a_0 = x; g is d out[:, 0] / d x."""
        FIRST: tl.constexpr = D_IN * WIDTH + WIDTH  # the packed buffer: W0, b0, then (WIDTH, WIDTH) layers
        HIDDEN: tl.constexpr = WIDTH * WIDTH + WIDTH
        h = _linear(x, p_ptr, 0, D_IN, IN_PAD, WIDTH, WIDTH, PRECISION)
        a, s = _activation_and_slope(h, BETA)
        acts = (x, a)
        slopes = (s,)
        for k in tl.static_range(1, N_HIDDEN):
            h = _linear(a, p_ptr, FIRST + (k - 1) * HIDDEN, WIDTH, WIDTH, WIDTH, WIDTH, PRECISION)
            a, s = _activation_and_slope(h, BETA)
            acts = acts + (a,)
            slopes = slopes + (s,)
        r = tl.load(p_ptr + FIRST + (N_HIDDEN - 1) * HIDDEN + tl.arange(0, WIDTH))[None, :]  # W_H[0]
        us = ()
        for k in tl.static_range(N_HIDDEN - 1, -1, -1):  # layers H-1 down to 0
            u = r * slopes[k]
            us = (u,) + us
            if k == 0:
                r = tl.dot(u, _weight(p_ptr, 0, D_IN, IN_PAD, WIDTH, WIDTH), input_precision=PRECISION)
            else:
                r = tl.dot(u, _weight(p_ptr, FIRST + (k - 1) * HIDDEN, WIDTH, WIDTH, WIDTH, WIDTH),
                           input_precision=PRECISION)
        return acts, slopes, us, r

    @triton.jit
    def _sdf_forward_kernel(x_ptr, p_ptr, out_ptr, g_ptr, n_rows, D_IN: tl.constexpr, IN_PAD: tl.constexpr,
                            WIDTH: tl.constexpr, N_HIDDEN: tl.constexpr, D_OUT: tl.constexpr,
                            OUT_PAD: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
                            BETA: tl.constexpr):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        m = rows < n_rows
        acts, slopes, us, g = _forward_with_chain(_load_rows(x_ptr, rows, m, D_IN, IN_PAD), p_ptr, D_IN, IN_PAD,
                                                  WIDTH, N_HIDDEN, BETA, PRECISION)
        LAST: tl.constexpr = D_IN * WIDTH + WIDTH + (N_HIDDEN - 1) * (WIDTH * WIDTH + WIDTH)
        out = _linear(acts[N_HIDDEN], p_ptr, LAST, WIDTH, WIDTH, D_OUT, OUT_PAD, PRECISION)
        c = tl.arange(0, OUT_PAD)
        tl.store(out_ptr + rows[:, None] * D_OUT + c[None, :], out, mask=m[:, None] & (c[None, :] < D_OUT))
        i = tl.arange(0, IN_PAD)
        tl.store(g_ptr + rows[:, None] * D_IN + i[None, :], g, mask=m[:, None] & (i[None, :] < D_IN))

    @triton.jit
    def _sdf_backward_kernel(x_ptr, p_ptr, gout_ptr, gg_ptr, gx_ptr, partial_ptr, n_rows, n_params,
                             LAYER: tl.constexpr, D_IN: tl.constexpr, IN_PAD: tl.constexpr, WIDTH: tl.constexpr,
                             N_HIDDEN: tl.constexpr, D_OUT: tl.constexpr, OUT_PAD: tl.constexpr,
                             NEED_X: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
                             BETA: tl.constexpr):
        """This program's partial sums of linear LAYER's weight and bias gradients, and the input gradient when
        LAYER is 0 and NEED_X."""
        FIRST: tl.constexpr = D_IN * WIDTH + WIDTH
        HIDDEN: tl.constexpr = WIDTH * WIDTH + WIDTH
        if LAYER == 0:
            L_IN: tl.constexpr = D_IN
            L_IN_PAD: tl.constexpr = IN_PAD
            L_BASE: tl.constexpr = 0
        else:
            L_IN: tl.constexpr = WIDTH
            L_IN_PAD: tl.constexpr = WIDTH
            L_BASE: tl.constexpr = FIRST + (LAYER - 1) * HIDDEN
        if LAYER == N_HIDDEN:
            L_OUT: tl.constexpr = D_OUT
            L_OUT_PAD: tl.constexpr = OUT_PAD
        else:
            L_OUT: tl.constexpr = WIDTH
            L_OUT_PAD: tl.constexpr = WIDTH
        pid = tl.program_id(0)
        o = tl.arange(0, L_OUT_PAD)
        acc_w = tl.zeros((L_OUT_PAD, L_IN_PAD), dtype=tl.float32)
        acc_b = tl.zeros((L_OUT_PAD,), dtype=tl.float32)
        for start in range(pid * BLOCK, n_rows, tl.num_programs(0) * BLOCK):
            rows = start + tl.arange(0, BLOCK).to(tl.int64)
            m = rows < n_rows
            acts, slopes, us, _ = _forward_with_chain(_load_rows(x_ptr, rows, m, D_IN, IN_PAD), p_ptr, D_IN,
                                                      IN_PAD, WIDTH, N_HIDDEN, BETA, PRECISION)
            # up the gradient chain from g-bar: the chain's own weight gradients and the h_k it reaches
            r_bar = _load_rows(gg_ptr, rows, m, D_IN, IN_PAD)
            extra = ()
            for k in tl.static_range(N_HIDDEN):
                if k == 0:
                    w = _weight(p_ptr, 0, D_IN, IN_PAD, WIDTH, WIDTH)
                else:
                    w = _weight(p_ptr, FIRST + (k - 1) * HIDDEN, WIDTH, WIDTH, WIDTH, WIDTH)
                if k == LAYER:
                    acc_w += tl.dot(tl.trans(us[k]), r_bar, input_precision=PRECISION)
                u_bar = tl.dot(r_bar, tl.trans(w), input_precision=PRECISION)
                extra = extra + (u_bar * us[k] * (BETA * (1.0 - slopes[k])),)
                r_bar = u_bar * slopes[k]
            if LAYER == N_HIDDEN:  # r_H is W_H's row 0
                acc_w += tl.where(o[:, None] == 0, tl.sum(r_bar, axis=0)[None, :], 0.0)
            # down the network from out-bar, adding the chain's gradients of each h_k
            h_bar = _load_rows(gout_ptr, rows, m, D_OUT, OUT_PAD)
            for k in tl.static_range(N_HIDDEN, LAYER, -1):  # layers H down to LAYER + 1
                if k == N_HIDDEN:
                    w = _weight(p_ptr, FIRST + (k - 1) * HIDDEN, WIDTH, WIDTH, D_OUT, OUT_PAD)
                else:
                    w = _weight(p_ptr, FIRST + (k - 1) * HIDDEN, WIDTH, WIDTH, WIDTH, WIDTH)
                h_bar = tl.dot(h_bar, w, input_precision=PRECISION) * slopes[k - 1] + extra[k - 1]
            acc_w += tl.dot(tl.trans(h_bar), acts[LAYER], input_precision=PRECISION)
            acc_b += tl.sum(h_bar, axis=0)
            if LAYER == 0 and NEED_X:
                gx = tl.dot(h_bar, _weight(p_ptr, 0, D_IN, IN_PAD, WIDTH, WIDTH), input_precision=PRECISION)
                i = tl.arange(0, IN_PAD)
                tl.store(gx_ptr + rows[:, None] * D_IN + i[None, :], gx, mask=m[:, None] & (i[None, :] < D_IN))
        _store_partial(partial_ptr, n_params, acc_w, acc_b, L_BASE, L_IN, L_IN_PAD, L_OUT, L_OUT_PAD)


def _constants(shape: MLPShape, block: int, beta: float) -> dict:
    return dict(shape.constants(block), BETA=float(beta))


def sdf_forward(x: torch.Tensor, packed: torch.Tensor, shape: MLPShape,
                beta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """x (N, d_in) -> (out (N, d_out), g (N, d_in)) fp32, g = d out[:, 0] / d x."""
    n = x.shape[0]
    out = torch.empty(n, shape.d_out, device=x.device, dtype=torch.float32)
    g = torch.empty(n, shape.d_in, device=x.device, dtype=torch.float32)
    if n:
        _sdf_forward_kernel[(triton.cdiv(n, BLOCK_ROWS),)](x, packed, out, g, n,
                                                           **_constants(shape, BLOCK_ROWS, beta), **LAUNCH_OPTIONS)
    return out, g


def sdf_backward(x: torch.Tensor, packed: torch.Tensor, grad_out: torch.Tensor, grad_g: torch.Tensor,
                 shape: MLPShape, beta: float, need_x: bool) -> Tuple[torch.Tensor | None, torch.Tensor]:
    """(grad of x (N, d_in) fp32 or None, grad of the packed parameters (n_params,)) from the gradients of
    out (N, d_out) and g (N, d_in), both fp32."""
    n = x.shape[0]
    grad_x = torch.empty(n, shape.d_in, device=x.device, dtype=torch.float32) if need_x else None
    if n == 0:
        return grad_x, torch.zeros_like(packed)
    constants = _constants(shape, BACKWARD_BLOCK_ROWS, beta)

    def launch(programs, partial):
        for layer in range(shape.n_hidden + 1):
            _sdf_backward_kernel[(programs,)](x, packed, grad_out, grad_g, grad_x if need_x else partial, partial,
                                              n, packed.numel(), LAYER=layer, NEED_X=need_x, **constants,
                                              **BACKWARD_OPTIONS)

    return grad_x, sum_partials(n, packed, launch)


class _SDFNetworkWithGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shape: MLPShape, beta: float, *params: torch.Tensor):
        x = x.contiguous()
        packed = pack(params)
        ctx.save_for_backward(x, packed)
        ctx.shape, ctx.beta = shape, beta
        ctx.param_shapes = [p.shape for p in params]
        return sdf_forward(x, packed, shape, beta)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor | None, grad_g: torch.Tensor | None):
        x, packed = ctx.saved_tensors
        n, shape = x.shape[0], ctx.shape
        grad_out = torch.zeros(n, shape.d_out, device=x.device) if grad_out is None else grad_out.float()
        grad_g = torch.zeros(n, shape.d_in, device=x.device) if grad_g is None else grad_g.float()
        grad_x, grad_packed = sdf_backward(x, packed, grad_out.contiguous(), grad_g.contiguous(), shape, ctx.beta,
                                           ctx.needs_input_grad[0])
        pieces = grad_packed.split([size.numel() for size in ctx.param_shapes])
        grad_x = grad_x.to(x.dtype) if grad_x is not None else None
        return (grad_x, None, None, *(piece.view(size) for piece, size in zip(pieces, ctx.param_shapes)))


def sdf_network_with_gradient(x: torch.Tensor, shape: MLPShape, params: Sequence[torch.Tensor],
                              beta: float = SOFTPLUS_BETA) -> Tuple[torch.Tensor, torch.Tensor]:
    """x (N, d_in) -> (out (N, d_out), d out[:, 0] / d x (N, d_in)), both fp32, through the network whose
    (W0, b0, W1, b1, ...) are ``params``, hidden activation Softplus(beta) (ReLU when beta is 0).
    Differentiable once: enough for a loss on the output and on the gradient (the eikonal term)."""
    return _SDFNetworkWithGradient.apply(x, shape, float(beta), *params)


def selftest(device: str) -> None:
    """Compile and run the kernels once (raises if this device cannot run them)."""
    shape = MLPShape(d_in=5, width=16, n_hidden=2, d_out=3)
    params = shape.zero_params(device, requires_grad=True)
    x = torch.zeros(3, 5, device=device, requires_grad=True)
    out, g = sdf_network_with_gradient(x, shape, params)
    (out.sum() + g.sum()).backward()
