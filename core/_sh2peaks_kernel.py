"""Compiled kernel of :func:`dwiflow.core.peaks.sh2peaks`: MRtrix3 3.0's ``sh2peaks`` search, voxels in parallel.

For each voxel, a Newton ascent of the SH amplitude along its gradient (step |f'/f''| clipped at 0.2 rad, stop below
1e-4 rad, at most 50 steps) starts from each of 60 seed directions in order; a peak within arccos(0.99) of one
already found is dropped; the rest above ``threshold`` are sorted by amplitude. The derivative formulas are those of
the orthonormal associated Legendre functions (MRtrix3's ``Math::SH::derivatives``); the basis is MRtrix3's.

Kept in its own module so that ``import dwiflow.core`` never imports numba; compiled on first use, cached on disk.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

import dwiflow.core._numba_setup  # noqa: F401  (fork-safe threading layer)

MAX_DIR_CHANGE = 0.2
ANGLE_TOLERANCE = 1e-4
MAX_STEPS = 50
DOT_THRESHOLD = 0.99


@njit(cache=True, fastmath=False)
def _legendre(lmax, cos_el, sin_el, table, factors):
    """table[l, m] = sqrt((2l+1)/4π (l-m)!/(l+m)!) P_l^m(cos el), Condon-Shortley phase, 0 <= m <= l <= lmax, by
    MRtrix3's recurrences, with their square roots taken from ``factors`` (:func:`derivative_factors`, entries 4
    and 5): the same values, without ~90 square roots per evaluation."""
    table[0, 0] = math.sqrt(1.0 / (4.0 * math.pi))
    for m in range(1, lmax + 1):
        table[m, m] = factors[m, m, 4] * sin_el * table[m - 1, m - 1]
    for m in range(0, lmax + 1):
        if m + 1 <= lmax:
            table[m + 1, m] = factors[m + 1, m, 4] * cos_el * table[m, m]
        for l in range(m + 2, lmax + 1):
            table[l, m] = factors[l, m, 4] * (cos_el * table[l - 1, m] - factors[l, m, 5] * table[l - 2, m])


@njit(cache=True, fastmath=False, inline="always")
def _index(l, m):
    """Position of coefficient (l, m) in MRtrix3's even-degree ordering."""
    return l * (l + 1) // 2 + m


@njit(cache=True, fastmath=False)
def precompute_legendre(lmax, n_samples):
    """MRtrix3's ``PrecomputedAL``: the table of :func:`_legendre` at ``n_samples`` elevations evenly spaced over
    [0, π] (fod2fixel's Newton search interpolates in it instead of evaluating the functions)."""
    samples = np.zeros((n_samples, lmax + 1, lmax + 1))
    increment = math.pi / (n_samples - 1)
    factors = derivative_factors(lmax)
    for n in range(n_samples):
        el = n * increment
        _legendre(lmax, math.cos(el), math.sin(el), samples[n], factors)
    return samples


@njit(cache=True, fastmath=False)
def _interpolated_legendre(lmax, el, samples, table):
    """table = the precomputed table linearly interpolated at elevation ``el`` (MRtrix3's PrecomputedAL::set/get)."""
    n_samples = samples.shape[0]
    increment = math.pi / (n_samples - 1)
    upper = el / increment
    i = int(upper)
    if i < 0:
        i, lower, upper = 0, 1.0, 0.0
    elif i >= n_samples - 1:
        i, lower, upper = n_samples - 1, 1.0, 0.0
    else:
        upper -= i
        lower = 1.0 - upper
    for l in range(0, lmax + 1, 2):
        for m in range(0, lmax + 1):
            value = lower * samples[i, l, m]
            if upper != 0.0:
                value += upper * samples[i + 1, l, m]
            table[l, m] = value


@njit(cache=True, fastmath=False)
def derivative_factors(lmax):
    """The square roots MRtrix3's SH::derivatives (entries 0–3, even l) and its associated Legendre recurrences
    (entries 4 and 5, see :func:`_legendre`) multiply by, per (l, m): computed once instead of per call (the same
    correctly rounded values)."""
    f = np.zeros((lmax + 1, lmax + 1, 6))
    for m in range(1, lmax + 1):
        f[m, m, 4] = -math.sqrt((2.0 * m + 1.0) / (2.0 * m))
    for m in range(0, lmax + 1):
        if m + 1 <= lmax:
            f[m + 1, m, 4] = math.sqrt(2.0 * m + 3.0)
        for l in range(m + 2, lmax + 1):
            f[l, m, 4] = math.sqrt((4.0 * l * l - 1.0) / (l * l - m * m))
            f[l, m, 5] = math.sqrt(((l - 1.0) ** 2 - m * m) / (4.0 * (l - 1.0) ** 2 - 1.0))
    for l in range(0, lmax + 1, 2):
        f[l, 0, 0] = math.sqrt(l * (l + 1.0))
        f[l, 0, 1] = math.sqrt(l * (l + 1.0) * (l - 1.0) * (l + 2.0))
        for m in range(1, l + 1):
            f[l, m, 0] = math.sqrt((l + m) * (l - m + 1.0))
            f[l, m, 1] = math.sqrt((l - m) * (l + m + 1.0))
            f[l, m, 2] = math.sqrt((l + m) * (l - m + 1.0) * (l + m - 1.0) * (l - m + 2.0))
            f[l, m, 3] = math.sqrt(abs((l - m) * (l + m + 1.0) * (l - m - 1.0) * (l + m + 2.0)))
    return f


@njit(cache=True, fastmath=False)
def _derivatives(sh, lmax, el, az, table, out, samples, factors):
    """out = amplitude, d/del, d/daz, d²/del², d²/del daz, d²/daz² at (el, az), as MRtrix3's SH::derivatives (with
    its precomputed Legendre table when ``samples`` has rows, exactly otherwise), then cos el, sin el, cos az and
    sin az, which the Newton step reuses (``out`` holds 10 values). cos(m az) and sin(m az) come from the
    angle-addition recurrence (equal to the direct values to a few ulps)."""
    sel = math.sin(el)
    cel = math.cos(el)
    atpole = sel < 1e-4
    if samples.shape[0] > 0:
        _interpolated_legendre(lmax, el, samples, table)
    else:
        _legendre(lmax, cel, sel, table, factors)
    amplitude = sh[0] * table[0, 0]
    d_el = 0.0
    d_az = 0.0
    d2_el2 = 0.0
    d2_elaz = 0.0
    d2_az2 = 0.0
    for l in range(2, lmax + 1, 2):
        v = sh[_index(l, 0)]
        amplitude += v * table[l, 0]
        d_el += v * factors[l, 0, 0] * table[l, 1]
        d2_el2 += v * (factors[l, 0, 1] * table[l, 2] - l * (l + 1.0) * table[l, 0]) / 2.0
    cos1 = math.cos(az)
    sin1 = math.sin(az)
    cos_m = 1.0
    sin_m = 0.0
    sqrt2 = math.sqrt(2.0)
    for m in range(1, lmax + 1):
        cos_m, sin_m = cos_m * cos1 - sin_m * sin1, sin_m * cos1 + cos_m * sin1
        caz = sqrt2 * cos_m
        saz = sqrt2 * sin_m
        start = m + 1 if m & 1 else m
        for l in range(start, lmax + 1, 2):
            vp = sh[_index(l, m)]
            vm = sh[_index(l, -m)]
            plm = table[l, m]
            along = vp * caz + vm * saz
            across = vm * caz - vp * saz
            amplitude += along * plm
            tmp = factors[l, m, 0] * table[l, m - 1]
            if l > m:
                tmp -= factors[l, m, 1] * table[l, m + 1]
            tmp /= -2.0
            d_el += along * tmp
            tmp2 = -((l + m) * (l - m + 1.0) + (l - m) * (l + m + 1.0)) * plm
            if m == 1:
                tmp2 -= factors[l, m, 2] * table[l, 1]
            else:
                tmp2 += factors[l, m, 2] * table[l, m - 2]
            if l > m + 1:
                tmp2 += factors[l, m, 3] * table[l, m + 2]
            tmp2 /= 4.0
            d2_el2 += along * tmp2
            if atpole:
                d_az += across * tmp
            else:
                d2_elaz += m * across * tmp
                d_az += m * across * plm
                d2_az2 -= along * m * m * plm
    if not atpole:
        d_az /= sel
        d2_elaz /= sel
        d2_az2 /= sel * sel
    out[0] = amplitude
    out[1] = d_el
    out[2] = d_az
    out[3] = d2_el2
    out[4] = d2_elaz
    out[5] = d2_az2
    out[6] = cel
    out[7] = sel
    out[8] = cos1
    out[9] = sin1


@njit(cache=True, fastmath=False)
def _peak(sh, lmax, direction, table, work, samples, factors):
    """Newton ascent from ``direction`` (updated in place); the amplitude there, or NaN without convergence
    (MRtrix3's ``Math::SH::get_peak``; ``samples``: its optional precomputed Legendre table, or an empty one)."""
    for _ in range(MAX_STEPS):
        az = math.atan2(direction[1], direction[0])
        el = math.acos(min(1.0, max(-1.0, direction[2])))
        _derivatives(sh, lmax, el, az, table, work, samples, factors)
        amplitude, d_el, d_az, d2_el2, d2_elaz, d2_az2 = work[0], work[1], work[2], work[3], work[4], work[5]
        step_el = math.sqrt(d_el * d_el + d_az * d_az)
        step_az = 0.0
        if step_el != 0.0:
            step_az = d_az / step_el
            step_el = d_el / step_el
        d_dt = step_az * d_az + step_el * d_el
        d2_dt2 = step_az * step_az * d2_az2 + 2.0 * step_az * step_el * d2_elaz + step_el * step_el * d2_el2
        dt = -d_dt / d2_dt2 if d2_dt2 != 0.0 else 0.0
        if dt < 0.0:
            dt = -dt
        if dt > MAX_DIR_CHANGE:
            dt = MAX_DIR_CHANGE
        step_el *= dt
        step_az *= dt
        cos_el, sin_el, cos_az, sin_az = work[6], work[7], work[8], work[9]
        direction[0] += step_el * cos_az * cos_el - step_az * sin_az
        direction[1] += step_el * sin_az * cos_el + step_az * cos_az
        direction[2] -= step_el * sin_el
        norm = math.sqrt(direction[0] ** 2 + direction[1] ** 2 + direction[2] ** 2)
        direction[0] /= norm
        direction[1] /= norm
        direction[2] /= norm
        if dt < ANGLE_TOLERANCE:
            return amplitude
    direction[:] = np.nan
    return np.nan


@njit(cache=True, parallel=True)
def search_peaks(sh_rows, lmax, seeds, npeaks, threshold, out):
    """For every row of ``sh_rows`` (voxels), ``out[v, k]`` = the k-th largest peak (amplitude × unit vector),
    NaN-padded, as sh2peaks; a row that is NaN or has no coefficient beyond l=0 stays NaN."""
    nvox = sh_rows.shape[0]
    nseeds = seeds.shape[0]
    factors = derivative_factors(lmax)
    for v in prange(nvox):
        table = np.zeros((lmax + 1, lmax + 1))
        work = np.zeros(10)
        found_dirs = np.empty((nseeds, 3))
        found_amps = np.empty(nseeds)
        direction = np.empty(3)
        exact = np.zeros((0, 1, 1))
        for k in range(npeaks):
            out[v, k, 0] = np.nan
            out[v, k, 1] = np.nan
            out[v, k, 2] = np.nan
        sh = sh_rows[v]
        skip = False
        anything = False
        for i in range(sh.size):
            if math.isnan(sh[i]):
                skip = True
                break
            if i > 0 and sh[i] != 0.0:
                anything = True
        if skip or not anything:
            continue
        count = 0
        for s in range(nseeds):
            direction[0] = seeds[s, 0]
            direction[1] = seeds[s, 1]
            direction[2] = seeds[s, 2]
            amplitude = _peak(sh, lmax, direction, table, work, exact, factors)
            if math.isfinite(amplitude):
                for j in range(count):
                    dot = abs(direction[0] * found_dirs[j, 0] + direction[1] * found_dirs[j, 1]
                              + direction[2] * found_dirs[j, 2])
                    if dot > DOT_THRESHOLD:
                        amplitude = np.nan
                        break
            if math.isfinite(amplitude) and amplitude >= threshold:
                found_dirs[count] = direction
                found_amps[count] = amplitude
                count += 1
        # partial sort by amplitude, largest first (stable for equal amplitudes: the earlier seed first)
        order = np.argsort(-found_amps[:count], kind="mergesort")
        for k in range(min(npeaks, count)):
            j = order[k]
            out[v, k, 0] = found_amps[j] * found_dirs[j, 0]
            out[v, k, 1] = found_amps[j] * found_dirs[j, 1]
            out[v, k, 2] = found_amps[j] * found_dirs[j, 2]
