"""Command ``phantom``: a small BIDS dataset of a multi-fibre phantom with its ground truth."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dwiflow._version import __version__
from dwiflow.bids_specs.outputs import output_filename
from dwiflow.tasks.io import atomic_outputs, save_nifti
from dwiflow.tasks.options import StageOptions, option
from dwiflow.tasks.registry import Output, Stage

PathLike = str | os.PathLike


@dataclass(frozen=True)
class PhantomOptions(StageOptions):
    """What the phantom looks like."""

    scheme: str = option("single", choices=("single", "multi"),
                         help="acquisition: single shell (b=2000, 150 directions) or multi-shell (b=1000/2000/3000)")
    shape: list[int] = option([10, 10, 10], length=3, minimum=1, maximum=256, metavar="X,Y,Z",
                              help="size of the tissue block; the image adds 3,3,2 voxels of background on each side")
    snr: float = option(30.0, minimum=0, help="S0/sigma; 0 for noiseless")
    seed: int = option(0, minimum=0, help="random seed")


def run_phantom(files, outputs, options: PhantomOptions, context):
    return write_phantom_dataset(outputs["dataset"], scheme=options.scheme, shape=tuple(options.shape),
                                 snr=None if options.snr <= 0 else options.snr, seed=options.seed)


def write_phantom_dataset(
    out_dir: PathLike,
    scheme: str = "single",
    shape: tuple[int, int, int] = (10, 10, 10),
    snr: float | None = 30.0,
    seed: int = 0,
    voxel_size: float = 2.0,
    background: tuple[int, int, int] = (3, 3, 2),
) -> dict[str, Path]:
    """Write a small BIDS dataset of a multi-fibre phantom plus its ground truth.

    Layout: ``OUT/sub-phantom/dwi/sub-phantom_dwi.{nii.gz,bval,bvec,json}``, the tissue block as a
    brain-mask derivative in ``OUT/derivatives/masks`` (as ../shared/data/bids_real ships), and
    ``OUT/derivatives/truth/sub-phantom/dwi/`` with the number of fibres, fractions,
    fibre directions (world frame) and the CSF fraction. The tissue block of ``shape`` sits in a
    field of view padded by ``background`` voxels per side that hold only noise (as outside a
    head), so that masking behaves as on real data; truth maps are 0 there.
    """
    from dwiflow.core.gradients import world_to_fsl_bvecs
    from dwiflow.core.sims import acquisition_scheme, make_phantom

    gtab = acquisition_scheme(scheme)
    tissue = make_phantom(gtab, shape, snr=snr, seed=seed, csf_fraction=(0.0, 0.2))
    pad = [(b, b) for b in background]
    rng = np.random.default_rng(seed + 1)
    sigma = 0.0 if snr is None else tissue.s0 / snr
    data = np.pad(tissue.data, pad + [(0, 0)])
    outside = np.pad(np.zeros(shape, bool), pad, constant_values=True)
    if sigma:
        noise = rng.standard_normal((int(outside.sum()), gtab.n_volumes, 2)) * sigma
        data[outside] = np.hypot(noise[..., 0], noise[..., 1])
    phantom = tissue
    shape = data.shape[:3]
    # LAS storage (negative determinant), as most scanners' NIfTI conversions
    affine = np.diag([-voxel_size, voxel_size, voxel_size, 1.0])
    affine[:3, 3] = [voxel_size * shape[0] / 2, -voxel_size * shape[1] / 2, -voxel_size * shape[2] / 2]
    root = Path(out_dir)
    dwi_dir = root / "sub-phantom" / "dwi"
    truth_dir = root / "derivatives" / "truth" / "sub-phantom" / "dwi"
    mask_dir = root / "derivatives" / "masks" / "sub-phantom" / "dwi"
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
        files["dwi"] = out.nifti(base.with_name(base.name + ".nii.gz"), data, affine,
                                 {"Description": "Simulated multi-tensor DWI with Rician noise", **truth_common})
        files["bval"] = out.text(base.with_name(base.name + ".bval"), " ".join(f"{b:g}" for b in gtab.bvals) + "\n")
        files["bvec"] = out.text(base.with_name(base.name + ".bvec"),
                                 "\n".join(" ".join(f"{v:.8f}" for v in row) for row in fsl_bvecs.T) + "\n")
        truth = {
            "nfibres": (np.pad(phantom.n_fibres, pad), np.uint8, "Number of fibres (0 outside the tissue)"),
            "fractions": (np.pad(phantom.fractions, pad + [(0, 0)]), np.float32, "Fibre volume fractions of the tissue"),
            "directions": (np.pad(np.nan_to_num(phantom.directions.reshape(phantom.n_fibres.shape + (-1,))), pad + [(0, 0)]),
                           np.float32, "Fibre directions in world coordinates, 3 volumes per fibre (0 where absent)"),
            "csf": (np.pad(phantom.csf_fraction, pad), np.float32, "Free-water (CSF) volume fraction"),
        }
        out.json(root / "derivatives" / "masks" / "dataset_description.json", {
            "Name": "dwiflow phantom brain mask (the tissue block)", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "dwiflow", "Version": __version__}],
        })
        files["mask"] = out.nifti(mask_dir / output_filename("mask", {"sub": "phantom"}), (~outside).astype(np.uint8),
                                  affine, {"Description": "The phantom's tissue block", "Type": "Brain"}, dtype=np.uint8)
        for name, (array, dtype, desc) in truth.items():
            path = truth_dir / output_filename("phantom_truth", {"sub": "phantom", "desc": name})
            files[name] = out.nifti(path, array, affine, {"Description": desc, **truth_common}, dtype=dtype)
    return files


def keep_one_shell(dwi: Path, bvalue: float) -> None:
    """Keep only the b=0 volumes and the shell ``bvalue`` of a phantom dataset's DWI (its image, .bval and .bvec in
    place): single-shell data for SS3T-CSD from the three-tissue block of :func:`three_tissue_block`."""
    import nibabel as nib

    base = Path(str(dwi).removesuffix(".nii.gz"))
    bvals = np.loadtxt(f"{base}.bval", ndmin=1)
    bvecs = np.loadtxt(f"{base}.bvec", ndmin=2)
    keep = np.flatnonzero((bvals <= 50) | (np.abs(bvals - bvalue) <= 50))
    img = nib.load(dwi)
    save_nifti(nib.Nifti1Image(np.asarray(img.dataobj)[..., keep], img.affine, img.header), dwi)
    Path(f"{base}.bval").write_text(" ".join(f"{b:g}" for b in bvals[keep]) + "\n")
    Path(f"{base}.bvec").write_text("\n".join(" ".join(f"{v:.8f}" for v in row) for row in bvecs[:, keep]) + "\n")


STAGES = (
    Stage(
        name="phantom", order=2000, title="Phantom", summary="write a small BIDS phantom dataset with ground truth",
        description="Multi-tensor phantom (1-3 fibres per voxel, CSF, Rician noise) as a BIDS dataset with its ground "
                    "truth and a brain-mask derivative.",
        options=PhantomOptions, run=run_phantom,
        outputs=(Output("dataset", "the dataset folder", cli="positional", metavar="OUT_DIR", folder=True),), pipeline=False,
    ),
)


def three_tissue_block(dwi: Path, seed: int = 2) -> None:
    """Turn the tissue block of a multi-shell phantom dataset (:func:`write_phantom_dataset`, default background)
    into spatially smooth WM/GM/CSF patches (what dhollander needs), and give its sidecar the diffusion times
    MAP-MRI needs (Δ = 40 ms, δ = 20 ms). Used by ``python -m dwiflow.warmup``."""
    import json

    import nibabel as nib

    from dwiflow.core.sims import acquisition_scheme, smooth_tissue_fractions, three_tissue_phantom

    img = nib.load(dwi)
    data = np.asarray(img.dataobj, dtype=np.float32)
    block = (slice(3, -3), slice(3, -3), slice(2, -2))
    shape = data[block].shape[:3]
    tissues = three_tissue_phantom(acquisition_scheme("multi"), shape, seed=seed,
                                   fractions=smooth_tissue_fractions(shape, width=2.0, seed=seed))
    data[block] = tissues.data
    save_nifti(nib.Nifti1Image(data, img.affine, img.header), dwi)
    sidecar = Path(str(dwi).replace(".nii.gz", ".json"))
    content = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    content.update(LargeDelta=0.04, SmallDelta=0.02)
    sidecar.write_text(json.dumps(content, indent=2))
