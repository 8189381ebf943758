"""Input encodings: multiresolution hash grid, spherical harmonics, frequency.

Every encoding follows tiny-cuda-nn's definition (input domain, output order,
hash grid parametrisation), so a config written for tcnn means the same thing
here and hash-grid parameters are interchangeable between backends: the
table is one flat ``params`` vector laid out level by level, entry-major,
``n_features_per_level`` floats per entry, exactly as tcnn stores it.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from models import backends
from utils.config import ConfigError, number_at_least, to_primitive

# tcnn's coherent prime hash (first dimension is not multiplied).
HASH_PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737)
# Without gradients (grid updates, meshing, rendering) the CPU layout looks up at most this many (corner, level,
# point) entries at a time: its indices and gathered features then stay under glibc's mmap threshold, so no block
# maps and faults in fresh pages. 2.9x faster on 2 cores (L=8 or 16, T=2^16, 262k points) than whole batches;
# the same time when the table (T=2^19) itself is the cache miss. 2^20 was within 5 % of it, 2^22 5-16 % slower.
CPU_LOOKUPS_PER_BLOCK = 2 ** 21


class _GatherRows(torch.autograd.Function):
    """table[index] whose backward is a scatter-add (index_add), several times faster on the CPU
    than embedding's backward. The backward is built from differentiable ops, so second-order
    terms (eikonal loss through analytic normals) still reach the table."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.n_rows = table.shape[0]
        return F.embedding(index, table)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        table_grad = torch.zeros(ctx.n_rows, flat.shape[-1], dtype=flat.dtype, device=flat.device)
        return table_grad.index_add(0, index.reshape(-1).long(), flat), None


def _as_entries(table: torch.Tensor) -> torch.Tensor:
    """(T, F) float32 features -> the same memory as T entries: (T,) float32 for F = 1, (T,) complex64 for F = 2
    (one 8-byte element per entry), (T, F / 2) complex64 for F >= 4. A gather or an index_add along dimension 0 of
    that view moves whole entries, so the CPU path never transposes the table (two copies of it per step)."""
    if table.shape[-1] == 1:
        return table.reshape(table.shape[:-1])
    entries = torch.view_as_complex(table.reshape(*table.shape[:-1], table.shape[-1] // 2, 2))
    return entries.squeeze(-1) if table.shape[-1] == 2 else entries


class _GatherEntries(torch.autograd.Function):
    """table (T, F), index (K,) int32 or int64 -> table[index] (K, F), by whole entries (``_as_entries``); the
    backward adds the gradient's rows into a zero table (index_add: the same bits on every run and thread count).
    On 2 cores the gather took 1.3x (within a training step) to 4x (alone) less time than gathering each feature
    from a transposed copy of the table, and the backward needs no transposing copy back.
    Differentiable once: the eikonal term reaches the table through the lerps' slopes, differentiated once."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.table_shape = table.shape
        gathered = _as_entries(table).index_select(0, index)
        return (gathered if table.shape[-1] == 1 else torch.view_as_real(gathered)).reshape(len(index), table.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        table_grad = grad.new_zeros(ctx.table_shape)
        grad = grad.contiguous()
        if grad.storage_offset() % 2:  # a complex view needs its first float on an 8-byte boundary
            grad = grad.clone()
        entries = _as_entries(table_grad)
        if entries.dim() > 1:  # rows (F >= 4): torch's fast row index_add takes int64 indices only (int32: 6x slower)
            index = index.long()
        entries.index_add_(0, index, _as_entries(grad))
        return table_grad, None


class _InputJacobian(torch.autograd.Function):
    """Passes ``values`` (N, L * F) through and gives ``x`` (N, D) the gradient ``jacobian`` (D, L, N, F) implies.

    The input gradient is built from differentiable ops on ``jacobian``, whose graph reaches the table, so the
    eikonal loss's second-order term reaches the table as it does through tiny-cuda-nn and the Triton kernels;
    like them, it does not reach ``x`` again (the encoding's curvature in x, which no loss here needs)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, jacobian: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(jacobian)
        return values.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (jacobian,) = ctx.saved_tensors
        d, l, n, f = jacobian.shape
        grad_x = None
        if ctx.needs_input_grad[0]:
            per_level = grad.reshape(n, l, f).transpose(0, 1).contiguous()  # (L, N, F), as the jacobian
            # levels, then features (one reduction over both dims 1 and 3 took 4x longer); contiguous (N, D): the
            # eikonal loss's norm over D took 30x longer on a transposed gradient
            grad_x = (jacobian * per_level).sum(1).sum(-1).t().contiguous()
        return grad_x, grad, None


def _lerp_corners(gathered: torch.Tensor, frac: torch.Tensor, scale: torch.Tensor,
                  with_slopes: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Interpolates corner features one input dimension at a time, the slopes sharing the values' partial lerps.

    gathered (2^D, L, N, F) corner features (dimension 0 the slowest in the corner index), frac (D, L, N, F) the
    position in the cell (repeated over the features: every operand then has the same contiguous layout, which the
    CPU's vector units need), scale (L,) each level's cells per unit -> values (L, N, F) and, ``with_slopes``,
    their derivatives along each input dimension (D, L, N, F), else None: the derivative along d takes that
    dimension's difference times the scale where the values take its lerp. 7 lerps of shrinking size for D = 3
    instead of a product with 8 corner weights (and 3 more weight tensors for the slopes): a third of the work."""
    nodes = {None: gathered}  # None: the values so far; d: the derivative along d so far
    for d, f in enumerate(frac):
        merged = {}
        for key, g in nodes.items():
            lower, upper = g.view(2, g.shape[0] // 2, *g.shape[1:]).unbind(0)
            delta = upper - lower
            merged[key] = torch.mul(delta, f).add_(lower)  # two exact ops: the same bits in any block or thread
            if with_slopes and key is None:
                merged[d] = delta.mul_(scale[:, None, None])
        nodes = merged
    values = nodes[None][0]
    if not with_slopes:
        return values, None
    return values, torch.stack([nodes[d][0] for d in range(len(frac))])


def _lerp_corners_transposed(grad_values: torch.Tensor, grad_slopes: Optional[torch.Tensor], frac: torch.Tensor,
                             scale: torch.Tensor) -> torch.Tensor:
    """The gradient ``_lerp_corners`` gives its corner features: grad_values (L, N, F), grad_slopes (D, L, N, F)
    or None -> (2^D, L, N, F), its steps taken back in reverse order."""
    grads = {None: grad_values[None]}
    if grad_slopes is not None:
        grads.update({d: g[None] for d, g in enumerate(grad_slopes)})
    for d in reversed(range(len(frac))):
        split = {}
        for key, g in grads.items():
            if key == d:  # taken with the values, whose difference it was
                continue
            pair = g.new_empty(2, *g.shape)  # written in place: no stack's copy
            upper = torch.mul(g, frac[d], out=pair[1])
            lower = torch.sub(g, upper, out=pair[0])
            if key is None and d in grads:
                difference = grads[d] * scale[:, None, None]
                upper.add_(difference)
                lower.sub_(difference)
            split[key] = pair.view(2 * g.shape[0], *g.shape[1:])
        grads = split
    return grads[None]


class _LerpCorners(torch.autograd.Function):
    """``_lerp_corners`` with its transpose as the backward (the corner features' gradient, for the table's):
    no graph of a dozen elementwise ops per step. Differentiable once, which is all the table needs (the eikonal
    term reaches it through the slopes, differentiated once)."""

    @staticmethod
    def forward(ctx, gathered, frac, scale, with_slopes: bool):
        ctx.save_for_backward(frac, scale)
        ctx.with_slopes = with_slopes
        values, slopes = _lerp_corners(gathered, frac, scale, with_slopes)
        return values, (slopes if with_slopes else values.new_empty(0))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values, grad_slopes):
        frac, scale = ctx.saved_tensors
        return _lerp_corners_transposed(grad_values.contiguous(), grad_slopes if ctx.with_slopes else None, frac,
                                        scale), None, None, None


def _outer(per_dim, op) -> torch.Tensor:
    """[(2, ...) per dimension] -> (2^D, ...) by ``op`` over dims, dimension 0 the slowest in the corner index."""
    out = per_dim[0]
    for term in per_dim[1:]:
        out = op(out[:, None], term[None]).flatten(0, 1)
    return out


def hash_grid_levels(n_input_dims: int, n_levels: int, log2_hashmap_size: int, base_resolution: float,
                     per_level_scale: float) -> Dict[str, np.ndarray]:
    """Per-level constants of a tcnn hash grid.

    Returns arrays of length L: ``scale`` (float32: position = x * scale + 0.5),
    ``resolution`` (vertices per side), ``size`` (table entries), ``offset``
    (first entry of the level), ``hashed`` (True where resolution^D > size).
    """
    log2_pls = np.float32(math.log2(per_level_scale))
    scale, resolution, size, offset = [], [], [], []
    total = 0
    for level in range(n_levels):
        s = np.float32(np.exp2(np.float32(level) * log2_pls) * np.float32(base_resolution) - np.float32(1.0))
        res = int(math.ceil(s)) + 1
        dense = min(res ** n_input_dims, 2 ** 31 - 1)
        params = min(-(-dense // 8) * 8, 2 ** log2_hashmap_size)
        scale.append(s)
        resolution.append(res)
        size.append(params)
        offset.append(total)
        total += params
    resolution = np.array(resolution, dtype=np.int64)
    size = np.array(size, dtype=np.int64)
    return {
        "scale": np.array(scale, dtype=np.float32),
        "resolution": resolution,
        "size": size,
        "offset": np.array(offset, dtype=np.int64),
        "hashed": resolution.astype(np.float64) ** n_input_dims > size,
        "total": total,
    }


class HashGrid(nn.Module):
    """Multiresolution hash encoding (tcnn ``HashGrid``), inputs in [0, 1]^D.

    forward: (N, D) -> (N, L * F) float32. Linear interpolation. The PyTorch
    path is vectorised over points, levels and corners; autograd gives the
    gradients to the table, to the inputs and the second-order terms.
    """

    def __init__(self, n_input_dims: int, config: Dict[str, Any], backend: str = "auto"):
        super().__init__()
        self.n_input_dims = n_input_dims
        where = "xyz_encoding_config"
        self.n_levels = number_at_least(config.get("n_levels", 16), f"{where}.n_levels", 1)
        self.n_features_per_level = number_at_least(config.get("n_features_per_level", 2),
                                                    f"{where}.n_features_per_level", 1)
        if self.n_features_per_level not in (1, 2, 4, 8):  # tcnn's choices; the Triton kernels need a power of 2
            raise ConfigError(f"{where}.n_features_per_level must be 1, 2, 4 or 8 (as in tiny-cuda-nn), "
                              f"not {self.n_features_per_level}.")
        self.log2_hashmap_size = number_at_least(config.get("log2_hashmap_size", 19), f"{where}.log2_hashmap_size", 1)
        self.base_resolution = number_at_least(config.get("base_resolution", 16), f"{where}.base_resolution", 1,
                                               kind=float)
        # >= 1: levels get finer, so the dense ones come first as every backend assumes
        self.per_level_scale = number_at_least(config.get("per_level_scale", 2.0), f"{where}.per_level_scale", 1,
                                               kind=float)
        if config.get("interpolation", "Linear") != "Linear":
            raise ConfigError("HashGrid: only Linear interpolation is implemented.")
        dtypes = {"float32": None, "float16": torch.float16}
        if str(config.get("table_dtype", "float32")) not in dtypes:
            raise ConfigError(f"xyz_encoding_config.table_dtype must be float32 or float16, "
                              f"not '{config.get('table_dtype')}'.")
        # float16: the Triton kernels read an fp16 copy of the (fp32, trained) table; other backends ignore it
        self.read_dtype = dtypes[str(config.get("table_dtype", "float32"))]
        self.n_output_dims = self.n_levels * self.n_features_per_level
        lv = hash_grid_levels(n_input_dims, self.n_levels, self.log2_hashmap_size, self.base_resolution,
                              self.per_level_scale)
        self.n_params = int(lv["total"]) * self.n_features_per_level
        if self.n_params >= 2 ** 31:  # tcnn and the Triton kernels index the table with 32-bit integers
            raise ConfigError(f"The hash grid's table would hold {self.n_params:.3g} values ({where}: "
                              f"log2_hashmap_size {self.log2_hashmap_size}, n_levels {self.n_levels}); "
                              f"keep it under 2^31: log2_hashmap_size <= "
                              f"{int(math.log2((2 ** 31 - 1) / (self.n_levels * self.n_features_per_level)))}.")
        self.register_buffer("scale", torch.from_numpy(lv["scale"]), persistent=False)
        self.register_buffer("resolution", torch.from_numpy(lv["resolution"]), persistent=False)
        self.register_buffer("size", torch.from_numpy(lv["size"]), persistent=False)
        self.register_buffer("offset", torch.from_numpy(lv["offset"]), persistent=False)
        self.register_buffer("hashed", torch.from_numpy(lv["hashed"]), persistent=False)
        size = torch.from_numpy(lv["size"])
        res = torch.from_numpy(lv["resolution"])
        self.n_dense_levels = int((~self.hashed).sum())
        if self.hashed[:self.n_dense_levels].any():
            raise AssertionError("hash grid levels must be dense first, then hashed")
        self.register_buffer("hash_mask", size - 1, persistent=False)  # hashed levels have 2^k entries
        self.register_buffer("dense_stride", torch.stack([res ** k for k in range(n_input_dims)], dim=-1),
                             persistent=False)  # (L, D)
        self.register_buffer("size_i32", size.int(), persistent=False)
        self.register_buffer("offset_i32", torch.from_numpy(lv["offset"]).int(), persistent=False)
        self.register_buffer("primes", torch.tensor(HASH_PRIMES[:n_input_dims]), persistent=False)  # (D,) int64
        # tcnn initialises the table uniformly in [-1e-4, 1e-4].
        self.params = nn.Parameter(torch.empty(self.n_params).uniform_(-1e-4, 1e-4))
        self.backend = backends.resolve("encoding", backend, ("tcnn", "triton"))
        self._triton_constants = None
        self._tcnn_config = {"otype": "HashGrid", "n_levels": self.n_levels,
                             "n_features_per_level": self.n_features_per_level,
                             "log2_hashmap_size": self.log2_hashmap_size,
                             "base_resolution": self.base_resolution, "per_level_scale": self.per_level_scale}

    def table(self) -> torch.Tensor:
        """(entries, F) view of the flat parameter vector."""
        return self.params.view(-1, self.n_features_per_level)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "tcnn" and x.is_cuda:
            return self._forward_tcnn(x)
        if self.backend == "triton" and (x.is_cuda or backends.triton_interpreted()):
            return self._forward_triton(x)
        return self._forward_torch(x)

    def _forward_triton(self, x: torch.Tensor) -> torch.Tensor:
        from models.triton_hashgrid import GridConstants, hash_encode

        k = self._triton_constants
        if k is None or k.scale.device != x.device:
            k = GridConstants(self.scale.to(x.device), self.size.to(x.device), self.offset.to(x.device),
                              self.hashed.to(x.device), self.dense_stride.to(x.device), self.primes.to(x.device),
                              self.n_levels,
                              self.n_input_dims, self.n_features_per_level)
            self._triton_constants = k
        return hash_encode(x.float(), self.table(), k, self.read_dtype)

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return self._forward_autograd(x)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.params.requires_grad)
        block = max(1, CPU_LOOKUPS_PER_BLOCK // (2 ** self.n_input_dims * self.n_levels))
        if needs_grad or x.shape[0] <= block:  # with gradients whole batches are faster (2 cores, 40k points)
            return self._forward_corner_major(x)
        return torch.cat([self._forward_corner_major(part) for part in x.split(block)])

    def _forward_corner_major(self, x: torch.Tensor) -> torch.Tensor:
        """The CPU layout: (corner, level, point, feature) tensors, so every elementwise op runs along points and
        features, all operands alike in layout (the point-major layout's innermost corner dims of 2, broadcast
        against weights, defeat the CPU's vector units), and the input gradient comes from interpolation slopes
        computed with the values (``_lerp_corners``, ``_InputJacobian``), not from autograd's graph of corner
        weights. A NeuS step's encoding with the eikonal term took 1.6-1.8x less time than with
        ``_forward_autograd`` with corner weights (2 cores; L=8, T=2^16, 40k points and L=16, T=2^19, 64k points),
        the lerps took 1.45-1.55x off that again, and gathering whole entries (``_GatherEntries``) with int32
        indices 1.2x more (1.4x without the eikonal term, 1.5x without gradients). The same figures to rounding
        (tests)."""
        x = x.float()
        n = x.shape[0]
        levels, features = self.n_levels, self.n_features_per_level
        with_jacobian = torch.is_grad_enabled() and x.requires_grad
        with torch.no_grad():
            pos = x.t()[:, None, :] * self.scale[None, :, None] + 0.5  # (D, L, N)
            lower = torch.floor(pos)
            frac = pos - lower
            lower = lower.long()
            k = self.n_dense_levels
            # (C, L, N) int32 (half the bytes of int64, and the gather and its index_add are as fast with it): each
            # level's entry index, written in place (no concatenation of the dense and hashed parts)
            index = torch.empty(2 ** len(lower), levels, n, dtype=torch.int32, device=x.device)
            if k > 0:  # index = sum_d coord_d * res^d, wrapped modulo the level size as tcnn does
                per_dim = [(torch.stack([c, c + 1]) * self.dense_stride[:k, dim, None]).int()
                           for dim, c in enumerate(lower[:, :k])]
                torch.add(torch.remainder(_outer(per_dim, torch.add), self.size_i32[:k, None]),
                          self.offset_i32[:k, None], out=index[:, :k])
            if k < levels:  # index = xor_d (coord_d * prime_d mod 2^32), modulo the power-of-two size
                per_dim = [((torch.stack([c, c + 1]) * self.primes[dim]) & self.hash_mask[k:, None]).int()
                           for dim, c in enumerate(lower[:, k:])]
                torch.add(_outer(per_dim, torch.bitwise_xor), self.offset_i32[k:, None], out=index[:, k:])
            # every lerp operand in the gathered features' (L, N, F) layout: a broadcast over F made each lerp 5x
            # slower; stack writes the copy 2x faster than expand().contiguous()
            frac = torch.stack([frac] * features, dim=-1)  # (D, L, N, F)
        gathered = _GatherEntries.apply(self.table(), index.reshape(-1)).view(*index.shape, features)  # (C, L, N, F)
        if gathered.requires_grad:
            values, slopes = _LerpCorners.apply(gathered, frac, self.scale, with_jacobian)
        else:
            values, slopes = _lerp_corners(gathered, frac, self.scale, with_jacobian)
        values = values.transpose(0, 1).reshape(n, self.n_output_dims)
        return _InputJacobian.apply(x, values, slopes) if with_jacobian else values

    def _forward_autograd(self, x: torch.Tensor) -> torch.Tensor:
        """The CUDA layout (with ``backend: torch``): (point, level, corner) tensors, every gradient by autograd.
        Corner indices and weights are built per dimension on small (N, L, 2) tensors and
        combined by broadcasting into (N, L, 2, ..., 2); dense and hashed levels (dense ones come
        first) take their own path, and all levels share one gather and one batched matmul."""
        x = x.float()
        n = x.shape[0]
        pos = x[:, None, :] * self.scale[None, :, None] + 0.5  # (N, L, D)
        pos_floor = torch.floor(pos)
        frac = pos - pos_floor
        grid = pos_floor.long()
        pair = torch.stack([grid, grid + 1], dim=-1)  # (N, L, D, 2): the two vertex coordinates per dim
        w_pair = torch.stack([1.0 - frac, frac], dim=-1)  # (N, L, D, 2)
        k = self.n_dense_levels
        parts = []
        if k > 0:  # index = sum_d coord_d * res^d, wrapped modulo the level size as tcnn does
            terms = (pair[:, :k] * self.dense_stride[:k, :, None]).to(torch.int32)
            idx = self._combine(terms, torch.add)
            parts.append(torch.remainder(idx, self.size_i32[:k, None]) + self.offset_i32[:k, None])
        if k < self.n_levels:  # index = xor_d (coord_d * prime_d mod 2^32), modulo the power-of-two size
            terms = ((pair[:, k:] * self.primes[:, None]) & self.hash_mask[k:, None, None]).to(torch.int32)
            parts.append(self._combine(terms, torch.bitwise_xor) + self.offset_i32[k:, None])
        index = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (N, L, C)
        weights = self._combine(w_pair, torch.mul)[:, :, None, :]  # (N, L, 1, C)
        feats = _GatherRows.apply(self.table(), index)  # (N, L, C, F)
        return torch.matmul(weights, feats).reshape(n, self.n_output_dims)

    def _combine(self, per_dim: torch.Tensor, op) -> torch.Tensor:
        """(N, L, D, 2) per-dimension corner terms -> (N, L, 2^D) by ``op`` over dims.

        Corner c has bit (D - 1 - d) for dimension d (dimension 0 is the slowest)."""
        n, l, d, _ = per_dim.shape
        out = None
        for dim in range(d):
            shape = [n, l] + [1] * d
            shape[2 + dim] = 2
            term = per_dim[:, :, dim].reshape(shape)
            out = term if out is None else op(out, term)
        return out.reshape(n, l, 2 ** d)

    def _forward_tcnn(self, x: torch.Tensor) -> torch.Tensor:
        if "_tcnn" not in self.__dict__:
            import tinycudann as tcnn

            module = tcnn.Encoding(self.n_input_dims, self._tcnn_config, dtype=torch.float32)
            module.params = self.params  # share our table: the state dict stays backend-independent
            self.__dict__["_tcnn"] = module  # not a registered child: no second copy in state_dict
        return self.__dict__["_tcnn"](x).float()


class ProgressiveBandHashGrid(HashGrid):
    """Hash grid whose finer levels are switched on over training (Neuralangelo-style).

    ``current_level`` is a buffer, so the active band survives checkpoints.
    """

    def __init__(self, n_input_dims: int, config: Dict[str, Any], backend: str = "auto"):
        super().__init__(n_input_dims, config, backend)
        self.start_level = number_at_least(config.get("start_level", 4), "xyz_encoding_config.start_level", 1)
        self.start_step = number_at_least(config.get("start_step", 0), "xyz_encoding_config.start_step", 0)
        self.update_steps = number_at_least(config.get("update_steps", 1000), "xyz_encoding_config.update_steps", 1)
        self.register_buffer("current_level", torch.tensor(self.start_level, dtype=torch.long))

    def update_step(self, epoch: int, global_step: int) -> None:
        level = min(self.start_level + max(global_step - self.start_step, 0) // self.update_steps, self.n_levels)
        self.current_level.fill_(level)
        self._level = level

    @property
    def active_levels(self) -> int:
        """``current_level`` as a host int, read from the buffer once after a load (not on every step)."""
        if getattr(self, "_level", None) is None:
            self._level = int(self.current_level)
        return self._level

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._level = None

    def level_mask(self) -> torch.Tensor:
        """(L * F,) float mask, 1 for active levels."""
        level_of_feature = torch.arange(self.n_output_dims, device=self.params.device) // self.n_features_per_level
        return (level_of_feature < self.current_level).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.level_mask()


def _real_sh_basis(xyz: torch.Tensor, degree: int) -> torch.Tensor:
    """Real spherical harmonics (with Condon-Shortley phase, tcnn's signs and order).

    xyz: (N, 3) unit vectors. Returns (N, degree^2), bands l = 0..degree-1,
    m = -l..l within a band. Uses the associated-Legendre recurrence in
    Cartesian form, so every degree up to 8 comes from the same code.
    """
    x, y, z = xyz.unbind(-1)
    # C_m + i S_m = (x + i y)^m  (equals sin^m(theta) e^{i m phi} on the sphere)
    cos_m, sin_m = [torch.ones_like(x)], [torch.zeros_like(x)]
    for _ in range(1, degree):
        c, s = cos_m[-1], sin_m[-1]
        cos_m.append(c * x - s * y)
        sin_m.append(c * y + s * x)
    # Q[l][m]: associated Legendre P_l^m(z) divided by sin^m(theta).
    q = [[None] * degree for _ in range(degree)]
    for m in range(degree):
        q[m][m] = torch.full_like(z, float((-1) ** m * np.prod(np.arange(1, 2 * m, 2)) if m > 0 else 1.0))
        if m + 1 < degree:
            q[m + 1][m] = (2 * m + 1) * z * q[m][m]
        for l in range(m + 2, degree):
            q[l][m] = ((2 * l - 1) * z * q[l - 1][m] - (l + m - 1) * q[l - 2][m]) / (l - m)
    out = []
    for l in range(degree):
        for m in range(-l, l + 1):
            am = abs(m)
            k = math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - am) / math.factorial(l + am))
            if m == 0:
                out.append(k * q[l][0])
            elif m > 0:
                out.append(math.sqrt(2.0) * k * q[l][am] * cos_m[am])
            else:
                out.append(math.sqrt(2.0) * k * q[l][am] * sin_m[am])
    return torch.stack(out, dim=-1)


@functools.lru_cache(maxsize=None)
def _sh_polynomial(degree: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The basis of ``_real_sh_basis`` as polynomials: (monomial exponents (M, 3), coefficients (M, degree^2)).

    Every basis function is a polynomial of total degree < ``degree`` in x, y, z (the recurrence above only
    adds and multiplies), so a float64 least-squares fit on points off the sphere, where the monomials are
    independent, recovers its coefficients to rounding (~1e-12).
    """
    exponents = torch.tensor([(i, j, k) for i in range(degree) for j in range(degree) for k in range(degree)
                              if i + j + k < degree], dtype=torch.long)
    points = torch.rand(8 * len(exponents), 3, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0)) * 2 - 1
    monomials = points[:, None, :].pow(exponents).prod(-1)  # (P, M)
    coefficients = torch.linalg.lstsq(monomials, _real_sh_basis(points, degree)).solution
    return exponents, coefficients


class SphericalHarmonics(nn.Module):
    """tcnn ``SphericalHarmonics``: inputs in [0, 1]^3 (direction * 0.5 + 0.5), degree 1-8.

    forward: (N, 3) -> (N, degree^2). Evaluated as monomials times a constant matrix: about ten operators
    whatever the degree (the recurrence is ~70 at degree 4), which is host time saved on a GPU every step.
    """

    def __init__(self, n_input_dims: int, config: Dict[str, Any]):
        super().__init__()
        self.degree = int(config.get("degree", 4))
        if n_input_dims != 3 or not 1 <= self.degree <= 8:
            raise ConfigError("SphericalHarmonics takes 3D directions and a degree from 1 to 8.")
        self.n_output_dims = self.degree ** 2
        exponents, coefficients = _sh_polynomial(self.degree)
        self.register_buffer("exponents", exponents, persistent=False)  # (M, 3)
        self.register_buffer("coefficients", coefficients.float(), persistent=False)  # (M, degree^2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xyz = x.float() * 2.0 - 1.0  # (N, 3)
        ones = torch.ones_like(xyz[:, :, None])
        # powers[n, d, e] = xyz[n, d]^e by repeated products (pow's gradient at 0^0 would be NaN)
        powers = torch.cat([ones, xyz[:, :, None].expand(-1, -1, self.degree - 1)], dim=-1).cumprod(-1)
        e = self.exponents
        monomials = powers[:, 0, e[:, 0]] * powers[:, 1, e[:, 1]] * powers[:, 2, e[:, 2]]  # (N, M)
        return monomials @ self.coefficients


class Frequency(nn.Module):
    """tcnn ``Frequency``: per input dim d and frequency k, [sin(2^k pi x_d), cos(2^k pi x_d)].

    forward: (N, D) -> (N, D * 2 * n_frequencies), ordered dim-major as tcnn.
    """

    def __init__(self, n_input_dims: int, config: Dict[str, Any]):
        super().__init__()
        self.n_frequencies = number_at_least(config.get("n_frequencies", 12), "encoding_config.n_frequencies", 1)
        self.n_output_dims = n_input_dims * 2 * self.n_frequencies
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(self.n_frequencies).float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arg = x.float()[..., None] * self.freqs  # (N, D, K)
        out = torch.stack([torch.sin(arg), torch.cos(arg)], dim=-1)  # (N, D, K, 2)
        return out.reshape(x.shape[0], -1)


class VanillaFrequency(nn.Module):
    """instant-nsr-pl ``VanillaFrequency``: [sin(2^k x), cos(2^k x)] for k < n_frequencies, frequency-major."""

    def __init__(self, n_input_dims: int, config: Dict[str, Any]):
        super().__init__()
        self.n_frequencies = number_at_least(config.get("n_frequencies", 6), "encoding_config.n_frequencies", 1)
        self.n_output_dims = n_input_dims * 2 * self.n_frequencies
        self.register_buffer("freqs", 2.0 ** torch.arange(self.n_frequencies).float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arg = x.float()[:, None, :] * self.freqs[None, :, None]  # (N, K, D)
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1).reshape(x.shape[0], -1)


class CompositeEncoding(nn.Module):
    """An encoding with, optionally, the raw input (mapped [0,1] -> [-1,1]) in front."""

    def __init__(self, encoding: nn.Module, n_input_dims: int, include_xyz: bool):
        super().__init__()
        self.encoding = encoding
        self.include_xyz = include_xyz
        self.n_output_dims = encoding.n_output_dims + (n_input_dims if include_xyz else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encoding(x)
        return torch.cat([x * 2.0 - 1.0, enc], dim=-1) if self.include_xyz else enc


ENCODINGS = {
    "HashGrid": HashGrid,
    "ProgressiveBandHashGrid": ProgressiveBandHashGrid,
    "SphericalHarmonics": SphericalHarmonics,
    "Frequency": Frequency,
    "VanillaFrequency": VanillaFrequency,
}


def get_encoding(n_input_dims: int, config: Any) -> CompositeEncoding:
    """Build the encoding a config names (``otype``), with the ``include_xyz`` option."""
    config = dict(to_primitive(config))
    otype = config.get("otype")
    if otype not in ENCODINGS:
        raise ConfigError(f"Unknown encoding otype '{otype}'; known: {', '.join(ENCODINGS)}.")
    cls = ENCODINGS[otype]
    if cls in (HashGrid, ProgressiveBandHashGrid):
        encoding = cls(n_input_dims, config, backend=config.get("backend", "auto"))
    else:
        backend = str(config.get("backend", "auto")).lower()
        if backend not in ("auto", "torch"):
            raise ConfigError(f"encoding otype {otype} has a PyTorch implementation only (got backend: {backend}); "
                              "use backend=auto or torch.")
        encoding = cls(n_input_dims, config)
    return CompositeEncoding(encoding, n_input_dims, bool(config.get("include_xyz", False)))
