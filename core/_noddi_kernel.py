"""Compiled per-voxel NODDI fit (see :mod:`dwiflow.core.noddi`): the voxel's dictionary, two non-negative least-squares
fits and a non-negative elastic net, each solved exactly by an active-set method."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

import dwiflow.core._numba_setup  # noqa: F401  (threading layer)


@njit(cache=True, nogil=True)
def _passive_solution(columns: np.ndarray, index: np.ndarray, target: np.ndarray, lambda1: float,
                      lambda2: float) -> tuple[np.ndarray, bool]:
    """Minimiser of ½‖y - A_P x‖² + λ₁Σx + ½λ₂‖x‖² over the passive columns P (no sign constraint), from a Householder
    QR of [A_P; √λ₂ I] (the normal equations would square the condition number of the dictionary's nearly parallel
    atoms); False when A_P is numerically rank deficient."""
    n_rows = target.size
    k = index.size
    rows = n_rows + (k if lambda2 > 0.0 else 0)
    work = np.zeros((rows, k))
    for a in range(k):
        for r in range(n_rows):
            work[r, a] = columns[index[a], r]
        if lambda2 > 0.0:
            work[n_rows + a, a] = np.sqrt(lambda2)
    rhs = np.zeros(rows)
    rhs[:n_rows] = target
    largest = 0.0
    for a in range(k):  # Householder reflections, column by column
        norm = 0.0
        for r in range(a, rows):
            norm += work[r, a] * work[r, a]
        norm = np.sqrt(norm)
        largest = max(largest, norm)
        if norm <= 1e-12 * largest or norm == 0.0:
            return np.zeros(k), False
        alpha = -norm if work[a, a] > 0 else norm
        v0 = work[a, a] - alpha
        beta = -v0 * alpha  # vᵀv / 2 with v = x - αe₁
        work[a, a] = v0
        for c in range(a + 1, k):
            dot = 0.0
            for r in range(a, rows):
                dot += work[r, a] * work[r, c]
            factor = dot / beta
            for r in range(a, rows):
                work[r, c] -= factor * work[r, a]
        dot = 0.0
        for r in range(a, rows):
            dot += work[r, a] * rhs[r]
        factor = dot / beta
        for r in range(a, rows):
            rhs[r] -= factor * work[r, a]
        work[a, a] = alpha
    if lambda1 != 0.0:  # the ℓ1 term: Qᵀỹ - λ₁ R⁻ᵀ1
        shift = np.empty(k)
        for a in range(k):
            value = 1.0
            for b in range(a):
                value -= work[b, a] * shift[b]
            shift[a] = value / work[a, a]
        for a in range(k):
            rhs[a] -= lambda1 * shift[a]
    out = np.empty(k)
    for a in range(k - 1, -1, -1):
        value = rhs[a]
        for b in range(a + 1, k):
            value -= work[a, b] * out[b]
        out[a] = value / work[a, a]
    return out, True


@njit(cache=True, nogil=True)
def _settle(columns: np.ndarray, target: np.ndarray, lambda1: float, lambda2: float, x: np.ndarray,
            passive: np.ndarray, entering: int, max_iter: int) -> bool:
    """Lawson and Hanson's inner loop: solve on the passive set; while a weight would turn negative, step from x
    towards the solution until the first weight reaches zero and drop it. False when the entering column (≥ 0)
    does not improve the fit (numerically dependent, or a non-positive weight at once) and was taken out again."""
    for inner in range(max_iter):
        index = np.nonzero(passive)[0]
        k = index.size
        if k == 0:
            x[:] = 0.0
            return True
        solution, ok = _passive_solution(columns, index, target, lambda1, lambda2)
        if entering >= 0 and inner == 0:
            weight = 0.0
            for a in range(k):
                if index[a] == entering:
                    weight = solution[a]
            if not ok or weight <= 0.0:
                passive[entering] = False
                return False
        elif not ok:  # the passive set without the entering column is dependent: start again from none
            passive[:] = False
            x[:] = 0.0
            return True
        if solution.min() > 0.0:
            x[:] = 0.0
            x[index] = solution
            return True
        alpha = 1.0
        for a in range(k):
            if solution[a] <= 0.0:
                current = x[index[a]]
                alpha = min(alpha, current / (current - solution[a]))
        for a in range(k):
            x[index[a]] += alpha * (solution[a] - x[index[a]])
            if x[index[a]] <= 0.0 or (solution[a] <= 0.0 and x[index[a]] <= 1e-14):
                x[index[a]] = 0.0
                passive[index[a]] = False
    return True


@njit(cache=True, nogil=True)
def nonnegative_elastic_net(columns: np.ndarray, target: np.ndarray, lambda1: float, lambda2: float,
                            allowed: np.ndarray, start: np.ndarray, max_iter: int) -> np.ndarray:
    """Minimise ½‖y - Ax‖² + λ₁Σx + ½λ₂‖x‖² over x ≥ 0 (x_j = 0 where ``allowed`` is False; λ₁ = λ₂ = 0: non-negative
    least squares) by Lawson and Hanson's active-set method (1974): the column with the largest gradient enters, each
    passive set is solved by a QR factorisation, and a step that would turn a weight negative stops at zero. The
    elastic net's ℓ2 term adds √λ₂·I rows, its ℓ1 term shifts the gradient. ``columns`` is Aᵀ (one row per column
    of A). ``start`` (True where the passive set starts; e.g. a neighbour's solution) only shortens the search: the
    optimality conditions are checked as from an empty set."""
    n, n_rows = columns.shape
    x = np.zeros(n)
    passive = start & allowed
    blocked = np.zeros(n, dtype=np.bool_)  # columns that did not improve the fit, until the passive set changes
    scale = 1.0
    for r in range(n_rows):
        scale = max(scale, abs(target[r]))
    tolerance = 1e-10 * scale
    if passive.any():
        _settle(columns, target, lambda1, lambda2, x, passive, -1, max_iter)
    residual = np.empty(n_rows)
    for _ in range(max_iter):
        residual[:] = target
        for j in range(n):
            if x[j] != 0.0:
                for r in range(n_rows):
                    residual[r] -= columns[j, r] * x[j]
        gradient = columns @ residual  # BLAS gemv
        best, best_value = -1, tolerance
        for j in range(n):
            if allowed[j] and not passive[j] and not blocked[j]:
                value = gradient[j] - lambda1 - lambda2 * x[j]
                if value > best_value:
                    best, best_value = j, value
        if best < 0:
            break
        passive[best] = True
        if _settle(columns, target, lambda1, lambda2, x, passive, best, max_iter):
            blocked[:] = False
        else:
            blocked[best] = True
    return x


@njit(cache=True, nogil=True)
def _legendre_even(x: float, n_terms: int, out: np.ndarray) -> None:
    """P_0, P_2, …, P_{2(n_terms-1)} at x (recurrence over every degree)."""
    previous, current = 1.0, x
    out[0] = 1.0
    for degree in range(2, 2 * n_terms - 1):
        following = ((2 * degree - 1) * x * current - (degree - 1) * previous) / degree
        previous, current = current, following
        if degree % 2 == 0:
            out[degree // 2] = current
    if n_terms == 1:
        out[0] = 1.0


@njit(cache=True, parallel=True)
def fit_voxels(signal: np.ndarray, directions: np.ndarray, gradients: np.ndarray, shell_of: np.ndarray,
               coefficients: np.ndarray, isotropic: np.ndarray, dwi_rows: np.ndarray, norms: np.ndarray,
               icvf: np.ndarray, kappa: np.ndarray, lambda1: float, lambda2: float, n_threads: int) -> np.ndarray:
    """NDI, ODI and free-water fraction of each voxel (rows of ``signal``, normalised by the mean b=0) as AMICO fits
    NODDI: NNLS of the signal on the voxel's dictionary (its anisotropic atoms rotated to ``directions``, plus the
    isotropic atom), a non-negative elastic net of the diffusion-weighted signal less the isotropic part on the
    anisotropic atoms scaled by ``norms``, then NNLS on the atoms it selected and the isotropic one.

    ``coefficients`` (shells, Legendre terms, atoms): each atom's even Legendre series per shell; ``isotropic``: the
    isotropic atom per shell; ``shell_of``: each volume's shell."""
    n_voxels, n_meas = signal.shape
    n_wm = coefficients.shape[2]
    n_terms = coefficients.shape[1]
    out = np.full((n_voxels, 3), np.nan)
    n_dwi = dwi_rows.size
    blocks = (n_voxels + 63) // 64
    for worker in prange(n_threads):
        legendre = np.empty(n_terms)
        row = np.empty(n_wm)
        atoms = np.empty((n_wm + 1, n_meas))  # one row per atom
        scaled = np.empty((n_wm, n_dwi))
        allowed_all = np.ones(n_wm + 1, dtype=np.bool_)
        allowed_wm = np.ones(n_wm, dtype=np.bool_)
        start_first = np.zeros(n_wm + 1, dtype=np.bool_)
        start_sparse = np.zeros(n_wm, dtype=np.bool_)
        for block in range(worker, blocks, n_threads):
            start_first[:] = False
            start_sparse[:] = False
            for v in range(block * 64, min((block + 1) * 64, n_voxels)):
                y = signal[v]
                for m in range(n_meas):
                    cosine = (gradients[m, 0] * directions[v, 0] + gradients[m, 1] * directions[v, 1]
                              + gradients[m, 2] * directions[v, 2])
                    _legendre_even(cosine, n_terms, legendre)
                    shell = shell_of[m]
                    for a in range(n_wm):
                        row[a] = 0.0
                    for t in range(n_terms):
                        weight = legendre[t]
                        for a in range(n_wm):
                            row[a] += coefficients[shell, t, a] * weight
                    for a in range(n_wm):
                        atoms[a, m] = row[a]
                    atoms[n_wm, m] = isotropic[shell]
                first = nonnegative_elastic_net(atoms, y, 0.0, 0.0, allowed_all, start_first, 500)
                target = np.empty(n_dwi)
                for r in range(n_dwi):
                    m = dwi_rows[r]
                    target[r] = max(y[m] - first[n_wm] * atoms[n_wm, m], 0.0)
                    for a in range(n_wm):
                        scaled[a, r] = atoms[a, m] * norms[a]
                sparse = nonnegative_elastic_net(scaled, target, lambda1, lambda2, allowed_wm, start_sparse, 500)
                chosen = np.zeros(n_wm + 1, dtype=np.bool_)
                for a in range(n_wm):
                    chosen[a] = sparse[a] > 0.0
                chosen[n_wm] = True
                final = nonnegative_elastic_net(atoms, y, 0.0, 0.0, chosen, chosen, 500)
                # the next voxel of this block starts from these solutions (blocks are fixed: the same start
                # whatever the thread count)
                for a in range(n_wm + 1):
                    start_first[a] = first[a] > 0.0
                for a in range(n_wm):
                    start_sparse[a] = sparse[a] > 0.0
                total_all = final.sum() + 1e-16
                total_wm = 0.0
                for a in range(n_wm):
                    total_wm += final[a] / total_all
                total_wm += 1e-16
                intra, extra, mean_kappa = 0.0, 0.0, 0.0
                for a in range(n_wm):
                    share = final[a] / total_all / total_wm
                    intra += icvf[a] * share
                    extra += (1.0 - icvf[a]) * share
                    mean_kappa += kappa[a] * share
                out[v, 0] = intra / (intra + extra + 1e-16)
                out[v, 1] = 2.0 / np.pi * np.arctan2(1.0, mean_kappa)
                out[v, 2] = final[n_wm] / total_all
    return out
