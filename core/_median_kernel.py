"""Compiled exact 3-D median filter of :mod:`dwiflow.core.mask` (numba, parallel over the second axis).

Kept in its own module so that ``import dwiflow.core`` never imports numba; compiled on first use, cached on disk.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

import dwiflow.core._numba_setup  # noqa: F401  (fork-safe threading layer)

# ranks per block of the coarse histogram (a power of two): a median moving past empty ranks skips them a block at
# a time
BLOCK_SHIFT = 6
BLOCK = 1 << BLOCK_SHIFT


@njit(cache=True, inline="always")
def _clamp(index: int, size: int) -> int:
    return min(max(index, 0), size - 1)


@njit(cache=True, inline="always")
def _plane(ranks, x, ys, zs, fine, coarse, sign, median) -> int:
    """Add (``sign`` 1) or remove (-1) the window's plane at ``x`` in the histograms; returns the change in the
    number of values below the rank ``median``."""
    below = 0
    for y in ys:
        for z in zs:
            rank = ranks[x, y, z]
            fine[rank] += sign
            coarse[rank >> BLOCK_SHIFT] += sign
            if rank < median:
                below += sign
    return below


@njit(cache=True, parallel=True)
def median_filter_ranks(ranks: np.ndarray, n_ranks: int, size_x: int, size_y: int, size_z: int,
                        passes: int) -> np.ndarray:
    """``passes`` median filters of a C-ordered 3-D image of ranks (0 … n_ranks − 1, the order of the image's
    values) over size_x × size_y × size_z windows (an odd voxel count), edges replicated: the ranks of
    scipy.ndimage.median_filter's values with ``mode="nearest"``.

    Huang's running histogram (Huang, Yang & Tang 1979), in 3-D: along x a window follows from the previous one by
    removing one y-z plane of values and adding another, and the median follows from the previous one by moving
    over the ranks between them, with a coarse histogram (blocks of ``BLOCK`` ranks) to skip the empty ones. Per
    voxel that is two planes of counts and a short walk, not a selection among all the window's values. A median
    filter's output values are input values, so the passes after the first work on the same ranks."""
    nx, ny, nz = ranks.shape
    rx, ry, rz = size_x // 2, size_y // 2, size_z // 2
    kth = size_x * size_y * size_z // 2
    n_blocks = (n_ranks >> BLOCK_SHIFT) + 1
    source = ranks
    out = np.empty_like(ranks)
    for _ in range(passes):
        for j in prange(ny):
            fine = np.zeros(n_ranks, dtype=np.int32)
            coarse = np.zeros(n_blocks, dtype=np.int32)
            ys = np.empty(size_y, dtype=np.int64)
            zs = np.empty(size_z, dtype=np.int64)
            for b in range(size_y):
                ys[b] = _clamp(j - ry + b, ny)
            for k in range(nz):
                for d in range(size_z):
                    zs[d] = _clamp(k - rz + d, nz)
                median, below = 0, 0
                for a in range(size_x):
                    _plane(source, _clamp(a - rx, nx), ys, zs, fine, coarse, 1, median)
                for i in range(nx):
                    if i > 0:
                        leaving, entering = _clamp(i - 1 - rx, nx), _clamp(i + rx, nx)
                        if leaving != entering:
                            below += _plane(source, leaving, ys, zs, fine, coarse, -1, median)
                            below += _plane(source, entering, ys, zs, fine, coarse, 1, median)
                    # below: the window's values of rank < median; the median is the rank r with
                    # below(r) <= kth < below(r) + count(r)
                    while below > kth:
                        median -= 1
                        if (median & (BLOCK - 1)) == BLOCK - 1 and coarse[median >> BLOCK_SHIFT] == 0:
                            median -= BLOCK - 1  # an empty block: to its first rank, nothing below changes
                            continue
                        below -= fine[median]
                    while below + fine[median] <= kth:
                        below += fine[median]
                        median += 1
                        if (median & (BLOCK - 1)) == 0 and coarse[median >> BLOCK_SHIFT] == 0:
                            median += BLOCK - 1  # an empty block: to its last rank (count 0)
                    out[i, j, k] = median
                for a in range(size_x):  # the histograms back to zero for the next line
                    _plane(source, _clamp(nx - 1 - rx + a, nx), ys, zs, fine, coarse, -1, median)
        if source is ranks:
            source = np.empty_like(ranks)
        source, out = out, source
    return source
