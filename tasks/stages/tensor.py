"""Stage ``tensor``: the diffusion tensor and its scalar maps."""

from __future__ import annotations

from dataclasses import dataclass

from dwiflow.tasks.io import load_dwi
from dwiflow.tasks.options import option
from dwiflow.tasks.registry import Input, Output, Stage
from dwiflow.tasks.stagelib import DWI_INPUTS, MapOptions, provenance, thread_count, voxels_to_fit, write_maps

TENSOR_MAPS = ("fa", "md", "ad", "rd", "v1", "s0", "evals", "status", "tensor", "evecs", "cl", "cp", "cs")
METHODS = ("wls", "ols", "dipy-wls", "dipy-ols")


@dataclass(frozen=True)
class TensorOptions(MapOptions):
    """How the tensor is fitted (MRtrix3's dwi2tensor by default, or DIPY's), and which maps a run writes."""

    method: str = option("wls", choices=METHODS,
                         help="wls/ols: MRtrix3's dwi2tensor, a first fit weighted by the measured signal (wls) or "
                              "unweighted (ols, dwi2tensor -ols), then `iter` refits weighted by the predicted "
                              "signal; dipy-wls/dipy-ols: DIPY's TensorModel WLS (weights from an OLS first pass, "
                              "Chung 2006) or OLS")
    iter: int = option(2, minimum=0, maximum=10,
                       help="reweighted refits after the first fit (dwi2tensor -iter; as there, 0 and 1 both keep "
                            "the first fit; wls/ols only)")
    maps: list[str] = option(["fa", "md", "ad", "rd", "v1", "s0", "status"], choices=TENSOR_MAPS, cli=False,
                             help="maps a run writes (on the command line: one option per map)")


def run_tensor(files, outputs, options: TensorOptions, context):
    """Fit the tensor (Basser 1994; IWLS as MRtrix3's dwi2tensor, Veraart 2013; or DIPY's WLS, Chung 2006, or OLS)
    and write the requested maps (tensor2metric's definitions)."""
    from dwiflow.core.tensor import (MIN_POSITIVE_SIGNAL, MRTRIX3_SMALL_INTENSITY, STATUS_CODES, STATUS_DETAILS,
                                     TensorModel)

    run = load_dwi(files["dwi"], files["bval"], files["bvec"])
    voxels = voxels_to_fit(run, files.get("mask"), files["dwi"])
    if options.method.startswith("dipy-"):
        fit_method = options.method.removeprefix("dipy-").upper()
        model = TensorModel(run.gtab, fit_method=fit_method)
        parameters = {"FitMethod": f"DIPY {fit_method}", "MinSignal": MIN_POSITIVE_SIGNAL}
    else:
        model = TensorModel(run.gtab, fit_method="IWLS", iterations=options.iter, ols_start=options.method == "ols")
        parameters = {"FitMethod": f"MRtrix3 dwi2tensor: first fit {options.method.upper()}, then IWLS",
                      "Iterations": options.iter if options.iter > 1 else 0,
                      "SmallIntensityFraction": MRTRIX3_SMALL_INTENSITY}
    fit = model.fit(run.data, voxels, n_threads=thread_count(context))
    maps = {"fa": lambda: fit.fa, "md": lambda: fit.md, "ad": lambda: fit.ad, "rd": lambda: fit.rd,
            "v1": lambda: fit.v1, "s0": lambda: fit.s0, "evals": lambda: fit.evals, "status": lambda: fit.status,
            "tensor": lambda: fit.elements, "cl": lambda: fit.cl, "cp": lambda: fit.cp, "cs": lambda: fit.cs,
            "evecs": lambda: fit.evecs_xyz}
    return write_maps(STAGES[0], outputs, lambda name: maps[name](), run.affine, parameters,
                      provenance(files["dwi"], files["bval"], files["bvec"], files.get("mask")), STATUS_CODES,
                      status_details=STATUS_DETAILS)


_HELP = {"fa": "fractional anisotropy", "md": "mean diffusivity", "ad": "axial diffusivity",
         "rd": "radial diffusivity", "v1": "principal eigenvector (world frame)", "s0": "fitted S0",
         "evals": "eigenvalues (3 volumes, largest first)", "status": "per-voxel fit status",
         "tensor": "tensor (6 elements, BEP016 order D11 D12 D13 D22 D23 D33)",
         "evecs": "eigenvectors (9 volumes: x, y, z of each, in eigenvalue order)", "cl": "Westin linearity",
         "cp": "Westin planarity", "cs": "Westin sphericity"}

def _methods_sentence(options: TensorOptions) -> str:
    if options.method.startswith("dipy-"):
        how = ("weighted linear least squares with weights from an ordinary least-squares fit, as DIPY's "
               "TensorModel" if options.method == "dipy-wls" else "ordinary linear least squares, as DIPY's "
               "TensorModel")
    else:
        first = "weighted by the measured signal" if options.method == "wls" else "unweighted"
        refits = (f", then refitted {options.iter} times with weights from the predicted signal" if options.iter > 1
                  else "")
        how = f"linear least squares ({first}{refits}), as MRtrix3's dwi2tensor"
    return f"The diffusion tensor was fitted to the log-signal by {how}"


STAGES = (
    Stage(
        name="tensor", order=20, title="Diffusion tensor",
        methods=_methods_sentence,
        references=lambda o: {"dipy-wls": ("basser1994", "chung2006", "dipy"), "dipy-ols": ("basser1994", "dipy")}.get(
            o.method, ("basser1994", "veraart2013", "mrtrix3")),
        summary="diffusion tensor fit and its maps",
        description="Least-squares tensor fit on the log-signal (Basser et al. 1994): by default as MRtrix3's "
                    "dwi2tensor (a fit weighted by the measured signal, then iteratively reweighted by the predicted "
                    "signal, Veraart et al. 2013), or as DIPY's WLS (Chung et al. 2006) or OLS; maps as MRtrix3's "
                    "tensor2metric. Give one option per map to write.",
        options=TensorOptions, run=run_tensor,
        inputs=DWI_INPUTS + (Input("mask", "MASK", "voxels to fit (default: every voxel with signal)", required=False,
                                   flag=True),),
        outputs=tuple(Output(name, f"the {text} map", cli="flag") for name, text in _HELP.items()),
        scipy_blas=False, threads=True,
    ),
)
