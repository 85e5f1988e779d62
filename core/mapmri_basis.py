"""MAP-MRI bases: Hermite (anisotropic) and Laguerre × SH (isotropic) signal and propagator bases,
their Laplacian regularisers, positivity grids and sum-of-squares certificates, and the ODF polynomials.

Everything here depends only on the radial order, the scales and the q- or r-space points; the
model in :mod:`dwiflow.core.mapmri` assembles them per voxel.

References
----------
Özarslan E., Koay C.G., Shepherd T.M., et al. Mean apparent propagator (MAP) MRI: a novel
diffusion imaging method for mapping tissue microstructure. NeuroImage 78 (2013) 16-32.
Fick R.H.J., Wassermann D., Caruyer E., Deriche R. MAPL: tissue microstructure estimation
using Laplacian-regularized MAP-MRI and its application to HCP data. NeuroImage 134 (2016) 365-385.
Dela Haije T., Özarslan E., Feragen A. Enforcing necessary non-negativity constraints for common
diffusion MRI models using sum of squares programming. NeuroImage 209 (2020) 116405.
"""

from __future__ import annotations

from functools import lru_cache
from math import factorial, gamma, pi, sqrt

import numpy as np

from dwiflow.core.errors import DwiflowInputError


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
