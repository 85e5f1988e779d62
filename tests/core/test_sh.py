import numpy as np
import pytest
from dipy.reconst.shm import real_sh_descoteaux, real_sh_tournier

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.sh import (
    amplitudes_to_sh,
    cart_to_sphere,
    convert_sh_basis,
    laplace_beltrami_weights,
    lmax_from_n_coefficients,
    max_lmax_for_directions,
    n_coefficients,
    real_sh_basis,
    spherical_convolution,
    zonal_sh_basis,
)
from dwiflow.core.sphere import get_sphere

rng = np.random.default_rng(7)
DIRS = rng.standard_normal((500, 3))
DIRS /= np.linalg.norm(DIRS, axis=1, keepdims=True)


@pytest.mark.parametrize("lmax", [0, 2, 4, 8, 12])
def test_mrtrix3_basis_equals_dipy_tournier(lmax):
    polar, azimuth = cart_to_sphere(DIRS)
    ref, _, _ = real_sh_tournier(lmax, polar, azimuth, legacy=False)
    assert np.abs(real_sh_basis(lmax, DIRS, basis="mrtrix3") - ref).max() < 1e-10


@pytest.mark.parametrize("lmax", [0, 2, 4, 8, 12])
def test_descoteaux07_basis_equals_dipy_non_legacy(lmax):
    polar, azimuth = cart_to_sphere(DIRS)
    ref, _, _ = real_sh_descoteaux(lmax, polar, azimuth, legacy=False)
    assert np.abs(real_sh_basis(lmax, DIRS, basis="descoteaux07") - ref).max() < 1e-10


def test_basis_conversion_preserves_the_function_and_round_trips():
    coeffs = rng.standard_normal((4, n_coefficients(12)))
    desc = convert_sh_basis(coeffs, "mrtrix3", "descoteaux07")
    amps_mrtrix = coeffs @ real_sh_basis(12, DIRS, basis="mrtrix3").T
    amps_desc = desc @ real_sh_basis(12, DIRS, basis="descoteaux07").T
    assert np.allclose(amps_mrtrix, amps_desc, atol=1e-10)
    assert np.allclose(convert_sh_basis(desc, "descoteaux07", "mrtrix3"), coeffs, atol=1e-14)


def test_basis_is_orthonormal_under_exact_quadrature():
    # Gauss-Legendre in cos(polar) x uniform azimuth integrates products up to degree 16 exactly
    nodes, weights = np.polynomial.legendre.leggauss(12)
    azimuth = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    polar = np.repeat(np.arccos(nodes), azimuth.size)
    az = np.tile(azimuth, nodes.size)
    w = np.repeat(weights, azimuth.size) * (2 * np.pi / azimuth.size)
    b = real_sh_basis(8, polar=polar, azimuth=az)
    gram = b.T @ (b * w[:, None])
    assert np.abs(gram - np.eye(gram.shape[0])).max() < 1e-12


def test_coefficient_counts():
    assert [n_coefficients(l) for l in (0, 2, 4, 6, 8)] == [1, 6, 15, 28, 45]
    assert lmax_from_n_coefficients(45) == 8
    assert max_lmax_for_directions(20) == 4 and max_lmax_for_directions(60) == 8
    for bad in (-2, 3, 2.5):
        with pytest.raises(DwiflowInputError, match="non-negative even integer"):
            n_coefficients(bad)
    with pytest.raises(DwiflowInputError, match="not a number of even-degree SH"):
        lmax_from_n_coefficients(7)


def test_laplace_beltrami_weights():
    w = laplace_beltrami_weights(4)
    assert w.shape == (15,)
    assert w[0] == 0 and np.all(w[1:6] == 36) and np.all(w[6:] == 400)


def test_convolution_of_a_delta_reproduces_the_kernel():
    """Funk-Hecke: a delta FOD convolved with a response gives the response rotated onto it."""
    lmax, bval, lam_par, lam_perp = 14, 1000.0, 1.7e-3, 0.3e-3
    x = np.linspace(-1, 1, 2001)
    kernel = np.exp(-bval * (lam_perp + (lam_par - lam_perp) * x**2))
    # zonal coefficients by quadrature: r_l = 2π ∫ k(x) Y_l0(x) dx
    zonal = 2 * np.pi * np.trapezoid(kernel[:, None] * zonal_sh_basis(lmax, x), x, axis=0)
    axis = np.array([0.3, -0.5, 0.81])
    axis /= np.linalg.norm(axis)
    delta_sh = real_sh_basis(lmax, axis[None])[0]
    signal = spherical_convolution(delta_sh, zonal) @ real_sh_basis(lmax, DIRS).T
    expected = np.exp(-bval * (lam_perp + (lam_par - lam_perp) * (DIRS @ axis) ** 2))
    assert np.abs(signal - expected).max() < 1e-3


def test_amplitudes_to_sh_round_trip():
    coeffs = rng.standard_normal(n_coefficients(8))
    v = get_sphere("ico642").vertices
    amps = coeffs @ real_sh_basis(8, v).T
    assert np.allclose(amplitudes_to_sh(amps, v, 8), coeffs, atol=1e-10)
    with pytest.raises(DwiflowInputError, match="needs at least 45 directions"):
        amplitudes_to_sh(amps[:20], v[:20], 8)
