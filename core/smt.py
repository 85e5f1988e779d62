"""Spherical mean technique (SMT): per-shell spherical means and the zeppelin kernel fitted to them.

Averaging each shell's signal over directions removes the fibre orientation distribution,
leaving the spherical mean of the microscopic kernel (Kaden et al. 2016). For an axially
symmetric tensor (zeppelin) with λ⊥ = f·λ∥ the spherical mean has a closed form,

    Ē(b) = exp(-b λ⊥) · √π / 2 · erf(√(b(λ∥-λ⊥))) / √(b(λ∥-λ⊥)),

optionally mixed with a free-water compartment. All voxels are fitted at once: a coarse grid
gives the start, then bounded Levenberg–Marquardt steps on stacked 2×2 (or 3×3) systems.

References
----------
Kaden E., Kruggel F., Alexander D.C. Quantitative mapping of the per-axon diffusion
coefficients in brain white matter. Magn Reson Med 75 (2016) 1752-1763.
Kaden E., Kelm N.D., Carson R.P., Does M.D., Alexander D.C. Multi-compartment microscopic
diffusion imaging. NeuroImage 139 (2016) 346-359.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import erf

from dwiflow.core.defaults import FREE_WATER_DIFFUSIVITY, SMT_LAMBDA_PAR_BOUNDS
from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import GradientTable, checked_gradient_table
from dwiflow.core.optimize import bounded_levenberg_marquardt
from dwiflow.core.sh import real_sh_basis
from dwiflow.core.status import FitStatus, input_status
from dwiflow.core.voxels import VoxelBatch, VoxelFit, iter_chunks

# SH degree needed to represent a shell's signal by b-value (s/mm²): thresholds of dmipy's
# get_sh_order_from_bval, so that spherical means agree with dmipy's on the same data
_SH_ORDER_THRESHOLDS = np.array([202.020202, 707.070707, 1212.12121, 2525.25253, 3131.31313, 5353.53535, np.inf])
_SH_ORDERS = np.arange(2, 15, 2)

STATUS_CODES = (FitStatus.OK, FitStatus.NONFINITE_INPUT, FitStatus.NO_SIGNAL, FitStatus.SIGNAL_ABOVE_B0,
                FitStatus.ON_SEARCH_BOUND)


def sh_order_for_bvalue(bvalue: float) -> int:
    """SH degree used for a shell's spherical mean (2 below b≈200 up to 14 above b≈5350 s/mm²)."""
    return int(_SH_ORDERS[np.argmax(_SH_ORDER_THRESHOLDS > bvalue)])


def spherical_mean_operators(gtab: GradientTable) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per diffusion-weighted shell: its b-value and the row vector giving the spherical mean of the
    shell's normalised signal: the l=0 coefficient of a least-squares SH fit, over 2√π. The degree
    follows the b-value (as dmipy chooses it) but is lowered until the shell has at least as many
    directions as coefficients, so the fit is determined and the mean exact for any direction set
    whose signal the degree captures, unlike a plain average of non-uniform directions."""
    from dwiflow.core.sh import n_coefficients

    shells = [s for s in gtab.shells if not s.is_b0]
    operators = []
    for shell in shells:
        order = sh_order_for_bvalue(shell.bvalue)
        # never more coefficients than directions: a determined fit keeps the l=0 term exact
        while order > 0 and n_coefficients(order) > shell.count:
            order -= 2
        basis = real_sh_basis(order, gtab.bvecs[shell.indices])
        operators.append(np.linalg.pinv(basis)[0] / (2 * np.sqrt(np.pi)))
    return np.array([np.mean(gtab.bvals[s.indices]) for s in shells]), operators


def zeppelin_spherical_mean(bvalues: np.ndarray, lambda_par: np.ndarray, lambda_perp: np.ndarray) -> np.ndarray:
    """Closed-form spherical mean of a zeppelin for b-values (…, n_shells) and diffusivities (…, 1)."""
    b = np.asarray(bvalues, dtype=float)
    delta = np.maximum(b * (lambda_par - lambda_perp), 0.0)
    root = np.sqrt(delta)
    small = root < 1e-6
    safe = np.where(small, 1.0, root)
    ratio = np.where(small, 1.0 - delta / 3.0, np.sqrt(np.pi) / 2 * erf(safe) / safe)
    return np.exp(-b * lambda_perp) * ratio


@dataclass
class SmtFit(VoxelFit):
    """Result of :meth:`SmtModel.fit`; every public array is shaped like the input volume.

    Attributes
    ----------
    lambda_par, lambda_perp, fraction : ndarray (...)
        λ∥, λ⊥ (mm²/s) and f = λ⊥/λ∥.
    free_water : ndarray (...) or None
        Volume fraction of the free-water compartment when fitted.
    mse, r2 : ndarray (...)
        Mean squared residual and coefficient of determination over the diffusion-weighted
        shells' spherical means.
    spherical_means : ndarray (..., n_shells)
    mask, status : ndarray (...)
    params_rows, spherical_means_rows, rss_rows, r2_rows, status_rows : per fitted voxel
        ``params_rows`` holds (λ∥, f[, free-water fraction]).
    """

    model: "SmtModel"
    batch: VoxelBatch
    params_rows: np.ndarray
    spherical_means_rows: np.ndarray
    rss_rows: np.ndarray
    r2_rows: np.ndarray
    status_rows: np.ndarray

    @property
    def bvalues(self) -> np.ndarray:
        return self.model.bvalues

    @property
    def lambda_par_rows(self) -> np.ndarray:
        return self.params_rows[:, 0]

    @property
    def lambda_perp_rows(self) -> np.ndarray:
        return self.params_rows[:, 0] * self.params_rows[:, 1]

    @property
    def free_water_rows(self) -> np.ndarray | None:
        return self.params_rows[:, 2] if self.model.free_water else None

    @property
    def lambda_par(self) -> np.ndarray:
        return self.volume(self.lambda_par_rows)

    @property
    def lambda_perp(self) -> np.ndarray:
        return self.volume(self.lambda_perp_rows)

    @property
    def fraction(self) -> np.ndarray:
        return self.volume(self.params_rows[:, 1])

    @property
    def free_water(self) -> np.ndarray | None:
        return None if self.free_water_rows is None else self.volume(self.free_water_rows)

    @property
    def mse(self) -> np.ndarray:
        return self.volume(self.rss_rows / len(self.model.shells))

    @property
    def r2(self) -> np.ndarray:
        return self.volume(self.r2_rows)

    @property
    def spherical_means(self) -> np.ndarray:
        return self.volume(self.spherical_means_rows)

    def predict(self) -> np.ndarray:
        """The spherical means (…, n_shells) the fitted kernel predicts (normalised to 1 at b=0)."""
        return self.volume(self.model.predict(self.params_rows))

    def fit_fod(self, fod: str = "watson", n_fod: int = 1):
        """A parametric FOD on each voxel's fitted kernel, from the full signal (:mod:`dwiflow.core.smt_fod`).

        ``fod``: ``"watson"`` (``n_fod`` compartments) or ``"bingham"``. Returns a volume-shaped
        :class:`~dwiflow.core.smt_fod.SmtFodFit`.
        """
        from dwiflow.core.smt_fod import fit_fod_on_kernel

        return fit_fod_on_kernel(self, fod, n_fod)


class SmtModel:
    """Spherical mean technique with a zeppelin kernel, λ⊥ = f·λ∥ (Kaden et al. 2016).

    Parameters
    ----------
    gtab : GradientTable
        b=0 volumes and at least two diffusion-weighted shells.
    lambda_par_bounds : (low, high)
        Bounds of λ∥ in mm²/s (default 0.1e-3 … 3e-3); f is within [0, 1].
    free_water : bool
        Add an isotropic compartment of diffusivity ``free_water_diffusivity`` with its own
        volume fraction.
    """

    def __init__(
        self,
        gtab: GradientTable,
        *,
        lambda_par_bounds: tuple[float, float] = SMT_LAMBDA_PAR_BOUNDS,
        free_water: bool = False,
        free_water_diffusivity: float = FREE_WATER_DIFFUSIVITY,
        iterations: int = 80,
        starts: int = 3,
        chunk_size: int = 20000,
    ):
        gtab = checked_gradient_table(gtab, "SmtModel")
        if not gtab.b0s_mask.any():
            raise DwiflowInputError("SMT needs b=0 volumes (spherical means are normalised by the mean b=0); none found")
        n_shells = len(gtab.dw_shells)
        if n_shells < 2:
            raise DwiflowInputError(f"SMT needs at least two diffusion-weighted shells (the spherical mean's decay over b "
                                    f"separates λ∥ from λ⊥); this gradient table has {n_shells}")
        low, high = (float(v) for v in lambda_par_bounds)
        if not (0 < low < high <= 5e-3):
            raise DwiflowInputError(f"lambda_par_bounds must satisfy 0 < low < high <= 5e-3 mm²/s, got {lambda_par_bounds}")
        if not 0 < free_water_diffusivity <= 5e-3:
            raise DwiflowInputError(f"free_water_diffusivity must be a positive diffusivity in mm²/s, got {free_water_diffusivity}")
        self.gtab = gtab
        self.bounds = (low, high)
        self.free_water = bool(free_water)
        self.free_water_diffusivity = float(free_water_diffusivity)
        self.iterations = int(iterations)
        self.starts = int(starts)
        self.chunk_size = int(chunk_size)
        self.bvalues, self.operators = spherical_mean_operators(gtab)
        self.shells = [s for s in gtab.shells if not s.is_b0]

    def spherical_means(self, signal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Spherical means (n, n_shells) of signals (n, n_volumes) normalised by the mean b=0, and that b=0."""
        s0 = signal[:, self.gtab.b0s_mask].mean(axis=1)
        normalised = signal / np.where(s0 > 0, s0, 1.0)[:, None]
        means = np.stack([normalised[:, s.indices] @ op for s, op in zip(self.shells, self.operators)], axis=1)
        return means, s0

    def predict(self, params: np.ndarray) -> np.ndarray:
        """Spherical means (n, n_shells) for parameters (n, 2 or 3): λ∥, f[, free-water fraction]."""
        lam, f = params[:, :1], params[:, 1:2]
        kernel = zeppelin_spherical_mean(self.bvalues[None], lam, f * lam)
        if self.free_water:
            v = params[:, 2:3]
            return (1 - v) * kernel + v * np.exp(-self.bvalues[None] * self.free_water_diffusivity)
        return kernel

    def predict_with_jacobian(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Spherical means (n, s) and their derivatives (n, s, p) in closed form.

        With x = b λ∥ (1-f) and g(x) = √π/2·erf(√x)/√x, Ē = exp(-b f λ∥)·g(x) and g'(x) = (e^{-x} - g)/(2x).
        """
        b = self.bvalues[None]
        lam, f = params[:, :1], params[:, 1:2]
        x = np.maximum(b * lam * (1 - f), 0.0)
        small = x < 1e-6
        safe = np.where(small, 1.0, x)
        root = np.sqrt(safe)
        g = np.where(small, 1.0 - x / 3.0, np.sqrt(np.pi) / 2 * erf(root) / root)
        dg = np.where(small, -1.0 / 3.0 + x / 5.0, (np.exp(-safe) - g) / (2 * safe))
        decay = np.exp(-b * f * lam)
        kernel = decay * g
        d_lam = decay * (-b * f * g + dg * b * (1 - f))
        d_f = decay * (-b * lam * g - dg * b * lam)
        if not self.free_water:
            return kernel, np.stack([d_lam, d_f], axis=-1)
        v = params[:, 2:3]
        free = np.exp(-b * self.free_water_diffusivity)
        means = (1 - v) * kernel + v * free
        return means, np.stack([(1 - v) * d_lam, (1 - v) * d_f, free - kernel], axis=-1)

    def _lower_upper(self) -> tuple[np.ndarray, np.ndarray]:
        low = [self.bounds[0], 0.0] + ([0.0] if self.free_water else [])
        high = [self.bounds[1], 1.0] + ([1.0] if self.free_water else [])
        return np.array(low), np.array(high)

    def fit_means(self, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Least-squares parameters (n, p) for spherical means (n, n_shells), and the final residual sums."""
        low, high = self._lower_upper()
        n_p = low.size
        # coarse grid start, the best grid point per voxel
        axes = [np.linspace(low[0], high[0], 24), np.linspace(0.0, 1.0, 21)]
        if self.free_water:
            axes.append(np.linspace(0.0, 1.0, 21))
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, n_p)
        grid_means = self.predict(grid)  # (g, shells)
        cost = (means**2).sum(1)[:, None] - 2 * means @ grid_means.T + (grid_means**2).sum(1)[None]
        # several starts (the best grid points) guard against the shallow valleys of λ⊥ against free water
        starts = np.argpartition(cost, self.starts - 1, axis=1)[:, : self.starts]
        n_vox = means.shape[0]
        params = grid[starts.T.ravel()].copy()
        means = np.tile(means, (self.starts, 1))
        result = bounded_levenberg_marquardt(
            lambda p, rows: self.predict(p), params, means, low, high, self.iterations,
            jacobian=lambda p, rows: self.predict_with_jacobian(p)[1], scale=high - low, relative_gain=1e-12,
            stop_on_zero_step=True)
        params, rss = result.params, result.rss
        rss = rss.reshape(self.starts, n_vox)
        best = np.argmin(rss, axis=0)
        params = params.reshape(self.starts, n_vox, n_p)[best, np.arange(n_vox)]
        return params, rss[best, np.arange(n_vox)]

    def fit(self, data: np.ndarray, mask: np.ndarray | None = None, progress=None) -> SmtFit:
        batch = VoxelBatch.from_volume(data, mask, self.gtab.n_volumes)
        n, n_s = batch.n_voxels, len(self.shells)
        n_p = 3 if self.free_water else 2
        means_all = np.full((n, n_s), np.nan)
        params = np.full((n, n_p), np.nan)
        rss = np.full(n, np.nan)
        status = np.zeros(n, dtype=np.uint8)
        for sl in iter_chunks(n, self.chunk_size):
            y = batch.signal(sl)
            status[sl] = input_status(y, self.gtab.b0s_mask)
            ok = np.flatnonzero(status[sl] == FitStatus.OK)
            if ok.size:
                means, _ = self.spherical_means(y[ok])
                p, r = self.fit_means(means)
                idx = np.arange(sl.start, sl.stop)[ok]
                means_all[idx], params[idx], rss[idx] = means, p, r
            if progress is not None:
                progress(sl.stop, n)
        # λ∥ on the lower end of its search range: that end is a choice of range, not a physical limit (the upper
        # end, the free diffusivity of water at body temperature, is one), so the data did not determine it
        on_bound = (status == FitStatus.OK) & (params[:, 0] <= self.bounds[0] * (1 + 1e-6))
        status[on_bound] = FitStatus.ON_SEARCH_BOUND
        params[on_bound], rss[on_bound] = np.nan, np.nan
        fitted = status == FitStatus.OK
        row_means = np.full((n, 1), np.nan)
        row_means[fitted] = means_all[fitted].mean(axis=1, keepdims=True)
        centred = means_all - row_means
        total = (centred**2).sum(1)
        return SmtFit(self, batch, params, means_all, rss, 1 - rss / np.where(total > 0, total, np.nan), status)
