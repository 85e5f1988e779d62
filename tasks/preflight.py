"""Pre-flight: every selected run's files read and checked, against the recon spec, before anything runs.

The BIDS App calls :func:`check_runs` before it submits or writes anything. Each run's DWI is read
whole (a truncated or corrupt ``.nii.gz`` is found here, not in a stage), its gradients are read
and matched to its volumes (b-value units included), its JSON sidecar parsed, its mask matched to
its grid, and the data checked against what each stage of the recon spec needs (b=0 volumes, the
number of shells, Δ/δ). Each problem is one line naming the run and the file or recon-spec key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dwiflow.core.errors import DwiflowInputError
from dwiflow.tasks.io import load_dwi, load_mask, read_sidecar
from dwiflow.tasks.options import render_error


@dataclass(frozen=True)
class DataSummary:
    """What the stages' data checks look at: volumes, shells (b-value, directions), b=0 count, Δ/δ."""

    n_volumes: int
    n_b0: int
    shells: tuple[tuple[float, int], ...]  # diffusion-weighted shells: (b-value, volumes)
    has_diffusion_times: bool
    mask_given: bool
    sidecar: dict[str, Any] = field(default_factory=dict)

    @property
    def n_dw_shells(self) -> int:
        return len(self.shells)


def summarise(run_dwi: Path, run_bval: Path, run_bvec: Path, mask: Path | None) -> DataSummary:
    """Read a run whole and check it; raises :class:`DwiflowInputError` naming the file at fault."""
    sidecar = read_sidecar(run_dwi) or {}
    if not isinstance(sidecar, dict):
        raise DwiflowInputError(f"the sidecar of {Path(run_dwi).name} does not hold a JSON object")
    run = load_dwi(run_dwi, run_bval, run_bvec)
    finite = np.isfinite(run.data)
    if not finite.any() or not np.any(run.data[finite] != 0):
        raise DwiflowInputError(f"DWI {run_dwi} holds no signal (every value is zero or not finite)")
    if mask is not None:
        load_mask(mask, run.data.shape[:3], run.affine)
    dw = tuple((float(s.bvalue), int(s.count)) for s in run.gtab.shells if not s.is_b0)
    return DataSummary(int(run.gtab.n_volumes), int(run.gtab.b0s_mask.sum()), dw,
                       "LargeDelta" in sidecar and "SmallDelta" in sidecar, mask is not None, sidecar)


def check_run(label: str, dwi: Path, bval: Path, bvec: Path, mask: Path | None, spec) -> list[str]:
    """Problems of one run for a recon spec (empty when it can run), one line each."""
    try:
        data = summarise(dwi, bval, bvec, mask)
    except DwiflowInputError as exc:
        return [f"{label}: {exc}"]
    problems = []
    for name, configured in spec.stages.items():
        stage = configured.stage
        if stage.check_data is None or ("mask" in stage.provides and data.mask_given):
            continue
        try:
            stage.check_data(data, configured.options)
        except DwiflowInputError as exc:
            prefix = f"stages.{name}.options." if stage.method is not None else f"stages.{name}."
            problems.append(f"{label}: stage {name}: {render_error(exc, lambda option: prefix + option)}")
    return problems


def check_runs(runs, spec) -> dict[str, list[str]]:
    """Problems per run label (runs without problems are absent)."""
    found = {}
    for run in runs:
        problems = check_run(run.label, run.dwi, run.bval, run.bvec, run.mask, spec)
        if problems:
            found[run.label] = problems
    return found
