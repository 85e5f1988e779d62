"""Compiled per-voxel kernel of :mod:`dwiflow.core.csd` (numba, parallel over voxels).

Kept in its own module so that ``import dwiflow.core`` never imports numba; the kernel is
compiled on first use and cached on disk.

Where the time goes (lmax 8, 300 constraint directions, 100k voxels, one thread: 41 µs and 3.8
solves a voxel): nearly every block takes three lockstep rounds before its voxels continue alone. Of
the kernel, the rounds' Cholesky factorisations take ~26 %, their assembly from the moments ~19 %,
the moments' product ~8 %, the amplitudes ~6 % (each share: the kernel's extra time with that part
done twice). Measured and slower, so not used: an upper factor (UᵀU, rows contiguous) factored
right-looking (1.9× the time) or transposed from this Crout factor (+19 %); four voxels as explicit
SIMD lanes of the factorisation (+9 %: numba leaves LLVM's SLP vectoriser off,
``numba.config.SLP_VECTORIZE``, so the loop vectoriser runs along k with shuffles instead; with it
on and the factorisation compiled without fastmath, so that k is not vectorised, 3 % faster: too
little to turn it on for every kernel); the whole block factored at once with the voxel as the
innermost loop (packed triangle × 16 lanes, runtime lane count so that the loop vectoriser takes it;
+13–26 % with k unrolled by 1, 4 or 8: each sum runs through memory, not a register; timed alone it
beat this Crout factor called per voxel, 5.0 against 6.7 µs a matrix, but not inside the kernel);
register accumulators in the assembly (+2–3 %); starting without MRtrix3's 10 %-of-maximum set
(+14 %, 4.1 solves) or at 20 % (+19 %); every start gave the same solutions (within 1e-5 in all of
20k voxels). Nor does a better-placed start pay: from the lmax-8 fit with a ridge of 1e-2 of its mean diagonal, cut
at 5 % of the maximum, a plain float64 iteration on 4000 of the voxels took 3.65 solves for this start's 3.77 (at
10 %: 3.88), ~1.3 µs a voxel saved for ~13,500 more multiply-adds in the start's products: ~2 % at best, so not built.
Nor do these, timed alone (best of five; factors of 45 × 45 matrices, assembly of a block of 16): this Crout factor
in single precision (2.73 against 2.67 µs: its time is the latency of each column's reductions, square root and
reciprocal, not arithmetic), a column-oriented factor Uᵀ U with U's rows contiguous, updated by AXPYs over k (6.2 µs
with k unrolled by four, 10.7 without), or the assembly's non-zeros taken by position in their row rather than row
by row, so that no two in a row add to the same entry (42.5 against 28.4 µs a block: the rows' scattered stores cost
more).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

import dwiflow.core._numba_setup  # noqa: F401  (fork-safe threading layer)
from dwiflow.core.status import FitStatus

# status codes as plain integers (compile-time constants for numba)
OK = int(FitStatus.OK)
NONFINITE_INPUT = int(FitStatus.NONFINITE_INPUT)
NOT_CONVERGED = int(FitStatus.NOT_CONVERGED)
SINGULAR = int(FitStatus.SINGULAR)

# Up to this many sign changes in one iteration are applied to the Cholesky factor as rank-one
# updates/downdates (about n² operations each); more refactor the updated normal matrix (n³/6).
MAX_RANK_ONE_CHANGES = 3
# Voxels iterated together while many directions change sign (the voxel is the SIMD lane);
# the last block of a call may be partly empty.
BLOCK = 16
# A block keeps iterating in lockstep while at least this many of its voxels changed more than
# MAX_RANK_ONE_CHANGES signs (a lockstep round costs every lane as much as a refactorisation),
# for at most MAX_BLOCK_ROUNDS rounds; then each voxel continues on its own.
MIN_BUSY_LANES = 12
MAX_BLOCK_ROUNDS = 8


@njit(cache=True, fastmath=True, inline="always")
def _cholesky(packed, lane, chol, n) -> bool:
    """Lower Cholesky factor of the symmetric positive-definite matrix in column ``lane`` of
    ``packed`` (its lower triangle, row-major).

    Crout order, four rows of a column at a time so that each load of row j serves four
    dot products.
    """
    for j in range(n):
        s = packed[j * (j + 1) // 2 + j, lane]
        for k in range(j):
            s -= chol[j, k] * chol[j, k]
        if s <= 0.0:
            return False
        d = np.sqrt(s)
        chol[j, j] = d
        inv = 1.0 / d
        i = j + 1
        while i + 3 < n:
            t0 = packed[i * (i + 1) // 2 + j, lane]
            t1 = packed[(i + 1) * (i + 2) // 2 + j, lane]
            t2 = packed[(i + 2) * (i + 3) // 2 + j, lane]
            t3 = packed[(i + 3) * (i + 4) // 2 + j, lane]
            for k in range(j):
                cjk = chol[j, k]
                t0 -= chol[i, k] * cjk
                t1 -= chol[i + 1, k] * cjk
                t2 -= chol[i + 2, k] * cjk
                t3 -= chol[i + 3, k] * cjk
            chol[i, j] = t0 * inv
            chol[i + 1, j] = t1 * inv
            chol[i + 2, j] = t2 * inv
            chol[i + 3, j] = t3 * inv
            i += 4
        while i < n:
            t = packed[i * (i + 1) // 2 + j, lane]
            for k in range(j):
                t -= chol[i, k] * chol[j, k]
            chol[i, j] = t * inv
            i += 1
    return True


@njit(cache=True, fastmath=True, inline="always")
def _rank_one(chol, x, sign, n) -> bool:
    """Turn L into the factor of L·Lᵀ + sign·x·xᵀ in place (x is overwritten); False if not PD."""
    for k in range(n):
        lkk = chol[k, k]
        r2 = lkk * lkk + sign * x[k] * x[k]
        if r2 <= 1e-12 * lkk * lkk:
            return False
        r = np.sqrt(r2)
        c = r / lkk
        s = x[k] / lkk
        inv_c = 1.0 / c
        chol[k, k] = r
        for i in range(k + 1, n):
            lik = (chol[i, k] + sign * s * x[i]) * inv_c
            x[i] = c * x[i] - s * lik
            chol[i, k] = lik
    return True


@njit(cache=True, fastmath=True, inline="always")
def _triangular_solve(chol, rhs, out, n) -> None:
    """out = (L·Lᵀ)⁻¹ rhs."""
    for i in range(n):  # forward: L y = rhs
        t = rhs[i]
        for k in range(i):
            t -= chol[i, k] * out[k]
        out[i] = t / chol[i, i]
    for i in range(n - 1, -1, -1):  # backward: Lᵀ x = y, by rows of L (contiguous)
        xi = out[i] / chol[i, i]
        out[i] = xi
        for k in range(i):
            out[k] -= chol[i, k] * xi


@njit(cache=True, fastmath=True)
def _block_round(mom_lane, negative_lane, rhs, threshold_lane, constraints, direction_moments, gaunt_indptr,
                 gaunt_indices, gaunt_data, normal_lower, mom_t, packed, chols, f, f_lane, amplitude, n):
    """One iteration for a block of voxels (lane b = voxel b of the block).

    Assembles the normal matrices of the current negative sets from their SH moments with
    the voxel as the SIMD lane (``packed``: lower triangle row-major × lane), factors and
    solves each (``chols``: lane × n × n; ``f_lane``: n × lane), evaluates the
    constraint amplitudes of the whole block by one matrix product and updates the negative
    sets and their moments in place. Returns the number of sign changes per lane and a flag
    per lane whose matrix was not positive definite.
    """
    n_high, lanes = mom_t.shape
    n_c = constraints.shape[0]
    for q in range(n_high):
        for b in range(lanes):
            mom_t[q, b] = mom_lane[b, q]
    for p in range(normal_lower.shape[0]):
        base = normal_lower[p]
        for b in range(lanes):
            packed[p, b] = base
        for r in range(gaunt_indptr[p], gaunt_indptr[p + 1]):
            g = gaunt_data[r]
            q = gaunt_indices[r]
            for b in range(lanes):
                packed[p, b] += g * mom_t[q, b]
    singular = np.zeros(lanes, dtype=np.bool_)
    for b in range(lanes):
        if not _cholesky(packed, b, chols[b], n):
            singular[b] = True
            for i in range(n):
                f_lane[i, b] = 0.0
            continue
        _triangular_solve(chols[b], rhs[b], f, n)
        for i in range(n):
            f_lane[i, b] = f[i]
    np.dot(constraints, f_lane, amplitude)  # (n_c, n) · (n, lanes): BLAS
    changed = np.zeros(lanes, dtype=np.int64)
    for b in range(lanes):
        for c in range(n_c):
            now = amplitude[c, b] < threshold_lane[b]
            if now != negative_lane[b, c]:
                negative_lane[b, c] = now
                changed[b] += 1
                sign = 1.0 if now else -1.0
                for q in range(n_high):
                    mom_lane[b, q] += sign * direction_moments[c, q]
    return changed, singular


@njit(cache=True, fastmath=True)
def _finish_voxel(work, chol, f, x, amplitude, changes, n_changed, neg, rhs, threshold, constraints, solves, niter, n):
    """Continue one voxel from its last solve (whose sign changes are ``changes[:n_changed]``,
    already recorded in ``neg`` but not yet in ``work`` (packed lower triangle, one lane) or
    ``chol``) to its fixed point.

    Returns (status, number of solves); ``f`` holds the last solution.
    """
    n_c = constraints.shape[0]
    while True:
        for t in range(n_changed):  # the normal matrix follows every change
            c = changes[t]
            sign = 1.0 if neg[c] else -1.0
            p = 0
            for i in range(n):
                hi = sign * constraints[c, i]
                for j in range(i + 1):
                    work[p, 0] += hi * constraints[c, j]
                    p += 1
        factor_stale = n_changed > MAX_RANK_ONE_CHANGES
        if not factor_stale:
            # rank-one updates of the factor, additions first so that it stays positive definite
            for order in range(2):
                for t in range(n_changed):
                    c = changes[t]
                    if neg[c] != (order == 0):
                        continue
                    for k in range(n):
                        x[k] = constraints[c, k]
                    if not _rank_one(chol, x, 1.0 if order == 0 else -1.0, n):
                        factor_stale = True
                        break
                if factor_stale:
                    break
        if solves >= niter:
            return NOT_CONVERGED, solves
        if factor_stale and not _cholesky(work, 0, chol, n):
            return SINGULAR, solves
        _triangular_solve(chol, rhs, f, n)
        solves += 1
        np.dot(constraints, f, amplitude)  # BLAS gemv
        n_changed = 0
        for c in range(n_c):
            now = amplitude[c] < threshold
            if now != neg[c]:
                changes[n_changed] = c
                n_changed += 1
                neg[c] = now
        if n_changed == 0:
            return OK, solves


@njit(cache=True, parallel=True, fastmath=True)
def solve_csd(signal_by_volume, finite_voxel, columns, forward, start_t, start_constraints_t, threshold_row,
              threshold_const, start_fraction, constraints, direction_moments, gaunt_indptr, gaunt_indices, gaunt_data,
              normal_lower, niter):
    """Deconvolve every voxel: start, then iterate to the fixed point of its negative set.

    signal_by_volume : (n_volumes, v) float64 signals, volume by volume (a block of voxels reads a
    run of each volume's row: the caller gathers no transposed copy); finite_voxel : (v,) whether
    the voxel's values at ``columns`` are finite (a voxel where not gets status 1 and zeros; tested
    by the caller, since fastmath lets the compiler assume that floats are finite); columns :
    (n_dirs,) the deconvolved volumes; forward : (n_dirs, n) M; start_t : (n_dirs, n_start) signal →
    the low-order start's coefficients; start_constraints_t : (n_start, n_c) their amplitudes at the
    constraint directions; threshold_row, threshold_const : per-voxel threshold = const + row·s
    (amplitude below which a direction counts as negative); start_fraction : the start's negative
    set also takes amplitudes below this fraction of their maximum (< 0: not); constraints : (n_c,
    n) rows h; direction_moments : (n_c, n_high) each direction's SH moments (degree ≤ 2·lmax);
    gaunt_* : CSR (n_pairs, n_high) from moments to the packed lower triangle (row-major) of
    Σ_negative h hᵀ (about 5% of the Gaunt coefficients are non-zero); normal_lower : (n_pairs,)
    packed MᵀM + νI; niter ≥ 1.

    The first iterations, where tens of directions change sign, run for ``BLOCK`` voxels in
    lockstep (start, moments and amplitudes as matrix products, assembly from moments
    vectorised across the block); each voxel then continues alone with rank-one updates of
    its factor. Returns the FOD coefficients (v, n), a :class:`~dwiflow.core.status.FitStatus` code
    per voxel (OK, NONFINITE_INPUT, NOT_CONVERGED, SINGULAR) and the number of solves per voxel.
    """
    nvox = signal_by_volume.shape[1]
    n_dirs = columns.shape[0]
    n = forward.shape[1]
    n_c = constraints.shape[0]
    n_high = direction_moments.shape[1]
    n_pairs = normal_lower.shape[0]
    sh = np.zeros((nvox, n))
    status = np.zeros(nvox, dtype=np.uint8)
    iterations = np.zeros(nvox, dtype=np.int32)
    for blk in prange((nvox + BLOCK - 1) // BLOCK):
        v0 = blk * BLOCK
        block_signal = np.zeros((BLOCK, n_dirs))  # lanes past the last voxel stay zero (and idle)
        finite = np.zeros(BLOCK, dtype=np.bool_)
        last = min(BLOCK, nvox - v0)
        for b in range(last):
            finite[b] = finite_voxel[v0 + b]
        for d in range(n_dirs):
            row = columns[d]
            for b in range(last):
                if finite[b]:
                    block_signal[b, d] = signal_by_volume[row, v0 + b]
        rhs = np.dot(block_signal, forward)  # Mᵀs
        start_amplitude = np.dot(np.dot(block_signal, start_t), start_constraints_t)
        threshold_lane = threshold_const + np.dot(block_signal, threshold_row)
        neg_lane = np.empty((BLOCK, n_c), dtype=np.bool_)
        neg_float = np.empty((BLOCK, n_c))
        for b in range(BLOCK):
            cut = threshold_lane[b]
            if start_fraction >= 0:
                cut = max(cut, start_fraction * start_amplitude[b].max())
            for c in range(n_c):
                neg_lane[b, c] = start_amplitude[b, c] < cut
                neg_float[b, c] = 1.0 if neg_lane[b, c] else 0.0
        mom_lane = np.dot(neg_float, direction_moments)  # SH moments of the negative sets
        previous = np.empty_like(neg_lane)
        mom_t = np.empty((n_high, BLOCK))
        packed = np.empty((n_pairs, BLOCK))
        chols = np.empty((BLOCK, n, n))
        f = np.empty(n)
        f_lane = np.empty((n, BLOCK))
        amplitude_lane = np.empty((n_c, BLOCK))
        active = finite.copy()
        for b in range(min(BLOCK, nvox - v0)):
            if not finite[b]:
                status[v0 + b] = NONFINITE_INPUT
        rounds = 0
        while True:
            previous[:] = neg_lane
            changed, singular = _block_round(mom_lane, neg_lane, rhs, threshold_lane, constraints,
                                             direction_moments, gaunt_indptr, gaunt_indices, gaunt_data, normal_lower,
                                             mom_t, packed, chols, f, f_lane, amplitude_lane, n)
            rounds += 1
            busy = 0
            for b in range(BLOCK):
                if not active[b]:
                    continue
                v = v0 + b
                iterations[v] = rounds
                if singular[b] or changed[b] == 0:
                    status[v] = SINGULAR if singular[b] else OK
                    active[b] = False
                    for i in range(n):
                        sh[v, i] = f_lane[i, b]
                elif changed[b] > MAX_RANK_ONE_CHANGES:
                    busy += 1
            if busy < MIN_BUSY_LANES or rounds >= MAX_BLOCK_ROUNDS or rounds >= niter:
                break
        work = np.empty((n_pairs, 1))  # the voxel's normal matrix, packed like a lane
        x = np.empty(n)
        amplitude = np.empty(n_c)
        changes = np.empty(n_c, dtype=np.int64)
        for b in range(BLOCK):
            if not active[b]:
                continue
            v = v0 + b
            for p in range(n_pairs):
                work[p, 0] = packed[p, b]
            for i in range(n):
                f[i] = f_lane[i, b]
            n_changed = 0
            for c in range(n_c):
                if neg_lane[b, c] != previous[b, c]:
                    changes[n_changed] = c
                    n_changed += 1
            neg = neg_lane[b].copy()
            st, solves = _finish_voxel(work, chols[b], f, x, amplitude, changes, n_changed, neg, rhs[b], threshold_lane[b],
                                       constraints, rounds, niter, n)
            status[v] = st
            iterations[v] = solves
            for i in range(n):
                sh[v, i] = f[i]
    return sh, status, iterations
