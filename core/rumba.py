"""RUMBA-SD: robust and unbiased model-based spherical deconvolution.

The signal of a voxel is modelled as a non-negative mixture of white-matter "sticks" (one
tensor response per direction of a dense, antipodally symmetric sphere) plus optional
grey-matter and CSF isotropic compartments, ``S = H f``. The mixture ``f`` is the
maximum-likelihood estimate under Rician (``smf``) or noncentral-chi (``sos``, ``n`` coils)
noise, reached by Richardson–Lucy-type multiplicative updates, with the noise variance
re-estimated at each iteration (Canales-Rodríguez et al. 2015). The global variant iterates
the whole volume at once and multiplies each update by a total-variation factor whose
weight follows the estimated noise variance (discrepancy principle; Rudin, Osher & Fatemi
1992; Chambolle 2004).

What makes this fast (the results equal the textbook iteration up to float rounding):

* all voxels of a chunk iterate together, so every product is a matrix–matrix product;
* on a symmetric sphere the two vertices of an antipodal pair have identical kernel columns,
  start equal and receive identical updates, so the iteration runs on one hemisphere with
  the white-matter columns doubled (half the work), and the amplitudes are mirrored at the end;
* ``Hᵀ(H f)`` reuses the already computed ``H f`` in one stacked product with the numerator;
* float32 arithmetic by default (float64 on request).

References
----------
Canales-Rodríguez E.J., Daducci A., Sotiropoulos S.N., et al. Spherical deconvolution of
multichannel diffusion MRI data with non-Gaussian noise models and spatial regularization.
PLoS ONE 10 (2015) e0138910.
Dell'Acqua F., Rizzo G., Scifo P., et al. A model-based deconvolution approach to solve fiber
crossing in diffusion-weighted MR imaging. IEEE Trans Biomed Eng 54 (2007) 462-472.
Rudin L.I., Osher S., Fatemi E. Nonlinear total variation based noise removal algorithms.
Physica D 60 (1992) 259-268.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from dwiflow.core.defaults import RUMBA_CSF_DIFFUSIVITY, RUMBA_GM_DIFFUSIVITY, RUMBA_WM_RESPONSE
from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import GradientTable, checked_gradient_table
from dwiflow.core.sphere import Sphere, sphere_vertices
from dwiflow.core.status import FitStatus, input_status
from dwiflow.core.voxels import VoxelBatch, VoxelFit, iter_chunks

SIGMA0 = 1.0 / 15.0  # initial noise level (S0 = 1): SNR 15
SIGMA2_MIN = (1.0 / 80.0) ** 2  # the noise variance is kept within SNR 8..80
SIGMA2_MAX = (1.0 / 8.0) ** 2
TV_LAMBDA_MIN = (1.0 / 30.0) ** 2  # floor of the global TV weight (R = 1)
TV_EPSILON = 1e-7  # smoothing of |grad f| in the TV term
_EPS = float(np.finfo(float).eps)  # guards divisions, as the reference implementation

STATUS_CODES = (FitStatus.OK, FitStatus.NONFINITE_INPUT, FitStatus.NO_SIGNAL, FitStatus.SIGNAL_ABOVE_B0,
                FitStatus.NO_SOLUTION)


def mbessel_ratio(order: int, x: np.ndarray) -> np.ndarray:
    """``I_order(x) / I_(order-1)(x)`` by Perron's continued fraction, truncated after four levels.

    The truncation is the one of the RUMBA-SD reference code (Gautschi & Slavik 1978); it is
    accurate to better than 1e-3 for all x >= 0 at the orders used here.
    """
    n = float(order)
    two_x = 2.0 * x
    tail = 2 * n + 3 + two_x
    tail = 2 * n + 2 + two_x - two_x * (n + 2.5) / tail
    tail = 2 * n + 1 + two_x - two_x * (n + 1.5) / tail
    return x / (2 * n + x - two_x * (n + 0.5) / tail)


def _dipy_style_frames(directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Second and third tensor axes for each principal axis: the images of ŷ and ẑ under the
    rotation taking x̂ to the axis about x̂ × axis (DIPY's ``all_tensor_evecs``), so that
    tensors with three distinct eigenvalues are oriented as DIPY orients them."""
    v = np.asarray(directions, dtype=float)
    x_axis = np.array([1.0, 0.0, 0.0])
    cos_a = np.clip(v[:, 0], -1.0, 1.0)
    k = np.cross(x_axis, v)
    k_norm = np.linalg.norm(k, axis=1)
    e1 = np.tile([0.0, 1.0, 0.0], (len(v), 1))
    e2 = np.tile([0.0, 0.0, 1.0], (len(v), 1))
    rotate = k_norm >= _EPS
    kk = k[rotate] / k_norm[rotate, None]
    sin_a = np.sqrt(1.0 - cos_a[rotate] ** 2)
    for e in (e1, e2):
        x = e[rotate]
        # Rodrigues: R x = x cos a + (k × x) sin a + k (k·x)(1 - cos a)
        e[rotate] = (x * cos_a[rotate, None] + np.cross(kk, x) * sin_a[:, None]
                     + kk * np.einsum("ij,ij->i", kk, x)[:, None] * (1.0 - cos_a[rotate, None]))
    flipped = ~rotate & (cos_a < 0)  # axis = -x̂: the reference uses -I
    e1[flipped] *= -1.0
    e2[flipped] *= -1.0
    return e1, e2


def check_wm_response(wm_response, n_shells: int) -> np.ndarray:
    """Validate white-matter tensor eigenvalues: (3,) for all shells or (n_shells, 3), λ1 ≥ λ2 ≥ λ3 > 0."""
    evals = np.asarray(wm_response, dtype=float)
    if evals.ndim == 1:
        evals = evals[None, :]
    if evals.ndim != 2 or evals.shape[1] != 3 or evals.shape[0] not in (1, n_shells):
        raise DwiflowInputError(f"wm_response must be 3 tensor eigenvalues, or one triplet per diffusion-weighted "
                                f"shell ({n_shells}), got shape {np.shape(wm_response)}")
    if not np.all(np.isfinite(evals)) or np.any(evals <= 0):
        raise DwiflowInputError(f"wm_response eigenvalues must be positive diffusivities (mm²/s), got {evals.tolist()}")
    if np.any(np.diff(evals, axis=1) > 0):
        raise DwiflowInputError(f"wm_response eigenvalues must be in decreasing order (λ1 ≥ λ2 ≥ λ3), got "
                                f"{evals.tolist()}")
    if np.any(evals > 5e-3):
        raise DwiflowInputError(f"wm_response eigenvalues {evals.tolist()} exceed 5e-3 mm²/s: are they in mm²/s?")
    return np.broadcast_to(evals, (n_shells, 3)).copy()


def _check_isotropic(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    v = float(value)
    if not np.isfinite(v) or v <= 0 or v > 5e-3:
        raise DwiflowInputError(f"{name} must be a positive diffusivity in mm²/s (e.g. 3e-3), or none; got {value!r}")
    return v


def rumba_kernel(
    gtab: GradientTable,
    directions: np.ndarray,
    wm_response=RUMBA_WM_RESPONSE,
    gm_diffusivity: float | None = RUMBA_GM_DIFFUSIVITY,
    csf_diffusivity: float | None = RUMBA_CSF_DIFFUSIVITY,
) -> np.ndarray:
    """The RUMBA-SD kernel: signal (one b=0 row, then every diffusion-weighted volume) of unit
    fractions of each compartment.

    Parameters
    ----------
    gtab : GradientTable
    directions : ndarray (m, 3)
        Unit fibre directions (same frame as the gradients).
    wm_response : (3,) or (n_shells, 3)
        Tensor eigenvalues of a single fibre (mm²/s), λ1 along the fibre; per shell when 2D.
    gm_diffusivity, csf_diffusivity : float or None
        Mean diffusivities of the isotropic compartments; None gives an all-zero column
        (that compartment stays at 0).

    Returns
    -------
    ndarray (1 + n_dw, m + 2)
        Columns: the m fibre directions, then GM, then CSF. Row 0 is b=0 (all ones for the
        present compartments).
    """
    dw = ~gtab.b0s_mask
    bvals, bvecs = gtab.bvals[dw], gtab.bvecs[dw]
    shells = [s for s in gtab.shells if not s.is_b0]
    evals = check_wm_response(wm_response, len(shells))
    gm = _check_isotropic(gm_diffusivity, "gm_response")
    csf = _check_isotropic(csf_diffusivity, "csf_response")
    dirs = np.asarray(directions, dtype=float)
    e1, e2 = _dipy_style_frames(dirs)
    n_dw = int(dw.sum())
    kernel = np.zeros((1 + n_dw, dirs.shape[0] + 2))
    kernel[0, :-2] = 1.0
    dw_index = np.flatnonzero(dw)
    row_of = {v: i for i, v in enumerate(dw_index)}
    for shell, (l1, l2, l3) in zip(shells, evals):
        rows = np.array([row_of[i] for i in shell.indices])
        g, b = bvecs[rows], bvals[rows, None]
        quad = l1 * (g @ dirs.T) ** 2 + l2 * (g @ e1.T) ** 2 + l3 * (g @ e2.T) ** 2
        kernel[1 + rows, :-2] = np.exp(-b * quad)
    all_b = np.concatenate([[0.0], bvals])
    if gm is not None:
        kernel[:, -2] = np.exp(-all_b * gm)
    if csf is not None:
        kernel[:, -1] = np.exp(-all_b * csf)
    return kernel


def normalise_signal(signal: np.ndarray, gtab: GradientTable) -> tuple[np.ndarray, np.ndarray]:
    """Signals divided by the mean b=0, as [1, diffusion-weighted volumes…], clipped to [eps, 1].

    Returns the normalised rows (n, 1 + n_dw) and the mean b=0 of each voxel (values below
    machine epsilon count as epsilon, as in the reference implementation).
    """
    s = np.maximum(np.asarray(signal, dtype=float), _EPS)
    b0 = s[:, gtab.b0s_mask].mean(axis=1)
    out = np.empty((s.shape[0], 1 + int((~gtab.b0s_mask).sum())))
    out[:, 0] = 1.0
    out[:, 1:] = s[:, ~gtab.b0s_mask] / b0[:, None]
    np.minimum(out, 1.0, out=out)
    return out, b0


def antipodal_pairs(vertices: np.ndarray, tolerance: float = 1e-6) -> np.ndarray | None:
    """For a symmetric sphere, ``partner[i]`` is the index of ``-vertices[i]``; None otherwise."""
    v = np.asarray(vertices, dtype=float)
    dots = v @ v.T
    partner = np.argmin(dots, axis=1)
    if np.any(dots[np.arange(len(v)), partner] > -1 + tolerance) or np.any(partner[partner] != np.arange(len(v))):
        return None
    return partner


@dataclass
class _ReducedKernel:
    """The kernel restricted to one vertex of each antipodal pair (white-matter columns doubled)."""

    matrix: np.ndarray  # (n_rows, n_reduced)
    keep: np.ndarray  # reduced column → full column (white matter) indices of the kept vertices
    partner: np.ndarray | None
    n_wm: int

    @classmethod
    def build(cls, kernel: np.ndarray, vertices: np.ndarray) -> "_ReducedKernel":
        n_wm = vertices.shape[0]
        partner = antipodal_pairs(vertices)
        if partner is None:
            return cls(kernel.copy(), np.arange(n_wm), None, n_wm)
        keep = np.flatnonzero(np.arange(n_wm) < partner)
        matrix = np.concatenate([2.0 * kernel[:, keep], kernel[:, n_wm:]], axis=1)
        return cls(matrix, keep, partner, n_wm)

    @property
    def n_reduced_wm(self) -> int:
        return self.keep.size

    def expand(self, reduced: np.ndarray) -> np.ndarray:
        """Reduced fractions (n, k) → full (n, n_wm + 2) with both vertices of a pair equal."""
        out = np.empty((reduced.shape[0], self.n_wm + 2), dtype=reduced.dtype)
        k = self.n_reduced_wm
        out[:, self.keep] = reduced[:, :k]
        if self.partner is not None:
            out[:, self.partner[self.keep]] = reduced[:, :k]
        out[:, -2:] = reduced[:, k:]
        return out


def available_cores() -> int:
    """CPU cores this process may use: its CPU affinity, capped by ``OMP_NUM_THREADS`` when set
    (``dwiflow --omp-nthreads`` and the per-stage CPUs of a cluster job set it)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    limit = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(cores, int(limit))) if limit.isdigit() and int(limit) > 0 else cores


@contextmanager
def _parallel(n_threads: int):
    """A thread pool of ``n_threads`` with single-threaded BLAS inside (chunks run side by side rather
    than BLAS splitting small products, which scales far better for these matrix sizes)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=n_threads) as pool:
        yield pool


def _noise_order(recon_type: str, n_coils: int | None) -> int:
    if recon_type == "smf":
        return 1  # Rician: noncentral chi of order 1
    if recon_type == "sos":
        if n_coils is None:
            raise DwiflowInputError("recon_type 'sos' (sum of squares, noncentral-chi noise) needs n_coils, the number "
                                    "of receiver coils")
        return int(n_coils)
    raise DwiflowInputError(f"recon_type must be 'smf' or 'sos', got {recon_type!r}")


class _Iteration:
    """State of the multiplicative updates for a set of voxels, one row per voxel.

    ``f`` is (n + extra_rows, k): fractions of the n voxels (rows; chunks of rows are
    contiguous) and, for the TV neighbour tables, trailing all-zero rows that are never updated.
    """

    def __init__(self, kernel: np.ndarray, signal: np.ndarray, order: int, dtype, n_components: int,
                 extra_rows: int = 0):
        self.kernel = np.ascontiguousarray(kernel, dtype=dtype)  # (N, k)
        self.kernel_t = np.ascontiguousarray(self.kernel.T)  # (k, N)
        self.signal = np.ascontiguousarray(signal, dtype=dtype)  # (n, N)
        self.order = order
        self.dtype = dtype
        self.n = n = signal.shape[0]
        # iso-probable start over the full set of components (both vertices of each antipodal pair)
        self.f = np.zeros((n + extra_rows, kernel.shape[1]), dtype=dtype)
        self.f[:n] = 1.0 / n_components
        self.reblurred = self.f[:n] @ self.kernel_t  # (n, N)
        self.sigma2 = np.full(n, SIGMA0**2, dtype=dtype)
        self.scaled = self.signal * self.reblurred / self.sigma2[:, None]
        self.sum_s2 = (self.signal.astype(float) ** 2).sum(axis=1)

    def step(self, extra_factor: np.ndarray | None = None, rows: slice | None = None) -> None:
        """One update of f, the reblurred signal and the noise variance of ``rows`` (default: all voxels)."""
        sl = slice(0, self.n) if rows is None else rows
        s = self.signal[sl]
        ratio = mbessel_ratio(self.order, self.scaled[sl])
        n = s.shape[0]
        stack = np.empty((2 * n, s.shape[1]), dtype=self.dtype)  # per call: chunks may run in parallel
        np.multiply(s, ratio, out=stack[:n])
        stack[n:] = self.reblurred[sl]
        products = stack @ self.kernel  # (2n, k): Hᵀ(S∘ratio) and Hᵀ(H f) in one product
        factor = products[:n]
        factor /= products[n:] + _EPS
        if extra_factor is not None:
            factor *= extra_factor
        f = self.f[sl]
        f *= factor
        np.maximum(f, 0, out=f)
        reblurred = f @ self.kernel_t
        self.reblurred[sl] = reblurred
        sigma2_old = self.sigma2[sl]
        self.scaled[sl] = s * reblurred / sigma2_old[:, None]
        cross = np.einsum("ij,ij->i", s * reblurred, ratio, dtype=float)
        sigma2 = 0.5 * (self.sum_s2[sl] + np.einsum("ij,ij->i", reblurred, reblurred, dtype=float)) - cross
        sigma2 /= s.shape[1] * self.order
        self.sigma2[sl] = np.clip(sigma2, SIGMA2_MIN, SIGMA2_MAX)


@dataclass(frozen=True)
class _TvTables:
    """Neighbour tables of the TV term over the bounding box of the fitted voxels.

    The normalised gradient is needed at the mask voxels and at the box voxels just before
    them on each axis (outside the mask, f = 0 there but the gradient is not): together the
    "active" voxels. Rows index ``f``; ``zero_row`` is an all-zero row of ``f``.
    """

    self_row: np.ndarray  # (n_active,) row of f of each active voxel (zero_row outside the mask)
    forward: np.ndarray  # (n_active, 3) row of the +x/+y/+z neighbour; self_row at the box's upper edge
    active_of_voxel: np.ndarray  # (n,) active index of each mask voxel
    backward: np.ndarray  # (n, 3) active index of the -x/-y/-z neighbour; n_active (a zero row) at the lower edge
    n_active: int

    @classmethod
    def build(cls, box_index: tuple, box_shape: tuple, zero_row: int) -> "_TvTables":
        n = box_index[0].size
        mask = np.zeros(box_shape, bool)
        mask[box_index] = True
        row = np.full(box_shape, zero_row, dtype=np.int64)
        row[box_index] = np.arange(n)
        active = mask.copy()
        for axis in range(3):
            before = [slice(None)] * 3
            after = [slice(None)] * 3
            before[axis], after[axis] = slice(0, -1), slice(1, None)
            active[tuple(before)] |= mask[tuple(after)]
        act = np.nonzero(active)
        n_active = act[0].size
        active_index = np.full(box_shape, n_active, dtype=np.int64)
        active_index[act] = np.arange(n_active)
        self_row = row[act]
        forward = np.empty((n_active, 3), dtype=np.int64)
        backward = np.empty((n, 3), dtype=np.int64)
        for axis in range(3):
            nxt = list(act)
            at_edge = act[axis] + 1 >= box_shape[axis]
            nxt[axis] = np.minimum(act[axis] + 1, box_shape[axis] - 1)
            forward[:, axis] = np.where(at_edge, self_row, row[tuple(nxt)])
            prev = list(box_index)
            at_start = box_index[axis] == 0
            prev[axis] = np.maximum(box_index[axis] - 1, 0)
            backward[:, axis] = np.where(at_start, n_active, active_index[tuple(prev)])
        return cls(self_row, forward, active_index[box_index], backward, n_active)


@dataclass
class RumbaFit(VoxelFit):
    """Result of :meth:`RumbaSDModel.fit`; every public array is shaped like the input volume.

    Attributes
    ----------
    fractions : ndarray (..., m + 2), in the model's precision (float32 by default)
        fODF amplitudes on the model sphere, then GM and CSF fractions; each voxel sums to 1.
    mask, status : ndarray (...)
        The fitted voxels and their :class:`~dwiflow.core.status.FitStatus` codes.
    fractions_rows, sigma2_rows, status_rows : ndarray (n_voxels, ...)
        The same per masked voxel; ``sigma2`` is the final noise variance (S0 = 1 units).
    """

    model: "RumbaSDModel"
    batch: VoxelBatch
    fractions_rows: np.ndarray
    sigma2_rows: np.ndarray
    status_rows: np.ndarray

    @property
    def fractions(self) -> np.ndarray:
        return self.volume(self.fractions_rows)

    @property
    def odf_rows(self) -> np.ndarray:
        return self.fractions_rows[:, :-2]

    def odf(self, sphere=None) -> np.ndarray:
        """fODF (…, m): volume fractions on the model sphere (``sphere=None``), or the SH fit of degree 8
        evaluated on another sphere (a name, a Sphere or (m, 3) unit vectors); NaN outside the mask."""
        if sphere is None:
            return self.volume(self.odf_rows)
        from dwiflow.core.sh import real_sh_basis

        return self.volume(self.odf_sh_rows(8) @ real_sh_basis(8, sphere_vertices(sphere)).T)

    @property
    def f_gm(self) -> np.ndarray:
        return self.volume(self.fractions_rows[:, -2])

    @property
    def f_csf(self) -> np.ndarray:
        return self.volume(self.fractions_rows[:, -1])

    @property
    def f_wm(self) -> np.ndarray:
        return self.volume(self.fractions_rows[:, :-2].sum(axis=1))

    @property
    def f_iso(self) -> np.ndarray:
        return self.volume(self.fractions_rows[:, -2:].sum(axis=1))

    def combined_odf_rows(self) -> np.ndarray:
        """fODF plus the isotropic fraction spread evenly over the sphere (rows sum to 1)."""
        odf = self.odf_rows
        return odf + self.fractions_rows[:, -2:].sum(axis=1, keepdims=True) / odf.shape[1]

    def odf_sh_rows(self, lmax: int = 8) -> np.ndarray:
        """fODF rows as real SH (MRtrix3 basis, frame of the gradients), least squares on the model sphere."""
        from dwiflow.core.sh import amplitudes_to_sh

        return amplitudes_to_sh(self.odf_rows, self.model.vertices, lmax)

    def odf_sh(self, lmax: int = 8) -> np.ndarray:
        """The fODF as SH (…, n_coefficients): 0 outside the mask, NaN where the fit failed."""
        return self.volume(self.odf_sh_rows(lmax), fill=0.0)

    @property
    def shm_coeff(self) -> np.ndarray:
        """The fODF's SH coefficients of degree 8 (DIPY's name)."""
        return self.odf_sh(8)

    def combined_odf_sh(self, lmax: int = 8, odf_sh_rows: np.ndarray | None = None) -> np.ndarray:
        """SH (…, n_coefficients) of :meth:`combined_odf_rows`: the fODF's plus the isotropic fraction's share of
        the l=0 term (a constant c on the sphere has l=0 coefficient c·√(4π)); 0 outside the mask."""
        out = np.array(self.odf_sh_rows(lmax) if odf_sh_rows is None else odf_sh_rows, copy=True)
        out[:, 0] += self.fractions_rows[:, -2:].sum(axis=1) / self.odf_rows.shape[1] * np.sqrt(4 * np.pi)
        return self.volume(out, fill=0.0)

    def snr(self) -> np.ndarray:
        """Estimated S0/sigma per voxel."""
        return self.volume(1.0 / np.sqrt(self.sigma2_rows))

    def predict(self) -> np.ndarray:
        """The normalised signal (…, n_volumes) the fitted fractions predict (S0 = 1, every b=0 volume 1)."""
        kernel = self.model.kernel
        b0 = self.model.gtab.b0s_mask
        columns = np.zeros((kernel.shape[1], b0.size))
        columns[:, b0] = kernel[0][:, None]
        columns[:, ~b0] = kernel[1:].T
        return self.volume(self.fractions_rows.astype(float) @ columns)


class RumbaSDModel:
    """RUMBA-SD (Canales-Rodríguez et al. 2015), voxelwise or global with total variation.

    Parameters
    ----------
    gtab : GradientTable
        Needs b=0 volumes (the signal is normalised by their mean).
    wm_response : (3,) or (n_shells, 3)
        Single-fibre tensor eigenvalues in mm²/s, decreasing (default 1.7e-3, 0.2e-3, 0.2e-3).
    gm_response, csf_response : float or None
        Mean diffusivity of the grey-matter (0.8e-3) and CSF (3.0e-3) compartments; None
        switches the compartment off.
    n_iter : int
        Iterations (600).
    recon_type : {'smf', 'sos'}
        Spatial matched filter (Rician noise) or sum of squares (noncentral chi with
        ``n_coils`` degrees of freedom; ``n_coils`` is then required).
    n_coils : int, optional
    R : int
        Acceleration factor; with R > 1 the global TV weight is the voxel's own noise variance.
    sphere : str, Sphere or ndarray (m, 3)
        fODF directions (default ``repulsion724``). A symmetric sphere halves the work.
    voxelwise : bool
        True: every voxel on its own. False: the global fit over the mask's bounding box.
    use_tv : bool
        Total-variation regularisation (global fit only).
    precision : {'float32', 'float64'}
        Arithmetic of the iterations.
    chunk_size : int
        Voxels iterated together (bounds memory; 256 keeps a chunk's arrays in cache).
    n_threads : int, optional
        Chunks processed in parallel (default: every available core).
    """

    def __init__(
        self,
        gtab: GradientTable,
        *,
        wm_response=RUMBA_WM_RESPONSE,
        gm_response: float | None = RUMBA_GM_DIFFUSIVITY,
        csf_response: float | None = RUMBA_CSF_DIFFUSIVITY,
        n_iter: int = 600,
        recon_type: str = "smf",
        n_coils: int | None = None,
        R: int = 1,
        sphere: str | Sphere | np.ndarray = "repulsion724",
        voxelwise: bool = True,
        use_tv: bool = False,
        precision: str = "float32",
        chunk_size: int = 256,
        n_threads: int | None = None,
    ):
        gtab = checked_gradient_table(gtab, "RumbaSDModel")
        if not gtab.b0s_mask.any():
            raise DwiflowInputError("RUMBA-SD needs b=0 volumes (the signal is normalised by their mean); none found")
        if not (~gtab.b0s_mask).any():
            raise DwiflowInputError("RUMBA-SD needs diffusion-weighted volumes; only b=0 found")
        for name, value in (("n_iter", n_iter), ("R", R)):
            if int(value) != value or value < 1:
                raise DwiflowInputError(f"{name} must be a positive integer, got {value!r}")
        if n_coils is not None and (int(n_coils) != n_coils or n_coils < 1):
            raise DwiflowInputError(f"n_coils must be a positive integer, got {n_coils!r}")
        self.order = _noise_order(recon_type, n_coils)
        if voxelwise and use_tv:
            raise DwiflowInputError("total variation (use_tv) needs the global fit (voxelwise=False)")
        if precision not in ("float32", "float64"):
            raise DwiflowInputError(f"precision must be 'float32' or 'float64', got {precision!r}")
        vertices = sphere_vertices(sphere)
        self.gtab = gtab
        self.vertices = vertices
        self.gm_response = gm_response
        self.csf_response = csf_response
        self.kernel = rumba_kernel(gtab, vertices, wm_response, gm_response, csf_response)
        self.wm_response = check_wm_response(wm_response, len(gtab.dw_shells))
        self.reduced = _ReducedKernel.build(self.kernel, vertices)
        self.n_iter = int(n_iter)
        self.recon_type = recon_type
        self.n_coils = n_coils
        self.R = int(R)
        self.voxelwise = bool(voxelwise)
        self.use_tv = bool(use_tv)
        self.dtype = np.dtype(precision)
        self.chunk_size = int(chunk_size)
        if n_threads is not None and (int(n_threads) != n_threads or n_threads < 1):
            raise DwiflowInputError(f"n_threads must be a positive integer, got {n_threads!r}")
        self.n_threads = int(n_threads) if n_threads else available_cores()

    def fit(
        self,
        data: np.ndarray,
        mask: np.ndarray | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> RumbaFit:
        """Fit every voxel of ``mask`` (all voxels when None).

        ``progress(done, total)`` is called after each chunk (voxelwise) or every 50
        iterations (global). Voxels with non-finite signals or no positive b=0 signal get
        NaN and a status code; in the global fit they are left out of the volume.
        """
        if not self.voxelwise and np.ndim(data) != 4:
            raise DwiflowInputError(f"the global RUMBA-SD fit needs a 4D volume (x, y, z, volumes), got shape {np.shape(data)}")
        batch = VoxelBatch.from_volume(data, mask, self.gtab.n_volumes)
        n = batch.n_voxels
        fractions = np.full((n, self.kernel.shape[1]), np.nan, dtype=self.dtype)
        sigma2 = np.full(n, np.nan)
        raw = batch.signal()
        status = input_status(raw, self.gtab.b0s_mask)
        good = np.flatnonzero(status == FitStatus.OK)
        if good.size:
            signal, _ = normalise_signal(raw[good], self.gtab)
            if self.voxelwise:
                reduced, s2 = self._fit_voxelwise(signal, progress)
            else:
                reduced, s2 = self._fit_global(signal, tuple(i[good] for i in batch.index), batch.mask.shape, progress)
            full = self.reduced.expand(reduced)
            del reduced
            full /= full.sum(axis=1, keepdims=True, dtype=float).astype(self.dtype) + self.dtype.type(_EPS)
            fractions[good] = full
            sigma2[good] = s2
            dead = ~(np.isfinite(full).all(axis=1) & (full.sum(axis=1) > 0.5))
            fractions[good[dead]] = np.nan
            status[good[dead]] = FitStatus.NO_SOLUTION
        return RumbaFit(self, batch, fractions, sigma2, status)

    def _fit_voxelwise(self, signal: np.ndarray, progress) -> tuple[np.ndarray, np.ndarray]:
        n = signal.shape[0]
        out = np.empty((n, self.reduced.matrix.shape[1]), dtype=self.dtype)
        s2 = np.empty(n)

        def run(sl: slice) -> slice:
            it = _Iteration(self.reduced.matrix, signal[sl], self.order, self.dtype, self.kernel.shape[1])
            for _ in range(self.n_iter):
                it.step()
            out[sl] = it.f
            s2[sl] = it.sigma2
            return sl

        done = 0
        with _parallel(self.n_threads) as pool:
            for sl in pool.map(run, list(iter_chunks(n, self.chunk_size))):
                done += sl.stop - sl.start
                if progress is not None:
                    progress(done, n)
        return out, s2

    def _fit_global(self, signal: np.ndarray, index: tuple, shape: tuple, progress) -> tuple[np.ndarray, np.ndarray]:
        lo = [int(i.min()) for i in index]
        hi = [int(i.max()) + 1 for i in index]
        box_shape = tuple(h - l for l, h in zip(lo, hi))
        if len(box_shape) != 3 or min(box_shape) < 2:
            raise DwiflowInputError(f"the global RUMBA-SD fit needs a 3D volume: the voxels to fit span {box_shape} "
                                    "voxels (a single slice or line); use the voxelwise fit")
        box_index = tuple(i - l for i, l in zip(index, lo))
        chunk = max(self.chunk_size, 1)
        n = signal.shape[0]
        it = _Iteration(self.reduced.matrix, signal, self.order, self.dtype, self.kernel.shape[1], extra_rows=1)
        n_comp = it.f.shape[1]
        tv = np.empty((n, n_comp), dtype=self.dtype) if self.use_tv else None
        real = self.dtype.type
        tv_weight = np.full(n, SIGMA0**2, dtype=self.dtype)
        width = -(-n_comp // (4 * self.n_threads))
        blocks = list(iter_chunks(n_comp, width))
        chunks = list(iter_chunks(n, chunk))
        if tv is not None:
            from dwiflow.core._rumba_tv import tv_factor_rows

            tables = _TvTables.build(box_index, box_shape, zero_row=n)
            # scratch per thread, allocated once; its last row stays zero (no neighbour before the box)
            local = threading.local()

        def tv_block(b: slice) -> None:
            if not hasattr(local, "normal"):
                local.normal = np.zeros((tables.n_active + 1, 3, width), dtype=self.dtype)
            normal = local.normal[:, :, : b.stop - b.start]
            tv_factor_rows(it.f, b.start, b.stop, tables.self_row, tables.forward, tables.active_of_voxel,
                           tables.backward, tv_weight, real(TV_EPSILON**2), real(_EPS), real(1), normal, tv)

        with _parallel(self.n_threads) as pool:
            for iteration in range(self.n_iter):
                if tv is not None:
                    list(pool.map(tv_block, blocks))
                list(pool.map(lambda sl: it.step(None if tv is None else tv[sl], sl), chunks))
                if tv is not None:
                    if self.R == 1:
                        tv_weight = np.full(n, max(float(np.mean(it.sigma2, dtype=float)), TV_LAMBDA_MIN),
                                            dtype=self.dtype)
                    else:  # each voxel's own noise variance
                        tv_weight = it.sigma2.copy()
                if progress is not None and ((iteration + 1) % 50 == 0 or iteration + 1 == self.n_iter):
                    progress(iteration + 1, self.n_iter)
        return it.f[:n], it.sigma2.astype(float)
