"""Diffusion tensor estimation, vectorised across voxels, and its scalar maps.

Two families of fits, each equal to the tool its users compare with:

- ``WLS``/``OLS`` as DIPY's ``TensorModel``: the weighted fit follows Chung et al. (2006), an ordinary
  least-squares fit of the log-signal gives predicted signals, whose squares weight a second fit; samples below
  1e-4 are raised to it; eigenvalues are clipped below as DIPY does.
- ``IWLS`` as MRtrix3 3.0's ``dwi2tensor`` (Veraart et al. 2013): a first fit weighted by the measured signal (or
  unweighted, ``ols_start``), then ``iterations`` refits weighted by the signal the previous fit predicts (as
  dwi2tensor, none when ``iterations`` is below 2); a sample below 1e-6 of the voxel's largest is raised to that;
  eigenvalues are not clipped.

Every pass forms the normal equations of all voxels of a chunk at once (one matrix product gives the 28 distinct
entries of each 7x7 matrix) and solves them by a Cholesky factorisation vectorised across the voxels.

References
----------
Basser P.J., Mattiello J., LeBihan D. MR diffusion tensor spectroscopy and imaging.
Biophys J 66 (1994) 259-267.
Chung S., Lu Y., Henry R.G. Comparison of bootstrap approaches for estimation of
uncertainties of DTI parameters. NeuroImage 33 (2006) 531-541.
Veraart J., Sijbers J., Sunaert S., Leemans A., Jeurissen B. Weighted linear least squares
estimation of diffusion MRI parameters: strengths, limitations, and pitfalls. NeuroImage 81
(2013) 335-346.
Westin C.-F. et al. Geometrical diffusion measures for MRI from tensor basis analysis. ISMRM 1997,
p. 1742 (linear, planar and spherical shape measures).
Basser P.J., Pierpaoli C. Microstructural and physiological features of tissues
elucidated by quantitative-diffusion-tensor MRI. J Magn Reson B 111 (1996) 209-219 (FA).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import GradientTable, checked_gradient_table
from dwiflow.core.status import FitStatus, signal_above_b0
from dwiflow.core.voxels import VoxelBatch, cache_sized_chunk, iter_chunks, run_chunks, scatter

MIN_POSITIVE_SIGNAL = 1e-4
# dwi2tensor raises every sample below this fraction of the voxel's largest sample to it before the logarithm
MRTRIX3_SMALL_INTENSITY = 1e-6
DEFAULT_IWLS_ITERATIONS = 2  # dwi2tensor's -iter default
# BEP016's order of a symmetric rank-2 tensor's six elements (D11, D12, D13, D22, D23, D33)
BEP016_TENSOR_ORDER = ("xx", "xy", "xz", "yy", "yz", "zz")

STATUS_CODES = (FitStatus.OK, FitStatus.NONFINITE_INPUT, FitStatus.NO_SIGNAL, FitStatus.SINGULAR,
                FitStatus.SIGNAL_ABOVE_B0, FitStatus.NON_PHYSICAL)
# what a code means for the tensor (added to the status map's Levels)
STATUS_DETAILS = {FitStatus.NON_PHYSICAL: "a negative diffusivity: a tensor eigenvalue below 0"}


def tensor_design_matrix(gtab: GradientTable) -> np.ndarray:
    """Design matrix X with log S = X @ (Dxx, Dxy, Dyy, Dxz, Dyz, Dzz, ln S0).

    The six tensor elements follow DIPY's lower-triangular order.
    """
    b = gtab.bvals
    g = gtab.bvecs
    return np.column_stack(
        [
            -b * g[:, 0] ** 2,
            -2 * b * g[:, 0] * g[:, 1],
            -b * g[:, 1] ** 2,
            -2 * b * g[:, 0] * g[:, 2],
            -2 * b * g[:, 1] * g[:, 2],
            -b * g[:, 2] ** 2,
            np.ones_like(b),
        ]
    )


def lower_triangular_to_matrix(lt: np.ndarray) -> np.ndarray:
    """(…, 6) tensor elements in DIPY's order to symmetric (…, 3, 3) matrices."""
    xx, xy, yy, xz, yz, zz = np.moveaxis(lt, -1, 0)
    return np.stack(
        [np.stack([xx, xy, xz], -1), np.stack([xy, yy, yz], -1), np.stack([xz, yz, zz], -1)], -2
    )


def fractional_anisotropy(evals: np.ndarray) -> np.ndarray:
    """FA = sqrt(1/2) · sqrt(Σ(λi-λj)²) / sqrt(Σλi²) (Basser & Pierpaoli 1996); 0 where all λ=0."""
    evals = np.asarray(evals, dtype=float)
    l1, l2, l3 = np.moveaxis(evals, -1, 0)
    all_zero = np.all(evals == 0, axis=-1)
    num = (l1 - l2) ** 2 + (l2 - l3) ** 2 + (l3 - l1) ** 2
    den = np.sum(evals * evals, axis=-1) + all_zero
    return np.sqrt(0.5 * num / den)


def mean_diffusivity(evals: np.ndarray) -> np.ndarray:
    """MD: mean of the eigenvalues (mm²/s)."""
    return np.mean(evals, axis=-1)


def axial_diffusivity(evals: np.ndarray) -> np.ndarray:
    """AD: the largest eigenvalue by value (mm²/s), whatever order ``evals`` are in."""
    return np.max(np.asarray(evals), axis=-1)


def radial_diffusivity(evals: np.ndarray) -> np.ndarray:
    """RD: mean of the two eigenvalues other than the largest by value (mm²/s)."""
    evals = np.asarray(evals)
    return (np.sum(evals, axis=-1) - np.max(evals, axis=-1)) / 2


@dataclass
class TensorFit:
    """Result of :meth:`TensorModel.fit`, shaped like the input volume.

    Attributes
    ----------
    s0 : ndarray (...)
        Fitted non-diffusion-weighted signal.
    status : ndarray (...) of uint8
        :class:`~dwiflow.core.status.FitStatus` codes (:data:`STATUS_CODES`); failed voxels hold NaN.
    mask : ndarray (...) of bool
        The voxels that were fitted.
    lower_triangular : ndarray (..., 6)
        The tensor's elements in DIPY's order (Dxx, Dxy, Dyy, Dxz, Dyz, Dzz), world frame (mm²/s).
    by_magnitude : bool
        Eigenvalues ordered by magnitude and not clipped (MRtrix3's tensor2metric), else descending and clipped
        below at ``min_diffusivity`` (DIPY).

    The eigenvalues (``evals``, (..., 3), mm²/s) and eigenvectors (``evecs``, (..., 3, 3), as columns, world frame)
    are computed on first use: a run that writes only the tensor or S0 does not decompose it.
    """

    s0: np.ndarray
    status: np.ndarray
    mask: np.ndarray
    lower_triangular: np.ndarray
    by_magnitude: bool = False
    min_diffusivity: float = 0.0
    _eigen: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def _decomposition(self) -> tuple[np.ndarray, np.ndarray]:
        if self._eigen is None:
            fitted = self.mask & (self.status == FitStatus.OK)
            evals = np.where(self.mask[..., None], np.nan, 0.0) * np.ones(3)
            evecs = np.where(self.mask[..., None, None], np.nan, 0.0) * np.ones((3, 3))
            if np.any(fitted):
                w, v = np.linalg.eigh(lower_triangular_to_matrix(self.lower_triangular[fitted]))
                if self.by_magnitude:
                    order = np.argsort(-np.abs(w), axis=1, kind="stable")
                    evals[fitted] = np.take_along_axis(w, order, axis=1)
                    evecs[fitted] = np.take_along_axis(v, order[:, None, :], axis=2)
                else:
                    evals[fitted] = np.clip(w[:, ::-1], self.min_diffusivity, None)
                    evecs[fitted] = v[:, :, ::-1]
            self._eigen = (evals, evecs)
        return self._eigen

    @property
    def evals(self) -> np.ndarray:
        return self._decomposition()[0]

    @property
    def evecs(self) -> np.ndarray:
        return self._decomposition()[1]

    @property
    def fa(self) -> np.ndarray:
        return fractional_anisotropy(self.evals)

    @property
    def md(self) -> np.ndarray:
        return mean_diffusivity(self.evals)

    @property
    def ad(self) -> np.ndarray:
        return axial_diffusivity(self.evals)

    @property
    def rd(self) -> np.ndarray:
        return radial_diffusivity(self.evals)

    @property
    def v1(self) -> np.ndarray:
        """Principal eigenvector (…, 3), world frame, sign arbitrary."""
        return self.evecs[..., :, 0]

    def _shape_measure(self, which: str) -> np.ndarray:
        """Westin's shape measures normalised by the trace, as MRtrix3's tensor2metric: with λ1 ≥ λ2 ≥ λ3 (by
        value), cl = (λ1−λ2)/Σλ, cp = 2(λ2−λ3)/Σλ, cs = 3λ3/Σλ; 0 where the trace is 0."""
        by_value = -np.sort(-self.evals, axis=-1)
        total = by_value.sum(axis=-1)
        safe = np.where(total == 0, 1.0, total)
        value = {"cl": by_value[..., 0] - by_value[..., 1], "cp": 2 * (by_value[..., 1] - by_value[..., 2]),
                 "cs": 3 * by_value[..., 2]}[which] / safe
        return np.where(total == 0, 0.0, value)

    @property
    def cl(self) -> np.ndarray:
        """Westin's linearity (trace-normalised, as MRtrix3)."""
        return self._shape_measure("cl")

    @property
    def cp(self) -> np.ndarray:
        """Westin's planarity (trace-normalised, as MRtrix3)."""
        return self._shape_measure("cp")

    @property
    def cs(self) -> np.ndarray:
        """Westin's sphericity (trace-normalised, as MRtrix3)."""
        return self._shape_measure("cs")

    @property
    def evecs_xyz(self) -> np.ndarray:
        """The eigenvectors as (…, 9): x, y, z of each in eigenvalue order (the layout of tensor2metric -vector)."""
        return np.moveaxis(self.evecs, -1, -2).reshape(self.evecs.shape[:-2] + (9,))

    @property
    def elements(self) -> np.ndarray:
        """The six unique elements (…, 6) in BEP016's order D11, D12, D13, D22, D23, D33 (world frame, mm²/s)."""
        xx, xy, yy, xz, yz, zz = np.moveaxis(self.lower_triangular, -1, 0)
        return np.stack([xx, xy, xz, yy, yz, zz], axis=-1)

    @property
    def quadratic_form(self) -> np.ndarray:
        return lower_triangular_to_matrix(self.lower_triangular)

    # DIPY's TensorFit names for the rotation-invariant maps, for code written against dipy.reconst.dti (same
    # definitions). Its directions and colour FA are not repeated: they are in the voxel axes of the .bvec file,
    # these eigenvectors in world coordinates (v1)
    @property
    def trace(self) -> np.ndarray:
        """Sum of the eigenvalues (3·MD)."""
        return self.evals.sum(axis=-1)

    @property
    def mode(self) -> np.ndarray:
        """Tensor mode (Ennis & Kindlmann 2006), as DIPY's: 3√6·det(A/‖A‖) of the deviatoric tensor A (−1 planar,
        +1 linear), from the eigenvalues (as clipped for ``evals``); NaN for an isotropic tensor (A = 0)."""
        deviatoric = self.evals - self.evals.mean(axis=-1, keepdims=True)
        norm = np.sqrt(np.sum(deviatoric ** 2, axis=-1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(norm > 0, 3 * np.sqrt(6) * np.prod(deviatoric, axis=-1) / norm ** 3, np.nan)

    @property
    def linearity(self) -> np.ndarray:
        """DIPY's name for :attr:`cl` (the same trace-normalised definition)."""
        return self.cl

    @property
    def planarity(self) -> np.ndarray:
        """DIPY's name for :attr:`cp`."""
        return self.cp

    @property
    def sphericity(self) -> np.ndarray:
        """DIPY's name for :attr:`cs`."""
        return self.cs

    @property
    def S0_hat(self) -> np.ndarray:  # noqa: N802  (DIPY's name)
        """The fitted S0 (DIPY's name for it)."""
        return self.s0

    def predict(self, gtab: GradientTable) -> np.ndarray:
        """Signal predicted by the tensors for the given gradient table."""
        x = tensor_design_matrix(gtab)
        lt = np.concatenate([self.lower_triangular, np.log(self.s0)[..., None]], axis=-1)
        return np.exp(lt @ x.T)


def check_fit_arguments(fit_method: str, iterations: int, min_signal: float) -> None:
    """The log-linear fits' shared arguments: the method (DIPY's WLS/OLS or MRtrix3's IWLS), dwi2tensor's ``-iter``
    range and the signal floor; a :class:`DwiflowInputError` naming the argument otherwise."""
    if fit_method not in ("WLS", "OLS", "IWLS"):
        raise DwiflowInputError(f"fit_method must be 'WLS', 'OLS' or 'IWLS', got {fit_method!r}",
                                parameters=("fit_method",))
    if int(iterations) != iterations or not 0 <= iterations <= 10:
        raise DwiflowInputError(f"iterations must be an integer from 0 to 10 (as dwi2tensor -iter), got "
                                f"{iterations!r}", parameters=("iterations",))
    if not min_signal > 0:
        raise DwiflowInputError(f"min_signal must be > 0, got {min_signal!r}", parameters=("min_signal",))


@lru_cache(maxsize=None)
def _symmetric_positions(size: int) -> np.ndarray:
    upper = np.triu_indices(size)
    positions = np.empty((size, size), dtype=np.intp)
    positions[upper] = positions[upper[::-1]] = np.arange(upper[0].size)
    return positions.ravel()


def symmetric_matrices(distinct: np.ndarray, size: int) -> np.ndarray:
    """Stacked symmetric matrices (v, size, size) from their distinct entries (v, size (size + 1) / 2) in
    ``np.triu_indices`` order: one gather."""
    return np.take(distinct, _symmetric_positions(size), axis=1).reshape(-1, size, size)


def solve_symmetric_rows(distinct: np.ndarray, rhs: np.ndarray, status: np.ndarray) -> np.ndarray:
    """Solve every voxel's symmetric positive definite system by Cholesky, entry by entry across the voxels: rows of
    ``distinct`` hold a matrix's n(n+1)/2 distinct entries (``np.triu_indices(n)`` order), rows of ``rhs`` its
    right-hand side. Each step of the factorisation and of the two triangular solves is one vector operation over
    all the voxels; for the tensor's 7×7 systems that is twice as fast as LAPACK's batched solve, which pays its call
    per matrix. A system that is not positive definite or not finite (weights that overflowed in a voxel of noise)
    gets NaN and FitStatus.SINGULAR (others unaffected)."""
    n = rhs.shape[1]
    entries = np.ascontiguousarray(distinct.T)  # (n(n+1)/2, voxels): each entry's values contiguous
    position = _symmetric_positions(n).reshape(n, n)
    lower: dict[tuple[int, int], np.ndarray] = {}
    inverse_diagonal = []
    positive = np.ones(rhs.shape[0], dtype=bool)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for j in range(n):
            diagonal = entries[position[j, j]].copy()
            for p in range(j):
                diagonal -= lower[j, p] * lower[j, p]
            positive &= diagonal > 0
            inverse_diagonal.append(1.0 / np.sqrt(diagonal))
            for i in range(j + 1, n):
                value = entries[position[i, j]].copy()
                for p in range(j):
                    value -= lower[i, p] * lower[j, p]
                value *= inverse_diagonal[j]
                lower[i, j] = value
        forward = []
        for i in range(n):  # L w = rhs
            value = rhs[:, i].copy()
            for p in range(i):
                value -= lower[i, p] * forward[p]
            forward.append(value * inverse_diagonal[i])
        solution = np.empty_like(rhs, dtype=np.float64)
        for i in range(n - 1, -1, -1):  # Lᵀ x = w
            value = forward[i]
            for p in range(i + 1, n):
                value = value - lower[p, i] * solution[:, p]
            solution[:, i] = value * inverse_diagonal[i]
    failed = ~positive | ~np.all(np.isfinite(solution), axis=1)
    if np.any(failed):
        solution[failed] = np.nan
        status[failed & (status == FitStatus.OK)] = FitStatus.SINGULAR
    return solution


def _solve_stacked(normal: np.ndarray, rhs: np.ndarray, status: np.ndarray) -> np.ndarray:
    """Solve stacked systems; a singular or non-finite one (weights that overflowed in a voxel of noise) gets NaN
    and FitStatus.SINGULAR (others unaffected)."""
    finite = np.all(np.isfinite(normal), axis=(1, 2)) & np.all(np.isfinite(rhs), axis=1)
    if not np.all(finite):
        status[~finite & (status == FitStatus.OK)] = FitStatus.SINGULAR
        out = np.full_like(rhs, np.nan)
        if np.any(finite):
            finite_status = status[finite]  # a copy: the call below flags its singular systems in it
            out[finite] = _solve_stacked(normal[finite], rhs[finite], finite_status)
            status[finite] = finite_status
        return out
    try:
        return np.linalg.solve(normal, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        # Rare: retry with a pseudo-inverse per stack, flagging the singular systems.
        rank = np.linalg.matrix_rank(normal)
        singular = rank < normal.shape[-1]
        out = np.full_like(rhs, np.nan)
        if np.any(~singular):
            out[~singular] = np.linalg.solve(normal[~singular], rhs[~singular][..., None])[..., 0]
        status[singular & (status == FitStatus.OK)] = FitStatus.SINGULAR
        return out


# IWLS: chunks whose normal equations are solved together (a thread's unit of work), so that each step of the
# vectorised Cholesky covers 4096 voxels of 141 volumes instead of 1024 (measured on 109k voxels: the three solves
# took 0.13 s instead of 0.23 s). Not for WLS/OLS, whose element-wise passes over a whole unit then leave the cache
# (0.76 s instead of 0.62 s on the same voxels); IWLS keeps those passes within each chunk.
IWLS_SOLVE_CHUNKS = 4


class TensorModel:
    """Diffusion tensor model (Basser et al. 1994) with OLS or WLS fitting.

    Parameters
    ----------
    gtab : GradientTable
        Needs at least 7 volumes and 6 non-collinear directions.
    fit_method : {"WLS", "OLS", "IWLS"}
        ``WLS`` weights the second pass by the OLS-predicted signal squared (Chung 2006), as DIPY; ``OLS`` as
        DIPY; ``IWLS`` is MRtrix3's ``dwi2tensor`` (see the module docstring), with ``iterations`` and
        ``ols_start``.
    min_signal : float
        Signals below this are raised to it before taking logs (DIPY's default 1e-4; not used by ``IWLS``, which
        raises samples below 1e-6 of the voxel's largest, as MRtrix3).
    chunk_size : int, optional
        Voxels whose normal equations are formed together: small enough that their signal stays in cache. Default
        :func:`~dwiflow.core.voxels.cache_sized_chunk` of the volume count (about 1 MB of signal: 1024 voxels of
        141 volumes, 2048 of 65; the element-wise passes run ~1.4× faster than over 50,000 voxels). ``IWLS`` solves the
        systems of ``IWLS_SOLVE_CHUNKS`` such chunks at once (a thread's unit of work). Neither depends on the thread
        count, and a voxel's result depends on neither.
    wls_iterations : int
        ``WLS``: weighted passes after the OLS start (1, as DIPY), each weighted by the signal the previous pass
        predicts, squared.
    iterations : int
        ``IWLS``: dwi2tensor's ``-iter`` (default 2): refits weighted by the predicted signal after the first fit;
        as dwi2tensor, 0 and 1 both leave the first fit.
    ols_start : bool
        ``IWLS``: the first fit unweighted (dwi2tensor's ``-ols``) instead of weighted by the measured signal.
    keep_flagged_values : bool
        Voxels a tensor cannot describe get a status (NO_SIGNAL, SIGNAL_ABOVE_B0; NON_PHYSICAL for a negative
        ``IWLS`` eigenvalue) and, by default, NaN. True keeps their finite solutions, as dwi2tensor writes them
        (the status still says what is wrong): for steps that must see MRtrix3's values (dhollander's FA).
    """

    def __init__(
        self,
        gtab: GradientTable,
        fit_method: Literal["WLS", "OLS", "IWLS"] = "WLS",
        min_signal: float = MIN_POSITIVE_SIGNAL,
        chunk_size: int | None = None,
        wls_iterations: int = 1,
        iterations: int = DEFAULT_IWLS_ITERATIONS,
        ols_start: bool = False,
        keep_flagged_values: bool = False,
    ) -> None:
        gtab = checked_gradient_table(gtab, "TensorModel")
        check_fit_arguments(fit_method, iterations, min_signal)
        self.iterations, self.ols_start = int(iterations), bool(ols_start)
        self.keep_flagged_values = bool(keep_flagged_values)
        if chunk_size is None:
            chunk_size = cache_sized_chunk(gtab.n_volumes)
        if chunk_size < 1:
            raise DwiflowInputError(f"chunk_size must be >= 1, got {chunk_size!r}")
        if int(wls_iterations) != wls_iterations or wls_iterations < 1:
            raise DwiflowInputError(f"wls_iterations must be a positive integer, got {wls_iterations!r}",
                                    parameters=("wls_iterations",))
        self.wls_iterations = int(wls_iterations)
        self.gtab = gtab
        self.fit_method = fit_method
        self.min_signal = float(min_signal)
        self.chunk_size = int(chunk_size)
        x = tensor_design_matrix(gtab)
        if np.linalg.matrix_rank(x) < 7:
            raise DwiflowInputError(
                "the gradient table cannot determine a tensor: it needs b=0 or a second b-value "
                "and at least 6 non-collinear directions"
            )
        # Column scaling keeps the normal equations well conditioned (b ~ 1e3 vs 1).
        self._scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
        self._x = x / self._scale
        self._ols_pinv = np.linalg.pinv(self._x)  # (7, n)
        upper = np.triu_indices(7)  # the normal matrix is symmetric: its 28 distinct products, one GEMM
        self._products = np.ascontiguousarray(self._x[:, upper[0]] * self._x[:, upper[1]])  # (n, 28)
        # DIPY clips eigenvalues at tol / max(design entries) with tol = 1e-6.
        self.min_diffusivity = 1e-6 / max(float((-x[:, :6]).max()), 1.0)

    def _flag_inputs(self, signal: np.ndarray, volume_axis: int) -> tuple[np.ndarray, np.ndarray]:
        """Status of each voxel's signal before the fit (non-finite, no positive sample, diffusion-weighted mean above
        the b=0 one) and the mask of finite voxels; voxels are rows (``volume_axis=1``) or columns (0)."""
        status = np.zeros(signal.shape[1 - volume_axis], dtype=np.uint8)
        finite = np.all(np.isfinite(signal), axis=volume_axis)
        status[~finite] = FitStatus.NONFINITE_INPUT
        positive = np.any(signal > 0, axis=volume_axis)
        status[finite & ~positive] = FitStatus.NO_SIGNAL
        above = signal_above_b0(signal, self.gtab.b0s_mask, volume_axis)
        status[finite & positive & above] = FitStatus.SIGNAL_ABOVE_B0
        return status, finite

    def _fit_batch(self, signal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fit (v, n) signals by ``OLS`` or ``WLS``; returns (v, 7) parameters in original units and status."""
        status, finite = self._flag_inputs(signal, volume_axis=1)
        sig = np.where(finite[:, None], signal, 1.0)
        log_s = np.log(np.maximum(sig, self.min_signal))
        beta = log_s @ self._ols_pinv.T
        if self.fit_method == "WLS":
            for _ in range(self.wls_iterations):
                beta = self._weighted_fit(lambda rows, b=beta: np.exp(2.0 * (b[rows] @ self._x.T)), log_s, status)
        return self._in_units(beta, status)

    def _weighted_fit(self, squared_weights: Callable[[slice], np.ndarray], log_s: np.ndarray,
                      status: np.ndarray, by_volume: bool = False) -> np.ndarray:
        """Every voxel's weighted least-squares solution (scaled columns) from its normal equations: formed
        ``chunk_size`` voxels at a time (``squared_weights(voxels)``: those voxels' squared weights, float64, which
        this may overwrite), whose arrays stay in cache, and solved for all the voxels at once (the solve's vector
        operations then pay their call once for many voxels). Arrays hold a voxel per row, or per column with
        ``by_volume`` (the products take them transposed, as BLAS does without a copy)."""
        n = log_s.shape[1 if by_volume else 0]
        distinct, rhs = np.empty((n, self._products.shape[1])), np.empty((n, self._x.shape[1]))
        with np.errstate(invalid="ignore", over="ignore"):  # overflowed weights: SINGULAR in solve_symmetric_rows
            for voxels in iter_chunks(n, self.chunk_size):
                weights = squared_weights(voxels)
                distinct[voxels] = (weights.T if by_volume else weights) @ self._products
                weights *= log_s[:, voxels] if by_volume else log_s[voxels]
                rhs[voxels] = (weights.T if by_volume else weights) @ self._x
        return solve_symmetric_rows(distinct, rhs, status)

    def _in_units(self, beta: np.ndarray, status: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Parameters in their units; a voxel whose solution is not finite gets SINGULAR and NaN, a flagged one NaN
        (unless ``keep_flagged_values``)."""
        beta = beta / self._scale
        not_finite = ~np.all(np.isfinite(beta), axis=1)
        status[not_finite & (status == FitStatus.OK)] = FitStatus.SINGULAR
        drop = not_finite if self.keep_flagged_values else not_finite | (status != FitStatus.OK)
        beta[drop] = np.nan
        return beta, status

    def _fit_iwls(self, signal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """MRtrix3's dwi2tensor on (volumes, v) signals in the image's type: samples below 1e-6 of the voxel's
        largest raised to it, a first fit weighted by the measured signal (or unweighted), then refits weighted by
        the prediction when ``iterations`` > 1. Returns (v, 7) parameters in original units and status.

        A voxel per column: a Fortran-ordered image's voxels are gathered volume by volume with no transposition,
        and single-precision data stay single until the normal equations. The logarithms of the samples and the
        exponentials of the predictions are taken in single precision (on CPUs without AVX-512, numpy's double-
        precision ``exp`` and ``log`` are scalar, 3× slower, and were a third of the fit's time): both are rounded
        at ~1e-7 relative, and the tensors differ from double precision's by under 3e-7 of the voxel's largest
        element. A voxel's weights are scaled by their largest, which does not change a weighted least-squares
        solution and keeps them from overflowing."""
        if signal.dtype not in (np.float32, np.float64):
            signal = signal.astype(np.float64)
        status, finite = self._flag_inputs(signal, volume_axis=0)
        sig = signal if finite.all() else np.where(finite, signal, 1)
        small = MRTRIX3_SMALL_INTENSITY * sig.max(axis=0)
        sig = np.maximum(sig, small)
        log_s = np.log(sig if np.all(small > 0) else np.where(sig > 0, sig, 1), dtype=np.float32)
        design = self._x

        def measured(voxels: slice) -> np.ndarray:
            if self.ols_start:
                return np.ones((sig.shape[0], voxels.stop - voxels.start))
            return np.square(sig[:, voxels], dtype=np.float64)

        def predicted(voxels: slice) -> np.ndarray:
            exponent = design @ beta[voxels].T
            exponent -= exponent.max(axis=0)
            exponent *= 2.0
            return np.exp(exponent.astype(np.float32)).astype(np.float64)

        passes = 1 + (self.iterations if self.iterations > 1 else 0)
        beta = self._weighted_fit(measured, log_s, status, by_volume=True)
        for _ in range(passes - 1):
            beta = self._weighted_fit(predicted, log_s, status, by_volume=True)
        return self._in_units(beta, status)

    def fit(self, data: np.ndarray, mask: np.ndarray | None = None, n_threads: int | None = None) -> TensorFit:
        """Fit every voxel of ``data`` (…, n_volumes) inside ``mask``, chunks of voxels on ``n_threads`` threads
        (default 1; the result does not depend on it).

        Voxels outside the mask hold 0 (status 0); voxels that fail hold NaN and a
        non-zero status.
        """
        batch = VoxelBatch.from_volume(data, mask, self.gtab.n_volumes, memory_order=True)
        nvox = batch.n_voxels
        params = np.empty((nvox, 7))
        status = np.empty(nvox, dtype=np.uint8)

        def fit_chunk(sl: slice) -> None:
            if self.fit_method == "IWLS":
                params[sl], status[sl] = self._fit_iwls(batch.signal_by_volume(sl))
            else:
                params[sl], status[sl] = self._fit_batch(batch.signal(sl))

        run_chunks(fit_chunk, nvox, (IWLS_SOLVE_CHUNKS if self.fit_method == "IWLS" else 1) * self.chunk_size,
                   n_threads)
        if self.fit_method == "IWLS":
            # a negative diffusivity is not physical (MRtrix3 writes it; DIPY clips it): status 8 and NaN. A
            # symmetric matrix has a negative eigenvalue exactly when one of its principal minors is negative
            xx, xy, yy, xz, yz, zz = params[:, :6].T
            minors = np.stack([xx, yy, zz, xx * yy - xy * xy, xx * zz - xz * xz, yy * zz - yz * yz,
                               xx * (yy * zz - yz * yz) - xy * (xy * zz - yz * xz) + xz * (xy * yz - yy * xz)], axis=1)
            negative = (status == FitStatus.OK) & np.any(minors < 0, axis=1)
            status[negative] = FitStatus.NON_PHYSICAL
            if not self.keep_flagged_values:
                params[negative] = np.nan
        s0 = np.exp(params[:, 6])
        return TensorFit(
            s0=scatter(s0, batch),
            status=scatter(status, batch),
            mask=batch.mask,
            lower_triangular=scatter(params[:, :6], batch),
            by_magnitude=self.fit_method == "IWLS",
            min_diffusivity=self.min_diffusivity,
        )
