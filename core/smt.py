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
from functools import lru_cache
from typing import Any

import numpy as np
from scipy.special import erf

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import GradientTable
from dwiflow.core.sh import cart_to_sphere, real_sh_basis, sphere_to_cart
from dwiflow.core.voxels import VoxelBatch, iter_chunks, scatter

# SH degree needed to represent a shell's signal by b-value (s/mm²): thresholds of dmipy's
# get_sh_order_from_bval, so that spherical means agree with dmipy's on the same data
_SH_ORDER_THRESHOLDS = np.array([202.020202, 707.070707, 1212.12121, 2525.25253, 3131.31313, 5353.53535, np.inf])
_SH_ORDERS = np.arange(2, 15, 2)
DEFAULT_LAMBDA_PAR_BOUNDS = (0.1e-3, 3.0e-3)  # mm²/s
FREE_WATER_DIFFUSIVITY = 3.0e-3

STATUS_OK = 0
STATUS_NONFINITE = 1
STATUS_NO_B0_SIGNAL = 2
STATUS_LEVELS = {STATUS_OK: "ok", STATUS_NONFINITE: "non-finite input signal", STATUS_NO_B0_SIGNAL: "no positive b=0 signal"}


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


def damped_gauss_newton_step(jac: np.ndarray, residual: np.ndarray, damping: np.ndarray,
                             bounded: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Levenberg–Marquardt steps for many small problems at once: (JᵀJ + λ diag(JᵀJ)) δ = -Jᵀr.

    ``jac`` (v, m, p), ``residual`` (v, m), ``damping`` (v,) → δ (v, p). With ``bounded`` =
    (params, low, high), a parameter that sits on a bound and whose descent direction points out
    of the box is held there (its Jacobian column dropped), so the others take a full step instead of
    one that clipping would spoil (the active-set rule of projected Gauss–Newton).
    """
    n_p = jac.shape[-1]
    if bounded is not None:
        params, low, high = bounded
        descent = -np.einsum("vsi,vs->vi", jac, residual)
        held = ((params <= low) & (descent < 0)) | ((params >= high) & (descent > 0))
        jac = np.where(held[:, None, :], 0.0, jac)
    normal = np.einsum("vsi,vsj->vij", jac, jac)
    gradient = np.einsum("vsi,vs->vi", jac, residual)
    diag = np.einsum("vii->vi", normal)
    system = normal + damping[:, None, None] * (np.eye(n_p) * (diag[:, None, :] + 1e-12))
    return -np.linalg.solve(system, gradient[..., None])[..., 0]


def bounded_levenberg_marquardt(predict, params: np.ndarray, y: np.ndarray, low: np.ndarray, high: np.ndarray,
                                iterations: int, step: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Levenberg–Marquardt for many small least-squares problems at once (one per row of ``params``).

    ``predict(params, rows)`` gives the model for those rows; the Jacobian is by central differences
    (``step``); trial points are clipped to [low, high]; a row stops when its step is accepted with
    a relative gain ≤ 1e-10 or its damping saturates. Returns (params, residual sum of squares).
    """
    params = params.copy()
    n, n_params = params.shape
    residual = predict(params, slice(None)) - y
    rss = (residual**2).sum(1)
    damping = np.full(n, 1e-3)
    active = np.arange(n)
    for _ in range(iterations):
        if not active.size:
            break
        p_a, r_a, d_a = params[active], residual[active], damping[active]
        jac = np.empty(r_a.shape + (n_params,))
        for q in range(n_params):
            up, down = p_a.copy(), p_a.copy()
            up[:, q] += step
            down[:, q] -= step
            jac[..., q] = (predict(up, active) - predict(down, active)) / (2 * step)
        try:
            delta = damped_gauss_newton_step(jac, r_a, d_a, (p_a, low, high))
        except np.linalg.LinAlgError:
            break
        trial = np.clip(p_a + delta, low, high)
        trial_residual = predict(trial, active) - y[active]
        trial_rss = (trial_residual**2).sum(1)
        better = trial_rss < rss[active]
        gain = np.where(better, rss[active] - trial_rss, 0.0)
        idx = active[better]
        params[idx], residual[idx], rss[idx] = trial[better], trial_residual[better], trial_rss[better]
        damping[active] = np.clip(np.where(better, d_a * 0.3, d_a * 10.0), 1e-12, 1e12)
        done = (better & (gain <= 1e-10 * np.maximum(rss[active], 1e-30))) | (damping[active] >= 1e12)
        active = active[~done]
    return params, rss


def _fit_in_chunks(fit_chunk, n_voxels: int, chunk_size: int, result_type, per_voxel: dict[str, Any | None], **options):
    """Run ``fit_chunk`` on consecutive chunks of voxels (bounded memory) and join the results.

    ``per_voxel``: arguments sliced per chunk (None passes through); ``result_type``: a dataclass whose
    fields are all per-voxel arrays.
    """
    from dataclasses import fields

    parts = []
    for sl in iter_chunks(n_voxels, chunk_size):
        sliced = {k: (None if v is None else v[sl]) for k, v in per_voxel.items()}
        parts.append(fit_chunk(**sliced, **options))
    return result_type(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(result_type)))


@dataclass
class SmtFit:
    """SMT parameters of the masked voxels.

    Attributes
    ----------
    lambda_par, lambda_perp, fraction : ndarray (n,)
        λ∥, λ⊥ (mm²/s) and f = λ⊥/λ∥.
    free_water : ndarray (n,) or None
        Volume fraction of the free-water compartment when fitted.
    mse, r2 : ndarray (n,)
        Mean squared residual and coefficient of determination over the diffusion-weighted
        shells' spherical means.
    spherical_means : ndarray (n, n_shells)
    status : ndarray (n,) uint8
    """

    batch: VoxelBatch
    bvalues: np.ndarray
    spherical_means: np.ndarray
    lambda_par: np.ndarray
    lambda_perp: np.ndarray
    fraction: np.ndarray
    free_water: np.ndarray | None
    mse: np.ndarray
    r2: np.ndarray
    status: np.ndarray

    def volume(self, values: np.ndarray, fill=np.nan) -> np.ndarray:
        """Per-voxel ``values`` placed back into the image grid."""
        return scatter(values, self.batch, fill)


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
        lambda_par_bounds: tuple[float, float] = DEFAULT_LAMBDA_PAR_BOUNDS,
        free_water: bool = False,
        free_water_diffusivity: float = FREE_WATER_DIFFUSIVITY,
        iterations: int = 80,
        starts: int = 3,
        chunk_size: int = 20000,
    ):
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
        scale = high - low
        damping = np.full(means.shape[0], 1e-3)  # per start and voxel
        residual = self.predict(params) - means
        rss = (residual**2).sum(1)
        active = np.arange(means.shape[0])
        for _ in range(self.iterations):
            if not active.size:
                break
            p_a, r_a, d_a = params[active], residual[active], damping[active]
            _, jac = self.predict_with_jacobian(p_a)
            delta = damped_gauss_newton_step(jac * scale, r_a, d_a, (p_a, low, high)) * scale  # bound-normalised
            trial = np.clip(p_a + delta, low, high)
            trial_residual = self.predict(trial) - means[active]
            trial_rss = (trial_residual**2).sum(1)
            better = trial_rss < rss[active]
            gain = np.where(better, rss[active] - trial_rss, 0.0)
            idx = active[better]
            params[idx], residual[idx], rss[idx] = trial[better], trial_residual[better], trial_rss[better]
            damping[active] = np.clip(np.where(better, d_a * 0.3, d_a * 10.0), 1e-12, 1e12)
            # converged: a successful step that no longer changes the residual, or no step left to try
            done = (better & (gain <= 1e-12 * np.maximum(rss[active], 1e-30))) | (damping[active] >= 1e12)
            done |= (~better) & (np.abs(delta) <= 1e-12 * scale).all(axis=1)
            active = active[~done]
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
            finite = np.all(np.isfinite(y), axis=1)
            positive = np.zeros_like(finite)
            positive[finite] = y[finite][:, self.gtab.b0s_mask].mean(axis=1) > 0
            st = status[sl]
            st[~finite] = STATUS_NONFINITE
            st[finite & ~positive] = STATUS_NO_B0_SIGNAL
            ok = np.flatnonzero(finite & positive)
            if ok.size:
                means, _ = self.spherical_means(y[ok])
                p, r = self.fit_means(means)
                idx = np.arange(sl.start, sl.stop)[ok]
                means_all[idx], params[idx], rss[idx] = means, p, r
            if progress is not None:
                progress(sl.stop, n)
        centred = means_all - np.nanmean(means_all, axis=1, keepdims=True)
        total = (centred**2).sum(1)
        return SmtFit(
            batch=batch, bvalues=self.bvalues, spherical_means=means_all, lambda_par=params[:, 0],
            lambda_perp=params[:, 0] * params[:, 1], fraction=params[:, 1],
            free_water=params[:, 2] if self.free_water else None, mse=rss / n_s,
            r2=1 - rss / np.where(total > 0, total, np.nan), status=status,
        )


# ---------------------------------------------------------------------------------------------------
# Parametric FODs on the fitted kernel: Watson
# ---------------------------------------------------------------------------------------------------

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(96)
ODI_BOUNDS = (0.02, 0.99)  # as dmipy's SD1Watson


def _legendre_table(lmax: int, t: np.ndarray) -> np.ndarray:
    """Legendre polynomials P_0..P_lmax at t (last axis added; computed degree-major, contiguous)."""
    out = np.empty((lmax + 1,) + np.shape(t))
    out[0] = 1.0
    if lmax >= 1:
        out[1] = t
    for l in range(1, lmax):
        np.multiply(t, out[l], out=out[l + 1])
        out[l + 1] *= (2 * l + 1) / (l + 1)
        out[l + 1] -= (l / (l + 1)) * out[l - 1]
    return np.moveaxis(out, 0, -1)


def zonal_coefficients(profile: np.ndarray, lmax: int) -> np.ndarray:
    """2π ∫ f(t) P_l(t) dt for even l ≤ lmax, f sampled at the Gauss–Legendre nodes (…, n_nodes)."""
    legendre = _legendre_table(lmax, _GL_NODES)[:, ::2]  # (nodes, n_even)
    return 2 * np.pi * (profile * _GL_WEIGHTS) @ legendre


def watson_coefficients(kappa: np.ndarray, lmax: int) -> np.ndarray:
    """Zonal coefficients (…, n_even) of the Watson density exp(κ (μ·n)²) / Z on the sphere (Ŵ_0 = 1)."""
    k = np.asarray(kappa, dtype=float)[..., None]
    profile = np.exp(k * (_GL_NODES**2 - 1.0))  # scaled by exp(-κ) against overflow; the ratio is unchanged
    coefficients = zonal_coefficients(profile, lmax)
    return coefficients / coefficients[..., :1]


def kappa_to_odi(kappa: np.ndarray) -> np.ndarray:
    """Orientation dispersion index 2/π·arctan(1/κ) (Zhang et al. 2012)."""
    return 2 / np.pi * np.arctan(1 / np.asarray(kappa, dtype=float))


def odi_to_kappa(odi: np.ndarray) -> np.ndarray:
    return 1 / np.tan(np.asarray(odi, dtype=float) * np.pi / 2)


@dataclass
class WatsonFit:
    """Watson FOD on the SMT kernel: direction μ (n, 3, world frame), concentration κ and ODI, fit quality."""

    mu: np.ndarray
    kappa: np.ndarray
    odi: np.ndarray
    mse: np.ndarray

    def sh(self, lmax: int = 8) -> np.ndarray:
        """The Watson FOD as real SH (MRtrix3 basis, world frame), integrating to 1 (l=0 term 1/√(4π))."""
        from dwiflow.core.sh import real_sh_basis, sh_degree_order

        degrees, _ = sh_degree_order(lmax)
        w = watson_coefficients(np.nan_to_num(self.kappa), lmax)  # (n, lmax/2+1): Ŵ_l = 2π ∫ W(t) P_l(t) dt
        # Funk–Hecke: ∫ W(μ·n) Y_lm(n) dn = Ŵ_l Y_lm(μ)
        basis = real_sh_basis(lmax, np.nan_to_num(self.mu) + np.isnan(self.mu[:, :1]) * [0, 0, 1.0])
        out = w[:, degrees // 2] * basis
        return np.where(np.isfinite(self.kappa)[:, None], out, 0.0)


def fit_watson(signal: np.ndarray, gtab: GradientTable, lambda_par: np.ndarray, lambda_perp: np.ndarray,
               initial_direction: np.ndarray | None = None, *, free_water: np.ndarray | None = None,
               chunk_size: int = 512, **options) -> WatsonFit:
    """Watson FOD fits in chunks of voxels (bounded memory); see :func:`_fit_watson_chunk`.

    Without ``initial_direction`` the fits start from each voxel's tensor principal eigenvector.
    """
    if initial_direction is None:
        from dwiflow.core.tensor import TensorModel

        evecs = TensorModel(gtab).fit(signal).evecs[:, :, 0]
        initial_direction = np.where(np.isfinite(evecs).all(axis=1, keepdims=True), evecs, [0.0, 0.0, 1.0])
    per_voxel = dict(signal=signal, lambda_par=lambda_par, lambda_perp=lambda_perp,
                     initial_direction=initial_direction, free_water=free_water)
    return _fit_in_chunks(_fit_watson_chunk, signal.shape[0], chunk_size, WatsonFit, per_voxel, gtab=gtab, **options)


def _normalised_signal_and_kernel(signal, gtab, lambda_par, lambda_perp, lmax, free_water, free_water_diffusivity):
    """Signal / mean b=0, the zeppelin's Legendre coefficients (2l+1)/(4π)·K̂_l per voxel and volume (n, g, n_even),
    scaled by 1 - free water, and the free-water signal (or None)."""
    s0 = signal[:, gtab.b0s_mask].mean(axis=1)
    y = signal / np.where(s0 > 0, s0, 1.0)[:, None]
    b = gtab.bvals
    profile = np.exp(-b[None, :, None] * (lambda_perp[:, None, None]
                                         + (lambda_par - lambda_perp)[:, None, None] * _GL_NODES**2))
    kernel = zonal_coefficients(profile, lmax) * ((2 * np.arange(0, lmax + 1, 2) + 1) / (4 * np.pi))
    iso = None
    if free_water is not None:
        iso = free_water[:, None] * np.exp(-b[None] * free_water_diffusivity)
        kernel = kernel * (1 - free_water)[:, None, None]
    return y, kernel, iso


def _watson_signal(kernel, bvecs, theta, phi, log_kappa, lmax):
    """Σ_l (2l+1)/(4π)·K̂_l·Ŵ_l(κ)·P_l(g·μ): a Watson-dispersed kernel's signal (Funk–Hecke), per voxel."""
    mu = sphere_to_cart(theta, phi)
    t = np.clip(np.einsum("vi,gi->vg", mu, bvecs), -1, 1)
    legendre = _legendre_table(lmax, t)[..., ::2]
    w = watson_coefficients(np.exp(log_kappa), lmax)
    return np.einsum("vgl,vgl->vg", kernel * w[:, None, :], legendre, optimize=False)


def _fit_watson_chunk(
    signal: np.ndarray,
    gtab: GradientTable,
    lambda_par: np.ndarray,
    lambda_perp: np.ndarray,
    initial_direction: np.ndarray,
    *,
    free_water: np.ndarray | None = None,
    free_water_diffusivity: float = FREE_WATER_DIFFUSIVITY,
    lmax: int = 16,
    iterations: int = 30,
) -> WatsonFit:
    """Watson-dispersed zeppelin (kernel fixed per voxel) fitted to the full normalised signal.

    E(g) = Σ_l (2l+1)/(4π) Ŵ_l(κ) K̂_l(b) P_l(g·μ) (Funk–Hecke), optionally mixed with the
    voxel's free-water fraction. Starts: ``initial_direction`` (e.g. the tensor's principal
    eigenvector) and a κ scan; then bounded Levenberg–Marquardt on (θ, φ, log κ) for all voxels.
    """
    y, kernel, iso = _normalised_signal_and_kernel(signal, gtab, lambda_par, lambda_perp, lmax, free_water,
                                                   free_water_diffusivity)
    n = y.shape[0]

    def predict(theta, phi, log_kappa, rows=slice(None)):
        e = _watson_signal(kernel[rows], gtab.bvecs, theta, phi, log_kappa, lmax)
        return e + iso[rows] if iso is not None else e

    theta, phi = cart_to_sphere(np.asarray(initial_direction, dtype=float))
    grid = np.log(odi_to_kappa(np.linspace(ODI_BOUNDS[0], 0.95, 10)))
    rss_grid = np.stack([((predict(theta, phi, np.full(n, g)) - y) ** 2).sum(1) for g in grid], axis=1)
    log_kappa = grid[np.argmin(rss_grid, axis=1)]
    params = np.stack([theta, phi, log_kappa], axis=1)
    low = np.array([-np.inf, -np.inf, np.log(odi_to_kappa(ODI_BOUNDS[1]))])
    high = np.array([np.inf, np.inf, np.log(odi_to_kappa(ODI_BOUNDS[0]))])
    params, rss = bounded_levenberg_marquardt(lambda p, rows: predict(*p.T, rows=rows), params, y, low, high,
                                              iterations)
    theta, phi, log_kappa = params.T
    mu = sphere_to_cart(theta, phi)
    kappa = np.exp(log_kappa)
    return WatsonFit(mu=mu, kappa=kappa, odi=kappa_to_odi(kappa), mse=rss / y.shape[1])


# ------------------------------------------------------------------------------------------------ Bingham
BETA_FRACTION_BOUNDS = (0.0, 1.0)  # beta = beta_fraction * kappa, as dmipy's SD2Bingham


@lru_cache(maxsize=4)
def _sphere_quadrature(n_polar: int = 28, n_azimuth: int = 56) -> tuple[np.ndarray, np.ndarray]:
    """Product quadrature on the unit sphere: Gauss–Legendre in cos θ × uniform φ; exact for SH to high degree."""
    nodes, weights = np.polynomial.legendre.leggauss(n_polar)
    phi = 2 * np.pi * np.arange(n_azimuth) / n_azimuth
    sin = np.sqrt(1 - nodes**2)
    directions = np.stack([np.outer(sin, np.cos(phi)), np.outer(sin, np.sin(phi)),
                           np.repeat(nodes[:, None], n_azimuth, axis=1)], axis=-1).reshape(-1, 3)
    return directions, np.repeat(weights, n_azimuth) * (2 * np.pi / n_azimuth)


@lru_cache(maxsize=4)
def _quadrature_basis(lmax: int) -> np.ndarray:
    """(quadrature weight × real SH) at the quadrature points: f_c = Σ_i f(n_i) w_i Y_c(n_i)."""
    directions, weights = _sphere_quadrature()
    return real_sh_basis(lmax, directions) * weights[:, None]


def bingham_axes(theta: np.ndarray, phi: np.ndarray, psi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Bingham's main axis μ (polar θ, azimuth φ) and its second axis ν, at angle ψ around μ from ∂μ/∂θ."""
    mu = sphere_to_cart(theta, phi)
    e_theta = np.stack([np.cos(theta) * np.cos(phi), np.cos(theta) * np.sin(phi), -np.sin(theta)], axis=-1)
    e_phi = np.stack([-np.sin(phi), np.cos(phi), np.zeros_like(phi)], axis=-1)
    nu = np.cos(psi)[..., None] * e_theta + np.sin(psi)[..., None] * e_phi
    return mu, nu


def bingham_sh(mu: np.ndarray, nu: np.ndarray, kappa: np.ndarray, beta: np.ndarray, lmax: int) -> np.ndarray:
    """Real SH (MRtrix3 basis) of the Bingham density exp(κ(μ·n)² + β(ν·n)²)/Z, integrating to 1.

    Coefficients by quadrature on the sphere (Gauss–Legendre × uniform azimuth), per voxel.
    """
    directions, _ = _sphere_quadrature()
    t_mu, t_nu = np.asarray(mu) @ directions.T, np.asarray(nu) @ directions.T
    k, bt = np.asarray(kappa, dtype=float)[:, None], np.asarray(beta, dtype=float)[:, None]
    density = np.exp(k * (t_mu**2 - 1.0) + bt * t_nu**2)  # scaled by exp(-κ) against overflow (β ≤ κ)
    coefficients = density @ _quadrature_basis(lmax)
    return coefficients / (coefficients[:, :1] * np.sqrt(4 * np.pi))


@dataclass
class BinghamFit:
    """Bingham FOD on the SMT kernel (Kaden 2016; dmipy's SD2Bingham parameters): axes μ, ν (world frame),
    concentrations κ ≥ β = beta_fraction·κ, ψ, the ODI of κ, and the fit's MSE."""

    mu: np.ndarray
    nu: np.ndarray
    kappa: np.ndarray
    beta_fraction: np.ndarray
    psi: np.ndarray
    odi: np.ndarray
    mse: np.ndarray

    def sh(self, lmax: int = 8) -> np.ndarray:
        """The Bingham FOD as real SH (MRtrix3 basis, world frame), integrating to 1; 0 where not fitted."""
        ok = np.isfinite(self.kappa)
        out = np.zeros((self.kappa.size, (lmax + 1) * (lmax + 2) // 2))
        if ok.any():
            out[ok] = bingham_sh(self.mu[ok], self.nu[ok], self.kappa[ok], self.beta_fraction[ok] * self.kappa[ok], lmax)
        return out


def fit_bingham(signal: np.ndarray, gtab: GradientTable, lambda_par: np.ndarray, lambda_perp: np.ndarray,
                initial: WatsonFit | None = None, *, free_water: np.ndarray | None = None, chunk_size: int = 256,
                **options) -> BinghamFit:
    """Bingham FOD fits (kernel fixed per voxel) in chunks of voxels, started from a Watson fit.

    Without ``initial`` the Watson fit is computed first (it starts from the tensor direction).
    """
    if initial is None:
        initial = fit_watson(signal, gtab, lambda_par, lambda_perp, free_water=free_water)
    per_voxel = dict(signal=signal, lambda_par=lambda_par, lambda_perp=lambda_perp, mu0=initial.mu,
                     kappa0=initial.kappa, free_water=free_water)
    return _fit_in_chunks(_fit_bingham_chunk, signal.shape[0], chunk_size, BinghamFit, per_voxel, gtab=gtab, **options)


def _fit_bingham_chunk(
    signal: np.ndarray,
    gtab: GradientTable,
    lambda_par: np.ndarray,
    lambda_perp: np.ndarray,
    mu0: np.ndarray,
    kappa0: np.ndarray,
    *,
    free_water: np.ndarray | None = None,
    free_water_diffusivity: float = FREE_WATER_DIFFUSIVITY,
    lmax: int = 12,
    iterations: int = 40,
) -> BinghamFit:
    """Bingham-dispersed zeppelin fitted to the full normalised signal: E(g) = Σ_lm K̂_l(b) f_lm Y_lm(g).

    Starts: the Watson direction and κ, β = κ/4 and ψ from a 4-angle scan; then bounded
    Levenberg–Marquardt on (θ, φ, ψ, log κ, β/κ) for all voxels of the chunk at once.
    """
    from dwiflow.core.sh import sh_degree_order

    s0 = signal[:, gtab.b0s_mask].mean(axis=1)
    y = signal / np.where(s0 > 0, s0, 1.0)[:, None]
    b = gtab.bvals
    n = y.shape[0]
    degrees, _ = sh_degree_order(lmax)
    profile = np.exp(-b[None, :, None] * (lambda_perp[:, None, None]
                                         + (lambda_par - lambda_perp)[:, None, None] * _GL_NODES**2))
    kernel = zonal_coefficients(profile, lmax)[:, :, degrees // 2]  # K̂_l per voxel, volume and SH coefficient
    directions = np.where(np.linalg.norm(gtab.bvecs, axis=1, keepdims=True) > 0, gtab.bvecs, [0.0, 0.0, 1.0])
    weighted_basis = kernel * real_sh_basis(lmax, directions)[None]  # (n, g, c)
    iso = None
    if free_water is not None:
        iso = free_water[:, None] * np.exp(-b[None] * free_water_diffusivity)
        weighted_basis = weighted_basis * (1 - free_water)[:, None, None]
    low = np.array([-np.inf, -np.inf, -np.inf, np.log(odi_to_kappa(ODI_BOUNDS[1])), BETA_FRACTION_BOUNDS[0]])
    high = np.array([np.inf, np.inf, np.inf, np.log(odi_to_kappa(ODI_BOUNDS[0])), BETA_FRACTION_BOUNDS[1]])

    def predict(p: np.ndarray, rows=slice(None)) -> np.ndarray:
        mu, nu = bingham_axes(p[:, 0], p[:, 1], p[:, 2])
        kappa = np.exp(p[:, 3])
        f = bingham_sh(mu, nu, kappa, p[:, 4] * kappa, lmax)
        e = np.einsum("vgc,vc->vg", weighted_basis[rows], f)
        return e + iso[rows] if iso is not None else e

    mu0 = np.where(np.isfinite(mu0).all(axis=1, keepdims=True), mu0, [0.0, 0.0, 1.0])
    theta0, phi0 = cart_to_sphere(mu0)
    log_kappa0 = np.clip(np.log(np.nan_to_num(kappa0, nan=1.0)), low[3], high[3])
    starts = [np.stack([theta0, phi0, np.full(n, psi), log_kappa0, np.full(n, 0.25)], axis=1)
              for psi in np.pi * np.arange(4) / 4]
    rss_starts = np.stack([((predict(p) - y) ** 2).sum(1) for p in starts], axis=1)
    params = np.stack(starts, axis=1)[np.arange(n), np.argmin(rss_starts, axis=1)]
    params, rss = bounded_levenberg_marquardt(lambda p, rows: predict(p, rows=rows), params, y, low, high, iterations)
    mu, nu = bingham_axes(params[:, 0], params[:, 1], params[:, 2])
    kappa = np.exp(params[:, 3])
    psi = np.mod(params[:, 2], np.pi)
    return BinghamFit(mu=mu, nu=nu, kappa=kappa, beta_fraction=params[:, 4], psi=psi, odi=kappa_to_odi(kappa),
                      mse=rss / y.shape[1])


# ------------------------------------------------------------------------------------------------ several Watsons
@dataclass
class MultiWatsonFit:
    """k Watson FODs on one SMT kernel (crossing populations): axes μ (n, k, 3), κ and ODI (n, k), volume
    fractions (n, k) summing to 1, and the fit's MSE; compartments ordered by decreasing fraction."""

    mu: np.ndarray
    kappa: np.ndarray
    odi: np.ndarray
    fractions: np.ndarray
    mse: np.ndarray

    def sh(self, lmax: int = 8) -> np.ndarray:
        """The fraction-weighted sum of the Watson FODs as real SH (MRtrix3 basis, world frame), integrating to 1."""
        total = 0.0
        for j in range(self.kappa.shape[1]):
            part = WatsonFit(self.mu[:, j], self.kappa[:, j], self.odi[:, j], self.mse).sh(lmax)
            total = total + np.nan_to_num(self.fractions[:, j])[:, None] * part
        return total


def kernel_deconvolution_peaks(signal: np.ndarray, gtab: GradientTable, lambda_par: np.ndarray,
                               lambda_perp: np.ndarray, n_peaks: int, lmax: int = 8) -> np.ndarray:
    """Directions (n, n_peaks, 3; NaN where absent) of the largest FOD peaks from a ridge-regularised SH
    deconvolution of each voxel's normalised signal by its own SMT kernel: starts for multi-Watson fits."""
    from dwiflow.core.peaks import find_peaks
    from dwiflow.core.sh import sh_degree_order

    y, kernel, _ = _normalised_signal_and_kernel(signal, gtab, lambda_par, lambda_perp, lmax, None, 0.0)
    degrees, _ = sh_degree_order(lmax)
    directions = np.where(np.linalg.norm(gtab.bvecs, axis=1, keepdims=True) > 0, gtab.bvecs, [0.0, 0.0, 1.0])
    # E = Σ_c 4π/(2l+1)·kernel_l·f_c·Y_c(g)
    design = (kernel[:, :, degrees // 2] * (4 * np.pi / (2 * degrees + 1))) * real_sh_basis(lmax, directions)[None]
    gram = np.einsum("vgc,vgd->vcd", design, design)
    ridge = 1e-3 * np.trace(gram, axis1=1, axis2=2)[:, None, None] / gram.shape[1] * np.eye(gram.shape[1])
    sh = np.linalg.solve(gram + ridge, np.einsum("vgc,vg->vc", design, y)[..., None])[..., 0]
    vectors = find_peaks(sh, npeaks=n_peaks, rel_threshold=0.1, min_separation_deg=30.0).vectors
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def fit_multi_watson(signal: np.ndarray, gtab: GradientTable, lambda_par: np.ndarray, lambda_perp: np.ndarray,
                     n_fod: int = 2, *, free_water: np.ndarray | None = None, chunk_size: int = 256,
                     **options) -> MultiWatsonFit:
    """``n_fod`` Watson compartments sharing the voxel's SMT kernel, fitted to the full signal, in chunks.

    Starts: the peaks of a kernel deconvolution (:func:`kernel_deconvolution_peaks`) and a single
    Watson's κ, equal fractions; then batched Levenberg–Marquardt on (θ_j, φ_j, log κ_j) and the
    fraction logits. A missing peak starts perpendicular to the first.
    """
    if int(n_fod) != n_fod or n_fod < 1:
        raise DwiflowInputError(f"n_fod must be a positive integer, got {n_fod!r}")
    if n_fod == 1:
        w = fit_watson(signal, gtab, lambda_par, lambda_perp, free_water=free_water, chunk_size=chunk_size, **options)
        return MultiWatsonFit(w.mu[:, None], w.kappa[:, None], w.odi[:, None], np.ones((w.kappa.size, 1)), w.mse)
    single = fit_watson(signal, gtab, lambda_par, lambda_perp, free_water=free_water, chunk_size=chunk_size)
    peaks = kernel_deconvolution_peaks(signal, gtab, lambda_par, lambda_perp, n_fod)
    per_voxel = dict(signal=signal, lambda_par=lambda_par, lambda_perp=lambda_perp, peaks=peaks, mu_single=single.mu,
                     kappa_single=single.kappa, free_water=free_water)
    return _fit_in_chunks(_fit_multi_watson_chunk, signal.shape[0], chunk_size, MultiWatsonFit, per_voxel, gtab=gtab,
                          **options)


def _fit_multi_watson_chunk(signal, gtab, lambda_par, lambda_perp, peaks, mu_single, kappa_single, *,
                            free_water=None, free_water_diffusivity: float = FREE_WATER_DIFFUSIVITY, lmax: int = 16,
                            iterations: int = 40) -> MultiWatsonFit:
    y, kernel, iso = _normalised_signal_and_kernel(signal, gtab, lambda_par, lambda_perp, lmax, free_water,
                                                   free_water_diffusivity)
    n, k = y.shape[0], peaks.shape[1]
    n_params = 4 * k - 1  # (θ, φ, log κ) per compartment + k-1 fraction logits

    def unpack(p):
        angles = p[:, : 3 * k].reshape(-1, k, 3)
        logits = np.concatenate([np.zeros((p.shape[0], 1)), p[:, 3 * k:]], axis=1)
        fractions = np.exp(logits - logits.max(axis=1, keepdims=True))
        return angles, fractions / fractions.sum(axis=1, keepdims=True)

    def predict(p, rows=slice(None)):
        angles, fractions = unpack(p)
        e = sum(fractions[:, j, None] * _watson_signal(kernel[rows], gtab.bvecs, angles[:, j, 0], angles[:, j, 1],
                                                       angles[:, j, 2], lmax) for j in range(k))
        return e + iso[rows] if iso is not None else e

    first = np.where(np.isfinite(peaks[:, 0]), peaks[:, 0], np.nan_to_num(mu_single, nan=0.0) + [0, 0, 1e-9])
    starts = [first]
    for j in range(1, k):
        fallback = np.cross(first, [[0.0, 0.0, 1.0]])
        fallback = np.where(np.linalg.norm(fallback, axis=1, keepdims=True) > 1e-6, fallback, [1.0, 0.0, 0.0])
        starts.append(np.where(np.isfinite(peaks[:, j]), peaks[:, j], fallback))
    log_kappa = np.log(np.clip(np.nan_to_num(kappa_single, nan=1.0), odi_to_kappa(ODI_BOUNDS[1]),
                               odi_to_kappa(ODI_BOUNDS[0])))
    params = np.zeros((n, n_params))
    for j, d in enumerate(starts):
        params[:, 3 * j], params[:, 3 * j + 1] = cart_to_sphere(d)
        params[:, 3 * j + 2] = log_kappa
    low = np.full(n_params, -np.inf)
    high = np.full(n_params, np.inf)
    low[2: 3 * k: 3], high[2: 3 * k: 3] = np.log(odi_to_kappa(ODI_BOUNDS[1])), np.log(odi_to_kappa(ODI_BOUNDS[0]))
    low[3 * k:], high[3 * k:] = -8.0, 8.0
    params, rss = bounded_levenberg_marquardt(lambda p, rows: predict(p, rows=rows), params, y, low, high, iterations)
    angles, fractions = unpack(params)
    theta, phi = angles[..., 0], angles[..., 1]
    mu = sphere_to_cart(theta, phi)
    kappa = np.exp(angles[..., 2])
    order = np.argsort(-fractions, axis=1)
    pick = lambda a: np.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)
    kappa = pick(kappa)
    return MultiWatsonFit(mu=pick(mu), kappa=kappa, odi=kappa_to_odi(kappa), fractions=pick(fractions),
                          mse=rss / y.shape[1])
