"""Compiled kernel of :func:`dwiflow.core.fixels.segment_fods`: MRtrix3 3.0's FMLS segmentation, voxels in parallel.

Per voxel (Smith et al. 2013, appendix 2; MRtrix3's ``DWI::FMLS::Segmenter``): the FOD's amplitudes on the 1281
directions are visited from the largest magnitude down. A direction adjacent to no lobe of its sign starts a lobe
(its peak); adjacent to one, it joins it; adjacent to several, it merges them when its amplitude exceeds
``merge_ratio`` × the newest one's peak, and otherwise is assigned, after the sweep, to the oldest. Each lobe sums
its amplitudes × integration weights (the AFD) and the amplitude-weighted directions (sign-aligned; the fixel's
direction). Negative lobes and lobes under the thresholds are dropped; each peak is refined by MRtrix3's Newton
search (with its precomputed Legendre table) and kept if it stays the lobe's nearest peak and inside the lobe.

Kept in its own module so that ``import dwiflow.core`` never imports numba; compiled on first use, cached on disk.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

import dwiflow.core._numba_setup  # noqa: F401  (fork-safe threading layer)
from dwiflow.core._sh2peaks_kernel import _peak, derivative_factors


@njit(cache=True, nogil=True)
def visiting_keys(amplitudes, keys):
    """keys[v, d] = amplitude d of voxel v as a sortable integer when positive (the float's bits, monotone for positive
    floats, with the lowest 11 replaced by 2047 − d, so that equal amplitudes sort in direction order), else −1.
    Releases the GIL: blocks of voxels run in Python threads side by side."""
    for v in range(amplitudes.shape[0]):
        for d in range(amplitudes.shape[1]):
            value = amplitudes[v, d]
            if value > 0.0:
                bits = np.float64(value).view(np.int64)
                keys[v, d] = (bits & ~np.int64(2047)) | np.int64(2047 - d)
            else:
                keys[v, d] = -1


@njit(cache=True, fastmath=False, inline="always")
def _add(lobe, direction, value, weight, dirs, lobe_of, mean, integral):
    """Direction ``direction`` joins ``lobe``: FOD_lobe::add."""
    lobe_of[direction] = lobe
    dot = mean[lobe, 0] * dirs[direction, 0] + mean[lobe, 1] * dirs[direction, 1] + mean[lobe, 2] * dirs[direction, 2]
    sign = 1.0 if dot > 0.0 else -1.0
    for k in range(3):
        mean[lobe, k] += dirs[direction, k] * sign * abs(value) * weight
    integral[lobe] += abs(value * weight)


@njit(cache=True, fastmath=False, inline="always")
def _newton_slack(largest, lmax, covering):
    """How far Newton's search can raise a lobe's peak above its best sample (``largest``: the voxel's largest
    sample), or infinity where the bound does not hold.

    Newton stops (|f'/f''| < 1e-4) at a near-stationary point p whose nearest direction d is in the lobe, at most
    ``covering`` away; along the great circle through p and d the FOD is a trigonometric polynomial of degree lmax,
    so (Bernstein) |f''| <= lmax² F with F = max |f| <= largest / (1 - lmax² covering² / 2), and
    f(p) - f(d) <= 1e-4 lmax² F covering + lmax² F covering² / 2, plus 1e-3 F for the interpolated Legendre table.
    """
    bend = 0.5 * lmax * lmax * covering * covering
    if bend >= 0.5:
        return math.inf
    bound = abs(largest) / (1.0 - bend)
    return bound * (bend + 1e-4 * lmax * lmax * covering + 1e-3)


@njit(cache=True, fastmath=False)
def _segment(values, keys, sh, lmax, dirs, weights, adj_ptr, adj_idx, samples, covering, integral_threshold,
             peak_threshold, merge_ratio, dir_from_peak, out_dirs, out_afd, out_peak, scratch, lobe_of, late, peak_dir,
             mean, work, factors):
    """Segment one voxel; writes up to ``out_afd.size`` fixels and returns how many there are.

    ``keys``: the positive amplitudes' visiting order, ascending (see :func:`segment_rows`); negative amplitudes are
    never visited, since negative lobes never touch positive ones and are dropped in the end.
    """
    n_dirs = values.shape[0]
    largest = 0
    for d in range(1, n_dirs):
        if abs(values[d]) > abs(values[largest]):
            largest = d
    if values[largest] <= 0.0:  # fod2fixel: the largest magnitude is negative, no lobes
        return 0
    slack = _newton_slack(values[largest], lmax, covering)
    if values[largest] + slack < peak_threshold:  # no lobe can reach the peak threshold: nothing to segment
        return 0
    lobe_of[:] = -1
    max_peak = scratch[0]
    integral = scratch[1]
    alive = scratch[2]
    peak_head = late[0]
    peak_tail = late[1]
    peak_next = late[2]
    late_dir = late[3]
    late_lobe = late[4]
    adjacent = late[5]
    n_late = 0
    n_lobes = 0
    for k in range(n_dirs - 1, -1, -1):
        key = keys[k]
        if key < 0:  # the non-positive samples, sorted first
            break
        d = 2047 - (key & 2047)
        value = values[d]
        first = -1
        several = False
        for j in range(adj_ptr[d], adj_ptr[d + 1]):  # the common case first: no lobe, or one lobe around
            lobe = lobe_of[adj_idx[j]]
            if lobe >= 0:
                if first < 0:
                    first = lobe
                elif lobe != first:
                    several = True
        n_adjacent = 0 if first < 0 else 1
        if several:  # the distinct lobes around, in creation order (as MRtrix3 scans its vector)
            n_adjacent = 0
            for j in range(adj_ptr[d], adj_ptr[d + 1]):
                lobe = lobe_of[adj_idx[j]]
                if lobe < 0:
                    continue
                seen = False
                for a in range(n_adjacent):
                    if adjacent[a] == lobe:
                        seen = True
                        break
                if not seen:
                    a = n_adjacent
                    while a > 0 and adjacent[a - 1] > lobe:
                        adjacent[a] = adjacent[a - 1]
                        a -= 1
                    adjacent[a] = lobe
                    n_adjacent += 1
        else:
            adjacent[0] = first
        if n_adjacent == 0:
            lobe = n_lobes
            n_lobes += 1
            alive[lobe] = 1.0
            lobe_of[d] = lobe
            max_peak[lobe] = value
            peak_dir[lobe] = dirs[d]
            peak_head[lobe] = lobe
            peak_tail[lobe] = lobe
            peak_next[lobe] = -1
            for c in range(3):
                mean[lobe, c] = dirs[d, c] * value * weights[d]
            integral[lobe] = value * weights[d]
        elif n_adjacent == 1:
            _add(adjacent[0], d, value, weights[d], dirs, lobe_of, mean, integral)
        elif value / max_peak[adjacent[n_adjacent - 1]] > merge_ratio:
            target = adjacent[0]
            for a in range(1, n_adjacent):
                other = adjacent[a]
                for x in range(n_dirs):
                    if lobe_of[x] == other:
                        lobe_of[x] = target
                if max_peak[other] > max_peak[target]:  # the merged lobe's largest peak comes first
                    max_peak[target] = max_peak[other]
                    peak_next[peak_tail[other]] = peak_head[target]
                    peak_head[target] = peak_head[other]
                else:
                    peak_next[peak_tail[target]] = peak_head[other]
                    peak_tail[target] = peak_tail[other]
                dot = mean[target, 0] * mean[other, 0] + mean[target, 1] * mean[other, 1] + mean[target, 2] * mean[other, 2]
                sign = 1.0 if dot > 0.0 else -1.0
                for c in range(3):
                    mean[target, c] += mean[other, c] * integral[other] * sign  # as FOD_lobe::merge weights it
                integral[target] += integral[other]
                alive[other] = 0.0
                for r in range(n_late):
                    if late_lobe[r] == other:
                        late_lobe[r] = target
            _add(target, d, value, weights[d], dirs, lobe_of, mean, integral)
        else:
            late_dir[n_late] = d
            late_lobe[n_late] = adjacent[0]
            n_late += 1
    for r in range(n_late):
        _add(late_lobe[r], late_dir[r], values[late_dir[r]], weights[late_dir[r]], dirs, lobe_of, mean, integral)

    # a lobe below the peak threshold by more than ``slack`` is dropped whatever Newton finds: it is not searched
    table = work[:lmax + 1, :lmax + 1]
    derivatives = work[lmax + 1, :10]
    newton = work[lmax + 2, :3]
    count = 0
    for lobe in range(n_lobes):
        if alive[lobe] == 0.0 or integral[lobe] < integral_threshold:
            continue
        if max_peak[lobe] + slack < peak_threshold:
            continue
        p = peak_head[lobe]
        index = 0
        while p >= 0:
            newton[:] = peak_dir[p]
            amplitude = _peak(sh, lmax, newton, table, derivatives, samples, factors)
            if math.isfinite(amplitude) and math.isfinite(newton[0]) and math.isfinite(newton[1]) \
                    and math.isfinite(newton[2]):
                best_dot = 0.0
                nearest = -1
                q = peak_head[lobe]
                j = 0
                while q >= 0:
                    dot = abs(newton[0] * peak_dir[q, 0] + newton[1] * peak_dir[q, 1] + newton[2] * peak_dir[q, 2])
                    if dot > best_dot:
                        best_dot = dot
                        nearest = j
                    q = peak_next[q]
                    j += 1
                if nearest == index:
                    closest = 0
                    best_dot = -1.0
                    for x in range(n_dirs):
                        dot = abs(newton[0] * dirs[x, 0] + newton[1] * dirs[x, 1] + newton[2] * dirs[x, 2])
                        if dot > best_dot:
                            best_dot = dot
                            closest = x
                    if lobe_of[closest] == lobe:
                        peak_dir[p] = newton
                        if index == 0:
                            max_peak[lobe] = amplitude
            p = peak_next[p]
            index += 1
        if max_peak[lobe] < peak_threshold:
            continue
        if count < out_afd.shape[0]:
            if dir_from_peak:
                out_dirs[count] = peak_dir[peak_head[lobe]]
            else:
                norm = math.sqrt(mean[lobe, 0] ** 2 + mean[lobe, 1] ** 2 + mean[lobe, 2] ** 2)
                for c in range(3):
                    out_dirs[count, c] = mean[lobe, c] / norm
            out_afd[count] = integral[lobe]
            out_peak[count] = max_peak[lobe]
        count += 1
    return count


@njit(cache=True, parallel=True)
def segment_rows(amplitudes, keys, sh_rows, lmax, dirs, weights, adj_ptr, adj_idx, samples, covering,
                 integral_threshold, peak_threshold, merge_ratio, dir_from_peak, out_dirs, out_afd, out_peak, out_count,
                 n_threads):
    """Segment every row (voxel): ``amplitudes`` (voxels, directions) are the FODs sampled on ``dirs``; ``keys`` each
    row's positive amplitudes in increasing order (the float's bits with the low 11 replaced by 2047 − direction,
    so that equal amplitudes come in direction order, as fod2fixel's multimap visits them), preceded by negative
    keys. Up to ``out_afd.shape[1]`` fixels per voxel are written, ``out_count`` gets each voxel's number of fixels.
    A row whose l=0 coefficient is not positive and finite has none (as MRtrix3). ``n_threads``: numba's thread
    count (blocks of voxels are dealt to that many workers round-robin)."""
    n_vox = sh_rows.shape[0]
    n_dirs = dirs.shape[0]
    block = 64
    n_blocks = (n_vox + block - 1) // block
    n_workers = max(1, min(n_threads, n_blocks))
    for worker in prange(n_workers):  # blocks dealt round-robin: neighbouring voxels cost alike, halves may not
        scratch = np.zeros((3, n_dirs))
        lobe_of = np.empty(n_dirs, np.int64)
        late = np.zeros((6, n_dirs), np.int64)
        peak_dir = np.zeros((n_dirs, 3))
        mean = np.zeros((n_dirs, 3))
        work = np.zeros((lmax + 3, max(lmax + 1, 10)))
        factors = derivative_factors(lmax)
        for b in range(worker, n_blocks, n_workers):
            for v in range(b * block, min(n_vox, (b + 1) * block)):
                out_count[v] = 0
                if not (sh_rows[v, 0] > 0.0 and math.isfinite(sh_rows[v, 0])):
                    continue
                out_count[v] = _segment(amplitudes[v], keys[v], sh_rows[v], lmax, dirs, weights, adj_ptr, adj_idx,
                                        samples, covering, integral_threshold, peak_threshold, merge_ratio, dir_from_peak,
                                        out_dirs[v], out_afd[v], out_peak[v], scratch, lobe_of, late, peak_dir, mean,
                                        work, factors)
