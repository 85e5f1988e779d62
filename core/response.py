"""Response-function estimation: MRtrix3-style amp2response, FA selection and DIPY-style SSST.

A response is axially symmetric about the fibre, so each shell is described by its zonal
SH coefficients (m = 0 terms, l = 0, 2, 4, ... in the orthonormal MRtrix3 convention).

``amp2response`` (Smith, Dhollander & Connelly) uses the data of all selected single-fibre
voxels concurrently: every voxel's gradient directions are expressed relative to its fibre
direction, and one least-squares problem per shell is solved over all voxels at once. By
default the amplitude is constrained to be non-negative and to increase monotonically from
the fibre axis to the orthogonal plane (sampled every degree); the resulting small convex QP
is solved exactly as a least-distance problem through non-negative least squares (Lawson &
Hanson 1974, ch. 23).

SSST (single-shell single-tissue; DIPY's ``auto_response_ssst``) takes the voxels whose FA
exceeds a threshold inside a cuboid ROI at the centre of the volume and averages their tensor
eigenvalues and b=0 signals (Tournier et al. 2004).

References
----------
Smith R.E., Dhollander T., Connelly A. Constrained linear least squares estimation of
anisotropic response function for spherical deconvolution. ISMRM Workshop on Breaking the
Barriers of Diffusion MRI (2016) 23.
Tournier J-D. et al. Direct estimation of the fiber orientation density function from
diffusion-weighted MRI data using spherical deconvolution. NeuroImage 23 (2004) 1176-1185.
Lawson C.L., Hanson R.J. Solving Least Squares Problems. Prentice-Hall (1974).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.polynomial import legendre

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import DEFAULT_SHELL_TOLERANCE, GradientTable, Shell, checked_gradient_table
from dwiflow.core.sh import check_lmax, zonal_sh_basis, zonal_sh_basis_rows
from dwiflow.core.tensor import TensorModel
from dwiflow.core.voxels import iter_chunks

DEFAULT_LMAX = 10  # MRtrix3 3.0.3's default for non-zero shells


@dataclass
class ResponseFunction:
    """Zonal SH coefficients of a response, one row per shell.

    Attributes
    ----------
    bvalues : ndarray (n_shells,)
        Mean b-value of each shell (s/mm²).
    coefficients : ndarray (n_shells, n_zonal)
        Rows padded with zeros to a common width (as MRtrix3 writes them).
    lmax : list of int
        The lmax estimated for each shell.
    """

    bvalues: np.ndarray
    coefficients: np.ndarray
    lmax: list[int] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bvalues = np.asarray(self.bvalues, dtype=float).reshape(-1)
        self.coefficients = np.atleast_2d(np.asarray(self.coefficients, dtype=float))
        if self.coefficients.shape[0] != self.bvalues.size:
            raise DwiflowInputError(
                f"response has {self.coefficients.shape[0]} rows of coefficients but {self.bvalues.size} shells"
            )
        if not self.lmax:
            self.lmax = [2 * (int(np.max(np.flatnonzero(row), initial=0))) for row in self.coefficients]

    def rows_for(self, bvalues, tolerance: float = DEFAULT_SHELL_TOLERANCE) -> "ResponseFunction | None":
        """The response of these b-values only (each the row of the nearest shell it names, within ``tolerance``);
        None when it does not name its shells or lacks one of them."""
        wanted = np.asarray(bvalues, dtype=float).reshape(-1)
        if not np.all(np.isfinite(self.bvalues)):
            return None
        distance = np.abs(self.bvalues[None, :] - wanted[:, None])
        rows = np.argmin(distance, axis=1)
        if np.any(distance[np.arange(wanted.size), rows] > tolerance):
            return None
        return ResponseFunction(self.bvalues[rows], self.coefficients[rows], [self.lmax[r] for r in rows],
                                dict(self.metadata))

    def amplitude(self, shell_index: int, cos_angle: np.ndarray) -> np.ndarray:
        """Response amplitude of a shell at angles (cosines) from the fibre axis."""
        row = self.coefficients[shell_index]
        lmax = 2 * (row.size - 1)
        return zonal_sh_basis(lmax, cos_angle) @ row

    def to_text(self) -> str:
        """MRtrix3's response text format: a ``# Shells:`` line, then one row per shell."""
        lines = []
        if np.all(np.isfinite(self.bvalues)):  # external directions have no b-value
            lines.append("# Shells: " + ",".join(str(int(round(b))) for b in self.bvalues))
        for key, value in self.metadata.items():
            lines.append(f"# {key}: {value}")
        lines += [" ".join(f"{c:.10g}" for c in row) for row in self.coefficients]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_text(cls, text: str, source: str = "response") -> "ResponseFunction":
        """Parse MRtrix3's response text format (the ``# Shells:`` line is optional for one shell)."""
        rows: list[list[float]] = []
        shells: list[float] | None = None
        for line in text.splitlines():
            stripped = line.strip()
            if not stripped:
                continue
            if stripped.startswith("#"):
                key, _, value = stripped[1:].partition(":")
                if key.strip().lower() == "shells":
                    try:
                        shells = [float(v) for v in value.replace(",", " ").split()]
                    except ValueError:
                        raise DwiflowInputError(f"{source}: the '# Shells:' line holds something that is not a "
                                                "b-value") from None
                continue
            try:
                rows.append([float(v) for v in stripped.replace(",", " ").split()])
            except ValueError:
                shown = "".join(c if c.isprintable() else "?" for c in stripped[:16])
                raise DwiflowInputError(f"{source}: cannot parse a response row starting {shown!r}") from None
        if not rows:
            raise DwiflowInputError(f"{source}: no response coefficients found")
        width = max(len(r) for r in rows)
        coeffs = np.array([r + [0.0] * (width - len(r)) for r in rows])
        if shells is None:
            if len(rows) != 1:
                raise DwiflowInputError(f"{source}: {len(rows)} rows but no '# Shells:' line to say which b-values")
            shells = [np.nan]
        if len(shells) != len(rows):
            raise DwiflowInputError(f"{source}: '# Shells:' lists {len(shells)} b-values but there are {len(rows)} rows")
        return cls(np.array(shells), coeffs)


def zonal_derivative_basis(lmax: int, elevation: np.ndarray) -> np.ndarray:
    """d/dθ of the zonal harmonics sqrt((2l+1)/4π) P_l(cos θ), shape (n, lmax/2+1)."""
    lmax = check_lmax(lmax)
    theta = np.asarray(elevation, dtype=float)
    x = np.cos(theta)
    cols = []
    for l in range(0, lmax + 1, 2):
        dp = legendre.Legendre.basis(l).deriv()(x) if l else np.zeros_like(x)
        cols.append(-np.sin(theta) * np.sqrt((2 * l + 1) / (4 * np.pi)) * dp)
    return np.stack(cols, axis=-1)


def response_constraints(lmax: int, n_angles: int = 90) -> np.ndarray:
    """Rows C with C·r >= 0 meaning: amplitude >= 0 and d amplitude/dθ >= 0 for θ in 0..90°."""
    elevation = np.radians(np.linspace(0.0, 90.0, n_angles + 1))
    return np.vstack([zonal_sh_basis(lmax, np.cos(elevation)), zonal_derivative_basis(lmax, elevation)])


def nonnegative_least_squares(matrix: np.ndarray, target: np.ndarray, max_iterations: int = 0) -> np.ndarray:
    """argmin ||A u − b|| subject to u >= 0: Lawson & Hanson's active-set algorithm (1974, ch. 23), exact on
    termination.

    Our own rather than ``scipy.optimize.nnls`` for one reason: importing ``scipy.optimize`` costs every response
    command ~0.4-0.7 s (it loads scipy.sparse, scipy.spatial and the linear-programming solvers), more than the
    problems here (a few hundred constraints, a handful of unknowns) take to solve.
    """
    a = np.asarray(matrix, dtype=float)
    b = np.asarray(target, dtype=float)
    n = a.shape[1]
    max_iterations = max_iterations or 3 * n
    tolerance = 10.0 * max(a.shape) * np.finfo(float).eps * max(np.abs(a).sum(axis=0).max(), 1.0)
    passive = np.zeros(n, dtype=bool)
    u = np.zeros(n)
    gradient = a.T @ b
    iterations = 0
    while not passive.all() and np.where(passive, -np.inf, gradient).max() > tolerance:
        passive[np.argmax(np.where(passive, -np.inf, gradient))] = True
        while True:
            iterations += 1
            if iterations > max_iterations:
                raise DwiflowInputError("non-negative least squares did not converge")
            trial = np.zeros(n)
            trial[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if trial[passive].min() > 0:
                u = trial
                break
            blocking = passive & (trial <= 0)
            step = np.min(u[blocking] / (u[blocking] - trial[blocking]))
            u = u + step * (trial - u)
            passive &= u > tolerance
            u[~passive] = 0.0
        gradient = a.T @ (b - a @ u)
    return u


def solve_convex_qp(hessian: np.ndarray, linear: np.ndarray, constraints: np.ndarray) -> np.ndarray:
    """Minimise ½ xᵀHx − bᵀx subject to Cx >= 0, for positive-definite H (exact, via NNLS).

    With H = LLᵀ and y = Lᵀx the problem is the least-distance problem min ||y − L⁻¹b||
    subject to CL⁻ᵀy >= 0, which Lawson & Hanson (1974, ch. 23) reduce to one NNLS problem.
    """
    chol = np.linalg.cholesky(hessian)
    unconstrained = np.linalg.solve(hessian, linear)
    if np.all(constraints @ unconstrained >= -1e-12 * np.abs(constraints @ unconstrained).max(initial=1.0)):
        return unconstrained
    y0 = np.linalg.solve(chol, linear)
    g = np.linalg.solve(chol, constraints.T).T  # C L^-T
    h = -g @ y0
    n = g.shape[1]
    e = np.vstack([g.T, h[None, :]])
    f = np.zeros(n + 1)
    f[-1] = 1.0
    u = nonnegative_least_squares(e, f, max_iterations=50 * e.shape[1])
    r = e @ u - f
    if abs(r[-1]) < 1e-14:
        raise DwiflowInputError("response constraints are infeasible")
    z = -r[:n] / r[-1]
    return np.linalg.solve(chol.T, z + y0)


def _normal_equations(
    amplitudes: np.ndarray, fibre_dirs: np.ndarray, gradient_dirs: np.ndarray, lmax: int, chunk: int = 20000
) -> tuple[np.ndarray, np.ndarray]:
    """Σ_v TᵥᵀTᵥ and Σ_v Tᵥᵀaᵥ, with Tᵥ the zonal basis at each gradient's angle to voxel v's fibre."""
    n_zonal = lmax // 2 + 1
    hessian = np.zeros((n_zonal, n_zonal))
    rhs = np.zeros(n_zonal)
    for sl in iter_chunks(amplitudes.shape[0], chunk):
        cos = np.abs(fibre_dirs[sl] @ gradient_dirs.T)  # (v, n)
        design_t = zonal_sh_basis_rows(lmax, cos)  # (n_zonal, v*n), rows contiguous
        hessian += design_t @ design_t.T
        rhs += design_t @ amplitudes[sl].ravel()
    return hessian, rhs


def check_fibre_directions(directions: np.ndarray, name: str = "directions") -> np.ndarray:
    """Normalise (n, 3) fibre directions; NaN, infinite or zero vectors are an error."""
    d = np.asarray(directions, dtype=float)
    if d.ndim != 2 or d.shape[1] != 3:
        raise DwiflowInputError(f"{name}: expected 3 values per voxel, got shape {d.shape}")
    norms = np.linalg.norm(d, axis=1)
    bad = ~np.isfinite(norms) | (norms < 1e-9)
    if bad.any():
        raise DwiflowInputError(
            f"{name}: {int(bad.sum())} of the {d.shape[0]} selected voxels have a NaN or zero fibre direction"
        )
    return d / norms[:, None]


def select_shells(gtab: GradientTable, shells: list[float] | None) -> list[Shell]:
    """The shells to estimate: all of them (b=0 first) or those nearest the requested b-values."""
    if shells is None:
        return list(gtab.shells)
    chosen = [gtab.find_shell(b) for b in shells]
    return sorted({id(s): s for s in chosen}.values(), key=lambda s: s.bvalue)


def amp2response(
    signals: np.ndarray,
    fibre_dirs: np.ndarray,
    gtab: GradientTable | None = None,
    *,
    directions: np.ndarray | None = None,
    shells: list[float] | None = None,
    lmax: list[int] | int | None = None,
    isotropic: bool = False,
    constrained: bool = True,
) -> ResponseFunction:
    """Estimate a response from single-fibre voxels, all voxels in one problem per shell.

    Parameters
    ----------
    signals : ndarray (n_voxels, n_volumes)
        Signals (or amplitudes) of the selected voxels.
    fibre_dirs : ndarray (n_voxels, 3)
        Fibre direction of each voxel, in the same frame as the gradient directions.
    gtab : GradientTable
        Gradient table of the volumes (world frame). Not needed with ``directions``.
    directions : ndarray (n_volumes, 3), optional
        External directions along which ``signals`` are sampled (one "shell").
    shells : list of float, optional
        Approximate b-values of the shells to use (default: every shell, b=0 included).
    lmax : int or list of int, optional
        Per-shell lmax (default 10, and 0 for b=0, as MRtrix3 3.0.3).
    isotropic : bool
        lmax 0 for every shell.
    constrained : bool
        Non-negativity and monotonicity constraints (``False`` is MRtrix3's ``-noconstraint``).

    Returns
    -------
    ResponseFunction
    """
    signals = np.asarray(signals, dtype=float)
    if signals.ndim != 2 or signals.shape[0] == 0:
        raise DwiflowInputError("no voxel selected for the response (the single-fibre mask is empty)")
    fibre_dirs = check_fibre_directions(fibre_dirs)
    if fibre_dirs.shape[0] != signals.shape[0]:
        raise DwiflowInputError(f"{signals.shape[0]} voxels of signal but {fibre_dirs.shape[0]} fibre directions")
    if not np.all(np.isfinite(signals)):
        raise DwiflowInputError("the selected voxels contain non-finite signal values")
    if directions is not None:
        dirs = np.asarray(directions, dtype=float)
        if dirs.shape != (signals.shape[1], 3):
            raise DwiflowInputError(f"directions: expected {signals.shape[1]} rows of 3 values, got shape {dirs.shape}")
        dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
        groups = [(np.nan, np.arange(signals.shape[1]), dirs, False)]
    else:
        if gtab is None:
            raise DwiflowInputError("give a gradient table or external directions")
        if gtab.n_volumes != signals.shape[1]:
            raise DwiflowInputError(f"signals have {signals.shape[1]} volumes but the gradient table has {gtab.n_volumes}")
        groups = [(s.bvalue, s.indices, gtab.bvecs[s.indices], s.is_b0) for s in select_shells(gtab, shells)]
    if isotropic:
        lmaxes = [0] * len(groups)
    elif lmax is None:
        lmaxes = [0 if is_b0 else DEFAULT_LMAX for (_, _, _, is_b0) in groups]
    else:
        lmaxes = [lmax] * len(groups) if np.isscalar(lmax) else list(lmax)
        if len(lmaxes) != len(groups):
            raise DwiflowInputError(f"{len(lmaxes)} lmax values given for {len(groups)} shells")
        lmaxes = [check_lmax(l, "lmax") for l in lmaxes]
    width = max(lmaxes) // 2 + 1
    coeffs = np.zeros((len(groups), width))
    for row, ((bvalue, idx, dirs, is_b0), l) in enumerate(zip(groups, lmaxes)):
        if is_b0 and l > 0:
            raise DwiflowInputError(f"lmax {l} requested for the b=0 shell, which has no orientation contrast; use 0")
        hessian, rhs = _normal_equations(signals[:, idx], fibre_dirs, dirs, l)
        eig = np.linalg.eigvalsh(hessian)
        if eig.min() <= 1e-10 * eig.max():
            raise DwiflowInputError(f"lmax {l} is too high for shell b={bvalue:.0f} with these voxels and directions")
        if constrained and l > 0:
            coeffs[row, : l // 2 + 1] = solve_convex_qp(hessian, rhs, response_constraints(l))
        else:
            coeffs[row, : l // 2 + 1] = np.linalg.solve(hessian, rhs)
    bvalues = np.array([g[0] for g in groups])
    return ResponseFunction(bvalues, coeffs, lmaxes, {"Voxels": signals.shape[0]})


def top_voxels(scores: np.ndarray, mask: np.ndarray, number: int) -> np.ndarray:
    """Boolean mask of the ``number`` voxels of ``mask`` with the highest ``scores`` (FA, a cost function…;
    MRtrix3 ``mrthreshold -top``). Non-finite values never qualify."""
    if number < 1:
        raise DwiflowInputError(f"number of voxels must be >= 1, got {number}")
    candidates = np.flatnonzero(mask.ravel() & np.isfinite(scores.ravel()))
    if candidates.size == 0:
        raise DwiflowInputError("no candidate voxel (finite FA or score) inside the mask; give a larger mask or fewer erosions")
    values = scores.ravel()[candidates]
    keep = candidates[np.argsort(-values, kind="stable")[: min(number, candidates.size)]]
    out = np.zeros(scores.size, dtype=bool)
    out[keep] = True
    return out.reshape(scores.shape)


def roi_mask(shape: tuple[int, int, int], center: tuple[int, int, int] | None, radii: int | tuple[int, int, int]) -> np.ndarray:
    """Cuboid ROI of ``radii`` around ``center`` (default: the volume's centre), as in DIPY.

    A radius that would leave the volume is shrunk to min(center, size - center) along that axis.
    """
    shape = tuple(int(s) for s in shape[:3])
    radii_arr = np.array([radii] * 3 if np.isscalar(radii) else list(radii), dtype=int)
    if radii_arr.size != 3 or np.any(radii_arr < 0):
        raise DwiflowInputError(f"roi radii must be one or three non-negative integers, got {radii}")
    c = np.array(shape) // 2 if center is None else np.array(center, dtype=int)
    if c.size != 3 or np.any(c < 0) or np.any(c >= np.array(shape)):
        raise DwiflowInputError(f"roi centre {tuple(c)} lies outside the volume of shape {shape}")
    for i in range(3):
        if c[i] - radii_arr[i] < 0 or c[i] + radii_arr[i] >= shape[i]:
            radii_arr[i] = min(c[i], shape[i] - c[i])
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(max(c[i] - radii_arr[i], 0), c[i] + radii_arr[i] + 1) for i in range(3))] = True
    return mask


@dataclass
class SsstResponse:
    """SSST response: tensor eigenvalues (λ1, λ2, λ2), mean b=0 signal and the voxels used."""

    evals: np.ndarray
    s0: float
    voxel_mask: np.ndarray
    n_voxels: int

    @property
    def ratio(self) -> float:
        return float(self.evals[1] / self.evals[0])


def mask_for_response_ssst(
    data: np.ndarray,
    gtab: GradientTable,
    roi_center: tuple[int, int, int] | None = None,
    roi_radii: int | tuple[int, int, int] = 10,
    fa_threshold: float = 0.7,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Voxels inside the central ROI (and ``mask``) whose tensor FA exceeds ``fa_threshold``."""
    gtab = checked_gradient_table(gtab, "mask_for_response_ssst")
    data = np.asarray(data)
    if data.ndim != 4:
        raise DwiflowInputError(f"data must be 4D (x, y, z, volumes), got {data.ndim}D")
    if not 0 <= fa_threshold < 1:
        raise DwiflowInputError(f"fa_threshold must be in [0, 1), got {fa_threshold}", parameters=("fa_threshold",))
    roi = roi_mask(data.shape[:3], roi_center, roi_radii)
    if mask is not None:
        roi &= np.asarray(mask, dtype=bool)
    if not roi.any():
        raise DwiflowInputError("the response ROI does not overlap the mask; move roi_center or enlarge roi_radii",
                                parameters=("roi_center", "roi_radii"))
    fit = TensorModel(gtab).fit(data, roi)
    fa = np.nan_to_num(fit.fa, nan=0.0)
    selected = fa > fa_threshold
    if not selected.any():
        raise DwiflowInputError(
            f"no voxel with FA > {fa_threshold:g} among the {int(roi.sum())} voxels of the ROI "
            f"(highest FA {fa[roi].max():.2f}); lower fa_threshold or enlarge roi_radii",
            parameters=("fa_threshold", "roi_radii"),
        )
    return selected


def response_from_mask_ssst(data: np.ndarray, gtab: GradientTable, voxel_mask: np.ndarray) -> SsstResponse:
    """Mean tensor eigenvalues (λ1, λ2, λ2) and mean b=0 signal of the voxels in ``voxel_mask``."""
    voxel_mask = np.asarray(voxel_mask, dtype=bool)
    n = int(voxel_mask.sum())
    if n == 0:
        raise DwiflowInputError("the response voxel mask is empty")
    if not gtab.b0s_mask.any():
        raise DwiflowInputError("SSST needs b=0 volumes to estimate S0")
    signals = np.asarray(data[voxel_mask], dtype=float)
    fit = TensorModel(gtab).fit(signals)
    lambdas = fit.evals[:, :2]
    if not np.all(np.isfinite(lambdas)):
        raise DwiflowInputError("the tensor fit failed in some response voxels (non-finite or zero signal)")
    mean = lambdas.mean(axis=0)
    s0 = float(signals[:, gtab.b0s_mask].mean())
    return SsstResponse(np.array([mean[0], mean[1], mean[1]]), s0, voxel_mask, n)


def tensor_response_zonal(
    evals: np.ndarray, s0: float, bvalues: np.ndarray, lmax: list[int] | int = DEFAULT_LMAX, n_quadrature: int = 64
) -> ResponseFunction:
    """Zonal SH of an axially symmetric tensor response S0·exp(−b(λ⊥ + (λ∥−λ⊥)cos²θ)) per shell.

    Coefficients are exact up to quadrature (Gauss-Legendre in cos θ, ``n_quadrature`` nodes).
    """
    bvalues = np.asarray(bvalues, dtype=float)
    lmaxes = [lmax] * bvalues.size if np.isscalar(lmax) else list(lmax)
    nodes, weights = legendre.leggauss(n_quadrature)
    l_par, l_perp = float(evals[0]), float(evals[1])
    width = max(lmaxes) // 2 + 1
    coeffs = np.zeros((bvalues.size, width))
    for i, (b, l) in enumerate(zip(bvalues, lmaxes)):
        kernel = s0 * np.exp(-b * (l_perp + (l_par - l_perp) * nodes**2))
        coeffs[i, : l // 2 + 1] = 2 * np.pi * (weights * kernel) @ zonal_sh_basis(l, nodes)
    return ResponseFunction(bvalues, coeffs, lmaxes)


def fa_response_voxels(
    data: np.ndarray,
    gtab: GradientTable,
    brain_mask: np.ndarray,
    *,
    erode: int = 3,
    number: int = 300,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel selection of MRtrix3's ``dwi2response fa``: the highest-FA voxels of the eroded mask.

    The brain mask is eroded ``erode`` times (6-connected; voxels on the image border are not
    eroded by it, so thin slabs survive), the tensor is fitted inside it, and the ``number``
    voxels of highest FA are kept.

    Returns
    -------
    voxels : ndarray (x, y, z) of bool
    directions : ndarray (x, y, z, 3)
        Principal eigenvectors (world frame), the fibre directions for :func:`amp2response`.
    fa : ndarray (x, y, z)
    """
    gtab = checked_gradient_table(gtab, "fa_response_voxels")
    from scipy import ndimage

    brain_mask = np.asarray(brain_mask, dtype=bool)
    if not brain_mask.any():
        raise DwiflowInputError("the brain mask is empty")
    if erode < 0:
        raise DwiflowInputError(f"erode must be >= 0, got {erode}")
    eroded = ndimage.binary_erosion(brain_mask, iterations=erode, border_value=1) if erode else brain_mask
    if not eroded.any():
        raise DwiflowInputError(f"the brain mask is empty after {erode} erosions; use fewer", parameters=("erode",))
    fit = TensorModel(gtab).fit(data, eroded)
    fa = np.where(fit.status == 0, fit.fa, np.nan)
    voxels = top_voxels(fa, eroded, number)
    return voxels, fit.v1, fa


def same_shells(a, b, tolerance: float = DEFAULT_SHELL_TOLERANCE) -> bool:
    """Whether two lists of b-values name the same shells: as many, each within ``tolerance`` of its partner."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= tolerance))


def response_mean(responses: list[ResponseFunction], legacy: bool = False) -> ResponseFunction:
    """The group-average response, as MRtrix3's ``responsemean``: each input is first scaled by the geometric mean,
    over shells, of (group-mean l=0 term / its own l=0 term), which removes global intensity differences between
    runs; then the coefficients are averaged. ``legacy`` averages without scaling (MRtrix3's ``-legacy``).

    Every response must have the same number of shells (rows); when they name their b-values, these must agree
    within 80 s/mm². Rows shorter than the widest are padded with zeros.
    """
    if not responses:
        raise DwiflowInputError("no response to average", parameters=("responses",))
    rows = responses[0].coefficients.shape[0]
    for i, r in enumerate(responses[1:], start=2):
        if r.coefficients.shape[0] != rows:
            raise DwiflowInputError(f"response {i} has {r.coefficients.shape[0]} b-values (rows) but the first has "
                                    f"{rows}", parameters=("responses",))
        if np.all(np.isfinite(r.bvalues)) and np.all(np.isfinite(responses[0].bvalues)):
            if not same_shells(r.bvalues, responses[0].bvalues):
                raise DwiflowInputError(
                    f"response {i} is for b={', '.join(f'{b:.0f}' for b in r.bvalues)} but the first for "
                    f"b={', '.join(f'{b:.0f}' for b in responses[0].bvalues)}", parameters=("responses",))
    width = max(r.coefficients.shape[1] for r in responses)
    stack = np.stack([np.pad(r.coefficients, ((0, 0), (0, width - r.coefficients.shape[1]))) for r in responses])
    if legacy:
        multipliers = np.ones(len(responses))
    else:
        l0 = stack[:, :, 0]
        if np.any(l0 <= 0):
            raise DwiflowInputError("a response has a non-positive l=0 term; cannot scale it to the group "
                                    "(use legacy averaging)", parameters=("responses",))
        multipliers = np.exp(np.mean(np.log(l0.mean(axis=0)[None, :] / l0), axis=1))
    mean = (multipliers[:, None, None] * stack).sum(axis=0) / len(responses)
    bvalues = np.mean([r.bvalues for r in responses], axis=0)
    return ResponseFunction(bvalues, mean, metadata={"Runs": len(responses)})
