"""Parametric FODs on a fitted SMT kernel: Watson, Bingham and several Watsons, fitted to the full signal.

Each voxel's microscopic kernel (the zeppelin fitted by :class:`dwiflow.core.smt.SmtModel` to the
spherical means) is held fixed; the FOD's parameters are fitted to the voxel's whole normalised
signal, the dispersed kernel's signal being a Funk–Hecke product of their spherical harmonics.
All voxels of a chunk are fitted together by the batched bounded Levenberg–Marquardt of
:mod:`dwiflow.core.optimize`.

References
----------
Kaden E., Kelm N.D., Carson R.P., Does M.D., Alexander D.C. Multi-compartment microscopic
diffusion imaging. NeuroImage 139 (2016) 346-359.
Zhang H., Schneider T., Wheeler-Kingshott C.A., Alexander D.C. NODDI: practical in vivo neurite
orientation dispersion and density imaging of the human brain. NeuroImage 61 (2012) 1000-1016.
Tariq M., Schneider T., Alexander D.C., Gandini Wheeler-Kingshott C.A., Zhang H. Bingham-NODDI.
NeuroImage 133 (2016) 207-223.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import GradientTable
from dwiflow.core.optimize import bounded_levenberg_marquardt, fit_in_chunks
from dwiflow.core.sh import cart_to_sphere, real_sh_basis, sphere_to_cart
from dwiflow.core.defaults import FREE_WATER_DIFFUSIVITY
from dwiflow.core.status import FitStatus
from dwiflow.core.voxels import VoxelBatch, VoxelFit

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(96)
ODI_BOUNDS = (0.02, 0.99)  # as dmipy's SD1Watson


def _status(result, y: np.ndarray) -> np.ndarray:
    """Per-row status of an FOD fit: non-finite input, a non-finite result, or OK.

    Reaching the iteration limit is not a failure here (the fit keeps its best point; on sub-01 2-5%
    of single-Watson and ~30% of two-Watson fits stop there with a residual still falling by more than
    1e-10 per step): it is recorded in the fit's ``converged``, not in its status.
    """
    status = np.zeros(y.shape[0], dtype=np.uint8)
    status[~np.all(np.isfinite(result.params), axis=1)] = FitStatus.SOLVER_FAILED
    status[~np.all(np.isfinite(y), axis=1)] = FitStatus.NONFINITE_INPUT
    return status


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
    status: np.ndarray
    converged: np.ndarray

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
    return fit_in_chunks(_fit_watson_chunk, signal.shape[0], chunk_size, WatsonFit, per_voxel, gtab=gtab, **options)


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
    result = bounded_levenberg_marquardt(lambda p, rows: predict(*p.T, rows=rows), params, y, low, high, iterations)
    theta, phi, log_kappa = result.params.T
    mu = sphere_to_cart(theta, phi)
    kappa = np.exp(log_kappa)
    return WatsonFit(mu=mu, kappa=kappa, odi=kappa_to_odi(kappa), mse=result.rss / y.shape[1],
                     status=_status(result, y), converged=result.converged)


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
    status: np.ndarray
    converged: np.ndarray

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
    return fit_in_chunks(_fit_bingham_chunk, signal.shape[0], chunk_size, BinghamFit, per_voxel, gtab=gtab, **options)


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
    result = bounded_levenberg_marquardt(lambda p, rows: predict(p, rows=rows), params, y, low, high, iterations)
    params = result.params
    mu, nu = bingham_axes(params[:, 0], params[:, 1], params[:, 2])
    kappa = np.exp(params[:, 3])
    psi = np.mod(params[:, 2], np.pi)
    return BinghamFit(mu=mu, nu=nu, kappa=kappa, beta_fraction=params[:, 4], psi=psi, odi=kappa_to_odi(kappa),
                      mse=result.rss / y.shape[1], status=_status(result, y), converged=result.converged)


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
    status: np.ndarray
    converged: np.ndarray

    def sh(self, lmax: int = 8) -> np.ndarray:
        """The fraction-weighted sum of the Watson FODs as real SH (MRtrix3 basis, world frame), integrating to 1."""
        total = 0.0
        for j in range(self.kappa.shape[1]):
            part = WatsonFit(self.mu[:, j], self.kappa[:, j], self.odi[:, j], self.mse, self.status,
                             self.converged).sh(lmax)
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
        return MultiWatsonFit(w.mu[:, None], w.kappa[:, None], w.odi[:, None], np.ones((w.kappa.size, 1)), w.mse,
                              w.status, w.converged)
    single = fit_watson(signal, gtab, lambda_par, lambda_perp, free_water=free_water, chunk_size=chunk_size)
    peaks = kernel_deconvolution_peaks(signal, gtab, lambda_par, lambda_perp, n_fod)
    per_voxel = dict(signal=signal, lambda_par=lambda_par, lambda_perp=lambda_perp, peaks=peaks, mu_single=single.mu,
                     kappa_single=single.kappa, free_water=free_water)
    return fit_in_chunks(_fit_multi_watson_chunk, signal.shape[0], chunk_size, MultiWatsonFit, per_voxel, gtab=gtab,
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
    result = bounded_levenberg_marquardt(lambda p, rows: predict(p, rows=rows), params, y, low, high, iterations)
    angles, fractions = unpack(result.params)
    theta, phi = angles[..., 0], angles[..., 1]
    mu = sphere_to_cart(theta, phi)
    kappa = np.exp(angles[..., 2])
    order = np.argsort(-fractions, axis=1)
    pick = lambda a: np.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)
    kappa = pick(kappa)
    return MultiWatsonFit(mu=pick(mu), kappa=kappa, odi=kappa_to_odi(kappa), fractions=pick(fractions),
                          mse=result.rss / y.shape[1], status=_status(result, y), converged=result.converged)


# ------------------------------------------------------------------------------------------------ on a kernel fit
FOD_KINDS = ("watson", "bingham")


@dataclass
class SmtFodFit(VoxelFit):
    """A parametric FOD fitted on an SMT kernel fit; every public array is shaped like the input volume.

    Voxels whose kernel fit failed, or whose FOD fit failed, hold NaN (0 for ``sh``) and a non-OK
    status. ``mu`` is (…, 3) for one compartment and (…, 3·n) for ``n`` Watson compartments (one
    unit vector per compartment, largest fraction first); ``kappa`` and ``odi`` (…) or (…, n).
    """

    batch: VoxelBatch
    kind: str
    rows: WatsonFit | BinghamFit | MultiWatsonFit
    fitted: np.ndarray  # indices of the kernel fit's rows that were fitted
    status_rows: np.ndarray

    def _volume(self, values: np.ndarray, fill=np.nan) -> np.ndarray:
        values = np.asarray(values, dtype=float)
        full = np.full((self.status_rows.size,) + values.shape[1:], fill)
        full[self.fitted] = values
        full[self.status_rows != FitStatus.OK] = fill
        return self.volume(full, fill)

    @property
    def n_compartments(self) -> int:
        return self.rows.kappa.shape[1] if isinstance(self.rows, MultiWatsonFit) else 1

    @property
    def mu(self) -> np.ndarray:
        return self._volume(self.rows.mu.reshape(self.fitted.size, -1))

    @property
    def kappa(self) -> np.ndarray:
        return self._volume(self.rows.kappa)

    @property
    def odi(self) -> np.ndarray:
        return self._volume(self.rows.odi)

    @property
    def mse(self) -> np.ndarray:
        return self._volume(self.rows.mse)

    @property
    def fractions(self) -> np.ndarray:
        """Volume fraction of each Watson compartment (…, n); only with several compartments."""
        if not isinstance(self.rows, MultiWatsonFit):
            raise DwiflowInputError("fractions exist for several Watson compartments (n_fod > 1) only",
                                    parameters=("n_fod",))
        return self._volume(self.rows.fractions)

    @property
    def beta_fraction(self) -> np.ndarray:
        """Bingham β/κ; only for the Bingham FOD."""
        if not isinstance(self.rows, BinghamFit):
            raise DwiflowInputError("beta exists for the Bingham FOD only", parameters=("fod",))
        return self._volume(self.rows.beta_fraction)

    @property
    def nu(self) -> np.ndarray:
        """Bingham second axis (…, 3); only for the Bingham FOD."""
        if not isinstance(self.rows, BinghamFit):
            raise DwiflowInputError("nu exists for the Bingham FOD only", parameters=("fod",))
        return self._volume(self.rows.nu)

    def sh(self, lmax: int = 8) -> np.ndarray:
        """The FOD as real SH (…, n_coefficients), MRtrix3 basis, world frame, integrating to 1; 0 where not fitted."""
        return self._volume(self.rows.sh(lmax), fill=0.0)

    @property
    def shm_coeff(self) -> np.ndarray:
        return self.sh(8)


def fit_fod_on_kernel(kernel_fit, fod: str = "watson", n_fod: int = 1) -> SmtFodFit:
    """Fit a Watson (``n_fod`` compartments) or Bingham FOD on every voxel of an SMT kernel fit whose kernel is OK.

    The voxel's status is the kernel fit's where that failed, else the FOD fit's.
    """
    if fod not in FOD_KINDS:
        raise DwiflowInputError(f"fod must be one of {FOD_KINDS}, got {fod!r}", parameters=("fod",))
    if isinstance(n_fod, bool) or int(n_fod) != n_fod or not 1 <= n_fod <= 3:
        raise DwiflowInputError(f"n_fod must be 1, 2 or 3, got {n_fod!r}", parameters=("n_fod",))
    if n_fod > 1 and fod != "watson":
        raise DwiflowInputError("several FOD compartments (n_fod > 1) are fitted as Watsons", parameters=("n_fod", "fod"))
    model = kernel_fit.model
    ok = np.flatnonzero(kernel_fit.status_rows == FitStatus.OK)
    args = (kernel_fit.batch.signal()[ok], model.gtab, kernel_fit.lambda_par_rows[ok], kernel_fit.lambda_perp_rows[ok])
    water = None if kernel_fit.free_water_rows is None else kernel_fit.free_water_rows[ok]
    if n_fod > 1:
        rows = fit_multi_watson(*args, n_fod, free_water=water)
    else:
        rows = fit_watson(*args, free_water=water)
        if fod == "bingham":
            rows = fit_bingham(*args, initial=rows, free_water=water)
    status = kernel_fit.status_rows.copy()
    status[ok] = rows.status
    return SmtFodFit(kernel_fit.batch, fod, rows, ok, status)
