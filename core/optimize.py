"""Bounded Levenberg–Marquardt for many small least-squares problems at once.

Each row of the parameter array is one voxel's problem; every step of every active voxel is
computed together (stacked p×p systems), and a voxel leaves the iterations once it has
converged. Used by the SMT kernel, the Watson, Bingham and multi-Watson FOD fits.

References
----------
Levenberg K. A method for the solution of certain non-linear problems in least squares.
Q Appl Math 2 (1944) 164-168. Marquardt D.W. An algorithm for least-squares estimation of
nonlinear parameters. J Soc Ind Appl Math 11 (1963) 431-441.
Bertsekas D.P. Projected Newton methods for optimization problems with simple constraints.
SIAM J Control Optim 20 (1982) 221-246 (holding a bound whose descent points outward).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def damped_gauss_newton_step(jac: np.ndarray, residual: np.ndarray, damping: np.ndarray,
                             bounded: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Levenberg–Marquardt steps for many small problems at once: (JᵀJ + λ diag(JᵀJ)) δ = -Jᵀr.

    ``jac`` (v, m, p), ``residual`` (v, m), ``damping`` (v,) → δ (v, p). With ``bounded`` =
    (params, low, high), a parameter that sits on a bound and whose descent direction points out
    of the box is held there (its Jacobian column dropped), so the others take a full step instead of
    one that clipping would spoil (the active-set rule of projected Gauss–Newton).
    """
    n_p = jac.shape[-1]
    if bounded is not None:
        params, low, high = bounded
        descent = -np.einsum("vsi,vs->vi", jac, residual)
        held = ((params <= low) & (descent < 0)) | ((params >= high) & (descent > 0))
        jac = np.where(held[:, None, :], 0.0, jac)
    normal = np.einsum("vsi,vsj->vij", jac, jac)
    gradient = np.einsum("vsi,vs->vi", jac, residual)
    diag = np.einsum("vii->vi", normal)
    system = normal + damping[:, None, None] * (np.eye(n_p) * (diag[:, None, :] + 1e-12))
    return -np.linalg.solve(system, gradient[..., None])[..., 0]


@dataclass
class LeastSquaresResult:
    """Per-row result of :func:`bounded_levenberg_marquardt`.

    Attributes
    ----------
    params : ndarray (n, p)
    rss : ndarray (n,)
        Residual sum of squares at ``params``.
    converged : ndarray (n,) of bool
        False where the iteration limit was reached before the convergence test passed.
    """

    params: np.ndarray
    rss: np.ndarray
    converged: np.ndarray


def bounded_levenberg_marquardt(
    predict: Callable[[np.ndarray, np.ndarray | slice], np.ndarray],
    params: np.ndarray,
    y: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    iterations: int,
    *,
    jacobian: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    step: float = 1e-5,
    scale: np.ndarray | None = None,
    relative_gain: float = 1e-10,
    stop_on_zero_step: bool = False,
) -> LeastSquaresResult:
    """Levenberg–Marquardt for the rows of ``params`` (each row one problem) within [low, high].

    Parameters
    ----------
    predict : callable
        ``predict(params, rows)`` → the model (r, m) for those rows of the problem (``rows`` an index
        array, or ``slice(None)`` for all).
    params : ndarray (n, p)
        Starting points.
    y : ndarray (n, m)
        Data.
    low, high : ndarray (p,)
        Bounds (±inf for none); trial points are clipped to them.
    iterations : int
        Iteration limit.
    jacobian : callable, optional
        ``jacobian(params, rows)`` → (r, m, p) analytic derivatives; otherwise central differences
        with ``step``.
    scale : ndarray (p,), optional
        Parameter scales: steps are computed for ``params / scale`` (e.g. the width of the box).
    relative_gain : float
        A row has converged when an accepted step lowers its residual by at most this fraction.
    stop_on_zero_step : bool
        Also stop a row whose rejected step is below 1e-12 of ``scale`` in every parameter.

    A row also stops when its damping saturates (1e12): no descent is left to find.
    """
    params = params.copy()
    n, n_params = params.shape
    residual = predict(params, slice(None)) - y
    rss = (residual**2).sum(1)
    damping = np.full(n, 1e-3)
    converged = np.zeros(n, dtype=bool)
    active = np.arange(n)
    for _ in range(iterations):
        if not active.size:
            break
        p_a, r_a, d_a = params[active], residual[active], damping[active]
        if jacobian is not None:
            jac = jacobian(p_a, active)
        else:
            jac = np.empty(r_a.shape + (n_params,))
            for q in range(n_params):
                up, down = p_a.copy(), p_a.copy()
                up[:, q] += step
                down[:, q] -= step
                jac[..., q] = (predict(up, active) - predict(down, active)) / (2 * step)
        try:
            if scale is None:
                delta = damped_gauss_newton_step(jac, r_a, d_a, (p_a, low, high))
            else:
                delta = damped_gauss_newton_step(jac * scale, r_a, d_a, (p_a, low, high)) * scale
        except np.linalg.LinAlgError:
            break
        trial = np.clip(p_a + delta, low, high)
        trial_residual = predict(trial, active) - y[active]
        trial_rss = (trial_residual**2).sum(1)
        better = trial_rss < rss[active]
        gain = np.where(better, rss[active] - trial_rss, 0.0)
        idx = active[better]
        params[idx], residual[idx], rss[idx] = trial[better], trial_residual[better], trial_rss[better]
        damping[active] = np.clip(np.where(better, d_a * 0.3, d_a * 10.0), 1e-12, 1e12)
        done = (better & (gain <= relative_gain * np.maximum(rss[active], 1e-30))) | (damping[active] >= 1e12)
        if stop_on_zero_step:
            done |= (~better) & (np.abs(delta) <= 1e-12 * (1.0 if scale is None else scale)).all(axis=1)
        converged[active[done]] = True
        active = active[~done]
    return LeastSquaresResult(params, rss, converged)


def fit_in_chunks(fit_chunk, n_rows: int, chunk_size: int, result_type, per_row: dict, **options):
    """Run ``fit_chunk`` on consecutive chunks of rows (bounded memory) and join the results.

    ``per_row``: arguments sliced per chunk (None passes through); ``result_type``: a dataclass whose
    fields are all per-row arrays.
    """
    from dataclasses import fields

    from dwiflow.core.voxels import iter_chunks

    parts = []
    for sl in iter_chunks(n_rows, chunk_size):
        sliced = {k: (None if v is None else v[sl]) for k, v in per_row.items()}
        parts.append(fit_chunk(**sliced, **options))
    return result_type(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(result_type)))
