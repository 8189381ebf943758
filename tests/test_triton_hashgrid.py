"""Triton hash grid vs the PyTorch reference: values, table gradient, input gradient, and the second-order term.

Without a GPU the kernels run under Triton's interpreter at small sizes
(conftest.py sets TRITON_INTERPRET=1 before anything imports Triton); with
one, at full size on the device too.
"""
import pytest
import torch

from helpers import import_triton_or_skip

triton = import_triton_or_skip()

from models.encodings import HashGrid  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


def grids(config):
    """The same grid twice, torch and triton backends, sharing one random table."""
    ref = HashGrid(3, config, backend="torch").to(DEVICE)
    fast = HashGrid(3, config, backend="triton").to(DEVICE)
    with torch.no_grad():
        ref.params.uniform_(-1.0, 1.0)
        fast.params.copy_(ref.params)
    return ref, fast


SMALL = {"n_levels": 4, "n_features_per_level": 2, "log2_hashmap_size": 9, "base_resolution": 4,
         "per_level_scale": 2.0}  # two dense levels (4^3, 8^3 entries fit), then hashed ones
FULL = {"n_levels": 16, "n_features_per_level": 2, "log2_hashmap_size": 19, "base_resolution": 16,
        "per_level_scale": 1.447269237440378}


def first_and_second_order(grid, x, gy, ggx):
    """(y, dL/dtable, dL/dx, and the gradients of <ggx, dx> to the table and to gy) via autograd."""
    x = x.clone().requires_grad_(True)
    gy = gy.clone().requires_grad_(True)
    y = grid(x)
    dx, = torch.autograd.grad(y, x, gy, create_graph=True)
    dtable, = torch.autograd.grad(y, grid.params, gy, retain_graph=True)
    second_table, second_gy = torch.autograd.grad((dx * ggx).sum(), [grid.params, gy])
    return y.detach(), dtable, dx.detach(), second_table, second_gy


@pytest.mark.parametrize("config,n,vector_atomics", [(SMALL, 200, False), (SMALL, 200, True)]
                         + ([(FULL, 1 << 18, None)] if ON_GPU else []))
def test_values_and_all_gradients_match_the_reference(config, n, vector_atomics):
    """vector_atomics: the table's scatter-add as one (F,)-wide atomic per point (sm_90 and later) or one per
    feature; None: what this GPU gets."""
    ref, fast = grids(config)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.rand(n, 3, generator=g, device=DEVICE)
    if vector_atomics is not None:
        fast(x[:1])  # builds the level constants
        fast._triton_constants.vector_atomics = vector_atomics
    gy = torch.randn(n, ref.n_output_dims, generator=g, device=DEVICE)
    ggx = torch.randn(n, 3, generator=g, device=DEVICE)
    expected = first_and_second_order(ref, x, gy, ggx)
    got = first_and_second_order(fast, x, gy, ggx)
    names = ["values", "table gradient", "input gradient", "second order: table", "second order: upstream"]
    for name, a, b in zip(names, expected, got):
        scale = a.abs().max().clamp(min=1e-6)
        err = float((a - b).abs().max() / scale)
        assert err < 1e-4, f"{name}: max relative error {err:.2e}"


def test_fp16_table_matches_the_reference_on_the_same_values():
    ref, fast = grids(SMALL)
    half = fast.params.detach().half()
    with torch.no_grad():
        ref.params.copy_(half.float())
    x = torch.rand(200, 3, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(1))
    from models.triton_hashgrid import hash_encode

    fast(x)  # builds the level constants
    table = half.view(-1, 2).clone().requires_grad_(True)
    y = hash_encode(x, table, fast._triton_constants)
    torch.testing.assert_close(y, ref(x).detach(), rtol=1e-4, atol=1e-4)
    y.sum().backward()
    assert table.grad.dtype == torch.float16
    ref_grad, = torch.autograd.grad(ref(x).sum(), ref.params)
    torch.testing.assert_close(table.grad.float().view(-1), ref_grad, rtol=1e-2, atol=1e-2)


def test_fp16_reads_of_the_fp32_table_match_the_reference_on_the_rounded_values():
    """table_dtype: float16 gathers from an fp16 copy; the trained table and every gradient stay fp32."""
    ref, fast = grids({**SMALL, "table_dtype": "float16"})
    with torch.no_grad():
        ref.params.copy_(ref.params.half().float())  # what the kernels read
    g = torch.Generator(device=DEVICE).manual_seed(2)
    x = torch.rand(128, 3, generator=g, device=DEVICE)
    gy = torch.randn(128, ref.n_output_dims, generator=g, device=DEVICE)
    ggx = torch.randn(128, 3, generator=g, device=DEVICE)
    expected = first_and_second_order(ref, x, gy, ggx)
    got = first_and_second_order(fast, x, gy, ggx)
    assert fast.params.dtype == torch.float32 and all(t.dtype == torch.float32 for t in got)
    for name, a, b in zip(["values", "table gradient", "input gradient", "second order: table",
                           "second order: upstream"], expected, got):
        err = float((a - b).abs().max() / a.abs().max().clamp(min=1e-6))
        assert err < 1e-4, f"{name}: max relative error {err:.2e}"
    exact = HashGrid(3, SMALL, backend="triton").to(DEVICE)  # same weights, read in fp32
    exact.load_state_dict(fast.state_dict())
    assert float((exact(x) - fast(x)).abs().max()) > 1e-5, "the fp16 reads are in effect"


def test_cell_borders_cube_corners_and_points_outside_the_cube():
    """Outside [0, 1]^3 (a sample beyond the bounding box, a finite-difference step across its face) dense
    indices go negative or past the level: both backends wrap them into the level (a truncated modulo
    would read before the table on a GPU)."""
    ref, fast = grids(SMALL)
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.25, 0.75], [1.0, 0.0, 0.5],
                      [-0.3, -0.3, -0.3], [-0.2, -0.5, -0.1], [1.3, 1.7, -0.4], [-1e-3, 0.5, 1.001]], device=DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(3)
    gy = torch.randn(len(x), ref.n_output_dims, generator=g, device=DEVICE)
    ggx = torch.randn(len(x), 3, generator=g, device=DEVICE)
    for a, b in zip(first_and_second_order(ref, x, gy, ggx), first_and_second_order(fast, x, gy, ggx)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_auto_never_picks_the_interpreter():
    from models import backends

    if ON_GPU:
        pytest.skip("on a GPU auto may rightly pick triton")
    assert HashGrid(3, SMALL, backend="auto").backend == "torch"
    assert backends.triton_status()[0] is False
