"""Helpers the stage modules share: provenance, loading inputs, writing a model's maps with sidecars.

Outputs are written atomically (all or nothing, :func:`dwiflow.tasks.io.atomic_outputs`) with
sidecars whose text comes from ``bids_specs/outputs.yaml`` under the stage's output keys.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from dwiflow._version import __version__
from dwiflow.bids_specs.outputs import entities_from_filename, output_filename, output_spec, sidecar
from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.status import status_levels
from dwiflow.tasks.io import (atomic_outputs, in_mrtrix3_basis, load_image, load_mask, read_sidecar, read_text,
                              sidecar_path)
from dwiflow.tasks.options import OptionError, StageOptions, option

if TYPE_CHECKING:
    from dwiflow.core.response import ResponseFunction

PathLike = str | os.PathLike


class MapOptions(StageOptions):
    """Options of a stage that writes the maps its ``maps`` list names (one command-line flag per map); a ``method``
    option, if any, is case-insensitive (WLS and OLS as command lines spelled them before)."""

    outputs_option = "maps"

    def __post_init__(self) -> None:
        if isinstance(getattr(self, "method", None), str):
            object.__setattr__(self, "method", self.method.lower())
        super().__post_init__()

    def check(self) -> None:
        if not self.maps:
            raise OptionError("{maps}: give at least one map", "maps")

    def writes(self):
        return self.maps


def tissue_response_sidecars(tissues: list[str], responses: list, shells: list[float], files) -> tuple[dict, dict]:
    """A multi-tissue fit's response sidecar keys: ``TissueResponses`` (every tissue's coefficients, shells and
    file) for all outputs, and per tissue output its own BEP016 ``ResponseFunction``."""
    every = {t.upper(): {"Coefficients": [[float(c) for c in row] for row in r.coefficients], "Type": "zsh",
                         "Shells": shells, "Source": Path(files[f"response_{t}"]).name}
             for t, r in zip(tissues, responses)}
    own = {t: {"ResponseFunction": {key: every[t.upper()][key] for key in ("Coefficients", "Type")}} for t in tissues}
    return every, own


def provenance(*sources: PathLike | None) -> dict[str, Any]:
    """``Sources`` (file names only: outputs must not depend on where inputs or the cache live) and ``GeneratedBy``."""
    return {
        "Sources": [Path(s).name for s in sources if s is not None],
        "GeneratedBy": [{"Name": "dwiflow", "Version": __version__}],
    }


def thread_count(context) -> int:
    """Threads for a stage's voxel loop that does not use numba: ``--nthreads`` (the context's), else numba's setting
    ``NUMBA_NUM_THREADS`` (which the BIDS App's ``--omp-nthreads`` sets), else the CPUs this process may run on —
    numba's own default, found without importing numba (~0.2 s of a command's start)."""
    if context is not None and context.n_threads:
        return int(context.n_threads)
    configured = os.environ.get("NUMBA_NUM_THREADS", "").strip()
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return available_cpus()


def available_cpus() -> int:
    """The CPUs this process may run on (a container's or a SLURM allocation's, where the system tells)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def voxels_to_fit(run, mask: PathLike | None, dwi: PathLike) -> np.ndarray:
    """The mask's voxels, or without a mask every voxel with some positive signal (as MRtrix3 does)."""
    if mask is not None:
        return load_mask(mask, run.data.shape[:3], run.affine)
    voxels = np.any(run.data > 0, axis=-1)  # NaN compares False: no copy through nan_to_num
    if not voxels.any():
        raise DwiflowInputError(f"DWI {dwi} has no voxel with a positive signal")
    return voxels


def brain_mask(run, mask: PathLike | None) -> np.ndarray:
    """The given mask, or median-Otsu on the b=0 volumes."""
    if mask is not None:
        return load_mask(mask, run.data.shape[:3], run.affine)
    from dwiflow.core.mask import median_otsu_mask  # SciPy's ndimage: imported only when a mask is computed

    return median_otsu_mask(run.data, run.gtab)


def load_sh_image(path: PathLike, what: str = "FOD"):
    """A 4D SH image (data, affine, lmax); the volume count must be an even-degree SH coefficient count."""
    from dwiflow.core.sh import lmax_from_n_coefficients

    img = load_image(path, what)
    if len(img.shape) != 4:
        raise DwiflowInputError(f"{what} {path} must be a 4D SH image, got shape {img.shape}")
    try:
        lmax = lmax_from_n_coefficients(img.shape[3])
    except DwiflowInputError:
        raise DwiflowInputError(
            f"{what} {path} has {img.shape[3]} volumes, which is not an even-degree SH coefficient count "
            "(1, 6, 15, 28, 45, 66, ...): is it an SH image?"
        ) from None
    encoding = ((read_sidecar(path) or {}).get("OrientationEncoding") or {}).get("Type")
    if encoding not in (None, "sh"):
        raise DwiflowInputError(f"{what} {path}: its sidecar gives OrientationEncoding.Type {encoding!r}; expected an "
                                "SH image (sh), e.g. from dwirecon csd or MRtrix3 dwi2fod")
    name = Path(path).name
    base = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem
    if (Path(path).parent / f"{base}.bval").is_file():
        raise DwiflowInputError(f"{what} {path} has {base}.bval beside it: it is a DWI, not an SH image (give the FOD "
                                "from dwirecon csd or MRtrix3 dwi2fod)")
    coefficients = in_mrtrix3_basis(np.asarray(img.dataobj, dtype=float), read_sidecar(path), path)
    return coefficients, img.affine, lmax


def sh_basis_option() -> Any:
    """The ``sh_basis`` option of every stage that writes SH images."""
    return option("mrtrix3", choices=("mrtrix3", "descoteaux07"),
                  help="SH basis of the SH images written: MRtrix3's, or DIPY's descoteaux07 (non-legacy); "
                       "recorded as SphericalHarmonicBasis, and read back by every dwiflow stage")


def load_response(path: PathLike):
    """A response in MRtrix3's text format."""
    from dwiflow.core.response import ResponseFunction

    return ResponseFunction.from_text(read_text(path, "response"), str(path))


def write_maps(
    stage,
    outputs: dict[str, Path],
    volume_of: Callable[[str], np.ndarray],
    affine: np.ndarray,
    parameters: dict[str, Any],
    sources: dict[str, Any],
    status_codes: Iterable[int] = (),
    orientation: dict[str, dict[str, Any]] | None = None,
    per_output: dict[str, dict[str, Any]] | None = None,
    sh_basis: str = "mrtrix3",
    status_details: dict[int, str] | None = None,
) -> dict[str, Path]:
    """One NIfTI + sidecar per requested output of ``stage``, all or nothing, SH images in ``sh_basis``.

    ``volume_of(name)`` gives the output's image; a ``status`` output is written as uint8 with
    ``Levels`` generated from ``status_codes`` (:class:`~dwiflow.core.status.FitStatus`) and the model's
    ``status_details`` (what a code means for it); ``per_output`` adds
    sidecar keys to one output only (e.g. each tissue's own response function).
    """
    written: dict[str, Path] = {}
    with atomic_outputs(sh_basis) as out:
        for name, path in outputs.items():
            levels = status_levels(status_codes, status_details) if name == "status" else None
            content = sidecar(stage.output_key(name), parameters, (orientation or {}).get(name), levels,
                              **{**sources, **(per_output or {}).get(name, {})})
            dtype = np.uint8 if output_spec(stage.output_key(name)).get("dtype") == "uint8" else np.float32
            written[name] = out.nifti(path, volume_of(name), affine, content, dtype=dtype)
    return written


def names_in_dir(stage, outputs: Iterable[str], out_dir: PathLike, source: PathLike,
                 naming: dict[str, str] | None = None) -> dict[str, Path]:
    """Paths in ``out_dir`` of a stage's outputs, named by bids_specs from the BIDS entities of ``source``."""
    entities = entities_from_filename(str(source))
    return {name: Path(out_dir) / output_filename(stage.output_key(name), entities, naming) for name in outputs}


def diffusion_times(dwi: PathLike, big_delta: float | None, small_delta: float | None) -> tuple[float | None, float | None, str]:
    """Δ and δ (s): the options if given, else ``LargeDelta``/``SmallDelta`` of the DWI's JSON sidecar."""
    if big_delta is not None:
        return float(big_delta), float(small_delta), "options"
    meta = read_sidecar(dwi)
    if meta is not None and "LargeDelta" in meta and "SmallDelta" in meta:
        return float(meta["LargeDelta"]), float(meta["SmallDelta"]), sidecar_path(dwi).name
    return None, None, "none"


def describe_outputs(paths: dict[str, Path]) -> str:
    """One line per written file (for command-line reports)."""
    return "\n".join(f"  {k:10s} {v}" for k, v in paths.items())


def _inputs():
    from dwiflow.tasks.registry import Input

    return (
        Input("dwi", "DWI", "4D diffusion-weighted image (NIfTI)"),
        Input("bval", "BVAL", "b-values (BIDS/FSL .bval, s/mm²)"),
        Input("bvec", "BVEC", "gradient directions (BIDS/FSL .bvec, image axes; converted to world coordinates)"),
    )


DWI_INPUTS = _inputs()


def on_shells(run, shells: list[float] | None):
    """A run's data and gradient table restricted to the requested b-values (MRtrix3's ``-shells``, b=0 included
    explicitly; all when none are requested, without a copy): (data, gradient table, shells in order of b-value)."""
    from dwiflow.core.response import select_shells

    chosen = select_shells(run.gtab, shells)
    if len(chosen) == len(run.gtab.shells):
        return run.data, run.gtab, chosen
    volumes = np.sort(np.concatenate([s.indices for s in chosen]))
    return run.data[..., volumes], run.gtab.subset(volumes), chosen


def response_for_shells(response: ResponseFunction, shells: list) -> ResponseFunction:
    """``response`` for the shells used: itself when it has a row per shell; the rows of those shells when it names
    more (MRtrix3 asks for responses of the selected shells only); otherwise itself, for the model's shell check
    to refuse."""
    if response.coefficients.shape[0] == len(shells):
        return response
    return response.rows_for([s.bvalue for s in shells]) or response


def issued_warnings(notes: list[str]) -> dict[str, list[str]]:
    """Issue each note as a Python warning (``dwirecon`` prints it) and return ``{"Warnings": [...]}`` for the
    outputs' sidecars, which the report lists ({} when there is none)."""
    import warnings

    for note in notes:
        warnings.warn(note, stacklevel=3)
    return {"Warnings": list(notes)} if notes else {}


def stage_warnings(stage, run, dwi: PathLike, options, mask_given: bool) -> dict[str, list[str]]:
    """What ``stage`` warns about this run's data (its ``data_warnings``), issued by :func:`issued_warnings`."""
    from dwiflow.tasks.preflight import stage_data_warnings, summary_of

    return issued_warnings(stage_data_warnings(stage, summary_of(run.gtab, read_sidecar(dwi), mask_given), options))


def fod_model_of(fod: PathLike) -> dict[str, Any]:
    """``{"Model": …}`` for maps derived from an FOD (peaks, FOD metrics): the FOD's own model (BEP016 wants a
    Model in every map's sidecar), or a description naming the file when its sidecar names none."""
    model = (read_sidecar(fod) or {}).get("Model")
    if isinstance(model, dict):
        return {"Model": model}
    return {"Model": {"Description": f"the model that produced {Path(fod).name} (its sidecar names none)"}}

