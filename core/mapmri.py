"""MAP-MRI: mean apparent propagator MRI with Laplacian regularisation (MAPL), anisotropic basis.

The normalised signal is a linear combination of products of 1D Hermite functions along the
axes of each voxel's diffusion tensor, scaled by ``u_i = sqrt(2 λ_i τ)`` (Özarslan et al. 2013).
The coefficients minimise the squared residual plus ``λ`` times the integrated squared
Laplacian of the signal, which is a quadratic form with an analytic matrix (Fick et al. 2016);
``λ`` is fixed (0.2) or chosen per voxel by generalised cross-validation. q-space indices
(RTOP, RTAP, RTPP, MSD, QIV, non-Gaussianities, the Laplacian norm) are linear or quadratic
functionals of the coefficients.

Every voxel has its own design matrix (its tensor frame and scales), so a fit is a batch of
small regularised least-squares problems: they are assembled and solved as stacked arrays.
For GCV each voxel's problem is diagonalised once (``L v = θ MᵀM v``), after which the GCV
criterion costs O(n_coefficients) per trial weight.

References
----------
Özarslan E., Koay C.G., Shepherd T.M., et al. Mean apparent propagator (MAP) MRI: a novel
diffusion imaging method for mapping tissue microstructure. NeuroImage 78 (2013) 16-32.
Fick R.H.J., Wassermann D., Caruyer E., Deriche R. MAPL: tissue microstructure estimation
using Laplacian-regularized MAP-MRI and its application to HCP data. NeuroImage 134 (2016) 365-385.
Craven P., Wahba G. Smoothing noisy data with spline functions. Numer Math 31 (1979) 377-403.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import factorial, gamma, pi, sqrt

import numpy as np

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import GradientTable
from dwiflow.core.tensor import TensorModel
from dwiflow.core.voxels import VoxelBatch, iter_chunks, scatter

DEFAULT_TAU = 1.0 / (4.0 * np.pi**2)  # without Δ/δ: q = sqrt(b)/(2π·sqrt(τ)) with this τ gives q = sqrt(b)
GCV_BOUNDS = (1e-5, 10.0)

STATUS_OK = 0
STATUS_NONFINITE = 1
STATUS_NO_B0_SIGNAL = 2
STATUS_SINGULAR = 3
STATUS_SOLVER_FAILED = 4
STATUS_LEVELS = {STATUS_OK: "ok", STATUS_NONFINITE: "non-finite input signal",
                 STATUS_NO_B0_SIGNAL: "no positive b=0 signal", STATUS_SINGULAR: "singular least-squares system",
                 STATUS_SOLVER_FAILED: "the constrained (positivity) solver found no solution"}
POSITIVITY_MODES = ("none", "grid", "global")
GRID_MARGIN = -0.1  # propagator lower bound at the grid points (as the reference implementation)
WORKING_SET_TIERS = (16, 32, 64, 128, 256)  # sizes of the reduced grid problems (working sets, see _grid_working_set)
WORKING_SET_STEP = 24  # most violated grid points added per round
ACTIVE_SET_ROUNDS = 400  # rounds of the exact active-set projection before falling back to CVXPY


def _double_factorial(n: int) -> int:
    out = 1
    for k in range(n, 0, -2):
        out *= k
    return out


@lru_cache(maxsize=8)
def index_matrix(radial_order: int) -> np.ndarray:
    """(n1, n2, n3) of every basis function with n1 + n2 + n3 even and ≤ radial_order."""
    rows = []
    for n in range(0, radial_order + 1, 2):
        for i in range(n + 1):
            for j in range(n - i + 1):
                rows.append((n - i - j, j, i))
    return np.array(rows, dtype=int)


@lru_cache(maxsize=8)
def q0_weights(radial_order: int) -> np.ndarray:
    """Value of each basis function at q = 0 (the signal normalisation), ``B`` in Özarslan 2013."""
    out = []
    for n1, n2, n3 in index_matrix(radial_order):
        if n1 % 2 or n2 % 2 or n3 % 2:
            out.append(0.0)
        else:
            out.append(sqrt(factorial(n1) * factorial(n2) * factorial(n3))
                       / (_double_factorial(n1) * _double_factorial(n2) * _double_factorial(n3)))
    return np.array(out)


def check_radial_order(radial_order: int) -> int:
    if int(radial_order) != radial_order or radial_order < 2 or radial_order % 2:
        raise DwiflowInputError(f"radial_order must be an even integer >= 2, got {radial_order!r}")
    return int(radial_order)


def hermite_functions(order: int, x: np.ndarray) -> np.ndarray:
    """Normalised Hermite functions ``exp(-x²/2) H_n(x) / sqrt(2^n n!)`` for n = 0..order (last axis)."""
    out = np.empty(x.shape + (order + 1,))
    out[..., 0] = np.exp(-0.5 * x**2)
    if order >= 1:
        out[..., 1] = np.sqrt(2.0) * x * out[..., 0]
    for n in range(1, order):
        out[..., n + 1] = np.sqrt(2.0 / (n + 1)) * x * out[..., n] - np.sqrt(n / (n + 1)) * out[..., n - 1]
    return out


def signal_basis(radial_order: int, mu: np.ndarray, q_local: np.ndarray) -> np.ndarray:
    """Design matrices (…, n_q, n_coef) for q-vectors already in each voxel's tensor frame.

    ``mu`` (…, 3) are the scales in mm, ``q_local`` (…, n_q, 3) in 1/mm.
    """
    from dwiflow.core._mapmri_kernel import anisotropic_design

    ind = index_matrix(radial_order)
    sign = (-1.0) ** (ind.sum(axis=1) // 2)  # i^(-n) for even n1+n2+n3
    mu2 = np.ascontiguousarray(mu, dtype=float).reshape(-1, 3)
    q2 = np.ascontiguousarray(q_local, dtype=float).reshape(mu2.shape[0], -1, 3)
    out = np.empty(q2.shape[:2] + (ind.shape[0],))
    anisotropic_design(mu2, q2, radial_order, *(np.ascontiguousarray(ind[:, a]) for a in range(3)), sign, out)
    return out.reshape(q_local.shape[:-1] + (ind.shape[0],))


@lru_cache(maxsize=8)
def _laplacian_parts(radial_order: int) -> np.ndarray:
    """The six mu-independent matrices whose weighted sum is the Laplacian regulariser (Fick 2016)."""
    n = radial_order + 1

    def u(a, b):
        return (-1) ** a * (a == b) / (2 * sqrt(pi))

    def t(a, b):
        return pi**1.5 * (-1) ** (a + 1) * (sqrt((b - 1) * b) * (b - 2 == a) + sqrt((a - 1) * a) * (a - 2 == b)
                                            + (2 * a + 1) * (a == b))

    def s(a, b):
        sq_ba = sqrt(gamma(b + 1) / gamma(a + 1))
        return 2 * pi**3.5 * (-1) ** a * (3 * (2 * a * a + 2 * a + 1) * (a == b) + 2 * (2 * a + 3) * sq_ba * (b == a + 2)
                                          + sq_ba * (b == a + 4) + 2 * (2 * b + 3) / sq_ba * (b + 2 == a)
                                          + (b + 4 == a) / sq_ba)

    S = np.array([[s(a, b) for b in range(n)] for a in range(n)])
    T = np.array([[t(a, b) for b in range(n)] for a in range(n)])
    U = np.array([[u(a, b) for b in range(n)] for a in range(n)])
    x, y, z = index_matrix(radial_order).T
    same_parity = (((x[:, None] - x[None]) % 2 == 0) & ((y[:, None] - y[None]) % 2 == 0)
                   & ((z[:, None] - z[None]) % 2 == 0))
    X, Y, Z = (np.ix_(v, v) for v in (x, y, z))
    parts = np.stack([
        S[X] * U[Y] * U[Z], S[Y] * U[Z] * U[X], S[Z] * U[X] * U[Y],
        T[X] * T[Y] * U[Z], T[X] * T[Z] * U[Y], T[Z] * T[Y] * U[X],
    ])
    return parts * same_parity


def laplacian_matrix(radial_order: int, mu: np.ndarray) -> np.ndarray:
    """Laplacian regularisation matrices (…, n_coef, n_coef) for scales ``mu`` (…, 3)."""
    ux, uy, uz = mu[..., 0], mu[..., 1], mu[..., 2]
    weights = np.stack([ux**3 / (uy * uz), uy**3 / (ux * uz), uz**3 / (ux * uy),
                        2 * ux * uy / uz, 2 * ux * uz / uy, 2 * uz * uy / ux], axis=-1)
    return np.einsum("...k,kij->...ij", weights, _laplacian_parts(radial_order))


@lru_cache(maxsize=8)
def isotropic_index_matrix(radial_order: int) -> np.ndarray:
    """(j, l, m) of every isotropic basis function: radial index j ≥ 1, degree l = n + 2 - 2j, order m."""
    rows = []
    for n in range(0, radial_order + 1, 2):
        for j in range(1, 2 + n // 2):
            l_value = n + 2 - 2 * j
            rows.extend((j, l_value, m) for m in range(-l_value, l_value + 1))
    return np.array(rows, dtype=int)


def _genlaguerre(n: np.ndarray, alpha: np.ndarray, x: np.ndarray) -> np.ndarray:
    from scipy.special import eval_genlaguerre

    return eval_genlaguerre(n, alpha, x)


@lru_cache(maxsize=8)
def isotropic_q0_weights(radial_order: int) -> np.ndarray:
    """Isotropic basis at q = 0: L_{j-1}^{1/2}(0) for l = 0 (the only functions not vanishing there)."""
    ind = isotropic_index_matrix(radial_order)
    return np.where(ind[:, 1] == 0, _genlaguerre(ind[:, 0] - 1, 0.5, np.zeros(ind.shape[0])), 0.0)


def _sh_columns(radial_order: int, directions: np.ndarray) -> np.ndarray:
    """Real SH (MRtrix3 basis) of each isotropic basis function's (l, m) at ``directions`` (…, 3)."""
    from dwiflow.core.sh import real_sh_basis, sh_degree_order

    d = np.asarray(directions, dtype=float)
    flat = d.reshape(-1, 3)
    norms = np.linalg.norm(flat, axis=1)
    flat = np.where(norms[:, None] > 0, flat / np.where(norms > 0, norms, 1)[:, None], [0.0, 0.0, 1.0])
    basis = real_sh_basis(radial_order, flat)
    degrees, orders = sh_degree_order(radial_order)
    lookup = {(int(l), int(m)): i for i, (l, m) in enumerate(zip(degrees, orders))}
    ind = isotropic_index_matrix(radial_order)
    cols = [lookup[(int(l), int(m))] for _, l, m in ind]
    return basis[:, cols].reshape(d.shape[:-1] + (len(cols),))


def isotropic_signal_basis(radial_order: int, u0: np.ndarray, q_vectors: np.ndarray) -> np.ndarray:
    """Isotropic design matrices (v, n_q, n_coef) for scales ``u0`` (v,) and world-frame q-vectors (n_q, 3)."""
    ind = isotropic_index_matrix(radial_order)
    qval = np.linalg.norm(q_vectors, axis=1)
    a = 2 * np.pi**2 * u0[:, None, None] ** 2 * qval[None, :, None] ** 2  # (v, g, 1)
    j, ell = ind[:, 0], ind[:, 1]
    radial = ((-1.0) ** (ell / 2) * np.sqrt(4 * np.pi) * a ** (ell / 2) * np.exp(-a)
              * _genlaguerre(j - 1, ell + 0.5, 2 * a))
    return radial * _sh_columns(radial_order, q_vectors)[None]


@lru_cache(maxsize=8)
def isotropic_laplacian_unit(radial_order: int) -> np.ndarray:
    """Isotropic Laplacian regulariser for u0 = 1 (it scales linearly with u0)."""
    ind = isotropic_index_matrix(radial_order)
    n = ind.shape[0]
    lap = np.zeros((n, n))
    for i in range(n):
        for k in range(i, n):
            if ind[i, 1] != ind[k, 1] or ind[i, 2] != ind[k, 2]:
                continue
            ji, jk, ell = int(ind[i, 0]), int(ind[k, 0]), int(ind[i, 1])
            if ji == jk + 2:
                value = 2.0 ** (2 - ell) * pi**2 * gamma(2.5 + jk + ell) / gamma(jk)
            elif ji == jk + 1:
                value = 2.0 ** (2 - ell) * pi**2 * (-3 + 4 * ji + 2 * ell) * gamma(1.5 + jk + ell) / gamma(jk)
            elif ji == jk:
                value = (2.0 ** (-ell) * pi**2 * (3 + 24 * ji**2 + 4 * (ell - 2) * ell + 12 * ji * (2 * ell - 1))
                         * gamma(0.5 + ji + ell) / gamma(ji))
            elif ji == jk - 1:
                value = 2.0 ** (2 - ell) * pi**2 * (-3 + 4 * jk + 2 * ell) * gamma(1.5 + ji + ell) / gamma(ji)
            elif ji == jk - 2:
                value = 2.0 ** (2 - ell) * pi**2 * gamma(2.5 + ji + ell) / gamma(ji)
            else:
                continue
            lap[i, k] = lap[k, i] = value
    return lap


def isotropic_scale(mu_squared: np.ndarray) -> np.ndarray:
    """Isotropic scale u0 (v,) from the anisotropic squared scales (v, 3): the positive real root of
    3t³ + (X+Y+Z)t² - (XY+XZ+YZ)t - 3XYZ = 0 (Özarslan 2013, eq. 65), u0 = sqrt(t)."""
    x, y, z = mu_squared.T
    # monic t³ + p2 t² + p1 t + p0 with p2 = (X+Y+Z)/3, p1 = -(XY+XZ+YZ)/3, p0 = -XYZ; companion matrix roots
    a = np.stack([(x + y + z) / 3.0, -(x * y + x * z + y * z) / 3.0, -x * y * z], axis=1)
    companion = np.zeros((mu_squared.shape[0], 3, 3))
    companion[:, 0, :] = -a
    companion[:, 1, 0] = 1.0
    companion[:, 2, 1] = 1.0
    roots = np.linalg.eigvals(companion)
    return np.sqrt(np.max(roots.real, axis=1))


def _isotropic_radial_sums(radial_order: int, power: int) -> np.ndarray:
    """Σ_k (-1)^k C(j+l-1/2, j-k-1) Γ((l+p)/2 + k) / (k! 0.5^((l+p)/2+k)) per basis function: radial
    integrals of the isotropic basis (p = 1 for RTAP and RTPP, p = s + 3 for the ODF of radial moment s)."""
    from scipy.special import binom

    ind = isotropic_index_matrix(radial_order)
    out = np.zeros(ind.shape[0])
    for i, (j, ell, _) in enumerate(ind):
        e = (ell + power) / 2.0
        out[i] = sum((-1) ** k * binom(j + ell - 0.5, j - k - 1) * gamma(e + k) / (factorial(k) * 0.5 ** (e + k))
                     for k in range(j))
    return out


def constraint_grid(gridsize: int, radius: float) -> np.ndarray:
    """Points (mm) of a cubic grid of ``gridsize`` points per side within a ball of ``radius``, z >= 0
    (the propagator is antipodally symmetric), as in the MAP-MRI positivity literature (Özarslan 2013)."""
    half = gridsize // 2
    axis = np.arange(-half, half + 1)
    pts = np.stack(np.meshgrid(axis, axis, np.arange(0, half + 1), indexing="ij"), axis=-1).reshape(-1, 3)
    pts = pts[np.sqrt((pts.astype(float) ** 2).sum(axis=1)) <= half].astype(np.float32)
    return (pts / half * radius).astype(float)  # float32 arithmetic, as the reference implementation


def propagator_basis(radial_order: int, mu: np.ndarray, r_local: np.ndarray) -> np.ndarray:
    """Anisotropic propagator basis (v, n_r, n_coef) at displacements ``r_local`` ((n_r, 3), or (v, n_r, 3) per
    voxel) in each voxel's tensor frame: products of ``h_n(r/μ) / (sqrt(2π) μ)`` (Fourier pairs of the signal basis)."""
    ind = index_matrix(radial_order)
    t = np.broadcast_to(r_local, (mu.shape[0],) + r_local.shape[-2:]) / mu[:, None, :]
    h = hermite_functions(radial_order, t) / (np.sqrt(2 * np.pi) * mu[:, None, :, None])
    return h[..., 0, ind[:, 0]] * h[..., 1, ind[:, 1]] * h[..., 2, ind[:, 2]]


def isotropic_propagator_basis(radial_order: int, u0: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Isotropic propagator basis (v, n_r, n_coef) at world-frame displacements ``r`` (n_r, 3), or per voxel
    (v, n_r, 3) when all voxels share the directions (a scaled grid): the SH part is computed once."""
    ind = isotropic_index_matrix(radial_order)
    j, ell = ind[:, 0], ind[:, 1]
    rr = np.broadcast_to(np.linalg.norm(r, axis=-1), (u0.shape[0], r.shape[-2]))
    a = rr[..., None] ** 2 / (2 * u0[:, None, None] ** 2)
    radial = ((-1.0) ** (j - 1) / (np.sqrt(2) * np.pi * u0[:, None, None] ** 3) * a ** (ell / 2) * np.exp(-a)
              * _genlaguerre(j - 1, ell + 0.5, 2 * a))
    return radial * _sh_columns(radial_order, r.reshape(-1, r.shape[-2], 3)[0])[None]


@lru_cache(maxsize=8)
def sos_constraint_matrices(radial_order: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Sum-of-squares certificate of a non-negative propagator (Dela Haije et al. 2020).

    The anisotropic propagator is exp(-|t|²/2) times an even polynomial p_c(t) in the scaled
    displacement t = r/μ, linear in the coefficients c. p_c is a sum of squares iff
    p_c(t) = z(t)ᵀ Q z(t) for some Q ⪰ 0, with z the monomials of degree ≤ radial_order/2; as p_c
    is even, Q can be taken block-diagonal (even- and odd-degree monomials). Returns, per block,
    the matrices B (one per coefficient) and N (a basis of Gram matrices of the zero polynomial)
    such that the certificate is Σ c_i B_i + Σ s_j N_j ⪰ 0 for some s.
    """
    from itertools import product

    from numpy.polynomial import hermite as herm

    half = radial_order // 2
    monomials = [a for a in product(range(half + 1), repeat=3) if sum(a) <= half]
    blocks = [[a for a in monomials if sum(a) % 2 == parity] for parity in (0, 1)]
    targets = sorted({tuple(int(v) for v in np.add(a, b)) for blk in blocks for a in blk for b in blk})
    target_index = {t: i for i, t in enumerate(targets)}
    # monomial coefficients of each basis polynomial prod_a H_n(t_a) / sqrt(2^n n!)
    one_d = []
    for n in range(radial_order + 1):
        e = np.zeros(n + 1)
        e[n] = 1.0
        one_d.append(herm.herm2poly(e) / sqrt(2.0**n * factorial(n)))
    ind = index_matrix(radial_order)
    poly = np.zeros((len(targets), ind.shape[0]))
    for c, (n1, n2, n3) in enumerate(ind):
        for i, a in enumerate(one_d[n1]):
            for j, b in enumerate(one_d[n2]):
                for k, g in enumerate(one_d[n3]):
                    if a and b and g:
                        poly[target_index[(i, j, k)], c] += a * b * g
    # linear map from the stacked upper triangles of both blocks to monomial coefficients
    entries = []
    for bi, blk in enumerate(blocks):
        for p in range(len(blk)):
            for q in range(p, len(blk)):
                entries.append((bi, p, q))
    phi = np.zeros((len(targets), len(entries)))
    for e, (bi, p, q) in enumerate(entries):
        t = tuple(int(v) for v in np.add(blocks[bi][p], blocks[bi][q]))
        phi[target_index[t], e] += 1.0 if p == q else 2.0
    particular = np.linalg.pinv(phi) @ poly  # (entries, n_coef)
    _, sv, vt = np.linalg.svd(phi)
    null = vt[int((sv > 1e-10 * sv[0]).sum()):].T  # (entries, n_null)

    def to_blocks(vec: np.ndarray) -> list[np.ndarray]:
        mats = [np.zeros((len(b), len(b))) for b in blocks]
        for value, (bi, p, q) in zip(vec, entries):
            mats[bi][p, q] = mats[bi][q, p] = value
        return mats

    per_block: list[list[np.ndarray]] = [[], []]
    for c in range(particular.shape[1]):
        for bi, m in enumerate(to_blocks(particular[:, c])):
            per_block[bi].append(m)
    null_block: list[list[np.ndarray]] = [[], []]
    for j in range(null.shape[1]):
        for bi, m in enumerate(to_blocks(null[:, j])):
            null_block[bi].append(m)
    return [np.array(per_block[0]), np.array(per_block[1])], [np.array(null_block[0]), np.array(null_block[1])]


@lru_cache(maxsize=16)
def _odf_polynomials(radial_order: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    """The anisotropic ODF of each basis function as a polynomial in (α, β, γ) of Özarslan 2013, eq. 35:
    monomial exponents (m, 3) and coefficients (n_coef, m), including sqrt(n1! n2! n3!)."""
    from itertools import product

    exponents = [e for e in product(range(radial_order + 1), repeat=3) if sum(e) <= radial_order]
    position = {e: i for i, e in enumerate(exponents)}
    ind = index_matrix(radial_order)
    table = np.zeros((ind.shape[0], len(exponents)))
    for c, (n1, n2, n3) in enumerate(ind):
        scale = sqrt(factorial(n1) * factorial(n2) * factorial(n3))
        for i in range(0, n1 + 1, 2):
            for j in range(0, n2 + 1, 2):
                for k in range(0, n3 + 1, 2):
                    nn = n1 + n2 + n3 - i - j - k
                    table[c, position[(n1 - i, n2 - j, n3 - k)]] += scale * (
                        (-1) ** ((i + j + k) // 2) * gamma((3 + s + nn) / 2.0)
                        / (factorial(n1 - i) * factorial(n2 - j) * factorial(n3 - k)
                           * _double_factorial(i) * _double_factorial(j) * _double_factorial(k)))
    return np.array(exponents), table


def _gcv_scores(lambdas: np.ndarray, theta: np.ndarray, z2: np.ndarray, rss_floor: np.ndarray, n_obs: int) -> np.ndarray:
    """GCV ``||y - S y|| / (K - tr S)`` for weights (v, t) from each voxel's diagonalised problem.

    ``theta`` (v, c) generalised eigenvalues, ``z2`` (v, c) squared projections of the data,
    ``rss_floor`` (v,) the part of ||y||² outside the design's column space.
    """
    shrink = 1.0 / (1.0 + lambdas[..., None] * theta[:, None, :])  # (v, t, c)
    residual = rss_floor[:, None] + np.einsum("vtc,vc->vt", (1.0 - shrink) ** 2, z2)
    trace = shrink.sum(axis=-1)
    return np.sqrt(np.maximum(residual, 0.0)) / (n_obs - trace)


def gcv_weights(theta: np.ndarray, z2: np.ndarray, rss_floor: np.ndarray, n_obs: int,
                bounds: tuple[float, float] = GCV_BOUNDS) -> np.ndarray:
    """Per-voxel weight minimising GCV within ``bounds``: a log-spaced scan, then golden-section refinement."""
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    grid = np.exp(np.linspace(lo, hi, 49))
    scores = _gcv_scores(np.broadcast_to(grid, (theta.shape[0], grid.size)), theta, z2, rss_floor, n_obs)
    best = np.argmin(scores, axis=1)
    step = (hi - lo) / 48
    a = np.clip(np.log(grid[best]) - step, lo, hi)
    b = np.clip(np.log(grid[best]) + step, lo, hi)
    ratio = (np.sqrt(5.0) - 1) / 2
    for _ in range(40):
        c = b - ratio * (b - a)
        d = a + ratio * (b - a)
        fc = _gcv_scores(np.exp(c)[:, None], theta, z2, rss_floor, n_obs)[:, 0]
        fd = _gcv_scores(np.exp(d)[:, None], theta, z2, rss_floor, n_obs)[:, 0]
        left = fc < fd
        b = np.where(left, d, b)
        a = np.where(left, a, c)
    return np.exp(0.5 * (a + b))


@dataclass
class MapmriFit:
    """MAP-MRI coefficients and their indices for the masked voxels.

    Attributes
    ----------
    coefficients : ndarray (n, n_coef)
        Normalised so that the fitted signal at q = 0 is 1.
    mu : ndarray (n, 3)
        Scales (mm) along the tensor axes.
    frames : ndarray (n, 3, 3)
        Tensor eigenvectors (columns), world frame.
    lambdas : ndarray (n,)
        Laplacian weight used per voxel.
    status : ndarray (n,) uint8
    """

    model: "MapmriModel"
    batch: VoxelBatch
    coefficients: np.ndarray
    mu: np.ndarray
    frames: np.ndarray
    lambdas: np.ndarray
    status: np.ndarray

    def volume(self, values: np.ndarray, fill=np.nan) -> np.ndarray:
        """Per-voxel ``values`` placed back into the image grid."""
        return scatter(values, self.batch, fill)

    def _dot(self, vector: np.ndarray, sel: np.ndarray | None = None) -> np.ndarray:
        c = self.coefficients if sel is None else self.coefficients[:, sel]
        return np.einsum("vc,vc->v", c, vector) if vector.ndim == 2 else c @ vector

    def _principal_sh(self) -> np.ndarray:
        return _sh_columns(self.model.radial_order, self.frames[:, :, 0])

    def rtop(self) -> np.ndarray:
        """Return-to-origin probability (1/mm³)."""
        order = self.model.radial_order
        if not self.model.anisotropic:
            ind, bm = isotropic_index_matrix(order), isotropic_q0_weights(order)
            vec = (-1.0) ** (ind[:, 0] - 1) * bm / (2 * np.sqrt(2.0) * np.pi**1.5)
            return self._dot(vec) / self.mu[:, 0] ** 3
        ind, bm = index_matrix(order), q0_weights(order)
        vec = (-1.0) ** (ind.sum(axis=1) / 2) * bm
        return self._dot(vec) / (np.sqrt(8 * np.pi**3) * np.prod(self.mu, axis=1))

    def rtap(self) -> np.ndarray:
        """Return-to-axis probability (1/mm²), axis = the tensor's principal direction."""
        order = self.model.radial_order
        if not self.model.anisotropic:
            ind = isotropic_index_matrix(order)
            j, ell = ind[:, 0], ind[:, 1]
            vec = 2 * (-1.0) ** (j - 1) * 2.0 ** (-(ell + 3) / 2.0) / np.pi * _isotropic_radial_sums(order, 1)
            return np.einsum("vc,vc->v", self.coefficients, vec * self._principal_sh()) / self.mu[:, 0] ** 2
        ind, bm = index_matrix(order), q0_weights(order)
        sel = bm > 0
        vec = bm[sel] * (-1.0) ** (ind[sel, 1:].sum(axis=1) / 2)
        return self._dot(vec, sel) / (2 * np.pi * self.mu[:, 1] * self.mu[:, 2])

    def rtpp(self) -> np.ndarray:
        """Return-to-plane probability (1/mm), plane orthogonal to the principal direction."""
        order = self.model.radial_order
        if not self.model.anisotropic:
            ell = isotropic_index_matrix(order)[:, 1]
            vec = (-0.5) ** (ell // 2) / np.sqrt(np.pi) * _isotropic_radial_sums(order, 1)
            return np.einsum("vc,vc->v", self.coefficients, vec * self._principal_sh()) / self.mu[:, 0]
        ind, bm = index_matrix(order), q0_weights(order)
        sel = bm > 0
        vec = bm[sel] * (-1.0) ** (ind[sel, 0] / 2)
        return self._dot(vec, sel) / (np.sqrt(2 * np.pi) * self.mu[:, 0])

    def _even(self):
        ind, bm = index_matrix(self.model.radial_order), q0_weights(self.model.radial_order)
        sel = bm > 0
        n = ind[sel].astype(float)
        fact = np.array([sqrt(factorial(int(a)) * factorial(int(b)) * factorial(int(c))) for a, b, c in ind[sel]])
        gam = np.array([gamma(0.5 - 0.5 * a) * gamma(0.5 - 0.5 * b) * gamma(0.5 - 0.5 * c) for a, b, c in ind[sel]])
        return sel, n, fact, gam

    def msd(self) -> np.ndarray:
        """Mean squared displacement (mm²)."""
        if not self.model.anisotropic:
            ind, bm = isotropic_index_matrix(self.model.radial_order), isotropic_q0_weights(self.model.radial_order)
            sel = bm > 0
            return self.mu[:, 0] ** 2 * self._dot((4 * ind[sel, 0] - 1) * bm[sel], sel)
        sel, n, fact, gam = self._even()
        total = n.sum(axis=1)
        mu2 = self.mu**2
        numerator = (-1.0) ** (-0.5 * total) * np.pi**1.5 * (
            (1 + 2 * n[:, 0]) * mu2[:, :1] + (1 + 2 * n[:, 1]) * mu2[:, 1:2] + (1 + 2 * n[:, 2]) * mu2[:, 2:3])
        denominator = np.sqrt(2.0 ** (-total)) * fact * gam
        return np.einsum("vc,vc->v", self.coefficients[:, sel], numerator / denominator)

    def qiv(self) -> np.ndarray:
        """q-space inverse variance (1/mm⁵)."""
        if not self.model.anisotropic:
            ind, bm = isotropic_index_matrix(self.model.radial_order), isotropic_q0_weights(self.model.radial_order)
            sel = bm > 0
            j = ind[sel, 0]
            vec = 8 * (-1.0) ** (1 - j) * np.sqrt(2) * np.pi**3.5 / ((4.0 * j - 1) * bm[sel])
            return self.mu[:, 0] ** 5 * self._dot(vec, sel)
        sel, n, fact, gam = self._even()
        ux, uy, uz = (self.mu[:, i : i + 1] for i in range(3))
        numerator = 8 * np.pi**2 * (ux * uy * uz) ** 3 * fact * gam
        denominator = np.sqrt(2.0 ** (-1 + n.sum(axis=1))) * (
            (1 + 2 * n[:, 0]) * uy**2 * uz**2 + ux**2 * ((1 + 2 * n[:, 2]) * uy**2 + (1 + 2 * n[:, 1]) * uz**2))
        return np.einsum("vc,vc->v", self.coefficients[:, sel], numerator / denominator)

    def _require_anisotropic(self, what: str) -> None:
        if not self.model.anisotropic:
            raise DwiflowInputError(f"{what} is defined for the anisotropic MAP-MRI basis only (Özarslan 2013)")

    def ng(self) -> np.ndarray:
        """Non-Gaussianity: sin of the angle between the propagator and its Gaussian part."""
        self._require_anisotropic("non-Gaussianity")
        c = self.coefficients
        return np.sqrt(np.clip(1 - c[:, 0] ** 2 / np.sum(c**2, axis=1), 0, None))

    def _ng_axis(self, along_first: bool) -> np.ndarray:
        self._require_anisotropic("non-Gaussianity")
        ind = index_matrix(self.model.radial_order)
        weights = np.zeros(ind.shape[0])
        base = np.zeros(ind.shape[0], bool)
        for i, (n1, n2, n3) in enumerate(ind):
            if along_first and n2 % 2 == 0 and n3 % 2 == 0:
                weights[i] = (-1) ** ((n2 + n3) // 2) * sqrt(factorial(n2) * factorial(n3)) / (
                    _double_factorial(n2) * _double_factorial(n3))
                base[i] = n1 == 0
            elif not along_first and n1 % 2 == 0 and n2 % 2 == 0 and n3 % 2 == 0:
                weights[i] = (-1) ** (n1 // 2) * sqrt(factorial(n1)) / _double_factorial(n1)
                base[i] = n2 == 0 and n3 == 0
        a = self.coefficients * weights
        return np.sqrt(np.clip(1 - np.sum(a[:, base] ** 2, axis=1) / np.sum(a**2, axis=1), 0, None))

    def ng_parallel(self) -> np.ndarray:
        """Non-Gaussianity along the principal direction."""
        return self._ng_axis(True)

    def ng_perpendicular(self) -> np.ndarray:
        """Non-Gaussianity in the plane orthogonal to the principal direction."""
        return self._ng_axis(False)

    def laplacian_norm(self) -> np.ndarray:
        """Integrated squared Laplacian of the fitted signal, ``cᵀ L c``."""
        lap = self.model.laplacian(self.mu)
        return np.einsum("vi,vij,vj->v", self.coefficients, lap, self.coefficients)

    def fitted_signal(self) -> np.ndarray:
        """The fitted, normalised signal (n, n_volumes) on the model's gradient table."""
        return np.einsum("vgc,vc->vg", self.model.design(self.mu, self.frames), self.coefficients)

    def odf(self, vertices: np.ndarray, s: int = 2) -> np.ndarray:
        """ODF with radial moment ``s`` (Özarslan 2013, eq. 32) at unit ``vertices`` (world frame), (v, n_vert)."""
        order = self.model.radial_order
        vertices = np.asarray(vertices, dtype=float)
        if not self.model.anisotropic:
            from dwiflow.core.sh import real_sh_basis

            return self.odf_sh(s) @ real_sh_basis(order, vertices).T
        local = np.einsum("gi,vij->vgj", vertices, self.frames) / self.mu[:, None, :]
        rho = 1.0 / np.linalg.norm(local, axis=2)
        abc = 2 * rho[..., None] * local  # alpha, beta, gamma of eq. 35
        const = rho ** int(3 + s) / np.sqrt(2 ** (2 - s) * np.pi**3 * np.prod(self.mu**2, axis=1))[:, None]
        exponents, table = _odf_polynomials(order, s)
        k = order + 1
        dense = np.zeros((self.coefficients.shape[0], k, k, k))  # polynomial coefficients by (a, b, c) exponents
        dense[:, exponents[:, 0], exponents[:, 1], exponents[:, 2]] = self.coefficients @ table
        powers = np.empty(abc.shape[:2] + (3, k))  # (v, g, 3, k) by repeated products (pow is slow)
        powers[..., 0] = 1.0
        for n in range(1, k):
            np.multiply(powers[..., n - 1], abc, out=powers[..., n])
        inner = powers[..., 2, :] @ np.swapaxes(dense.reshape(-1, k * k, k), 1, 2)  # Σ_c γ^c: (v, g, k·k)
        inner = np.einsum("vgab,vgb->vga", inner.reshape(inner.shape[:2] + (k, k)), powers[..., 1, :])
        return const * np.einsum("vga,vga->vg", inner, powers[..., 0, :])

    def odf_sh(self, s: int = 2, lmax: int | None = None) -> np.ndarray:
        """ODF as real SH (MRtrix3 basis, world frame), (v, n_sh).

        Isotropic basis: exact, degree ``radial_order``. Anisotropic basis: least-squares SH fit
        (degree ``lmax``, default ``radial_order``) of the ODF on 642 directions.
        """
        from dwiflow.core.sh import amplitudes_to_sh, n_coefficients, sh_degree_order

        order = self.model.radial_order
        if self.model.anisotropic:
            from dwiflow.core.sphere import get_sphere

            vertices = get_sphere("ico642").vertices
            out = np.empty((self.coefficients.shape[0], n_coefficients(lmax or order)))
            for sl in iter_chunks(out.shape[0], 128):  # bounded memory: (voxels, vertices, monomials) per chunk
                part = MapmriFit(self.model, self.batch, self.coefficients[sl], self.mu[sl], self.frames[sl],
                                 self.lambdas[sl], self.status[sl])
                out[sl] = amplitudes_to_sh(part.odf(vertices, s), vertices, lmax or order)
            return out
        ind = isotropic_index_matrix(order)
        j, ell = ind[:, 0], ind[:, 1]
        weights = (-1.0) ** (j - 1) * 2.0 ** (-(ell + 3) / 2.0) / np.pi * _isotropic_radial_sums(order, s + 3)
        degrees, orders = sh_degree_order(order)
        lookup = {(int(l), int(m)): i for i, (l, m) in enumerate(zip(degrees, orders))}
        cols = np.array([lookup[(int(l), int(m))] for _, l, m in ind])
        out = np.zeros((self.coefficients.shape[0], n_coefficients(order)))
        np.add.at(out.T, cols, (self.coefficients * weights).T)
        return self.mu[:, :1] ** s * out


class MapmriModel:
    """MAP-MRI with Laplacian regularisation (MAPL), anisotropic or isotropic scaling.

    Parameters
    ----------
    gtab : GradientTable
        Several shells and b=0 volumes.
    radial_order : int
        Even, ≥ 2 (default 6; 8 is recommended for isotropic ODFs).
    anisotropic_scaling : bool
        True: Hermite basis along each voxel's tensor axes (best for indices). False: the
        isotropic basis (radial Laguerre functions × spherical harmonics, scale u0), which
        does not bias crossing ODFs (Fick et al. 2016).
    laplacian_weighting : float, "gcv" or array
        Fixed weight (0.2), per-voxel GCV within [1e-5, 10], or GCV over the given weights.
    big_delta, small_delta : float, optional
        Gradient separation and duration (s); τ = Δ - δ/3. Without them τ = 1/(4π²) and the
        indices are not in physical units.
    bval_threshold : float
        Only volumes below it are used to fit the tensor that sets the frame and scales.
    eigenvalue_threshold : float
        Floor of the tensor eigenvalues (mm²/s).
    """

    def __init__(
        self,
        gtab: GradientTable,
        *,
        radial_order: int = 6,
        anisotropic_scaling: bool = True,
        laplacian_weighting: float | str | np.ndarray = 0.2,
        big_delta: float | None = None,
        small_delta: float | None = None,
        bval_threshold: float = np.inf,
        eigenvalue_threshold: float = 1e-4,
        positivity: str = "none",
        pos_grid: int = 15,
        pos_radius: float | str = "adaptive",
        solver: str = "CLARABEL",
        chunk_size: int = 128,
    ):
        self.radial_order = check_radial_order(radial_order)
        self.anisotropic = bool(anisotropic_scaling)
        if not gtab.b0s_mask.any():
            raise DwiflowInputError("MAP-MRI needs b=0 volumes; none found")
        n_shells = len(gtab.dw_shells)
        if n_shells < 2:
            raise DwiflowInputError(f"MAP-MRI needs several diffusion-weighted shells (it models the radial signal "
                                    f"decay); this gradient table has {n_shells}")
        if (big_delta is None) != (small_delta is None):
            raise DwiflowInputError("give both big_delta and small_delta (seconds), or neither")
        if big_delta is not None:
            if not (big_delta > 0 and small_delta > 0 and big_delta > small_delta / 3):
                raise DwiflowInputError(f"big_delta ({big_delta}) and small_delta ({small_delta}) must be positive "
                                        "times in seconds with big_delta > small_delta/3")
            self.tau = big_delta - small_delta / 3.0
        else:
            self.tau = DEFAULT_TAU
        self.big_delta, self.small_delta = big_delta, small_delta
        if isinstance(laplacian_weighting, str):
            if laplacian_weighting.lower() != "gcv":
                raise DwiflowInputError(f"laplacian_weighting must be a number, 'gcv' or an array, got {laplacian_weighting!r}")
            self.weighting: float | str | np.ndarray = "gcv"
        elif np.ndim(laplacian_weighting) == 0:
            if not laplacian_weighting >= 0:
                raise DwiflowInputError(f"laplacian_weighting must be >= 0, got {laplacian_weighting!r}")
            self.weighting = float(laplacian_weighting)
        else:
            w = np.asarray(laplacian_weighting, dtype=float).ravel()
            if w.size < 2 or np.any(w < 0):
                raise DwiflowInputError("a laplacian_weighting array needs at least two non-negative weights")
            self.weighting = w
        self.gtab = gtab
        self.bval_threshold = float(bval_threshold)
        cutoff = gtab.bvals < self.bval_threshold
        if cutoff.sum() < 7 or not (gtab.b0s_mask & cutoff).any():
            raise DwiflowInputError(f"bval_threshold {bval_threshold} leaves too few volumes to fit the tensor")
        self.cutoff = cutoff
        self.tensor = TensorModel(gtab.subset(np.flatnonzero(cutoff)))
        self.eigenvalue_threshold = float(eigenvalue_threshold)
        qvals = np.sqrt(gtab.bvals / self.tau) / (2 * np.pi)
        self.q_vectors = gtab.bvecs * qvals[:, None]
        self.q0 = q0_weights(self.radial_order) if self.anisotropic else isotropic_q0_weights(self.radial_order)
        self.chunk_size = int(chunk_size)
        if positivity not in POSITIVITY_MODES:
            raise DwiflowInputError(f"positivity must be one of {POSITIVITY_MODES}, got {positivity!r}")
        if positivity == "global" and not self.anisotropic:
            raise DwiflowInputError("global positivity (sum-of-squares) is available for the anisotropic basis only")
        if positivity != "none":
            import cvxpy

            if solver.upper() not in cvxpy.installed_solvers():
                raise DwiflowInputError(f"solver {solver!r} is not available; installed CVXPY solvers: "
                                        f"{cvxpy.installed_solvers()}")
        if int(pos_grid) != pos_grid or pos_grid < 3:
            raise DwiflowInputError(f"pos_grid must be an integer >= 3, got {pos_grid!r}")
        if not (pos_radius == "adaptive" or (np.isscalar(pos_radius) and float(pos_radius) > 0)):
            raise DwiflowInputError(f"pos_radius must be 'adaptive' or a positive radius in mm, got {pos_radius!r}")
        self.positivity = positivity
        self.pos_grid = int(pos_grid)
        self.pos_radius = pos_radius
        self.solver = solver.upper()
        self._problem = None
        self._grid_problems: dict[int, tuple] = {}

    def _grid_problem(self, n_grid: int):
        """CVXPY problem of the grid-constrained fit, built once; per voxel only its parameters change.

        In the variable x = R c (RᵀR = MᵀM + λL) the objective is ||x - t||² with only t varying,
        and each grid row is scaled to unit norm, which keeps the solver's work small and well scaled.
        """
        import cvxpy as cp

        n = self.n_coefficients
        x = cp.Variable(n)
        target, a0, rows, margin = cp.Parameter(n), cp.Parameter(n), cp.Parameter((n_grid, n)), cp.Parameter(n_grid)
        rows.value, margin.value = np.zeros((n_grid, n)), np.full(n_grid, -1.0)
        problem = cp.Problem(cp.Minimize(cp.sum_squares(x - target)), [a0 @ x == 1, rows @ x >= margin])
        return problem, x, (target, a0, rows, margin)

    def _global_problem(self):
        """CVXPY problem of the sum-of-squares (global) positivity fit, built once."""
        import cvxpy as cp

        n = self.n_coefficients
        blocks, nulls = sos_constraint_matrices(self.radial_order)
        h, free = cp.Variable(n), cp.Variable(nulls[0].shape[0])
        chol, target = cp.Parameter((n, n)), cp.Parameter(n)
        constraints = []
        for b, z in zip(blocks, nulls):
            size = b.shape[1]
            gram = cp.reshape(b.reshape(n, -1).T @ h + z.reshape(z.shape[0], -1).T @ free, (size, size), order="C")
            constraints.append(0.5 * (gram + gram.T) >> 0)
        problem = cp.Problem(cp.Minimize(cp.norm(chol @ h - target)), constraints)
        return problem, h, (chol, target)

    @property
    def n_coefficients(self) -> int:
        return (index_matrix if self.anisotropic else isotropic_index_matrix)(self.radial_order).shape[0]

    def design(self, mu: np.ndarray, frames: np.ndarray, q_vectors: np.ndarray | None = None) -> np.ndarray:
        """Design matrices (v, n_q, n_coef) of voxels with scales ``mu`` (v, 3) and tensor frames (v, 3, 3)."""
        q = self.q_vectors if q_vectors is None else q_vectors
        if self.anisotropic:
            return signal_basis(self.radial_order, mu, np.einsum("gi,vij->vgj", q, frames))
        return isotropic_signal_basis(self.radial_order, mu[:, 0], q)

    def laplacian(self, mu: np.ndarray) -> np.ndarray:
        """Laplacian regularisers (v, n_coef, n_coef)."""
        if self.anisotropic:
            return laplacian_matrix(self.radial_order, mu)
        return mu[:, 0, None, None] * isotropic_laplacian_unit(self.radial_order)[None]

    def fit(self, data: np.ndarray, mask: np.ndarray | None = None, progress=None) -> MapmriFit:
        """Fit every voxel of ``mask``; ``progress(done, total)`` after each chunk of voxels."""
        batch = VoxelBatch.from_volume(data, mask, self.gtab.n_volumes)
        n, c = batch.n_voxels, self.n_coefficients
        coef = np.full((n, c), np.nan)
        mu = np.full((n, 3), np.nan)
        frames = np.full((n, 3, 3), np.nan)
        lambdas = np.full(n, np.nan)
        status = np.zeros(n, dtype=np.uint8)
        for sl in iter_chunks(n, self.chunk_size):
            y = batch.signal(sl)
            self._fit_chunk(y, coef[sl], mu[sl], frames[sl], lambdas[sl], status[sl])
            if progress is not None:
                progress(sl.stop, n)
        return MapmriFit(self, batch, coef, mu, frames, lambdas, status)

    def _fit_chunk(self, y, coef, mu, frames, lambdas, status) -> None:
        finite = np.all(np.isfinite(y), axis=1)
        status[~finite] = STATUS_NONFINITE
        positive = np.zeros_like(finite)
        positive[finite] = y[finite][:, self.gtab.b0s_mask].mean(axis=1) > 0
        status[finite & ~positive] = STATUS_NO_B0_SIGNAL
        ok = np.flatnonzero(finite & positive)
        if not ok.size:
            return
        y = y[ok]
        tensor = self.tensor.fit(y[:, self.cutoff])
        fitted = np.all(np.isfinite(tensor.evals), axis=1) & np.all(np.isfinite(tensor.evecs), axis=(1, 2))
        status[ok[~fitted]] = STATUS_SINGULAR
        ok, y = ok[fitted], y[fitted]
        if not ok.size:
            return
        evals = np.maximum(tensor.evals[fitted], self.eigenvalue_threshold)
        vox_frames = tensor.evecs[fitted]
        if self.anisotropic:
            vox_mu = np.sqrt(evals * 2 * self.tau)
        else:
            vox_mu = np.repeat(isotropic_scale(evals * 2 * self.tau)[:, None], 3, axis=1)
        design = self.design(vox_mu, vox_frames)  # (v, g, c)
        lap = self.laplacian(vox_mu)
        design_t = np.swapaxes(design, 1, 2)
        gram = design_t @ design
        rhs = (design_t @ y[..., None])[..., 0]
        if isinstance(self.weighting, float):
            lam = np.full(ok.size, self.weighting)
        else:
            lam = self._gcv(design, gram, lap, y)
        if self.positivity != "none":
            c, bad = self._positive_fit(y, design, gram, lap, lam, vox_mu, evals)
            c = c / (c @ self.q0)[:, None]
            good = ~bad & np.all(np.isfinite(c), axis=1)
            idx = ok[good]
            coef[idx], mu[idx], frames[idx], lambdas[idx] = c[good], vox_mu[good], vox_frames[good], lam[good]
            status[ok[~good]] = STATUS_SOLVER_FAILED
            return
        system = gram + lam[:, None, None] * lap
        try:
            c = np.linalg.solve(system, rhs[..., None])[..., 0]
            bad = ~np.all(np.isfinite(c), axis=1)
        except np.linalg.LinAlgError:
            c = np.empty_like(rhs)
            bad = np.zeros(ok.size, bool)
            for i in range(ok.size):
                try:
                    c[i] = np.linalg.solve(system[i], rhs[i])
                except np.linalg.LinAlgError:
                    bad[i] = True
        c = c / (c @ self.q0)[:, None]
        good = ~bad & np.all(np.isfinite(c), axis=1)
        idx = ok[good]
        coef[idx] = c[good]
        mu[idx] = vox_mu[good]
        frames[idx] = vox_frames[good]
        lambdas[idx] = lam[good]
        status[ok[~good]] = STATUS_SINGULAR

    def _positive_fit(self, y, design, gram, lap, lam, mu, evals) -> tuple[np.ndarray, np.ndarray]:
        """Fits with a non-negative propagator: at grid points (CMAP/CMAPL) or globally (MAP+).

        The data are normalised by the mean b=0. Each voxel's objective ||M c - y||² + λ cᵀLc is
        handed to CVXPY as ||R c - t||² with RᵀR = MᵀM + λL (same minimiser, n_coef rows).
        Grid mode first tries the equality-constrained least-squares solution: when it already
        satisfies every grid constraint it is the constrained optimum (KKT), and no solver call
        is needed.
        """

        y = y / y[:, self.gtab.b0s_mask].mean(axis=1, keepdims=True)
        system = gram + lam[:, None, None] * lap
        rhs = np.einsum("vgi,vg->vi", design, y)
        n, n_coef = y.shape[0], self.n_coefficients
        out = np.full((n, n_coef), np.nan)
        bad = np.zeros(n, bool)
        # Without a Laplacian term, MᵀM is singular when the shells do not determine every coefficient (two
        # shells at radial order 6): then a ridge far below the data's scale picks the minimum-norm optimum
        scale = np.einsum("vii->v", system)[:, None, None] / n_coef
        chol_lower = np.full_like(system, np.nan)
        for i in range(n):
            for ridge in (0.0, 1e-12, 1e-10, 1e-8, 1e-6):
                try:
                    chol_lower[i] = np.linalg.cholesky(system[i] + ridge * scale[i] * np.eye(n_coef))
                    system[i] += ridge * scale[i] * np.eye(n_coef)
                    break
                except np.linalg.LinAlgError:
                    continue
            else:
                bad[i] = True
        target = np.linalg.solve(chol_lower, rhs[..., None])[..., 0]  # R^{-T} Mᵀy with R = Lᵀ
        if self.positivity == "grid":
            first_b0 = int(np.flatnonzero(self.gtab.b0s_mask)[0])
            a0 = design[:, first_b0, :]
            radius = (np.sqrt(5) * np.sqrt(evals * 2 * self.tau).max(axis=1) if self.pos_radius == "adaptive"
                      else np.full(n, float(self.pos_radius)))
            unit = constraint_grid(self.pos_grid, 1.0)
            grids = unit[None] * radius[:, None, None]  # each voxel's grid (same directions, its own radius)
            if self.anisotropic:
                psi = propagator_basis(self.radial_order, mu, grids)
            else:
                psi = isotropic_propagator_basis(self.radial_order, mu[:, 0], grids)
            # equality-constrained least squares (a0·c = 1) in closed form
            free = np.linalg.solve(system, rhs[..., None])[..., 0]
            w = np.linalg.solve(system, a0[..., None])[..., 0]
            c_eq = free + w * ((1 - np.einsum("vi,vi->v", a0, free)) / np.einsum("vi,vi->v", a0, w))[:, None]
            feasible = np.all(np.einsum("vri,vi->vr", psi, c_eq) >= GRID_MARGIN, axis=1) & ~bad
            out[feasible] = c_eq[feasible]
            for i in np.flatnonzero(~feasible & ~bad):
                out[i], converged = self._grid_active_set(chol_lower[i].T, target[i], a0[i], psi[i])
                if not converged:  # the convex program through CVXPY (Clarabel) as the fallback
                    out[i], bad[i] = self._grid_working_set(chol_lower[i].T, target[i], a0[i], psi[i], c_eq[i])
        else:
            if self._problem is None or self._problem[0] != ("global",):
                self._problem = (("global",), *self._global_problem())
            _, problem, var, (p_chol, p_target) = self._problem
            for i in np.flatnonzero(~bad):
                p_chol.value, p_target.value = chol_lower[i].T, target[i]
                out[i], bad[i] = self._solve(problem, var)
        return out, bad

    def _grid_active_set(self, chol, target, a0, psi) -> tuple[np.ndarray, bool]:
        """Grid-constrained fit of one voxel, exactly, by an active-set method (no solver call).

        In x = R c the problem is the projection of t onto {a0·x = 1, U x ≥ m} (U: unit grid rows).
        With an active set A the projection onto the affine set {a0·x = 1, U_A x = m_A} is
        x = t − Bᵀν, (B Bᵀ) ν = B t − d; the constrained optimum is reached when every active
        multiplier −ν_A is ≥ 0 (KKT) and no grid point is violated. Each round drops the most negative
        multiplier, or else adds the most violated point. Returns (c, converged); when the rounds run
        out (degenerate cycling) the caller falls back to the CVXPY working sets.
        """
        from scipy.linalg import solve_triangular

        psi_x = solve_triangular(chol, psi.T, trans="T", lower=False).T  # psi R⁻¹
        a0_x = solve_triangular(chol, a0, trans="T", lower=False)  # R⁻ᵀ a0
        norms = np.linalg.norm(psi_x, axis=1)
        norms[norms == 0] = 1.0
        unit_rows, margins = psi_x / norms[:, None], GRID_MARGIN / norms
        active: list[int] = []
        for _ in range(ACTIVE_SET_ROUNDS):
            rows = np.vstack([a0_x[None], unit_rows[active]]) if active else a0_x[None]
            rhs = np.concatenate([[1.0], margins[active]])
            gram = rows @ rows.T
            try:
                nu = np.linalg.solve(gram, rows @ target - rhs)
            except np.linalg.LinAlgError:
                return np.full(psi.shape[1], np.nan), False
            x = target - rows.T @ nu
            multipliers = -nu[1:]
            if active and multipliers.min() < -1e-12 * max(1.0, np.abs(multipliers).max()):
                active.pop(int(np.argmin(multipliers)))
                continue
            slack = unit_rows @ x - margins
            worst = int(np.argmin(slack))
            if slack[worst] >= -1e-10 * max(1.0, float(np.abs(x).max())):
                return solve_triangular(chol, x, lower=False), True
            if worst in active:  # numerically stuck
                break
            active.append(worst)
        return np.full(psi.shape[1], np.nan), False

    def _grid_working_set(self, chol, target, a0, psi, start) -> tuple[np.ndarray, bool]:
        """Grid-constrained fit of one voxel by working sets: solve with a few of the most violated grid
        points, add the most violated points of that solution, repeat. A solution of a reduced problem
        that satisfies every grid point is the optimum of the full problem (its constraints are a
        superset); the reduced problems come in a few sizes, each built once, and the full problem is
        the last resort."""
        from scipy.linalg import solve_triangular

        n_grid = psi.shape[0]
        psi_x = solve_triangular(chol, psi.T, trans="T", lower=False).T  # psi R⁻¹
        a0_x = solve_triangular(chol, a0, trans="T", lower=False)  # R⁻ᵀ a0
        norms = np.linalg.norm(psi_x, axis=1)
        norms[norms == 0] = 1.0
        unit_rows, margins = psi_x / norms[:, None], GRID_MARGIN / norms

        def solve(rows_idx: list[int] | None) -> tuple[np.ndarray, bool]:
            count = n_grid if rows_idx is None else next(t for t in WORKING_SET_TIERS if t >= len(rows_idx))
            if count not in self._grid_problems:
                self._grid_problems[count] = self._grid_problem(count)
            problem, var, (p_target, p_a0, p_rows, p_margin) = self._grid_problems[count]
            p_target.value, p_a0.value = target, a0_x
            if rows_idx is None:
                p_rows.value, p_margin.value = unit_rows, margins
            else:
                # unused slots repeat the first chosen row: a redundant constraint keeps the sparsity pattern,
                # so CVXPY updates the solver's data instead of setting it up again
                padded = list(rows_idx) + [rows_idx[0]] * (count - len(rows_idx))
                p_rows.value, p_margin.value = unit_rows[padded], margins[padded]
            x, failed = self._solve(problem, var)
            return (np.full(psi.shape[1], np.nan) if failed else solve_triangular(chol, x, lower=False)), failed

        chosen: list[int] = []
        candidate = start
        for _ in range(12):
            values = psi @ candidate
            tolerance = 1e-6 * max(1.0, float(np.abs(values).max()))
            violated = np.flatnonzero(values < GRID_MARGIN - tolerance)
            violated = violated[~np.isin(violated, chosen)]
            if not violated.size and chosen:
                return candidate, False
            worst = violated[np.argsort(values[violated])][:WORKING_SET_STEP]
            if len(chosen) + worst.size > WORKING_SET_TIERS[-1]:
                break
            chosen.extend(worst.tolist())
            candidate, failed = solve(chosen)
            if failed:
                return candidate, True
        return solve(None)

    def _solve(self, problem, variable) -> tuple[np.ndarray, bool]:
        import cvxpy as cp

        try:
            problem.solve(solver=self.solver)
        except cp.error.SolverError:
            return np.full(variable.shape, np.nan), True
        if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or variable.value is None:
            return np.full(variable.shape, np.nan), True
        return np.asarray(variable.value, dtype=float), False

    def _gcv(self, design, gram, lap, y) -> np.ndarray:
        """Per-voxel GCV weight (Craven & Wahba 1979) via the generalised eigenproblem L v = θ (MᵀM) v."""
        # a rank-deficient MᵀM (more coefficients than the shells resolve; DIPY uses a pseudo-inverse here)
        # gets a ridge far below the data's scale, only for choosing the weight
        scale = np.einsum("vii->v", gram)[:, None, None] / gram.shape[1]
        for ridge in (0.0, 1e-12, 1e-9, 1e-6):
            try:
                chol = np.linalg.cholesky(gram + ridge * scale * np.eye(gram.shape[1]))
                break
            except np.linalg.LinAlgError:
                continue
        else:
            raise np.linalg.LinAlgError("MAP-MRI design has no usable normal matrix for GCV")
        inv_chol = np.linalg.inv(chol)
        reduced = inv_chol @ lap @ np.swapaxes(inv_chol, 1, 2)
        theta, w = np.linalg.eigh(0.5 * (reduced + np.swapaxes(reduced, 1, 2)))
        basis = np.swapaxes(inv_chol, 1, 2) @ w  # V with Vᵀ MᵀM V = I, Vᵀ L V = diag θ
        z = np.einsum("vic,vi->vc", basis, np.einsum("vgi,vg->vi", design, y))  # Vᵀ Mᵀ y
        rss_floor = np.einsum("vg,vg->v", y, y) - np.einsum("vc,vc->v", z, z)
        n_obs = y.shape[1]
        if isinstance(self.weighting, np.ndarray):
            scores = _gcv_scores(np.broadcast_to(self.weighting, (y.shape[0], self.weighting.size)), theta, z**2,
                                 rss_floor, n_obs)
            return self._first_local_minimum(scores)
        return gcv_weights(theta, z**2, rss_floor, n_obs)

    def _first_local_minimum(self, scores: np.ndarray) -> np.ndarray:
        """DIPY's scan of a weight array: walk up the array while GCV does not increase (at most to its
        second-to-last weight), keep the weight before the last one evaluated."""
        w = self.weighting
        n_w = w.size
        rises = scores[:, 1 : n_w - 1] > scores[:, : n_w - 2]  # a rise at weight i (1 ≤ i ≤ n_w - 2) stops the walk
        stop = np.where(rises.any(axis=1), np.argmax(rises, axis=1) + 1, n_w - 2)
        return w[stop - 1]
