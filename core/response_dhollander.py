"""Unsupervised WM, GM and CSF response functions (Dhollander et al. 2016, 2019), as MRtrix3 3.0's
``dwi2response dhollander``.

The steps and their constants are MRtrix3's (``lib/mrtrix3/dwi2response/dhollander.py``, 3.0.3):

1. Erode the brain mask (``erode`` passes, 6-neighbourhood; voxels on the image border go).
2. Per b-value: the mean signal (negative samples as 0); the signal decay metric (SDM) is
   Σ_b n_b·log(S̄_0 / S̄_b) / Σ_b n_b over the non-zero b-values. Voxels where a mean is not positive or the SDM
   is not finite and positive leave the mask ("safe" mask); the SDM is capped at 10.
3. Crude segmentation: tensor FA > ``fa`` is WM; the rest splits into CSF (SDM − median above an automatic
   threshold) and GM.
4. Refinement: WM loses its high-SDM outliers (above median + 2·1.4826·MAD); GM keeps the voxels whose SDM is
   nearest its median on both sides (automatic thresholds); CSF gains WM outliers with an SDM above the crude
   CSF's minimum and keeps those above an automatic threshold.
5. Final voxels: the ``csf`` % of refined CSF with the highest SDM; the ``gm`` % of refined GM nearest its median
   SDM; for WM, MRtrix3's 2019 algorithm: a multi-tissue CSD of the refined WM with a flat "WM" response
   (lmax 2, then 6) and the CSF response, ranking voxels by their FOD's largest peak over the sum of the two
   l=0 terms: the top 2·``sfwm`` %, then the top ``sfwm`` % of those.
6. Responses by ``amp2response`` over every shell (isotropic for GM and CSF), along the tensor's principal
   direction.

The automatic threshold is MRtrix3's: the one that maximises the correlation between the image and its
thresholded mask (Ridgway et al. 2009), by golden-section search in single precision.

References
----------
Dhollander T., Raffelt D., Connelly A. Unsupervised 3-tissue response function estimation from single-shell or
multi-shell diffusion MR data without a co-registered T1 image. ISMRM Workshop on Breaking the Barriers of
Diffusion MRI (2016) 5.
Dhollander T., Mito R., Raffelt D., Connelly A. Improved white matter response function estimation for 3-tissue
constrained spherical deconvolution. Proc. ISMRM 27 (2019) 555.
Ridgway G.R., Omar R., Ourselin S., et al. Issues with threshold masking in voxel-based morphometry of
atrophied brains. NeuroImage 44 (2009) 99-111.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import GradientTable, checked_gradient_table
from dwiflow.core.response import ResponseFunction, amp2response
from dwiflow.core.voxels import VoxelBatch, run_chunks, scatter

DEFAULT_ERODE = 3
DEFAULT_FA = 0.2
DEFAULT_SFWM = 0.5
DEFAULT_GM = 2.0
DEFAULT_CSF = 10.0
SDM_CAP = 10.0
B0_THRESHOLD = 10.0  # MRtrix3's BZeroThreshold: which shells the flat WM response treats as b=0


@dataclass
class DhollanderResult:
    """Responses, voxel selections (bool volumes) and the voxel count after each step."""

    wm: ResponseFunction
    gm: ResponseFunction
    csf: ResponseFunction
    voxels_wm: np.ndarray
    voxels_gm: np.ndarray
    voxels_csf: np.ndarray
    counts: dict = field(default_factory=dict)

    @property
    def voxels(self) -> np.ndarray:
        """MRtrix3's ``-voxels`` image: (x, y, z, 3) with CSF, GM and WM as red, green and blue."""
        return np.stack([self.voxels_csf, self.voxels_gm, self.voxels_wm], axis=-1).astype(np.float32)


def erode_mask(mask: np.ndarray, passes: int) -> np.ndarray:
    """MRtrix3 ``maskfilter erode``: a voxel stays when its 6 neighbours are in the mask and it is not on the
    image border; ``passes`` times."""
    out = np.asarray(mask, dtype=bool).copy()
    for _ in range(passes):
        inner = np.zeros_like(out)
        core = out[1:-1, 1:-1, 1:-1].copy()
        for axis in range(3):
            for step in (-1, 1):
                sl = [slice(1, -1)] * 3
                sl[axis] = slice(1 + step, out.shape[axis] - 1 + step)
                core &= out[tuple(sl)]
        inner[1:-1, 1:-1, 1:-1] = core
        out = inner
    return out


def optimal_threshold(values: np.ndarray) -> float:
    """MRtrix3's automatic threshold (``mrthreshold`` without options) of finite ``values``: the threshold t that
    maximises the correlation between the values and the indicator of values > t, by golden-section search between
    min + 0.1% and max − 0.1% of the range, started at the midpoint, tolerance 1% (single precision as MRtrix3)."""
    x = np.asarray(values, dtype=np.float32)
    x = x[np.isfinite(x)].astype(np.float64)
    if x.size < 2:
        raise DwiflowInputError("too few voxels to determine an automatic threshold")
    count = x.size
    mean = x.sum() / count
    stdev = np.sqrt((np.sum(x * x) - x.sum() * mean) / count)
    ordered = np.sort(x)
    suffix = np.concatenate([np.cumsum(ordered[::-1])[::-1], [0.0]])

    def cost(threshold: np.float32) -> float:
        first_above = np.searchsorted(ordered, float(threshold), side="right")
        above = count - first_above
        mean_xy = suffix[first_above] / count
        covariance = mean_xy - (above / count) * mean
        mask_stdev = np.sqrt((above - above * above / count) / count)
        if mask_stdev == 0 or stdev == 0:
            return np.inf
        return -covariance / (stdev * mask_stdev)

    f32 = np.float32
    lo, hi = f32(ordered[0]), f32(ordered[-1])
    g1 = f32(0.61803399)
    g2 = f32(1) - g1
    x0 = f32(lo + f32(0.001) * (hi - lo))
    x3 = f32(hi - f32(0.001) * (hi - lo))
    init = f32(f32(0.5) * (lo + hi))
    if abs(x3 - init) > abs(init - x0):
        x1, x2 = init, f32(init + g2 * (x3 - init))
    else:
        x2, x1 = init, f32(init - g2 * (init - x0))
    f1, f2 = cost(x1), cost(x2)
    while f32(0.01) * (abs(x1) + abs(x2)) < abs(x3 - x0):
        if f2 < f1:
            x0, x1 = x1, x2
            x2 = f32(g1 * x1 + g2 * x3)
            f1, f2 = f2, cost(x2)
        else:
            x3, x2 = x2, x1
            x1 = f32(g1 * x2 + g2 * x0)
            f2, f1 = f1, cost(x1)
    return float(x1 if f1 < f2 else x2)


def _top(values: np.ndarray, region: np.ndarray, number: int, bottom: bool = False, what: str = "voxels",
         option: str = "", share: str = "") -> np.ndarray:
    """MRtrix3 ``mrthreshold -top/-bottom N -ignorezero`` on ``region ? values : 0``, intersected with region.
    ``what`` names the selection in the error, ``option`` the percentage option that set ``number`` and ``share``
    what that percentage was of."""
    image = np.where(region, values, 0.0).astype(np.float32)
    candidates = image[(image != 0) & np.isfinite(image)]
    if number < 1 or candidates.size < number:
        raise DwiflowInputError(f"dhollander's {what}: {number} of {candidates.size} candidate voxels requested"
                                f"{f' ({share})' if share else ''}: the mask or the tissue is too small for this "
                                "selection", parameters=(option,) if option else ())
    ordered = np.sort(candidates)
    if bottom:
        threshold = ordered[number - 1]
        return region & (image <= threshold)
    threshold = ordered[candidates.size - number]
    return region & (image >= threshold)


def _median(values: np.ndarray) -> float:
    if values.size == 0:
        raise DwiflowInputError("an intermediate tissue mask is empty: the brain mask or the data cannot support "
                                "three tissues (try fewer erosions)")
    return float(np.median(values.astype(np.float32)))


def mrtrix_tensor_fa(data: np.ndarray, gtab: GradientTable, mask: np.ndarray,
                     n_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """FA as MRtrix3's ``dwi2tensor | tensor2metric -fa``, and the tensors: the tensor fit of ``dwi2tensor``
    (:class:`~dwiflow.core.tensor.TensorModel` ``IWLS``, every finite solution kept, flagged or not, on
    ``n_threads`` threads); FA from the tensor's elements as tensor2metric computes it (``DWI::tensor2FA``:
    √(3/2 · ‖D − tr(D)/3 · I‖² / ‖D‖²), Frobenius norms; equal to the eigenvalue formula without an eigen-
    decomposition, and not clipped: it can exceed 1 in noisy voxels), 0 where the fit failed. The tensors (x, y, z, 6;
    lower triangular, zeros where the fit failed) give :func:`principal_directions` of the voxels that need one."""
    from dwiflow.core.tensor import TensorModel

    fit = TensorModel(gtab, fit_method="IWLS", keep_flagged_values=True).fit(data, mask, n_threads=n_threads)
    params = fit.lower_triangular[mask]
    finite = np.all(np.isfinite(params), axis=1)
    params[~finite] = 0.0
    xx, xy, yy, xz, yz, zz = params.T
    mean = (xx + yy + zz) / 3.0
    off_diagonal = xy * xy + xz * xz + yz * yz
    squared_norm = xx * xx + yy * yy + zz * zz + 2.0 * off_diagonal
    deviation = (xx - mean) ** 2 + (yy - mean) ** 2 + (zz - mean) ** 2 + 2.0 * off_diagonal
    with np.errstate(all="ignore"):
        fa = np.where(finite & (squared_norm != 0), np.sqrt(1.5 * deviation / squared_norm), 0.0)
    fa_map = np.zeros(mask.shape)
    fa_map[mask] = np.nan_to_num(fa)
    tensors = np.zeros(mask.shape + (6,))
    tensors[mask] = params
    return fa_map.astype(np.float32), tensors


def principal_directions(tensors: np.ndarray) -> np.ndarray:
    """Unit eigenvectors (n, 3) of lower-triangular tensors (n, 6), as tensor2metric ``-vector -modulate none``:
    that of the eigenvalue of largest magnitude (a negative one in a non-physical tensor, where eigh's order would
    give the largest signed one)."""
    from dwiflow.core.tensor import lower_triangular_to_matrix

    evals, evecs = np.linalg.eigh(lower_triangular_to_matrix(tensors))
    principal = np.argmax(np.abs(evals), axis=1)
    return evecs[np.arange(evecs.shape[0]), :, principal]


def volume_means(data: np.ndarray, gtab: GradientTable, slab: int = 1024,
                 region: np.ndarray | None = None, n_threads: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Each shell's mean of the signal clipped at 0 (as MRtrix3's ``mrcalc -max 0`` then ``mrmath mean``) and the
    mean over all volumes, unclipped (float64 sums, float32 results): a few array operations per ``slab`` voxels,
    gathered volume by volume (no transposed copy) in the order the voxels lie in memory, the slabs on ``n_threads``
    threads (the operations release the interpreter lock; the results do not depend on the thread count). Only the
    voxels of ``region`` (a mask; default every voxel) are averaged, the others hold 0: dhollander reads the means
    inside the eroded mask alone."""
    shells = list(gtab.shells)
    indicator = np.zeros((len(shells), gtab.n_volumes))
    for number, shell in enumerate(shells):
        indicator[number, shell.indices] = 1.0 / shell.count
    batch = VoxelBatch.from_volume(data, region, gtab.n_volumes, memory_order=True)
    shell_means = np.empty((len(shells), batch.n_voxels), dtype=np.float32)
    overall = np.empty(batch.n_voxels, dtype=np.float32)

    def average(chunk: slice) -> None:
        block = batch.signal_by_volume(chunk).astype(np.float64, copy=False)  # (volumes, voxels), a copy
        overall[chunk] = block.mean(axis=0)
        np.maximum(block, 0.0, out=block)
        shell_means[:, chunk] = indicator @ block

    run_chunks(average, batch.n_voxels, slab, n_threads)
    return [scatter(shell_means[number], batch) for number in range(len(shells))], scatter(overall, batch)


def signal_decay_metric(means: list[np.ndarray], gtab: GradientTable) -> tuple[np.ndarray, np.ndarray]:
    """The SDM per voxel from the shells' clipped means (:func:`volume_means`) and the voxels where a shell's mean
    signal is not positive (MRtrix3's ``err_b``)."""
    shells = list(gtab.shells)
    error = np.zeros(means[0].shape, dtype=bool)
    for mean in means:
        error |= ~(np.isfinite(mean) & (mean > 0))
    total = 0
    sdm = np.zeros(means[0].shape, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        for shell, mean in zip(shells[1:], means[1:]):
            sdm += (np.log(means[0] / mean)).astype(np.float32) * np.float32(shell.count)
            total += shell.count
        sdm = sdm / np.float32(total)
    return sdm, error


def _external_wm_voxels(algorithm: str, data: np.ndarray, gtab: GradientTable, refined_wm: np.ndarray, number: int,
                        n_threads: int | None) -> np.ndarray:
    """The single-fibre WM voxels MRtrix3's ``dwi2response <algorithm> -mask refined_wm -number N`` selects (what
    ``-wm_algo`` runs): ``fa`` tensor FA of every volume in the mask as given (a given mask is not eroded), the N
    highest; ``tournier`` and ``tax`` on the largest shell (``dwi2response`` hands a single-shell algorithm that
    shell alone)."""
    from dwiflow.core.response_iterative import mrtrix_tax_response, tournier_response

    if algorithm == "fa":
        fa_map, _ = mrtrix_tensor_fa(data, gtab, refined_wm, n_threads)
        return _top(fa_map, refined_wm, number, what="single-fibre WM voxels (fa)")
    if algorithm == "tournier":
        # dwi2response tournier -number N re-examines 10 N voxels per iteration (its -iter_voxels default in 3.0)
        return tournier_response(data, gtab, refined_wm, sf_voxels=number, iter_voxels=10 * number).voxels
    return mrtrix_tax_response(data, gtab, refined_wm).voxels


def dhollander(
    data: np.ndarray,
    gtab: GradientTable,
    mask: np.ndarray,
    *,
    erode: int = DEFAULT_ERODE,
    fa: float = DEFAULT_FA,
    sfwm: float = DEFAULT_SFWM,
    gm: float = DEFAULT_GM,
    csf: float = DEFAULT_CSF,
    lmax: list[int] | None = None,
    wm_algo: str | None = None,
    n_threads: int | None = None,
) -> DhollanderResult:
    """Estimate WM, GM and CSF responses from one run (see the module notes for the algorithm).

    Parameters
    ----------
    data : ndarray (x, y, z, n_volumes)
    gtab : GradientTable
        At least two distinct b-values (b=0 and one more).
    mask : ndarray (x, y, z) of bool
        Brain mask.
    erode : int
        Erosion passes of the mask (3).
    fa : float
        FA threshold of the crude WM (0.2).
    sfwm, gm, csf : float
        Percentages of the refined WM, GM and CSF kept as final voxels (0.5, 2, 10).
    lmax : list of int, optional
        The WM response's lmax per shell (default: amp2response's, 10 and 0 at b=0).
    wm_algo : {None, "fa", "tournier", "tax"}
        MRtrix3's ``-wm_algo``: select the single-fibre WM voxels inside the refined WM with that ``dwi2response``
        algorithm instead of the built-in ranking (Dhollander 2019): ``fa`` the ``sfwm`` per cent of highest FA,
        ``tournier`` its iterative selection of as many voxels on the largest shell, ``tax`` its recursive
        calibration (as many voxels as it keeps; ``sfwm`` is not used).
    n_threads : int, optional
        Threads of the volume means and the tensor fit (default 1; the result does not depend on it). The CSD fits
        use numba's.

    Returns
    -------
    DhollanderResult
    """
    from dwiflow.core.msmt_csd import MsmtCsdModel
    from dwiflow.core.peaks import largest_peak_amplitude, peak_amplitude_degree_2

    gtab = checked_gradient_table(gtab, "dhollander")

    shells = list(gtab.shells)
    if len(shells) < 2 or not shells[0].is_b0:
        raise DwiflowInputError("dhollander needs at least 2 distinct b-values, b=0 included "
                                f"(this run has {', '.join(f'{s.bvalue:.0f}' for s in shells)})",
                                parameters=("bvals",))
    if lmax is not None and len(lmax) != len(shells):
        raise DwiflowInputError(f"{len(lmax)} lmax values for {len(shells)} b-values", parameters=("lmax",))
    if wm_algo not in (None, "fa", "tournier", "tax"):
        raise DwiflowInputError(f"wm_algo must be fa, tournier or tax, got {wm_algo!r}", parameters=("wm_algo",))
    for name, value in (("sfwm", sfwm), ("gm", gm), ("csf", csf)):
        if not 0 < value <= 100:
            raise DwiflowInputError(f"{name} must be a percentage in (0, 100], got {value}", parameters=(name,))
    counts: dict[str, int] = {}
    mask = np.asarray(mask, dtype=bool)
    counts["mask"] = int(mask.sum())
    eroded = erode_mask(mask, erode) if erode > 0 else mask.copy()
    counts["eroded"] = int(eroded.sum())
    shell_means, mean_signal = volume_means(data, gtab, region=eroded, n_threads=n_threads)
    sdm, error = signal_decay_metric(shell_means, gtab)
    error |= ~(np.isfinite(sdm) & (sdm > 0))
    safe = eroded & ~error
    counts["safe"] = int(safe.sum())
    if not safe.any():
        raise DwiflowInputError("no voxel of the brain mask survives erosion and the signal checks (with 2-slice "
                                "data use erode 0)", parameters=("mask", "erode"))
    safe_sdm = np.where(safe, np.minimum(np.nan_to_num(sdm), np.float32(SDM_CAP)), 0).astype(np.float32)

    fa_map, tensors = mrtrix_tensor_fa(data, gtab, safe, n_threads)
    crude_wm = safe & (fa_map > fa)
    crude_non_wm = safe & ~crude_wm
    counts["crude_wm"], counts["crude_non_wm"] = int(crude_wm.sum()), int(crude_non_wm.sum())

    # crude GM vs CSF
    non_wm_median = _median(safe_sdm[crude_non_wm])
    shifted = (safe_sdm - np.float32(non_wm_median)).astype(np.float32)
    threshold = optimal_threshold(shifted[crude_non_wm])
    crude_csf = crude_non_wm & (shifted >= threshold)
    crude_gm = crude_non_wm & ~crude_csf
    counts["crude_gm"], counts["crude_csf"] = int(crude_gm.sum()), int(crude_csf.sum())

    # refine WM: drop high-SDM outliers
    wm_median = _median(safe_sdm[crude_wm])
    deviation = np.abs(safe_sdm - np.float32(wm_median)).astype(np.float32)
    wm_mad = _median(deviation[crude_wm])
    outlier_threshold = wm_median + 1.4826 * wm_mad * 2.0
    wm_outliers = crude_wm & (safe_sdm > np.float32(outlier_threshold))
    refined_wm = crude_wm & ~wm_outliers
    counts["refined_wm"] = int(refined_wm.sum())

    # refine GM: the voxels nearest the median on either side
    gm_median = np.float32(_median(safe_sdm[crude_gm]))
    gm_high = crude_gm & (safe_sdm > gm_median)
    gm_low = crude_gm & ~gm_high
    above = (safe_sdm - gm_median).astype(np.float32)
    below = (-(safe_sdm - gm_median)).astype(np.float32)
    high_select = gm_high & (above < optimal_threshold(above[gm_high])) if gm_high.any() else gm_high
    low_select = gm_low & (below < optimal_threshold(below[gm_low])) if gm_low.sum() > 1 else gm_low
    refined_gm = high_select | low_select
    counts["refined_gm"] = int(refined_gm.sum())

    # refine CSF: recover WM outliers with CSF-like decay, then keep the high-SDM part
    csf_min = np.float32(np.min(safe_sdm[crude_csf])) if crude_csf.any() else np.float32(np.inf)
    csf_extra = crude_csf | (wm_outliers & (safe_sdm > csf_min))
    csf_shifted = (safe_sdm - csf_min).astype(np.float32)
    refined_csf = csf_extra & (csf_shifted >= optimal_threshold(csf_shifted[csf_extra]))
    counts["refined_csf"] = int(refined_csf.sum())

    # final voxels
    voxels_csf = _top(safe_sdm, refined_csf, int(round(counts["refined_csf"] * csf / 100.0)), what="CSF voxels",
                      option="csf", share=f"{csf:g} % of {counts['refined_csf']} refined CSF voxels")
    gm_ref_median = np.float32(_median(safe_sdm[refined_gm]))
    gm_closeness = (np.abs(safe_sdm - gm_ref_median) + np.float32(1)).astype(np.float32)
    voxels_gm = _top(gm_closeness, refined_gm, int(round(counts["refined_gm"] * gm / 100.0)), bottom=True,
                     what="GM voxels", option="gm", share=f"{gm:g} % of {counts['refined_gm']} refined GM voxels")

    selected = lambda region: data[region].astype(float)  # noqa: E731
    directions = lambda region: principal_directions(tensors[region])  # noqa: E731
    response_csf = amp2response(selected(voxels_csf), directions(voxels_csf), gtab, isotropic=True)
    response_gm = amp2response(selected(voxels_gm), directions(voxels_gm), gtab, isotropic=True)

    # single-fibre WM (Dhollander 2019): rank by peak / (WM + CSF l=0 terms) of a flat-response 2-tissue CSD
    wm_number = int(round(counts["refined_wm"] * sfwm / 100.0))
    coefficient = float(np.median(mean_signal[refined_wm])) * np.sqrt(4 * np.pi) if refined_wm.any() else 0.0
    flat_rows = np.array([[coefficient, 0, 0, 0] if (s.bvalue < B0_THRESHOLD if lmax is None else lmax[i] == 0)
                          else [coefficient, -coefficient, coefficient, -coefficient] for i, s in enumerate(shells)])
    flat_wm = ResponseFunction(np.array([s.bvalue for s in shells]), flat_rows)

    def ranking(region: np.ndarray, wm_lmax: int) -> np.ndarray:
        fit = MsmtCsdModel(gtab, [flat_wm, response_csf], lmax=[wm_lmax, 0]).fit(data, region)
        (wm_start, wm_stop), (csf_start, _) = fit.model.parameter_slices
        wm_rows, csf_l0 = fit.coefficient_rows[:, wm_start:wm_stop], fit.coefficient_rows[:, csf_start]
        finite = np.all(np.isfinite(wm_rows), axis=1)
        amplitude = np.zeros(wm_rows.shape[0])
        if wm_lmax == 2:  # sh2peaks' first peak of an lmax-2 FOD, in closed form (a sixteenth of the search's time)
            amplitude[finite] = np.maximum(peak_amplitude_degree_2(wm_rows[finite]), 0.0)
        else:  # sh2peaks' first peak: a Newton ascent from the largest samples (no search grid to build)
            amplitude[finite] = largest_peak_amplitude(wm_rows[finite])
        with np.errstate(divide="ignore", invalid="ignore"):
            metric = (amplitude / (wm_rows[:, 0] + csf_l0)).astype(np.float32)
        metric = fit.volume(metric, fill=np.float32(0))  # the region's voxels only: no image of every coefficient
        return np.where(np.isfinite(metric), metric, 0)

    if wm_algo is None:
        share = f"{sfwm:g} % of {counts['refined_wm']} refined WM voxels"
        refined_sfwm = _top(ranking(refined_wm, 2), refined_wm, 2 * wm_number, what="single-fibre WM candidates",
                            option="sfwm", share=f"twice {share}")
        voxels_wm = _top(ranking(refined_sfwm, 6), refined_sfwm, wm_number, what="single-fibre WM voxels",
                         option="sfwm", share=share)
    else:
        voxels_wm = _external_wm_voxels(wm_algo, data, gtab, refined_wm, wm_number, n_threads)
    response_wm = amp2response(selected(voxels_wm), directions(voxels_wm), gtab, lmax=lmax)
    counts.update(voxels_wm=int(voxels_wm.sum()), voxels_gm=int(voxels_gm.sum()), voxels_csf=int(voxels_csf.sum()))
    return DhollanderResult(response_wm, response_gm, response_csf, voxels_wm, voxels_gm, voxels_csf, counts)
