"""Per-voxel fit status: the one enum every model reports with, and the input checks they share.

Every fit holds a ``status`` array (uint8, shaped like the input volume): 0 where the voxel's
estimate is usable, otherwise the code of the first thing that went wrong. Estimates of a voxel
with a non-zero status are NaN. The texts below are what the JSON sidecars of status maps list
under ``Levels``; each model declares which codes it can produce (its ``STATUS_CODES``).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Iterable, Mapping

import numpy as np


class FitStatus(IntEnum):
    """Why a voxel has no usable estimate (0: it has one)."""

    OK = 0
    NONFINITE_INPUT = 1
    NO_SIGNAL = 2
    SINGULAR = 3
    SOLVER_FAILED = 4
    NOT_CONVERGED = 5
    NO_SOLUTION = 6
    SIGNAL_ABOVE_B0 = 7
    NON_PHYSICAL = 8
    ON_SEARCH_BOUND = 9

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    FitStatus.OK: "ok",
    FitStatus.NONFINITE_INPUT: "non-finite input signal",
    FitStatus.NO_SIGNAL: "no positive signal (b=0 mean, or every sample, not above 0)",
    FitStatus.SINGULAR: "singular least-squares system",
    FitStatus.SOLVER_FAILED: "the constrained solver found no solution",
    FitStatus.NOT_CONVERGED: "did not converge within the iteration limit",
    FitStatus.NO_SOLUTION: "no non-negative solution (every fraction zero)",
    FitStatus.SIGNAL_ABOVE_B0: "diffusion-weighted signal above the b=0 signal on average (non-physical)",
    FitStatus.NON_PHYSICAL: "non-physical estimate",
    FitStatus.ON_SEARCH_BOUND: "a parameter on a bound of its search range that is not a physical limit (not "
                               "determined by the data)",
}


def status_levels(codes: Iterable[FitStatus], details: Mapping[FitStatus, str] | None = None) -> dict[str, str]:
    """Sidecar ``Levels`` of a status map: ``{"0": "ok", "1": ...}`` for the given codes, in code order.

    ``details`` says what a code means for the model at hand (its ``STATUS_DETAILS``: which estimate counts as
    non-physical, for instance); it is added to the shared description in parentheses.
    """
    details = details or {}
    levels = {}
    for code in sorted(set(codes) | {FitStatus.OK}):
        text = FitStatus(code).description
        levels[str(int(code))] = f"{text} ({details[code]})" if code in details else text
    return levels


def input_status(signal: np.ndarray, b0s_mask: np.ndarray) -> np.ndarray:
    """Status of signals (n, n_volumes) before fitting: non-finite input, no positive mean b=0 signal, or a
    mean diffusion-weighted signal above the mean b=0 (non-physical: diffusion only attenuates).

    The check shared by the models that normalise by the mean b=0 signal (MAP-MRI, RUMBA-SD, SMT; the
    tensor applies the last rule too); usable voxels get ``FitStatus.OK``.
    """
    status = np.zeros(signal.shape[0], dtype=np.uint8)
    finite = np.all(np.isfinite(signal), axis=1)
    status[~finite] = FitStatus.NONFINITE_INPUT
    positive = np.zeros_like(finite)
    positive[finite] = signal[finite][:, b0s_mask].mean(axis=1) > 0
    status[finite & ~positive] = FitStatus.NO_SIGNAL
    status[finite & positive & signal_above_b0(signal, b0s_mask)] = FitStatus.SIGNAL_ABOVE_B0
    return status


def signal_above_b0(signal: np.ndarray, b0s_mask: np.ndarray, volume_axis: int = 1) -> np.ndarray:
    """Voxels whose mean diffusion-weighted signal exceeds their mean b=0 signal (False without b=0 or DW volumes):
    rows of (n, n_volumes) signals, or columns of (n_volumes, n) ones with ``volume_axis=0`` (means in float64)."""
    if not b0s_mask.any() or b0s_mask.all():
        return np.zeros(signal.shape[1 - volume_axis], dtype=bool)
    with np.errstate(invalid="ignore"):
        return (np.compress(~b0s_mask, signal, axis=volume_axis).mean(axis=volume_axis, dtype=np.float64)
                > np.compress(b0s_mask, signal, axis=volume_axis).mean(axis=volume_axis, dtype=np.float64))
