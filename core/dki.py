"""Diffusion kurtosis imaging (DKI), vectorised across voxels, and its scalar maps.

The model (Jensen et al. 2005) writes the log-signal as

    log S(b, g) = log S0 - b Σ g_i g_j D_ij + b² MD² / 6 Σ g_i g_j g_k g_l W_ijkl,

linear in the 6 unique elements of the diffusion tensor D, the 15 unique elements of the kurtosis tensor W
(times MD²) and log S0. It is fitted as DIPY 1.12's ``DiffusionKurtosisModel`` fits it:

- ``OLS``: ordinary least squares on the log-signal (samples below 1e-4 raised to it);
- ``WLS`` (DIPY's default): the OLS fit predicts the signal, whose squares weight a second fit (Veraart et al.
  2013);
- ``CLS`` / ``CWLS``: the OLS / WLS objective minimised subject to DIPY's linear matrix inequality (Dela Haije et
  al. 2020, :mod:`dwiflow.core._dki_constraints`): a sum-of-squares certificate that the fitted model is
  physically plausible (non-negative diffusivities and kurtosis). An unconstrained fit with a certificate of
  feasibility (found vectorised across voxels) is the answer; the other voxels are each a small semidefinite
  program (31 variables, a 3x3 and a 9x9 cone; :class:`ConstrainedKurtosisSolver`) solved by Clarabel's
  interior-point method with every variable and block scaled to its typical magnitude. DIPY solves the unscaled
  program with CVXPY, whose tolerances leave its solution outside the constraint in most voxels where the two
  differ; there ours is inside, and its objective is the smaller one where DIPY's is inside too.

The eigenvalues of D are clipped below at DIPY's ``1e-6 / -min(design matrix)``, and W is the fitted product
divided by the square of the clipped eigenvalues' mean. Or as MRtrix3's ``dwi2tensor -dkt``:

- ``IWLS``: a first fit weighted by the measured signal (or unweighted, ``ols_start``: ``-ols``), then
  ``iterations`` refits weighted by the predicted signal (none below 2, as dwi2tensor's ``-iter``); samples below
  1e-6 of the voxel's largest are raised to it; W is the fitted product divided by (trace(D)/3)² + 1e-18, and the
  eigenvalues are not clipped. The maps follow DIPY's analytical definitions:

- mean kurtosis MK (Tabesh et al. 2011, in terms of Carlson's elliptic integrals R_F and R_D), axial AK and
  radial RK kurtosis (Tabesh et al. 2011), each clipped to [-3/7, 10]. Equal eigenvalues use the formulas' limits,
  as in DIPY; unlike DIPY, the integrals are computed to 1e-12 and only eigenvalues within 1e-5 of each other count
  as equal (DIPY: 2.5%), so the maps equal their definitions (the average of the apparent kurtosis over the sphere
  or the perpendicular circle) to ~1e-5 where DIPY's err by up to 2.5% (see :data:`CARLSON_TOLERANCE`);
- mean of the kurtosis tensor MKT (Hansen et al. 2013), clipped to [-3/7, 10];
- kurtosis fractional anisotropy KFA (Glenn et al. 2015).

A voxel whose tensor has an eigenvalue at or below 2e-7 mm²/s (where DIPY's kurtosis maps are set to 0: the
formulas divide by the eigenvalues) is non-physical here: its maps are NaN and its status says why.

References
----------
Jensen J.H., Helpern J.A., Ramani A., Lu H., Kaczynski K. Diffusional kurtosis imaging: the quantification of
non-Gaussian water diffusion by means of magnetic resonance imaging. Magn Reson Med 53 (2005) 1432-1440.
Tabesh A., Jensen J.H., Ardekani B.A., Helpern J.A. Estimation of tensors and tensor-derived measures in
diffusional kurtosis imaging. Magn Reson Med 65 (2011) 823-836.
Hansen B., Lund T.E., Sangill R., Jespersen S.N. Experimentally and computationally fast method for estimation
of a mean kurtosis. Magn Reson Med 69 (2013) 1754-1760.
Glenn G.R., Helpern J.A., Tabesh A., Jensen J.H. Quantitative assessment of diffusional kurtosis anisotropy.
NMR Biomed 28 (2015) 448-459.
Veraart J., Sijbers J., Sunaert S., Leemans A., Jeurissen B. Weighted linear least squares estimation of
diffusion MRI parameters: strengths, limitations, and pitfalls. NeuroImage 81 (2013) 335-346.
Henriques R.N., Correia M.M., Marrale M., et al. Diffusional kurtosis imaging in the diffusion imaging in Python
project. Front Hum Neurosci 15 (2021) 675433 (DIPY's implementation).
Carlson B.C. Numerical computation of real or complex elliptic integrals. Numer Algorithms 10 (1995) 13-26.
Dela Haije T., Özarslan E., Feragen A. Enforcing necessary non-negativity constraints for common diffusion MRI
models using sum of squares programming. NeuroImage 209 (2020) 116405.
Goulart P.J., Chen Y. Clarabel: an interior-point solver for conic programs with quadratic objectives.
arXiv:2405.12762 (2024).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import GradientTable, checked_gradient_table
from dwiflow.core.status import FitStatus, signal_above_b0
from dwiflow.core.tensor import (DEFAULT_IWLS_ITERATIONS, MRTRIX3_SMALL_INTENSITY, _solve_stacked,
                                 check_fit_arguments, lower_triangular_to_matrix, symmetric_matrices)
from dwiflow.core.voxels import VoxelBatch, run_chunks, scatter

MIN_POSITIVE_SIGNAL = 1e-4  # DIPY's floor of the signal before the logarithm
MIN_KURTOSIS, MAX_KURTOSIS = -3.0 / 7.0, 10.0  # DIPY's clipping of MK, AK, RK, MKT
POSITIVE_EIGENVALUE = 2e-7  # mm²/s: below it DIPY's kurtosis maps are 0; here the voxel is non-physical
# Relative error of the elliptic integrals. DIPY stops at 3e-4 (R_F) and 1e-4 (R_D); the closed forms subtract
# nearly equal terms when two eigenvalues are close, which turns that into errors of MK up to 2.5% (measured on
# sub-01 of bids_real against the sphere average that defines MK).
CARLSON_TOLERANCE = 1e-12
# Relative difference under which two eigenvalues use the formulas' limits. DIPY uses 2.5%, where replacing the
# eigenvalues by their mean errs by up to 4e-3 (MK) and 2e-3 (RK); with exact integrals 1e-5 keeps both within ~3e-6.
EQUAL_EIGENVALUES = 1e-5
STATUS_CODES = (FitStatus.OK, FitStatus.NONFINITE_INPUT, FitStatus.NO_SIGNAL, FitStatus.SINGULAR,
                FitStatus.NOT_CONVERGED, FitStatus.SIGNAL_ABOVE_B0, FitStatus.NON_PHYSICAL)
# what a code means for DKI (added to the status map's Levels)
STATUS_DETAILS = {FitStatus.NON_PHYSICAL: f"a diffusivity (tensor eigenvalue) not above {POSITIVE_EIGENVALUE:g} mm²/s, "
                                          "where the kurtosis is not defined"}

# the 15 unique elements of the kurtosis tensor as the design matrix orders them (DIPY's order), as index tuples
DIPY_KURTOSIS_ORDER = ((0, 0, 0, 0), (1, 1, 1, 1), (2, 2, 2, 2), (0, 0, 0, 1), (0, 0, 0, 2), (0, 1, 1, 1),
                       (1, 1, 1, 2), (0, 2, 2, 2), (1, 2, 2, 2), (0, 0, 1, 1), (0, 0, 2, 2), (1, 1, 2, 2),
                       (0, 0, 1, 2), (0, 1, 1, 2), (0, 1, 2, 2))
# the order written to files: the index tuples sorted, as BEP016 orders a rank-2 tensor's (D11, D12, D13, D22 …)
BEP016_KURTOSIS_ORDER = tuple(sorted(DIPY_KURTOSIS_ORDER))
KURTOSIS_ELEMENT_NAMES = tuple("W" + "".join(str(i + 1) for i in index) for index in BEP016_KURTOSIS_ORDER)
_TO_BEP016 = [DIPY_KURTOSIS_ORDER.index(index) for index in BEP016_KURTOSIS_ORDER]


def dki_design_matrix(gtab: GradientTable) -> np.ndarray:
    """The (n, 22) design matrix of the log-signal: D (xx, xy, yy, xz, yz, zz), the 15 W·MD² terms
    (:data:`DIPY_KURTOSIS_ORDER`, each with its multiplicity), and -1 for ``-log S0`` (DIPY's layout)."""
    b = np.asarray(gtab.bvals, dtype=float)
    g = np.asarray(gtab.bvecs, dtype=float)
    x, y, z = g.T
    diffusion = -b[:, None] * np.stack([x * x, 2 * x * y, y * y, 2 * x * z, 2 * y * z, z * z], axis=1)
    kurtosis = []
    for index in DIPY_KURTOSIS_ORDER:
        kurtosis.append(_multiplicity(index) * b * b / 6 * g[:, index[0]] * g[:, index[1]] * g[:, index[2]] * g[:, index[3]])
    return np.column_stack([diffusion, np.stack(kurtosis, axis=1), -np.ones_like(b)])


def _multiplicity(index: tuple[int, ...]) -> int:
    """How many orderings of a rank-4 index the unique element stands for (4!/∏ counts!)."""
    from math import factorial

    counts = np.bincount(index, minlength=3)
    return factorial(4) // int(np.prod([factorial(int(c)) for c in counts]))


def _duplicate(x: np.ndarray, y: np.ndarray, z: np.ndarray, mean: np.ndarray, spread: np.ndarray,
               accumulate: bool) -> tuple[np.ndarray, ...]:
    """Carlson's duplication theorem applied until ``4⁻ⁿ·spread`` falls below |mean| in every element; returns the
    arguments, the mean, 4⁻ⁿ and (``accumulate``, for R_D) Σ 4⁻ᵏ / (√z_k (z_k + λ_k))."""
    scale = np.ones_like(x)
    total = np.zeros_like(x)
    while True:
        going = scale * spread > np.abs(mean)
        if not going.any():
            return x, y, z, mean, scale, total
        rx, ry, rz = np.sqrt(x), np.sqrt(y), np.sqrt(z)
        step = rx * (ry + rz) + ry * rz
        if accumulate:
            total = np.where(going, total + scale / (rz * (z + step)), total)
        x, y, z, mean = (np.where(going, (value + step) / 4, value) for value in (x, y, z, mean))
        scale = np.where(going, scale / 4, scale)


def carlson_rf(x: np.ndarray, y: np.ndarray, z: np.ndarray, tolerance: float = CARLSON_TOLERANCE) -> np.ndarray:
    """Carlson's symmetric elliptic integral of the first kind R_F(x, y, z), elementwise for non-negative arguments:
    duplication until the truncated series' relative error is below ``tolerance``, then the series (Carlson 1995)."""
    x, y, z = (np.array(v, dtype=float, copy=True) for v in np.broadcast_arrays(x, y, z))
    mean = (x + y + z) / 3.0
    spread = np.maximum.reduce([np.abs(mean - x), np.abs(mean - y), np.abs(mean - z)]) * (3.0 * tolerance) ** (-1 / 6)
    x, y, z, mean, _, _ = _duplicate(x, y, z, mean, spread, accumulate=False)
    dx, dy = 1.0 - x / mean, 1.0 - y / mean
    dz = -dx - dy
    e2, e3 = dx * dy - dz * dz, dx * dy * dz
    return (1.0 - e2 / 10 + e3 / 14 + e2 * e2 / 24 - 3.0 / 44 * e2 * e3) / np.sqrt(mean)


def carlson_rd(x: np.ndarray, y: np.ndarray, z: np.ndarray, tolerance: float = CARLSON_TOLERANCE) -> np.ndarray:
    """Carlson's symmetric elliptic integral of the second kind R_D(x, y, z), elementwise, to a relative error
    below ``tolerance`` (Carlson 1995)."""
    x0, y0, z0 = (np.array(v, dtype=float, copy=True) for v in np.broadcast_arrays(x, y, z))
    first = (x0 + y0 + 3.0 * z0) / 5.0
    spread = np.maximum.reduce([np.abs(first - x0), np.abs(first - y0), np.abs(first - z0)]) * \
        (tolerance / 4.0) ** (-1 / 6)
    _, _, _, mean, scale, total = _duplicate(x0.copy(), y0.copy(), z0.copy(), first.copy(), spread, accumulate=True)
    dx = (first - x0) * scale / mean
    dy = (first - y0) * scale / mean
    dz = -(dx + dy) / 3.0
    e2 = dx * dy - 6.0 * dz * dz
    e3 = (3.0 * dx * dy - 8.0 * dz * dz) * dz
    e4 = 3.0 * (dx * dy - dz * dz) * dz * dz
    e5 = dx * dy * dz * dz * dz
    series = (1.0 - 3.0 / 14 * e2 + e3 / 6 + 9.0 / 88 * e2 * e2 - 3.0 / 22 * e4 - 9.0 / 52 * e2 * e3
              + 3.0 / 26 * e5)
    return scale * mean ** -1.5 * series + 3.0 * total


def _f2(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Tabesh et al. (2011)'s F2(λ1, λ2, λ3), with the limit for λ2 ≈ λ3 and the isotropic value 6/15."""
    out = np.empty_like(a)
    near = np.abs(b - c) < b * EQUAL_EIGENVALUES
    isotropic = near & (np.abs(a - b) < b * EQUAL_EIGENVALUES)
    out[isotropic] = 6.0 / 15.0
    pair = near & ~isotropic
    if pair.any():
        l1, l3 = a[pair], (b[pair] + c[pair]) / 2.0
        x = 1.0 - l1 / l3
        root = np.sqrt(np.abs(x))
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = np.where(x > 0, np.arctanh(root) / root, np.arctan(root) / root)
        out[pair] = (6.0 * (l1 + 2.0 * l3) ** 2 / (144.0 * l3 * l3 * (l1 - l3) ** 2)
                     * (l3 * (l1 + 2.0 * l3) + l1 * (l1 - 4.0 * l3) * alpha))
    general = ~near
    if general.any():
        l1, l2, l3 = a[general], b[general], c[general]
        rf, rd = carlson_rf(l1 / l2, l1 / l3, 1.0), carlson_rd(l1 / l2, l1 / l3, 1.0)
        root = np.sqrt(l2 * l3)
        out[general] = ((l1 + l2 + l3) ** 2 / (3.0 * (l2 - l3) ** 2)
                        * ((l2 + l3) / root * rf + (2.0 * l1 - l2 - l3) / (3.0 * root) * rd - 2.0))
    return out


def _f1(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Tabesh et al. (2011)'s F1(λ1, λ2, λ3), with the limits for λ1 ≈ λ2 or λ1 ≈ λ3 (via F2) and 1/5."""
    out = np.empty_like(a)
    near_b = np.abs(a - b) < a * EQUAL_EIGENVALUES
    near_c = np.abs(a - c) < a * EQUAL_EIGENVALUES
    out[near_b & near_c] = 1.0 / 5.0
    only_b = near_b & ~near_c
    if only_b.any():
        mean = (a[only_b] + b[only_b]) / 2.0
        out[only_b] = _f2(c[only_b], mean, mean) / 2.0
    only_c = near_c & ~near_b
    if only_c.any():
        mean = (a[only_c] + c[only_c]) / 2.0
        out[only_c] = _f2(b[only_c], mean, mean) / 2.0
    general = ~near_b & ~near_c
    if general.any():
        l1, l2, l3 = a[general], b[general], c[general]
        rf, rd = carlson_rf(l1 / l2, l1 / l3, 1.0), carlson_rd(l1 / l2, l1 / l3, 1.0)
        root = np.sqrt(l2 * l3)
        out[general] = ((l1 + l2 + l3) ** 2 / (18.0 * (l1 - l2) * (l1 - l3))
                        * (root / l1 * rf + (3.0 * l1 * l1 - l1 * l2 - l1 * l3 - l2 * l3) / (3.0 * l1 * root) * rd
                           - 1.0))
    return out


def _g1(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """G1(λ1, λ2, λ3) of the radial kurtosis (Tabesh et al. 2011), with its limit for λ2 ≈ λ3."""
    near = np.abs(b - c) < b * EQUAL_EIGENVALUES
    with np.errstate(divide="ignore", invalid="ignore"):
        general = ((a + b + c) ** 2 / (18.0 * b * (b - c) ** 2)
                   * (2.0 * b + (c * c - 3.0 * b * c) / np.sqrt(b * c)))
    return np.where(near, (a + 2.0 * b) ** 2 / (24.0 * b * b), general)


def _g2(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """G2(λ1, λ2, λ3) of the radial kurtosis (Tabesh et al. 2011), with its limit for λ2 ≈ λ3."""
    near = np.abs(b - c) < b * EQUAL_EIGENVALUES
    with np.errstate(divide="ignore", invalid="ignore"):
        general = (a + b + c) ** 2 / (3.0 * (b - c) ** 2) * ((b + c) / np.sqrt(b * c) - 2.0)
    return np.where(near, (a + 2.0 * b) ** 2 / (12.0 * b * b), general)


def full_kurtosis_tensor(elements: np.ndarray) -> np.ndarray:
    """(…, 3, 3, 3, 3) symmetric tensors from their 15 unique elements in :data:`DIPY_KURTOSIS_ORDER`."""
    from itertools import product

    full = np.empty(elements.shape[:-1] + (3, 3, 3, 3))
    for index in product(range(3), repeat=4):
        full[(...,) + index] = elements[..., DIPY_KURTOSIS_ORDER.index(tuple(sorted(index)))]
    return full


@dataclass
class KurtosisFit:
    """A DKI fit: per voxel (within ``mask``) the tensor's eigen-decomposition, the kurtosis tensor and S0.

    Attributes
    ----------
    evals : ndarray (…, 3)
        Eigenvalues of D, largest first, clipped below as DIPY clips them (mm²/s).
    evecs : ndarray (…, 3, 3)
        Eigenvectors as columns, in the eigenvalues' order (the gradient table's frame).
    kurtosis : ndarray (…, 15)
        Unique elements of W in :data:`DIPY_KURTOSIS_ORDER` (dimensionless).
    lower_triangular : ndarray (…, 6)
        D as fitted (xx, xy, yy, xz, yz, zz), mm²/s.
    s0 : ndarray (…)
        Fitted signal without diffusion weighting.
    status : ndarray (…) uint8
        :class:`~dwiflow.core.status.FitStatus` codes (:data:`STATUS_CODES`); the maps of a failed voxel are NaN.
    mask : ndarray (…) bool
        The voxels fitted.
    """

    evals: np.ndarray
    evecs: np.ndarray
    kurtosis: np.ndarray
    lower_triangular: np.ndarray
    s0: np.ndarray
    status: np.ndarray
    mask: np.ndarray

    def _masked(self, values: np.ndarray) -> np.ndarray:
        """Values inside the mask, 0 outside, NaN where the fit failed (maps of several volumes too)."""
        extra = (None,) * (values.ndim - self.mask.ndim)
        out = np.where(self.mask[(...,) + extra], values, 0.0)
        return np.where((self.status == FitStatus.OK)[(...,) + extra], out, np.nan)

    @property
    def kt(self) -> np.ndarray:
        """The 15 elements of W in DIPY's order: ``kurtosis`` by DIPY's ``DiffusionKurtosisFit`` name."""
        return self.kurtosis

    @cached_property
    def _rotated(self) -> dict[tuple[int, int], np.ndarray]:
        """W_iijj in the eigenvector frame for every pair i ≤ j (Tabesh et al. 2011's rotated elements), computed
        once for MK, AK and RK."""
        full = full_kurtosis_tensor(self.kurtosis)
        outer = np.einsum("...ai,...bi->...iab", self.evecs, self.evecs)  # e_i e_iᵀ per eigenvector
        return {(i, j): np.einsum("...ab,...abcd,...cd->...", outer[..., i, :, :], full, outer[..., j, :, :])
                for i in range(3) for j in range(i, 3)}

    @property
    def md(self) -> np.ndarray:
        return self._masked(self.evals.mean(axis=-1))

    @property
    def ad(self) -> np.ndarray:
        return self._masked(self.evals[..., 0])

    @property
    def rd(self) -> np.ndarray:
        return self._masked(self.evals[..., 1:].mean(axis=-1))

    @property
    def fa(self) -> np.ndarray:
        l1, l2, l3 = np.moveaxis(self.evals, -1, 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            fa = np.sqrt(0.5 * ((l1 - l2) ** 2 + (l2 - l3) ** 2 + (l3 - l1) ** 2) / (l1 * l1 + l2 * l2 + l3 * l3))
        return self._masked(np.nan_to_num(fa))

    def _valid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        safe = np.where((self.status == FitStatus.OK)[..., None] & self.mask[..., None], self.evals, 1.0)
        return safe[..., 0], safe[..., 1], safe[..., 2]

    @property
    def mk(self) -> np.ndarray:
        """Mean kurtosis, the mean of the apparent kurtosis over all directions (Tabesh et al. 2011, analytical)."""
        l1, l2, l3 = self._valid()
        w1111, w2222, w3333, w1122, w1133, w2233 = (self._rotated[pair] for pair in
                                                    ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)))
        mk = (_f1(l1, l2, l3) * w1111 + _f1(l2, l1, l3) * w2222 + _f1(l3, l2, l1) * w3333
              + _f2(l1, l2, l3) * w2233 + _f2(l2, l1, l3) * w1133 + _f2(l3, l2, l1) * w1122)
        return self._masked(np.clip(mk, MIN_KURTOSIS, MAX_KURTOSIS))

    @property
    def ak(self) -> np.ndarray:
        """Axial kurtosis, the apparent kurtosis along the principal eigenvector (Tabesh et al. 2011)."""
        l1, l2, l3 = self._valid()
        w1111 = self._rotated[0, 0]
        mean = (l1 + l2 + l3) / 3.0
        return self._masked(np.clip(w1111 * mean * mean / (l1 * l1), MIN_KURTOSIS, MAX_KURTOSIS))

    @property
    def rk(self) -> np.ndarray:
        """Radial kurtosis, the mean apparent kurtosis perpendicular to the principal eigenvector (Tabesh et al.
        2011, analytical)."""
        l1, l2, l3 = self._valid()
        w2222, w3333, w2233 = self._rotated[1, 1], self._rotated[2, 2], self._rotated[1, 2]
        rk = _g1(l1, l2, l3) * w2222 + _g1(l1, l3, l2) * w3333 + _g2(l1, l2, l3) * w2233
        return self._masked(np.clip(rk, MIN_KURTOSIS, MAX_KURTOSIS))

    @property
    def mkt(self) -> np.ndarray:
        """Mean of the kurtosis tensor, (W1111 + W2222 + W3333 + 2 W1122 + 2 W1133 + 2 W2233) / 5 (Hansen et al.
        2013)."""
        w = self.kurtosis
        mkt = (w[..., 0] + w[..., 1] + w[..., 2] + 2.0 * (w[..., 9] + w[..., 10] + w[..., 11])) / 5.0
        return self._masked(np.clip(mkt, MIN_KURTOSIS, MAX_KURTOSIS))

    @property
    def kfa(self) -> np.ndarray:
        """Kurtosis fractional anisotropy, ‖W - MKT·I‖ / ‖W‖ with I the isotropic rank-4 tensor (Glenn et al.
        2015); 0 where the kurtosis tensor's mean is not above 1e-8 (as DIPY)."""
        w = self.kurtosis
        mean = (w[..., 0] + w[..., 1] + w[..., 2] + 2.0 * (w[..., 9] + w[..., 10] + w[..., 11])) / 5.0
        counts = np.array([_multiplicity(index) for index in DIPY_KURTOSIS_ORDER], dtype=float)
        isotropic = np.array([1.0, 1.0, 1.0] + [0.0] * 6 + [1.0 / 3.0] * 3 + [0.0] * 3)
        deviation = ((w - mean[..., None] * isotropic) ** 2 * counts).sum(axis=-1)
        norm = (w * w * counts).sum(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            kfa = np.where((norm > 0) & (mean > 1e-8), np.sqrt(deviation / np.where(norm > 0, norm, 1.0)), 0.0)
        return self._masked(kfa)

    @property
    def kurtosis_elements(self) -> np.ndarray:
        """The 15 unique elements of W in :data:`BEP016_KURTOSIS_ORDER` (W1111, W1112, W1113, W1122 …)."""
        return self._masked(self.kurtosis[..., _TO_BEP016])

    @property
    def elements(self) -> np.ndarray:
        """D's six unique elements in BEP016's order D11, D12, D13, D22, D23, D33 (mm²/s)."""
        xx, xy, yy, xz, yz, zz = np.moveaxis(self.lower_triangular, -1, 0)
        return self._masked(np.stack([xx, xy, xz, yy, yz, zz], axis=-1))

    @property
    def s0_map(self) -> np.ndarray:
        return self._masked(self.s0)


# subgradient steps spent looking for a fit's certificate of feasibility before solving its program (on sub-01
# b6kmax: 5 steps certify 51% of the fits, 20 steps 68%, 200 steps 75%)
CERTIFICATE_ITERATIONS = 20
CONSTRAINED = {"CLS": "OLS", "CWLS": "WLS"}  # each constrained fit and the unconstrained fit it starts from


class ConstrainedKurtosisSolver:
    """DIPY's constrained DKI program, one voxel at a time: minimise the weighted squared residual of the log-signal
    subject to Dela Haije's linear matrix inequality ``M(h, s) ⪰ 0`` (see the module docstring).

    ``M`` has a diffusion block (rows 0-2: twice the tensor D) and a kurtosis block (rows 3-11: a Gram matrix of
    the quartic form Σ W_ijkl MD² g_i g_j g_k g_l in the 9 products g_i g_j, with 9 free variables); the other 9
    free variables only fill the off-diagonal blocks, so ``M ⪰ 0`` exactly when both diagonal blocks are (take
    them 0). The program is solved in that form: two semidefinite cones (3x3 and 9x9) and 31 variables, with the
    22 parameters in their typical units (D: 1e-3 mm²/s; W·MD²: 1e-6; log S0: 1) and the kurtosis block scaled by
    1e6, which keeps the interior-point method well conditioned. The kurtosis block, with its 9 free variables,
    certifies that the kurtosis form is a sum of squares of a restricted kind: stricter than non-negativity in every
    direction (a two-compartment mixture's kurtosis, zero along the directions where both compartments' diffusivities
    are equal, is outside). :meth:`certainly_feasible` looks for a certificate of each unconstrained fit, so that the
    fits it proves inside skip the program (their constrained solution is the unconstrained one).
    """

    def __init__(self, design: np.ndarray) -> None:
        import clarabel
        import scipy.sparse as sparse

        from dwiflow.core._dki_constraints import ENTRIES, SIZE

        n_params = design.shape[1]
        self.units = np.r_[np.full(6, 1e-3), np.full(15, 1e-6), 1.0]
        self.design = design * self.units  # (n, 22) in units
        block_scale = np.r_[np.full(3, 1e3), np.full(SIZE - 3, 1e6)]  # each diagonal block to order 1
        free = sorted({m for m, r, c, _ in ENTRIES if m > n_params and r >= 3 and c >= 3})
        column = {m: m - 1 for m in range(1, n_params + 1)} | {m: n_params + i for i, m in enumerate(free)}
        offsets = (0, 6)  # the two cones' entries: 6 (3x3) then 45 (9x9)
        rows, cols, values = [], [], []
        for matrix, row, col, value in ENTRIES:
            if (row < 3) != (col < 3):
                continue  # the off-diagonal blocks: free variables only (see the class notes)
            block, first = (0, 0) if row < 3 else (1, 3)
            r, c = row - first, col - first
            unit = self.units[matrix - 1] if matrix <= n_params else 1e-6  # a free variable in W·MD²'s units
            rows.append(offsets[block] + c * (c + 1) // 2 + r)  # Clarabel: upper triangle, column-major, √2
            cols.append(column[matrix])
            values.append(-value * (1.0 if r == c else np.sqrt(2.0)) * unit * block_scale[row])
        self.n_vars, self.n_params = n_params + len(free), n_params
        self.constraints = sparse.csc_matrix((values, (rows, cols)), shape=(6 + 45, self.n_vars))
        self.cones = [clarabel.PSDTriangleConeT(3), clarabel.PSDTriangleConeT(SIZE - 3)]
        # the quadratic term's upper triangle in CSC order: column c holds rows 0 … c of the parameters' block
        self._upper_rows = np.concatenate([np.arange(c + 1) for c in range(n_params)])
        self._upper_cols = np.repeat(np.arange(n_params), np.arange(1, n_params + 1))
        self._indptr = np.r_[0, np.cumsum(np.arange(1, n_params + 1)),
                             np.full(len(free), self._upper_rows.size)]
        self.settings = clarabel.DefaultSettings()
        self.settings.verbose = False
        self._solved = (clarabel.SolverStatus.Solved, clarabel.SolverStatus.AlmostSolved)
        # the kurtosis block as G(W, s) = Σ W_k K_k + Σ s_j B_j (9x9), for the certificates of certainly_feasible
        kurtosis_block = np.zeros((15, SIZE - 3, SIZE - 3))
        free_block = np.zeros((len(free), SIZE - 3, SIZE - 3))
        for matrix, row, col, value in ENTRIES:
            if row >= 3 and col >= 3 and (7 <= matrix <= 21 or matrix in free):
                target = kurtosis_block[matrix - 7] if matrix <= 21 else free_block[free.index(matrix)]
                target[row - 3, col - 3] = target[col - 3, row - 3] = value
        self._kurtosis_block, self._free_block = kurtosis_block, free_block

    def certainly_feasible(self, params: np.ndarray, iterations: int = CERTIFICATE_ITERATIONS) -> np.ndarray:
        """Rows of ``params`` (v, 22; original units) proven inside the constraint, vectorised across voxels: D
        positive definite, and free variables found for which the kurtosis block is positive definite (a
        certificate). They are sought by normalised subgradient ascent of the block's smallest eigenvalue, from
        zero, for at most ``iterations`` steps (a fit without a certificate may still be inside: it is solved)."""
        positive_d = np.linalg.eigvalsh(lower_triangular_to_matrix(params[:, :6]))[:, 0] > 0
        block = np.einsum("vk,kab->vab", params[:, 6:21], self._kurtosis_block)
        block /= np.maximum(np.abs(block).max(axis=(1, 2)), 1e-300)[:, None, None]
        proven = np.zeros(params.shape[0], dtype=bool)
        searching = np.flatnonzero(positive_d & np.all(np.isfinite(block), axis=(1, 2)))
        free = np.zeros((searching.size, self._free_block.shape[0]))
        for step in range(iterations):
            values, vectors = np.linalg.eigh(block[searching] + np.einsum("vj,jab->vab", free, self._free_block))
            found = values[:, 0] > 1e-9
            proven[searching[found]] = True
            searching, free, smallest = searching[~found], free[~found], vectors[~found, :, 0]
            if searching.size == 0:
                break
            ascent = np.einsum("va,jab,vb->vj", smallest, self._free_block, smallest)
            free += 0.5 / np.sqrt(step + 1) * ascent / np.maximum(np.linalg.norm(ascent, axis=1, keepdims=True),
                                                                  1e-300)
        return proven

    def solve(self, log_signal: np.ndarray, squared_weights: np.ndarray) -> tuple[np.ndarray, int]:
        """The constrained parameters (22, original units) and a :class:`FitStatus` for one voxel."""
        import clarabel
        import scipy.sparse as sparse

        weights = squared_weights / squared_weights.max()  # the minimiser does not depend on the weights' scale
        weighted = self.design.T * weights
        normal = weighted @ self.design
        # the program in the step from the unconstrained solution: minimise ½ δᵀ N δ (the residual's excess over
        # the unconstrained one, which the solver's relative tolerance then measures) with M(h_ls + δ) ⪰ 0
        unconstrained = np.linalg.solve(normal, weighted @ log_signal)
        hessian = sparse.csc_matrix((normal[self._upper_rows, self._upper_cols], self._upper_rows, self._indptr),
                                    shape=(self.n_vars, self.n_vars))
        bound = -(self.constraints[:, :self.n_params] @ unconstrained)  # A_0 is zero: M = Σ z_j A_j
        solution = clarabel.DefaultSolver(hessian, np.zeros(self.n_vars), self.constraints, bound, self.cones,
                                          self.settings).solve()
        if solution.status not in self._solved:
            return np.full(self.n_params, np.nan), FitStatus.NOT_CONVERGED
        return (unconstrained + np.asarray(solution.x)[:self.n_params]) * self.units, FitStatus.OK


class DiffusionKurtosisModel:
    """Diffusion kurtosis model (Jensen et al. 2005) fitted as DIPY's ``DiffusionKurtosisModel``.

    Parameters
    ----------
    gtab : GradientTable
        Needs at least three distinct b-values (b=0 counts) and enough directions for the 22 unknowns.
    fit_method : {"WLS", "OLS", "IWLS", "CLS", "CWLS"}
        ``WLS`` (default, as DIPY): a second fit weighted by the squared signal the OLS fit predicts; ``IWLS``: as
        MRtrix3's ``dwi2tensor -dkt``; ``CLS``/``CWLS``: OLS/WLS subject to DIPY's constraint (Dela Haije 2020; see
        the module docstring).
    min_signal : float
        ``WLS``/``OLS``: samples below it are raised to it before the logarithm (DIPY's 1e-4).
    iterations : int
        ``IWLS``: dwi2tensor's ``-iter`` (default 2).
    ols_start : bool
        ``IWLS``: the first fit unweighted (dwi2tensor's ``-ols``).
    chunk_size : int
        Voxels solved together (bounds memory; small chunks stay in cache).
    n_threads : int, optional
        Threads fitting chunks of voxels (and, for ``CLS``/``CWLS``, solving voxels' programs) at once (default 1;
        the results do not depend on it).
    """

    def __init__(self, gtab: GradientTable, fit_method: Literal["WLS", "OLS", "IWLS", "CLS", "CWLS"] = "WLS",
                 min_signal: float = MIN_POSITIVE_SIGNAL, chunk_size: int = 1024,
                 iterations: int = DEFAULT_IWLS_ITERATIONS, ols_start: bool = False,
                 n_threads: int | None = None) -> None:
        gtab = checked_gradient_table(gtab, "DiffusionKurtosisModel")
        check_fit_arguments(CONSTRAINED.get(fit_method, fit_method), iterations, min_signal)
        if n_threads is not None and (int(n_threads) != n_threads or n_threads < 1):
            raise DwiflowInputError(f"n_threads must be a positive integer, got {n_threads!r}",
                                    parameters=("n_threads",))
        self.n_threads = int(n_threads or 1)
        self.iterations, self.ols_start = int(iterations), bool(ols_start)
        b_values = {round(float(b) / 20.0) for b in np.asarray(gtab.bvals)[~gtab.b0s_mask]}
        if len(b_values) + int(gtab.b0s_mask.any()) < 3:
            raise DwiflowInputError("DKI needs at least three distinct b-values (b=0 counts), e.g. b=0 and two "
                                    "shells: this gradient table has " + ", ".join(
                                        str(int(round(b))) for b in sorted({round(float(v), -1) for v in gtab.bvals})))
        design = dki_design_matrix(gtab)
        if np.linalg.matrix_rank(design) < design.shape[1]:
            raise DwiflowInputError("the gradient table cannot determine the kurtosis tensor (22 unknowns): it "
                                    "needs more non-collinear directions on its shells")
        self.gtab, self.fit_method = gtab, fit_method
        self.min_signal, self.chunk_size = float(min_signal), int(chunk_size)
        self.min_diffusivity = 1e-6 / -design.min()  # DIPY's clipping of the eigenvalues
        self._scale = np.maximum(np.abs(design).max(axis=0), 1e-12)  # unit-sized columns: well-posed normal matrix
        self._x = design / self._scale
        self._ols_pinv = np.linalg.pinv(self._x)
        upper = np.triu_indices(self._x.shape[1])
        self._products = np.ascontiguousarray(self._x[:, upper[0]] * self._x[:, upper[1]])
        self._constrained = ConstrainedKurtosisSolver(design) if fit_method in CONSTRAINED else None

    def _weighted_fit(self, squared_weights: np.ndarray, log_s: np.ndarray, status: np.ndarray) -> np.ndarray:
        """Every voxel's weighted least-squares solution (scaled columns) from its normal equations (the 253
        distinct products of the symmetric 22x22 matrix in one product)."""
        with np.errstate(invalid="ignore", over="ignore"):  # overflowed weights: SINGULAR in _solve_stacked
            distinct = squared_weights @ self._products
            rhs = (squared_weights * log_s) @ self._x
        return _solve_stacked(symmetric_matrices(distinct, self._x.shape[1]), rhs, status)

    def _fit_batch(self, signal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(v, 22) parameters in their units and the status of (v, n) signals."""
        status = np.zeros(signal.shape[0], dtype=np.uint8)
        finite = np.all(np.isfinite(signal), axis=1)
        status[~finite] = FitStatus.NONFINITE_INPUT
        status[finite & ~np.any(signal > 0, axis=1)] = FitStatus.NO_SIGNAL
        status[(status == FitStatus.OK) & signal_above_b0(signal, self.gtab.b0s_mask)] = FitStatus.SIGNAL_ABOVE_B0
        signal = np.where(finite[:, None], signal, 1.0)
        if self.fit_method == "IWLS":
            signal = np.maximum(signal, MRTRIX3_SMALL_INTENSITY * signal.max(axis=1, keepdims=True))
            log_s = np.log(np.where(signal > 0, signal, 1.0))
            squared_weights = np.ones_like(signal) if self.ols_start else signal * signal
            passes = 1 + (self.iterations if self.iterations > 1 else 0)
            beta = np.zeros((signal.shape[0], self._x.shape[1]))
            for index in range(passes):
                if index:  # a voxel of noise can overflow: its system is then not finite and gets SINGULAR
                    with np.errstate(over="ignore", invalid="ignore"):
                        squared_weights = np.exp(2.0 * (beta @ self._x.T))
                beta = self._weighted_fit(squared_weights, log_s, status)
        else:
            log_s = np.log(np.maximum(signal, self.min_signal))
            beta = log_s @ self._ols_pinv.T
            if CONSTRAINED.get(self.fit_method, self.fit_method) == "WLS":
                with np.errstate(over="ignore", invalid="ignore"):
                    squared_weights = np.exp(2.0 * (beta @ self._x.T))
                beta = self._weighted_fit(squared_weights, log_s, status)
        beta = beta / self._scale
        bad = (status != FitStatus.OK) | ~np.all(np.isfinite(beta), axis=1)
        status[bad & (status == FitStatus.OK)] = FitStatus.SINGULAR
        beta[bad] = 0.0
        return beta, status

    def _fit_constrained(self, batch: VoxelBatch, params: np.ndarray, status: np.ndarray, progress) -> None:
        """Replace the unconstrained fit of every fitted voxel by the constrained one (``CLS``/``CWLS``), the voxels'
        programs solved by ``n_threads`` threads (Clarabel releases the GIL); ``progress(done, total)``."""
        from concurrent.futures import ThreadPoolExecutor

        todo = np.flatnonzero(status == FitStatus.OK)
        todo = todo[~self._constrained.certainly_feasible(params[todo])]  # there the unconstrained fit is the answer
        blocks = [todo[i:i + 256] for i in range(0, todo.size, 256)]

        def solve_block(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            log_s = np.log(np.maximum(batch.signal(rows), self.min_signal))
            if self.fit_method == "CWLS":  # DIPY's weights: the signal the OLS fit predicts, squared
                with np.errstate(over="ignore"):
                    squared_weights = np.exp(2.0 * ((log_s @ self._ols_pinv.T) @ self._x.T))
            else:
                squared_weights = np.ones_like(log_s)
            solved = [self._constrained.solve(y, w) for y, w in zip(log_s, squared_weights)]
            return np.array([p for p, _ in solved]), np.array([code for _, code in solved], dtype=np.uint8)

        done = 0
        with ThreadPoolExecutor(max_workers=self.n_threads) as pool:
            for rows, (solution, codes) in zip(blocks, pool.map(solve_block, blocks)):
                params[rows], status[rows] = solution, codes
                params[rows[codes != FitStatus.OK]] = 0.0
                done += rows.size
                if progress is not None:
                    progress(done, todo.size)

    def fit(self, data: np.ndarray, mask: np.ndarray | None = None, progress=None) -> KurtosisFit:
        """Fit every voxel of ``data`` (…, n_volumes) inside ``mask`` (voxels outside hold 0, status 0);
        ``progress(done, total)`` after each block of constrained fits."""
        batch = VoxelBatch.from_volume(data, mask, self.gtab.n_volumes, memory_order=True)
        n = batch.n_voxels
        params = np.empty((n, 22))
        status = np.empty(n, dtype=np.uint8)

        def fit_chunk(chunk: slice) -> None:
            params[chunk], status[chunk] = self._fit_batch(batch.signal(chunk))

        run_chunks(fit_chunk, n, self.chunk_size, self.n_threads)
        if self._constrained is not None:
            self._fit_constrained(batch, params, status, progress)
        xx, yy, zz = params[:, 0], params[:, 2], params[:, 5]
        evals, evecs = np.linalg.eigh(lower_triangular_to_matrix(params[:, :6]))
        evals, evecs = evals[:, ::-1], evecs[:, :, ::-1]  # largest first
        if self.fit_method == "IWLS":  # dwi2tensor: W over the squared mean diffusivity of the fit, unclipped
            kurtosis = params[:, 6:21] / ((xx + yy + zz) ** 2 / 9.0 + 1e-18)[:, None]
        else:  # DIPY: eigenvalues clipped, W over the squared mean of the clipped eigenvalues
            evals = np.maximum(evals, self.min_diffusivity)
            mean_squared = evals.mean(axis=1) ** 2
            kurtosis = params[:, 6:21] / np.where(mean_squared > 0, mean_squared, 1.0)[:, None]
        non_physical = (status == FitStatus.OK) & (evals[:, 2] <= POSITIVE_EIGENVALUE)
        status[non_physical] = FitStatus.NON_PHYSICAL
        return KurtosisFit(
            evals=scatter(evals, batch), evecs=scatter(evecs, batch), kurtosis=scatter(kurtosis, batch),
            lower_triangular=scatter(params[:, :6], batch), s0=scatter(np.exp(-params[:, 21]), batch),
            status=scatter(status, batch), mask=batch.mask)
