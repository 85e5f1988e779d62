"""Data-driven single-fibre responses that need CSD: Tournier (2013) and recursive calibration (Tax 2014).

Both alternate a deconvolution with the current response and a re-selection of single-fibre
voxels, and end in the estimation of :func:`dwiflow.core.response.amp2response` (all selected
voxels in one constrained least-squares problem).

``tournier_response`` follows MRtrix3's ``dwi2response tournier``: start from the response
(1, −1, 1) at lmax 4; deconvolve inside the current mask; rank voxels by
√p₁·(1 − p₂/p₁)² from their two largest FOD peaks; the best ``sf_voxels`` give the next response
(with the first-peak directions); the best ``iter_voxels``, dilated within the brain mask, are
the voxels tested next; stop when the selection repeats.

``tax_response`` follows DIPY's ``recursive_response``: start from a fat tensor response
(FA 0.08, trace 0.0021); deconvolve with DIPY's CSD; keep the voxels whose second peak is below
``peak_thr`` of the first; re-estimate from them; stop when the response changes by less than
``convergence`` (relative, every coefficient).

References
----------
Tournier J-D., Calamante F., Connelly A. Determination of the appropriate b value and number of
gradient directions for high-angular-resolution diffusion-weighted imaging. NMR Biomed 26 (2013)
1775-1786.
Tax C.M.W. et al. Recursive calibration of the fiber response function for spherical
deconvolution of diffusion MRI data. NeuroImage 86 (2014) 67-80.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dwiflow.core.csd import CsdModel
from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import GradientTable, checked_gradient_table
from dwiflow.core.peaks import find_peaks_rows, vertex_peaks
from dwiflow.core.response import ResponseFunction, amp2response, top_voxels
from dwiflow.core.sh import real_sh_basis


@dataclass
class IterativeResponse:
    """Result of an iterative selection: the response, the voxels used, and how it went."""

    response: ResponseFunction
    voxels: np.ndarray
    iterations: int
    converged: bool


def _single_shell(gtab: GradientTable, shell: float | None):
    if not gtab.dw_shells:
        raise DwiflowInputError("the gradient table has no diffusion-weighted shell")
    return gtab.find_shell(shell) if shell is not None else gtab.dw_shells[-1]


def tournier_response(
    data: np.ndarray,
    gtab: GradientTable,
    brain_mask: np.ndarray,
    *,
    shell: float | None = None,
    lmax: int | None = None,
    sf_voxels: int = 300,
    iter_voxels: int = 3000,
    dilate: int = 1,
    max_iters: int = 10,
) -> IterativeResponse:
    """MRtrix3's ``tournier`` algorithm on one shell (the largest by default).

    Returns the response of that shell only (MRtrix3 writes no b=0 row for this algorithm).
    """
    gtab = checked_gradient_table(gtab, "tournier_response")
    if max_iters < 2:
        raise DwiflowInputError(f"max_iters must be at least 2, got {max_iters}")
    for name, value in (("sf_voxels", sf_voxels), ("iter_voxels", iter_voxels)):
        if value < 1:
            raise DwiflowInputError(f"{name} must be >= 1, got {value}")
    brain_mask = np.asarray(brain_mask, dtype=bool)
    if not brain_mask.any():
        raise DwiflowInputError("the brain mask is empty")
    target = _single_shell(gtab, shell)
    response = ResponseFunction(np.array([target.bvalue]), np.array([[1.0, -1.0, 1.0]]), [4])
    candidates = brain_mask
    previous = None
    for iteration in range(max_iters):
        it_lmax = 4 if iteration == 0 else lmax
        model = CsdModel(gtab, response, lmax=it_lmax, shell=target.bvalue)
        fit = model.fit(data, candidates)
        index = np.nonzero(candidates)
        sh = fit.sh[index]
        ok = np.all(np.isfinite(sh), axis=1)
        peaks = np.full((sh.shape[0], 2, 3), np.nan)
        # MRtrix3 keeps every positive lobe here; a second peak below 2% of the first changes the
        # cost by less than 4%, so the search can skip those amplitudes
        peaks[ok] = find_peaks_rows(sh[ok], npeaks=2, rel_threshold=0.02, abs_threshold=0.0, min_separation_deg=0.0)
        amps = np.nan_to_num(np.linalg.norm(peaks, axis=-1))
        first, second = amps[:, 0], amps[:, 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            cost = np.where(first > 0, np.sqrt(first) * (1 - second / first) ** 2, 0.0)
        cost_map = np.full(brain_mask.shape, -np.inf)
        cost_map[index] = cost
        direction = np.zeros(brain_mask.shape + (3,))
        direction[index] = np.nan_to_num(peaks[:, 0])
        selected = top_voxels(np.where(cost_map > 0, cost_map, np.nan), candidates, sf_voxels)
        response = amp2response(
            np.asarray(data[selected], dtype=float), direction[selected], gtab,
            shells=[target.bvalue], lmax=[4] if iteration == 0 else ([lmax] if lmax else None),
        )
        if previous is not None and np.array_equal(selected, previous):
            return IterativeResponse(response, selected, iteration + 1, True)
        previous = selected
        grow = top_voxels(np.where(cost_map > 0, cost_map, np.nan), candidates, iter_voxels)
        if dilate:
            grow = ndimage.binary_dilation(grow, iterations=dilate)
        candidates = grow & brain_mask
    return IterativeResponse(response, previous, max_iters, False)


def fa_trace_to_lambdas(fa: float, trace: float) -> np.ndarray:
    """Axially symmetric eigenvalues (λ∥, λ⊥, λ⊥) with the given FA and trace."""
    lambda1 = (trace / 3.0) * (1 + 2 * fa / (3 - 2 * fa**2) ** 0.5)
    lambda2 = (trace / 3.0) * (1 - fa / (3 - 2 * fa**2) ** 0.5)
    return np.array([lambda1, lambda2, lambda2])


def _lstsq_zonal_of_tensor(evals: np.ndarray, s0: float, dirs: np.ndarray, bvals: np.ndarray, lmax: int) -> np.ndarray:
    """m=0 coefficients of the lmax least-squares SH fit of a z-aligned tensor signal (as DIPY)."""
    signal = s0 * np.exp(-bvals * (evals[1] + (evals[0] - evals[1]) * dirs[:, 2] ** 2))
    coeffs = np.linalg.lstsq(real_sh_basis(lmax, dirs), signal, rcond=None)[0]
    zonal_index = [l * (l + 1) // 2 for l in range(0, lmax + 1, 2)]
    return coeffs[zonal_index]


def tax_response(
    data: np.ndarray,
    gtab: GradientTable,
    mask: np.ndarray | None = None,
    *,
    lmax: int = 8,
    peak_thr: float = 0.01,
    init_fa: float = 0.08,
    init_trace: float = 0.0021,
    max_iters: int = 8,
    convergence: float = 0.001,
) -> IterativeResponse:
    """Recursive calibration (Tax et al. 2014) with DIPY's CSD, ending in amp2response.

    Every b>0 volume is used (single-shell data, as in DIPY). The returned response has a
    b=0 row (the mean b=0 signal of the final voxels, as DIPY's S0) and the shell's row.
    """
    gtab = checked_gradient_table(gtab, "tax_response")
    from dwiflow.core._response_kernel import per_voxel_zonal_fits  # compiled lazily (numba)

    if not 0 < peak_thr < 1:
        raise DwiflowInputError(f"peak_thr must be in (0, 1), got {peak_thr}")
    if not gtab.b0s_mask.any():
        raise DwiflowInputError("recursive calibration needs b=0 volumes (for S0)")
    target = _single_shell(gtab, None)
    dw = np.flatnonzero(~gtab.b0s_mask)
    mask = np.ones(data.shape[:-1], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if not mask.any():
        raise DwiflowInputError("the mask is empty")
    index = np.nonzero(mask)
    signals = np.asarray(data[index], dtype=float)
    keep = np.all(np.isfinite(signals), axis=1) & np.any(signals > 0, axis=1)
    zonal = _lstsq_zonal_of_tensor(fa_trace_to_lambdas(init_fa, init_trace), 1.0, gtab.bvecs[dw], gtab.bvals[dw], lmax)
    previous = np.ones_like(zonal)
    converged, iteration = False, 0
    for iteration in range(1, max_iters + 1):
        response = ResponseFunction(np.array([np.nan]), zonal[None])
        model = CsdModel(gtab, response, lmax=lmax, flavour="dipy")
        sh = model.fit(signals[keep][:, None, None, :]).sh[:, 0, 0]
        # DIPY's peak search: vertices of a 724-point sphere, no refinement (a finer search finds
        # more of the small lobes and changes which voxels count as single-fibre)
        peaks = vertex_peaks(sh, "repulsion724", npeaks=2, rel_threshold=peak_thr, min_separation_deg=25.0)
        amps = np.linalg.norm(peaks, axis=-1)
        single = np.isfinite(amps[:, 0]) & ~np.isfinite(amps[:, 1])
        if not single.any():
            raise DwiflowInputError(
                f"recursive calibration found no single-fibre voxel at iteration {iteration} "
                f"(peak_thr {peak_thr}); give a white-matter mask or raise peak_thr", parameters=("peak_thr",)
            )
        rows = np.flatnonzero(keep)[single]
        keep = np.zeros_like(keep)
        keep[rows] = True
        fibres = peaks[single, 0] / amps[single, 0, None]
        # DIPY's per-iteration estimate: average of per-voxel least-squares zonal fits
        per_voxel = per_voxel_zonal_fits(np.ascontiguousarray(fibres), np.ascontiguousarray(gtab.bvecs[dw]),
                                         np.ascontiguousarray(signals[rows][:, dw]), lmax)
        zonal = per_voxel.mean(axis=0)
        selected_fibres = fibres
        if np.all(np.abs((previous - zonal) / previous) < convergence):
            converged = True
            break
        previous = zonal
    voxels = np.zeros(mask.shape, dtype=bool)
    voxels[tuple(i[rows] for i in index)] = True
    final = amp2response(signals[rows], selected_fibres, gtab, shells=[0.0, target.bvalue], lmax=[0, lmax])
    final.metadata["AveragedZonal"] = " ".join(f"{c:.6g}" for c in zonal)
    return IterativeResponse(final, voxels, iteration, converged)


def mrtrix_tax_response(
    data: np.ndarray,
    gtab: GradientTable,
    mask: np.ndarray,
    *,
    peak_ratio: float = 0.1,
    max_iters: int = 20,
    convergence: float = 0.5,
) -> IterativeResponse:
    """MRtrix3's ``dwi2response tax`` (its reading of Tax et al. 2014) on the largest shell: from a response built
    from the shell's mean and standard deviation inside ``mask`` (lmax 4), deconvolve (``dwi2fod csd``) inside the
    current voxels, keep those whose second FOD peak is below ``peak_ratio`` of the first, re-estimate the response
    from them (``amp2response``, the first peak's direction), and stop when no coefficient changed by more than
    ``convergence`` per cent of its value (or after ``max_iters``). Unlike :func:`tax_response` (DIPY's
    recursive calibration) the selection only shrinks: each iteration tests the voxels the one before kept.

    Returns the last response (the shell's row only, as MRtrix3 writes it) and its voxels.
    """
    gtab = checked_gradient_table(gtab, "mrtrix_tax_response")
    from dwiflow.core.fixels import segment_fods

    if not 0 < peak_ratio < 1:
        raise DwiflowInputError(f"peak_ratio must be in (0, 1), got {peak_ratio}", parameters=("peak_ratio",))
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise DwiflowInputError("the mask is empty")
    target = _single_shell(gtab, None)
    values = np.asarray(data[mask][:, np.asarray(target.indices)], dtype=np.float64)
    scale = np.sqrt(4.0 * np.pi)
    mean, std = float(values.mean()) * scale, float(values.std(ddof=1)) * scale
    response = ResponseFunction(np.array([target.bvalue]), np.array([[mean, -0.5 * std, 0.25 * std * std / mean]]))
    candidates = mask
    selected, iteration = candidates, 0
    for iteration in range(1, max_iters + 1):
        fit = CsdModel(gtab, response, shell=target.bvalue).fit(data, candidates)
        index = np.nonzero(candidates)
        sh = fit.sh[index]
        ok = np.all(np.isfinite(sh), axis=1)
        # fod2fixel -fmls_no_thresholds: the lobes' peak amplitudes (largest first) and the first lobe's direction
        fixels = segment_fods(np.where(ok[:, None], sh, 0.0), ok, integral_threshold=0.0, peak_value_threshold=0.0)
        first, second = np.zeros(sh.shape[0]), np.zeros(sh.shape[0])
        has = fixels.counts > 0
        first[has] = fixels.peak_amplitude[fixels.offsets[has]]
        two = fixels.counts > 1
        second[two] = fixels.peak_amplitude[fixels.offsets[two] + 1]
        lead = np.zeros((sh.shape[0], 3))
        lead[has] = fixels.directions[fixels.offsets[has]]
        with np.errstate(divide="ignore", invalid="ignore"):
            single = second / first < peak_ratio  # no lobe at all: 0/0, never single-fibre
        if not single.any():
            raise DwiflowInputError(f"tax: every voxel was excluded from the single-fibre selection at iteration "
                                    f"{iteration}", parameters=("peak_ratio",))
        selected = np.zeros(mask.shape, dtype=bool)
        selected[tuple(i[single] for i in index)] = True
        direction = np.zeros(mask.shape + (3,))
        direction[index] = lead
        new = amp2response(np.asarray(data[selected], dtype=float), direction[selected], gtab, shells=[target.bvalue])
        old_row, new_row = response.coefficients[0], new.coefficients[0]
        width = min(old_row.size, new_row.size)
        halves = 0.5 * (old_row[:width] + new_row[:width])
        with np.errstate(divide="ignore", invalid="ignore"):
            # MRtrix3's test, signed mean included: a coefficient whose mean is negative never asks for more
            changed = np.abs(0.5 * (old_row[:width] - new_row[:width])) / halves > 0.01 * convergence
        response = new
        if iteration > 1 and not np.any(changed):
            return IterativeResponse(response, selected, iteration, True)
        candidates = selected
    return IterativeResponse(response, selected, iteration, False)
