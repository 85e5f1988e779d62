"""Compiled per-voxel parts of :mod:`dwiflow.core.peaks` (numba, parallel over voxels).

Kept apart so that ``import dwiflow.core`` never imports numba; compiled on first use and
cached on disk.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

import dwiflow.core._numba_setup  # noqa: F401  (fork-safe threading layer)


@njit(cache=True, parallel=True)
def largest_local_maxima(amplitudes, neighbours, n_scan, abs_threshold, rel_threshold, use_floor, keep):
    """The ``keep`` largest local maxima of each row of ``amplitudes`` (v, n_vertices).

    A vertex among the first ``n_scan`` is a maximum when no neighbour (``neighbours``:
    (n_scan, k) indices, padded with the vertex itself) exceeds it and, if ``use_floor``, it
    exceeds max(abs_threshold, rel_threshold·row maximum over the scanned vertices).
    Returns vertex indices (v, keep), −1 where fewer, and their amplitudes (−inf there),
    in decreasing amplitude (ties: lower vertex first, as a stable sort).
    """
    n_vox = amplitudes.shape[0]
    vertices = np.full((n_vox, keep), -1, dtype=np.int64)
    values = np.full((n_vox, keep), -np.inf)
    for v in prange(n_vox):
        row = amplitudes[v]
        floor = -np.inf
        if use_floor:
            top = row[0]
            for h in range(1, n_scan):
                if row[h] > top:
                    top = row[h]
            floor = max(abs_threshold, rel_threshold * top)
        count = 0
        for h in range(n_scan):
            a = row[h]
            if use_floor and not a > floor:
                continue
            is_max = True
            for k in range(neighbours.shape[1]):
                if a < row[neighbours[h, k]]:
                    is_max = False
                    break
            if not is_max:
                continue
            if count == keep and not a > values[v, keep - 1]:
                continue
            # insert after every kept value >= a (stable)
            pos = min(count, keep - 1)
            while pos > 0 and values[v, pos - 1] < a:
                values[v, pos] = values[v, pos - 1]
                vertices[v, pos] = vertices[v, pos - 1]
                pos -= 1
            values[v, pos] = a
            vertices[v, pos] = h
            if count < keep:
                count += 1
    return vertices, values


@njit(cache=True, parallel=True, fastmath=True)
def hill_climb(coefficients, start, basis, neighbours, max_steps):
    """Climb each candidate's exact SH amplitude over a vertex graph.

    coefficients : (c, n) SH rows; start : (c,) starting vertices; basis : (n_vertices, n);
    neighbours : (n_vertices, 6) padded with the vertex itself. At most ``max_steps`` moves to
    the best of the vertex and its neighbours. Returns the final vertices and the amplitudes
    of [vertex, neighbours...] there (c, 7).
    """
    n_cand, n = coefficients.shape
    width = neighbours.shape[1] + 1
    node = start.copy()
    values = np.empty((n_cand, width))
    for i in prange(n_cand):
        current = start[i]
        for step in range(max_steps + 1):
            best, best_value = 0, -np.inf
            for k in range(width):
                vertex = current if k == 0 else neighbours[current, k - 1]
                s = 0.0
                for j in range(n):
                    s += coefficients[i, j] * basis[vertex, j]
                values[i, k] = s
                if s > best_value:
                    best, best_value = k, s
            if best == 0 or step == max_steps:
                break
            current = neighbours[current, best - 1]
        node[i] = current
    return node, values


@njit(cache=True, parallel=True)
def select_peaks(directions, amplitudes, npeaks, rel_threshold, abs_threshold, cos_separation):
    """Keep candidates in the given (decreasing-amplitude) order as MRtrix3/DIPY do.

    directions : (v, k, 3) unit vectors; amplitudes : (v, k), −inf where there is no candidate.
    A candidate is kept when its amplitude exceeds ``abs_threshold``, is at least
    ``rel_threshold`` times the voxel's first candidate, fewer than ``npeaks`` are kept and
    it is not within the separation (|cos| > ``cos_separation``) of one kept before.
    Returns (v, npeaks, 3) amplitude-scaled vectors, NaN where fewer.
    """
    n_vox, n_cand = amplitudes.shape
    out = np.full((n_vox, npeaks, 3), np.nan)
    for v in prange(n_vox):
        top = amplitudes[v, 0]
        kept = 0
        for c in range(n_cand):
            if kept == npeaks:
                break
            a = amplitudes[v, c]
            if not np.isfinite(a) or not a > abs_threshold or not a >= rel_threshold * top:
                continue
            d0, d1, d2 = directions[v, c, 0], directions[v, c, 1], directions[v, c, 2]
            close = False
            for k in range(kept):
                # kept vectors are amplitude-scaled: compare directions
                dot = out[v, k, 0] * d0 + out[v, k, 1] * d1 + out[v, k, 2] * d2
                norm = np.sqrt(out[v, k, 0] ** 2 + out[v, k, 1] ** 2 + out[v, k, 2] ** 2)
                if abs(dot) > cos_separation * norm:
                    close = True
                    break
            if close:
                continue
            out[v, kept, 0] = d0 * a
            out[v, kept, 1] = d1 * a
            out[v, kept, 2] = d2 * a
            kept += 1
    return out
