"""Compiled exact 3-D median filter of :mod:`dwiflow.core.mask` (numba, parallel over the first axis).

Kept in its own module so that ``import dwiflow.core`` never imports numba; compiled on first use, cached on disk.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

import dwiflow.core._numba_setup  # noqa: F401  (fork-safe threading layer)


@njit(cache=True, inline="always")
def _swap_segment(plane: np.ndarray, length: int, leaving: np.ndarray, n_leaving: int, entering: np.ndarray,
                  scratch: np.ndarray) -> None:
    """plane[:length] (sorted) less the first ``n_leaving`` values of ``leaving`` (sorted, all of them in it), plus
    the values of ``entering`` (sorted), sorted, in place, in one merge pass."""
    for p in range(length):
        scratch[p] = plane[p]
    q_leaving, q_entering, o = 0, 0, 0
    for p in range(length):
        value = scratch[p]
        if q_leaving < n_leaving and value == leaving[q_leaving]:
            q_leaving += 1
            continue
        while q_entering < entering.size and entering[q_entering] < value:
            plane[o] = entering[q_entering]
            q_entering += 1
            o += 1
        plane[o] = value
        o += 1
    while q_entering < entering.size:
        plane[o] = entering[q_entering]
        q_entering += 1
        o += 1


@njit(cache=True, parallel=True)
def median_filter_nearest(image: np.ndarray, size_x: int, size_y: int, size_z: int) -> np.ndarray:
    """Median of every size_x × size_y × size_z window of a C-ordered 3-D image of finite values, edges replicated
    (scipy.ndimage.median_filter with ``mode="nearest"``, the same values); the window's voxel count must be odd.

    A window is the union of its size_z planes (one per z), and every plane is the union of size_x segments along y.
    Each segment is sorted once (and serves size_x × size_z windows); along x, a plane follows from the previous
    one by one merge pass that drops the segment leaving and takes in the one entering (each plane serves size_z
    windows along z); and the median is the middle element of the union of the window's sorted planes: with m
    planes and k elements still to pass over, the ⌊k/m⌋ smallest remaining of the plane whose ⌊k/m⌋-th remaining
    element is smallest all lie among the k smallest (at most m·⌊k/m⌋ elements are not larger), so they are passed
    over together. Per voxel this costs a few hundred comparisons, not a selection among all the window's values.
    """
    nx, ny, nz = image.shape
    rx, ry, rz = size_x // 2, size_y // 2, size_z // 2
    plane_n = size_x * size_y
    kth = plane_n * size_z // 2
    out = np.empty_like(image)
    for j in prange(ny):
        segments = np.empty((nx, nz, size_y))  # the windows of this j only read the segments centred on it
        for x in range(nx):
            for z in range(nz):
                segment = segments[x, z]
                for b in range(size_y):  # insertion sort of size_y values
                    value = image[x, min(max(j - ry + b, 0), ny - 1), z]
                    position = b
                    while position > 0 and segment[position - 1] > value:
                        segment[position] = segment[position - 1]
                        position -= 1
                    segment[position] = value
        planes = np.empty((nz, plane_n))
        merged = np.empty(plane_n)
        plane_of = np.empty(size_z, dtype=np.int64)
        passed = np.empty(size_z, dtype=np.int64)
        for i in range(nx):
            leaving = min(max(i - 1 - rx, 0), nx - 1)
            entering = min(max(i + rx, 0), nx - 1)
            for z in range(nz):
                plane = planes[z]
                if i > 0:
                    # the plane of the previous i, less its first segment, plus the new last one: one merge pass
                    if leaving != entering:
                        _swap_segment(plane, plane_n, segments[leaving, z], size_y, segments[entering, z], merged)
                    continue
                for a in range(size_x):
                    _swap_segment(plane, a * size_y, segments[0, 0], 0, segments[min(max(a - rx, 0), nx - 1), z],
                                  merged)
            for k in range(nz):
                for d in range(size_z):
                    plane_of[d] = min(max(k - rz + d, 0), nz - 1)
                    passed[d] = 0
                remaining = kth
                while remaining >= size_z:
                    step = remaining // size_z
                    best, best_value = -1, np.inf
                    for d in range(size_z):
                        if passed[d] + step <= plane_n:
                            value = planes[plane_of[d], passed[d] + step - 1]
                            if best < 0 or value < best_value:
                                best, best_value = d, value
                    passed[best] += step
                    remaining -= step
                while True:
                    best, best_value = -1, np.inf
                    for d in range(size_z):
                        if passed[d] < plane_n:
                            value = planes[plane_of[d], passed[d]]
                            if best < 0 or value < best_value:
                                best, best_value = d, value
                    if remaining == 0:
                        out[i, j, k] = best_value
                        break
                    passed[best] += 1
                    remaining -= 1
    return out
