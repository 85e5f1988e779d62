"""Compiled per-voxel part of :mod:`dwiflow.core.response_iterative` (numba).

Kept apart so that ``import dwiflow.core`` never imports numba; compiled on first use and
cached on disk.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

import dwiflow.core._numba_setup  # noqa: F401  (fork-safe threading layer)
from dwiflow.core._numba_linalg import cholesky_solve


@njit(cache=True, parallel=True, fastmath=True)
def per_voxel_zonal_fits(fibres, bvecs, signals, lmax):
    """Least-squares zonal SH coefficients (v, lmax/2+1) of each voxel's signal about its fibre.

    Voxel a fits signals[a] (v, n) ≈ Σ_l c_l·sqrt((2l+1)/4π)·P_l(|fibres[a]·bvecs[d]|) over even l
    (DIPY's per-voxel response estimate in ``recursive_response``). Legendre polynomials by
    Bonnet's recurrence; the (lmax/2+1)² normal equations are accumulated and solved by
    Cholesky per voxel, without the (v, n, lmax/2+1) design array.
    """
    n_vox, n_dirs = signals.shape
    n_l = lmax // 2 + 1
    scale = np.empty(n_l)
    for i in range(n_l):
        scale[i] = np.sqrt((4 * i + 1) / (4 * np.pi))
    out = np.empty((n_vox, n_l))
    for a in prange(n_vox):
        normal = np.zeros((n_l, n_l))
        rhs = np.zeros(n_l)
        p = np.empty(n_l)
        for d in range(n_dirs):
            x = abs(fibres[a, 0] * bvecs[d, 0] + fibres[a, 1] * bvecs[d, 1] + fibres[a, 2] * bvecs[d, 2])
            p_prev, p_curr = 1.0, x
            p[0] = scale[0]
            for l in range(1, lmax):
                p_next = ((2 * l + 1) * x * p_curr - l * p_prev) / (l + 1)
                p_prev, p_curr = p_curr, p_next
                if l % 2 == 1:
                    p[(l + 1) // 2] = p_next * scale[(l + 1) // 2]
            s = signals[a, d]
            for i in range(n_l):
                rhs[i] += p[i] * s
                for j in range(i + 1):
                    normal[i, j] += p[i] * p[j]
        if not cholesky_solve(normal, n_l, rhs, 0.0):  # too few directions for lmax
            rhs[:] = np.nan
        for i in range(n_l):
            out[a, i] = rhs[i]
    return out
