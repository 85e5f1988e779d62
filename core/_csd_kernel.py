"""Compiled per-voxel kernel of :mod:`dwiflow.core.csd` (numba, parallel over voxels).

Kept in its own module so that ``import dwiflow.core`` never imports numba; the kernel is
compiled on first use and cached on disk.
"""

from __future__ import annotations

import os

import numpy as np
from numba import config, njit, prange

# GNU OpenMP cannot survive a fork, and Pydra's cf worker forks: use numba's own thread pool
# unless the user chose a threading layer.
if "NUMBA_THREADING_LAYER" not in os.environ:
    config.THREADING_LAYER = "workqueue"


@njit(cache=True, fastmath=True, inline="always")
def _cholesky_solve(work: np.ndarray, chol: np.ndarray, rhs: np.ndarray, out: np.ndarray, n: int) -> bool:
    """Solve work·x = rhs for symmetric positive-definite ``work`` (lower triangle used)."""
    for j in range(n):
        s = work[j, j]
        for k in range(j):
            s -= chol[j, k] * chol[j, k]
        if s <= 0.0:
            return False
        d = np.sqrt(s)
        chol[j, j] = d
        for i in range(j + 1, n):
            t = work[i, j]
            for k in range(j):
                t -= chol[i, k] * chol[j, k]
            chol[i, j] = t / d
    for i in range(n):  # forward: L y = rhs
        t = rhs[i]
        for k in range(i):
            t -= chol[i, k] * out[k]
        out[i] = t / chol[i, i]
    for i in range(n - 1, -1, -1):  # backward: Lᵀ x = y
        t = out[i]
        for k in range(i + 1, n):
            t -= chol[k, i] * out[k]
        out[i] = t / chol[i, i]
    return True


@njit(cache=True, parallel=True, fastmath=True)
def solve_csd(packed_work, negative, rhs, constraints, threshold, niter, n):
    """Iterate every voxel to the fixed point of its negative set.

    packed_work : (v, n(n+1)/2) normal matrices (lower triangle, row-major) for the
        negative sets in ``negative`` (v, n_c); rhs : (v, n) Mᵀs; constraints : (n_c, n);
        threshold : (v,) amplitude below which a constraint direction counts as negative.
    Returns the FOD coefficients (v, n), a status (0 ok, 2 not converged, 3 singular) and
    the number of solves per voxel.
    """
    nvox = rhs.shape[0]
    n_c = constraints.shape[0]
    sh = np.zeros((nvox, n))
    status = np.zeros(nvox, dtype=np.uint8)
    iterations = np.zeros(nvox, dtype=np.int32)
    for v in prange(nvox):
        work = np.empty((n, n))
        chol = np.empty((n, n))
        f = np.empty(n)
        neg = negative[v].copy()
        p = 0
        for i in range(n):
            for j in range(i + 1):
                work[i, j] = packed_work[v, p]
                p += 1
        converged = False
        for it in range(niter):
            if not _cholesky_solve(work, chol, rhs[v], f, n):
                status[v] = 3
                break
            iterations[v] = it + 1
            changed = False
            for c in range(n_c):
                a = 0.0
                for k in range(n):
                    a += constraints[c, k] * f[k]
                now = a < threshold[v]
                if now != neg[c]:
                    changed = True
                    sign = 1.0 if now else -1.0
                    for i in range(n):
                        hi = sign * constraints[c, i]
                        for j in range(i + 1):
                            work[i, j] += hi * constraints[c, j]
                    neg[c] = now
            if not changed:
                converged = True
                break
        if status[v] == 0 and not converged:
            status[v] = 2
        for i in range(n):
            sh[v, i] = f[i]
    return sh, status, iterations
