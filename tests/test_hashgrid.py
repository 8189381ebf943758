"""Hash grid against independent references: grid_sample for dense levels, a pure-Python tcnn for hashed ones."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.encodings import HASH_PRIMES, HashGrid, ProgressiveBandHashGrid, hash_grid_levels

CFG = dict(n_levels=6, n_features_per_level=2, log2_hashmap_size=12, base_resolution=4, per_level_scale=1.8)


def make_grid(cfg=CFG):
    grid = HashGrid(3, cfg, backend="torch")
    with torch.no_grad():
        grid.params.normal_()
    return grid


def python_tcnn_encode(grid: HashGrid, point, level):
    """tcnn's hash-grid encoding of one point at one level, in plain Python integers (uint32 arithmetic)."""
    lv = hash_grid_levels(3, grid.n_levels, grid.log2_hashmap_size, grid.base_resolution, grid.per_level_scale)
    scale, res, size, offset = float(lv["scale"][level]), int(lv["resolution"][level]), int(lv["size"][level]), int(lv["offset"][level])
    pos = [float(np.float32(np.float32(scale) * np.float32(p) + np.float32(0.5))) for p in point]
    g = [math.floor(p) for p in pos]
    f = [p - gi for p, gi in zip(pos, g)]
    table = grid.table().detach().double().numpy()
    out = np.zeros(grid.n_features_per_level)
    for corner in range(8):
        c = [g[d] + ((corner >> d) & 1) for d in range(3)]
        w = 1.0
        for d in range(3):
            w *= f[d] if (corner >> d) & 1 else 1 - f[d]
        if res ** 3 <= size:
            idx = c[0] + c[1] * res + c[2] * res * res
        else:
            idx = 0
            for d in range(3):
                idx ^= (c[d] * HASH_PRIMES[d]) & 0xFFFFFFFF
        out += w * table[offset + idx % size]
    return out


def test_level_constants_follow_tcnn():
    lv = hash_grid_levels(3, 16, 19, 16, 1.447269237440378)
    assert lv["resolution"][0] == 16 and lv["size"][0] == 16 ** 3  # 4096 is a multiple of 8
    assert lv["hashed"].sum() > 0 and not lv["hashed"][0]
    assert (lv["size"][lv["hashed"]] == 2 ** 19).all()
    assert (np.diff(lv["offset"]) == lv["size"][:-1]).all()
    assert 4090 <= lv["resolution"][-1] <= 4100  # 16 * 1.4473^15 = 4096


def test_matches_python_tcnn_on_dense_and_hashed_levels():
    grid = make_grid()
    assert grid.hashed.any() and (~grid.hashed).any(), "test must cover both kinds of level"
    pts = torch.rand(25, 3)
    enc = grid(pts).detach().double().numpy().reshape(25, grid.n_levels, -1)
    for i in range(25):
        for level in range(grid.n_levels):
            ref = python_tcnn_encode(grid, pts[i].tolist(), level)
            np.testing.assert_allclose(enc[i, level], ref, rtol=1e-4, atol=1e-5)


def test_dense_levels_match_grid_sample():
    grid = make_grid()
    pts = torch.rand(2000, 3) * 0.9 + 0.05
    enc = grid(pts).detach().view(len(pts), grid.n_levels, -1)
    for level in torch.nonzero(~grid.hashed)[:, 0].tolist():
        res = int(grid.resolution[level])
        scale = float(grid.scale[level])
        start = int(grid.offset[level])
        vol = grid.table()[start:start + res ** 3].detach()  # index = x + y*res + z*res^2 -> volume[z, y, x]
        vol = vol.view(res, res, res, -1).permute(3, 0, 1, 2)[None]  # (1, F, D=z, H=y, W=x)
        p = pts * scale + 0.5  # vertex coordinates
        keep = (p < res - 1).all(dim=1)  # stay inside the stored vertices (tcnn wraps beyond)
        coords = (p[keep] / (res - 1) * 2 - 1)[None, :, None, None, :]  # grid_sample wants (x, y, z)
        ref = F.grid_sample(vol, coords, mode="bilinear", align_corners=True)[0, :, :, 0, 0].T
        torch.testing.assert_close(enc[keep, level], ref, rtol=1e-4, atol=1e-5)


def test_input_gradient_matches_finite_differences():
    grid = make_grid()
    x = torch.rand(64, 3, requires_grad=True)
    w = torch.randn(grid.n_output_dims)
    (grid(x) @ w).sum().backward()
    eps = 2e-4
    fd = torch.stack([((grid(x.detach() + e) - grid(x.detach() - e)) @ w) / (2 * eps)
                      for e in torch.eye(3) * eps], dim=-1)
    # piecewise-linear field: compare where no cell boundary lies within eps
    pos = x.detach()[:, None, :] * grid.scale[None, :, None] + 0.5
    safe = ((pos - pos.round()).abs() > 1.5 * eps * grid.scale[None, :, None]).all(dim=-1).all(dim=-1)
    assert safe.sum() > 5
    torch.testing.assert_close(x.grad[safe], fd[safe], rtol=2e-2, atol=2e-2)


def test_table_gradient_is_interpolation_weights():
    grid = make_grid()
    x = torch.rand(1, 3)
    grid(x)[0, 0].backward()  # level 0, feature 0: gradient = trilinear weights on 8 entries
    g = grid.params.grad.view(-1, 2)
    assert torch.isclose(g[:, 0].sum(), torch.tensor(1.0), atol=1e-5)
    assert (g[:, 0] != 0).sum() <= 8 and g[:, 1].abs().sum() == 0


def test_progressive_band_masks_finer_levels():
    cfg = dict(CFG, start_level=2, start_step=0, update_steps=10)
    grid = ProgressiveBandHashGrid(3, cfg, backend="torch")
    x = torch.rand(8, 3)
    out = grid(x).view(8, grid.n_levels, -1)
    assert (out[:, 2:] == 0).all() and (out[:, :2] != 0).any()
    grid.update_step(0, 25)
    assert int(grid.current_level) == 4
    out = grid(x).view(8, grid.n_levels, -1)
    assert (out[:, 4:] == 0).all() and (out[:, 3] != 0).any()
    state = grid.state_dict()
    fresh = ProgressiveBandHashGrid(3, cfg, backend="torch")
    fresh.load_state_dict(state)
    assert int(fresh.current_level) == 4


def test_second_order_gradient_reaches_the_table():
    """Eikonal-style loss on the input gradient: its derivative w.r.t. table entries matches finite differences."""
    grid = make_grid()
    x = torch.rand(200, 3)
    w = torch.randn(grid.n_output_dims)

    def loss_fn():
        xi = x.clone().requires_grad_()
        (g,) = torch.autograd.grad((grid(xi) @ w).sum(), xi, create_graph=True)
        return (g.norm(dim=-1) - 1).square().mean()

    grid.params.grad = None
    loss_fn().backward()
    analytic = grid.params.grad.clone()
    entries = torch.topk(analytic.abs(), 5).indices  # entries that matter
    eps = 1e-2
    for i in entries.tolist():
        with torch.no_grad():
            grid.params[i] += eps
        up = float(loss_fn())
        with torch.no_grad():
            grid.params[i] -= 2 * eps
        down = float(loss_fn())
        with torch.no_grad():
            grid.params[i] += eps
        fd = (up - down) / (2 * eps)
        assert abs(fd - float(analytic[i])) < 0.02 * abs(fd) + 1e-3, (i, fd, float(analytic[i]))


@pytest.mark.parametrize("dims,features", [(3, 2), (2, 4), (3, 1)])
def test_cpu_layout_matches_the_autograd_layout_in_every_gradient(dims, features):
    """The CPU's corner-major path against the (CUDA) point-major one, whose gradients are all autograd's:
    values, input gradient, and the gradients of an eikonal-style loss to the table and to a softplus MLP on
    top (so the input gradient's dependence on the encoded values counts too), dense and hashed levels, with
    points outside [0, 1] where tcnn's index wraps."""
    torch.manual_seed(0)
    grid = HashGrid(dims, dict(CFG, n_features_per_level=features), backend="torch")
    assert grid.hashed.any() and (~grid.hashed).any()
    with torch.no_grad():
        grid.params.uniform_(-1, 1)
    mlp = torch.nn.Sequential(torch.nn.Linear(grid.n_output_dims, 16), torch.nn.Softplus(beta=10),
                              torch.nn.Linear(16, 1))
    x0 = torch.rand(700, dims) * 1.2 - 0.1

    def run(encode):
        x = x0.clone().requires_grad_(True)
        values = encode(x)
        sdf = mlp(values)
        (grad_x,) = torch.autograd.grad(sdf.sum(), x, create_graph=True)
        loss = (grad_x.norm(dim=-1) - 1).square().mean() + sdf.square().mean()
        grid.zero_grad()
        mlp.zero_grad()
        loss.backward()
        return [values.detach(), grad_x.detach(), grid.params.grad.clone()] + [p.grad.clone() for p in mlp.parameters()]

    for new, ref in zip(run(grid._forward_corner_major), run(grid._forward_autograd)):
        torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    with torch.no_grad():  # rendering and marching cubes: values only
        torch.testing.assert_close(grid._forward_corner_major(x0), grid._forward_autograd(x0))
    assert grid(torch.zeros(0, dims)).shape == (0, grid.n_output_dims)
    with torch.no_grad():
        assert grid(torch.zeros(0, dims)).shape == (0, grid.n_output_dims)


@pytest.mark.parametrize("features", [1, 2, 4, 8])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_cpu_entry_gather_and_its_gradient_match_plain_indexing(features, index_dtype):
    """The CPU path reads each table entry's F features as one element (a complex number for F = 2); its values and
    its gradient (entries gathered twice add up) against plain row indexing, including an upstream gradient that
    starts at an odd float offset, where a complex view of it would be refused."""
    from models.encodings import _GatherEntries

    torch.manual_seed(0)
    table = torch.randn(50, features, requires_grad=True)
    index = torch.randint(50, (300,), dtype=index_dtype)
    gathered = _GatherEntries.apply(table, index)
    torch.testing.assert_close(gathered, table.detach()[index.long()], rtol=0, atol=0)
    upstream = torch.randn(300 * features + 1)[1:].view(300, features)
    assert upstream.storage_offset() % 2 == 1
    gathered.backward(upstream)
    expected = torch.zeros(50, features).index_add_(0, index.long(), upstream)
    torch.testing.assert_close(table.grad, expected)


def test_cpu_values_without_gradients_come_in_blocks_with_the_same_figures(monkeypatch):
    """Grid updates, meshing and rendering encode up to millions of points without gradients: the CPU layout takes
    them in blocks of CPU_LOOKUPS_PER_BLOCK (corner, level, point) lookups, to the same bits as in one piece."""
    import models.encodings as encodings

    grid = make_grid(dict(CFG, log2_hashmap_size=10))  # dense and hashed levels
    monkeypatch.setattr(encodings, "CPU_LOOKUPS_PER_BLOCK", 8 * grid.n_levels * 100)  # blocks of 100 points
    x = torch.rand(1234, 3) * 1.2 - 0.1
    whole = grid._forward_corner_major(x)
    sizes = []
    layout = grid._forward_corner_major
    monkeypatch.setattr(grid, "_forward_corner_major", lambda part: sizes.append(len(part)) or layout(part))
    with torch.no_grad():
        blocked = grid(x)
    assert sizes == [100] * 12 + [34]
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-6)  # rounding: the corner sum vectorises by block size
    sizes.clear()
    x.requires_grad_(True)
    values = grid(x)  # with gradients: one piece (faster there), and its graph reaches x
    assert sizes == [1234] and values.requires_grad
    torch.testing.assert_close(values.detach(), whole)
