"""Constrained spherical deconvolution (Tournier et al. 2007), batched across voxels.

The estimate is MRtrix3's ``dwi2fod csd``: for the signal s of one shell (b=0 volumes
discarded) and the forward matrix M (SH basis at the gradient directions times the
response's rotational harmonics), the FOD coefficients F minimise

    ||M F − s||² + ν ||F||² + Σ_n [min(h_nᵀF, 0)]²,

where h_n are SH basis rows at MRtrix3's 300 constraint directions scaled by λ·50·r₀/300 (r₀: the
response's l=0 zonal coefficient) and ν = 0.0002·(MᵀM)₀₀. The minimiser is unique; like
MRtrix3 it is found by re-solving the normal equations with the current negative set until
that set repeats, starting from an lmax-4 unconstrained fit. As in ``dwi2fod``, negative
samples count as 0.

Speed: everything shared is precomputed once. A compiled kernel (numba, parallel over blocks
of 16 voxels) takes each block's signals, computes Mᵀs, the start and its negative set by
matrix products, and runs the first iterations — where tens of directions change sign — in
lockstep: each normal matrix is assembled from the SH moments (degree 2·lmax) of its negative
set, since Σ h_n h_nᵀ over a set equals Gaunt coefficients (5% non-zero, stored sparse) times
those moments; then a Cholesky solve per voxel and one matrix product for the amplitudes of
the whole block. Each voxel then finishes alone, updating its Cholesky factor by rank-one
updates/downdates when a few directions change sign. The fixed point is the same as the
plain iteration's (tested against a float64 re-implementation).

References
----------
Tournier J-D., Calamante F., Connelly A. Robust determination of the fibre orientation
distribution in diffusion MRI: non-negativity constrained super-resolved spherical
deconvolution. NeuroImage 35 (2007) 1459-1472.
Tournier J-D. et al. MRtrix3. NeuroImage 202 (2019) 116137.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import DEFAULT_SHELL_TOLERANCE, GradientTable, Shell, checked_gradient_table
from dwiflow.core.response import ResponseFunction, tensor_response_zonal
from dwiflow.core.sh import (
    check_lmax,
    expand_per_degree,
    max_lmax_for_directions,
    n_coefficients,
    real_sh_basis,
    sh_degree_order,
    zonal_to_rotational_harmonics,
)
from dwiflow.core.sphere import Sphere, sphere_vertices
from dwiflow.core.status import FitStatus
from dwiflow.core.voxels import VoxelBatch, iter_chunks, scatter

NORM_LAMBDA_MULTIPLIER = 2e-4
SUPER_RESOLUTION_FACTOR = 3
INIT_NEGATIVE_FRACTION = 0.1  # at most this many SH coefficients per measured direction

STATUS_CODES = (FitStatus.OK, FitStatus.NONFINITE_INPUT, FitStatus.NOT_CONVERGED, FitStatus.SINGULAR)


@lru_cache(maxsize=1)
def mrtrix3_constraint_directions() -> np.ndarray:
    """MRtrix3's built-in 300 constraint directions (unit vectors), the default of ``dwi2fod csd`` and ``msmt_csd``
    (data from MRtrix3 3.0.3; see :mod:`dwiflow.core._mrtrix3_directions`)."""
    from dwiflow.core._mrtrix3_directions import ELECTROSTATIC_REPULSION_300
    from dwiflow.core.sh import sphere_to_cart

    az_el = np.array(ELECTROSTATIC_REPULSION_300)
    return sphere_to_cart(az_el[:, 1], az_el[:, 0])


def check_constraint_directions(directions: np.ndarray | None) -> np.ndarray:
    """Constraint directions: MRtrix3's 300 by default, or (n, 3) vectors (normalised), or (n, 2) azimuth/elevation."""
    if directions is None:
        return mrtrix3_constraint_directions()
    from dwiflow.core.sh import sphere_to_cart

    values = np.asarray(directions, dtype=float)
    if values.ndim == 2 and values.shape[1] == 2:
        values = sphere_to_cart(values[:, 1], values[:, 0])
    if values.ndim != 2 or values.shape[1] != 3 or values.shape[0] < 6:
        raise DwiflowInputError(f"constraint directions must be (n >= 6, 3) vectors or (n, 2) azimuth/elevation pairs, "
                                f"got shape {values.shape}", parameters=("directions",))
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    if not np.all(np.isfinite(values)) or np.any(norms < 1e-6):
        raise DwiflowInputError("constraint directions must be finite and non-zero", parameters=("directions",))
    return values / norms


@lru_cache(maxsize=8)
def _gaunt_lower(lmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Y_a·Y_b = Σ_c G[ab, c] Y_c for the lower triangle (a >= b) of degree-lmax products.

    Computed by exact quadrature (Gauss-Legendre in cos θ × uniform azimuth).
    Returns G (n_pairs, n_coefficients(2·lmax)) and the (a, b) index pairs.
    """
    # the integrand Y_a Y_b Y_c has polar degree and azimuthal frequency up to 4·lmax
    nodes, weights = np.polynomial.legendre.leggauss(2 * lmax + 2)
    n_az = 4 * lmax + 2
    az = np.linspace(0, 2 * np.pi, n_az, endpoint=False)
    polar = np.repeat(np.arccos(nodes), n_az)
    azimuth = np.tile(az, nodes.size)
    w = np.repeat(weights, n_az) * (2 * np.pi / n_az)
    low = real_sh_basis(lmax, polar=polar, azimuth=azimuth)
    high = real_sh_basis(2 * lmax, polar=polar, azimuth=azimuth)
    ia, ib = np.tril_indices(low.shape[1])
    products = low[:, ia] * low[:, ib]  # (q, n_pairs)
    gaunt = products.T @ (high * w[:, None])  # (n_pairs, n_high)
    return gaunt, np.stack([ia, ib])


@dataclass
class CsdFit:
    """Result of :meth:`CsdModel.fit`, shaped like the input volume.

    Attributes
    ----------
    sh : ndarray (..., n_coefficients)
        FOD coefficients (MRtrix3 basis, world frame); 0 outside the mask, NaN where the fit failed.
    status : ndarray (...) of uint8
        :class:`~dwiflow.core.status.FitStatus` codes (see :data:`STATUS_CODES`).
    iterations : ndarray (...) of int32
        Solves of the constrained system per voxel.
    mask : ndarray (...) of bool
        The voxels that were fitted.
    """

    sh: np.ndarray
    status: np.ndarray
    iterations: np.ndarray
    mask: np.ndarray
    lmax: int
    model: "CsdModel | None" = None

    @property
    def shm_coeff(self) -> np.ndarray:
        """The FOD's SH coefficients (DIPY's name for :attr:`sh`)."""
        return self.sh

    def odf(self, sphere: str | Sphere | np.ndarray) -> np.ndarray:
        """FOD amplitudes (..., m) on the vertices of ``sphere`` (a name such as ``repulsion724``, a
        :class:`Sphere` or (m, 3) unit vectors in the world frame)."""
        return self.sh @ real_sh_basis(self.lmax, sphere_vertices(sphere)).T

    def predict(self) -> np.ndarray:
        """The signal (..., n_volumes) the FOD predicts: the response convolved with the FOD on the
        deconvolved shell's volumes; NaN on the other volumes (single-shell CSD models one shell)."""
        if self.model is None:
            raise DwiflowInputError("this fit holds no model to predict with")
        out = np.full(self.sh.shape[:-1] + (self.model.gtab.n_volumes,), np.nan)
        out[..., self.model.shell.indices] = self.sh @ self.model._forward.T
        return out


class CsdModel:
    """Single-shell constrained spherical deconvolution with MRtrix3's defaults.

    Parameters
    ----------
    gtab : GradientTable
    response : ResponseFunction or (evals, S0)
        Zonal SH per shell; the row whose b-value matches the deconvolved shell is used
        (a single row without b-values is used as it is). DIPY's ``(evals, S0)`` of a single tensor (eigenvalues
        largest first, mm²/s) is that tensor's signal on the deconvolved shell.
    lmax : int
        FOD degree (default 8, or lower when the response's lmax or the number of directions
        is lower: at most 3 coefficients per measured direction).
    shell : float, optional
        b-value of the shell to deconvolve (default: the largest).
    neg_lambda, norm_lambda, threshold : float
        MRtrix3's ``-neg_lambda`` (1), ``-norm_lambda`` (1) and ``-threshold`` (0).
    niter : int
        Maximum iterations (50). 0 gives the linear unconstrained deconvolution.
    directions : ndarray (n, 3) or (n, 2), optional
        Constraint directions (unit vectors, or azimuth/elevation in radians as MRtrix3's ``-directions``);
        default MRtrix3's built-in 300 (:func:`mrtrix3_constraint_directions`), so that results equal
        ``dwi2fod csd``'s.
    chunk_size : int
        Voxels assembled together (memory ~ chunk_size × 10 kB).
    flavour : {"mrtrix3", "dipy"}
        ``dipy`` reproduces DIPY's ``ConstrainedSphericalDeconvModel`` instead: constraints on 181
        hemisphere directions scaled by λ·n_SH·R₀/√(181·362), a per-voxel threshold τ·(mean FOD
        amplitude of the unconstrained fit), no norm term, all b>0 volumes, and the lmax-4 part
        of the unconstrained fit as the start. Used by the recursive (Tax) response.
    tau : float
        DIPY's relative threshold (``flavour="dipy"`` only).
    sh_order_max : int, optional
        DIPY's name for ``lmax``.
    """

    def __init__(
        self,
        gtab: GradientTable,
        response: ResponseFunction | tuple,
        lmax: int | None = None,
        shell: float | None = None,
        neg_lambda: float = 1.0,
        norm_lambda: float = 1.0,
        threshold: float = 0.0,
        niter: int = 50,
        directions: np.ndarray | None = None,
        chunk_size: int = 20_000,
        flavour: str = "mrtrix3",
        tau: float = 0.1,
        sh_order_max: int | None = None,
    ) -> None:
        gtab = checked_gradient_table(gtab, "CsdModel")
        if sh_order_max is not None:  # DIPY's name for the FOD's degree
            if lmax is not None and int(lmax) != int(sh_order_max):
                raise DwiflowInputError(f"lmax={lmax} and sh_order_max={sh_order_max} name the same degree: give one",
                                        parameters=("lmax", "sh_order_max"))
            lmax = int(sh_order_max)
        if flavour not in ("mrtrix3", "dipy"):
            raise DwiflowInputError(f"flavour must be 'mrtrix3' or 'dipy', got {flavour!r}")
        self.flavour, self.tau = flavour, float(tau)
        if not gtab.dw_shells:
            raise DwiflowInputError("CSD needs a diffusion-weighted shell; the gradient table has only b=0")
        self.shell: Shell = gtab.find_shell(shell) if shell is not None else gtab.dw_shells[-1]
        if self.shell.is_b0:
            raise DwiflowInputError("cannot deconvolve the b=0 shell")
        self.gtab = gtab
        if isinstance(response, (tuple, list)) and len(response) == 2:  # DIPY's (evals, S0) of a single tensor
            response = self._tensor_response(response, self.shell.bvalue, lmax)
        zonal = self._response_row(response, self.shell.bvalue)
        lmax_response = 2 * (np.flatnonzero(np.abs(zonal) > 0).max(initial=0))
        if lmax_response < 2:
            raise DwiflowInputError("the response function has no anisotropic terms (lmax 0): use a non-isotropic response")
        n_dirs = self.shell.count
        lmax_data = max_lmax_for_directions(n_dirs)
        if lmax_data < 2:
            raise DwiflowInputError(f"shell b={self.shell.bvalue:.0f} has {n_dirs} directions: too few even for lmax 2 (6 needed)")
        default_lmax = min(lmax_response, 8, self._max_supported_lmax(n_dirs))
        self.lmax = check_lmax(lmax if lmax is not None else default_lmax, "lmax")
        if self.lmax < 2:
            raise DwiflowInputError("lmax must be a positive even integer", parameters=("lmax",))
        if n_coefficients(self.lmax) > SUPER_RESOLUTION_FACTOR * n_dirs:
            raise DwiflowInputError(
                f"lmax {self.lmax} ({n_coefficients(self.lmax)} coefficients) is more than the {n_dirs} directions of "
                f"shell b={self.shell.bvalue:.0f} support (at most {SUPER_RESOLUTION_FACTOR} coefficients per direction); "
                f"use lmax {self._max_supported_lmax(n_dirs)} or lower", parameters=("lmax",)
            )
        for name, value in (("neg_lambda", neg_lambda), ("norm_lambda", norm_lambda)):
            if not value >= 0:
                raise DwiflowInputError(f"{name} must be >= 0, got {value}", parameters=(name,))
        if int(niter) != niter or niter < 0:
            raise DwiflowInputError(f"niter must be a non-negative integer, got {niter}", parameters=("niter",))
        self.niter, self.chunk_size = int(niter), int(chunk_size)
        if flavour == "dipy":  # every b>0 volume, as DIPY's model
            self.shell = Shell(self.shell.bvalue, np.flatnonzero(~gtab.b0s_mask), False)
        dirs = gtab.bvecs[self.shell.indices]
        rh = expand_per_degree(zonal_to_rotational_harmonics(zonal), self.lmax)
        self.zonal = zonal
        # initialisation: lmax <= 4 unconstrained fit with a 1e-2 ridge on the diagonal (as MRtrix3)
        lmax_init = min(lmax_response, lmax_data, self.lmax, 4)
        b_init = real_sh_basis(lmax_init, dirs).copy()
        k = min(b_init.shape)
        b_init[np.arange(k), np.arange(k)] += 1e-2
        rh_init = expand_per_degree(zonal_to_rotational_harmonics(zonal), lmax_init)
        self._init = np.linalg.pinv(b_init) / rh_init[:, None]  # (n_init, n_dirs)
        self._forward = np.ascontiguousarray(real_sh_basis(self.lmax, dirs) * rh)  # M, (n_dirs, n_sh)
        if flavour == "dipy":
            from dwiflow.core.sphere import geodesic_sphere

            self.constraint_dirs = geodesic_sphere(6).hemisphere  # 181 directions, as DIPY's small_sphere
            multiplier = neg_lambda * rh.size * rh[0] / np.sqrt(181.0 * 362.0)  # DIPY's λ scaling
            norm_lambda = 0.0
        else:
            self.constraint_dirs = check_constraint_directions(directions)
            multiplier = neg_lambda * 50.0 * zonal[0] / self.constraint_dirs.shape[0]
        self._constraints = np.ascontiguousarray(real_sh_basis(self.lmax, self.constraint_dirs) * multiplier)  # H
        self.threshold = threshold * multiplier
        normal = self._forward.T @ self._forward
        normal += np.eye(normal.shape[0]) * (norm_lambda * NORM_LAMBDA_MULTIPLIER * normal[0, 0])
        if flavour == "dipy" and np.linalg.matrix_rank(normal) < normal.shape[0]:
            normal += 1e-5 * np.eye(normal.shape[0])
        self._normal = normal
        gaunt, _ = _gaunt_lower(self.lmax)
        # Σ_{n∈S} h_n h_nᵀ (lower triangle) = (mask @ Y2L(constraint dirs)) @ gaunt · multiplier²
        self._mask_moments = np.ascontiguousarray(real_sh_basis(2 * self.lmax, self.constraint_dirs))  # (n_c, n_high)
        # the Gaunt matrix is ~5% non-zero: keep it as CSR rows over the packed lower triangle
        scaled = gaunt * multiplier**2  # (n_pairs, n_high)
        nonzero = np.abs(scaled) > 1e-14 * np.abs(scaled).max()
        self._gaunt_indptr = np.r_[0, np.cumsum(nonzero.sum(axis=1))].astype(np.int64)
        rows, cols = np.nonzero(nonzero)
        self._gaunt_indices = cols.astype(np.int64)
        self._gaunt_data = np.ascontiguousarray(scaled[rows, cols])
        # the kernel's start: signal -> low-order coefficients -> amplitudes, and the per-voxel
        # threshold const + row·signal
        nsh = self._forward.shape[1]
        if flavour == "dipy":
            # DIPY: threshold τ·mean amplitude of the unconstrained fit; start from its lmax-4 part
            unconstrained = np.linalg.solve(self._normal, self._forward.T)  # (n_sh, n_dirs)
            start_t = unconstrained[: min(15, nsh)].T
            self._threshold_row = self._constraints[0, 0] * self.tau * unconstrained[0]
            self._threshold_const = 0.0
            self._start_fraction = -1.0
        else:
            # Starting negative set: amplitudes of the low-order fit below a tenth of their
            # maximum. The fixed point (the unique minimiser) does not depend on this guess;
            # this one starts closer to it than MRtrix3's (< threshold) and saves iterations.
            start_t = self._init.T
            self._threshold_row = np.zeros(self._forward.shape[0])
            self._threshold_const = float(self.threshold)
            self._start_fraction = INIT_NEGATIVE_FRACTION
        self._psf: np.ndarray | None = None
        self._start_t = np.ascontiguousarray(start_t)
        self._start_constraints_t = np.ascontiguousarray(self._constraints[:, : start_t.shape[1]].T)

    def point_spread_function(self) -> np.ndarray:
        """Zonal SH coefficients (lmax/2+1,) of the FOD this model returns for one noiseless fibre along z.

        The response's own signal, deconvolved: the band-limited, regularised image of a single
        fibre (its lobe width and ring). CSD is positively homogeneous, so a single-fibre voxel's
        FOD is this function scaled and rotated; :func:`dwiflow.core.peaks.find_peaks` subtracts it
        at each peak found to look for the next fibre (as CLEAN does with a beam; Högbom 1974).
        """
        if self._psf is None:
            degrees, orders = sh_degree_order(self.lmax)
            delta = real_sh_basis(self.lmax, np.array([[0.0, 0.0, 1.0]]))[0]
            row = np.zeros(self.gtab.n_volumes)
            row[self.shell.indices] = self._forward @ delta
            fit = self.fit(row[None, None, None, :])
            if fit.status.ravel()[0] != FitStatus.OK:
                raise DwiflowInputError("the response's own signal could not be deconvolved (point-spread function)")
            self._psf = fit.sh.reshape(-1)[orders == 0].copy()
        return self._psf

    @staticmethod
    def _max_supported_lmax(n_dirs: int) -> int:
        return supported_lmax(n_dirs)

    @staticmethod
    def _tensor_response(response: tuple, bvalue: float, lmax: int | None) -> ResponseFunction:
        """DIPY's ``response=(evals, S0)``: the axially symmetric tensor's signal on the deconvolved shell as zonal
        SH (:func:`~dwiflow.core.response.tensor_response_zonal`), to the FOD's degree (8 unless ``lmax``)."""
        evals, s0 = response
        evals = np.asarray(evals, dtype=float).ravel()
        if evals.size != 3 or not np.all(np.isfinite(evals)) or evals[0] <= 0 or not np.isfinite(float(s0)):
            raise DwiflowInputError(f"response: a (evals, S0) pair needs 3 finite eigenvalues, the first positive, "
                                    f"and a finite S0 (DIPY's form), got {response!r:.80}", parameters=("response",))
        degree = max(8, int(lmax or 0))
        return tensor_response_zonal(evals, float(s0), np.array([bvalue]), [degree + degree % 2])

    @staticmethod
    def _response_row(response: ResponseFunction, bvalue: float) -> np.ndarray:
        if response.coefficients.shape[0] == 1 and not np.isfinite(response.bvalues[0]):
            return response.coefficients[0]
        match = np.flatnonzero(np.abs(response.bvalues - bvalue) <= DEFAULT_SHELL_TOLERANCE)
        if match.size == 0:
            have = ", ".join(f"{b:.0f}" for b in response.bvalues)
            raise DwiflowInputError(f"the response has shells b={have} but the data's shell is b={bvalue:.0f}")
        return response.coefficients[match[0]]

    def fit(self, data: np.ndarray, mask: np.ndarray | None = None, n_threads: int | None = None) -> CsdFit:
        """Deconvolve every voxel of ``data`` (…, n_volumes) inside ``mask``."""
        from dwiflow.core._csd_kernel import solve_csd  # compiled lazily (numba)

        batch = VoxelBatch.from_volume(data, mask, self.gtab.n_volumes, memory_order=True)
        nvox, nsh = batch.n_voxels, self._forward.shape[1]
        sh = np.empty((nvox, nsh))
        status = np.zeros(nvox, dtype=np.uint8)
        iterations = np.zeros(nvox, dtype=np.int32)
        lower = np.tril_indices(nsh)
        normal_lower = self._normal[lower]
        columns = np.asarray(self.shell.indices, dtype=np.int64)
        for sl in iter_chunks(nvox, self.chunk_size):
            if self.niter == 0:
                signal = batch.signal(sl)[:, columns]
                if self.flavour == "mrtrix3":
                    np.maximum(signal, 0.0, out=signal)
                finite = np.all(np.isfinite(signal), axis=1)
                sh[sl] = np.linalg.solve(self._normal, (np.where(finite[:, None], signal, 0.0) @ self._forward).T).T
                sh[sl][~finite] = np.nan
                status[sl] = np.where(finite, FitStatus.OK, FitStatus.NONFINITE_INPUT)
                continue
            # (volumes, voxels), gathered and converted without a transposition
            signal = batch.signal_by_volume(sl).astype(np.float64, copy=False)
            finite = np.ones(signal.shape[1], dtype=bool)
            for row in columns:
                finite &= np.isfinite(signal[row])
            if self.flavour == "mrtrix3":  # as dwi2fod: negative samples count as 0 (NaN stays NaN: status)
                np.maximum(signal, 0, out=signal)
            out, st, it = solve_csd(
                signal, finite, columns, self._forward, self._start_t,
                self._start_constraints_t, self._threshold_row, self._threshold_const, self._start_fraction,
                self._constraints, self._mask_moments, self._gaunt_indptr, self._gaunt_indices, self._gaunt_data,
                normal_lower, self.niter,
            )
            out[st != FitStatus.OK] = np.nan
            sh[sl], status[sl], iterations[sl] = out, st, it
        return CsdFit(
            sh=scatter(sh, batch, fill=0.0), status=scatter(status, batch), iterations=scatter(iterations, batch),
            mask=batch.mask, lmax=self.lmax, model=self,
        )


def supported_lmax(n_directions: int, factor: float = SUPER_RESOLUTION_FACTOR) -> int:
    """The largest even lmax (at least 2) whose SH coefficient count is at most ``factor`` × the directions: with
    the default factor what CSD's super-resolution reaches (Tournier et al. 2007), with factor 1 what the
    directions determine without the non-negativity constraint."""
    lmax = 2
    while n_coefficients(lmax + 2) <= factor * n_directions:
        lmax += 2
    return lmax

