"""Compiled per-voxel NODDI fit (see :mod:`dwiflow.core.noddi`): two non-negative least-squares fits and a
non-negative elastic net, each solved exactly by an active-set method on the dictionary's Gram matrix.

The dictionary is never formed. Every atom is an even Legendre series per shell in the cosine between gradient and
fibre direction, so with P the (volumes × terms) Legendre values of a voxel and C_s the (terms × atoms) series of
shell s, the Gram matrix is G = Σ_s C_sᵀ H_s C_s with H_s = Σ_{volumes of s} p pᵀ (terms × terms), and Aᵀy =
Σ_s C_sᵀ q_s with q_s = Σ_{volumes of s} p y. A voxel costs its (volumes × terms) Legendre values, one H_s and q_s
per shell, and one Gram column (terms × atoms per shell) for each atom that enters an active set — instead of the
(volumes × atoms) dictionary and a product with it at every step (Bro & De Jong 1997 solve NNLS on AᵀA and Aᵀy in
the same way).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

import dwiflow.core._numba_setup  # noqa: F401  (threading layer)
from dwiflow.core._numba_linalg import cholesky_solve

# a pivot of the active block's Cholesky factor below this fraction of its diagonal entry: the entering atom is
# (numerically) a combination of the active ones
DEPENDENT_PIVOT = 1e-13


@njit(cache=True, nogil=True)
def _add_shell(series: np.ndarray, blocks: np.ndarray, rows_used: np.ndarray, s: int, j: int, out: np.ndarray) -> None:
    """out += series[s]ᵀ blocks[s] series[s, :, j], skipping the terms no atom has on shell s."""
    n_terms, n_atoms = series.shape[1], series.shape[2]
    for t in range(n_terms):
        if not rows_used[s, t]:
            continue
        weight = 0.0
        for u in range(n_terms):
            weight += blocks[s, t, u] * series[s, u, j]
        if weight != 0.0:
            for a in range(n_atoms):
                out[a] = out[a] + series[s, t, a] * weight


@njit(cache=True, nogil=True)
def _gram_column(series: np.ndarray, blocks: np.ndarray, rows_used: np.ndarray, first_shell: int, scale: np.ndarray,
                 j: int, out: np.ndarray, shared: np.ndarray, shared_known: np.ndarray) -> None:
    """Column ``j`` of G_ab = scale_a scale_b Σ_{s ≥ first_shell} series[s, :, a]ᵀ blocks[s] series[s, :, j]. Its
    part over shells ≥ 1, the larger one, is computed once per atom (``shared``, ``shared_known``) for every Gram
    matrix of the voxel: the NNLS's (all shells) and the elastic net's (shells ≥ 1, scaled) differ by shell 0 and
    the scale only."""
    n_shells, n_atoms = series.shape[0], series.shape[2]
    if not shared_known[j]:
        for a in range(n_atoms):
            shared[j, a] = 0.0
        for s in range(1, n_shells):
            _add_shell(series, blocks, rows_used, s, j, shared[j])
        shared_known[j] = True
    for a in range(n_atoms):
        out[a] = shared[j, a]
    if first_shell == 0:
        _add_shell(series, blocks, rows_used, 0, j, out)
    for a in range(n_atoms):
        out[a] *= scale[a] * scale[j]


@njit(cache=True, nogil=True, inline='always')
def _passive_solution(gram: np.ndarray, known: np.ndarray, series: np.ndarray, blocks: np.ndarray,
                      rows_used: np.ndarray, first_shell: int, scale: np.ndarray, shared: np.ndarray,
                      shared_known: np.ndarray, index: np.ndarray, aty: np.ndarray, lambda1: float,
                      lambda2: float) -> tuple[np.ndarray, bool]:
    """Minimiser of ½‖y - A_P x‖² + λ₁Σx + ½λ₂‖x‖² over the passive atoms P (no sign constraint): the Cholesky
    solution of (G_PP + λ₂I) x = (Aᵀy)_P - λ₁. Gram columns are computed when first needed (``known``); False when
    an atom is numerically a combination of the others."""
    k = index.size
    for p in range(k):
        if not known[index[p]]:
            _gram_column(series, blocks, rows_used, first_shell, scale, index[p], gram[index[p]], shared,
                         shared_known)
            known[index[p]] = True
    factor = np.empty((k, k))
    out = np.empty(k)
    for p in range(k):
        for q in range(p + 1):
            factor[p, q] = gram[index[q], index[p]]
        factor[p, p] += lambda2
        out[p] = aty[index[p]] - lambda1
    if not cholesky_solve(factor, k, out, DEPENDENT_PIVOT):
        return np.zeros(k), False
    return out, True


@njit(cache=True, nogil=True, inline='always')
def _settle(gram, known, series, blocks, rows_used, first_shell, scale, shared, shared_known, aty, lambda1, lambda2,
            x, passive, entering, max_iter) -> bool:
    """Lawson and Hanson's inner loop: solve on the passive set; while a weight would turn negative, step from x
    towards the solution until the first weight reaches zero and drop it. False when the entering atom (≥ 0) does
    not improve the fit (numerically dependent, or a non-positive weight at once) and was taken out again."""
    for inner in range(max_iter):
        index = np.nonzero(passive)[0]
        k = index.size
        if k == 0:
            x[:] = 0.0
            return True
        solution, ok = _passive_solution(gram, known, series, blocks, rows_used, first_shell, scale, shared,
                                         shared_known, index, aty, lambda1, lambda2)
        if entering >= 0 and inner == 0:
            weight = 0.0
            for a in range(k):
                if index[a] == entering:
                    weight = solution[a]
            if not ok or weight <= 0.0:
                passive[entering] = False
                return False
        elif not ok:  # the passive set without the entering atom is dependent: start again from none
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
def nonnegative_elastic_net(series: np.ndarray, blocks: np.ndarray, rows_used: np.ndarray, first_shell: int,
                            scale: np.ndarray, aty: np.ndarray, lambda1: float, lambda2: float, allowed: np.ndarray,
                            start: np.ndarray, tolerance: float, max_iter: int, gram: np.ndarray, known: np.ndarray,
                            shared: np.ndarray, shared_known: np.ndarray) -> np.ndarray:
    """Minimise ½‖y - Ax‖² + λ₁Σx + ½λ₂‖x‖² over x ≥ 0 (x_j = 0 where ``allowed`` is False; λ₁ = λ₂ = 0:
    non-negative least squares) by Lawson and Hanson's active-set method (1974) on the Gram matrix: the atom with
    the largest gradient (Aᵀy - Gx - λ₁ - λ₂x, above ``tolerance``) enters, each passive set is solved by a Cholesky
    factorisation, and a step that would turn a weight negative stops at zero.

    A is given implicitly (module docstring): G_ab = scale_a scale_b Σ_{s ≥ first_shell} series[s, :, a]ᵀ
    blocks[s] series[s, :, b], with ``aty`` = Aᵀy; ``rows_used[s, t]``: whether any atom has term t on shell s.
    ``gram`` holds the columns computed so far (``known``), kept between calls on the same G; ``shared`` their
    part over shells ≥ 1 (``shared_known``), kept for every G of the voxel. ``start`` (True where the passive set starts; e.g. a neighbour's solution) only
    shortens the search: the optimality conditions are checked as from an empty set."""
    n = aty.size
    x = np.zeros(n)
    passive = start & allowed
    blocked = np.zeros(n, dtype=np.bool_)  # atoms that did not improve the fit, until the passive set changes
    if passive.any():
        _settle(gram, known, series, blocks, rows_used, first_shell, scale, shared, shared_known, aty, lambda1,
                lambda2, x, passive, -1, max_iter)
    gradient = np.empty(n)
    for _ in range(max_iter):
        for j in range(n):
            gradient[j] = aty[j]
        for p in range(n):
            if x[p] != 0.0:
                weight = x[p]
                for j in range(n):
                    gradient[j] = gradient[j] - gram[p, j] * weight
        best, best_value = -1, tolerance
        for j in range(n):
            if allowed[j] and not passive[j] and not blocked[j]:
                value = gradient[j] - lambda1 - lambda2 * x[j]
                if value > best_value:
                    best, best_value = j, value
        if best < 0:
            break
        passive[best] = True
        if _settle(gram, known, series, blocks, rows_used, first_shell, scale, shared, shared_known, aty, lambda1,
                   lambda2, x, passive, best, max_iter):
            blocked[:] = False
        else:
            blocked[best] = True
    return x


@njit(cache=True, nogil=True)
def _legendre_even(cosines: np.ndarray, n_terms: int, previous: np.ndarray, current: np.ndarray,
                   out: np.ndarray) -> None:
    """P_0, P_2, …, P_{2(n_terms-1)} (rows of ``out``) at every cosine (columns), by the recurrence over every
    degree; ``previous`` and ``current`` are work arrays. The recurrence runs along the cosines for each degree,
    so that its divisions run side by side instead of in one dependent chain per cosine."""
    n = cosines.size
    for m in range(n):
        previous[m] = 1.0
        current[m] = cosines[m]
        out[0, m] = 1.0
    for degree in range(2, 2 * n_terms - 1):
        for m in range(n):
            following = ((2 * degree - 1) * cosines[m] * current[m] - (degree - 1) * previous[m]) / degree
            previous[m] = current[m]
            current[m] = following
        if degree % 2 == 0:
            for m in range(n):
                out[degree // 2, m] = current[m]


@njit(cache=True, parallel=True)
def fit_voxels(signal: np.ndarray, directions: np.ndarray, gradients: np.ndarray, shell_of: np.ndarray,
               coefficients: np.ndarray, isotropic: np.ndarray, dwi_rows: np.ndarray, norms: np.ndarray,
               icvf: np.ndarray, kappa: np.ndarray, lambda1: float, lambda2: float, n_threads: int) -> np.ndarray:
    """NDI, ODI and free-water fraction of each voxel (rows of ``signal``, normalised by the mean b=0) as AMICO fits
    NODDI: NNLS of the signal on the voxel's dictionary (its anisotropic atoms rotated to ``directions``, plus the
    isotropic atom), a non-negative elastic net of the diffusion-weighted signal less the isotropic part on the
    anisotropic atoms scaled by ``norms``, then NNLS on the atoms it selected and the isotropic one.

    ``coefficients`` (shells, Legendre terms, atoms): each atom's even Legendre series per shell (shell 0: b=0);
    ``isotropic``: the isotropic atom per shell; ``shell_of``: each volume's shell; ``dwi_rows``: the
    diffusion-weighted volumes (shells ≥ 1)."""
    n_voxels, n_meas = signal.shape
    n_shells, n_terms, n_wm = coefficients.shape
    n_atoms = n_wm + 1
    series = np.zeros((n_shells, n_terms, n_atoms))  # the isotropic atom last: its series is P_0 alone
    series[:, :, :n_wm] = coefficients
    for s in range(n_shells):
        series[s, 0, n_wm] = isotropic[s]
    rows_used = np.zeros((n_shells, n_terms), dtype=np.bool_)
    for s in range(n_shells):
        for t in range(n_terms):
            for a in range(n_atoms):
                if series[s, t, a] != 0.0:
                    rows_used[s, t] = True
    unscaled = np.ones(n_atoms)
    scaled = np.ones(n_atoms)
    scaled[:n_wm] = norms
    weighted = np.zeros(n_meas, dtype=np.bool_)
    for r in range(dwi_rows.size):
        weighted[dwi_rows[r]] = True
    out = np.full((n_voxels, 3), np.nan)
    n_blocks = (n_voxels + 63) // 64
    for worker in prange(n_threads):
        legendre = np.empty((n_terms, n_meas))
        cosines = np.empty(n_meas)
        previous = np.empty(n_meas)
        current = np.empty(n_meas)
        blocks = np.empty((n_shells, n_terms, n_terms))
        projections = np.empty((n_shells, n_terms))
        aty_all = np.empty(n_atoms)
        aty_sparse = np.empty(n_atoms)
        gram_all = np.empty((n_atoms, n_atoms))
        gram_sparse = np.empty((n_atoms, n_atoms))
        known_all = np.zeros(n_atoms, dtype=np.bool_)
        known_sparse = np.zeros(n_atoms, dtype=np.bool_)
        shared = np.empty((n_atoms, n_atoms))
        shared_known = np.zeros(n_atoms, dtype=np.bool_)
        allowed_all = np.ones(n_atoms, dtype=np.bool_)
        allowed_sparse = np.ones(n_atoms, dtype=np.bool_)
        allowed_sparse[n_wm] = False
        start_first = np.zeros(n_atoms, dtype=np.bool_)
        start_sparse = np.zeros(n_atoms, dtype=np.bool_)
        for block in range(worker, n_blocks, n_threads):
            start_first[:] = False
            start_sparse[:] = False
            for v in range(block * 64, min((block + 1) * 64, n_voxels)):
                y = signal[v]
                blocks[:] = 0.0
                projections[:] = 0.0
                largest = 1.0
                for m in range(n_meas):
                    cosines[m] = (gradients[m, 0] * directions[v, 0] + gradients[m, 1] * directions[v, 1]
                                  + gradients[m, 2] * directions[v, 2])
                _legendre_even(cosines, n_terms, previous, current, legendre)
                for m in range(n_meas):
                    s = shell_of[m]
                    for t in range(n_terms):
                        projections[s, t] += legendre[t, m] * y[m]
                        for u in range(t, n_terms):
                            blocks[s, t, u] += legendre[t, m] * legendre[u, m]
                    largest = max(largest, abs(y[m]))
                for s in range(n_shells):
                    for t in range(n_terms):
                        for u in range(t):
                            blocks[s, t, u] = blocks[s, u, t]
                aty_all[:] = 0.0  # Aᵀy = Σ_s C_sᵀ q_s, along the atoms (contiguous)
                for s in range(n_shells):
                    for t in range(n_terms):
                        weight = projections[s, t]
                        for a in range(n_atoms):
                            aty_all[a] = aty_all[a] + series[s, t, a] * weight
                known_all[:] = False
                known_sparse[:] = False
                shared_known[:] = False
                first = nonnegative_elastic_net(series, blocks, rows_used, 0, unscaled, aty_all, 0.0, 0.0,
                                                allowed_all, start_first, 1e-10 * largest, 500, gram_all, known_all,
                                                shared, shared_known)
                # the diffusion-weighted signal less the isotropic part, on the anisotropic atoms scaled by norms
                projections[:] = 0.0
                largest_target = 1.0
                for m in range(n_meas):
                    if weighted[m]:
                        s = shell_of[m]
                        target = max(y[m] - first[n_wm] * isotropic[s], 0.0)
                        largest_target = max(largest_target, target)
                        for t in range(n_terms):
                            projections[s, t] += legendre[t, m] * target
                aty_sparse[:] = 0.0
                for s in range(1, n_shells):
                    for t in range(n_terms):
                        weight = projections[s, t]
                        for a in range(n_atoms):
                            aty_sparse[a] = aty_sparse[a] + series[s, t, a] * weight
                for a in range(n_atoms):
                    aty_sparse[a] *= scaled[a]
                sparse = nonnegative_elastic_net(series, blocks, rows_used, 1, scaled, aty_sparse, lambda1, lambda2,
                                                 allowed_sparse, start_sparse, 1e-10 * largest_target, 500,
                                                 gram_sparse, known_sparse, shared, shared_known)
                chosen = np.zeros(n_atoms, dtype=np.bool_)
                for a in range(n_wm):
                    chosen[a] = sparse[a] > 0.0
                chosen[n_wm] = True
                final = nonnegative_elastic_net(series, blocks, rows_used, 0, unscaled, aty_all, 0.0, 0.0, chosen,
                                                chosen, 1e-10 * largest, 500, gram_all, known_all, shared,
                                                shared_known)
                # the next voxel of this block starts from these solutions (blocks are fixed: the same start
                # whatever the thread count)
                for a in range(n_atoms):
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
