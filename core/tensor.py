"""Diffusion tensor estimation, vectorised across voxels, and its scalar maps.

The weighted linear least-squares (WLS) fit follows Chung et al. (2006) as DIPY's
``TensorModel(fit_method="WLS")`` does: an ordinary least-squares fit of the
log-signal gives predicted signals, whose squares weight a second fit. Both passes
solve the normal equations of all voxels of a chunk at once (batched 7x7 systems).

References
----------
Basser P.J., Mattiello J., LeBihan D. MR diffusion tensor spectroscopy and imaging.
Biophys J 66 (1994) 259-267.
Chung S., Lu Y., Henry R.G. Comparison of bootstrap approaches for estimation of
uncertainties of DTI parameters. NeuroImage 33 (2006) 531-541.
Basser P.J., Pierpaoli C. Microstructural and physiological features of tissues
elucidated by quantitative-diffusion-tensor MRI. J Magn Reson B 111 (1996) 209-219 (FA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import GradientTable
from dwiflow.core.status import FitStatus, signal_above_b0
from dwiflow.core.voxels import VoxelBatch, iter_chunks, scatter

MIN_POSITIVE_SIGNAL = 1e-4

STATUS_CODES = (FitStatus.OK, FitStatus.NONFINITE_INPUT, FitStatus.NO_SIGNAL, FitStatus.SINGULAR,
                FitStatus.SIGNAL_ABOVE_B0)


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
    """AD: the largest eigenvalue (mm²/s)."""
    return np.asarray(evals)[..., 0]


def radial_diffusivity(evals: np.ndarray) -> np.ndarray:
    """RD: mean of the two smaller eigenvalues (mm²/s)."""
    return np.mean(np.asarray(evals)[..., 1:], axis=-1)


@dataclass
class TensorFit:
    """Result of :meth:`TensorModel.fit`, shaped like the input volume.

    Attributes
    ----------
    evals : ndarray (..., 3)
        Eigenvalues, descending, clipped below at ``min_diffusivity`` (mm²/s).
    evecs : ndarray (..., 3, 3)
        Eigenvectors as columns (``evecs[..., :, 0]`` is the principal one), world frame.
    s0 : ndarray (...)
        Fitted non-diffusion-weighted signal.
    status : ndarray (...) of uint8
        :class:`~dwiflow.core.status.FitStatus` codes (:data:`STATUS_CODES`); failed voxels hold NaN.
    mask : ndarray (...) of bool
        The voxels that were fitted.
    """

    evals: np.ndarray
    evecs: np.ndarray
    s0: np.ndarray
    status: np.ndarray
    mask: np.ndarray
    lower_triangular: np.ndarray

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

    @property
    def quadratic_form(self) -> np.ndarray:
        return lower_triangular_to_matrix(self.lower_triangular)

    def predict(self, gtab: GradientTable) -> np.ndarray:
        """Signal predicted by the tensors for the given gradient table."""
        x = tensor_design_matrix(gtab)
        lt = np.concatenate([self.lower_triangular, np.log(self.s0)[..., None]], axis=-1)
        return np.exp(lt @ x.T)


def _solve_stacked(normal: np.ndarray, rhs: np.ndarray, status: np.ndarray) -> np.ndarray:
    """Solve stacked systems; a singular one gets NaN and FitStatus.SINGULAR (others unaffected)."""
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


class TensorModel:
    """Diffusion tensor model (Basser et al. 1994) with OLS or WLS fitting.

    Parameters
    ----------
    gtab : GradientTable
        Needs at least 7 volumes and 6 non-collinear directions.
    fit_method : {"WLS", "OLS"}
        ``WLS`` weights the second pass by the OLS-predicted signal squared (Chung 2006).
    min_signal : float
        Signals below this are raised to it before taking logs (DIPY's default 1e-4).
    chunk_size : int
        Voxels solved together; bounds memory.
    wls_iterations : int
        Weighted passes after the OLS start (1, as DIPY; MRtrix3's ``dwi2tensor`` makes 2: ``-iter 2``), each
        weighted by the signal the previous pass predicts, squared.
    """

    def __init__(
        self,
        gtab: GradientTable,
        fit_method: Literal["WLS", "OLS"] = "WLS",
        min_signal: float = MIN_POSITIVE_SIGNAL,
        chunk_size: int = 50_000,
        wls_iterations: int = 1,
    ) -> None:
        if fit_method not in ("WLS", "OLS"):
            raise DwiflowInputError(f"fit_method must be 'WLS' or 'OLS', got {fit_method!r}")
        if not min_signal > 0:
            raise DwiflowInputError(f"min_signal must be > 0, got {min_signal!r}")
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
        n = x.shape[0]
        self._outer = np.einsum("ni,nj->nij", self._x, self._x).reshape(n, 49)
        # DIPY clips eigenvalues at tol / max(design entries) with tol = 1e-6.
        self.min_diffusivity = 1e-6 / max(float((-x[:, :6]).max()), 1.0)

    def _fit_batch(self, signal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fit (v, n) signals; returns (v, 7) parameters in original units and status."""
        status = np.zeros(signal.shape[0], dtype=np.uint8)
        finite = np.all(np.isfinite(signal), axis=1)
        status[~finite] = FitStatus.NONFINITE_INPUT
        positive = np.any(signal > 0, axis=1)
        status[finite & ~positive] = FitStatus.NO_SIGNAL
        status[finite & positive & signal_above_b0(signal, self.gtab.b0s_mask)] = FitStatus.SIGNAL_ABOVE_B0
        sig = np.where(finite[:, None], signal, 1.0)
        log_s = np.log(np.maximum(sig, self.min_signal))
        beta = log_s @ self._ols_pinv.T
        if self.fit_method == "WLS":
            for _ in range(self.wls_iterations):
                w2 = np.exp(2.0 * (beta @ self._x.T))
                normal = (w2 @ self._outer).reshape(-1, 7, 7)
                rhs = (w2 * log_s) @ self._x
                beta = _solve_stacked(normal, rhs, status)
        beta = beta / self._scale
        bad = (status != FitStatus.OK) | ~np.all(np.isfinite(beta), axis=1)
        status[bad & (status == FitStatus.OK)] = FitStatus.SINGULAR
        beta[bad] = np.nan
        return beta, status

    def fit(self, data: np.ndarray, mask: np.ndarray | None = None) -> TensorFit:
        """Fit every voxel of ``data`` (…, n_volumes) inside ``mask``.

        Voxels outside the mask hold 0 (status 0); voxels that fail hold NaN and a
        non-zero status.
        """
        batch = VoxelBatch.from_volume(data, mask, self.gtab.n_volumes)
        nvox = batch.n_voxels
        params = np.empty((nvox, 7))
        status = np.empty(nvox, dtype=np.uint8)
        for sl in iter_chunks(nvox, self.chunk_size):
            params[sl], status[sl] = self._fit_batch(batch.signal(sl))
        tensors = lower_triangular_to_matrix(params[:, :6])
        ok = status == FitStatus.OK
        evals = np.full((nvox, 3), np.nan)
        evecs = np.full((nvox, 3, 3), np.nan)
        if np.any(ok):
            w, v = np.linalg.eigh(tensors[ok])
            evals[ok] = np.clip(w[:, ::-1], self.min_diffusivity, None)
            evecs[ok] = v[:, :, ::-1]
        s0 = np.exp(params[:, 6])
        return TensorFit(
            evals=scatter(evals, batch),
            evecs=scatter(evecs, batch),
            s0=scatter(s0, batch),
            status=scatter(status, batch),
            mask=batch.mask,
            lower_triangular=scatter(params[:, :6], batch),
        )
