"""Compiled kernel of :mod:`dwiflow.core.msmt_csd` (numba, parallel over blocks of voxels).

Each voxel's problem, in the whitened coordinates y of :class:`~dwiflow.core.msmt_csd.MsmtCsdModel`, is the
projection of the unconstrained solution y_u onto the cone {y : B y >= 0}. Its dual is a non-negative least-squares
problem in the constraint multipliers λ >= 0: minimise ½ λᵀGλ + λᵀc_u with G = BBᵀ and c_u = B y_u; then
y = y_u + Bᵀλ. It is solved by the Lawson–Hanson active-set method (Lawson & Hanson 1974, ch. 23), which like
MRtrix3's ICLS solver adds the most violated constraint at each step, on the Gram matrix G (computed once), with
the Cholesky factor of the active block grown by one row per added constraint and rebuilt when one leaves. A
voxel may start from an active set of its own found before (a warm start, e.g. between SS3T-CSD's alternations).
Constraint values are updated as c = c_u + G[:, P] λ_P, which costs (number of constraints) × (active set size)
rather than a product with B. While the violations are large, that update runs in single precision: a cold start
chooses its constraints on float32 values until none is violated by more than ``COARSE_TOLERANCE`` · |y_u| (3e-7),
then recomputes the values in double precision and goes on there to the usual tolerance. The multipliers, the factor
and the stopping test are double precision throughout, so the search ends where it would have, at the same (unique)
projection: on the benchmarks' 20k-voxel phantom within 7e-10 of the double-precision path's largest |y|, with 149.5
additions a voxel as before (a float64 prototype on 60 of them: ~130 chosen in single precision, ~22 in double). The
update reads half the bytes of G's rows with twice the lanes per instruction (1.1 → 0.7 µs for 30 rows); the kernel
took 0.93× the time (median of nine alternating runs, one thread).

Kept in its own module so that ``import dwiflow.core`` never imports numba; compiled on first use, cached on disk.

Measured starts (one thread): on the benchmarks' phantom a voxel takes ~151 additions for ~43 constraints active at
its solution (on ../shared/data/bids_real sub-01 b1kb2k ~47 for ~38). Started from its own final active set, a voxel
takes none (34× faster), which SS3T-CSD's alternations use. No cheap predictor of that set was found: the neighbouring
voxel's set (real data: 47 → 39 additions, but 3.3 → 3.8 s, since the start's removals cost more than they save), the
constraints the unconstrained solution violates, or the negative set of a penalised CSD-like iteration (~190
candidates for ~43 active) were all slower, by up to 6×. Nor does the constraint update (~35 % of the time, m × k per
addition) pay to skip: adding the T most violated constraints of one update in turn, each re-checked in O(k) against
the current multipliers, takes more additions than it saves updates (T = 2, 4, 8: 181, 214, 251 additions for 151;
slower by 3–7 %), and stopping at a looser violation tolerance moves the solution at once (1e-10 relative to |y_u|: WM
up to 8e-6 of the voxel's largest coefficient; 1e-6: 1.4e-2), since ~250 of the 302 constraints lie within 1e-4 · |y|
of zero at the solution. Also slower: a coarse-to-fine start (the projection on 30–100 spread directions, then all 300
from its active set: 2–14 % slower, the last pass still 63–118 additions), the constraint values in single
precision to the end (at best 15 % faster, but the solution then off by up to 9e-4), and the update through B instead
of G (c = c_u + B·(B_Pᵀλ_P): m × n per addition whatever the active set's size, where G's rows cost m × k with k mostly
below n = 47 on the way to the solution; 1.4× the time with B's rows as dot products, 1.35× with Bᵀ's as AXPYs).
Nor does another path (a float64 prototype on 60 random voxels of that phantom, where this method takes 150 additions
and 108 removals for 42 active): adding the constraint whose violation is largest relative to its distance from the
active constraints' span (c_i / √(Schur complement), which costs a second m × k update per addition) takes 142;
preferring constraints that have not left before, 151 (~25 of a voxel's constraints enter more than once); a primal
active-set method, started from a feasible isotropic point (the best multiple of equal WM l=0, GM and CSF terms),
moves along the cone's surface and takes 397 additions and 353 removals.
Nor do block methods, which G's rank defeats (it is at most n = 47, for 302 constraints, and ~250 of them are near
zero at the solution, so the multipliers are not unique): block principal pivoting for this non-negative
least-squares problem (Kim & Park 2011, with Murty's single-pivot backup) did not converge in 100 iterations in any
of 15 voxels, its passive sets swinging between ~40 and ~180 constraints, and ADMM on the projection (ρ = 1 / mean
diag G, 25–200 iterations, 200 voxels) spreads its multipliers over ~200 constraints, so that they do not predict
this method's ~42.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

import dwiflow.core._numba_setup  # noqa: F401  (fork-safe threading layer)
from dwiflow.core.status import FitStatus

OK = int(FitStatus.OK)
NONFINITE_INPUT = int(FitStatus.NONFINITE_INPUT)
NOT_CONVERGED = int(FitStatus.NOT_CONVERGED)
SINGULAR = int(FitStatus.SINGULAR)

# voxels per block: the unit of the parallel loop, whose scratch arrays are allocated once per block
BLOCK = 32


@njit(cache=True, fastmath=True, inline="always")
def _append(gram, active, k, ridge, chol, inv_diag) -> bool:
    """Grow the factor of the first ``k`` active constraints by the one in ``active[k]``, and ``inv_diag`` (the
    reciprocals of its diagonal, by which every solve multiplies: no division in a chain of dependent steps)."""
    ak = active[k]
    s_diag = gram[ak, ak] + ridge
    for j in range(k):
        s = gram[ak, active[j]]
        for p in range(j):
            s -= chol[k, p] * chol[j, p]
        s *= inv_diag[j]
        chol[k, j] = s
        s_diag -= s * s
    if s_diag <= 1e-14 * (gram[ak, ak] + ridge):
        return False
    chol[k, k] = np.sqrt(s_diag)
    inv_diag[k] = 1.0 / chol[k, k]
    return True


@njit(cache=True, fastmath=True)
def _delete(chol, k, r, work, inv_diag) -> None:
    """Remove row and column ``r`` from the factor of a k×k matrix: the rows below move up one and their
    trailing block takes a rank-one update with the removed column (Givens rotations, stable, O((k−r)²)).
    Row by row, so that every access is along a row; ``work`` holds 4·k scratch values. The rotated diagonal
    entries' reciprocals go to ``inv_diag``."""
    n = k - r - 1
    for i in range(n):
        work[i] = chol[r + 1 + i, r]
    for i in range(r + 1, k):
        source = chol[i]
        target = chol[i - 1]
        for j in range(r):
            target[j] = source[j]
        for j in range(r + 1, i + 1):
            target[j - 1] = source[j]
    cosines = work[n:2 * n]
    sines = work[2 * n:3 * n]
    inverse_cosines = work[3 * n:4 * n]
    for i in range(n):
        row = chol[r + i]
        w_i = work[i]
        for j in range(i):
            value = (row[r + j] + sines[j] * w_i) * inverse_cosines[j]
            w_i = cosines[j] * w_i - sines[j] * value
            row[r + j] = value
        d = row[r + i]
        radius = np.sqrt(d * d + w_i * w_i)
        inverse_d = 1.0 / d
        cosines[i] = radius * inverse_d
        inverse_radius = 1.0 / radius
        inverse_cosines[i] = d * inverse_radius
        sines[i] = w_i * inverse_d
        row[r + i] = radius
        inv_diag[r + i] = inverse_radius


@njit(cache=True, fastmath=True, inline="always")
def _solve(chol, k, rhs, forward, valid, out, inv_diag) -> None:
    """out = (L Lᵀ)⁻¹ rhs for the first ``k`` entries (``inv_diag``: 1 / L's diagonal). ``forward`` holds
    w = L⁻¹ rhs, of which the first ``valid`` entries are still right (rows of L and entries of rhs above them
    unchanged): only the others are recomputed."""
    for i in range(valid, k):
        s = rhs[i]
        for p in range(i):
            s -= chol[i, p] * forward[p]
        forward[i] = s * inv_diag[i]
    for i in range(k):
        out[i] = forward[i]
    # Lᵀ x = w by columns of Lᵀ (rows of L): each step reads one row contiguously
    for i in range(k - 1, -1, -1):
        out[i] *= inv_diag[i]
        value = out[i]
        row = chol[i]
        for p in range(i):
            out[p] -= row[p] * value


@njit(cache=True, fastmath=True)
def _constraint_values(c_u, gram, active, k, lam, c, weights) -> None:
    """c = c_u + Σ_j λ_j G[a_j, :] over the active set (four rows of G per pass over c), in the precision of
    ``c_u``, ``gram`` and ``c``: the multipliers are rounded to it through ``weights`` (four values of that type),
    so that single precision reads half the bytes of G's rows and fills twice the lanes per instruction."""
    m = c_u.size
    for i in range(m):
        c[i] = c_u[i]
    j = 0
    while j + 3 < k:
        for q in range(4):
            weights[q] = lam[active[j + q]]
        w0, w1, w2, w3 = weights[0], weights[1], weights[2], weights[3]
        r0, r1, r2, r3 = gram[active[j]], gram[active[j + 1]], gram[active[j + 2]], gram[active[j + 3]]
        for i in range(m):
            c[i] += w0 * r0[i] + w1 * r1[i] + w2 * r2[i] + w3 * r3[i]
        j += 4
    while j < k:
        weights[0] = lam[active[j]]
        weight = weights[0]
        row = gram[active[j]]
        for i in range(m):
            c[i] += weight * row[i]
        j += 1


@njit(cache=True, fastmath=True, inline="always")
def _most_violated(c, in_set, limit) -> int:
    """Index of the smallest constraint value below ``limit`` (a value of ``c``'s type) among the constraints not
    in the active set, or -1: the constraint Lawson–Hanson adds next."""
    worst = -1
    for i in range(c.size):
        if not in_set[i] and c[i] < limit:
            limit = c[i]
            worst = i
    return worst


@njit(cache=True, fastmath=True)
def _project(c_u, gram, ridge, max_iterations, tolerance, lam, active, chol, rhs, forward, z, c, in_set, work,
             inv_diag, start, n_start, gram_single, c_u_single, c_single, weights, weights_single, coarse_tolerance):
    """Lawson–Hanson on the dual of one voxel. Fills ``lam`` (all constraints); returns (status, iterations).

    Cold (``n_start`` 0), it starts from λ = 0. Otherwise from the constraints ``start[:n_start]`` (the active set
    of a problem of the same voxel solved before, e.g. SS3T-CSD's previous alternation): their block is factored
    (a constraint dependent on those before it is left out), and while a multiplier of the block's solution is not
    positive the most negative one leaves, so that Lawson–Hanson continues from a feasible point of its own path.
    Either way it stops only where every constraint holds, so both reach the same (unique) projection; a voxel's
    start is its own earlier result, never a neighbour's.

    Started cold with ``coarse_tolerance`` above ``tolerance``, it first chooses each constraint to add from single-
    precision constraint values (``c_single``: ``c_u`` rounded to ``c_u_single``, updated through ``gram_single``),
    among those violated by more than ``coarse_tolerance``. Once none is, or should a constraint just added leave at
    once (which single-precision rounding can cause), it recomputes the values in double precision and continues
    there as before: the solution, and when the search stops, are decided in double precision only."""
    m = c_u.size
    for i in range(m):
        lam[i] = 0.0
        in_set[i] = False
        c[i] = c_u[i]
    k = 0
    valid = 0  # leading entries of ``forward`` (L⁻¹ of the right-hand side) that the factor's changes left intact
    for q in range(n_start):
        active[k] = start[q]
        if _append(gram, active, k, ridge, chol, inv_diag):
            in_set[start[q]] = True
            k += 1
    while k > 0:
        for i in range(valid, k):
            rhs[i] = -c_u[active[i]]
        _solve(chol, k, rhs, forward, valid, z, inv_diag)
        valid = k
        worst = -1
        worst_value = 0.0
        for i in range(k):
            if z[i] <= worst_value:
                worst_value = z[i]
                worst = i
        if worst < 0:
            for i in range(k):
                lam[active[i]] = z[i]
            _constraint_values(c_u, gram, active, k, lam, c, weights)
            break
        in_set[active[worst]] = False
        _delete(chol, k, worst, work, inv_diag)
        for p in range(worst + 1, k):
            active[p - 1] = active[p]
        k -= 1
        valid = min(valid, worst)
    iterations = 0
    single = n_start == 0 and coarse_tolerance > tolerance
    if single:
        for i in range(m):
            c_u_single[i] = c_u[i]
            c_single[i] = c_u_single[i]
    while True:
        worst = -1
        if single:
            worst = _most_violated(c_single, in_set, np.float32(-coarse_tolerance))
            if worst < 0:
                # none violated beyond the coarse tolerance: on from exact values
                single = False
                _constraint_values(c_u, gram, active, k, lam, c, weights)
        if not single:
            worst = _most_violated(c, in_set, -tolerance)
        if worst < 0:
            return OK, iterations
        if iterations >= max_iterations:
            return NOT_CONVERGED, iterations
        iterations += 1
        active[k] = worst
        if not _append(gram, active, k, ridge, chol, inv_diag):
            # linearly dependent on the active set (within rounding): nothing more to gain
            return OK, iterations
        in_set[worst] = True
        k += 1
        while True:
            for i in range(valid, k):
                rhs[i] = -c_u[active[i]]
            _solve(chol, k, rhs, forward, valid, z, inv_diag)
            valid = k
            feasible = True
            for i in range(k):
                if z[i] <= 0.0:
                    feasible = False
                    break
            if feasible:
                for i in range(k):
                    lam[active[i]] = z[i]
                break
            # step from the current multipliers towards z until the first one reaches 0
            alpha = 1.0
            for i in range(k):
                if z[i] <= 0.0:
                    current = lam[active[i]]
                    step = current / (current - z[i])
                    if step < alpha:
                        alpha = step
            removed_new = False
            i = 0
            while i < k:
                a = active[i]
                value = lam[a] + alpha * (z[i] - lam[a])
                if value <= 1e-15 * (1.0 + abs(lam[a])) or (z[i] <= 0.0 and value <= 0.0):
                    lam[a] = 0.0
                    in_set[a] = False
                    if a == worst:
                        removed_new = True
                    _delete(chol, k, i, work, inv_diag)
                    for p in range(i + 1, k):
                        active[p - 1] = active[p]
                        z[p - 1] = z[p]
                    k -= 1
                    valid = min(valid, i)
                else:
                    lam[a] = value
                    i += 1
            if removed_new and single:
                # perhaps chosen on rounding: finish this step, then go on from exact values
                single = False
            elif removed_new:
                # the constraint just added cannot become active (degenerate step): stop, as MRtrix3's
                # solver does when its active set does not change
                return OK, iterations
            if k == 0:
                break
        # constraint values at the new solution (G is symmetric: rows are read contiguously)
        if single:
            _constraint_values(c_u_single, gram_single, active, k, lam, c_single, weights_single)
        else:
            _constraint_values(c_u, gram, active, k, lam, c, weights)


@njit(cache=True, parallel=True)
def solve_msmt(unconstrained, constraint_values, constraints, gram, ridge, max_iterations, tolerance,
               out, status, iterations, starts, finals, gram_single, coarse_tolerance):
    """Project every voxel's unconstrained solution (rows of ``unconstrained``, y_u in the whitened coordinates) onto
    the cone {y : B y >= 0}; the projections go to ``out`` (the caller maps them back to coefficients).

    ``constraint_values`` holds B y_u per voxel, ``constraints`` is B (rows normalised), ``gram`` is BBᵀ. Both
    products with the data are the caller's (one BLAS product per chunk, on the threads the caller's BLAS limit
    allows): the kernel itself calls no BLAS. ``starts`` (voxels × constraints, True where active) holds each
    voxel's starting active set, or has no rows (every voxel starts cold); ``finals`` receives the active sets
    found, unless it has no rows. A voxel whose unconstrained solution is not finite gets NONFINITE_INPUT and NaN.
    ``gram_single`` is G in single precision and ``coarse_tolerance`` the violation, relative to |y_u| like
    ``tolerance``, down to which a cold start chooses its constraints on single-precision values (see
    :func:`_project`; 0: never).
    """
    nvox = unconstrained.shape[0]
    m, n = constraints.shape
    nblocks = (nvox + BLOCK - 1) // BLOCK
    for b in prange(nblocks):
        start = b * BLOCK
        stop = min(start + BLOCK, nvox)
        lam = np.zeros(m)
        active = np.zeros(m, dtype=np.int64)
        chol = np.empty((m, m))
        rhs = np.zeros(m)
        forward = np.zeros(m)
        z = np.zeros(m)
        c = np.zeros(m)
        in_set = np.zeros(m, dtype=np.bool_)
        work = np.empty(4 * m)
        inv_diag = np.empty(m)
        first = np.zeros(m, dtype=np.int64)
        c_u_single = np.zeros(m, dtype=np.float32)
        c_single = np.zeros(m, dtype=np.float32)
        weights = np.zeros(4)
        weights_single = np.zeros(4, dtype=np.float32)
        for v in range(start, stop):
            y_u = unconstrained[v]
            y = out[v]
            finite = True
            scale = 0.0
            for p in range(n):
                if not np.isfinite(y_u[p]):
                    finite = False
                    break
                scale += y_u[p] * y_u[p]
            if not finite:
                status[v] = NONFINITE_INPUT
                for p in range(n):
                    y[p] = np.nan
                continue
            n_first = 0
            if starts.shape[0] > 0:
                for i in range(m):
                    if starts[v, i]:
                        first[n_first] = i
                        n_first += 1
            norm = np.sqrt(scale)
            st, it = _project(constraint_values[v], gram, ridge, max_iterations, tolerance * norm, lam, active, chol,
                              rhs, forward, z, c, in_set, work, inv_diag, first, n_first, gram_single, c_u_single,
                              c_single, weights, weights_single, coarse_tolerance * norm)
            status[v] = st
            iterations[v] = it
            if finals.shape[0] > 0:
                for i in range(m):
                    finals[v, i] = lam[i] > 0.0
            for p in range(n):
                y[p] = y_u[p]
            for i in range(m):
                if lam[i] != 0.0:
                    for p in range(n):
                        y[p] += lam[i] * constraints[i, p]
