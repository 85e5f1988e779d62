"""Bingham FOD on the SMT kernel: against the Watson (β = 0) and recovered from a phantom built independently."""

import numpy as np

from dwiflow.core.sims import acquisition_scheme
from dwiflow.core.smt_fod import WatsonFit, bingham_axes, bingham_sh, fit_bingham
from dwiflow.core.sphere import geodesic_sphere


def _angle(a, b):
    return np.degrees(np.arccos(np.clip(np.abs(np.sum(a * b, axis=-1)), 0, 1)))


def test_bingham_without_beta_is_the_watson_and_its_lobes_follow_the_axes():
    rng = np.random.default_rng(0)
    theta, phi, psi = rng.uniform(0, np.pi, 5), rng.uniform(-np.pi, np.pi, 5), rng.uniform(0, np.pi, 5)
    mu, nu = bingham_axes(theta, phi, psi)
    kappa = np.array([0.5, 2.0, 8.0, 20.0, 31.8])  # up to the largest kappa the fit allows (ODI 0.02)
    # quadrature SH of the Bingham vs the Watson's Funk-Hecke (Legendre) coefficients: two independent routes
    watson = WatsonFit(mu=mu, kappa=kappa, odi=np.zeros(5), mse=np.zeros(5), status=np.zeros(5, np.uint8),
                       converged=np.ones(5, bool)).sh(8)
    assert np.allclose(bingham_sh(mu, nu, kappa, np.zeros(5), 8), watson, atol=1e-6)
    assert np.allclose(np.abs(np.sum(mu * nu, axis=1)), 0, atol=1e-12)
    # with beta > 0 the density is highest along mu, then nu, lowest along mu x nu (kappa <= 8: lmax 12 truncates
    # sharper densities, whose SH then ring)
    from dwiflow.core.sh import real_sh_basis

    sh = bingham_sh(mu, nu, kappa, 0.6 * kappa, 12)
    third = np.cross(mu, nu)
    amp = [np.einsum("vc,vc->v", real_sh_basis(12, d), sh) for d in (mu, nu, third)]
    assert np.all(amp[0][:3] > amp[1][:3]) and np.all(amp[1][:3] > amp[2][:3])


def test_fit_recovers_a_bingham_phantom():
    """Signals integrated over the Bingham density on a dense sphere (not the SH route), SNR 100 at b=0."""
    rng = np.random.default_rng(3)
    gtab = acquisition_scheme("multi")
    n = 40
    theta, phi, psi = np.arccos(rng.uniform(-1, 1, n)), rng.uniform(-np.pi, np.pi, n), rng.uniform(0, np.pi, n)
    mu, nu = bingham_axes(theta, phi, psi)
    kappa, beta_fraction = rng.uniform(4, 16, n), rng.uniform(0.2, 0.7, n)
    lpar, lperp = np.full(n, 1.7e-3), np.full(n, 0.3e-3)
    dense = geodesic_sphere(24).vertices  # 5762 points, about 3 degrees apart
    density = np.exp(kappa[:, None] * ((dense @ mu.T).T ** 2 - 1) + (beta_fraction * kappa)[:, None] * (dense @ nu.T).T ** 2)
    density /= density.sum(axis=1, keepdims=True)
    cos2 = (gtab.bvecs @ dense.T) ** 2  # (g, points)
    kernel = np.exp(-gtab.bvals[:, None, None] * (lperp[None, None, :1] + (1.4e-3) * cos2[..., None]))[..., 0]
    signal = density @ kernel.T
    signal = np.abs(signal + rng.normal(0, 0.01, signal.shape) + 1j * rng.normal(0, 0.01, signal.shape))
    fit = fit_bingham(signal, gtab, lpar, lperp)
    mu_error, nu_error = _angle(fit.mu, mu), _angle(fit.nu, nu)
    kappa_error = np.abs(fit.kappa / kappa - 1)
    beta_error = np.abs(fit.beta_fraction - beta_fraction)
    print(f"mu {np.median(mu_error):.2f} deg, nu {np.median(nu_error):.2f} deg, kappa {np.median(kappa_error):.3f}, "
          f"beta_fraction {np.median(beta_error):.3f}")
    assert np.median(mu_error) < 2 and np.percentile(mu_error, 90) < 5
    assert np.median(nu_error) < 10
    assert np.median(kappa_error) < 0.1 and np.median(beta_error) < 0.1
    # the Bingham explains the data better than the Watson it started from
    assert np.median(fit.mse) < 1.2e-4
