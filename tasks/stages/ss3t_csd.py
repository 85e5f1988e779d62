"""Stage ``ss3t_csd``: single-shell three-tissue CSD (Dhollander and Connelly 2016) as MRtrix3Tissue's
``ss3t_csd_beta1``."""

from __future__ import annotations

from dataclasses import dataclass

from dwiflow.core.errors import DwiflowInputError
from dwiflow.tasks.io import load_dwi
from dwiflow.tasks.options import StageOptions, option
from dwiflow.tasks.registry import Input, Output, Stage
from dwiflow.tasks.stagelib import (DWI_INPUTS, load_response, provenance, sh_basis_option, tissue_response_sidecars,
                                   voxels_to_fit, write_maps)

TISSUES = ("wm", "gm", "csf")


@dataclass(frozen=True)
class Ss3tOptions(StageOptions):
    """``ss3t_csd_beta1``'s parameters (same names and defaults)."""

    niter: int = option(3, minimum=2, maximum=20, help="alternations of the two-tissue fits (ss3t_csd_beta1 -niter)")
    bzero_pct: float = option(10.0, exclusive_minimum=True, minimum=0, maximum=100,
                              help="weight of the b=0 volumes, in per cent of the diffusion-weighted volumes "
                                   "(ss3t_csd_beta1 -bzero_pct)")
    sh_basis: str = sh_basis_option()


def run_ss3t_csd(files, outputs, options: Ss3tOptions, context):
    """SS3T-CSD: the WM FOD (SH, MRtrix3 basis, world frame), the GM and CSF compartments (l=0 terms)."""
    from dwiflow.core.ss3t import STATUS_CODES, Ss3tCsdModel

    dwi = files["dwi"]
    run = load_dwi(dwi, files["bval"], files["bvec"])
    responses = {t: load_response(files[f"response_{t}"]) for t in TISSUES}
    model = Ss3tCsdModel(run.gtab, responses["wm"], responses["gm"], responses["csf"], iterations=options.niter,
                         bzero_pct=options.bzero_pct)
    voxels = voxels_to_fit(run, files.get("mask"), dwi)
    fit = model.fit(run.data, voxels, progress=context.progress)
    shell = [float(round(s.bvalue)) for s in run.gtab.shells]
    response_functions, own = tissue_response_sidecars(list(TISSUES), [responses[t] for t in TISSUES], shell, files)
    params = {"Iterations": options.niter, "BzeroPercent": options.bzero_pct, "BzeroWeight": model.bzero_weight,
              "SignalDecayMetrics": dict(zip(("WM", "GM", "CSF"), model.decay_metrics)), "Shells": shell,
              "VoxelsFailed": int(((fit.status != 0) & fit.mask).sum())}
    sources = provenance(dwi, files["bval"], files["bvec"], *(files[f"response_{t}"] for t in TISSUES),
                         files.get("mask"))
    volumes = {"wm": lambda: fit.wm, "gm": lambda: fit.gm, "csf": lambda: fit.csf, "status": lambda: fit.status}
    return write_maps(STAGES[0], outputs, lambda name: volumes[name](), run.affine, params,
                      sources | {"TissueResponses": response_functions}, STATUS_CODES,
                      {"wm": {"SphericalHarmonicDegree": model.lmax}, "gm": {"SphericalHarmonicDegree": 0},
                       "csf": {"SphericalHarmonicDegree": 0}}, per_output=own, sh_basis=options.sh_basis)


def check_ss3t_data(data, options: Ss3tOptions) -> None:
    if data.n_b0 == 0 or data.n_dw_shells != 1:
        shells = ", ".join(["0"] * bool(data.n_b0) + [f"{b:g}" for b, _ in data.shells]) or "none"
        raise DwiflowInputError(f"SS3T-CSD needs b=0 and exactly one diffusion-weighted shell; this run has b={shells} "
                                "(multi-shell data: recon spec msmt)")


STAGES = (
    Stage(
        name="ss3t_csd", order=42, title="Single-shell three-tissue CSD (Dhollander 2016)",
        methods=lambda o: ("White-matter FODs and grey-matter and CSF compartments were estimated from the single "
                           "shell and b=0 by single-shell three-tissue CSD (SS3T-CSD), alternating two-tissue "
                           f"multi-tissue CSD fits ({o.niter} iterations, b=0 weighted {o.bzero_pct:g}% of the "
                           "diffusion-weighted volumes), as MRtrix3Tissue's ss3t_csd_beta1"),
        references=("dhollander2016ss3t", "jeurissen2014", "mrtrix3"),
        summary="single-shell three-tissue CSD (SS3T-CSD, as ss3t_csd_beta1)",
        description="MRtrix3Tissue's ss3t_csd_beta1 on b=0 + one shell: GM + CSF, then (niter times) WM + GM on the "
                    "data less CSF and GM + CSF on the data less WM, every fit MRtrix3's dwi2fod msmt_csd, the b=0 "
                    "volumes weighted to bzero_pct per cent of the others. Responses: two rows (b=0, the shell), "
                    "e.g. from response dhollander.",
        options=Ss3tOptions, run=run_ss3t_csd,
        inputs=DWI_INPUTS + (
            Input("response_wm", "RESP_WM", "white-matter response (MRtrix3 text format, rows b=0 and the shell)"),
            Input("response_gm", "RESP_GM", "grey-matter response (isotropic)"),
            Input("response_csf", "RESP_CSF", "CSF response (isotropic)"),
            Input("mask", "MASK", "voxels to fit (default: every voxel with signal)", required=False, flag=True)),
        outputs=(Output("wm", "the WM FOD (SH coefficients)", cli="positional", metavar="OUT_WM"),
                 Output("gm", "the GM compartment (l=0 term)", cli="positional", metavar="OUT_GM"),
                 Output("csf", "the CSF compartment (l=0 term)", cli="positional", metavar="OUT_CSF"),
                 Output("status", "the per-voxel status map", cli="flag")),
        cli_pairs=(("response_wm", "wm"), ("response_gm", "gm"), ("response_csf", "csf")), cli_pairs_required=3,
        provides={"fod": "wm", "gm": "gm", "csf": "csf"}, fod_priority=34, threads=True, compiled=True,
        check_data=check_ss3t_data, progress="fits", conflicts=("csd", "msmt_csd"),
    ),
)
