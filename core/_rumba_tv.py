"""Compiled total-variation factor of :mod:`dwiflow.core.rumba` (numba, releases the GIL).

Kept in its own module so that ``import dwiflow.core`` never imports numba. The caller runs
blocks of components in its own threads, so the kernel itself is serial (``nogil``).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, fastmath=True)
def tv_factor_rows(
    f: np.ndarray,  # (n + 1, k) fractions, one row per mask voxel, then an all-zero row
    c0: int, c1: int,  # the block of components to compute
    self_row: np.ndarray, forward: np.ndarray,  # (n_active,), (n_active, 3): rows of f (see _TvTables)
    active_of_voxel: np.ndarray, backward: np.ndarray,  # (n,), (n, 3): active indices (n_active: zero row)
    weight: np.ndarray,  # (n,) TV weight of each mask voxel
    eps2: float, guard: float, one: float,  # ε², the division guard and 1, in the dtype of f (keeps float32 SIMD-wide)
    normal: np.ndarray,  # (n_active + 1, 3, c1 - c0) scratch whose last row is zero
    out: np.ndarray,  # (n, k) result, columns c0:c1 written
) -> None:
    """``1 / (|1 - λ div(∇f / |∇f|_ε)| + guard)`` for components ``c0:c1`` at the mask voxels.

    Forward differences with a zero difference at the upper box edge, backward differences
    (the adjoint) with zero flux below the lower edge, over the mask's bounding box with f = 0
    outside the mask, as in the RUMBA-SD + TV reference code. Component loops are innermost
    and contiguous.
    """
    width = c1 - c0
    for q in range(self_row.shape[0]):
        here = f[self_row[q], c0:c1]
        nx = f[forward[q, 0], c0:c1]
        ny = f[forward[q, 1], c0:c1]
        nz = f[forward[q, 2], c0:c1]
        n0 = normal[q, 0]
        n1 = normal[q, 1]
        n2 = normal[q, 2]
        for j in range(width):
            v = here[j]
            gx = nx[j] - v
            gy = ny[j] - v
            gz = nz[j] - v
            inv = one / np.sqrt(eps2 + gx * gx + gy * gy + gz * gz)
            n0[j] = gx * inv
            n1[j] = gy * inv
            n2[j] = gz * inv
    for p in range(active_of_voxel.shape[0]):
        a = active_of_voxel[p]
        bx = normal[backward[p, 0], 0]
        by = normal[backward[p, 1], 1]
        bz = normal[backward[p, 2], 2]
        m0 = normal[a, 0]
        m1 = normal[a, 1]
        m2 = normal[a, 2]
        w = weight[p]
        row = out[p, c0:c1]
        for j in range(width):
            div = (m0[j] - bx[j]) + (m1[j] - by[j]) + (m2[j] - bz[j])
            row[j] = one / (abs(one - w * div) + guard)
