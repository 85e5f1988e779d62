"""Stage ``msmt_csd``: multi-shell multi-tissue CSD (MRtrix3 ``dwi2fod msmt_csd``; Jeurissen et al. 2014)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dwiflow.core.errors import DwiflowInputError
from dwiflow.tasks.io import load_dwi, read_numbers
from dwiflow.tasks.options import OptionError, StageOptions, option
from dwiflow.tasks.registry import Input, Output, Stage
from dwiflow.tasks.stagelib import (DWI_INPUTS, load_response, provenance, response_for_shells, sh_basis_option,
                                   on_shells, tissue_response_sidecars, voxels_to_fit, write_maps)

TISSUES = ("wm", "gm", "csf")


@dataclass(frozen=True)
class MsmtCsdOptions(StageOptions):
    """MRtrix3 ``dwi2fod msmt_csd`` parameters (same names and defaults)."""

    lmax: list[int] | None = option(None, help="ODF lmax of each tissue given, in the order wm,gm,csf (default: "
                                               "min(8, the response's lmax); isotropic responses give 0)",
                                    minimum=0, even=True)
    norm_lambda: float = option(1e-10, help="weight of the minimum-norm regulariser (relative to the largest "
                                            "diagonal element of the normal matrix)", minimum=0)
    neg_lambda: float = option(1e-10, help="ridge on the constraint multipliers' system", minimum=0)
    # command line only, as the response stage's: in a recon spec every shell is deconvolved
    shells: list[float] | None = option(None, help="the b-values to use, b=0 included explicitly, e.g. 0,1000,3000 "
                                                   "(default: all; MRtrix3's -shells); a response gives a row per "
                                                   "b-value used, or names its shells (# Shells) including them",
                                        minimum=0, spec=False)
    sh_basis: str = sh_basis_option()


def _tissues(files) -> list[str]:
    return [t for t in TISSUES if files.get(f"response_{t}")]


def run_msmt_csd(files, outputs, options: MsmtCsdOptions, context):
    """Multi-tissue CSD: each tissue's ODF (SH, MRtrix3 basis, world frame; isotropic tissues one volume)."""
    from dwiflow.core.msmt_csd import STATUS_CODES, MsmtCsdModel
    from dwiflow.core.status import FitStatus

    tissues = _tissues(files)
    for t in TISSUES:
        if files.get(f"response_{t}") and t not in outputs:
            raise DwiflowInputError(f"a {t.upper()} response is given but no output for the {t.upper()} ODF "
                                    f"(--{t} FILE)")
        if t in outputs and not files.get(f"response_{t}"):
            raise DwiflowInputError(f"an output for the {t.upper()} ODF is given but no {t.upper()} response "
                                    f"(--response-{t} FILE)")
    if options.lmax is not None and len(options.lmax) != len(tissues):
        raise OptionError(f"{{lmax}}: {len(options.lmax)} values for {len(tissues)} tissues "
                          f"({', '.join(tissues)})", "lmax")
    dwi = files["dwi"]
    run = load_dwi(dwi, files["bval"], files["bvec"])
    data, gtab, shells = on_shells(run, options.shells)
    responses = []
    for t in tissues:
        path = files[f"response_{t}"]
        response = response_for_shells(load_response(path), shells)
        responses.append(response)
    directions = read_numbers(files["directions"], "directions") if files.get("directions") else None
    try:
        model = MsmtCsdModel(gtab, responses, lmax=options.lmax, directions=directions,
                             norm_lambda=options.norm_lambda, neg_lambda=options.neg_lambda)
    except DwiflowInputError as error:  # name the file behind "response N"
        message = str(error)
        for i, t in enumerate(tissues):
            message = message.replace(f"response {i + 1} ", f"response {files[f'response_{t}']} ")
        raise DwiflowInputError(message) from None
    voxels = voxels_to_fit(run, files.get("mask"), dwi)
    fit = model.fit(data, voxels, progress=context.progress)
    params = {"Tissues": tissues, "Lmax": model.lmax, "NormLambda": options.norm_lambda,
              "NegLambda": options.neg_lambda, "ConstraintDirections": int(model.constraint_dirs.shape[0]),
              "Shells": [float(round(s.bvalue)) for s in model.shells],
              "VoxelsNotConverged": int((fit.status_rows == FitStatus.NOT_CONVERGED).sum()),
              "VoxelsFailed": int((fit.status_rows != FitStatus.OK).sum())}
    # BEP016: each tissue's image carries its own response (zonal SH, one row per shell); TissueResponses keeps
    # every tissue's, with the shells and the file it came from
    response_functions, own = tissue_response_sidecars(tissues, responses,
                                                       [float(round(s.bvalue)) for s in model.shells], files)
    sources = provenance(dwi, files["bval"], files["bvec"], *(files[f"response_{t}"] for t in tissues),
                         files.get("mask"), files.get("directions"))
    volumes = {t: (lambda i=i: fit.tissue(i, np.float32)) for i, t in enumerate(tissues)} | {"status": lambda: fit.status}
    return write_maps(STAGES[0], outputs, lambda name: volumes[name](), run.affine, params,
                      sources | {"TissueResponses": response_functions}, STATUS_CODES,
                      {t: {"SphericalHarmonicDegree": model.lmax[i]} for i, t in enumerate(tissues)}, per_output=own,
                      sh_basis=options.sh_basis)


# the apparent diffusivity (mm²/s, from a response's b=0 and largest-b l=0 terms) above which an isotropic response is
# free water (CSF, ~3e-3) rather than grey matter (~0.8e-3): it names the second tissue of a two-tissue command line
CSF_DIFFUSIVITY_CUT = 1.5e-3


def tissue_slots(responses: list[Path], free: list[int]) -> list[int]:
    """The tissues (GM = 1, CSF = 2) of the responses that follow the WM pair on the command line: in order, except
    that a single one is CSF when its signal decays as free water does (MRtrix3's two-tissue recipe for single-shell
    data is WM + CSF; the fit is the same either way, only the output's description differs)."""
    if len(responses) == 1 and free == [1, 2]:
        response = load_response(responses[0])
        l0, b = response.coefficients[:, 0], response.bvalues
        if len(b) > 1 and l0[0] > 0 and l0[-1] > 0 and b[-1] > b[0]:
            if np.log(l0[0] / l0[-1]) / (b[-1] - b[0]) > CSF_DIFFUSIVITY_CUT:
                return [2]
    return free[:len(responses)]


def check_msmt_csd_data(data, options: MsmtCsdOptions) -> None:
    if not data.shells:
        raise DwiflowInputError("multi-tissue CSD needs diffusion-weighted shells; this run has only b=0 volumes")
    # in a recon spec: the tissues are the responses the stages before hand it (WM always)
    tissues = ["WM"] + [name for kind, name in (("response_gm", "GM"), ("response_csf", "CSF"))
                        if kind in data.provided]
    bvalues = data.bvalues
    if len(tissues) > len(bvalues):
        raise DwiflowInputError(
            f"{len(tissues)} tissues ({', '.join(tissues)}) but this run has only {len(bvalues)} distinct b-values "
            f"({', '.join(f'{b:.0f}' for b in bvalues)}): at most one tissue per b-value can be separated"
            + ("; for single-shell data use recon spec ss3t" if len(bvalues) == 2 and data.n_b0 else ""))


STAGES = (
    Stage(
        name="msmt_csd", order=41, title="Multi-tissue CSD (Jeurissen 2014)",
        methods=lambda o: ("White-matter FODs and grey-matter and CSF compartments were estimated together by "
                           "multi-shell multi-tissue constrained spherical deconvolution of every shell, b=0 "
                           "included, as MRtrix3's dwi2fod msmt_csd"),
        references=("jeurissen2014", "mrtrix3"),
        summary="multi-shell multi-tissue CSD (Jeurissen 2014)",
        description="MRtrix3's dwi2fod msmt_csd: every shell (b=0 included) modelled as the sum of each tissue's ODF "
                    "convolved with its response; each tissue's ODF non-negative. Responses: one row per shell (e.g. "
                    "from response dhollander). Give WM and, optionally, GM and CSF (at most one tissue per "
                    "b-value), as MRtrix3 takes them (RESP_WM OUT_WM RESP_GM OUT_GM RESP_CSF OUT_CSF; two pairs: WM "
                    "and GM, or WM and CSF when the second response decays as free water does) or with the options "
                    "below.",
        options=MsmtCsdOptions, run=run_msmt_csd,
        inputs=DWI_INPUTS + (
            Input("response_wm", "RESP_WM", "white-matter response (MRtrix3 text format, one row per shell)"),
            Input("response_gm", "FILE", "grey-matter response (isotropic)", required=False, flag=True),
            Input("response_csf", "FILE", "CSF response (isotropic)", required=False, flag=True),
            Input("mask", "MASK", "voxels to fit (default: every voxel with signal, as MRtrix3)", required=False,
                  flag=True),
            Input("directions", "FILE", "constraint directions, one per line as azimuth elevation (radians) or x y z "
                  "(MRtrix3's -directions; default: MRtrix3's built-in 300)", required=False, flag=True)),
        outputs=(Output("wm", "the WM ODF (SH coefficients)", cli="positional", metavar="OUT_WM"),
                 Output("gm", "the GM ODF (l=0 term)", cli="flag"),
                 Output("csf", "the CSF ODF (l=0 term)", cli="flag"),
                 Output("status", "the per-voxel status map", cli="flag")),
        provides={"fod": "wm", "gm": "gm", "csf": "csf"}, fod_priority=35, threads=True, compiled=True,
        scipy_blas=False,  # its kernel calls no BLAS
        check_data=check_msmt_csd_data, progress="voxels", conflicts=("csd",),
        cli_pairs=(("response_wm", "wm"), ("response_gm", "gm"), ("response_csf", "csf")), cli_pairs_metavar="RESP OUT",
        cli_pair_slots=tissue_slots,
    ),
)
