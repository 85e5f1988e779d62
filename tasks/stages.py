"""Stage functions: files in → core → files out (+ JSON sidecars).

Each function is what one ``dwirecon`` subcommand runs and what the Pydra task of that
stage wraps. Outputs are written atomically (all or nothing) with sidecars whose text
comes from ``bids_specs/outputs.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from dwiflow._version import __version__
from dwiflow.bids_specs.outputs import sidecar
from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import DEFAULT_B0_THRESHOLD, cluster_shells, world_to_fsl_bvecs
from dwiflow.core.mask import median_otsu_mask
from dwiflow.core.sims import acquisition_scheme, make_phantom
from dwiflow.core.tensor import MIN_POSITIVE_SIGNAL, TensorModel
from dwiflow.tasks.io import atomic_outputs, load_dwi, load_mask, read_bvals

PathLike = str | os.PathLike


def _provenance(*sources: PathLike | None) -> dict[str, Any]:
    return {
        "Sources": [str(Path(s)) for s in sources if s is not None],
        "GeneratedBy": [{"Name": "dwiflow", "Version": __version__}],
    }


def shells_of(bval: PathLike, b0_threshold: float = DEFAULT_B0_THRESHOLD) -> list[tuple[float, int]]:
    """Shells of a ``.bval`` file as (mean b-value, volume count), b=0 first."""
    return [(s.bvalue, s.count) for s in cluster_shells(read_bvals(bval), b0_threshold)]


def mask_stage(dwi: PathLike, bval: PathLike, bvec: PathLike, out: PathLike) -> Path:
    """Brain mask (median-Otsu on the mean b=0) written to ``out``."""
    run = load_dwi(dwi, bval, bvec)
    mask = median_otsu_mask(run.data, run.gtab)
    with atomic_outputs() as outputs:
        outputs.nifti(
            out,
            mask.astype(np.uint8),
            run.affine,
            sidecar("brain_mask", **_provenance(dwi, bval, bvec), VoxelCount=int(mask.sum())),
            dtype=np.uint8,
        )
    return Path(out)


TENSOR_OUTPUTS = ("fa", "md", "ad", "rd", "v1", "s0", "evals", "status")


def tensor_stage(
    dwi: PathLike,
    bval: PathLike,
    bvec: PathLike,
    outputs: dict[str, PathLike],
    mask: PathLike | None = None,
    fit_method: str = "WLS",
) -> dict[str, Path]:
    """Fit the tensor and write the requested maps.

    Parameters
    ----------
    outputs : dict
        Map name (one of :data:`TENSOR_OUTPUTS`) → output path.
    mask : path, optional
        Brain mask; without one every voxel with a finite, positive signal is fitted.
    """
    unknown = set(outputs) - set(TENSOR_OUTPUTS)
    if unknown:
        raise DwiflowInputError(f"unknown tensor outputs {sorted(unknown)}; choose from {TENSOR_OUTPUTS}")
    if not outputs:
        raise DwiflowInputError(f"no output requested; give at least one of {', '.join(TENSOR_OUTPUTS)}")
    run = load_dwi(dwi, bval, bvec)
    if mask is not None:
        voxels = load_mask(mask, run.data.shape[:3], run.affine)
    else:
        voxels = np.any(np.nan_to_num(run.data) > 0, axis=-1)
        if not voxels.any():
            raise DwiflowInputError(f"DWI {dwi} has no voxel with a positive signal")
    fit = TensorModel(run.gtab, fit_method=fit_method).fit(run.data, voxels)
    maps = {
        "fa": fit.fa, "md": fit.md, "ad": fit.ad, "rd": fit.rd, "v1": fit.v1,
        "s0": fit.s0, "evals": fit.evals, "status": fit.status,
    }
    parameters = {"FitMethod": fit_method, "MinSignal": MIN_POSITIVE_SIGNAL}
    written: dict[str, Path] = {}
    with atomic_outputs() as out:
        for name, path in outputs.items():
            dtype = np.uint8 if name == "status" else np.float32
            content = sidecar(f"tensor_{name}", parameters, **_provenance(dwi, bval, bvec, mask))
            written[name] = out.nifti(path, maps[name], run.affine, content, dtype=dtype)
    return written


def phantom_stage(
    out_dir: PathLike,
    scheme: str = "single",
    shape: tuple[int, int, int] = (10, 10, 10),
    snr: float | None = 30.0,
    seed: int = 0,
    voxel_size: float = 2.0,
) -> dict[str, Path]:
    """Write a small BIDS dataset of a multi-fibre phantom plus its ground truth.

    Layout: ``OUT/sub-phantom/dwi/sub-phantom_dwi.{nii.gz,bval,bvec,json}`` and
    ``OUT/derivatives/truth/sub-phantom/dwi/`` with the number of fibres, fractions,
    fibre directions (world frame) and the CSF fraction.
    """
    gtab = acquisition_scheme(scheme)
    phantom = make_phantom(gtab, shape, snr=snr, seed=seed, csf_fraction=(0.0, 0.2))
    # LAS storage (negative determinant), as most scanners' NIfTI conversions
    affine = np.diag([-voxel_size, voxel_size, voxel_size, 1.0])
    affine[:3, 3] = [voxel_size * shape[0] / 2, -voxel_size * shape[1] / 2, -voxel_size * shape[2] / 2]
    root = Path(out_dir)
    dwi_dir = root / "sub-phantom" / "dwi"
    truth_dir = root / "derivatives" / "truth" / "sub-phantom" / "dwi"
    base = dwi_dir / "sub-phantom_dwi"
    fsl_bvecs = world_to_fsl_bvecs(gtab.bvecs, affine)
    truth_common = {"FibreEigenvalues": list(phantom.evals), "S0": phantom.s0, "SNR": snr, "Seed": seed,
                    "Scheme": scheme}
    files: dict[str, Path] = {}
    with atomic_outputs() as out:
        out.json(root / "dataset_description.json", {
            "Name": f"dwiflow phantom ({scheme}-shell, {shape[0]}x{shape[1]}x{shape[2]})",
            "BIDSVersion": "1.9.0", "DatasetType": "raw",
            "GeneratedBy": [{"Name": "dwiflow", "Version": __version__, "Description": "dwirecon phantom"}],
        })
        out.json(root / "derivatives" / "truth" / "dataset_description.json", {
            "Name": "dwiflow phantom ground truth", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "dwiflow", "Version": __version__}],
        })
        files["dwi"] = out.nifti(base.with_name(base.name + ".nii.gz"), phantom.data, affine,
                                 {"Description": "Simulated multi-tensor DWI with Rician noise", **truth_common})
        files["bval"] = out.text(base.with_name(base.name + ".bval"), " ".join(f"{b:g}" for b in gtab.bvals) + "\n")
        files["bvec"] = out.text(base.with_name(base.name + ".bvec"),
                                 "\n".join(" ".join(f"{v:.8f}" for v in row) for row in fsl_bvecs.T) + "\n")
        truth = {
            "nfibres": (phantom.n_fibres, np.uint8, "Number of fibres"),
            "fractions": (phantom.fractions, np.float32, "Fibre volume fractions of the tissue"),
            "directions": (np.nan_to_num(phantom.directions.reshape(shape + (-1,))), np.float32,
                           "Fibre directions in world coordinates, 3 volumes per fibre (0 where absent)"),
            "csf": (phantom.csf_fraction, np.float32, "Free-water (CSF) volume fraction"),
        }
        for name, (array, dtype, desc) in truth.items():
            path = truth_dir / f"sub-phantom_desc-{name}_truth.nii.gz"
            files[name] = out.nifti(path, array, affine, {"Description": desc, **truth_common}, dtype=dtype)
    return files


def describe_outputs(paths: dict[str, Path]) -> str:
    """One line per written file (for command-line reports)."""
    return "\n".join(f"  {k:10s} {v}" for k, v in paths.items())

