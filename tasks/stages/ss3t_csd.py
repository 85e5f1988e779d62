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
    shell: float | None = option(None, exclusive_minimum=True, minimum=0,
                                 help="on multi-shell data, the b-value of the shell used with the b=0 volumes (the "
                                      "others are left out, as dwiextract -shells 0,B before ss3t_csd_beta1; SS3T's "
                                      "author advises the largest); default: the data must have one shell")
    sh_basis: str = sh_basis_option()


def _chosen_shell(bvalues: list[float], shell: float) -> float | None:
    """The data's diffusion-weighted b-value within the shell tolerance of ``shell`` (the nearest), or None."""
    from dwiflow.core.gradients import DEFAULT_SHELL_TOLERANCE

    near = [b for b in bvalues if b > 0 and abs(b - shell) <= DEFAULT_SHELL_TOLERANCE]
    return min(near, key=lambda b: abs(b - shell)) if near else None


def _on_shell(response, bvalue: float, name: str):
    """``response``'s rows for b=0 and ``bvalue`` (a multi-shell response, e.g. dhollander's of every shell)."""
    rows = response.rows_for([0.0, bvalue])
    if rows is None:
        have = ", ".join(f"{b:g}" for b in response.bvalues)
        raise DwiflowInputError(f"the {name} response has rows for b={have}: SS3T-CSD on b=0 and b={bvalue:g} needs "
                                "both")
    return rows


def run_ss3t_csd(files, outputs, options: Ss3tOptions, context):
    """SS3T-CSD: the WM FOD (SH, MRtrix3 basis, world frame), the GM and CSF compartments (l=0 terms)."""
    import numpy as np

    from dwiflow.core.ss3t import STATUS_CODES, Ss3tCsdModel

    dwi = files["dwi"]
    run = load_dwi(dwi, files["bval"], files["bvec"])
    responses = {t: load_response(files[f"response_{t}"]) for t in TISSUES}
    gtab, data = run.gtab, run.data
    _check_shells(bool(gtab.b0s_mask.any()), [s.bvalue for s in gtab.shells if not s.is_b0], options.shell)
    if options.shell is not None:  # b=0 and the chosen shell (check_ss3t_data: the run has both)
        chosen = _chosen_shell([s.bvalue for s in gtab.shells], options.shell)
        keep = np.concatenate([s.indices for s in gtab.shells if s.is_b0 or s.bvalue == chosen])
        keep.sort()
        gtab, data = gtab.subset(keep), run.data[..., keep]
        responses = {t: _on_shell(r, chosen, t.upper()) for t, r in responses.items()}
    model = Ss3tCsdModel(gtab, responses["wm"], responses["gm"], responses["csf"], iterations=options.niter,
                         bzero_pct=options.bzero_pct)
    voxels = voxels_to_fit(run, files.get("mask"), dwi)
    fit = model.fit(data, voxels, progress=context.progress)
    shell = [float(round(s.bvalue)) for s in gtab.shells]
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


def _check_shells(has_b0: bool, dw_bvalues: list[float], shell: float | None) -> None:
    """SS3T-CSD's data: b=0 and one diffusion-weighted shell, or b=0 and the ``shell`` chosen among several."""
    shells = ", ".join(["0"] * has_b0 + [f"{b:g}" for b in dw_bvalues]) or "none"
    if shell is not None:
        if not has_b0 or _chosen_shell(dw_bvalues, shell) is None:
            raise DwiflowInputError(f"SS3T-CSD uses b=0 and the shell b={shell:g}; this run has b={shells}",
                                    parameters=("shell",))
        return
    if not has_b0 or len(dw_bvalues) != 1:
        hint = ""
        if has_b0 and len(dw_bvalues) > 1:
            largest = max(dw_bvalues)
            hint = (f", or b=0 and one shell: dwirecon ss3t-csd --shell {largest:g}; in a recon spec, ss3t_csd: "
                    f"{{shell: {largest:g}}} (the largest, as SS3T's author advises)")
        raise DwiflowInputError(f"SS3T-CSD needs b=0 and exactly one diffusion-weighted shell; this run has b={shells} "
                                f"(multi-shell data: recon spec msmt{hint})")


def check_ss3t_data(data, options: Ss3tOptions) -> None:
    _check_shells(bool(data.n_b0), [b for b, _ in data.shells], options.shell)


STAGES = (
    Stage(
        name="ss3t_csd", order=42, title="Single-shell three-tissue CSD (Dhollander 2016)",
        methods=lambda o: ("White-matter FODs and grey-matter and CSF compartments were estimated from "
                           + (f"the b={o.shell:g} shell (the other shells left out) " if o.shell is not None else
                              "the single shell ")
                           + "and b=0 by single-shell three-tissue CSD (SS3T-CSD), alternating two-tissue "
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
        scipy_blas=False,  # its kernel calls no BLAS
        check_data=check_ss3t_data, progress="fits", conflicts=("csd", "msmt_csd"),
    ),
)
