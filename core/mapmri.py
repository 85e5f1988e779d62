"""MAP-MRI: mean apparent propagator MRI with Laplacian regularisation (MAPL), anisotropic basis.

The normalised signal is a linear combination of products of 1D Hermite functions along the
axes of each voxel's diffusion tensor, scaled by ``u_i = sqrt(2 λ_i τ)`` (Özarslan et al. 2013).
The coefficients minimise the squared residual plus ``λ`` times the integrated squared
Laplacian of the signal, which is a quadratic form with an analytic matrix (Fick et al. 2016);
``λ`` is fixed (0.2) or chosen per voxel by generalised cross-validation. q-space indices
(RTOP, RTAP, RTPP, MSD, QIV, non-Gaussianities, the Laplacian norm) are linear or quadratic
functionals of the coefficients.

Every voxel has its own design matrix (its tensor frame and scales), so a fit is a batch of
small regularised least-squares problems: they are assembled and solved as stacked arrays.
For GCV each voxel's problem is diagonalised once (``L v = θ MᵀM v``), after which the GCV
criterion costs O(n_coefficients) per trial weight.

References
----------
Özarslan E., Koay C.G., Shepherd T.M., et al. Mean apparent propagator (MAP) MRI: a novel
diffusion imaging method for mapping tissue microstructure. NeuroImage 78 (2013) 16-32.
Fick R.H.J., Wassermann D., Caruyer E., Deriche R. MAPL: tissue microstructure estimation
using Laplacian-regularized MAP-MRI and its application to HCP data. NeuroImage 134 (2016) 365-385.
Craven P., Wahba G. Smoothing noisy data with spline functions. Numer Math 31 (1979) 377-403.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import factorial, gamma, sqrt

import numpy as np

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import GradientTable, checked_gradient_table
from dwiflow.core.mapmri_basis import (
    _double_factorial,
    index_matrix,
    q0_weights,
    check_radial_order,
    signal_basis,
    laplacian_matrix,
    isotropic_index_matrix,
    isotropic_q0_weights,
    _sh_columns,
    isotropic_signal_basis,
    isotropic_laplacian_unit,
    isotropic_scale,
    _isotropic_radial_sums,
    constraint_grid,
    propagator_basis,
    isotropic_propagator_basis,
    sos_constraint_matrices,
    _odf_polynomials,
)
from dwiflow.core.status import FitStatus, input_status
from dwiflow.core.tensor import TensorModel
from dwiflow.core.voxels import VoxelBatch, VoxelFit, iter_chunks

DEFAULT_TAU = 1.0 / (4.0 * np.pi**2)  # without Δ/δ: q = sqrt(b)/(2π·sqrt(τ)) with this τ gives q = sqrt(b)
GCV_BOUNDS = (1e-5, 10.0)

STATUS_CODES = (FitStatus.OK, FitStatus.NONFINITE_INPUT, FitStatus.NO_SIGNAL, FitStatus.SIGNAL_ABOVE_B0,
                FitStatus.SINGULAR, FitStatus.SOLVER_FAILED, FitStatus.NON_PHYSICAL)
# what a code means for MAP-MRI (added to the status map's Levels)
STATUS_DETAILS = {FitStatus.NON_PHYSICAL: "a negative return-to-origin, -axis or -plane probability or mean squared "
                                          "displacement"}
POSITIVITY_MODES = ("none", "grid", "global")
GRID_MARGIN = -0.1  # propagator lower bound at the grid points (as the reference implementation)
WORKING_SET_TIERS = (16, 32, 64, 128, 256)  # sizes of the reduced grid problems (working sets, see _grid_working_set)
WORKING_SET_STEP = 24  # most violated grid points added per round
ACTIVE_SET_ROUNDS = 400  # rounds of the exact active-set projection before falling back to CVXPY


def _gcv_scores(lambdas: np.ndarray, theta: np.ndarray, z2: np.ndarray, rss_floor: np.ndarray, n_obs: int) -> np.ndarray:
    """GCV ``||y - S y|| / (K - tr S)`` for weights (v, t) from each voxel's diagonalised problem.

    ``theta`` (v, c) generalised eigenvalues, ``z2`` (v, c) squared projections of the data,
    ``rss_floor`` (v,) the part of ||y||² outside the design's column space.
    """
    shrink = 1.0 / (1.0 + lambdas[..., None] * theta[:, None, :])  # (v, t, c)
    residual = rss_floor[:, None] + np.einsum("vtc,vc->vt", (1.0 - shrink) ** 2, z2)
    trace = shrink.sum(axis=-1)
    return np.sqrt(np.maximum(residual, 0.0)) / (n_obs - trace)


def gcv_weights(theta: np.ndarray, z2: np.ndarray, rss_floor: np.ndarray, n_obs: int,
                bounds: tuple[float, float] = GCV_BOUNDS) -> np.ndarray:
    """Per-voxel weight minimising GCV within ``bounds``: a log-spaced scan, then golden-section refinement."""
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    grid = np.exp(np.linspace(lo, hi, 49))
    scores = _gcv_scores(np.broadcast_to(grid, (theta.shape[0], grid.size)), theta, z2, rss_floor, n_obs)
    best = np.argmin(scores, axis=1)
    step = (hi - lo) / 48
    a = np.clip(np.log(grid[best]) - step, lo, hi)
    b = np.clip(np.log(grid[best]) + step, lo, hi)
    ratio = (np.sqrt(5.0) - 1) / 2
    for _ in range(40):
        c = b - ratio * (b - a)
        d = a + ratio * (b - a)
        fc = _gcv_scores(np.exp(c)[:, None], theta, z2, rss_floor, n_obs)[:, 0]
        fd = _gcv_scores(np.exp(d)[:, None], theta, z2, rss_floor, n_obs)[:, 0]
        left = fc < fd
        b = np.where(left, d, b)
        a = np.where(left, a, c)
    return np.exp(0.5 * (a + b))


@dataclass
class _MapmriRows:
    """MAP-MRI coefficients of fitted voxels as rows, and the indices computed from them (rows).

    Attributes
    ----------
    coefficients : ndarray (n, n_coef)
        Normalised so that the fitted signal at q = 0 is 1.
    mu : ndarray (n, 3)
        Scales (mm) along the tensor axes.
    frames : ndarray (n, 3, 3)
        Tensor eigenvectors (columns), world frame.
    """

    model: "MapmriModel"
    coefficients: np.ndarray
    mu: np.ndarray
    frames: np.ndarray

    def _dot(self, vector: np.ndarray, sel: np.ndarray | None = None) -> np.ndarray:
        c = self.coefficients if sel is None else self.coefficients[:, sel]
        return np.einsum("vc,vc->v", c, vector) if vector.ndim == 2 else c @ vector

    def _principal_sh(self) -> np.ndarray:
        return _sh_columns(self.model.radial_order, self.frames[:, :, 0])

    def rtop(self) -> np.ndarray:
        """Return-to-origin probability (1/mm³)."""
        order = self.model.radial_order
        if not self.model.anisotropic:
            ind, bm = isotropic_index_matrix(order), isotropic_q0_weights(order)
            vec = (-1.0) ** (ind[:, 0] - 1) * bm / (2 * np.sqrt(2.0) * np.pi**1.5)
            return self._dot(vec) / self.mu[:, 0] ** 3
        ind, bm = index_matrix(order), q0_weights(order)
        vec = (-1.0) ** (ind.sum(axis=1) / 2) * bm
        return self._dot(vec) / (np.sqrt(8 * np.pi**3) * np.prod(self.mu, axis=1))

    def rtap(self) -> np.ndarray:
        """Return-to-axis probability (1/mm²), axis = the tensor's principal direction."""
        order = self.model.radial_order
        if not self.model.anisotropic:
            ind = isotropic_index_matrix(order)
            j, ell = ind[:, 0], ind[:, 1]
            vec = 2 * (-1.0) ** (j - 1) * 2.0 ** (-(ell + 3) / 2.0) / np.pi * _isotropic_radial_sums(order, 1)
            return np.einsum("vc,vc->v", self.coefficients, vec * self._principal_sh()) / self.mu[:, 0] ** 2
        ind, bm = index_matrix(order), q0_weights(order)
        sel = bm > 0
        vec = bm[sel] * (-1.0) ** (ind[sel, 1:].sum(axis=1) / 2)
        return self._dot(vec, sel) / (2 * np.pi * self.mu[:, 1] * self.mu[:, 2])

    def rtpp(self) -> np.ndarray:
        """Return-to-plane probability (1/mm), plane orthogonal to the principal direction."""
        order = self.model.radial_order
        if not self.model.anisotropic:
            ell = isotropic_index_matrix(order)[:, 1]
            vec = (-0.5) ** (ell // 2) / np.sqrt(np.pi) * _isotropic_radial_sums(order, 1)
            return np.einsum("vc,vc->v", self.coefficients, vec * self._principal_sh()) / self.mu[:, 0]
        ind, bm = index_matrix(order), q0_weights(order)
        sel = bm > 0
        vec = bm[sel] * (-1.0) ** (ind[sel, 0] / 2)
        return self._dot(vec, sel) / (np.sqrt(2 * np.pi) * self.mu[:, 0])

    def _even(self):
        ind, bm = index_matrix(self.model.radial_order), q0_weights(self.model.radial_order)
        sel = bm > 0
        n = ind[sel].astype(float)
        fact = np.array([sqrt(factorial(int(a)) * factorial(int(b)) * factorial(int(c))) for a, b, c in ind[sel]])
        gam = np.array([gamma(0.5 - 0.5 * a) * gamma(0.5 - 0.5 * b) * gamma(0.5 - 0.5 * c) for a, b, c in ind[sel]])
        return sel, n, fact, gam

    def msd(self) -> np.ndarray:
        """Mean squared displacement (mm²)."""
        if not self.model.anisotropic:
            ind, bm = isotropic_index_matrix(self.model.radial_order), isotropic_q0_weights(self.model.radial_order)
            sel = bm > 0
            return self.mu[:, 0] ** 2 * self._dot((4 * ind[sel, 0] - 1) * bm[sel], sel)
        sel, n, fact, gam = self._even()
        total = n.sum(axis=1)
        mu2 = self.mu**2
        numerator = (-1.0) ** (-0.5 * total) * np.pi**1.5 * (
            (1 + 2 * n[:, 0]) * mu2[:, :1] + (1 + 2 * n[:, 1]) * mu2[:, 1:2] + (1 + 2 * n[:, 2]) * mu2[:, 2:3])
        denominator = np.sqrt(2.0 ** (-total)) * fact * gam
        return np.einsum("vc,vc->v", self.coefficients[:, sel], numerator / denominator)

    def qiv(self) -> np.ndarray:
        """q-space inverse variance (1/mm⁵)."""
        if not self.model.anisotropic:
            ind, bm = isotropic_index_matrix(self.model.radial_order), isotropic_q0_weights(self.model.radial_order)
            sel = bm > 0
            j = ind[sel, 0]
            vec = 8 * (-1.0) ** (1 - j) * np.sqrt(2) * np.pi**3.5 / ((4.0 * j - 1) * bm[sel])
            return self.mu[:, 0] ** 5 * self._dot(vec, sel)
        sel, n, fact, gam = self._even()
        ux, uy, uz = (self.mu[:, i : i + 1] for i in range(3))
        numerator = 8 * np.pi**2 * (ux * uy * uz) ** 3 * fact * gam
        denominator = np.sqrt(2.0 ** (-1 + n.sum(axis=1))) * (
            (1 + 2 * n[:, 0]) * uy**2 * uz**2 + ux**2 * ((1 + 2 * n[:, 2]) * uy**2 + (1 + 2 * n[:, 1]) * uz**2))
        return np.einsum("vc,vc->v", self.coefficients[:, sel], numerator / denominator)

    def _require_anisotropic(self, what: str) -> None:
        if not self.model.anisotropic:
            raise DwiflowInputError(f"{what} is defined for the anisotropic MAP-MRI basis only (Özarslan 2013)")

    def ng(self) -> np.ndarray:
        """Non-Gaussianity: sin of the angle between the propagator and its Gaussian part."""
        self._require_anisotropic("non-Gaussianity")
        c = self.coefficients
        return np.sqrt(np.clip(1 - c[:, 0] ** 2 / np.sum(c**2, axis=1), 0, None))

    def _ng_axis(self, along_first: bool) -> np.ndarray:
        self._require_anisotropic("non-Gaussianity")
        ind = index_matrix(self.model.radial_order)
        weights = np.zeros(ind.shape[0])
        base = np.zeros(ind.shape[0], bool)
        for i, (n1, n2, n3) in enumerate(ind):
            if along_first and n2 % 2 == 0 and n3 % 2 == 0:
                weights[i] = (-1) ** ((n2 + n3) // 2) * sqrt(factorial(n2) * factorial(n3)) / (
                    _double_factorial(n2) * _double_factorial(n3))
                base[i] = n1 == 0
            elif not along_first and n1 % 2 == 0 and n2 % 2 == 0 and n3 % 2 == 0:
                weights[i] = (-1) ** (n1 // 2) * sqrt(factorial(n1)) / _double_factorial(n1)
                base[i] = n2 == 0 and n3 == 0
        a = self.coefficients * weights
        return np.sqrt(np.clip(1 - np.sum(a[:, base] ** 2, axis=1) / np.sum(a**2, axis=1), 0, None))

    def ng_parallel(self) -> np.ndarray:
        """Non-Gaussianity along the principal direction."""
        return self._ng_axis(True)

    def ng_perpendicular(self) -> np.ndarray:
        """Non-Gaussianity in the plane orthogonal to the principal direction."""
        return self._ng_axis(False)

    def laplacian_norm(self) -> np.ndarray:
        """Integrated squared Laplacian of the fitted signal, ``cᵀ L c``."""
        lap = self.model.laplacian(self.mu)
        return np.einsum("vi,vij,vj->v", self.coefficients, lap, self.coefficients)

    def fitted_signal(self) -> np.ndarray:
        """The fitted, normalised signal (n, n_volumes) on the model's gradient table."""
        return np.einsum("vgc,vc->vg", self.model.design(self.mu, self.frames), self.coefficients)

    def odf(self, vertices: np.ndarray, s: int = 2) -> np.ndarray:
        """ODF with radial moment ``s`` (Özarslan 2013, eq. 32) at unit ``vertices`` (world frame), (v, n_vert)."""
        order = self.model.radial_order
        vertices = np.asarray(vertices, dtype=float)
        if not self.model.anisotropic:
            from dwiflow.core.sh import real_sh_basis

            return self.odf_sh(s) @ real_sh_basis(order, vertices).T
        local = np.einsum("gi,vij->vgj", vertices, self.frames) / self.mu[:, None, :]
        rho = 1.0 / np.linalg.norm(local, axis=2)
        abc = 2 * rho[..., None] * local  # alpha, beta, gamma of eq. 35
        const = rho ** int(3 + s) / np.sqrt(2 ** (2 - s) * np.pi**3 * np.prod(self.mu**2, axis=1))[:, None]
        exponents, table = _odf_polynomials(order, s)
        k = order + 1
        dense = np.zeros((self.coefficients.shape[0], k, k, k))  # polynomial coefficients by (a, b, c) exponents
        dense[:, exponents[:, 0], exponents[:, 1], exponents[:, 2]] = self.coefficients @ table
        powers = np.empty(abc.shape[:2] + (3, k))  # (v, g, 3, k) by repeated products (pow is slow)
        powers[..., 0] = 1.0
        for n in range(1, k):
            np.multiply(powers[..., n - 1], abc, out=powers[..., n])
        inner = powers[..., 2, :] @ np.swapaxes(dense.reshape(-1, k * k, k), 1, 2)  # Σ_c γ^c: (v, g, k·k)
        inner = np.einsum("vgab,vgb->vga", inner.reshape(inner.shape[:2] + (k, k)), powers[..., 1, :])
        return const * np.einsum("vga,vga->vg", inner, powers[..., 0, :])

    def odf_sh(self, s: int = 2, lmax: int | None = None) -> np.ndarray:
        """ODF as real SH (MRtrix3 basis, world frame), (v, n_sh).

        Isotropic basis: exact, degree ``radial_order``. Anisotropic basis: least-squares SH fit
        (degree ``lmax``, default ``radial_order``) of the ODF on 642 directions.
        """
        from dwiflow.core.sh import amplitudes_to_sh, n_coefficients, sh_degree_order

        order = self.model.radial_order
        if self.model.anisotropic:
            from dwiflow.core.sphere import get_sphere

            vertices = get_sphere("ico642").vertices
            out = np.empty((self.coefficients.shape[0], n_coefficients(lmax or order)))
            for sl in iter_chunks(out.shape[0], 128):  # bounded memory: (voxels, vertices, monomials) per chunk
                part = _MapmriRows(self.model, self.coefficients[sl], self.mu[sl], self.frames[sl])
                out[sl] = amplitudes_to_sh(part.odf(vertices, s), vertices, lmax or order)
            return out
        ind = isotropic_index_matrix(order)
        j, ell = ind[:, 0], ind[:, 1]
        weights = (-1.0) ** (j - 1) * 2.0 ** (-(ell + 3) / 2.0) / np.pi * _isotropic_radial_sums(order, s + 3)
        degrees, orders = sh_degree_order(order)
        lookup = {(int(l), int(m)): i for i, (l, m) in enumerate(zip(degrees, orders))}
        cols = np.array([lookup[(int(l), int(m))] for _, l, m in ind])
        out = np.zeros((self.coefficients.shape[0], n_coefficients(order)))
        np.add.at(out.T, cols, (self.coefficients * weights).T)
        return self.mu[:, :1] ** s * out


@dataclass
class MapmriFit(VoxelFit):
    """Result of :meth:`MapmriModel.fit`; every public array is shaped like the input volume.

    Voxels outside the mask hold NaN (0 for ODF coefficients), voxels whose status is not OK hold
    NaN. ``coefficients`` are normalised so that the fitted signal at q = 0 is 1; ``mu`` are the
    scales (mm) along the tensor axes, ``frames`` the tensor eigenvectors (columns, world frame)
    and ``lambdas`` the Laplacian weight used in each voxel.
    """

    model: "MapmriModel"
    batch: VoxelBatch
    coefficients_rows: np.ndarray
    mu_rows: np.ndarray
    frames_rows: np.ndarray
    lambdas_rows: np.ndarray
    status_rows: np.ndarray

    @property
    def rows(self) -> _MapmriRows:
        return _MapmriRows(self.model, self.coefficients_rows, self.mu_rows, self.frames_rows)

    @property
    def coefficients(self) -> np.ndarray:
        return self.volume(self.coefficients_rows)

    @property
    def mu(self) -> np.ndarray:
        return self.volume(self.mu_rows)

    @property
    def frames(self) -> np.ndarray:
        return self.volume(self.frames_rows)

    @property
    def lambdas(self) -> np.ndarray:
        return self.volume(self.lambdas_rows)

    def rtop(self) -> np.ndarray:
        """Return-to-origin probability (1/mm³)."""
        return self.volume(self.rows.rtop())

    def rtap(self) -> np.ndarray:
        """Return-to-axis probability (1/mm²), axis = the tensor's principal direction."""
        return self.volume(self.rows.rtap())

    def rtpp(self) -> np.ndarray:
        """Return-to-plane probability (1/mm), plane orthogonal to the principal direction."""
        return self.volume(self.rows.rtpp())

    def msd(self) -> np.ndarray:
        """Mean squared displacement (mm²)."""
        return self.volume(self.rows.msd())

    def qiv(self) -> np.ndarray:
        """q-space inverse variance (1/mm⁵)."""
        return self.volume(self.rows.qiv())

    def ng(self) -> np.ndarray:
        """Non-Gaussianity (anisotropic basis only)."""
        return self.volume(self.rows.ng())

    def ng_parallel(self) -> np.ndarray:
        """Non-Gaussianity along the principal direction (anisotropic basis only)."""
        return self.volume(self.rows.ng_parallel())

    def ng_perpendicular(self) -> np.ndarray:
        """Non-Gaussianity orthogonal to the principal direction (anisotropic basis only)."""
        return self.volume(self.rows.ng_perpendicular())

    def laplacian_norm(self) -> np.ndarray:
        """Integrated squared Laplacian of the fitted signal, ``cᵀ L c``."""
        return self.volume(self.rows.laplacian_norm())

    def predict(self) -> np.ndarray:
        """The fitted signal (…, n_volumes) on the model's gradient table, normalised to 1 at b=0."""
        return self.volume(self.rows.fitted_signal())

    def odf(self, sphere, s: int = 2) -> np.ndarray:
        """ODF with radial moment ``s`` (Özarslan 2013, eq. 32) on ``sphere`` (a name, a Sphere or unit
        vectors (m, 3), world frame): (…, m)."""
        from dwiflow.core.sphere import sphere_vertices

        return self.volume(self.rows.odf(sphere_vertices(sphere), s))

    def odf_sh(self, s: int = 2, lmax: int | None = None) -> np.ndarray:
        """ODF as real SH (MRtrix3 basis, world frame), (…, n_sh); 0 outside the mask (see
        :meth:`_MapmriRows.odf_sh`)."""
        return self.volume(self.rows.odf_sh(s, lmax), fill=0.0)

    @property
    def shm_coeff(self) -> np.ndarray:
        """The ODF (s = 2) as SH (DIPY's name)."""
        return self.odf_sh()


class MapmriModel:
    """MAP-MRI with Laplacian regularisation (MAPL), anisotropic or isotropic scaling.

    Parameters
    ----------
    gtab : GradientTable
        Several shells and b=0 volumes.
    radial_order : int
        Even, ≥ 2 (default 6; 8 is recommended for isotropic ODFs).
    anisotropic_scaling : bool
        True: Hermite basis along each voxel's tensor axes (best for indices). False: the
        isotropic basis (radial Laguerre functions × spherical harmonics, scale u0), which
        does not bias crossing ODFs (Fick et al. 2016).
    laplacian_weighting : float, "gcv" or array
        Fixed weight (0.2), per-voxel GCV within [1e-5, 10], or GCV over the given weights.
    big_delta, small_delta : float, optional
        Gradient separation and duration (s); τ = Δ - δ/3. Without them τ = 1/(4π²) and the
        indices are not in physical units.
    bval_threshold : float
        Only volumes below it are used to fit the tensor that sets the frame and scales.
    eigenvalue_threshold : float
        Floor of the tensor eigenvalues (mm²/s).
    positivity : {"none", "grid", "global"}
        Non-negative propagator on a grid of ``pos_grid`` points within ``pos_radius``, or everywhere (sum of
        squares, Dela Haije et al. 2020).
    laplacian_regularization, positivity_constraint, global_constraints : bool, optional
        DIPY's names: ``laplacian_regularization=False`` is ``laplacian_weighting=0``; ``positivity_constraint``
        is ``positivity="grid"``, or ``"global"`` with ``global_constraints=True``.
    """

    def __init__(
        self,
        gtab: GradientTable,
        *,
        radial_order: int = 6,
        anisotropic_scaling: bool = True,
        laplacian_weighting: float | str | np.ndarray = 0.2,
        big_delta: float | None = None,
        small_delta: float | None = None,
        bval_threshold: float = np.inf,
        eigenvalue_threshold: float = 1e-4,
        positivity: str = "none",
        pos_grid: int = 15,
        pos_radius: float | str = "adaptive",
        solver: str = "CLARABEL",
        chunk_size: int = 128,
        laplacian_regularization: bool | None = None,
        positivity_constraint: bool | None = None,
        global_constraints: bool = False,
    ):
        gtab = checked_gradient_table(gtab, "MapmriModel")
        if laplacian_regularization is False:  # DIPY's switch: no Laplacian term
            laplacian_weighting = 0.0
        if positivity_constraint is not None:  # DIPY's switches: on a grid, or everywhere (global_constraints)
            if positivity != "none":
                raise DwiflowInputError("give positivity or DIPY's positivity_constraint, not both",
                                        parameters=("positivity", "positivity_constraint"))
            positivity = ("global" if global_constraints else "grid") if positivity_constraint else "none"
        self.radial_order = check_radial_order(radial_order)
        self.anisotropic = bool(anisotropic_scaling)
        if not gtab.b0s_mask.any():
            raise DwiflowInputError("MAP-MRI needs b=0 volumes; none found")
        n_shells = len(gtab.dw_shells)
        if n_shells < 2:
            raise DwiflowInputError(f"MAP-MRI needs several diffusion-weighted shells (it models the radial signal "
                                    f"decay); this gradient table has {n_shells}")
        if (big_delta is None) != (small_delta is None):
            raise DwiflowInputError("give both big_delta and small_delta (seconds), or neither")
        if big_delta is not None:
            if not (big_delta > 0 and small_delta > 0 and big_delta > small_delta / 3):
                raise DwiflowInputError(f"big_delta ({big_delta}) and small_delta ({small_delta}) must be positive "
                                        "times in seconds with big_delta > small_delta/3")
            self.tau = big_delta - small_delta / 3.0
        else:
            self.tau = DEFAULT_TAU
        self.big_delta, self.small_delta = big_delta, small_delta
        if isinstance(laplacian_weighting, str):
            if laplacian_weighting.lower() != "gcv":
                raise DwiflowInputError(f"laplacian_weighting must be a number, 'gcv' or an array, got {laplacian_weighting!r}")
            self.weighting: float | str | np.ndarray = "gcv"
        elif np.ndim(laplacian_weighting) == 0:
            if not laplacian_weighting >= 0:
                raise DwiflowInputError(f"laplacian_weighting must be >= 0, got {laplacian_weighting!r}")
            self.weighting = float(laplacian_weighting)
        else:
            w = np.asarray(laplacian_weighting, dtype=float).ravel()
            if w.size < 2 or np.any(w < 0):
                raise DwiflowInputError("a laplacian_weighting array needs at least two non-negative weights")
            self.weighting = w
        self.gtab = gtab
        self.bval_threshold = float(bval_threshold)
        cutoff = gtab.bvals < self.bval_threshold
        if cutoff.sum() < 7 or not (gtab.b0s_mask & cutoff).any():
            raise DwiflowInputError(f"bval_threshold {bval_threshold} leaves too few volumes to fit the tensor")
        self.cutoff = cutoff
        self.tensor = TensorModel(gtab.subset(np.flatnonzero(cutoff)))
        self.eigenvalue_threshold = float(eigenvalue_threshold)
        qvals = np.sqrt(gtab.bvals / self.tau) / (2 * np.pi)
        self.q_vectors = gtab.bvecs * qvals[:, None]
        self.q0 = q0_weights(self.radial_order) if self.anisotropic else isotropic_q0_weights(self.radial_order)
        self.chunk_size = int(chunk_size)
        if positivity not in POSITIVITY_MODES:
            raise DwiflowInputError(f"positivity must be one of {POSITIVITY_MODES}, got {positivity!r}")
        if positivity == "global" and not self.anisotropic:
            raise DwiflowInputError("global positivity (sum-of-squares) is available for the anisotropic basis only")
        if positivity != "none":
            import cvxpy

            if solver.upper() not in cvxpy.installed_solvers():
                raise DwiflowInputError(f"solver {solver!r} is not available; installed CVXPY solvers: "
                                        f"{cvxpy.installed_solvers()}")
        if int(pos_grid) != pos_grid or pos_grid < 3:
            raise DwiflowInputError(f"pos_grid must be an integer >= 3, got {pos_grid!r}")
        if not (pos_radius == "adaptive" or (np.isscalar(pos_radius) and float(pos_radius) > 0)):
            raise DwiflowInputError(f"pos_radius must be 'adaptive' or a positive radius in mm, got {pos_radius!r}")
        self.positivity = positivity
        self.pos_grid = int(pos_grid)
        self.pos_radius = pos_radius
        self.solver = solver.upper()
        self._problem = None
        self._grid_problems: dict[int, tuple] = {}

    def _grid_problem(self, n_grid: int):
        """CVXPY problem of the grid-constrained fit, built once; per voxel only its parameters change.

        In the variable x = R c (RᵀR = MᵀM + λL) the objective is ||x - t||² with only t varying,
        and each grid row is scaled to unit norm, which keeps the solver's work small and well scaled.
        """
        import cvxpy as cp

        n = self.n_coefficients
        x = cp.Variable(n)
        target, a0, rows, margin = cp.Parameter(n), cp.Parameter(n), cp.Parameter((n_grid, n)), cp.Parameter(n_grid)
        rows.value, margin.value = np.zeros((n_grid, n)), np.full(n_grid, -1.0)
        problem = cp.Problem(cp.Minimize(cp.sum_squares(x - target)), [a0 @ x == 1, rows @ x >= margin])
        return problem, x, (target, a0, rows, margin)

    def _global_problem(self):
        """CVXPY problem of the sum-of-squares (global) positivity fit, built once."""
        import cvxpy as cp

        n = self.n_coefficients
        blocks, nulls = sos_constraint_matrices(self.radial_order)
        h, free = cp.Variable(n), cp.Variable(nulls[0].shape[0])
        chol, target = cp.Parameter((n, n)), cp.Parameter(n)
        constraints = []
        for b, z in zip(blocks, nulls):
            size = b.shape[1]
            gram = cp.reshape(b.reshape(n, -1).T @ h + z.reshape(z.shape[0], -1).T @ free, (size, size), order="C")
            constraints.append(0.5 * (gram + gram.T) >> 0)
        problem = cp.Problem(cp.Minimize(cp.norm(chol @ h - target)), constraints)
        return problem, h, (chol, target)

    @property
    def n_coefficients(self) -> int:
        return (index_matrix if self.anisotropic else isotropic_index_matrix)(self.radial_order).shape[0]

    def design(self, mu: np.ndarray, frames: np.ndarray, q_vectors: np.ndarray | None = None) -> np.ndarray:
        """Design matrices (v, n_q, n_coef) of voxels with scales ``mu`` (v, 3) and tensor frames (v, 3, 3)."""
        q = self.q_vectors if q_vectors is None else q_vectors
        if self.anisotropic:
            return signal_basis(self.radial_order, mu, np.einsum("gi,vij->vgj", q, frames))
        return isotropic_signal_basis(self.radial_order, mu[:, 0], q)

    def laplacian(self, mu: np.ndarray) -> np.ndarray:
        """Laplacian regularisers (v, n_coef, n_coef)."""
        if self.anisotropic:
            return laplacian_matrix(self.radial_order, mu)
        return mu[:, 0, None, None] * isotropic_laplacian_unit(self.radial_order)[None]

    def fit(self, data: np.ndarray, mask: np.ndarray | None = None, progress=None) -> MapmriFit:
        """Fit every voxel of ``mask``; ``progress(done, total)`` after each chunk of voxels."""
        batch = VoxelBatch.from_volume(data, mask, self.gtab.n_volumes)
        n, c = batch.n_voxels, self.n_coefficients
        coef = np.full((n, c), np.nan)
        mu = np.full((n, 3), np.nan)
        frames = np.full((n, 3, 3), np.nan)
        lambdas = np.full(n, np.nan)
        status = np.zeros(n, dtype=np.uint8)
        for sl in iter_chunks(n, self.chunk_size):
            y = batch.signal(sl)
            self._fit_chunk(y, coef[sl], mu[sl], frames[sl], lambdas[sl], status[sl])
            if progress is not None:
                progress(sl.stop, n)
        self._flag_non_physical(coef, mu, frames, lambdas, status)
        return MapmriFit(self, batch, coef, mu, frames, lambdas, status)

    def _flag_non_physical(self, coef, mu, frames, lambdas, status) -> None:
        """Status NON_PHYSICAL (and NaN estimates) where a fit that converged has a negative RTOP, RTAP, RTPP or
        MSD: probabilities and a mean squared displacement cannot be negative, and such a voxel is no "ok" voxel
        (without positivity about 3% of the voxels of an 8-shell in-vivo run). The signs do not depend on τ."""
        ok = np.flatnonzero(status == FitStatus.OK)
        if ok.size == 0:
            return
        rows = _MapmriRows(self, coef[ok], mu[ok], frames[ok])
        with np.errstate(all="ignore"):
            negative = (rows.rtop() < 0) | (rows.rtap() < 0) | (rows.rtpp() < 0) | (rows.msd() < 0)
        bad = ok[negative]
        status[bad] = FitStatus.NON_PHYSICAL
        coef[bad], mu[bad], frames[bad], lambdas[bad] = np.nan, np.nan, np.nan, np.nan

    def _fit_chunk(self, y, coef, mu, frames, lambdas, status) -> None:
        status[:] = input_status(y, self.gtab.b0s_mask)
        ok = np.flatnonzero(status == FitStatus.OK)
        if not ok.size:
            return
        y = y[ok]
        tensor = self.tensor.fit(y[:, self.cutoff])
        fitted = np.all(np.isfinite(tensor.evals), axis=1) & np.all(np.isfinite(tensor.evecs), axis=(1, 2))
        status[ok[~fitted]] = FitStatus.SINGULAR
        ok, y = ok[fitted], y[fitted]
        if not ok.size:
            return
        evals = np.maximum(tensor.evals[fitted], self.eigenvalue_threshold)
        vox_frames = tensor.evecs[fitted]
        if self.anisotropic:
            vox_mu = np.sqrt(evals * 2 * self.tau)
        else:
            vox_mu = np.repeat(isotropic_scale(evals * 2 * self.tau)[:, None], 3, axis=1)
        design = self.design(vox_mu, vox_frames)  # (v, g, c)
        lap = self.laplacian(vox_mu)
        design_t = np.swapaxes(design, 1, 2)
        gram = design_t @ design
        rhs = (design_t @ y[..., None])[..., 0]
        if isinstance(self.weighting, float):
            lam = np.full(ok.size, self.weighting)
        else:
            lam = self._gcv(design, gram, lap, y)
        if self.positivity != "none":
            c, bad = self._positive_fit(y, design, gram, lap, lam, vox_mu, evals)
            c = c / (c @ self.q0)[:, None]
            good = ~bad & np.all(np.isfinite(c), axis=1)
            idx = ok[good]
            coef[idx], mu[idx], frames[idx], lambdas[idx] = c[good], vox_mu[good], vox_frames[good], lam[good]
            status[ok[~good]] = FitStatus.SOLVER_FAILED
            return
        system = gram + lam[:, None, None] * lap
        try:
            c = np.linalg.solve(system, rhs[..., None])[..., 0]
            bad = ~np.all(np.isfinite(c), axis=1)
        except np.linalg.LinAlgError:
            c = np.empty_like(rhs)
            bad = np.zeros(ok.size, bool)
            for i in range(ok.size):
                try:
                    c[i] = np.linalg.solve(system[i], rhs[i])
                except np.linalg.LinAlgError:
                    bad[i] = True
        c = c / (c @ self.q0)[:, None]
        good = ~bad & np.all(np.isfinite(c), axis=1)
        idx = ok[good]
        coef[idx] = c[good]
        mu[idx] = vox_mu[good]
        frames[idx] = vox_frames[good]
        lambdas[idx] = lam[good]
        status[ok[~good]] = FitStatus.SINGULAR

    def _positive_fit(self, y, design, gram, lap, lam, mu, evals) -> tuple[np.ndarray, np.ndarray]:
        """Fits with a non-negative propagator: at grid points (CMAP/CMAPL) or globally (MAP+).

        The data are normalised by the mean b=0. Each voxel's objective ||M c - y||² + λ cᵀLc is
        handed to CVXPY as ||R c - t||² with RᵀR = MᵀM + λL (same minimiser, n_coef rows).
        Grid mode first tries the equality-constrained least-squares solution: when it already
        satisfies every grid constraint it is the constrained optimum (KKT), and no solver call
        is needed.
        """

        y = y / y[:, self.gtab.b0s_mask].mean(axis=1, keepdims=True)
        system = gram + lam[:, None, None] * lap
        rhs = np.einsum("vgi,vg->vi", design, y)
        n, n_coef = y.shape[0], self.n_coefficients
        out = np.full((n, n_coef), np.nan)
        bad = np.zeros(n, bool)
        # Without a Laplacian term, MᵀM is singular when the shells do not determine every coefficient (two
        # shells at radial order 6): then a ridge far below the data's scale picks the minimum-norm optimum
        scale = np.einsum("vii->v", system)[:, None, None] / n_coef
        chol_lower = np.full_like(system, np.nan)
        for i in range(n):
            for ridge in (0.0, 1e-12, 1e-10, 1e-8, 1e-6):
                try:
                    chol_lower[i] = np.linalg.cholesky(system[i] + ridge * scale[i] * np.eye(n_coef))
                    system[i] += ridge * scale[i] * np.eye(n_coef)
                    break
                except np.linalg.LinAlgError:
                    continue
            else:
                bad[i] = True
        target = np.linalg.solve(chol_lower, rhs[..., None])[..., 0]  # R^{-T} Mᵀy with R = Lᵀ
        if self.positivity == "grid":
            first_b0 = int(np.flatnonzero(self.gtab.b0s_mask)[0])
            a0 = design[:, first_b0, :]
            radius = (np.sqrt(5) * np.sqrt(evals * 2 * self.tau).max(axis=1) if self.pos_radius == "adaptive"
                      else np.full(n, float(self.pos_radius)))
            unit = constraint_grid(self.pos_grid, 1.0)
            grids = unit[None] * radius[:, None, None]  # each voxel's grid (same directions, its own radius)
            if self.anisotropic:
                psi = propagator_basis(self.radial_order, mu, grids)
            else:
                psi = isotropic_propagator_basis(self.radial_order, mu[:, 0], grids)
            # equality-constrained least squares (a0·c = 1) in closed form
            free = np.linalg.solve(system, rhs[..., None])[..., 0]
            w = np.linalg.solve(system, a0[..., None])[..., 0]
            c_eq = free + w * ((1 - np.einsum("vi,vi->v", a0, free)) / np.einsum("vi,vi->v", a0, w))[:, None]
            feasible = np.all(np.einsum("vri,vi->vr", psi, c_eq) >= GRID_MARGIN, axis=1) & ~bad
            out[feasible] = c_eq[feasible]
            for i in np.flatnonzero(~feasible & ~bad):
                out[i], converged = self._grid_active_set(chol_lower[i].T, target[i], a0[i], psi[i])
                if not converged:  # the convex program through CVXPY (Clarabel) as the fallback
                    out[i], bad[i] = self._grid_working_set(chol_lower[i].T, target[i], a0[i], psi[i], c_eq[i])
        else:
            if self._problem is None or self._problem[0] != ("global",):
                self._problem = (("global",), *self._global_problem())
            _, problem, var, (p_chol, p_target) = self._problem
            for i in np.flatnonzero(~bad):
                p_chol.value, p_target.value = chol_lower[i].T, target[i]
                out[i], bad[i] = self._solve(problem, var)
        return out, bad

    def _grid_active_set(self, chol, target, a0, psi) -> tuple[np.ndarray, bool]:
        """Grid-constrained fit of one voxel, exactly, by an active-set method (no solver call).

        In x = R c the problem is the projection of t onto {a0·x = 1, U x ≥ m} (U: unit grid rows).
        With an active set A the projection onto the affine set {a0·x = 1, U_A x = m_A} is
        x = t − Bᵀν, (B Bᵀ) ν = B t − d; the constrained optimum is reached when every active
        multiplier −ν_A is ≥ 0 (KKT) and no grid point is violated. Each round drops the most negative
        multiplier, or else adds the most violated point. Returns (c, converged); when the rounds run
        out (degenerate cycling) the caller falls back to the CVXPY working sets.
        """
        from scipy.linalg import solve_triangular

        psi_x = solve_triangular(chol, psi.T, trans="T", lower=False).T  # psi R⁻¹
        a0_x = solve_triangular(chol, a0, trans="T", lower=False)  # R⁻ᵀ a0
        norms = np.linalg.norm(psi_x, axis=1)
        norms[norms == 0] = 1.0
        unit_rows, margins = psi_x / norms[:, None], GRID_MARGIN / norms
        active: list[int] = []
        for _ in range(ACTIVE_SET_ROUNDS):
            rows = np.vstack([a0_x[None], unit_rows[active]]) if active else a0_x[None]
            rhs = np.concatenate([[1.0], margins[active]])
            gram = rows @ rows.T
            try:
                nu = np.linalg.solve(gram, rows @ target - rhs)
            except np.linalg.LinAlgError:
                return np.full(psi.shape[1], np.nan), False
            x = target - rows.T @ nu
            multipliers = -nu[1:]
            if active and multipliers.min() < -1e-12 * max(1.0, np.abs(multipliers).max()):
                active.pop(int(np.argmin(multipliers)))
                continue
            slack = unit_rows @ x - margins
            worst = int(np.argmin(slack))
            if slack[worst] >= -1e-10 * max(1.0, float(np.abs(x).max())):
                return solve_triangular(chol, x, lower=False), True
            if worst in active:  # numerically stuck
                break
            active.append(worst)
        return np.full(psi.shape[1], np.nan), False

    def _grid_working_set(self, chol, target, a0, psi, start) -> tuple[np.ndarray, bool]:
        """Grid-constrained fit of one voxel by working sets: solve with a few of the most violated grid
        points, add the most violated points of that solution, repeat. A solution of a reduced problem
        that satisfies every grid point is the optimum of the full problem (its constraints are a
        superset); the reduced problems come in a few sizes, each built once, and the full problem is
        the last resort."""
        from scipy.linalg import solve_triangular

        n_grid = psi.shape[0]
        psi_x = solve_triangular(chol, psi.T, trans="T", lower=False).T  # psi R⁻¹
        a0_x = solve_triangular(chol, a0, trans="T", lower=False)  # R⁻ᵀ a0
        norms = np.linalg.norm(psi_x, axis=1)
        norms[norms == 0] = 1.0
        unit_rows, margins = psi_x / norms[:, None], GRID_MARGIN / norms

        def solve(rows_idx: list[int] | None) -> tuple[np.ndarray, bool]:
            count = n_grid if rows_idx is None else next(t for t in WORKING_SET_TIERS if t >= len(rows_idx))
            if count not in self._grid_problems:
                self._grid_problems[count] = self._grid_problem(count)
            problem, var, (p_target, p_a0, p_rows, p_margin) = self._grid_problems[count]
            p_target.value, p_a0.value = target, a0_x
            if rows_idx is None:
                p_rows.value, p_margin.value = unit_rows, margins
            else:
                # unused slots repeat the first chosen row: a redundant constraint keeps the sparsity pattern,
                # so CVXPY updates the solver's data instead of setting it up again
                padded = list(rows_idx) + [rows_idx[0]] * (count - len(rows_idx))
                p_rows.value, p_margin.value = unit_rows[padded], margins[padded]
            x, failed = self._solve(problem, var)
            return (np.full(psi.shape[1], np.nan) if failed else solve_triangular(chol, x, lower=False)), failed

        chosen: list[int] = []
        candidate = start
        for _ in range(12):
            values = psi @ candidate
            tolerance = 1e-6 * max(1.0, float(np.abs(values).max()))
            violated = np.flatnonzero(values < GRID_MARGIN - tolerance)
            violated = violated[~np.isin(violated, chosen)]
            if not violated.size and chosen:
                return candidate, False
            worst = violated[np.argsort(values[violated])][:WORKING_SET_STEP]
            if len(chosen) + worst.size > WORKING_SET_TIERS[-1]:
                break
            chosen.extend(worst.tolist())
            candidate, failed = solve(chosen)
            if failed:
                return candidate, True
        return solve(None)

    def _solve(self, problem, variable) -> tuple[np.ndarray, bool]:
        import cvxpy as cp

        try:
            problem.solve(solver=self.solver)
        except cp.error.SolverError:
            return np.full(variable.shape, np.nan), True
        if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or variable.value is None:
            return np.full(variable.shape, np.nan), True
        return np.asarray(variable.value, dtype=float), False

    def _gcv(self, design, gram, lap, y) -> np.ndarray:
        """Per-voxel GCV weight (Craven & Wahba 1979) via the generalised eigenproblem L v = θ (MᵀM) v."""
        # a rank-deficient MᵀM (more coefficients than the shells resolve; DIPY uses a pseudo-inverse here)
        # gets a ridge far below the data's scale, only for choosing the weight
        scale = np.einsum("vii->v", gram)[:, None, None] / gram.shape[1]
        for ridge in (0.0, 1e-12, 1e-9, 1e-6):
            try:
                chol = np.linalg.cholesky(gram + ridge * scale * np.eye(gram.shape[1]))
                break
            except np.linalg.LinAlgError:
                continue
        else:
            raise np.linalg.LinAlgError("MAP-MRI design has no usable normal matrix for GCV")
        inv_chol = np.linalg.inv(chol)
        reduced = inv_chol @ lap @ np.swapaxes(inv_chol, 1, 2)
        theta, w = np.linalg.eigh(0.5 * (reduced + np.swapaxes(reduced, 1, 2)))
        basis = np.swapaxes(inv_chol, 1, 2) @ w  # V with Vᵀ MᵀM V = I, Vᵀ L V = diag θ
        z = np.einsum("vic,vi->vc", basis, np.einsum("vgi,vg->vi", design, y))  # Vᵀ Mᵀ y
        rss_floor = np.einsum("vg,vg->v", y, y) - np.einsum("vc,vc->v", z, z)
        n_obs = y.shape[1]
        if isinstance(self.weighting, np.ndarray):
            scores = _gcv_scores(np.broadcast_to(self.weighting, (y.shape[0], self.weighting.size)), theta, z**2,
                                 rss_floor, n_obs)
            return self._first_local_minimum(scores)
        return gcv_weights(theta, z**2, rss_floor, n_obs)

    def _first_local_minimum(self, scores: np.ndarray) -> np.ndarray:
        """DIPY's scan of a weight array: walk up the array while GCV does not increase (at most to its
        second-to-last weight), keep the weight before the last one evaluated."""
        w = self.weighting
        n_w = w.size
        rises = scores[:, 1 : n_w - 1] > scores[:, : n_w - 2]  # a rise at weight i (1 ≤ i ≤ n_w - 2) stops the walk
        stop = np.where(rises.any(axis=1), np.argmax(rises, axis=1) + 1, n_w - 2)
        return w[stop - 1]
