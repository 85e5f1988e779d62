"""Stage ``csd``: single-shell constrained spherical deconvolution (MRtrix3 ``dwi2fod csd``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dwiflow.bids_specs.outputs import sidecar
from dwiflow.tasks.io import atomic_outputs, load_dwi, read_numbers
from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import DEFAULT_SHELL_TOLERANCE as SHELL_TOLERANCE
from dwiflow.tasks.options import OptionError, StageOptions, option
from dwiflow.tasks.registry import Input, Output, Stage
from dwiflow.tasks.stagelib import DWI_INPUTS, load_response, provenance, sh_basis_option, stage_warnings, voxels_to_fit


@dataclass(frozen=True)
class CsdOptions(StageOptions):
    """MRtrix3 ``dwi2fod csd`` parameters (same names and defaults)."""

    lmax: int | None = option(None, help="FOD lmax (default 8, or lower when the response or the directions support "
                                         "less)", minimum=2, even=True)
    shell: float | None = option(None, help="b-value of the shell to deconvolve (default: the largest)",
                                 exclusive_minimum=True, minimum=0)
    neg_lambda: float = option(1.0, help="weight of the non-negativity constraint", minimum=0)
    norm_lambda: float = option(1.0, help="weight of the norm regulariser", minimum=0)
    threshold: float = option(0.0, help="FOD amplitude below which a constraint direction counts as negative")
    niter: int = option(50, help="iteration limit of the non-negativity iterations", minimum=1)
    sh_basis: str = sh_basis_option()


def run_csd(files, outputs, options: CsdOptions, context):
    """Constrained spherical deconvolution (Tournier 2007): FOD as SH (MRtrix3 basis, world frame) + sidecar."""
    from dwiflow.core.csd import STATUS_CODES, CsdModel
    from dwiflow.core.status import FitStatus, status_levels

    dwi = files["dwi"]
    run = load_dwi(dwi, files["bval"], files["bvec"])
    directions = read_numbers(files["directions"], "directions") if files.get("directions") else None
    model = CsdModel(run.gtab, load_response(files["response"]), lmax=options.lmax, shell=options.shell,
                     neg_lambda=options.neg_lambda, norm_lambda=options.norm_lambda, threshold=options.threshold,
                     niter=options.niter, directions=directions)
    notes = stage_warnings(STAGES[0], run, dwi, options, files.get("mask") is not None)
    voxels = voxels_to_fit(run, files.get("mask"), dwi)
    fit = model.fit(run.data, voxels)
    params = {"Lmax": model.lmax, "Shell": model.shell.bvalue, "NegLambda": options.neg_lambda,
              "NormLambda": options.norm_lambda, "Threshold": options.threshold, "MaxIterations": options.niter,
              "ConstraintDirections": int(model.constraint_dirs.shape[0]),
              "VoxelsNotConverged": int((fit.status == FitStatus.NOT_CONVERGED).sum()),
              "VoxelsFailed": int((fit.status != FitStatus.OK).sum())}
    sources = provenance(dwi, files["bval"], files["bvec"], files["response"], files.get("mask"), files.get("directions"))
    content = sidecar("csd_fod", params, {"SphericalHarmonicDegree": model.lmax}, **sources, **notes,
                      ResponseFunction={"Coefficients": [float(c) for c in model.zonal], "Type": "zsh"},
                      PointSpreadFunction={"Coefficients": [float(c) for c in model.point_spread_function()],
                                           "Type": "zsh",
                                           "Description": "the FOD of one noiseless fibre along z (the response "
                                                          "deconvolved); the peaks stage subtracts it at each peak"})
    written = {}
    with atomic_outputs(options.sh_basis) as out:
        written["fod"] = out.nifti(outputs["fod"], fit.sh, run.affine, content)
        if "status" in outputs:
            status_content = sidecar("csd_status", params, levels=status_levels(STATUS_CODES), **sources)
            written["status"] = out.nifti(outputs["status"], fit.status, run.affine, status_content, dtype=np.uint8)
    return written


def check_csd_data(data, options: CsdOptions) -> None:
    if not data.shells:
        raise DwiflowInputError("CSD needs a diffusion-weighted shell; this run has only b=0 volumes")
    if options.shell is not None and not any(abs(b - options.shell) <= SHELL_TOLERANCE for b, _ in data.shells):
        raise OptionError(f"{{shell}}: this run has no shell at b={options.shell:g} (its shells: "
                          f"{', '.join(f'{b:.0f}' for b, _ in data.shells)})", "shell")
    largest = max(data.shells) if options.shell is None else min(data.shells, key=lambda s: abs(s[0] - options.shell))
    if largest[1] < 6:
        raise DwiflowInputError(f"CSD needs at least 6 directions on its shell; b={largest[0]:.0f} has {largest[1]}")


def csd_data_warnings(data, options: CsdOptions) -> list[str]:
    """Data that support CSD only poorly: more SH coefficients than directions on the shell (the FOD is then
    determined by the non-negativity constraint alone: super-resolution, Tournier et al. 2007, with spurious
    peaks), and a multi-shell run of which CSD uses one shell."""
    from dwiflow.core.csd import supported_lmax
    from dwiflow.core.sh import n_coefficients

    if not data.shells:
        return []
    bvalue, directions = (max(data.shells) if options.shell is None
                          else min(data.shells, key=lambda s: abs(s[0] - options.shell)))
    notes = []
    lmax = min(options.lmax or 8, supported_lmax(directions))  # as the model: what super-resolution can reach
    if n_coefficients(lmax) > directions:
        supported = supported_lmax(directions, factor=1)
        notes.append(f"CSD at lmax {lmax} estimates {n_coefficients(lmax)} coefficients from the {directions} "
                     f"directions of b={bvalue:.0f}: only the non-negativity constraint determines the FOD "
                     f"(super-resolution) and spurious peaks are likely; the directions determine lmax {supported} "
                     "(the lmax option)")
    others = [b for b, _ in data.shells if b != bvalue]
    if others:
        notes.append(f"CSD deconvolves one shell (b={bvalue:.0f}) and ignores b={', '.join(f'{b:.0f}' for b in others)}; "
                     "for multi-shell data use multi-tissue CSD (dwirecon msmt-csd, recon spec msmt)")
    return notes


STAGES = (
    Stage(
        name="csd", order=40, title="CSD (Tournier 2007)",
        methods=lambda o: ("Fibre orientation distributions were estimated by constrained spherical deconvolution "
                           f"of the {'b=' + format(o.shell, 'g') + ' s/mm²' if o.shell else 'largest'} shell "
                           f"(lmax {o.lmax if o.lmax else 'up to 8'}, non-negativity on MRtrix3's 300 constraint "
                           "directions, as MRtrix3's dwi2fod csd)"),
        references=("tournier2007", "mrtrix3"),
        summary="constrained spherical deconvolution (Tournier 2007)",
        description="Single-shell CSD with MRtrix3's dwi2fod csd formulation; FOD as SH (MRtrix3 basis, world frame).",
        options=CsdOptions, run=run_csd,
        inputs=DWI_INPUTS + (Input("response", "RESPONSE", "response function (MRtrix3 text format)"),
                             Input("mask", "MASK", "voxels to fit (default: every voxel with signal, as MRtrix3)",
                                   required=False, flag=True),
                             Input("directions", "FILE", "constraint directions, one per line as azimuth elevation "
                                   "(radians) or x y z (MRtrix3's -directions; default: MRtrix3's built-in 300)",
                                   required=False, flag=True)),
        outputs=(Output("fod", "the FOD (SH coefficients)", cli="positional", metavar="OUT_FOD"),
                 Output("status", "the per-voxel status map", cli="flag")),
        provides={"fod": "fod"}, fod_priority=30, threads=True, compiled=True, check_data=check_csd_data,
        data_warnings=csd_data_warnings,
    ),
)
