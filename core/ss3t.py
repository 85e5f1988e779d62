"""Single-shell three-tissue CSD (SS3T-CSD; Dhollander and Connelly 2016), as MRtrix3Tissue's ``ss3t_csd_beta1``.

From b=0 and one diffusion-weighted shell, three tissues cannot be fitted at once (two b-values separate two
tissues). SS3T-CSD alternates two-tissue multi-tissue CSD fits, each on the signal less the third tissue's:

0. GM + CSF (isotropic) on the data;
1. for each iteration: WM (FOD, lmax 8) + GM on the data less the CSF signal of the previous step, then GM + CSF on
   the data less the WM signal just fitted.

The b=0 volumes are weighted so that together they count ``bzero_pct`` per cent of the diffusion-weighted volumes
(their data and the responses' b=0 rows times √(n_dw · pct / (n_b0 · 100))). Every fit is MRtrix3's ``dwi2fod
msmt_csd`` (:class:`~dwiflow.core.msmt_csd.MsmtCsdModel`); the outputs are the WM FOD of the last WM + GM step
and the GM and CSF of the last GM + CSF step, as in ``ss3t_csd_beta1`` (defaults: 3 iterations, 10 per cent).
Each WM + GM fit starts every voxel's solver from that voxel's active set of the WM + GM fit before it: the data
change little between alternations, so it needs a fraction of the iterations, and it reaches the same solution
(each fit's solution is unique).

References
----------
Dhollander T., Connelly A. A novel iterative approach to reap the benefits of multi-tissue CSD from just
single-shell (+b=0) diffusion MRI data. Proc Intl Soc Mag Reson Med 24 (2016) 3010.
Jeurissen B., Tournier J.-D., Dhollander T., Connelly A., Sijbers J. Multi-tissue constrained spherical
deconvolution for improved analysis of multi-shell diffusion MRI data. NeuroImage 103 (2014) 411-426.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import GradientTable, checked_gradient_table
from dwiflow.core.msmt_csd import MsmtCsdModel
from dwiflow.core.response import ResponseFunction
from dwiflow.core.status import FitStatus
from dwiflow.core.voxels import VoxelBatch, scatter

DEFAULT_ITERATIONS = 3
DEFAULT_BZERO_PCT = 10.0
STATUS_CODES = (FitStatus.OK, FitStatus.NONFINITE_INPUT, FitStatus.NOT_CONVERGED, FitStatus.SOLVER_FAILED)


@dataclass
class Ss3tFit:
    """SS3T-CSD result: the WM FOD (…, 45; MRtrix3 basis), the GM and CSF compartments (…, 1) and the status."""

    wm: np.ndarray
    gm: np.ndarray
    csf: np.ndarray
    status: np.ndarray
    mask: np.ndarray


class Ss3tCsdModel:
    """SS3T-CSD (see the module docstring).

    Parameters
    ----------
    gtab : GradientTable
        b=0 volumes and exactly one diffusion-weighted shell.
    wm, gm, csf : ResponseFunction
        Two rows each (b=0, the shell), e.g. from ``dwi2response dhollander``; GM and CSF isotropic.
    iterations : int
        Alternations (≥ 2; ``ss3t_csd_beta1 -niter``).
    bzero_pct : float
        Weight of the b=0 volumes in per cent of the diffusion-weighted ones (``-bzero_pct``).
    lmax : int
        The WM FOD's lmax (8, as ``ss3t_csd_beta1``).
    """

    def __init__(self, gtab: GradientTable, wm: ResponseFunction, gm: ResponseFunction, csf: ResponseFunction,
                 iterations: int = DEFAULT_ITERATIONS, bzero_pct: float = DEFAULT_BZERO_PCT, lmax: int = 8) -> None:
        gtab = checked_gradient_table(gtab, "Ss3tCsdModel")
        dw_shells = [s for s in gtab.shells if not s.is_b0]
        if not gtab.b0s_mask.any() or len(dw_shells) != 1:
            have = ", ".join(f"{s.bvalue:.0f}" for s in gtab.shells)
            raise DwiflowInputError(f"SS3T-CSD needs b=0 and exactly one diffusion-weighted shell; these data have "
                                    f"b={have} (multi-shell data: multi-tissue CSD, recon spec msmt)")
        if int(iterations) != iterations or iterations < 2:
            raise DwiflowInputError(f"iterations must be an integer >= 2 (as ss3t_csd_beta1 -niter), got "
                                    f"{iterations!r}", parameters=("iterations",))
        if not bzero_pct > 0:
            raise DwiflowInputError(f"bzero_pct must be > 0, got {bzero_pct!r}", parameters=("bzero_pct",))
        for name, response, isotropic in (("WM", wm, False), ("GM", gm, True), ("CSF", csf, True)):
            if response.coefficients.shape[0] != 2:
                raise DwiflowInputError(f"the {name} response has {response.coefficients.shape[0]} rows: SS3T-CSD "
                                        "takes two, for b=0 and the shell", parameters=(name.lower(),))
            if isotropic and np.any(response.coefficients[:, 1:] != 0):
                raise DwiflowInputError(f"the {name} response must be isotropic (l=0 only)",
                                        parameters=(name.lower(),))
        decay = [float(np.log(r.coefficients[0, 0] / r.coefficients[1, 0])) if r.coefficients[1, 0] > 0 else np.inf
                 for r in (wm, gm, csf)]
        if not decay[0] <= decay[1] <= decay[2]:
            raise DwiflowInputError("the responses' signal decay metrics must order WM <= GM <= CSF (log of b=0 over "
                                    f"shell l=0 terms: {decay[0]:.3g}, {decay[1]:.3g}, {decay[2]:.3g})",
                                    parameters=("wm", "gm", "csf"))
        self.gtab, self.iterations, self.bzero_pct, self.lmax = gtab, int(iterations), float(bzero_pct), int(lmax)
        n_b0, n_dw = int(gtab.b0s_mask.sum()), int((~gtab.b0s_mask).sum())
        self.bzero_weight = float(np.sqrt(n_dw * self.bzero_pct / (n_b0 * 100.0)))
        weighted = [self._weighted(r) for r in (wm, gm, csf)]
        self._isotropic_pair = MsmtCsdModel(gtab, [weighted[1], weighted[2]], lmax=[0, 0])  # GM + CSF
        self._wm_pair = MsmtCsdModel(gtab, [weighted[1], weighted[0]], lmax=[0, self.lmax])  # GM + WM
        self.decay_metrics = decay

    def _weighted(self, response: ResponseFunction) -> ResponseFunction:
        coefficients = response.coefficients.copy()
        coefficients[0] *= self.bzero_weight  # the b=0 row (shells are sorted: b=0 first)
        return ResponseFunction(bvalues=response.bvalues, coefficients=coefficients, lmax=list(response.lmax),
                                metadata=dict(response.metadata))

    def fit(self, data: np.ndarray, mask: np.ndarray | None = None, progress=None) -> Ss3tFit:
        """Fit every voxel of ``data`` (…, volumes) in ``mask``; ``progress(done, total)`` after each of the
        1 + 2 × iterations multi-tissue fits."""
        batch = VoxelBatch.from_volume(data, mask, self.gtab.n_volumes)
        signal = batch.signal()
        signal[:, self.gtab.b0s_mask] *= self.bzero_weight
        steps, done = 1 + 2 * self.iterations, 0
        status = np.zeros(batch.n_voxels, dtype=np.uint8)

        def solve(model: MsmtCsdModel, values: np.ndarray, start: np.ndarray | None = None):
            nonlocal done
            fit = model.fit(values[:, None, None, :], start_active=start, keep_active=model is self._wm_pair)
            failed = fit.status_rows != FitStatus.OK
            status[failed & (status == FitStatus.OK)] = fit.status_rows[failed & (status == FitStatus.OK)]
            done += 1
            if progress is not None:
                progress(done, steps)
            return fit

        pair = solve(self._isotropic_pair, signal).coefficient_rows
        wm_columns = slice(*self._wm_pair.parameter_slices[1])
        active = None  # each WM + GM fit starts from the voxel's active set of the one before (the data change little)
        for _ in range(self.iterations):
            csf_signal = np.outer(pair[:, 1], self._isotropic_pair.forward[:, 1])
            wm_fit = solve(self._wm_pair, signal - csf_signal, active)
            active = wm_fit.active_rows
            wm = wm_fit.coefficient_rows[:, wm_columns]
            wm_signal = wm @ self._wm_pair.forward[:, wm_columns].T
            pair = solve(self._isotropic_pair, signal - wm_signal).coefficient_rows
        bad = status != FitStatus.OK
        wm, pair = wm.copy(), pair.copy()
        wm[bad], pair[bad] = np.nan, np.nan
        return Ss3tFit(wm=scatter(wm, batch), gm=scatter(pair[:, :1], batch), csf=scatter(pair[:, 1:], batch),
                       status=scatter(status, batch), mask=batch.mask)
