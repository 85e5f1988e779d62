"""Synthetic diffusion phantoms with known ground truth (multi-tensor signals).

The signal of a voxel is S0 · [f_csf e^{-b D_csf} + (1-f_csf) Σ_k f_k e^{-b gᵀ D_k g}] with
axially symmetric fibre tensors D_k, corrupted by Rician noise of standard deviation
S0/SNR (Gudbjartsson & Patz 1995).

References
----------
Gudbjartsson H., Patz S. The Rician distribution of noisy MRI data. Magn Reson Med 34
(1995) 910-914.
Tournier J-D. et al. Robust determination of the fibre orientation distribution in
diffusion MRI. NeuroImage 35 (2007) 1459-1472 (multi-fibre simulations).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import GradientTable, gradient_table
from dwiflow.core.sphere import repulsion_sphere

DEFAULT_FIBRE_EVALS = (1.7e-3, 0.3e-3, 0.3e-3)
CSF_DIFFUSIVITY = 3.0e-3


def acquisition_scheme(kind: str = "single", n_b0: int = 6) -> GradientTable:
    """A standard gradient scheme: ``single`` (b=1000, 60 dirs) or ``multi`` (b=1000/2000/3000, 30/45/60).

    Directions come from electrostatic repulsion, so every shell covers the sphere evenly.
    """
    if kind == "single":
        shells = [(1000.0, 60)]
    elif kind == "multi":
        shells = [(1000.0, 30), (2000.0, 45), (3000.0, 60)]
    else:
        raise DwiflowInputError(f"scheme must be 'single' or 'multi', got {kind!r}")
    bvals = [np.zeros(n_b0)]
    bvecs = [np.zeros((n_b0, 3))]
    for i, (b, n) in enumerate(shells):
        dirs = repulsion_sphere(n, seed=i + 1).hemisphere
        bvals.append(np.full(n, b))
        bvecs.append(dirs)
    return gradient_table(np.concatenate(bvals), np.concatenate(bvecs).T, frame="world")


def random_directions(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` directions uniformly distributed on the sphere."""
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def axially_symmetric_tensor(direction: np.ndarray, evals: tuple[float, float, float]) -> np.ndarray:
    """Tensors (…, 3, 3) with principal axis ``direction`` (…, 3) and eigenvalues (λ∥, λ⊥, λ⊥)."""
    d = np.asarray(direction, dtype=float)
    d = d / np.linalg.norm(d, axis=-1, keepdims=True)
    l_par, l_perp = evals[0], evals[1]
    return l_perp * np.eye(3) + (l_par - l_perp) * np.einsum("...i,...j->...ij", d, d)


def add_rician_noise(signal: np.ndarray, sigma: float | np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of signal plus complex Gaussian noise of standard deviation ``sigma``."""
    real = signal + sigma * rng.standard_normal(signal.shape)
    imag = sigma * rng.standard_normal(signal.shape)
    return np.sqrt(real**2 + imag**2)


@dataclass
class Phantom:
    """A synthetic DWI with its ground truth.

    Attributes
    ----------
    data : ndarray (x, y, z, n)
    gtab : GradientTable
    directions : ndarray (x, y, z, max_fibres, 3)
        Fibre directions; NaN for absent fibres.
    fractions : ndarray (x, y, z, max_fibres)
        Fibre volume fractions within the tissue (sum 1 over present fibres).
    n_fibres : ndarray (x, y, z) of int
    csf_fraction : ndarray (x, y, z)
    evals : tuple
        Fibre eigenvalues (λ∥, λ⊥, λ⊥).
    s0 : float
    snr : float or None
    noiseless : ndarray (x, y, z, n)
    """

    data: np.ndarray
    gtab: GradientTable
    directions: np.ndarray
    fractions: np.ndarray
    n_fibres: np.ndarray
    csf_fraction: np.ndarray
    evals: tuple[float, float, float]
    s0: float
    snr: float | None
    noiseless: np.ndarray

    @property
    def fa(self) -> np.ndarray:
        """FA of the single-fibre tensor (exact where one fibre and no CSF)."""
        from dwiflow.core.tensor import fractional_anisotropy

        return fractional_anisotropy(np.asarray(self.evals))


def multi_tensor_signal(
    gtab: GradientTable,
    directions: np.ndarray,
    fractions: np.ndarray,
    evals: tuple[float, float, float] = DEFAULT_FIBRE_EVALS,
    csf_fraction: np.ndarray | float = 0.0,
    s0: float = 100.0,
) -> np.ndarray:
    """Noiseless multi-tensor signal for voxels (…) with fibres (…, k, 3) and fractions (…, k).

    Absent fibres have fraction 0 (their direction may be NaN).
    """
    directions = np.asarray(directions, dtype=float)
    fractions = np.asarray(fractions, dtype=float)
    safe_dirs = np.where(np.isfinite(directions), directions, 0.0)
    safe_dirs[np.linalg.norm(safe_dirs, axis=-1) == 0] = (0.0, 0.0, 1.0)
    safe_dirs = safe_dirs / np.linalg.norm(safe_dirs, axis=-1, keepdims=True)
    cos = np.einsum("...kd,nd->...kn", safe_dirs, gtab.bvecs)  # (…, k, n)
    l_par, l_perp = evals[0], evals[1]
    adc = l_perp + (l_par - l_perp) * cos**2
    tissue = np.einsum("...k,...kn->...n", fractions, np.exp(-gtab.bvals * adc))
    csf = np.asarray(csf_fraction, dtype=float)[..., None]
    return s0 * ((1 - csf) * tissue + csf * np.exp(-gtab.bvals * CSF_DIFFUSIVITY))


def make_phantom(
    gtab: GradientTable,
    shape: tuple[int, int, int] = (10, 10, 10),
    *,
    n_fibres: int | tuple[int, ...] = (1, 2, 3),
    directions: np.ndarray | None = None,
    fractions: np.ndarray | None = None,
    min_separation_deg: float = 45.0,
    evals: tuple[float, float, float] = DEFAULT_FIBRE_EVALS,
    csf_fraction: float | tuple[float, float] = 0.0,
    s0: float = 100.0,
    snr: float | None = 30.0,
    seed: int = 0,
) -> Phantom:
    """Build a phantom with 1-3 fibres per voxel, random or given orientations and fractions.

    Parameters
    ----------
    gtab : GradientTable
        Any scheme, including multi-shell.
    shape : (x, y, z)
    n_fibres : int or tuple of int
        Fibres per voxel; a tuple draws each voxel's count uniformly from it.
    directions : ndarray (k, 3), optional
        Fixed fibre directions for every voxel (then ``n_fibres`` is k).
    fractions : ndarray (k,), optional
        Fixed fractions (normalised to sum 1); random (Dirichlet, each >= 0.2) otherwise.
    min_separation_deg : float
        Minimum angle between random fibres of one voxel.
    csf_fraction : float or (low, high)
        Isotropic free-water fraction, fixed or uniform in a range.
    snr : float or None
        S0 / sigma of the Rician noise; None for noiseless data.
    seed : int

    Returns
    -------
    Phantom
    """
    if len(shape) != 3 or min(shape) < 1:
        raise DwiflowInputError(f"shape must be three positive integers, got {shape}")
    if snr is not None and snr <= 0:
        raise DwiflowInputError(f"snr must be positive, got {snr}")
    rng = np.random.default_rng(seed)
    nvox = int(np.prod(shape))
    if directions is not None:
        fixed = np.asarray(directions, dtype=float).reshape(-1, 3)
        k_max = fixed.shape[0]
        counts = np.full(nvox, k_max)
        dirs = np.broadcast_to(fixed / np.linalg.norm(fixed, axis=1, keepdims=True), (nvox, k_max, 3)).copy()
    else:
        choices = np.atleast_1d(np.asarray(n_fibres, dtype=int))
        if choices.min() < 1 or choices.max() > 3:
            raise DwiflowInputError(f"n_fibres must be between 1 and 3, got {n_fibres}")
        k_max = int(choices.max())
        counts = rng.choice(choices, size=nvox)
        dirs = _separated_directions(nvox, k_max, np.radians(min_separation_deg), rng)
    if fractions is not None:
        f = np.asarray(fractions, dtype=float).reshape(-1)
        if f.size != k_max:
            raise DwiflowInputError(f"fractions has {f.size} entries but there are {k_max} fibres")
        fr = np.broadcast_to(f / f.sum(), (nvox, k_max)).copy()
    else:
        fr = np.zeros((nvox, k_max))
        for k in range(1, k_max + 1):
            sel = counts == k
            # fractions of at least 0.2 each, otherwise uniform on the simplex
            raw = rng.dirichlet(np.ones(k), size=int(sel.sum()))
            fr[sel, :k] = 0.2 + raw * (1 - 0.2 * k) if k > 1 else 1.0
    present = np.arange(k_max)[None, :] < counts[:, None]
    fr[~present] = 0.0
    dirs[~present] = np.nan
    if np.isscalar(csf_fraction):
        csf = np.full(nvox, float(csf_fraction))
    else:
        lo, hi = csf_fraction
        csf = rng.uniform(lo, hi, nvox)
    clean = multi_tensor_signal(gtab, dirs, fr, evals, csf, s0)
    noisy = clean if snr is None else add_rician_noise(clean, s0 / snr, rng)
    spatial = tuple(int(s) for s in shape)
    return Phantom(
        data=noisy.reshape(spatial + (-1,)),
        gtab=gtab,
        directions=dirs.reshape(spatial + (k_max, 3)),
        fractions=fr.reshape(spatial + (k_max,)),
        n_fibres=counts.reshape(spatial),
        csf_fraction=csf.reshape(spatial),
        evals=tuple(evals),
        s0=s0,
        snr=snr,
        noiseless=clean.reshape(spatial + (-1,)),
    )


def _separated_directions(nvox: int, k: int, min_angle: float, rng: np.random.Generator) -> np.ndarray:
    """(nvox, k, 3) random directions, every pair of a voxel at least ``min_angle`` apart (axially)."""
    dirs = np.empty((nvox, k, 3))
    dirs[:, 0] = random_directions(nvox, rng)
    cos_limit = np.cos(min_angle)
    for j in range(1, k):
        todo = np.arange(nvox)
        while todo.size:
            cand = random_directions(todo.size, rng)
            ok = np.all(np.abs(np.einsum("vkd,vd->vk", dirs[todo, :j], cand)) < cos_limit, axis=1)
            dirs[todo[ok], j] = cand[ok]
            todo = todo[~ok]
    return dirs


GM_DIFFUSIVITY = 0.8e-3  # mm²/s, isotropic grey-matter-like compartment
CSF_DIFFUSIVITY = 3.0e-3  # mm²/s, free water at body temperature
CSF_PROTON_DENSITY = 1.3  # CSF's b=0 signal relative to tissue's


@dataclass
class ThreeTissuePhantom:
    """Signals of a WM/GM/CSF phantom with the truth: ``fractions`` (x, y, z, 3) are volume fractions (WM, GM,
    CSF); ``signal_fractions`` the share of each tissue in the b=0 signal (CSF weighs ``CSF_PROTON_DENSITY``)."""

    data: np.ndarray
    gtab: GradientTable
    fractions: np.ndarray
    signal_fractions: np.ndarray
    wm: Phantom


def smooth_tissue_fractions(shape: tuple[int, int, int], *, width: float = 3.0, sharpness: float = 6.0,
                            seed: int = 7) -> np.ndarray:
    """Spatially smooth WM/GM/CSF volume fractions (x, y, z, 3), brain-like patches rather than voxel-wise random
    tissues: three Gaussian-smoothed noise fields (``width`` voxels) made into fractions by a softmax whose
    ``sharpness`` sets how many voxels are nearly pure."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    fields = np.stack([gaussian_filter(rng.standard_normal(shape), width, mode="wrap") for _ in range(3)], axis=-1)
    fields /= fields.std()
    weights = np.exp(sharpness * (fields - fields.max(axis=-1, keepdims=True)))
    return weights / weights.sum(axis=-1, keepdims=True)


def three_tissue_phantom(
    gtab: GradientTable, shape: tuple[int, int, int], *, s0: float = 1000.0, snr: float | None = 30.0, seed: int = 7,
    fractions: np.ndarray | None = None,
) -> ThreeTissuePhantom:
    """WM (1-2 fibres, :func:`make_phantom`), GM (D = 0.8e-3) and CSF (D = 3e-3) with partial volumes: a quarter of
    the voxels pure WM, a quarter pure GM, a sixth pure CSF, the rest random mixtures (Dirichlet(1, 1, 1)), or the
    given volume ``fractions`` (x, y, z, 3), e.g. :func:`smooth_tissue_fractions`; Rician noise at ``snr`` of
    ``s0``."""
    wm = make_phantom(gtab, shape, n_fibres=(1, 2), snr=None, seed=seed)
    rng = np.random.default_rng(seed)
    nvox = int(np.prod(shape))
    kind = rng.choice(4, size=nvox, p=[0.25, 0.25, 1 / 6, 1 - 0.25 - 0.25 - 1 / 6])
    f = rng.dirichlet([1, 1, 1], size=nvox)
    f[kind == 0] = [1.0, 0.0, 0.0]
    f[kind == 1] = [0.0, 1.0, 0.0]
    f[kind == 2] = [0.0, 0.0, 1.0]
    if fractions is not None:
        f = np.asarray(fractions, dtype=float).reshape(nvox, 3)
    wm_signal = wm.data.reshape(nvox, -1) / wm.s0
    gm_signal = np.exp(-gtab.bvals * GM_DIFFUSIVITY)[None]
    csf_signal = CSF_PROTON_DENSITY * np.exp(-gtab.bvals * CSF_DIFFUSIVITY)[None]
    clean = s0 * (f[:, :1] * wm_signal + f[:, 1:2] * gm_signal + f[:, 2:] * csf_signal)
    data = clean if snr is None else add_rician_noise(clean, s0 / snr, rng)
    weights = f * np.array([1.0, 1.0, CSF_PROTON_DENSITY])
    return ThreeTissuePhantom(data.reshape(shape + (-1,)), gtab, f.reshape(shape + (3,)),
                              (weights / weights.sum(axis=1, keepdims=True)).reshape(shape + (3,)), wm)
