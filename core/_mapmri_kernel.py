"""Compiled assembly of MAP-MRI design matrices (numba; kept apart so ``import dwiflow.core`` never
imports numba). Filling (voxels × volumes × coefficients) products of 1D Hermite functions is
memory-bound gather work that numpy does slowly along a short last axis."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def anisotropic_design(mu, q_local, order, i0, i1, i2, sign, out):
    """``out[v, g, c] = sign[c] h_i0(2π μx qx) h_i1(2π μy qy) h_i2(2π μz qz)`` with normalised Hermite
    functions h_n(x) = exp(-x²/2) H_n(x) / sqrt(2^n n!), by their three-term recurrence."""
    n_vox, n_q = q_local.shape[0], q_local.shape[1]
    n_coef = i0.shape[0]
    h = np.empty((3, order + 1))
    ratio_a = np.empty(order + 1)
    ratio_b = np.empty(order + 1)
    for n in range(1, order):
        ratio_a[n] = np.sqrt(2.0 / (n + 1))
        ratio_b[n] = np.sqrt(n / (n + 1.0))
    for v in range(n_vox):
        for g in range(n_q):
            for a in range(3):
                x = 2.0 * np.pi * mu[v, a] * q_local[v, g, a]
                h[a, 0] = np.exp(-0.5 * x * x)
                if order >= 1:
                    h[a, 1] = np.sqrt(2.0) * x * h[a, 0]
                for n in range(1, order):
                    h[a, n + 1] = ratio_a[n] * x * h[a, n] - ratio_b[n] * h[a, n - 1]
            for c in range(n_coef):
                out[v, g, c] = sign[c] * h[0, i0[c]] * h[1, i1[c]] * h[2, i2[c]]
