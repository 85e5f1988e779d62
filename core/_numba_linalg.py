"""Small dense solvers shared by the compiled kernels (numba; imported only by them)."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def cholesky_solve(matrix: np.ndarray, n: int, rhs: np.ndarray, relative_floor: float) -> bool:
    """Solve A x = b for the symmetric positive-definite A in ``matrix[:n, :n]`` (its lower triangle is read) by a
    Cholesky factorisation A = L Lᵀ, in place: the lower triangle becomes L and ``rhs[:n]`` becomes x.

    False, with ``matrix`` and ``rhs`` left part-way, as soon as a pivot (the square of L's diagonal entry) is not
    above ``relative_floor`` times A's diagonal entry: A is then numerically singular (``relative_floor`` 0: only a
    non-positive pivot stops)."""
    for j in range(n):
        pivot = matrix[j, j]
        for k in range(j):
            pivot -= matrix[j, k] * matrix[j, k]
        if not pivot > relative_floor * matrix[j, j]:
            return False
        diagonal = np.sqrt(pivot)
        matrix[j, j] = diagonal
        for i in range(j + 1, n):
            value = matrix[i, j]
            for k in range(j):
                value -= matrix[i, k] * matrix[j, k]
            matrix[i, j] = value / diagonal
    for i in range(n):  # L w = b
        value = rhs[i]
        for k in range(i):
            value -= matrix[i, k] * rhs[k]
        rhs[i] = value / matrix[i, i]
    for i in range(n - 1, -1, -1):  # Lᵀ x = w
        value = rhs[i]
        for k in range(i + 1, n):
            value -= matrix[k, i] * rhs[k]
        rhs[i] = value / matrix[i, i]
    return True
