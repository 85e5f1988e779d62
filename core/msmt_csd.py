"""Multi-shell multi-tissue constrained spherical deconvolution (Jeurissen et al. 2014), batched across voxels.

The estimate is MRtrix3's ``dwi2fod msmt_csd``. Every volume of every shell (b=0 included) is modelled as the sum
over tissues of the tissue's ODF convolved with its response on that shell: s = C x, where x concatenates the SH
coefficients of every tissue (a tissue whose response is isotropic has one coefficient, l=0). The coefficients
minimise ||C x − s||² + ε·max(diag CᵀC)·||x||² (ε = 1e-10) subject to every anisotropic tissue's ODF being
non-negative on the constraint directions (MRtrix3's 300 by default) and every isotropic tissue's l=0 term being
non-negative. As in MRtrix3's ICLS solver, the problem is whitened by the Cholesky factor L of the regularised
CᵀC (y = Lᵀx), so that each voxel's solution is the Euclidean projection of its unconstrained solution y_u onto
the cone {y : B y ≥ 0} (B: the constraint rows mapped through L⁻ᵀ and normalised); the constraint multipliers get
MRtrix3's 1e-10 ridge. The projection is unique, so any exact solver reaches MRtrix3's answer; this one solves
the dual by Lawson–Hanson (see :mod:`dwiflow.core._msmt_kernel`).

Responses follow MRtrix3's rules: one row per shell of the data (b=0 included), in order of increasing b-value;
columns that are zero on every shell are dropped and fix the tissue's lmax (default min(8, that));
a requested lmax pads the response with zeros or truncates it.

References
----------
Jeurissen B., Tournier J-D., Dhollander T., Connelly A., Sijbers J. Multi-tissue constrained spherical
deconvolution for improved analysis of multi-shell diffusion MRI data. NeuroImage 103 (2014) 411-426.
Tournier J-D. et al. MRtrix3. NeuroImage 202 (2019) 116137.
Lawson C.L., Hanson R.J. Solving Least Squares Problems. Prentice-Hall (1974), ch. 23.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dwiflow.core.csd import check_constraint_directions
from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import GradientTable, checked_gradient_table
from dwiflow.core.response import ResponseFunction
from dwiflow.core.sh import check_lmax, expand_per_degree, n_coefficients, real_sh_basis, zonal_to_rotational_harmonics
from dwiflow.core.sphere import Sphere, sphere_vertices
from dwiflow.core.status import FitStatus
from dwiflow.core.voxels import VoxelBatch, VoxelFit, iter_chunks

if TYPE_CHECKING:
    import numpy.typing as npt

DEFAULT_LMAX = 8
DEFAULT_NORM_LAMBDA = 1e-10
DEFAULT_NEG_LAMBDA = 1e-10
# a constraint counts as violated below -tolerance·|y_u| (MRtrix3 uses 0; this only stops rounding-level cycling)
TOLERANCE = 1e-12
# constraints violated by more than this (·|y_u|) are chosen on single-precision values first (see the kernel)
COARSE_TOLERANCE = 3e-7

STATUS_CODES = (FitStatus.OK, FitStatus.NONFINITE_INPUT, FitStatus.NOT_CONVERGED, FitStatus.SINGULAR)


def response_lmax(response: ResponseFunction) -> int:
    """The lmax a response supports: 2·(index of its last column that is non-zero on some shell)."""
    nonzero = np.flatnonzero(np.any(response.coefficients != 0, axis=0))
    return 2 * int(nonzero[-1]) if nonzero.size else 0


@dataclass
class MsmtCsdFit(VoxelFit):
    """Result of :meth:`MsmtCsdModel.fit`.

    Attributes
    ----------
    batch : VoxelBatch
    coefficient_rows : ndarray (n_voxels, n_parameters)
        Every tissue's SH coefficients, concatenated (NaN where the fit failed).
    status_rows, iteration_rows : ndarray (n_voxels,)
        :class:`~dwiflow.core.status.FitStatus` codes and active-set iterations.
    model : MsmtCsdModel
    active_rows : ndarray (n_voxels, n_constraints) of bool, optional
        The constraints active at each voxel's solution (``fit(..., keep_active=True)``), a warm start for another
        fit of the same voxels.
    """

    batch: VoxelBatch
    coefficient_rows: np.ndarray
    status_rows: np.ndarray
    iteration_rows: np.ndarray
    model: "MsmtCsdModel"
    active_rows: np.ndarray | None = None

    def tissue(self, index: int, dtype: npt.DTypeLike = np.float64) -> np.ndarray:
        """Tissue ``index``'s ODF coefficients (..., n_coefficients(lmax)); 0 outside the mask (as MRtrix3). ``dtype``:
        e.g. float32 for a file, placed straight from the rows (no float64 image first)."""
        start, stop = self.model.parameter_slices[index]
        return self.volume(self.coefficient_rows[:, start:stop], fill=0.0, dtype=dtype)

    @property
    def tissues(self) -> list[np.ndarray]:
        return [self.tissue(i) for i in range(self.model.n_tissues)]

    @property
    def iterations(self) -> np.ndarray:
        return self.volume(self.iteration_rows, fill=np.int32(0))

    @property
    def shm_coeff(self) -> np.ndarray:
        """The first tissue's (the WM's) FOD coefficients, MRtrix3 basis (DIPY's name; DIPY's
        ``MultiShellDeconvModel`` fit gives the WM FOD here too)."""
        return self.tissue(0)

    def odf(self, sphere: str | Sphere | np.ndarray, tissue: int = 0) -> np.ndarray:
        """Tissue ``tissue``'s ODF amplitudes (..., m) on the vertices of ``sphere`` (a name such as
        ``repulsion724``, a Sphere, DIPY's included, or (m, 3) unit vectors in the world frame)."""
        return self.tissue(tissue) @ real_sh_basis(self.model.lmax[tissue], sphere_vertices(sphere)).T

    def predict(self) -> np.ndarray:
        """The signal every tissue's ODF predicts together (..., n_volumes)."""
        return self.volume(self.coefficient_rows @ self.model.forward.T, fill=0.0)


class MsmtCsdModel:
    """Multi-shell multi-tissue CSD with MRtrix3's ``dwi2fod msmt_csd`` formulation and defaults.

    Parameters
    ----------
    gtab : GradientTable
    responses : list of ResponseFunction
        One per tissue (e.g. WM, GM, CSF from ``dwi2response dhollander``); each with one row per shell of
        ``gtab`` (b=0 included). When a response names its shells (``# Shells:``) they must match the data's.
    lmax : list of int, optional
        Each tissue's ODF lmax (even); default min(8, the response's lmax).
    directions : ndarray (n, 3) or (n, 2), optional
        Constraint directions (default: MRtrix3's built-in 300).
    norm_lambda, neg_lambda : float
        MRtrix3's ``-norm_lambda`` and ``-neg_lambda`` (1e-10 each).
    max_iterations : int, optional
        Active-set iterations per voxel (default 10 × the number of parameters, as MRtrix3).
    chunk_size : int
        Voxels per call of the compiled kernel.
    """

    def __init__(
        self,
        gtab: GradientTable,
        responses: list[ResponseFunction],
        lmax: list[int] | None = None,
        directions: np.ndarray | None = None,
        norm_lambda: float = DEFAULT_NORM_LAMBDA,
        neg_lambda: float = DEFAULT_NEG_LAMBDA,
        max_iterations: int | None = None,
        chunk_size: int = 8192,
    ) -> None:
        gtab = checked_gradient_table(gtab, "MsmtCsdModel")
        if isinstance(responses, ResponseFunction) or not isinstance(responses, (list, tuple)) or not all(
                isinstance(r, ResponseFunction) for r in responses):
            raise DwiflowInputError(
                f"responses: a list of ResponseFunction, one per tissue (WM first; from dhollander() or "
                f"ResponseFunction.from_text of MRtrix3's files), got {type(responses).__name__}"
                + (" (DIPY's MultiShellResponse holds its own basis and scaling; it is not converted)"
                   if type(responses).__name__ == "MultiShellResponse" else ""), parameters=("responses",))
        if not responses:
            raise DwiflowInputError("give at least one response function", parameters=("responses",))
        if norm_lambda < 0 or neg_lambda < 0:
            raise DwiflowInputError("norm_lambda and neg_lambda must be >= 0", parameters=("norm_lambda", "neg_lambda"))
        self.gtab = gtab
        self.shells = list(gtab.shells)
        self.n_tissues = len(responses)
        if self.n_tissues > len(self.shells):
            raise DwiflowInputError(
                f"{self.n_tissues} tissues but the data have only {len(self.shells)} distinct b-values "
                f"({', '.join(f'{s.bvalue:.0f}' for s in self.shells)}): at most one tissue per b-value can be "
                "separated", parameters=("responses",))
        for t, response in enumerate(responses):
            self._check_response_shells(t, response)
        if lmax is None:
            lmax = [min(DEFAULT_LMAX, response_lmax(r)) for r in responses]
        else:
            lmax = list(lmax)
            if len(lmax) != self.n_tissues:
                raise DwiflowInputError(f"{len(lmax)} lmax values given for {self.n_tissues} tissues",
                                        parameters=("lmax",))
            lmax = [check_lmax(int(l), "lmax") for l in lmax]
        self.lmax = lmax
        self.responses = responses
        self.norm_lambda, self.neg_lambda = float(norm_lambda), float(neg_lambda)
        self.constraint_dirs = check_constraint_directions(directions)
        self.chunk_size = int(chunk_size)
        sizes = [n_coefficients(l) for l in lmax]
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        self.parameter_slices = [(int(bounds[i]), int(bounds[i + 1])) for i in range(self.n_tissues)]
        n_params = int(bounds[-1])
        self.max_iterations = int(max_iterations) if max_iterations else 10 * n_params

        # forward matrix: every volume of every shell, every tissue
        max_l = max(lmax)
        basis = real_sh_basis(max_l, gtab.bvecs) if max_l > 0 else np.full((gtab.n_volumes, 1), 0.5 / np.sqrt(np.pi))
        forward = np.zeros((gtab.n_volumes, n_params))
        for t, response in enumerate(responses):
            start, stop = self.parameter_slices[t]
            width = lmax[t] // 2 + 1
            rows = np.zeros((len(self.shells), width))
            have = min(width, response.coefficients.shape[1])
            rows[:, :have] = response.coefficients[:, :have]
            for k, shell in enumerate(self.shells):
                factors = expand_per_degree(zonal_to_rotational_harmonics(rows[k]), lmax[t])
                block = basis[shell.indices, : stop - start] * factors
                if shell.is_b0:  # no direction: only the l=0 term (MRtrix3 zeroes the undefined ones)
                    block[:, 1:] = 0.0
                forward[np.ix_(shell.indices, np.arange(start, stop))] = block
        self.forward = forward

        # whitening by the Cholesky factor of the regularised normal matrix (MRtrix3's ICLS::Problem)
        normal = forward.T @ forward
        normal[np.diag_indices_from(normal)] += self.norm_lambda * normal.diagonal().max()
        try:
            chol = np.linalg.cholesky(normal)
        except np.linalg.LinAlgError:
            raise DwiflowInputError("the responses cannot be told apart on these shells (the multi-tissue system is "
                                    "singular): use fewer tissues or lower lmax values",
                                    parameters=("responses", "lmax")) from None
        inverse = np.linalg.inv(chol)  # L⁻¹, lower triangular
        # y_u = L⁻¹ Cᵀ s  →  as rows: s · (C L⁻ᵀ)
        self._whiten_data = np.ascontiguousarray(forward @ inverse.T)
        constraint_rows = []
        hr_basis = real_sh_basis(max_l, self.constraint_dirs) if max_l > 0 else None
        for t in range(self.n_tissues):
            start, stop = self.parameter_slices[t]
            rows = np.zeros((self.constraint_dirs.shape[0] if lmax[t] > 0 else 1, n_params))
            if lmax[t] > 0:
                rows[:, start:stop] = hr_basis[:, : stop - start]
            else:
                rows[0, start] = 0.5 / np.sqrt(np.pi)
            constraint_rows.append(rows)
        constraints = np.vstack(constraint_rows) @ inverse.T  # A L⁻ᵀ
        constraints /= np.linalg.norm(constraints, axis=1, keepdims=True)
        self._constraints = np.ascontiguousarray(constraints)
        self._gram = np.ascontiguousarray(constraints @ constraints.T)
        self._gram_single = self._gram.astype(np.float32)
        self._unwhiten = np.ascontiguousarray(inverse)  # x = L⁻ᵀ y  →  as rows: y · L⁻¹

    def _check_response_shells(self, tissue: int, response: ResponseFunction) -> None:
        have = [s.bvalue for s in self.shells]
        if response.coefficients.shape[0] != len(self.shells):
            raise DwiflowInputError(
                f"response {tissue + 1} has {response.coefficients.shape[0]} rows but the data have "
                f"{len(self.shells)} shells (b={', '.join(f'{b:.0f}' for b in have)}): one row per shell, b=0 "
                "included", parameters=("responses",))
        if np.all(np.isfinite(response.bvalues)):
            mismatch = [(r, d) for r, d in zip(response.bvalues, have)
                        if abs(r - d) > max(self.gtab.shell_tolerance, self.gtab.b0_threshold)]
            if mismatch:
                raise DwiflowInputError(
                    f"response {tissue + 1} is for shells b={', '.join(f'{b:.0f}' for b in response.bvalues)} but "
                    f"the data's shells are b={', '.join(f'{b:.0f}' for b in have)}", parameters=("responses",))

    @property
    def n_parameters(self) -> int:
        return self.forward.shape[1]

    def fit(self, data: np.ndarray, mask: np.ndarray | None = None, progress=None,
            start_active: np.ndarray | None = None, keep_active: bool = False) -> MsmtCsdFit:
        """Deconvolve every voxel of ``data`` (…, n_volumes) inside ``mask`` (threads: numba's setting).

        ``start_active`` (n_voxels, n_constraints) starts each voxel's solver from the active set of an earlier fit
        of the same voxel (its ``active_rows``, kept with ``keep_active``): fewer iterations when the problems are
        alike (SS3T-CSD's alternations), and the same solution, which is unique.
        """
        from dwiflow.core._msmt_kernel import solve_msmt  # compiled lazily (numba)

        batch = VoxelBatch.from_volume(data, mask, self.gtab.n_volumes, memory_order=True)
        nvox = batch.n_voxels
        n_constraints = self._constraints.shape[0]
        coefficients = np.empty((nvox, self.n_parameters))
        status = np.zeros(nvox, dtype=np.uint8)
        iterations = np.zeros(nvox, dtype=np.int32)
        if start_active is not None and np.shape(start_active) != (nvox, n_constraints):
            raise ValueError(f"start_active has shape {np.shape(start_active)}, expected {(nvox, n_constraints)}")
        no_sets = np.zeros((0, n_constraints), dtype=np.bool_)  # no rows: the kernel starts cold, keeps nothing
        starts = np.ascontiguousarray(start_active, dtype=np.bool_) if start_active is not None else no_sets
        active = np.zeros((nvox, n_constraints), dtype=np.bool_) if keep_active else no_sets
        projected = np.empty((min(self.chunk_size, nvox), self._constraints.shape[1]))
        for sl in iter_chunks(nvox, self.chunk_size):
            # the products with the data here (numpy's BLAS, under the caller's thread limit); the kernel projects
            with np.errstate(invalid="ignore"):  # a voxel with a non-finite sample: NONFINITE_INPUT in the kernel
                unconstrained = batch.signal_by_volume(sl).T @ self._whiten_data  # no transposed copy of the data
                constraint_values = unconstrained @ self._constraints.T
            rows = projected[: sl.stop - sl.start]
            solve_msmt(unconstrained, constraint_values, self._constraints, self._gram, self.neg_lambda,
                       self.max_iterations, TOLERANCE, rows, status[sl], iterations[sl], starts[sl], active[sl],
                       self._gram_single, COARSE_TOLERANCE)
            np.matmul(rows, self._unwhiten, out=coefficients[sl])
            if progress is not None:
                progress(sl.stop, nvox)
        coefficients[status != FitStatus.OK] = np.nan
        return MsmtCsdFit(batch, coefficients, status, iterations, self, active if keep_active else None)


def tissue_fractions(l0_terms: list[np.ndarray]) -> np.ndarray:
    """Per-voxel tissue fractions from each tissue's l=0 term: negatives count as 0, the terms are divided by their sum.

    This is the tissue-fraction ("vf") image of MRtrix3's multi-tissue tutorials, the l=0 terms of the WM FOD and
    of the GM and CSF compartments concatenated, made to sum to one. With responses estimated from the data
    (dhollander) each tissue's l=0 term estimates its signal density relative to the tissue's own b=0 intensity,
    so the fractions approximate volume fractions (Jeurissen et al. 2014; Dhollander et al. 2016).

    Parameters
    ----------
    l0_terms : list of ndarray (...)
        One array per tissue, all the same shape.

    Returns
    -------
    ndarray (..., n_tissues)
        Fractions summing to 1 where any term is positive; 0 where none is (or a term is not finite).
    """
    stacked = np.stack([np.asarray(t, dtype=np.float64) for t in l0_terms], axis=-1)
    finite = np.all(np.isfinite(stacked), axis=-1, keepdims=True)
    stacked = np.where(finite, np.clip(stacked, 0.0, None), 0.0)
    total = stacked.sum(axis=-1, keepdims=True)
    return np.divide(stacked, total, out=np.zeros_like(stacked), where=total > 0)


def tissue_rgb(fractions: np.ndarray, tissues: list[str]) -> np.ndarray:
    """RGB rendering of tissue fractions as in MRtrix3's tutorials: CSF red, GM green, WM blue (uint8, 0–255).

    ``tissues`` names each last-axis entry of ``fractions`` (``"wm"``, ``"gm"``, ``"csf"``); a tissue that is
    absent leaves its channel at 0.
    """
    channel = {"csf": 0, "gm": 1, "wm": 2}
    rgb = np.zeros(fractions.shape[:-1] + (3,), dtype=np.float64)
    for index, name in enumerate(tissues):
        rgb[..., channel[name]] = fractions[..., index]
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
