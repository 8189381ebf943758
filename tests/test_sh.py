"""Spherical harmonics: tcnn's signs for low degrees, orthonormality up to degree 8."""
import math

import torch

from models.encodings import SphericalHarmonics


def test_low_degrees_match_tcnn_constants():
    d = torch.nn.functional.normalize(torch.randn(50, 3), dim=-1)
    x, y, z = d.unbind(-1)
    out = SphericalHarmonics(3, {"degree": 3})((d + 1) / 2)
    expected = torch.stack([
        torch.full_like(x, 0.28209479177387814),
        -0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x,
        1.0925484305920792 * x * y, -1.0925484305920792 * y * z, 0.94617469575756008 * z * z - 0.31539156525252005,
        -1.0925484305920792 * x * z, 0.54627421529603959 * (x * x - y * y),
    ], dim=-1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_orthonormal_up_to_degree_8():
    # Gauss-Legendre in cos(theta) x uniform in phi integrates these polynomials exactly
    n_t, n_p = 24, 48
    nodes, weights = torch.from_numpy(__import__("numpy").polynomial.legendre.leggauss(n_t)[0]).float(), \
        torch.from_numpy(__import__("numpy").polynomial.legendre.leggauss(n_t)[1]).float()
    phi = torch.arange(n_p) * 2 * math.pi / n_p
    ct, ph = torch.meshgrid(nodes, phi, indexing="ij")
    st = (1 - ct ** 2).sqrt()
    dirs = torch.stack([st * ph.cos(), st * ph.sin(), ct], dim=-1).view(-1, 3)
    w = (weights[:, None] * (2 * math.pi / n_p)).expand(n_t, n_p).reshape(-1)
    basis = SphericalHarmonics(3, {"degree": 8})((dirs + 1) / 2)
    gram = basis.T @ (basis * w[:, None])
    torch.testing.assert_close(gram, torch.eye(64), atol=1e-4, rtol=0)


def test_polynomial_form_equals_the_recurrence_in_float64():
    """The operator-lean evaluation (monomials times fitted coefficients) is the recurrence, every degree."""
    from models.encodings import _real_sh_basis

    d = torch.nn.functional.normalize(torch.randn(500, 3, dtype=torch.float64), dim=-1)
    d[:3] = torch.eye(3, dtype=torch.float64)  # exact zeros in two coordinates
    for degree in range(1, 9):
        fast = SphericalHarmonics(3, {"degree": degree})(((d + 1) / 2).float())
        torch.testing.assert_close(fast.double(), _real_sh_basis(d, degree), rtol=0, atol=2e-5)


def test_gradients_through_the_basis_are_finite_and_match_the_recurrence():
    """Directions with a gradient (e.g. reflected ones) get the recurrence's gradient, also at exact zeros."""
    from models.encodings import _real_sh_basis

    d = torch.nn.functional.normalize(torch.randn(64, 3, dtype=torch.float64), dim=-1)
    d[:3] = torch.eye(3, dtype=torch.float64)
    weights = torch.randn(64, 16, dtype=torch.float64)
    fast_in = ((d + 1) / 2).float().requires_grad_()
    (SphericalHarmonics(3, {"degree": 4})(fast_in) * weights.float()).sum().backward()
    ref_in = d.clone().requires_grad_()
    (_real_sh_basis(ref_in, 4) * weights).sum().backward()
    assert torch.isfinite(fast_in.grad).all()
    torch.testing.assert_close(fast_in.grad.double(), 2 * ref_in.grad, rtol=1e-4, atol=1e-4)  # d(2u-1)/du = 2


def test_asking_for_an_accelerated_backend_is_a_config_error_not_ignored():
    import pytest

    from models.encodings import get_encoding
    from utils.config import ConfigError

    assert get_encoding(3, {"otype": "SphericalHarmonics", "degree": 4, "backend": "torch"})(torch.rand(5, 3)).shape \
        == (5, 16)
    with pytest.raises(ConfigError, match="SphericalHarmonics has a PyTorch implementation only"):
        get_encoding(3, {"otype": "SphericalHarmonics", "degree": 4, "backend": "triton"})
