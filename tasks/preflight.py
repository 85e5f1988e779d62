"""Pre-flight: every selected run's files read and checked, against the recon spec, before anything runs.

The BIDS App calls :func:`check_runs` before it submits or writes anything. Each run's DWI is read
whole (a truncated or corrupt ``.nii.gz`` is found here, not in a stage), its gradients are read
and matched to its volumes (b-value units included), its JSON sidecar parsed, its mask matched to
its grid, and the data checked against what each stage of the recon spec needs (b=0 volumes, the
number of shells, Δ/δ). Each problem is one line naming the run and the file or recon-spec key.
"""

from __future__ import annotations

from functools import lru_cache

from dataclasses import dataclass, field, replace
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
    shape: tuple[int, ...] = ()  # the image's spatial dimensions (empty when not known)
    # what the run's stages are handed besides the run's own files (kinds: response_gm, fod …), when a recon spec is
    # being checked: e.g. how many tissue responses a multi-tissue deconvolution will get
    provided: frozenset[str] = frozenset()

    @property
    def n_dw_shells(self) -> int:
        return len(self.shells)

    @property
    def bvalues(self) -> list[float]:
        """The run's distinct b-values, b=0 first when it has b=0 volumes."""
        return ([0.0] if self.n_b0 else []) + [b for b, _ in self.shells]


def _holds_signal(data: np.ndarray) -> bool:
    """Whether any value is finite and not zero (volume by volume: the first volume with signal ends the search)."""
    for volume in range(data.shape[-1]):
        values = data[..., volume]
        if np.any(np.isfinite(values) & (values != 0)):
            return True
    return False


def summarise(run_dwi: Path, run_bval: Path, run_bvec: Path, mask: Path | None) -> DataSummary:
    """Read a run whole and check it; raises :class:`DwiflowInputError` naming the file at fault."""
    sidecar = read_sidecar(run_dwi) or {}
    if not isinstance(sidecar, dict):
        raise DwiflowInputError(f"the sidecar of {Path(run_dwi).name} does not hold a JSON object")
    run = load_dwi(run_dwi, run_bval, run_bvec)
    if not _holds_signal(run.data):
        raise DwiflowInputError(f"DWI {run_dwi} holds no signal (every value is zero or not finite)")
    if mask is not None:
        load_mask(mask, run.data.shape[:3], run.affine)
    return summary_of(run.gtab, sidecar, mask is not None, run.data.shape[:3])


def summary_of(gtab, sidecar: dict[str, Any] | None, mask_given: bool, shape: tuple[int, ...] = ()) -> DataSummary:
    """The :class:`DataSummary` of a run's gradient table and sidecar (what a stage's data checks look at)."""
    sidecar = sidecar if isinstance(sidecar, dict) else {}
    dw = tuple((float(s.bvalue), int(s.count)) for s in gtab.shells if not s.is_b0)
    return DataSummary(int(gtab.n_volumes), int(gtab.b0s_mask.sum()), dw,
                       "LargeDelta" in sidecar and "SmallDelta" in sidecar, mask_given, sidecar,
                       tuple(int(n) for n in shape))


def stage_data_warnings(stage, data: DataSummary, options) -> list[str]:
    """What ``stage`` warns about ``data`` (its ``data_warnings``; none when it declares none)."""
    if stage.data_warnings is None:
        return []
    return list(stage.data_warnings(data, options))


@dataclass(frozen=True)
class GroupResponses:
    """One set of group responses (the group level writes one per set of b-values of the runs): the b-values,
    the file per tissue (``wm`` always; ``gm``, ``csf`` as the recon spec consumes them)."""

    bvalues: tuple[float, ...]
    files: dict[str, Path]


def group_responses_for(folder: Path, spec, what: str = "--response-dir") -> list[GroupResponses]:
    """The group responses in ``folder`` (names from ``bids_specs/outputs.yaml``) that ``spec`` consumes, one set per
    set of b-values; raises :class:`DwiflowInputError` when the folder, the spec or the files do not fit (``what``
    names where the folder was given). :func:`responses_for_run` picks a run's set."""
    from dwiflow.bids_specs.outputs import WILDCARDS, output_filename
    from dwiflow.tasks.group import shells_label

    folder = Path(folder).resolve()  # the runs' workflows read the files from their own working folders
    if not folder.is_dir():
        raise DwiflowInputError(f"{what} {folder}: not a folder")
    wanted = [t for t in ("wm", "gm", "csf")
              if any(i.kind == f"response_{t}" for c in spec.stages.values() for i in c.stage.inputs)]
    if not wanted:
        raise DwiflowInputError(f"{what}: recon spec {spec.name} deconvolves with no multi-tissue response "
                                "(use recon spec msmt for multi-shell data, ss3t for single-shell data)")
    found = []
    for wm in sorted(folder.glob(output_filename("group_response_wm", {}, WILDCARDS))):
        bvalues = _response_bvalues(wm)  # readable, or a one-line error
        label = "" if wm.name == output_filename("group_response_wm", {}, {"shells": ""}) else shells_label(bvalues)
        if wm.name != output_filename("group_response_wm", {}, {"shells": label}):
            continue  # not a name the group level writes
        files = {"wm": wm}
        for tissue in (t for t in wanted if t != "wm"):
            path = folder / output_filename(f"group_response_{tissue}", {}, {"shells": label})
            if path.is_file():
                _response_bvalues(path)
                files[tissue] = path
        found.append(GroupResponses(bvalues, files))
    if not found:
        raise DwiflowInputError(f"{what} {folder}: no {output_filename('group_response_wm', {}, {'shells': ''})} (run "
                                "`dwiflow BIDS OUT group` after a participant run with recon spec msmt)")
    return found


@lru_cache(maxsize=8)
def _response_bvalues(path: Path) -> tuple[float, ...]:
    """The b-values a response file is for (read once, however many runs are checked against it)."""
    from dwiflow.core.response import ResponseFunction
    from dwiflow.tasks.io import read_text

    return tuple(ResponseFunction.from_text(read_text(path, "response"), str(path)).bvalues)


def responses_for_run(label: str, data: DataSummary, sets: list[GroupResponses]) -> dict[str, Path] | str:
    """The group responses (by tissue) whose b-values are the run's, or a one-line problem naming both sets."""
    from dwiflow.core.response import same_shells

    shells = data.bvalues
    for candidate in sets:
        if same_shells(candidate.bvalues, shells) and all(same_shells(_response_bvalues(p), shells)
                                                          for p in candidate.files.values()):
            return candidate.files
    theirs = "; ".join(f"{c.files['wm']} (b={', '.join(f'{b:.0f}' for b in c.bvalues)})" for c in sets)
    return (f"{label}: its b-values {', '.join(f'{b:.0f}' for b in shells)} do not match the group response"
            f"{'s' if len(sets) > 1 else ''} {theirs}")


def check_run(label: str, dwi: Path, bval: Path, bvec: Path, mask: Path | None, spec,
              responses: list[GroupResponses] | None = None, warnings: list[str] | None = None,
              chosen: dict[str, dict[str, Path]] | None = None) -> list[str]:
    """Problems of one run for a recon spec (empty when it can run), one line each; what its stages warn about
    the data is appended to ``warnings`` (``stage <name>: <note>``); the group responses that match the run's
    b-values go into ``chosen[label]``."""
    import warnings as python_warnings

    with python_warnings.catch_warnings(record=True) as caught:  # what reading the files warns about (a bvec
        python_warnings.simplefilter("always")                   # stored n x 3 …): a warning of the run
        try:
            data = summarise(dwi, bval, bvec, mask)
        except DwiflowInputError as exc:
            return [f"{label}: {exc}"]
    if warnings is not None:
        warnings.extend(str(w.message) for w in caught if issubclass(w.category, UserWarning))
    problems = []
    given: set[str] = set()
    if responses:
        match = responses_for_run(label, data, responses)
        if isinstance(match, str):
            problems.append(match)
        else:
            given = {f"response_{tissue}" for tissue in match}
            if chosen is not None:
                chosen[label] = match
    provided = given | {kind for c in spec.stages.values() for kind in c.stage.provided(c.options)}
    data = replace(data, provided=frozenset(provided))
    for name, configured in spec.stages.items():
        stage = configured.stage
        if stage.check_data is None or ("mask" in stage.provides and data.mask_given):
            continue
        try:
            stage.check_data(data, configured.options)
        except DwiflowInputError as exc:
            prefix = f"stages.{name}.options." if stage.method is not None else f"stages.{name}."
            problems.append(f"{label}: stage {name}: {render_error(exc, lambda option: prefix + option)}")
    if warnings is not None:
        for name, configured in spec.stages.items():
            warnings.extend(f"stage {name}: {note}"
                            for note in stage_data_warnings(configured.stage, data, configured.options))
    return problems


def check_runs(runs, spec, responses: list[GroupResponses] | None = None,
               warnings: dict[str, list[str]] | None = None,
               chosen: dict[str, dict[str, Path]] | None = None) -> dict[str, list[str]]:
    """Problems per run label (runs without problems are absent); the stages' data warnings per run label go
    into ``warnings``, and each run's group responses (those of its b-values) into ``chosen``, when given."""
    found = {}
    for run in runs:
        notes: list[str] = []
        problems = check_run(run.label, run.dwi, run.bval, run.bvec, run.mask, spec, responses, notes, chosen)
        if problems:
            found[run.label] = problems
        if warnings is not None and notes:
            warnings[run.label] = notes
    return found
