"""Multi-tissue log-domain intensity normalisation (Raffelt et al. 2017; Dhollander et al. 2021), as MRtrix3 3.0's
``mtnormalise``.

The voxel-wise sum of the tissue compartments (each tissue's first volume, the l=0 term of an ODF, negative
values as 0), weighted by per-tissue balance factors, is driven towards a reference value (0.28209479177 =
1/(2√π), the l=0 term of a unit-integral ODF) by a smooth multiplicative field: log(field) is a polynomial of
``order`` (0–3) in scanner coordinates (mm), fitted by least squares in the log domain over the mask. Outliers of
the log-sum leave the fit: first outside [Q1 − 3·IQR, Q3 + 3·IQR], then, inside each of ``niter`` main
iterations, the balance factors (least squares of the balanced sum against 1, normalised to a geometric mean of
1) and the outlier set (1.5·IQR) are updated in turn, up to ``balance_iter`` times, before the field is refitted.
Every input is divided by the field (and multiplied by its balance factor with ``balanced``). The constants,
quartile indices and iteration structure are MRtrix3's (``cmd/mtnormalise.cpp``, 3.0.3).

References
----------
Raffelt D., Dhollander T., Tournier J-D., et al. Bias field correction and intensity normalisation for
quantitative analysis of apparent fibre density. Proc. ISMRM 25 (2017) 3541.
Dhollander T., Tabbara R., Rosnarho-Tornstrand J., Tournier J-D., Raffelt D., Connelly A. Multi-tissue
log-domain intensity and inhomogeneity normalisation for quantitative apparent fibre density. Proc. ISMRM 29
(2021) 2472.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dwiflow.core.errors import DwiflowInputError

DEFAULT_REFERENCE = 0.28209479177
DEFAULT_ORDER = 3
DEFAULT_NITER = 15
DEFAULT_BALANCE_ITER = 7


@dataclass
class MtNormaliseResult:
    """Normalised tissues (same shapes as the inputs), the field (3D), the final inlier mask, the balance factors
    and MRtrix3's ``lognorm_scale`` (the field's geometric mean over the inliers)."""

    normalised: list[np.ndarray]
    field: np.ndarray
    inliers: np.ndarray
    balance_factors: np.ndarray
    lognorm_scale: float
    determined_order: int  # the highest order whose field the mask's voxels determine (see determined_order)


def polynomial_basis(positions: np.ndarray, order: int) -> np.ndarray:
    """MRtrix3's basis of ``mtnormalise``: 1, x, y, z, x², y², z², xy, xz, yz, x³, y³, z³, x²y, x²z, y²x, y²z, z²x,
    z²y, xyz, truncated to 1/4/10/20 terms for order 0/1/2/3."""
    x, y, z = positions[:, 0], positions[:, 1], positions[:, 2]
    terms = [np.ones_like(x), x, y, z, x * x, y * y, z * z, x * y, x * z, y * z,
             x ** 3, y ** 3, z ** 3, x * x * y, x * x * z, y * y * x, y * y * z, z * z * x, z * z * y, x * y * z]
    return np.stack(terms[: {0: 1, 1: 4, 2: 10, 3: 20}[order]], axis=1)


def determined_order(positions: np.ndarray, order: int) -> int:
    """The highest order, at most ``order``, whose polynomial field the voxel ``positions`` (scanner mm) determine:
    its basis has full column rank there. A slab of few slices does not determine the higher orders (on two
    parallel planes the second- and third-order terms are combinations of the others), and the least-squares field
    then depends on the solver's rounding, in MRtrix3 as here. The rank is taken on centred, scaled positions
    (polynomials of an order are the same space in any affine coordinates)."""
    centred = positions - positions.mean(axis=0)
    scale = centred.std(axis=0)
    centred = centred / np.where(scale > 0, scale, 1.0)
    for candidate in range(order, -1, -1):
        basis = polynomial_basis(centred, candidate)
        singular = np.linalg.svd(basis, compute_uv=False)
        if singular.size == basis.shape[1] and singular[-1] > 1e-8 * singular[0]:
            return candidate
    return -1


def _outliers(data, field, balance, range_factor: float) -> np.ndarray:
    """Inlier weights (0/1) of the log balanced sum: within range_factor × IQR of the quartiles (MRtrix3's
    quartile indices round(n/4), round(3n/4) of the sorted values, non-finite values first)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        summed_log = np.log((data @ balance) / field)
    n = summed_log.size
    ordered = np.sort(np.where(np.isfinite(summed_log), summed_log, -np.inf))
    lower_q = ordered[int(np.floor(n * 0.25 + 0.5))]
    upper_q = ordered[min(int(np.floor(n * 0.75 + 0.5)), n - 1)]
    low = lower_q - range_factor * (upper_q - lower_q)
    high = upper_q + range_factor * (upper_q - lower_q)
    return (np.isfinite(summed_log) & (summed_log >= low) & (summed_log <= high)).astype(float)


def mtnormalise(
    tissues: list[np.ndarray],
    mask: np.ndarray,
    affine: np.ndarray,
    *,
    order: int = DEFAULT_ORDER,
    niter: int = DEFAULT_NITER,
    balance_iter: int = DEFAULT_BALANCE_ITER,
    reference: float = DEFAULT_REFERENCE,
    balanced: bool = False,
) -> MtNormaliseResult:
    """Normalise tissue compartments (e.g. WM FOD, GM, CSF from multi-tissue CSD); see the module notes.

    Parameters
    ----------
    tissues : list of ndarray (x, y, z) or (x, y, z, n)
        Each tissue's image; its first volume enters the fit.
    mask : ndarray (x, y, z) of bool
    affine : ndarray (4, 4)
        Voxel-to-scanner matrix (the field is a polynomial in scanner millimetres).
    order : {0, 1, 2, 3}
    niter, balance_iter : int
        Main iterations (15) and balance/outlier iterations inside each (7).
    reference : float
        Target of the balanced sum (0.28209479177).
    balanced : bool
        Also scale each output by its tissue's balance factor.
    """
    if order not in (0, 1, 2, 3):
        raise DwiflowInputError(f"order must be 0, 1, 2 or 3, got {order}", parameters=("order",))
    if niter < 1 or balance_iter < 1:
        raise DwiflowInputError("iteration counts must be >= 1", parameters=("niter",))
    if not reference > 0:
        raise DwiflowInputError(f"reference must be positive, got {reference}", parameters=("reference",))
    if not tissues:
        raise DwiflowInputError("give at least one tissue image", parameters=("tissues",))
    mask = np.asarray(mask, dtype=bool)
    for t in tissues:
        if t.shape[:3] != mask.shape:
            raise DwiflowInputError(f"a tissue image has spatial shape {t.shape[:3]} but the mask has {mask.shape}",
                                    parameters=("tissues", "mask"))
    if not mask.any():
        raise DwiflowInputError("mask is empty", parameters=("mask",))
    first = [np.asarray(t if t.ndim == 3 else t[..., 0], dtype=np.float32) for t in tissues]
    data = np.stack([np.maximum(f[mask], np.float32(0)).astype(float) for f in first], axis=1)
    voxels = np.argwhere(mask)
    positions = voxels @ affine[:3, :3].T + affine[:3, 3]
    basis = polynomial_basis(positions, order)
    log_reference = float(np.log(np.float32(reference)))
    n_tissues = data.shape[1]
    field = np.ones(data.shape[0])
    balance = np.ones(n_tissues)
    coefficients = np.zeros(basis.shape[1])
    weights = _outliers(data, field, balance, 3.0)
    for _ in range(niter):
        for step in range(balance_iter):
            if n_tissues > 1:
                scaled = (data / field[:, None]) * weights[:, None]
                balance = np.linalg.solve(scaled.T @ scaled, scaled.T @ np.ones(data.shape[0]))
                if not np.all(np.isfinite(balance)) or np.any(balance <= 0):
                    raise DwiflowInputError(f"a non-positive tissue balance factor was computed ({balance}): are "
                                            "the tissue images and the mask right?", parameters=("tissues",))
                balance = balance / np.exp(np.log(balance).sum() / n_tissues)
            new_weights = _outliers(data, field, balance, 1.5)
            changed = bool(np.any(new_weights != weights))
            weights = new_weights
            if not changed:
                break
        total = data @ balance
        with np.errstate(divide="ignore", invalid="ignore"):
            log_sum = np.where(total > 0, weights * (np.log(total) - log_reference), 0.0)
        weighted = basis * weights[:, None]
        coefficients = np.linalg.solve(weighted.T @ weighted, basis.T @ log_sum)
        field = np.exp(basis @ coefficients)
    grid = np.indices(mask.shape).reshape(3, -1).T
    full_field = np.exp(polynomial_basis(grid @ affine[:3, :3].T + affine[:3, 3], order) @ coefficients)
    full_field = full_field.reshape(mask.shape).astype(np.float32)
    lognorm_scale = float(np.exp((np.log(field) * weights).sum() / weights.sum()))
    normalised = []
    for n, t in enumerate(tissues):
        scale = balance[n] if balanced else 1.0
        image = np.asarray(t, dtype=np.float32)
        divisor = full_field if image.ndim == 3 else full_field[..., None]
        normalised.append((scale * image / divisor).astype(np.float32))
    inliers = np.zeros(mask.shape, dtype=np.float32)
    inliers[mask] = weights
    return MtNormaliseResult(normalised, full_field, inliers, balance, lognorm_scale,
                             determined_order(positions, order))
