"""Real, orthonormal, even-degree spherical harmonics (MRtrix3 and DIPY descoteaux07 bases).

Coefficients are ordered by degree l = 0, 2, 4, ... and, within a degree, by order
m = -l ... l. In the MRtrix3 basis (Tournier et al. 2019), with complex harmonics
:math:`Y_l^m` carrying the Condon-Shortley phase,

.. math::  Y_{lm} = \\sqrt2\\,\\mathrm{Im}\\,Y_l^{|m|}\\ (m<0),\\quad Y_l^0\\ (m=0),\\quad
           \\sqrt2\\,\\mathrm{Re}\\,Y_l^{m}\\ (m>0).

DIPY's non-legacy descoteaux07 basis (Descoteaux et al. 2007) swaps the roles of
positive and negative m (with a sign (-1)^m on the cosine terms), so the two bases
differ by a signed permutation of coefficients: :func:`convert_sh_basis`.

References
----------
Tournier J-D. et al. MRtrix3: a fast, flexible and open software framework for medical
image processing and visualisation. NeuroImage 202 (2019) 116137.
Descoteaux M. et al. Regularized, fast, and robust analytical Q-ball imaging.
Magn Reson Med 58 (2007) 497-510.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from dwiflow.core.errors import DwiflowInputError

SHBasis = Literal["mrtrix3", "descoteaux07"]
SH_BASES = ("mrtrix3", "descoteaux07")


def check_lmax(lmax: int, name: str = "lmax") -> int:
    """Validate an even, non-negative maximum SH degree and return it as int."""
    if isinstance(lmax, bool) or int(lmax) != lmax or lmax < 0 or int(lmax) % 2:
        raise DwiflowInputError(f"{name} must be a non-negative even integer, got {lmax!r}")
    return int(lmax)


def n_coefficients(lmax: int) -> int:
    """Number of even-degree SH coefficients up to ``lmax``: (lmax+1)(lmax+2)/2."""
    lmax = check_lmax(lmax)
    return (lmax + 1) * (lmax + 2) // 2


def lmax_from_n_coefficients(n: int) -> int:
    """Inverse of :func:`n_coefficients`; raises when ``n`` is not such a count."""
    lmax = int(round((np.sqrt(8 * n + 1) - 3) / 2))
    if lmax < 0 or lmax % 2 or n_coefficients(lmax) != n:
        raise DwiflowInputError(f"{n} is not a number of even-degree SH coefficients (1, 6, 15, 28, 45, ...)")
    return lmax


def max_lmax_for_directions(n_directions: int) -> int:
    """Highest even lmax whose coefficient count does not exceed ``n_directions``."""
    lmax = 0
    while n_coefficients(lmax + 2) <= n_directions:
        lmax += 2
    return lmax


def sh_degree_order(lmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Degree ``l`` and order ``m`` of every coefficient, in storage order."""
    lmax = check_lmax(lmax)
    degrees = np.concatenate([np.full(2 * l + 1, l) for l in range(0, lmax + 1, 2)])
    orders = np.concatenate([np.arange(-l, l + 1) for l in range(0, lmax + 1, 2)])
    return degrees, orders


def cart_to_sphere(directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Polar angle (from +z) and azimuth (from +x towards +y) of (n, 3) directions."""
    d = np.asarray(directions, dtype=float)
    r = np.linalg.norm(d, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        polar = np.arccos(np.clip(d[..., 2] / r, -1.0, 1.0))
    azimuth = np.arctan2(d[..., 1], d[..., 0])
    return polar, azimuth


def sphere_to_cart(polar: np.ndarray, azimuth: np.ndarray) -> np.ndarray:
    """Unit vectors from polar angle and azimuth."""
    s = np.sin(polar)
    return np.stack([s * np.cos(azimuth), s * np.sin(azimuth), np.cos(polar)], axis=-1)


def _normalised_legendre(lmax: int, cos_polar: np.ndarray, sin_polar: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """Orthonormalised associated Legendre functions sqrt((2l+1)/4π (l-m)!/(l+m)!) P_l^m, m >= 0.

    P_l^m carries the Condon-Shortley phase. Standard stable recurrences: along the
    diagonal P_m^m from P_{m-1}^{m-1}, then upwards in l for fixed m.
    """
    p: dict[tuple[int, int], np.ndarray] = {(0, 0): np.full_like(cos_polar, np.sqrt(1 / (4 * np.pi)))}
    for m in range(1, lmax + 1):
        p[(m, m)] = -np.sqrt((2 * m + 1) / (2 * m)) * sin_polar * p[(m - 1, m - 1)]
    for m in range(0, lmax + 1):
        if m + 1 <= lmax:
            p[(m + 1, m)] = np.sqrt(2 * m + 3) * cos_polar * p[(m, m)]
        for l in range(m + 2, lmax + 1):
            a = np.sqrt((4 * l * l - 1) / (l * l - m * m))
            b = np.sqrt(((l - 1) ** 2 - m * m) / (4 * (l - 1) ** 2 - 1))
            p[(l, m)] = a * (cos_polar * p[(l - 1, m)] - b * p[(l - 2, m)])
    return p


def real_sh_basis(
    lmax: int,
    directions: np.ndarray | None = None,
    *,
    polar: np.ndarray | None = None,
    azimuth: np.ndarray | None = None,
    basis: SHBasis = "mrtrix3",
) -> np.ndarray:
    """Matrix of real even SH evaluated at points on the sphere.

    Parameters
    ----------
    lmax : int
        Maximum (even) degree.
    directions : ndarray, shape (n, 3), optional
        Unit vectors; alternatively give ``polar`` and ``azimuth`` angles.
    basis : {"mrtrix3", "descoteaux07"}
        ``descoteaux07`` is DIPY's non-legacy basis.

    Returns
    -------
    ndarray, shape (n, n_coefficients(lmax))
    """
    if basis not in SH_BASES:
        raise DwiflowInputError(f"basis must be one of {SH_BASES}, got {basis!r}")
    lmax = check_lmax(lmax)
    if directions is not None:
        polar, azimuth = cart_to_sphere(directions)
    if polar is None or azimuth is None:
        raise DwiflowInputError("give either directions or both polar and azimuth")
    polar = np.atleast_1d(np.asarray(polar, dtype=float)).ravel()
    azimuth = np.atleast_1d(np.asarray(azimuth, dtype=float)).ravel()
    legendre_p = _normalised_legendre(lmax, np.cos(polar), np.sin(polar))
    cos_m = [np.ones_like(azimuth)] + [np.cos(m * azimuth) for m in range(1, lmax + 1)]
    sin_m = [np.zeros_like(azimuth)] + [np.sin(m * azimuth) for m in range(1, lmax + 1)]
    rows = np.empty((n_coefficients(lmax), polar.size))  # filled row by row (contiguous), returned transposed
    sqrt2 = np.sqrt(2.0)
    col = 0
    for l in range(0, lmax + 1, 2):
        for m in range(-l, l + 1):
            plm = legendre_p[(l, abs(m))]
            if m == 0:
                rows[col] = plm
            elif basis == "mrtrix3":  # m>0: sqrt2 Re Y_l^m ; m<0: sqrt2 Im Y_l^|m|
                np.multiply(plm, cos_m[m] if m > 0 else sin_m[-m], out=rows[col])
                rows[col] *= sqrt2
            else:  # descoteaux07: m>0: sqrt2 Im Y_l^m ; m<0: sqrt2 (-1)^m Re Y_l^|m|
                np.multiply(plm, sin_m[m] if m > 0 else cos_m[-m], out=rows[col])
                rows[col] *= sqrt2 if m > 0 else sqrt2 * (-1) ** m
            col += 1
    return rows.T


def convert_sh_basis(coefficients: np.ndarray, source: SHBasis, target: SHBasis) -> np.ndarray:
    """Convert SH coefficients (last axis) between the mrtrix3 and descoteaux07 bases.

    The conversion is exact (a signed permutation within each degree) and its own
    inverse up to the direction of the signs, so ``convert(convert(c, a, b), b, a) == c``.
    """
    for name, value in (("source", source), ("target", target)):
        if value not in SH_BASES:
            raise DwiflowInputError(f"{name} basis must be one of {SH_BASES}, got {value!r}")
    coefficients = np.asarray(coefficients)
    if source == target:
        return coefficients.copy()
    lmax = lmax_from_n_coefficients(coefficients.shape[-1])
    degrees, orders = sh_degree_order(lmax)
    # index of (l, m) is start_l + l + m with start_l = l(l-1)/2
    start_l = degrees * (degrees - 1) // 2
    partner = start_l + degrees - orders  # index of (l, -m)
    # descoteaux(l, m>0) = mrtrix(l, -m); descoteaux(l, m<0) = (-1)^m mrtrix(l, -m)
    sign = np.where(orders < 0, (-1.0) ** np.abs(orders), 1.0)
    if source == "mrtrix3":
        return coefficients[..., partner] * sign
    # inverse: mrtrix(l, m) = sign(l, -m) * descoteaux(l, -m)
    return coefficients[..., partner] * sign[partner]


def laplace_beltrami_weights(lmax: int) -> np.ndarray:
    """Diagonal of the squared Laplace-Beltrami operator, l²(l+1)², per coefficient.

    Used as the regulariser of Descoteaux et al. (2007) and MAP-MRI/Q-ball fits.
    """
    degrees, _ = sh_degree_order(lmax)
    return (degrees * (degrees + 1.0)) ** 2


def zonal_sh_basis(lmax: int, cos_angle: np.ndarray) -> np.ndarray:
    """Zonal (m=0) harmonics sqrt((2l+1)/4π) P_l(cos θ) for even l, shape (n, lmax/2+1)."""
    return zonal_sh_basis_rows(lmax, cos_angle).T


def zonal_sh_basis_rows(lmax: int, cos_angle: np.ndarray) -> np.ndarray:
    """As :func:`zonal_sh_basis` but transposed, (lmax/2+1, n), each row contiguous.

    Legendre polynomials come from Bonnet's recurrence
    (l+1) P_{l+1} = (2l+1) x P_l - l P_{l-1}, evaluated in place for all points at once.
    """
    lmax = check_lmax(lmax)
    x = np.ravel(np.asarray(cos_angle, dtype=float))
    out = np.empty((lmax // 2 + 1, x.size))
    out[0] = 1.0
    p_prev, p_curr = out[0], x.copy()  # P_0, P_1
    scratch = np.empty_like(x)
    for l in range(1, lmax):
        np.multiply(x, p_curr, out=scratch)
        scratch *= (2 * l + 1) / (l + 1)
        scratch -= (l / (l + 1)) * p_prev
        if (l + 1) % 2 == 0:
            out[(l + 1) // 2] = scratch
            p_prev, p_curr = p_curr, out[(l + 1) // 2]
        else:
            p_prev, p_curr = p_curr, scratch.copy()
    for row, l in enumerate(range(0, lmax + 1, 2)):
        out[row] *= np.sqrt((2 * l + 1) / (4 * np.pi))
    return out


def zonal_to_rotational_harmonics(zonal: np.ndarray) -> np.ndarray:
    """Rotational-harmonic (convolution) factors from zonal SH coefficients.

    For a response with zonal coefficients r_l (m=0 terms of an axially symmetric
    function about z) and an FOD with coefficients f_lm, the convolution has
    coefficients s_lm = R_l f_lm with R_l = sqrt(4π/(2l+1)) r_l (Funk-Hecke).
    """
    zonal = np.asarray(zonal, dtype=float)
    degrees = 2 * np.arange(zonal.shape[-1])
    return zonal * np.sqrt(4 * np.pi / (2 * degrees + 1))


def expand_per_degree(per_degree: np.ndarray, lmax: int) -> np.ndarray:
    """Repeat a per-degree array (l = 0, 2, ..., lmax) over the 2l+1 orders of each degree."""
    per_degree = np.asarray(per_degree)
    lmax = check_lmax(lmax)
    needed = lmax // 2 + 1
    if per_degree.shape[-1] < needed:
        pad = [(0, 0)] * (per_degree.ndim - 1) + [(0, needed - per_degree.shape[-1])]
        per_degree = np.pad(per_degree, pad)
    degrees, _ = sh_degree_order(lmax)
    return per_degree[..., degrees // 2]


def spherical_convolution(fod_sh: np.ndarray, response_zonal: np.ndarray) -> np.ndarray:
    """Convolve SH coefficients (last axis) with an axially symmetric response (zonal SH)."""
    fod_sh = np.asarray(fod_sh, dtype=float)
    lmax = lmax_from_n_coefficients(fod_sh.shape[-1])
    factors = expand_per_degree(zonal_to_rotational_harmonics(response_zonal), lmax)
    return fod_sh * factors


def sh_to_amplitudes(coefficients: np.ndarray, basis_matrix: np.ndarray) -> np.ndarray:
    """Amplitudes at the basis matrix's points: (..., n_coeffs) → (..., n_points)."""
    return np.asarray(coefficients) @ basis_matrix.T


def amplitudes_to_sh(
    amplitudes: np.ndarray,
    directions: np.ndarray,
    lmax: int,
    *,
    basis: SHBasis = "mrtrix3",
    regularisation: float = 0.0,
) -> np.ndarray:
    """Least-squares SH fit of amplitudes (last axis) sampled at ``directions``.

    ``regularisation`` weights the Laplace-Beltrami penalty (0 gives plain least squares).
    """
    lmax = check_lmax(lmax)
    directions = np.asarray(directions, dtype=float)
    if not regularisation and directions.shape[0] < n_coefficients(lmax):
        raise DwiflowInputError(
            f"lmax {lmax} needs at least {n_coefficients(lmax)} directions, got {directions.shape[0]}"
        )
    b = real_sh_basis(lmax, directions, basis=basis)
    normal = b.T @ b + regularisation * np.diag(laplace_beltrami_weights(lmax))
    fit_matrix = np.linalg.solve(normal, b.T)  # (n_coeffs, n_points)
    return np.asarray(amplitudes) @ fit_matrix.T
